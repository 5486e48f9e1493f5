"""`chunkbus arm`: the one process that owns the motor bus.

It publishes `state` at a fixed rate and applies the newest `command` after its safety
layer: targets are clamped to the joint limits and to the largest step per command, and
when commands stop for --hold-after seconds the arm holds where it is. The actuator
decides what to send; this node decides whether it is safe to send it.
"""

from __future__ import annotations

import itertools
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from chunkbus.bus.log import get_logger
from chunkbus.bus.messages import ArmState, Command
from chunkbus.bus.sockets import Publisher, Subscriber
from chunkbus.bus.ticker import Ticker

# lerobot's SO-100/101 joints, in its normalised units: -100..100, the gripper 0..100.
SO101_JOINTS = ("shoulder_pan", "shoulder_lift", "elbow_flex", "wrist_flex", "wrist_roll", "gripper")
SO101_LIMITS = [(-100.0, 100.0)] * 5 + [(0.0, 100.0)]


class SimArm:
    """A simulated arm: each joint follows its target with a first-order lag and a speed
    limit. Deterministic: it moves only when step(dt) is called."""

    def __init__(self, joints=SO101_JOINTS, time_constant: float = 0.05, max_speed: float = 200.0):
        self.names = [f"{joint}.pos" for joint in joints]
        self.limits = np.array(SO101_LIMITS if tuple(joints) == SO101_JOINTS else [(-100.0, 100.0)] * len(joints))
        self.positions = np.clip(np.zeros(len(joints)), self.limits[:, 0], self.limits[:, 1])
        self.target = self.positions.copy()
        self.time_constant, self.max_speed = time_constant, max_speed

    def read(self) -> np.ndarray:
        return self.positions.copy()

    def write(self, target: np.ndarray) -> None:
        self.target = target.copy()

    def step(self, dt: float) -> None:
        move = (self.target - self.positions) * (1 - np.exp(-dt / self.time_constant))
        limit = self.max_speed * dt
        self.positions = self.positions + np.clip(move, -limit, limit)

    def close(self) -> None:
        pass


class ArmError(RuntimeError):
    """An arm that cannot be used; the text says what is wrong and how to fix it."""


NORM_LIMITS = {"range_m100_100": (-100.0, 100.0), "range_0_100": (0.0, 100.0), "degrees": (-180.0, 180.0)}
# Each arm's lerobot module: importing it registers the arm's config class.
LEROBOT_ARMS = {"so101": "lerobot.robots.so_follower", "so100": "lerobot.robots.so_follower",
                "koch": "lerobot.robots.koch_follower"}


class LerobotArm:
    """An arm driven by lerobot's own robot class (SO-100/101, Koch), without cameras."""

    def __init__(self, kind: str, port: str, robot_id: str, calibration_dir: str | None = None):
        import importlib

        from lerobot.robots import RobotConfig
        from lerobot.robots.utils import make_robot_from_config

        importlib.import_module(LEROBOT_ARMS[kind])
        if not Path(port).exists():
            raise ArmError(
                f"no serial port {port}: is the arm plugged in and powered? Find its port with `lerobot-find-port`."
            )
        config = RobotConfig.get_choice_class(f"{kind}_follower")(
            port=port, id=robot_id, calibration_dir=Path(calibration_dir) if calibration_dir else None, cameras={}
        )
        self.robot = make_robot_from_config(config)
        calibration = self.robot.calibration_fpath
        if not calibration.is_file():
            raise ArmError(
                f"no calibration for {kind} arm {robot_id!r} (looked for {calibration}). Make one with "
                f"`lerobot-calibrate --robot.type={kind}_follower --robot.port={port} --robot.id={robot_id}`"
                + (f" --robot.calibration_dir={calibration_dir}" if calibration_dir else "")
            )
        try:
            self.robot.connect(calibrate=False)  # never ask questions on a terminal nobody watches
            if not self.robot.is_calibrated:
                self.robot.bus.write_calibration(self.robot.calibration)  # the file is the truth
        except Exception as exc:
            try:  # lerobot leaves the port open when a motor check fails
                if self.robot.bus.is_connected:
                    self.robot.bus.disconnect(disable_torque=False)
            except Exception:
                pass
            raise ArmError(f"cannot drive the {kind} arm on {port}: {str(exc).strip()}") from exc
        self.names = list(self.robot.action_features)
        self.limits = np.array([NORM_LIMITS[motor.norm_mode.value] for motor in self.robot.bus.motors.values()])

    def read(self) -> np.ndarray:
        observation = self.robot.get_observation()
        return np.array([observation[name] for name in self.names], dtype=float)

    def write(self, target: np.ndarray) -> None:
        self.robot.send_action(dict(zip(self.names, target.tolist())))

    def close(self) -> None:
        try:
            self.robot.disconnect()
        except Exception as exc:
            get_logger().warning("the arm did not disconnect cleanly", error=str(exc))


@dataclass
class Safety:
    """Clamps targets to the joint limits and each command's step to `max_step`."""

    limits: np.ndarray  # (joints, 2): low, high
    max_step: float
    clamped: int = 0  # commands that were changed

    def apply(self, target: np.ndarray, reference: np.ndarray) -> np.ndarray:
        safe = np.clip(target, self.limits[:, 0], self.limits[:, 1])
        safe = reference + np.clip(safe - reference, -self.max_step, self.max_step)
        if not np.array_equal(safe, target):
            self.clamped += 1
        return safe


class ArmNode:
    def __init__(self, driver, name: str, rate: float, hold_after: float, max_step: float, commands_from: list[str]):
        self.driver, self.name, self.rate, self.hold_after = driver, name, rate, hold_after
        self.safety = Safety(driver.limits, max_step)
        self.log = get_logger()
        self.publisher = Publisher(name)
        self.commands = Subscriber(commands_from, ["command"])
        self.stop_event = threading.Event()
        self.applied_seq = -1
        self.rejected = 0
        self.holding = True  # until the first command

    def stop(self) -> None:
        self.stop_event.set()

    def run(self) -> None:
        ticker = Ticker(self.rate)
        target = self.driver.read()
        last_command = 0.0
        self.log.info("arm ready", joints=self.driver.names, rate=self.rate, endpoints=self.publisher.endpoints)
        try:
            for seq in itertools.count():
                if self.stop_event.is_set():
                    break
                ticker.wait()
                now = time.monotonic()
                received = self.commands.latest("command")
                if received is not None and received.message.seq != self.applied_seq:
                    command: Command = received.message
                    self.applied_seq = command.seq
                    if self.check(command):
                        target = self.safety.apply(np.asarray(command.positions, float), target)
                        self.driver.write(target)
                        last_command = now
                        if self.holding:
                            self.log.info("commands arrive: moving")
                            self.holding = False
                if not self.holding and now - last_command > self.hold_after:
                    target = self.driver.read()
                    self.driver.write(target)
                    self.holding = True
                    self.log.warning("no commands: holding position", silent_s=round(now - last_command, 2))
                if hasattr(self.driver, "step"):
                    self.driver.step(1.0 / self.rate)
                positions = self.driver.read().astype(np.float32)
                self.publisher.publish("state", ArmState(self.name, seq, now, self.driver.names, positions))
        finally:
            self.commands.close()
            self.publisher.close()
            self.driver.close()
            self.log.info("arm stopped", clamped=self.safety.clamped, rejected=self.rejected)

    def check(self, command: Command) -> bool:
        if list(command.names) != self.driver.names or command.positions.shape != (len(self.driver.names),):
            self.rejected += 1
            if self.rejected % 100 == 1:  # the first, then every 100th: commands come at the tick rate
                self.log.error(
                    "command ignored: its joints do not match the arm's", command_joints=list(command.names),
                    arm_joints=self.driver.names, values=int(command.positions.size), rejected=self.rejected,
                )
            return False
        return True


def serve(driver, name: str, rate: float, hold_after: float, max_step: float, commands_from: list[str]) -> None:
    node = ArmNode(driver, name, rate, hold_after, max_step, commands_from)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: node.stop())
    try:
        node.run()
    except Exception as exc:  # the motor bus failed mid-run: say so plainly, and exit non-zero
        node.log.error("the motor bus failed: stopping (a launch file restarts this node by its policy)",
                       error=f"{type(exc).__name__}: {exc}")
        raise SystemExit(1) from None
