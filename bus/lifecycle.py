"""How a node process stops: on a signal, when its launcher dies, and with which exit status.

Every node stops the same way on SIGINT, SIGTERM and SIGHUP (a terminal or SSH session
that went away). A node started by `launch` also stops when the launcher dies, however it
died (SIGKILL included): on Linux the kernel sends it SIGTERM (the parent-death signal),
and everywhere a watcher thread notices that its parent changed. An orphaned node that
has not stopped within ORPHAN_GRACE seconds of that exits anyway: nobody else would stop it.

Every node also says when it serves, the same way (announce_ready): a "<kind> ready" line
("arm ready") that carries the field `ready: true`. That field, not the sentence, is what
`launch`, the tests and the benchmarks wait for (is_ready): only chunkbus's own logger can
set it (bus/log.py drops it from any other logger's line), so no library's line that happens
to say "worker ready" counts.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
from collections.abc import Callable, Mapping
from typing import Any, Protocol

# sysexits.h EX_CONFIG: the configuration is wrong (no such policy, a policy that does not
# fit the arm). Restarting cannot help, so `launch` does not restart a node that exits so.
EXIT_PERMANENT = 78

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
LAUNCHER_PID = "CHUNKBUS_LAUNCHER_PID"  # set by `launch` in each node's environment
ORPHAN_GRACE = 10.0
_PR_SET_PDEATHSIG = 1


READY = "ready"  # the field of a node's "<kind> ready" line: true once it serves
OWN_LOGGER = "chunkbus"  # the logger of chunkbus's own lines (bus/log.py)


class Node(Protocol):
    def run(self) -> None: ...  # serves until stop() is called

    def stop(self) -> None: ...  # may be called from a signal handler: only asks run() to end


def on_stop_signals(stop: Callable[[], None]) -> None:
    """Call `stop` (from the main thread) on SIGINT, SIGTERM or SIGHUP."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, lambda *_: stop())


def stop_event() -> threading.Event:
    """An event that SIGINT, SIGTERM or SIGHUP sets: for a command that runs until it is set."""
    stop = threading.Event()
    on_stop_signals(stop.set)
    return stop


def run_node(node: Node) -> None:
    """Run `node` in this (the main) thread until SIGINT, SIGTERM or SIGHUP stops it."""
    on_stop_signals(node.stop)
    try:
        node.run()
    finally:
        end_zmq()


def end_zmq() -> None:
    """Send what the closed sockets still hold (their linger) and end ZeroMQ now, while every
    buffer sent without a copy is alive: at interpreter exit pyzmq may drop its references to
    them while libzmq's I/O thread still writes one (a camera aborted with "Bad address
    (src/tcp.cpp)" as it stopped)."""
    import zmq

    if zmq.Context._instance is not None:
        zmq.Context.instance().destroy(linger=200)


def announce_ready(log: Any, kind: str, **fields: Any) -> None:
    """Say that this node serves from now on: `<kind> ready` with `fields`, marked as readiness."""
    log.info(f"{kind} ready", **{READY: True}, **fields)


def is_ready(event: Mapping[str, Any] | None) -> bool:
    """Whether a node's parsed JSON log line (launch.output.parse) is its readiness line.

    A line of another logger (a library's, through the standard `logging` module) names its
    logger and never counts, whatever it says.
    """
    return event is not None and event.get(READY) is True and event.get("logger", OWN_LOGGER) == OWN_LOGGER


def follow_launcher() -> None:
    """If `launch` started this process, stop it when the launcher dies.

    Reads (and removes, so that no grandchild inherits it) the launcher's pid from the
    environment; does nothing for a process started by hand.
    """
    value = os.environ.pop(LAUNCHER_PID, None)
    if not value or not value.isdigit():
        return
    launcher = int(value)
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        except (OSError, AttributeError):
            pass  # the watcher below still notices
    threading.Thread(target=_watch, args=(launcher,), name="chunkbus-launcher-watch", daemon=True).start()


def _watch(launcher: int) -> None:
    # Also closes the race where the launcher died before prctl above ran.
    stopped = threading.Event()
    while os.getppid() == launcher:
        stopped.wait(0.25)
    os.kill(os.getpid(), signal.SIGTERM)
    stopped.wait(ORPHAN_GRACE)
    os._exit(1)
