"""Shared fixtures: a private runtime directory and processes that are always cleaned up."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
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


@pytest.fixture
def runtime_dir(monkeypatch):
    """A fresh runtime directory for ipc endpoints, short enough for a Unix socket path."""
    path = Path(tempfile.mkdtemp(prefix="cb-", dir="/tmp"))
    monkeypatch.setenv("CHUNKBUS_RUNTIME_DIR", str(path))
    yield path
    shutil.rmtree(path, ignore_errors=True)


class Processes:
    """Starts helper processes and kills every one of them at teardown, also on failure."""

    def __init__(self):
        self.started: list[subprocess.Popen] = []

    def start(self, *args: str, **kwargs) -> subprocess.Popen:
        process = subprocess.Popen(
            [sys.executable, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, **kwargs.pop("env", {})},
            start_new_session=True,
            **kwargs,
        )
        self.started.append(process)
        return process

    def helper(self, name: str, *args: str, **kwargs) -> subprocess.Popen:
        return self.start(str(HELPERS / name), *args, **kwargs)

    @staticmethod
    def first_line_json(process: subprocess.Popen) -> dict:
        line = process.stdout.readline()
        if not line:
            raise AssertionError(f"process exited early: {process.stderr.read()}")
        return json.loads(line)

    def cleanup(self):
        for process in self.started:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)
            for stream in (process.stdout, process.stderr):
                if stream:
                    stream.close()


@pytest.fixture
def processes():
    tracker = Processes()
    try:
        yield tracker
    finally:
        tracker.cleanup()
