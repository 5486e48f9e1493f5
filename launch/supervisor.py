"""Runs the nodes of a launch file, each as its own `chunkbus` process, and looks after them.

Output is prefixed with the node's name (launch/output.py). A node that exits is
restarted by its policy with backoff (1 s, doubling to 30 s); one that exits with a
failure and may not be restarted (again), or with EXIT_PERMANENT (a configuration error
no restart can fix), stops the launch, which then exits non-zero.

Stopping is a safety property. Ctrl-C, SIGTERM, SIGHUP (a lost terminal) or the end of
--duration stop every node: SIGINT, then SIGTERM, then SIGKILL after a grace period each,
each signal sent before anything is printed, and no output error (a closed pipe) can
interrupt it. A launcher killed outright leaves no node behind either: every node watches
for its launcher's death (bus/lifecycle.py) and stops.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field

from ..bus.lifecycle import EXIT_PERMANENT, LAUNCHER_PID, is_ready, on_stop_signals
from .config import NodeSpec, start_order
from .output import Console
from .process import exit_description, node_command

GRACE = 5.0  # seconds after each of SIGINT and SIGTERM


@dataclass
class Running:
    spec: NodeSpec
    process: subprocess.Popen | None = None
    ready: threading.Event = field(default_factory=threading.Event)
    restarts: int = 0
    started: float = 0.0
    next_start: float = 0.0
    done: bool = False  # exited for good


class Supervisor:
    def __init__(self, specs: list[NodeSpec], *, console: Console | None = None, ready_timeout: float = 300.0):
        self.nodes = [Running(spec) for spec in start_order(specs)]
        self.console = console or Console([n.spec.name for n in self.nodes])
        self.ready_timeout = ready_timeout
        self.stop_event = threading.Event()
        self.failure: str | None = None

    def announce(self, text: str) -> None:
        self.console.announce(text)

    @staticmethod
    def command_line(spec: NodeSpec) -> list[str]:
        # JSON lines: the console renders them, tells the stats lines apart, and finds the
        # node's readiness line (is_ready: the field chunkbus's logger sets, not the words).
        return node_command(spec.command, spec.args)

    # --- running --------------------------------------------------------------------------------

    def start(self, node: Running) -> None:
        spec = node.spec
        node.ready.clear()
        env = {**os.environ, **spec.env, "PYTHONUNBUFFERED": "1", LAUNCHER_PID: str(os.getpid())}
        node.process = subprocess.Popen(
            self.command_line(spec),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            env=env,
            start_new_session=True,  # Ctrl-C reaches the launcher, which stops nodes in order
        )
        node.started = time.monotonic()
        threading.Thread(target=self.relay, args=(node, node.process), daemon=True).start()
        self.announce(f"started {spec.name} (pid {node.process.pid}): chunkbus {spec.command} {shlex.join(spec.args)}")

    def relay(self, node: Running, process: subprocess.Popen) -> None:
        # Reads to the end even when nothing reads the launcher's output: a node whose
        # output pipe fills up would block in its next log line, control loop and all.
        for line in process.stdout:
            event = self.console.node_line(node.spec.name, line.rstrip("\n"))
            if not node.ready.is_set() and is_ready(event):
                node.ready.set()

    def wait_ready(self, names: list[str]) -> bool:
        deadline = time.monotonic() + self.ready_timeout
        for node in self.nodes:
            if node.spec.name in names:
                while not node.ready.wait(0.1):
                    if self.stop_event.is_set() or self.failure:
                        return False
                    self.check_exits()
                    if time.monotonic() > deadline:
                        self.failure = f"{node.spec.name} did not become ready within {self.ready_timeout:.0f} s"
                        return False
        return True

    def run(self, duration: float | None = None) -> int:
        on_stop_signals(self.stop_event.set)
        end = time.monotonic() + duration if duration else None
        selected = {n.spec.name for n in self.nodes}
        try:
            for node in self.nodes:
                waits = [a for a in node.spec.after if a in selected]
                if waits and not self.wait_ready(waits):
                    break
                if self.stop_event.is_set():
                    break
                self.start(node)
            while not self.stop_event.is_set() and not self.failure:
                if end is not None and time.monotonic() >= end:
                    self.announce(f"--duration of {duration:g} s is over")
                    break
                self.check_exits()
                if all(n.done for n in self.nodes):
                    self.announce("every node has exited")
                    break
                time.sleep(0.1)
        finally:
            clean = self.stop_all()
        if self.failure:
            self.announce(f"failed: {self.failure}")
            return 1
        if not clean:
            self.announce("failed: a node did not stop cleanly")
            return 1
        self.announce("stopped")
        return 0

    def check_exits(self) -> None:
        now = time.monotonic()
        for node in self.nodes:
            if node.done or node.process is None:
                continue
            code = node.process.poll()
            if code is None:
                continue
            if node.next_start == 0.0:
                self.on_exit(node, code, now)
            elif now >= node.next_start:
                node.next_start = 0.0
                self.start(node)

    def on_exit(self, node: Running, code: int, now: float) -> None:
        spec = node.spec
        how = exit_description(code)
        if code == EXIT_PERMANENT:
            node.done = True
            self.failure = (
                f"{spec.name} cannot run as configured (exit status {code}: its error above is not one a "
                "restart fixes), so it is not restarted"
            )
            return
        wanted = spec.restart == "always" or (spec.restart == "on-failure" and code != 0)
        if not wanted:
            node.done = True
            if code != 0:
                self.failure = f"{spec.name} failed ({how}) and its restart policy is {spec.restart}"
            else:
                self.announce(f"{spec.name} exited ({how}); restart policy {spec.restart}: not restarting")
            return
        if node.restarts >= spec.max_restarts:
            node.done = True
            self.failure = (
                f"{spec.name} keeps failing: {how} after {node.restarts} restarts (max-restarts {spec.max_restarts})"
            )
            return
        if now - node.started > 60:
            node.restarts = 0  # it ran well for a while: start counting afresh
        delay = min(30.0, 2.0 ** node.restarts)
        node.restarts += 1
        node.next_start = now + delay
        self.announce(
            f"{spec.name} exited ({how}); restarting in {delay:g} s (restart {node.restarts} of {spec.max_restarts})"
        )

    def stop_all(self) -> bool:
        """Stop every node; whether all of them stopped cleanly."""
        running = [n for n in self.nodes if n.process is not None and n.process.poll() is None]
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGKILL):
            if not running:
                break
            for node in running:  # signal first, then say so: saying so may fail
                try:
                    os.killpg(node.process.pid, sig)
                except ProcessLookupError:
                    pass
            names = ", ".join(n.spec.name for n in running)
            self.announce(f"stopping {names}" if sig == signal.SIGINT else f"{names} still running: sent {sig.name}")
            deadline = time.monotonic() + GRACE
            while time.monotonic() < deadline and any(n.process.poll() is None for n in running):
                time.sleep(0.05)
            running = [n for n in running if n.process.poll() is None]
        clean = True
        for node in self.nodes:
            if node.process is not None and not node.done:
                code = node.process.wait()
                if code not in (0, -signal.SIGINT, -signal.SIGTERM):
                    clean = False
                    self.announce(f"{node.spec.name} ended with status {code}")
        return clean
