"""One robot over an emulated internet link (scripts/link_emulator.py), every setting side by side in one run.

A robot host (two synthetic 640x480 cameras at 30 fps, the simulated SO-101, the actuator at 30 Hz)
talks to a broker and one worker through a link with a round trip, +-20% jitter each way, a capped
uplink and a 100 Mbit/s downlink. The worker is a policy with a realistic service time: a
scripted one taking 50 ms (crossfade) or a flow-matching one taking 50 ms (rtc), each saying it
reads two 224x224 cameras, and the tiny SmolVLA (the demo's, 240x320 inputs) at the headline
link. What is sent: raw native frames, model-sized raw, model-sized JPEG (the default).

Per case: bytes per request, round trip p50/p99 (the actuator's own, over the run), holds per
minute after the first chunk, chunks used, late rtc switches, the worker's inference time. The
headline case, 100 ms and 20 Mbit/s with the default send settings, also runs for
--headline-seconds (2 minutes) against its aim: no hold, and round-trip p50 at most RTT +
service time + 40 ms.

The last line is JSON: {"cases": [{"rtt_ms", "uplink_mbit", "send", "strategy", "policy",
"bytes_per_request", "rtt_p50_ms", "rtt_p99_ms", "holds_per_min", "chunks_used", "late_switches",
"service_ms", "seconds", "default_send"}, ...], "headline": {...the long case..., "aim_met"}}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

SENDS = {"native raw": ("native", "raw"), "model raw": ("model", "raw"), "model jpeg": ("model", "jpeg")}
DEFAULT_SEND = "model jpeg"  # the actuator's defaults: --send-size model --send-encoding jpeg
CAMERAS = "cameras=front,wrist&size=224x224"
POLICIES = {"scripted": f"scripted:sine?chunk=50&delay=0.05&{CAMERAS}",
            "flow": f"flow:sine?chunk=50&delay=0.05&{CAMERAS}",
            "smolvla": "demo:smolvla"}


def case(cluster_type, policy: str, rtt: float, uplink: float, send: str, strategy: str, seconds: float) -> dict:
    """Run one robot through one link for `seconds` after its first chunk; its figures."""
    from chunkbus.bus.sockets import Subscriber

    cluster = cluster_type()
    try:
        frontend, backend = cluster.broker()
        worker = ["--default-task", "pick up the cube"] if policy == "smolvla" else []
        cluster.node("worker", "--broker", backend, "--policy", POLICIES[policy], "--service", "svc",
                     "--threads", "1", *worker)
        link = cluster.start(sys.executable, str(Path(__file__).parent / "link_emulator.py"),
                             "--to", frontend.removeprefix("tcp://"), "--rtt", str(rtt), "--jitter", "0.2",
                             "--up", str(uplink), "--down", "100", stdout=subprocess.PIPE)
        through = json.loads(link.stdout.readline())["listen"]
        cluster.node("arm", "--max-step", "100")
        for name in ("front", "wrist"):
            cluster.node("camera", "--name", name, "--fps", "30", "--width", "640", "--height", "480")
        size, encoding = SENDS[send]
        cluster.node("actuator", "--broker", through, "--service", "svc", "--fps", "30", "--strategy", strategy,
                     "--camera", "front", "--camera", "wrist", "--send-size", size, "--send-encoding", encoding,
                     "--ttl", "2.0", "--task", "pick up the cube")
        inference, round_trips = [], []
        with Subscriber(["actuator"], ["actuator/stats", "actuator/chunk"], rcvhwm=1000,
                        on_message=lambda r: inference.append(r.message.timings.get("inference", 0.0))
                        if r.topic == "actuator/chunk" else None) as bus:
            deadline = time.monotonic() + 120
            while not inference and time.monotonic() < deadline:  # the first chunk: the link is up
                time.sleep(0.1)
            start = bus.wait("actuator/stats", timeout=10).message.figures
            begun = time.monotonic()
            while time.monotonic() - begun < seconds:
                stats = bus.wait("actuator/stats", timeout=10, newer_than=time.monotonic()).message.figures
                round_trips.append((stats["rtt_p50_ms"], stats["rtt_p99_ms"]))
            end = stats
    finally:
        cluster.stop()
    minutes = seconds / 60
    return {
        "rtt_ms": rtt, "uplink_mbit": uplink, "send": send, "strategy": strategy, "policy": policy,
        "bytes_per_request": int(end["request_bytes"]),
        "rtt_p50_ms": round(float(np.median([p50 for p50, _ in round_trips])), 1),
        "rtt_p99_ms": round(float(max(p99 for _, p99 in round_trips)), 1),
        "holds_per_min": round((end["holds"] - start["holds"]) / minutes, 1),
        "chunks_used": int(end["chunks_used"] - start["chunks_used"]),
        "late_switches": int(end["rtc_late"] - start["rtc_late"]),
        "service_ms": round(float(np.median(inference)) * 1000, 1) if inference else None,
        "seconds": seconds, "default_send": send == DEFAULT_SEND,
    }


def cases(quick: bool) -> list[tuple]:
    """(policy, rtt, uplink, send, strategy): every send and strategy at the headline link; the
    default send across the other links; the tiny SmolVLA at the headline link."""
    if quick:
        return [("scripted", 100, 20, DEFAULT_SEND, "crossfade"), ("flow", 30, 100, "native raw", "rtc")]
    grid = [("scripted" if s == "crossfade" else "flow", 100, 20, send, s) for send in SENDS
            for s in ("crossfade", "rtc")]
    others = [("scripted", rtt, up, DEFAULT_SEND, "crossfade") for rtt in (30, 100, 200) for up in (10, 20, 100)
              if (rtt, up) != (100, 20)]
    return grid + others + [("smolvla", 100, 20, DEFAULT_SEND, s) for s in ("crossfade", "rtc")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20.0, help="per case, after its first chunk")
    parser.add_argument("--headline-seconds", type=float, default=120.0, help="the long headline case; 0: skip")
    parser.add_argument("--quick", action="store_true", help="two short cases (a smoke test)")
    args = parser.parse_args()
    if args.quick:
        args.seconds, args.headline_seconds = 4.0, 0.0
    os.environ["CHUNKBUS_RUNTIME_DIR"] = tempfile.mkdtemp(prefix="cb-wan-", dir="/tmp")
    os.environ["DISPLAY"] = ""
    from bench_broker import Cluster

    results = []
    for policy, rtt, up, send, strategy in cases(args.quick):
        result = case(Cluster, policy, rtt, up, send, strategy, args.seconds)
        results.append(result)
        print(f"{policy:8} rtt {rtt:>3} ms up {up:>3} Mbit/s {send:10} {strategy:9}: {result['bytes_per_request']:>8} "
              f"B/request, round trip p50 {result['rtt_p50_ms']} p99 {result['rtt_p99_ms']} ms, holds "
              f"{result['holds_per_min']}/min, {result['chunks_used']} chunks, service {result['service_ms']} ms",
              flush=True)
    figures = {"cases": results}
    if args.headline_seconds:
        headline = case(Cluster, "scripted", 100, 20, DEFAULT_SEND, "crossfade", args.headline_seconds)
        headline["aim_met"] = (headline["holds_per_min"] == 0
                               and headline["rtt_p50_ms"] <= 100 + (headline["service_ms"] or 0) + 40)
        figures["headline"] = headline
        print(f"headline, {args.headline_seconds:.0f} s at 100 ms and 20 Mbit/s, default send: holds "
              f"{headline['holds_per_min']}/min, round trip p50 {headline['rtt_p50_ms']} ms (aim: at most "
              f"{100 + (headline['service_ms'] or 0) + 40:.0f}), aim met: {headline['aim_met']}", flush=True)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
