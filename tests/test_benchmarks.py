"""The benchmark scripts run and end with one JSON line of their figures.

These check that the scripts work and report what they promise, not how fast
anything is: speed is measured by running the scripts themselves (see README).
"""

from __future__ import annotations

import json
import math
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
    for case in (figures, figures["batching"]):
        # the scripted workers' 20 ms, and a wait that excludes it
        assert 20_000 <= case["service_time_us"] < case["high_priority_p99_us"]
        assert case["high_priority_wait_p99_us"] < case["high_priority_p99_us"]


def test_bench_jitter_reports_both_rates_and_the_lerobot_paced_loop():
    figures = last_json_line("scripts/bench_jitter.py", "--seconds", "1", "--warmup", "0.5")
    keys = {"p50_us", "p99_us", "max_us", "late_ticks", "ticks", "warmup_max_us"}
    loops = {"actuator": figures, "realtime": figures["realtime"], "lerobot": figures["lerobot_loop"]}
    for loop, rates in loops.items():
        for fps in (30, 100):
            row = rates[f"hz{fps}"]
            assert set(row) >= keys, loop
            # Every tick of the measured second counts, the half second of warm-up does not.
            assert 0.5 * fps <= row["ticks"] <= 1.1 * fps, (loop, row)
            assert 0 <= row["p50_us"] <= row["p99_us"] <= row["max_us"] and 0 <= row["late_ticks"] <= row["ticks"]
    assert isinstance(figures["realtime"]["permitted"], bool)
    assert all(figures["lerobot_loop"][f"hz{fps}"]["rate_hz"] > 0 for fps in (30, 100))


def test_bench_stitch_compares_every_strategy_on_the_same_chunks():
    figures = last_json_line("scripts/bench_stitch.py", "--ticks", "300", "--delays", "0,3,6")
    assert set(figures) == {"unimodal", "bimodal"}
    keys = {"max_jump", "mean_jump", "rms_jerk", "max_accel", "rms_error", "mode_switches", "late_switches",
            "blended_ticks"}
    strategies = {"rtc", "replace", "crossfade", "ensemble", "lerobot_latest_only", "lerobot_weighted_average",
                  "lerobot_average", "lerobot_conservative"}
    for case in figures.values():
        assert set(case) == {"d0", "d3", "d6"}
        for row in case.values():
            assert set(row) == strategies
            for values in row.values():
                assert set(values) == keys
                assert all(math.isfinite(v) and v >= 0 for v in values.values())
            # The same chunks and delays: LeRobot's latest_only is chunkbus's replace, figure for figure.
            assert row["replace"] == row["lerobot_latest_only"]
            assert row["crossfade"]["max_jump"] < row["replace"]["max_jump"]
            assert row["rtc"]["late_switches"] == 0  # no jitter: every rtc chunk arrives when it was guided for
    for delay in ("d3", "d6"):  # two modes: rtc keeps to one, replace switches between them
        bimodal = figures["bimodal"][delay]
        assert bimodal["rtc"]["max_jump"] < bimodal["replace"]["max_jump"] / 4 and bimodal["rtc"]["mode_switches"] == 0


def test_bench_roundtrip_runs_both_frameworks(tmp_path):
    figures = last_json_line("scripts/bench_roundtrip.py", "--quick", "--plot", str(tmp_path / "rt.png"))
    for case in ("overhead", "act"):
        assert figures[case]["ratio_p50"] == round(
            figures[case]["lerobot"]["p50_ms"] / figures[case]["chunkbus"]["p50_ms"], 2
        )
    assert figures["four_clients"]["chunkbus_rps"] > 0 and figures["four_clients"]["lerobot_rps"] > 0
    rtc = figures["rtc"]
    assert rtc["guided"]["inference_p50_ms"] > 0 and rtc["unguided"]["inference_p50_ms"] > 0
    assert rtc["extra_inference_p50_ms"] == round(rtc["guided"]["inference_p50_ms"]
                                                  - rtc["unguided"]["inference_p50_ms"], 3)
    curve = figures["curve"]
    assert curve["curve"]["p50_ms"] > 0 and curve["extra_p50_ms"] == round(curve["curve"]["p50_ms"]
                                                                           - curve["plain"]["p50_ms"], 3)
    ipc = figures["ipc"]
    assert ipc["ipc"]["p50_ms"] > 0 and ipc["saved_p50_ms"] == round(ipc["tcp"]["p50_ms"] - ipc["ipc"]["p50_ms"], 3)
    stages = figures["overhead"]["chunkbus_worker_ms"]
    assert set(stages) == {"decode", "prepare", "preprocess", "inference", "postprocess"}
    assert all(ms > 0 for ms in stages.values())
    assert (tmp_path / "rt.png").stat().st_size > 10_000


def test_bench_page_renders_every_table():
    import sys

    sys.path.insert(0, str(REPO / "scripts"))
    from bench_page import page

    results = json.loads((REPO / "tests" / "data" / "benchmarks_sample.json").read_text())
    text = page(results)
    for heading in ("## Codec", "## Broker", "## A fleet", "## Control-loop jitter", "## Round trip", "## Stitching"):
        assert heading in text
    assert "| actuator --realtime | 100 Hz |" in text and "| lerobot-paced loop | 30 Hz |" in text
    assert "| 100 | 100 | 184 |" in text and "within 3x of a zmq.proxy's | yes |" in text
    assert "| chunkbus |" in text and "Four clients at once" in text and "| rtc | **" in text


def test_bench_models_reports_every_figure():
    figures = last_json_line("scripts/bench_models.py", "--types", "act,smolvla,pi0_fast", "--calls", "2",
                             "--warmup", "1", "--batches", "1,2", "--device", "cpu")
    assert figures["device"] == "cpu" and figures["seed_fps"] == {"pi0_fast": 15, "smolvla": 25, "act": 50}
    measured = {(row["type"], row["batch"]): row for row in figures["rows"] if "skipped" not in row}
    assert set(measured) == {("act", 1), ("act", 2), ("smolvla", 1), ("smolvla", 2)}
    for row in measured.values():
        assert {"type", "size", "batch", "params", "chunk_size", "p50_ms", "p99_ms", "preprocess_ms", "inference_ms",
                "postprocess_ms", "chunks_per_s", "compiled", "dtype", "vs_seed"} <= set(row)
        assert all(row[key] > 0 for key in ("p50_ms", "preprocess_ms", "inference_ms", "postprocess_ms", "params"))
        assert row["p99_ms"] >= row["p50_ms"] and row["chunks_per_s"] > 0
        assert abs(row["vs_seed"] * figures["seed_fps"][row["type"]] - row["chunks_per_s"]) < 0.01
    assert measured[("act", 1)]["chunk_size"] == 50 and measured[("smolvla", 1)]["size"] == "tiny"
    assert measured[("smolvla", 2)]["guided_inference_ms"] > 0 and "guided_inference_ms" not in measured[("act", 1)]
    (fast,) = [row for row in figures["rows"] if row["type"] == "pi0_fast"]
    assert "FAST action tokenizer" in fast["skipped"]
    # The page renders these figures (the canned sample in tests/data has no models table).
    sys.path.insert(0, str(REPO / "scripts"))
    from bench_page import page

    text = page({"models": figures})
    assert "## Policy latency per action chunk on cpu" in text and "a CPU run cannot be compared" in text
    assert "| act | default | 1 |" in text and "- pi0_fast skipped: its FAST action tokenizer" in text


def test_bench_wan_runs_a_robot_through_the_emulated_link():
    figures = last_json_line("scripts/bench_wan.py", "--quick")
    cases = {(c["send"], c["strategy"]): c for c in figures["cases"]}
    default, native = cases["model jpeg", "crossfade"], cases["native raw", "rtc"]
    assert default["default_send"] and not native["default_send"]
    assert native["bytes_per_request"] > 20 * default["bytes_per_request"]  # two raw VGA frames against two JPEGs
    assert default["rtt_p50_ms"] >= 100 and default["chunks_used"] > 0 and default["service_ms"] >= 50
    sys.path.insert(0, str(REPO / "scripts"))
    from bench_page import page

    text = page({"wan": figures})  # the page renders these figures
    assert "## Over an emulated internet link" in text and "| scripted | 100 | 20 | model jpeg (default) |" in text
