"""`make bench`: run every scripts/bench_*.py and write docs/benchmarks.md.

Each benchmark ends with one JSON line of its figures; this script runs them one after
another on this machine, keeps those lines (docs/benchmarks.json) and writes the page:
the machine, the date, a table per benchmark, the ratios against the baselines, and the
round-trip latency plot that bench_roundtrip.py draws.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs"
ORDER = ["codec", "broker", "jitter", "roundtrip", "stitch"]


def run(name: str, extra: list[str]) -> dict:
    script = REPO / "scripts" / f"bench_{name}.py"
    print(f"== {script.name}", flush=True)
    start = time.monotonic()
    result = subprocess.run([sys.executable, str(script), *extra], cwd=REPO, text=True, stdout=subprocess.PIPE)
    print(result.stdout, end="", flush=True)
    if result.returncode != 0:
        raise SystemExit(f"{script.name} failed with status {result.returncode}")
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    print(f"   ({time.monotonic() - start:.0f} s)", flush=True)
    return figures


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0))
    return f"{cpu}, {cores} cores available, Python {platform.python_version()}, {platform.system()}"


def gpu_note() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return f"GPU: {torch.cuda.get_device_name(0)} (no GPU table yet: run scripts/bench_gpu.py there)."
    except ImportError:
        pass
    return ("No GPU: these figures are from a CPU-only machine. The per-model GPU latency table "
            "(scripts/bench_gpu.py) needs a machine with one and has not been run.")


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def page(results: dict) -> str:
    out = [
        "# chunkbus benchmarks",
        "",
        f"Written by `make bench` on {datetime.date.today().isoformat()}. Machine: {machine()}.",
        "Every figure of one benchmark comes from the same run; the machine is shared and noisy.",
        gpu_note(),
        "",
    ]
    aims = []
    if "codec" in results:
        c = results["codec"]
        aims.append(
            ("codec at least 5x faster than pickle", c["speedup_vs_pickle"] >= 5, f"{c['speedup_vs_pickle']:.1f}x")
        )
        aims.append(
            (
                "codec costs no more than one memcpy of the payload",
                c["ratio_to_memcpy"] <= 1,
                f"{c['ratio_to_memcpy']:.2f}x for one observation, "
                f"{c['history5_ratio_to_memcpy']:.2f}x for a 5-step history",
            )
        )
    if "roundtrip" in results:
        r = results["roundtrip"]["overhead"]
        aims.append(("round-trip overhead at least 5x lower than LeRobot's, p50 and p99",
                     r["ratio_p50"] >= 5 and r["ratio_p99"] >= 5, f"{r['ratio_p50']:.1f}x / {r['ratio_p99']:.1f}x"))
        f = results["roundtrip"]["four_clients"]
        aims.append(("higher throughput with four clients", f["chunkbus_rps"] > f["lerobot_rps"],
                     f"{f['chunkbus_rps']:.0f} vs {f['lerobot_rps']:.0f} requests/s"))
    if "jitter" in results:
        for rate, v in results["jitter"].items():
            aims.append(
                (f"tick lateness p99 under 1 ms at {rate[2:]} Hz", v["p99_us"] < 1000, f"{v['p99_us'] / 1000:.2f} ms")
            )
    if aims:
        out += [
            "## Aims",
            "",
            table(["aim", "met", "figure"], [[a, "yes" if ok else "**no**", fig] for a, ok, fig in aims]),
            "",
        ]
    if "codec" in results:
        out += [
            "## Codec: encode + decode of one observation (`scripts/bench_codec.py`)",
            "",
            table(
                ["codec", "µs", "vs chunkbus"],
                [
                    ["chunkbus", f"{c['chunkbus_us']:.0f}", ""],
                    ["pickle", f"{c['pickle_us']:.0f}", f"{c['speedup_vs_pickle']:.1f}x slower"],
                    [
                        "msgpack-numpy, images inline",
                        f"{c['msgpack_numpy_us']:.0f}",
                        f"{c['speedup_vs_msgpack_numpy']:.1f}x slower",
                    ],
                    [
                        "memcpy of the 1.8 MB payload",
                        f"{c['memcpy_us']:.0f}",
                        f"chunkbus = {c['ratio_to_memcpy']:.2f}x memcpy",
                    ],
                    ["chunkbus, 5-step history (9.2 MB)", f"{c['history5_chunkbus_us']:.0f}", ""],
                    [
                        "memcpy of that payload",
                        f"{c['history5_memcpy_us']:.0f}",
                        f"chunkbus = {c['history5_ratio_to_memcpy']:.2f}x memcpy",
                    ],
                ],
            ),
            "",
        ]
    if "broker" in results:
        b = results["broker"]
        out += [
            "## Broker (`scripts/bench_broker.py`)",
            "",
            table(
                ["figure", "value"],
                [
                    ["requests/s, four scripted workers, 64 in flight", f"{b['req_per_s']:.0f}"],
                    [
                        "round trip through the broker (bare echo worker), p50 / p99",
                        f"{b['round_trip_p50_us'] / 1000:.2f} / {b['round_trip_p99_us'] / 1000:.2f} ms",
                    ],
                    [
                        "the same without a broker (client to echo), p50 / p99",
                        f"{b['direct_p50_us'] / 1000:.2f} / {b['direct_p99_us'] / 1000:.2f} ms",
                    ],
                    [
                        "latency the broker adds: the difference, p50 / p99",
                        f"{b['p50_us'] / 1000:.2f} / {b['p99_us'] / 1000:.2f} ms",
                    ],
                    ["high-priority p99 under low-priority saturation", f"{b['high_priority_p99_us'] / 1000:.1f} ms"],
                    ["low-priority p99 meanwhile", f"{b['low_priority_p99_us'] / 1000:.1f} ms"],
                ],
            ),
            "",
        ]
    if "jitter" in results:
        j = results["jitter"]
        out += ["## Control-loop jitter with two raw 480x640 cameras streaming (`scripts/bench_jitter.py`)", "",
                table(["rate", "p50", "p99", "max", "late ticks"], [
                    [k[2:] + " Hz", f"{v['p50_us'] / 1000:.2f} ms", f"{v['p99_us'] / 1000:.2f} ms",
                     f"{v['max_us'] / 1000:.2f} ms", f"{v['late_ticks']} of {v['ticks']}"] for k, v in j.items()
                ]), ""]
    if "roundtrip" in results:
        r = results["roundtrip"]
        rows = []
        for case in ("overhead", "act"):
            if case in r:
                x = r[case]
                rows.append([case, f"{x['chunkbus']['p50_ms']:.2f} / {x['chunkbus']['p99_ms']:.2f}",
                             f"{x['lerobot']['p50_ms']:.2f} / {x['lerobot']['p99_ms']:.2f}",
                             f"{x['ratio_p50']:.1f}x / {x['ratio_p99']:.1f}x"])
        out += ["## Round trip against LeRobot's async inference (`scripts/bench_roundtrip.py`)", "",
                "One observation (two 480x640x3 images, 6-float state, a task) answered with an action chunk, "
                "over loopback TCP. Latency in ms, p50 / p99; ratio = LeRobot / chunkbus.", "",
                table(["case", "chunkbus", "LeRobot", "ratio p50 / p99"], rows), ""]
        if "jpeg" in r:
            out += [
                f"chunkbus with JPEG frames: p50 {r['jpeg']['p50_ms']:.2f} ms, p99 {r['jpeg']['p99_ms']:.2f} ms.",
                "",
            ]
        if "four_clients" in r:
            f = r["four_clients"]
            out += [
                f"Four clients at once: chunkbus {f['chunkbus_rps']:.1f} requests/s, "
                f"LeRobot {f['lerobot_rps']:.1f} requests/s "
                "(overhead case; chunkbus: one broker and one worker with --max-batch 4; LeRobot: four PolicyServers, "
                "one per client, since one serves a single robot).",
                "",
            ]
        if (DOCS / "roundtrip_latency.png").exists():
            out += ["![round-trip latency distribution](roundtrip_latency.png)", ""]
        if "notes" in r:
            out += [r["notes"], ""]
    if "stitch" in results:
        s = results["stitch"]
        out += ["## Stitching smoothness (`scripts/bench_stitch.py`)", "",
                "The same chunks (a smooth reference with per-chunk offset and drift), delivered d ticks late. "
                "Lower is smoother; the smoothest (lowest RMS jerk) per delay in bold.", ""]
        for delay, row in s.items():
            best = min(row, key=lambda name: row[name]["rms_jerk"])
            out += [
                f"**{delay[1:]} ticks late**",
                "",
                table(
                    ["strategy", "max jump", "RMS jerk", "RMS error"],
                    [
                        [
                            f"**{name}**" if name == best else name,
                            f"{v['max_jump']:.2f}",
                            f"{v['rms_jerk']:.3f}",
                            f"{v['rms_error']:.3f}",
                        ]
                        for name, v in row.items()
                    ],
                ),
                "",
            ]
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", action="append", choices=ORDER, help="run only these benchmarks")
    parser.add_argument("--quick", action="store_true", help="short runs (a smoke test of the page)")
    args = parser.parse_args()
    quick = {"codec": ["--iterations", "5", "--rounds", "2"], "broker": ["--seconds", "0.5", "--count", "50"],
             "jitter": ["--seconds", "1.5"], "roundtrip": ["--quick"], "stitch": ["--ticks", "400"]}
    DOCS.mkdir(exist_ok=True)
    results = {}
    for name in args.only or ORDER:
        extra = quick[name] if args.quick else []
        if name == "roundtrip":
            extra = extra + ["--plot", str(DOCS / "roundtrip_latency.png")]
        results[name] = run(name, extra)
    (DOCS / "benchmarks.json").write_text(json.dumps(results, indent=1))
    (DOCS / "benchmarks.md").write_text(page(results))
    print(f"wrote {DOCS / 'benchmarks.md'}")


if __name__ == "__main__":
    main()
