"""Stopping is a safety property: however the launcher ends, its nodes stop and the arm holds.

Each test runs a real robot (broker, scripted worker, simulated arm, actuator) under `launch`,
waits until the actuator moves the arm, ends the launcher one way, and checks that no node
is left running and that the arm's last published state says it holds.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from mdp_peers import wait_for
from test_launch import LAUNCH, alive, scripted_robot

from chunkbus.bus.lifecycle import ORPHAN_GRACE
from chunkbus.bus.sockets import Subscriber


def children(pid: int) -> list[int]:
    """The processes `pid` started (Linux's /proc)."""
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(child) for child in (task / "children").read_text().split()]
        except OSError:
            pass
    return found


class Robot:
    """A launcher running a scripted robot, the arm's states and the actuator's commands as they pass."""

    def __init__(self, tmp_path: Path, stdout):
        path = scripted_robot(tmp_path)  # broker, scripted worker, simulated arm, actuator
        self.states, self.commands = [], []
        self._subscribers = [
            Subscriber(["arm"], ["state"], on_message=self.states.append, rcvhwm=10_000),
            Subscriber(["actuator"], ["command"], on_message=self.commands.append, rcvhwm=10_000),
        ]
        self.launcher = subprocess.Popen([LAUNCH, str(path)], stdout=stdout, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        self.nodes: list[int] = []

    def wait_moving(self) -> None:
        wait_for(lambda: sum(not r.message.holding for r in self.states) > 20
                 and sum(not r.message.hold for r in self.commands) > 20, timeout=90, what="the arm moving")
        self.nodes = children(self.launcher.pid)
        assert len(self.nodes) == 4, self.nodes

    def running(self) -> list[str]:
        """The nodes still running: pid, state and command line (what a failure says)."""
        found = []
        for pid in self.nodes:
            if alive(pid):
                try:
                    command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
                    state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
                except OSError:
                    continue
                found.append(f"{pid} ({state}) {command}")
        return found

    def assert_all_stopped(self, within: float = 10.0) -> None:
        try:
            wait_for(lambda: not self.running(), timeout=within, what="every node to stop")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; still running: {self.running()}") from None
        # The arm's last message may still be on its way to this (busy) test process: wait for it.
        wait_for(lambda: self.states[-1].message.holding, timeout=3.0, what="the arm's last state saying it holds")
        assert any(not r.message.holding for r in self.states), "the arm never moved"

    def close(self) -> None:
        for subscriber in self._subscribers:
            subscriber.close()
        for pid in [self.launcher.pid, *self.nodes]:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        self.launcher.wait(timeout=10)


@pytest.fixture
def robot_under(tmp_path, runtime_dir):
    started = []

    def start(stdout=subprocess.DEVNULL) -> Robot:
        started.append(Robot(tmp_path, stdout))
        return started[-1]

    yield start
    for robot in started:
        robot.close()


def test_ctrl_c_through_a_pipe_whose_reader_exited_stops_every_node(robot_under):
    # `launch robot.yaml | head -n 3`: the reader is gone long before Ctrl-C comes.
    reader = subprocess.Popen(["head", "-n", "3"], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
    try:
        robot = robot_under(stdout=reader.stdin)
        reader.stdin.close()  # only the launcher holds the pipe's writing end now
        assert reader.wait(timeout=60) == 0
        robot.wait_moving()  # the launcher went on relaying into the closed pipe meanwhile
        robot.launcher.send_signal(signal.SIGINT)
        assert robot.launcher.wait(timeout=30) == 0  # it stopped its nodes itself, cleanly
        robot.assert_all_stopped()
    finally:
        reader.kill()
        reader.wait()


def test_sighup_to_the_launcher_stops_every_node(robot_under):
    robot = robot_under()
    robot.wait_moving()
    robot.launcher.send_signal(signal.SIGHUP)  # the terminal or SSH session went away
    assert robot.launcher.wait(timeout=30) == 0
    robot.assert_all_stopped()


def test_sigkill_of_the_launcher_stops_every_node(robot_under):
    robot = robot_under()
    robot.wait_moving()
    robot.launcher.kill()  # nothing of the launcher runs: the nodes notice by themselves
    robot.launcher.wait(timeout=10)
    # They get SIGTERM at once (parent-death signal) and stop in about a second; the bound is
    # past an orphan's own deadline (ORPHAN_GRACE, 10 s), which ends it whatever it is doing.
    robot.assert_all_stopped(within=ORPHAN_GRACE + 2)


WATCHED = "from chunkbus.bus.lifecycle import follow_launcher; import time; follow_launcher(); time.sleep(30)"


@pytest.mark.parametrize("launcher_is_parent", [True, False])
def test_the_portable_watch_stops_a_node_whose_launcher_is_gone(launcher_is_parent):
    # Without the parent-death signal's help: a parent that is not the launcher named in the
    # environment is what an orphan sees (its launcher died before it started watching).
    launcher = os.getpid() if launcher_is_parent else 1
    node = subprocess.Popen([sys.executable, "-c", WATCHED], env={**os.environ, "CHUNKBUS_LAUNCHER_PID": str(launcher)})
    try:
        if launcher_is_parent:
            with pytest.raises(subprocess.TimeoutExpired):
                node.wait(timeout=3)  # its launcher lives: it runs on
        else:
            assert node.wait(timeout=5) == -signal.SIGTERM
    finally:
        node.kill()
        node.wait()


def test_a_node_started_by_hand_ignores_the_watch():
    env = {k: v for k, v in os.environ.items() if k != "CHUNKBUS_LAUNCHER_PID"}
    node = subprocess.Popen([sys.executable, "-c", WATCHED.replace("time.sleep(30)", "time.sleep(1)")], env=env)
    assert node.wait(timeout=10) == 0


def test_nodes_stop_on_sighup(runtime_dir, processes):
    arm = processes.start_node("arm")
    os.killpg(arm.pid, signal.SIGHUP)
    assert arm.wait(timeout=10) == 0
    processes.wait_log(arm, '"arm stopped, holding"')
