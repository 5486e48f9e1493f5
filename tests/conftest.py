"""Shared fixtures: a private runtime directory and processes that are always cleaned up."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

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

    A process's stderr is read by a thread into `process.log_lines` (so a chatty process
    never blocks on a full pipe); `wait_log` waits for a line.
    """

    def __init__(self):
        self.started: list[subprocess.Popen] = []

    def start(self, *args: str, script: bool = False, **kwargs) -> subprocess.Popen:
        """Run `args` with this Python, or as a program of its own with script=True."""
        process = subprocess.Popen(
            list(args) if script else [sys.executable, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, **kwargs.pop("env", {})},
            start_new_session=True,
            **kwargs,
        )
        process.log_lines = []
        threading.Thread(target=self._collect, args=(process,), daemon=True).start()
        self.started.append(process)
        return process

    @staticmethod
    def _collect(process: subprocess.Popen) -> None:
        for line in process.stderr:
            process.log_lines.append(line)

    @staticmethod
    def wait_log(process: subprocess.Popen, text: str, timeout: float = 60.0, start: int = 0) -> str:
        """The first line from index `start` on containing `text`; fails if the process exits."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in process.log_lines[start:]:
                if text in line:
                    return line
            if process.poll() is not None and not any(text in l for l in process.log_lines[start:]):
                time.sleep(0.1)  # let the reader thread catch the last lines
                if not any(text in l for l in process.log_lines[start:]):
                    raise AssertionError(
                        f"process exited ({process.returncode}) before logging {text!r}:\n"
                        + "".join(process.log_lines[-20:])
                    )
            time.sleep(0.02)
        raise AssertionError(f"no {text!r} within {timeout} s:\n" + "".join(process.log_lines[-20:]))

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
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)
            if process.stdout:
                process.stdout.close()


@pytest.fixture
def processes():
    tracker = Processes()
    try:
        yield tracker
    finally:
        tracker.cleanup()
