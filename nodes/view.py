"""`chunkbus view`: the bus in Rerun, live or from a recording.

A viewer is one more subscriber (the tap's Listener: every publisher of this host, the
broker's capture among them when it runs here, and --connect endpoints), so it never slows
the control loop: a publisher never waits for it, and when it falls behind it draws only the
newest frame of each camera and ZeroMQ drops what no longer fits its queue.

What it draws, on two timelines, `tick` (the actuator's control tick, from its commands) and
`time` (seconds since the first message):
  camera/NAME              each camera's frames
  arm/JOINT/state          the arm's joint positions
  arm/JOINT/command        the command the actuator sent for the tick
  arm/JOINT/chunk/N        chunk N as it arrived: its actions at the ticks they are for, so where
                           a chunk switched in, and how far it jumped, is visible beside the command
  actuator/hold            1 while the schedule has run dry and the arm holds
  stats/NODE/FIGURE        the once-a-second figures: round trip, tick lateness, holds, schedule
                           left (the actuator's); queued, running, workers per service (the broker's)
  task                     the robot's task
  log                      error replies
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable

import numpy as np

from ..bus.codec import decode
from ..bus.endpoints import COMMAND, STATE
from ..bus.lifecycle import announce_ready, stop_event
from ..bus.log import get_logger
from ..bus.messages import ActionChunk, ArmState, CameraFrame, Command, ErrorReply, ObservationRequest, Stats, TaskSet
from ..bus.schema import JpegImage, MessageError
from ..bus.security import ClientKeys
from .tap import Listener, TapError, read_recording

APPLICATION = "chunkbus"
CHUNK_TOPICS = ("/chunk", "broker/reply/")  # an actuator's merged chunks; the broker's replies
# The figures worth a plot of their own, of the actuator's and the broker's Stats.
ROBOT_PLOTS = {"round trip (ms)": ("rtt_p50_ms", "rtt_p95_ms"), "tick lateness p99 (µs)": ("lateness_p99_us",),
               "holds": ("holds",), "schedule left (actions)": ("schedule_left",)}
BROKER_FIGURES = ("queued", "workers")
STYLE = {"state": ([70, 130, 230], 1.5), "command": ([240, 140, 30], 2.0), "chunk": ([150, 150, 150], 1.0)}


class Drawing:
    """Turns bus messages into Rerun entities on one recording stream."""

    def __init__(self, stream):
        import rerun as rr

        self.rr, self.stream = rr, stream
        self.tick: int | None = None  # the control tick now, from the newest command
        self.start_ns: int | None = None
        self.joints: list[str] = []
        self.chunks = 0
        self.task: str | None = None
        self.seen_chunks: set[tuple[str, int]] = set()  # an actuator's and the broker's copy of one chunk
        self.cameras: list[str] = []
        self.robots: list[str] = []  # nodes whose Stats are an actuator's
        self.services: list[str] = []  # the broker's, as its Stats name them (NODE/SERVICE)
        self.styled: set[str] = set()
        self.layout: tuple = ()

    def draw(self, topic: str, message, time_ns: int) -> None:
        self._draw(topic, message, time_ns)
        layout = (tuple(self.cameras), tuple(self.joints), tuple(self.robots), tuple(self.services))
        if layout != self.layout:  # something new to show: lay the views out again
            self.layout = layout
            self.stream.send_blueprint(self.blueprint())

    def _draw(self, topic: str, message, time_ns: int) -> None:
        rr = self.rr
        if self.start_ns is None:
            self.start_ns = time_ns
        if isinstance(message, Command):
            self.tick = message.tick
        if self.tick is not None:
            self.stream.set_time("tick", sequence=self.tick)
        self.stream.set_time("time", duration=(time_ns - self.start_ns) / 1e9)
        if isinstance(message, CameraFrame):
            image, entity = message.image, f"camera/{message.camera}"
            if message.camera not in self.cameras:
                self.cameras.append(message.camera)
            if isinstance(image, JpegImage):
                self.stream.log(entity, rr.EncodedImage(contents=image.data, media_type="image/jpeg"))
            else:
                self.stream.log(entity, rr.Image(np.asarray(image), color_model="RGB"))
        elif isinstance(message, ArmState) and topic == STATE:
            self.joints = list(message.names)
            self._joints("state", message.names, message.positions)
        elif isinstance(message, Command) and topic == COMMAND:
            self._joints("command", message.names, message.positions)
            self.stream.log("actuator/hold", rr.Scalars(1.0 if message.hold else 0.0))
        elif isinstance(message, ActionChunk) and topic.endswith(CHUNK_TOPICS):
            self._chunk(message)
        elif isinstance(message, Stats):
            for figure, value in message.figures.items():
                self.stream.log(f"stats/{message.node}/{figure}", rr.Scalars(float(value)))
            if "rtt_p50_ms" in message.figures and message.node not in self.robots:
                self.robots.append(message.node)
            for figure in message.figures:
                service = f"{message.node}/{figure.rpartition('/')[0]}"
                if figure.endswith("/workers") and service not in self.services:
                    self.services.append(service)
        elif isinstance(message, TaskSet):
            self._task(message.task)
        elif isinstance(message, ObservationRequest):
            self._task(message.task)
        elif isinstance(message, ErrorReply):
            self.stream.log("log", rr.TextLog(f"{message.code}: {message.message}", level="WARN"))

    def _joints(self, kind: str, names: Iterable[str], values: np.ndarray) -> None:
        for name, value in zip(names, np.asarray(values, dtype=float)):
            self._style(f"arm/{name}/{kind}", kind, kind)
            self.stream.log(f"arm/{name}/{kind}", self.rr.Scalars(value))

    def _style(self, entity: str, kind: str, label: str) -> None:
        """Once per series: state blue, command orange and thicker, chunks thin grey."""
        if entity not in self.styled:
            self.styled.add(entity)
            color, width = STYLE[kind]
            self.stream.log(entity, self.rr.SeriesLines(colors=color, widths=width, names=label), static=True)

    def blueprint(self):
        """Cameras on the left; a plot per joint of its state, command and chunks; the robot's and the
        broker's figures and the task on the right."""
        import rerun.blueprint as rrb

        cameras = [rrb.Spatial2DView(origin=f"camera/{name}", name=name) for name in self.cameras]
        # No legend: a chunk each would fill it. State is blue, the command orange, chunks grey.
        joints = [rrb.TimeSeriesView(origin=f"arm/{name}", name=name, plot_legend=rrb.PlotLegend(visible=False))
                  for name in self.joints]
        figures = [rrb.TimeSeriesView(name=f"{robot}: {title}", contents=[f"stats/{robot}/{f}" for f in names])
                   for robot in self.robots for title, names in ROBOT_PLOTS.items()]
        figures += [rrb.TimeSeriesView(name=f"{service}: {figure}", contents=[f"stats/{service}/{figure}"])
                    for service in self.services for figure in BROKER_FIGURES]
        side = rrb.Vertical(*figures, rrb.TextDocumentView(origin="task", name="task"),
                            rrb.TextLogView(origin="log", name="errors"))
        columns = [(rrb.Vertical(*cameras), 1)] if cameras else []
        columns += [(rrb.Grid(*joints), 2)] if joints else []
        columns.append((side, 1))
        return rrb.Blueprint(rrb.Horizontal(*[view for view, _ in columns], column_shares=[s for _, s in columns]),
                             collapse_panels=True)

    def _chunk(self, chunk: ActionChunk) -> None:
        key = (chunk.request_id, chunk.tick)
        if key in self.seen_chunks:
            return
        self.seen_chunks.add(key)
        rr = self.rr
        names = chunk.names or self.joints
        ticks = chunk.tick + np.arange(len(chunk.actions))
        for index in range(chunk.actions.shape[1]):
            name = names[index] if index < len(names) else f"action_{index}"
            self._style(f"arm/{name}/chunk/{self.chunks}", "chunk", f"chunk {self.chunks}")
            rr.send_columns(f"arm/{name}/chunk/{self.chunks}", indexes=[rr.TimeColumn("tick", sequence=ticks)],
                            columns=rr.Scalars.columns(scalars=chunk.actions[:, index].astype(float)),
                            recording=self.stream)
        self.chunks += 1

    def _task(self, task: str) -> None:
        if task != self.task:
            self.task = task
            self.stream.log("task", self.rr.TextDocument(task or "(no task)"))


def open_stream(save: str | None, web: bool, web_port: int, grpc_port: int):
    """A Rerun recording stream: into an .rrd file, to a web viewer this process serves, or to the
    native viewer (spawned; on a host without a display, the web viewer instead). Returns the
    stream and the address a person opens, if any."""
    import rerun as rr

    stream = rr.RecordingStream(APPLICATION)
    log = get_logger()
    if save:
        stream.save(save)
        return stream, None
    if not web and not has_display():
        log.info("no display here: serving the web viewer instead (open it in a browser)")
        web = True
    if web:
        url = stream.serve_grpc(grpc_port=grpc_port)
        rr.serve_web_viewer(web_port=web_port, open_browser=False, connect_to=url)
        address = f"http://localhost:{web_port}/?url={url}"
        print(f"open {address} in a browser (from another machine: ssh -L {web_port}:localhost:{web_port} "
              f"-L {grpc_port}:localhost:{grpc_port} THIS_HOST first)", file=sys.stderr, flush=True)
        return stream, address
    stream.spawn()
    return stream, None


def has_display() -> bool:
    """Whether a native viewer can open a window here."""
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY") or sys.platform == "darwin")


def view_live(connect: list[str], keys: ClientKeys | None, save: str | None, web: bool, web_port: int,
              grpc_port: int, duration: float | None, camera_fps: float = 10.0) -> None:
    """Draw what the bus carries until a signal (or `duration` seconds); each camera at most
    `camera_fps` frames a second (drawing costs CPU the robot host's loop may need)."""
    stop = stop_event()
    listener = Listener(connect, rcvhwm=1000, keys=keys)  # a small queue: ZeroMQ drops, the viewer never lags
    stream, address = open_stream(save, web, web_port, grpc_port)
    announce_ready(get_logger(), "view", url=address, save=save)
    drawing, frames_drawn = Drawing(stream), CameraPacing(camera_fps)
    until = time.monotonic() + duration if duration else None
    try:
        for batch in listener.batches(stop, until):
            for topic, frames, receive_ns in frames_drawn.select(batch):
                try:
                    drawing.draw(topic, decode(frames), receive_ns)
                except MessageError:
                    continue
    finally:
        listener.close()
        stream.flush()


class CameraPacing:
    """Of the messages that waited, all in order, but of each camera only its newest frame,
    and none sooner than 1/fps after the last one drawn."""

    def __init__(self, fps: float):
        self.period_ns = int(1e9 / fps)
        self.drawn: dict[str, int] = {}

    def select(self, batch: list[tuple]) -> list[tuple]:
        last = {topic: i for i, (topic, _, _) in enumerate(batch) if topic.startswith("camera/")}
        chosen = []
        for i, message in enumerate(batch):
            topic, _, receive_ns = message
            if topic.startswith("camera/"):
                if last[topic] != i or receive_ns - self.drawn.get(topic, 0) < self.period_ns:
                    continue
                self.drawn[topic] = receive_ns
            chosen.append(message)
        return chosen


def view_recording(path: str, save: str | None, web: bool, web_port: int, grpc_port: int) -> int:
    """Draw a recording (its messages in the order they were recorded); returns how many."""
    stream, address = open_stream(save, web, web_port, grpc_port)
    drawing = Drawing(stream)
    count = 0
    for topic, log_time, frames in read_recording(path, []):
        try:
            drawing.draw(topic, decode(frames), log_time)
        except MessageError:
            continue
        count += 1
    if count == 0:
        raise TapError(f"{path} holds no chunkbus messages to draw")
    stream.flush()
    if address is not None:
        get_logger().info("recording drawn: Ctrl-C stops the web viewer", messages=count, url=address)
        stop_event().wait()
    return count
