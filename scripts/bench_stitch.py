"""How smooth each stitching strategy is, on the same chunks delivered with the same delays.

A generator makes chunks of a known smooth reference trajectory r(t) (six joints, sines),
each with its own error, as a real policy's consecutive chunks disagree: a random offset
per chunk and per joint, plus a slowly varying bias along the chunk. A chunk is requested
every `--every` ticks and arrives d ticks later (d in 0, 3, 6, 10); its first d actions
are then in the past. Each strategy turns the arriving chunks into one command per tick:

  chunkbus   replace, crossfade (5-tick window), ensemble (ACT's exp(-m*i), m = 0.01),
             from chunkbus.nodes.stitching
  LeRobot    its RobotClient's queue update (_aggregate_action_queues: actions for ticks
             already executed are skipped, the queue becomes the new chunk's actions, each
             blended with the queued one for the same tick) with every aggregate function in
             lerobot.async_inference.configs.AGGREGATE_FUNCTIONS, imported from lerobot

When nothing is scheduled for a tick, the last command is held (as both systems do).
Figures, over the ticks after the first chunk arrived: the largest jump between consecutive
commands, the RMS jerk (third difference per tick), and the RMS error against r(t). The
same generator and seed feed every strategy. The last line is JSON keyed by delay, then
strategy: {"d3": {"replace": {"max_jump", "rms_jerk", "rms_error"}, ...}, ...}.
"""

from __future__ import annotations

import argparse
import json
from functools import partial

import numpy as np
import torch

from chunkbus.nodes import stitching

JOINTS = 6


def reference(ticks: np.ndarray) -> np.ndarray:
    t = ticks[:, None].astype(float)
    periods = np.array([90, 120, 75, 150, 60, 200], float)
    return 30 * np.sin(2 * np.pi * t / periods + np.arange(JOINTS))


def make_chunks(ticks: int, every: int, length: int, seed: int) -> list[tuple[int, np.ndarray]]:
    """(k_obs, chunk) pairs: the reference, off by an offset and a slowly varying bias."""
    rng = np.random.default_rng(seed)
    chunks = []
    for k_obs in range(0, ticks, every):
        offset = rng.normal(0, 1.0, JOINTS)
        drift = rng.normal(0, 0.05, JOINTS)  # per tick along the chunk
        bias = np.arange(length)[:, None] * drift[None, :]
        chunks.append((k_obs, reference(np.arange(k_obs, k_obs + length)) + offset + bias))
    return chunks


def run_chunkbus(merge, chunks, delay: int, ticks: int) -> np.ndarray:
    arrivals = {k_obs + delay: (k_obs, chunk) for k_obs, chunk in chunks}
    schedule, last, executed = None, None, []
    for tick in range(ticks):
        if tick in arrivals:
            k_obs, chunk = arrivals[tick]
            schedule = merge(schedule, chunk, k_obs, tick)
        action = schedule.action_at(tick) if schedule is not None else None
        last = action if action is not None else last
        executed.append(last)
    return executed


def run_lerobot(aggregate, chunks, delay: int, ticks: int) -> np.ndarray:
    """LeRobot's RobotClient queue update, tick by tick (its _aggregate_action_queues)."""
    arrivals = {k_obs + delay: (k_obs, chunk) for k_obs, chunk in chunks}
    queue: dict[int, torch.Tensor] = {}
    latest, last, executed = -1, None, []
    for tick in range(ticks):
        if tick in arrivals:
            k_obs, chunk = arrivals[tick]
            incoming = {k_obs + i: torch.from_numpy(a) for i, a in enumerate(chunk)}
            queue = {
                step: aggregate(queue[step], action) if step in queue else action
                for step, action in incoming.items()
                if step > latest
            }
        action = queue.pop(tick, None)
        for step in [s for s in queue if s < tick]:
            del queue[step]
        if action is not None:
            latest, last = tick, action.numpy()
        executed.append(last)
    return executed


def figures(executed: list, ticks: int) -> dict[str, float]:
    start = next(i for i, a in enumerate(executed) if a is not None)
    commands = np.vstack(executed[start:])
    error = commands - reference(np.arange(start, ticks))
    return {
        "max_jump": float(np.abs(np.diff(commands, axis=0)).max()),
        "rms_jerk": float(np.sqrt(np.mean(np.diff(commands, n=3, axis=0) ** 2))),
        "rms_error": float(np.sqrt(np.mean(error**2))),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ticks", type=int, default=3000)
    parser.add_argument("--every", type=int, default=10, help="ticks between requests")
    parser.add_argument("--length", type=int, default=50, help="actions per chunk")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    from lerobot.async_inference.configs import AGGREGATE_FUNCTIONS

    strategies = {
        "replace": partial(run_chunkbus, stitching.replace),
        "crossfade": partial(run_chunkbus, partial(stitching.crossfade, window=5)),
        "ensemble": partial(run_chunkbus, partial(stitching.ensemble, m=0.01)),
        **{f"lerobot_{name}": partial(run_lerobot, fn) for name, fn in AGGREGATE_FUNCTIONS.items()},
    }
    chunks = make_chunks(args.ticks, args.every, args.length, args.seed)
    results = {}
    for delay in (0, 3, 6, 10):
        results[f"d{delay}"] = {
            name: figures(run(chunks, delay, args.ticks), args.ticks) for name, run in strategies.items()
        }
        row = results[f"d{delay}"]
        smoothest = min(row, key=lambda name: row[name]["rms_jerk"])
        print(f"delay {delay:2} ticks: smoothest {smoothest}")
        for name, f in row.items():
            print(
                f"  {name:28} max jump {f['max_jump']:6.2f}  rms jerk {f['rms_jerk']:6.3f}  "
                f"rms error {f['rms_error']:6.3f}"
            )
    print(json.dumps(results))


if __name__ == "__main__":
    main()
