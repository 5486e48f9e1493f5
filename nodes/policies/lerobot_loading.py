"""Loading a LeRobot checkpoint: what goes wrong is the configuration's fault, said in one line.

`locate` finds the checkpoint (a folder, or a hub id it can fetch or has cached) and fails
fast offline; `check_device` checks the torch device; `config_errors` turns what a wrong
checkpoint or a missing lerobot extra raises while loading into PolicyLoadError;
`prints_logged` routes what lerobot print()s while loading to the node's log. huggingface_hub,
lerobot and their dependencies are imported only when called.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import sys
from pathlib import Path

from ...bus.log import get_logger
from . import PolicyLoadError

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


