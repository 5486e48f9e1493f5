"""The flow-matching test policy (flow:sine): samples follow its modes, guidance holds the prefix.

Tolerances (raw units) were measured over 3 seeds x 57 ticks: unguided chunks stay within 0.17 of
their mode (sigma 0.3); guided towards the other mode (d = 6, h = 12), the frozen rows are within
0.015 of the prefix (12 away unguided); towards the mode shifted by 3, within 0.28 (9% of the
shift: lerobot's last Euler step, guidance weight 9.1 at t = 0.1, moves 91% of the way).
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from chunkbus.bus import Observation, ObservationRequest
from chunkbus.nodes.policies import BadRequest, PolicyLoadError, load_policy
from chunkbus.nodes.policies.flow import FlowPolicy

SIGMA = 0.3


def request(tick: int, prefix=None, delay=None, request_id: str = "") -> ObservationRequest:
    observation = Observation(tick=tick, time=time.monotonic(), state=np.zeros(6, np.float32))
    return ObservationRequest(robot_id="so101", request_id=request_id or f"r{tick}", tick=tick, fps=30.0,
                              send_time=time.monotonic(), task="", observations=[observation],
                              prefix=None if prefix is None else np.asarray(prefix, np.float32),
                              expected_delay=delay)


@pytest.fixture(scope="module")
def one() -> FlowPolicy:
    return load_policy(f"flow:sine?modes=1&sigma={SIGMA}")


@pytest.fixture(scope="module")
def two() -> FlowPolicy:
    return load_policy(f"flow:sine?modes=2&spread=12&sigma={SIGMA}")


def chunk(policy: FlowPolicy, *args, **kwargs) -> np.ndarray:
    result = policy.run([request(*args, **kwargs)]).results[0]
    assert result.error is None
    return result.actions


def distances(policy: FlowPolicy, tick: int, actions: np.ndarray) -> np.ndarray:
    """The chunk's largest distance to each mode's mean."""
    return np.abs(actions[None] - policy.means(tick)).max(axis=(1, 2))


def test_it_describes_itself_as_scripted_with_rtc(one):
    model = one.describe()
    assert (model.type, model.name, model.scripted, model.inputs) == ("flow:sine", "flow:sine", True, {})
    assert (model.action_size, model.chunk_size) == (6, 50)
    assert (model.rtc.schedule, model.rtc.max_guidance_weight, model.rtc.flow_steps) == ("LINEAR", 10.0, 10)


def test_unguided_chunks_follow_the_one_mode(one):
    for tick in (0, 17, 400):
        actions = chunk(one, tick)
        assert actions.shape == (50, 6) and actions.dtype == np.float32
        assert distances(one, tick, actions)[0] < 3 * SIGMA


def test_with_two_modes_each_chunk_is_near_one_not_in_between(two):
    picked = []
    for tick in range(20):
        near, far = np.sort(distances(two, tick, chunk(two, tick)))
        assert near < 3 * SIGMA and far > 12 - 3 * SIGMA
        picked.append(int(np.argmin(distances(two, tick, chunk(two, tick)))))
    assert set(picked) == {0, 1}


def test_the_same_request_gives_the_same_chunk_and_guidance_leaves_no_trace(one):
    first = chunk(one, 30)
    chunk(one, 30, one.means(30)[0, :8] + 3, 3)  # a guided call in between
    np.testing.assert_array_equal(chunk(one, 30), first)
    assert not np.array_equal(chunk(one, 31), first)


@pytest.mark.parametrize("tick", [0, 17, 40])
def test_a_prefix_from_the_other_mode_is_followed(two, tick):
    d, h = 6, 12
    unguided = chunk(two, tick)
    other = two.means(tick)[np.argmax(distances(two, tick, unguided)), :h]
    result = two.run([request(tick, other, d)]).results[0]
    assert result.guided == (d, h)
    guided_error = np.abs(result.actions[:d] - other[:d]).max()
    unguided_error = np.abs(unguided[:d] - other[:d]).max()
    assert guided_error < 0.05 and guided_error * 5 < unguided_error
    assert distances(two, tick, result.actions).min() < 3 * SIGMA  # a whole chunk of that mode


@pytest.mark.parametrize("tick", [0, 17, 40])
def test_a_prefix_off_the_mode_is_matched_over_the_frozen_rows(one, tick):
    d, h, shift = 6, 12, 3.0  # 10 sigma off
    prefix = one.means(tick)[0, :h] + shift
    guided = chunk(one, tick, prefix, d)
    guided_error = np.abs(guided[:d] - prefix[:d]).max()
    unguided_error = np.abs(chunk(one, tick)[:d] - prefix[:d]).max()
    assert guided_error < 0.35 and guided_error * 5 < unguided_error


def test_a_mixed_batch_equals_one_by_one_and_bad_requests_are_named(two):
    mu = {k: two.means(k)[0] for k in range(10, 20)}
    bad_width = request(13, mu[13][:6, :5], 2)
    bad_delay = request(16, mu[16][:6], 7)
    nan = mu[17][:6].copy()
    nan[2, 3] = np.nan
    batch = [request(10), request(11, mu[11][:6], 2), bad_width, request(12, mu[12][:9], 4), request(14),
             request(15, mu[15][:6], 2), bad_delay, request(17, nan, 2), request(18, mu[18][:9], 4)]
    results = two.run(batch).results
    assert [r.guided for r in results] == [None, (2, 6), None, (4, 9), None, (2, 6), None, None, (4, 9)]
    for r, message in zip((results[2], results[6], results[7]), ("prefix:", "expected_delay:", "prefix:")):
        assert isinstance(r.error, BadRequest) and str(r.error).startswith(message) and r.actions is None
    assert "non-finite" in str(results[7].error)
    for req, r in zip(batch, results):
        if r.error is None:
            alone = two.run([req]).results[0]
            assert alone.guided == r.guided
            np.testing.assert_allclose(r.actions, alone.actions, rtol=0, atol=1e-5)


def test_run_times_the_batch_and_sleeps_its_delay():
    policy = load_policy("flow:sine?delay=0.05&chunk=10")
    start = time.perf_counter()
    batch = policy.run([request(0)])
    assert time.perf_counter() - start >= 0.05 and batch.timings["inference"] >= 0.05


@pytest.mark.parametrize("spec, words", [
    ("flow:sine?chunk=50&bogus=1", ["bogus", "known:"]),
    ("flow:square", ["unknown flow policy 'square'"]),
    ("flow:sine?schedule=CUBIC", ["CUBIC", "LINEAR"]),
])
def test_a_bad_spec_is_a_load_error(spec, words):
    with pytest.raises(PolicyLoadError) as raised:
        load_policy(spec)
    assert all(word in str(raised.value) for word in words)


@pytest.mark.parametrize("offset", [0.0, 0.5])
def test_the_velocity_is_exact(offset):
    """v = (x - E[A | x_t]) / t with E[A | x_t] = (x + t^2 grad log p_t(x)) / (1 - t) (Tweedie), p_t the
    mixture's density at time t: modes N((1 - t) mu_m, (1 - t)^2 S + t^2 I), S = s^2 I + c^2 (offsets)."""
    import torch

    policy = load_policy(f"flow:sine?chunk=4&actions=2&modes=2&spread=1&sigma=0.3&offset={offset}&scale=2&center=1")
    mu = torch.from_numpy((policy.means(3) - 1) / 2)[None]  # model space, (1, modes, 4, 2)
    s2, c2 = (0.3 / 2) ** 2, (offset / 2) ** 2
    cov = s2 * torch.eye(8, dtype=torch.float64) + c2 * torch.kron(torch.ones(4, 4), torch.eye(2)).double()
    x = torch.randn(1, 4, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for t in (0.9, 0.5, 0.2):
        point = x.reshape(8).clone().requires_grad_(True)
        modes = [torch.distributions.MultivariateNormal((1 - t) * mu[0, m].reshape(8),
                                                        (1 - t) ** 2 * cov + t**2 * torch.eye(8, dtype=torch.float64))
                 for m in range(2)]
        log_p = torch.logsumexp(torch.stack([m.log_prob(point) for m in modes]), 0)
        (score,) = torch.autograd.grad(log_p, point)
        expected = (point.detach() + t**2 * score) / (1 - t)
        v = policy.velocity(mu)(x, torch.tensor([t], dtype=torch.float64))
        np.testing.assert_allclose((x - t * v).reshape(8).numpy(), expected.numpy(), rtol=1e-9, atol=1e-9)
