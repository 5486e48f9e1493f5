"""A LeRobot policy served by a worker, loaded and called with lerobot's own code.

Loading follows lerobot's async PolicyServer: the policy class from the checkpoint's
config type (`get_policy_class`), `from_pretrained`, and the pre- and post-processors
saved beside it (`make_pre_post_processors(pretrained_path=...)`), on the device asked
for. Unlike that server, a request carries the policy's whole observation history
(Diffusion needs 2 steps, VQBet 5), which fills the policy's observation queues the way
`select_action` would before `predict_action_chunk` runs: no state is kept between
requests, so any worker can serve any robot. An image whose size differs from the
policy's input is letterboxed (resized keeping its aspect ratio, padded), never squashed.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from chunkbus.bus.log import get_logger
from chunkbus.bus.messages import JpegImage, MessageError, ObservationRequest
from chunkbus.nodes.policies import BadRequest, BatchResult, PolicyLoadError, Result


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


# --- loading: what goes wrong is the configuration's fault, said in one line ---------------

HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9_.-]+")
_CHECKPOINT = "a folder saved with lerobot's save_pretrained (config.json, model.safetensors, the processor files)"
_EXTRAS = {"pi0": "pi", "pi05": "pi", "wall_x": "wallx", "multi_task_dit": "multi-task-dit"}


def _no_such(path_or_id: str) -> PolicyLoadError:
    return PolicyLoadError(
        f"There is no checkpoint folder `{path_or_id}`, and it is not a hub id like `user/model`."
    )


def _one_line(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(str(exc).split()).rstrip(".") or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"


class _LogLines(io.TextIOBase):
    """A stdout that logs each line printed to it, at info (lerobot print()s while loading)."""

    def __init__(self, log):
        self.log, self.partial = log, ""

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        *lines, self.partial = (self.partial + text).split("\n")
        for line in lines:
            if line.strip():
                self.log.info(line.strip())
        return len(text)

    def flush(self) -> None:
        if self.partial.strip():
            self.log.info(self.partial.strip())
        self.partial = ""


@contextlib.contextmanager
def _prints_logged():
    """Route print()s to the node's log (component=lerobot): library output appears once, structured."""
    # huggingface_hub gives its logger a stderr handler of its own: its lines would appear
    # twice, bare and (through the root logger) structured.
    hub = logging.getLogger("huggingface_hub")
    for handler in [h for h in hub.handlers if type(h) is logging.StreamHandler]:
        hub.removeHandler(handler)
    lines = _LogLines(get_logger(component="lerobot"))
    try:
        with contextlib.redirect_stdout(lines):
            yield
    finally:
        lines.flush()


def _check_device(torch, device: str) -> None:
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        raise PolicyLoadError(f"`{device}` is not a torch device: use cpu, cuda, cuda:N or mps.") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise PolicyLoadError(
                f"`--device {device}` needs CUDA, which torch cannot use on this machine "
                f"(torch {torch.__version__}, built for CUDA {torch.version.cuda or 'none'}): use `--device cpu` "
                "or run the worker on a GPU host."
            )
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise PolicyLoadError(
                f"`--device {device}` names a GPU this machine does not have: it has "
                f"{torch.cuda.device_count()} (cuda:0 to cuda:{torch.cuda.device_count() - 1})."
            )
    elif parsed.type == "mps" and not torch.backends.mps.is_available():
        raise PolicyLoadError(
            f"`--device {device}` needs Apple's MPS, which this machine does not have: use `--device cpu`."
        )


def _download_hint(repo_id: str) -> str:
    return (
        f"Download it first with `hf download {repo_id}` (or `huggingface-cli download {repo_id}` with an older "
        "huggingface_hub) and pass the folder it prints as --policy, or pass a local checkpoint folder"
    )


def _locate(path_or_id: str) -> tuple[str, bool]:
    """The checkpoint's local folder or hub id, and whether it is a hub id; fails fast offline."""
    path = Path(path_or_id).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise PolicyLoadError(
                f"Cannot read a LeRobot policy config from `{path_or_id}`: it has no config.json. Give "
                f"{_CHECKPOINT}, or a hub id like `user/model`."
            )
        return str(path), False
    if path.exists():
        raise PolicyLoadError(f"`{path_or_id}` is a file, not a checkpoint folder: give {_CHECKPOINT}.")
    if path_or_id.startswith((".", "/", "~")) or not HUB_ID.fullmatch(path_or_id):
        raise _no_such(path_or_id)
    from huggingface_hub import constants, try_to_load_from_cache
    from huggingface_hub.utils import get_session

    try:
        cached = try_to_load_from_cache(path_or_id, "config.json")
    except ValueError:  # huggingface_hub's HFValidationError: not a valid repo id
        raise _no_such(path_or_id) from None
    if isinstance(cached, str) and isinstance(try_to_load_from_cache(path_or_id, "model.safetensors"), str):
        return path_or_id, True  # cached: huggingface_hub falls back to the cache without network
    if constants.is_offline_mode():
        raise PolicyLoadError(
            f"Cannot fetch `{path_or_id}` from the Hugging Face Hub (and there is no folder of that name): "
            f"HF_HUB_OFFLINE is set and it is not in the local cache. {_download_hint(path_or_id)}, or unset "
            "HF_HUB_OFFLINE."
        )
    # Without network huggingface_hub retries with backoff for half a minute (or minutes,
    # when packets are dropped): one quick request tells whether the Hub is reachable.
    try:
        get_session().head(constants.ENDPOINT, timeout=5)
    except Exception as exc:  # httpx's transport errors: no route, no DNS, refused, timed out
        raise PolicyLoadError(
            f"Cannot fetch `{path_or_id}` from the Hugging Face Hub (and there is no folder of that name): "
            f"{constants.ENDPOINT} cannot be reached ({_one_line(exc, 120)}) and it is not in the local cache. "
            f"{_download_hint(path_or_id)}."
        ) from None
    return path_or_id, True


@contextlib.contextmanager
def _config_errors(path_or_id: str, hub: bool, policy_type: str | None = None):
    """Turn what a wrong checkpoint (or a missing extra) raises while loading into PolicyLoadError.

    Anything else (a bug) passes through with its traceback.
    """
    from draccus.utils import DraccusException
    from huggingface_hub import errors as hub_errors
    from lerobot.processor.pipeline import ProcessorMigrationError
    from safetensors import SafetensorError

    try:
        yield
    except ImportError as exc:
        hint = "" if "pip install" in str(exc) or not policy_type else (
            f" Install lerobot's extra for it: `pip install 'lerobot[{_EXTRAS.get(policy_type, policy_type)}]'`."
        )
        needs = f"The `{policy_type}` policy needs" if policy_type else "This checkpoint needs"
        raise PolicyLoadError(f"{needs} a library that is not installed: {_one_line(exc)}.{hint}") from exc
    except (OSError, ValueError, DraccusException, ProcessorMigrationError, SafetensorError, RuntimeError) as exc:
        if isinstance(exc, RuntimeError) and "loading state_dict" not in str(exc):
            raise  # not the weights' mismatch with the config: a bug, not a configuration
        chain, cause = [], exc
        while cause is not None:
            chain.append(cause)
            cause = cause.__cause__ or cause.__context__
        if hub and any(isinstance(e, hub_errors.OfflineModeIsEnabled) for e in chain):
            raise PolicyLoadError(
                f"Cannot fetch `{path_or_id}` from the Hugging Face Hub: HF_HUB_OFFLINE is set and it is not "
                f"(wholly) in the local cache. {_download_hint(path_or_id)}, or unset HF_HUB_OFFLINE."
            ) from exc
        if hub and any(isinstance(e, hub_errors.GatedRepoError) for e in chain):
            raise PolicyLoadError(
                f"`{path_or_id}` is gated on the Hugging Face Hub: accept its terms on its page and log in with "
                "`hf auth login` (or set HF_TOKEN)."
            ) from exc
        if hub and any(isinstance(e, hub_errors.RepositoryNotFoundError) for e in chain):
            raise PolicyLoadError(
                f"There is no model `{path_or_id}` on the Hugging Face Hub (or it is private: log in with "
                "`hf auth login`), and no checkpoint folder of that name."
            ) from exc
        if hub and any(isinstance(e, (hub_errors.LocalEntryNotFoundError, hub_errors.HfHubHTTPError)) for e in chain):
            raise PolicyLoadError(
                f"Cannot fetch `{path_or_id}` from the Hugging Face Hub: {_one_line(exc)}. "
                f"{_download_hint(path_or_id)}."
            ) from exc
        if isinstance(exc, ProcessorMigrationError):
            raise PolicyLoadError(
                f"`{path_or_id}` has no processor files (policy_preprocessor.json, policy_postprocessor.json). "
                "If an older lerobot saved it, convert it with `python -m "
                f"lerobot.processor.migrate_policy_normalization --pretrained-path {path_or_id}`."
            ) from exc
        if isinstance(exc, RuntimeError):  # "Error(s) in loading state_dict for ACTPolicy:\n\tsize mismatch ..."
            first = [line.strip() for line in str(exc).splitlines() if line.strip()][1:2]
            raise PolicyLoadError(
                f"The weights in `{path_or_id}` do not fit its config.json: {_one_line(first[0] if first else exc)}."
            ) from exc
        if match := re.search(r"Policy type '([^']*)'.* is not registered", str(exc)):
            from lerobot.configs.policies import PreTrainedConfig

            raise PolicyLoadError(
                f"`{path_or_id}` is a `{match[1]}` policy, a type this lerobot does not know (it knows "
                f"{', '.join(sorted(PreTrainedConfig.get_known_choices()))})."
            ) from exc
        raise PolicyLoadError(
            f"Cannot load the LeRobot checkpoint `{path_or_id}`: {_one_line(exc)}. Give {_CHECKPOINT}, or a hub id."
        ) from exc


class LerobotPolicy:
    def __init__(self, path_or_id: str, device: str = "cpu"):
        import torch
        from lerobot.configs.policies import PreTrainedConfig
        from lerobot.policies import get_policy_class, make_pre_post_processors

        self.log = get_logger(component="policy")
        self.torch = torch
        _check_device(torch, device)
        path_or_id, hub = _locate(path_or_id)
        start = time.perf_counter()
        with _prints_logged():
            with _config_errors(path_or_id, hub):
                config = PreTrainedConfig.from_pretrained(path_or_id)
            config.device = device
            self.config = config
            with _config_errors(path_or_id, hub, config.type):
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

    def describe(self) -> dict[str, Any]:
        inputs = {
            key: {"type": feature.type.name, "shape": [int(n) for n in feature.shape]}
            for key, feature in self.config.input_features.items()
        }
        return {
            "type": self.config.type,
            "inputs": inputs,
            "n_obs_steps": self.n_obs_steps,
            "action_size": self.action_size,
            "chunk_size": self.chunk_size,
            "fps": None,  # a LeRobot checkpoint does not record its dataset's fps
            "device": self.device,
        }

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
