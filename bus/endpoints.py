"""Where nodes meet: the endpoint convention.

On one host every publisher binds ``ipc://<runtime dir>/<node>.pub``, so a tool finds
all publishers by listing the runtime directory. The directory is
``$CHUNKBUS_RUNTIME_DIR``, else ``$XDG_RUNTIME_DIR/chunkbus``, else
``/tmp/chunkbus-<uid>``. Crossing hosts takes tcp addresses (``tcp://host:port``).
"""

from __future__ import annotations

import errno
import ipaddress
import os
import re
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path

PUB_SUFFIX = ".pub"
CONTROL_SUFFIX = ".ctl"  # a node's control socket (REP): `chunkbus task` asks the actuator there
NODE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
# sun_path holds 108 bytes including the terminating NUL.
MAX_IPC_PATH = 107
SCHEMES = ("tcp://", "ipc://", "inproc://")


# --- the names that join the nodes ----------------------------------------------------------

STATE = "state"  # the arm's joint positions (ArmState), at its rate
COMMAND = "command"  # the actuator's command for each tick (Command)


def camera_topic(camera: str) -> str:
    """Where camera `camera` publishes its frames (CameraFrame)."""
    return f"camera/{camera}"


def camera_node(camera: str) -> str:
    """The node name a camera runs under unless told otherwise."""
    return f"camera_{camera}"


def stats_topic(node: str) -> str:
    """Where node `node` publishes its once-a-second figures (Stats)."""
    return f"{node}/stats"


def chunk_topic(node: str) -> str:
    """Where actuator `node` publishes each chunk it merges (ActionChunk): what viewers draw."""
    return f"{node}/chunk"


def task_topic(node: str) -> str:
    """Where actuator `node` publishes its task, at start and at each change (TaskSet)."""
    return f"{node}/task"


def capture_topic(direction: str, service: str) -> str:
    """Where the broker offers its traffic to taps: direction "request" or "reply"."""
    return f"broker/{direction}/{service}"


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


def publisher_endpoint(node: str, directory: Path | None = None, suffix: str = PUB_SUFFIX) -> str:
    """The ipc endpoint that node `node` publishes on (or, with CONTROL_SUFFIX, answers on)."""
    path = (directory or runtime_dir()) / f"{check_node_name(node)}{suffix}"
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


# --- broker addresses, as people write them ----------------------------------------------

FRONTEND_PORT = 5555  # `chunkbus broker`'s defaults: clients (robots, status, ping) connect
BACKEND_PORT = 5556  # to the frontend, workers to the backend
BROKER_ENV = "CHUNKBUS_BROKER"  # the broker's frontend address, for every command
ADDRESS_FORMS = (
    "HOST:PORT (e.g. `gpu-host:5555` or `127.0.0.1:5555`), HOST alone (port {port}), "
    "`[IPv6]:PORT`, `tcp://HOST:PORT` or `ipc://PATH`"
)
_HOST_NAME = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_-]*[A-Za-z0-9_])?(\.[A-Za-z0-9_]([A-Za-z0-9_-]*[A-Za-z0-9_])?)*\.?")


def broker_address(text: str, default_port: int) -> str:
    """The zmq endpoint to connect to for a broker address as people write it.

    ``gpu-host:5555`` and ``127.0.0.1:5555`` mean ``tcp://…`` (as LeRobot's
    ``--server_address=127.0.0.1:8080``); a bare host gets `default_port`; ``[::1]:5555``
    is an IPv6 address; ``tcp://`` and ``ipc://`` endpoints pass through. Anything else
    raises EndpointError saying what is wrong and which forms work.
    """

    def fail(reason: str) -> EndpointError:
        forms = ADDRESS_FORMS.format(port=default_port)
        opening = "the broker address is empty" if not text else f"`{text}` is not a broker address: {reason}"
        return EndpointError(f"{opening}. Write {forms}.")

    if not text:
        raise fail("")
    if any(c.isspace() for c in text):
        raise fail("it contains a space")
    if text.startswith("ipc://"):
        if text == "ipc://":
            raise fail("it has no path after `ipc://`")
        return text
    source = ""
    rest = text
    if text.startswith("tcp://"):
        rest = text[len("tcp://") :]
        source, _, rest = rest.rpartition(";")  # zmq's tcp://SOURCE;HOST:PORT
        source += ";" if source else ""
    elif "://" in text:
        raise fail(f"`{text.split('://')[0]}://` is not a transport the bus speaks")
    host, port = _host_and_port(rest, default_port, fail)
    return f"tcp://{source}{host}:{port}"


def _host_and_port(text: str, default_port: int, fail) -> tuple[str, int]:
    if text.startswith("["):  # [IPv6] or [IPv6]:PORT
        inside, bracket, after = text[1:].partition("]")
        if not bracket:
            raise fail("its `[` has no closing `]`")
        try:
            ipaddress.IPv6Address(inside)
        except ValueError:
            raise fail(f"`{inside}` is not an IPv6 address") from None
        host, port_text = f"[{inside}]", after
        if port_text and not port_text.startswith(":"):
            raise fail(f"`{port_text}` after `]` is not `:PORT`")
        port_text = port_text[1:] if port_text else None
    elif text.count(":") > 1:
        raise fail("an IPv6 address goes in brackets, e.g. `[::1]:5555`")
    else:
        host, colon, port_text = text.partition(":")
        port_text = port_text if colon else None
        if not host:
            raise fail("it has no host before the port")
        if host == "*":
            raise fail("`*` is for binding (the broker's side); connect to the broker's host name or IP address")
        if host.isdigit() and port_text is None:
            raise fail(f"`{host}` is a port without a host (for this host write `127.0.0.1:{host}`)")
        if re.fullmatch(r"[0-9.]+", host):
            try:
                ipaddress.IPv4Address(host)
            except ValueError:
                raise fail(f"`{host}` is not an IPv4 address") from None
        elif not _HOST_NAME.fullmatch(host):
            raise fail(f"`{host}` is not a host name or IP address")
    if port_text is None:
        return host, default_port
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise fail(f"the port `{port_text}` is not a number from 1 to 65535")
    return host, int(port_text)


def backend_of(frontend: str) -> str:
    """The backend a worker connects to, from the broker's frontend address (CHUNKBUS_BROKER's).

    The same host, on the port after the frontend's: ``gpu-host`` and ``gpu-host:5555``
    give ``tcp://gpu-host:5556`` (`chunkbus broker`'s default ports), ``gpu-host:7000``
    gives ``tcp://gpu-host:7001``. An ipc frontend says nothing about the backend.
    """
    endpoint = broker_address(frontend, FRONTEND_PORT)
    if not endpoint.startswith("tcp://"):
        raise EndpointError(
            f"`{frontend}` is an ipc address: a worker cannot tell the broker's backend from it. "
            "Give the worker the backend with `--broker`."
        )
    head, _, port = endpoint.rpartition(":")
    if int(port) == 65535:
        raise EndpointError(
            f"`{frontend}` has port 65535, so no backend port follows it. Give the worker the backend with `--broker`."
        )
    return f"{head}:{int(port) + 1}"


def is_ipv6(endpoint: str) -> bool:
    """Whether `endpoint` is a tcp endpoint with an IPv6 address (which zmq must be told to allow)."""
    return endpoint.startswith("tcp://") and "[" in endpoint
