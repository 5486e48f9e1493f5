"""`chunkbus tap export`: a recorded local run as a LeRobot dataset (read back by lerobot) and as a
Foxglove MCAP (read back by the mcap reader, its messages decoded by their own schemas)."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time

import numpy as np
import pytest
from conftest import Processes
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from mcap.reader import make_reader
from mcap.writer import Writer
from mdp_peers import CHUNKBUS, start_broker, start_worker

from chunkbus.bus import JpegImage, decode
from chunkbus.bus.messages import ArmState, CameraFrame, Command, ObservationRequest, TaskSet
from chunkbus.nodes.export import Tick, episodes, export_lerobot
from chunkbus.nodes.tap import FRAMES_ENCODING, pack_frames, read_recording

OFFLINE = {"HF_HUB_OFFLINE": "1"}  # the export must never need the hub


@pytest.fixture(scope="module")
def recording(tmp_path_factory):
    """4 s of a real local run (broker, scripted worker, sim arm, synthetic camera, actuator), its
    task changed half-way with `chunkbus task`; recorded once for the whole module."""
    out = tmp_path_factory.mktemp("export") / "run.mcap"
    runtime = tempfile.mkdtemp(prefix="cb-", dir="/tmp")
    processes = Processes()
    with pytest.MonkeyPatch.context() as env:
        env.setenv("CHUNKBUS_RUNTIME_DIR", runtime)
        try:
            broker = start_broker(processes)
            # Short chunks: a request every few ticks, each carrying the observation the actuator built.
            start_worker(processes, broker.backend, "scripted:sine?delay=0.05&chunk=10", "--service", "sine")
            processes.start_node("arm")
            # 27 fps beside the actuator's 30 Hz: the phase between a frame and a tick drifts, so a frame
            # published within microseconds of a command (received by one side before it, the other after)
            # is a rare tick, not every tick of a run whose two clocks happened to start in step.
            processes.start_node("camera", "--name", "front", "--fps", "27", "--width", "64", "--height", "48")
            processes.start_node("actuator", "--broker", broker.frontend, "--service", "sine", "--camera", "front",
                                 "--task", "reach")
            recorder = processes.start(CHUNKBUS, "tap", "record", str(out), "--duration", "4", script=True)
            time.sleep(2)
            subprocess.run([CHUNKBUS, "task", "wave"], check=True, capture_output=True, timeout=30)
            assert recorder.wait(timeout=60) == 0, "".join(recorder.log_lines)
        finally:
            processes.cleanup()
            shutil.rmtree(runtime, ignore_errors=True)
    return out


def recorded(path) -> list[tuple[str, int, object]]:
    return [(topic, log_time, decode(frames)) for topic, log_time, frames in read_recording(str(path))]


def expected_ticks(messages) -> dict[int, tuple[Command, ArmState, CameraFrame]]:
    """Each command with the newest state and frame received before it, both at most 0.25 s old
    (the actuator's --max-obs-age): the observation the actuator built at that tick."""
    newest: dict[str, tuple[int, object]] = {}
    ticks = {}
    for topic, log_time, message in messages:
        if topic in ("state", "camera/front"):
            newest[topic] = (log_time, message)
        elif topic == "command" and len(newest) == 2 and all(log_time - t <= 0.25e9 for t, _ in newest.values()):
            ticks[message.tick] = (message, newest["state"][1], newest["camera/front"][1])
    return ticks


def nearest_frame(image: np.ndarray, camera: list[CameraFrame]) -> tuple[int, float]:
    """The seq of the recorded frame nearest to `image`, and its mean absolute difference."""
    errors = [np.abs(image.astype(np.float32) - frame.image).mean() for frame in camera]
    return camera[int(np.argmin(errors))].seq, float(min(errors))


def pixels(image) -> np.ndarray:
    return image.decode() if isinstance(image, JpegImage) else image  # requests may carry JPEG


def export(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([CHUNKBUS, "tap", "export", *map(str, args)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **OFFLINE})


def test_the_lerobot_export_is_every_tick_as_the_actuator_saw_and_did_it(recording, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = export(recording, "--lerobot", tmp_path / "ds", "--repo-id", "chunkbus/run")
    assert result.returncode == 0, result.stderr
    assert "1 episode" in result.stdout

    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    dataset = LeRobotDataset("chunkbus/run", root=tmp_path / "ds")
    messages = recorded(recording)
    expected = expected_ticks(messages)
    assert dataset.fps == 30 and dataset.meta.total_episodes == 1
    frames = [dataset[i] for i in range(len(dataset))]
    assert [int(f["tick"]) for f in frames] == sorted(expected)  # every tick, once, in order
    camera = [m for t, _, m in messages if t == "camera/front"]
    for frame in frames:
        command, state, picture = expected[int(frame["tick"])]
        assert np.array_equal(frame["action"].numpy(), command.positions)  # the command actually sent
        assert bool(frame["hold"]) == command.hold
        assert np.array_equal(frame["observation.state"].numpy(), state.positions)
        # Through AV1 the pixels are near, not equal: the nearest recorded frame must be the right one.
        seq, error = nearest_frame(frame["observation.images.front"].numpy().transpose(1, 2, 0) * 255, camera)
        assert seq == picture.seq and error < 8
    assert {f["task"] for f in frames} == {"reach", "wave"}

    # The actuator's own observations (in the requests the broker captured) agree with the frames
    # exported for their ticks. Not always all of them: the tap and the actuator each receive, and a
    # state published within microseconds of a command can reach one before it and the other after.
    requests = [m for _, _, m in messages if isinstance(m, ObservationRequest)]
    sent = [o for request in requests for o in request.observations if o.tick in expected]
    agree = [np.array_equal(o.state, expected[o.tick][1].positions)
             and nearest_frame(pixels(o.images["observation.images.front"]), camera)[0] == expected[o.tick][2].seq
             for o in sent]
    assert len(sent) >= 5 and sum(agree) >= 0.8 * len(sent), agree


def test_episodes_split_where_the_task_changed(recording, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    scheduler = os.sched_getscheduler(0), os.sched_getparam(0)
    export_lerobot(str(recording), str(tmp_path / "ds"), "chunkbus/tasks", split_on_task=True)
    # lerobot's AV1 encoder left this thread in SCHED_FIFO at priority 99; the export gives it back.
    assert (os.sched_getscheduler(0), os.sched_getparam(0)) == scheduler

    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    dataset = LeRobotDataset("chunkbus/tasks", root=tmp_path / "ds")
    messages = recorded(recording)
    change = next(m for _, _, m in messages if isinstance(m, TaskSet))
    assert change.task == "wave" and change.previous == "reach"
    # The new task from the first tick the recording shows it for: the actuator's task topic, or a
    # request that carried it (one goes out at the tick of the change, which the topic dates a tick later).
    since = min([change.tick] + [m.tick for _, _, m in messages if isinstance(m, ObservationRequest)
                                 and m.task == "wave"])
    assert dataset.meta.total_episodes == 2
    first = [dataset[i] for i in range(len(dataset)) if int(dataset[i]["episode_index"]) == 1][0]
    assert int(first["tick"]) == since and first["task"] == "wave" and int(first["frame_index"]) == 0
    assert [list(row["tasks"]) for row in dataset.meta.episodes] == [["reach"], ["wave"]]


def tick(number: int, hold: bool = False, run: int = 0, task: str = "t") -> Tick:
    return Tick(number, run, number, number / 10, hold, np.zeros(1), np.zeros(1), task)


def test_episodes_split_at_restarts_task_changes_and_pauses_whose_holds_are_left_out():
    moving, held = [tick(k) for k in range(3)], [tick(k, hold=True) for k in range(3, 9)]  # 0.5 s held
    later = [tick(k) for k in range(9, 12)]
    ticks = moving + held + later
    numbers = lambda parts: [[t.number for t in part] for part in parts]  # noqa: E731
    assert numbers(episodes(ticks)) == [list(range(12))]  # one episode, held ticks and all
    assert numbers(episodes(ticks, gap=1.0)) == [list(range(12))]  # a short hold is no pause
    assert numbers(episodes(ticks, gap=0.3)) == [[0, 1, 2], [9, 10, 11]]
    restarted = moving + [tick(k, run=1) for k in range(2)]
    assert numbers(episodes(restarted)) == [[0, 1, 2], [0, 1]]
    tasks = [tick(0, task="a"), tick(1, task="a"), tick(2, task="b")]
    assert numbers(episodes(tasks)) == [[0, 1, 2]] and numbers(episodes(tasks, split_on_task=True)) == [[0, 1], [2]]
    stopped = moving + [tick(k) for k in range(20, 22)]  # no commands for 1.7 s
    assert numbers(episodes(stopped, gap=1.0)) == [[0, 1, 2], [20, 21]]


def decoder(schema):
    """A protobuf message class from an MCAP schema (a FileDescriptorSet), as Foxglove reads it."""
    pool = descriptor_pool.DescriptorPool()
    for file in descriptor_pb2.FileDescriptorSet.FromString(schema.data).file:
        pool.Add(file)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName(schema.name))


def test_the_foxglove_export_carries_foxglove_schemas(recording, tmp_path):
    out = tmp_path / "foxglove.mcap"
    result = export(recording, "--foxglove", out)
    assert result.returncode == 0, result.stderr
    read: dict[str, list] = {}
    with open(out, "rb") as f:
        reader = make_reader(f)
        classes = {}
        for schema, channel, message in reader.iter_messages():
            if schema.encoding == "protobuf":
                classes.setdefault(schema.name, decoder(schema))
                read.setdefault((channel.topic, schema.name), []).append(
                    (message.log_time, classes[schema.name].FromString(message.data)))
    assert {"/camera/front", "/state", "/command", "/actuator/chunk", "/log"} <= {topic for topic, _ in read}
    assert {schema for _, schema in read} >= {"foxglove.RawImage", "foxglove.JointStates", "foxglove.Log"}

    messages = recorded(recording)
    frame = next(m for t, _, m in messages if t == "camera/front")
    image = read[("/camera/front", "foxglove.RawImage")][0][1]
    assert (image.width, image.height, image.encoding) == (64, 48, "rgb8")
    assert np.array_equal(np.frombuffer(image.data, np.uint8).reshape(48, 64, 3), frame.image)
    state = next(m for t, _, m in messages if t == "state")
    joints = read[("/state", "foxglove.JointStates")][0][1].joints
    assert [j.name for j in joints] == state.names
    assert np.allclose([j.position for j in joints], state.positions)
    # A chunk's actions are stamped with the times of the commands of their ticks.
    command_times = {m.tick: log_time for t, log_time, m in messages if t == "command"}
    chunk = next(m for t, _, m in messages if t == "actuator/chunk")
    drawn = read[("/actuator/chunk", "foxglove.JointStates")][: len(chunk.actions)]
    rows = [i for i in range(len(chunk.actions)) if chunk.tick + i in command_times]
    for (_, joint_states), i in zip(drawn, rows):
        stamp = joint_states.timestamp.seconds * 10**9 + joint_states.timestamp.nanos
        assert stamp == command_times[chunk.tick + i]
        assert np.allclose([j.position for j in joint_states.joints], chunk.actions[i])
    logs = [log.message for _, log in read[("/log", "foxglove.Log")]]
    assert any("task 'wave'" in line for line in logs), logs


def copy_of(recording, path, topics: set[str]):
    """A chunkbus recording of `recording`'s messages on `topics` only."""
    with open(path, "wb") as stream:
        writer = Writer(stream)
        writer.start(profile="chunkbus", library="test")
        channels = {}
        for topic, log_time, frames in read_recording(str(recording)):
            if topic in topics:
                if topic not in channels:
                    channels[topic] = writer.register_channel(topic, FRAMES_ENCODING, 0)
                writer.add_message(channels[topic], log_time, pack_frames(frames), log_time)
        writer.finish()
    return path


def test_what_cannot_be_exported_is_one_line_naming_the_fix(recording, tmp_path):
    foreign = tmp_path / "foreign.mcap"
    with open(foreign, "wb") as stream:
        writer = Writer(stream)
        writer.start(profile="ros2", library="test")
        channel = writer.register_channel("/chatter", "json", writer.register_schema("Chat", "jsonschema", b"{}"))
        writer.add_message(channel, 1, b"{}", 1)
        writer.finish()
    frames_only = copy_of(recording, tmp_path / "frames.mcap", {"camera/front"})
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken.mcap").write_bytes(b"")
    for args, problem in [
        ([foreign, "--foxglove", tmp_path / "out.mcap"], "channel '/chatter' is not a chunkbus recording"),
        ([frames_only, "--lerobot", tmp_path / "ds", "--repo-id", "a/b"],
         "holds no state, command, actuator/task or broker/request/* (or give --task)"),
        ([recording, "--lerobot", tmp_path / "taken", "--repo-id", "a/b"], "exists: the export writes a new dataset"),
        ([recording, "--foxglove", tmp_path / "taken.mcap"], "exists: the export writes a new file"),
    ]:
        result = export(*args)
        assert result.returncode == 1 and problem in result.stderr, result.stderr
        assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr, result.stderr
    assert not (tmp_path / "ds").exists() and not (tmp_path / "out.mcap").exists()
