"""The messages that chunkbus nodes exchange, and the validation of every field.

Each message type is a dataclass with a SCHEMA: one checker per field. The same
checkers run when a message is encoded (a node cannot send what no node would
accept) and when it is decoded (nothing unchecked reaches a node).

Times named ``*_time`` are ``time.monotonic()`` seconds on the host that wrote them;
only the robot host's clocks are ever compared. Durations measured elsewhere (a
worker's timings, a request's time-to-live) travel as durations in seconds.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np


class MessageError(ValueError):
    """A message that cannot be encoded or decoded; the text says what is wrong with it."""


@dataclass(frozen=True, eq=False)
class JpegImage:
    """A JPEG-compressed image as it travels on the bus.

    ``shape`` is the decoded image's (height, width, channels), so a receiver can
    check it against a policy's input before spending time decoding.
    """

    data: bytes | memoryview
    shape: tuple[int, int, int]

    @classmethod
    def encode(cls, image: np.ndarray, quality: int = 90) -> JpegImage:
        """Compress an RGB (or grayscale) uint8 image."""
        import cv2

        if image.ndim == 3 and image.shape[2] == 3:
            pixels = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
        else:
            pixels = image
        ok, encoded = cv2.imencode(".jpg", pixels, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
        if not ok:
            raise MessageError(f"OpenCV could not JPEG-encode an image of shape {image.shape}")
        shape = image.shape if image.ndim == 3 else (*image.shape, 1)
        return cls(encoded.tobytes(), tuple(int(n) for n in shape))

    def decode(self) -> np.ndarray:
        """The RGB uint8 image, HxWxC; a clear error if the bytes are not that JPEG."""
        import cv2

        buffer = np.frombuffer(self.data, dtype=np.uint8)
        flags = cv2.IMREAD_COLOR if self.shape[2] == 3 else cv2.IMREAD_GRAYSCALE
        pixels = cv2.imdecode(buffer, flags)
        if pixels is None:
            raise MessageError("a JPEG image could not be decoded: its bytes are not a valid JPEG")
        if pixels.ndim == 2:
            pixels = pixels[:, :, None]
        else:
            pixels = cv2.cvtColor(pixels, cv2.COLOR_BGR2RGB)
        if pixels.shape != tuple(self.shape):
            raise MessageError(
                f"a JPEG image decoded to shape {pixels.shape}, but its header says {self.shape}"
            )
        return pixels

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, JpegImage)
            and tuple(self.shape) == tuple(other.shape)
            and bytes(self.data) == bytes(other.data)
        )


Image = np.ndarray | JpegImage

# --- field checkers -------------------------------------------------------------------
# A checker takes (value, where) and returns the value, or raises MessageError naming
# `where` (e.g. "observation_request.observations[1].state"). `where` is a string, or
# a (parent, field) pair that is only joined into one when there is an error to report:
# decoding checks every field of every message, so it must be cheap when all is well.

Where = str | tuple
Checker = Callable[[Any, Where], Any]

MAX_STRING = 4096
MAX_ITEMS = 256
ARRAY_KINDS = "biufc"  # bool, signed, unsigned, float, complex: never object or structured


def _path(where: Where) -> str:
    if isinstance(where, str):
        return where
    parent, name = where
    return f"{_path(parent)}{name}" if isinstance(name, str) and name[0] == "[" else f"{_path(parent)}.{name}"


def _fail(where: Where, problem: str) -> MessageError:
    return MessageError(f"{_path(where)}: {problem}")


def _type_name(value: Any) -> str:
    return type(value).__name__


def integer(minimum: int | None = None) -> Checker:
    def check(value: Any, where: Where) -> int:
        if type(value) is not int and (isinstance(value, bool) or not isinstance(value, np.integer)):
            raise _fail(where, f"expected an integer, got {_type_name(value)}")
        if minimum is not None and value < minimum:
            raise _fail(where, f"must be >= {minimum}, got {value}")
        return int(value)

    return check


def number(minimum: float | None = None) -> Checker:
    def check(value: Any, where: Where) -> float:
        if type(value) is not float and (
            isinstance(value, bool) or not isinstance(value, (int, np.integer, np.floating))
        ):
            raise _fail(where, f"expected a number, got {_type_name(value)}")
        if not math.isfinite(value):
            raise _fail(where, f"must be finite, got {value}")
        if minimum is not None and value < minimum:
            raise _fail(where, f"must be >= {minimum}, got {value}")
        return float(value)

    return check


def boolean() -> Checker:
    def check(value: Any, where: Where) -> bool:
        if not isinstance(value, (bool, np.bool_)):
            raise _fail(where, f"expected true or false, got {_type_name(value)}")
        return bool(value)

    return check


def text(pattern: str | None = None, choices: tuple[str, ...] | None = None) -> Checker:
    compiled = re.compile(pattern) if pattern else None

    def check(value: Any, where: Where) -> str:
        if not isinstance(value, str):
            raise _fail(where, f"expected a string, got {_type_name(value)}")
        if len(value) > MAX_STRING:
            raise _fail(where, f"string of {len(value)} characters exceeds {MAX_STRING}")
        if compiled and not compiled.fullmatch(value):
            raise _fail(where, f"{value!r} does not match {pattern}")
        if choices and value not in choices:
            raise _fail(where, f"{value!r} is not one of {', '.join(choices)}")
        return value

    return check


def array(ndim: int | None = None, kinds: str = "iuf") -> Checker:
    """A numpy array of the given rank whose dtype kind is one of `kinds`."""

    def check(value: Any, where: Where) -> np.ndarray:
        if not isinstance(value, np.ndarray):
            raise _fail(where, f"expected a numpy array, got {_type_name(value)}")
        if value.dtype.kind not in kinds:
            raise _fail(where, f"dtype {value.dtype} is not allowed here (kinds: {kinds})")
        if ndim is not None and value.ndim != ndim:
            raise _fail(where, f"expected {ndim} dimensions, got shape {value.shape}")
        return value

    return check


def image() -> Checker:
    """An HxW or HxWxC uint8 image (C in 1..4), raw or JPEG."""

    def check(value: Any, where: Where) -> Image:
        if isinstance(value, JpegImage):
            if len(value.shape) != 3 or not 1 <= value.shape[2] <= 4:
                raise _fail(where, f"JPEG image shape {value.shape} is not HxWxC")
            return value
        if not isinstance(value, np.ndarray):
            raise _fail(where, f"expected an image (uint8 array or JPEG), got {_type_name(value)}")
        if value.dtype != np.uint8:
            raise _fail(where, f"images must be uint8, got {value.dtype}")
        if value.ndim not in (2, 3) or (value.ndim == 3 and not 1 <= value.shape[2] <= 4):
            raise _fail(where, f"image shape {value.shape} is not HxW or HxWxC with C in 1..4")
        return value

    return check


def optional(inner: Checker) -> Checker:
    def check(value: Any, where: Where) -> Any:
        return None if value is None else inner(value, where)

    return check


def list_of(inner: Checker, max_items: int = MAX_ITEMS) -> Checker:
    def check(value: Any, where: Where) -> list:
        if not isinstance(value, (list, tuple)):
            raise _fail(where, f"expected a list, got {_type_name(value)}")
        if len(value) > max_items:
            raise _fail(where, f"list of {len(value)} items exceeds {max_items}")
        return [inner(item, (where, f"[{i}]")) for i, item in enumerate(value)]

    return check


def dict_of(inner: Checker, max_items: int = MAX_ITEMS) -> Checker:
    def check(value: Any, where: Where) -> dict:
        if not isinstance(value, dict):
            raise _fail(where, f"expected a map, got {_type_name(value)}")
        if len(value) > max_items:
            raise _fail(where, f"map of {len(value)} items exceeds {max_items}")
        out = {}
        for key, item in value.items():
            if not isinstance(key, str) or len(key) > MAX_STRING:
                raise _fail(where, f"map keys must be strings, got {key!r:.80}")
            out[key] = inner(item, (where, f"[{key!r}]"))
        return out

    return check


def record(cls: type[Record]) -> Checker:
    def check(value: Any, where: Where) -> Record:
        if isinstance(value, cls):
            value.check(where)
            return value
        return cls.from_wire(value, where)

    return check


# --- records and messages ---------------------------------------------------------------


class Record:
    """A dataclass whose fields are checked by SCHEMA: one checker per field, in field order."""

    SCHEMA: ClassVar[dict[str, Checker]]

    @classmethod
    def required_fields(cls) -> frozenset[str]:
        required = cls.__dict__.get("_required")
        if required is None:  # computed once per class: dataclasses.fields() is slow
            required = frozenset(
                f.name
                for f in dataclasses.fields(cls)  # type: ignore[arg-type]
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            )
            cls._required = required
        return required

    def check(self, where: Where | None = None) -> None:
        """Run every field's checker, as decoding would: raises MessageError if one fails."""
        where = where or getattr(self, "TYPE", type(self).__name__)
        for name, checker in self.SCHEMA.items():
            checker(getattr(self, name), (where, name))

    def to_wire(self) -> dict[str, Any]:
        """The fields as a map; nested records become maps. Arrays stay arrays."""
        out = {}
        for name in self.SCHEMA:
            value = getattr(self, name)
            if isinstance(value, Record):
                value = value.to_wire()
            elif isinstance(value, list) and value and isinstance(value[0], Record):
                value = [item.to_wire() for item in value]
            elif isinstance(value, dict) and value and isinstance(next(iter(value.values())), Record):
                value = {key: item.to_wire() for key, item in value.items()}
            out[name] = value
        return out

    @classmethod
    def from_wire(cls, fields: Any, where: Where | None = None):
        """Check every field and build the record; unknown or missing fields are errors."""
        where = where or getattr(cls, "TYPE", cls.__name__)
        if not isinstance(fields, dict):
            raise _fail(where, f"expected a map of fields, got {_type_name(fields)}")
        schema = cls.SCHEMA
        values = {}
        for name, value in fields.items():
            checker = schema.get(name)
            if checker is None:
                unknown = ", ".join(sorted(map(str, fields.keys() - schema.keys())))
                raise _fail(where, f"unknown field(s) {unknown}")
            values[name] = checker(value, (where, name))
        if len(values) < len(schema):
            missing = cls.required_fields() - values.keys()
            if missing:
                raise _fail(where, f"missing field {sorted(missing)[0]!r}")
        return cls(**values)


MESSAGE_TYPES: dict[str, type[Message]] = {}


class Message(Record):
    """A record that travels on its own; TYPE names it in the header."""

    TYPE: ClassVar[str]

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        assert cls.TYPE not in MESSAGE_TYPES, f"message type {cls.TYPE} defined twice"
        MESSAGE_TYPES[cls.TYPE] = cls


NAME = r"[A-Za-z0-9_.:/-]{1,128}"  # camera, robot, joint and service names


@dataclass(eq=False)
class CameraFrame(Message):
    """One frame of a camera, published on topic ``camera/<camera>``. Pixels are RGB."""

    TYPE: ClassVar[str] = "camera_frame"
    camera: str
    seq: int  # per camera, from 0; a gap means frames were lost
    capture_time: float  # when the frame was read from the device
    image: Image
    SCHEMA: ClassVar = {
        "camera": text(NAME),
        "seq": integer(0),
        "capture_time": number(),
        "image": image(),
    }


@dataclass(eq=False)
class ArmState(Message):
    """The arm's joint positions, published on topic ``state`` at a fixed rate."""

    TYPE: ClassVar[str] = "arm_state"
    arm: str
    seq: int
    read_time: float  # when the positions were read from the motors
    names: list[str]  # joint names, in the order of `positions`
    positions: np.ndarray
    holding: bool = False  # no commands arrive: the arm holds where it is
    SCHEMA: ClassVar = {
        "arm": text(NAME),
        "seq": integer(0),
        "read_time": number(),
        "names": list_of(text(NAME)),
        "positions": array(ndim=1),
        "holding": boolean(),
    }


@dataclass(eq=False)
class Command(Message):
    """The joint targets for one control tick, published on topic ``command``."""

    TYPE: ClassVar[str] = "command"
    seq: int
    tick: int  # the actuator's tick this command belongs to
    issue_time: float
    names: list[str]
    positions: np.ndarray
    hold: bool = False  # the schedule ran dry: this repeats the last command
    SCHEMA: ClassVar = {
        "seq": integer(0),
        "tick": integer(),
        "issue_time": number(),
        "names": list_of(text(NAME)),
        "positions": array(ndim=1),
        "hold": boolean(),
    }


@dataclass(eq=False)
class Observation(Record):
    """What the robot saw at one tick: state and images keyed by policy feature name."""

    tick: int
    time: float  # when the observation was assembled
    state: np.ndarray
    images: dict[str, Image] = field(default_factory=dict)
    SCHEMA: ClassVar = {
        "tick": integer(),
        "time": number(),
        "state": array(ndim=1),
        "images": dict_of(image(), max_items=32),
    }


@dataclass(eq=False)
class ObservationRequest(Message):
    """A robot asks for an action chunk. Action ``i`` of the reply belongs to tick ``tick + i``.

    ``priority``, ``ttl`` and ``replace_key`` are read by the broker: higher priority is
    served first; a request still queued ``ttl`` seconds after the broker received it is
    answered ``expired``; a new request with the same ``replace_key`` as a queued one
    supersedes it.
    """

    TYPE: ClassVar[str] = "observation_request"
    robot_id: str
    request_id: str
    tick: int  # k_obs
    fps: float
    send_time: float
    task: str
    observations: list[Observation]  # the policy's history, oldest first, newest last
    priority: int = 0
    ttl: float | None = None
    replace_key: str | None = None
    # Real-time chunking: actions already scheduled for ticks tick, tick+1, ... and not
    # yet executed, and the delay (in ticks) the actuator expects before the reply lands.
    prefix: np.ndarray | None = None
    expected_delay: int | None = None
    SCHEMA: ClassVar = {
        "robot_id": text(NAME),
        "request_id": text(NAME),
        "tick": integer(),
        "fps": number(minimum=1e-3),
        "send_time": number(),
        "task": text(),
        "observations": list_of(record(Observation), max_items=64),
        "priority": integer(),
        "ttl": optional(number(minimum=0.0)),
        "replace_key": optional(text(NAME)),
        "prefix": optional(array(ndim=2, kinds="f")),
        "expected_delay": optional(integer(0)),
    }


@dataclass(eq=False)
class ActionChunk(Message):
    """A worker's answer: ``actions[i]`` is the command for tick ``tick + i``."""

    TYPE: ClassVar[str] = "action_chunk"
    request_id: str
    robot_id: str
    tick: int  # the request's k_obs, echoed
    actions: np.ndarray  # (chunk length, action size), in the robot's action space
    names: list[str] = field(default_factory=list)  # action feature names, when known
    worker: str = ""
    model: str = ""
    # Seconds spent on the worker, e.g. decode, preprocess, inference, postprocess.
    timings: dict[str, float] = field(default_factory=dict)
    SCHEMA: ClassVar = {
        "request_id": text(NAME),
        "robot_id": text(NAME),
        "tick": integer(),
        "actions": array(ndim=2, kinds="f"),
        "names": list_of(text(NAME), max_items=1024),
        "worker": text(),
        "model": text(),
        "timings": dict_of(number(minimum=0.0)),
    }


@dataclass(eq=False)
class Stats(Message):
    """A node's figures, published once a second on topic ``<node>/stats``."""

    TYPE: ClassVar[str] = "stats"
    node: str
    time: float
    figures: dict[str, float]
    SCHEMA: ClassVar = {
        "node": text(NAME),
        "time": number(),
        "figures": dict_of(number()),
    }


ERROR_CODES = (
    "bad_request",  # the request itself is wrong (missing camera, wrong state size, ...)
    "expired",  # its time-to-live passed before a worker took it
    "superseded",  # a newer request with the same replace key took its place
    "rejected",  # the queue is full
    "failed",  # the worker died or failed while running it
    "no_service",  # no such service
    "internal",  # a bug: the text says where
)


@dataclass(eq=False)
class ErrorReply(Message):
    """The answer to a request that produced no result, and why."""

    TYPE: ClassVar[str] = "error"
    request_id: str
    code: str
    message: str
    robot_id: str = ""
    SCHEMA: ClassVar = {
        "request_id": text(),
        "code": text(choices=ERROR_CODES),
        "message": text(),
        "robot_id": text(),
    }
