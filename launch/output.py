"""What `launch` prints: every node's log lines under its name, readable at a glance.

The launcher starts its nodes with --log-json and renders their JSON lines itself:
`  camera | 08:19:04.633 info    camera ready  camera=front fps=30.0`. With --log-json it
passes them on unchanged, for log collectors. On a terminal each node's once-a-second
`stats` line becomes a status line below the log that updates in place (--verbose logs
them instead). Lines that are not JSON (a crash's traceback) are relayed as they are.

Output never stops the launcher: once nothing reads it (a pipe whose reader exited, a
terminal that went away) the launcher goes on, and stops its nodes, without printing.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import threading
import time
from typing import Any, TextIO

from ..bus.lifecycle import READY

COLOURS = [36, 32, 33, 35, 34, 91, 92, 93, 94, 95, 96]
LEVEL_COLOURS = {"warning": 33, "error": 31, "critical": 31}
# Keys every node line has, shown by the prefix and the line's start instead; and the
# readiness mark, which the words of a "<kind> ready" line already say.
SHOWN_ELSEWHERE = {"event", "level", "timestamp", "node", "logger", "exception", READY}


def parse(line: str) -> dict[str, Any] | None:
    """A node's JSON log line as a map, or None for any other line."""
    if not line.startswith("{"):
        return None
    try:
        event = json.loads(line)
    except ValueError:
        return None
    return event if isinstance(event, dict) and "event" in event else None


def _value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, str):
        return value if value and " " not in value and "=" not in value else repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    return str(value)


def fields(event: dict[str, Any]) -> str:
    """The line's own fields as `key=value`, in the order the node logged them."""
    return " ".join(f"{k}={_value(v)}" for k, v in event.items() if k not in SHOWN_ELSEWHERE)


def render(event: dict[str, Any], colour: bool = False) -> str:
    stamp = str(event.get("timestamp", ""))
    clock = stamp[11:23] if len(stamp) >= 23 else stamp  # HH:MM:SS.mmm of an ISO time
    level = str(event.get("level", "info"))
    head = f"{level:<7}"
    if colour and level in LEVEL_COLOURS:
        head = f"\033[{LEVEL_COLOURS[level]}m{head}\033[0m"
    source = event.get("logger")
    text = str(event["event"]) if source in (None, "chunkbus") else f"[{source}] {event['event']}"
    line = " ".join(part for part in (clock, head, text, fields(event)) if part)
    if event.get("exception"):
        line += "\n" + str(event["exception"]).rstrip()
    return line


class Console:
    """The launcher's output: node lines with prefixes, and on a terminal a status board."""

    def __init__(self, names: list[str], *, stream: TextIO | None = None, colour: bool = False,
                 json_lines: bool = False, status_board: bool = False):
        self.stream = stream or sys.stdout
        self.colour, self.json_lines, self.status_board = colour, json_lines, status_board
        self.width = max([len(n) for n in names] + [len("launch")])
        self.colours = {name: COLOURS[i % len(COLOURS)] for i, name in enumerate(names)}
        self.board: dict[str, str] = {}  # node -> its latest stats, in the nodes' order
        self.board_order = list(names)
        self.board_height = 0  # board lines now on the screen
        self.lost = False  # nothing reads the output any more
        self.lock = threading.Lock()

    def prefix(self, name: str) -> str:
        prefix = f"{name:>{self.width}} |"
        colour = self.colours.get(name, 1)
        return f"\033[{colour}m{prefix}\033[0m" if self.colour else prefix

    def node_line(self, name: str, line: str) -> dict[str, Any] | None:
        """Show one line a node wrote; returns it parsed when it is a log event."""
        event = parse(line)
        if self.json_lines:
            self.write([line])
        elif event is None:
            self.write([f"{self.prefix(name)} {line}"])
        elif event["event"] == "stats" and self.status_board:
            self.board[name] = fields(event)
            self.write([])
        else:
            text = render(event, self.colour)
            self.write([f"{self.prefix(name)} {part}" for part in text.split("\n")])
        return event

    def announce(self, text: str) -> None:
        if self.json_lines:
            stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
            self.write([json.dumps({"event": text, "level": "info", "timestamp": stamp, "node": "launch"})])
        else:
            self.write([f"{self.prefix('launch')} {text}"])

    def write(self, lines: list[str]) -> None:
        """Print `lines` above the status board, and redraw the board."""
        with self.lock:
            if self.lost:
                return
            out = []
            if self.board_height:
                out.append(f"\033[{self.board_height}F\033[J")  # up to the board's first line; clear
            out += [line + "\n" for line in lines]
            columns = shutil.get_terminal_size().columns
            board = [
                f"{self.prefix(name)} {self.board[name][: max(10, columns - self.width - 3)]}"
                for name in self.board_order
                if name in self.board
            ]
            out += [line + "\n" for line in board]
            self.board_height = len(board)
            try:
                self.stream.write("".join(out))
                self.stream.flush()
            except (OSError, ValueError):
                self.give_up()

    def give_up(self) -> None:
        """Nothing reads the output: stop writing to it, for good."""
        self.lost = True
        try:  # later writes (the interpreter's own flush at exit too) go nowhere, quietly
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self.stream.fileno())
            os.close(devnull)
        except (OSError, ValueError):
            pass
