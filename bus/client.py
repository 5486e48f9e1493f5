"""A client of the broker: send requests with priority, ttl and replace key; receive replies.

One BrokerClient is used from one thread. Requests may overlap: replies are matched to
requests by their request id. The DEALER socket reconnects to a restarted broker by
itself; with ZMQ_IMMEDIATE it queues nothing while no broker is connected, so a request
is never delivered late to a broker that comes back minutes after it was sent.

Every request sent gets exactly one answer: the broker's (a reply, or an error saying why
not), or, when the connection to the broker is lost first (it died, restarted, or fell
silent past the ZMTP heartbeat), `broker_lost` from the client itself at once. Such a
request may or may not have run; a reply to it that still came would be dropped.
"""

from __future__ import annotations

import itertools
import os
import time
from collections import deque
from dataclasses import dataclass

import msgpack
import zmq

from . import mdp
from .codec import decode, encode
from .messages import ErrorReply, Message
from .records import BrokerStatus, ModelDescription
from .schema import MessageError
from .security import ClientKeys, Handshakes

_ids = itertools.count(1)


class BrokerUnavailable(ConnectionError):
    """The broker cannot be reached."""


class BrokerRefused(BrokerUnavailable):
    """The broker is there but the CURVE handshake failed: the text says why (a refused key, a
    wrong broker key, CURVE on one side only). Retrying with the same keys cannot help."""


class RequestFailed(RuntimeError):
    """The request was answered with an ErrorReply (see .error.code and .error.message)."""

    def __init__(self, error: ErrorReply):
        super().__init__(f"{error.code}: {error.message}")
        self.error = error


@dataclass(frozen=True)
class Reply:
    service: str
    message: Message  # an ActionChunk, or an ErrorReply
    receive_time: float


def new_request_id(prefix: str) -> str:
    """Unique for this process's lifetime: prefix, process id and a counter."""
    return f"{prefix}-{os.getpid()}-{next(_ids)}"


class BrokerClient:
    def __init__(self, broker: str, *, context: zmq.Context | None = None, connect_timeout: float = 5.0,
                 keys: ClientKeys | None = None):
        self.broker = broker
        self.connect_timeout = connect_timeout
        self.context = context or zmq.Context.instance()
        self.socket = self.context.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.IMMEDIATE, 1)
        # ZMTP heartbeats notice a silent peer (a partition, a dead host) within seconds.
        self.socket.setsockopt(zmq.HEARTBEAT_IVL, 1000)
        self.socket.setsockopt(zmq.HEARTBEAT_TIMEOUT, 3000)
        self.socket.setsockopt(zmq.RECONNECT_IVL, 100)
        self.socket.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
        if keys is not None:
            keys.apply(self.socket)
        self.handshakes = Handshakes(self.socket, f"the broker at {broker}", curve=keys is not None,
                                     allow_option="--allow-robots")
        self.socket.connect(broker)
        self.poller = zmq.Poller()
        self.poller.register(self.socket, zmq.POLLIN)
        self.poller.register(self.handshakes.monitor, zmq.POLLIN)
        self.rejected = 0  # replies that could not be decoded
        self.links_lost = 0  # times the connection to the broker was lost
        self._unclaimed: dict[str, Reply] = {}
        self._outstanding: dict[str, tuple[str, str]] = {}  # request id -> service, robot id
        self._lost: deque[Reply] = deque()  # broker_lost answers not yet received
        self._lost_ids: deque[str] = deque(maxlen=1000)  # their requests: a reply that still comes is dropped

    def close(self) -> None:
        self.handshakes.close()
        self.socket.close(linger=0)

    def _watch_link(self) -> None:
        """Read the socket's monitor: a lost connection answers every outstanding request
        `broker_lost` at once (the broker that had them is gone, or forgot them)."""
        lost, _ = self.handshakes.read()
        if not lost:
            return
        self.links_lost += 1
        now = time.monotonic()
        why = (f"the connection to the broker at {self.broker} was lost before it answered (it stopped, restarted or "
               "fell silent): the request may or may not have run")
        for request_id, (service, robot_id) in self._outstanding.items():
            self._lost.append(Reply(service, ErrorReply(request_id, "broker_lost", why, robot_id), now))
            self._lost_ids.append(request_id)
        self._outstanding.clear()

    def __enter__(self) -> BrokerClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- sending ------------------------------------------------------------------------

    def send_frames(self, service: str, body: list) -> int:
        """Send one MDP request; waits up to connect_timeout for a connected broker. Returns the
        body's bytes. Raises BrokerRefused as soon as the handshake fails, BrokerUnavailable
        after the timeout."""
        deadline, writable = time.monotonic() + self.connect_timeout, None
        while not self.socket.poll(0, zmq.POLLOUT):
            self._watch_link()
            if self.handshakes.problem is not None:
                raise BrokerRefused(self.handshakes.problem)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BrokerUnavailable(
                    f"no broker at {self.broker} within {self.connect_timeout:.1f} s: "
                    "is it running, and is the address right (tcp://HOST:5555)?"
                )
            if writable is None:  # only while not connected: a connected send polls nothing more
                writable = zmq.Poller()
                writable.register(self.socket, zmq.POLLOUT)
                writable.register(self.handshakes.monitor, zmq.POLLIN)
            writable.poll(remaining * 1000)
        self.socket.send_multipart(mdp.client_to_broker(service, body), copy=False)
        return sum(memoryview(frame).nbytes for frame in body)

    def send(self, service: str, message: Message) -> int:
        """Send a chunkbus request (its request_id, priority, ttl and replace_key go along); returns
        its bytes on the wire."""
        sent = self.send_frames(service, encode(message))
        request_id = message.request_id  # type: ignore[attr-defined]
        self._outstanding[request_id] = (service, getattr(message, "robot_id", ""))
        if len(self._outstanding) > 10_000:  # requests nobody receives the answers of
            self._outstanding.pop(next(iter(self._outstanding)))
        return sent

    # --- receiving ----------------------------------------------------------------------

    def receive_frames(self, timeout: float) -> tuple[str, list] | None:
        """The next reply's service and body frames, or None after `timeout` seconds (or
        sooner, when the connection is lost: see receive)."""
        deadline = time.monotonic() + timeout
        while True:
            events = dict(self.poller.poll(max(0.0, deadline - time.monotonic()) * 1000))
            if self.handshakes.monitor in events:
                self._watch_link()
                if self._lost:
                    return None
            if self.socket in events:
                try:
                    return mdp.parse_broker_to_client(self.socket.recv_multipart(copy=False))
                except MessageError:
                    self.rejected += 1
            if time.monotonic() >= deadline and not events:
                return None

    def receive(self, timeout: float) -> Reply | None:
        """The next answer to any request of this client, or None after `timeout` seconds. When
        the connection to the broker is lost, each outstanding request is answered `broker_lost`."""
        deadline = time.monotonic() + timeout
        while True:
            if self._lost:
                return self._lost.popleft()
            received = self.receive_frames(max(0.0, deadline - time.monotonic()))
            if received is None:
                if self._lost:
                    continue
                return None
            service, body = received
            try:
                message = decode(body)
            except MessageError:
                self.rejected += 1
                continue
            request_id = getattr(message, "request_id", "")
            if self._outstanding.pop(request_id, None) is None and request_id in self._lost_ids:
                continue  # already answered broker_lost
            return Reply(service, message, time.monotonic())

    def request(self, service: str, message: Message, timeout: float) -> Message:
        """Send `message` and wait for its answer; raises RequestFailed for an ErrorReply.

        Replies to this client's other requests that arrive meanwhile are kept for
        their own request() calls.
        """
        request_id = message.request_id  # type: ignore[attr-defined]
        self.send(service, message)
        deadline = time.monotonic() + timeout
        while (reply := self._unclaimed.pop(request_id, None)) is None:
            remaining = deadline - time.monotonic()
            received = self.receive(remaining) if remaining > 0 else None
            if received is None:
                raise TimeoutError(
                    f"no answer to request {request_id!r} for service {service!r} from "
                    f"{self.broker} within {timeout:.1f} s"
                )
            self._unclaimed[getattr(received.message, "request_id", "")] = received
            if len(self._unclaimed) > 1000:  # replies to requests nobody waits for any more
                self._unclaimed.pop(next(iter(self._unclaimed)))
        if isinstance(reply.message, ErrorReply):
            raise RequestFailed(reply.message)
        return reply.message

    # --- the broker's own services --------------------------------------------------------

    def _mmi(self, name: str, body: bytes, timeout: float) -> bytes:
        self.send_frames(name, [body])
        deadline, lost = time.monotonic() + timeout, self.links_lost
        while (remaining := deadline - time.monotonic()) > 0:
            received = self.receive_frames(remaining)
            if self.links_lost != lost:
                raise BrokerUnavailable(f"the connection to the broker at {self.broker} was lost before it answered "
                                        f"{name}")
            if received is None:
                break
            service, frames = received
            if service == name and len(frames) == 1:
                return frames[0].bytes
        raise TimeoutError(f"the broker at {self.broker} did not answer {name} within {timeout:.1f} s")

    def has_service(self, service: str, timeout: float = 5.0) -> bool:
        """RFC 8's mmi.service: whether a worker serves `service` now."""
        return self._mmi(mdp.MMI_SERVICE, service.encode(), timeout) == b"200"

    def status(self, timeout: float = 5.0) -> BrokerStatus:
        """The broker's services, workers, queue depths and latency percentiles."""
        return BrokerStatus.from_wire(msgpack.unpackb(self._mmi(mdp.STATUS_SERVICE, b"", timeout), raw=False))

    def model(self, service: str, timeout: float = 5.0) -> ModelDescription | None:
        """The model `service` serves (its newest worker's), or None while no worker serves it."""
        reply = self._mmi(mdp.MODEL_SERVICE, service.encode(), timeout)
        return None if reply == b"404" else ModelDescription.from_wire(msgpack.unpackb(reply, raw=False), "model")
