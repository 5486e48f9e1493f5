#!/usr/bin/env python3
"""Health checks for the chunkbus images (Docker HEALTHCHECK, Kubernetes probes); exit 0 when
healthy, 1 with the reason otherwise. Only the standard library: it runs every few seconds.

  chunkbus-healthcheck broker [--port 9100]          the broker's /health answers
  chunkbus-healthcheck worker [--backend-port 5556]  this container's worker has registered

A worker connects to the broker's backend only once its policy has loaded and warmed up, and
registers (READY) as it connects, so an established TCP connection to the backend port from this
network namespace (a container's, a pod's) is its registration: before it (loading, downloading)
or after the broker went away, the check fails. `chunkbus ping` checks a service end to end.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.request

ESTABLISHED = "01"  # the st column of /proc/net/tcp


def broker_healthy(port: int) -> str | None:
    """None when the broker's /health says ok, else why not."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=3) as answer:
            health = json.load(answer)
    except (OSError, ValueError) as exc:
        return f"no answer from the broker's /health on port {port}: {exc}"
    return None if health.get("status") == "ok" else f"the broker's /health says {health}"


def connected_to(port: int, tables: tuple[str, ...] = ("/proc/net/tcp", "/proc/net/tcp6")) -> bool:
    """Whether a TCP connection to remote `port` is established in this network namespace."""
    for table in tables:
        try:
            with open(table) as rows:
                next(rows)  # the header
                for row in rows:
                    fields = row.split()
                    if fields[3] == ESTABLISHED and int(fields[2].rsplit(":", 1)[1], 16) == port:
                        return True
        except FileNotFoundError:  # no IPv6 in this namespace
            continue
    return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="chunkbus-healthcheck", description=__doc__.split("\n\n")[0])
    checks = parser.add_subparsers(dest="check", required=True)
    broker = checks.add_parser("broker", help="the broker's /health answers")
    broker.add_argument("--port", type=int, default=int(os.environ.get("CHUNKBUS_METRICS_PORT", 9100)))
    worker = checks.add_parser("worker", help="this container's worker has registered with the broker")
    worker.add_argument("--backend-port", type=int, default=int(os.environ.get("CHUNKBUS_BACKEND_PORT", 5556)))
    args = parser.parse_args(argv)
    if args.check == "broker":
        problem = broker_healthy(args.port)
    else:
        problem = None if connected_to(args.backend_port) else (
            f"not registered: no connection to the broker's backend (port {args.backend_port}) yet; the worker "
            "connects once its policy has loaded")
    if problem:
        print(problem, file=sys.stderr)
        return 1
    print("healthy")
    return 0


if __name__ == "__main__":
    sys.exit(main())
