"""The worker's side of the broker protocol (as mdwrkapi.py is in the ZeroMQ guide).

A WorkerLink runs in a thread of its own and owns the DEALER socket: it registers
(READY), sends and answers heartbeats, passes requests on, sends replies, and when the
broker falls silent it closes the socket, opens a new one and registers again (ZeroMQ's
reconnect alone would not re-register). The thread that runs the model talks to it
through a PAIR pipe, so a long inference never looks like a dead worker.

With CURVE keys, a handshake that fails (the broker refuses this key, the broker's key is
not the one given, CURVE on one side only) ends the link: retrying cannot fix it, so the
worker stops and says why (`problem`).
"""

from __future__ import annotations

import itertools
import threading
import time

import zmq

from . import mdp
from .log import get_logger
from .schema import MessageError
from .security import ClientKeys, Handshakes
from .sockets import drain

_PIPE = "inproc://chunkbus-worker-{}"


def take_batch(pipe: zmq.Socket, max_batch: int, timeout: float = 0.5) -> list[list]:
    """The requests waiting on `pipe`, as one batch. The broker gives several at once, each
    ticket saying how many more follow: wait for the rest too, up to `timeout` (past that a
    reconnection lost them: run what came)."""
    batch = list(itertools.islice(drain(pipe), max_batch))
    deadline = time.monotonic() + timeout
    while batch and len(batch) < max_batch and mdp.following(batch[-1][0].bytes):
        if not pipe.poll(max(0.0, deadline - time.monotonic()) * 1000, zmq.POLLIN):
            break
        batch += itertools.islice(drain(pipe), max_batch - len(batch))
    return batch


class LinkFailed(RuntimeError):
    """The link gave up: its handshake with the broker failed (the text says why)."""


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
        keys: ClientKeys | None = None,
    ):
        self.broker, self.service, self.info = broker, service, info
        self.context = context or zmq.Context.instance()
        self.interval, self.liveness = heartbeat_interval, heartbeat_liveness
        self.keys = keys
        self.problem: str | None = None  # why the link gave up (a failed handshake); the worker stops
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

    def check(self) -> None:
        """Raise LinkFailed if the link gave up."""
        if self.problem is not None:
            raise LinkFailed(self.problem)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _connect(self) -> tuple[zmq.Socket, Handshakes]:
        socket = self.context.socket(zmq.DEALER)
        socket.setsockopt(zmq.LINGER, 0)
        if self.keys is not None:
            self.keys.apply(socket)
        handshakes = Handshakes(socket, f"the broker at {self.broker}", curve=self.keys is not None,
                                allow_option="--allow-workers")
        socket.connect(self.broker)
        socket.send_multipart(mdp.worker_to_broker(mdp.READY, service=self.service, info=self.info))
        self.registrations += 1
        return socket, handshakes

    def _run(self) -> None:
        socket, handshakes = self._connect()
        poller = zmq.Poller()
        poller.register(self._inner, zmq.POLLIN)
        poller.register(socket, zmq.POLLIN)
        poller.register(handshakes.monitor, zmq.POLLIN)
        heard = time.monotonic()
        next_heartbeat = heard + self.interval
        try:
            while not self._stop.is_set():
                events = dict(poller.poll(self.interval * 1000 / 2))
                now = time.monotonic()
                if handshakes.monitor in events and (problem := handshakes.read()[1]) is not None:
                    self.problem = problem
                    self.log.error("the broker connection failed: stopping", why=problem)
                    return
                if socket in events:
                    for frames in drain(socket):
                        heard = now
                        if self._on_broker(frames) == "reconnect":
                            heard = 0.0  # start a new session below
                            break
                if self._inner in events:
                    for ticket, *body in drain(self._inner):
                        reply = mdp.worker_to_broker(mdp.REPLY, ticket=ticket, body=body)
                        socket.send_multipart(reply, copy=False)
                if now - heard > self.interval * self.liveness:
                    if heard:
                        self.log.warning(
                            "broker silent: registering again", broker=self.broker,
                            silent_s=round(now - heard, 2),
                        )
                    poller.unregister(socket)
                    poller.unregister(handshakes.monitor)
                    handshakes.close()
                    socket.close(linger=0)
                    socket, handshakes = self._connect()
                    poller.register(socket, zmq.POLLIN)
                    poller.register(handshakes.monitor, zmq.POLLIN)
                    heard = now
                if now >= next_heartbeat:
                    socket.send_multipart(mdp.worker_to_broker(mdp.HEARTBEAT))
                    next_heartbeat = now + self.interval
        finally:
            try:
                socket.send_multipart(mdp.worker_to_broker(mdp.DISCONNECT), zmq.NOBLOCK)
            except zmq.ZMQError:
                pass
            handshakes.close()
            socket.close(linger=100)
            self._inner.close(linger=0)

    def _on_broker(self, frames: list) -> str | None:
        try:
            message = mdp.parse_broker_to_worker(frames)
        except MessageError as exc:
            self.log.warning(
                "dropped a malformed message from the broker", why=str(exc), frames=len(frames)
            )
            return None
        if message.command == mdp.REQUEST:
            # Even a request without a body is passed on: it must get an (error) answer.
            self._inner.send_multipart([message.ticket, *message.body], copy=False)
        elif message.command == mdp.DISCONNECT:
            self.log.warning("the broker asked this worker to register again")
            return "reconnect"
        return None
