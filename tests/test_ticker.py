"""The fixed-rate ticker: absolute deadlines, late and skipped ticks."""

from __future__ import annotations

import time

import pytest

from chunkbus.bus.ticker import Ticker


class FakeClock:
    """A monotonic clock that moves only when the ticker sleeps or the test does work."""

    def __init__(self, oversleep: float = 0.0):
        self.now = 100.0
        self.oversleep = oversleep  # how late each sleep wakes up
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        assert seconds >= 0
        self.sleeps.append(seconds)
        self.now += seconds + self.oversleep


def ticker(clock: FakeClock, fps: float = 10.0, **kwargs) -> Ticker:
    t = Ticker(fps, clock=clock.clock, sleep=clock.sleep, **kwargs)
    t.start()
    return t


def test_ticks_land_on_absolute_deadlines_without_drift():
    clock = FakeClock()
    t = ticker(clock)
    for k in range(20):
        assert t.wait() == k
        assert clock.now == pytest.approx(100.0 + k * 0.1)
        clock.now += 0.03 + 0.002 * (k % 5)  # work of varying length, under one period
    assert (t.late, t.skipped, t.ticks) == (0, 0, 20)
    # It slept the remainder of each period, not a fixed period after the work:
    # before tick 3 it slept what the 34 ms of tick 2's work left of the period.
    assert clock.sleeps[2] == pytest.approx(0.1 - 0.034)


def test_wakeups_past_the_tolerance_are_counted_late():
    clock = FakeClock(oversleep=0.0005)
    t = ticker(clock, late_after=0.001)
    for _ in range(5):
        t.wait()
    assert t.late == 0
    clock.oversleep = 0.002
    for _ in range(5):
        t.wait()
    assert t.late == 5  # each of the five woke 2 ms late
    stats = t.stats()
    assert stats["late_ticks"] == 5
    assert stats["lateness_max_us"] == pytest.approx(2000, rel=1e-6)


def test_an_overrun_skips_the_ticks_whose_time_has_passed():
    clock = FakeClock()
    t = ticker(clock)
    assert t.wait() == 0
    clock.now += 0.35  # the work of tick 0 took three and a half periods
    assert t.wait() == 3  # ticks 1 and 2 are gone; tick 3 runs at once, 50 ms late
    assert (t.skipped, t.late) == (2, 1)
    assert t.wait() == 4
    assert clock.now == pytest.approx(100.4)
    stats = t.stats()
    assert (stats["ticks"], stats["skipped_ticks"], stats["late_ticks"]) == (3, 2, 1)


def test_late_tick_accounting_on_the_real_clock():
    t = Ticker(100.0)
    t.start()
    seen = []
    for i in range(15):
        seen.append(t.wait())
        if i == 5:
            time.sleep(0.055)  # overrun by more than five periods
    assert seen == sorted(seen) and len(set(seen)) == len(seen)
    assert t.skipped >= 4  # at least ticks 6..9 passed during the overrun
    assert seen[-1] == 14 + t.skipped
    assert t.late >= 1


def test_fps_must_be_positive():
    with pytest.raises(ValueError, match="fps must be positive"):
        Ticker(0)
