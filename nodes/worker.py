"""`chunkbus worker`: serves one policy on one device to the broker's backend (MDP worker).

Two threads. The link thread owns the DEALER socket: it registers (READY), sends and
answers heartbeats, passes requests on, sends replies, and when the broker falls
silent it closes the socket, opens a new one and registers again (ZeroMQ's reconnect
alone would not re-register). The main thread runs the model, so a long inference
never looks like a dead worker. Requests that wait when the model becomes free run
together as one batch, up to the capacity announced in READY (--max-batch).
"""

from __future__ import annotations

import threading
import time

import zmq

from chunkbus.bus import mdp
from chunkbus.bus.codec import decode, encode
from chunkbus.bus.lifecycle import on_stop_signals
from chunkbus.bus.log import get_logger
from chunkbus.bus.messages import ActionChunk, ErrorReply, MessageError, ObservationRequest
from chunkbus.nodes.policies import Policy

_PIPE = "inproc://chunkbus-worker-{}"


class WorkerLink:
    """The broker connection, run in its own thread. Talk to it through pipe()."""

    def __init__(
        self,
        broker: str,
        service: str,
        info: mdp.WorkerInfo,
        *,
        context: zmq.Context | None = None,
        heartbeat_interval: float = mdp.HEARTBEAT_INTERVAL,
        heartbeat_liveness: int = mdp.HEARTBEAT_LIVENESS,
    ):
        self.broker, self.service, self.info = broker, service, info
        self.context = context or zmq.Context.instance()
        self.interval, self.liveness = heartbeat_interval, heartbeat_liveness
        self.log = get_logger(component="link")
        self.endpoint = _PIPE.format(id(self))
        self.registrations = 0
        self._stop = threading.Event()
        inner = self.context.socket(zmq.PAIR)
        inner.bind(self.endpoint)
        self._inner = inner
        self._thread = threading.Thread(target=self._run, name="chunkbus-link", daemon=True)

    def pipe(self) -> zmq.Socket:
        """The main thread's end: receives [ticket, *body]; send [ticket, *reply body]."""
        outer = self.context.socket(zmq.PAIR)
        outer.connect(self.endpoint)
        self._thread.start()
        return outer

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _connect(self) -> zmq.Socket:
        socket = self.context.socket(zmq.DEALER)
        socket.setsockopt(zmq.LINGER, 0)
        socket.connect(self.broker)
        ready = [b"", mdp.WORKER, mdp.READY, self.service.encode(), mdp.pack_ready_extension(self.info)]
        socket.send_multipart(ready)
        self.registrations += 1
        return socket

    def _run(self) -> None:
        socket = self._connect()
        poller = zmq.Poller()
        poller.register(self._inner, zmq.POLLIN)
        poller.register(socket, zmq.POLLIN)
        heard = time.monotonic()
        next_heartbeat = heard + self.interval
        try:
            while not self._stop.is_set():
                events = dict(poller.poll(self.interval * 1000 / 2))
                now = time.monotonic()
                if socket in events:
                    while True:
                        try:
                            frames = socket.recv_multipart(zmq.NOBLOCK, copy=False)
                        except zmq.Again:
                            break
                        heard = now
                        if self._on_broker(frames) == "reconnect":
                            heard = 0.0  # start a new session below
                            break
                if self._inner in events:
                    while True:
                        try:
                            ticket, *body = self._inner.recv_multipart(zmq.NOBLOCK, copy=False)
                        except zmq.Again:
                            break
                        socket.send_multipart(
                            [b"", mdp.WORKER, mdp.REPLY, ticket, b"", *body], copy=False
                        )
                if now - heard > self.interval * self.liveness:
                    if heard:
                        self.log.warning(
                            "broker silent: registering again", broker=self.broker,
                            silent_s=round(now - heard, 2),
                        )
                    poller.unregister(socket)
                    socket.close(linger=0)
                    socket = self._connect()
                    poller.register(socket, zmq.POLLIN)
                    heard = now
                if now >= next_heartbeat:
                    socket.send_multipart([b"", mdp.WORKER, mdp.HEARTBEAT])
                    next_heartbeat = now + self.interval
        finally:
            try:
                socket.send_multipart([b"", mdp.WORKER, mdp.DISCONNECT], zmq.NOBLOCK)
            except zmq.ZMQError:
                pass
            socket.close(linger=100)
            self._inner.close(linger=0)

    def _on_broker(self, frames: list) -> str | None:
        if len(frames) < 3 or frames[0].bytes != b"" or frames[1].bytes != mdp.WORKER:
            self.log.warning("dropped a malformed message from the broker", frames=len(frames))
            return None
        command = frames[2].bytes
        if command == mdp.REQUEST:
            if len(frames) < 5 or frames[4].bytes != b"":
                self.log.warning("dropped a malformed REQUEST from the broker")
                return None
            # Even a request without a body is passed on: it must get an (error) answer.
            self._inner.send_multipart([frames[3], *frames[5:]], copy=False)
        elif command == mdp.DISCONNECT:
            self.log.warning("the broker asked this worker to register again")
            return "reconnect"
        return None


class Worker:
    def __init__(self, policy: Policy, broker: str, service: str, max_batch: int, **link_options):
        self.policy = policy
        self.service = service
        self.max_batch = max_batch
        self.log = get_logger()
        info = mdp.WorkerInfo(capacity=max_batch, model=policy.describe(), name=f"{service}@{id(self):x}")
        self.link = WorkerLink(broker, service, info, **link_options)
        self.stop_event = threading.Event()
        self.batches = 0

    def stop(self) -> None:
        self.stop_event.set()

    def run(self) -> None:
        pipe = self.link.pipe()
        self.log.info(
            "worker ready", service=self.service, broker=self.link.broker, model=self.policy.name,
            max_batch=self.max_batch,
        )
        try:
            while not self.stop_event.is_set():
                if not pipe.poll(100, zmq.POLLIN):
                    continue
                batch = [pipe.recv_multipart(copy=False)]
                while len(batch) < self.max_batch:
                    try:
                        batch.append(pipe.recv_multipart(zmq.NOBLOCK, copy=False))
                    except zmq.Again:
                        break
                for ticket, reply in self.serve(batch):
                    pipe.send_multipart([ticket, *encode(reply)], copy=False)
        finally:
            pipe.close(linger=100)
            self.link.stop()
            self.log.info("worker stopped", batches=self.batches)

    def serve(self, batch: list[list]) -> list[tuple]:
        """Decode, run and answer one batch: [(ticket, reply message)]."""
        start = time.perf_counter()
        replies: list = [None] * len(batch)
        requests, positions = [], []
        for i, (ticket, *body) in enumerate(batch):
            try:
                message = decode(body)
                if not isinstance(message, ObservationRequest):
                    raise MessageError(f"expected an observation_request, got {message.TYPE}")
            except MessageError as exc:
                replies[i] = ErrorReply("", "bad_request", f"not a valid request: {exc}")
                continue
            requests.append(message)
            positions.append(i)
        decode_s = time.perf_counter() - start
        if requests:
            try:
                result = self.policy.run(requests)
            except Exception as exc:  # a model failure answers this batch and keeps serving
                self.log.exception("the policy failed", model=self.policy.name)
                for i, request in zip(positions, requests):
                    replies[i] = ErrorReply(
                        request.request_id, "failed", f"{self.policy.name} failed: {exc}", request.robot_id
                    )
            else:
                self.batches += 1
                timings = {"decode": decode_s, "batch_size": float(len(requests)), **result.timings}
                for i, request, outcome in zip(positions, requests, result.results):
                    if outcome.error is not None:
                        replies[i] = ErrorReply(
                            request.request_id, "bad_request", str(outcome.error), request.robot_id
                        )
                    else:
                        replies[i] = ActionChunk(
                            request_id=request.request_id,
                            robot_id=request.robot_id,
                            tick=request.tick,
                            actions=outcome.actions,
                            worker=self.link.info.name,
                            model=self.policy.name,
                            timings=timings,
                        )
        return [(batch[i][0], replies[i]) for i in range(len(batch))]


def serve(policy: Policy, broker: str, service: str, max_batch: int) -> None:
    """Run a worker in this process until SIGINT, SIGTERM or SIGHUP."""
    worker = Worker(policy, broker, service, max_batch)
    on_stop_signals(worker.stop)
    worker.run()
