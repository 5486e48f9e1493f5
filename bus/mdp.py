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
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import msgpack

from chunkbus.bus.codec import decode_header
from chunkbus.bus.messages import MessageError

CLIENT = b"MDPC01"
WORKER = b"MDPW01"
READY = b"\x01"
REQUEST = b"\x02"
REPLY = b"\x03"
HEARTBEAT = b"\x04"
DISCONNECT = b"\x05"

MMI_SERVICE = "mmi.service"  # RFC 8: "200" if the service has a worker, "404" if not
STATUS_SERVICE = "mmi.status"  # chunkbus: services, workers, queues, latencies (msgpack map)

HEARTBEAT_INTERVAL = 0.5  # seconds between heartbeats, both ways
HEARTBEAT_LIVENESS = 3  # heartbeats missed before a peer counts as gone: 1.5 s by default
MAX_EXTENSION_BYTES = 64 * 1024


@dataclass(frozen=True)
class RequestOptions:
    """What the broker reads from a request's first body frame."""

    priority: int = 0
    ttl: float | None = None  # seconds the request may wait in the queue
    replace_key: str | None = None
    request_id: str = ""
    robot_id: str = ""


def request_options(body: list) -> RequestOptions:
    """The chunkbus fields of a request body; defaults for a plain MDP client's body."""
    if not body:
        return RequestOptions()
    try:
        header = decode_header(body[0])
    except MessageError:
        return RequestOptions()  # not chunkbus's: a plain MDP request
    fields = header.fields
    priority, ttl, key = fields.get("priority", 0), fields.get("ttl"), fields.get("replace_key")
    request_id, robot_id = fields.get("request_id", ""), fields.get("robot_id", "")
    return RequestOptions(
        priority=priority if type(priority) is int else 0,
        ttl=float(ttl) if type(ttl) in (int, float) and ttl >= 0 else None,
        replace_key=key if isinstance(key, str) and key else None,
        request_id=request_id if isinstance(request_id, str) else "",
        robot_id=robot_id if isinstance(robot_id, str) else "",
    )


@dataclass
class WorkerInfo:
    """What a worker's READY extension frame says; defaults for a plain MDP worker."""

    capacity: int = 1
    model: dict[str, Any] = field(default_factory=dict)
    name: str = ""


def pack_ready_extension(info: WorkerInfo) -> bytes:
    return msgpack.packb({"capacity": info.capacity, "model": info.model, "name": info.name})


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
    capacity, model, name = data.get("capacity", 1), data.get("model", {}), data.get("name", "")
    if type(capacity) is not int or not 1 <= capacity <= 1024:
        raise MessageError(f"READY capacity must be an integer from 1 to 1024, got {capacity!r:.20}")
    if not isinstance(model, dict) or not isinstance(name, str):
        raise MessageError("READY model must be a map and name a string")
    return WorkerInfo(capacity, model, name)
