"""Where nodes meet: the endpoint convention.

On one host every publisher binds ``ipc://<runtime dir>/<node>.pub``, so a tool finds
all publishers by listing the runtime directory. The directory is
``$CHUNKBUS_RUNTIME_DIR``, else ``$XDG_RUNTIME_DIR/chunkbus``, else
``/tmp/chunkbus-<uid>``. Crossing hosts takes tcp addresses (``tcp://host:port``).
"""

from __future__ import annotations

import errno
import os
import re
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path

PUB_SUFFIX = ".pub"
NODE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
# sun_path holds 108 bytes including the terminating NUL.
MAX_IPC_PATH = 107
SCHEMES = ("tcp://", "ipc://", "inproc://")


class EndpointError(RuntimeError):
    """An endpoint that cannot be used; the text says why and what to do."""


def runtime_dir() -> Path:
    """The directory of this host's ipc endpoints, created private to this user."""
    if configured := os.environ.get("CHUNKBUS_RUNTIME_DIR"):
        path = Path(configured)
    elif xdg := os.environ.get("XDG_RUNTIME_DIR"):
        path = Path(xdg) / "chunkbus"
    else:
        path = Path(tempfile.gettempdir()) / f"chunkbus-{os.getuid()}"
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


def check_node_name(name: str) -> str:
    if not NODE_NAME.fullmatch(name):
        raise EndpointError(
            f"node name {name!r} is not valid: use 1-64 letters, digits, '_', '.' or '-', "
            "starting with a letter or digit"
        )
    return name


def publisher_endpoint(node: str, directory: Path | None = None) -> str:
    """The ipc endpoint that node `node` publishes on."""
    path = (directory or runtime_dir()) / f"{check_node_name(node)}{PUB_SUFFIX}"
    if len(str(path).encode()) > MAX_IPC_PATH:
        raise EndpointError(
            f"ipc path {path} is longer than the {MAX_IPC_PATH} bytes a Unix socket allows: "
            "set CHUNKBUS_RUNTIME_DIR to a shorter directory"
        )
    return f"ipc://{path}"


def resolve(address: str) -> str:
    """A zmq endpoint for `address`: an endpoint as it is, or a node name's publisher."""
    if address.startswith(SCHEMES):
        return address
    if "://" in address:
        raise EndpointError(
            f"endpoint {address!r} has an unknown transport: use tcp://HOST:PORT, "
            "ipc://PATH, or the name of a node on this host"
        )
    return publisher_endpoint(address)


def _ipc_path(endpoint: str) -> Path | None:
    return Path(endpoint[len("ipc://") :]) if endpoint.startswith("ipc://") else None


def is_live(path: Path) -> bool:
    """Whether a process is listening on the Unix socket at `path`."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
        return True
    except OSError as exc:
        if exc.errno in (errno.ECONNREFUSED, errno.ENOENT, errno.ENOTSOCK):
            return False
        raise
    finally:
        probe.close()


def claim(endpoint: str) -> None:
    """Check that binding `endpoint` takes nobody's place (ipc only).

    zmq silently replaces the socket file of an ipc endpoint, which would cut a
    running node with the same name off the bus; a file left by a dead process is fine.
    """
    path = _ipc_path(endpoint)
    if path is not None and path.exists() and is_live(path):
        raise EndpointError(
            f"{endpoint} is in use by a running node: stop it, or give this node another name"
        )


@dataclass(frozen=True)
class PublisherInfo:
    node: str
    endpoint: str
    live: bool  # False: a socket file left behind by a process that is gone


def list_publishers(directory: Path | None = None) -> list[PublisherInfo]:
    """Every publisher endpoint in the runtime directory, sorted by node name."""
    directory = directory or runtime_dir()
    found = []
    for path in sorted(directory.glob(f"*{PUB_SUFFIX}")):
        node = path.name[: -len(PUB_SUFFIX)]
        found.append(PublisherInfo(node, f"ipc://{path}", is_live(path)))
    return found
