"""Test helper process: a toy node, run by bus/lifecycle.py's run_node, logging JSON lines.

    toy_node.py [--chatter N [--padding CHARS]] [--stray] [--exit CODE | --never-ready]

First it logs N lines (with CHARS more characters each: more than a pipe holds) and, with
--stray, a library's line that says "worker ready". Then it exits with CODE (--exit), or
runs without ever saying that it is ready (--never-ready), or says "toy ready" (with its
pid) and runs until a stop signal, after which it logs "toy stopped" and exits 0.
"""

import argparse
import logging
import os
import sys
import threading

from chunkbus.bus.lifecycle import announce_ready, run_node
from chunkbus.bus.log import configure_logging


class Toy:
    def __init__(self, log, ready: bool):
        self.log, self.ready = log, ready
        self.stopped = threading.Event()

    def run(self) -> None:
        if self.ready:
            announce_ready(self.log, "toy", pid=os.getpid())
        while not self.stopped.wait(0.05):
            pass
        self.log.info("toy stopped")

    def stop(self) -> None:
        self.stopped.set()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--chatter", type=int, default=0)
    parser.add_argument("--padding", type=int, default=0)
    parser.add_argument("--stray", action="store_true")
    parser.add_argument("--exit", type=int, default=None)
    parser.add_argument("--never-ready", action="store_true")
    args = parser.parse_args()
    log = configure_logging("toy", json=True)
    for i in range(args.chatter):
        log.info(f"chatter {i}", padding="x" * args.padding)
    if args.stray:
        logging.getLogger("lerobot").info("worker ready")
    if args.exit is not None:
        sys.exit(args.exit)
    run_node(Toy(log, ready=not args.never_ready))


if __name__ == "__main__":
    main()
