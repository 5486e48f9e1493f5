"""`chunkbus worker`: serves one policy on one device to the broker's backend (MDP worker).

Two threads. The link thread (bus/worker_link.py) owns the DEALER socket: it registers
(READY), sends and answers heartbeats, passes requests on, sends replies, and when the
broker falls silent it closes the socket, opens a new one and registers again (ZeroMQ's
reconnect alone would not re-register). The main thread runs the model, so a long inference
never looks like a dead worker. The broker gives an idle worker up to the capacity it
announced in READY (--max-batch) at once; those requests run together as one batch.
"""

from __future__ import annotations

import threading
import time

import zmq

from ..bus import mdp
from ..bus.codec import decode, encode
from ..bus.lifecycle import announce_ready, run_node
from ..bus.log import get_logger
from ..bus.messages import ActionChunk, ErrorReply, ObservationRequest
from ..bus.schema import MessageError
from ..bus.security import ClientKeys
from ..bus.worker_link import WorkerLink, take_batch
from .policies import Policy


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
        announce_ready(self.log, "worker", service=self.service, broker=self.link.broker, model=self.policy.name,
                       max_batch=self.max_batch)
        try:
            while not self.stop_event.is_set():
                if not pipe.poll(100, zmq.POLLIN):
                    self.link.check()
                    continue
                batch = take_batch(pipe, self.max_batch)  # what the broker gave at once: one batch
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
        for i, (_ticket, *body) in enumerate(batch):
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
                            guided_delay=outcome.guided[0] if outcome.guided else None,
                            guided_horizon=outcome.guided[1] if outcome.guided else None,
                            unguided=outcome.unguided,
                        )
        return [(batch[i][0], replies[i]) for i in range(len(batch))]


def serve(policy: Policy, broker: str, service: str, max_batch: int, keys: ClientKeys | None = None,
          heartbeat_interval: float = mdp.HEARTBEAT_INTERVAL, heartbeat_liveness: int = mdp.HEARTBEAT_LIVENESS) -> None:
    """Run a worker in this process until SIGINT, SIGTERM or SIGHUP; LinkFailed when the broker
    refuses it."""
    run_node(Worker(policy, broker, service, max_batch, keys=keys, heartbeat_interval=heartbeat_interval,
                    heartbeat_liveness=heartbeat_liveness))
