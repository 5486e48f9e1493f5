"""A LeRobot policy served by a worker, loaded and called with lerobot's own code.

Loading follows lerobot's async PolicyServer: the policy class from the checkpoint's
config type (`get_policy_class`), `from_pretrained`, and the pre- and post-processors
saved beside it (`make_pre_post_processors(pretrained_path=...)`), on the device asked
for. Unlike that server, a request carries the policy's whole observation history
(Diffusion needs 2 steps, VQBet 5), which fills the policy's observation queues the way
`select_action` would before `predict_action_chunk` runs: no state is kept between
requests, so any worker can serve any robot. An image whose size differs from the
policy's input is letterboxed (resized keeping its aspect ratio, padded), never squashed.
Camera frames go to the model in one pass, uint8 to normalised float, by the affine map the
checkpoint's own normaliser makes of x / 255 (`fold_images`, derived from that step at load);
the rest of the pre-processor runs as is.
Each request's task goes to the pre-processor as one string per batch member; a request
with a prefix is guided towards it by lerobot's real-time chunking where the policy has it
(guidance.py), one model call per (delay, horizon). What goes wrong while loading is said in
one line (lerobot_loading.py).
"""

from __future__ import annotations

import copy
import inspect
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from ...bus.log import get_logger
from ...bus.messages import ObservationRequest
from ...bus.records import Feature, ModelDescription, RtcSupport
from ...bus.schema import JpegImage, MessageError
from ..images import letterbox
from . import BadRequest, BatchResult, LoadOptions, Result
from .guidance import Guide, by_guidance, guide_of
from .lerobot_loading import (
    check_assets,
    check_device,
    choose_dtype,
    compiler_missing,
    config_errors,
    fetch_weights,
    locate,
    one_line,
    point_assets,
    prints_logged,
    reads_task,
    saved_steps,
)


class LerobotPolicy:
    def __init__(self, path_or_id: str, device: str = "cpu", options: LoadOptions | None = None):
        import torch
        from lerobot.configs.policies import PreTrainedConfig
        from lerobot.policies import get_policy_class, make_pre_post_processors

        options = options or LoadOptions()
        self.log = get_logger(component="policy")
        self.torch = torch
        self.options = options
        check_device(torch, device)
        self.dtype = choose_dtype(torch, device, options.dtype, self.log)
        path_or_id, hub = locate(path_or_id)
        start = time.perf_counter()
        with prints_logged():
            with config_errors(path_or_id, hub):
                config = PreTrainedConfig.from_pretrained(path_or_id)
            config.device = device
            self.config = config
            with config_errors(path_or_id, hub, config.type):
                steps = saved_steps(path_or_id, hub)
            # What the checkpoint fetches besides itself (tokenizers, a VLM's config): checked
            # before the weights load, so a missing one is said in seconds, not minutes.
            overrides = point_assets(config, steps, options)
            check_assets(config, steps)
            with config_errors(path_or_id, hub, config.type):
                fetch_weights(path_or_id, hub)
            # The π family keeps its vision tower in float32 itself (config.dtype); the others
            # get their weights in the dtype and run under autocast, which casts what they
            # make in float32 themselves (flow matching's noise) to meet them.
            self.autocast = not hasattr(config, "dtype") and self.dtype is not torch.float32
            if hasattr(config, "dtype"):
                config.dtype = "bfloat16" if self.dtype is torch.bfloat16 else "float32"
            with config_errors(path_or_id, hub, config.type):
                self.policy = get_policy_class(config.type).from_pretrained(path_or_id, config=config)
                self.policy.to(device)
                if self.autocast:
                    self.policy.to(self.dtype)
                self.policy.eval()
                self.preprocessor, self.postprocessor = make_pre_post_processors(
                    config,
                    pretrained_path=path_or_id,
                    preprocessor_overrides={"device_processor": {"device": device}, **overrides},
                    postprocessor_overrides={"device_processor": {"device": device}},
                )
        self.name = f"{config.type}:{Path(path_or_id).name}"
        self.device = device
        self.needs_task = reads_task(self.preprocessor)
        self.inputs = Inputs.of(config)
        folded = fold_images(self.preprocessor, self.inputs, device)
        self.images = folded if isinstance(folded, ImageFold) else None  # None: lerobot's float images
        self.n_obs_steps = self.inputs.n_obs_steps
        self.action_size = int(config.output_features["action"].shape[0])
        self._letterboxed: set[tuple] = set()
        self.rtc = enable_rtc(self.policy, config)
        self.load_s = time.perf_counter() - start
        self.compiled_predict = None  # torch.compile's predict_action_chunk, with --compile
        self.compiled = False
        start = time.perf_counter()
        if options.compile:
            self.compiled = self.compile()
        self.chunk_size = self.warm_up()
        self.log.info(
            "policy loaded and warmed up", type=config.type, device=device, dtype=self.describe_dtype(),
            compiled=self.compiled, load_s=round(self.load_s, 2), warm_up_s=round(time.perf_counter() - start, 2),
            chunk_size=self.chunk_size, n_obs_steps=self.n_obs_steps, needs_task=self.needs_task,
            images="uint8 to normalised float in one pass" if self.images else f"float, as lerobot's ({folded})",
        )

    def describe_dtype(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    def compile(self) -> bool:
        """torch.compile the model's chunk prediction, warmed up (compiled) for batches of 1 and
        --max-batch; False, and logged, when this machine cannot compile it."""
        missing = compiler_missing(self.device)
        if missing:
            self.log.warning(f"--compile needs {missing}: serving the model uncompiled")
            return False
        self.compiled_predict = self.torch.compile(self.policy.predict_action_chunk)
        try:
            for size in sorted({1, self.options.max_batch}):
                self.warm_up(size)
        except Exception as exc:  # inductor's and dynamo's many errors: the eager model still works
            self.log.warning("torch.compile failed: serving the model uncompiled", error=one_line(exc))
            self.compiled_predict = None
            return False
        return True

    def describe(self) -> ModelDescription:
        inputs = {
            key: Feature(feature.type.name, [int(n) for n in feature.shape])
            for key, feature in self.config.input_features.items()
        }
        # fps: a LeRobot checkpoint does not record its dataset's rate.
        return ModelDescription(type=self.config.type, name=self.name, inputs=inputs, action_size=self.action_size,
                                chunk_size=self.chunk_size, n_obs_steps=self.n_obs_steps, device=self.device,
                                needs_task=self.needs_task, dtype=self.describe_dtype(), compiled=self.compiled,
                                rtc=self.rtc)

    def warm_up(self, batch: int = 1) -> int:
        """Run the model once (lazy initialisation, kernels) before READY; returns the chunk length."""
        steps = []
        for _ in range(self.n_obs_steps):
            images = {k: np.zeros((h, w, c), np.uint8) for k, (c, h, w) in self.inputs.image_shapes.items()}
            steps.append((np.zeros(self.inputs.state_size, np.float32), images))
        return int(self.infer([steps] * batch, [self.options.default_task] * batch).shape[1])

    def task(self, request: ObservationRequest) -> str:
        task = request.task or self.options.default_task
        if self.needs_task and not task:
            raise BadRequest(
                f"{self.config.type} is language-conditioned and the request has no task: give the actuator "
                "--task \"what to do\" (or start the worker with --default-task)"
            )
        return task

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
            state, inputs = observation.state, self.inputs
            if inputs.state_key and state.shape != (inputs.state_size,):
                raise BadRequest(f"state has {state.size} values; {inputs.state_key} needs {inputs.state_size}")
            images = {}
            for key in self.inputs.image_keys:
                if key not in observation.images:
                    raise BadRequest(
                        f"missing camera {key!r}: the model needs {', '.join(self.inputs.image_keys)}; "
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
        channels, height, width = self.inputs.image_shapes[key]
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
        members, tasks, histories, guides = [], [], [], []
        for i, request in enumerate(requests):
            try:
                task, steps = self.task(request), self.prepare(request)
                guide = guide_of(request, self.action_size, self.chunk_size)
            except BadRequest as exc:
                results[i].error = exc
                continue
            if guide is not None and self.rtc is None:
                results[i].unguided = f"{self.config.type} cannot guide a chunk (no real-time chunking): prefix ignored"
                guide = None
            members.append(i)
            tasks.append(task)
            histories.append(steps)
            guides.append(guide)
        timings = {"prepare": time.perf_counter() - start}
        # One model call per (delay, horizon): predict_action_chunk takes one of each.
        for key, positions in by_guidance(guides).items():
            group = [guides[p] for p in positions] if key else None
            actions = self.infer([histories[p] for p in positions], [tasks[p] for p in positions], timings, group)
            for p, chunk in zip(positions, actions):
                results[members[p]].actions = chunk
                results[members[p]].guided = key
        return BatchResult(results, timings)

    def infer(self, batch: list[list], tasks: list[str], timings: dict[str, float] | None = None,
              guides: list[Guide] | None = None) -> np.ndarray:
        """(batch, chunk, action size) float32 actions for a batch of histories and their tasks,
        guided towards their prefixes when `guides` (all of one delay and horizon) are given."""
        timings = {} if timings is None else timings
        start = time.perf_counter()
        steps = preprocess(self.preprocessor, self.inputs, batch, tasks, self.images)
        guidance = {}
        if guides:
            guidance = {"inference_delay": guides[0].delay, "execution_horizon": guides[0].horizon,
                        "prev_chunk_left_over": self.model_space(np.stack([g.prefix for g in guides]))}
        add(timings, "preprocess", time.perf_counter() - start)
        start = time.perf_counter()
        chunk = self.predict_chunk(steps, **guidance)
        add(timings, "inference", time.perf_counter() - start)
        start = time.perf_counter()
        actions = postprocess(self.postprocessor, chunk)
        add(timings, "postprocess", time.perf_counter() - start)
        return actions

    def model_space(self, prefixes: np.ndarray):
        """Raw robot actions (B, h, A) as the model predicts them: through the checkpoint's own
        normaliser, relative to each member's state first for a relative-action checkpoint
        (the pre-processor has just cached the batch's states)."""
        from lerobot.policies.rtc import reanchor_relative_rtc_prefix
        from lerobot.processor import (
            NormalizerProcessorStep,
            RelativeActionsProcessorStep,
            TransitionKey,
            create_transition,
        )

        steps = self.preprocessor.steps
        relative = next((s for s in steps if isinstance(s, RelativeActionsProcessorStep) and s.enabled), None)
        normalizer = next((s for s in steps if isinstance(s, NormalizerProcessorStep)), None)
        actions = self.torch.from_numpy(prefixes)
        if relative is not None:
            return reanchor_relative_rtc_prefix(actions, relative.get_cached_state(), relative, normalizer, self.device)
        transition = create_transition(action=actions)
        if normalizer is not None:
            transition = normalizer(transition)
        return transition[TransitionKey.ACTION].to(self.device)

    def predict_chunk(self, steps: list[dict], **guidance):
        """The model's (B, chunk, width) actions for the pre-processed history `steps`."""
        torch = self.torch
        from lerobot.policies.utils import populate_queues
        from lerobot.utils.constants import OBS_IMAGES

        image_keys = self.inputs.image_keys
        autocast = torch.autocast(torch.device(self.device).type, self.dtype, enabled=self.autocast)
        # Guidance takes a gradient through the model: it fails under inference_mode.
        no_grad = torch.no_grad() if guidance else torch.inference_mode()
        with no_grad, autocast:
            self.policy.reset()
            queues = getattr(self.policy, "_queues", None)
            if queues is not None:
                # Fill the observation queues with the history, as select_action would.
                for step in steps:
                    step = dict(step)
                    if image_keys and OBS_IMAGES in queues:
                        step[OBS_IMAGES] = torch.stack([step[k] for k in image_keys], dim=-4)
                    populate_queues(queues, step)
                last = dict(steps[-1])
                if image_keys and OBS_IMAGES in queues:
                    last[OBS_IMAGES] = queues[OBS_IMAGES][-1]
            else:
                last = steps[-1]
            chunk = (self.compiled_predict or self.policy.predict_action_chunk)(last, **guidance)
            if chunk.ndim == 2:
                chunk = chunk.unsqueeze(0)
            if self.device.startswith("cuda"):
                torch.cuda.synchronize()
        return chunk


def add(timings: dict[str, float], stage: str, seconds: float) -> None:
    timings[stage] = timings.get(stage, 0.0) + seconds  # a batch of several groups: their sum


def enable_rtc(policy, config) -> RtcSupport | None:
    """Turn on lerobot's real-time chunking where the policy has it (lerobot's own test, as
    lerobot.rollout's supports_rtc_inference, which needs the dataset extra to import), with its
    defaults and the checkpoint's own number of flow steps; None where it cannot guide."""
    supports = getattr(policy, "supports_rtc", None)
    if not callable(supports) or not supports() or not hasattr(policy, "init_rtc_processor"):
        return None
    try:
        inspect.signature(policy.predict_action_chunk).bind(object(), inference_delay=0, prev_chunk_left_over=None)
    except (TypeError, ValueError):
        return None
    from lerobot.policies.rtc import RTCConfig

    rtc_config = getattr(config, "rtc_config", None) or RTCConfig()
    rtc_config.enabled = True
    config.rtc_config = rtc_config
    policy.init_rtc_processor()  # a call without a prefix stays unguided
    steps = next((getattr(config, name) for name in ("num_steps", "num_inference_steps", "num_inference_timesteps")
                  if getattr(config, name, None)), 1)
    return RtcSupport(schedule=str(rtc_config.prefix_attention_schedule.value),
                      max_guidance_weight=float(rtc_config.max_guidance_weight), flow_steps=int(steps))


@dataclass(frozen=True)
class Inputs:
    """What a checkpoint takes in, from its config: the history length, the state, the cameras."""

    n_obs_steps: int
    state_key: str | None
    state_size: int
    image_keys: list[str]
    image_shapes: dict[str, tuple[int, ...]]  # C, H, W

    @classmethod
    def of(cls, config) -> Inputs:
        features = config.input_features
        image_keys = [k for k, f in features.items() if f.type.name == "VISUAL"]
        state_key = next((k for k, f in features.items() if f.type.name == "STATE"), None)
        return cls(
            n_obs_steps=int(getattr(config, "n_obs_steps", 1) or 1),
            state_key=state_key,
            state_size=int(features[state_key].shape[0]) if state_key else 0,
            image_keys=image_keys,
            image_shapes={k: tuple(int(n) for n in features[k].shape) for k in image_keys},
        )


# lerobot's pre-processor steps that neither read nor change a camera image (by class name:
# several live in policy modules), so images may pass them already normalised.
IMAGE_BLIND_STEPS = frozenset({
    "RenameObservationsProcessorStep", "AddBatchDimensionProcessorStep", "DeviceProcessorStep",
    "NewLineTaskProcessorStep", "Pi0NewLineProcessor", "TokenizerProcessorStep", "ActionTokenizerProcessorStep",
    "RelativeActionsProcessorStep", "Pi05PrepareStateTokenizerProcessorStep",
    "Pi0FastPrepareStateAndLanguageTokenizerProcessorStep",
})


@dataclass(frozen=True)
class ImageFold:
    """uint8 camera frames to the float images lerobot's pre-processor makes of them (x / 255,
    then its normaliser), in one pass: per camera and channel `pixels * scale + shift`, on the
    policy's device (to CUDA, the uint8 frames: a quarter of the bytes). `pipeline` is the
    pre-processor with its normaliser skipping the images. Made by fold_images."""

    pipeline: Any
    scale: dict[str, Any]  # camera -> (C, 1, 1) tensor on the device
    shift: dict[str, Any]
    device: str

    def __call__(self, key: str, frames: list[np.ndarray]):
        """A batch's H, W, C uint8 frames -> B, C, H, W float32, laid out contiguously (the
        models are slow on the strided view a bare permute gives)."""
        import torch

        if self.device == "cpu":
            # OpenCV splits the channels into planes 4x faster than torch's strided copy, and the
            # conversion then reads memory in order: half the time of permute-then-convert.
            planes = np.empty((len(frames), frames[0].shape[2], *frames[0].shape[:2]), np.uint8)
            for frame, member in zip(frames, planes):
                cv2.split(frame, list(member))  # into `member`'s C contiguous H x W planes
            chw = torch.from_numpy(planes).to(torch.float32)
        else:
            uint8 = torch.from_numpy(np.stack(frames)).to(self.device).permute(0, 3, 1, 2)
            chw = uint8.to(torch.float32, memory_format=torch.contiguous_format)
        return chw.mul_(self.scale[key]).add_(self.shift[key])


def fold_images(preprocessor, inputs: Inputs, device: str) -> ImageFold | str:
    """The checkpoint's image normalisation as an ImageFold, read off its own normaliser step by
    applying it to 0, 1/2 and 1; or, where folding could change what the model gets, why not
    (then images go through lerobot's pipeline as float, as they always may)."""
    import torch
    from lerobot.configs.types import FeatureType
    from lerobot.processor import (
        NormalizerProcessorStep,
        RenameObservationsProcessorStep,
        TransitionKey,
        create_transition,
    )

    steps = list(preprocessor.steps)
    at = next((i for i, step in enumerate(steps) if isinstance(step, NormalizerProcessorStep)), None)
    if at is None:
        return "the pre-processor has no NormalizerProcessorStep"
    for step in steps[:at]:  # these see the images before the normaliser: folded, they see them after it
        name = type(step).__name__
        if name not in IMAGE_BLIND_STEPS:
            return f"{name} runs before the normaliser"
        if isinstance(step, RenameObservationsProcessorStep) and set(step.rename_map) & set(inputs.image_keys):
            return "the pre-processor renames a camera"
    normalizer = steps[at]
    probe = copy.deepcopy(normalizer)  # a step moves its stats to the device of what it is given
    scale, shift = {}, {}
    for key in inputs.image_keys:
        x = torch.tensor([0.0, 0.5, 1.0]).expand(1, inputs.image_shapes[key][0], 1, 3)
        y = probe(create_transition(observation={key: x}))[TransitionKey.OBSERVATION][key].float()
        low, middle, high = y[0, :, 0, 0], y[0, :, 0, 1], y[0, :, 0, 2]
        if not torch.allclose(middle, (low + high) / 2, rtol=1e-4, atol=1e-5):
            return f"its normalisation of {key} is not affine"
        scale[key] = ((high - low) / 255).view(-1, 1, 1).to(device)
        shift[key] = low.view(-1, 1, 1).to(device)
    skipping = copy.copy(normalizer)
    normalized = normalizer.normalize_observation_keys
    if normalized is None:
        normalized = {k for k, f in normalizer.features.items() if f.type is not FeatureType.ACTION}
    skipping.normalize_observation_keys = set(normalized) - set(inputs.image_keys)
    pipeline = copy.copy(preprocessor)
    pipeline.steps = [*steps[:at], skipping, *steps[at + 1 :]]
    return ImageFold(pipeline, scale, shift, device)


def preprocess(preprocessor, inputs: Inputs, batch: list[list], tasks: list[str],
               fold: ImageFold | None = None) -> list[dict]:
    """Run lerobot's pre-processor on a batch of histories ((state, images) steps, oldest first)
    and their tasks: the model's inputs for each history step. With `fold`, the images are
    normalised by it and the rest by its pipeline (the pre-processor, images skipped)."""
    import torch

    pipeline = fold.pipeline if fold else preprocessor
    steps = []
    for t in range(inputs.n_obs_steps):
        # One task per batch member: π0.5's and π0-FAST's prompt steps take a list of B
        # (a bare string would tokenize one prompt for the whole batch).
        step: dict[str, Any] = {"task": list(tasks)}
        if inputs.state_key:
            step[inputs.state_key] = torch.from_numpy(np.stack([h[t][0] for h in batch]))
        for key in inputs.image_keys:
            if fold:
                step[key] = fold(key, [h[t][1][key] for h in batch])
                continue
            pixels = np.stack([h[t][1][key] for h in batch])  # B, H, W, C uint8
            # CHW float in 0..1, laid out contiguously: lerobot's normaliser ran 6x slower
            # on the strided view a bare permute gives.
            chw = torch.from_numpy(pixels).permute(0, 3, 1, 2)
            step[key] = chw.to(torch.float32, memory_format=torch.contiguous_format).mul_(1 / 255)
        processed = pipeline(step)
        # The pipeline's output also holds empty non-observation entries (action, ...).
        steps.append({k: v for k, v in processed.items() if k.startswith("observation.") and v is not None})
    return steps


def postprocess(postprocessor, chunk) -> np.ndarray:
    """lerobot's post-processor on the model's (B, chunk, width) actions: float32 robot actions.

    The chunk goes in as it is: a relative-action checkpoint's last step adds each member's
    newest state (which the pre-processor cached) to that member's actions.
    """
    return postprocessor(chunk).float().cpu().numpy()
