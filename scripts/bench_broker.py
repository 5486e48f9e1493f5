"""The broker under load, on this machine over loopback TCP, all measured in one run:

  req_per_s              requests per second through the broker to four scripted workers
                         (`chunkbus worker --policy scripted:constant?chunk=1`), small
                         payloads, 64 requests kept in flight by one client
  p50_us, p99_us         latency the broker adds: the round trip client -> broker -> worker
                         -> broker -> client, minus the round trip client -> worker -> client
                         without a broker (same payload; the worker is a bare echo in both)
  high_priority_p99_us   p99 round trip of priority-10 requests sent one at a time while
  low_priority_p99_us    priority-0 requests keep the four workers (20 ms per request) busy
  high_priority_wait_p99_us  of that round trip, the part not spent on the worker
  service_time_us        the low-priority requests' time on the worker, p50
  batching               the same three high-priority figures with four workers that run
                         batches of up to 4 (--max-batch 4, 20 ms a batch)

Its last line is JSON with these figures.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
import zmq

from chunkbus.bus import Observation, ObservationRequest, decode, encode
from chunkbus.bus.client import BrokerClient
from chunkbus.launch.process import NodeProcess

ECHO_WORKER = """
import sys, zmq
socket = zmq.Context().socket(zmq.DEALER)
socket.connect(sys.argv[1])
socket.send_multipart([b"", b"MDPW01", b"\\x01", b"echo"])
while True:
    frames = socket.recv_multipart(copy=False)
    if frames[2].bytes == b"\\x02":
        socket.send_multipart([b"", b"MDPW01", b"\\x03", frames[3], b"", *frames[5:]], copy=False)
    elif frames[2].bytes == b"\\x04":
        socket.send_multipart([b"", b"MDPW01", b"\\x04"])
"""

DIRECT_ECHO = """
import sys, zmq
socket = zmq.Context().socket(zmq.ROUTER)
port = socket.bind_to_random_port("tcp://127.0.0.1")
print(port, flush=True)
while True:
    socket.send_multipart(socket.recv_multipart(copy=False), copy=False)
"""


def small_request(request_id: str, priority: int = 0) -> ObservationRequest:
    return ObservationRequest(
        robot_id="bench",
        request_id=request_id,
        tick=0,
        fps=30.0,
        send_time=time.monotonic(),
        task="bench",
        observations=[Observation(tick=0, time=0.0, state=np.zeros(6, np.float32))],
        priority=priority,
    )


class Cluster:
    """Processes on a private runtime directory, so their endpoints meet nobody else's."""

    def __init__(self):
        self.processes: list[NodeProcess] = []
        os.environ.setdefault("CHUNKBUS_RUNTIME_DIR", tempfile.mkdtemp(prefix="cb-bench-", dir="/tmp"))

    def start(self, *args: str, stdout=subprocess.DEVNULL) -> NodeProcess:
        """Any program; its stderr is collected (NodeProcess.log_lines, wait_ready)."""
        return self.kept(NodeProcess(args, stdout=stdout))

    def node(self, command: str, *args: str) -> dict:
        """A `chunkbus COMMAND` node, once it is ready; its readiness line."""
        return self.kept(NodeProcess.node(command, *args)).wait_ready(timeout=300)

    def kept(self, process: NodeProcess) -> NodeProcess:
        self.processes.append(process)
        return process

    def broker(self, *options: str, backend: str = "tcp://127.0.0.1:*") -> tuple[str, str]:
        # One client stands in for many robots here: no per-robot bound.
        ready = self.node("broker", "--frontend", "tcp://127.0.0.1:*", "--backend", backend,
                          "--max-queue", "1000", "--max-per-robot", "1000", *options)
        return ready["frontend"], ready["backend"]

    def worker(self, backend: str, policy: str, service: str, *options: str) -> None:
        self.node("worker", "--broker", backend, "--policy", policy, "--service", service, *options)

    def stop(self) -> None:
        for process in self.processes:
            process.close()


def wait_for_workers(client: BrokerClient, service: str, count: int) -> None:
    deadline = time.monotonic() + 60
    while getattr(client.status().services.get(service), "workers", 0) < count:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{count} workers for {service} did not register")
        time.sleep(0.05)


def throughput(frontend: str, seconds: float, window: int = 64) -> float:
    body = encode(small_request("t"))
    with BrokerClient(frontend) as client:
        for _ in range(window):
            client.send_frames("scripted", body)
        done, start = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - start) < seconds:
            if client.receive_frames(5.0) is None:
                raise RuntimeError("throughput: a reply did not come")
            done += 1
            client.send_frames("scripted", body)
        return done / elapsed


def round_trips(send, receive, count: int) -> np.ndarray:
    times = []
    for _ in range(count + 50):
        start = time.perf_counter_ns()
        send()
        if receive() is None:
            raise RuntimeError("a round trip did not come back")
        times.append(time.perf_counter_ns() - start)
    return np.array(times[50:]) / 1000  # microseconds, after a warm-up


def broker_overhead(cluster: Cluster, frontend: str, backend: str, count: int) -> dict:
    cluster.start(sys.executable, "-c", ECHO_WORKER, backend)
    direct = cluster.start(sys.executable, "-c", DIRECT_ECHO, stdout=subprocess.PIPE)
    port = int(direct.stdout.readline())
    body = encode(small_request("latency"))
    with BrokerClient(frontend) as client:
        wait_for_workers(client, "echo", 1)
        via_broker = round_trips(lambda: client.send_frames("echo", body), lambda: client.receive_frames(5), count)
    socket = zmq.Context.instance().socket(zmq.DEALER)
    socket.connect(f"tcp://127.0.0.1:{port}")
    frames = [b"", b"MDPC01", b"echo", *body]
    without = round_trips(
        lambda: socket.send_multipart(frames, copy=False),
        lambda: socket.recv_multipart(copy=False) if socket.poll(5000) else None,
        count,
    )
    socket.close(linger=0)
    b50, b99 = np.percentile(via_broker, [50, 99])
    d50, d99 = np.percentile(without, [50, 99])
    return {"p50_us": b50 - d50, "p99_us": b99 - d99, "round_trip_p50_us": b50,
            "round_trip_p99_us": b99, "direct_p50_us": d50, "direct_p99_us": d99}


def worker_seconds(body: list) -> float:
    """The time a reply's request spent on its worker: decoding and inference, from its timings."""
    timings = decode(body).timings
    return timings.get("decode", 0.0) + timings.get("inference", 0.0)


def priorities(frontend: str, service: str, seconds: float, in_flight: int) -> dict:
    """Priority-10 requests one at a time while priority-0 ones keep every worker busy.

    A high-priority request's wait is its round trip less its own time on the worker: with
    every worker busy it must wait for some running work to end (no preemption), so the
    floor is up to one service time, and the aim is at most one service time plus 5 ms."""
    stop = threading.Event()
    low_latencies: list[float] = []
    low_service: list[float] = []

    def low_load():
        body = encode(small_request("low", priority=0))
        with BrokerClient(frontend) as client:
            sent: list[float] = []
            for _ in range(in_flight):  # more than the workers take: always a queue
                client.send_frames(service, body)
                sent.append(time.perf_counter())
            while not stop.is_set():
                if (reply := client.receive_frames(5.0)) is None:
                    break
                low_latencies.append((time.perf_counter() - sent.pop(0)) * 1e6)
                low_service.append(worker_seconds(reply[1]) * 1e6)
                client.send_frames(service, body)
                sent.append(time.perf_counter())

    thread = threading.Thread(target=low_load)
    thread.start()
    time.sleep(0.5)
    high, waits = [], []
    with BrokerClient(frontend) as client:
        body = encode(small_request("high", priority=10))
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            start = time.perf_counter()
            client.send_frames(service, body)
            if (reply := client.receive_frames(5.0)) is None:
                raise RuntimeError("a high-priority request was not answered")
            high.append((time.perf_counter() - start) * 1e6)
            waits.append(high[-1] - worker_seconds(reply[1]) * 1e6)
            time.sleep(random.uniform(0, 0.01))  # arrive at any point of the workers' runs
    stop.set()
    thread.join()
    return {
        "high_priority_p99_us": float(np.percentile(high, 99)),
        "high_priority_wait_p99_us": float(np.percentile(waits, 99)),
        "service_time_us": float(np.percentile(low_service, 50)),
        "low_priority_p99_us": float(np.percentile(low_latencies, 99)),
        "high_priority_p50_us": float(np.percentile(high, 50)),
        "low_priority_p50_us": float(np.percentile(low_latencies, 50)),
        "high_priority_requests": len(high),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=4.0, help="per throughput/priority phase")
    parser.add_argument("--count", type=int, default=1000, help="round trips per latency path")
    args = parser.parse_args()
    cluster = Cluster()
    try:
        frontend, backend = cluster.broker()
        for _ in range(4):
            cluster.worker(backend, "scripted:constant?chunk=1&actions=6", "scripted")
            cluster.worker(backend, "scripted:constant?chunk=1&actions=6&delay=0.02", "slow")
            cluster.worker(backend, "scripted:constant?chunk=1&actions=6&delay=0.02", "slow-batch", "--max-batch", "4")
        with BrokerClient(frontend) as client:
            for service in ("scripted", "slow", "slow-batch"):
                wait_for_workers(client, service, 4)
        figures = {"req_per_s": throughput(frontend, args.seconds)}
        print(f"throughput: {figures['req_per_s']:.0f} requests/s through four scripted workers")
        figures.update(broker_overhead(cluster, frontend, backend, args.count))
        print(f"broker adds p50 {figures['p50_us']:.0f} us, p99 {figures['p99_us']:.0f} us "
              f"(round trip p50 {figures['round_trip_p50_us']:.0f} us vs {figures['direct_p50_us']:.0f} us direct)")
        figures.update(priorities(frontend, "slow", args.seconds, in_flight=16))
        batching = priorities(frontend, "slow-batch", args.seconds, in_flight=32)
        figures["batching"] = {k: v for k, v in batching.items() if not k.startswith("low_")}
        for name, case in (("one request a worker", figures), ("--max-batch 4", figures["batching"])):
            print(f"under low-priority saturation ({name}): high-priority p99 {case['high_priority_p99_us'] / 1000:.1f}"
                  f" ms, its wait p99 {case['high_priority_wait_p99_us'] / 1000:.1f} ms, service time "
                  f"{case['service_time_us'] / 1000:.1f} ms")
    finally:
        cluster.stop()
    print(json.dumps(rounded(figures)))


def rounded(figures):
    if isinstance(figures, dict):
        return {k: rounded(v) for k, v in figures.items()}
    return round(figures, 1) if isinstance(figures, float) else figures


if __name__ == "__main__":
    main()
