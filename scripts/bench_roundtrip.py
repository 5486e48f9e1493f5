"""Round trip of one observation against LeRobot's own async inference, side by side in one run.

One observation (two 480x640x3 uint8 images, a 6-float state, a task string) goes from a
client to a policy and comes back as an action chunk (50 x 6), over loopback TCP:

  chunkbus  client -> broker -> worker -> broker -> client (`BrokerClient`, `chunkbus broker`,
            the worker of scripts/chunkbus_bench_worker.py), raw frames and JPEG frames
  LeRobot   its PolicyServer, driven the way its RobotClient drives it: its gRPC stubs, its
            pickled TimedObservation in chunks, GetActions (scripts/lerobot_async_side.py;
            its docstring lists every setting; the one changed is inference_latency = 0,
            a sleep that only paces chunks to a robot's rate)

The round trips of the two are taken in turn (both running at once), so a slow moment of
this shared machine hits both alike. Two cases, each with the same checkpoint (an ACT with
random weights, 3x480x640 images, saved with save_pretrained into a temporary folder and
loaded from there on both sides):
  act       the policy runs on the CPU
  overhead  on both sides the one call to the policy's predict_action_chunk is replaced by
            a function returning zeros of the chunk's shape (chunkbus: the worker's
            policy.predict_action_chunk; LeRobot: PolicyServer._get_action_chunk, its only
            caller). Everything else, each framework's own decoding, pre- and
            post-processing, serialisation and transport, runs as is.
And four clients at once (overhead case): four chunkbus clients share one broker and one
worker (--max-batch 4, its intended layout); four LeRobot clients each get their own
PolicyServer (its intended layout: one robot per server). Torch runs one thread per
process on both sides (--threads), the same for both.

And the cost of real-time chunking (rtc case, chunkbus only: LeRobot's async server has none):
a `chunkbus worker --policy flow:sine` (a flow-matching policy, 10 steps, 50 x 6 chunks) asked in
turn for a chunk without a prefix and for one guided by a 15-row prefix with a delay of 5, the
same requests otherwise; the worker's own inference seconds (from the reply's timings) and the
round trips, p50 and p99 of each, and the extra per chunk.

And the cost of encryption (curve case, chunkbus only: LeRobot's server has no security): two
brokers with the trivial worker, one plaintext and one with CURVE on both ports (keys made by
chunkbus's own key code, as `chunkbus keys new` makes them), asked in turn with the same
two-camera observation; p50 and p99 of each and the extra.

And what an ipc backend saves where broker and worker share a host (ipc case, chunkbus only):
a third broker with the trivial worker, its worker on ipc://, asked in turn with the two of
the curve case; p50 and p99 against the plaintext one (its worker on loopback TCP).

In the overhead case the worker's own stages come from each reply's timings (medians, ms):
decode, prepare, preprocess, inference, postprocess; the rest of a round trip is transport
(client, broker, the worker's link thread, both ways).

The last line is JSON: {"overhead": {"chunkbus": {"p50_ms", "p99_ms"}, "lerobot": {...},
"ratio_p50", "ratio_p99", "chunkbus_worker_ms": {"decode", ...}}, "act": {...}, "jpeg": {"p50_ms", "p99_ms"},
"four_clients": {"chunkbus_rps", "lerobot_rps"}, "rtc": {"unguided": {"p50_ms", "p99_ms",
"inference_p50_ms"}, "guided": {...}, "extra_inference_p50_ms", "extra_round_trip_p50_ms"},
"curve": {"plain": {"p50_ms", "p99_ms"}, "curve": {...}, "extra_p50_ms", "extra_p99_ms"},
"ipc": {"tcp": {"p50_ms", "p99_ms"}, "ipc": {...}, "saved_p50_ms", "saved_p99_ms"}}
(ratio = LeRobot / chunkbus).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def observation(request_id: str, jpeg: bool = False, seed: int = 0):
    from chunkbus.bus import JpegImage, Observation, ObservationRequest

    rng = np.random.default_rng(seed)
    images = {}
    for camera in ("front", "wrist"):
        pixels = rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)
        images[f"observation.images.{camera}"] = JpegImage.encode(pixels) if jpeg else pixels
    state = rng.standard_normal(6).astype(np.float32)
    now = time.monotonic()
    return ObservationRequest(robot_id="bench", request_id=request_id, tick=0, fps=30.0, send_time=now,
                              task="pick up the cube", observations=[Observation(0, now, state, images)])


def warmup(count: int) -> int:
    """Round trips per side not counted before `count` that are, the same for both sides: 10
    before the overhead case's 300, 3 before the ACT case's 20 (each 0.6 s on a CPU)."""
    return max(3, count // 30)


def interleaved(chunkbus_client, lerobot_client, count: int, jpeg: bool = False, timings: list | None = None):
    """Round trips taken in turn, chunkbus then LeRobot then LeRobot then chunkbus ..., so
    that both see the same machine: a slow moment on a shared host hits both alike. The
    worker's timings of each counted chunkbus reply go to `timings`."""
    skip = warmup(count)
    requests = [observation(f"rt-{i}", jpeg, seed=i % 4) for i in range(count + skip)]
    ours, theirs, replies = [], [], []

    def ours_once(request):
        start = time.perf_counter()
        replies.append(chunkbus_client.request("bench", request, timeout=120).timings)
        return time.perf_counter() - start

    for i, request in enumerate(requests):
        if i % 2:
            pair = (ours_once(request), lerobot_client.round_trip(i) if lerobot_client else None)
        else:
            their = lerobot_client.round_trip(i) if lerobot_client else None
            pair = (ours_once(request), their)
        if i >= skip:
            ours.append(pair[0])
            if pair[1] is not None:
                theirs.append(pair[1])
    if timings is not None:
        timings += replies[skip:]
    return ours, theirs


def worker_stages(timings: list[dict]) -> dict[str, float]:
    """The median of each stage the worker timed, in ms."""
    stages = ("decode", "prepare", "preprocess", "inference", "postprocess")
    return {stage: round(float(np.median([t[stage] for t in timings])) * 1000, 3) for stage in stages}


def chunkbus_throughput(frontend: str, clients: int, seconds: float) -> float:
    from chunkbus.bus.client import BrokerClient

    counts = [0] * clients
    barrier = threading.Barrier(clients + 1)
    end = [float("inf")]

    def run(index: int) -> None:
        with BrokerClient(frontend) as client:
            request = observation(f"tp-{index}", seed=index)
            client.request("bench", request, timeout=120)  # warm up
            barrier.wait()
            while time.perf_counter() < end[0]:
                client.request("bench", request, timeout=120)
                if time.perf_counter() <= end[0]:
                    counts[index] += 1

    threads = [threading.Thread(target=run, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    barrier.wait()
    end[0] = time.perf_counter() + seconds
    for thread in threads:
        thread.join()
    return sum(counts) / seconds


def start_chunkbus(cluster, checkpoint: Path, trivial: bool, keys: Path | None = None, ipc: bool = False) -> str:
    """A broker and a bench worker (with CURVE when `keys`, a folder from make_keys; the worker
    on an ipc:// backend when `ipc`); returns the broker's frontend."""
    secured = [] if keys is None else ["--curve-secret", str(keys / "broker.key_secret"), "--no-capture",
                                       "--allow-robots", str(keys / "robots"), "--allow-workers", str(keys / "workers")]
    backend = "tcp://127.0.0.1:*"
    if ipc:  # a second broker on this runtime directory needs its own name
        backend = f"ipc://{os.environ['CHUNKBUS_RUNTIME_DIR']}/broker-ipc.backend"
        secured += ["--name", "broker-ipc"]
    frontend, backend = cluster.broker(*secured, backend=backend)
    args = [sys.executable, str(Path(__file__).parent / "chunkbus_bench_worker.py"), backend, str(checkpoint)]
    if keys is not None:
        args += ["--curve-secret", str(keys / "worker.key_secret"), "--broker-key", str(keys / "broker.key")]
    cluster.start(*args, *(["--trivial"] if trivial else [])).wait_ready(timeout=600)
    return frontend


def make_keys(folder: Path) -> Path:
    """Key pairs for a broker, the robot `bench` and a worker, and the broker's allow-lists."""
    from chunkbus.bus.security import new_key_pair

    for name, allowed in (("broker", None), ("bench", "robots"), ("worker", "workers")):
        public, _ = new_key_pair(name, folder)
        if allowed:
            (folder / allowed).mkdir(exist_ok=True)
            (folder / allowed / public.name).write_bytes(public.read_bytes())
    return folder


def backend_costs(checkpoint: Path, count: int) -> tuple[dict, dict]:
    """The trivial worker behind three brokers, asked in turn: plaintext with the worker on
    loopback TCP, plaintext with it on ipc://, and CURVE on both ports. What CURVE adds, and
    what ipc saves, against the first."""
    from bench_broker import Cluster

    from chunkbus.bus.client import BrokerClient
    from chunkbus.bus.security import ClientKeys, read_key_pair, read_public_key

    keys = make_keys(Path(tempfile.mkdtemp(prefix="cb-keys-")))
    cluster = Cluster()
    try:
        plain_frontend = start_chunkbus(cluster, checkpoint, trivial=True)
        ipc_frontend = start_chunkbus(cluster, checkpoint, trivial=True, ipc=True)
        curve_frontend = start_chunkbus(cluster, checkpoint, trivial=True, keys=keys)
        client_keys = ClientKeys(read_key_pair(keys / "bench.key_secret"), read_public_key(str(keys / "broker.key")))
        with (BrokerClient(plain_frontend) as plain, BrokerClient(ipc_frontend) as ipc,
              BrokerClient(curve_frontend, keys=client_keys) as curve):
            trips = {kind: percentiles(values)
                     for kind, values in in_turn({"plain": plain, "ipc": ipc, "curve": curve}, count).items()}
    finally:
        cluster.stop()
    curve = {"plain": trips["plain"], "curve": trips["curve"]}
    ipc = {"tcp": trips["plain"], "ipc": trips["ipc"]}
    for stat in ("p50", "p99"):
        curve[f"extra_{stat}_ms"] = round(trips["curve"][f"{stat}_ms"] - trips["plain"][f"{stat}_ms"], 3)
        ipc[f"saved_{stat}_ms"] = round(trips["plain"][f"{stat}_ms"] - trips["ipc"][f"{stat}_ms"], 3)
    return curve, ipc


def in_turn(clients: dict, count: int) -> dict[str, list[float]]:
    """Round trips of the same observations through each client in turn (the order alternating),
    after a warm-up: seconds, by the clients' names."""
    trips: dict[str, list[float]] = {kind: [] for kind in clients}
    skip = warmup(count)
    for i in range(count + skip):
        order = list(clients.items()) if i % 2 else list(clients.items())[::-1]
        for kind, client in order:
            start = time.perf_counter()
            client.request("bench", observation(f"{kind}-{i}", seed=i % 4), timeout=120)
            if i >= skip:
                trips[kind].append(time.perf_counter() - start)
    return trips


def guidance_cost(count: int) -> dict:
    """A flow worker, asked in turn for unguided and guided chunks: what guidance adds."""
    from bench_broker import Cluster

    from chunkbus.bus.client import BrokerClient

    cluster = Cluster()
    try:
        frontend, backend = cluster.broker()
        cluster.worker(backend, "flow:sine?chunk=50&steps=10", "flow")
        samples = {"unguided": ([], []), "guided": ([], [])}
        with BrokerClient(frontend) as client:
            for i in range(count + 3):
                for kind in ("unguided", "guided"):
                    request = observation(f"rtc-{kind}-{i}")
                    request.tick = i
                    if kind == "guided":
                        request.prefix = np.zeros((15, 6), np.float32) + i % 5
                        request.expected_delay = 5
                    start = time.perf_counter()
                    reply = client.request("flow", request, timeout=60)
                    if i >= 3:  # warm-up
                        samples[kind][0].append(time.perf_counter() - start)
                        samples[kind][1].append(reply.timings["inference"])
    finally:
        cluster.stop()
    result = {kind: {**percentiles(trips), "inference_p50_ms": round(float(np.median(inference)) * 1000, 3)}
              for kind, (trips, inference) in samples.items()}
    result["extra_inference_p50_ms"] = round(result["guided"]["inference_p50_ms"]
                                             - result["unguided"]["inference_p50_ms"], 3)
    result["extra_round_trip_p50_ms"] = round(result["guided"]["p50_ms"] - result["unguided"]["p50_ms"], 3)
    return result


def percentiles(seconds: list[float]) -> dict[str, float]:
    p50, p99 = np.percentile(np.array(seconds) * 1000, [50, 99])
    return {"p50_ms": round(float(p50), 3), "p99_ms": round(float(p99), 3)}


def compare(chunkbus: list[float], lerobot: list[float]) -> dict:
    ours, theirs = percentiles(chunkbus), percentiles(lerobot)
    return {"chunkbus": ours, "lerobot": theirs, "ratio_p50": round(theirs["p50_ms"] / ours["p50_ms"], 2),
            "ratio_p99": round(theirs["p99_ms"] / ours["p99_ms"], 2)}


def plot(path: str, samples: dict[str, list[float]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(samples), figsize=(6 * len(samples), 4))
    for axis, (case, pair) in zip(np.atleast_1d(axes), samples.items()):
        for name, values in pair.items():
            ms = np.sort(np.array(values) * 1000)
            axis.plot(ms, np.arange(1, len(ms) + 1) / len(ms), label=f"{name} (p50 {np.median(ms):.1f} ms)")
        axis.set_xscale("log")
        axis.set_xlabel("round trip, ms (log scale)")
        axis.set_ylabel("fraction of requests")
        axis.set_title(f"{case}: one observation, two 480x640 images")
        axis.grid(True, which="both", alpha=0.3)
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=300, help="round trips per side, overhead case")
    parser.add_argument("--act-count", type=int, default=20, help="round trips per side, ACT case")
    parser.add_argument("--seconds", type=float, default=5.0, help="four-client phase, per side")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process, both sides")
    parser.add_argument("--plot", default=None, help="write the latency distribution here (PNG)")
    parser.add_argument("--clients", type=int, default=4, help="clients at once, the throughput case (four_clients)")
    parser.add_argument("--quick", action="store_true", help="a few of each, two clients at once (a smoke test)")
    args = parser.parse_args()
    if args.quick:
        args.count, args.act_count, args.seconds, args.clients = 10, 2, 1.0, 2
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # inherited by every server process
    os.environ["CHUNKBUS_RUNTIME_DIR"] = tempfile.mkdtemp(prefix="cb-roundtrip-", dir="/tmp")
    import lerobot_async_side as lerobot
    from bench_broker import Cluster

    from chunkbus.bus.client import BrokerClient

    checkpoint = lerobot.make_act_checkpoint(Path(tempfile.mkdtemp(prefix="cb-act-")) / "act")
    results, samples = {}, {}
    for case, trivial, count in (("overhead", True, args.count), ("act", False, args.act_count)):
        cluster = Cluster()
        port = free_port()
        chunk = (lerobot.CHUNK, lerobot.ACTION_DIM) if trivial else None
        try:
            frontend = start_chunkbus(cluster, checkpoint, trivial)
            with lerobot.start_policy_server(port, chunk), BrokerClient(frontend) as ours_client, \
                    lerobot.LerobotClient(port, checkpoint).connect() as their_client:
                timings: list[dict] = []
                ours, theirs = interleaved(ours_client, their_client, count, timings=timings)
                if trivial:
                    results["jpeg"] = percentiles(interleaved(ours_client, None, count, jpeg=True)[0])
            if trivial:
                chunkbus_rps = chunkbus_throughput(frontend, args.clients, args.seconds)
        finally:
            cluster.stop()
        results[case] = compare(ours, theirs)
        if trivial:
            stages = results[case]["chunkbus_worker_ms"] = worker_stages(timings)
            print(f"{case}: chunkbus's worker, medians: " + ", ".join(f"{k} {v:.2f} ms" for k, v in stages.items()),
                  flush=True)
        samples[case] = {"chunkbus": ours, "LeRobot async": theirs}
        print(f"{case}: chunkbus p50 {results[case]['chunkbus']['p50_ms']:.1f} ms p99 "
              f"{results[case]['chunkbus']['p99_ms']:.1f} ms | LeRobot p50 {results[case]['lerobot']['p50_ms']:.1f} ms "
              f"p99 {results[case]['lerobot']['p99_ms']:.1f} ms | ratio p50 {results[case]['ratio_p50']:.1f}x "
              f"p99 {results[case]['ratio_p99']:.1f}x", flush=True)
        if trivial:
            ports = [free_port() for _ in range(args.clients)]
            servers = [lerobot.start_policy_server(p, (lerobot.CHUNK, lerobot.ACTION_DIM)) for p in ports]
            try:
                lerobot_rps = lerobot.throughput(ports, clients=args.clients, seconds=args.seconds,
                                                 checkpoint=checkpoint)
            finally:
                for server in servers:
                    server.stop()
            results["four_clients"] = {"chunkbus_rps": round(chunkbus_rps, 1), "lerobot_rps": round(lerobot_rps, 1)}
            print(
                f"{args.clients} clients: chunkbus {chunkbus_rps:.1f} requests/s, LeRobot {lerobot_rps:.1f} requests/s",
                flush=True,
            )
    rtc = results["rtc"] = guidance_cost(args.count)
    print(f"rtc (flow:sine, 50x6, 10 steps): inference p50 {rtc['unguided']['inference_p50_ms']:.2f} ms unguided, "
          f"{rtc['guided']['inference_p50_ms']:.2f} ms guided (+{rtc['extra_inference_p50_ms']:.2f} ms); round trip "
          f"p50 +{rtc['extra_round_trip_p50_ms']:.2f} ms", flush=True)
    curve, ipc = results["curve"], results["ipc"] = backend_costs(checkpoint, args.count)
    print(f"curve (overhead case): round trip p50 {curve['plain']['p50_ms']:.2f} ms plaintext, "
          f"{curve['curve']['p50_ms']:.2f} ms CURVE (+{curve['extra_p50_ms']:.2f}); p99 {curve['plain']['p99_ms']:.2f} "
          f"vs {curve['curve']['p99_ms']:.2f} ms (+{curve['extra_p99_ms']:.2f})", flush=True)
    print(f"ipc (overhead case): round trip p50 {ipc['tcp']['p50_ms']:.2f} ms with the worker on loopback TCP, "
          f"{ipc['ipc']['p50_ms']:.2f} ms on ipc:// (saves {ipc['saved_p50_ms']:.2f}); p99 {ipc['tcp']['p99_ms']:.2f} "
          f"vs {ipc['ipc']['p99_ms']:.2f} ms (saves {ipc['saved_p99_ms']:.2f})", flush=True)
    if args.plot:
        plot(args.plot, samples)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
