"""The broker's scheduling policy. Pure: no sockets, no clock; every call takes `now` and
returns what the broker must do, as plain data: Accepted (capture it), Dispatch, Answer,
ToWorker (a heartbeat or disconnect) and Removed (log it).

Per service it keeps a queue: higher priority first; within one priority, robots take turns
(start-time fair queueing: a request's round is one past its robot's previous request's, and
never earlier than the round being served), first-in first-out within a round (a re-queued
request keeps its place). So one robot that floods the broker delays another by at most the
work already running, a robot's own requests stay in order, and a robot may hold at most
`max_per_robot` requests at once. A robot is its key's identity when CURVE is on,
else its robot id; replace keys are its own. Only a worker running nothing is given work,
as many requests as its capacity at once (they run as one batch), so a request never waits
at a worker behind another: the idle worker with the most capacity first, the least
recently used among equals, spreading the queue over idle workers before filling batches.
The promises: every request gets exactly one Answer (the worker's reply, or an error code
that says why not); nothing is dispatched after its answer; a reply to a request already
answered, or given to another worker, is discarded and counted in `late_replies`.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections import deque
from dataclasses import dataclass, field
from enum import Enum

import numpy as np

from ..bus import mdp
from ..bus.mdp import RequestOptions, WorkerInfo
from ..bus.records import Histogram, ModelDescription, ServiceStatus, WorkerStatus

OUTCOMES = ("ok", "worker_error", "expired", "superseded", "rejected", "failed")
LATENCY_WINDOW = 2000  # recent requests whose latencies the percentiles describe


@dataclass
class SchedulerConfig:
    """The broker's policy (BrokerConfig adds where it listens)."""

    heartbeat_interval: float = mdp.HEARTBEAT_INTERVAL
    heartbeat_liveness: int = mdp.HEARTBEAT_LIVENESS
    max_queue: int = 64  # per service; past it a request is rejected at once
    default_ttl: float | None = None  # for requests that carry none
    request_timeout: float = 60.0  # a dispatched request unanswered this long has failed
    max_attempts: int = 2  # runs of one request (re-runs after its worker died)
    max_per_robot: int = 16  # requests one robot may have queued or running; more are rejected

    @property
    def liveness(self) -> float:
        """Seconds a silent worker is kept."""
        return self.heartbeat_interval * self.heartbeat_liveness


class State(Enum):
    QUEUED = "queued"
    RUNNING = "running"  # back to QUEUED if its worker is lost
    DONE = "done"  # answered


@dataclass(eq=False, slots=True)
class Request:
    client: bytes
    service: str
    body: list  # opaque here: passed on to a worker as it came
    options: RequestOptions
    robot: str  # whose it is: the key's identity, or the robot id
    round: int  # its fair-queueing round: robots take turns within a priority
    seq: int  # arrival order: FIFO among equals, kept when re-queued
    received: float
    expires: float | None
    state: State = State.QUEUED
    held: bool = False  # counted in Scheduler.held, until answered
    attempts: int = 0
    dispatched: float = 0.0
    ticket: bytes = b""
    worker: WorkerSlot | None = None


@dataclass(eq=False)
class WorkerSlot:
    """The broker's view of one worker: what it may take and what it holds."""

    identity: bytes
    service: str
    info: WorkerInfo
    expiry: float  # dropped if nothing is heard from it by then
    last_used: float = 0.0
    turn: int = 0  # when it was last given a request (a count): orders LRU even within one `now`
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
    queue: list = field(default_factory=list)  # heap of (-priority, round, seq, Request); lazy deletion
    queued: int = 0
    workers: dict[bytes, WorkerSlot] = field(default_factory=dict)
    by_key: dict[tuple[str, str], Request] = field(default_factory=dict)  # queued, by (robot, replace key)
    outcomes: dict[str, int] = field(default_factory=lambda: dict.fromkeys(OUTCOMES, 0))
    queue_wait: deque = field(default_factory=lambda: deque(maxlen=LATENCY_WINDOW))
    service_time: deque = field(default_factory=lambda: deque(maxlen=LATENCY_WINDOW))
    # Every latency since start, by bucket, for Prometheus (the deques above are the recent ones).
    queue_wait_histogram: Histogram = field(default_factory=Histogram.empty)
    service_histogram: Histogram = field(default_factory=Histogram.empty)
    model: ModelDescription | None = None  # of its newest worker that said


@dataclass(slots=True)
class Accepted:
    """A request entered its queue (what taps see of it)."""

    service: str
    body: list


@dataclass(slots=True)
class Dispatch:
    """Send a request to a worker under `ticket`."""

    worker: bytes
    ticket: bytes
    body: list


@dataclass(slots=True)
class Answer:
    """Answer a client: with the worker's `reply` as it came, or else an error `outcome`."""

    client: bytes
    service: str
    outcome: str  # one of OUTCOMES
    request_id: str
    robot_id: str
    why: str = ""
    reply: list | None = None


@dataclass(slots=True)
class ToWorker:
    """Send a worker a command without a body: mdp.HEARTBEAT or mdp.DISCONNECT."""

    worker: bytes
    command: bytes


@dataclass(slots=True)
class Removed:
    """A worker was dropped; what became of its requests follows in the same outputs."""

    name: str
    service: str
    why: str
    in_flight: int


Output = Accepted | Dispatch | Answer | ToWorker | Removed  # slotted, not frozen: 4x cheaper to make


def _percentiles(samples: deque) -> dict[str, float]:
    if not samples:
        return {}
    values = np.fromiter(samples, float) * 1000
    p50, p95, p99 = np.percentile(values, [50, 95, 99])
    return {"p50": float(p50), "p95": float(p95), "p99": float(p99), "n": len(values)}


class Scheduler:
    def __init__(self, config: SchedulerConfig):
        self.config = config
        self.services: dict[str, Service] = {}
        self.workers: dict[bytes, WorkerSlot] = {}
        self.running: dict[bytes, Request] = {}  # ticket -> request, for every worker
        self.expiries: list = []  # heap of (expires, seq, Request); lazy deletion
        self.late_replies = 0
        self.held: dict[str, int] = {}  # per robot: its requests queued or running
        self.serving = 0  # the round of the request dispatched last
        self.next_round: dict[str, int] = {}  # per robot: the round after its newest request's
        self._arrivals = itertools.count()
        self._tickets = itertools.count(1)

    # --- events ----------------------------------------------------------------------------

    def request(
        self, client: bytes, service_name: str, body: list, options: RequestOptions, now: float, robot: str = ""
    ) -> list[Output]:
        """A client's request; `robot` is whose it is (default: its robot id, else the client)."""
        ttl = options.ttl if options.ttl is not None else self.config.default_ttl
        robot = robot or options.robot_id or client.hex()
        service = self._service(service_name)
        out: list[Output] = []
        old = service.by_key.get((robot, options.replace_key)) if options.replace_key is not None else None
        if old is not None:
            self._unqueue(old)
            out.append(self._answer(old, "superseded", f"superseded by request {options.request_id!r}"))
        held = self.held.get(robot, 0)
        request = Request(
            client, service_name, body, options, robot, max(self.serving, self.next_round.get(robot, 0)),
            next(self._arrivals), now, None if ttl is None else now + ttl,
        )
        if service.queued >= self.config.max_queue:
            why = f"queue of service {service_name!r} is full ({self.config.max_queue} requests)"
            out.append(self._answer(request, "rejected", why))
            return out
        if held >= self.config.max_per_robot:
            why = f"robot {robot!r} already has {held} requests queued or running (the broker's --max-per-robot)"
            out.append(self._answer(request, "rejected", why))
            return out
        self.held[robot], request.held = held + 1, True
        self.next_round[robot] = request.round + 1
        out.append(Accepted(service_name, body))
        self._enqueue(service, request)
        self._dispatch(service, now, out)
        return out

    def worker_ready(
        self, identity: bytes, service_name: str, info: WorkerInfo | None, now: float
    ) -> list[Output]:
        if identity in self.workers:  # READY twice is a protocol error: start over
            out = self.remove_worker(identity, "it sent READY twice", now)
            return [*out, ToWorker(identity, mdp.DISCONNECT)]
        worker = WorkerSlot(identity, service_name, info, expiry=now + self.config.liveness)
        service = self._service(service_name)
        service.workers[identity] = worker
        service.model = info.model or service.model
        self.workers[identity] = worker
        return self._dispatch(service, now, [])

    def heard(self, identity: bytes, now: float) -> None:
        """Anything from a worker shows it is alive."""
        self.workers[identity].expiry = now + self.config.liveness

    def reply(
        self, identity: bytes, ticket: bytes, body: list, now: float, worker_error: bool = False
    ) -> list[Output]:
        """A worker's reply; [] when it is late (discarded and counted)."""
        worker = self.workers.get(identity)
        request = worker.running.get(ticket) if worker is not None else None
        if request is None:
            self.late_replies += 1
            return []
        self._set_running(request, None)
        service = self.services[request.service]
        service.service_time.append(now - request.dispatched)
        service.service_histogram.observe(now - request.dispatched)
        out: list[Output] = [self._answer(request, "worker_error" if worker_error else "ok", reply=body)]
        return self._dispatch(service, now, out)

    def remove_worker(self, identity: bytes, why: str, now: float) -> list[Output]:
        """Drop a worker; its requests run elsewhere unless their ttl or attempts ran out."""
        worker = self.workers.pop(identity)
        service = self.services[worker.service]
        del service.workers[identity]
        out: list[Output] = [Removed(worker.name, worker.service, why, len(worker.running))]
        for request in list(worker.running.values()):
            self._set_running(request, None)
            lost = f"worker {worker.name} was lost ({why})"
            if request.expires is not None and now >= request.expires:
                out.append(self._answer(request, "failed", f"{lost} and the request's ttl has passed"))
            elif request.attempts >= self.config.max_attempts:
                out.append(self._answer(request, "failed", f"{lost} after {request.attempts} attempts"))
            else:
                self._enqueue(service, request)  # keeps its arrival order
        return self._dispatch(service, now, out)

    def heartbeat(self, now: float) -> list[Output]:
        """Drop the workers not heard from within liveness and heartbeat the others; fail the
        requests that a worker has held past request_timeout."""
        out: list[Output] = []
        why = f"no heartbeat for {self.config.liveness:.1f} s"
        for silent in [w for w in self.workers.values() if now >= w.expiry]:
            out += self.remove_worker(silent.identity, why, now)
        out += [ToWorker(identity, mdp.HEARTBEAT) for identity in self.workers]
        for request in list(self.running.values()):
            if now - request.dispatched > self.config.request_timeout:
                worker = request.worker
                self._set_running(request, None)
                why = f"worker {worker.name} did not answer within {self.config.request_timeout:.0f} s"
                out.append(self._answer(request, "failed", why))
                self._dispatch(self.services[request.service], now, out)
        return out

    def expire(self, now: float) -> list[Output]:
        """Answer the queued requests whose ttl has passed."""
        out: list[Output] = []
        while self.expiries and self.expiries[0][0] <= now:
            _, _, request = heapq.heappop(self.expiries)
            if request.state is State.QUEUED and request.expires is not None and request.expires <= now:
                self._unqueue(request)
                out.append(self._answer(request, "expired", "its ttl passed before a worker was free"))
        return out

    def next_expiry(self) -> float:
        """When expire() may next have something to do (inf: never). The entries of requests
        no longer queued are dropped first: the broker would wake for each one for nothing."""
        while self.expiries and self.expiries[0][2].state is not State.QUEUED:
            heapq.heappop(self.expiries)
        return self.expiries[0][0] if self.expiries else math.inf

    def shutdown(self) -> list[Output]:
        """Fail every request held, queued ones first, and disconnect every worker."""
        why = "the broker is shutting down"
        out: list[Output] = []
        for service in self.services.values():
            while (request := self._pop_next(service)) is not None:
                out.append(self._answer(request, "failed", why))
        for request in list(self.running.values()):
            self._set_running(request, None)
            out.append(self._answer(request, "failed", why))
        return out + [ToWorker(identity, mdp.DISCONNECT) for identity in self.workers]

    def figures(self, now: float) -> tuple[dict[str, ServiceStatus], list[WorkerStatus]]:
        """Per service and per worker, for the broker's status snapshot."""
        services = {
            name: ServiceStatus(
                queued=service.queued,
                running=sum(len(w.running) for w in service.workers.values()),
                workers=len(service.workers),
                capacity=sum(w.info.capacity for w in service.workers.values()),
                outcomes=dict(service.outcomes),
                queue_wait_ms=_percentiles(service.queue_wait),
                service_ms=_percentiles(service.service_time),
                model=service.model,
                queue_wait_histogram=service.queue_wait_histogram.copy(),
                service_histogram=service.service_histogram.copy(),
            )
            for name, service in self.services.items()
        }
        workers = [
            WorkerStatus(worker.name, worker.service, worker.info.capacity, len(worker.running),
                         now - worker.last_used if worker.last_used else None)
            for worker in self.workers.values()
        ]
        return services, workers

    # --- queues and dispatch ---------------------------------------------------------------

    def _service(self, name: str) -> Service:
        if name not in self.services:
            self.services[name] = Service(name)
        return self.services[name]

    def _set_running(self, request: Request, worker: WorkerSlot | None, following: int = 0) -> None:
        """Give `request` to `worker` (with `following` more of its batch after it), or take it
        back (None): the one place that changes the two running maps, per worker and for all,
        so that they always agree."""
        if request.worker is not None:
            del request.worker.running[request.ticket]
            del self.running[request.ticket]
            request.state, request.worker, request.ticket = State.QUEUED, None, b""
        if worker is not None:
            request.state, request.worker = State.RUNNING, worker
            request.ticket = mdp.batch_ticket(next(self._tickets), following)
            worker.running[request.ticket] = request
            self.running[request.ticket] = request

    def _enqueue(self, service: Service, request: Request) -> None:
        request.state = State.QUEUED
        heapq.heappush(service.queue, (-request.options.priority, request.round, request.seq, request))
        service.queued += 1
        if request.options.replace_key is not None:
            service.by_key[request.robot, request.options.replace_key] = request
        if request.expires is not None:
            heapq.heappush(self.expiries, (request.expires, request.seq, request))

    def _unqueue(self, request: Request) -> None:
        """Take a queued request out of its queue's count and keys; its heap entries stay,
        skipped once its state is no longer QUEUED (the caller changes it at once)."""
        service = self.services[request.service]
        service.queued -= 1
        key = (request.robot, request.options.replace_key)
        if key[1] is not None and service.by_key.get(key) is request:
            del service.by_key[key]

    def _pop_next(self, service: Service) -> Request | None:
        while service.queue:
            request = heapq.heappop(service.queue)[-1]
            if request.state is State.QUEUED:
                self._unqueue(request)
                return request
        return None

    def _dispatch(self, service: Service, now: float, out: list[Output]) -> list[Output]:
        """Give queued requests to idle workers; appends to `out` and returns it.

        Only a worker running nothing is given work, up to its capacity at once (one batch).
        A request given to a busy worker would wait there, out of the broker's reach: a
        higher-priority request arriving later would queue behind it, and it could no longer
        be superseded, expire, or go to another worker that frees up first.
        """
        idle = [w for w in service.workers.values() if not w.running]
        batches: dict[WorkerSlot, list[Request]] = {}
        while service.queued:  # plan: one request at a time to the idle worker with most room
            worker = max((w for w in idle if w.free > len(batches.get(w, ()))),
                         key=lambda w: (w.free - len(batches.get(w, ())), -w.turn), default=None)
            if worker is None:
                break
            request = self._pop_next(service)
            if request is None:
                break
            if request.expires is not None and now >= request.expires:
                out.append(self._answer(request, "expired", "its ttl passed before a worker was free"))
                continue
            batches.setdefault(worker, []).append(request)
            worker.turn = next(self._tickets)
        for worker, batch in batches.items():  # each worker's batch back to back, numbered
            for position, request in enumerate(batch):
                self._set_running(request, worker, following=len(batch) - 1 - position)
                self.serving = max(self.serving, request.round)
                request.attempts += 1
                request.dispatched = worker.last_used = now
                service.queue_wait.append(now - request.received)
                service.queue_wait_histogram.observe(now - request.received)
                out.append(Dispatch(worker.identity, request.ticket, request.body))
        return out

    def _answer(self, request: Request, outcome: str, why: str = "", reply: list | None = None) -> Answer:
        """The one answer to `request`: it is done afterwards."""
        if request.held:  # it counted against its robot's bound until now
            request.held = False
            self.held[request.robot] -= 1
            if not self.held[request.robot]:
                del self.held[request.robot]
                if self.next_round.get(request.robot, 0) <= self.serving:  # nothing to remember
                    self.next_round.pop(request.robot, None)
        request.state = State.DONE
        self.services[request.service].outcomes[outcome] += 1
        options = request.options
        return Answer(
            request.client, request.service, outcome, options.request_id, options.robot_id, why, reply
        )
