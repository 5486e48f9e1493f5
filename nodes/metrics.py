"""Figures over HTTP for Prometheus: the broker's (/metrics, /health) and, on the robot host,
the actuator's (`chunkbus actuator --metrics-port`).

The broker's collector reads the snapshot the broker loop publishes once per heartbeat, so
this thread never touches the broker's live state; the actuator's reads plain counters that
its loop only ever adds to. deploy/ (the KEDA ScaledObjects, the alerts, the Grafana
dashboard) reads these names: tests/test_deploy.py checks each against a running broker.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from ..bus.records import BrokerStatus, Histogram

Snapshot = Callable[[], BrokerStatus]


def add_histogram(family: HistogramMetricFamily, labels: list[str], histogram: Histogram) -> None:
    """Prometheus wants cumulative buckets ending in +Inf; the record keeps them per bucket."""
    cumulative, buckets = 0, []
    for bound, count in zip([*histogram.bounds, float("inf")], histogram.counts):
        cumulative += count
        buckets.append(("+Inf" if bound == float("inf") else repr(float(bound)), cumulative))
    family.add_metric(labels, buckets, histogram.total)


class BrokerCollector:
    def __init__(self, snapshot: Snapshot):
        self.snapshot = snapshot

    def collect(self):
        status = self.snapshot()
        gauges = {
            name: GaugeMetricFamily(f"chunkbus_{name}", text, labels=["service"])
            for name, text in [
                ("queued_requests", "Requests waiting in the service's queue"),
                ("running_requests", "Requests being run by the service's workers"),
                ("workers", "Workers serving the service"),
                ("capacity", "Requests the service's workers can hold at once"),
            ]
        }
        outcomes = CounterMetricFamily(
            "chunkbus_requests", "Requests answered, by outcome", labels=["service", "outcome"]
        )
        latency = GaugeMetricFamily(
            "chunkbus_latency_seconds",
            "Latency percentiles of recent requests: queue wait and service time",
            labels=["service", "stage", "quantile"],
        )
        queue_wait = HistogramMetricFamily(
            "chunkbus_queue_wait_seconds", "Seconds a request waited in the queue before a worker took it",
            labels=["service"])
        service_time = HistogramMetricFamily(
            "chunkbus_service_seconds", "Seconds from a request's dispatch to its worker's reply", labels=["service"])
        for service, figures in status.services.items():
            gauges["queued_requests"].add_metric([service], figures.queued)
            gauges["running_requests"].add_metric([service], figures.running)
            gauges["workers"].add_metric([service], figures.workers)
            gauges["capacity"].add_metric([service], figures.capacity)
            for outcome, count in figures.outcomes.items():
                outcomes.add_metric([service, outcome], count)
            for stage, percentiles in (("queue_wait", figures.queue_wait_ms), ("service", figures.service_ms)):
                for quantile, value in percentiles.items():
                    if quantile.startswith("p"):
                        latency.add_metric([service, stage, f"0.{quantile[1:]}"], value / 1000)
            add_histogram(queue_wait, [service], figures.queue_wait_histogram or Histogram.empty())
            add_histogram(service_time, [service], figures.service_histogram or Histogram.empty())
        counters = CounterMetricFamily(
            "chunkbus_broker_events", "Malformed messages dropped and late replies discarded",
            labels=["event"],
        )
        for name, count in status.counters.items():
            counters.add_metric([name], count)
        waiting = GaugeMetricFamily(
            "chunkbus_waiting_robots", "Clients asking for a service that has no worker (what wakes it from zero)",
            labels=["service"])
        for service, count in status.waiting.items():
            waiting.add_metric([service], count)
        uptime = GaugeMetricFamily("chunkbus_broker_uptime_seconds", "Seconds since start")
        uptime.add_metric([], status.uptime_s)
        yield from (*gauges.values(), outcomes, latency, queue_wait, service_time, waiting, counters, uptime)


# The actuator's counters (its `counts`) as Prometheus counters: name, help.
ACTUATOR_COUNTERS = {
    "commands": "Commands sent to the arm",
    "holds": "Ticks with no chunk action left: the last command was held",
    "requests": "Requests sent to the broker",
    "chunks_used": "Chunks merged into the schedule",
    "chunks_discarded": "Chunks that came too late, or answered a request given up on",
    "errors": "Requests answered with an error",
    "timeouts": "Requests with no answer within --request-timeout",
    "stale_obs": "Ticks without a fresh frame or state (no request is made from those)",
    "unreachable": "Requests that could not be sent: the broker was unreachable",
    "rtc_late": "Guided chunks that arrived later than they were guided for (rtc)",
}


class ActuatorCollector:
    """One robot's control loop: round trips, holds and the other counts of its stats line."""

    def __init__(self, actuator):
        self.actuator = actuator

    def collect(self):
        actuator = self.actuator
        names, labels = ["robot", "service"], [actuator.config.robot_id, actuator.config.service]
        counts = dict(actuator.counts)
        for key, text in ACTUATOR_COUNTERS.items():
            family = CounterMetricFamily(f"chunkbus_actuator_{key}", text, labels=names)
            family.add_metric(labels, counts.get(key, 0))
            yield family
        ticker = actuator.ticker
        for key, text, value in [("ticks", "Control ticks since the loop started", ticker.ticks if ticker else 0),
                                 ("late_ticks", "Ticks that woke more than 1 ms late", ticker.late if ticker else 0),
                                 ("skipped_ticks", "Ticks skipped after the loop overran whole periods",
                                  ticker.skipped if ticker else 0)]:
            family = CounterMetricFamily(f"chunkbus_actuator_{key}", text, labels=names)
            family.add_metric(labels, value)
            yield family
        round_trip = HistogramMetricFamily(
            "chunkbus_actuator_round_trip_seconds", "Seconds from a request's send to its chunk's arrival",
            labels=names)
        add_histogram(round_trip, labels, actuator.round_trip_histogram.copy())
        yield round_trip
        holding = GaugeMetricFamily("chunkbus_actuator_holding", "1 while the schedule has run dry", labels=names)
        holding.add_metric(labels, float(actuator.holding))
        yield holding
        delay = GaugeMetricFamily("chunkbus_actuator_expected_delay_ticks",
                                  "The round trip it plans for (p95 of recent ones), in ticks", labels=names)
        delay.add_metric(labels, actuator.expected_delay)
        yield delay


def serve_http(registry: CollectorRegistry, health: Callable[[], dict], port: int, host: str) -> ThreadingHTTPServer:
    """/metrics and /health in a daemon thread (port 0 picks a free one: see server_address)."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            path = self.path.split("?")[0]
            if path == "/metrics":
                body, kind = generate_latest(registry), CONTENT_TYPE_LATEST
            elif path == "/health":
                body, kind = json.dumps(health()).encode(), "application/json"
            else:
                self.send_error(404, "try /metrics or /health")
                return
            self.send_response(200)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):  # scrapes every few seconds would flood the log
            pass

    server = ThreadingHTTPServer((host, port), Handler)
    threading.Thread(target=server.serve_forever, name="chunkbus-metrics", daemon=True).start()
    return server


def start_metrics_server(snapshot: Snapshot, port: int, host: str = "0.0.0.0") -> tuple[str, int]:
    """The broker's /metrics and /health."""
    registry = CollectorRegistry()
    registry.register(BrokerCollector(snapshot))

    def health() -> dict:
        status = snapshot()
        return {"status": "ok", "uptime_s": status.uptime_s, "workers": len(status.workers),
                "services": sorted(status.services)}

    return serve_http(registry, health, port, host).server_address[:2]


def start_actuator_metrics(actuator, port: int, host: str = "127.0.0.1") -> ThreadingHTTPServer:
    """The actuator's /metrics and /health, on the robot host."""
    registry = CollectorRegistry()
    registry.register(ActuatorCollector(actuator))

    def health() -> dict:
        return {"status": "ok", "robot": actuator.config.robot_id, "service": actuator.config.service,
                "tick": actuator.tick, "holding": actuator.holding}

    return serve_http(registry, health, port, host)
