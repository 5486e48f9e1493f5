"""A fixed-rate clock: tick k is due at t0 + k / fps on the monotonic clock.

The ticker sleeps to each absolute deadline (never ``sleep(period)``, which drifts by
the time the work took). A tick that wakes more than ``late_after`` past its deadline
is counted late. When the work overran so far that later deadlines have passed too,
those ticks are skipped and counted: a control loop must not fire a burst of stale
commands to catch up, and tick k keeps meaning the time t0 + k / fps.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable

import numpy as np


class Ticker:
    def __init__(
        self,
        fps: float,
        *,
        late_after: float = 0.001,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        window: int = 10_000,
    ):
        if not fps > 0:
            raise ValueError(f"fps must be positive, got {fps}")
        self.fps = fps
        self.period = 1.0 / fps
        self.late_after = late_after
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
        now = self._clock()
        if now < self.deadline(tick):
            self._sleep(self.deadline(tick) - now)
            now = self._clock()
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

    def stats(self) -> dict[str, float | int]:
        """Counts since start, and lateness percentiles (microseconds) of recent ticks."""
        recent = np.array(self._lateness) * 1e6 if self._lateness else np.zeros(1)
        return {
            "fps": self.fps,
            "ticks": self.ticks,
            "late_ticks": self.late,
            "skipped_ticks": self.skipped,
            "lateness_p50_us": float(np.percentile(recent, 50)),
            "lateness_p99_us": float(np.percentile(recent, 99)),
            "lateness_max_us": self.max_lateness * 1e6,
        }
