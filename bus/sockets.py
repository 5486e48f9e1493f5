"""Publisher and subscriber sockets: a published message is ``[topic, header, *buffers]``.

A publisher never blocks: a subscriber that cannot keep up loses old messages (the
send high-water mark), which is what a control loop wants. A Subscriber keeps the
newest message of each topic, received in a background thread with a small receive
high-water mark; it drains everything waiting and decodes only the newest of each
topic (ZMQ_CONFLATE would do this, but does not work with multipart messages).

Over TCP to another host, both can use CURVE (bus/security.py): a publisher given
ServerKeys takes only the subscribers whose keys are in its allow-list on its TCP
endpoints (its ipc endpoint stays plain: ZeroMQ reads the security options at each bind),
and a subscriber given ClientKeys uses them for its TCP endpoints.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import zmq

from .codec import MAX_MESSAGE_BYTES, decode, encode
from .endpoints import CONTROL_SUFFIX, claim, publisher_endpoint, resolve
from .log import Every, get_logger
from .messages import ErrorReply, Message
from .schema import MessageError
from .security import AllowList, ClientKeys, Handshakes, KeyPair, ZapHandler, make_server

POLL_MS = 50  # how often a background thread checks that it should stop


_MORE = int(zmq.SNDMORE)


# Each request passes about 20 frames through the broker's one thread: send_frames and drain do what
# pyzmq's send_multipart and recv_multipart do, less their per-frame Python (type checks, a flag
# computed per frame, a getsockopt(RCVMORE) per frame): 57 -> 41 µs of the broker's per request.


def send_frames(socket: zmq.Socket, frames: list) -> None:
    """socket.send_multipart(frames, copy=False), for frames that are bytes or zmq.Frames."""
    send = socket.send
    for frame in frames[:-1]:
        send(frame, _MORE, copy=False)
    send(frames[-1], 0, copy=False)


def drain(socket: zmq.Socket, limit: float = math.inf) -> Iterator[list[zmq.Frame]]:
    """The multipart messages waiting on `socket` now (up to `limit`), without blocking, as
    zmq.Frames (copy=False)."""
    recv, taken = socket.recv, 0
    while taken < limit:
        try:
            frame = recv(zmq.NOBLOCK, copy=False)
        except zmq.Again:
            return
        frames = [frame]
        while frame.more:
            frame = recv(copy=False)
            frames.append(frame)
        taken += 1
        yield frames


@dataclass(frozen=True)
class ServerKeys:
    """A publisher's CURVE keys for its TCP endpoints: its own pair and who may subscribe."""

    own: KeyPair
    allowed: AllowList


def _tcp_last(endpoints: Sequence[str]) -> list[str]:
    """Plain endpoints first: the TCP ones, bound or connected last, get the CURVE options."""
    return sorted(endpoints, key=lambda e: e.startswith("tcp://"))


class Publisher:
    """Publishes messages on node `node`'s ipc endpoint and on any extra `bind` endpoints
    (with `keys`, its TCP endpoints take only CURVE subscribers that its allow-list holds).

    A published array is sent from its own memory, without a copy: do not modify it
    after publishing it.
    """

    def __init__(
        self,
        node: str,
        bind: Sequence[str] = (),
        *,
        ipc: bool = True,
        context: zmq.Context | None = None,
        sndhwm: int = 16,
        keys: ServerKeys | None = None,
    ):
        self.context = context or zmq.Context.instance()
        self.socket = self.context.socket(zmq.PUB)
        self.socket.setsockopt(zmq.SNDHWM, sndhwm)
        self.socket.setsockopt(zmq.LINGER, 100)
        self.endpoints: list[str] = []
        try:
            for endpoint in _tcp_last(([publisher_endpoint(node)] if ipc else []) + list(bind)):
                claim(endpoint)
                if keys is not None and endpoint.startswith("tcp://") and not self.socket.curve_server:
                    domain = ZapHandler.of(self.context).add_domain("subscribers", keys.allowed)
                    make_server(self.socket, keys.own, domain)
                self.socket.bind(endpoint)
                # A wildcard port (tcp://127.0.0.1:*) resolves to the one bound.
                self.endpoints.append(self.socket.getsockopt_string(zmq.LAST_ENDPOINT))
        except Exception:
            self.socket.close(linger=0)
            raise

    def publish(self, topic: str, message: Message) -> None:
        self.publish_frames(topic, encode(message))

    def publish_frames(self, topic: str, frames: Sequence) -> None:
        """Publish already-encoded frames (a replay, the broker's capture) as they are."""
        self.socket.send_multipart([topic.encode(), *frames], copy=False)

    def close(self) -> None:
        self.socket.close()

    def __enter__(self) -> Publisher:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass(frozen=True)
class Received:
    topic: str
    message: Message
    receive_time: float  # time.monotonic() when it was received

    @property
    def age(self) -> float:
        """Seconds since it was received."""
        return time.monotonic() - self.receive_time


class Subscriber:
    """Subscribes to `topics` (prefixes; "" is every topic) on `endpoints`.

    ``latest(topic)`` is the newest message of a topic; ``on_message``, if given, is
    called in the background thread with every message received (nothing is skipped).
    Malformed messages are logged, counted in ``rejected``, and dropped.
    """

    def __init__(
        self,
        endpoints: Sequence[str],
        topics: Sequence[str] = ("",),
        *,
        context: zmq.Context | None = None,
        rcvhwm: int = 4,
        on_message: Callable[[Received], None] | None = None,
        max_bytes: int = MAX_MESSAGE_BYTES,
        keys: ClientKeys | None = None,
    ):
        self.endpoints = [resolve(e) for e in endpoints]
        self.keys = keys
        self.problem: str | None = None  # why a CURVE handshake with a publisher failed
        self.topics = list(topics)
        self.received = 0
        self.rejected = 0
        self._context = context or zmq.Context.instance()
        self._rcvhwm = rcvhwm
        self._on_message = on_message
        self._max_bytes = max_bytes
        self._latest: dict[str, Received] = {}
        self._changed = threading.Condition()
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._log = get_logger(component="subscriber")
        self._complain_every = Every(1.0)  # a flood of garbage cannot flood the log too
        self._thread = threading.Thread(target=self._run, name="chunkbus-subscriber", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._error:
            raise self._error

    def latest(self, topic: str) -> Received | None:
        with self._changed:
            return self._latest.get(topic)

    def wait(self, topic: str, timeout: float, newer_than: float = -1.0) -> Received:
        """The newest message of `topic` received after `newer_than`; waits up to `timeout`."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                found = self._latest.get(topic)
                if found is not None and found.receive_time > newer_than:
                    return found
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not self._thread.is_alive():
                    raise TimeoutError(
                        f"no message on topic {topic!r} from {', '.join(self.endpoints)} "
                        f"within {timeout:.1f} s: is the publishing node running?"
                    )
                self._changed.wait(remaining)

    def topics_seen(self) -> list[str]:
        with self._changed:
            return sorted(self._latest)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()

    def __enter__(self) -> Subscriber:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _run(self) -> None:
        # The socket lives and dies in this thread: zmq sockets are not thread-safe.
        try:
            socket = self._context.socket(zmq.SUB)
            socket.setsockopt(zmq.RCVHWM, self._rcvhwm)
            socket.setsockopt(zmq.MAXMSGSIZE, self._max_bytes)
            socket.setsockopt(zmq.LINGER, 0)
            for topic in self.topics:
                socket.setsockopt(zmq.SUBSCRIBE, topic.encode())
            handshakes = None
            for endpoint in _tcp_last(self.endpoints):
                if self.keys is not None and endpoint.startswith("tcp://") and handshakes is None:
                    self.keys.apply(socket)
                    handshakes = Handshakes(socket, "the publisher", curve=True, key_option="--publisher-key",
                                            allow_option="the publisher's --allow-subscribers")
                socket.connect(endpoint)
        except Exception as exc:
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        try:
            while not self._stop.is_set():
                if socket.poll(POLL_MS, zmq.POLLIN):
                    self._drain(socket)
                if handshakes is not None:
                    self._check(handshakes)
        finally:
            if handshakes is not None:
                handshakes.close()
            socket.close(linger=0)

    def _check(self, handshakes: Handshakes) -> None:
        problem = handshakes.read()[1]
        if problem is not None and problem != self.problem:  # said once, not at each retry
            self._log.error("cannot subscribe", why=problem, endpoints=[e for e in self.endpoints
                                                                          if e.startswith("tcp://")])
        self.problem = problem

    def _drain(self, socket: zmq.Socket) -> None:
        newest: dict[bytes, tuple[list[zmq.Frame], float]] = {}
        for frames in drain(socket):
            now = time.monotonic()
            if self._on_message is not None:
                self._accept(frames, now)
            else:
                newest[frames[0].bytes] = (frames, now)
        for frames, now in newest.values():
            self._accept(frames, now)

    def _accept(self, frames: list[zmq.Frame], receive_time: float) -> None:
        topic = frames[0].bytes.decode("utf-8", "replace")
        try:
            if len(frames) < 2:
                raise MessageError("a published message needs a topic frame and a header frame")
            message = decode(frames[1:], self._max_bytes)
        except MessageError as exc:
            self.rejected += 1
            self._complain(topic, exc)
            return
        received = Received(topic, message, receive_time)
        self.received += 1
        with self._changed:
            self._latest[topic] = received
            self._changed.notify_all()
        if self._on_message is not None:
            self._on_message(received)

    def _complain(self, topic: str, exc: MessageError) -> None:
        if self._complain_every(time.monotonic()):
            self._log.warning(
                "dropped malformed message", topic=topic, error=str(exc), rejected=self.rejected
            )


class ControlServer:
    """A node's control socket (REP at `<node>.ctl` in the runtime directory): commands such
    as `chunkbus task` ask, the node answers. Served without blocking from the node's own loop."""

    def __init__(self, node: str, context: zmq.Context | None = None):
        self.endpoint = publisher_endpoint(node, suffix=CONTROL_SUFFIX)
        claim(self.endpoint)
        self.socket = (context or zmq.Context.instance()).socket(zmq.REP)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.MAXMSGSIZE, 1 << 20)
        self.socket.bind(self.endpoint)

    def serve_waiting(self, handle: Callable[[Message], Message]) -> None:
        """Answer what waits now (at most one: REP answers in turn) with `handle(message)`."""
        try:
            frames = self.socket.recv_multipart(zmq.NOBLOCK, copy=False)
        except zmq.Again:
            return
        try:
            reply = handle(decode(frames))
        except MessageError as exc:
            reply = ErrorReply("", "bad_request", f"not a valid control message: {exc}")
        self.socket.send_multipart(encode(reply), copy=False)

    def close(self) -> None:
        self.socket.close()


def ask_node(node: str, message: Message, timeout: float = 2.0) -> Message:
    """Send `message` to node `node`'s control socket and return its answer; TimeoutError
    when no node of that name answers within `timeout` seconds."""
    endpoint = publisher_endpoint(node, suffix=CONTROL_SUFFIX)
    socket = zmq.Context.instance().socket(zmq.REQ)
    socket.setsockopt(zmq.LINGER, 0)
    try:
        socket.connect(endpoint)
        socket.send_multipart(encode(message), copy=False)
        if not socket.poll(int(timeout * 1000), zmq.POLLIN):
            raise TimeoutError(f"no node {node!r} answers at {endpoint} within {timeout:g} s: is it running on this "
                               "host, under this name (--name)?")
        return decode(socket.recv_multipart(copy=False))
    finally:
        socket.close()
