"""CURVE keys and who may connect: ZeroMQ's own security (CurveZMQ, RFC 26; ZAP, RFC 27).

A node that binds a TCP port others reach (the broker; a robot host's publisher bound for
another host) is a CURVE server: it has a key pair, and a ZAP handler in its process lets
in only the public keys in an allow-list folder. A node that connects is a CURVE client:
its own key pair, and the server's public key, so that it talks to that server and no
other. Everything on such a connection is encrypted and authenticated; ipc on one host is
not (the runtime directory is private to its user: bus/endpoints.py).

Keys are pyzmq's certificate files (`zmq.auth.create_certificates`): NAME.key holds the
public key, NAME.key_secret both. In an allow-list folder a public key file's NAME is the
identity the connection gets (ZeroMQ's User-Id on every message it sends): for a robot,
the robot id its requests must carry.
"""

from __future__ import annotations

import itertools
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth
from zmq.utils import z85
from zmq.utils.monitor import recv_monitor_message

from .endpoints import NODE_NAME
from .log import get_logger

PUBLIC_SUFFIX = ".key"
SECRET_SUFFIX = ".key_secret"
ZAP_ENDPOINT = "inproc://zeromq.zap.01"  # where libzmq asks (RFC 27)


class KeyFileError(ValueError):
    """A key or key folder that cannot be used; the text says what to do."""


@dataclass(frozen=True)
class KeyPair:
    name: str  # the file's name without its suffix
    public: bytes  # Z85, 40 characters
    secret: bytes


def new_key_pair(name: str, directory: str | Path = ".") -> tuple[Path, Path]:
    """Write NAME.key (public) and NAME.key_secret (readable by its owner only) into
    `directory`; never overwrites a key."""
    if not NODE_NAME.fullmatch(name):
        raise KeyFileError(f"{name!r} is not a key name: use letters, digits, '_', '.' or '-' (it names the robot "
                           "or worker, e.g. so101-lab)")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    public, secret = directory / f"{name}{PUBLIC_SUFFIX}", directory / f"{name}{SECRET_SUFFIX}"
    for path in (public, secret):
        if path.exists():
            raise KeyFileError(f"{path} exists: a key is never overwritten (remove it first, or pick another name)")
    # Created empty with mode 0600 first, so the secret is never readable by others, not even briefly.
    os.close(os.open(secret, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    written = zmq.auth.create_certificates(directory, name)
    return Path(written[0]), Path(written[1])


def _key_name(path: Path) -> str:
    for suffix in (SECRET_SUFFIX, PUBLIC_SUFFIX):
        if path.name.endswith(suffix):
            return path.name[: -len(suffix)]
    return path.stem


def _load(path: Path) -> tuple[bytes, bytes | None]:
    if not path.exists():
        raise KeyFileError(f"no key file at {path}: make a key pair with `chunkbus keys new NAME`")
    if path.is_dir():
        raise KeyFileError(f"{path} is a folder, not a key file")
    try:
        public, secret = zmq.auth.load_certificate(path)
    except PermissionError:
        raise KeyFileError(f"cannot read the key file {path}: this user has no permission to read it") from None
    except (ValueError, OSError, UnicodeDecodeError):
        raise KeyFileError(f"{path} is not a CURVE key file (make one with `chunkbus keys new NAME`)") from None
    for key in (public, secret):
        if key is not None and not _is_key(key):
            raise KeyFileError(f"{path} holds a malformed key (a CURVE key is 40 Z85 characters)")
    return public, secret


def _is_key(key: bytes) -> bool:
    try:
        return len(key) == 40 and len(z85.decode(key)) == 32
    except (ValueError, KeyError, TypeError):
        return False


def read_key_pair(path: str | Path) -> KeyPair:
    """A node's own key pair, from its NAME.key_secret file."""
    path = Path(path)
    public, secret = _load(path)
    if secret is None:
        raise KeyFileError(f"{path} is a public key: give this node's secret key file "
                           f"({_key_name(path)}{SECRET_SUFFIX}), which only its owner has")
    return KeyPair(_key_name(path), public, secret)


def read_public_key(text: str) -> bytes:
    """A peer's public key: its 40-character Z85 text (as `chunkbus keys show` prints it), or its
    key file (NAME.key; a NAME.key_secret file gives its public half)."""
    if len(text) == 40 and _is_key(text.encode()):
        return text.encode()
    return _load(Path(text))[0]


# --- applying keys to sockets -----------------------------------------------------------------


@dataclass(frozen=True)
class ClientKeys:
    """A CURVE client's keys: its own pair and the server's public key."""

    own: KeyPair
    server: bytes

    def apply(self, socket: zmq.Socket) -> None:
        """Before connect: the connections made from now on use CURVE."""
        socket.curve_publickey, socket.curve_secretkey = self.own.public, self.own.secret
        socket.curve_serverkey = self.server


def make_server(socket: zmq.Socket, own: KeyPair, domain: str) -> None:
    """Before bind: connections to the endpoints bound from now on must use CURVE, and the ZAP
    handler's `domain` decides which keys get in."""
    socket.curve_server = True
    socket.curve_publickey, socket.curve_secretkey = own.public, own.secret
    socket.zap_domain = domain.encode()


# --- who may connect ------------------------------------------------------------------------


class AllowList:
    """The public keys in a folder (*.key files), each named by its file's name; re-read by
    refresh() when the folder changes."""

    def __init__(self, folder: str | Path, what: str):
        self.folder, self.what = Path(folder), what  # what: the option that names it, for messages
        if not self.folder.is_dir():
            raise KeyFileError(f"{what} {self.folder} is not a folder: give the folder that holds the allowed "
                               "public keys (NAME.key files)")
        self.log = get_logger(component="keys")
        self.names: dict[bytes, str] = {}  # public key -> name; replaced whole, read by the ZAP thread
        self.identities: frozenset[str] = frozenset()  # the names, for a check per message
        self._seen: object = None
        self.refresh(strict=True)

    def _signature(self) -> object:
        try:
            return sorted((path.name, path.stat().st_mtime_ns, path.stat().st_size)
                          for path in self.folder.glob(f"*{PUBLIC_SUFFIX}"))
        except OSError:  # a file went while we looked: look again next time
            return None

    def refresh(self, strict: bool = False) -> set[str]:
        """Re-read the folder if it changed; the names whose keys went. `strict`: a bad file is
        an error (at start), not a warning (a reload must not take the server down)."""
        signature = self._signature()
        if signature == self._seen:
            return set()
        names: dict[bytes, str] = {}
        for path in sorted(self.folder.glob(f"*{PUBLIC_SUFFIX}")):
            try:
                public, _ = _load(path)
            except KeyFileError as exc:
                if strict:
                    raise KeyFileError(f"in {self.what} {self.folder}: {exc}") from None
                self.log.warning("skipped a key file", folder=str(self.folder), why=str(exc))
                continue
            names.setdefault(public, _key_name(path))
        removed = set(self.names.values()) - set(names.values())
        if self._seen is not None:
            added = set(names.values()) - set(self.names.values())
            self.log.info("allowed keys changed", folder=str(self.folder), added=sorted(added),
                          removed=sorted(removed), keys=len(names))
        self.names, self.identities, self._seen = names, frozenset(names.values()), signature
        return removed

    def allows(self, name: str) -> bool:
        return name in self.identities


class ZapHandler:
    """The ZAP handler of one zmq context (RFC 27): a thread that answers libzmq's question,
    "may this key connect?", for every CURVE server socket of the context, by its domain's
    AllowList. A refused key is logged once and counted."""

    _handlers: dict[int, ZapHandler] = {}
    _lock = threading.Lock()

    @classmethod
    def of(cls, context: zmq.Context) -> ZapHandler:
        """The context's handler, started on first use (libzmq allows one per context)."""
        with cls._lock:
            handler = cls._handlers.get(id(context))
            if handler is None:
                handler = cls._handlers[id(context)] = cls(context)
            return handler

    def __init__(self, context: zmq.Context):
        self.domains: dict[str, AllowList] = {}
        self.refused: dict[str, int] = {}  # per domain
        self._logged: set[tuple[str, bytes]] = set()
        self.log = get_logger(component="zap")
        self._socket = context.socket(zmq.REP)
        self._socket.linger = 0
        self._socket.bind(ZAP_ENDPOINT)
        self._thread = threading.Thread(target=self._run, name="chunkbus-zap", daemon=True)
        self._thread.start()

    def add_domain(self, name: str, allowed: AllowList) -> str:
        """Register an allow-list under a domain name unique in this process; returns it."""
        domain = f"{name}.{len(self.domains)}"
        self.domains[domain] = allowed
        self.refused.setdefault(domain, 0)
        return domain

    def refusals(self, domain: str) -> int:
        return self.refused.get(domain, 0)

    def _run(self) -> None:
        while True:
            try:
                request = self._socket.recv_multipart()
            except zmq.ZMQError:  # the context is ending
                return
            try:
                self._socket.send_multipart(self._answer(request))
            except zmq.ZMQError:
                return

    def _answer(self, request: list[bytes]) -> list[bytes]:
        version, request_id = (request + [b"", b""])[:2]
        if len(request) < 6 or version != b"1.0":
            return [b"1.0", request_id, b"400", b"malformed ZAP request", b"", b""]
        domain, address, _identity, mechanism, *credentials = request[2:]
        domain_name = domain.decode("utf-8", "replace")
        allowed = self.domains.get(domain_name)
        if mechanism == b"NULL" and allowed is None:  # a plain socket of this process: not ours to judge
            return [version, request_id, b"200", b"OK", b"", b""]
        key = z85.encode(credentials[0]) if mechanism == b"CURVE" and credentials else b""
        name = allowed.names.get(key) if allowed is not None else None
        if name is not None:
            return [version, request_id, b"200", b"OK", name.encode(), b""]
        self.refused[domain_name] = self.refused.get(domain_name, 0) + 1
        if (domain_name, key) not in self._logged:  # once per key: a retrying client cannot flood the log
            self._logged.add((domain_name, key))
            self.log.warning("refused a connection: its key is not allowed", address=address.decode("utf-8", "replace"),
                             key=key.decode() or None, mechanism=mechanism.decode("utf-8", "replace"),
                             allowed_in=str(allowed.folder) if allowed else None)
        return [version, request_id, b"400", b"key not allowed", b"", b""]


# --- what a client hears of its handshakes -------------------------------------------------------

MONITORED = (zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
             | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_DISCONNECTED)


class Handshakes:
    """A connecting socket's monitor, read without blocking: whether its peer is connected,
    whether it was lost, and, when a handshake failed, why, in words a person can act on
    (ZeroMQ itself only retries in silence)."""

    _count = itertools.count()

    def __init__(self, socket: zmq.Socket, peer: str, curve: bool, key_option: str = "--broker-key",
                 allow_option: str = "--allow-robots or --allow-workers"):
        self.peer, self.curve, self.key_option, self.allow_option = peer, curve, key_option, allow_option
        self.connected = False
        self.problem: str | None = None
        # A name of our own: pyzmq's default is made of the socket's fd, which a later socket reuses.
        self.monitor = socket.get_monitor_socket(MONITORED, f"inproc://chunkbus-monitor-{os.getpid()}-{next(self._count)}")
        self._socket = socket

    def read(self) -> tuple[bool, str | None]:
        """Take every event waiting: (whether a connection was lost, the latest handshake problem)."""
        lost = False
        while self.monitor.poll(0):
            event = recv_monitor_message(self.monitor)
            kind, value = event["event"], event["value"]
            if kind == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self.connected, self.problem = True, None
            elif kind == zmq.EVENT_DISCONNECTED:
                lost, self.connected = lost or self.connected, False
            else:
                self.problem = self.explain(kind, value)
        return lost, self.problem

    def explain(self, kind: int, value: int) -> str:
        if kind == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
            return (f"{self.peer} refused this key: copy its public key (the NAME.key beside --curve-secret's "
                    f"NAME.key_secret) into the peer's allow-list folder ({self.allow_option})")
        mismatch = kind == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL and value == zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH
        if self.curve and mismatch:
            return (f"{self.peer} does not use CURVE but this side does: start it with --curve-secret, or "
                    f"leave --curve-secret and {self.key_option} off here")
        if self.curve:  # the server could not open our HELLO (or hung up before saying why)
            return (f"the key of {self.peer} does not match {self.key_option}: copy its public key again "
                    f"(`chunkbus keys show ITS.key` on that host); or {self.peer} does not use CURVE")
        # A plain side learns of the mismatch, or only that the peer hung up (over a network, it may close first).
        certainly = "requires" if mismatch else "refused a plaintext handshake: it most likely requires"
        return (f"{self.peer} {certainly} CURVE: give this side --curve-secret (its own key) and the peer's public "
                f"key ({self.key_option})")

    def close(self) -> None:
        try:
            self._socket.disable_monitor()
        except zmq.ZMQError:
            pass
        self.monitor.close(linger=0)
