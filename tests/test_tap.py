"""The tap: record a running system, read it back, replay it byte for byte."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time
from collections import defaultdict

import pytest
import zmq
from helpers.publish import image_for, state_for
from mcap.reader import make_reader
from mdp_peers import CHUNKBUS, start_broker, start_worker

from chunkbus.bus import ArmState, decode
from chunkbus.bus.sockets import Publisher
from chunkbus.nodes.tap import FRAMES_ENCODING, info, read_recording, unpack_frames


@pytest.fixture
def running_system(processes):
    broker = start_broker(processes)
    start_worker(processes, broker.backend, "scripted:sine?chunk=30&delay=0.02", "--service", "sine")
    processes.start_node("camera", "--name", "front", "--fps", "20", "--width", "64", "--height", "48")
    processes.start_node("arm", "--rate", "30")
    processes.start_node("actuator", "--broker", broker.frontend, "--service", "sine",
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
    rows = {
        line.split()[0]: line.split() for line in result.stdout.splitlines() if line and not line.startswith("topic")
    }
    assert float(rows["camera/front"][1]) == pytest.approx(20, rel=0.3)


@pytest.fixture
def publisher(processes):
    """One node publishing `state` and raw `camera/front` frames at 100 Hz (helpers/publish.py)."""
    process = processes.helper("publish.py", "pub", "--rate", "100")
    processes.first_line_json(process)
    return process


def test_a_recording_is_zstd_compressed_and_reads_back_byte_for_byte(publisher, processes, tmp_path):
    out = tmp_path / "run.mcap"
    recorder = processes.start(CHUNKBUS, "tap", "record", str(out), "--duration", "2", script=True)
    assert recorder.wait(timeout=60) == 0, "".join(recorder.log_lines)
    with open(out, "rb") as f:
        reader = make_reader(f)
        chunks = reader.get_summary().chunk_indexes
        assert chunks and {c.compression for c in chunks} == {"zstd"}
        assert sum(c.compressed_size for c in chunks) < sum(c.uncompressed_size for c in chunks) / 2
        theirs = [(c.topic, m.log_time, unpack_frames(m.data)) for _, c, m in reader.iter_messages()]
    ours = list(read_recording(str(out)))  # the tap's own reader: replay and info use it
    assert ours == theirs and len(ours) > 100
    for topic, _, frames in ours:
        message = decode(frames)
        if topic == "state":
            assert (message.positions == state_for(message.seq)).all()
        else:
            assert (message.image == image_for(message.seq)).all()
    summary = info(str(out))
    assert summary["messages"] == len(ours) and set(summary["topics"]) == {"state", "camera/front"}


def test_record_says_how_fast_it_writes_and_how_well_it_compresses(publisher, processes, tmp_path):
    out = tmp_path / "run.mcap"
    recorder = processes.start(CHUNKBUS, "tap", "record", str(out), "--duration", "2.5", script=True)
    assert recorder.wait(timeout=60) == 0, "".join(recorder.log_lines)
    written = r"(\d+(\.\d)?) (kB|MB) written \((\d+\.\d) (kB|MB)/s, compressed to (\d+(?:\.\d)?)%\)"
    final = recorder.stdout.readline()
    match = re.search(rf"recorded (\d+) messages .* into {re.escape(str(out))}: {written}", final)
    assert match, final
    size = float(match[2]) * {"kB": 1e3, "MB": 1e6}[match[4]]
    assert size == pytest.approx(out.stat().st_size, rel=0.05)
    rate = float(match[5]) * {"kB": 1e3, "MB": 1e6}[match[6]]
    assert rate == pytest.approx(size / 2.5, rel=0.2)
    assert 0 < float(match[7]) < 50  # the helper's frames are flat colours: zstd shrinks them a lot
    progress = [line for line in recorder.log_lines if line.startswith(f"recording into {out}: ")]
    assert progress and any(re.search(written, line) for line in progress), progress


def test_an_output_name_without_mcap_gets_it(publisher, processes, tmp_path):
    recorder = processes.start(CHUNKBUS, "tap", "record", "run", "--duration", "1", script=True, cwd=tmp_path)
    assert recorder.wait(timeout=60) == 0, "".join(recorder.log_lines)
    assert not (tmp_path / "run").exists() and info(str(tmp_path / "run.mcap"))["messages"] > 0
    assert any("recording into run.mcap: MCAP recordings end in .mcap" in line for line in recorder.log_lines)
    assert "into run.mcap" in recorder.stdout.read()


@pytest.mark.parametrize("command", ["echo", "stats", "record"])
def test_no_publisher_is_a_clear_error_that_says_where_the_tap_looked(command, runtime_dir, tmp_path):
    args = [str(tmp_path / "run.mcap")] if command == "record" else []
    started = time.monotonic()
    result = subprocess.run([CHUNKBUS, "tap", command, *args], capture_output=True, text=True, timeout=60)
    assert time.monotonic() - started < 10
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"Error: no publishers found in {runtime_dir} (the runtime directory; set CHUNKBUS_RUNTIME_DIR to look "
        "elsewhere) within 3 s and no --connect endpoint given: is a node running on this host?"
    )
    assert not (tmp_path / "run.mcap").exists()


def test_only_stale_publishers_is_a_clear_error_that_names_them(runtime_dir):
    left_behind = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    left_behind.bind(str(runtime_dir / "camera.pub"))  # the socket file of a node that is gone
    left_behind.close()
    result = subprocess.run([CHUNKBUS, "tap", "echo"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"no running publishers found in {runtime_dir} (the runtime directory" in result.stderr
    assert "only the socket files of nodes that are gone (camera)" in result.stderr


def test_a_tap_started_before_the_nodes_waits_for_them(processes):
    echo = processes.start(CHUNKBUS, "--log-json", "tap", "echo", "--topic", "state", "--duration", "2",
                           script=True)
    processes.wait_log(echo, '"waiting for publishers"')
    time.sleep(0.5)
    with Publisher("pub") as publisher:  # in this process: it appears at once, however loaded the machine
        seq = 0
        while echo.poll() is None:
            publisher.publish("state", ArmState("arm", seq, time.monotonic(), ["j0"], state_for(seq)[:1]))
            seq += 1
            time.sleep(0.02)
    assert echo.returncode == 0, "".join(echo.log_lines)
    assert echo.stdout.readline().startswith("state: arm_state")
