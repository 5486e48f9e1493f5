"""Logging through structlog: readable on a terminal, JSON lines with --log-json.

Every line carries the node's name, including lines from libraries that use the
standard `logging` module (lerobot, torch) and lines logged from background threads.
Only chunkbus's own logger may mark a line as a node's readiness (bus/lifecycle.py's
`ready` field); readable text leaves that field out: the line's words say it.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, TextIO

import structlog

from .lifecycle import OWN_LOGGER, READY

LEVELS = ("debug", "info", "warning", "error", "critical")

_node = "chunkbus"


def _add_node(_logger: Any, _method: str, event: dict[str, Any]) -> dict[str, Any]:
    event.setdefault("node", _node)
    return event


def _ready_only_from_own_logger(logger: Any, _method: str, event: dict[str, Any]) -> dict[str, Any]:
    # `logger` is the standard logger a structlog line went through; None for other lines.
    if READY in event and getattr(logger, "name", None) != OWN_LOGGER:
        del event[READY]
    return event


def _hide_ready(_logger: Any, _method: str, event: dict[str, Any]) -> dict[str, Any]:
    event.pop(READY, None)
    return event


def configure_logging(
    node: str, level: str = "info", json: bool = False, stream: TextIO | None = None
) -> structlog.stdlib.BoundLogger:
    """Set up logging for the process of node `node`; returns its logger."""
    global _node
    _node = node
    stream = stream or sys.stderr
    shared = [
        structlog.stdlib.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=False),
        _add_node,
        _ready_only_from_own_logger,
    ]
    if json:
        renderer: Any = structlog.processors.JSONRenderer()
        shared.append(structlog.processors.format_exc_info)
    else:
        colors = hasattr(stream, "isatty") and stream.isatty()
        renderer = structlog.dev.ConsoleRenderer(colors=colors, sort_keys=False)  # fields as logged
        shared.append(_hide_ready)
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[structlog.stdlib.add_logger_name, *shared],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.captureWarnings(True)  # Python warnings become log lines too (logger py.warnings), once
    return get_logger()


def get_logger(**context: Any) -> structlog.stdlib.BoundLogger:
    return structlog.stdlib.get_logger(OWN_LOGGER).bind(**context)


class Every:
    """Says yes at most once every `seconds`: for a message that would otherwise repeat at
    a loop's rate. The first yes comes at once, or `first_after` seconds after the first ask."""

    def __init__(self, seconds: float, first_after: float = 0.0):
        self.seconds, self.first_after = seconds, first_after
        self.last: float | None = None

    def __call__(self, now: float) -> bool:
        if self.last is None:
            self.last = now - self.seconds + self.first_after
        if now - self.last < self.seconds:
            return False
        self.last = now
        return True
