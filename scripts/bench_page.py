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
ORDER = ["codec", "broker", "fleet", "jitter", "roundtrip", "stitch", "wan", "models"]
JITTER_RATES = ("hz30", "hz100")


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
            return f"GPU: {torch.cuda.get_device_name(0)} (the policy latency table says which device it ran on)."
    except ImportError:
        pass
    return ("No GPU: these figures are from a CPU-only machine. The policy latency table at full size "
            "(`scripts/bench_models.py --device cuda`) needs a machine with one and has not been run.")


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def priority_figures(b: dict) -> str:
    return (f"{b['high_priority_p99_us'] / 1000:.1f} / {b['high_priority_wait_p99_us'] / 1000:.1f} / "
            f"{b['service_time_us'] / 1000:.1f} ms")


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
    if "broker" in results:
        for name, b in (("", results["broker"]), (", --max-batch 4", results["broker"]["batching"])):
            limit = b["service_time_us"] + 5000
            aims.append((f"high-priority wait p99 under saturation at most one service time + 5 ms{name}",
                         b["high_priority_wait_p99_us"] <= limit,
                         f"{b['high_priority_wait_p99_us'] / 1000:.1f} ms (limit {limit / 1000:.1f} ms)"))
    if "roundtrip" in results:
        r = results["roundtrip"]["overhead"]
        aims.append(("round-trip overhead at least 5x lower than LeRobot's, p50 and p99",
                     r["ratio_p50"] >= 5 and r["ratio_p99"] >= 5, f"{r['ratio_p50']:.1f}x / {r['ratio_p99']:.1f}x"))
        f = results["roundtrip"]["four_clients"]
        aims.append(("higher throughput with four clients", f["chunkbus_rps"] > f["lerobot_rps"],
                     f"{f['chunkbus_rps']:.0f} vs {f['lerobot_rps']:.0f} requests/s"))
    if "wan" in results and "headline" in results["wan"]:
        h = results["wan"]["headline"]
        aims.append(("100 ms RTT, 20 Mbit/s up, default send: no hold over 2 minutes, round trip p50 at most "
                     "RTT + service + 40 ms", h["aim_met"],
                     f"{h['holds_per_min']} holds/min, p50 {h['rtt_p50_ms']:.0f} ms (service {h['service_ms']} ms)"))
    if "stitch" in results:
        mid = [(case, rows[d]) for case, rows in results["stitch"].items() for d in rows if 3 <= int(d[1:]) <= 10]
        if mid:
            ratio = max(row["rtc"]["max_jump"] / max(row["replace"]["max_jump"], 1e-9) for _, row in mid)
            over = max(row["rtc"]["max_jump"] - row["crossfade"]["max_jump"] for _, row in mid)
            switches = sum(row["rtc"]["mode_switches"] for _, row in mid)
            aims.append(("rtc, 3-10 ticks late: max jump at most 1/4 of replace's, no more than crossfade's, "
                         "no mode switch", ratio <= 0.25 and over <= 0 and switches == 0,
                         f"at most {ratio:.2f}x replace's, {over:+.2f} vs crossfade's, {switches} switches"))
    if "fleet" in results:
        f = results["fleet"]
        hundred = f["by_robots"].get("100")
        if hundred is not None:
            aims.append(("100 robots through one broker (about 180 MB/s): latency it adds, p99 under 5 ms",
                         f["max_robots_p99_under_5ms"] >= 100,
                         f"p99 {hundred['added_p99_us'] / 1000:.2f} ms (a zmq.proxy: "
                         f"{hundred['proxy']['added_p99_us'] / 1000:.2f} ms); largest fleet under 5 ms: "
                         f"{f['max_robots_p99_under_5ms']} robots"))
        aims.append(("broker CPU per request within 3x of a zmq.proxy's", f["cpu_ratio"] <= 3,
                     f"{f['cpu_ratio']:.2f}x ({f['broker_cpu_us_per_request']:.0f} vs "
                     f"{f['proxy_cpu_us_per_request']:.0f} µs at {f['cpu_at_robots']} robots)"))
    if "jitter" in results:
        j = results["jitter"]
        loops = [("", j)] + ([(" with --realtime", j["realtime"])] if j.get("realtime", {}).get("permitted") else [])
        for name, rates in loops:
            for rate in JITTER_RATES:
                v = rates[rate]
                aims.append((f"tick lateness p99 under 0.5 ms and max under 2 ms at {rate[2:]} Hz{name}",
                             v["p99_us"] < 500 and v["max_us"] < 2000,
                             f"p99 {v['p99_us'] / 1000:.2f} ms, max {v['max_us'] / 1000:.2f} ms"))
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
                    ["under low-priority saturation (four workers, 20 ms a request): high-priority round trip "
                     "p99 / its wait p99 (the round trip less its own time on the worker) / service time",
                     priority_figures(b)],
                    ["the same with --max-batch 4 workers (20 ms a batch)", priority_figures(b["batching"])],
                    ["low-priority p99 meanwhile", f"{b['low_priority_p99_us'] / 1000:.1f} ms"],
                ],
            ),
            "",
            "Work goes only to a worker that runs nothing, so a high-priority request waits for the work "
            "already running and never for requests queued at a worker; nothing preempts a running request, "
            "so with every worker busy its wait is up to one service time.",
            "",
        ]
    if "fleet" in results:
        f = results["fleet"]
        rows = []
        for robots, b in sorted(f["by_robots"].items(), key=lambda item: int(item[0])):
            x = b["proxy"]
            rows.append([robots, f"{b['req_per_s']:.0f}", f"{b['mb_per_s']:.0f}",
                         f"{b['added_p50_us'] / 1000:.2f} / {b['added_p99_us'] / 1000:.2f} ms",
                         f"{x['added_p50_us'] / 1000:.2f} / {x['added_p99_us'] / 1000:.2f} ms",
                         f"{b['cpu_us_per_request']:.0f} / {x['cpu_us_per_request']:.0f}",
                         f"{b['answered']} of {b['sent']}"])
        out += ["## A fleet through one broker (`scripts/bench_fleet.py`)", "",
                f"N robots each ask once a second (a 30 Hz actuator with 30-action chunks) with two raw VGA frames "
                f"(1.8 MB), each its own client, through the broker ({'with' if f['capture'] else 'without'} its "
                f"capture for taps, as deployed) to {f['workers']} "
                f"scripted workers ({f['service_ms']:.0f} ms a request), beside libzmq's `zmq.proxy` "
                "(ROUTER/DEALER) with the same clients, workers and traffic, in turn in one run. Added latency = "
                "(worker receive - client send) + (client receive - worker send), on this host's monotonic clock: "
                "what the hop costs, both ways. CPU: the broker's (or the proxy's) own process, all threads, per "
                "request.", "",
                table(["robots", "requests/s", "MB/s", "broker adds p50 / p99", "zmq.proxy adds p50 / p99",
                       "CPU µs per request, broker / proxy", "answered"], rows), ""]
    if "jitter" in results:
        j = results["jitter"]
        loops = [("actuator", j)]
        if j.get("realtime", {}).get("permitted"):
            loops.append(("actuator --realtime", j["realtime"]))
        loops.append(("lerobot-paced loop", j["lerobot_loop"]))
        rows = []
        for name, rates in loops:
            for rate in JITTER_RATES:
                v = rates[rate]
                rows.append([name, rate[2:] + " Hz", f"{v['p50_us'] / 1000:.2f} ms", f"{v['p99_us'] / 1000:.2f} ms",
                             f"{v['max_us'] / 1000:.2f} ms", f"{v['late_ticks']} of {v['ticks']}",
                             f"{v['rate_hz']:.2f}" if "rate_hz" in v else ""])
        out += ["## Control-loop jitter with two raw 480x640 cameras streaming (`scripts/bench_jitter.py`)", "",
                "Lateness: how long after its deadline each tick woke, every tick after a warm-up (the first chunk "
                "and the first JPEG encoding land there). The actuator sleeps to 0.3 ms before each deadline and "
                "spins the rest, and collects garbage between ticks; `--realtime` also runs its loop in SCHED_FIFO "
                "on one CPU (it needs CAP_SYS_NICE or an rtprio limit of at least 20). The lerobot-paced loop reads "
                "the arm's state and each camera's newest frame, publishes a command, then calls lerobot's "
                "`precise_sleep(1/fps - dt)`, as lerobot 0.6's record and teleoperate loops do; it is measured "
                "against its own target (its previous start plus 1/fps), since it drifts (its rate in the last "
                "column).", "",
                table(["loop", "rate", "p50", "p99", "max", "late ticks", "ticks/s"], rows), ""]
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
        if "chunkbus_worker_ms" in r.get("overhead", {}):
            stages = r["overhead"]["chunkbus_worker_ms"]
            out += ["Of chunkbus's overhead round trip the worker spends (medians) "
                    + ", ".join(f"{stage} {ms:.2f} ms" for stage, ms in stages.items())
                    + "; the rest is transport: the client, the broker and the worker's link thread, both ways. "
                    "300 round trips per side, after 10 not counted.", ""]
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
        if "rtc" in r:
            g = r["rtc"]
            out += [
                "Real-time chunking's cost on the worker (a `flow:sine` worker, 50 x 6 chunks, 10 flow steps, asked "
                f"in turn without and with a 15-row prefix): inference p50 {g['unguided']['inference_p50_ms']:.2f} ms "
                f"unguided, {g['guided']['inference_p50_ms']:.2f} ms guided (+{g['extra_inference_p50_ms']:.2f} ms "
                f"per chunk); round trip p50 +{g['extra_round_trip_p50_ms']:.2f} ms.",
                "",
            ]
        if "curve" in r:
            c = r["curve"]
            out += [
                "The cost of CURVE encryption (overhead case, a plaintext broker and a CURVE one asked in turn, both "
                f"hops encrypted): round trip p50 {c['plain']['p50_ms']:.2f} ms plaintext, {c['curve']['p50_ms']:.2f} "
                f"ms with CURVE ({c['extra_p50_ms']:+.2f} ms); p99 {c['plain']['p99_ms']:.2f} vs "
                f"{c['curve']['p99_ms']:.2f} ms ({c['extra_p99_ms']:+.2f} ms).",
                "",
            ]
        if "ipc" in r:
            i = r["ipc"]
            ipc, tcp = i["ipc"], i["tcp"]
            out += ["The worker on an ipc:// backend instead of loopback TCP (overhead case, asked in turn): round "
                    f"trip p50 {ipc['p50_ms']:.2f} vs {tcp['p50_ms']:.2f} ms (saves {i['saved_p50_ms']:+.2f}), "
                    f"p99 {ipc['p99_ms']:.2f} vs {tcp['p99_ms']:.2f} ms (saves {i['saved_p99_ms']:+.2f}).", ""]
        if (DOCS / "roundtrip_latency.png").exists():
            out += ["![round-trip latency distribution](roundtrip_latency.png)", ""]
        if "notes" in r:
            out += [r["notes"], ""]
    if "stitch" in results:
        s = results["stitch"]
        out += ["## Stitching: control quality (`scripts/bench_stitch.py`)", "",
                "Every strategy on the same chunks of a flow-matching policy (flow:sine: lerobot's Euler sampler and "
                "RTC guidance, exact velocity), merged d ticks after they were asked for, at 30 Hz. Max jump: "
                "the largest |command step - reference step| where a chunk switched in; RMS jerk: third difference "
                "per tick; mode switches (bimodal): consecutive commands nearest to different modes. Raw action "
                "units; lower is better; the lowest max jump per column in bold.", ""]
        for case, rows in s.items():
            shown = [d for d in ("d3", "d6", "d10") if d in rows] or list(rows)[:3]
            names = list(rows[shown[0]])
            metrics = [("max jump", "max_jump", ".2f"), ("RMS jerk", "rms_jerk", ".3f")]
            if case == "bimodal":
                metrics.append(("mode switches", "mode_switches", "d"))
            header = ["strategy"] + [f"{label} {d}" for label, _, _ in metrics for d in shown]
            best = {d: min(names, key=lambda name, d=d: rows[d][name]["max_jump"]) for d in shown}
            body = [[name] + [f"**{rows[d][name][key]:{spec}}**" if key == "max_jump" and best[d] == name
                              else f"{rows[d][name][key]:{spec}}" for _, key, spec in metrics for d in shown]
                    for name in names]
            out += [f"**{case}**", "", table(header, body), ""]
    if "models" in results:
        m = results["models"]
        seeds = ", ".join(f"{kind} {fps}" for kind, fps in m["seed_fps"].items())
        out += [f"## Policy latency per action chunk on {m['device']}, {m['dtype']} (`scripts/bench_models.py`)", "",
                "One chunk through the worker's own code path (`LerobotPolicy.run`): random weights (latency does "
                "not depend on their values), synthetic observations. Latency of the whole call in ms, p50 / p99; "
                "pre-processing, inference and post-processing are p50s of the worker's own timings; "
                "chunks/s = batch x calls / total time; vs seed = chunks/s over the seed figure for that type; "
                "guided = inference p50 of the same requests guided towards a 15-row prefix (real-time "
                "chunking), for the policies that can.", "",
                f"The seed figures ({seeds} chunks/s) are for a cloud GPU: a CPU run cannot be compared with them.",
                "",
                table(["type", "size", "batch", "params (M)", "p50 ms", "p99 ms", "preprocess ms", "inference ms",
                       "postprocess ms", "chunks/s", "vs seed", "guided inference ms"], [
                    [r["type"] + (" (compiled)" if r["compiled"] else ""), r["size"], r["batch"],
                     f"{r['params'] / 1e6:.1f}", f"{r['p50_ms']:.1f}", f"{r['p99_ms']:.1f}",
                     f"{r['preprocess_ms']:.1f}", f"{r['inference_ms']:.1f}", f"{r['postprocess_ms']:.1f}",
                     f"{r['chunks_per_s']:.3g}", f"{r['vs_seed']:.2f}x" if "vs_seed" in r else "",
                     f"{r['guided_inference_ms']:.1f}" if "guided_inference_ms" in r else ""]
                    for r in m["rows"] if "skipped" not in r
                ]), ""]
        skipped = [f"- {r['type']} skipped: {r['skipped']}" for r in m["rows"] if "skipped" in r]
        out += [*skipped, ""] if skipped else []
    if "wan" in results:
        out += [wan_section(results["wan"]), ""]
    return "\n".join(out)


def wan_table(cases: list[dict]) -> str:
    """The rows of bench_wan.py's cases (also docs/networking.md's table)."""
    return table(["policy", "RTT ms", "uplink Mbit/s", "send", "strategy", "bytes/request", "round trip p50 / p99 ms",
                  "holds/min", "chunks", "late switches", "service ms"], [
        [c["policy"], f"{c['rtt_ms']:g}", f"{c['uplink_mbit']:g}",
         c["send"] + (" (default)" if c["default_send"] else ""), c["strategy"], f"{c['bytes_per_request']:,}",
         f"{c['rtt_p50_ms']:.0f} / {c['rtt_p99_ms']:.0f}",
         f"{c['holds_per_min']:g}", c["chunks_used"], c["late_switches"], f"{c['service_ms']}"] for c in cases])


def wan_section(w: dict) -> str:
    lines = ["## Over an emulated internet link (`scripts/bench_wan.py`)", "",
             "One robot (two synthetic 640x480 cameras, 30 Hz) through `scripts/link_emulator.py`: the round trip "
             "given, +-20% jitter each way, the uplink capped, 100 Mbit/s down. Synthetic frames compress better "
             "than a real scene: a real 224x224 frame at JPEG quality 90 is about 15-25 kB. "
             "docs/networking.md reads the table.", "", wan_table(w["cases"]), ""]
    if "headline" in w:
        h = w["headline"]
        lines += [f"The headline case for {h['seconds']:.0f} s (100 ms, 20 Mbit/s, default send): {h['holds_per_min']} "
                  f"holds per minute, round trip p50 {h['rtt_p50_ms']:.0f} ms and p99 {h['rtt_p99_ms']:.0f} ms, "
                  f"service {h['service_ms']} ms.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", action="append", choices=ORDER,
                        help="run only these benchmarks; the others keep their figures from docs/benchmarks.json")
    parser.add_argument("--quick", action="store_true", help="short runs (a smoke test of the page)")
    args = parser.parse_args()
    quick = {"codec": ["--iterations", "5", "--rounds", "2"], "broker": ["--seconds", "0.5", "--count", "50"],
             "fleet": ["--quick"],
             "jitter": ["--seconds", "1.5"], "roundtrip": ["--quick"],
             "stitch": ["--ticks", "300", "--delays", "0,3,6,10"], "wan": ["--quick"],
             "models": ["--types", "act,smolvla,pi0_fast", "--calls", "2", "--warmup", "1", "--batches", "1,2"]}
    # On a CPU, Diffusion at lerobot's default (100 denoising steps, 278 M parameters) takes
    # about a minute per chunk: the page's run leaves it out (run bench_models.py --types diffusion).
    full = {"models": ["--types", "act,vqbet,smolvla,pi0,pi05,pi0_fast,groot", "--calls", "20"]}
    DOCS.mkdir(exist_ok=True)
    saved = DOCS / "benchmarks.json"
    results = json.loads(saved.read_text()) if args.only and saved.exists() else {}
    for name in args.only or ORDER:
        extra = quick[name] if args.quick else full.get(name, [])
        if name == "roundtrip":
            extra = extra + ["--plot", str(DOCS / "roundtrip_latency.png")]
        results[name] = run(name, extra)
    (DOCS / "benchmarks.json").write_text(json.dumps(results, indent=1))
    (DOCS / "benchmarks.md").write_text(page(results))
    print(f"wrote {DOCS / 'benchmarks.md'}")


if __name__ == "__main__":
    main()
