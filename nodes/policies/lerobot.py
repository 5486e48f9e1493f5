"""A LeRobot policy served by a worker, loaded and called with lerobot's own code.

Loading follows lerobot's async PolicyServer: the policy class from the checkpoint's
config type (`get_policy_class`), `from_pretrained`, and the pre- and post-processors
saved beside it (`make_pre_post_processors(pretrained_path=...)`), on the device asked
for. Unlike that server, a request carries the policy's whole observation history
(Diffusion needs 2 steps, VQBet 5), which fills the policy's observation queues the way
`select_action` would before `predict_action_chunk` runs: no state is kept between
requests, so any worker can serve any robot. An image whose size differs from the
policy's input is letterboxed (resized keeping its aspect ratio, padded), never squashed.
What goes wrong while loading is said in one line (lerobot_loading.py).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from ...bus.log import get_logger
from ...bus.messages import ObservationRequest
from ...bus.records import Feature, ModelDescription
from ...bus.schema import JpegImage, MessageError
from . import BadRequest, BatchResult, Result
from .lerobot_loading import check_device, config_errors, locate, prints_logged


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


class LerobotPolicy:
    def __init__(self, path_or_id: str, device: str = "cpu"):
        import torch
        from lerobot.configs.policies import PreTrainedConfig
        from lerobot.policies import get_policy_class, make_pre_post_processors

        self.log = get_logger(component="policy")
        self.torch = torch
        check_device(torch, device)
        path_or_id, hub = locate(path_or_id)
        start = time.perf_counter()
        with prints_logged():
            with config_errors(path_or_id, hub):
                config = PreTrainedConfig.from_pretrained(path_or_id)
            config.device = device
            self.config = config
            with config_errors(path_or_id, hub, config.type):
                self.policy = get_policy_class(config.type).from_pretrained(path_or_id, config=config)
                self.policy.to(device)
                self.policy.eval()
                override = {"device": device}
                self.preprocessor, self.postprocessor = make_pre_post_processors(
                    config,
                    pretrained_path=path_or_id,
                    preprocessor_overrides={"device_processor": override},
                    postprocessor_overrides={"device_processor": override},
                )
        self.name = f"{config.type}:{Path(path_or_id).name}"
        self.device = device
        self.n_obs_steps = int(getattr(config, "n_obs_steps", 1) or 1)
        features = config.input_features
        self.image_keys = [k for k, f in features.items() if f.type.name == "VISUAL"]
        self.state_key = next((k for k, f in features.items() if f.type.name == "STATE"), None)
        self.state_size = int(features[self.state_key].shape[0]) if self.state_key else 0
        self.image_shapes = {k: tuple(int(n) for n in features[k].shape) for k in self.image_keys}  # C, H, W
        self.action_size = int(config.output_features["action"].shape[0])
        self._letterboxed: set[tuple] = set()
        self.load_s = time.perf_counter() - start
        start = time.perf_counter()
        self.chunk_size = self.warm_up()
        self.log.info(
            "policy loaded and warmed up", type=config.type, device=device, load_s=round(self.load_s, 2),
            warm_up_s=round(time.perf_counter() - start, 2), chunk_size=self.chunk_size,
            n_obs_steps=self.n_obs_steps,
        )

    def describe(self) -> ModelDescription:
        inputs = {
            key: Feature(feature.type.name, [int(n) for n in feature.shape])
            for key, feature in self.config.input_features.items()
        }
        # fps: a LeRobot checkpoint does not record its dataset's rate.
        return ModelDescription(type=self.config.type, name=self.name, inputs=inputs, action_size=self.action_size,
                                chunk_size=self.chunk_size, n_obs_steps=self.n_obs_steps, device=self.device)

    def warm_up(self) -> int:
        """Run the model once (lazy initialisation, kernels) before READY; returns the chunk length."""
        steps = []
        for _ in range(self.n_obs_steps):
            images = {k: np.zeros((h, w, c), np.uint8) for k, (c, h, w) in self.image_shapes.items()}
            steps.append((np.zeros(self.state_size, np.float32), images))
        return int(self.infer([steps]).shape[1])

    # --- requests -------------------------------------------------------------------------

    def prepare(self, request: ObservationRequest) -> list[tuple[np.ndarray, dict[str, np.ndarray]]]:
        """The request's history as (state, images) steps, oldest first; BadRequest if it does not fit."""
        if len(request.observations) < self.n_obs_steps:
            raise BadRequest(
                f"{self.config.type} needs {self.n_obs_steps} observations (its history, newest last), "
                f"got {len(request.observations)}"
            )
        steps = []
        for observation in request.observations[-self.n_obs_steps :]:
            state = observation.state
            if self.state_key and state.shape != (self.state_size,):
                raise BadRequest(f"state has {state.size} values; {self.state_key} needs {self.state_size}")
            images = {}
            for key in self.image_keys:
                if key not in observation.images:
                    raise BadRequest(
                        f"missing camera {key!r}: the model needs {', '.join(self.image_keys)}; "
                        f"the request has {', '.join(observation.images) or 'none'}"
                    )
                images[key] = self.image(key, observation.images[key])
            steps.append((state.astype(np.float32), images))
        return steps

    def image(self, key: str, value: np.ndarray | JpegImage) -> np.ndarray:
        try:
            pixels = value.decode() if isinstance(value, JpegImage) else value
        except MessageError as exc:
            raise BadRequest(f"{key}: {exc}") from exc
        if pixels.ndim == 2:
            pixels = pixels[:, :, None]
        channels, height, width = self.image_shapes[key]
        if pixels.shape[2] != channels:
            raise BadRequest(f"{key} has {pixels.shape[2]} channels; the model needs {channels}")
        if pixels.shape[:2] != (height, width):
            shape = (key, pixels.shape)
            if shape not in self._letterboxed:  # say it once per camera and size
                self._letterboxed.add(shape)
                self.log.warning(
                    "letterboxing camera frames to the policy's input size", camera=key,
                    received=list(pixels.shape[:2]), expected=[height, width],
                )
            pixels = letterbox(pixels, height, width)
        return pixels

    def run(self, requests: list[ObservationRequest]) -> BatchResult:
        start = time.perf_counter()
        results: list[Result] = [Result() for _ in requests]
        batch, members = [], []
        for i, request in enumerate(requests):
            try:
                batch.append(self.prepare(request))
                members.append(i)
            except BadRequest as exc:
                results[i].error = exc
        timings = {"prepare": time.perf_counter() - start}
        if batch:
            actions = self.infer(batch, timings)
            for i, chunk in zip(members, actions):
                results[i].actions = chunk
        return BatchResult(results, timings)

    def infer(self, batch: list[list], timings: dict[str, float] | None = None) -> np.ndarray:
        """(batch, chunk, action size) float32 actions for a batch of histories."""
        torch = self.torch
        from lerobot.policies.utils import populate_queues
        from lerobot.utils.constants import OBS_IMAGES

        timings = {} if timings is None else timings
        start = time.perf_counter()
        steps = []
        for t in range(self.n_obs_steps):
            step: dict[str, Any] = {}
            if self.state_key:
                step[self.state_key] = torch.from_numpy(np.stack([h[t][0] for h in batch]))
            for key in self.image_keys:
                pixels = np.stack([h[t][1][key] for h in batch])  # B, H, W, C uint8
                # CHW float in 0..1, laid out contiguously: lerobot's normaliser ran 6x slower
                # on the strided view a bare permute gives.
                chw = torch.from_numpy(pixels).permute(0, 3, 1, 2)
                step[key] = chw.to(torch.float32, memory_format=torch.contiguous_format).mul_(1 / 255)
            processed = self.preprocessor(step)
            # The pipeline's output also holds empty non-observation entries (action, ...).
            steps.append({k: v for k, v in processed.items() if k.startswith("observation.") and v is not None})
        timings["preprocess"] = time.perf_counter() - start
        start = time.perf_counter()
        with torch.inference_mode():
            self.policy.reset()
            queues = getattr(self.policy, "_queues", None)
            if queues is not None:
                # Fill the observation queues with the history, as select_action would.
                for step in steps:
                    step = dict(step)
                    if self.image_keys and OBS_IMAGES in queues:
                        step[OBS_IMAGES] = torch.stack([step[k] for k in self.image_keys], dim=-4)
                    populate_queues(queues, step)
                last = dict(steps[-1])
                if self.image_keys and OBS_IMAGES in queues:
                    last[OBS_IMAGES] = queues[OBS_IMAGES][-1]
            else:
                last = steps[-1]
            chunk = self.policy.predict_action_chunk(last)
            if chunk.ndim == 2:
                chunk = chunk.unsqueeze(0)
            if self.device.startswith("cuda"):
                torch.cuda.synchronize()
        timings["inference"] = time.perf_counter() - start
        start = time.perf_counter()
        size, length, width = chunk.shape
        actions = self.postprocessor(chunk.reshape(size * length, width))
        actions = actions.reshape(size, length, -1).float().cpu().numpy()
        timings["postprocess"] = time.perf_counter() - start
        return actions
