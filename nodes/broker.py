"""`chunkbus broker`: a Majordomo (RFC 7) broker with priorities, expiry, replace keys,
capacity-aware load balancing and heartbeats.

One thread runs the event loop below; nothing else touches the sockets or the queues.
Every request gets exactly one answer: the worker's reply, or an ErrorReply that says
why not (expired, superseded, rejected, failed). A reply that arrives for a request the
broker already answered or gave to another worker is discarded and counted.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np
import zmq

from chunkbus.bus import mdp
from chunkbus.bus.codec import encode, message_type
from chunkbus.bus.endpoints import is_ipv6
from chunkbus.bus.lifecycle import on_stop_signals
from chunkbus.bus.log import get_logger
from chunkbus.bus.messages import ErrorReply, MessageError
from chunkbus.bus.sockets import Publisher

OUTCOMES = ("ok", "worker_error", "expired", "superseded", "rejected", "failed")
LATENCY_WINDOW = 2000  # recent requests whose latencies the percentiles describe


@dataclass(eq=False)
class Request:
    client: bytes
    service: str
    body: list
    options: mdp.RequestOptions
    seq: int  # arrival order: FIFO within a priority, kept when re-queued
    received: float
    expires: float | None
    state: str = "queued"  # queued -> running -> done (or back to queued if its worker dies)
    attempts: int = 0
    dispatched: float = 0.0
    ticket: bytes = b""
    worker: Worker | None = None


@dataclass(eq=False)
class Worker:
    identity: bytes
    service: str
    info: mdp.WorkerInfo
    expiry: float
    last_used: float = 0.0
    running: dict[bytes, Request] = field(default_factory=dict)

    @property
    def free(self) -> int:
        return self.info.capacity - len(self.running)

    @property
    def name(self) -> str:
        return self.info.name or self.identity.hex()


@dataclass(eq=False)
class Service:
    name: str
    queue: list = field(default_factory=list)  # heap of (-priority, seq, Request); lazy deletion
    queued: int = 0
    workers: dict[bytes, Worker] = field(default_factory=dict)
    by_key: dict[str, Request] = field(default_factory=dict)
    outcomes: dict[str, int] = field(default_factory=lambda: dict.fromkeys(OUTCOMES, 0))
    queue_wait: deque = field(default_factory=lambda: deque(maxlen=LATENCY_WINDOW))
    service_time: deque = field(default_factory=lambda: deque(maxlen=LATENCY_WINDOW))
    model: dict[str, Any] = field(default_factory=dict)


@dataclass
class BrokerConfig:
    frontend: str = "tcp://*:5555"
    backend: str = "tcp://*:5556"
    heartbeat_interval: float = mdp.HEARTBEAT_INTERVAL
    heartbeat_liveness: int = mdp.HEARTBEAT_LIVENESS
    max_queue: int = 64  # per service; past it a request is rejected at once
    default_ttl: float | None = None  # for requests that carry none
    request_timeout: float = 60.0  # a dispatched request unanswered this long has failed
    max_attempts: int = 2  # runs of one request (re-runs after its worker died)
    capture: str | None = "broker"  # node name whose ipc endpoint offers the traffic to taps; None: off


def _percentiles(samples: deque) -> dict[str, float]:
    if not samples:
        return {}
    values = np.fromiter(samples, float) * 1000
    p50, p95, p99 = np.percentile(values, [50, 95, 99])
    return {"p50": float(p50), "p95": float(p95), "p99": float(p99), "n": len(values)}


class Broker:
    def __init__(self, config: BrokerConfig, context: zmq.Context | None = None):
        self.config = config
        self.context = context or zmq.Context.instance()
        self.log = get_logger()
        self.services: dict[str, Service] = {}
        self.workers: dict[bytes, Worker] = {}
        self.running: dict[bytes, Request] = {}  # ticket -> request, for every worker
        self.expiries: list = []  # heap of (expires, seq, Request)
        self.arrivals = itertools.count()
        self.tickets = itertools.count(1)
        self.counters = {"malformed_frontend": 0, "malformed_backend": 0, "late_replies": 0}
        self.started = time.monotonic()
        self.snapshot: dict[str, Any] = {}
        self.stop_event = threading.Event()
        self.frontend = self.context.socket(zmq.ROUTER)
        self.backend = self.context.socket(zmq.ROUTER)
        for socket, endpoint in ((self.frontend, config.frontend), (self.backend, config.backend)):
            socket.setsockopt(zmq.LINGER, 0)
            socket.setsockopt(zmq.ROUTER_MANDATORY, 0)  # a vanished peer's reply is dropped
            socket.setsockopt(zmq.IPV6, is_ipv6(endpoint))  # tcp://[::]:5555 (both stacks), [::1]:5555
            socket.bind(endpoint)
        # Requests and replies as they pass, on broker/request/SERVICE and broker/reply/SERVICE,
        # for `chunkbus tap` (a PUB socket: free when nobody listens, never blocks).
        self.capture = Publisher(config.capture, sndhwm=1000) if config.capture else None
        self.frontend_endpoint = self.frontend.getsockopt_string(zmq.LAST_ENDPOINT)
        self.backend_endpoint = self.backend.getsockopt_string(zmq.LAST_ENDPOINT)
        self._last_complaint = 0.0

    # --- the loop ------------------------------------------------------------------------

    def run(self) -> None:
        self.log.info(
            "broker ready", frontend=self.frontend_endpoint, backend=self.backend_endpoint
        )
        poller = zmq.Poller()
        poller.register(self.frontend, zmq.POLLIN)
        poller.register(self.backend, zmq.POLLIN)
        interval = self.config.heartbeat_interval
        next_heartbeat = time.monotonic() + interval
        self.update_snapshot()
        try:
            while not self.stop_event.is_set():
                now = time.monotonic()
                wake = min(next_heartbeat, self.expiries[0][0] if self.expiries else next_heartbeat)
                events = dict(poller.poll(max(0, min(wake - now, interval)) * 1000))
                if self.backend in events:
                    self.drain(self.backend, self.on_worker_message)
                if self.frontend in events:
                    self.drain(self.frontend, self.on_client_message)
                now = time.monotonic()
                self.expire_queued(now)
                if now >= next_heartbeat:
                    next_heartbeat = now + interval
                    self.heartbeat(now)
                    self.update_snapshot()
        finally:
            self.shutdown()

    def drain(self, socket: zmq.Socket, handler) -> None:
        for _ in range(1000):  # bounded, so one busy socket cannot starve the other
            try:
                frames = socket.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            handler(frames)

    def stop(self) -> None:
        self.stop_event.set()

    def shutdown(self) -> None:
        for service in self.services.values():
            while (request := self.pop_next(service)) is not None:
                self.answer(request, "failed", "the broker is shutting down")
        for request in list(self.running.values()):
            self.answer(request, "failed", "the broker is shutting down")
        for worker in self.workers.values():
            self.backend.send_multipart([worker.identity, b"", mdp.WORKER, mdp.DISCONNECT])
        # Give zmq's I/O thread time to deliver those answers: in tests, closing a ROUTER
        # socket with LINGER alone lost messages it had just queued.
        time.sleep(0.25)
        self.frontend.close(linger=100)
        self.backend.close(linger=100)
        if self.capture is not None:
            self.capture.close()
        self.log.info("broker stopped")

    # --- clients -------------------------------------------------------------------------

    def on_client_message(self, frames: list) -> None:
        if len(frames) < 5 or frames[1].bytes != b"" or frames[2].bytes != mdp.CLIENT:
            return self.malformed("frontend", "not an MDP/0.1 client request with a body", frames)
        client, body = frames[0].bytes, frames[4:]
        try:
            service_name = frames[3].bytes.decode("utf-8")
        except UnicodeDecodeError:
            return self.malformed("frontend", "service name is not UTF-8", frames)
        if service_name.startswith("mmi."):
            return self.on_mmi(client, service_name, body)
        options = mdp.request_options(body)
        now = time.monotonic()
        ttl = options.ttl if options.ttl is not None else self.config.default_ttl
        request = Request(
            client=client,
            service=service_name,
            body=body,
            options=options,
            seq=next(self.arrivals),
            received=now,
            expires=None if ttl is None else now + ttl,
        )
        service = self.service(service_name)
        key = options.replace_key
        if key is not None and (old := service.by_key.get(key)) is not None and old.state == "queued":
            self.cancel(old)
            self.answer(old, "superseded", f"superseded by request {options.request_id!r}")
        if service.queued >= self.config.max_queue:
            return self.answer(
                request,
                "rejected",
                f"queue of service {service_name!r} is full ({self.config.max_queue} requests)",
            )
        self.captured("request", service_name, body)
        self.enqueue(service, request)
        self.dispatch(service)

    def captured(self, kind: str, service: str, body: list) -> None:
        if self.capture is not None:
            self.capture.socket.send_multipart([f"broker/{kind}/{service}".encode(), *body], copy=False)

    def on_mmi(self, client: bytes, name: str, body: list) -> None:
        if name == mdp.MMI_SERVICE:
            asked = body[0].bytes.decode("utf-8", "replace") if body else ""
            service = self.services.get(asked)
            reply = b"200" if service is not None and service.workers else b"404"
        elif name == mdp.STATUS_SERVICE:
            self.update_snapshot()
            reply = msgpack.packb(self.snapshot)
        else:
            reply = b"501"
        self.frontend.send_multipart([client, b"", mdp.CLIENT, name.encode(), reply])

    # --- workers -------------------------------------------------------------------------

    def on_worker_message(self, frames: list) -> None:
        if len(frames) < 4 or frames[1].bytes != b"" or frames[2].bytes != mdp.WORKER:
            return self.malformed("backend", "not an MDP/0.1 worker message", frames)
        identity, command = frames[0].bytes, frames[3].bytes
        worker = self.workers.get(identity)
        if command == mdp.READY:
            return self.on_ready(identity, worker, frames[4:])
        if worker is None:
            if command == mdp.REPLY:  # from a worker that was dropped: its request moved on
                self.counters["late_replies"] += 1
                self.log.info("discarded a reply from a dropped worker", identity=identity.hex())
            # RFC 7: a worker the broker does not know is told to disconnect (and re-register).
            self.backend.send_multipart([identity, b"", mdp.WORKER, mdp.DISCONNECT])
            return
        worker.expiry = time.monotonic() + self.liveness()
        if command == mdp.REPLY:
            if len(frames) < 7 or frames[5].bytes != b"":
                return self.malformed("backend", "REPLY needs a ticket, an empty frame and a body", frames)
            self.on_reply(worker, frames[4].bytes, frames[6:])
        elif command == mdp.DISCONNECT:
            self.remove_worker(worker, "it disconnected")
        elif command != mdp.HEARTBEAT:
            self.malformed("backend", f"unknown worker command {command!r:.10}", frames)

    def on_ready(self, identity: bytes, worker: Worker | None, rest: list) -> None:
        if worker is not None:  # READY twice is a protocol error: start over
            self.remove_worker(worker, "it sent READY twice")
            self.backend.send_multipart([identity, b"", mdp.WORKER, mdp.DISCONNECT])
            return
        try:
            if not rest:
                raise MessageError("READY without a service name")
            service_name = rest[0].bytes.decode("utf-8")
            info = mdp.parse_ready_extension(rest[1].bytes if len(rest) > 1 else None)
        except (MessageError, UnicodeDecodeError) as exc:
            self.malformed("backend", f"bad READY: {exc}", [])
            self.backend.send_multipart([identity, b"", mdp.WORKER, mdp.DISCONNECT])
            return
        worker = Worker(identity, service_name, info, expiry=time.monotonic() + self.liveness())
        service = self.service(service_name)
        service.workers[identity] = worker
        service.model = info.model or service.model
        self.workers[identity] = worker
        self.log.info(
            "worker ready", worker=worker.name, service=service_name, capacity=info.capacity
        )
        self.dispatch(service)

    def on_reply(self, worker: Worker, ticket: bytes, body: list) -> None:
        request = worker.running.pop(ticket, None)
        if request is None:
            self.counters["late_replies"] += 1
            self.log.info("discarded a late reply", worker=worker.name, ticket=ticket.hex())
            return
        del self.running[ticket]
        service = self.services[request.service]
        service.service_time.append(time.monotonic() - request.dispatched)
        # Only the type is read: the reply is forwarded as it is (a plain MDP worker's too).
        outcome = "worker_error" if message_type(body[0]) == ErrorReply.TYPE else "ok"
        request.state = "done"
        service.outcomes[outcome] += 1
        self.captured("reply", request.service, body)
        self.frontend.send_multipart(
            [request.client, b"", mdp.CLIENT, request.service.encode(), *body], copy=False
        )
        self.dispatch(service)

    def remove_worker(self, worker: Worker, why: str) -> None:
        self.workers.pop(worker.identity, None)
        service = self.services[worker.service]
        service.workers.pop(worker.identity, None)
        self.log.warning(
            "worker removed", worker=worker.name, service=worker.service, why=why,
            in_flight=len(worker.running),
        )
        now = time.monotonic()
        for ticket, request in worker.running.items():
            del self.running[ticket]
            if request.expires is not None and now >= request.expires:
                self.answer(request, "failed", f"worker {worker.name} was lost ({why}) and the request's ttl has passed")
            elif request.attempts >= self.config.max_attempts:
                self.answer(request, "failed", f"worker {worker.name} was lost ({why}) after {request.attempts} attempts")
            else:
                self.enqueue(service, request)  # keeps its arrival order
        worker.running.clear()
        self.dispatch(service)

    # --- queues and dispatch ----------------------------------------------------------------

    def service(self, name: str) -> Service:
        if name not in self.services:
            self.services[name] = Service(name)
        return self.services[name]

    def enqueue(self, service: Service, request: Request) -> None:
        request.state, request.worker, request.ticket = "queued", None, b""
        heapq.heappush(service.queue, (-request.options.priority, request.seq, request))
        service.queued += 1
        if request.options.replace_key is not None:
            service.by_key[request.options.replace_key] = request
        if request.expires is not None:
            heapq.heappush(self.expiries, (request.expires, request.seq, request))

    def cancel(self, request: Request) -> None:
        """Take a queued request out of its queue (it stays in the heap, skipped when popped)."""
        service = self.services[request.service]
        service.queued -= 1
        request.state = "done"
        key = request.options.replace_key
        if key is not None and service.by_key.get(key) is request:
            del service.by_key[key]

    def pop_next(self, service: Service) -> Request | None:
        while service.queue:
            _, _, request = heapq.heappop(service.queue)
            if request.state == "queued":
                self.cancel(request)
                return request
        return None

    def dispatch(self, service: Service) -> None:
        while service.queued:
            worker = max(
                (w for w in service.workers.values() if w.free > 0),
                key=lambda w: (w.free, -w.last_used),
                default=None,
            )
            if worker is None:
                return
            request = self.pop_next(service)
            if request is None:
                return
            now = time.monotonic()
            if request.expires is not None and now >= request.expires:
                self.answer(request, "expired", "its ttl passed before a worker was free")
                continue
            request.state, request.worker = "running", worker
            request.ticket = next(self.tickets).to_bytes(8, "big")
            request.attempts += 1
            request.dispatched = now
            service.queue_wait.append(now - request.received)
            worker.running[request.ticket] = request
            worker.last_used = now
            self.running[request.ticket] = request
            self.backend.send_multipart(
                [worker.identity, b"", mdp.WORKER, mdp.REQUEST, request.ticket, b"", *request.body],
                copy=False,
            )

    def expire_queued(self, now: float) -> None:
        while self.expiries and self.expiries[0][0] <= now:
            _, _, request = heapq.heappop(self.expiries)
            if request.state == "queued" and request.expires is not None and request.expires <= now:
                self.cancel(request)
                self.answer(request, "expired", "its ttl passed before a worker was free")

    def answer(self, request: Request, code: str, why: str) -> None:
        """Answer `request` with an error (exactly once: it is done afterwards)."""
        request.state = "done"
        self.services[request.service].outcomes[code] += 1
        error = encode(ErrorReply(request.options.request_id, code, why, request.options.robot_id))
        self.captured("reply", request.service, error)
        self.frontend.send_multipart([request.client, b"", mdp.CLIENT, request.service.encode(), *error])
        self.log.debug("answered", code=code, request_id=request.options.request_id, why=why)

    # --- heartbeats and health -------------------------------------------------------------

    def liveness(self) -> float:
        return self.config.heartbeat_interval * self.config.heartbeat_liveness

    def heartbeat(self, now: float) -> None:
        for worker in list(self.workers.values()):
            if now >= worker.expiry:
                self.remove_worker(worker, f"no heartbeat for {self.liveness():.1f} s")
            else:
                self.backend.send_multipart([worker.identity, b"", mdp.WORKER, mdp.HEARTBEAT])
        for ticket, request in list(self.running.items()):
            if now - request.dispatched > self.config.request_timeout:
                worker = request.worker
                del self.running[ticket]
                worker.running.pop(ticket, None)
                self.answer(
                    request, "failed",
                    f"worker {worker.name} did not answer within {self.config.request_timeout:.0f} s",
                )
                self.dispatch(self.services[request.service])

    def malformed(self, side: str, why: str, frames: list) -> None:
        self.counters[f"malformed_{side}"] += 1
        now = time.monotonic()
        if now - self._last_complaint >= 1.0:  # one line a second at most, whatever the flood
            self._last_complaint = now
            self.log.warning(
                "dropped a malformed message", socket=side, why=why, frames=len(frames),
                total=self.counters[f"malformed_{side}"],
            )

    def update_snapshot(self) -> None:
        """The figures that mmi.status and the metrics endpoint report (read by other threads)."""
        now = time.monotonic()
        self.snapshot = {
            "uptime_s": now - self.started,
            "frontend": self.frontend_endpoint,
            "backend": self.backend_endpoint,
            "counters": dict(self.counters),
            "services": {
                name: {
                    "queued": service.queued,
                    "running": sum(len(w.running) for w in service.workers.values()),
                    "workers": len(service.workers),
                    "capacity": sum(w.info.capacity for w in service.workers.values()),
                    "outcomes": dict(service.outcomes),
                    "queue_wait_ms": _percentiles(service.queue_wait),
                    "service_ms": _percentiles(service.service_time),
                    "model": service.model,
                }
                for name, service in self.services.items()
            },
            "workers": [
                {
                    "name": worker.name,
                    "service": worker.service,
                    "capacity": worker.info.capacity,
                    "running": len(worker.running),
                    "idle_s": now - worker.last_used if worker.last_used else None,
                }
                for worker in self.workers.values()
            ],
        }


def serve(config: BrokerConfig, metrics_port: int | None = None) -> None:
    """Run a broker in this process until SIGINT, SIGTERM or SIGHUP."""
    broker = Broker(config)
    on_stop_signals(broker.stop)
    if metrics_port is not None:
        from chunkbus.nodes.metrics import start_metrics_server

        address = start_metrics_server(lambda: broker.snapshot, metrics_port)
        broker.log.info("metrics served", url=f"http://{address[0]}:{address[1]}/metrics")
    broker.run()
