"""Real-time chunking on the worker: a request's guidance, checked, and a batch grouped by it.

A request may carry a `prefix` (h rows: what the robot will command for ticks tick ..
tick + h - 1, in its raw action space) and an `expected_delay` d: rows 0 .. d - 1 run before
the reply can be merged, so the new chunk must agree with them (frozen), and rows d .. h - 1
are blended towards the prefix with weights falling to zero at h (the execution horizon).
One call of a policy's `predict_action_chunk` takes one delay and one horizon, so a batch runs
as one call per (d, h) group.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...bus.messages import ObservationRequest
from . import BadRequest


@dataclass(frozen=True)
class Guide:
    delay: int  # frozen rows
    horizon: int  # rows guided at all (the prefix's length)
    prefix: np.ndarray  # (horizon, action size) float32, raw robot actions


def guide_of(request: ObservationRequest, action_size: int, chunk_size: int) -> Guide | None:
    """The request's guidance, None when it asks for none; BadRequest naming the field that is wrong."""
    prefix, delay = request.prefix, request.expected_delay
    if prefix is None and delay is None:
        return None
    if prefix is None or delay is None:
        given, missing = ("expected_delay", "prefix") if prefix is None else ("prefix", "expected_delay")
        raise BadRequest(f"{given} was sent without {missing}: real-time chunking needs both (or neither)")
    if prefix.shape[1] != action_size:
        raise BadRequest(f"prefix: its rows have {prefix.shape[1]} values; the model's actions have {action_size}")
    if not np.isfinite(prefix).all():
        raise BadRequest("prefix: it has non-finite values (NaN or infinity)")
    if not 1 <= len(prefix) <= chunk_size:
        raise BadRequest(f"prefix: {len(prefix)} rows; the model's chunk has {chunk_size}, so 1 to {chunk_size}")
    if not 1 <= delay <= len(prefix):
        raise BadRequest(f"expected_delay: {delay} is outside 1..{len(prefix)} (the prefix's rows)")
    return Guide(delay, len(prefix), prefix.astype(np.float32))


def by_guidance(guides: list[Guide | None]) -> dict[tuple[int, int] | None, list[int]]:
    """The batch positions of each (delay, horizon) group, in order; None: not guided."""
    groups: dict[tuple[int, int] | None, list[int]] = {}
    for i, guide in enumerate(guides):
        groups.setdefault(None if guide is None else (guide.delay, guide.horizon), []).append(i)
    return groups
