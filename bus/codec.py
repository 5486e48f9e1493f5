"""The wire format: a message is the ZeroMQ frames ``header *buffers``.

``header`` is a msgpack map::

    {"v": PROTOCOL_VERSION, "type": "camera_frame", "fields": {...},
     "buffers": [{"key": "image", "encoding": "raw", "dtype": "|u1", "shape": [480, 640, 3]}]}

Small arrays (state, actions: up to INLINE_MAX_BYTES) ride inside ``fields`` in
msgpack-numpy's format. Larger arrays and JPEG images travel as their own frames and
stand in ``fields`` as a msgpack extension (code BUFFER_REF) holding the buffer's
index. Encoding hands zmq the arrays' own memory and decoding wraps the received
frames with ``np.frombuffer``, so images are never copied by the codec; decoded
arrays are read-only views of the frames.

Decoding trusts nothing: the version, every field, and each buffer's size against
its description are checked, and any problem raises MessageError with a message that
says what is wrong. msgpack-numpy's own decoder would unpickle object arrays; here it
only ever sees maps that were checked to hold plain numeric arrays.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Sequence

import msgpack
import msgpack_numpy
import numpy as np

from chunkbus.bus.messages import MESSAGE_TYPES, JpegImage, Message, MessageError

PROTOCOL_VERSION = 1
MAX_MESSAGE_BYTES = 64 * 1024 * 1024  # default limit of one message, all frames together
MAX_HEADER_BYTES = 1024 * 1024
MAX_BUFFERS = 256
MAX_NDIM = 8
MAX_DEPTH = 16  # nesting of maps and lists inside the fields
INLINE_MAX_BYTES = 16 * 1024
BUFFER_REF = 1  # msgpack extension code of a reference to a buffer frame

ENCODINGS = ("raw", "jpeg")
_DTYPE = re.compile(r"[<>|=]?[biufc][0-9]{1,2}")
_JPEG_START = b"\xff\xd8"

Frame = bytes | memoryview | Any  # anything with the buffer protocol, or a zmq.Frame


@dataclass(frozen=True)
class Header:
    """A decoded header whose buffers are not resolved: enough to route a message."""

    type: str
    fields: dict[str, Any]
    buffers: list[dict[str, Any]]


# --- encoding ---------------------------------------------------------------------------


def encode(message: Message) -> list[Frame]:
    """The frames of `message`: the header, then one frame per large array or JPEG."""
    if not isinstance(message, Message):
        raise MessageError(f"cannot encode {type(message).__name__}: not a chunkbus message")
    # Checking on the way out means a node cannot send what no node would accept.
    fields = type(message).from_wire(message.to_wire()).to_wire()
    buffers: list[Frame] = []
    descriptions: list[dict[str, Any]] = []

    def flatten(value: Any, key: str) -> Any:
        if isinstance(value, dict):
            return {k: flatten(v, f"{key}/{k}" if key else k) for k, v in value.items()}
        if isinstance(value, list):
            return [flatten(v, f"{key}/{i}") for i, v in enumerate(value)]
        if isinstance(value, JpegImage):
            descriptions.append(
                {"key": key, "encoding": "jpeg", "dtype": "|u1", "shape": list(value.shape)}
            )
            buffers.append(value.data)
            return msgpack.ExtType(BUFFER_REF, (len(buffers) - 1).to_bytes(4, "little"))
        if isinstance(value, np.ndarray):
            if value.nbytes <= INLINE_MAX_BYTES:
                return msgpack_numpy.encode(np.ascontiguousarray(value))
            contiguous = np.ascontiguousarray(value)  # copies only a non-contiguous array
            descriptions.append(
                {
                    "key": key,
                    "encoding": "raw",
                    "dtype": contiguous.dtype.str,
                    "shape": list(contiguous.shape),
                }
            )
            # A flat byte view of the same memory: zmq sends it without a copy.
            buffers.append(contiguous.reshape(-1).view(np.uint8).data)
            return msgpack.ExtType(BUFFER_REF, (len(buffers) - 1).to_bytes(4, "little"))
        return value

    body = flatten(fields, "")
    header = {"v": PROTOCOL_VERSION, "type": message.TYPE, "fields": body, "buffers": descriptions}
    return [msgpack.packb(header, use_bin_type=True), *buffers]


# --- decoding ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _BufferRef:
    index: int


def _ext_hook(code: int, data: bytes) -> _BufferRef:
    if code != BUFFER_REF or len(data) != 4:
        raise MessageError(f"unknown msgpack extension type {code} in the header")
    return _BufferRef(int.from_bytes(data, "little"))


def _check_dtype(descr: Any, where: str) -> np.dtype:
    if not isinstance(descr, str) or not _DTYPE.fullmatch(descr):
        raise MessageError(f"{where}: dtype {descr!r:.40} is not a plain numeric dtype")
    try:
        return np.dtype(descr)
    except TypeError as exc:
        raise MessageError(f"{where}: dtype {descr!r} is not a valid numpy dtype") from exc


def _check_shape(shape: Any, where: str) -> tuple[int, ...]:
    if not isinstance(shape, (list, tuple)) or len(shape) > MAX_NDIM:
        raise MessageError(f"{where}: shape must be a list of at most {MAX_NDIM} sizes")
    if not all(isinstance(n, int) and not isinstance(n, bool) and 0 <= n < 2**40 for n in shape):
        raise MessageError(f"{where}: shape {shape!r:.80} must hold non-negative integers")
    return tuple(shape)


def _inline_array(obj: dict) -> Any:
    """msgpack object hook: a checked msgpack-numpy array, or the map unchanged."""
    if b"nd" not in obj:
        return obj
    where = "inline array"
    if set(obj) != {b"nd", b"type", b"kind", b"shape", b"data"} or obj[b"nd"] is not True:
        raise MessageError(f"{where}: not a plain msgpack-numpy array (keys {sorted(obj)})")
    if obj[b"kind"] != b"":
        raise MessageError(f"{where}: object and structured arrays are not accepted")
    dtype = _check_dtype(obj[b"type"], where)
    shape = _check_shape(obj[b"shape"], where)
    data = obj[b"data"]
    if not isinstance(data, bytes) or len(data) != math.prod(shape) * dtype.itemsize:
        raise MessageError(
            f"{where}: {len(data) if isinstance(data, bytes) else 'no'} data bytes "
            f"for shape {shape} of {dtype}"
        )
    return msgpack_numpy.decode(obj)


def _frame_view(frame: Frame) -> memoryview:
    buffer = getattr(frame, "buffer", frame)  # a zmq.Frame exposes its memory as .buffer
    try:
        return memoryview(buffer).cast("B")
    except TypeError as exc:
        raise MessageError(f"a frame of type {type(frame).__name__} has no bytes") from exc


def decode_header(frame: Frame) -> Header:
    """Parse and check the header frame alone (what a router needs to read)."""
    view = _frame_view(frame)
    if len(view) > MAX_HEADER_BYTES:
        raise MessageError(f"header of {len(view)} bytes exceeds {MAX_HEADER_BYTES}")
    try:
        header = msgpack.unpackb(
            view,
            raw=False,
            strict_map_key=True,
            object_hook=_inline_array,
            ext_hook=_ext_hook,
        )
    except MessageError:
        raise
    except Exception as exc:  # msgpack raises several types for garbage
        raise MessageError(f"header is not a valid msgpack map ({exc.__class__.__name__}: {exc})")
    if not isinstance(header, dict):
        raise MessageError(f"header is a {type(header).__name__}, not a map")
    version = header.get("v")
    if version != PROTOCOL_VERSION:
        raise MessageError(
            f"unknown protocol version {version!r:.20}: this node speaks version "
            f"{PROTOCOL_VERSION}; run the same chunkbus version on every host"
        )
    kind = header.get("type")
    if kind not in MESSAGE_TYPES:
        raise MessageError(f"unknown message type {kind!r:.40}")
    fields, buffers = header.get("fields"), header.get("buffers")
    if not isinstance(fields, dict) or not isinstance(buffers, list):
        raise MessageError(f"{kind}: header needs a 'fields' map and a 'buffers' list")
    if len(buffers) > MAX_BUFFERS:
        raise MessageError(f"{kind}: {len(buffers)} buffers exceed {MAX_BUFFERS}")
    return Header(kind, fields, buffers)


def _buffer(description: Any, frame: memoryview, index: int) -> np.ndarray | JpegImage:
    where = f"buffer {index}"
    if not isinstance(description, dict) or not isinstance(description.get("key"), str):
        raise MessageError(f"{where}: description must be a map with a 'key'")
    where = f"buffer {index} ({description['key']!r:.80})"
    if set(description) != {"key", "encoding", "dtype", "shape"}:
        raise MessageError(f"{where}: description needs exactly key, encoding, dtype, shape")
    encoding = description["encoding"]
    dtype = _check_dtype(description["dtype"], where)
    shape = _check_shape(description["shape"], where)
    if encoding == "raw":
        expected = math.prod(shape) * dtype.itemsize
        if len(frame) != expected:
            raise MessageError(
                f"{where}: frame has {len(frame)} bytes, but shape {list(shape)} of "
                f"{dtype} needs {expected}"
            )
        array = np.frombuffer(frame, dtype=dtype).reshape(shape)
        array.flags.writeable = False  # a view of a received frame, shared with zmq
        return array
    if encoding == "jpeg":
        if dtype != np.uint8 or len(shape) != 3:
            raise MessageError(f"{where}: a JPEG buffer describes a uint8 HxWxC image")
        if frame[:2] != _JPEG_START:
            raise MessageError(f"{where}: frame does not start like a JPEG image")
        return JpegImage(frame, shape)
    raise MessageError(f"{where}: unknown encoding {encoding!r:.40} (known: {', '.join(ENCODINGS)})")


def decode(frames: Sequence[Frame], max_bytes: int = MAX_MESSAGE_BYTES) -> Message:
    """The message in `frames` (header, then buffers), fully checked.

    Raises MessageError, and only MessageError, for anything that is not a valid
    message of this protocol version no larger than `max_bytes`.
    """
    if not frames:
        raise MessageError("empty message: no header frame")
    views = [_frame_view(frame) for frame in frames]
    size = sum(len(view) for view in views)
    if size > max_bytes:
        raise MessageError(f"message of {size} bytes exceeds the limit of {max_bytes}")
    header = decode_header(views[0])
    if len(header.buffers) != len(views) - 1:
        raise MessageError(
            f"{header.type}: header describes {len(header.buffers)} buffers but "
            f"{len(views) - 1} frames follow it (truncated or extra frames)"
        )
    resolved = [_buffer(d, view, i) for i, (d, view) in enumerate(zip(header.buffers, views[1:]))]
    used: set[int] = set()

    def substitute(value: Any, depth: int) -> Any:
        if depth > MAX_DEPTH:
            raise MessageError(f"{header.type}: fields nested deeper than {MAX_DEPTH}")
        if isinstance(value, _BufferRef):
            if value.index >= len(resolved) or value.index in used:
                raise MessageError(f"{header.type}: bad reference to buffer {value.index}")
            used.add(value.index)
            return resolved[value.index]
        if isinstance(value, dict):
            return {k: substitute(v, depth + 1) for k, v in value.items()}
        if isinstance(value, list):
            return [substitute(v, depth + 1) for v in value]
        return value

    fields = substitute(header.fields, 0)
    if len(used) != len(resolved):
        raise MessageError(f"{header.type}: {len(resolved) - len(used)} buffers are not referenced")
    return MESSAGE_TYPES[header.type].from_wire(fields)
