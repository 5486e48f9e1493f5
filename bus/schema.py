"""The field types of chunkbus's messages and records, and the checker of each field.

A record is a dataclass with a SCHEMA: one checker per field. The same checkers run when a
record is encoded (a node cannot send what no node would accept) and when it is decoded
(nothing unchecked reaches a node); each raises MessageError naming the field.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
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


# --- records ---------------------------------------------------------------------------------


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
