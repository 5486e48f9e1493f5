"""The broker and workers as real processes over real sockets."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import threading
import time
import urllib.request

import numpy as np
import pytest
import zmq
from mdp_peers import CHUNKBUS, RawClient, RawWorker, kill, start_broker, start_worker, wait_for

from chunkbus.bus import ActionChunk, ErrorReply, Observation, ObservationRequest, decode, mdp
from chunkbus.bus.client import BrokerClient, RequestFailed
from chunkbus.bus.worker_link import take_batch


def request(request_id: str, tick: int = 0, priority: int = 0, ttl=None, key=None, robot="robot") -> ObservationRequest:
    return ObservationRequest(
        robot_id=robot,
        request_id=request_id,
        tick=tick,
        fps=30.0,
        send_time=time.monotonic(),
        task="test",
        observations=[Observation(tick=tick, time=time.monotonic(), state=np.zeros(6, np.float32))],
        priority=priority,
        ttl=ttl,
        replace_key=key,
    )


def request_id_of(body: list[bytes]) -> str:
    return decode(body).request_id


def answers(client: BrokerClient, count: int, timeout: float = 10.0) -> dict[str, object]:
    """Receive `count` replies: {request id: message}; fails on a second answer to one id."""
    got: dict[str, object] = {}
    deadline = time.monotonic() + timeout
    while len(got) < count and (remaining := deadline - time.monotonic()) > 0:
        reply = client.receive(remaining)
        if reply is None:
            break
        assert reply.message.request_id not in got, f"answered twice: {reply.message.request_id}"
        got[reply.message.request_id] = reply.message
    return got


@pytest.fixture
def broker(processes):
    return start_broker(processes)


@pytest.fixture
def client(broker):
    with BrokerClient(broker.frontend) as c:
        yield c


def registered(client: BrokerClient, service: str, workers: int = 1) -> bool:
    service_status = client.status().services.get(service)
    return (service_status.workers if service_status else None) == workers


def test_priority_first_then_fifo(broker, client):
    worker = RawWorker(broker.backend, "svc")  # a plain RFC 7 worker: capacity 1
    wait_for(lambda: registered(client, "svc"), what="worker registration")
    client.send("svc", request("busy"))
    assert [request_id_of(b) for b in worker.receive()] == ["busy"]
    for name, priority in [("b0", 0), ("c5", 5), ("d0", 0), ("e5", 5), ("f9", 9)]:
        client.send("svc", request(name, priority=priority))
    wait_for(lambda: client.status().services["svc"].queued == 5, what="five queued")
    order = []
    for _ in range(6):
        worker.answer()
        order += [request_id_of(b) for b in worker.receive()]
    assert order == ["f9", "c5", "e5", "b0", "d0"]
    assert set(answers(client, 6)) == {"busy", "f9", "c5", "e5", "b0", "d0"}
    worker.close()


def test_expired_requests_are_answered_and_never_run(broker, client):
    worker = RawWorker(broker.backend, "svc")
    wait_for(lambda: registered(client, "svc"), what="worker registration")
    client.send("svc", request("busy"))
    worker.receive()
    sent = time.monotonic()
    client.send("svc", request("short", ttl=0.2))
    got = answers(client, 1)
    assert isinstance(got["short"], ErrorReply) and got["short"].code == "expired"
    assert time.monotonic() - sent < 2.0  # answered at its expiry, not when a worker freed up
    worker.answer()
    assert worker.receive(timeout=0.5) == []  # the expired request never reached the worker
    assert isinstance(answers(client, 1)["busy"], ObservationRequest)  # the raw worker echoes
    worker.close()


def test_a_new_request_supersedes_the_queued_one_with_its_key(broker, client):
    worker = RawWorker(broker.backend, "svc")
    wait_for(lambda: registered(client, "svc"), what="worker registration")
    client.send("svc", request("busy", key="robot"))
    worker.receive()
    client.send("svc", request("old", key="robot"))
    client.send("svc", request("other", key="another-robot"))
    client.send("svc", request("new", key="robot"))
    got = answers(client, 1)
    assert got["old"].code == "superseded" and "'new'" in got["old"].message
    order = []
    for _ in range(3):
        worker.answer()
        order += [request_id_of(b) for b in worker.receive(timeout=1)]
    assert order == ["other", "new"]  # the running request was not superseded
    assert set(answers(client, 3)) == {"busy", "other", "new"}
    worker.close()


def test_a_full_queue_rejects_at_once(processes):
    broker = start_broker(processes, "--max-queue", "2")
    with BrokerClient(broker.frontend) as client:
        worker = RawWorker(broker.backend, "svc")
        wait_for(lambda: registered(client, "svc"), what="worker registration")
        for name in ("busy", "q1", "q2", "q3"):
            client.send("svc", request(name))
        got = answers(client, 1)
        assert got["q3"].code == "rejected" and "full (2 requests)" in got["q3"].message
        worker.close()


def test_a_worker_is_given_work_only_when_idle_as_many_as_its_capacity(broker, client):
    workers = [RawWorker(broker.backend, "svc", {"capacity": c, "name": f"w{c}"}) for c in (1, 2, 3)]
    wait_for(lambda: registered(client, "svc", 3), what="three workers")
    for i in range(7):
        client.send("svc", request(f"r{i}"))
    # The idle worker with the most capacity first; a busy one is given nothing more.
    held = [[request_id_of(b) for b in w.receive(timeout=3)] for w in workers]
    assert held == [["r2"], ["r1"], ["r0"]]
    status = client.status().services["svc"]
    assert (status.queued, status.running, status.capacity) == (4, 3, 6)
    for w in workers:
        assert w.receive(timeout=0.3) == []  # busy: the rest wait at the broker
    workers[2].answer()  # idle again: a batch as large as its capacity
    assert [request_id_of(b) for b in workers[2].receive(count=3)] == ["r3", "r4", "r5"]
    for w in workers:
        w.close()


def test_a_high_priority_request_never_waits_behind_a_low_one_at_a_worker(broker, client):
    worker = RawWorker(broker.backend, "svc", {"capacity": 2, "name": "batching"})
    wait_for(lambda: registered(client, "svc"), what="worker registration")
    client.send("svc", request("low1"))
    assert [request_id_of(b) for b in worker.receive()] == ["low1"]
    for name, priority in (("low2", 0), ("low3", 0), ("high", 10)):
        client.send("svc", request(name, priority=priority))
    wait_for(lambda: client.status().services["svc"].queued == 3, what="three queued")
    assert worker.receive(timeout=0.3) == []  # it has a free slot, but it is running low1
    worker.answer()
    assert [request_id_of(b) for b in worker.receive(count=2)] == ["high", "low2"]
    worker.close()


def test_equal_workers_take_turns(broker, client):
    workers = [RawWorker(broker.backend, "svc", {"capacity": 1, "name": f"w{i}"}) for i in range(3)]
    wait_for(lambda: registered(client, "svc", 3), what="three workers")
    served_by = []
    for i in range(9):
        client.send("svc", request(f"r{i}"))
        for index, w in enumerate(workers):
            if w.receive(timeout=0.2):
                served_by.append(index)
                w.answer()
                break
        assert answers(client, 1)
    assert served_by[3:] == served_by[:3] * 2 and sorted(served_by[:3]) == [0, 1, 2]
    for w in workers:
        w.close()


def test_worker_batches_the_requests_that_waited(broker, client, processes):
    start_worker(processes, broker.backend, "scripted:sine?delay=0.5", "--service", "svc", "--max-batch", "4")
    wait_for(lambda: registered(client, "svc"), what="worker registration")
    client.send("svc", request("first"))
    time.sleep(0.2)  # the first one is running now
    for i in range(4):
        client.send("svc", request(f"later{i}"))
    got = answers(client, 5, timeout=10)
    sizes = {rid: m.timings["batch_size"] for rid, m in got.items()}
    # They wait in the broker while the first runs, then run as one batch (its capacity, 4).
    assert sizes == {"first": 1, "later0": 4, "later1": 4, "later2": 4, "later3": 4}


def test_a_worker_waits_for_the_rest_of_the_batch_the_broker_gave_at_once():
    context = zmq.Context.instance()
    link, pipe = context.socket(zmq.PAIR), context.socket(zmq.PAIR)
    link.bind("inproc://take-batch")
    pipe.connect("inproc://take-batch")
    try:
        link.send_multipart([mdp.batch_ticket(1, 2), b"first"])  # two more follow, a moment later
        later = threading.Timer(0.05, lambda: [link.send_multipart([mdp.batch_ticket(n, 2 - n), b"later"])
                                               for n in (1, 2)])
        later.start()
        assert [len(take_batch(pipe, 4, timeout=10))] == [3]
        later.join()
        link.send_multipart([mdp.batch_ticket(4, 1), b"alone"])  # its batch's rest was lost
        assert [body[1].bytes for body in take_batch(pipe, 4, timeout=0.05)] == [b"alone"]
    finally:
        link.close(linger=0)
        pipe.close(linger=0)


def test_a_dead_worker_is_noticed_and_its_requests_run_elsewhere(broker, client):
    silent = RawWorker(broker.backend, "svc", {"capacity": 1, "name": "silent"})
    wait_for(lambda: registered(client, "svc"), what="registration")
    client.send("svc", request("stranded"))
    assert silent.receive()  # it holds the request and then falls silent
    healthy = RawWorker(broker.backend, "svc", {"capacity": 1, "name": "healthy"})
    start = time.monotonic()
    while not (bodies := healthy.receive(timeout=0.2)):
        healthy.heartbeat()
        assert time.monotonic() - start < 5, "the silent worker was never dropped"
    assert 1.0 < time.monotonic() - start < 3.0  # liveness 3 x 0.5 s
    assert request_id_of(bodies[0]) == "stranded"
    healthy.answer()
    assert set(answers(client, 1)) == {"stranded"}
    silent.answer()  # the late reply from the dropped worker is discarded, not delivered
    assert client.receive(0.5) is None
    assert wait_for(lambda: client.status().counters["late_replies"] == 1, what="late reply count")
    silent.close()
    healthy.close()


def test_a_long_inference_is_not_a_dead_worker(broker, client, processes):
    start_worker(processes, broker.backend, "scripted:constant?delay=2.5", "--service", "slow")
    wait_for(lambda: registered(client, "slow"), what="registration")
    chunk = client.request("slow", request("long"), timeout=10)
    assert isinstance(chunk, ActionChunk) and chunk.timings["inference"] >= 2.5
    assert registered(client, "slow")  # never dropped while the model ran


def test_sigkilled_worker_every_request_answered_exactly_once(broker, client, processes):
    victims = [
        start_worker(processes, broker.backend, "scripted:sine?delay=0.2", "--service", "svc", "--max-batch", "2")
        for _ in range(2)
    ]
    wait_for(lambda: registered(client, "svc", 2), what="two workers")
    ids = [f"r{i}" for i in range(30)]
    for i, rid in enumerate(ids):  # from ten robots: within each one's bound (--max-per-robot)
        client.send("svc", request(rid, ttl=4.0 if i % 2 else None, robot=f"robot{i % 10}"))
    time.sleep(0.5)
    kill(victims[0])  # with requests in flight
    got = answers(client, len(ids), timeout=20)
    assert sorted(got) == sorted(ids), f"lost: {set(ids) - set(got)}"
    outcomes = {type(m).__name__ if isinstance(m, ActionChunk) else m.code for m in got.values()}
    assert outcomes <= {"ActionChunk", "failed", "expired"}
    assert client.receive(1.0) is None  # and nothing is answered twice
    assert wait_for(lambda: registered(client, "svc", 1), what="the dead worker's removal")


def test_a_restarted_broker_is_found_again_by_workers_and_clients(processes):
    broker = start_broker(processes)
    start_worker(processes, broker.backend, "scripted:sine", "--service", "svc")
    with BrokerClient(broker.frontend) as client:
        wait_for(lambda: registered(client, "svc"), what="registration")
        assert isinstance(client.request("svc", request("before"), timeout=5), ActionChunk)
        kill(broker.process)
        start_broker(processes, frontend=broker.frontend, backend=broker.backend)
        # The same worker re-registers and the same client goes on, neither restarted.
        wait_for(lambda: registered(client, "svc"), timeout=15, what="re-registration")
        assert isinstance(client.request("svc", request("after"), timeout=5), ActionChunk)


def test_garbage_on_both_sockets_leaves_the_broker_serving(broker, client, processes):
    start_worker(processes, broker.backend, "scripted:sine", "--service", "svc")
    wait_for(lambda: registered(client, "svc"), what="registration")
    rng = random.Random(7)
    context = zmq.Context.instance()
    sockets = []
    for endpoint in (broker.frontend, broker.backend):
        for kind in (zmq.DEALER, zmq.DEALER, zmq.REQ):
            s = context.socket(kind)
            s.setsockopt(zmq.LINGER, 0)
            s.connect(endpoint)
            sockets.append(s)
    prefixes = [[], [b""], [b"", b"MDPC01"], [b"", b"MDPW01"], [b"", b"MDPW01", b"\x03"],
                [b"", b"MDPW01", b"\x01"], [b"", b"MDPC01", b"svc"], [b"", b"MDPW01", b"\x09"]]
    for _ in range(300):
        s = rng.choice(sockets)
        frames = rng.choice(prefixes) + [rng.randbytes(rng.randint(0, 40)) for _ in range(rng.randint(0, 4))]
        if s.type == zmq.REQ:
            s.close(linger=0)  # a REQ socket sends once; replace it
            sockets.remove(s)
            s = context.socket(zmq.REQ)
            s.setsockopt(zmq.LINGER, 0)
            s.connect(rng.choice((broker.frontend, broker.backend)))
            sockets.append(s)
        s.send_multipart(frames or [b""])
    assert isinstance(client.request("svc", request("valid"), timeout=10), ActionChunk)

    def both_counted():  # the garbage travels on connections of its own: it may still be on its way
        counters = client.status().counters
        return counters["malformed_frontend"] > 0 and counters["malformed_backend"] > 0

    assert wait_for(both_counted, timeout=10, what="malformed messages counted on both sockets")
    assert broker.process.poll() is None
    for s in sockets:
        s.close(linger=0)


def test_rfc7_client_and_worker_talk_through_the_broker(broker):
    client = RawClient(broker.frontend)
    worker = RawWorker(broker.backend, "echo")  # no chunkbus fields anywhere
    client.send("mmi.service", b"echo")
    deadline = time.monotonic() + 5
    while (reply := client.receive()) == [b"mmi.service", b"404"] and time.monotonic() < deadline:
        client.send("mmi.service", b"echo")  # until READY has arrived
    assert reply == [b"mmi.service", b"200"]
    client.send("mmi.service", b"nobody")
    assert client.receive() == [b"mmi.service", b"404"]
    client.send("mmi.unknown", b"")
    assert client.receive() == [b"mmi.unknown", b"501"]
    client.send("echo", b"hello", b"world")
    assert worker.receive() == [[b"hello", b"world"]]
    worker.answer([b"HELLO", b"WORLD"])
    assert client.receive() == [b"echo", b"HELLO", b"WORLD"]
    client.close()
    worker.close()


def test_status_command_and_metrics_endpoint(processes):
    broker = start_broker(processes, "--metrics-port", "0")
    start_worker(processes, broker.backend, "scripted:sine", "--service", "svc", "--max-batch", "2")
    with BrokerClient(broker.frontend) as client:
        wait_for(lambda: registered(client, "svc"), what="registration")
        for i in range(5):
            client.request("svc", request(f"r{i}"), timeout=5)
    result = subprocess.run(
        [CHUNKBUS, "status", "--broker", broker.frontend], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stderr
    row = next(line for line in result.stdout.splitlines() if line.startswith("svc "))
    assert row.split()[:6] == ["svc", "1", "2", "0", "0", "5"]
    base = f"http://127.0.0.1:{broker.metrics_port}"
    time.sleep(0.6)  # the metrics snapshot is refreshed once per heartbeat
    metrics = urllib.request.urlopen(f"{base}/metrics", timeout=5).read().decode()
    assert 'chunkbus_requests_total{outcome="ok",service="svc"} 5.0' in metrics
    assert 'chunkbus_workers{service="svc"} 1.0' in metrics
    assert 'chunkbus_latency_seconds{quantile="0.99",service="svc",stage="service"}' in metrics
    health = json.loads(urllib.request.urlopen(f"{base}/health", timeout=5).read())
    assert health["status"] == "ok" and health["services"] == ["svc"]


def test_ping_reports_latency_and_chunk_shape_or_a_diagnosis(broker, processes):
    def ping(*args):
        result = subprocess.run(
            [CHUNKBUS, "ping", "--broker", *args], capture_output=True, text=True, timeout=60
        )
        return result.returncode, result.stdout + result.stderr

    code, out = ping("tcp://127.0.0.1:1", "--service", "svc", "--timeout", "1")
    assert code == 1 and "no broker answered at tcp://127.0.0.1:1" in out
    code, out = ping(broker.frontend, "--service", "svc")
    assert code == 1 and "has no service 'svc' (services: none)" in out
    start_worker(processes, broker.backend, "scripted:sine?chunk=25&actions=7", "--service", "svc")
    code, out = ping(broker.frontend, "--service", "svc", "-n", "5")
    assert code == 0, out
    assert "chunk shape 25 actions x 7 values" in out and "round trip over 5: p50" in out


def test_client_errors_are_clear(broker, client, processes):
    start_worker(processes, broker.backend, "scripted:sine", "--service", "svc")
    wait_for(lambda: registered(client, "svc"), what="registration")
    with pytest.raises(RequestFailed, match="expired"):
        # Not even a worker is free for a zero ttl.
        client.request("nobody", request("x", ttl=0.0), timeout=5)
    with pytest.raises(TimeoutError, match="no answer to request 'y'"):
        client.request("nobody", request("y"), timeout=0.3)
    with BrokerClient("tcp://127.0.0.1:1", connect_timeout=0.2) as nowhere:
        with pytest.raises(ConnectionError, match="no broker at tcp://127.0.0.1:1"):
            nowhere.send("svc", request("z"))


def test_the_broker_stops_cleanly_and_answers_what_it_held(broker, client):
    worker = RawWorker(broker.backend, "svc")
    wait_for(lambda: registered(client, "svc"), what="registration")
    client.send("svc", request("running"))
    worker.receive()
    client.send("svc", request("queued"))
    time.sleep(0.2)
    broker.process.send_signal(signal.SIGTERM)
    got = answers(client, 2)
    assert {rid: m.code for rid, m in got.items()} == {"running": "failed", "queued": "failed"}
    assert broker.process.wait(timeout=10) == 0
    worker.close()


def test_worker_errors_are_counted_apart(broker, client):
    from chunkbus.bus import encode

    worker = RawWorker(broker.backend, "svc")
    wait_for(lambda: registered(client, "svc"), what="registration")
    client.send("svc", request("bad"))
    worker.receive()
    worker.answer(encode(ErrorReply("bad", "bad_request", "missing camera")))
    assert answers(client, 1)["bad"].code == "bad_request"
    client.send("svc", request("good"))
    worker.receive()
    worker.answer()  # echoes the request: a chunkbus message that is not an error
    assert set(answers(client, 1)) == {"good"}
    outcomes = client.status().services["svc"].outcomes
    assert (outcomes["worker_error"], outcomes["ok"]) == (1, 1)
    worker.close()


def test_mmi_model_says_what_a_service_serves(broker, client, processes):
    assert client.model("svc") is None  # no worker yet
    plain = RawWorker(broker.backend, "plain")  # an RFC 7 worker describes no model
    wait_for(lambda: registered(client, "plain"), what="the plain worker")
    assert client.model("plain") is None
    plain.close()
    start_worker(processes, broker.backend, "scripted:sine?actions=4&chunk=7", "--service", "svc")
    model = wait_for(lambda: client.model("svc"), what="the worker's READY at the broker")
    assert (model.type, model.name, model.action_size, model.chunk_size, model.scripted) == (
        "scripted:sine", "scripted:sine", 4, 7, True)
    assert client.status().services["svc"].model.to_wire() == model.to_wire()
