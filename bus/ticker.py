"""A fixed-rate clock: tick k is due at t0 + k / fps on the monotonic clock.

The ticker sleeps to each absolute deadline (never ``sleep(period)``, which drifts by
the time the work took). A tick that wakes more than ``late_after`` past its deadline
is counted late. When the work overran so far that later deadlines have passed too,
those ticks are skipped and counted: a control loop must not fire a burst of stale
commands to catch up, and tick k keeps meaning the time t0 + k / fps.

What else makes a Python control loop wake late, and what here answers it (the actuator
uses all three; bench_jitter.py measures them):

- waking from a sleep takes tens of microseconds on an idle machine, more on a busy one:
  ``spin`` sleeps to that long before the deadline and reads the clock for the rest;
- CPython collects garbage whenever allocations pass a threshold, in whichever thread
  allocates, and a full collection of a node's start-up objects takes milliseconds:
  ``PacedGarbageCollection`` freezes those and collects between ticks instead;
- on a loaded machine the scheduler runs other processes first: ``realtime`` asks for
  the real-time scheduling class (SCHED_FIFO) and one CPU, where permitted.
"""

from __future__ import annotations

import gc
import math
import os
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np

# Above every normally scheduled task, below the kernel's interrupt threads (priority 50).
REALTIME_PRIORITY = 20


class Ticker:
    def __init__(
        self,
        fps: float,
        *,
        late_after: float = 0.001,
        spin: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        window: int = 10_000,
    ):
        if not fps > 0:
            raise ValueError(f"fps must be positive, got {fps}")
        if not 0 <= spin < 1.0 / fps:
            raise ValueError(f"spin must be at least 0 and shorter than a period ({1.0 / fps:g} s), got {spin}")
        self.fps = fps
        self.period = 1.0 / fps
        self.late_after = late_after
        self.spin = spin  # seconds before each deadline spent reading the clock instead of sleeping
        self._clock = clock
        self._sleep = sleep
        self.t0: float | None = None
        self.next_tick = 0
        self.ticks = 0  # ticks returned by wait()
        self.late = 0  # of those, woke more than late_after past the deadline
        self.skipped = 0  # ticks whose deadline passed before wait() was called for them
        self.max_lateness = 0.0
        self._lateness: deque[float] = deque(maxlen=window)  # the most recent, seconds

    def start(self, t0: float | None = None) -> None:
        """Make tick 0 due at `t0` (default: now)."""
        self.t0 = self._clock() if t0 is None else t0
        self.next_tick = 0

    def deadline(self, tick: int) -> float:
        assert self.t0 is not None, "start() the ticker first"
        return self.t0 + tick * self.period

    def wait(self) -> int:
        """Sleep until the next tick is due and return its index."""
        if self.t0 is None:
            self.start()
        tick = self.next_tick
        deadline = self.deadline(tick)
        now = self._clock()
        if now < deadline:
            if deadline - now > self.spin:
                self._sleep(deadline - self.spin - now)
            while (now := self._clock()) < deadline:  # at most `spin`: never return before the deadline
                pass
        else:
            # Every deadline up to now has passed; run the newest, skip the ones before it.
            newest = max(tick, math.floor((now - self.t0) / self.period))
            self.skipped += newest - tick
            tick = newest
        lateness = max(0.0, now - self.deadline(tick))
        self.ticks += 1
        if lateness > self.late_after:
            self.late += 1
        self.max_lateness = max(self.max_lateness, lateness)
        self._lateness.append(lateness)
        self.next_tick = tick + 1
        return tick

    def recent_lateness(self) -> np.ndarray:
        """How late each of the most recent ticks woke (up to `window` of them, oldest first), seconds."""
        return np.array(self._lateness)

    def stats(self) -> dict[str, float | int]:
        """Counts since start, and lateness percentiles (microseconds) of recent ticks."""
        recent = self.recent_lateness() * 1e6 if self._lateness else np.zeros(1)
        return {
            "fps": self.fps,
            "ticks": self.ticks,
            "late_ticks": self.late,
            "skipped_ticks": self.skipped,
            "lateness_p50_us": float(np.percentile(recent, 50)),
            "lateness_p99_us": float(np.percentile(recent, 99)),
            "lateness_max_us": self.max_lateness * 1e6,
        }


class PacedGarbageCollection:
    """Garbage collected between ticks, not in the middle of one.

    CPython collects when allocations pass a threshold, in whichever thread allocates: in a
    subscriber thread decoding a frame just as the control thread should wake, which then
    waits for the interpreter lock. Within this context, the objects made so far (imports,
    start-up) are frozen, never scanned again (a full collection of them takes 5-10 ms), and
    automatic collection is off; `collect()`, called right after a tick's work, runs the
    collection CPython would have run by then. Leaving the context restores both.
    """

    def __enter__(self) -> PacedGarbageCollection:
        self.was_enabled = gc.isenabled()
        gc.disable()
        gc.collect()  # what start-up left behind goes now, not into the frozen set
        gc.freeze()
        return self

    def collect(self) -> int | None:
        """Collect the oldest generation that is due by CPython's own thresholds; which, or None."""
        counts, thresholds = gc.get_count(), gc.get_threshold()
        for generation in (2, 1, 0):
            if thresholds[generation] and counts[generation] > thresholds[generation]:
                gc.collect(generation)
                return generation
        return None

    def __exit__(self, *exc) -> None:
        gc.unfreeze()
        if self.was_enabled:
            gc.enable()


def choose_cpu(cpu: int | None = None) -> int:
    """`cpu`, checked, or the last CPU this process may use (the first takes more of the machine's
    interrupts); ValueError for one it may not run on. Unchecked where the system cannot pin."""
    if not hasattr(os, "sched_getaffinity"):
        return cpu or 0
    allowed = sorted(os.sched_getaffinity(0))
    if cpu is None:
        return allowed[-1]
    if cpu not in allowed:
        raise ValueError(f"--cpu {cpu}: this process may run only on CPU {', '.join(map(str, allowed))}: "
                         "give one of those")
    return cpu


@contextmanager
def realtime(cpu: int | None = None, priority: int = REALTIME_PRIORITY) -> Iterator[str | None]:
    """Run the calling thread in the real-time scheduling class (SCHED_FIFO at `priority`),
    pinned to `cpu` (see choose_cpu), and restore both on leaving. Yields None, or why it
    could not (with the fix): the caller says so and runs on with the normal scheduler.
    """
    if not hasattr(os, "sched_setscheduler"):
        yield f"real-time scheduling is not available on this system ({os.name}): running with the normal scheduler"
        return
    allowed = os.sched_getaffinity(0)
    cpu = choose_cpu(cpu)
    policy, param = os.sched_getscheduler(0), os.sched_getparam(0)
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(priority))
        permitted = True
    except PermissionError:  # no CAP_SYS_NICE, and an rtprio limit below `priority`
        permitted = False
    if not permitted:
        yield (f"not permitted to use the real-time scheduler (SCHED_FIFO, priority {priority}): running with the "
               f"normal scheduler. To permit it, raise this user's rtprio limit to at least {priority} (`ulimit -r "
               f"{priority}` where the hard limit allows; the hard limit is `USER - rtprio {priority}` in "
               "/etc/security/limits.conf), or give the process CAP_SYS_NICE (in a container: --cap-add SYS_NICE)")
        return
    os.sched_setaffinity(0, {cpu})
    try:
        yield None
    finally:
        os.sched_setaffinity(0, allowed)
        os.sched_setscheduler(0, policy, param)
