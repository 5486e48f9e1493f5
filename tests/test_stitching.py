"""The stitching strategies, each on its defining property."""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from chunkbus.nodes import stitching
from chunkbus.nodes.stitching import Schedule, crossfade, ensemble, ensemble_weights, replace


def f(ticks) -> np.ndarray:
    """A smooth reference trajectory, two joints."""
    t = np.asarray(ticks, dtype=np.float64)[:, None]
    return np.hstack([np.sin(t / 10), np.cos(t / 7)])


def chunk_at(k_obs: int, length: int = 20, offset: float = 0.0) -> np.ndarray:
    return f(range(k_obs, k_obs + length)) + offset


@given(st.integers(0, 100), st.integers(0, 25))
def test_replace_executes_the_new_chunk_from_its_arrival(k_obs, delay):
    old = Schedule(k_obs - 5, np.full((30, 2), 99.0))
    now = k_obs + delay
    new = replace(old, chunk_at(k_obs), k_obs, now)
    if delay >= 20:  # entirely in the past: the old schedule goes on
        assert new.start == now and (new.actions == 99).all()
        return
    assert new.start == now and len(new.actions) == 20 - delay
    np.testing.assert_array_equal(new.actions, f(range(now, k_obs + 20)))
    assert new.action_at(now - 1) is None  # the past part is never executed


def test_crossfade_is_continuous_at_the_switch():
    old = Schedule(0, np.zeros((40, 2)))
    new = crossfade(old, np.full((20, 2), 12.0), k_obs=10, now=13, window=5)
    executed = [old.action_at(12)[0]] + [new.action_at(t)[0] for t in range(13, 20)]
    assert executed == pytest.approx([0, 2, 4, 6, 8, 10, 12, 12])
    # Replace jumps the whole gap at once; crossfade in steps of gap / (window + 1).
    jumps = np.abs(np.diff(executed))
    assert jumps.max() == pytest.approx(12 / 6)
    assert replace(old, np.full((20, 2), 12.0), 10, 13).action_at(13)[0] - old.action_at(12)[0] == 12


@given(st.floats(-50, 50), st.integers(1, 10))
def test_crossfade_steps_are_a_fraction_of_the_disagreement(gap, window):
    old = Schedule(0, chunk_at(0, 40))
    new = crossfade(old, chunk_at(5, 30, offset=gap), k_obs=5, now=8, window=window)
    executed = np.vstack([old.action_at(7), new.actions[: window + 2]])
    smooth_step = np.abs(np.diff(f(range(7, 7 + window + 3)), axis=0)).max()
    assert np.abs(np.diff(executed, axis=0)).max() <= abs(gap) / (window + 1) + smooth_step + 1e-9
    np.testing.assert_allclose(new.actions[window:], chunk_at(5, 30, gap)[3 + window :])


def test_ensemble_weights_each_prediction_by_its_age():
    m = 0.5
    predictions = [1.0, 4.0, 10.0]  # three chunks' predictions for tick 12, oldest first
    schedule = None
    for i, value in enumerate(predictions):
        chunk = np.full((20, 1), value)
        schedule = ensemble(schedule, chunk, k_obs=10 + i, now=10 + i, m=m)
    w = ensemble_weights(3, m)
    assert w == pytest.approx([1, np.exp(-0.5), np.exp(-1)])
    assert schedule.action_at(12)[0] == pytest.approx(np.dot(w, predictions) / w.sum())
    assert schedule.counts[0] == 3  # tick 12 had three predictions


def test_ensemble_matches_lerobots_act_temporal_ensembler():
    from lerobot.policies.act.modeling_act import ACTTemporalEnsembler

    rng = np.random.default_rng(0)
    ensembler = ACTTemporalEnsembler(temporal_ensemble_coeff=0.01, chunk_size=10)
    schedule = None
    for tick in range(25):  # a new chunk every tick, as ACT uses it
        chunk = rng.standard_normal((10, 3))
        expected = ensembler.update(torch.from_numpy(chunk).float()[None])[0].numpy()
        schedule = ensemble(schedule, chunk, k_obs=tick, now=tick, m=0.01)
        np.testing.assert_allclose(schedule.action_at(tick), expected, rtol=1e-5, atol=1e-5)


def test_a_late_chunk_drops_its_past_part_in_every_strategy():
    for merge in (replace, crossfade, ensemble):
        new = merge(None, chunk_at(0), 0, 7)
        assert new.start == 7
        np.testing.assert_allclose(new.actions, f(range(7, 20)))


def test_schedule_bookkeeping():
    schedule = Schedule(5, np.arange(10.0)[:, None])
    assert (schedule.end, schedule.remaining(3), schedule.remaining(12), schedule.remaining(20)) == (15, 10, 3, 0)
    assert schedule.action_at(4) is None and schedule.action_at(14)[0] == 9
    assert schedule.from_tick(8).start == 8 and schedule.from_tick(8).actions[0, 0] == 3


# --- real-time chunking -----------------------------------------------------------------------


def test_the_rtc_prefix_is_the_schedule_then_its_last_action_never_zeros():
    schedule = Schedule(10, np.arange(12, dtype=float).reshape(4, 3))  # ticks 10..13
    hold = np.full(3, -7.0)
    prefix = stitching.rtc_prefix(schedule, 11, 6, hold)
    assert prefix.dtype == np.float32 and prefix.shape == (6, 3)
    np.testing.assert_array_equal(prefix[:3], schedule.actions[1:])  # ticks 11, 12, 13
    np.testing.assert_array_equal(prefix[3:], np.repeat(schedule.actions[-1:], 3, axis=0))  # then it holds
    # Nothing scheduled (yet, or any more): the hold command, what the actuator would send.
    np.testing.assert_array_equal(stitching.rtc_prefix(None, 11, 2, hold), [hold, hold])
    np.testing.assert_array_equal(stitching.rtc_prefix(schedule, 20, 2, hold), [hold, hold])
    later = stitching.rtc_prefix(schedule, 8, 4, hold)  # the schedule starts two ticks later
    np.testing.assert_array_equal(later, [hold, hold, schedule.actions[0], schedule.actions[1]])


def test_a_guided_chunk_replaces_at_arrival_a_late_one_blends_over_its_late_ticks_an_unguided_one_falls_back():
    old = Schedule(0, np.zeros((30, 1)))
    chunk = np.ones((20, 1))
    on_time = stitching.rtc(old, chunk, k_obs=10, now=13, guided_delay=3)
    assert on_time.start == 13 and np.all(on_time.actions == 1)
    late = stitching.rtc(old, chunk, k_obs=10, now=15, guided_delay=3)  # 2 ticks later than guided for
    np.testing.assert_allclose(late.actions[:3, 0], [1 / 3, 2 / 3, 1])
    unguided = stitching.rtc(old, chunk, k_obs=10, now=13, guided_delay=None,
                             fallback=partial(stitching.crossfade, window=4))
    np.testing.assert_allclose(unguided.actions[:5, 0], [0.2, 0.4, 0.6, 0.8, 1])


def test_the_expected_delay_is_the_largest_of_the_recent_ones_not_of_the_whole_session():
    delays = stitching.DelayEstimate(fps=30, window=3)
    assert delays.ticks == 30  # one second until something is measured
    for measured in (20, 4, 5, 3):  # a cold start first
        delays.observe(measured)
    assert delays.ticks == 5
    delays.observe(0)
    assert delays.ticks == 5 and min(delays.delays) == 1  # a reply is merged a tick later at the soonest
