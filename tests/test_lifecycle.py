"""A node's lifecycle in one place: run until a stop signal, say when it serves, be waited for."""

from __future__ import annotations

import io
import logging
import re
import signal

import pytest
import structlog

from chunkbus.bus.lifecycle import announce_ready, is_ready
from chunkbus.bus.log import configure_logging
from chunkbus.launch.config import NodeSpec
from chunkbus.launch.output import Console, parse, render
from chunkbus.launch.process import NodeError
from chunkbus.launch.supervisor import Supervisor

# --- run_node -------------------------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_run_node_runs_a_node_until_a_stop_signal(processes, sig):
    toy = processes.helper("toy_node.py")
    ready = toy.wait_ready(timeout=30)
    assert ready["event"] == "toy ready" and ready["pid"] == toy.pid
    toy.send_signal(sig)
    assert toy.wait(timeout=10) == 0  # stopped by its stop(), not killed by the signal
    toy.wait_log('"toy stopped"')


# --- is_ready -----------------------------------------------------------------------------------


def log_lines(json: bool, write) -> str:
    """What `write(log)` logs through a node's logging, configured as `chunkbus` does."""
    logging.captureWarnings(False)  # pytest swapped warnings.showwarning (see test_cli)
    stream = io.StringIO()
    try:
        write(configure_logging("worker", json=json, stream=stream))
    finally:
        logging.captureWarnings(False)
        logging.getLogger().handlers.clear()
    return stream.getvalue()


def strays_and_ready(log) -> None:
    logging.getLogger("lerobot").info("worker ready")  # a library's line, the same words
    logging.getLogger("lerobot").info("worker ready", extra={"ready": True})
    structlog.stdlib.get_logger("some.library").info("worker ready", ready=True)  # not chunkbus's logger
    log.info("worker ready")  # the words alone: the broker says so of a worker that registered
    announce_ready(log, "worker", service="sine")


def test_only_chunkbus_s_own_ready_line_is_ready():
    events = [parse(line) for line in log_lines(True, strays_and_ready).splitlines()]
    assert [e["event"] for e in events] == ["worker ready"] * 5
    assert [is_ready(e) for e in events] == [False, False, False, False, True]
    assert events[-1]["service"] == "sine"
    assert not is_ready(None) and not is_ready({"event": "worker ready", "ready": True, "logger": "lerobot"})


def test_the_ready_line_reads_as_before():
    ready = parse(log_lines(True, lambda log: announce_ready(log, "arm", rate=30.0)))
    assert re.fullmatch(r"\S+ info    arm ready rate=30", render(ready))  # as `launch` shows it
    text = log_lines(False, lambda log: announce_ready(log, "arm", rate=30.0))  # a node run by hand
    assert "arm ready" in text and "rate=30.0" in text and "ready=" not in text


class Lines:
    """A node process as the supervisor's relay sees it: its output lines."""

    def __init__(self, text: str):
        self.stdout = io.StringIO(text)


def test_a_stray_worker_ready_line_does_not_make_the_supervisor_think_the_node_is_ready():
    output = io.StringIO()
    supervisor = Supervisor([NodeSpec("worker", "worker", [])], console=Console(["worker"], stream=output))
    (node,) = supervisor.nodes
    strays = log_lines(True, strays_and_ready).splitlines()[:-1]  # all but the node's own ready line
    supervisor.relay(node, Lines("\n".join(["worker ready", *strays]) + "\n"))  # a print, then log lines
    assert not node.ready.is_set(), output.getvalue()
    assert "[lerobot] worker ready" in output.getvalue()  # relayed all the same
    supervisor.relay(node, Lines(log_lines(True, lambda log: announce_ready(log, "worker", service="sine"))))
    assert node.ready.is_set()


# --- NodeProcess ----------------------------------------------------------------------------------


def test_a_node_process_is_ready_with_its_fields_and_stops(runtime_dir, processes):
    broker = processes.start_node("broker", "--frontend", "tcp://127.0.0.1:*", "--backend", "tcp://127.0.0.1:*",
                                  "--no-capture")
    assert re.fullmatch(r"tcp://127\.0\.0\.1:\d+", broker.ready_event["frontend"])
    assert re.fullmatch(r"tcp://127\.0\.0\.1:\d+", broker.ready_event["backend"])
    assert broker.ready_event["event"] == "broker ready" and broker.wait_ready() is broker.ready_event
    assert broker.stop() == 0
    broker.wait_log('"broker stopped"')


def test_a_chatty_node_does_not_block_on_its_log(processes):
    toy = processes.helper("toy_node.py", "--chatter", "300", "--padding", "1000")  # 300 kB: more than a pipe holds
    assert toy.wait_ready(timeout=30)["event"] == "toy ready"
    assert len(toy.log_lines) >= 301


def test_a_node_that_exits_before_it_is_ready_is_an_error_with_its_last_lines(runtime_dir, processes):
    with pytest.raises(NodeError) as error:
        processes.start_node("camera", "--name", "x", "--source", "missing.mp4")
    message = str(error.value)
    assert message.startswith("chunkbus camera exited (exit status 1) before it logged that it is ready")
    assert "no video file 'missing.mp4'" in message

    toy = processes.helper("toy_node.py", "--chatter", "30", "--stray", "--exit", "3")
    with pytest.raises(NodeError, match=r"exited \(exit status 3\) before it logged that it is ready") as error:
        toy.wait_ready(timeout=30)  # its library's "worker ready" does not count
    message = str(error.value)
    assert '"worker ready"' in message and '"chatter 29"' in message and '"chatter 5"' not in message  # the last 20


def test_a_node_that_is_not_ready_in_time_is_an_error(processes):
    toy = processes.helper("toy_node.py", "--never-ready", "--chatter", "1")
    with pytest.raises(NodeError, match=r"did not log that it is ready within 1 s; its last lines:\n.*chatter 0"):
        toy.wait_ready(timeout=1)
    assert toy.poll() is None  # still running: the cleanup kills it
