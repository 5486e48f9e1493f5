"""`chunkbus arm`: the one process that owns the motor bus.

It publishes `state` at a fixed rate and applies the newest `command` after its safety
layer: targets are clamped to the joint limits and to the largest step per command, and
when commands stop for --hold-after seconds the arm holds where it is. The actuator
decides what to send; this node decides whether it is safe to send it.

Drivers: `sim` (SimArm), or any robot lerobot can make (LerobotArm), from its type and its
config's fields: `--driver lerobot --robot-type so101_follower --robot-option port=...`.
`--driver so101|so100|koch` are shortcuts for the lerobot types so101_follower,
so100_follower and koch_follower.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np

from ..bus.endpoints import COMMAND, STATE
from ..bus.lifecycle import announce_ready, run_node
from ..bus.log import Every, get_logger
from ..bus.messages import ArmState, Command
from ..bus.sockets import Publisher, Subscriber
from ..bus.ticker import Ticker

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


class ArmConfigError(ArmError):
    """An arm that is configured wrongly (its type, fields, calibration): no restart fixes it.
    (A missing port or a silent motor may be fixed by plugging in: those are ArmErrors.)"""


NORM_LIMITS = {"range_m100_100": (-100.0, 100.0), "range_0_100": (0.0, 100.0), "degrees": (-180.0, 180.0)}
UNBOUNDED = (-np.inf, np.inf)  # an action that is not a motor position on the robot's bus
# The named shortcuts of `--driver`: each is one of lerobot's robot types.
LEROBOT_ARMS = {"so101": "so101_follower", "so100": "so100_follower", "koch": "koch_follower"}


def _one_line(error) -> str:
    return " ".join(str(error).split())


class LerobotArm:
    """A robot driven by its own lerobot class, made from its lerobot config, without cameras
    (chunkbus runs each camera as a node of its own).

    Joint limits come from the norm mode of each motor on the robot's `.bus` (SO-100/101,
    Koch, ...). An action that is not a motor position on a `.bus` (a robot without one, such
    as a bimanual pair, or a mobile base's velocities) gets no limit here: only --max-step
    bounds it, beside lerobot's own checks. The calibration file is required for robots with
    a `.bus`; the others calibrate as their lerobot class does.
    """

    @staticmethod
    def robot_types() -> list[str]:
        """Every robot type lerobot can make. As in lerobot's own scripts, importing its robot
        packages (and installed lerobot_robot_* plugins) registers their config classes."""
        import importlib
        import pkgutil

        import lerobot.robots
        from lerobot.utils.import_utils import register_third_party_plugins

        for module in pkgutil.iter_modules(lerobot.robots.__path__):
            if module.ispkg:
                importlib.import_module(f"lerobot.robots.{module.name}")
        register_third_party_plugins()
        return sorted(lerobot.robots.RobotConfig.get_known_choices())

    @staticmethod
    def make_config(robot_type: str | None, config_file: str | None = None, options: dict[str, str] | None = None):
        """The robot type and lerobot's config for it: the fields in `config_file` (YAML or JSON,
        `type` allowed), overridden by `options` (text: read as YAML, except for text fields)."""
        import dataclasses
        import typing

        import draccus
        import yaml
        from draccus.utils import DecodingError
        from lerobot.robots import RobotConfig

        values = {}
        if config_file:
            try:
                values = yaml.safe_load(Path(config_file).read_text()) or {}
            except OSError as exc:
                raise ArmConfigError(f"cannot read the robot config {config_file}: {exc.strerror}") from None
            except yaml.YAMLError as exc:
                raise ArmConfigError(f"the robot config {config_file} is not YAML or JSON: {_one_line(exc)}") from None
            if not isinstance(values, dict):
                raise ArmConfigError(f"the robot config {config_file} must map the config's fields to values, "
                               "e.g. port: /dev/ttyACM0")
        file_type = values.pop("type", None)
        if robot_type and file_type and file_type != robot_type:
            raise ArmConfigError(f"the robot config {config_file} is for robot type {file_type!r}, not {robot_type!r}")
        robot_type = robot_type or file_type
        known = LerobotArm.robot_types()
        if not robot_type:
            raise ArmConfigError(f"no robot type: give --robot-type (or `type:` in --robot-config), one of: "
                           f"{', '.join(known)}")
        if robot_type not in known:
            raise ArmConfigError(f"lerobot has no robot type {robot_type!r}; the known ones are: {', '.join(known)}")
        cls = RobotConfig.get_choice_class(robot_type)
        try:
            hints = typing.get_type_hints(cls)
        except Exception:
            hints = {}
        for key, text in (options or {}).items():
            kinds = set(typing.get_args(hints.get(key))) or {hints.get(key)}
            values[key] = text if kinds <= {str, Path, type(None)} else yaml.safe_load(text)  # an id stays "007"
        if cameras := values.pop("cameras", None):
            get_logger().warning("the robot config's cameras are not used: run a `chunkbus camera` node for each",
                                 cameras=list(cameras) if isinstance(cameras, dict) else cameras)
        fields = [field for field in dataclasses.fields(cls) if field.init]
        if unknown := [key for key in values if key not in {field.name for field in fields}]:
            raise ArmConfigError(f"{robot_type} has no field {', '.join(map(repr, unknown))}; "
                           f"its fields are: {', '.join(field.name for field in fields)}")
        missing = [field.name for field in fields if field.name not in values
                   and field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING]
        if missing:
            raise ArmConfigError(f"{robot_type} needs {', '.join(missing)}: give --robot-option {missing[0]}=VALUE"
                           + (" (find the arm's port with `lerobot-find-port`)" if "port" in missing else ""))
        if any(field.name == "cameras" for field in fields):
            values["cameras"] = {}
        try:
            return robot_type, draccus.decode(cls, values)
        except DecodingError as exc:
            field = ".".join(exc.key_path)
            raise ArmConfigError(f"bad value for {robot_type} field {field}: {_one_line(exc.message)}") from None
        except (TypeError, ValueError) as exc:  # the config's own checks
            raise ArmConfigError(f"invalid {robot_type} config: {_one_line(exc)}") from None

    def __init__(self, robot_type: str | None, config_file: str | None = None, options: dict[str, str] | None = None,
                 name: str | None = None):
        """Make and connect the robot that make_config describes; `name` names it in messages."""
        from lerobot.motors.motors_bus import SerialMotorsBus
        from lerobot.robots import make_robot_from_config

        robot_type, config = self.make_config(robot_type, config_file, options)  # config.type may be an alias
        name = name or robot_type
        port = getattr(config, "port", None)
        try:
            self.robot = make_robot_from_config(config)
        except Exception as exc:  # e.g. its SDK is not installed
            raise ArmConfigError(f"lerobot cannot make the {name} robot: {_one_line(exc)}") from None
        bus = getattr(self.robot, "bus", None)
        if isinstance(bus, SerialMotorsBus) and not Path(bus.port).exists():
            raise ArmError(
                f"no serial port {bus.port}: is the arm plugged in and powered? Find its port with `lerobot-find-port`."
            )
        calibration = self.robot.calibration_fpath
        if bus is not None and not calibration.is_file():
            command = f"lerobot-calibrate --robot.type={robot_type}" + "".join(
                f" --robot.{key}={value}" for key, value in
                [("port", port), ("id", config.id), ("calibration_dir", config.calibration_dir)] if value
            )
            raise ArmConfigError(f"no calibration for {name} arm {config.id!r} (looked for {calibration}). "
                           f"Make one with `{command}`")
        try:
            self.robot.connect(calibrate=False)  # never ask questions on a terminal nobody watches
            if bus is not None and not self.robot.is_calibrated:
                bus.write_calibration(self.robot.calibration)  # the file is the truth
        except Exception as exc:
            try:  # lerobot leaves the port open when a motor check fails
                if bus is not None and bus.is_connected:
                    bus.disconnect(disable_torque=False)
            except Exception:
                pass
            raise ArmError(f"cannot drive the {name} arm{f' on {port}' if port else ''}: {str(exc).strip()}") from exc
        self.names = list(self.robot.action_features)
        motors = bus.motors if bus is not None else {}
        self.limits = np.array([
            NORM_LIMITS.get(motors[motor].norm_mode.value, UNBOUNDED) if action.endswith(".pos") and motor in motors
            else UNBOUNDED
            for action in self.names for motor in [action.removesuffix(".pos")]
        ])
        if unbounded := [action for action, (low, _) in zip(self.names, self.limits) if low == -np.inf]:
            get_logger().warning("no joint limits for these actions (not motors on the robot's bus): "
                                 "only --max-step bounds them", actions=unbounded)

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


class Safety:
    """Clamps targets to the joint limits and each command's step to `max_step`, and keeps
    count of why, per joint, so the arm can say what the policy asks for that it refuses."""

    def __init__(self, names: list[str], limits: np.ndarray, max_step: float):
        self.joints = [name.removesuffix(".pos") for name in names]
        self.limits = limits  # (joints, 2): low, high
        self.max_step = max_step
        self.commands = 0
        self.clamped = 0  # commands that were changed
        self.below = np.zeros(len(names), int)  # per joint: targets below its low limit
        self.above = np.zeros(len(names), int)
        self.too_far = np.zeros(len(names), int)  # steps larger than max_step

    def apply(self, target: np.ndarray, reference: np.ndarray) -> np.ndarray:
        self.commands += 1
        low, high = self.limits[:, 0], self.limits[:, 1]
        below, above = target < low, target > high
        step = np.clip(target, low, high) - reference
        too_far = np.abs(step) > self.max_step
        if below.any() or above.any() or too_far.any():
            self.clamped += 1
            self.below += below
            self.above += above
            self.too_far += too_far
        return reference + np.clip(step, -self.max_step, self.max_step)

    def explain(self) -> str:
        """E.g. "1573 of 1574 commands clamped: the policy asks for gripper values below its
        limit (0), and for shoulder_lift steps larger than --max-step (10)"."""
        if not self.clamped:
            return f"0 of {self.commands} commands clamped"
        reasons = []
        for j, joint in enumerate(self.joints):
            low, high = self.limits[j]
            reasons += [(self.below[j], f"{joint} values below its limit ({low:g})"),
                        (self.above[j], f"{joint} values above its limit ({high:g})"),
                        (self.too_far[j], f"{joint} steps larger than --max-step ({self.max_step:g})")]
        top = [text for count, text in sorted(reasons, key=lambda r: -r[0]) if count][:2]
        return f"{self.clamped} of {self.commands} commands clamped: the policy asks for " + ", and for ".join(top)


class ArmNode:
    def __init__(self, driver, name: str, rate: float, hold_after: float, max_step: float, commands_from: list[str]):
        self.driver, self.name, self.rate, self.hold_after = driver, name, rate, hold_after
        self.safety = Safety(driver.names, driver.limits, max_step)
        self.log = get_logger()
        self.publisher = Publisher(name)
        self.commands = Subscriber(commands_from, [COMMAND])
        self.stop_event = threading.Event()
        self.applied_seq = -1
        self.rejected = 0
        self.holding = True  # until the first command
        self.seq = 0  # of the state messages
        self.explain_clamping = Every(10.0, first_after=3.0)  # a few seconds of commands say more than one
        self.said_clamped = 0

    def stop(self) -> None:
        self.stop_event.set()

    def run(self) -> None:
        ticker = Ticker(self.rate)
        target = self.driver.read()
        last_command = 0.0
        announce_ready(self.log, "arm", joints=self.driver.names, rate=self.rate, endpoints=self.publisher.endpoints)
        try:
            while not self.stop_event.is_set():
                ticker.wait()
                now = time.monotonic()
                received = self.commands.latest(COMMAND)
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
                    target = self.hold()
                    self.log.warning("no commands: holding position", silent_s=round(now - last_command, 2))
                if self.safety.clamped > self.said_clamped and self.explain_clamping(now):
                    self.said_clamped = self.safety.clamped
                    self.log.warning(self.safety.explain())
                if hasattr(self.driver, "step"):
                    self.driver.step(1.0 / self.rate)
                self.publish_state(now)
        finally:
            try:  # whatever stopped this node, the arm is left holding where it is
                self.hold()
                self.publish_state(time.monotonic())
            except Exception as exc:
                self.log.error("could not hold the arm while stopping", error=f"{type(exc).__name__}: {exc}")
            self.commands.close()
            self.publisher.close()
            self.driver.close()
            self.log.info("arm stopped, holding", clamping=self.safety.explain(), rejected=self.rejected)

    def hold(self) -> np.ndarray:
        """Command the arm to stay where it is now; returns that target."""
        target = self.driver.read()
        self.driver.write(target)
        self.holding = True
        return target

    def publish_state(self, now: float) -> None:
        positions = self.driver.read().astype(np.float32)
        self.publisher.publish(STATE, ArmState(self.name, self.seq, now, self.driver.names, positions, self.holding))
        self.seq += 1

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
    try:
        run_node(node)
    except Exception as exc:  # the motor bus failed mid-run: say so plainly, and exit non-zero
        node.log.error("the motor bus failed: stopping (a launch file restarts this node by its policy)",
                       error=f"{type(exc).__name__}: {exc}")
        raise SystemExit(1) from None
