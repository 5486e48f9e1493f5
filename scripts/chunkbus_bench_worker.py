"""A chunkbus worker for bench_roundtrip.py: a LeRobot checkpoint served by chunkbus's own
worker code, optionally with the policy's predict_action_chunk replaced by a trivial
function returning zeros of the chunk's shape (the same replacement the LeRobot side gets),
so that what is left is each framework's own overhead: decoding, preprocessing, the
post-processor, encoding and transport.

    python scripts/chunkbus_bench_worker.py BACKEND CHECKPOINT [--trivial] [--curve-secret F --broker-key K]
"""

from __future__ import annotations

import argparse

import torch

from chunkbus.bus.log import configure_logging
from chunkbus.bus.security import ClientKeys, read_key_pair, read_public_key
from chunkbus.nodes.policies.lerobot import LerobotPolicy
from chunkbus.nodes.worker import serve


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("backend")
    parser.add_argument("checkpoint")
    parser.add_argument("--trivial", action="store_true")
    parser.add_argument("--max-batch", type=int, default=4)
    parser.add_argument("--curve-secret", default=None, help="this worker's secret key file (CURVE)")
    parser.add_argument("--broker-key", default=None, help="the broker's public key (CURVE)")
    args = parser.parse_args()
    configure_logging("bench-worker", "info", json=True)  # bench_roundtrip waits for its ready line
    policy = LerobotPolicy(args.checkpoint)
    if args.trivial:
        length, size = policy.chunk_size, policy.action_size

        def trivial(batch, **_):
            first = next(v for k, v in batch.items() if k.startswith("observation."))
            return torch.zeros(first.shape[0], length, size)

        policy.policy.predict_action_chunk = trivial
    keys = ClientKeys(read_key_pair(args.curve_secret), read_public_key(args.broker_key)) if args.curve_secret else None
    serve(policy, args.backend, "bench", args.max_batch, keys)


if __name__ == "__main__":
    main()
