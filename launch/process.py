"""A chunkbus node as a process of its own: started, waited for until it serves, stopped.

`NodeProcess.node("broker", "--frontend", "tcp://127.0.0.1:*")` runs the node's command
as `launch` does (node_command: `python -m chunkbus.nodes.cli --log-json broker ...`);
`NodeProcess([...])` runs any other program that logs chunkbus's JSON lines (a script that
serves a node). A thread reads its stderr to the end into `log_lines`, so a chatty process
never blocks on a full pipe. `wait_ready` waits for the node's readiness line (is_ready in
bus/lifecycle.py: the field, never the words) and returns it parsed, with the node's
fields (where a broker listens); `wait_log` waits for a line with some text. Both fail
with NodeError, quoting the process's last lines, when it exits first or time runs out.

Tests and benchmarks start their nodes with it. `launch` starts its own (it relays their
output as it comes), with the same command line and the same is_ready.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from ..bus.lifecycle import is_ready
from .output import parse

T = TypeVar("T")
EXIT_GRACE = 1.0  # seconds to wait for the last lines of a process that exited


class NodeError(RuntimeError):
    """A node process exited, or did not say what was awaited in time."""


def node_command(command: str, args: Iterable[str] = ()) -> list[str]:
    """The command line of the chunkbus node `command`, logging JSON lines."""
    return [sys.executable, "-m", "chunkbus.nodes.cli", "--log-json", command, *args]


def exit_description(code: int) -> str:
    """A process's exit code as words: `exit status 1`, `signal SIGKILL`."""
    if code >= 0:
        return f"exit status {code}"
    try:
        return f"signal {signal.Signals(-code).name}"
    except ValueError:
        return f"signal {-code}"


class NodeProcess(subprocess.Popen):
    """A process in a session of its own, whose stderr lines are collected as they come.

    `env` is added to this process's environment; other keyword arguments go to Popen
    (stdout is discarded unless asked for: stdout=subprocess.PIPE).
    """

    def __init__(self, args: Iterable[str], *, env: dict[str, str] | None = None, name: str | None = None,
                 stdout: Any = subprocess.DEVNULL, stdin: Any = subprocess.DEVNULL, **popen: Any):
        args = list(args)
        popen.setdefault("start_new_session", True)  # a signal to its group reaches all it started
        super().__init__(args, stdout=stdout, stdin=stdin, stderr=subprocess.PIPE, text=True, errors="replace",
                         env={**os.environ, **(env or {})}, **popen)
        self.name = name or os.path.basename(args[0])
        self.log_lines: list[str] = []
        self.ready_event: dict[str, Any] | None = None
        self._changed = threading.Condition()
        self._ended = False  # stderr is at its end
        self._reader = threading.Thread(target=self._collect, name=f"log of {self.name}", daemon=True)
        self._reader.start()

    @classmethod
    def node(cls, command: str, *args: str, **kwargs: Any) -> NodeProcess:
        """Start `chunkbus --log-json COMMAND ARGS`."""
        return cls(node_command(command, args), name=f"chunkbus {command}", **kwargs)

    def _collect(self) -> None:
        try:
            for line in self.stderr:
                with self._changed:
                    self.log_lines.append(line)
                    self._changed.notify_all()
        except (OSError, ValueError):  # closed under the reader
            pass
        finally:
            with self._changed:
                self._ended = True
                self._changed.notify_all()

    # --- waiting ----------------------------------------------------------------------------------

    def wait_ready(self, timeout: float = 60.0) -> dict[str, Any]:
        """Wait until the node says it serves; its readiness line, parsed."""
        if self.ready_event is None:
            self.ready_event = self._wait_for(_ready_event, timeout, 0, "that it is ready")
        return self.ready_event

    def wait_log(self, text: str, timeout: float = 60.0, start: int = 0) -> str:
        """The first line from index `start` on that contains `text`."""
        return self._wait_for(lambda line: line if text in line else None, timeout, start, repr(text))

    def _wait_for(self, found: Callable[[str], T | None], timeout: float, start: int, what: str) -> T:
        deadline = time.monotonic() + timeout
        exited_at = None
        index = start
        with self._changed:
            while True:
                while index < len(self.log_lines):
                    result = found(self.log_lines[index])
                    index += 1
                    if result is not None:
                        return result
                now = time.monotonic()
                if exited_at is None and self.poll() is not None:
                    exited_at = now
                if self._ended or (exited_at is not None and now - exited_at > EXIT_GRACE):
                    break  # no more lines come (a process it started may hold its stderr open)
                if now >= deadline:
                    raise NodeError(f"{self.name} did not log {what} within {timeout:g} s{self.last_lines()}")
                self._changed.wait(min(deadline - now, 0.1))
        try:
            code = self.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            raise NodeError(f"{self.name} closed its log before it logged {what}{self.last_lines()}") from None
        raise NodeError(f"{self.name} exited ({exit_description(code)}) before it logged {what}{self.last_lines()}")

    def last_lines(self, count: int = 20) -> str:
        """The process's last `count` lines, for an error message."""
        lines = self.log_lines[-count:]
        return ("; its last lines:\n" + "".join(lines).rstrip("\n")) if lines else "; it logged nothing"

    # --- stopping ---------------------------------------------------------------------------------

    def signal_group(self, sig: int) -> None:
        """Send `sig` to the process and every process it started (its session's group)."""
        try:
            os.killpg(self.pid, sig)
        except ProcessLookupError:
            pass

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM, as a node is stopped; SIGKILL if it has not stopped within `timeout`."""
        if self.poll() is None:
            self.signal_group(signal.SIGTERM)
            try:
                return self.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                pass
        self.close()
        return self.returncode

    def close(self) -> None:
        """Kill the process (and what it started) if it still runs, and reap it."""
        if self.poll() is None:
            self.signal_group(signal.SIGKILL)
        self.wait(timeout=10)
        self._reader.join(timeout=EXIT_GRACE)
        if self.stdout:
            self.stdout.close()

    def __exit__(self, *exc_info: Any) -> None:
        self.close()
        super().__exit__(*exc_info)


def _ready_event(line: str) -> dict[str, Any] | None:
    event = parse(line.rstrip("\n"))
    return event if is_ready(event) else None
