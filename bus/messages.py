"""The messages that chunkbus nodes exchange; bus/schema.py checks every field of them.

Times named ``*_time`` are ``time.monotonic()`` seconds on the host that wrote them;
only the robot host's clocks are ever compared. Durations measured elsewhere (a
worker's timings, a request's time-to-live) travel as durations in seconds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from .schema import (
    Image,
    Record,
    array,
    boolean,
    dict_of,
    image,
    integer,
    list_of,
    number,
    optional,
    record,
    text,
)

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
    # Real-time chunking: what the actuator will command for ticks tick, tick+1, ... (its
    # schedule after stitching, in the robot's raw action space, padded with the hold command
    # where it runs dry: never zeros), as many rows as the execution horizon it wants guided;
    # and the tick after `tick` at which it expects to merge the reply (rows before it are frozen).
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
    # Real-time chunking: the delay and execution horizon the chunk was guided with, or None
    # when it was not (then `unguided` says why, if the request asked for guidance).
    guided_delay: int | None = None
    guided_horizon: int | None = None
    unguided: str = ""
    SCHEMA: ClassVar = {
        "request_id": text(NAME),
        "robot_id": text(NAME),
        "tick": integer(),
        "actions": array(ndim=2, kinds="f"),
        "names": list_of(text(NAME), max_items=1024),
        "worker": text(),
        "model": text(),
        "timings": dict_of(number(minimum=0.0)),
        "guided_delay": optional(integer(0)),
        "guided_horizon": optional(integer(1)),
        "unguided": text(),
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


@dataclass(eq=False)
class SetTask(Message):
    """Asks an actuator (on its control socket) to use another task from its next request on."""

    TYPE: ClassVar[str] = "set_task"
    task: str
    SCHEMA: ClassVar = {"task": text()}


@dataclass(eq=False)
class TaskSet(Message):
    """The actuator's answer to SetTask: requests from `tick` on carry `task`."""

    TYPE: ClassVar[str] = "task_set"
    robot_id: str
    task: str
    previous: str
    tick: int
    SCHEMA: ClassVar = {"robot_id": text(NAME), "task": text(), "previous": text(), "tick": integer()}


ERROR_CODES = (
    "bad_request",  # the request itself is wrong (missing camera, wrong state size, ...)
    "expired",  # its time-to-live passed before a worker took it
    "superseded",  # a newer request with the same replace key took its place
    "rejected",  # the queue is full
    "failed",  # the worker died or failed while running it
    "no_service",  # no such service
    "broker_lost",  # the client lost its broker before the answer came (the request may have run)
    "unauthorized",  # CURVE is on and this key may not do that (another robot's id, a removed key)
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
