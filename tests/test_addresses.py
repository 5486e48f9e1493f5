"""Broker addresses as people write them (`--broker gpu-host:5555`), and CHUNKBUS_BROKER."""

from __future__ import annotations

import os
import socket
import subprocess

import pytest
from mdp_peers import CHUNKBUS, start_broker, start_worker

from chunkbus.bus.endpoints import EndpointError, backend_of, broker_address


@pytest.mark.parametrize(
    "text, default_port, endpoint",
    [
        ("127.0.0.1:5555", 5555, "tcp://127.0.0.1:5555"),
        ("gpu-host:7000", 5555, "tcp://gpu-host:7000"),
        ("gpu-host", 5555, "tcp://gpu-host:5555"),
        ("gpu-host", 5556, "tcp://gpu-host:5556"),
        ("gpu.lab.example.org:1", 5555, "tcp://gpu.lab.example.org:1"),
        ("10.0.0.7", 5556, "tcp://10.0.0.7:5556"),
        ("[::1]:5555", 5556, "tcp://[::1]:5555"),
        ("[fe80::1%eth0]", 5555, "tcp://[fe80::1%eth0]:5555"),
        ("tcp://gpu-host:5555", 5556, "tcp://gpu-host:5555"),
        ("tcp://[::1]:65535", 5555, "tcp://[::1]:65535"),
        ("tcp://gpu-host", 5556, "tcp://gpu-host:5556"),
        ("ipc:///tmp/chunkbus/broker.ipc", 5555, "ipc:///tmp/chunkbus/broker.ipc"),
    ],
)
def test_address_forms(text, default_port, endpoint):
    assert broker_address(text, default_port) == endpoint


@pytest.mark.parametrize(
    "text, reason",
    [
        ("", "the broker address is empty"),
        ("gpu host:5555", "contains a space"),
        (" gpu-host:5555", "contains a space"),
        ("http://gpu-host:5555", "`http://` is not a transport"),
        ("gpu-host:0", "the port `0` is not a number from 1 to 65535"),
        ("gpu-host:65536", "the port `65536` is not a number from 1 to 65535"),
        ("gpu-host:http", "the port `http` is not a number from 1 to 65535"),
        ("tcp://gpu-host:99999", "the port `99999`"),
        ("gpu-host:", "the port `` is not a number"),
        (":5555", "no host"),
        ("5555", "a port without a host"),
        ("::1", "IPv6 address goes in brackets"),
        ("[::1", "no closing `]`"),
        ("[::g]:5555", "not an IPv6 address"),
        ("[::1]5555", "is not `:PORT`"),
        ("300.1.1.1:5555", "not an IPv4 address"),
        ("gpu_host/x:5555", "not a host name or IP address"),
        ("*:5555", "`*` is for binding"),
        ("ipc://", "no path"),
    ],
)
def test_unparsable_addresses_say_why_and_the_forms_that_work(text, reason):
    with pytest.raises(EndpointError) as caught:
        broker_address(text, 5555)
    message = str(caught.value)
    assert reason in message
    assert "\n" not in message and message.count("`") % 2 == 0
    assert f"`{text}`" in message or not text  # names the value
    for form in ("HOST:PORT", "HOST alone (port 5555)", "`[IPv6]:PORT`", "`tcp://HOST:PORT`", "`ipc://PATH`"):
        assert form in message


def test_a_worker_takes_the_backend_port_after_the_frontend_port():
    assert backend_of("gpu-host") == "tcp://gpu-host:5556"
    assert backend_of("gpu-host:5555") == "tcp://gpu-host:5556"
    assert backend_of("tcp://10.0.0.7:7000") == "tcp://10.0.0.7:7001"
    assert backend_of("[::1]:5555") == "tcp://[::1]:5556"
    for frontend, reason in [("ipc:///tmp/b.ipc", "ipc address"), ("gpu-host:65535", "65535"), ("x y", "space")]:
        with pytest.raises(EndpointError, match=reason):
            backend_of(frontend)


def chunkbus(*args: str, env: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if k != "CHUNKBUS_BROKER"}
    return subprocess.run([CHUNKBUS, *args], capture_output=True, text=True, timeout=timeout,
                          env={**environment, **(env or {})})


@pytest.mark.parametrize("command", [["status"], ["ping"], ["actuator", "--service", "act"],
                                     ["worker", "--policy", "scripted:sine"]])
def test_an_unparsable_broker_is_a_one_line_usage_error(command):
    result = chunkbus(command[0], "--broker", "gpu host:5555", *command[1:])
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and "ZMQError" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.stderr
    assert "`gpu host:5555` is not a broker address: it contains a space" in errors[0]
    assert "`tcp://HOST:PORT`" in errors[0]


def test_an_unparsable_chunkbus_broker_is_a_usage_error_naming_it():
    for command in (["status"], ["worker", "--policy", "scripted:sine"]):
        result = chunkbus(*command, env={"CHUNKBUS_BROKER": "http://gpu-host"})
        assert result.returncode == 2, result.stderr
        assert "CHUNKBUS_BROKER" in result.stderr and "`http://gpu-host` is not a broker address" in result.stderr
        assert "Traceback" not in result.stderr


def test_broker_help_says_the_forms_and_the_variable():
    for command in ("status", "ping", "actuator", "worker"):
        help_text = " ".join(chunkbus(command, "--help").stdout.split())
        assert "HOST:PORT, HOST (port" in help_text and "[IPv6]:PORT, tcp://HOST:PORT or ipc://PATH" in help_text
        assert "env var: CHUNKBUS_BROKER" in help_text
    assert "port after its own" in " ".join(chunkbus("worker", "--help").stdout.split())


def free_port_pair() -> int:
    """A port P with P and P + 1 free on 127.0.0.1."""
    for _ in range(50):
        with socket.socket() as first:
            first.bind(("127.0.0.1", 0))
            port = first.getsockname()[1]
            if port == 65535:
                continue
            with socket.socket() as second:
                try:
                    second.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
        return port
    raise AssertionError("no two consecutive free ports")


def test_status_ping_and_worker_find_the_broker_from_chunkbus_broker(processes):
    port = free_port_pair()
    broker = start_broker(processes, "--no-capture", frontend=f"tcp://127.0.0.1:{port}",
                          backend=f"tcp://127.0.0.1:{port + 1}")
    env = {"CHUNKBUS_BROKER": f"127.0.0.1:{port}"}  # the frontend, as people write it

    result = chunkbus("status", env=env)
    assert result.returncode == 0, result.stderr
    assert f"frontend tcp://127.0.0.1:{port}" in result.stdout and "no services" in result.stdout

    # The worker: CHUNKBUS_BROKER's host, on the port after the frontend's (the backend).
    worker = processes.start(CHUNKBUS, "worker", "--policy", "scripted:sine", script=True,
                             env={**env, "CHUNKBUS_LOG_JSON": "1"})
    assert worker.wait_ready(timeout=60)["broker"] == f"tcp://127.0.0.1:{port + 1}"

    result = chunkbus("ping", "-n", "2", env=env)  # no --service: the broker's only one
    assert result.returncode == 0, result.stderr
    assert "service scripted:sine" in result.stdout and "chunk shape 50 actions x 6 values" in result.stdout
    assert "scripted:sine" in chunkbus("status", env=env).stdout  # the worker registered there
    assert broker.process.poll() is None


def test_the_workers_own_broker_option_wins_over_chunkbus_broker(processes):
    broker = start_broker(processes, "--no-capture")
    backend = broker.backend.removeprefix("tcp://")  # HOST:PORT, as people write it
    worker = processes.start_node("worker", "--policy", "scripted:sine", "--broker", backend,
                                  env={"CHUNKBUS_BROKER": "127.0.0.1:9"})
    assert worker.ready_event["broker"] == broker.backend
    result = chunkbus("status", "--broker", broker.frontend.removeprefix("tcp://"),
                      env={"CHUNKBUS_BROKER": "127.0.0.1:9"})
    assert result.returncode == 0 and "scripted:sine" in result.stdout, result.stderr


def test_ping_needs_a_service_only_when_the_broker_has_none_or_several(processes):
    broker = start_broker(processes, "--no-capture")
    result = chunkbus("ping", "--broker", broker.frontend)
    assert result.returncode == 1
    assert "has no services yet: start a worker (`chunkbus worker --policy ...`)" in result.stderr

    start_worker(processes, broker.backend, "scripted:sine")
    result = chunkbus("ping", "--broker", broker.frontend, "-n", "2")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("service scripted:sine:")

    start_worker(processes, broker.backend, "scripted:constant", "--service", "other")
    result = chunkbus("ping", "--broker", broker.frontend, "-n", "2")
    assert result.returncode == 1
    assert "has 2 services (other, scripted:sine): pass `--service NAME`" in result.stderr
    result = chunkbus("ping", "--broker", broker.frontend, "-n", "2", "--service", "other")
    assert result.returncode == 0 and result.stdout.startswith("service other:"), result.stderr


def test_an_ipv6_broker_address_reaches_the_broker(processes):
    try:
        socket.create_server(("::1", 0), family=socket.AF_INET6).close()
    except OSError:
        pytest.skip("no IPv6 loopback here")
    broker = start_broker(processes, frontend="tcp://[::1]:*", backend="tcp://[::1]:*")
    port = broker.frontend.rsplit(":", 1)[1]
    result = chunkbus("status", "--broker", f"[::1]:{port}", "--timeout", "5")
    assert result.returncode == 0 and result.stdout.startswith("broker up"), result.stderr
