"""`chunkbus camera`: publishes one camera's frames on `camera/<name>` at a fixed rate.

Sources: a camera device through lerobot's OpenCVCamera (index or path), an Intel
RealSense through lerobot's RealSenseCamera (`realsense:SERIAL_OR_NAME`, colour only), a
video file (looped), or `synthetic`: a moving pattern with its sequence number drawn in and
also written into the first pixels, so that tests and tools can check what arrived. Frames
are RGB, published raw or JPEG. A source that stops delivering is reopened with backoff.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import cv2
import numpy as np

from ..bus.endpoints import camera_topic
from ..bus.lifecycle import announce_ready, run_node
from ..bus.log import get_logger
from ..bus.messages import CameraFrame
from ..bus.schema import JpegImage
from ..bus.sockets import Publisher, ServerKeys
from ..bus.ticker import Ticker


class CameraError(RuntimeError):
    """A camera source that cannot deliver; the text names it and says what to check."""


SEQ_PIXELS = 8  # the first 8 pixels of row 0 hold the sequence number, one byte each (red)


def synthetic_seq(image: np.ndarray) -> int:
    """The sequence number a synthetic frame carries (exact for raw frames)."""
    return int.from_bytes(bytes(image[0, :SEQ_PIXELS, 0].tolist()), "big")


class SyntheticSource:
    def __init__(self, width: int = 640, height: int = 480):
        self.width, self.height = width, height
        self.seq = 0
        x = np.linspace(0, 255, width, dtype=np.float32)
        self.gradient = np.broadcast_to(x[None, :], (height, width))

    def describe(self) -> str:
        return f"synthetic {self.width}x{self.height}"

    def read(self) -> np.ndarray:
        shift = (self.seq * 8) % self.width
        image = np.empty((self.height, self.width, 3), np.uint8)
        image[:, :, 0] = np.roll(self.gradient, shift, axis=1)
        image[:, :, 1] = 255 - image[:, :, 0]
        image[:, :, 2] = (self.seq * 5) % 256
        cv2.putText(image, str(self.seq), (20, self.height // 2), cv2.FONT_HERSHEY_SIMPLEX,
                    self.height / 160, (255, 255, 255), max(1, self.height // 120))
        image[0, :SEQ_PIXELS, 0] = list(self.seq.to_bytes(SEQ_PIXELS, "big"))
        self.seq += 1
        return image

    def close(self) -> None:
        pass


class VideoSource:
    def __init__(self, path: str):
        if not Path(path).is_file():
            raise CameraError(f"no video file {path!r}")
        self.path = path
        self.capture = cv2.VideoCapture(path)
        if not self.capture.isOpened():
            raise CameraError(f"OpenCV cannot open video file {path!r}: is it a video it can decode?")
        self.fps = self.capture.get(cv2.CAP_PROP_FPS) or None

    def describe(self) -> str:
        return f"video file {self.path}"

    def read(self) -> np.ndarray:
        ok, frame = self.capture.read()
        if not ok:  # the end: loop
            self.capture.set(cv2.CAP_PROP_POS_FRAMES, 0)
            ok, frame = self.capture.read()
            if not ok:
                raise CameraError(f"video file {self.path!r} has no readable frames")
        return cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)

    def close(self) -> None:
        self.capture.release()


class LerobotCameraSource:
    """A camera opened and read by one of lerobot's camera classes (frames come as RGB)."""

    kind = "camera"

    def connect(self, camera, device: str, hint: str) -> None:
        self.camera, self.device = camera, device
        try:
            self.camera.connect()
        except Exception as exc:
            raise CameraError(f"cannot open {self.kind} {device!r}: {exc} {hint}") from exc

    def describe(self) -> str:
        return f"{self.kind} {self.device}"

    def read(self) -> np.ndarray:
        return self.camera.async_read(timeout_ms=1000)

    def close(self) -> None:
        try:
            self.camera.disconnect()
        except Exception:
            pass


class DeviceSource(LerobotCameraSource):
    """A camera device (an index or /dev/videoN), through lerobot's OpenCVCamera."""

    kind = "camera device"

    def __init__(self, device: str, width: int | None, height: int | None, fps: float | None, fourcc: str | None):
        from lerobot.cameras.opencv import OpenCVCamera, OpenCVCameraConfig

        index_or_path: int | Path = int(device) if device.isdigit() else Path(device)
        config = OpenCVCameraConfig(index_or_path=index_or_path, fps=fps, width=width, height=height, fourcc=fourcc)
        self.connect(OpenCVCamera(config), device, "Check that it is plugged in and that no other program holds it.")


class RealSenseSource(LerobotCameraSource):
    """An Intel RealSense camera's colour stream, through lerobot's RealSenseCamera."""

    kind = "RealSense camera"

    def __init__(self, serial_or_name: str, width: int | None, height: int | None, fps: float | None):
        if not serial_or_name:
            raise CameraError("give the RealSense camera's serial number or name, realsense:SERIAL_OR_NAME: "
                              "`lerobot-find-cameras realsense` lists them")
        if (width is None) != (height is None):
            raise CameraError("a RealSense camera needs both --width and --height, or neither for its default mode")
        try:
            from lerobot.cameras.realsense import RealSenseCamera, RealSenseCameraConfig

            config = RealSenseCameraConfig(serial_number_or_name=serial_or_name, width=width, height=height,
                                           fps=round(fps) if width and fps else None)
            camera = RealSenseCamera(config)  # looks a name up, which needs pyrealsense2
        except ImportError:
            raise CameraError("RealSense cameras need pyrealsense2, which is not installed: `pip install pyrealsense2` "
                              "(or lerobot's extra: `pip install 'lerobot[intelrealsense]'`)") from None
        except ValueError as exc:  # no camera, or several, of that name
            raise CameraError(f"{exc} (`lerobot-find-cameras realsense` lists them)") from None
        self.connect(camera, serial_or_name,
                     "Check that it is plugged in (USB 3) and that no other program holds it.")


def open_source(source: str, width: int | None, height: int | None, fps: float, fourcc: str | None):
    if source == "synthetic":
        return SyntheticSource(width or 640, height or 480)
    if source.startswith("realsense:"):
        if fourcc:
            raise CameraError("--fourcc is for OpenCV camera devices, not RealSense cameras")
        return RealSenseSource(source.removeprefix("realsense:"), width, height, fps)
    if source.isdigit() or source.startswith("/dev/"):
        return DeviceSource(source, width, height, fps, fourcc)
    return VideoSource(source)


class CameraNode:
    def __init__(self, name: str, opener, fps: float, encoding: str, jpeg_quality: int, node: str, bind=(),
                 keys: ServerKeys | None = None):
        self.name, self.opener, self.fps = name, opener, fps
        self.encoding, self.jpeg_quality = encoding, jpeg_quality
        self.topic = camera_topic(name)
        self.log = get_logger()
        self.source = opener()  # a source that cannot be opened fails the node at once
        self.publisher = Publisher(node, bind, keys=keys)
        self.stop_event = threading.Event()
        self.failures = 0

    def stop(self) -> None:
        self.stop_event.set()

    def run(self) -> None:
        ticker = Ticker(self.fps)
        seq = 0
        announce_ready(
            self.log, "camera", camera=self.name, source=self.source.describe(), fps=self.fps,
            encoding=self.encoding, endpoints=self.publisher.endpoints,
        )
        try:
            while not self.stop_event.is_set():
                ticker.wait()
                try:
                    image = self.source.read()
                    capture_time = time.monotonic()
                except Exception as exc:
                    self.reopen(exc)
                    continue
                payload = JpegImage.encode(image, self.jpeg_quality) if self.encoding == "jpeg" else image
                self.publisher.publish(self.topic, CameraFrame(self.name, seq, capture_time, payload))
                seq += 1
        finally:
            self.source.close()
            self.publisher.close()
            self.log.info("camera stopped", frames=seq, failures=self.failures, late_ticks=ticker.late)

    def reopen(self, error: Exception) -> None:
        """The source stopped delivering: report it, and reopen it with growing pauses."""
        self.failures += 1
        delay = min(5.0, 0.1 * 2 ** min(self.failures - 1, 6))
        self.log.warning("camera stopped delivering: reopening", camera=self.name, error=str(error), retry_in_s=delay)
        self.source.close()
        while not self.stop_event.wait(delay):
            try:
                self.source = self.opener()
                self.log.info("camera delivering again", camera=self.name)
                return
            except Exception as exc:
                delay = min(5.0, delay * 2)
                self.log.warning("camera still unavailable", camera=self.name, error=str(exc), retry_in_s=delay)


def serve(node: CameraNode) -> None:
    run_node(node)
