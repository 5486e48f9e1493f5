"""`chunkbus tap`: record, inspect and replay the bus.

A recording is an MCAP file with one channel per topic. Each MCAP message holds one bus
message exactly as it travelled: its frames after the topic frame (header, buffers),
packed as a msgpack array of byte strings (message encoding FRAMES_ENCODING), and its
receive time as log_time (nanoseconds, wall clock). Replay republishes those frames
unchanged, so a replayed message is byte-identical to the recorded one.

Chunks are zstd-compressed (MCAP chunk compression, which any MCAP reader undoes). The
recorder flushes completed chunks to the file every second, so a recorder that is
killed leaves a file whose complete chunks `tap info` still reads; a recorder that
stops normally also writes MCAP's summary and index.
"""

from __future__ import annotations

import fnmatch
import sys
import threading
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import msgpack
import numpy as np
import zmq

from ..bus.codec import decode
from ..bus.endpoints import list_publishers, resolve, runtime_dir
from ..bus.lifecycle import stop_event
from ..bus.log import get_logger
from ..bus.schema import JpegImage, MessageError
from ..bus.security import ClientKeys, Handshakes
from ..bus.sockets import Publisher, ServerKeys, drain

FRAMES_ENCODING = "chunkbus-frames-msgpack"
PROFILE = "chunkbus"
# How long a tap without --connect waits for a first publisher on this host: long enough for
# a tap started just before the nodes, short enough that a tap started alone says so soon.
PUBLISHER_WAIT_S = 3.0


class TapError(RuntimeError):
    """A recording that cannot be read or a request that cannot be met; the text says why."""


def pack_frames(frames: list) -> bytes:
    return msgpack.packb([bytes(frame.buffer if hasattr(frame, "buffer") else frame) for frame in frames])


def unpack_frames(data: bytes) -> list[bytes]:
    frames = msgpack.unpackb(data, raw=False)
    if not isinstance(frames, list) or not all(isinstance(f, bytes) for f in frames):
        raise TapError("a recorded message is not a list of frames")
    return frames


def matches(topic: str, patterns: list[str]) -> bool:
    return not patterns or any(fnmatch.fnmatchcase(topic, p) for p in patterns)


# --- listening ------------------------------------------------------------------------------------


class Listener:
    """A SUB socket on every publisher of this host (found again each second) and `extra` endpoints;
    with `keys`, a second one for the TCP endpoints among them, over CURVE."""

    def __init__(self, extra: list[str], own: str | None = None, rcvhwm: int = 100_000,
                 wait: float = PUBLISHER_WAIT_S, keys: ClientKeys | None = None):
        self.socket = self._subscriber(rcvhwm)
        self.secure = self.handshakes = None
        if keys is not None and any(e.startswith("tcp://") for e in extra):
            self.secure = self._subscriber(rcvhwm)
            keys.apply(self.secure)
            self.handshakes = Handshakes(self.secure, "the publisher", curve=True, key_option="--publisher-key",
                                         allow_option="the publisher's --allow-subscribers")
        self.poller = zmq.Poller()
        for socket in (self.socket, self.secure):
            if socket is not None:
                self.poller.register(socket, zmq.POLLIN)
        self.own = own
        self.connected: set[str] = set()
        try:
            for endpoint in extra:
                self.connect(resolve(endpoint))
            self.discover()
            if not self.connected:
                self.wait_for_publishers(wait)
        except BaseException:
            self.close()
            raise

    def wait_for_publishers(self, wait: float) -> None:
        """Wait up to `wait` seconds for a live publisher on this host; fail saying where it looked."""
        get_logger().info("waiting for publishers", directory=str(runtime_dir()), seconds=wait)
        deadline = time.monotonic() + wait
        while not self.connected:
            if time.monotonic() >= deadline:
                raise TapError(self.no_publishers(wait))
            time.sleep(0.1)
            self.discover()

    def no_publishers(self, wait: float) -> str:
        where = f"{runtime_dir()} (the runtime directory; set CHUNKBUS_RUNTIME_DIR to look elsewhere)"
        stale = [info.node for info in list_publishers() if not info.live and info.node != self.own]
        if stale:
            found = (f"no running publishers found in {where} within {wait:g} s, only the socket files "
                     f"of nodes that are gone ({', '.join(stale)}),")
        else:
            found = f"no publishers found in {where} within {wait:g} s"
        return f"{found} and no --connect endpoint given: is a node running on this host?"

    @staticmethod
    def _subscriber(rcvhwm: int) -> zmq.Socket:
        socket = zmq.Context.instance().socket(zmq.SUB)
        socket.setsockopt(zmq.RCVHWM, rcvhwm)
        socket.setsockopt(zmq.LINGER, 0)
        socket.setsockopt(zmq.SUBSCRIBE, b"")
        return socket

    def connect(self, endpoint: str) -> None:
        if endpoint not in self.connected:
            secure = self.secure is not None and endpoint.startswith("tcp://")
            (self.secure if secure else self.socket).connect(endpoint)
            self.connected.add(endpoint)
            get_logger().info("listening", endpoint=endpoint, curve=secure)

    def discover(self) -> None:
        for info in list_publishers():
            if info.live and info.node != self.own:
                self.connect(info.endpoint)

    def messages(self, stop: threading.Event, until: float | None):
        """Yield (topic, frames, receive time ns) until `stop` or the monotonic time `until`."""
        for batch in self.batches(stop, until):
            yield from batch

    def batches(self, stop: threading.Event, until: float | None):
        """Yield the lists of (topic, frames, receive time ns) that waited at each wake-up."""
        next_scan = time.monotonic() + 1.0
        while not stop.is_set() and (until is None or time.monotonic() < until):
            batch = []
            for socket in dict(self.poller.poll(100)):
                for frames in drain(socket):
                    batch.append((frames[0].bytes.decode("utf-8", "replace"), frames[1:], time.time_ns()))
            if batch:
                yield batch
            if self.handshakes is not None and (problem := self.handshakes.read()[1]) is not None:
                raise TapError(f"cannot listen to the --connect endpoints: {problem}")
            if time.monotonic() >= next_scan:
                next_scan += 1.0
                self.discover()

    def close(self) -> None:
        if self.handshakes is not None:
            self.handshakes.close()
        for socket in (self.socket, self.secure):
            if socket is not None:
                socket.close(linger=0)


@dataclass
class TopicFigures:
    messages: int = 0
    bytes: int = 0


# --- record -------------------------------------------------------------------------------------------


@dataclass
class Recording:
    """What a recorder has done so far: the messages it took in and the bytes it wrote."""

    path: str
    topics: dict[str, TopicFigures]
    seconds: float = 0.0
    written: int = 0  # bytes in the file
    packed: int = 0  # message bytes in the chunks written so far: what `written` holds, uncompressed

    @property
    def messages(self) -> int:
        return sum(f.messages for f in self.topics.values())

    @property
    def received(self) -> int:
        return sum(f.bytes for f in self.topics.values())


def recording_path(path: str) -> str:
    return path if path.lower().endswith(".mcap") else path + ".mcap"


def record(path: str, connect: list[str], topics: list[str], duration: float | None,
           keys: ClientKeys | None = None) -> Recording:
    """Record into `path` (".mcap" added when it lacks it) until `duration` or a signal."""
    from mcap.writer import CompressionType, Writer

    log = get_logger()
    stop = stop_event()
    listener = Listener(connect, keys=keys)  # first: a tap that finds nothing to record leaves no file
    if recording_path(path) != path:
        path = recording_path(path)
        print(f"recording into {path}: MCAP recordings end in .mcap", file=sys.stderr, flush=True)
    output = open(path, "wb")
    writer = Writer(output, chunk_size=512 * 1024, compression=CompressionType.ZSTD)
    writer.start(profile=PROFILE, library="chunkbus")
    channels: dict[str, int] = {}
    recording = Recording(path, defaultdict(TopicFigures), written=output.tell())
    start = time.monotonic()
    until = start + duration if duration else None
    next_report = start + 1.0
    try:
        for topic, frames, receive_ns in listener.messages(stop, until):
            if not matches(topic, topics):
                continue
            if topic not in channels:
                channels[topic] = writer.register_channel(topic, FRAMES_ENCODING, 0, {"protocol": "chunkbus/1"})
            data = pack_frames(frames)
            figure = recording.topics[topic]
            writer.add_message(channels[topic], receive_ns, data, receive_ns, figure.messages)
            figure.messages += 1
            figure.bytes += len(data)
            if output.tell() != recording.written:  # the writer just wrote a chunk, this message included
                recording.written, recording.packed = output.tell(), recording.received
            if time.monotonic() >= next_report:
                next_report += 1.0
                output.flush()  # completed chunks reach the file: a killed recorder keeps them
                recording.seconds = time.monotonic() - start
                print(progress_line(recording), file=sys.stderr, flush=True)
    finally:
        writer.finish()
        recording.written, recording.packed = output.tell(), recording.received
        recording.seconds = time.monotonic() - start
        output.close()
        listener.close()
    log.info("recording finished", file=path, topics=len(recording.topics), messages=recording.messages,
             bytes=recording.written)
    return recording


def size_text(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} bytes"


def _written(recording: Recording) -> str:
    """E.g. "4.7 MB written (1.2 MB/s, compressed to 38%)"."""
    rate = size_text(recording.written / recording.seconds) + "/s" if recording.seconds else "-"
    percent = 100 * recording.written / recording.packed if recording.packed else None
    ratio = f", compressed to {percent:.{0 if percent >= 10 else 1}f}%" if percent is not None else ""
    return f"{size_text(recording.written)} written ({rate}{ratio})"


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def progress_line(recording: Recording) -> str:
    received = f"{_count(recording.messages, 'message')}, {size_text(recording.received)} received"
    if not recording.packed:
        return f"recording into {recording.path}: {received}, nothing written yet (the first chunk is filling)"
    return f"recording into {recording.path}: {received}, {_written(recording)}"


def summary_text(recording: Recording) -> str:
    if not recording.messages:
        return f"recorded no messages into {recording.path} in {recording.seconds:.1f} s"
    lines = [f"recorded {_count(recording.messages, 'message')} ({size_text(recording.received)}) on "
             f"{_count(len(recording.topics), 'topic')} in {recording.seconds:.1f} s into {recording.path}: "
             f"{_written(recording)}"]
    for topic, figure in sorted(recording.topics.items()):
        lines.append(f"  {topic}: {_count(figure.messages, 'message')}, {size_text(figure.bytes)}")
    return "\n".join(lines)


# --- reading recordings ------------------------------------------------------------------------------


def read_recording(path: str, topics: list[str] | None = None):
    """Yield (topic, log_time ns, frames) in file order; tolerates a file cut short (a killed recorder)."""
    from mcap.records import Channel, Message
    from mcap.stream_reader import StreamReader

    if not Path(path).is_file():
        raise TapError(f"no recording {path!r}")
    channels: dict[int, str] = {}
    with open(path, "rb") as stream:
        if stream.read(8) != b"\x89MCAP0\r\n":
            raise TapError(f"{path!r} is not an MCAP recording (its first bytes are not MCAP's magic)")
        stream.seek(0)
        try:
            for record in StreamReader(stream, skip_magic=False).records:
                if isinstance(record, Channel):
                    if record.message_encoding != FRAMES_ENCODING:
                        raise TapError(
                            f"{path!r}: channel {record.topic!r} is not a chunkbus recording "
                            f"({record.message_encoding}): tap info, replay, export and view read the MCAP files "
                            "`chunkbus tap record` writes"
                        )
                    channels[record.id] = record.topic
                elif isinstance(record, Message):
                    topic = channels.get(record.channel_id)
                    if topic is not None and matches(topic, topics or []):
                        yield topic, record.log_time, unpack_frames(record.data)
        except TapError:
            raise
        except Exception as exc:  # the end of a file cut short: what came before is intact
            get_logger().warning("the recording ends early (was the recorder killed?)", file=path, error=str(exc))


def info(path: str) -> dict:
    per_topic: dict[str, dict] = {}
    first = last = None
    for topic, log_time, frames in read_recording(path):
        entry = per_topic.setdefault(topic, {"messages": 0, "bytes": 0})
        entry["messages"] += 1
        entry["bytes"] += sum(len(f) for f in frames)
        first = log_time if first is None else min(first, log_time)
        last = log_time if last is None else max(last, log_time)
    duration = (last - first) / 1e9 if first is not None else 0.0
    return {"file": path, "duration_s": duration, "topics": per_topic,
            "messages": sum(t["messages"] for t in per_topic.values())}


def format_info(summary: dict) -> str:
    lines = [f"{summary['file']}: {summary['messages']} messages over {summary['duration_s']:.2f} s", ""]
    lines.append(f"{'topic':32} {'messages':>9} {'rate Hz':>8} {'MB':>9} {'avg KB':>8}")
    for topic, t in sorted(summary["topics"].items()):
        rate = t["messages"] / summary["duration_s"] if summary["duration_s"] else 0.0
        lines.append(
            f"{topic:32} {t['messages']:>9} {rate:>8.1f} {t['bytes'] / 1e6:>9.2f} "
            f"{t['bytes'] / t['messages'] / 1e3:>8.1f}"
        )
    return "\n".join(lines)


# --- replay ---------------------------------------------------------------------------------------------


def replay(path: str, rate: float, topics: list[str], node: str, bind: list[str],
           keys: ServerKeys | None = None) -> int:
    """Republish the recording's messages with their original timing, scaled by 1/rate."""
    stop = stop_event()
    messages = list(read_recording(path, topics))
    if topics and not messages:
        raise TapError(f"no messages on {', '.join(topics)} in {path!r}")
    count = 0
    with Publisher(node, bind, sndhwm=10_000, keys=keys) as publisher:
        time.sleep(0.5)  # let subscribers connect before the first message
        start, origin = time.monotonic(), messages[0][1] if messages else 0
        for topic, log_time, frames in messages:
            due = start + (log_time - origin) / 1e9 / rate
            if stop.wait(max(0.0, due - time.monotonic())):
                break
            publisher.publish_frames(topic, frames)
            count += 1
        time.sleep(0.2)  # let the last messages leave
    return count


# --- echo and stats --------------------------------------------------------------------------------------


def describe(value) -> str:
    if isinstance(value, np.ndarray):
        if value.size <= 8 and value.ndim <= 1:
            return np.array2string(value, precision=3, separator=",")
        return f"<{value.dtype} {'x'.join(map(str, value.shape))}>"
    if isinstance(value, JpegImage):
        return f"<jpeg {'x'.join(map(str, value.shape))}, {len(value.data)} bytes>"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {describe(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(describe(v) for v in value[:8]) + (", ..." if len(value) > 8 else "") + "]"
    return repr(value)


def echo(connect: list[str], topics: list[str], duration: float | None, keys: ClientKeys | None = None) -> None:
    stop = stop_event()
    listener = Listener(connect, keys=keys)
    until = time.monotonic() + duration if duration else None
    try:
        for topic, frames, _ in listener.messages(stop, until):
            if not matches(topic, topics):
                continue
            try:
                message = decode(frames)
            except MessageError as exc:
                print(f"{topic}: (malformed: {exc})", flush=True)
                continue
            fields = ", ".join(f"{k}={describe(v)}" for k, v in message.to_wire().items())
            print(f"{topic}: {message.TYPE} {fields}", flush=True)
    finally:
        listener.close()


def stats(connect: list[str], topics: list[str], duration: float | None, window: float = 2.0,
          keys: ClientKeys | None = None) -> None:
    stop = stop_event()
    listener = Listener(connect, keys=keys)
    until = time.monotonic() + duration if duration else None
    samples: dict[str, list[tuple[float, int]]] = defaultdict(list)
    next_print = time.monotonic() + 1.0
    try:
        for topic, frames, _ in listener.messages(stop, until):
            if matches(topic, topics):
                samples[topic].append((time.monotonic(), sum(len(f) for f in frames)))
            now = time.monotonic()
            if now >= next_print:
                next_print = now + 1.0
                print(stats_table(samples, now, window), flush=True)
    finally:
        listener.close()


def stats_table(samples: dict[str, list[tuple[float, int]]], now: float, window: float) -> str:
    lines = [f"{'topic':32} {'rate Hz':>8} {'bandwidth MB/s':>15} {'size KB mean':>13} {'min':>8} {'max':>8}"]
    for topic in sorted(samples):
        recent = [(t, n) for t, n in samples[topic] if now - t <= window]
        samples[topic] = recent
        if len(recent) < 2:
            lines.append(f"{topic:32} {'-':>8}")
            continue
        span = recent[-1][0] - recent[0][0] or window
        sizes = [n for _, n in recent]
        lines.append(
            f"{topic:32} {(len(recent) - 1) / span:>8.1f} {sum(sizes) / span / 1e6:>15.2f} "
            f"{np.mean(sizes) / 1e3:>13.1f} {min(sizes) / 1e3:>8.1f} {max(sizes) / 1e3:>8.1f}"
        )
    return "\n".join(lines)
