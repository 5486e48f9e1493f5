"""The benchmark scripts run and end with one JSON line of their figures.

These check that the scripts work and report what they promise, not how fast
anything is: speed is measured by running the scripts themselves (see README).
"""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import REPO


def last_json_line(*args: str) -> dict:
    result = subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, timeout=300, cwd=REPO
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_bench_codec_reports_every_figure():
    figures = last_json_line("scripts/bench_codec.py", "--iterations", "3", "--rounds", "2")
    for key in ("chunkbus_us", "pickle_us", "msgpack_numpy_us", "memcpy_us"):
        assert figures[key] > 0
    assert figures["speedup_vs_pickle"] == figures["pickle_us"] / figures["chunkbus_us"]
    assert figures["ratio_to_memcpy"] == figures["chunkbus_us"] / figures["memcpy_us"]
    assert figures["payload_bytes"] == 2 * 480 * 640 * 3 + 6 * 4


def test_bench_broker_reports_every_figure():
    figures = last_json_line("scripts/bench_broker.py", "--seconds", "0.5", "--count", "50")
    for key in ("req_per_s", "p50_us", "p99_us", "high_priority_p99_us", "low_priority_p99_us"):
        assert key in figures
    assert figures["req_per_s"] > 0 and figures["high_priority_requests"] > 0


def test_bench_jitter_reports_both_rates():
    figures = last_json_line("scripts/bench_jitter.py", "--seconds", "1.5")
    for rate in ("hz30", "hz100"):
        assert set(figures[rate]) >= {"p50_us", "p99_us", "max_us", "late_ticks"}
        assert figures[rate]["ticks"] > 0
