"""Control quality of each stitching strategy, on the same chunks from a flow-matching policy.

The chunks come from chunkbus's flow:sine policy (nodes/policies/flow.py): samples of a Gaussian
mixture over whole chunks around a smooth trajectory (amplitude 20, period 90 ticks, six joints),
drawn with lerobot's Euler integration (10 steps) and, for rtc, guided by lerobot's RTCProcessor.
Its noise is seeded by the request's tick, so strategies asking at the same tick get the same chunk
(rtc the same noise, guided). Every chunk also has its own offset per joint (`--offset`, std 1):
consecutive chunks disagree smoothly, as a real policy's do (with --offset 0 they agree to within
their noise and no strategy has a boundary jump to remove). Two cases: "unimodal" (one mode) and
"bimodal" (two modes `--spread` = 12 apart: a policy that may pick either, chunk by chunk).

The loop runs online in one process at 30 Hz, no sockets. Like the actuator, it asks for a chunk
when the actions left (from this tick on) fall to the delay d plus `--margin`, one request at a
time; the chunk is computed at the request's tick k and merged d ticks later (plus a seeded
`--jitter` of +-ticks, default 0), before that tick's command; when nothing is scheduled the last
command is held. Every strategy asks at the same ticks (their schedules all end where the latest
chunk does), so all run on the same chunks and delays:

  chunkbus  replace, crossfade (5-tick window), ensemble (ACT's exp(-m*i), m = 0.01), and rtc:
            its requests carry prefix = stitching.rtc_prefix(schedule, k, h, hold=last command),
            h = d + `--overlap`, expected_delay = max(d, 1); stitching.rtc merges the reply with
            the delay it was guided for (the other strategies send no prefix)
  LeRobot   its RobotClient's queue update (_aggregate_action_queues) with every aggregate
            function in lerobot.async_inference.configs.AGGREGATE_FUNCTIONS, imported from lerobot

Defaults, measured (see --help): overlap 10 and margin 10 (a margin below the overlap pads the
prefix's tail with the hold command, a target the chunk bends to); max_guidance 10, lerobot's (at
most 9.1 leaves the frozen rows only partly guided; much more overshoots and rtc drifts).

Figures over the ticks after the first chunk arrived (raw action units, per tick): max_jump and
mean_jump, at the ticks a chunk switched in, of |command step - reference step| (max over joints;
the reference is the mode mean, whose step is the same for every mode); rms_jerk (third
difference), max_accel (second difference), rms_error (to the nearest mode at each tick);
mode_switches (consecutive commands nearest to different modes), blended_ticks (commands in the
middle half between the two modes), late_switches (rtc chunks merged later than guided for).
The last line is JSON: {"unimodal": {"d0": {"rtc": {...}, "replace": {...}, ...}, ...}, "bimodal": ...}.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from functools import partial

import numpy as np

from chunkbus.bus import Observation, ObservationRequest
from chunkbus.nodes import stitching
from chunkbus.nodes.policies.flow import FlowPolicy

FPS = 30.0
CASES = {"unimodal": 1, "bimodal": 2}
FIGURES = ("max_jump", "mean_jump", "rms_jerk", "max_accel", "rms_error", "mode_switches", "blended_ticks",
           "late_switches")


class Chunkbus:
    """A chunkbus Schedule merged with one of nodes/stitching.py's strategies."""

    def __init__(self, merge, guided: bool = False):
        self.merge, self.guided, self.schedule = merge, guided, None

    def remaining(self, tick: int) -> int:
        return self.schedule.remaining(tick) if self.schedule is not None else 0

    def take(self, chunk: np.ndarray, k_obs: int, now: int, guided_delay: int | None) -> None:
        if self.guided:
            self.schedule = stitching.rtc(self.schedule, chunk, k_obs, now, guided_delay)
        else:
            self.schedule = self.merge(self.schedule, chunk, k_obs, now)

    def action(self, tick: int) -> np.ndarray | None:
        return self.schedule.action_at(tick) if self.schedule is not None else None


class Lerobot:
    """LeRobot's RobotClient queue update (its _aggregate_action_queues): the queue becomes the new
    chunk's actions for ticks not yet executed, each blended with the queued one for the same tick."""

    def __init__(self, aggregate):
        self.aggregate, self.queue, self.latest = aggregate, {}, -1

    def remaining(self, tick: int) -> int:
        return sum(1 for step in self.queue if step >= tick)

    def take(self, chunk: np.ndarray, k_obs: int, now: int, guided_delay: int | None) -> None:
        incoming = {k_obs + i: a.astype(np.float64) for i, a in enumerate(chunk)}
        self.queue = {step: self.aggregate(self.queue[step], a) if step in self.queue else a
                      for step, a in incoming.items() if step > self.latest}

    def action(self, tick: int) -> np.ndarray | None:
        action = self.queue.pop(tick, None)
        for step in [s for s in self.queue if s < tick]:
            del self.queue[step]
        if action is not None:
            self.latest = tick
        return action


def request(tick: int, prefix: np.ndarray | None = None, delay: int | None = None) -> ObservationRequest:
    observation = Observation(tick=tick, time=tick / FPS, state=np.zeros(6, np.float32))
    return ObservationRequest(robot_id="bench", request_id=f"r{tick}", tick=tick, fps=FPS, send_time=tick / FPS,
                              task="", observations=[observation], prefix=prefix, expected_delay=delay)


def simulate(policy: FlowPolicy, stitcher, delay: int, args, cache: dict) -> tuple[np.ndarray, list[int], int]:
    """Commands per tick (NaN before the first chunk), the ticks a chunk switched in, late rtc merges."""
    rtc = isinstance(stitcher, Chunkbus) and stitcher.guided
    commands = np.full((args.ticks, policy.action_size), np.nan)
    switches, late, last, outstanding = [], 0, None, None
    for tick in range(args.ticks):
        if outstanding is None and stitcher.remaining(tick) <= delay + args.margin:
            if rtc and last is not None:
                expected = max(delay, 1)
                horizon = min(max(delay + args.overlap, expected), policy.chunk)
                guide = (stitching.rtc_prefix(stitcher.schedule, tick, horizon, hold=last), expected)
            else:
                guide = (None, None)
            key = (tick, None if guide[0] is None else guide[0].tobytes(), guide[1])
            if key not in cache:  # unguided chunks are the same for every strategy: computed once
                cache[key] = policy.run([request(tick, *guide)]).results[0]
            jitter = random.Random(args.seed * 7919 + tick).randint(-args.jitter, args.jitter)
            outstanding = (tick + max(0, delay + jitter), tick, cache[key])
        if outstanding is not None and outstanding[0] == tick:
            _, k_obs, result = outstanding
            guided_delay = result.guided[0] if result.guided else None
            stitcher.take(result.actions, k_obs, tick, guided_delay)
            late += int(rtc and guided_delay is not None and tick - k_obs > guided_delay)
            switches.append(tick)
            outstanding = None
        action = stitcher.action(tick)
        last = action if action is not None else last
        if last is not None:
            commands[tick] = last
    return commands, switches, late


def figures(policy: FlowPolicy, commands: np.ndarray, switches: list[int], late: int) -> dict[str, float]:
    start = switches[0]
    c = commands[start:]
    modes = policy.means(start, len(c)).transpose(1, 0, 2)  # (ticks, modes, joints)
    nearest = np.abs(c[:, None, :] - modes).max(axis=2).argmin(axis=1)  # max over joints
    error = c - modes[np.arange(len(c)), nearest]
    step = np.diff(c, axis=0) - np.diff(modes[:, 0], axis=0)  # every mode's step is the reference's
    jumps = [np.abs(step[s - start - 1]).max() for s in switches[1:]]
    # Blended: in the middle half between the modes (they differ by the same offset in every joint).
    between = (c - modes.mean(axis=1)).mean(axis=1)
    blended = np.count_nonzero(np.abs(between) < policy.spread / 4) if policy.modes > 1 else 0
    return {
        "max_jump": float(max(jumps, default=0.0)),
        "mean_jump": float(np.mean(jumps)) if jumps else 0.0,
        "rms_jerk": float(np.sqrt(np.mean(np.diff(c, n=3, axis=0) ** 2))),
        "max_accel": float(np.abs(np.diff(c, n=2, axis=0)).max()),
        "rms_error": float(np.sqrt(np.mean(error**2))),
        "mode_switches": int(np.count_nonzero(np.diff(nearest))),
        "blended_ticks": int(blended),
        "late_switches": late,
    }


def strategies() -> dict:
    from lerobot.async_inference.configs import AGGREGATE_FUNCTIONS

    return {
        "rtc": lambda: Chunkbus(None, guided=True),
        "replace": lambda: Chunkbus(stitching.replace),
        "crossfade": lambda: Chunkbus(partial(stitching.crossfade, window=5)),
        "ensemble": lambda: Chunkbus(partial(stitching.ensemble, m=0.01)),
        **{f"lerobot_{name}": partial(Lerobot, fn) for name, fn in AGGREGATE_FUNCTIONS.items()},
    }


def delays(text: str) -> list[int]:
    out = []
    for part in text.split(","):
        low, _, high = part.partition("-")
        out += list(range(int(low), int(high or low) + 1))
    return out


def print_case(case: str, rows: dict) -> None:
    keys = list(rows)
    names = list(rows[keys[0]])
    metrics = ["max_jump", "rms_jerk", "rms_error"] + (["mode_switches", "blended_ticks"] if case == "bimodal" else [])
    for metric in metrics:
        print(f"{case}: {metric} by delay (ticks)")
        print(f"  {'strategy':26}" + "".join(f"{key:>7}" for key in keys))
        for name in names:
            values = [rows[key][name][metric] for key in keys]
            cells = "".join(f"{v:7d}" if isinstance(v, int) else f"{v:7.2f}" for v in values)
            print(f"  {name:26}{cells}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ticks", type=int, default=1000, help="ticks per run (about 20-30 chunk switches)")
    parser.add_argument("--delays", default="0-15", help="delays in ticks: 0-15, or 0,3,6")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--margin", type=int, default=10, help="ask when the actions left fall to d + margin")
    parser.add_argument("--overlap", type=int, default=10, help="rtc: rows guided past the delay")
    parser.add_argument("--jitter", type=int, default=0, help="arrival jitter, +- ticks (seeded)")
    parser.add_argument("--spread", type=float, default=12.0, help="bimodal: distance between the modes")
    parser.add_argument("--offset", type=float, default=1.0, help="std of each chunk's own offset per joint")
    parser.add_argument("--max-guidance", type=float, default=10.0, help="rtc: RTCConfig.max_guidance_weight")
    args = parser.parse_args()
    start = time.perf_counter()
    results = {}
    for case, modes in CASES.items():
        policy = FlowPolicy(f"flow:sine?modes={modes}&spread={args.spread}&chunk=50&steps=10"
                            f"&max_guidance={args.max_guidance}&offset={args.offset}&seed={args.seed}")
        results[case] = {}
        for delay in delays(args.delays):
            cache: dict = {}
            row = results[case][f"d{delay}"] = {}
            for name, make in strategies().items():
                row[name] = figures(policy, *simulate(policy, make(), delay, args, cache))
        print_case(case, results[case])
    print(f"({time.perf_counter() - start:.1f} s)")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
