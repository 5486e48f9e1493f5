"""`chunkbus actuator`: the robot's control loop (the design's control timeline).

Every tick k (at t0 + k/fps) it: takes in the chunks that arrived and merges them into
the schedule with the chosen stitching strategy (their past part dropped); publishes
the command scheduled for tick k, or holds the last one when the schedule has run dry;
records the observation of tick k (newest frames and state, refused when older than
--max-obs-age); and asks for a new chunk when the actions left fall to the expected
delay (the measured round trip, in ticks) plus a margin. At most one request is in
flight; its replace key is the robot id, so a queued stale one is superseded.

Before the loop starts it asks the broker for the service's model (mmi.model) and checks
the cameras, state size and action size against it (again, off the loop, when a chunk comes
from another model than the one checked): a mismatch is one error that
names the fix, and the node exits (EXIT_PERMANENT) instead of sending the GPU host 30 bad
requests a second. While the service has no worker it asks twice a second, which the
broker counts as a robot waiting for the service (for an autoscaler that starts workers
from zero). Whatever goes wrong later (a silent broker, a silent camera) is named in a
warning at once and then at most every WARN_EVERY seconds, while the arm holds.

The task its requests carry (language-conditioned policies need one) can change while it
runs: `chunkbus task` asks on the actuator's control socket, answered between two ticks.

Its clock (bus/ticker.py) spins the last SPIN seconds before each tick and collects garbage
between ticks; with --realtime the loop runs in SCHED_FIFO on one CPU, or says why it cannot.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from contextlib import ExitStack
from dataclasses import dataclass, field
from functools import partial

import numpy as np

from ..bus.client import BrokerClient, BrokerRefused, BrokerUnavailable, new_request_id
from ..bus.endpoints import COMMAND, STATE, camera_node, camera_topic, chunk_topic, stats_topic, task_topic
from ..bus.lifecycle import announce_ready, run_node
from ..bus.log import Every, get_logger
from ..bus.messages import (
    ActionChunk,
    Command,
    ErrorReply,
    Message,
    Observation,
    ObservationRequest,
    SetTask,
    Stats,
    TaskSet,
)
from ..bus.records import Histogram, ModelDescription
from ..bus.security import ClientKeys
from ..bus.sockets import ControlServer, Publisher, Subscriber
from ..bus.ticker import PacedGarbageCollection, Ticker, choose_cpu, realtime
from . import stitching
from .images import for_sending


@dataclass
class ActuatorConfig:
    broker: str = "tcp://127.0.0.1:5555"
    service: str = "act"
    robot_id: str = "robot"
    task: str = ""
    fps: float = 30.0
    strategy: str = "crossfade"
    crossfade_window: int = 5
    ensemble_m: float = 0.01
    rtc_fallback: str = "crossfade"  # rtc: how an unguided chunk is merged
    rtc_overlap: int = 10  # rtc: ticks past the expected delay that the prefix still guides
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
    keys: ClientKeys | None = None  # CURVE: this robot's key pair and the broker's public key
    # What a request's camera frames are, on the wire: fitted to the model's input size or as the
    # cameras took them; raw pixels or JPEG. The defaults suit a remote GPU over a real uplink.
    send_size: str = "model"  # model | native
    send_encoding: str = "jpeg"  # jpeg | raw
    jpeg_quality: int = 90
    input_keys: ClientKeys | None = None  # CURVE to the camera and arm endpoints on tcp://, with the publishers' key
    metrics_port: int | None = None  # serve /metrics (round trips, holds) for a Prometheus
    metrics_host: str = "127.0.0.1"
    realtime: bool = False  # the control thread in SCHED_FIFO, pinned to one CPU, where permitted
    cpu: int | None = None  # realtime: that CPU (None: the last this process may use)


# The once-a-second log line, in this order (the README explains each); the published
# Stats message has these and more (lateness p50 and max, requests, unreachable).
STATS_LINE = ("tick", "commands", "holds", "late_ticks", "lateness_p99_us", "schedule_left", "rtt_p50_ms",
              "rtt_p95_ms", "chunks_used", "chunks_discarded", "errors", "timeouts", "stale_obs")
WARN_EVERY = 10.0  # seconds between two warnings about the same lasting problem
FIRST_WARNING = 2.0  # seconds of waiting for the broker or the arm before saying so
# The ticker sleeps to this long before each deadline and reads the clock for the rest: waking
# from a sleep takes 50-100 us even on an idle machine. It costs 1% of a CPU at 30 Hz, 3% at 100 Hz.
SPIN = 0.0003


class SetupError(RuntimeError):
    """The actuator cannot control this arm with this service; the text names the fix."""


def ask_model(client: BrokerClient, service: str) -> tuple[ModelDescription | None, str | None]:
    """The model `service` serves, or None and why not (the broker is silent, or has no worker);
    SetupError when the broker refuses this robot's keys."""
    try:
        model = client.model(service, timeout=1.0)
    except BrokerRefused as exc:
        raise SetupError(str(exc)) from None
    except (TimeoutError, BrokerUnavailable):
        return None, (f"no answer from the broker at {client.broker}: is `chunkbus broker` running there, and is "
                      "the address right (--broker HOST:PORT)?")
    if model is None:
        return None, (f"the broker at {client.broker} has no worker for service {service!r} yet: is the worker "
                      f"starting, and is --service right? (`chunkbus status --broker {client.broker}` lists them)")
    return model, None


class Actuator:
    def __init__(self, config: ActuatorConfig):
        if config.realtime:
            try:
                choose_cpu(config.cpu)
            except ValueError as exc:
                raise SetupError(str(exc)) from None
        self.config = config
        self.log = get_logger()
        self.merge = self.strategy(config.strategy)
        self.delays = stitching.DelayEstimate(config.fps)  # rtc: the ticks after which a reply is merged
        sources = [config.arm] + [config.camera_nodes.get(c, camera_node(c)) for c in config.cameras]
        topics = [STATE] + [camera_topic(c) for c in config.cameras]
        self.inputs = Subscriber(sources, topics, keys=config.input_keys)
        # What each input is, for the warning when it falls silent.
        self.input_names = {topic: f"{'state from the arm' if topic == STATE else f'frames from {topic}'} at {where}"
                            for topic, where in zip(topics, self.inputs.endpoints)}
        self.publisher = Publisher(config.name)
        try:
            self.control = ControlServer(config.name)  # `chunkbus task` changes the task here
        except Exception:
            self.publisher.close()
            raise
        self.client = BrokerClient(config.broker, connect_timeout=0.0, keys=config.keys)
        self.model: ModelDescription | None = None  # the service's, from the broker (mmi.model)
        self.unfit: str | None = None  # why a model that came later does not fit this robot
        self.refreshing = threading.Event()  # asking the broker for the model again
        self.stop_event = threading.Event()
        self.schedule: stitching.Schedule | None = None
        self.history: deque[Observation] = deque(maxlen=64)
        self.outstanding: tuple[str, int, float] | None = None  # request id, tick, send time
        self.round_trips: deque[float] = deque(maxlen=50)
        self.sent_frames: dict[tuple, tuple] = {}  # (camera input, id of a frame) -> (the frame, as sent)
        self.request_bytes = 0  # of the last request, and its observations
        self.observations_sent = 1
        self.round_trip_histogram = Histogram.empty()  # every round trip, for /metrics
        self.ticker: Ticker | None = None  # the loop's, once it runs
        self.realtime = False  # the loop runs in the real-time scheduling class (--realtime, permitted)
        self.expected_delay = math.ceil(config.fps)  # ticks; 1 s until a round trip is measured
        self.last_command: np.ndarray | None = None
        self.names: list[str] = []
        self.counts = dict.fromkeys(
            ["commands", "holds", "requests", "chunks_used", "chunks_discarded", "errors", "stale_obs",
             "unreachable", "timeouts", "rtc_guided", "rtc_late"], 0)
        self.holding = False
        self.warn_every: dict[str, Every] = {}  # one rate limit per kind of problem
        self.paused_until = 0.0  # no requests before this: the last one was refused as bad
        self.pause = 1.0  # seconds; doubles with each bad request in a row
        self.loop_start = 0.0
        self.tick = 0

    def strategy(self, name: str):
        """The merge function `name` with this actuator's options."""
        merge = stitching.STRATEGIES[name]
        if name == "crossfade":
            return partial(merge, window=self.config.crossfade_window)
        if name == "ensemble":
            return partial(merge, m=self.config.ensemble_m)
        if name == "rtc":
            return partial(merge, fallback=self.strategy(self.config.rtc_fallback))
        return merge

    def warn(self, problem: str, text: str, now: float, error: bool = False, **fields) -> None:
        """Log `text` now, and again for the same problem at most every WARN_EVERY seconds."""
        if self.warn_every.setdefault(problem, Every(WARN_EVERY))(now):
            (self.log.error if error else self.log.warning)(text, **fields)

    def stop(self) -> None:
        self.stop_event.set()

    # --- the loop ---------------------------------------------------------------------------

    def run(self) -> None:
        metrics = None
        try:
            if self.config.metrics_port is not None:
                metrics = self.serve_metrics()
            if not self.prepare():
                return
            self.loop()
        finally:
            if metrics is not None:
                metrics.shutdown()
                metrics.server_close()
            self.client.close()
            self.inputs.close()
            self.control.close()
            self.publisher.close()
            self.log.info("actuator stopped", **self.counts)

    def serve_metrics(self):
        """/metrics and /health for a Prometheus on the robot host (round trips, holds)."""
        from .metrics import start_actuator_metrics

        host, port = self.config.metrics_host, self.config.metrics_port
        try:
            server = start_actuator_metrics(self, port, host)
        except OSError as exc:
            raise SetupError(f"cannot serve metrics on {host}:{port} (--metrics-port): {exc.strerror}") from None
        self.log.info("metrics served", url=f"http://{host}:{server.server_address[1]}/metrics")
        return server

    # --- before the loop ---------------------------------------------------------------------

    def prepare(self) -> bool:
        """Wait for the model description and the arm's state, and check that they fit.

        Returns False when stopped while waiting; raises SetupError on a mismatch.
        """
        start = next_ask = time.monotonic()
        problem = None
        while not self.stop_event.wait(0.05):
            now = time.monotonic()
            self.control.serve_waiting(self.on_control)
            if self.inputs.problem is not None:  # a publisher on another host refuses this node's key
                raise SetupError(f"cannot receive the camera and arm inputs: {self.inputs.problem}")
            if self.model is None and now >= next_ask:  # twice a second: waiting must not flood the broker
                self.model, problem = ask_model(self.client, self.config.service)
                next_ask = now + 0.5
            state = self.inputs.latest(STATE)
            if self.model is not None and state is not None:
                self.check(self.model, state.message)
                wanted = set(self.model.camera_inputs())
                if wanted and (unused := sorted(set(self.config.cameras.values()) - wanted)):
                    self.log.warning("cameras the model does not use are not sent", unused=unused,
                                     model_inputs=sorted(wanted))
                    self.config.cameras = {name: key for name, key in self.config.cameras.items() if key in wanted}
                return True
            if now - start < FIRST_WARNING:
                continue
            if problem is not None:
                self.warn("model", f"waiting: {problem}", now)
            if state is None:
                self.warn(STATE, f"waiting: no {self.input_names[STATE]}: is `chunkbus arm` running, and is "
                          "--arm its node name?", now)
        return False

    def check(self, model: ModelDescription, state) -> None:
        """Raise SetupError naming every way the model and this robot do not fit."""
        service, arm = self.config.service, self.config.arm
        problems = []
        wanted = model.camera_inputs()
        given = set(self.config.cameras.values())
        for key in wanted:
            if key not in given:
                sent = ", ".join(f"{name}={feature}" for name, feature in self.config.cameras.items()) or "no camera"
                problems.append(f"the model needs camera input {key!r}, which no --camera gives (sending: {sent}): "
                                f"add `--camera NAME={key}` with the camera that shows that view")
        joints = len(state.names)
        if (size := model.state_size()) is not None and size != joints:
            problems.append(f"the model's state has {size} values, but the arm {arm!r} publishes "
                            f"{joints} joints ({', '.join(state.names)}): serve a policy trained on this arm, "
                            "or point --arm at the arm it was trained on")
        if model.needs_task and not self.config.task:
            problems.append(f"{model.type} is language-conditioned and this actuator has no task: give it "
                            "--task \"what to do\" (you can change it while it runs with `chunkbus task`)")
        if self.config.strategy == "rtc" and model.rtc is None:
            problems.append(f"--strategy rtc needs a policy that can guide its chunks towards what the robot will "
                            f"do (real-time chunking: SmolVLA, π0, π0.5, GR00T, flow:), and {model.type} cannot: "
                            "use --strategy crossfade, or serve one of those")
        if model.action_size != joints:
            problems.append(f"the model's actions have {model.action_size} values, but the arm {arm!r} has {joints} "
                            f"joints ({', '.join(state.names)}): serve a policy trained on this arm, or point --arm at "
                            "the arm it was trained on")
        if problems:
            raise SetupError(f"service {service!r} ({model.type}) does not fit this robot: " + "; ".join(problems))

    def refresh_model(self, state) -> None:
        """A chunk came from another model than the one checked (a worker came or went): ask
        the broker again, off the control loop, and stop asking for chunks if it does not fit."""
        with BrokerClient(self.config.broker, connect_timeout=1.0, keys=self.config.keys) as client:
            try:
                model, problem = ask_model(client, self.config.service)
            except SetupError as exc:
                model, problem = None, str(exc)
        if model is None:
            self.refreshing.clear()
            return self.log.warning("could not ask the broker for the service's new model", why=problem)
        try:
            self.check(model, state)
            self.unfit = None
        except SetupError as exc:
            self.unfit = str(exc)
        self.model = model
        self.refreshing.clear()
        self.log.info("the service serves another model now", model=model.name, fits=self.unfit is None)

    # --- the loop ---------------------------------------------------------------------------

    def loop(self) -> None:
        """The ticks, under the clock's conditions: --realtime where permitted, garbage paced."""
        with ExitStack() as stack:
            refused = stack.enter_context(realtime(self.config.cpu)) if self.config.realtime else None
            if refused:  # an actuator on the normal scheduler still works: say so, and go on
                self.log.warning(f"--realtime: {refused}")
            self.realtime = self.config.realtime and not refused
            garbage = stack.enter_context(PacedGarbageCollection())
            self.run_ticks(garbage)

    def run_ticks(self, garbage: PacedGarbageCollection) -> None:
        ticker = self.ticker = Ticker(self.config.fps, spin=SPIN)
        self.loop_start = time.monotonic()
        next_stats = self.loop_start + 1.0
        config = self.config
        announce_ready(self.log, "actuator", service=config.service, broker=config.broker, fps=config.fps,
                       strategy=config.strategy, task=config.task, realtime=self.realtime)
        self.publisher.publish(task_topic(self.config.name), TaskSet(self.config.robot_id, self.config.task, "", 0))
        seq = 0
        while not self.stop_event.is_set():
            tick = ticker.wait()
            now = time.monotonic()
            self.tick = tick
            self.control.serve_waiting(self.on_control)
            self.take_replies(tick, now)
            if self.command(tick, now, seq):
                seq += 1
            self.observe(tick, now)
            self.maybe_request(tick, now)
            if now >= next_stats:
                next_stats += 1.0
                self.report(tick, ticker)
            garbage.collect()  # now, with the most time to spare before the next tick

    def on_control(self, message: Message) -> Message:
        """Answer a control message (`chunkbus task`): the task changes from the next request on."""
        if not isinstance(message, SetTask):
            return ErrorReply("", "bad_request", f"the actuator takes set_task, not {message.TYPE}")
        if not message.task and self.model is not None and self.model.needs_task:
            return ErrorReply("", "bad_request", f"{self.model.type} is language-conditioned: the task cannot be empty")
        previous, self.config.task = self.config.task, message.task
        self.log.info("task changed", task=message.task, previous=previous, tick=self.tick)
        answer = TaskSet(self.config.robot_id, message.task, previous, self.tick)  # this tick's request has it
        self.publisher.publish(task_topic(self.config.name), answer)  # for viewers and recordings
        return answer

    def take_replies(self, tick: int, now: float) -> None:
        while (reply := self.client.receive(0)) is not None:
            message = reply.message
            if self.outstanding is None or message.request_id != self.outstanding[0]:
                self.counts["chunks_discarded"] += 1  # an answer to a request given up on
                continue
            _, k_obs, sent = self.outstanding
            self.outstanding = None
            if isinstance(message, ErrorReply):
                if message.code == "unauthorized":  # this key may not do that: asking again cannot help
                    raise SetupError(f"the broker refused this robot's request: {message.message}")
                self.counts["errors"] += 1
                if message.code == "bad_request":  # it will not fit next time either: ask less often
                    self.paused_until = now + self.pause
                    self.pause = min(WARN_EVERY, self.pause * 2)
                self.warn(f"error:{message.code}", f"request answered with an error: {message.message}", now,
                          error=message.code == "bad_request", code=message.code)
                continue
            self.pause = 1.0
            self.round_trips.append(now - sent)
            self.round_trip_histogram.observe(now - sent)
            # The longest of the last ten, not a percentile: over a jittery link a round trip past the
            # p95 is one hold. Asking a few ticks early costs nothing but a slightly older observation.
            self.expected_delay = math.ceil(max(list(self.round_trips)[-10:]) * self.config.fps)
            self.accept(message, tick)

    def accept(self, chunk: ActionChunk, tick: int) -> None:
        if chunk.model != self.model.name and not self.refreshing.is_set() and (state := self.inputs.latest(STATE)):
            self.refreshing.set()
            threading.Thread(target=self.refresh_model, args=(state.message,), daemon=True).start()
        actions = chunk.actions
        if self.names and actions.shape[1] != len(self.names):
            self.counts["chunks_discarded"] += 1
            self.warn("action_size", "chunk ignored: the policy's action size does not match the arm", time.monotonic(),
                      error=True, action_size=actions.shape[1], arm_joints=len(self.names), service=self.config.service)
            return
        if self.config.strategy == "rtc":
            self.delays.observe(tick - chunk.tick)
            if chunk.guided_delay is not None:
                self.counts["rtc_guided"] += 1
                self.counts["rtc_late"] += tick - chunk.tick > chunk.guided_delay  # blended over the late ticks
            merged = self.merge(self.schedule, actions, chunk.tick, tick, chunk.guided_delay)
        else:
            merged = self.merge(self.schedule, actions, chunk.tick, tick)
        if merged is None or merged.remaining(tick) == 0:
            self.counts["chunks_discarded"] += 1  # it arrived after its last action's tick
            return
        self.schedule = merged
        self.counts["chunks_used"] += 1
        self.publisher.publish(chunk_topic(self.config.name), chunk)  # small: what viewers draw of stitching

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
            COMMAND,
            Command(seq, tick, now, self.names, self.last_command.astype(np.float32), hold=action is None),
        )
        self.counts["commands"] += 1
        return True

    def observe(self, tick: int, now: float) -> None:
        state = self.inputs.latest(STATE)
        frames = {c: self.inputs.latest(camera_topic(c)) for c in self.config.cameras}
        newest = {STATE: state, **{camera_topic(c): r for c, r in frames.items()}}
        missing = [topic for topic, r in newest.items() if r is None or r.age > self.config.max_obs_age]
        if missing:
            self.counts["stale_obs"] += 1
            self.history.clear()  # a history must be consecutive ticks
            for topic in missing if now - self.loop_start > FIRST_WARNING else ():  # first frames may be on their way
                self.warn(topic, f"no {self.input_names[topic]} for over {self.config.max_obs_age:g} s "
                          "(--max-obs-age): no chunks are asked for until it is back", now)
            return
        self.names = list(state.message.names)
        images = {self.config.cameras[c]: r.message.image for c, r in frames.items()}
        self.history.append(Observation(tick=tick, time=now, state=state.message.positions, images=images))

    def maybe_request(self, tick: int, now: float) -> None:
        if self.outstanding is not None:
            if now - self.outstanding[2] < self.config.request_timeout:
                return
            self.counts["timeouts"] += 1
            self.warn("silent", f"no answer from the broker at {self.config.broker} within "
                      f"{self.config.request_timeout:g} s (--request-timeout): asking again", now)
            self.outstanding = None
        if now < self.paused_until:
            return
        if self.unfit is not None:
            return self.warn("unfit", f"not asking for chunks: {self.unfit}", now, error=True)
        left = self.schedule.remaining(tick + 1) if self.schedule is not None else 0
        ask_at = self.expected_delay + self.config.margin_ticks
        if self.config.strategy == "rtc":  # early enough that the prefix is schedule, not held padding
            ask_at = max(ask_at, self.delays.ticks + self.config.rtc_overlap)
        if left > ask_at:
            return
        steps = self.config.n_obs_steps or self.model.n_obs_steps
        if len(self.history) < steps or self.history[-1].tick != tick:
            return
        prefix, delay = self.guidance(tick)
        request = ObservationRequest(
            robot_id=self.config.robot_id,
            request_id=new_request_id(self.config.robot_id),
            tick=tick,
            fps=self.config.fps,
            send_time=now,
            task=self.config.task,
            observations=self.outgoing(list(self.history)[-steps:]),
            priority=self.config.priority,
            ttl=self.config.ttl,
            replace_key=self.config.robot_id,
            prefix=prefix,
            expected_delay=delay,
        )
        try:
            self.request_bytes = self.client.send(self.config.service, request)
            self.observations_sent = len(request.observations)
        except BrokerRefused as exc:  # the keys no longer get in (a restarted broker with other keys)
            raise SetupError(str(exc)) from None
        except BrokerUnavailable:
            self.counts["unreachable"] += 1
            self.warn("unreachable", f"cannot reach the broker at {self.config.broker}: is it running, and is "
                      "--broker right? Holding until it is back", now)
            return
        self.outstanding = (request.request_id, tick, now)
        self.counts["requests"] += 1

    def outgoing(self, observations: list[Observation]) -> list[Observation]:
        """The observations as they are sent: their frames fitted and encoded as --send-size and
        --send-encoding say, each frame once (consecutive requests share a history's frames)."""
        converted, sent = {}, []
        for observation in observations:
            images = {}
            for key, image in observation.images.items():
                known = self.sent_frames.get((key, id(image)))
                if known is None or known[0] is not image:
                    feature = self.model.inputs.get(key) if self.config.send_size == "model" else None
                    size = tuple(feature.shape[1:]) if feature is not None and feature.type == "VISUAL" else None
                    known = (image, for_sending(image, size, self.config.send_encoding, self.config.jpeg_quality))
                converted[key, id(image)] = known
                images[key] = known[1]
            sent.append(Observation(observation.tick, observation.time, observation.state, images))
        self.sent_frames = converted  # only what this request used: the next one shares most of it
        return sent

    def guidance(self, tick: int) -> tuple[np.ndarray | None, int | None]:
        """rtc: what this actuator will command from `tick` on (the prefix the chunk is guided
        to agree with) and the delay after which it expects to merge the reply; (None, None)
        before there is anything to agree with, or with another strategy."""
        if self.config.strategy != "rtc" or self.last_command is None:
            return None, None
        chunk = self.model.chunk_size
        delay = min(self.delays.ticks, chunk)
        horizon = min(delay + self.config.rtc_overlap, chunk)
        return stitching.rtc_prefix(self.schedule, tick, horizon, self.last_command), delay

    def report(self, tick: int, ticker: Ticker) -> None:
        rtt = np.array(self.round_trips) * 1000 if self.round_trips else np.zeros(1)
        timing = ticker.stats()
        figures = {
            "rate_hz": self.config.fps,
            "realtime": float(self.realtime),
            "tick": float(tick),
            "late_ticks": float(timing["late_ticks"]),
            "skipped_ticks": float(timing["skipped_ticks"]),
            "lateness_p50_us": timing["lateness_p50_us"],
            "lateness_p99_us": timing["lateness_p99_us"],
            "lateness_max_us": timing["lateness_max_us"],
            "schedule_left": float(self.schedule.remaining(tick + 1) if self.schedule else 0),
            "rtt_p50_ms": float(np.percentile(rtt, 50)),
            "rtt_p95_ms": float(np.percentile(rtt, 95)),
            "rtt_p99_ms": float(np.percentile(rtt, 99)),
            "request_bytes": float(self.request_bytes),  # the last request's, on the wire
            "bytes_per_observation": float(self.request_bytes / self.observations_sent),
            **{k: float(v) for k, v in self.counts.items()},
        }
        self.publisher.publish(stats_topic(self.config.name), Stats(self.config.name, time.monotonic(), figures))
        self.log.info("stats", **{key: int(round(figures[key])) for key in STATS_LINE})


def serve(config: ActuatorConfig) -> None:
    run_node(Actuator(config))
