"""Scripted policies: deterministic trajectories, no model and no torch, for tests and benchmarks."""

from __future__ import annotations

import math
import random
import time
from urllib.parse import parse_qsl

import numpy as np

from ...bus.messages import ObservationRequest
from ...bus.records import Feature, ModelDescription
from . import BatchResult, Result


def camera_inputs(options: dict[str, str], spec: str) -> dict[str, Feature]:
    """The camera inputs `cameras=a,b&size=HxW` describe (RGB, as lerobot's VISUAL features)."""
    cameras = [c for c in options.get("cameras", "").split(",") if c]
    try:
        height, width = (int(v) for v in options.get("size", "224x224").split("x"))
    except ValueError:
        raise ValueError(f"{spec!r}: size is HEIGHTxWIDTH, e.g. 224x224") from None
    return {f"observation.images.{c}": Feature("VISUAL", [3, height, width]) for c in cameras}


class ScriptedPolicy:
    """A deterministic trajectory: a request made at tick k gets actions f(k), f(k+1), ...

    ``sine``: f(t)[j] = amplitude * sin(2*pi*t/period + j); ``constant``: f(t)[j] = value.
    Options as a query: ``scripted:sine?chunk=50&actions=6&period=90&amplitude=20``,
    ``delay=0.1`` (seconds per batch) or ``delay=0.05-0.3`` (uniform, seeded by ``seed``),
    ``cameras=front,wrist&size=224x224``: camera inputs it says it takes (and ignores), so a
    robot sends what a real policy of that input size would get.
    """

    KINDS = ("sine", "constant")

    def __init__(self, spec: str):
        kind, _, query = spec.removeprefix("scripted:").partition("?")
        if kind not in self.KINDS:
            raise ValueError(f"unknown scripted policy {kind!r}: choose one of {', '.join(self.KINDS)}")
        options = dict(parse_qsl(query, strict_parsing=bool(query)))
        known = {"chunk", "actions", "period", "amplitude", "value", "delay", "seed", "cameras", "size"}
        if unknown := set(options) - known:
            raise ValueError(
                f"unknown option(s) {', '.join(sorted(unknown))} for {spec!r}: known: {', '.join(sorted(known))}"
            )
        self.kind = kind
        self.name = f"scripted:{kind}"
        self.chunk = int(options.get("chunk", 50))
        self.action_size = int(options.get("actions", 6))
        self.period = float(options.get("period", 90))
        self.amplitude = float(options.get("amplitude", 20))
        self.value = float(options.get("value", 0))
        low, _, high = options.get("delay", "0").partition("-")
        self.delay = (float(low), float(high or low))
        self.random = random.Random(int(options.get("seed", 0)))
        self.inputs = camera_inputs(options, spec)

    def trajectory(self, ticks: np.ndarray) -> np.ndarray:
        """f at each tick: (len(ticks), action size) float32."""
        if self.kind == "constant":
            return np.full((len(ticks), self.action_size), self.value, np.float32)
        joints = np.arange(self.action_size)
        phase = 2 * math.pi * ticks[:, None] / self.period + joints[None, :]
        return (self.amplitude * np.sin(phase)).astype(np.float32)

    def describe(self) -> ModelDescription:
        return ModelDescription(type=self.name, name=self.name, inputs=self.inputs, action_size=self.action_size,
                                chunk_size=self.chunk, scripted=True)

    def run(self, requests: list[ObservationRequest]) -> BatchResult:
        start = time.perf_counter()
        low, high = self.delay
        if high > 0:
            time.sleep(self.random.uniform(low, high))
        results = [
            Result(self.trajectory(np.arange(r.tick, r.tick + self.chunk, dtype=np.float64)),
                   unguided="" if r.prefix is None else f"{self.name} cannot guide a chunk: prefix ignored")
            for r in requests
        ]
        return BatchResult(results, {"inference": time.perf_counter() - start})
