"""Coming from LeRobot: the arm node takes any robot lerobot can make (`--driver lerobot
--robot-type TYPE` with its config's fields), and the camera node takes lerobot's RealSense
camera. The SO-101 runs on the emulated Feetech servo bus (tests/feetech_emulator.py)."""

from __future__ import annotations

import importlib.util
import json
import subprocess

import pytest
from feetech_emulator import FeetechEmulator
from mdp_peers import CHUNKBUS
from test_so101 import CALIBRATION, check_drives_the_arm

from chunkbus.bus.lifecycle import EXIT_PERMANENT
from chunkbus.nodes.arm import LerobotArm
from chunkbus.nodes.cli import main

LEROBOT = ["--driver", "lerobot", "--robot-type", "so101_follower"]


@pytest.fixture
def calibration_dir(tmp_path):
    (tmp_path / "test_arm.json").write_text(json.dumps(CALIBRATION))
    return tmp_path


def one_line_error(*args: str, status: int = EXIT_PERMANENT) -> str:
    """Run `chunkbus ARGS`, which must fail with one line of error and no traceback; that line.

    A configuration error is permanent (status 78: `launch` does not restart the node); a
    missing port or camera may be fixed by plugging it in (status 1: restarted)."""
    result = subprocess.run([CHUNKBUS, *args], capture_output=True, text=True, timeout=60)
    assert result.returncode == status, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    return lines[0].removeprefix("Error: ")


def test_the_so101_follower_robot_type_drives_the_arm(calibration_dir, processes):
    check_drives_the_arm(processes, lambda port: [
        CHUNKBUS, "--log-json", "arm", *LEROBOT, "--robot-option", f"port={port}", "--robot-option", "id=test_arm",
        "--robot-option", f"calibration_dir={calibration_dir}", "--max-step", "5",
    ])


def test_a_robot_config_file_drives_the_arm_and_options_override_it(calibration_dir, tmp_path, processes):
    config = tmp_path / "so101.json"

    def command(port: str) -> list[str]:  # a config as lerobot takes it, cameras and all
        config.write_text(json.dumps({
            "type": "so101_follower", "port": port, "id": "another_arm", "calibration_dir": str(calibration_dir),
            "cameras": {"front": {"type": "opencv", "index_or_path": 0, "width": 640, "height": 480, "fps": 30}},
        }))
        return [CHUNKBUS, "--log-json", "arm", "--driver", "lerobot", "--robot-config", str(config),
                "--id", "test_arm", "--max-step", "5"]

    check_drives_the_arm(processes, command)
    lines = "".join(processes.started[-1].log_lines)
    assert "the robot config's cameras are not used" in lines and '"front"' in lines


def test_options_are_read_as_yaml_except_for_text_fields(tmp_path):
    config = tmp_path / "so101.yaml"
    config.write_text("type: so101_follower\nport: /dev/ttyACM0\nuse_degrees: false\nmax_relative_target: 3\n")
    robot_type, robot = LerobotArm.make_config(None, str(config), {"id": "007", "max_relative_target": "5",
                                                                    "disable_torque_on_disconnect": "false"})
    assert robot_type == "so101_follower"
    assert robot.port == "/dev/ttyACM0" and robot.id == "007" and robot.cameras == {}
    assert robot.use_degrees is False and robot.disable_torque_on_disconnect is False
    assert robot.max_relative_target == 5.0


def test_a_robot_without_a_bus_has_no_joint_limits_but_is_driven(tmp_path):
    """bi_so_follower (two SO arms, each with its own bus, none on the robot): nested
    config fields as YAML flow mappings; its actions get no limits (--max-step still applies)."""
    for side in ("left", "right"):
        (tmp_path / f"pair_{side}.json").write_text(json.dumps(CALIBRATION))
    with FeetechEmulator() as left, FeetechEmulator() as right:
        for bus in (left, right):
            bus.apply_calibration(CALIBRATION)
        arm = LerobotArm("bi_so_follower", None, {
            "left_arm_config": f"{{port: {left.port}}}", "right_arm_config": f"{{port: {right.port}}}",
            "id": "pair", "calibration_dir": str(tmp_path),
        })
        try:
            assert arm.names[0] == "left_shoulder_pan.pos" and len(arm.names) == 12
            assert arm.limits.tolist() == [[-float("inf"), float("inf")]] * 12
            target = arm.read()
            target[7] += 5.0  # right_shoulder_lift
            arm.write(target)
            right.settle()
            assert arm.read()[7] == pytest.approx(target[7], abs=0.2)
        finally:
            arm.close()


def test_an_unknown_robot_type_lists_the_known_ones():
    error = one_line_error("arm", "--driver", "lerobot", "--robot-type", "so102_follower")
    assert error.startswith("lerobot has no robot type 'so102_follower'; the known ones are: ")
    assert "so100_follower, so101_follower" in error and "koch_follower" in error


def test_an_unknown_field_is_named_with_the_valid_ones():
    error = one_line_error("arm", *LEROBOT, "--robot-option", "prot=/dev/ttyACM0")
    assert error.startswith("so101_follower has no field 'prot'; its fields are: port, ")
    assert "id, calibration_dir" in error


def test_a_wrong_value_type_names_the_field():
    error = one_line_error("arm", *LEROBOT, "--port", "/dev/ttyACM0", "--robot-option", "use_degrees=maybe")
    assert error == "bad value for so101_follower field use_degrees: Couldn't parse 'maybe' into a bool"


def test_a_wrong_value_type_in_a_config_file_names_the_field(tmp_path):
    config = tmp_path / "so101.yaml"
    config.write_text("port: /dev/ttyACM0\nposition_p_coefficient: 1.5\n")
    error = one_line_error("arm", *LEROBOT, "--robot-config", str(config))
    assert error == "bad value for so101_follower field position_p_coefficient: Couldn't parse '1.5' into an int"


def test_a_missing_required_field_says_how_to_give_it():
    error = one_line_error("arm", *LEROBOT, "--robot-option", "id=test_arm")
    assert error == ("so101_follower needs port: give --robot-option port=VALUE "
                     "(find the arm's port with `lerobot-find-port`)")


def test_a_config_file_for_another_robot_type_is_refused(tmp_path):
    config = tmp_path / "koch.yaml"
    config.write_text("type: koch_follower\nport: /dev/ttyACM0\n")
    error = one_line_error("arm", *LEROBOT, "--robot-config", str(config))
    assert error == f"the robot config {config} is for robot type 'koch_follower', not 'so101_follower'"


def test_a_missing_serial_port_says_how_to_find_it():
    error = one_line_error("arm", *LEROBOT, "--robot-option", "port=/dev/ttyNOPE", "--robot-option", "id=test_arm",
                           status=1)
    assert error == ("no serial port /dev/ttyNOPE: is the arm plugged in and powered? "
                     "Find its port with `lerobot-find-port`.")


def test_a_missing_calibration_gives_the_command_that_makes_it(tmp_path):
    with FeetechEmulator() as bus:
        error = one_line_error("arm", *LEROBOT, "--robot-option", f"port={bus.port}", "--robot-option", "id=my_arm",
                               "--calibration-dir", str(tmp_path))
    assert error == (
        f"no calibration for so101_follower arm 'my_arm' (looked for {tmp_path}/my_arm.json). Make one with "
        f"`lerobot-calibrate --robot.type=so101_follower --robot.port={bus.port} --robot.id=my_arm "
        f"--robot.calibration_dir={tmp_path}`"
    )


@pytest.mark.skipif(importlib.util.find_spec("reachy2_sdk") is not None, reason="reachy2_sdk is installed")
def test_a_robot_whose_sdk_is_missing_says_what_to_install():
    error = one_line_error("arm", "--driver", "lerobot", "--robot-type", "reachy2")
    assert error.startswith("lerobot cannot make the reachy2 robot: 'reachy2_sdk' is required but not installed.")


def test_lerobot_options_need_the_lerobot_driver():
    result = subprocess.run([CHUNKBUS, "arm", "--robot-type", "so101_follower"], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 2
    assert "Error: --robot-type, --robot-option and --robot-config need --driver lerobot" in result.stderr


@pytest.mark.skipif(importlib.util.find_spec("pyrealsense2") is not None, reason="pyrealsense2 is installed")
@pytest.mark.parametrize("device", ["0123456789", "Intel RealSense D405"])
def test_a_realsense_camera_without_pyrealsense2_says_what_to_install(device):
    error = one_line_error("camera", "--name", "wrist", "--source", f"realsense:{device}", status=1)
    assert error == ("RealSense cameras need pyrealsense2, which is not installed: `pip install pyrealsense2` "
                     "(or lerobot's extra: `pip install 'lerobot[intelrealsense]'`)")


@pytest.mark.parametrize("command", ["arm", "camera"])
def test_every_option_has_help_and_repeatable_ones_say_so(command):
    for option in main.commands[command].params:
        assert option.help, option.name
        assert option.multiple == ("(repeatable)" in option.help), option.name
