"""An emulated internet link between two hosts on this machine: a TCP relay that delays and paces bytes.

    python scripts/link_emulator.py --to 127.0.0.1:5555 --rtt 100 --jitter 0.2 --up 20 --down 100 [--stall-every 20]

Listens on --listen (default: a free port on 127.0.0.1) and forwards every connection to --to.
Each direction is one link shared by all connections, as a home uplink is: bytes leave at most
at its rate (`--up` Mbit/s from the connecting side, `--down` back; 0: no cap) and arrive half
the round trip later, give or take `--jitter` of it, in order (TCP never reorders what it
delivers); `--stall-every S` pauses a direction for `--stall-ms` every S seconds on average, as a
lost segment's retransmission does. A direction holds at most `--buffer-kb` in flight: past it the
relay stops reading and TCP's own flow control pushes back on the sender, as a router's queue does.
It prints one JSON line when it listens: {"listen": "tcp://127.0.0.1:PORT"}. It only ever connects
to --to, an address on this machine.

This kernel has no netem (tc's delay), and network namespaces need root; a relay in user space runs
anywhere the tests do.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import signal
import sys
from dataclasses import dataclass, field

READ_BYTES = 16 * 1024  # small reads pace the rate smoothly


@dataclass
class Direction:
    """One way of the link: its rate, delay, jitter and stalls, shared by every connection."""

    one_way: float  # seconds
    jitter: float  # fraction of one_way, each way
    mbit: float  # 0: no cap
    stall_every: float  # mean seconds between stalls; 0: none
    stall: float  # seconds
    rng: random.Random = field(default_factory=random.Random)
    free_at: float = 0.0  # when the bottleneck has sent what it holds
    last_due: float = 0.0
    next_stall: float = 0.0

    def due(self, now: float, size: int) -> float:
        """When `size` bytes read now arrive at the other end."""
        start = max(now, self.free_at)
        if self.stall_every and start >= self.next_stall:
            if self.next_stall:
                start += self.stall  # a segment lost: nothing gets through until it is sent again
            self.next_stall = start + self.rng.expovariate(1 / self.stall_every)
        self.free_at = start + (size * 8 / (self.mbit * 1e6) if self.mbit else 0.0)
        delay = self.one_way * self.rng.uniform(1 - self.jitter, 1 + self.jitter)
        self.last_due = max(self.last_due, self.free_at + delay)
        return self.last_due


async def pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, direction: Direction,
               buffer_bytes: int) -> None:
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue(maxsize=max(1, buffer_bytes // READ_BYTES))

    async def read() -> None:
        try:
            while data := await reader.read(READ_BYTES):
                await queue.put((direction.due(loop.time(), len(data)), data))
        except ConnectionError:
            pass
        await queue.put(None)

    async def write() -> None:
        try:
            while (item := await queue.get()) is not None:
                due, data = item
                await asyncio.sleep(max(0.0, due - loop.time()))
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    await asyncio.gather(read(), write())


async def serve(args) -> None:
    up = Direction(args.rtt / 2000, args.jitter, args.up, args.stall_every, args.stall_ms / 1000,
                   random.Random(args.seed))
    down = Direction(args.rtt / 2000, args.jitter, args.down, args.stall_every, args.stall_ms / 1000,
                     random.Random(args.seed + 1))
    target_host, target_port = args.to.rsplit(":", 1)
    buffer_bytes = args.buffer_kb * 1024

    async def relay(client_reader, client_writer) -> None:
        try:
            server_reader, server_writer = await asyncio.open_connection(target_host, int(target_port))
        except OSError:
            client_writer.close()
            return
        try:
            await asyncio.gather(pump(client_reader, server_writer, up, buffer_bytes),
                                 pump(server_reader, client_writer, down, buffer_bytes))
        except asyncio.CancelledError:  # the relay is stopping
            pass

    host, port = args.listen.rsplit(":", 1)
    server = await asyncio.start_server(relay, host, int(port))
    bound = server.sockets[0].getsockname()
    print(json.dumps({"listen": f"tcp://{bound[0]}:{bound[1]}"}), flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--to", required=True, help="HOST:PORT to forward to (on this machine)")
    parser.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT to listen on (port 0: a free one)")
    parser.add_argument("--rtt", type=float, default=100.0, help="round trip, ms")
    parser.add_argument("--jitter", type=float, default=0.2, help="each way's delay varies by this fraction")
    parser.add_argument("--up", type=float, default=20.0, help="Mbit/s from the connecting side; 0: no cap")
    parser.add_argument("--down", type=float, default=100.0, help="Mbit/s back; 0: no cap")
    parser.add_argument("--stall-every", type=float, default=0.0, help="mean seconds between stalls; 0: none")
    parser.add_argument("--stall-ms", type=float, default=250.0, help="how long a stall lasts")
    parser.add_argument("--buffer-kb", type=int, default=512, help="bytes in flight per direction before it "
                                                                   "stops reading")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not args.to.startswith(("127.", "localhost:", "[::1]:")):
        sys.exit("link_emulator only forwards to this machine (127.x.x.x, localhost, [::1])")
    asyncio.run(serve(args))


if __name__ == "__main__":
    main()
