"""A fleet of simulated robots through one broker to a pool of scripted workers, beside a plain
zmq.proxy moving the same traffic, on this machine over loopback TCP, all measured in one run.

Each robot asks as a 30 Hz actuator with 30-action chunks does: once a second (`--rate`), one
observation of two raw 480x640x3 uint8 frames and a 6-float state (about 1.8 MB: 100 robots are
about 180 MB/s), with the actuator's ttl (0.5 s) and replace key (its robot id). Every robot has
its own robot id and its own DEALER socket speaking MDP client frames (bus/mdp.py); their send
times are spread evenly over the period. One process, this one, drives them all: on 2 cores the
load generator, the broker (or the proxy) and the workers share the CPUs, so each figure
includes the others' scheduling; the proxy case pays exactly the same, which is why the two
cases are run in turn, per N, in one run.

The workers are one program (this script's `_worker` role) in two modes: an MDP worker of the
chunkbus broker, or a plain peer of the proxy's DEALER backend. Each answers a request
`--service-ms` after it came (40 ms: between ACT's and a VLA's time per chunk on a cloud GPU;
what matters is that requests overlap, about 4 in flight at 100 robots) with a 30x6 action
chunk, and stamps into the reply when it received the request and when it sent the answer.
The broker gives work only to a worker that runs nothing (a batch of up to `--capacity`), so
the pool is `--workers` 8 of capacity 1: twice the 4 busy at 100 robots, so that a request
finds an idle worker and the figure is the hop's, not a queue's (with fewer, the broker's
queue wait is part of what it adds: it is the broker that holds the request). The proxy deals
in turn to the same number of workers, which take whatever comes at once.

Per N (robots), a warm-up of one period, then `--seconds` measured; each case reports:

  added_p50/p99/max_us         latency the hop adds: (worker receive - client send) + (client
                               receive - worker send), all on CLOCK_MONOTONIC (time.monotonic_ns,
                               system-wide on Linux), for the requests sent in the window
  req_per_s, mb_per_s          requests answered per second; request and reply bytes per second
  sent, answered, errors,      requests sent in the window; of them, answered with a chunk,
  timed_out                    with an error reply (by code), with nothing within `--timeout`
  cpu_us_per_request           the broker's (or proxy's) own CPU time, all its threads (zmq's I/O
                               thread among them, from /proc/PID/task/*/schedstat), over the
                               window and the drain after it, per reply it passed on meanwhile

The broker is the real `chunkbus broker` with a deployment's defaults (`--max-queue 64`,
`--max-per-robot 16`, the capture for taps on; `--no-capture` measures it off). The JSON line
ends it: `by_robots` per N (the broker's figures, with the proxy's under "proxy"),
`max_robots_p99_under_5ms` (the largest N whose added p99 is under 5 ms with every request
answered with a chunk, 0 if none; the proxy's too), and both CPU figures at the largest N with
their ratio. Aims: 100 robots with added p99 under 5 ms; the broker's CPU per request within
3x of the proxy's.
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import json
import math
import os
import struct
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import zmq

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_broker import Cluster, wait_for_workers  # noqa: E402

from chunkbus.bus import ActionChunk, ErrorReply, Observation, ObservationRequest, decode, encode, mdp  # noqa: E402
from chunkbus.bus.client import BrokerClient  # noqa: E402
from chunkbus.bus.codec import decode_header, message_type  # noqa: E402
from chunkbus.bus.sockets import drain  # noqa: E402

SERVICE = "fleet"
STAMPS = struct.Struct("<qq")  # the worker's receive and send times (ns), then the request id
AIM_P99_US = 5000.0


# --- the worker and the proxy: roles of this script, run as processes of their own -------------


def run_worker(mode: str, endpoint: str, service_s: float, capacity: int, name: str) -> None:
    """Answer each request `service_s` after it came, stamping both times; mdp: registered with
    `capacity` (the broker's batch size for it), plain: whatever the proxy's DEALER deals it."""
    socket = zmq.Context.instance().socket(zmq.DEALER)
    socket.setsockopt(zmq.LINGER, 0)
    socket.connect(endpoint)
    chunk = encode(ActionChunk(request_id="fleet-0", robot_id="fleet", tick=0,
                               actions=np.zeros((30, 6), np.float32), worker=name))
    if mode == "mdp":
        info = mdp.WorkerInfo(capacity=capacity, name=name)
        socket.send_multipart(mdp.worker_to_broker(mdp.READY, service=SERVICE, info=info))
    due: list = []  # heap of (answer at, order, reply frames but the body, request id, received ns)
    order = itertools.count()
    next_heartbeat = time.monotonic() + mdp.HEARTBEAT_INTERVAL if mode == "mdp" else math.inf
    while True:
        wake = min(due[0][0] if due else math.inf, next_heartbeat)
        # Whole milliseconds, rounded up (zmq_poll's): not a spin through the last one before each answer.
        timeout = None if wake == math.inf else math.ceil(max(0.0, wake - time.monotonic()) * 1000)
        if socket.poll(timeout):
            for frames in drain(socket):
                received = time.monotonic_ns()
                if mode == "mdp":
                    message = mdp.parse_broker_to_worker(frames)
                    if message.command == mdp.DISCONNECT:  # the broker forgot us: register again
                        socket.send_multipart(mdp.worker_to_broker(mdp.READY, service=SERVICE, info=info))
                    if message.command != mdp.REQUEST:
                        continue
                    envelope, body = mdp.worker_to_broker(mdp.REPLY, ticket=message.ticket), message.body
                else:
                    request = mdp.parse_client_to_broker(frames)
                    envelope, body = mdp.broker_to_client(request.client, request.service, []), request.body
                request_id = decode_header(body[0]).fields["request_id"].encode()
                heapq.heappush(due, (received / 1e9 + service_s, next(order), envelope, request_id, received))
        now = time.monotonic()
        while due and due[0][0] <= now:
            _, _, envelope, request_id, received = heapq.heappop(due)
            stamps = STAMPS.pack(received, time.monotonic_ns()) + request_id
            socket.send_multipart([*envelope, *chunk, stamps], copy=False)
        if now >= next_heartbeat:
            socket.send_multipart(mdp.worker_to_broker(mdp.HEARTBEAT))
            next_heartbeat = now + mdp.HEARTBEAT_INTERVAL


def run_proxy() -> None:
    """The floor: libzmq's own proxy, ROUTER frontend to DEALER backend; prints both ports."""
    context = zmq.Context.instance()
    frontend, backend = context.socket(zmq.ROUTER), context.socket(zmq.DEALER)
    ports = [socket.bind_to_random_port("tcp://127.0.0.1") for socket in (frontend, backend)]
    print(*ports, flush=True)
    zmq.proxy(frontend, backend)


# --- the load generator ----------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """CPU time of all of a process's threads, in ns resolution (schedstat's first field)."""
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/schedstat") as file:
                total += int(file.read().split()[0])
        except FileNotFoundError:  # a thread that just ended
            pass
    return total / 1e9


def camera_frames() -> dict[str, np.ndarray]:
    """Two cameras' frames, shared by every robot's requests (sent from their memory, not copied)."""
    rng = np.random.default_rng(0)
    return {f"observation.images.{name}": rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)
            for name in ("front", "wrist")}


@dataclass
class Robot:
    robot_id: str
    socket: zmq.Socket
    seq: int = 0
    outstanding: dict = field(default_factory=dict)  # request id -> (send ns, measured)


@dataclass
class Tally:
    added_us: list = field(default_factory=list)
    errors: dict = field(default_factory=dict)  # code -> count
    sent: int = 0
    request_bytes: int = 0
    reply_bytes: int = 0
    passed: int = 0  # replies of any request, measured or not (the CPU figure's denominator)


class Fleet:
    def __init__(self, endpoint: str, robots: int, rate: float, images: dict[str, np.ndarray]):
        self.context = zmq.Context.instance()
        self.robots = []
        self.poller = zmq.Poller()
        self.by_socket = {}
        for index in range(robots):
            socket = self.context.socket(zmq.DEALER)
            socket.setsockopt(zmq.LINGER, 0)
            socket.connect(endpoint)
            robot = Robot(f"robot-{index:03d}", socket)
            self.robots.append(robot)
            self.poller.register(socket, zmq.POLLIN)
            self.by_socket[socket] = robot
        self.period = 1.0 / rate
        self.images = images
        self.state = np.zeros(6, np.float32)
        start = time.monotonic() + 0.05
        self.sends = [(start + index * self.period / robots, index) for index in range(robots)]  # evenly phased

    def close(self) -> None:
        for robot in self.robots:
            robot.socket.close(linger=0)

    def send(self, robot: Robot, tally: Tally, measured: bool) -> None:
        robot.seq += 1
        now = time.monotonic()
        request = ObservationRequest(
            robot_id=robot.robot_id, request_id=f"{robot.robot_id}-{robot.seq}", tick=robot.seq * 30, fps=30.0,
            send_time=now, task="fleet", ttl=0.5, replace_key=robot.robot_id,
            observations=[Observation(tick=robot.seq * 30, time=now, state=self.state, images=self.images)],
        )
        body = encode(request)
        frames = mdp.client_to_broker(SERVICE, body)
        sent = time.monotonic_ns()
        robot.socket.send_multipart(frames, copy=False)
        robot.outstanding[request.request_id] = (sent, measured)
        if measured:
            tally.sent += 1
            tally.request_bytes += sum(memoryview(frame).nbytes for frame in body)

    def receive(self, robot: Robot, frames: list, received: int, tally: Tally) -> None:
        tally.passed += 1
        _, body = mdp.parse_broker_to_client(frames)
        if message_type(body[0]) == ErrorReply.TYPE:
            error = decode(body)
            sent, measured = robot.outstanding.pop(error.request_id, (0, False))
            if measured:
                tally.errors[error.code] = tally.errors.get(error.code, 0) + 1
            return
        stamps = body[-1].bytes
        worker_received, worker_sent = STAMPS.unpack_from(stamps)
        sent, measured = robot.outstanding.pop(stamps[STAMPS.size:].decode(), (0, False))
        if measured:
            tally.added_us.append(((worker_received - sent) + (received - worker_sent)) / 1000)
            tally.reply_bytes += sum(len(frame) for frame in body)

    def run(self, until: float, tally: Tally, measured: bool, sending: bool = True) -> None:
        """Send on schedule and take replies until `until` (monotonic s); without sending, until
        no measured request is outstanding either."""
        while (now := time.monotonic()) < until:
            if not sending and not any(m for r in self.robots for _, m in r.outstanding.values()):
                return
            wake = min(self.sends[0][0], until) if sending else until
            for socket, _ in self.poller.poll(max(0.0, wake - now) * 1000):
                robot = self.by_socket[socket]
                for frames in drain(socket):
                    self.receive(robot, frames, time.monotonic_ns(), tally)
            while sending and self.sends[0][0] <= time.monotonic():
                due, index = heapq.heappop(self.sends)
                self.send(self.robots[index], tally, measured)
                heapq.heappush(self.sends, (due + self.period, index))


def measure(endpoint: str, pid: int, robots: int, args: argparse.Namespace, images: dict) -> dict:
    """One case at one N: warm-up, the measured window, the drain; the figures."""
    fleet = Fleet(endpoint, robots, args.rate, images)
    try:
        start = fleet.sends[0][0]
        fleet.run(start + args.warmup, Tally(), measured=False)
        tally, cpu_before = Tally(), cpu_seconds(pid)
        window_end = start + args.warmup + args.seconds
        fleet.run(window_end, tally, measured=True)
        fleet.run(time.monotonic() + args.timeout, tally, measured=True, sending=False)
        cpu = cpu_seconds(pid) - cpu_before
        timed_out = sum(1 for r in fleet.robots for _, m in r.outstanding.values() if m)
    finally:
        fleet.close()
    added = np.array(tally.added_us) if tally.added_us else np.array([float("nan")])
    p50, p99 = np.percentile(added, [50, 99])
    return {
        "added_p50_us": round(float(p50), 1), "added_p99_us": round(float(p99), 1),
        "added_max_us": round(float(added.max()), 1),
        "req_per_s": round(len(tally.added_us) / args.seconds, 2),
        "mb_per_s": round((tally.request_bytes + tally.reply_bytes) / args.seconds / 1e6, 1),
        "sent": tally.sent, "answered": len(tally.added_us), "errors": tally.errors, "timed_out": timed_out,
        "cpu_us_per_request": round(cpu / max(tally.passed, 1) * 1e6, 1),
    }


def meets_aim(case: dict) -> bool:
    return case["answered"] == case["sent"] > 0 and case["added_p99_us"] < AIM_P99_US


def largest_meeting_aim(by_robots: dict[int, dict]) -> int:
    """Judged per N: a small fleet's p99 is the largest of a handful of samples (5 for 1 robot
    in 5 s), so one slow request there says less than 500 at 100 robots."""
    return max((robots for robots, case in by_robots.items() if meets_aim(case)), default=0)


def wait_for_plain_workers(endpoint: str, workers: int, images: dict) -> None:
    """Until each of the proxy's workers has answered: its DEALER deals only to connected ones."""
    names: set[str] = set()
    with zmq.Context.instance().socket(zmq.DEALER) as socket:
        socket.setsockopt(zmq.LINGER, 0)
        socket.connect(endpoint)
        body = encode(ObservationRequest(robot_id="probe", request_id="probe-0", tick=0, fps=30.0, send_time=0.0,
                                         task="fleet", observations=[Observation(0, 0.0, np.zeros(6, np.float32))]))
        deadline = time.monotonic() + 30
        while len(names) < workers:
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {len(names)} of the proxy's {workers} workers answered")
            for _ in range(workers):
                socket.send_multipart(mdp.client_to_broker(SERVICE, body))
            for _ in range(workers):
                if socket.poll(5000):
                    _, reply = mdp.parse_broker_to_client(socket.recv_multipart(copy=False))
                    names.add(decode(reply[:-1]).worker)


def line(case: dict) -> str:
    errors = f", errors {case['errors']}" if case["errors"] else ""
    timed_out = f", {case['timed_out']} timed out" if case["timed_out"] else ""
    return (f"{case['req_per_s']:6.1f} req/s {case['mb_per_s']:6.1f} MB/s, added p50 {case['added_p50_us'] / 1000:5.2f}"
            f" ms p99 {case['added_p99_us'] / 1000:5.2f} ms, {case['cpu_us_per_request']:6.0f} us CPU/request "
            f"({case['answered']} of {case['sent']} answered{errors}{timed_out})")


def main() -> None:
    if sys.argv[1:2] == ["_worker"]:
        mode, endpoint, service_ms, capacity, name = sys.argv[2:]
        return run_worker(mode, endpoint, float(service_ms) / 1000, int(capacity), name)
    if sys.argv[1:2] == ["_proxy"]:
        return run_proxy()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--robots", default="1,10,30,100", help="comma-separated fleet sizes")
    parser.add_argument("--seconds", type=float, default=5.0, help="measured seconds per fleet size and case")
    parser.add_argument("--warmup", type=float, default=None, help="seconds before measuring [one period]")
    parser.add_argument("--rate", type=float, default=1.0, help="requests per second per robot")
    parser.add_argument("--service-ms", type=float, default=40.0, help="the workers' time per request")
    parser.add_argument("--workers", type=int, default=None, help="worker processes per case [8; 2 with --quick]")
    parser.add_argument("--capacity", type=int, default=1, help="requests one worker takes at once (a batch)")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds a request may take before it counts "
                        "as timed out")
    parser.add_argument("--no-capture", action="store_true", help="the broker without its capture for taps")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 1 and 3 robots, 1 s each")
    args = parser.parse_args()
    if args.quick:
        args.robots, args.seconds, args.warmup = "1,3", 1.0, 0.3
        args.workers = args.workers or 2
    args.workers = args.workers or 8
    if args.warmup is None:
        args.warmup = 1.0 / args.rate
    try:
        sizes = sorted({int(n) for n in args.robots.split(",")})
    except ValueError:
        parser.error(f"--robots: expected comma-separated counts like 1,10,30,100, got {args.robots!r}")
    if sizes[0] < 1:
        parser.error("--robots: each fleet size must be at least 1")

    images = camera_frames()
    cluster = Cluster()
    results: dict[str, dict[int, dict]] = {"broker": {}, "proxy": {}}
    try:
        options = ["--no-capture"] if args.no_capture else []
        ready = cluster.node("broker", "--frontend", "tcp://127.0.0.1:*", "--backend", "tcp://127.0.0.1:*", *options)
        broker_pid = cluster.processes[-1].pid
        proxy = cluster.start(sys.executable, __file__, "_proxy", stdout=subprocess.PIPE)
        frontend_port, backend_port = proxy.stdout.readline().split()
        for index in range(args.workers):
            for mode, endpoint in (("mdp", ready["backend"]), ("plain", f"tcp://127.0.0.1:{backend_port}")):
                cluster.start(sys.executable, __file__, "_worker", mode, endpoint, str(args.service_ms),
                              str(args.capacity), f"{mode}-{index}")
        with BrokerClient(ready["frontend"]) as client:
            wait_for_workers(client, SERVICE, args.workers)
        wait_for_plain_workers(f"tcp://127.0.0.1:{frontend_port}", args.workers, images)
        targets = {"broker": (ready["frontend"], broker_pid), "proxy": (f"tcp://127.0.0.1:{frontend_port}", proxy.pid)}
        print(f"{args.rate:g} request/s per robot, {args.workers} workers x {args.capacity}, service "
              f"{args.service_ms:g} ms, capture {'off' if args.no_capture else 'on'}, {args.seconds:g} s per case")
        for robots in sizes:
            for case, (endpoint, pid) in targets.items():
                results[case][robots] = figures = measure(endpoint, pid, robots, args, images)
                print(f"{robots:4d} robots, {case:6s}: {line(figures)}", flush=True)
    finally:
        cluster.stop()

    largest = sizes[-1]
    broker_cpu = results["broker"][largest]["cpu_us_per_request"]
    proxy_cpu = results["proxy"][largest]["cpu_us_per_request"]
    summary = {
        "max_robots_p99_under_5ms": largest_meeting_aim(results["broker"]),
        "proxy_max_robots_p99_under_5ms": largest_meeting_aim(results["proxy"]),
        "broker_cpu_us_per_request": broker_cpu,
        "proxy_cpu_us_per_request": proxy_cpu,
        "cpu_ratio": round(broker_cpu / proxy_cpu, 2) if proxy_cpu else None,
        "cpu_at_robots": largest,
        "by_robots": {str(n): {**results["broker"][n], "proxy": results["proxy"][n]} for n in sizes},
        "rate_hz": args.rate, "service_ms": args.service_ms, "workers": args.workers, "capacity": args.capacity,
        "capture": not args.no_capture, "seconds": args.seconds,
    }
    print(f"broker: p99 under 5 ms up to {summary['max_robots_p99_under_5ms']} robots; CPU per request at {largest} "
          f"robots {broker_cpu:.0f} us vs the proxy's {proxy_cpu:.0f} us ({summary['cpu_ratio']}x)")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
