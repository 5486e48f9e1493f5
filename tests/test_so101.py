"""The SO-101 driver: lerobot's own SO101Follower and FeetechMotorsBus, talking to an
emulated Feetech servo bus on a pseudo-terminal (tests/feetech_emulator.py)."""

from __future__ import annotations

import json
import subprocess
import time

import numpy as np
import pytest
from feetech_emulator import FeetechEmulator
from mdp_peers import CHUNKBUS

from chunkbus.bus import Command
from chunkbus.bus.sockets import Publisher, Subscriber
from chunkbus.launch.process import NodeError

MOTORS = ["shoulder_pan", "shoulder_lift", "elbow_flex", "wrist_flex", "wrist_roll", "gripper"]
JOINTS = [f"{m}.pos" for m in MOTORS]
CALIBRATION = {  # a plausible SO-101 calibration, as lerobot-calibrate writes it
    "shoulder_pan": dict(id=1, drive_mode=0, homing_offset=-1470, range_min=758, range_max=3292),
    "shoulder_lift": dict(id=2, drive_mode=0, homing_offset=157, range_min=612, range_max=3417),
    "elbow_flex": dict(id=3, drive_mode=0, homing_offset=1105, range_min=882, range_max=3066),
    "wrist_flex": dict(id=4, drive_mode=0, homing_offset=-2001, range_min=869, range_max=3183),
    "wrist_roll": dict(id=5, drive_mode=0, homing_offset=1587, range_min=0, range_max=4095),
    "gripper": dict(id=6, drive_mode=0, homing_offset=-1129, range_min=1993, range_max=3436),
}
MIDDLE = {m: (c["range_min"] + c["range_max"]) / 2 for m, c in CALIBRATION.items()}


def degrees(motor: str, raw: float) -> float:
    """lerobot's DEGREES normalisation of the body joints (its default for the SO-101)."""
    return (raw - MIDDLE[motor]) * 360 / 4095


@pytest.fixture
def calibration_dir(tmp_path):
    (tmp_path / "test_arm.json").write_text(json.dumps(CALIBRATION))
    return tmp_path


def arm_command(port: str, calibration_dir, *extra: str) -> list[str]:
    return [CHUNKBUS, "--log-json", "arm", "--driver", "so101", "--port", port, "--id", "test_arm",
            "--calibration-dir", str(calibration_dir), *extra]


def test_state_is_read_and_commands_are_written_through_lerobot(calibration_dir, processes):
    check_drives_the_arm(processes, lambda port: arm_command(port, calibration_dir, "--max-step", "5"))


def start_arm(processes, command: list[str]):
    """The arm node, once it is ready. A motor that does not answer lerobot's one ping at start is an
    exit 1, which `launch` restarts: the emulator, a thread of this test process, can answer late on a
    busy shared machine, so that one case is started once more, as launch would."""
    arm = processes.start(*command, script=True)
    try:
        arm.wait_ready(timeout=60)
    except NodeError:
        if arm.returncode != 1 or "motor check failed" not in "".join(arm.log_lines):
            raise
        arm = processes.start(*command, script=True)
        arm.wait_ready(timeout=60)
    return arm


def check_drives_the_arm(processes, command) -> None:
    """Start the arm node `command(port)` (with --max-step 5) on an emulated SO-101, and check
    that it reports the servos' positions and moves a servo as it is commanded."""
    with FeetechEmulator() as bus:
        bus.apply_calibration(CALIBRATION)
        bus.set_present_position(1, int(MIDDLE["shoulder_pan"] + 512))  # 45 degrees
        arm = start_arm(processes, command(bus.port))
        with Publisher("actuator") as publisher, Subscriber(["arm"], ["state"]) as states:
            state = states.wait("state", timeout=10).message
            assert state.names == JOINTS
            assert state.positions[0] == pytest.approx(degrees("shoulder_pan", MIDDLE["shoulder_pan"] + 512), abs=0.1)
            start = state.positions.astype(float)
            seq = 0
            while not any("commands arrive" in line for line in arm.log_lines):  # until connected
                publisher.publish("command", Command(seq, seq, time.monotonic(), JOINTS, start.astype(np.float32)))
                seq += 1
                time.sleep(0.05)
            target = start.copy()
            target[1] += 20.0  # shoulder_lift: 20 degrees, more than --max-step 5 in one command
            publisher.publish("command", Command(seq, seq, time.monotonic(), JOINTS, target.astype(np.float32)))
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                bus.settle()
                lifted = degrees("shoulder_lift", bus.goal_position(2))
                if lifted > start[1] + 1:
                    break
                time.sleep(0.02)
            # What lerobot wrote to the servo: one step of at most 5 degrees towards the target.
            assert lifted == pytest.approx(start[1] + 5, abs=0.2)
            after = states.wait("state", timeout=5, newer_than=states.latest("state").receive_time).message
            assert after.positions[1] == pytest.approx(start[1] + 5, abs=0.2)  # the emulated servo moved
    arm.terminate()
    arm.wait(timeout=10)


def test_a_missing_motor_is_a_clear_error(calibration_dir):
    with FeetechEmulator(ids=(1, 2, 4, 5, 6)) as bus:
        bus.apply_calibration(CALIBRATION)
        result = subprocess.run(arm_command(bus.port, calibration_dir), capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert f"cannot drive the so101 arm on {bus.port}" in result.stderr
    assert "Missing motor IDs" in result.stderr and "- 3" in result.stderr


def test_a_missing_calibration_says_how_to_make_one(tmp_path):
    with FeetechEmulator() as bus:
        result = subprocess.run(arm_command(bus.port, tmp_path), capture_output=True, text=True, timeout=60)
    assert result.returncode == 78  # permanent: `launch` does not restart it
    assert "no calibration for so101 arm 'test_arm'" in result.stderr
    assert f"lerobot-calibrate --robot.type=so101_follower --robot.port={bus.port} --robot.id=test_arm" in result.stderr


def test_a_missing_port_is_a_clear_error(calibration_dir):
    result = subprocess.run(arm_command("/dev/ttyNOPE", calibration_dir), capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "no serial port /dev/ttyNOPE: is the arm plugged in and powered?" in result.stderr


def test_a_motor_lost_mid_run_stops_the_node_with_a_clear_error(calibration_dir, processes):
    with FeetechEmulator() as bus:
        bus.apply_calibration(CALIBRATION)
        arm = processes.start(*arm_command(bus.port, calibration_dir), script=True)
        arm.wait_ready(timeout=60)
        bus.remove_motor(3)
        assert arm.wait(timeout=30) == 1
    line = processes.wait_log(arm, "the motor bus failed")
    assert "There is no status packet" in line
