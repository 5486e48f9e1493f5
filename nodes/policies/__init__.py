"""What a worker serves: a policy that turns observation requests into action chunks.

This module is the interface (Policy, Result, BatchResult, BadRequest, PolicyLoadError)
and `load_policy`, which imports the one implementation a spec names:
`load_policy("scripted:sine")` gives a scripted policy (deterministic trajectories,
no torch) for tests and benchmarks (scripted.py); `flow:sine` a flow-matching policy with an
exact velocity field, for tests and benchmarks of real-time chunking (flow.py); `demo:act` an
untrained ACT with random weights for the demo (demo.py); anything else is a LeRobot checkpoint folder or hub id,
loaded by lerobot's own code (lerobot.py, its loading errors in lerobot_loading.py).
The implementations import this module; it imports none of them until load_policy runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from ...bus.messages import ObservationRequest
from ...bus.records import ModelDescription


class BadRequest(ValueError):
    """The request does not fit the model (missing camera, wrong state size, ...)."""


@dataclass
class Result:
    actions: np.ndarray | None = None  # (chunk, action size) float32
    error: BadRequest | None = None
    guided: tuple[int, int] | None = None  # (delay, horizon) it was guided with (real-time chunking)
    unguided: str = ""  # why the request's prefix was not used


@dataclass
class BatchResult:
    results: list[Result]
    timings: dict[str, float] = field(default_factory=dict)  # seconds, for the whole batch


class Policy(Protocol):
    name: str

    def describe(self) -> ModelDescription:
        """The model description a worker puts in its READY: type, inputs, action size, ..."""

    def run(self, requests: list[ObservationRequest]) -> BatchResult:
        """One action chunk (or a BadRequest) per request, computed as one batch."""


@dataclass
class LoadOptions:
    """How a worker loads and runs a LeRobot policy (`chunkbus worker` options)."""

    dtype: str = "float32"  # float32, bfloat16 or float16: the weights' and activations' type
    compile: bool = False  # torch.compile the model, warmed up before READY
    tokenizer: str | None = None  # a folder or hub id for the text tokenizer (SmolVLA: its VLM's folder)
    action_tokenizer: str | None = None  # π0-FAST's action tokenizer
    default_task: str = ""  # the task for warm-up, and for requests that carry none
    max_batch: int = 1  # the largest batch it will run: warmed up (and compiled) for it


DTYPES = ("float32", "bfloat16", "float16")


class PolicyLoadError(RuntimeError):
    """The policy cannot be loaded as configured (no such folder, not a checkpoint, a hub id
    that cannot be fetched, a missing lerobot extra): trying again cannot help. One line."""


def load_policy(spec: str, device: str = "cpu", options: LoadOptions | None = None) -> Policy:
    """The policy `spec` names; PolicyLoadError when the configuration is what is wrong."""
    if spec.startswith("scripted:"):
        from .scripted import ScriptedPolicy

        try:
            return ScriptedPolicy(spec)
        except ValueError as exc:
            raise PolicyLoadError(str(exc)) from exc
    if spec.startswith("flow:"):
        from .flow import FlowPolicy

        try:
            return FlowPolicy(spec)
        except ValueError as exc:
            raise PolicyLoadError(str(exc)) from exc
    from .lerobot import LerobotPolicy

    if spec.startswith("demo:"):
        from .demo import demo_checkpoint

        try:
            spec = demo_checkpoint(spec.removeprefix("demo:"))
        except ValueError as exc:
            raise PolicyLoadError(str(exc)) from exc
    return LerobotPolicy(spec, device, options or LoadOptions())
