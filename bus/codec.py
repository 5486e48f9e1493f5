"""The wire format: a message is the ZeroMQ frames ``header *buffers``.

``header`` is a msgpack map with these four keys, in this order::

    {"v": PROTOCOL_VERSION, "type": "camera_frame",
     "buffers": [{"key": "image", "encoding": "raw", "dtype": "|u1", "shape": [480, 640, 3]}],
     "fields": {"camera": "front", "seq": 7, "capture_time": 12.5, "image": <ref 0>}}

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
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import msgpack
import msgpack_numpy
import numpy as np

from .messages import MESSAGE_TYPES, Message, Record
from .schema import JpegImage, MessageError

PROTOCOL_VERSION = 1
MAX_MESSAGE_BYTES = 64 * 1024 * 1024  # default limit of one message, all frames together
MAX_HEADER_BYTES = 1024 * 1024
MAX_BUFFERS = 256
MAX_NDIM = 8
INLINE_MAX_BYTES = 16 * 1024
BUFFER_REF = 1  # msgpack extension code of a reference to a buffer frame
HEADER_KEYS = ("v", "type", "buffers", "fields")  # in this order: see _read_header

ENCODINGS = ("raw", "jpeg")
_DESCRIPTION_KEYS = {"key", "encoding", "dtype", "shape"}
_SCALARS = {str, int, float, bool, type(None)}
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
    message.check()
    buffers: list[Frame] = []
    descriptions: list[dict[str, Any]] = []

    def add_buffer(data: Any, path: tuple, encoding: str, dtype: str, shape: tuple) -> msgpack.ExtType:
        key = "/".join(map(str, path))
        descriptions.append({"key": key, "encoding": encoding, "dtype": dtype, "shape": list(shape)})
        buffers.append(data)
        return msgpack.ExtType(BUFFER_REF, (len(buffers) - 1).to_bytes(4, "little"))

    def flatten(value: Any, path: tuple) -> Any:
        if type(value) in _SCALARS:
            return value
        if isinstance(value, Record):
            return {n: flatten(getattr(value, n), (*path, n)) for n in value.SCHEMA}
        if isinstance(value, dict):
            return {k: flatten(v, (*path, k)) for k, v in value.items()}
        if isinstance(value, list):
            return [flatten(v, (*path, i)) for i, v in enumerate(value)]
        if isinstance(value, JpegImage):
            return add_buffer(value.data, path, "jpeg", "|u1", value.shape)
        if isinstance(value, np.ndarray):
            contiguous = np.ascontiguousarray(value)  # copies only a non-contiguous array
            if value.nbytes <= INLINE_MAX_BYTES:
                return msgpack_numpy.encode(contiguous)
            # A flat byte view of the same memory: zmq sends it without a copy.
            data = contiguous.reshape(-1).view(np.uint8).data
            return add_buffer(data, path, "raw", contiguous.dtype.str, contiguous.shape)
        if isinstance(value, np.generic):
            return value.item()
        return value

    body = flatten(message, ())
    header = {"v": PROTOCOL_VERSION, "type": message.TYPE, "buffers": descriptions, "fields": body}
    return [msgpack.packb(header, use_bin_type=True), *buffers]


# --- decoding ---------------------------------------------------------------------------


@dataclass(frozen=True)
class BufferRef:
    """A reference to buffer `index`, as decode_header leaves it in the fields."""

    index: int


_dtypes: dict[str, np.dtype] = {}


def _check_dtype(descr: Any, where: str) -> np.dtype:
    if isinstance(descr, str) and descr in _dtypes:
        return _dtypes[descr]
    if not isinstance(descr, str) or not _DTYPE.fullmatch(descr):
        raise MessageError(f"{where}: dtype {descr!r:.40} is not a plain numeric dtype")
    try:
        dtype = np.dtype(descr)
    except TypeError as exc:
        raise MessageError(f"{where}: dtype {descr!r} is not a valid numpy dtype") from exc
    _dtypes[descr] = dtype  # at most a few hundred distinct strings match _DTYPE
    return dtype


def _check_shape(shape: Any, where: str) -> tuple[int, ...]:
    if not isinstance(shape, (list, tuple)) or len(shape) > MAX_NDIM:
        raise MessageError(f"{where}: shape must be a list of at most {MAX_NDIM} sizes")
    for n in shape:
        if type(n) is not int or not 0 <= n < 2**40:
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


def _read_header(view: memoryview, frames: list[memoryview] | None) -> tuple[Header, list]:
    """Read the header map key by key, in the order encode() writes it.

    With the buffer frames given, "buffers" is read and each buffer checked before
    "fields", so that the references inside the fields resolve to their arrays as they
    are read (no second walk over the fields). Without them, references stay BufferRefs.
    Returns the header and the resolved buffers.
    """
    if len(view) > MAX_HEADER_BYTES:
        raise MessageError(f"header of {len(view)} bytes exceeds {MAX_HEADER_BYTES}")
    resolved: list[np.ndarray | JpegImage] = []
    used: set[int] = set()

    def ext_hook(code: int, data: bytes) -> Any:
        if code != BUFFER_REF or len(data) != 4:
            raise MessageError(f"unknown msgpack extension type {code} in the header")
        index = int.from_bytes(data, "little")
        if frames is None:
            return BufferRef(index)
        if index >= len(resolved) or index in used:
            raise MessageError(f"bad reference to buffer {index}")
        used.add(index)
        return resolved[index]

    unpacker = msgpack.Unpacker(
        raw=False,
        strict_map_key=True,
        object_hook=_inline_array,
        ext_hook=ext_hook,
        max_buffer_size=MAX_HEADER_BYTES,
    )
    unpacker.feed(view)
    header: dict[str, Any] = {}
    try:
        for position in range(unpacker.read_map_header()):
            key = unpacker.unpack()
            if position >= len(HEADER_KEYS) or key != HEADER_KEYS[position]:
                raise MessageError(
                    f"header key {key!r:.40} at position {position}: expected the keys "
                    f"{', '.join(HEADER_KEYS)} in this order"
                )
            header[key] = value = unpacker.unpack()
            if key == "v" and value != PROTOCOL_VERSION:
                raise MessageError(
                    f"unknown protocol version {value!r:.20}: this node speaks version "
                    f"{PROTOCOL_VERSION}; run the same chunkbus version on every host"
                )
            if key == "type" and value not in MESSAGE_TYPES:
                raise MessageError(f"unknown message type {value!r:.40}")
            if key == "buffers":
                if not isinstance(value, list) or len(value) > MAX_BUFFERS:
                    raise MessageError(f"{header['type']}: 'buffers' must be a list of at most {MAX_BUFFERS}")
                if frames is not None:
                    if len(value) != len(frames):
                        raise MessageError(
                            f"{header['type']}: header describes {len(value)} buffers but "
                            f"{len(frames)} frames follow it (truncated or extra frames)"
                        )
                    resolved.extend(_buffer(d, f, i) for i, (d, f) in enumerate(zip(value, frames)))
        trailing = len(view) - unpacker.tell()
    except MessageError:
        raise
    except Exception as exc:  # msgpack raises several types for garbage
        raise MessageError(f"header is not a valid msgpack map ({exc.__class__.__name__}: {exc})") from None
    if len(header) != len(HEADER_KEYS):
        raise MessageError(f"header lacks {', '.join(HEADER_KEYS[len(header):])}")
    if trailing:
        raise MessageError(f"{trailing} bytes follow the header map")
    if not isinstance(header["fields"], dict):
        raise MessageError(f"{header['type']}: 'fields' must be a map")
    if len(used) != len(resolved):
        raise MessageError(f"{header['type']}: {len(resolved) - len(used)} buffers are not referenced")
    return Header(header["type"], header["fields"], header["buffers"]), resolved


def decode_header(frame: Frame) -> Header:
    """Parse and check the header frame alone (what a router needs to read)."""
    return _read_header(_frame_view(frame), None)[0]


def message_type(frame: Frame) -> str | None:
    """The type a header frame names, read from its first two keys only (the fields are
    not parsed); None for anything that is not a header of this protocol version."""
    unpacker = msgpack.Unpacker(raw=False, max_buffer_size=MAX_HEADER_BYTES)
    try:
        unpacker.feed(_frame_view(frame))
        if unpacker.read_map_header() < 2 or unpacker.unpack() != "v" or unpacker.unpack() != PROTOCOL_VERSION:
            return None
        kind = unpacker.unpack() == "type" and unpacker.unpack()
    except Exception:
        return None
    return kind if kind in MESSAGE_TYPES else None


def header_fields(frame: Frame) -> dict[str, Any] | None:
    """The fields of a header frame, or None for anything that is not a header of this
    protocol version. Unlike decode_header it builds no arrays and checks no buffer
    descriptions: a router reading a few fields has no use for them (the receiver decodes
    and checks the whole message)."""
    try:
        view = _frame_view(frame)
    except MessageError:
        return None
    if len(view) > MAX_HEADER_BYTES:
        return None
    try:
        header = msgpack.unpackb(view, raw=False)
    except Exception:  # msgpack raises several types for garbage
        return None
    if not isinstance(header, dict) or tuple(header) != HEADER_KEYS or header["v"] != PROTOCOL_VERSION:
        return None
    kind, buffers, fields = header["type"], header["buffers"], header["fields"]
    if not isinstance(kind, str) or kind not in MESSAGE_TYPES:
        return None
    if not isinstance(buffers, list) or len(buffers) > MAX_BUFFERS or not isinstance(fields, dict):
        return None
    return fields


def _buffer(description: Any, frame: memoryview, index: int) -> np.ndarray | JpegImage:
    where = f"buffer {index}"
    if not isinstance(description, dict) or not isinstance(description.get("key"), str):
        raise MessageError(f"{where}: description must be a map with a 'key'")
    where = f"buffer {index} ({description['key']!r:.80})"
    if description.keys() != _DESCRIPTION_KEYS:
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
    header, _ = _read_header(views[0], views[1:])
    return MESSAGE_TYPES[header.type].from_wire(header.fields)
