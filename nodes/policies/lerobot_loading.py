"""Loading a LeRobot checkpoint: what goes wrong is the configuration's fault, said in one line.

`locate` finds the checkpoint (a folder, or a hub id it can fetch or has cached) and fails
fast offline; `check_device` checks the torch device and `choose_dtype` the number type on
it; `point_assets` applies --tokenizer and --action-tokenizer, and `check_assets` checks
that what the checkpoint fetches besides itself (tokenizers, a VLM's config) can be had,
before the weights load; `config_errors` turns what a wrong checkpoint or a missing lerobot
extra raises while loading into PolicyLoadError; `prints_logged` routes what lerobot
print()s while loading to the node's log. huggingface_hub, lerobot and their dependencies
are imported only when called.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import logging
import os
import re
import shutil
import sys
from pathlib import Path

from ...bus.log import get_logger
from . import LoadOptions, PolicyLoadError

HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9_.-]+")
_CHECKPOINT = "a folder saved with lerobot's save_pretrained (config.json, model.safetensors, the processor files)"
_EXTRAS = {"pi0": "pi", "pi05": "pi", "wall_x": "wallx", "multi_task_dit": "multi-task-dit"}


def _no_such(path_or_id: str) -> PolicyLoadError:
    return PolicyLoadError(
        f"There is no checkpoint folder `{path_or_id}`, and it is not a hub id like `user/model`."
    )


def one_line(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(str(exc).split()).rstrip(".") or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"


class _LogLines(io.TextIOBase):
    """A stdout that logs each line printed to it, at info (lerobot print()s while loading)."""

    def __init__(self, log):
        self.log, self.partial = log, ""
        self.logging = False

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        if self.logging:  # the logger itself prints to stdout (logging not configured): let it
            return sys.__stdout__.write(text)
        *lines, self.partial = (self.partial + text).split("\n")
        self.logging = True
        try:
            for line in lines:
                if line.strip():
                    self.log.info(line.strip())
        finally:
            self.logging = False
        return len(text)

    def flush(self) -> None:
        if self.logging:
            return sys.__stdout__.flush()
        text, self.partial = self.partial, ""
        self.write(text + "\n")


@contextlib.contextmanager
def prints_logged():
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


def check_device(torch, device: str) -> None:
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


def _hub_problem() -> str | None:
    """Why the Hub cannot be reached now (offline mode, no network), or None."""
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    if constants.is_offline_mode():
        return "HF_HUB_OFFLINE is set"
    # Without network huggingface_hub retries with backoff for half a minute (or minutes,
    # when packets are dropped): one quick request tells whether the Hub is reachable.
    try:
        get_session().head(constants.ENDPOINT, timeout=5)
    except Exception as exc:  # httpx's transport errors: no route, no DNS, refused, timed out
        return f"{constants.ENDPOINT} cannot be reached ({one_line(exc, 120)})"
    return None


def locate(path_or_id: str) -> tuple[str, bool]:
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
    from huggingface_hub import try_to_load_from_cache

    try:
        cached = try_to_load_from_cache(path_or_id, "config.json")
    except ValueError:  # huggingface_hub's HFValidationError: not a valid repo id
        raise _no_such(path_or_id) from None
    if isinstance(cached, str) and isinstance(try_to_load_from_cache(path_or_id, "model.safetensors"), str):
        return path_or_id, True  # cached: huggingface_hub falls back to the cache without network
    if problem := _hub_problem():
        unset = ", or unset HF_HUB_OFFLINE" if problem.startswith("HF_HUB_OFFLINE") else ""
        raise PolicyLoadError(
            f"Cannot fetch `{path_or_id}` from the Hugging Face Hub (and there is no folder of that name): "
            f"{problem} and it is not in the local cache. {_download_hint(path_or_id)}{unset}."
        )
    return path_or_id, True


def fetch_weights(path_or_id: str, hub: bool) -> None:
    """PolicyLoadError when the checkpoint has no weights file; a hub checkpoint's is downloaded.

    lerobot's π0 and π0.5 only print a line and go on with random weights when theirs cannot
    be read: an arm must never be driven by a model that merely looks loaded.
    """
    if hub:
        from huggingface_hub import hf_hub_download

        hf_hub_download(path_or_id, "model.safetensors")  # config_errors says what went wrong
    elif not (Path(path_or_id) / "model.safetensors").is_file():
        raise PolicyLoadError(
            f"`{path_or_id}` has a config.json but no model.safetensors, the policy's weights: give {_CHECKPOINT}."
        )


def saved_steps(path_or_id: str, hub: bool) -> list[dict]:
    """The pre-processor's steps as the checkpoint saved them ([] when it has no processor files)."""
    path = Path(path_or_id) / "policy_preprocessor.json"
    if hub:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError

        try:
            path = Path(hf_hub_download(path_or_id, "policy_preprocessor.json"))
        except EntryNotFoundError:
            return []
    if not path.is_file():
        return []
    return json.loads(path.read_text()).get("steps", [])


# What a checkpoint fetches besides itself, where its config and its saved pre-processor
# name it: config fields and processor-step keys, what each is for, the option that points it.
TOKENIZER, ACTION_TOKENIZER = "--tokenizer", "--action-tokenizer"
ASSETS = {
    "vlm_model_name": ("its vision-language model's config and tokenizer", TOKENIZER),
    "text_tokenizer_name": ("the tokenizer that turns the task into tokens", TOKENIZER),
    "tokenizer_name": ("the tokenizer that turns the task into tokens", TOKENIZER),
    "paligemma_tokenizer_name": ("the tokenizer that turns the task into tokens", TOKENIZER),
    "action_tokenizer_name": ("the FAST tokenizer that turns the model's tokens into actions", ACTION_TOKENIZER),
    "base_model_path": ("the GR00T base model it is built on (its backbone and processor files)", None),
}
_CACHED_FILES = ("config.json", "tokenizer_config.json", "processor_config.json", "preprocessor_config.json")


def _asset_names(config, steps: list[dict]) -> dict[str, str]:
    """Each asset the checkpoint names -> the key that names it."""
    found = {getattr(config, key): key for key in ASSETS if isinstance(getattr(config, key, None), str)}
    for step in steps:
        found.update({value: key for key, value in step.get("config", {}).items() if key in ASSETS and value})
    return found


def point_assets(config, steps: list[dict], options: LoadOptions) -> dict[str, dict]:
    """Point the checkpoint's tokenizers at what --tokenizer / --action-tokenizer give (its config
    fields, and `steps` in place); the pre-processor overrides that do the same when it loads."""
    overrides: dict[str, dict] = {}
    for option, value in ((TOKENIZER, options.tokenizer), (ACTION_TOKENIZER, options.action_tokenizer)):
        if value is None:
            continue
        local = Path(value).expanduser()
        value = str(local.resolve()) if local.is_dir() else value
        keys = {key for key, (_, its_option) in ASSETS.items() if its_option == option}
        used = [key for key in keys if hasattr(config, key)]
        for key in used:
            setattr(config, key, value)
        for step in steps:
            for key in keys & set(step.get("config", {})):
                step["config"][key] = value
                overrides.setdefault(step["registry_name"], {})[key] = value
                used.append(key)
        if not used:
            raise PolicyLoadError(f"{option} was given, but this {config.type} checkpoint reads no such tokenizer: "
                                  f"drop {option}.")
    return overrides


def _unavailable(name: str) -> str | None:
    """Why asset `name` (a folder or a hub id) cannot be had now, or None."""
    path = Path(name).expanduser()
    if path.is_dir():
        return None
    if path.exists() or name.startswith((".", "/", "~")) or not HUB_ID.fullmatch(name):
        return "there is no such folder" if not path.exists() else "it is a file, not a folder"
    from huggingface_hub import try_to_load_from_cache

    if any(isinstance(try_to_load_from_cache(name, file), str) for file in _CACHED_FILES):
        return None
    problem = _hub_problem()
    return f"it is not in the local Hugging Face cache, and {problem}" if problem else None


def check_assets(config, steps: list[dict]) -> None:
    """PolicyLoadError naming the first asset the checkpoint needs and cannot have, and the fix."""
    for name, key in _asset_names(config, steps).items():
        if (problem := _unavailable(name)) is None:
            continue
        why, option = ASSETS[key]
        pass_it = f" or pass the folder it prints with `{option} DIR`" if option else ""
        where = (f"`hf download {name}` on a machine that reaches the Hub (if the Hub says it is gated, accept "
                 f"its terms on its page and `hf auth login` first), then copy the Hugging Face cache here "
                 f"(~/.cache/huggingface, or HF_HOME){pass_it}" if HUB_ID.fullmatch(name)
                 else f"pass a folder that has it with `{option} DIR`" if option else "fix the path in its config.json")
        raise PolicyLoadError(f"The {config.type} checkpoint needs `{name}`, {why}, and {problem}: {where}.")


def reads_task(preprocessor) -> bool:
    """Whether the pre-processor reads the task (a language-conditioned policy)."""
    return any(hasattr(step, "task_key") or hasattr(step, "language_key") or "Tokenizer" in type(step).__name__
               for step in preprocessor.steps)


def choose_dtype(torch, device: str, name: str, log):
    """The torch dtype for --dtype `name` on `device`: PolicyLoadError where the GPU cannot run
    it; float32, logged, on a CPU without instructions for it (it would only run slower)."""
    dtype = getattr(torch, name)
    kind = torch.device(device).type
    if dtype is torch.float32:
        return dtype
    if kind == "cuda" and dtype is torch.bfloat16 and not torch.cuda.is_bf16_supported(including_emulation=False):
        major, minor = torch.cuda.get_device_capability(device)
        raise PolicyLoadError(
            f"--dtype bfloat16 needs a GPU of compute capability 8.0 or later; {torch.cuda.get_device_name(device)} "
            f"is {major}.{minor}: use --dtype float16."
        )
    if kind == "cpu" and (flags := _cpu_flags()) is not None:
        needed = {"bfloat16": ("avx512_bf16", "amx_bf16"), "float16": ("avx512_fp16", "amx_fp16")}[name]
        if not flags & set(needed):
            log.warning(f"this CPU has no {name} instructions ({' or '.join(needed)}): {name} would run slower "
                        "than float32, so the model runs in float32")
            return torch.float32
    return dtype


def _cpu_flags() -> set[str] | None:
    """The CPU's feature flags (Linux), None where unknown."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    line = next((line for line in text.splitlines() if line.startswith("flags")), "")
    return set(line.partition(":")[2].split())


def compiler_missing(device: str) -> str | None:
    """What torch.compile would need on `device` and this machine lacks, or None."""
    if device.startswith("cuda"):
        return None if importlib.util.find_spec("triton") else "triton (it comes with torch's CUDA wheels on Linux)"
    if device.startswith("cpu"):
        compilers = [os.environ["CXX"]] if os.environ.get("CXX") else ["g++", "c++", "clang++"]
        if not any(shutil.which(compiler) for compiler in compilers):
            return f"a C++ compiler ({' or '.join(compilers)}: install one, or set CXX)"
    return None


@contextlib.contextmanager
def config_errors(path_or_id: str, hub: bool, policy_type: str | None = None):
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
        raise PolicyLoadError(f"{needs} a library that is not installed: {one_line(exc)}.{hint}") from exc
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
                f"Cannot fetch `{path_or_id}` from the Hugging Face Hub: {one_line(exc)}. "
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
                f"The weights in `{path_or_id}` do not fit its config.json: {one_line(first[0] if first else exc)}."
            ) from exc
        if match := re.search(r"Policy type '([^']*)'.* is not registered", str(exc)):
            from lerobot.configs.policies import PreTrainedConfig

            raise PolicyLoadError(
                f"`{path_or_id}` is a `{match[1]}` policy, a type this lerobot does not know (it knows "
                f"{', '.join(sorted(PreTrainedConfig.get_known_choices()))})."
            ) from exc
        raise PolicyLoadError(
            f"Cannot load the LeRobot checkpoint `{path_or_id}`: {one_line(exc)}. Give {_CHECKPOINT}, or a hub id."
        ) from exc


