"""MDP/0.1 peers written only from ZeroMQ RFC 7, independent of chunkbus's own code,
plus helpers that start chunkbus brokers and workers as real processes."""

from __future__ import annotations

import json
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import msgpack
import zmq

from chunkbus.launch.process import NodeProcess

CHUNKBUS = str(Path(sys.executable).parent / "chunkbus")


class RawWorker:
    """An RFC 7 worker: READY, then REQUESTs in, REPLYs out, HEARTBEATs both ways.

    `extension`, if given, is sent as an extra READY frame (chunkbus's capacity).
    It answers only when told to, so tests can hold requests in flight.
    """

    def __init__(self, backend: str, service: str, extension: dict | None = None):
        self.socket = zmq.Context.instance().socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.connect(backend)
        ready = [b"", b"MDPW01", b"\x01", service.encode()]
        if extension is not None:
            ready.append(msgpack.packb(extension))
        self.socket.send_multipart(ready)
        self.held: list[tuple[bytes, list[bytes]]] = []  # (client address, body)

    def heartbeat(self) -> None:
        self.socket.send_multipart([b"", b"MDPW01", b"\x04"])

    def receive(self, timeout: float = 5.0, count: int = 1) -> list[list[bytes]]:
        """Wait for `count` REQUESTs (answering nothing); returns their bodies."""
        deadline = time.monotonic() + timeout
        bodies = []
        while len(bodies) < count:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self.socket.poll(remaining * 1000):
                break
            frames = self.socket.recv_multipart()
            assert frames[:2] == [b"", b"MDPW01"], frames
            if frames[2] == b"\x02":
                assert frames[4] == b"", "frame 4 of a REQUEST is the empty delimiter"
                self.held.append((frames[3], frames[5:]))
                bodies.append(frames[5:])
            elif frames[2] == b"\x04":
                self.heartbeat()
        return bodies

    def answer(self, body: list[bytes] | None = None, index: int = 0) -> None:
        """REPLY to a held request, with `body` or its own request body echoed."""
        address, request_body = self.held.pop(index)
        self.socket.send_multipart([b"", b"MDPW01", b"\x03", address, b"", *(body or request_body)])

    def close(self) -> None:
        self.socket.close(linger=0)


class RawClient:
    """An RFC 7 client: REQUEST out, REPLY in."""

    def __init__(self, frontend: str):
        self.socket = zmq.Context.instance().socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.connect(frontend)

    def send(self, service: str, *body: bytes) -> None:
        self.socket.send_multipart([b"", b"MDPC01", service.encode(), *body])

    def receive(self, timeout: float = 5.0) -> list[bytes] | None:
        if not self.socket.poll(timeout * 1000):
            return None
        frames = self.socket.recv_multipart()
        assert frames[:2] == [b"", b"MDPC01"], frames
        return frames[2:]

    def close(self) -> None:
        self.socket.close(linger=0)


@dataclass
class BrokerProcess:
    process: NodeProcess
    frontend: str
    backend: str
    metrics_port: int | None = None


def start_broker(processes, *options: str, frontend="tcp://127.0.0.1:*", backend="tcp://127.0.0.1:*") -> BrokerProcess:
    """A `chunkbus broker` process; waits until it is ready, and says where it listens."""
    process = processes.start_node("broker", "--frontend", frontend, "--backend", backend, *options, timeout=30)
    metrics_port = None
    if "--metrics-port" in options:
        served = json.loads(processes.wait_log(process, '"metrics served"'))
        metrics_port = int(served["url"].rsplit(":", 1)[1].split("/")[0])
    return BrokerProcess(process, process.ready_event["frontend"], process.ready_event["backend"], metrics_port)


def start_worker(processes, backend: str, policy: str, *options: str, **kwargs) -> NodeProcess:
    """A `chunkbus worker` process; waits until it is ready."""
    return processes.start_node("worker", "--broker", backend, "--policy", policy, *options, timeout=120, **kwargs)


def wait_for(predicate, timeout: float = 10.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := predicate():
            return result
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def kill(process: NodeProcess, sig=signal.SIGKILL) -> None:
    process.signal_group(sig)
    process.wait(timeout=10)
