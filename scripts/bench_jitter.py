"""Tick lateness of the actuator's control loop while two cameras stream raw 480x640 frames,
side by side with a loop paced the way lerobot's own control loops pace.

Runs the robot host on this machine (two synthetic cameras at 30 fps, raw; the simulated
arm) with a broker and a scripted worker. Each loop runs in its own process, one after the
other, at 30 Hz and then at 100 Hz:

  hz30, hz100         the actuator (the same Actuator `chunkbus actuator` runs, with its
                      default options), which also assembles observations, asks for chunks
                      and stitches them as in real use;
  realtime            the same with --realtime (SCHED_FIFO, one CPU), and whether the
                      system permitted it;
  lerobot_loop        a loop paced as lerobot 0.6's record and teleoperate loops are: work,
                      then `precise_sleep(max(1/fps - dt, 0))` (lerobot.utils.robot_utils;
                      on Linux a plain time.sleep); each iteration reads the newest frame of
                      both cameras and the arm's state (as lerobot's SO follower reads its
                      cameras: read_latest) and publishes a command.

Lateness is how long after it was due an iteration began: for the actuator, tick k's wake
against t0 + k/fps; for the lerobot-paced loop, an iteration's start against the time its
pacing aimed at, the previous start plus 1/fps (its own target: that loop does not keep to
a fixed clock, it drifts by each lateness, which `rate_hz` shows). Every iteration of the
measured window counts; the first --warmup seconds of each loop are left out (start-up: the
first chunk, the first JPEG encoding, caches), and their maximum is reported apart
(`warmup_max_us`). The last line is JSON: {"hz30": {"p50_us", "p99_us", "max_us",
"late_ticks", "ticks", ...}, "hz100": {...}, "realtime": {"permitted", "hz30", "hz100"},
"lerobot_loop": {"hz30": {...}, "hz100": {...}}}; late_ticks counts those over 1 ms.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_broker import Cluster  # noqa: E402

from chunkbus.bus.endpoints import COMMAND, STATE, camera_node, camera_topic  # noqa: E402

CAMERAS = ("front", "wrist")
RATES = (30, 100)
LATE_AFTER = 0.001  # as the actuator's ticker counts late ticks


def summary(lateness: np.ndarray, warmup_ticks: int) -> dict:
    """The figures of one loop from how late each iteration began (seconds, in order)."""
    measured = lateness[warmup_ticks:] * 1e6
    if len(measured) == 0:
        raise RuntimeError(f"no iteration after the {warmup_ticks} of the warm-up: give a longer --seconds")
    return {
        "p50_us": round(float(np.percentile(measured, 50)), 1),
        "p99_us": round(float(np.percentile(measured, 99)), 1),
        "max_us": round(float(measured.max()), 1),
        "late_ticks": int((measured > LATE_AFTER * 1e6).sum()),
        "ticks": len(measured),
        "warmup_max_us": round(float(lateness[:warmup_ticks].max() * 1e6), 1) if warmup_ticks else 0.0,
    }


def actuator_loop(broker: str, fps: int, seconds: float, realtime: bool) -> dict:
    """The actuator, run as `chunkbus actuator` runs it, stopped after `seconds` of ticks."""
    from chunkbus.bus.lifecycle import run_node
    from chunkbus.bus.log import configure_logging
    from chunkbus.nodes.actuator import Actuator, ActuatorConfig

    configure_logging(f"actuator{fps}")  # to stderr, as the command's
    config = ActuatorConfig(broker=broker, service="sine", fps=fps, name=f"actuator{fps}", realtime=realtime,
                            cameras={c: f"observation.images.{c}" for c in CAMERAS})
    actuator = Actuator(config)

    def stop_after_ticking() -> None:
        while actuator.ticker is None or actuator.ticker.ticks == 0:
            if actuator.stop_event.wait(0.01):
                return
        time.sleep(seconds)
        actuator.stop()

    threading.Thread(target=stop_after_ticking, daemon=True).start()
    run_node(actuator)
    ticker = actuator.ticker
    if ticker is None or ticker.ticks > len(ticker.recent_lateness()):
        raise RuntimeError("the actuator's ticker did not keep every tick: give a shorter --seconds")
    return {"lateness": ticker.recent_lateness().tolist(), "skipped_ticks": ticker.skipped,
            "permitted": actuator.realtime}


def lerobot_loop(fps: int, seconds: float) -> dict:
    """A loop paced as lerobot_record / lerobot_teleoperate pace theirs, on the same inputs."""
    from lerobot.utils.robot_utils import precise_sleep

    from chunkbus.bus.messages import Command
    from chunkbus.bus.sockets import Publisher, Subscriber

    topics = [STATE] + [camera_topic(c) for c in CAMERAS]
    with Subscriber(["arm"] + [camera_node(c) for c in CAMERAS], topics) as inputs:
        publisher = Publisher(f"lerobot{fps}")
        try:
            for topic in topics:
                inputs.wait(topic, timeout=30)
            control_interval = 1 / fps
            starts = []
            end = time.perf_counter() + seconds
            while (start_loop_t := time.perf_counter()) < end:
                starts.append(start_loop_t)
                # robot.get_observation(): the state, and each camera's newest frame (read_latest)
                state = inputs.latest(STATE).message
                observation = {"observation.state": state.positions,
                               **{f"observation.images.{c}": inputs.latest(camera_topic(c)).message.image
                                  for c in CAMERAS}}
                action = observation["observation.state"]  # a teleoperator that holds the arm where it is
                publisher.publish(COMMAND, Command(len(starts), len(starts), start_loop_t, list(state.names), action))
                dt_s = time.perf_counter() - start_loop_t
                precise_sleep(max(control_interval - dt_s, 0.0))
        finally:
            publisher.close()
    starts = np.array(starts)
    lateness = np.maximum(0.0, np.diff(starts) - control_interval)  # each start against the one before + 1/fps
    return {"lateness": lateness.tolist(), "rate_hz": round(float((len(starts) - 1) / (starts[-1] - starts[0])), 2)}


def run_child(kind: str, fps: int, args, *extra: str) -> dict:
    """One loop in its own process (as each node runs in its own); its JSON line."""
    command = [sys.executable, __file__, "--child", kind, "--fps", str(fps),
               "--seconds", str(args.warmup + args.seconds), *extra]
    done = subprocess.run(command, capture_output=True, text=True, timeout=args.warmup + args.seconds + 120)
    if done.returncode != 0:
        raise RuntimeError(f"{kind} at {fps} Hz failed ({done.returncode}): {done.stderr[-2000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    figures = summary(np.array(result.pop("lateness")), round(args.warmup * fps))
    return {**figures, **result}


def line(name: str, f: dict) -> str:
    return (f"{name}: lateness p50 {f['p50_us']:.0f} us, p99 {f['p99_us']:.0f} us, max {f['max_us']:.0f} us, "
            f"late ticks {f['late_ticks']} of {f['ticks']} (warm-up max {f['warmup_max_us']:.0f} us)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=8.0, help="measured, per loop and rate")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds left out at the start of each loop")
    parser.add_argument("--child", choices=["actuator", "realtime", "lerobot"], help=argparse.SUPPRESS)
    parser.add_argument("--fps", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--broker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child == "lerobot":
        return print(json.dumps(lerobot_loop(args.fps, args.seconds)))
    if args.child:
        return print(json.dumps(actuator_loop(args.broker, args.fps, args.seconds, args.child == "realtime")))
    os.environ["CHUNKBUS_RUNTIME_DIR"] = tempfile.mkdtemp(prefix="cb-jitter-", dir="/tmp")
    cluster = Cluster()
    figures: dict = {}
    try:
        frontend, backend = cluster.broker()
        cluster.worker(backend, "scripted:sine?chunk=50&delay=0.02", "sine")
        for camera in CAMERAS:
            cluster.node("camera", "--name", camera, "--fps", "30", "--width", "640", "--height", "480")
        cluster.node("arm", "--rate", "100")
        for fps in RATES:
            f = figures[f"hz{fps}"] = run_child("actuator", fps, args, "--broker", frontend)
            f.pop("permitted")
            print(line(f"actuator {fps} Hz", f))
        figures["realtime"], figures["lerobot_loop"] = {}, {}
        for fps in RATES:
            f = figures["realtime"][f"hz{fps}"] = run_child("realtime", fps, args, "--broker", frontend)
            figures["realtime"]["permitted"] = f.pop("permitted")
            print(line(f"actuator --realtime {fps} Hz", f) + ("" if figures["realtime"]["permitted"]
                                                              else " (not permitted: normal scheduler)"))
        for fps in RATES:
            f = figures["lerobot_loop"][f"hz{fps}"] = run_child("lerobot", fps, args)
            print(line(f"lerobot-paced loop {fps} Hz", f) + f", {f['rate_hz']} iterations/s")
    finally:
        cluster.stop()
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
