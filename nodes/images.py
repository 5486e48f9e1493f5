"""Camera frames on their way to a policy: fitted to its input size the one way both ends use.

The worker letterboxes a frame whose size is not its policy's input; the actuator can do the same
before it sends (`--send-size model`), so a remote link carries only the pixels the model looks
at, and optionally JPEG-compresses them (`--send-encoding jpeg`).
"""

from __future__ import annotations

import cv2
import numpy as np

from ..bus.schema import JpegImage


def letterbox(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize `image` (HxWxC) to fit height x width keeping its aspect ratio; pad with black."""
    h, w = image.shape[:2]
    scale = min(height / h, width / w)
    new_h, new_w = max(1, round(h * scale)), max(1, round(w * scale))
    resized = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
    if resized.ndim == 2:
        resized = resized[:, :, None]
    out = np.zeros((height, width, image.shape[2]), dtype=image.dtype)
    top, left = (height - new_h) // 2, (width - new_w) // 2
    out[top : top + new_h, left : left + new_w] = resized
    return out


def for_sending(image: np.ndarray | JpegImage, size: tuple[int, int] | None, encoding: str,
                quality: int) -> np.ndarray | JpegImage:
    """`image` as it should travel: letterboxed to `size` (height, width; None: as it is), then
    raw or JPEG. A frame already in that form is passed on untouched (no re-encoding)."""
    if size is not None and tuple(image.shape[:2]) != size:
        pixels = image.decode() if isinstance(image, JpegImage) else image
        image = letterbox(pixels, *size)
    if encoding == "jpeg":
        return image if isinstance(image, JpegImage) else JpegImage.encode(image, quality)
    return image.decode() if isinstance(image, JpegImage) else image
