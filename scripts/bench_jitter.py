"""Tick lateness of the actuator's control loop while two cameras stream raw 480x640 frames.

Runs the robot host on this machine (two synthetic cameras at 30 fps, raw; the simulated
arm; the actuator) with a broker and a scripted worker, so that the actuator also
assembles observations and stitches chunks as in real use; first at 30 Hz, then at
100 Hz. Lateness is how long after its deadline a tick woke up (the actuator's ticker
measures it and publishes it once a second). The last line is JSON:
{"hz30": {"p50_us", "p99_us", "max_us", "late_ticks", "ticks"}, "hz100": {...}}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_broker import Cluster  # noqa: E402

from chunkbus.bus.endpoints import stats_topic  # noqa: E402
from chunkbus.bus.sockets import Subscriber  # noqa: E402


def run_at(cluster: Cluster, frontend: str, fps: int, seconds: float) -> dict:
    name = f"actuator{fps}"
    cluster.node("actuator", "--broker", frontend, "--service", "sine", "--camera", "front",
                 "--camera", "wrist", "--fps", str(fps), "--name", name)
    with Subscriber([name], [stats_topic(name)]) as stats:
        first = stats.wait(stats_topic(name), timeout=30)
        time.sleep(seconds)
        last = stats.wait(stats_topic(name), timeout=5, newer_than=first.receive_time).message.figures
    cluster.processes[-1].terminate()
    cluster.processes[-1].wait(timeout=10)
    return {
        "p50_us": round(last["lateness_p50_us"], 1),
        "p99_us": round(last["lateness_p99_us"], 1),
        "max_us": round(last["lateness_max_us"], 1),
        "late_ticks": int(last["late_ticks"]),
        "skipped_ticks": int(last["skipped_ticks"]),
        "ticks": int(last["tick"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=8.0, help="per rate")
    args = parser.parse_args()
    os.environ["CHUNKBUS_RUNTIME_DIR"] = tempfile.mkdtemp(prefix="cb-jitter-", dir="/tmp")
    cluster = Cluster()
    try:
        frontend, backend = cluster.broker()
        cluster.worker(backend, "scripted:sine?chunk=50&delay=0.02", "sine")
        for camera in ("front", "wrist"):
            cluster.node("camera", "--name", camera, "--fps", "30", "--width", "640", "--height", "480")
        cluster.node("arm", "--rate", "100")
        figures = {}
        for fps in (30, 100):
            figures[f"hz{fps}"] = run_at(cluster, frontend, fps, args.seconds)
            f = figures[f"hz{fps}"]
            print(f"{fps} Hz: lateness p50 {f['p50_us']:.0f} us, p99 {f['p99_us']:.0f} us, max {f['max_us']:.0f} us, "
                  f"late ticks {f['late_ticks']} of {f['ticks']}")
    finally:
        cluster.stop()
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
