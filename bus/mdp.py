"""The broker protocol: Majordomo, ZeroMQ RFC 7 (MDP/0.1), with chunkbus's extensions.

Frames as a DEALER peer sends them (a ROUTER prepends the peer's identity):

    client  REQUEST    "" MDPC01 service body...
    broker  REPLY      "" MDPC01 service body...          (to the client)
    worker  READY      "" MDPW01 0x01 service [extension]
    broker  REQUEST    "" MDPW01 0x02 ticket "" body...    (ticket: the RFC's client address)
    worker  REPLY      "" MDPW01 0x03 ticket "" body...
    either  HEARTBEAT  "" MDPW01 0x04
    either  DISCONNECT "" MDPW01 0x05

chunkbus's own fields ride where a plain MDP peer does not look: a request's priority,
time-to-live, replace key and id in the header of its first body frame (a chunkbus
ObservationRequest), and a worker's capacity and model description in an optional
extra READY frame (a msgpack map). Without them, defaults apply. The broker puts an
opaque ticket where the RFC has the client address; workers echo it back, as RFC 7
requires, and the broker maps it to the request (this is what lets one worker hold
several requests, and lets the broker discard a late reply to a request it gave up on).
A ticket also says how many more requests of the same batch follow it (batch_ticket).

As the ZeroMQ guide keeps it (MDP.py), this module is the only place that knows the
frames: one builder and one parser per direction. A parser raises MessageError for
frames that are not MDP/0.1.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

import msgpack

from .codec import header_fields
from .messages import ObservationRequest
from .records import ModelDescription
from .schema import MessageError

CLIENT = b"MDPC01"
WORKER = b"MDPW01"
READY = b"\x01"
REQUEST = b"\x02"
REPLY = b"\x03"
HEARTBEAT = b"\x04"
DISCONNECT = b"\x05"

MMI_SERVICE = "mmi.service"  # RFC 8: "200" if the service has a worker, "404" if not
STATUS_SERVICE = "mmi.status"  # chunkbus: services, workers, queues, latencies (a BrokerStatus)
MODEL_SERVICE = "mmi.model"  # chunkbus: the model a service's newest worker serves, or "404"

HEARTBEAT_INTERVAL = 0.5  # seconds between heartbeats, both ways
HEARTBEAT_LIVENESS = 3  # heartbeats missed before a peer counts as gone: 1.5 s by default
MAX_EXTENSION_BYTES = 64 * 1024


# --- chunkbus's extensions ----------------------------------------------------------------


@dataclass(slots=True)
class RequestOptions:
    """What the broker reads from a request's first body frame (one per request: slotted)."""

    priority: int = 0
    ttl: float | None = None  # seconds the request may wait in the queue
    replace_key: str | None = None
    request_id: str = ""
    robot_id: str = ""


# Each checked by the very checker of ObservationRequest's schema, so the broker takes what
# a client may send and nothing else.
_ROUTING_CHECKS = {f.name: ObservationRequest.SCHEMA[f.name] for f in fields(RequestOptions)}


def request_options(body: Sequence) -> RequestOptions:
    """The chunkbus fields of a request body; defaults for a plain MDP client's body, and
    for each field that is missing or fails its check."""
    found = header_fields(body[0]) if body else None
    if found is None:
        return RequestOptions()  # not chunkbus's: a plain MDP request
    options = {}
    for name, check in _ROUTING_CHECKS.items():
        value = found.get(name)
        if value is not None:
            try:
                options[name] = check(value, name)
            except MessageError:
                pass
    return RequestOptions(**options)


@dataclass
class WorkerInfo:
    """What a worker's READY extension frame says; defaults for a plain MDP worker."""

    capacity: int = 1
    model: ModelDescription | None = None
    name: str = ""


def pack_ready_extension(info: WorkerInfo) -> bytes:
    model = info.model.to_wire() if info.model is not None else None
    return msgpack.packb({"capacity": info.capacity, "model": model, "name": info.name})


def parse_ready_extension(frame: bytes | None) -> WorkerInfo:
    """Raises MessageError for an extension frame that is present but malformed."""
    if frame is None:
        return WorkerInfo()
    if len(frame) > MAX_EXTENSION_BYTES:
        raise MessageError(f"READY extension of {len(frame)} bytes exceeds {MAX_EXTENSION_BYTES}")
    try:
        data = msgpack.unpackb(frame, raw=False, strict_map_key=True)
    except Exception as exc:
        raise MessageError(f"READY extension is not msgpack ({exc})") from exc
    if not isinstance(data, dict):
        raise MessageError("READY extension must be a map")
    capacity, model, name = data.get("capacity", 1), data.get("model"), data.get("name", "")
    if type(capacity) is not int or not 1 <= capacity <= 1024:
        raise MessageError(f"READY capacity must be an integer from 1 to 1024, got {capacity!r:.20}")
    if not isinstance(name, str):
        raise MessageError("READY name must be a string")
    return WorkerInfo(capacity, ModelDescription.from_wire(model, "ready.model") if model else None, name)


# --- the envelopes: one builder and one parser per direction --------------------------------
# A builder returns the frames as the sending socket sends them: a DEALER's (client,
# worker) start with the empty delimiter, the broker's ROUTER's with the peer's identity.
# A parser takes them as the receiving socket receives them, as zmq.Frames (copy=False);
# a parsed body is a list of those frames, passed on without a copy. Parsed messages are
# slotted, not frozen, dataclasses: one is made per message, and freezing costs 4x.


@dataclass(slots=True)
class ClientRequest:
    client: bytes  # the client's identity on the broker's frontend
    service: str
    body: list


def client_to_broker(service: str, body: Sequence) -> list:
    """A client's REQUEST."""
    return [b"", CLIENT, service.encode(), *body]


def parse_client_to_broker(frames: list) -> ClientRequest:
    """A client's REQUEST as the broker's frontend receives it."""
    if len(frames) < 5 or frames[1].bytes != b"" or frames[2].bytes != CLIENT:
        raise MessageError("not an MDP/0.1 client request with a body")
    try:
        service = frames[3].bytes.decode("utf-8")
    except UnicodeDecodeError:
        raise MessageError("service name is not UTF-8") from None
    return ClientRequest(frames[0].bytes, service, frames[4:])


def broker_to_client(client: bytes, service: str, body: Sequence) -> list:
    """The broker's REPLY to client `client`."""
    return [client, b"", CLIENT, service.encode(), *body]


def parse_broker_to_client(frames: list) -> tuple[str, list]:
    """A REPLY as the client receives it: the service and the body."""
    if len(frames) < 3 or frames[0].bytes != b"" or frames[1].bytes != CLIENT:
        raise MessageError("not an MDP/0.1 reply")
    return frames[2].bytes.decode("utf-8", "replace"), frames[3:]


@dataclass(slots=True)
class WorkerMessage:
    """A worker's message to the broker. `problem` says what is wrong with a command's own
    frames (the sender is known, so the broker can still answer it)."""

    identity: bytes  # the worker's identity on the broker's backend
    command: bytes
    service: str = ""  # READY
    info: WorkerInfo | None = None  # READY
    ticket: bytes = b""  # REPLY
    body: Sequence = ()  # REPLY
    problem: str | None = None


def worker_to_broker(
    command: bytes,
    *,
    service: str = "",
    info: WorkerInfo | None = None,
    ticket: Any = b"",
    body: Sequence = (),
) -> list:
    """A worker's READY (service, info), REPLY (ticket, body), HEARTBEAT or DISCONNECT."""
    if command == READY:
        return [b"", WORKER, READY, service.encode(), pack_ready_extension(info or WorkerInfo())]
    if command == REPLY:
        return [b"", WORKER, REPLY, ticket, b"", *body]
    return [b"", WORKER, command]


def parse_worker_to_broker(frames: list) -> WorkerMessage:
    """A worker's message as the broker's backend receives it."""
    if len(frames) < 4 or frames[1].bytes != b"" or frames[2].bytes != WORKER:
        raise MessageError("not an MDP/0.1 worker message")
    identity, command = frames[0].bytes, frames[3].bytes
    if command == REPLY:  # the most frequent first
        if len(frames) < 7 or frames[5].bytes != b"":
            problem = "REPLY needs a ticket, an empty frame and a body"
            return WorkerMessage(identity, command, problem=problem)
        return WorkerMessage(identity, command, ticket=frames[4].bytes, body=frames[6:])
    if command in (HEARTBEAT, DISCONNECT):
        return WorkerMessage(identity, command)
    if command == READY:
        try:
            if len(frames) < 5:
                raise MessageError("READY without a service name")
            service = frames[4].bytes.decode("utf-8")
            info = parse_ready_extension(frames[5].bytes if len(frames) > 5 else None)
        except (MessageError, UnicodeDecodeError) as exc:
            return WorkerMessage(identity, command, problem=f"bad READY: {exc}")
        return WorkerMessage(identity, command, service=service, info=info)
    return WorkerMessage(identity, command, problem=f"unknown worker command {command!r:.10}")


@dataclass(slots=True)
class BrokerMessage:
    command: bytes
    ticket: Any = b""  # REQUEST: echoed in the REPLY (a frame, passed on as it came)
    body: Sequence = ()  # REQUEST


def broker_to_worker(
    worker: bytes, command: bytes, *, ticket: bytes = b"", body: Sequence = ()
) -> list:
    """The broker's REQUEST (ticket, body), HEARTBEAT or DISCONNECT to worker `worker`."""
    if command == REQUEST:
        return [worker, b"", WORKER, REQUEST, ticket, b"", *body]
    return [worker, b"", WORKER, command]


def parse_broker_to_worker(frames: list) -> BrokerMessage:
    """The broker's message as the worker receives it. Even a REQUEST without a body is
    valid: it must get an (error) answer."""
    if len(frames) < 3 or frames[0].bytes != b"" or frames[1].bytes != WORKER:
        raise MessageError("not an MDP/0.1 message from a broker")
    command = frames[2].bytes
    if command == REQUEST:
        if len(frames) < 5 or frames[4].bytes != b"":
            raise MessageError("REQUEST needs a ticket and an empty frame")
        return BrokerMessage(command, frames[3], frames[5:])
    return BrokerMessage(command)


# --- batch tickets ---------------------------------------------------------------------------
# The broker gives an idle worker up to its capacity of requests at once, to run as one batch.
# Each ticket says how many more of that batch follow it, so that the worker waits for them
# rather than starting on part of the batch (they are already on their way, microseconds
# behind). A plain RFC 7 worker just echoes the ticket.


def batch_ticket(number: int, following: int) -> bytes:
    """A request's ticket: a unique `number` and how many more requests of its batch follow."""
    return number.to_bytes(8, "big") + following.to_bytes(2, "big")


def following(ticket: bytes) -> int:
    """How many more requests of this one's batch follow it (0 for any other ticket)."""
    return int.from_bytes(ticket[8:10], "big") if len(ticket) == 10 else 0
