"""launch: launch files, the supervisor, and the out-of-the-box demo, as real processes."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import REPO

from chunkbus.bus.client import BrokerClient
from chunkbus.bus.sockets import Subscriber
from chunkbus.launch.config import LaunchError, load
from chunkbus.nodes.cli import main as chunkbus

LAUNCH = str(Path(sys.executable).parent / "launch")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pids_started(output: str) -> list[int]:
    return [int(pid) for pid in re.findall(r"started \S+ \(pid (\d+)\)", output)]


def alive(pid: int) -> bool:
    """Whether `pid` still runs. A zombie has stopped: an orphan's zombie stays until its new
    parent reaps it, and some init processes (this CI's among them) never do."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "launch.yaml"
    path.write_text(textwrap.dedent(text))
    return path


# --- the demo -----------------------------------------------------------------------------------


def run_local(processes, runtime_dir, tmp_path, policy: str, seconds: int):
    ports = {"FRONTEND_PORT": str(free_port()), "BACKEND_PORT": str(free_port()), "VIEW_PORT": str(free_port()),
             "VIEW_GRPC_PORT": str(free_port())}
    # No display, as in CI, even on a desktop: the viewer serves the web viewer instead of opening a window.
    env = {**ports, "POLICY": policy, "XDG_CACHE_HOME": str(tmp_path / "cache"), "DISPLAY": "", "WAYLAND_DISPLAY": ""}
    launch = processes.start(LAUNCH, str(REPO / "configs/local.yaml"), "--duration", str(seconds),
                             script=True, env=env)
    commands = []
    with Subscriber(["actuator"], ["command"], on_message=commands.append, rcvhwm=10_000):
        deadline = time.monotonic() + seconds + 60
        status = None
        while launch.poll() is None and time.monotonic() < deadline:
            if status is None and any(not r.message.hold for r in commands):
                with BrokerClient(f"tcp://127.0.0.1:{ports['FRONTEND_PORT']}") as client:
                    status = client.status()
            time.sleep(0.2)
    output = launch.stdout.read()
    assert launch.wait(timeout=30) == 0, output
    pids = pids_started(output)
    assert len(pids) == 7, output  # the six nodes and the viewer
    # No display here: the viewer serves Rerun's web viewer, and says where to open it.
    assert f"open http://localhost:{ports['VIEW_PORT']}/?url=rerun+http://127.0.0.1:{ports['VIEW_GRPC_PORT']}" in output
    assert not [pid for pid in pids if alive(pid)], "a node outlived the launch"
    return [r.message for r in commands], status, output


def test_local_launch_runs_the_whole_system_with_the_real_act_demo(processes, runtime_dir, tmp_path):
    commands, status, output = run_local(processes, runtime_dir, tmp_path, "demo:act", 25)
    assert "UNTRAINED demo ACT policy with random weights" in output
    demo = status.services["demo"]
    assert demo.model.type == "act" and demo.outcomes["ok"] >= 1  # chunks from the ACT worker
    moving = [c for c in commands if not c.hold]
    assert len(moving) > 60
    ticks = [c.tick for c in commands]
    assert ticks == list(range(ticks[0], ticks[0] + len(ticks)))  # a command every tick
    rate = (len(commands) - 1) / (commands[-1].issue_time - commands[0].issue_time)
    assert rate == pytest.approx(30, rel=0.1)


def test_local_launch_with_a_scripted_policy(processes, runtime_dir, tmp_path):
    commands, status, _ = run_local(processes, runtime_dir, tmp_path, "scripted:sine?delay=0.05", 8)
    assert status.services["demo"].model.type == "scripted:sine"
    assert sum(not c.hold for c in commands) > 60


# --- the supervisor -------------------------------------------------------------------------------


def test_a_killed_node_is_restarted_and_one_that_keeps_failing_stops_the_launch(processes, runtime_dir, tmp_path):
    path = write(tmp_path, """
        nodes:
          camera:
            command: camera
            options: {name: front, fps: 10, width: 32, height: 24}
            restart: on-failure
          broken:
            command: camera
            options: {name: broken, source: missing.mp4}
            restart: on-failure
            max-restarts: 2
            after: camera
    """)
    launch = processes.start(LAUNCH, str(path), script=True)
    lines = []
    deadline = time.monotonic() + 60
    while len(pids_started("".join(lines))) < 2 and time.monotonic() < deadline:
        lines.append(launch.stdout.readline())
    camera_pid = pids_started("".join(lines))[0]
    os.kill(camera_pid, 9)
    output = "".join(lines) + launch.stdout.read()
    assert launch.wait(timeout=60) == 1
    assert re.search(r"camera exited \(signal SIGKILL\); restarting in 1 s", output), output
    camera_pids = re.findall(r"started camera \(pid (\d+)\)", output)
    assert len(camera_pids) >= 2  # restarted by its policy
    assert "broken keeps failing: exit status 1 after 2 restarts (max-restarts 2)" in output
    assert "no video file 'missing.mp4'" in output
    assert not [pid for pid in pids_started(output) if alive(pid)]


def test_sigterm_stops_every_node_cleanly(processes, runtime_dir, tmp_path):
    path = write(tmp_path, """
        nodes:
          arm: {command: arm}
          camera: {command: camera, options: {name: c, width: 32, height: 24}, after: arm}
    """)
    launch = processes.start(LAUNCH, str(path), script=True)
    with Subscriber(["camera_c"], ["camera/c"]) as frames:
        frames.wait("camera/c", timeout=60)
    launch.terminate()
    output = launch.stdout.read()
    assert launch.wait(timeout=30) == 0, output
    assert "stopping arm, camera" in output and "launch | stopped" in output
    assert not [pid for pid in pids_started(output) if alive(pid)]


def test_dry_run_only_and_the_shipped_files(tmp_path):
    for name in ("local.yaml", "gpu_workers.yaml", "robot.yaml"):
        result = subprocess.run([LAUNCH, str(REPO / "configs" / name), "--dry-run"], capture_output=True,
                                text=True, timeout=60, env={**os.environ, "BROKER": "tcp://gpu:5555"})
        assert result.returncode == 0, result.stderr
    result = subprocess.run([LAUNCH, str(REPO / "configs/local.yaml"), "--dry-run", "--only", "arm"],
                            capture_output=True, text=True, timeout=60)
    assert result.stdout.startswith("arm: ") and len(result.stdout.splitlines()) == 1
    result = subprocess.run([LAUNCH, str(REPO / "configs/local.yaml"), "--dry-run", "--only", "worker"],
                            capture_output=True, text=True, timeout=60)  # it waits for a node left out
    assert result.stdout.startswith("worker: ") and len(result.stdout.splitlines()) == 1
    result = subprocess.run([LAUNCH, str(REPO / "configs/robot.yaml"), "--dry-run"], capture_output=True,
                            text=True, timeout=60, env={**os.environ, "BROKER": "tcp://gpu-host:7777"})
    assert "--broker tcp://gpu-host:7777" in result.stdout
    result = subprocess.run([LAUNCH, str(REPO / "configs/local.yaml"), "--only", "nobody"], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 1 and "--only nobody: no such node" in result.stderr


# --- wrong launch files ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, message",
    [
        ("nodes:\n  a:\n    command: teleport\n", r":3: nodes.a.command: unknown subcommand 'teleport'"),
        ("nodes:\n  a:\n    command: arm\n    options:\n      speed: 3\n",
         r":5: nodes.a.options.speed: unknown option 'speed' for `chunkbus arm`"),
        ("nodes:\n  a:\n    command: arm\n    options:\n      rate: fast\n",
         r":5: nodes.a.options.rate: Invalid value for '--rate': 'fast' is not a valid float"),
        ("nodes:\n  a:\n    options: {rate: 3}\n", r":2: nodes.a: missing field `command`"),
        ("nodes:\n  a:\n    command: arm\n    after: b\n", r":2: nodes.a.after: unknown node 'b'"),
        ("nodes:\n  a: {command: arm, after: b}\n  b: {command: arm, after: a}\n",
         r"nodes.a.after: a cycle: a -> b -> a"),
        ("nodes:\n  a:\n    command: arm\n    restart: sometimes\n", r":4: nodes.a.restart: 'sometimes' is not one of"),
        ("nodes:\n  a:\n    command: arm\n    colour: red\n", r":4: nodes.a.colour: unknown field"),
        ("nodes:\n  a:\n    command: arm\n    options: {rate: \"${NO_SUCH_VARIABLE}\"}\n",
         r":4: nodes.a.options.rate: environment variable NO_SUCH_VARIABLE is not set"),
        ("nodes: [\n", r":2: not valid YAML"),
        ("robots:\n  a: {command: arm}\n", r":1: robots: unknown top-level field"),
    ],
)
def test_wrong_launch_files_name_the_line_and_field(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(LaunchError, match=re.escape(str(path)) + ".*" if message.startswith(":") else ".*") as error:
        load(path, chunkbus.commands)
    assert re.search(message, str(error.value)), str(error.value)
    result = subprocess.run([LAUNCH, str(path), "--dry-run"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and re.search(message, result.stderr)


def test_environment_variables_and_defaults(tmp_path, monkeypatch):
    path = write(tmp_path, """
        nodes:
          a:
            command: arm
            options: {rate: "${ARM_RATE:-25}", name: "${ARM_NAME}"}
            env: {SOME: "${ARM_NAME}-x"}
    """)
    monkeypatch.setenv("ARM_NAME", "left")
    (spec,) = load(path, chunkbus.commands)
    assert spec.args == ["--rate", "25", "--name", "left"] and spec.env == {"SOME": "left-x"}
    monkeypatch.setenv("ARM_RATE", "40")
    assert load(path, chunkbus.commands)[0].args[:2] == ["--rate", "40"]


# --- what launch prints -----------------------------------------------------------------------------

SCRIPTED_ROBOT = """
    nodes:
      broker:
        command: broker
        options: {{frontend: "tcp://127.0.0.1:{frontend}", backend: "tcp://127.0.0.1:{backend}"}}
      worker:
        command: worker
        options: {{broker: "tcp://127.0.0.1:{backend}", policy: "scripted:sine?actions={actions}", service: sine}}
        after: broker
      arm: {{command: arm}}
      actuator:
        command: actuator
        options: {{broker: "tcp://127.0.0.1:{frontend}", service: sine}}
        after: [worker, arm]
        restart: on-failure
"""


def scripted_robot(tmp_path: Path, actions: int = 6) -> Path:
    return write(tmp_path, SCRIPTED_ROBOT.format(frontend=free_port(), backend=free_port(), actions=actions))


def test_a_node_that_cannot_run_as_configured_is_not_restarted(processes, runtime_dir, tmp_path):
    launch = processes.start(LAUNCH, str(scripted_robot(tmp_path, actions=7)), script=True)
    assert launch.wait(timeout=90) == 1
    output = launch.stdout.read()
    assert len(re.findall(r"started actuator", output)) == 1, output  # restart: on-failure, yet not restarted
    assert "the model's actions have 7 values" in output
    assert "actuator cannot run as configured (exit status 78" in output
    assert not [pid for pid in pids_started(output) if alive(pid)]


def test_the_log_reads_at_a_glance(processes, runtime_dir, tmp_path):
    launch = processes.start(LAUNCH, str(scripted_robot(tmp_path)), "--duration", "6", script=True)
    output = launch.stdout.read()
    assert launch.wait(timeout=60) == 0, output
    # Rendered from the nodes' JSON: the node, the clock, the level, the event and its fields in order.
    assert re.search(r"^ +arm \| \d\d:\d\d:\d\d\.\d{3} info    arm ready joints=\[shoulder_pan\.pos, ", output, re.M)
    stats = re.findall(r"actuator \| \S+ info    stats (.*)$", output, re.M)
    assert stats, output
    assert re.fullmatch(
        r"tick=\d+ commands=\d+ holds=\d+ late_ticks=\d+ lateness_p99_us=\d+ schedule_left=\d+ rtt_p50_ms=\d+ "
        r"rtt_p95_ms=\d+ chunks_used=\d+ chunks_discarded=\d+ errors=\d+ timeouts=\d+ stale_obs=\d+", stats[-1]
    ), stats[-1]
    assert "{" not in output  # no raw JSON


def run_on_a_terminal(path: Path, *options: str) -> str:
    """What `launch` writes to a terminal (a pseudo-terminal), until it exits."""
    import pty

    leader, follower = pty.openpty()
    launch = subprocess.Popen([LAUNCH, str(path), "--duration", "6", *options], stdout=follower,
                              stderr=follower, stdin=subprocess.DEVNULL, start_new_session=True)
    os.close(follower)
    chunks = []
    try:
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # the terminal closed: the launcher exited
                break
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(leader)
        if launch.poll() is None:
            launch.kill()
        launch.wait(timeout=30)
    return b"".join(chunks).decode(errors="replace")


def test_on_a_terminal_stats_are_status_lines_updated_in_place(runtime_dir, tmp_path):
    path = scripted_robot(tmp_path)
    screen = run_on_a_terminal(path)
    assert "\033[1F\033[J" in screen  # up over the status line, cleared, redrawn
    assert not re.search(r"info\S* +stats", screen)  # not as log lines
    assert re.search(r"actuator \|\S* tick=\d+ commands=\d+", screen)
    verbose = run_on_a_terminal(path, "--verbose")
    assert re.search(r"info\S* +stats tick=\d+", verbose) and "\033[1F" not in verbose
