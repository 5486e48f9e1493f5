"""The chunkbus command line and its logging."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
import threading
from pathlib import Path

import click

from chunkbus.bus.log import configure_logging, get_logger
from chunkbus.bus.sockets import Publisher

CHUNKBUS = str(Path(sys.executable).parent / "chunkbus")  # the installed console script


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([CHUNKBUS, *args], capture_output=True, text=True, timeout=60)


def test_version_and_help():
    result = run("--version")
    assert result.returncode == 0
    assert result.stdout.startswith("chunkbus, version 0.1.0")
    result = run("--help")
    assert result.returncode == 0
    for option in ("--version", "--log-level", "--log-json", "endpoints"):
        assert option in result.stdout


def test_endpoints_lists_publishers_with_json_logs_naming_the_node(runtime_dir):
    with Publisher("camera_front"):
        result = run("--log-json", "--log-level", "debug", "endpoints")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["camera_front", f"ipc://{runtime_dir}/camera_front.pub"]
    lines = [json.loads(line) for line in result.stderr.splitlines()]
    assert lines and all(line["node"] == "endpoints" for line in lines)
    assert lines[0]["event"] == "listed runtime directory" and lines[0]["level"] == "debug"


def test_readable_logs_on_a_terminal_name_the_node(runtime_dir):
    result = run("--log-level", "debug", "endpoints")
    assert result.returncode == 0
    assert "no publishers in" in result.stdout
    assert "listed runtime directory" in result.stderr and "node=endpoints" in result.stderr


def test_bad_log_level_is_a_clear_error():
    result = run("--log-level", "loud", "endpoints")
    assert result.returncode == 2
    assert "Invalid value for '--log-level'" in result.stderr


def test_every_line_carries_the_node_name_from_any_thread_or_library():
    stream = io.StringIO()
    configure_logging("arm", level="info", json=True, stream=stream)
    try:
        get_logger().info("from structlog", joint=3)
        logging.getLogger("lerobot.motors").warning("from the standard library")
        thread = threading.Thread(target=lambda: get_logger().info("from a thread"))
        thread.start()
        thread.join()
        get_logger().debug("below the level")
        lines = [json.loads(line) for line in stream.getvalue().splitlines()]
        assert [line["event"] for line in lines] == [
            "from structlog",
            "from the standard library",
            "from a thread",
        ]
        assert all(line["node"] == "arm" for line in lines)
        assert lines[0]["joint"] == 3 and lines[1]["level"] == "warning"
    finally:
        logging.getLogger().handlers.clear()


def _options(command: click.Command, path: str):
    for param in command.params:
        if isinstance(param, click.Option) and not param.hidden:
            yield f"{path} {param.opts[-1]}", param
    for name, sub in getattr(command, "commands", {}).items():
        yield from _options(sub, f"{path} {name}")


def test_every_option_says_what_it_is_for_and_repeatable_ones_say_so():
    from chunkbus.nodes.cli import main

    missing = [where for where, option in _options(main, "chunkbus") if not (option.help or "").strip()]
    assert not missing, f"options without help text: {missing}"
    unsaid = [where for where, option in _options(main, "chunkbus")
              if option.multiple and "repeatable" not in option.help]
    assert not unsaid, f"repeatable options whose help does not say so: {unsaid}"


def test_python_warnings_become_log_lines_naming_the_node_once():
    import warnings

    logging.captureWarnings(False)  # pytest swapped warnings.showwarning since an earlier test captured it
    stream = io.StringIO()
    configure_logging("worker", level="info", json=True, stream=stream)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.warn("torch says something", UserWarning, stacklevel=1)
        lines = [json.loads(line) for line in stream.getvalue().splitlines()]
        assert len(lines) == 1 and "torch says something" in lines[0]["event"]
        assert lines[0]["node"] == "worker" and lines[0]["level"] == "warning"
    finally:
        logging.captureWarnings(False)
        logging.getLogger().handlers.clear()
