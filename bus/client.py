"""A client of the broker: send requests with priority, ttl and replace key; receive replies.

One BrokerClient is used from one thread. Requests may overlap: replies are matched to
requests by their request id. The DEALER socket reconnects to a restarted broker by
itself; with ZMQ_IMMEDIATE it queues nothing while no broker is connected, so a request
is never delivered late to a broker that comes back minutes after it was sent.
"""

from __future__ import annotations

import itertools
import os
import time
from dataclasses import dataclass

import msgpack
import zmq

from . import mdp
from .codec import decode, encode
from .messages import ErrorReply, Message
from .records import BrokerStatus, ModelDescription
from .schema import MessageError

_ids = itertools.count(1)


class BrokerUnavailable(ConnectionError):
    """The broker cannot be reached."""


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
    def __init__(self, broker: str, *, context: zmq.Context | None = None, connect_timeout: float = 5.0):
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
        self.socket.connect(broker)
        self.rejected = 0  # replies that could not be decoded
        self._unclaimed: dict[str, Reply] = {}

    def close(self) -> None:
        self.socket.close(linger=0)

    def __enter__(self) -> BrokerClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- sending ------------------------------------------------------------------------

    def send_frames(self, service: str, body: list) -> None:
        """Send one MDP request; waits up to connect_timeout for a connected broker."""
        if not self.socket.poll(self.connect_timeout * 1000, zmq.POLLOUT):
            raise BrokerUnavailable(
                f"no broker at {self.broker} within {self.connect_timeout:.1f} s: "
                "is it running, and is the address right (tcp://HOST:5555)?"
            )
        self.socket.send_multipart(mdp.client_to_broker(service, body), copy=False)

    def send(self, service: str, message: Message) -> None:
        """Send a chunkbus request (its request_id, priority, ttl and replace_key go along)."""
        self.send_frames(service, encode(message))

    # --- receiving ----------------------------------------------------------------------

    def receive_frames(self, timeout: float) -> tuple[str, list] | None:
        """The next reply's service and body frames, or None after `timeout` seconds."""
        if not self.socket.poll(timeout * 1000, zmq.POLLIN):
            return None
        try:
            return mdp.parse_broker_to_client(self.socket.recv_multipart(copy=False))
        except MessageError:
            self.rejected += 1
            return self.receive_frames(0)

    def receive(self, timeout: float) -> Reply | None:
        """The next reply to any request of this client, or None after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            received = self.receive_frames(max(0.0, deadline - time.monotonic()))
            if received is None:
                return None
            service, body = received
            try:
                return Reply(service, decode(body), time.monotonic())
            except MessageError:
                self.rejected += 1

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
        deadline = time.monotonic() + timeout
        while (remaining := deadline - time.monotonic()) > 0:
            received = self.receive_frames(remaining)
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
