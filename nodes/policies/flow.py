"""A flow-matching policy with an exact velocity field: real-time chunking without a model.

For tests and benchmarks of guided chunks (no transformers, no weights). A request made at
tick k gets a sample of a Gaussian mixture over whole chunks: mode m (equal weights) has mean
mu_m[i, j] = r(k + i)[j] + spread * (m - (modes - 1) / 2), r being scripted:sine's trajectory
amplitude * sin(2*pi*t/period + j), and isotropic std sigma (raw units). Sampling runs in a model
space, model = (raw - center) / scale, like a checkpoint's normaliser, in lerobot's convention:
x_t = t * noise + (1 - t) * A, t from 1 (noise) to 0 (actions), Euler steps of dt = -1/steps with
lerobot's own euler_integrate and RTCProcessor (guidance towards a request's prefix). The velocity
is exact, v(x_t, t) = (x_t - E[A | x_t]) / t, so RTC's x1 = x_t - t * v is the posterior mean:
with s = sigma / scale and var_t = (1 - t)^2 s^2 + t^2, mode m's posterior weight is
softmax_m(-|x_t - (1 - t) mu_m|^2 / (2 var_t)) over the whole chunk (a mode is a trajectory) and
its posterior mean mu_m + (1 - t) s^2 / var_t * (x_t - (1 - t) mu_m). ``offset`` (raw std, default
0) adds a chunk-wide offset per joint to each mode, so that chunks disagree smoothly as a real
policy's do: along those directions (each joint's row mean) s^2 becomes s^2 + chunk * c^2.

``flow:sine?chunk=50&actions=6&modes=1&spread=12&sigma=0.3&offset=0&steps=10&period=90
&amplitude=20&center=0&scale=20&schedule=LINEAR&max_guidance=10&delay=0&seed=0``; ``delay`` is
seconds per batch, ``0.05-0.2`` uniform (seeded). The noise is seeded by (seed, the request's tick):
the same request gives the same chunk alone or batched, and requests at the same tick share noise.
"""

from __future__ import annotations

import math
import random
import time
from urllib.parse import parse_qsl

import numpy as np
import torch

from ...bus.messages import ObservationRequest
from ...bus.records import ModelDescription, RtcSupport
from . import BadRequest, BatchResult, Result
from .guidance import Guide, by_guidance, guide_of
from .scripted import camera_inputs

DEFAULTS = {"chunk": "50", "actions": "6", "modes": "1", "spread": "12", "sigma": "0.3", "offset": "0",
            "steps": "10", "period": "90", "amplitude": "20", "center": "0", "scale": "20", "schedule": "LINEAR",
            "max_guidance": "10", "delay": "0", "seed": "0", "cameras": "", "size": "224x224"}


class FlowPolicy:
    KINDS = ("sine",)

    def __init__(self, spec: str):
        from lerobot.configs import RTCAttentionSchedule
        from lerobot.policies.rtc.configuration_rtc import RTCConfig
        from lerobot.policies.rtc.modeling_rtc import RTCProcessor

        kind, _, query = spec.removeprefix("flow:").partition("?")
        if kind not in self.KINDS:
            raise ValueError(f"unknown flow policy {kind!r}: choose one of {', '.join(self.KINDS)}")
        given = dict(parse_qsl(query, strict_parsing=bool(query)))
        if unknown := set(given) - set(DEFAULTS):
            raise ValueError(
                f"unknown option(s) {', '.join(sorted(unknown))} for {spec!r}: known: {', '.join(sorted(DEFAULTS))}"
            )
        o = DEFAULTS | given
        self.name = f"flow:{kind}"
        self.chunk, self.action_size, self.modes = int(o["chunk"]), int(o["actions"]), int(o["modes"])
        self.spread, self.sigma, self.steps = float(o["spread"]), float(o["sigma"]), int(o["steps"])
        self.offset = float(o["offset"])
        self.period, self.amplitude = float(o["period"]), float(o["amplitude"])
        self.center, self.scale = float(o["center"]), float(o["scale"])
        self.max_guidance, self.seed = float(o["max_guidance"]), int(o["seed"])
        if min(self.chunk, self.action_size, self.modes, self.steps) < 1 or self.sigma <= 0 or self.scale <= 0:
            raise ValueError(f"{spec!r}: chunk, actions, modes and steps must be >= 1, sigma and scale > 0")
        try:
            self.schedule = RTCAttentionSchedule(o["schedule"].upper())
        except ValueError:
            raise ValueError(f"unknown schedule {o['schedule']!r}: choose one of "
                             f"{', '.join(s.value for s in RTCAttentionSchedule)}") from None
        low, _, high = o["delay"].partition("-")
        self.delay = (float(low), float(high or low))
        self.random = random.Random(self.seed)
        self.inputs = camera_inputs(o, spec)  # cameras it says it takes (and ignores), as scripted:
        self.rtc = RTCProcessor(RTCConfig(enabled=True, prefix_attention_schedule=self.schedule,
                                          max_guidance_weight=self.max_guidance))

    def describe(self) -> ModelDescription:
        return ModelDescription(type=self.name, name=self.name, inputs=self.inputs, action_size=self.action_size,
                                chunk_size=self.chunk, scripted=True,
                                rtc=RtcSupport(self.schedule.value, self.max_guidance, flow_steps=self.steps))

    def means(self, tick: int, length: int | None = None) -> np.ndarray:
        """The modes' mean chunks for a request at `tick`, raw units: (modes, chunk or length, actions) float64."""
        t = np.arange(tick, tick + (length or self.chunk), dtype=np.float64)[:, None]
        r = self.amplitude * np.sin(2 * math.pi * t / self.period + np.arange(self.action_size)[None, :])
        offsets = self.spread * (np.arange(self.modes) - (self.modes - 1) / 2)
        return r[None] + offsets[:, None, None]

    def noise(self, tick: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed((self.seed * 1_000_003 + tick) % 2**63)
        return torch.randn(self.chunk, self.action_size, generator=generator)

    def velocity(self, mu: torch.Tensor):
        """The exact velocity field for means `mu` (B, modes, chunk, actions), in model space."""
        s2, c2, n = (self.sigma / self.scale) ** 2, (self.offset / self.scale) ** 2, self.chunk

        def v(x: torch.Tensor, time_: torch.Tensor) -> torch.Tensor:
            t = time_.to(x.dtype).view(-1, 1, 1, 1)
            var = (1 - t) ** 2 * s2 + t**2  # x_t's variance about (1 - t) mu_m; along the chunk-wide offsets:
            var_along = (1 - t) ** 2 * (s2 + n * c2) + t**2
            d = x[:, None] - (1 - t) * mu  # (B, modes, chunk, actions)
            along = d.mean(2, keepdim=True).expand_as(d)  # its part along the offsets (each joint's row mean)
            across = d - along
            logits = -(across**2).sum((2, 3)) / (2 * var.view(-1, 1)) - (along**2).sum((2, 3)) / (
                2 * var_along.view(-1, 1))
            weights = torch.softmax(logits, dim=1)  # exp(logits - logsumexp(logits)), per whole chunk
            posterior = mu + (1 - t) * (s2 / var * across + (s2 + n * c2) / var_along * along)
            expected = (weights[:, :, None, None] * posterior).sum(1)
            return (x - expected) / t[:, 0]

        return v

    def sample(self, ticks: list[int], guides: list[Guide] | None) -> np.ndarray:
        """Raw (B, chunk, actions) float32 chunks for requests at `ticks`, guided by `guides`
        (all of one delay and horizon) when given."""
        from lerobot.policies.common.flow_matching import euler_integrate

        mu = torch.from_numpy((np.stack([self.means(k) for k in ticks]) - self.center) / self.scale).float()
        noise = torch.stack([self.noise(k) for k in ticks])
        guidance = {}
        if guides:
            prefix = (np.stack([g.prefix for g in guides]).astype(np.float64) - self.center) / self.scale
            guidance = {"rtc_processor": self.rtc, "rtc_enabled": True, "inference_delay": guides[0].delay,
                        "execution_horizon": guides[0].horizon,
                        "prev_chunk_left_over": torch.from_numpy(prefix).float()}
        with torch.no_grad():  # not inference_mode: RTC's guidance takes a gradient
            x = euler_integrate(self.velocity(mu), noise, self.steps, **guidance)
        return (x.double().numpy() * self.scale + self.center).astype(np.float32)

    def run(self, requests: list[ObservationRequest]) -> BatchResult:
        start = time.perf_counter()
        low, high = self.delay
        if high > 0:
            time.sleep(self.random.uniform(low, high))
        results = [Result() for _ in requests]
        members, guides = [], []
        for i, request in enumerate(requests):
            try:
                guides.append(guide_of(request, self.action_size, self.chunk))
                members.append(i)
            except BadRequest as exc:
                results[i].error = exc
        for key, positions in by_guidance(guides).items():
            group = [guides[p] for p in positions] if key else None
            chunks = self.sample([requests[members[p]].tick for p in positions], group)
            for p, chunk in zip(positions, chunks):
                results[members[p]].actions = chunk
                results[members[p]].guided = key
        return BatchResult(results, {"inference": time.perf_counter() - start})
