"""The robot host's nodes as real processes: camera, arm, actuator, with a broker and worker."""

from __future__ import annotations

import subprocess
import time

import cv2
import numpy as np
import pytest
from mdp_peers import CHUNKBUS, kill, start_broker, start_worker, wait_for

from chunkbus.bus import Command
from chunkbus.bus.sockets import Publisher, Subscriber
from chunkbus.nodes.camera import synthetic_seq
from chunkbus.nodes.policies.scripted import ScriptedPolicy


def collect(endpoints, topics, seconds: float) -> list:
    seen = []
    with Subscriber(endpoints, topics, on_message=seen.append, rcvhwm=10_000):
        time.sleep(seconds)
    return seen


def commands_for(seconds: float) -> tuple[list, float]:
    """The actuator's commands for `seconds`, and the ticks its clock skipped meanwhile (its stats)."""
    seen = []
    with Subscriber(["actuator"], ["command"], on_message=seen.append, rcvhwm=10_000), \
            Subscriber(["actuator"], ["actuator/stats"]) as stats:
        time.sleep(seconds)
        return [r.message for r in seen], skipped_by(stats, seen[-1].message.tick)


def skipped_by(stats: Subscriber, tick: int) -> float:
    """The ticks the actuator's clock had skipped by `tick` (from its next stats)."""
    figures = wait_for(lambda: (r := stats.latest("actuator/stats")) and r.message.figures["tick"] > tick
                       and r.message.figures, timeout=5, what="the actuator's stats")
    return figures["skipped_ticks"]


def assert_every_tick(ticks: list[int], skipped: float) -> None:
    """A command for every tick, but for those the loop's clock skipped: a busy shared machine can starve
    it for a whole period, and it then says so in its stats rather than fire a burst of stale commands."""
    missing = sum(b - a - 1 for a, b in zip(ticks, ticks[1:]))
    assert ticks == sorted(set(ticks)) and missing <= skipped, (
        f"a tick was left without a command: {missing} missing, {skipped:g} skipped by the clock")


# --- camera -------------------------------------------------------------------------------


def test_synthetic_camera_publishes_numbered_frames_at_its_rate(runtime_dir, processes):
    processes.start_node("camera", "--name", "front", "--fps", "20", "--width", "64", "--height", "48")
    frames = [r.message for r in collect(["camera_front"], ["camera/front"], 2.0)]
    assert len(frames) >= 20
    for frame in frames:
        assert frame.camera == "front" and frame.image.shape == (48, 64, 3)
        assert synthetic_seq(frame.image) == frame.seq  # the pixels say which frame this is
    assert [f.seq for f in frames] == list(range(frames[0].seq, frames[0].seq + len(frames)))
    interval = np.median(np.diff([f.capture_time for f in frames]))
    assert interval == pytest.approx(1 / 20, rel=0.25)


def test_video_file_camera_loops_at_its_rate_as_jpeg(runtime_dir, processes, tmp_path):
    path = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (64, 48))
    colours = [(0, 0, 255), (0, 255, 0), (255, 0, 0)]  # BGR: red, green, blue
    for colour in colours:
        writer.write(np.full((48, 64, 3), colour, np.uint8))
    writer.release()
    processes.start_node("camera", "--name", "clip", "--source", str(path), "--fps", "15",
                         "--encoding", "jpeg")
    frames = [r.message for r in collect(["camera_clip"], ["camera/clip"], 1.5)]
    assert len(frames) >= 9
    dominant = [int(np.argmax(f.image.decode().reshape(-1, 3).mean(axis=0))) for f in frames]  # 0 R, 1 G, 2 B
    start = dominant.index(0)
    assert dominant[start : start + 6] == [0, 1, 2, 0, 1, 2]  # RGB order, looping
    assert np.median(np.diff([f.capture_time for f in frames])) == pytest.approx(1 / 15, rel=0.25)


def test_a_missing_camera_is_a_clear_error(runtime_dir):
    result = subprocess.run([CHUNKBUS, "camera", "--name", "x", "--source", "/dev/video99"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "cannot open camera device '/dev/video99'" in result.stderr
    result = subprocess.run([CHUNKBUS, "camera", "--name", "x", "--source", "missing.mp4"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "no video file 'missing.mp4'" in result.stderr


# --- arm --------------------------------------------------------------------------------------


JOINTS = ["shoulder_pan.pos", "shoulder_lift.pos", "elbow_flex.pos", "wrist_flex.pos", "wrist_roll.pos", "gripper.pos"]


def test_sim_arm_clamps_unsafe_commands_and_holds_when_they_stop(runtime_dir, processes):
    arm = processes.start_node("arm", "--rate", "50", "--max-step", "5", "--hold-after", "0.3")
    with Publisher("actuator") as publisher, Subscriber(["arm"], ["state"]) as states:
        states.wait("state", timeout=10)
        # 150 is past every limit; the arm may move at most 5 per command towards it.
        for seq in range(40):
            publisher.publish("command", Command(seq, seq, time.monotonic(), JOINTS, np.full(6, 150.0, np.float32)))
            time.sleep(0.02)
            if seq == 2:
                early = states.latest("state").message.positions.copy()
        assert early.max() <= 15 + 1e-3  # three commands of at most 5 each
        time.sleep(0.3)
        moving = states.latest("state").message.positions
        assert moving.max() <= 100 + 1e-3 and moving.min() > 50  # clamped to the limits
        # A command with the wrong joints is refused.
        publisher.publish("command", Command(99, 99, time.monotonic(), JOINTS[:3], np.full(3, -50.0, np.float32)))
        time.sleep(0.5)  # past --hold-after: the arm holds where it is
        held = states.latest("state").message.positions.copy()
        time.sleep(0.3)
        np.testing.assert_allclose(states.latest("state").message.positions, held, atol=1e-3)
        assert held.min() > 50
    processes.wait_log(arm, "no commands: holding position")
    processes.wait_log(arm, "command ignored: its joints do not match")


# --- actuator, with broker and worker ------------------------------------------------------------


def robot(processes, runtime_dir, delay: str = "0.05-0.3", strategy: str = "replace"):
    broker = start_broker(processes)
    start_worker(processes, broker.backend, f"scripted:sine?chunk=50&delay={delay}&seed=3", "--service", "sine")
    processes.start_node("arm", "--max-step", "100")
    processes.start_node("camera", "--name", "front", "--fps", "30", "--width", "64", "--height", "48")
    actuator = processes.start_node("actuator", "--broker", broker.frontend, "--service", "sine",
                                    "--camera", "front", "--fps", "30", "--strategy", strategy, "--ttl", "1.0")
    return broker, actuator


def f(ticks) -> np.ndarray:
    return ScriptedPolicy("scripted:sine?chunk=50").trajectory(np.asarray(ticks, dtype=np.float64))


def test_replace_executes_exactly_the_scripted_trajectory_on_every_tick(runtime_dir, processes):
    robot(processes, runtime_dir)
    commands, skipped = commands_for(8.0)
    moving = [c for c in commands if not c.hold]
    assert len(moving) > 100
    first = commands.index(moving[0])
    after = commands[first:]
    ticks = [c.tick for c in after]
    assert_every_tick(ticks, skipped)
    assert not any(c.hold for c in after), "the schedule ran dry on a steady link"
    np.testing.assert_array_equal(np.vstack([c.positions for c in after]), f(ticks))
    assert after[0].names == JOINTS


def test_broker_loss_holds_the_last_command_and_resumes(runtime_dir, processes):
    broker, actuator = robot(processes, runtime_dir, delay="0.02")
    seen = []
    with Subscriber(["actuator"], ["command"], on_message=seen.append, rcvhwm=10_000), \
            Subscriber(["actuator"], ["actuator/stats"]) as stats:
        wait_for(lambda: sum(not r.message.hold for r in seen) > 30, timeout=20, what="commands")
        kill(broker.process)
        wait_for(lambda: sum(r.message.hold for r in seen) > 30, timeout=20, what="holding")
        start_broker(processes, frontend=broker.frontend, backend=broker.backend)
        resumed_from = len(seen)
        wait_for(lambda: sum(not r.message.hold for r in seen[resumed_from:]) > 30, timeout=30, what="resuming")
        skipped = skipped_by(stats, seen[-1].message.tick)
    commands = [r.message for r in seen]
    ticks = [c.tick for c in commands]
    assert_every_tick(ticks, skipped)  # throughout: before, while and after the broker is gone
    holds = [i for i, c in enumerate(commands) if c.hold]
    last_moving = commands[holds[0] - 1]
    for i in holds:  # no jump: every hold repeats the last command
        np.testing.assert_array_equal(commands[i].positions, last_moving.positions)
    resumed = [c for c in commands[holds[-1] + 1 :]]
    assert resumed and not any(c.hold for c in resumed)
    np.testing.assert_array_equal(np.vstack([c.positions for c in resumed]), f([c.tick for c in resumed]))
    processes.wait_log(actuator, "schedule ran dry: holding the last command")
    processes.wait_log(actuator, "chunks arrive again: moving")
    processes.wait_log(actuator, f"the broker at {broker.frontend}")  # the warning names it


def test_a_camera_that_stops_delivering_is_reopened_and_reported(runtime_dir):
    import threading

    from chunkbus.nodes.camera import CameraNode, SyntheticSource

    class Flaky(SyntheticSource):
        """Delivers five frames, then fails, as an unplugged USB camera does."""

        def read(self):
            if self.seq >= 5:
                raise RuntimeError("read failed")
            return super().read()

    opened = []

    def opener():
        opened.append(1)
        if len(opened) == 2:
            raise RuntimeError("still unplugged")  # the first reopen fails too
        return Flaky(32, 24)

    node = CameraNode("flaky", opener, 50.0, "raw", 90, "camera_flaky")
    seen = []
    with Subscriber(["camera_flaky"], ["camera/flaky"], on_message=seen.append, rcvhwm=1000):
        time.sleep(0.3)  # let the subscription reach the publisher's socket
        thread = threading.Thread(target=node.run)
        thread.start()
        try:
            deadline = time.monotonic() + 10
            while len(opened) < 3 or len(seen) < 8:
                assert time.monotonic() < deadline, f"opened {len(opened)} times, {len(seen)} frames"
                time.sleep(0.05)
        finally:
            node.stop()
            thread.join(timeout=10)
    assert node.failures >= 1 and len(opened) >= 3  # reopened after a failed attempt
    seqs = [r.message.seq for r in seen]
    assert seqs == sorted(seqs)  # the node's own numbering goes on across reopenings


# --- the actuator says what is wrong, once ----------------------------------------------------------


def test_safety_explains_what_it_clamps():
    from chunkbus.nodes.arm import SO101_LIMITS, Safety

    safety = Safety(JOINTS, np.array(SO101_LIMITS), max_step=10.0)
    reference = np.zeros(6)
    assert safety.explain() == "0 of 0 commands clamped"
    for _ in range(3):
        safety.apply(np.array([0, 0, 0, 0, 0, -5.0]), reference)  # the gripper below 0
    safety.apply(np.array([0, 30.0, 0, 0, 0, 0]), reference)  # one big step of the shoulder
    safety.apply(np.zeros(6), reference)  # a safe one
    assert safety.explain() == (
        "4 of 5 commands clamped: the policy asks for gripper values below its limit (0), "
        "and for shoulder_lift steps larger than --max-step (10)"
    )


def test_an_arm_that_does_not_fit_the_model_is_one_error_and_no_request(runtime_dir, processes):
    from chunkbus.bus.client import BrokerClient
    from chunkbus.bus.lifecycle import EXIT_PERMANENT

    broker = start_broker(processes)
    start_worker(processes, broker.backend, "scripted:sine?actions=7", "--service", "seven")
    processes.start_node("arm")
    actuator = processes.start(CHUNKBUS, "--log-json", "actuator", "--broker", broker.frontend,
                               "--service", "seven", script=True)
    assert actuator.wait(timeout=60) == EXIT_PERMANENT
    time.sleep(0.2)
    log = "".join(actuator.log_lines)
    assert log.count("the model's actions have 7 values, but the arm 'arm' has 6 joints") == 1, log
    assert "serve a policy trained on this arm" in log and "Traceback" not in log
    with BrokerClient(broker.frontend) as client:
        outcomes = client.status().services["seven"].outcomes
    assert sum(outcomes.values()) == 0, f"the actuator sent requests: {outcomes}"


def test_a_model_camera_no_camera_option_gives_is_named_with_the_fix(runtime_dir, processes, tmp_path):
    from tiny_policies import save_tiny_policy

    checkpoint = save_tiny_policy("act", tmp_path / "act")  # cameras front and wrist
    broker = start_broker(processes)
    start_worker(processes, broker.backend, str(checkpoint))
    processes.start_node("arm")
    result = subprocess.run([CHUNKBUS, "actuator", "--broker", broker.frontend, "--service", "act",
                             "--camera", "front", "--camera", "top"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 78, result.stderr
    assert ("the model needs camera input 'observation.images.wrist', which no --camera gives (sending: "
            "front=observation.images.front, top=observation.images.top): add `--camera NAME=observation.images.wrist`"
            ) in result.stderr
    assert result.stderr.count("Error:") == 1 and "Traceback" not in result.stderr


def test_a_silent_broker_and_a_missing_arm_are_named_within_seconds_and_not_repeated(runtime_dir, processes):
    from test_launch import free_port

    address = f"tcp://127.0.0.1:{free_port()}"  # nobody listens there
    actuator = processes.start(CHUNKBUS, "--log-json", "actuator", "--broker", address, "--service", "sine",
                               script=True)
    started = time.monotonic()
    line = processes.wait_log(actuator, f"no answer from the broker at {address}", timeout=30)
    assert '"warning"' in line and time.monotonic() - started < 8  # 2 s, plus starting Python
    processes.wait_log(actuator, "no state from the arm at ipc://")
    time.sleep(4)
    log = "".join(actuator.log_lines)
    assert log.count("no answer from the broker") == 1 and log.count("no state from the arm") == 1, log


def test_a_silent_camera_is_named(runtime_dir, processes):
    broker = start_broker(processes)
    start_worker(processes, broker.backend, "scripted:sine", "--service", "sine")
    processes.start_node("arm")
    actuator = processes.start_node("actuator", "--broker", broker.frontend, "--service", "sine",
                                    "--camera", "front")
    line = processes.wait_log(actuator, "no frames from camera/front at ipc://", timeout=20)
    assert "camera_front.pub" in line and "--max-obs-age" in line


def test_a_model_that_comes_later_and_does_not_fit_stops_the_requests(runtime_dir, processes):
    broker = start_broker(processes)
    first = start_worker(processes, broker.backend, "scripted:sine?delay=0.02", "--service", "arm6")
    processes.start_node("arm")
    actuator = processes.start_node("actuator", "--broker", broker.frontend, "--service", "arm6")
    processes.wait_log(actuator, '"stats"')
    kill(first)  # replaced by a worker of another model, whose actions do not fit the arm
    start_worker(processes, broker.backend, "scripted:constant?actions=7", "--service", "arm6")
    line = processes.wait_log(actuator, "not asking for chunks: service 'arm6' (scripted:constant) does not fit",
                              timeout=30)
    assert "the model's actions have 7 values" in line
    processes.wait_log(actuator, "the service serves another model now")


def flow_robot(processes, strategy: str) -> tuple[list, float]:
    """A flow-matching worker whose chunks disagree (each its own offset), 100-200 ms away."""
    broker = start_broker(processes)
    start_worker(processes, broker.backend, "flow:sine?chunk=50&sigma=0.05&offset=2&delay=0.1-0.2&seed=3",
                 "--service", "flow")
    processes.start_node("arm", "--max-step", "100")
    actuator = processes.start_node("actuator", "--broker", broker.frontend, "--service", "flow", "--fps", "30",
                                    "--strategy", strategy, "--ttl", "1.0")
    commands, skipped = commands_for(8.0)
    assert actuator.poll() is None, "".join(actuator.log_lines)
    return commands, skipped


def jumps(run: tuple[list, float]) -> np.ndarray:
    """Per tick after the first chunk: how far each command's step is from the reference's step."""
    commands, skipped = run
    moving = [c for c in commands if not c.hold]
    after = commands[commands.index(moving[0]):]
    ticks = [c.tick for c in after]
    assert_every_tick(ticks, skipped)
    assert not any(c.hold for c in after), "the schedule ran dry"
    steps = np.diff(np.vstack([c.positions for c in after]), axis=0) - np.diff(f(ticks), axis=0)
    return np.abs(steps).max(axis=1)


def test_rtc_over_the_bus_switches_chunks_without_a_hold_or_a_jump(runtime_dir, processes):
    rtc = jumps(flow_robot(processes, "rtc"))
    processes.cleanup()
    replace = jumps(flow_robot(processes, "replace"))  # the same chunks, switched in at arrival
    # Each chunk is off by its own offset (std 2 per joint): replace jumps by it at every
    # switch; rtc's chunks agree with what ran and drift to their own over the overlap.
    assert rtc.max() < 1.5 and replace.max() > 2 * rtc.max(), (rtc.max(), replace.max())


def test_rtc_against_a_model_that_cannot_guide_is_one_error(runtime_dir, processes):
    from chunkbus.bus.lifecycle import EXIT_PERMANENT

    broker = start_broker(processes)
    start_worker(processes, broker.backend, "scripted:sine", "--service", "sine")
    processes.start_node("arm")
    actuator = processes.start(CHUNKBUS, "--log-json", "actuator", "--broker", broker.frontend, "--service", "sine",
                               "--strategy", "rtc", script=True)
    assert actuator.wait(timeout=60) == EXIT_PERMANENT
    time.sleep(0.2)
    log = "".join(actuator.log_lines)
    assert log.count("--strategy rtc needs a policy that can guide its chunks") == 1, log
    assert "use --strategy crossfade" in log
