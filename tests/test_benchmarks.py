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


def test_bench_stitch_compares_every_strategy_on_the_same_chunks():
    figures = last_json_line("scripts/bench_stitch.py", "--ticks", "400")
    assert set(figures) == {"d0", "d3", "d6", "d10"}
    for row in figures.values():
        assert {"replace", "crossfade", "ensemble", "lerobot_latest_only", "lerobot_weighted_average"} <= set(row)
        # The same chunks and delays: LeRobot's latest_only is chunkbus's replace, figure for figure.
        assert row["replace"] == row["lerobot_latest_only"]
        assert row["crossfade"]["max_jump"] < row["replace"]["max_jump"]


def test_bench_roundtrip_runs_both_frameworks(tmp_path):
    figures = last_json_line("scripts/bench_roundtrip.py", "--quick", "--plot", str(tmp_path / "rt.png"))
    for case in ("overhead", "act"):
        assert figures[case]["ratio_p50"] == round(
            figures[case]["lerobot"]["p50_ms"] / figures[case]["chunkbus"]["p50_ms"], 2
        )
    assert figures["four_clients"]["chunkbus_rps"] > 0 and figures["four_clients"]["lerobot_rps"] > 0
    assert (tmp_path / "rt.png").stat().st_size > 10_000


def test_bench_page_renders_every_table():
    import sys

    sys.path.insert(0, str(REPO / "scripts"))
    from bench_page import page

    results = json.loads((REPO / "tests" / "data" / "benchmarks_sample.json").read_text())
    text = page(results)
    for heading in ("## Codec", "## Broker", "## Control-loop jitter", "## Round trip", "## Stitching"):
        assert heading in text
    assert "| chunkbus |" in text and "Four clients at once" in text and "**crossfade**" in text
