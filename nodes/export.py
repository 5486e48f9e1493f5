"""`chunkbus tap export`: a recording as a LeRobot dataset, or as an MCAP that Foxglove opens.

LeRobot: one frame per control tick the actuator commanded, as the actuator saw and did it:
`action` is the command it sent for the tick (held ticks included, flagged `hold`), and
`observation.state` and `observation.images.<camera>` are the newest state and frames received
at or before that command (by the recording's receive times), the way the actuator built its
observation of the tick. Like the actuator, a tick whose state or frames are missing or older
than its default --max-obs-age has no observation, so no frame. The task comes from the
actuator's task topic (`<actuator>/task`) and the requests the broker captured. The recording is
read twice, so a long one never has to fit in memory: first everything but the pixels (the
plan), then the frames the plan picked, straight into lerobot's own writer.

Foxglove: every message the recording holds is re-written with Foxglove's well-known schemas
through the foxglove SDK: frames as foxglove.RawImage or CompressedImage, states and commands as
foxglove.JointStates, each chunk as JointStates stamped with the times of the ticks it was for,
and holds, task changes and error replies as foxglove.Log.
"""

from __future__ import annotations

import bisect
import contextlib
import functools
import os
import shutil
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..bus.codec import decode
from ..bus.endpoints import COMMAND, STATE, camera_topic
from ..bus.messages import ActionChunk, ArmState, CameraFrame, Command, ErrorReply, ObservationRequest, Stats, TaskSet
from ..bus.schema import JpegImage, MessageError
from .actuator import ActuatorConfig
from .tap import TapError, matches, read_recording

MAX_INPUT_AGE = ActuatorConfig.max_obs_age  # seconds: older inputs make no observation, as in the actuator
CAMERAS = camera_topic("*")


def decoded(path: str, topics: list[str] | None = None):
    """Yield (topic, log_time ns, message) of a recording, in file order."""
    for topic, log_time, frames in read_recording(path, topics):
        try:
            yield topic, log_time, decode(frames)
        except MessageError as exc:
            raise TapError(f"{path!r}: a message on {topic!r} cannot be decoded ({exc}): was it recorded "
                           "by another version of chunkbus?") from None


def is_camera(topic: str, message) -> bool:
    return isinstance(message, CameraFrame) and matches(topic, [CAMERAS])


def is_command(topic: str, message) -> bool:
    return topic == COMMAND and isinstance(message, Command)


def must_be_new(path: Path, what: str) -> None:
    if path.exists():
        raise TapError(f"{str(path)!r} exists: the export writes a new {what}; remove it or name another one")


# --- LeRobot ---------------------------------------------------------------------------------------


@dataclass
class Tick:
    """One control tick as the robot did it: the command sent, and what the actuator saw then."""

    index: int  # the command's place among the recording's commands: how the second pass finds it
    run: int  # the actuator's run: its ticks start again when it restarts
    number: int  # the actuator's tick
    time: float  # the command's issue time (monotonic, robot host)
    hold: bool
    action: np.ndarray
    state: np.ndarray
    task: str = ""


@dataclass
class Plan:
    """What a LeRobot export writes, read from a recording without its pixels."""

    ticks: list[Tick]
    joints: list[str]
    action_names: list[str]
    cameras: dict[str, tuple[int, ...]]  # camera name -> image shape (height, width, channels)
    fps: int


def plan_ticks(path: str, task: str | None = None) -> Plan:
    """The ticks with fresh inputs, each with its state, action and task (`task`, when given)."""
    ticks: list[Tick] = []
    received: list[dict[str, int]] = []  # per tick: the receive time of each input's newest message
    newest: dict[str, int] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    state: ArmState | None = None
    names: list[str] = []
    tasks: list[list[tuple[int, str]]] = [[]]  # per run: (tick, the task at that tick)
    pending: list[tuple[int, str]] = []  # read since the last command: they belong to the next one's run
    robots: set[str] = set()
    for topic, log_time, message in decoded(path):
        if topic == STATE and isinstance(message, ArmState):
            state, newest[STATE] = message, log_time
        elif is_camera(topic, message):
            newest[message.camera] = log_time
            shapes.setdefault(message.camera, tuple(message.image.shape))
        elif isinstance(message, TaskSet):  # from message.tick on; `previous` until then
            robots.add(message.robot_id)
            pending += [(message.tick - 1, message.previous), (message.tick, message.task)]
        elif isinstance(message, ObservationRequest):
            robots.add(message.robot_id)
            pending.append((message.tick, message.task))
        elif is_command(topic, message):
            run = len(tasks) - 1
            if ticks and message.tick <= ticks[-1].number:  # the actuator restarted
                tasks.append([])
                run += 1
            tasks[run] += pending
            pending = []
            names = list(message.names)
            positions = state.positions if state is not None else np.zeros(0)
            ticks.append(Tick(len(ticks), run, message.tick, message.issue_time, message.hold,
                              message.positions.astype(np.float32), positions.astype(np.float32)))
            received.append({**newest, COMMAND: log_time})
    tasks[-1] += pending
    missing = [t for t, wanted in ((STATE, state is None), (COMMAND, not ticks)) if wanted]
    if task is None and not any(tasks):
        missing.append("actuator/task or broker/request/* (or give --task)")
    if missing:
        raise TapError(f"{path!r} holds no {', '.join(missing)}: a LeRobot export needs the arm's state, the "
                       "actuator's commands and its task; record on the robot host while they run")
    if task is None and len(robots) > 1:
        raise TapError(f"{path!r} holds the tasks of several robots ({', '.join(sorted(robots))}): give --task")
    fps = frame_rate(ticks)
    inputs = [STATE, *shapes]
    fresh = []
    for tick, times in zip(ticks, received):
        if all(i in times and times[COMMAND] - times[i] <= MAX_INPUT_AGE * 1e9 for i in inputs):
            tick.task = task if task is not None else task_at(tasks, tick)
            fresh.append(tick)
    if not fresh:
        raise TapError(f"{path!r}: no tick has every input ({', '.join(inputs)}) newer than {MAX_INPUT_AGE:g} s "
                       "at its command: did a camera or the arm stop?")
    return Plan(fresh, list(state.names), names, shapes, fps)


def task_at(tasks: list[list[tuple[int, str]]], tick: Tick) -> str:
    """The task at `tick`: the one known for its tick or the latest before it in its run (the
    earliest known, before the first); a run that shows none keeps the task of the run before."""
    run = next((known for known in reversed(tasks[: tick.run + 1]) if known), next(known for known in tasks if known))
    known = sorted(run, key=lambda pair: pair[0])
    i = bisect.bisect_right([t for t, _ in known], tick.number) - 1
    return known[max(i, 0)][1]


def frame_rate(ticks: list[Tick]) -> int:
    """The actuator's fps from its commands' issue times (the median tick interval)."""
    intervals = [(b.time - a.time) / (b.number - a.number) for a, b in zip(ticks, ticks[1:])
                 if b.run == a.run and b.number > a.number]
    if not intervals:
        raise TapError("the recording holds fewer than two commands of one run: too short to tell its fps")
    fps = 1.0 / float(np.median(intervals))
    if abs(fps - round(fps)) > 0.01 * fps:
        raise TapError(f"the actuator ran at {fps:.2f} ticks a second, and a LeRobot dataset's fps is a whole "
                       "number: run it at a whole --fps")
    return round(fps)


def episodes(ticks: list[Tick], gap: float | None = None, split_on_task: bool = False) -> list[list[Tick]]:
    """The ticks as episodes: a new one where the actuator restarted, where the task changed
    (`split_on_task`), and where the robot paused for more than `gap` seconds, i.e. sent no moving
    command for that long (it stopped, or held while no chunks came: those held ticks are left out)."""
    if gap is not None:
        ticks = without_long_holds(ticks, gap)
    result: list[list[Tick]] = []
    for tick in ticks:
        last = result[-1][-1] if result else None
        if (last is None or tick.run != last.run or (split_on_task and tick.task != last.task)
                or (gap is not None and tick.time - last.time > gap)):
            result.append([])
        result[-1].append(tick)
    return result


def without_long_holds(ticks: list[Tick], gap: float) -> list[Tick]:
    """`ticks` less each stretch of held ticks lasting more than `gap` seconds."""
    kept: list[Tick] = []
    held: list[Tick] = []
    for tick in [*ticks, None]:
        if tick is not None and tick.hold:
            held.append(tick)
            continue
        if held and held[-1].time - held[0].time <= gap:
            kept += held
        held = []
        if tick is not None:
            kept.append(tick)
    return kept


def features(plan: Plan) -> dict:
    vector = {"dtype": "float32", "shape": (len(plan.joints),), "names": plan.joints}
    result = {
        "observation.state": vector,
        "action": {**vector, "shape": (len(plan.action_names),), "names": plan.action_names},
        # Not policy features (lerobot reads observation.* and action): where each frame came from.
        "tick": {"dtype": "int64", "shape": (1,), "names": None},
        "hold": {"dtype": "bool", "shape": (1,), "names": None},
    }
    for camera, shape in plan.cameras.items():
        result[f"observation.images.{camera}"] = {"dtype": "video", "shape": shape,
                                                  "names": ["height", "width", "channels"]}
    return result


@dataclass
class DatasetExport:
    root: str
    repo_id: str
    fps: int
    episodes: list[int]  # frames per episode
    tasks: list[str]

    def text(self) -> str:
        return (f"wrote LeRobot dataset {self.repo_id} into {self.root}: {sum(self.episodes)} frames at {self.fps} fps "
                f"in {len(self.episodes)} episode{'s' * (len(self.episodes) != 1)}, tasks {self.tasks}")


def keeps_scheduler(function):
    """SVT-AV1, lerobot's AV1 encoder (through PyAV), puts the thread that encodes in the real-time
    scheduler (SCHED_FIFO, priority 99) and leaves it there, for whatever the process does or starts
    next: give the thread back the policy it had."""

    @functools.wraps(function)
    def kept(*args, **kwargs):
        if not hasattr(os, "sched_getscheduler"):
            return function(*args, **kwargs)
        policy, param = os.sched_getscheduler(0), os.sched_getparam(0)
        try:
            return function(*args, **kwargs)
        finally:
            if (os.sched_getscheduler(0), os.sched_getparam(0)) != (policy, param):
                os.sched_setscheduler(0, policy, param)

    return kept


@keeps_scheduler
def export_lerobot(path: str, root: str, repo_id: str, gap: float | None = None, split_on_task: bool = False,
                   task: str | None = None) -> DatasetExport:
    """Write the recording as a new LeRobot dataset in `root`, with lerobot's own writer (nothing is pushed)."""
    must_be_new(Path(root), "dataset folder")
    plan = plan_ticks(path, task)
    parts = episodes(plan.ticks, gap, split_on_task)
    planned = {tick.index: tick for part in parts for tick in part}
    ends = {part[-1].index for part in parts}

    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    # The writer never decodes: naming a video backend keeps lerobot from probing torchcodec.
    dataset = LeRobotDataset.create(repo_id, plan.fps, features(plan), root=root, use_videos=True,
                                    image_writer_threads=4, video_backend="pyav")
    try:
        frames: dict[str, CameraFrame] = {}
        index = -1
        for topic, _, message in decoded(path, [COMMAND, CAMERAS]):
            if is_camera(topic, message):
                frames[message.camera] = message
            elif is_command(topic, message):
                index += 1
                if (tick := planned.get(index)) is None:
                    continue
                images = {f"observation.images.{camera}": pixels(frames[camera].image) for camera in plan.cameras}
                dataset.add_frame({"observation.state": tick.state, "action": tick.action, "task": tick.task,
                                   "tick": np.array([tick.number]), "hold": np.array([tick.hold]), **images})
                if index in ends:
                    dataset.save_episode()
        dataset.finalize()
    except BaseException:
        with contextlib.suppress(Exception):
            dataset.finalize()
        shutil.rmtree(root, ignore_errors=True)  # half a dataset would only be mistaken for one
        raise
    return DatasetExport(str(root), repo_id, plan.fps, [len(part) for part in parts],
                         list(dict.fromkeys(tick.task for part in parts for tick in part)))


def pixels(image) -> np.ndarray:
    return image.decode() if isinstance(image, JpegImage) else image


# --- Foxglove --------------------------------------------------------------------------------------


def export_foxglove(path: str, out: str) -> dict[str, int]:
    """Re-write the recording into `out` with Foxglove's schemas; the messages written, by topic."""
    must_be_new(Path(out), "file")
    # A chunk's action i is drawn at the time of tick chunk.tick + i: that of the command sent then.
    command_times: dict[int, list[int]] = defaultdict(list)
    for topic, log_time, message in decoded(path, [COMMAND]):
        if is_command(topic, message):
            command_times[message.tick].append(log_time)
    try:
        with FoxgloveWriter(out, command_times) as writer:
            for topic, log_time, message in decoded(path):
                writer.write(topic, log_time, message)
        if not writer.counts:
            raise TapError(f"{path!r} holds none of the messages the Foxglove export converts (camera frames, "
                           "states, commands, chunks, tasks, error replies, stats): record while the nodes run")
    except BaseException:
        Path(out).unlink(missing_ok=True)
        raise
    return dict(writer.counts)


class FoxgloveWriter:
    """An MCAP of Foxglove channels, through a Context of its own: nothing else this process logs goes there."""

    def __init__(self, out: str, command_times: dict[int, list[int]]):
        import foxglove

        self.context = foxglove.Context()
        self.mcap = foxglove.open_mcap(out, context=self.context)
        self.command_times = command_times
        self.channels: dict[str, object] = {}
        self.counts: dict[str, int] = defaultdict(int)
        self.holding: dict[str, bool] = {}  # per topic: the arm holds, or the actuator repeats its command
        self.joint_names: list[str] = []  # the commands', for chunks that name none

    def __enter__(self) -> FoxgloveWriter:
        return self

    def __exit__(self, *exc_info) -> None:
        self.mcap.close()

    def log(self, topic: str, message, log_time: int) -> None:
        """A foxglove message on its schema's channel class, or a dict as JSON."""
        if topic not in self.channels:
            import foxglove
            from foxglove import channels

            if isinstance(message, dict):  # no Foxglove schema for a node's figures: JSON, which its plots read
                schema = foxglove.Schema(name="chunkbus.Stats", encoding="jsonschema", data=b'{"type": "object"}')
                self.channels[topic] = foxglove.Channel(topic, schema=schema, message_encoding="json",
                                                        context=self.context)
            else:
                channel_class = getattr(channels, f"{type(message).__name__}Channel")  # e.g. RawImageChannel
                self.channels[topic] = channel_class(topic, context=self.context)
        self.channels[topic].log(message, log_time=log_time)
        self.counts[topic] += 1

    def note(self, log_time: int, name: str, text: str, level: str = "Info") -> None:
        from foxglove.messages import Log, LogLevel

        self.log("/log", Log(timestamp=stamp(log_time), level=getattr(LogLevel, level), message=text, name=name),
                 log_time)

    def write(self, topic: str, log_time: int, message) -> None:
        out = "/" + topic
        if isinstance(message, CameraFrame):
            self.log(out, image_message(message, log_time), log_time)
        elif isinstance(message, ArmState):
            self.log(out, joint_states(message.names, message.positions, log_time), log_time)
            self.hold_changed(topic, message.holding, log_time, message.arm, "the arm holds: no commands come",
                              "the arm takes commands again")
        elif isinstance(message, Command):
            self.joint_names = list(message.names)
            self.log(out, joint_states(message.names, message.positions, log_time), log_time)
            self.hold_changed(topic, message.hold, log_time, "actuator",
                              f"schedule ran dry at tick {message.tick}: holding the last command",
                              f"chunks arrive again at tick {message.tick}: moving")
        elif isinstance(message, ActionChunk):
            self.chunk(out, message, log_time)
        elif isinstance(message, TaskSet):
            self.note(log_time, message.robot_id, f"task {message.task!r} from tick {message.tick}")
        elif isinstance(message, ErrorReply):
            self.note(log_time, topic, f"request {message.request_id} answered {message.code}: {message.message}",
                      "Warning")
        elif isinstance(message, Stats):
            self.log(out, message.figures, log_time)

    def hold_changed(self, topic: str, holding: bool, log_time: int, name: str, started: str, ended: str) -> None:
        if holding != self.holding.get(topic, False):
            self.note(log_time, name, started if holding else ended, "Warning" if holding else "Info")
        self.holding[topic] = holding

    def chunk(self, out: str, chunk: ActionChunk, log_time: int) -> None:
        """Each action stamped with the time of the tick it was for, all logged when the chunk came:
        plotted by header stamp, the predicted trajectory lies beside the commands. Actions for ticks
        that sent no command (before the first, after the recording) are left out."""
        names = chunk.names or self.joint_names or [str(i) for i in range(chunk.actions.shape[1])]
        for i, action in enumerate(chunk.actions):
            if times := self.command_times.get(chunk.tick + i):
                at = min(times, key=lambda t: abs(t - log_time))  # this run's tick, if the actuator restarted
                self.log(out, joint_states(names, action, at), log_time)


def image_message(frame: CameraFrame, log_time: int):
    from foxglove.messages import CompressedImage, RawImage

    image = frame.image
    if isinstance(image, JpegImage):
        return CompressedImage(timestamp=stamp(log_time), frame_id=frame.camera, data=bytes(image.data), format="jpeg")
    height, width, channels = image.shape
    return RawImage(timestamp=stamp(log_time), frame_id=frame.camera, width=width, height=height,
                    encoding="rgb8" if channels == 3 else "mono8", step=width * channels, data=image.tobytes())


def joint_states(names: list[str], positions: np.ndarray, time_ns: int):
    """In the arm's own units (an SO-101's are degrees, Foxglove's JointState says radians)."""
    from foxglove.messages import JointState, JointStates

    return JointStates(timestamp=stamp(time_ns),
                       joints=[JointState(name=name, position=float(p)) for name, p in zip(names, positions)])


def stamp(time_ns: int):
    from foxglove.messages import Timestamp

    return Timestamp(time_ns // 1_000_000_000, time_ns % 1_000_000_000)
