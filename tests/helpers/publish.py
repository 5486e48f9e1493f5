"""Test helper process: publishes arm states and camera frames whose content follows from
their sequence number, so the receiving test can check every byte.

Prints its endpoints as one JSON line, then publishes at --rate until --count messages
per topic or until killed.
"""

import argparse
import json
import sys
import time

import numpy as np

from chunkbus.bus import ArmState, CameraFrame, JpegImage
from chunkbus.bus.sockets import Publisher


def state_for(seq: int) -> np.ndarray:
    return np.arange(6, dtype=np.float32) + seq


def image_for(seq: int, height: int = 48, width: int = 64) -> np.ndarray:
    return np.full((height, width, 3), seq % 256, dtype=np.uint8)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("node")
    parser.add_argument("--tcp", action="store_true", help="also bind tcp://127.0.0.1:*")
    parser.add_argument("--no-ipc", action="store_true")
    parser.add_argument("--rate", type=float, default=200.0)
    parser.add_argument("--count", type=int, default=100_000)
    parser.add_argument("--jpeg", action="store_true")
    args = parser.parse_args()
    bind = ["tcp://127.0.0.1:*"] if args.tcp else []
    with Publisher(args.node, bind, ipc=not args.no_ipc) as publisher:
        print(json.dumps({"endpoints": publisher.endpoints}), flush=True)
        for seq in range(args.count):
            now = time.monotonic()
            names = [f"joint{i}" for i in range(6)]
            publisher.publish("state", ArmState("arm", seq, now, names, state_for(seq)))
            image = image_for(seq)
            publisher.publish(
                "camera/front",
                CameraFrame("front", seq, now, JpegImage.encode(image) if args.jpeg else image),
            )
            time.sleep(1.0 / args.rate)
    sys.exit(0)


if __name__ == "__main__":
    main()
