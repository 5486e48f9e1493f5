"""CURVE on the broker's ports: who may connect, as what, and what a refused side is told.
Real broker and worker processes and real sockets on loopback; keys made by `chunkbus keys`."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import zmq
import zmq.auth
from mdp_peers import CHUNKBUS, RawClient, RawWorker, kill, start_broker, start_worker, wait_for

from chunkbus.bus import ActionChunk, ErrorReply, Observation, ObservationRequest
from chunkbus.bus.client import BrokerClient, BrokerRefused, RequestFailed
from chunkbus.bus.security import ClientKeys, read_key_pair, read_public_key
from chunkbus.bus.sockets import Subscriber

WORKER = "scripted:sine?delay=0.05"


def request(request_id: str, robot_id: str, tick: int = 0) -> ObservationRequest:
    now = time.monotonic()
    return ObservationRequest(robot_id=robot_id, request_id=request_id, tick=tick, fps=30.0, send_time=now,
                              task="test", observations=[Observation(tick=tick, time=now, state=np.zeros(6))])


class Keys:
    """A broker key, robots `lab` and `other` allowed, worker `gpu` allowed, and `stranger`
    (a key no folder holds): made with `chunkbus keys new`, as a user makes them."""

    def __init__(self, root: Path):
        self.root = root
        self.robots, self.workers, self.own = root / "robots", root / "workers", root / "own"
        for folder in (self.robots, self.workers):
            folder.mkdir()
        for name in ("broker", "lab", "other", "gpu", "stranger"):
            subprocess.run([CHUNKBUS, "keys", "new", name, "--dir", str(self.own)], check=True, capture_output=True)
        for name in ("lab", "other"):
            (self.robots / f"{name}.key").write_bytes((self.own / f"{name}.key").read_bytes())
        (self.workers / "gpu.key").write_bytes((self.own / "gpu.key").read_bytes())

    def secret(self, name: str) -> str:
        return str(self.own / f"{name}.key_secret")

    def public(self, name: str) -> str:
        return str(self.own / f"{name}.key")

    def client(self, name: str, server: str = "broker") -> ClientKeys:
        return ClientKeys(read_key_pair(self.secret(name)), read_public_key(self.public(server)))

    def broker_options(self) -> list[str]:
        return ["--curve-secret", self.secret("broker"), "--allow-robots", str(self.robots),
                "--allow-workers", str(self.workers)]

    def worker_options(self, name: str = "gpu") -> list[str]:
        return ["--curve-secret", self.secret(name), "--broker-key", self.public("broker")]


@pytest.fixture
def keys(tmp_path):
    return Keys(tmp_path)


@pytest.fixture
def secured(processes, keys):
    """A CURVE broker and one allowed worker serving `svc`."""
    broker = start_broker(processes, *keys.broker_options())
    worker = start_worker(processes, broker.backend, WORKER, "--service", "svc", *keys.worker_options())
    with BrokerClient(broker.frontend, keys=keys.client("lab")) as client:
        wait_for(lambda: client.status().services.get("svc") and client.status().services["svc"].workers == 1,
                 what="the worker's registration")
    return broker, worker


def refusal(broker: str, keys: ClientKeys | None) -> tuple[str, float]:
    """What a client with `keys` is told when it asks, and how long that took."""
    start = time.monotonic()
    with BrokerClient(broker, keys=keys, connect_timeout=5.0) as client:
        with pytest.raises(BrokerRefused) as refused:
            client.status(timeout=5.0)
    return str(refused.value), time.monotonic() - start


def exits_permanently(process, text: str) -> None:
    """The node stops within a few seconds, with EXIT_PERMANENT (no restart helps) and `text`."""
    assert process.wait(timeout=15) == 78, process.last_lines()
    time.sleep(0.2)
    assert text in "".join(process.log_lines), process.last_lines()


def test_keys_are_pyzmq_certificates_and_the_secret_is_its_owners_only(keys):
    secret = keys.own / "lab.key_secret"
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    public, secret_key = zmq.auth.load_certificate(secret)  # pyzmq's own reader
    assert secret_key is not None and zmq.auth.load_certificate(keys.own / "lab.key") == (public, None)
    shown = subprocess.run([CHUNKBUS, "keys", "show", str(keys.own / "lab.key")], capture_output=True, text=True)
    assert shown.stdout.strip() == public.decode()
    again = subprocess.run([CHUNKBUS, "keys", "new", "lab", "--dir", str(keys.own)], capture_output=True, text=True)
    assert again.returncode != 0 and "never overwritten" in again.stderr
    assert zmq.auth.load_certificate(secret) == (public, secret_key)


def test_an_allowed_robot_and_worker_work_over_curve(secured, keys):
    broker, _ = secured
    with BrokerClient(broker.frontend, keys=keys.client("lab")) as client:
        chunk = client.request("svc", request("r1", "lab"), timeout=10)
    assert isinstance(chunk, ActionChunk) and chunk.robot_id == "lab"
    ping = subprocess.run([CHUNKBUS, "ping", "--broker", broker.frontend, "-n", "2", *keys.worker_options("lab")],
                          capture_output=True, text=True, timeout=60)
    assert ping.returncode == 0 and "round trip over 2" in ping.stdout, ping.stderr
    status = subprocess.run([CHUNKBUS, "status", "--broker", broker.frontend], capture_output=True, text=True,
                            timeout=60, env={**os.environ, "CHUNKBUS_CURVE_SECRET": keys.secret("other"),
                                             "CHUNKBUS_BROKER_KEY": keys.public("broker")})
    assert status.returncode == 0 and "svc" in status.stdout, status.stderr


def test_an_unknown_robot_key_is_refused_at_once_and_reaches_no_worker(secured, keys):
    broker, worker = secured
    for _ in range(2):  # a refused key is logged once, however often it tries
        text, took = refusal(broker.frontend, keys.client("stranger"))
        assert "refused this key" in text and "--allow-robots" in text and took < 2.0
    with BrokerClient(broker.frontend, keys=keys.client("lab")) as client:
        status = client.status()
    assert status.counters["refused_robots"] == 2
    assert sum(status.services["svc"].outcomes.values()) == 0  # nothing of the stranger's got in
    stranger = read_public_key(keys.public("stranger")).decode()
    lines = [json.loads(line) for line in broker.process.log_lines if "refused a connection" in line]
    assert [line["key"] for line in lines] == [stranger] and lines[0]["address"] == "127.0.0.1"


def test_a_robot_key_cannot_serve_as_a_worker_nor_a_worker_key_ask(secured, keys, processes):
    broker, _ = secured
    impostor = start_worker(processes, broker.backend, WORKER, "--service", "svc", *keys.worker_options("lab"))
    exits_permanently(impostor, "refused this key")
    assert "--allow-workers" in "".join(impostor.log_lines)
    text, _ = refusal(broker.frontend, keys.client("gpu"))
    assert "refused this key" in text
    with BrokerClient(broker.frontend, keys=keys.client("lab")) as client:
        assert client.status().services["svc"].workers == 1


def test_plaintext_clients_and_workers_get_nothing(secured, keys, processes):
    broker, _ = secured
    text, took = refusal(broker.frontend, None)
    assert "requires CURVE" in text and took < 2.0
    raw = RawClient(broker.frontend)  # a plain MDP client, not chunkbus's
    raw.send("mmi.service", b"svc")
    assert raw.receive(timeout=1.0) is None
    raw.close()
    plain = start_worker(processes, broker.backend, WORKER, "--service", "svc")
    exits_permanently(plain, "requires CURVE")
    raw_worker = RawWorker(broker.backend, "svc")
    with BrokerClient(broker.frontend, keys=keys.client("lab")) as client:
        for i in range(3):
            assert isinstance(client.request("svc", request(f"r{i}", "lab"), timeout=10), ActionChunk)
    assert raw_worker.receive(timeout=0.5) == []
    raw_worker.close()


def test_a_wrong_broker_key_and_curve_on_one_side_only_are_named(secured, keys, processes):
    broker, _ = secured
    text, took = refusal(broker.frontend, keys.client("lab", server="other"))
    assert "does not match --broker-key" in text and took < 2.0
    plain_broker = start_broker(processes, "--no-capture")
    text, _ = refusal(plain_broker.frontend, keys.client("lab"))
    assert "does not use CURVE" in text


def test_a_robot_cannot_claim_another_robots_id(secured, keys):
    broker, _ = secured
    with BrokerClient(broker.frontend, keys=keys.client("lab")) as client:
        with pytest.raises(RequestFailed) as failed:
            client.request("svc", request("r1", "other"), timeout=5)
    assert failed.value.error.code == "unauthorized" and "may only send requests as robot 'lab'" in str(failed.value)


def test_removing_a_key_file_cuts_that_robot_and_that_worker_off(secured, keys):
    broker, worker = secured
    with BrokerClient(broker.frontend, keys=keys.client("lab")) as lab, \
            BrokerClient(broker.frontend, keys=keys.client("other")) as other:
        assert isinstance(lab.request("svc", request("before", "lab"), timeout=10), ActionChunk)
        (keys.robots / "lab.key").unlink()

        def refused() -> bool:
            try:
                lab.request("svc", request(f"after-{time.monotonic()}", "lab"), timeout=5)
            except RequestFailed as exc:
                return exc.error.code == "unauthorized"
            return False

        wait_for(refused, timeout=5, what="the removed key's refusal")
        assert isinstance(other.request("svc", request("still", "other"), timeout=10), ActionChunk)
        (keys.workers / "gpu.key").unlink()
        exits_permanently(worker, "refused this key")  # dropped, and its new connection refused
        assert other.status().services["svc"].workers == 0


def test_key_mistakes_are_named_before_anything_starts(keys, tmp_path):
    def worker(*options: str) -> subprocess.CompletedProcess:
        return subprocess.run([CHUNKBUS, "worker", "--policy", WORKER, "--broker", "tcp://127.0.0.1:1", *options],
                              capture_output=True, text=True, timeout=60)

    cases = [
        (["--curve-secret", keys.public("gpu"), "--broker-key", keys.public("broker")], "is a public key"),
        (["--curve-secret", str(tmp_path / "none.key_secret"), "--broker-key", keys.public("broker")],
         "no key file at"),
        (["--curve-secret", keys.secret("gpu")], "--curve-secret needs --broker-key"),
        (["--broker-key", keys.public("broker")], "--broker-key needs --curve-secret"),
        (["--curve-secret", keys.secret("gpu"), "--broker-key", "not-a-key"], "no key file at not-a-key"),
    ]
    for options, text in cases:
        result = worker(*options)
        assert result.returncode == 78 and text in result.stderr, (options, result.stderr)
        assert "Traceback" not in result.stderr
    broker = subprocess.run([CHUNKBUS, "broker", "--curve-secret", keys.secret("broker")], capture_output=True,
                            text=True, timeout=60)
    assert broker.returncode == 78 and "--allow-robots DIR and --allow-workers DIR" in broker.stderr


def test_an_oversized_message_drops_only_its_sender(processes):
    broker = start_broker(processes, "--max-message-bytes", "100000")
    worker = start_worker(processes, broker.backend, WORKER, "--service", "svc")
    assert worker.poll() is None
    big = RawClient(broker.frontend)
    big.send("svc", b"x" * 1_000_000)
    with BrokerClient(broker.frontend) as client:
        wait_for(lambda: client.status().services.get("svc"), what="the worker")
        assert isinstance(client.request("svc", request("small", "robot"), timeout=10), ActionChunk)
    assert big.receive(timeout=0.5) is None
    big.close()
    assert broker.process.poll() is None


def test_a_flooding_robot_waits_its_turn_and_hits_its_bound(processes):
    broker = start_broker(processes, "--max-per-robot", "4")
    start_worker(processes, broker.backend, "scripted:sine?delay=0.2", "--service", "svc")
    with BrokerClient(broker.frontend) as flood, BrokerClient(broker.frontend) as calm:
        wait_for(lambda: calm.status().services.get("svc"), what="the worker")
        for i in range(8):
            flood.send("svc", request(f"flood{i}", "flood"))
        time.sleep(0.05)  # the first is running
        calm.send("svc", request("calm", "calm"))
        order, outcomes = [], {}
        deadline = time.monotonic() + 10
        while len(outcomes) < 9 and time.monotonic() < deadline:
            for client in (flood, calm):
                if (reply := client.receive(0.01)) is not None:
                    message = reply.message
                    outcomes[message.request_id] = message.code if isinstance(message, ErrorReply) else "ok"
                    if outcomes[message.request_id] == "ok":
                        order.append(message.request_id)
    assert [r for r, code in outcomes.items() if code == "rejected"] == [f"flood{i}" for i in range(4, 8)]
    assert order == ["flood0", "calm", "flood1", "flood2", "flood3"]  # after the one running, not all four


def test_killing_the_broker_answers_outstanding_requests_broker_lost_at_once(processes):
    broker = start_broker(processes)
    held = RawWorker(broker.backend, "svc")  # takes requests and never answers
    with BrokerClient(broker.frontend) as client:
        wait_for(lambda: client.status().services.get("svc"), what="the worker")
        for i in range(3):
            client.send("svc", request(f"r{i}", "robot"))
        assert len(held.receive(count=1)) == 1  # one runs, two wait in the queue
        kill(broker.process)
        start = time.monotonic()
        lost = [client.receive(2.0) for _ in range(3)]
        took = time.monotonic() - start
        assert all(r is not None for r in lost), lost
        assert {r.message.request_id for r in lost} == {"r0", "r1", "r2"}
        assert {r.message.code for r in lost} == {"broker_lost"} and took < 2.0
        assert client.receive(0.2) is None  # nothing answered twice
    held.close()


def test_the_metrics_endpoint_binds_localhost_unless_told(processes):
    broker = start_broker(processes, "--metrics-port", "0")
    served = json.loads(processes.wait_log(broker.process, '"metrics served"'))
    assert served["url"].startswith("http://127.0.0.1:")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_a_publisher_bound_for_another_host_takes_only_allowed_curve_subscribers(keys, processes):
    subscribers = keys.root / "subscribers"
    subscribers.mkdir()
    (subscribers / "lab.key").write_bytes((keys.own / "lab.key").read_bytes())
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    processes.start_node("camera", "--name", "front", "--fps", "20", "--width", "64", "--height", "48",
                         "--bind", endpoint, "--curve-secret", keys.secret("broker"),
                         "--allow-subscribers", str(subscribers))

    elsewhere = keys.root / "other-host"  # a runtime directory of its own: the tap sees only what --connect gives
    elsewhere.mkdir()

    def tap(*options: str) -> subprocess.CompletedProcess:
        return subprocess.run([CHUNKBUS, "tap", "echo", "--topic", "camera/*", "--duration", "1.5", *options],
                              capture_output=True, text=True, timeout=60,
                              env={**os.environ, "CHUNKBUS_RUNTIME_DIR": str(elsewhere)})

    secured = tap("--connect", endpoint, "--curve-secret", keys.secret("lab"), "--publisher-key", keys.public("broker"))
    assert secured.returncode == 0 and "camera/front: camera_frame" in secured.stdout, secured.stderr
    stranger = tap("--connect", endpoint, "--curve-secret", keys.secret("stranger"),
                   "--publisher-key", keys.public("broker"))
    assert stranger.returncode != 0 and "refused this key" in stranger.stderr
    assert "--allow-subscribers" in stranger.stderr and "camera_frame" not in stranger.stdout
    with Subscriber([endpoint], ["camera/front"]) as plain:  # a plaintext subscriber over TCP: nothing
        with pytest.raises(TimeoutError):
            plain.wait("camera/front", timeout=1.0)
    with Subscriber(["camera_front"], ["camera/front"]) as local:  # its ipc endpoint on this host stays as it is
        assert local.wait("camera/front", timeout=5.0).message.image.shape == (48, 64, 3)
    with Subscriber([endpoint], ["camera/front"], keys=keys.client("lab", server="broker")) as remote:
        assert remote.wait("camera/front", timeout=5.0).message.camera == "front"


def test_a_robot_host_runs_over_curve_and_a_refused_actuator_stops_at_once(secured, keys, processes):
    broker, _ = secured
    processes.start_node("arm", "--max-step", "100")
    processes.start_node("actuator", "--broker", broker.frontend, "--service", "svc", "--ttl", "1.0",
                         *keys.worker_options("lab"))  # robot id: the key's name, as the broker requires
    with Subscriber(["actuator"], ["command"]) as commands:
        wait_for(lambda: (c := commands.latest("command")) and not c.message.hold, what="a moving command")
    refused = processes.start(CHUNKBUS, "--log-json", "actuator", "--broker", broker.frontend, "--service", "svc",
                              "--name", "stranger", *keys.worker_options("stranger"), script=True)
    exits_permanently(refused, "refused this key")
    with BrokerClient(broker.frontend, keys=keys.client("other")) as client:
        assert client.status().services["svc"].outcomes["ok"] > 0


def test_the_shipped_gpu_host_file_runs_secured_with_keys_from_its_folder(processes, tmp_path):
    from chunkbus.bus.security import new_key_pair

    folder = tmp_path / "keys"  # the layout configs/gpu_workers.yaml and the README describe
    for name, allowed in (("broker", None), ("worker", "workers"), ("so101", "robots")):
        public, _ = new_key_pair(name, folder)
        if allowed:
            (folder / allowed).mkdir()
            (folder / allowed / public.name).write_bytes(public.read_bytes())
    port = free_port()
    env = {"KEYS": str(folder), "FRONTEND_PORT": str(port), "BACKEND_PORT": str(free_port()), "METRICS_PORT": "0",
           "POLICY": WORKER, "DEVICE": "cpu", "SERVICE": "svc"}
    repo = Path(__file__).resolve().parent.parent
    processes.start(str(Path(CHUNKBUS).parent / "launch"), str(repo / "configs/gpu_workers.yaml"), script=True,
                    env=env)
    robot = ClientKeys(read_key_pair(folder / "so101.key_secret"), read_public_key(str(folder / "broker.key")))
    with BrokerClient(f"tcp://127.0.0.1:{port}", keys=robot, connect_timeout=30) as client:
        wait_for(lambda: client.status().services.get("svc"), timeout=60, what="the worker")
        assert isinstance(client.request("svc", request("r1", "so101"), timeout=10), ActionChunk)
    text, _ = refusal(f"tcp://127.0.0.1:{port}", None)
    assert "requires CURVE" in text
