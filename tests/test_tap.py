"""The tap: record a running system, read it back, replay it byte for byte."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections import defaultdict

import pytest
import zmq
from mcap.reader import make_reader

from chunkbus.bus import decode
from chunkbus.nodes.tap import FRAMES_ENCODING, info, read_recording, unpack_frames
from mdp_peers import CHUNKBUS, start_broker, start_worker


def start_node(processes, ready: str, *args: str):
    process = processes.start(CHUNKBUS, "--log-json", *args, script=True)
    processes.wait_log(process, f'"{ready}"', timeout=60)
    return process


@pytest.fixture
def running_system(processes):
    broker = start_broker(processes)
    start_worker(processes, broker.backend, "scripted:sine?chunk=30&delay=0.02", "--service", "sine")
    start_node(processes, "camera ready", "camera", "--name", "front", "--fps", "20", "--width", "64", "--height", "48")
    start_node(processes, "arm ready", "arm", "--rate", "30")
    start_node(processes, "actuator ready", "actuator", "--broker", broker.frontend, "--service", "sine",
               "--camera", "front", "--fps", "20")
    return broker


def test_a_recording_holds_every_published_message(running_system, processes, tmp_path):
    out = tmp_path / "run.mcap"
    recorder = processes.start(CHUNKBUS, "tap", "record", str(out), "--duration", "4", script=True)
    assert recorder.wait(timeout=60) == 0, "".join(recorder.log_lines)
    seqs = defaultdict(list)
    with open(out, "rb") as f:  # the official mcap reader reads it back, summary included
        reader = make_reader(f)
        summary = reader.get_summary()
        assert {c.message_encoding for c in summary.channels.values()} == {FRAMES_ENCODING}
        for _, channel, message in reader.iter_messages():
            decoded = decode(unpack_frames(message.data))
            seqs[channel.topic].append(getattr(decoded, "seq", None))
    assert {"camera/front", "state", "command", "broker/request/sine", "broker/reply/sine"} <= set(seqs)
    for topic in ("camera/front", "state", "command"):
        got = seqs[topic]
        # Every message between the first and the last recorded one, counted by the publishers' seq.
        assert got == list(range(got[0], got[0] + len(got))), topic
    assert len(seqs["camera/front"]) >= 40 and len(seqs["broker/reply/sine"]) >= 1


def test_replay_republishes_byte_identical_messages_at_the_recorded_rate(running_system, processes, tmp_path):
    out = tmp_path / "run.mcap"
    recorder = processes.start(CHUNKBUS, "tap", "record", str(out), "--duration", "2", "--topic", "camera/*",
                               script=True)
    assert recorder.wait(timeout=60) == 0
    recorded = list(read_recording(str(out)))
    assert recorded and {t for t, _, _ in recorded} == {"camera/front"}
    seen = []
    socket = zmq.Context.instance().socket(zmq.SUB)
    socket.setsockopt(zmq.SUBSCRIBE, b"camera/")
    socket.setsockopt(zmq.RCVHWM, 100_000)
    replayer = processes.start(CHUNKBUS, "tap", "replay", str(out), script=True)
    socket.connect("ipc://" + os.path.join(os.environ["CHUNKBUS_RUNTIME_DIR"], "replay.pub"))
    deadline = time.monotonic() + 30
    while len(seen) < len(recorded) and time.monotonic() < deadline:
        if socket.poll(200):
            seen.append((time.monotonic(), socket.recv_multipart()))
    socket.close(linger=0)
    assert replayer.wait(timeout=30) == 0
    assert len(seen) == len(recorded)
    for (_, frames), (topic, _, recorded_frames) in zip(seen, recorded):
        assert frames[0] == topic.encode() and frames[1:] == recorded_frames  # byte for byte
    recorded_span = (recorded[-1][1] - recorded[0][1]) / 1e9
    replayed_span = seen[-1][0] - seen[0][0]
    assert replayed_span == pytest.approx(recorded_span, rel=0.2)


def test_a_killed_recorder_leaves_a_readable_file(running_system, processes, tmp_path):
    out = tmp_path / "killed.mcap"
    recorder = processes.start(CHUNKBUS, "tap", "record", str(out), script=True)
    time.sleep(4)
    os.kill(recorder.pid, signal.SIGKILL)
    recorder.wait()
    summary = info(str(out))
    assert summary["messages"] > 20 and "camera/front" in summary["topics"]
    result = subprocess.run([CHUNKBUS, "tap", "info", str(out)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "camera/front" in result.stdout


def test_unreadable_files_and_unknown_topics_are_clear_errors(tmp_path):
    garbage = tmp_path / "garbage.mcap"
    garbage.write_bytes(b"not an mcap file at all")
    for args, message in [
        (["info", str(tmp_path / "missing.mcap")], "no recording"),
        (["info", str(garbage)], "is not an MCAP recording"),
        (["replay", str(garbage)], "is not an MCAP recording"),
    ]:
        result = subprocess.run([CHUNKBUS, "tap", *args], capture_output=True, text=True, timeout=60)
        assert result.returncode == 1 and message in result.stderr, result.stderr


def test_unknown_topic_in_replay_is_a_clear_error(running_system, processes, tmp_path):
    out = tmp_path / "run.mcap"
    assert processes.start(CHUNKBUS, "tap", "record", str(out), "--duration", "1", script=True).wait(timeout=60) == 0
    result = subprocess.run([CHUNKBUS, "tap", "replay", str(out), "--topic", "nothing/*"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "no messages on nothing/*" in result.stderr


def test_echo_and_stats_show_live_traffic(running_system):
    result = subprocess.run([CHUNKBUS, "tap", "echo", "--topic", "state", "--duration", "1.5"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    line = result.stdout.splitlines()[0]
    assert line.startswith("state: arm_state") and "names=['shoulder_pan.pos'" in line
    result = subprocess.run([CHUNKBUS, "tap", "stats", "--duration", "2.5"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    rows = {line.split()[0]: line.split() for line in result.stdout.splitlines() if line and not line.startswith("topic")}
    assert float(rows["camera/front"][1]) == pytest.approx(20, rel=0.3)
