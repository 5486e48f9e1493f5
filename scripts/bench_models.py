"""Per policy type, the latency of one action chunk through the worker's own code path.

Each policy is built here (lerobot's own config class, random weights, made-up dataset
statistics), saved into a temporary folder and loaded back the way a worker loads it
(`LerobotPolicy`); synthetic observations (random uint8 images at the model's input size, a
random state, a task) go through `policy.run` in batches of 1 and 4. Per type and batch: the
p50 and p99 of the whole call (ms), the p50 of its pre-processing, inference and
post-processing (the worker's own timings), chunks per second, the parameter count; with
--compile the same again with torch.compile, side by side with eager. The weights are random:
latency does not depend on their values, only on the model's shape.

Sizes: ACT, Diffusion and VQBet at lerobot's default sizes; SmolVLA tiny, or with --full the
published SmolVLM2-500M dimensions; π0 and π0.5 (2-3 B parameters) only with --full.
π0-FAST needs its FAST action tokenizer (remote code on the Hub) and GR00T NVIDIA's base
checkpoint: offline they are reported as skipped.

  python scripts/bench_models.py                                          # CPU: tiny/default sizes
  python scripts/bench_models.py --device cuda --dtype bfloat16 --compile # GPU host: full sizes too

The last line of stdout is JSON: {"device", "dtype", "torch", "rows": [...], "seed_fps"}, a
row per type, batch (and compiled) with the figures above, `vs_seed` = chunks/s over the
seed figure for that type (cloud-GPU figures we compare against), or {"type", "skipped"}.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is built here: never wait on the Hub

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # pi_checkpoints: the π configs

TYPES = ("act", "diffusion", "vqbet", "smolvla", "pi0", "pi05", "pi0_fast", "groot")
SEED_FPS = {"pi0_fast": 15, "smolvla": 25, "act": 50}  # chunks/s on a cloud GPU, what we compare against
STAGES = ("preprocess", "inference", "postprocess")
TASK = "pick up the red cube"
FAST_TOKENIZER = "lerobot/fast-action-tokenizer"


class Skipped(Exception):
    """This type cannot be benchmarked here; the message says why, in one line."""


@contextlib.contextmanager
def paligemma_stand_in(tokenizer: Path):
    """While building the π processors: the local `tokenizer` loads where PaliGemma's (gated) is named."""
    import lerobot.processor.tokenizer_processor as tokenizer_processor
    from transformers import AutoTokenizer

    local = mock.Mock(from_pretrained=lambda name, *args, **kwargs: AutoTokenizer.from_pretrained(tokenizer))
    with mock.patch.object(tokenizer_processor, "AutoTokenizer", local):
        yield


@contextlib.contextmanager
def stdout_to_stderr():
    """What libraries print while a checkpoint is built goes to stderr, redirected at the file
    descriptor (the tokenizer trainer prints from Rust): stdout keeps the table and the JSON."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def fast_tokenizer_cached() -> bool:
    from huggingface_hub import try_to_load_from_cache

    files = ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json")
    return any(isinstance(try_to_load_from_cache(FAST_TOKENIZER, name), str) for name in files)


def save_pi(kind: str, folder: Path) -> tuple[Path, str, dict]:
    """A full-size `kind` checkpoint with random weights; its tokenizer is a small local one
    (token ids only need to be below the model's vocabulary size)."""
    from lerobot.policies import get_policy_class, make_pre_post_processors
    from pi_checkpoints import pi_config, stats

    from chunkbus.nodes.policies.demo import save_text_tokenizer

    tokenizer = save_text_tokenizer(folder / "tokenizer")
    config = pi_config(kind)
    policy = get_policy_class(kind)(config)
    with paligemma_stand_in(tokenizer):  # π0-FAST's action tokenizer comes from the cache
        preprocessor, postprocessor = make_pre_post_processors(config, dataset_stats=stats())
    checkpoint = folder / kind
    for saved in (policy, preprocessor, postprocessor):
        saved.save_pretrained(checkpoint)
    return checkpoint, "full", {"tokenizer": str(tokenizer)}


def build(kind: str, folder: Path, full: bool) -> tuple[Path, str, dict]:
    """The checkpoint folder for `kind`, its size label and the LoadOptions it needs; Skipped if it cannot be."""
    from chunkbus.nodes.policies.demo import CAMERAS, DEMO_IMAGE_SHAPE, save_random_policy, save_random_smolvla

    if kind == "groot":
        raise Skipped("needs NVIDIA's GR00T base checkpoint from the Hugging Face Hub, which cannot be had offline")
    if kind == "pi0_fast" and not fast_tokenizer_cached():
        raise Skipped(f"its FAST action tokenizer ({FAST_TOKENIZER}) is remote code on the Hugging Face Hub, "
                      "not in the local cache: it cannot be provided offline")
    if kind in ("pi0", "pi05", "pi0_fast"):
        if not full:
            raise Skipped("full size only (2-3 B parameters): pass --full")
        return save_pi(kind, folder)
    if kind == "smolvla":
        size = "full" if full else "tiny"
        return save_random_smolvla(folder / kind, size=size, image_shape=DEMO_IMAGE_SHAPE), size, {}
    options = {"act": dict(chunk_size=50, n_action_steps=50)}.get(kind, {})  # ACT's default is 100
    cameras = CAMERAS[:1] if kind == "vqbet" else CAMERAS  # VQBet takes one camera
    return save_random_policy(kind, folder / kind, DEMO_IMAGE_SHAPE, cameras, **options), "default", {}


def synthetic_requests(policy, batch: int) -> list:
    """`batch` requests, each with the policy's whole history of random frames and states."""
    from chunkbus.bus import Observation, ObservationRequest

    requests = []
    for member in range(batch):
        rng = np.random.default_rng(member)
        history = [
            Observation(tick=step, time=time.monotonic(),
                        state=rng.standard_normal(policy.inputs.state_size).astype(np.float32),
                        images={key: rng.integers(0, 256, (h, w, c), dtype=np.uint8)
                                for key, (c, h, w) in policy.inputs.image_shapes.items()})
            for step in range(policy.n_obs_steps)
        ]
        requests.append(ObservationRequest(robot_id=f"bench{member}", request_id=str(member), tick=0, fps=30.0,
                                           send_time=time.monotonic(), task=TASK, observations=history))
    return requests


def run_checked(policy, requests):
    result = policy.run(requests)
    for member in result.results:
        if member.error is not None:
            raise member.error
    return result


def measure(policy, kind: str, size: str, batch: int, calls: int, warmup: int) -> dict:
    requests = synthetic_requests(policy, batch)
    for _ in range(warmup):
        run_checked(policy, requests)
    totals, stages = [], {stage: [] for stage in STAGES}
    for _ in range(calls):
        start = time.perf_counter()
        result = run_checked(policy, requests)
        totals.append(time.perf_counter() - start)
        for stage in STAGES:
            stages[stage].append(result.timings[stage])
    description = policy.describe()
    row = {
        "type": kind, "size": size, "batch": batch,
        "params": sum(p.numel() for p in policy.policy.parameters()),
        "chunk_size": description.chunk_size,
        "p50_ms": round(1000 * float(np.percentile(totals, 50)), 3),
        "p99_ms": round(1000 * float(np.percentile(totals, 99)), 3),
        **{f"{stage}_ms": round(1000 * float(np.percentile(stages[stage], 50)), 3) for stage in STAGES},
        "chunks_per_s": round(batch * calls / sum(totals), 3),
        "compiled": description.compiled, "dtype": description.dtype,
    }
    if kind in SEED_FPS:
        row["vs_seed"] = round(batch * calls / sum(totals) / SEED_FPS[kind], 4)
    if description.rtc is not None:  # the same requests, guided towards a 15-row prefix (real-time chunking)
        horizon = min(15, description.chunk_size)
        for request in requests:
            request.prefix = np.ones((horizon, description.action_size), np.float32)
            request.expected_delay = min(5, horizon)
        guided = [run_checked(policy, requests).timings["inference"] for _ in range(warmup + calls)][warmup:]
        row["guided_inference_ms"] = round(1000 * float(np.percentile(guided, 50)), 3)
    return row


def row_line(row: dict) -> str:
    if "skipped" in row:
        return f"{row['type']:<9} skipped: {row['skipped']}"
    seed = f"  {row['vs_seed']:.2f}x seed" if "vs_seed" in row else ""
    return (f"{row['type']:<9} {row['size']:<7} b={row['batch']:<2} {row['params'] / 1e6:8.1f}M  "
            f"chunk {row['chunk_size']:<3}  p50 {row['p50_ms']:9.1f}  p99 {row['p99_ms']:9.1f} ms  "
            f"pre {row['preprocess_ms']:7.1f}  inf {row['inference_ms']:9.1f}  post {row['postprocess_ms']:6.1f} ms  "
            f"{row['chunks_per_s']:8.2f} chunks/s{seed}  {row['dtype']} {'compiled' if row['compiled'] else 'eager'}"
            + (f"  guided inf {row['guided_inference_ms']:.1f} ms" if "guided_inference_ms" in row else ""))


def bench_type(kind: str, args, full: bool, batches: list[int]):
    """The rows for `kind`, as they are measured: eager, then compiled with --compile."""
    import torch

    from chunkbus.nodes.policies import LoadOptions
    from chunkbus.nodes.policies.lerobot import LerobotPolicy

    with tempfile.TemporaryDirectory(prefix=f"bench-{kind}-") as folder:
        with stdout_to_stderr():
            checkpoint, size, options = build(kind, Path(folder), full)
        release(torch)
        for compiled in (False, True) if args.compile else (False,):
            policy = LerobotPolicy(str(checkpoint), args.device, LoadOptions(
                dtype=args.dtype, compile=compiled, default_task=TASK, max_batch=max(batches), **options))
            for batch in batches:
                yield measure(policy, kind, size, batch, args.calls, args.warmup)
            del policy
            release(torch)


def release(torch) -> None:
    """Free the last policy before the next is built: full-size models must not pile up."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--types", default=",".join(TYPES), help="comma-separated policy types")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--compile", action="store_true", help="also measure with torch.compile")
    parser.add_argument("--full", action=argparse.BooleanOptionalAction, default=None,
                        help="full-size SmolVLA, π0, π0.5 (default: on with cuda, off on cpu)")
    parser.add_argument("--calls", type=int, default=20, help="timed calls per batch size")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls first, per batch size")
    parser.add_argument("--batches", default="1,4", help="comma-separated batch sizes")
    args = parser.parse_args()
    full = args.device.startswith("cuda") if args.full is None else args.full
    batches = [int(b) for b in args.batches.split(",")]

    from chunkbus.bus.log import configure_logging
    from chunkbus.nodes.policies.lerobot_loading import one_line

    configure_logging("bench_models", level="warning")  # to stderr: stdout holds the table and the JSON
    print(f"device {args.device}, dtype {args.dtype}, torch {torch.__version__}, {args.calls} calls per row",
          flush=True)
    rows = []
    for kind in args.types.split(","):
        try:
            for row in bench_type(kind, args, full, batches):
                rows.append(row)
                print(row_line(row), flush=True)
        except Exception as exc:  # one model that cannot run must not stop the others
            rows.append({"type": kind, "skipped": one_line(exc)})
            print(row_line(rows[-1]), flush=True)
        release(torch)  # after bench_type returns: its policy is gone with its frame
    print(json.dumps({"device": args.device, "dtype": args.dtype, "torch": torch.__version__, "rows": rows,
                      "seed_fps": SEED_FPS}), flush=True)


if __name__ == "__main__":
    main()
