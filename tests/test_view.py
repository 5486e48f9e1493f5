"""`chunkbus view --save`: a live local system and a recording of one, drawn into .rrd files
that Rerun's own reader loads back, with the values the bus carried."""

from __future__ import annotations

import subprocess
import warnings
from collections import defaultdict

import numpy as np
import pytest
from mdp_peers import CHUNKBUS, start_broker, start_worker

from chunkbus.bus.codec import decode
from chunkbus.nodes.camera import synthetic_seq
from chunkbus.nodes.tap import read_recording

POLICY = "scripted:sine?chunk=30&delay=0.05"


def rrd_entities(path) -> dict[str, list[dict]]:
    """Every row of every entity in a Rerun file, read by Rerun's own reader: {entity: [row]}."""
    import rerun as rr

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the reader is marked experimental
        store = rr.experimental.RrdReader(path).store()
        rows = defaultdict(list)
        for chunk in store.stream():
            columns = chunk.to_record_batch().to_pydict()
            for i in range(chunk.num_rows):
                rows[chunk.entity_path].append({name: values[i] for name, values in columns.items()})
    return rows


def by_tick(rows: list[dict]) -> dict[int, float]:
    return {row["tick"]: row["Scalars:scalars"][0] for row in rows if row.get("tick") is not None}


@pytest.fixture
def robot(processes):
    """A local system: broker, scripted worker, simulated arm, one synthetic camera, actuator."""
    broker = start_broker(processes)
    start_worker(processes, broker.backend, POLICY, "--service", "sine")
    processes.start_node("arm", "--max-step", "100")
    processes.start_node("camera", "--name", "front", "--fps", "15", "--width", "64", "--height", "48")
    processes.start_node("actuator", "--broker", broker.frontend, "--service", "sine", "--camera", "front",
                         "--fps", "30", "--strategy", "replace", "--ttl", "1.0", "--task", "wave")
    return broker


def check_drawing(rows: dict[str, list[dict]], commands: dict[int, np.ndarray] | None = None) -> None:
    """What a viewer must show of a run: camera pixels, each joint's state and command per tick,
    the chunks' predicted values at their ticks, the figures and the task."""
    frames = rows["/camera/front"]
    assert frames and all(row["tick"] is not None for row in frames[1:])
    pixels = np.frombuffer(bytes(frames[-1]["Image:buffer"][0]), np.uint8).reshape(48, 64, 3)
    assert synthetic_seq(pixels) >= 0  # the camera's own frame number, read back from the drawn pixels
    command = by_tick(rows["/arm/shoulder_pan.pos/command"])
    state = by_tick(rows["/arm/shoulder_pan.pos/state"])
    assert len(command) > 20 and len(state) > 20
    if commands is not None:  # tick by tick, the command drawn is the one sent
        shared = sorted(set(command) & set(commands))
        assert len(shared) > 20
        np.testing.assert_allclose([command[t] for t in shared], [commands[t][0] for t in shared], rtol=1e-6)
    chunks = [entity for entity in rows if entity.startswith("/arm/shoulder_pan.pos/chunk/")]
    assert chunks
    # In replace mode a chunk's action for a tick is what the actuator commands on that tick.
    first = by_tick(rows[chunks[0]])
    assert len(first) == 30
    later = sorted(set(first) & set(command))
    assert later and all(abs(first[t] - command[t]) < 1e-6 for t in later[:5])
    assert rows["/stats/actuator/rtt_p50_ms"] and rows["/stats/broker/sine/workers"]
    assert any("wave" in str(row) for row in rows["/task"])


def test_view_saves_a_live_system_as_rerun_reads_it(robot, tmp_path):
    output = tmp_path / "live.rrd"
    result = subprocess.run([CHUNKBUS, "view", "--save", str(output), "--duration", "4"], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    check_drawing(rrd_entities(output))


def test_view_draws_a_recording_tick_by_tick(robot, tmp_path):
    recording = tmp_path / "run.mcap"
    subprocess.run([CHUNKBUS, "tap", "record", str(recording), "--duration", "4"], capture_output=True, timeout=60,
                   check=True)
    output = tmp_path / "run.rrd"
    result = subprocess.run([CHUNKBUS, "view", str(recording), "--save", str(output)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    sent = {}
    for _topic, _, frames in read_recording(str(recording), ["command"]):
        message = decode(frames)
        sent[message.tick] = message.positions
    check_drawing(rrd_entities(output), sent)


def test_a_file_that_is_not_a_recording_is_named(tmp_path):
    bogus = tmp_path / "notes.mcap"
    bogus.write_text("not an mcap file")
    result = subprocess.run([CHUNKBUS, "view", str(bogus), "--save", str(tmp_path / "x.rrd")], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 1 and "notes.mcap" in result.stderr and "Traceback" not in result.stderr
