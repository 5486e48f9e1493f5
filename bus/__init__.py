"""chunkbus.bus: messages and their codec, sockets and endpoints, the ticker, logging."""

from .codec import PROTOCOL_VERSION, decode, decode_header, encode
from .messages import (
    ActionChunk,
    ArmState,
    CameraFrame,
    Command,
    ErrorReply,
    Message,
    Observation,
    ObservationRequest,
    Stats,
)
from .schema import JpegImage, MessageError

__all__ = [
    "PROTOCOL_VERSION",
    "ActionChunk",
    "ArmState",
    "CameraFrame",
    "Command",
    "ErrorReply",
    "JpegImage",
    "Message",
    "MessageError",
    "Observation",
    "ObservationRequest",
    "Stats",
    "decode",
    "decode_header",
    "encode",
]
