"""Records that travel inside other frames: the model a worker serves (in its READY, and
from the broker's mmi.model) and the broker's status (mmi.status, /metrics).

Like the messages, they are checked field by field on the way out (to_wire) and on the
way in (from_wire), so every reader can rely on the keys and types written here.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import ClassVar

from .messages import NAME
from .schema import (
    Record,
    boolean,
    dict_of,
    integer,
    list_of,
    number,
    optional,
    record,
    text,
)


@dataclass(eq=False)
class Feature(Record):
    """One input of a policy, as lerobot describes it: VISUAL (C, H, W), STATE (n,), ..."""

    type: str
    shape: list[int]
    SCHEMA: ClassVar = {"type": text(NAME), "shape": list_of(integer(0), max_items=8)}


@dataclass(eq=False)
class RtcSupport(Record):
    """How a worker guides chunks towards a request's prefix (real-time chunking)."""

    schedule: str  # the prefix weights past the frozen rows: LINEAR, EXP, ONES, ZEROS (lerobot's)
    max_guidance_weight: float
    flow_steps: int  # the checkpoint's own number of denoising steps
    SCHEMA: ClassVar = {"schedule": text(NAME), "max_guidance_weight": number(minimum=0.0),
                        "flow_steps": integer(1)}


@dataclass(eq=False)
class ModelDescription(Record):
    """What a worker serves, in the robot's terms: what to send it and what comes back."""

    type: str  # the policy type: act, diffusion, ..., or scripted:sine
    name: str  # this policy, e.g. act:my_checkpoint; it names every chunk it answers
    inputs: dict[str, Feature]  # feature key (observation.images.front, ...) -> feature
    action_size: int
    chunk_size: int
    n_obs_steps: int = 1  # observations per request, newest last
    fps: float | None = None  # the rate it was trained at, where known
    device: str = ""
    scripted: bool = False  # a deterministic trajectory for tests, not a model
    needs_task: bool = False  # language-conditioned: every request must say its task
    dtype: str = ""  # the weights' type on the worker: float32, bfloat16, float16
    compiled: bool = False  # run through torch.compile
    rtc: RtcSupport | None = None  # None: it cannot guide a chunk towards a prefix
    SCHEMA: ClassVar = {
        "type": text(NAME),
        "name": text(),
        "inputs": dict_of(record(Feature), max_items=64),
        "action_size": integer(1),
        "chunk_size": integer(1),
        "n_obs_steps": integer(1),
        "fps": optional(number(minimum=0.0)),
        "device": text(),
        "scripted": boolean(),
        "needs_task": boolean(),
        "dtype": text(),
        "compiled": boolean(),
        "rtc": optional(record(RtcSupport)),
    }

    def camera_inputs(self) -> list[str]:
        return [key for key, feature in self.inputs.items() if feature.type == "VISUAL"]

    def state_size(self) -> int | None:
        return next((f.shape[0] for f in self.inputs.values() if f.type == "STATE" and f.shape), None)


# Upper bounds (seconds) of the latency histograms' buckets: from a scripted policy's
# millisecond to a vision-language model's seconds (queue waits end at a request's ttl).
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass(eq=False)
class Histogram(Record):
    """Every latency since start, by bucket: `counts[i]` were at most `bounds[i]` seconds (and
    above the bound before); the last count is past every bound. What Prometheus histograms are
    made of, so that dashboards can aggregate over brokers and over time."""

    bounds: list[float]
    counts: list[int]
    total: float  # seconds, summed over every latency counted
    SCHEMA: ClassVar = {"bounds": list_of(number(minimum=0.0), max_items=64),
                        "counts": list_of(integer(0), max_items=65), "total": number(minimum=0.0)}

    @classmethod
    def empty(cls, bounds: tuple[float, ...] = LATENCY_BUCKETS) -> Histogram:
        return cls(list(bounds), [0] * (len(bounds) + 1), 0.0)

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, seconds)] += 1
        self.total += seconds

    def copy(self) -> Histogram:
        return Histogram(list(self.bounds), list(self.counts), self.total)


@dataclass(eq=False)
class ServiceStatus(Record):
    workers: int
    capacity: int  # requests its workers may hold at once
    queued: int
    running: int
    outcomes: dict[str, int]  # answers given so far, by code: ok, expired, failed, ...
    queue_wait_ms: dict[str, float]  # percentiles of recent requests: p50, p95, p99, n
    service_ms: dict[str, float]
    model: ModelDescription | None = None  # of its newest worker
    queue_wait_histogram: Histogram | None = None  # since start: what /metrics exports
    service_histogram: Histogram | None = None
    SCHEMA: ClassVar = {
        "workers": integer(0),
        "capacity": integer(0),
        "queued": integer(0),
        "running": integer(0),
        "outcomes": dict_of(integer(0)),
        "queue_wait_ms": dict_of(number()),
        "service_ms": dict_of(number()),
        "model": optional(record(ModelDescription)),
        "queue_wait_histogram": optional(record(Histogram)),
        "service_histogram": optional(record(Histogram)),
    }


@dataclass(eq=False)
class WorkerStatus(Record):
    name: str
    service: str
    capacity: int
    running: int
    idle_s: float | None = None  # since its last request; None before the first
    SCHEMA: ClassVar = {
        "name": text(),
        "service": text(),
        "capacity": integer(0),
        "running": integer(0),
        "idle_s": optional(number()),
    }


@dataclass(eq=False)
class BrokerStatus(Record):
    """What `chunkbus status` prints and /metrics exports."""

    uptime_s: float
    frontend: str
    backend: str
    services: dict[str, ServiceStatus] = field(default_factory=dict)
    workers: list[WorkerStatus] = field(default_factory=list)
    counters: dict[str, int] = field(default_factory=dict)  # malformed messages, late replies
    # Per service without a worker: the clients that asked for it (mmi.model, mmi.service) lately,
    # robots waiting for a worker to start (what scales a service up from zero).
    waiting: dict[str, int] = field(default_factory=dict)
    SCHEMA: ClassVar = {
        "uptime_s": number(),
        "frontend": text(),
        "backend": text(),
        "services": dict_of(record(ServiceStatus), max_items=1024),
        "workers": list_of(record(WorkerStatus), max_items=4096),
        "counters": dict_of(integer(0)),
        "waiting": dict_of(integer(0), max_items=1024),
    }
