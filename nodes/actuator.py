"""`chunkbus actuator`: the robot's control loop (the design's control timeline).

Every tick k (at t0 + k/fps) it: takes in the chunks that arrived and merges them into
the schedule with the chosen stitching strategy (their past part dropped); publishes
the command scheduled for tick k, or holds the last one when the schedule has run dry;
records the observation of tick k (newest frames and state, refused when older than
--max-obs-age); and asks for a new chunk when the actions left fall to the expected
delay (the measured round trip, in ticks) plus a margin. At most one request is in
flight; its replace key is the robot id, so a queued stale one is superseded.
"""

from __future__ import annotations

import math
import signal
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from functools import partial

import numpy as np

from chunkbus.bus.client import BrokerClient, BrokerUnavailable, new_request_id
from chunkbus.bus.log import get_logger
from chunkbus.bus.messages import ActionChunk, Command, ErrorReply, Observation, ObservationRequest, Stats
from chunkbus.bus.sockets import Publisher, Subscriber
from chunkbus.bus.ticker import Ticker
from chunkbus.nodes import stitching


@dataclass
class ActuatorConfig:
    broker: str = "tcp://127.0.0.1:5555"
    service: str = "act"
    robot_id: str = "robot"
    task: str = ""
    fps: float = 30.0
    strategy: str = "replace"
    crossfade_window: int = 5
    ensemble_m: float = 0.01
    priority: int = 0
    ttl: float | None = 0.5
    cameras: dict[str, str] = field(default_factory=dict)  # camera name -> policy feature key
    arm: str = "arm"  # the arm node, or its endpoint
    camera_nodes: dict[str, str] = field(default_factory=dict)  # camera name -> node or endpoint
    max_obs_age: float = 0.25
    n_obs_steps: int | None = None  # None: as the service's model says
    margin_ticks: int = 2
    request_timeout: float = 2.0
    name: str = "actuator"


class ModelWatch:
    """Keeps the service's model description fresh, off the control loop (a status query blocks)."""

    def __init__(self, broker: str, service: str):
        self.model: dict | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(broker, service), daemon=True, name="chunkbus-model")
        self._thread.start()

    def _run(self, broker: str, service: str) -> None:
        with BrokerClient(broker, connect_timeout=1.0) as client:
            while not self._stop.is_set():
                try:
                    found = client.status(timeout=1.0)["services"].get(service)
                    if found and found.get("model"):
                        self.model = found["model"]
                except (TimeoutError, BrokerUnavailable):
                    pass
                self._stop.wait(5.0 if self.model else 0.5)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=3)


class Actuator:
    def __init__(self, config: ActuatorConfig):
        self.config = config
        self.log = get_logger()
        merge = stitching.STRATEGIES[config.strategy]
        if config.strategy == "crossfade":
            merge = partial(merge, window=config.crossfade_window)
        elif config.strategy == "ensemble":
            merge = partial(merge, m=config.ensemble_m)
        self.merge = merge
        sources = [config.arm] + [config.camera_nodes.get(c, f"camera_{c}") for c in config.cameras]
        topics = ["state"] + [f"camera/{c}" for c in config.cameras]
        self.inputs = Subscriber(sources, topics)
        self.publisher = Publisher(config.name)
        self.client = BrokerClient(config.broker, connect_timeout=0.0)
        self.model = ModelWatch(config.broker, config.service)
        self.stop_event = threading.Event()
        self.schedule: stitching.Schedule | None = None
        self.history: deque[Observation] = deque(maxlen=64)
        self.outstanding: tuple[str, int, float] | None = None  # request id, tick, send time
        self.round_trips: deque[float] = deque(maxlen=50)
        self.expected_delay = math.ceil(config.fps)  # ticks; 1 s until a round trip is measured
        self.last_command: np.ndarray | None = None
        self.names: list[str] = []
        self.counts = dict.fromkeys(
            ["commands", "holds", "requests", "chunks_used", "chunks_discarded", "errors", "stale_obs",
             "unreachable", "timeouts"], 0)
        self.holding = False

    def stop(self) -> None:
        self.stop_event.set()

    # --- the loop ---------------------------------------------------------------------------

    def run(self) -> None:
        ticker = Ticker(self.config.fps)
        next_stats = time.monotonic() + 1.0
        self.log.info("actuator ready", service=self.config.service, broker=self.config.broker,
                      fps=self.config.fps, strategy=self.config.strategy)
        seq = 0
        try:
            while not self.stop_event.is_set():
                tick = ticker.wait()
                now = time.monotonic()
                self.take_replies(tick, now)
                if self.command(tick, now, seq):
                    seq += 1
                self.observe(tick, now)
                self.maybe_request(tick, now)
                if now >= next_stats:
                    next_stats += 1.0
                    self.report(tick, ticker)
        finally:
            self.model.stop()
            self.client.close()
            self.inputs.close()
            self.publisher.close()
            self.log.info("actuator stopped", **self.counts)

    def take_replies(self, tick: int, now: float) -> None:
        while (reply := self.client.receive(0)) is not None:
            message = reply.message
            if self.outstanding is None or message.request_id != self.outstanding[0]:
                self.counts["chunks_discarded"] += 1  # an answer to a request given up on
                continue
            _, k_obs, sent = self.outstanding
            self.outstanding = None
            if isinstance(message, ErrorReply):
                self.counts["errors"] += 1
                self.log.warning("request answered with an error", code=message.code, why=message.message)
                continue
            self.round_trips.append(now - sent)
            self.expected_delay = math.ceil(np.percentile(self.round_trips, 95) * self.config.fps)
            self.accept(message, tick)

    def accept(self, chunk: ActionChunk, tick: int) -> None:
        actions = chunk.actions
        if self.names and actions.shape[1] != len(self.names):
            self.counts["chunks_discarded"] += 1
            self.log.error(
                "chunk ignored: the policy's action size does not match the arm",
                action_size=actions.shape[1], arm_joints=len(self.names), service=self.config.service,
            )
            return
        merged = self.merge(self.schedule, actions, chunk.tick, tick)
        if merged is None or merged.remaining(tick) == 0:
            self.counts["chunks_discarded"] += 1  # it arrived after its last action's tick
            return
        self.schedule = merged
        self.counts["chunks_used"] += 1

    def command(self, tick: int, now: float, seq: int) -> bool:
        action = self.schedule.action_at(tick) if self.schedule is not None else None
        if action is not None:
            self.last_command = action
            if self.holding:
                self.log.info("chunks arrive again: moving", tick=tick)
                self.holding = False
        elif self.last_command is not None:
            self.counts["holds"] += 1
            if not self.holding:
                self.log.warning("schedule ran dry: holding the last command", tick=tick)
                self.holding = True
        else:
            return False  # nothing to command yet: the arm holds by itself
        self.publisher.publish(
            "command",
            Command(seq, tick, now, self.names, self.last_command.astype(np.float32), hold=action is None),
        )
        self.counts["commands"] += 1
        return True

    def observe(self, tick: int, now: float) -> None:
        state = self.inputs.latest("state")
        frames = {c: self.inputs.latest(f"camera/{c}") for c in self.config.cameras}
        newest = [state, *frames.values()]
        if any(r is None or r.age > self.config.max_obs_age for r in newest):
            self.counts["stale_obs"] += 1
            self.history.clear()  # a history must be consecutive ticks
            return
        self.names = list(state.message.names)
        images = {self.config.cameras[c]: r.message.image for c, r in frames.items()}
        self.history.append(Observation(tick=tick, time=now, state=state.message.positions, images=images))

    def maybe_request(self, tick: int, now: float) -> None:
        if self.outstanding is not None:
            if now - self.outstanding[2] < self.config.request_timeout:
                return
            self.counts["timeouts"] += 1
            self.log.warning("no answer: asking again", timeout_s=self.config.request_timeout)
            self.outstanding = None
        left = self.schedule.remaining(tick + 1) if self.schedule is not None else 0
        if left > self.expected_delay + self.config.margin_ticks:
            return
        steps = self.config.n_obs_steps or int((self.model.model or {}).get("n_obs_steps") or 1)
        if len(self.history) < steps or self.history[-1].tick != tick:
            return
        request = ObservationRequest(
            robot_id=self.config.robot_id,
            request_id=new_request_id(self.config.robot_id),
            tick=tick,
            fps=self.config.fps,
            send_time=now,
            task=self.config.task,
            observations=list(self.history)[-steps:],
            priority=self.config.priority,
            ttl=self.config.ttl,
            replace_key=self.config.robot_id,
        )
        try:
            self.client.send(self.config.service, request)
        except BrokerUnavailable:
            self.counts["unreachable"] += 1
            return
        self.outstanding = (request.request_id, tick, now)
        self.counts["requests"] += 1

    def report(self, tick: int, ticker: Ticker) -> None:
        rtt = np.array(self.round_trips) * 1000 if self.round_trips else np.zeros(1)
        timing = ticker.stats()
        figures = {
            "rate_hz": self.config.fps,
            "tick": float(tick),
            "late_ticks": float(timing["late_ticks"]),
            "skipped_ticks": float(timing["skipped_ticks"]),
            "lateness_p50_us": timing["lateness_p50_us"],
            "lateness_p99_us": timing["lateness_p99_us"],
            "lateness_max_us": timing["lateness_max_us"],
            "schedule_left": float(self.schedule.remaining(tick + 1) if self.schedule else 0),
            "rtt_p50_ms": float(np.percentile(rtt, 50)),
            "rtt_p95_ms": float(np.percentile(rtt, 95)),
            **{k: float(v) for k, v in self.counts.items()},
        }
        self.publisher.publish(f"{self.config.name}/stats", Stats(self.config.name, time.monotonic(), figures))
        self.log.info("stats", **{k: round(v, 1) for k, v in figures.items()})


def serve(config: ActuatorConfig) -> None:
    actuator = Actuator(config)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: actuator.stop())
    actuator.run()
