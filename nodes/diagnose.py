"""`chunkbus status` and `chunkbus ping`: what a user runs first against a deployment."""

from __future__ import annotations

import time

import click
import numpy as np

from ..bus.client import BrokerClient, BrokerRefused, BrokerUnavailable, RequestFailed, new_request_id
from ..bus.messages import Observation, ObservationRequest
from ..bus.records import BrokerStatus, ModelDescription, ServiceStatus
from ..bus.security import ClientKeys


def query_status(broker: str, timeout: float, keys: ClientKeys | None = None) -> BrokerStatus:
    with BrokerClient(broker, connect_timeout=timeout, keys=keys) as client:
        try:
            return client.status(timeout)
        except BrokerRefused as exc:
            raise click.ClickException(str(exc)) from None
        except (TimeoutError, BrokerUnavailable):
            raise click.ClickException(
                f"no broker answered at {broker} within {timeout:.0f} s: is `chunkbus broker` "
                "running there, and can this host reach its frontend port (5555 by default)?"
            ) from None


def _ms(figures: dict, key: str) -> str:
    return f"{figures[key]:.1f}" if key in figures else "-"


def describe_model(model: ModelDescription | None) -> str:
    """One line about a served model: its name, and what a robot needs to know about it."""
    if model is None:
        return "? (a plain MDP worker describes no model)"
    details = [f"chunk {model.chunk_size}", f"{model.action_size} actions", model.device or "?"]
    details += [d for d in (model.dtype, "compiled" if model.compiled else "",
                            "needs a task" if model.needs_task else "", "rtc" if model.rtc else "") if d]
    return f"{model.name} ({', '.join(details)})"


def format_status(status: BrokerStatus) -> str:
    lines = [f"broker up {status.uptime_s:.0f} s, frontend {status.frontend}, backend {status.backend}"]
    header = (f"{'service':24} {'workers':>7} {'capacity':>8} {'queued':>6} {'running':>7} {'ok':>7} {'errors':>6} "
              f"{'wait p50/p99 ms':>16} {'service p50/p99 ms':>19}")
    lines += ["", header, "-" * len(header)]
    for name, s in sorted(status.services.items()):
        errors = sum(count for outcome, count in s.outcomes.items() if outcome != "ok")
        wait, serve = s.queue_wait_ms, s.service_ms
        lines.append(
            f"{name:24} {s.workers:>7} {s.capacity:>8} {s.queued:>6} {s.running:>7} "
            f"{s.outcomes.get('ok', 0):>7} {errors:>6} "
            f"{_ms(wait, 'p50') + '/' + _ms(wait, 'p99'):>16} {_ms(serve, 'p50') + '/' + _ms(serve, 'p99'):>19}"
        )
    if not status.services:
        lines.append("(no services: no worker has registered yet)")
    else:
        lines += ["", f"{'service':24} model"]
        lines += [f"{name:24} {describe_model(s.model)}" for name, s in sorted(status.services.items())]
    lines += ["", f"{'worker':32} {'service':24} {'capacity':>8} {'running':>7}"]
    for w in status.workers:
        lines.append(f"{w.name:32} {w.service:24} {w.capacity:>8} {w.running:>7}")
    if any(status.counters.values()):
        lines += ["", "events: " + ", ".join(f"{k} {v}" for k, v in status.counters.items())]
    return "\n".join(lines)


def synthetic_request(model: ModelDescription | None, robot_id: str, tick: int) -> ObservationRequest:
    """An observation shaped as the model's description says (zeros and a grey image); for a
    plain MDP worker, which describes no model, an empty one."""
    images, state = {}, np.zeros(0, np.float32)
    for key, feature in (model.inputs if model else {}).items():
        if feature.type == "VISUAL":
            channels, height, width = feature.shape
            images[key] = np.full((height, width, channels), 128, np.uint8)
        elif feature.type == "STATE":
            state = np.zeros(feature.shape, np.float32)
    now = time.monotonic()
    history = [
        Observation(tick=tick - steps, time=now, state=state, images=images)
        for steps in reversed(range(model.n_obs_steps if model else 1))
    ]
    return ObservationRequest(
        robot_id=robot_id,
        request_id=new_request_id(robot_id),
        tick=tick,
        fps=float(model.fps or 30.0) if model else 30.0,
        send_time=now,
        task="chunkbus ping",
        observations=history,
    )


def pick_service(broker: str, known: dict[str, ServiceStatus]) -> str:
    """The broker's only service; a ClickException naming them when there are none or several."""
    if len(known) == 1:
        return next(iter(known))
    if not known:
        raise click.ClickException(
            f"The broker at {broker} has no services yet: start a worker (`chunkbus worker --policy ...`), "
            "then ping again."
        )
    raise click.ClickException(
        f"The broker at {broker} has {len(known)} services ({', '.join(sorted(known))}): "
        "pass `--service NAME` to say which to ping."
    )


def ping(broker: str, service: str | None, count: int, timeout: float, keys: ClientKeys | None = None) -> None:
    """Ping `service`, or the broker's only service when `service` is None. With CURVE keys, the
    requests carry the key's name as their robot id (the broker requires it)."""
    status = query_status(broker, min(timeout, 5.0), keys)
    known = status.services
    if service is None:
        service = pick_service(broker, known)
    if service not in known:
        names = ", ".join(sorted(known)) or "none"
        raise click.ClickException(
            f"the broker at {broker} has no service {service!r} (services: {names}); "
            f"start a worker with `chunkbus worker --service {service} ...`"
        )
    if known[service].workers == 0:
        raise click.ClickException(
            f"service {service!r} is known, but no worker is up: check the workers' logs"
        )
    model = known[service].model
    click.echo(f"service {service}: model {describe_model(model)}, {known[service].workers} worker(s)")
    latencies, shape = [], None
    with BrokerClient(broker, keys=keys) as client:
        for tick in range(count):
            request = synthetic_request(model, keys.own.name if keys else "ping", tick)
            start = time.perf_counter()
            try:
                chunk = client.request(service, request, timeout)
            except RequestFailed as exc:
                raise click.ClickException(f"the worker answered with an error: {exc}") from None
            except TimeoutError:
                raise click.ClickException(
                    f"no answer within {timeout:.0f} s: the worker may still be warming up, or stuck "
                    f"(see `chunkbus status --broker {broker}`)"
                ) from None
            latencies.append((time.perf_counter() - start) * 1000)
            shape = chunk.actions.shape
    p50, p95, p99 = np.percentile(latencies, [50, 95, 99])
    click.echo(f"chunk shape {shape[0]} actions x {shape[1]} values")
    click.echo(
        f"round trip over {count}: p50 {p50:.1f} ms, p95 {p95:.1f} ms, p99 {p99:.1f} ms, max {max(latencies):.1f} ms"
    )
