"""The broker's figures over HTTP: /metrics for Prometheus, /health for load balancers.

Both read the snapshot the broker loop publishes once per heartbeat, so this thread
never touches the broker's live state.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from ..bus.records import BrokerStatus

Snapshot = Callable[[], BrokerStatus]


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
        counters = CounterMetricFamily(
            "chunkbus_broker_events", "Malformed messages dropped and late replies discarded",
            labels=["event"],
        )
        for name, count in status.counters.items():
            counters.add_metric([name], count)
        uptime = GaugeMetricFamily("chunkbus_broker_uptime_seconds", "Seconds since start")
        uptime.add_metric([], status.uptime_s)
        yield from (*gauges.values(), outcomes, latency, counters, uptime)


def start_metrics_server(snapshot: Snapshot, port: int, host: str = "0.0.0.0") -> tuple[str, int]:
    """Serve in a daemon thread; returns the bound (host, port) (port 0 picks a free one)."""
    registry = CollectorRegistry()
    registry.register(BrokerCollector(snapshot))

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path.split("?")[0] == "/metrics":
                body, kind = generate_latest(registry), CONTENT_TYPE_LATEST
            elif self.path.split("?")[0] == "/health":
                status = snapshot()
                body = json.dumps(
                    {
                        "status": "ok",
                        "uptime_s": status.uptime_s,
                        "workers": len(status.workers),
                        "services": sorted(status.services),
                    }
                ).encode()
                kind = "application/json"
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
    return server.server_address[:2]
