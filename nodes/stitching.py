"""How the actuator merges an arriving action chunk into its schedule. Pure: arrays in,
arrays out, no I/O, no clock.

A Schedule holds the actions for consecutive ticks from `start` on. A chunk requested at
tick `k_obs` holds the actions for ticks k_obs, k_obs + 1, ...; when it arrives at tick
`now`, its first `now - k_obs` actions are in the past and are never executed. Each
strategy returns the new schedule from `now` on:

  replace    switch to the new chunk at `now`
  crossfade  blend the old schedule into the new chunk over `window` ticks
  ensemble   ACT's temporal ensembling: each tick's action is the average of every chunk's
             prediction for it, weighted exp(-m * i), i = 0 for the oldest prediction
  rtc        real-time chunking: the chunk was generated to agree with the schedule's actions
             up to the tick it was expected (its guided delay), so it replaces the schedule at
             arrival; one that arrives later than that is blended in over the late ticks, and
             an unguided one falls back to another strategy

`rtc_prefix` is what a request for real-time chunking carries: the schedule from its tick on,
padded with the hold command where it runs dry; `DelayEstimate` the delay it expects.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np


@dataclass
class Schedule:
    start: int  # the tick of actions[0]
    actions: np.ndarray  # (n, action size), float64
    # Ensemble only: how many chunks predicted each tick's action, and the sum of their weights.
    counts: np.ndarray = field(default=None)  # type: ignore[assignment]
    weights: np.ndarray = field(default=None)  # type: ignore[assignment]

    @property
    def end(self) -> int:
        """The first tick after the schedule."""
        return self.start + len(self.actions)

    def remaining(self, tick: int) -> int:
        """Actions scheduled for `tick` and later."""
        return max(0, self.end - max(tick, self.start))

    def action_at(self, tick: int) -> np.ndarray | None:
        if self.start <= tick < self.end:
            return self.actions[tick - self.start]
        return None

    def from_tick(self, tick: int) -> Schedule:
        """The part of the schedule from `tick` on."""
        skip = min(max(0, tick - self.start), len(self.actions))
        return Schedule(
            max(tick, self.start),
            self.actions[skip:],
            None if self.counts is None else self.counts[skip:],
            None if self.weights is None else self.weights[skip:],
        )


def _future(chunk: np.ndarray, k_obs: int, now: int) -> Schedule | None:
    """The chunk's actions from `now` on, or None when all of them are in the past."""
    delay = now - k_obs
    if delay >= len(chunk):
        return None
    return Schedule(now if delay >= 0 else k_obs, np.asarray(chunk[max(delay, 0) :], dtype=np.float64))


def replace(old: Schedule | None, chunk: np.ndarray, k_obs: int, now: int) -> Schedule | None:
    new = _future(chunk, k_obs, now)
    if new is None:
        return old.from_tick(now) if old is not None else None
    return new


def crossfade(
    old: Schedule | None, chunk: np.ndarray, k_obs: int, now: int, window: int = 5
) -> Schedule | None:
    """Blend from the old schedule to the new chunk over `window` ticks.

    Where both have an action for tick now + i (i < window), the action is
    (1 - w_i) * old + w_i * new with w_i = (i + 1) / (window + 1): the first executed action
    stays close to the old schedule and the last blended one close to the new chunk.
    """
    new = _future(chunk, k_obs, now)
    if new is None:
        return old.from_tick(now) if old is not None else None
    if old is None:
        return new
    blended = new.actions.copy()
    for i in range(min(window, len(blended))):
        previous = old.action_at(new.start + i)
        if previous is None:
            break
        w = (i + 1) / (window + 1)
        blended[i] = (1 - w) * previous + w * new.actions[i]
    return Schedule(new.start, blended)


def ensemble_weights(count: int, m: float) -> np.ndarray:
    """The weights exp(-m * i) of `count` predictions, oldest (i = 0) first."""
    return np.exp(-m * np.arange(count))


def ensemble(
    old: Schedule | None, chunk: np.ndarray, k_obs: int, now: int, m: float = 0.01
) -> Schedule | None:
    """ACT temporal ensembling, updated online as each chunk arrives.

    For a tick already predicted by n chunks with weighted average a, the new chunk's
    prediction p gets weight exp(-m * n): a' = (a * W + p * exp(-m * n)) / (W + exp(-m * n)),
    W being the sum of the earlier weights. With m > 0 older predictions weigh more, as in
    ACT (Zhao et al. 2023) and lerobot's ACTTemporalEnsembler.
    """
    new = _future(chunk, k_obs, now)
    if new is None:
        return old.from_tick(now) if old is not None else None
    n = len(new.actions)
    counts = np.ones(n, dtype=np.int64)
    weights = np.ones(n)
    actions = new.actions.copy()
    if old is not None and old.counts is not None:
        old = old.from_tick(new.start)
        overlap = min(n, len(old.actions))
        if overlap:
            w_new = np.exp(-m * old.counts[:overlap])
            total = old.weights[:overlap] + w_new
            actions[:overlap] = (
                old.actions[:overlap] * old.weights[:overlap, None] + new.actions[:overlap] * w_new[:, None]
            ) / total[:, None]
            counts[:overlap] = old.counts[:overlap] + 1
            weights[:overlap] = total
    return Schedule(new.start, actions, counts, weights)


def rtc(
    old: Schedule | None, chunk: np.ndarray, k_obs: int, now: int, guided_delay: int | None,
    fallback: Callable[..., Schedule | None] = crossfade,
) -> Schedule | None:
    """Merge a chunk made for real-time chunking, guided to agree with `old` for its first
    `guided_delay` ticks (None: not guided, so `fallback` merges it)."""
    if guided_delay is None:
        return fallback(old, chunk, k_obs, now)
    late = now - k_obs - guided_delay
    if late <= 0 or old is None:
        return replace(old, chunk, k_obs, now)  # it already agrees with what ran
    return crossfade(old, chunk, k_obs, now, window=late)  # the late ticks were not guided


def rtc_prefix(schedule: Schedule | None, tick: int, horizon: int, hold: np.ndarray) -> np.ndarray:
    """What the actuator will command for ticks tick .. tick + horizon - 1: the schedule where it
    has actions, then `hold` (the command it would repeat). Never zeros: a zero row would be a
    target the new chunk is pulled to."""
    prefix = np.repeat(np.asarray(hold, np.float32)[None, :], horizon, axis=0)
    if schedule is not None:
        part = schedule.from_tick(tick)
        offset = part.start - tick  # > 0 when the schedule starts after tick
        rows = max(0, min(horizon - offset, len(part.actions)))
        prefix[offset : offset + rows] = part.actions[:rows]
        if rows and offset + rows < horizon:
            prefix[offset + rows :] = part.actions[rows - 1]  # it holds its last action after
    return prefix


class DelayEstimate:
    """The delay, in ticks, after which a request's reply will be merged: the largest of the
    last `window` measured delays (not a session-long maximum, which one cold start would
    inflate for good), `initial` until one is measured. The actuator's first request carries
    no prefix (there is nothing yet to agree with), so its guided ones always have a measure."""

    def __init__(self, fps: float, window: int = 10, initial: int | None = None):
        self.delays: deque[int] = deque(maxlen=window)
        self.initial = initial if initial is not None else math.ceil(fps)  # 1 s: nothing measured yet

    def observe(self, ticks: int) -> None:
        self.delays.append(max(1, ticks))

    @property
    def ticks(self) -> int:
        return max(self.delays) if self.delays else self.initial


STRATEGIES = {"replace": replace, "crossfade": crossfade, "ensemble": ensemble, "rtc": rtc}
