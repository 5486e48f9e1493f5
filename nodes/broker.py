"""`chunkbus broker`: a Majordomo (RFC 7) broker with priorities, expiry, replace keys,
capacity-aware load balancing and heartbeats.

One thread runs the event loop below; nothing else touches the sockets. This is the
broker's I/O: the poll loop, the frames (bus/mdp.py), the capture for taps and the status
snapshot. What goes where and when is the pure Scheduler's (nodes/broker_core.py), and so
are the promises: every request gets exactly one answer; a late reply is discarded.

With CURVE on (bus/security.py), both ports take only CURVE connections whose keys are in
their allow-list folder: robots' on the frontend, workers' on the backend, so a robot's key
cannot serve and a worker's cannot ask. Each message carries its key's name (User-Id): a
request must carry that name as its robot id, and a key removed from its folder is cut off
at its next message (a worker at once).
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass

import msgpack
import zmq

from ..bus import mdp
from ..bus.codec import MAX_MESSAGE_BYTES, encode, message_type
from ..bus.endpoints import capture_topic, is_ipv6, stats_topic
from ..bus.lifecycle import announce_ready, run_node
from ..bus.log import Every, get_logger
from ..bus.messages import ErrorReply, Stats
from ..bus.records import BrokerStatus
from ..bus.schema import MessageError
from ..bus.security import AllowList, ZapHandler, make_server, read_key_pair
from ..bus.sockets import Publisher, drain, send_frames
from .broker_core import Accepted, Answer, Dispatch, Removed, Scheduler, SchedulerConfig, ToWorker


@dataclass
class BrokerConfig(SchedulerConfig):  # the scheduler's settings, and where the broker listens
    frontend: str = "tcp://*:5555"
    backend: str = "tcp://*:5556"
    capture: str | None = "broker"  # node name whose ipc endpoint offers the traffic to taps; None: off
    max_message_bytes: int = MAX_MESSAGE_BYTES  # a larger frame drops its sender's connection
    curve_secret: str | None = None  # the broker's NAME.key_secret: CURVE on both ports
    allow_robots: str | None = None  # folders of the public keys allowed on each port (with curve_secret)
    allow_workers: str | None = None


WAITING_WINDOW = 5.0  # seconds a client that asked for a service without a worker counts as waiting
DRAIN_LIMIT = 1000  # messages taken from one socket before the other's turn: neither starves


class BrokerSetupError(ValueError):
    """The broker's configuration cannot work (its keys); the text names the fix."""


class Broker:
    def __init__(self, config: BrokerConfig, context: zmq.Context | None = None):
        self.config = config
        self.context = context or zmq.Context.instance()
        self.log = get_logger()
        self.core = Scheduler(config)
        self.counters = {"malformed_frontend": 0, "malformed_backend": 0, "unauthorized": 0}
        self.complain_every = Every(1.0)  # a line a second at most, whatever the flood
        self.started = time.monotonic()
        self.snapshot = BrokerStatus(0.0, "", "")  # replaced before anyone reads it
        self.stop_event = threading.Event()
        self.frontend = self.context.socket(zmq.ROUTER)
        self.backend = self.context.socket(zmq.ROUTER)
        self.robots = self.workers = None  # AllowLists, with CURVE on
        self.worker_keys: dict[bytes, str] = {}  # a worker's identity -> its key's name
        self.waiting: dict[str, dict[bytes, float]] = {}  # service without a worker -> clients asking, when
        if config.curve_secret:
            self._secure(config)
        for socket, endpoint in ((self.frontend, config.frontend), (self.backend, config.backend)):
            socket.setsockopt(zmq.LINGER, 0)
            socket.setsockopt(zmq.ROUTER_MANDATORY, 0)  # a vanished peer's reply is dropped
            socket.setsockopt(zmq.IPV6, is_ipv6(endpoint))  # tcp://[::]:5555 (both stacks), [::1]:5555
            socket.setsockopt(zmq.MAXMSGSIZE, config.max_message_bytes)  # no client makes it allocate gigabytes
            socket.bind(endpoint)
        # Requests and replies as they pass, on broker/request/SERVICE and broker/reply/SERVICE,
        # for `chunkbus tap` (a PUB socket: free when nobody listens, never blocks).
        self.capture = Publisher(config.capture, sndhwm=1000) if config.capture else None
        self.frontend_endpoint = self.frontend.getsockopt_string(zmq.LAST_ENDPOINT)
        self.backend_endpoint = self.backend.getsockopt_string(zmq.LAST_ENDPOINT)

    def _secure(self, config: BrokerConfig) -> None:
        if not (config.allow_robots and config.allow_workers):
            raise BrokerSetupError("with --curve-secret the broker needs --allow-robots DIR and --allow-workers DIR: "
                                   "the folders of the public keys (NAME.key) of the robots and the workers it lets in")
        own = read_key_pair(config.curve_secret)
        self.robots = AllowList(config.allow_robots, "--allow-robots")
        self.workers = AllowList(config.allow_workers, "--allow-workers")
        self.zap = ZapHandler.of(self.context)
        self.domains = {"robots": self.zap.add_domain("robots", self.robots),
                        "workers": self.zap.add_domain("workers", self.workers)}
        make_server(self.frontend, own, self.domains["robots"])
        make_server(self.backend, own, self.domains["workers"])
        self.log.info("CURVE on", key=own.public.decode(), robots=len(self.robots.names),
                      workers=len(self.workers.names))

    def refresh_keys(self, now: float) -> None:
        """Re-read the allow-lists (a key file added or removed); a removed worker key's workers
        are dropped at once (their requests run elsewhere), a robot key's next message refused."""
        if self.robots is None:
            return
        self.worker_keys = {i: key for i, key in self.worker_keys.items() if i in self.core.workers}
        self.robots.refresh()
        for name in self.workers.refresh():
            for identity in [i for i, key in self.worker_keys.items() if key == name]:
                self.worker_keys.pop(identity)
                if identity in self.core.workers:
                    self.send(self.core.remove_worker(identity, f"its key {name!r} was removed", now))
                self.send([ToWorker(identity, mdp.DISCONNECT)])

    def run(self) -> None:
        announce_ready(self.log, "broker", frontend=self.frontend_endpoint, backend=self.backend_endpoint,
                       curve=self.robots is not None)
        poller = zmq.Poller()
        poller.register(self.frontend, zmq.POLLIN)
        poller.register(self.backend, zmq.POLLIN)
        handlers = ((self.backend, self.on_worker_message), (self.frontend, self.on_client_message))
        interval = self.config.heartbeat_interval
        next_heartbeat = time.monotonic() + interval
        self.update_snapshot()
        try:
            while not self.stop_event.is_set():
                wake = min(next_heartbeat, self.core.next_expiry())
                # Whole milliseconds, rounded up: zmq_poll takes an int, and a timeout truncated to
                # 0 would spin the loop through the last millisecond before every deadline.
                events = dict(poller.poll(math.ceil(max(0, min(wake - time.monotonic(), interval)) * 1000)))
                for socket, handle in handlers:
                    if socket in events:
                        for frames in drain(socket, DRAIN_LIMIT):
                            handle(frames)
                now = time.monotonic()
                self.send(self.core.expire(now))
                if now >= next_heartbeat:
                    next_heartbeat = now + interval
                    self.send(self.core.heartbeat(now))
                    self.refresh_keys(now)
                    self.update_snapshot()
                    self.publish_stats()
        finally:
            self.shutdown()

    def stop(self) -> None:
        self.stop_event.set()

    def shutdown(self) -> None:
        self.send(self.core.shutdown())
        # Give zmq's I/O thread time to deliver those answers: in tests, closing a ROUTER
        # socket with LINGER alone lost messages it had just queued.
        time.sleep(0.25)
        self.frontend.close(linger=100)
        self.backend.close(linger=100)
        if self.capture is not None:
            self.capture.close()
        self.log.info("broker stopped")

    def send(self, outputs: list) -> None:
        """Carry out what the scheduler decided."""
        for out in outputs:
            if isinstance(out, Dispatch):
                frames = mdp.broker_to_worker(out.worker, mdp.REQUEST, ticket=out.ticket, body=out.body)
                send_frames(self.backend, frames)
            elif isinstance(out, Answer):
                body = out.reply
                if body is None:
                    body = encode(ErrorReply(out.request_id, out.outcome, out.why, out.robot_id))
                    self.log.debug("answered", code=out.outcome, request_id=out.request_id, why=out.why)
                self.captured("reply", out.service, body)
                send_frames(self.frontend, mdp.broker_to_client(out.client, out.service, body))
            elif isinstance(out, Accepted):
                self.captured("request", out.service, out.body)
            elif isinstance(out, ToWorker):
                self.backend.send_multipart(mdp.broker_to_worker(out.worker, out.command))
            elif isinstance(out, Removed):
                self.log.warning("worker removed", worker=out.name, service=out.service, why=out.why,
                                 in_flight=out.in_flight)

    def captured(self, direction: str, service: str, body: list) -> None:
        if self.capture is not None:
            self.capture.publish_frames(capture_topic(direction, service), body)

    def malformed(self, side: str, why: str, frames: int) -> None:
        key = f"malformed_{side}"
        self.counters[key] += 1
        if self.complain_every(time.monotonic()):
            self.log.warning("dropped a malformed message", socket=side, why=why, frames=frames,
                             total=self.counters[key])

    # --- clients -------------------------------------------------------------------------

    def on_client_message(self, frames: list) -> None:
        try:
            request = mdp.parse_client_to_broker(frames)
        except MessageError as exc:
            return self.malformed("frontend", str(exc), len(frames))
        key = frames[-1].get("User-Id") if self.robots is not None else ""
        if key and not self.robots.allows(key):
            return self.refuse(request, mdp.request_options(request.body), f"the key {key!r} is no longer allowed "
                               "(it was removed from the broker's --allow-robots)")
        if request.service.startswith("mmi."):
            return self.on_mmi(request)
        options, now = mdp.request_options(request.body), time.monotonic()
        if key and options.robot_id != key:
            return self.refuse(request, options, f"robot id {options.robot_id!r} is not this key's: the key "
                               f"{key!r} may only send requests as robot {key!r} (--robot-id)")
        self.send(self.core.request(request.client, request.service, request.body, options, now, key))

    def refuse(self, request: mdp.ClientRequest, options: mdp.RequestOptions, why: str) -> None:
        """Answer a request the key may not send `unauthorized` (it goes to no worker)."""
        self.counters["unauthorized"] += 1
        if self.complain_every(time.monotonic()):
            self.log.warning("refused a request", service=request.service, robot_id=options.robot_id, why=why,
                             total=self.counters["unauthorized"])
        body = encode(ErrorReply(options.request_id, "unauthorized", why, options.robot_id))
        self.frontend.send_multipart(mdp.broker_to_client(request.client, request.service, body), copy=False)

    def on_mmi(self, request: mdp.ClientRequest) -> None:
        name = request.body[0].bytes.decode("utf-8", "replace") if request.body else ""
        service = self.core.services.get(name)
        served = service if service is not None and service.workers else None  # a worker is up
        if served is None and name and request.service in (mdp.MMI_SERVICE, mdp.MODEL_SERVICE):
            asking = self.waiting.setdefault(name[:128], {})
            if len(asking) < 10_000 and len(self.waiting) < 1024:  # no client makes this grow without end
                asking[request.client] = time.monotonic()
        if request.service == mdp.MMI_SERVICE:
            reply = b"200" if served else b"404"
        elif request.service == mdp.STATUS_SERVICE:
            self.update_snapshot()
            reply = msgpack.packb(self.snapshot.to_wire())
        elif request.service == mdp.MODEL_SERVICE:
            reply = msgpack.packb(served.model.to_wire()) if served and served.model else b"404"
        else:
            reply = b"501"
        self.frontend.send_multipart(mdp.broker_to_client(request.client, request.service, [reply]))

    # --- workers -------------------------------------------------------------------------

    def on_worker_message(self, frames: list) -> None:
        try:
            message = mdp.parse_worker_to_broker(frames)
        except MessageError as exc:
            return self.malformed("backend", str(exc), len(frames))
        identity, command, now = message.identity, message.command, time.monotonic()
        if self.workers is not None:
            key = frames[-1].get("User-Id")
            if not self.workers.allows(key):  # removed from --allow-workers since it connected
                if identity in self.core.workers:
                    self.send(self.core.remove_worker(identity, f"its key {key!r} was removed", now))
                return self.send([ToWorker(identity, mdp.DISCONNECT)])
            self.worker_keys[identity] = key
        worker = self.core.workers.get(identity)
        if command == mdp.READY and (worker is not None or message.problem is None):
            # A known worker's READY is a protocol error: it is dropped and told to disconnect.
            outputs = self.core.worker_ready(identity, message.service, message.info, now)
            if worker is None:
                name, capacity = self.core.workers[identity].name, message.info.capacity
                self.log.info("worker ready", worker=name, service=message.service, capacity=capacity)
            return self.send(outputs)
        if worker is None:
            if command == mdp.READY:
                self.malformed("backend", message.problem, 0)
            elif command == mdp.REPLY:  # from a worker that was dropped: its request moved on
                self.core.reply(identity, message.ticket, message.body, now)  # counts it as late
                self.log.info("discarded a reply from a dropped worker", identity=identity.hex())
            # RFC 7: a worker the broker does not know is told to disconnect (and re-register).
            return self.send([ToWorker(identity, mdp.DISCONNECT)])
        self.core.heard(identity, now)
        if message.problem is not None:
            self.malformed("backend", message.problem, len(frames))
        elif command == mdp.REPLY:
            # Only the type is read: the reply is forwarded as it is (a plain MDP worker's too).
            failed = message_type(message.body[0]) == ErrorReply.TYPE
            outputs = self.core.reply(identity, message.ticket, message.body, now, worker_error=failed)
            if not outputs:
                self.log.info("discarded a late reply", worker=worker.name, ticket=message.ticket.hex())
            self.send(outputs)
        elif command == mdp.DISCONNECT:
            self.worker_keys.pop(identity, None)
            self.send(self.core.remove_worker(identity, "it disconnected", now))

    def publish_stats(self) -> None:
        """Per service: queued, running, workers, on `<name>/stats` beside the capture, for viewers
        and recordings (the same figures as mmi.status)."""
        if self.capture is None:
            return
        figures = {f"{name}/{key}": float(getattr(service, key)) for name, service in self.snapshot.services.items()
                   for key in ("queued", "running", "workers")}
        self.capture.publish(stats_topic(self.config.capture), Stats(self.config.capture, time.monotonic(), figures))

    def update_snapshot(self) -> None:
        """The figures that mmi.status and the metrics endpoint report (read by other threads)."""
        now = time.monotonic()
        services, workers = self.core.figures(now)
        counters = {**self.counters, "late_replies": self.core.late_replies}
        for name, asking in list(self.waiting.items()):  # a robot asks twice a second while it waits
            for client in [c for c, when in asking.items() if now - when > WAITING_WINDOW]:
                del asking[client]
            if not asking or (name in services and services[name].workers):
                del self.waiting[name]
        if self.robots is not None:  # connections whose key the ZAP handler refused
            counters.update({f"refused_{side}": self.zap.refusals(domain) for side, domain in self.domains.items()})
        self.snapshot = BrokerStatus(now - self.started, self.frontend_endpoint, self.backend_endpoint, services,
                                     workers, counters, {name: len(asking) for name, asking in self.waiting.items()})


def serve(config: BrokerConfig, metrics_port: int | None = None, metrics_host: str = "127.0.0.1") -> None:
    """Run a broker in this process until SIGINT, SIGTERM or SIGHUP."""
    broker = Broker(config)
    if metrics_port is not None:
        from .metrics import start_metrics_server

        address = start_metrics_server(lambda: broker.snapshot, metrics_port, metrics_host)
        broker.log.info("metrics served", url=f"http://{address[0]}:{address[1]}/metrics")
    run_node(broker)
