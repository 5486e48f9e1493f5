"""The fixed-rate ticker: absolute deadlines, late and skipped ticks, the spin before each
deadline; garbage collected between ticks; the actuator's --realtime."""

from __future__ import annotations

import ctypes
import gc
import json
import os
import subprocess
import sys
import time
import weakref
from pathlib import Path

import pytest

from chunkbus.bus.ticker import PacedGarbageCollection, Ticker, choose_cpu


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


class SteppingClock(FakeClock):
    """A FakeClock whose every reading takes `step` seconds, as reading a real clock does."""

    def __init__(self, step: float):
        super().__init__()
        self.step = step
        self.readings = 0

    def clock(self) -> float:
        self.readings += 1
        self.now += self.step
        return self.now


def test_the_spin_sleeps_to_shortly_before_each_deadline_and_never_returns_early():
    clock = SteppingClock(step=0.00001)
    t = Ticker(10.0, spin=0.002, clock=clock.clock, sleep=clock.sleep)
    t.start()
    for k in range(10):
        assert t.wait() == k
        assert t.deadline(k) <= clock.now < t.deadline(k) + 2 * clock.step  # on time, to a clock reading
        clock.now += 0.03  # the tick's work
    # Each sleep ended 2 ms before the deadline; what was left was spent reading the clock.
    assert all(s == pytest.approx(0.1 - 0.03 - 0.002, abs=1e-4) for s in clock.sleeps[1:])
    assert clock.readings < 10 * (0.002 / clock.step + 5)  # the spin is bounded by `spin`
    assert (t.late, t.skipped) == (0, 0)


def test_with_a_spin_on_the_real_clock_no_tick_returns_before_its_deadline():
    t = Ticker(200.0, spin=0.0005)
    for _ in range(20):
        tick = t.wait()
        assert time.monotonic() >= t.deadline(tick)
    assert t.ticks == 20


def test_the_spin_must_be_shorter_than_a_period():
    with pytest.raises(ValueError, match="spin must be at least 0 and shorter than a period"):
        Ticker(100.0, spin=0.01)


def test_paced_garbage_collection_freezes_start_up_collects_when_due_and_restores():
    class Cycle:  # garbage only the cycle collector frees
        def __init__(self):
            self.me = self

    assert gc.isenabled()
    with PacedGarbageCollection() as garbage:
        assert not gc.isenabled() and gc.get_freeze_count() > 0
        cycle = weakref.ref(Cycle())
        assert garbage.collect() is None and cycle() is not None  # nothing due yet: nothing runs
        junk = [Cycle() for _ in range(2 * gc.get_threshold()[0])]
        del junk
        assert garbage.collect() is not None
        assert cycle() is None
    assert gc.isenabled() and gc.get_freeze_count() == 0
    gc.disable()
    try:
        with PacedGarbageCollection():
            pass
        assert not gc.isenabled()  # as it was
    finally:
        gc.enable()


def test_choose_cpu_takes_an_allowed_cpu_and_names_them_for_another():
    allowed = sorted(os.sched_getaffinity(0))
    assert choose_cpu() == allowed[-1] and choose_cpu(allowed[0]) == allowed[0]
    with pytest.raises(ValueError, match=rf"--cpu 4096: this process may run only on CPU {allowed[0]}"):
        choose_cpu(4096)


# --- the actuator's --realtime, in a process of its own: the real system call, not a mock ---------

ACTUATOR_LOOP = """
import gc, json, os, sys, threading, time
from chunkbus.bus.log import configure_logging
from chunkbus.nodes.actuator import Actuator, ActuatorConfig

configure_logging("actuator")  # to stderr, as the command's

# No broker, arm or cameras: the loop ticks all the same (no observation, so no request).
actuator = Actuator(ActuatorConfig(broker=sys.argv[1], realtime=True, n_obs_steps=1))
loop = threading.get_native_id()
before = dict(policy=os.sched_getscheduler(0), cpus=sorted(os.sched_getaffinity(0)))
during = {}

def watch():
    while actuator.ticker is None or actuator.ticker.ticks < 5:
        time.sleep(0.005)
    during.update(policy=os.sched_getscheduler(loop), cpus=sorted(os.sched_getaffinity(loop)),
                  gc_enabled=gc.isenabled(), frozen=gc.get_freeze_count() > 0)
    actuator.stop()

threading.Thread(target=watch, daemon=True).start()
try:
    actuator.loop()
finally:
    for part in (actuator.client, actuator.inputs, actuator.control, actuator.publisher):
        part.close()
after = dict(policy=os.sched_getscheduler(0), cpus=sorted(os.sched_getaffinity(0)), gc_enabled=gc.isenabled(),
             frozen=gc.get_freeze_count() > 0)
print(json.dumps({"before": before, "during": during, "after": after, "ticks": actuator.ticker.ticks,
                  "realtime": actuator.realtime}))
"""


def without_cap_sys_nice() -> None:
    """In a child before exec: drop CAP_SYS_NICE from the bounding set, so that even root may not
    use SCHED_FIFO (past its rtprio limit, 0 by default). Not permitted to anyone else, who has
    no CAP_SYS_NICE anyway."""
    ctypes.CDLL(None).prctl(24, 23, 0, 0, 0)  # PR_CAPBSET_DROP, CAP_SYS_NICE


def actuator_loop(tmp_path, **popen) -> tuple[dict, str]:
    result = subprocess.run([sys.executable, "-c", ACTUATOR_LOOP, f"ipc://{tmp_path}/no-broker"], capture_output=True,
                            text=True, timeout=60, **popen)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.splitlines()[-1]), result.stderr


def realtime_permitted(**popen) -> bool:
    probe = "import os; os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(20))"
    return subprocess.run([sys.executable, "-c", probe], capture_output=True, timeout=30, **popen).returncode == 0


def test_realtime_refused_says_how_to_permit_it_in_one_warning_and_the_loop_runs(tmp_path):
    if realtime_permitted(preexec_fn=without_cap_sys_nice):
        pytest.skip("this user may use SCHED_FIFO even without CAP_SYS_NICE (an rtprio limit): nothing to refuse")
    figures, log = actuator_loop(tmp_path, preexec_fn=without_cap_sys_nice)
    (warning,) = [line for line in log.splitlines() if "--realtime" in line]
    for fix in ("not permitted", "ulimit -r 20", "rtprio", "/etc/security/limits.conf", "CAP_SYS_NICE",
                "running with the normal scheduler"):
        assert fix in warning
    assert figures["ticks"] >= 5 and figures["realtime"] is False
    assert figures["during"]["policy"] == figures["before"]["policy"] == os.SCHED_OTHER
    assert figures["during"]["cpus"] == figures["after"]["cpus"]  # not pinned either
    # Garbage is collected between ticks while the loop runs, as CPython does by itself after.
    assert figures["during"]["gc_enabled"] is False and figures["during"]["frozen"] is True
    assert figures["after"]["gc_enabled"] is True and figures["after"]["frozen"] is False


def test_realtime_runs_the_loop_in_sched_fifo_on_one_cpu_and_restores_both(tmp_path):
    if not realtime_permitted():
        pytest.skip("this system does not permit SCHED_FIFO to this user (the refusal is tested above)")
    figures, log = actuator_loop(tmp_path)
    assert "--realtime" not in log
    allowed = sorted(os.sched_getaffinity(0))
    assert figures["realtime"] is True and figures["ticks"] >= 5
    assert figures["during"]["policy"] == os.SCHED_FIFO and figures["during"]["cpus"] == [allowed[-1]], figures
    # Restored to what the process had (the normal scheduler, unless it inherited another).
    assert figures["after"]["policy"] == figures["before"]["policy"] and figures["after"]["cpus"] == allowed, figures


def test_actuator_cpu_option_needs_realtime_and_an_allowed_cpu():
    chunkbus = str(Path(sys.executable).parent / "chunkbus")
    result = subprocess.run([chunkbus, "actuator", "--service", "act", "--cpu", "0"], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 2 and "--cpu pins the control loop of --realtime: give --realtime too" in result.stderr
    result = subprocess.run([chunkbus, "actuator", "--service", "act", "--realtime", "--cpu", "4096"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 78 and "--cpu 4096: this process may run only on CPU" in result.stderr
