"""Shared fixtures: a private runtime directory and processes that are always cleaned up."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

from chunkbus.launch.process import NodeProcess

REPO = Path(__file__).resolve().parent.parent
HELPERS = Path(__file__).resolve().parent / "helpers"

# Shared CI machines are noisy: no per-example deadline; a fixed number of examples.
settings.register_profile(
    "chunkbus", deadline=None, max_examples=60, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile("chunkbus")


@pytest.fixture(autouse=True)
def runtime_dir(monkeypatch):
    """A fresh runtime directory for ipc endpoints, short enough for a Unix socket path.

    Every test gets one, so the nodes it starts never meet another test's (or a user's).
    """
    path = Path(tempfile.mkdtemp(prefix="cb-", dir="/tmp"))
    monkeypatch.setenv("CHUNKBUS_RUNTIME_DIR", str(path))
    yield path
    shutil.rmtree(path, ignore_errors=True)


class Processes:
    """Starts helper processes and kills every one of them at teardown, also on failure.

    Each is a NodeProcess (chunkbus.launch.process): a thread reads its stderr into
    `process.log_lines` (so a chatty process never blocks on a full pipe); `start_node`
    starts a chunkbus node and waits until it is ready; `wait_log` waits for a line.
    """

    def __init__(self):
        self.started: list[NodeProcess] = []

    def start(self, *args: str, script: bool = False, **kwargs) -> NodeProcess:
        """Run `args` with this Python, or as a program of its own with script=True."""
        return self._kept(NodeProcess, list(args) if script else [sys.executable, *args], **kwargs)

    def start_node(self, command: str, *args: str, timeout: float = 60.0, **kwargs) -> NodeProcess:
        """`chunkbus --log-json COMMAND ARGS`, once it is ready (its line: process.ready_event)."""
        process = self._kept(NodeProcess.node, command, *args, **kwargs)
        process.wait_ready(timeout)
        return process

    def _kept(self, start, *args, stdout=subprocess.PIPE, **kwargs) -> NodeProcess:
        process = start(*args, stdout=stdout, **kwargs)
        self.started.append(process)
        return process

    @staticmethod
    def wait_log(process: NodeProcess, text: str, timeout: float = 60.0, start: int = 0) -> str:
        """The first line from index `start` on containing `text`; fails if the process exits."""
        return process.wait_log(text, timeout, start)

    def helper(self, name: str, *args: str, **kwargs) -> subprocess.Popen:
        return self.start(str(HELPERS / name), *args, **kwargs)

    @staticmethod
    def first_line_json(process: subprocess.Popen) -> dict:
        line = process.stdout.readline()
        if not line:
            process.wait(timeout=10)
            raise AssertionError("process exited early:\n" + "".join(process.log_lines))
        return json.loads(line)

    def cleanup(self):
        for process in self.started:
            process.close()


@pytest.fixture
def processes():
    tracker = Processes()
    try:
        yield tracker
    finally:
        tracker.cleanup()
