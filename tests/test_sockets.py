"""Publisher and subscriber across real processes, over ipc and tcp; the endpoint convention."""

from __future__ import annotations

import time

import numpy as np
import pytest
import zmq
from helpers.publish import image_for, state_for

from chunkbus.bus import ArmState, CameraFrame, JpegImage, encode
from chunkbus.bus.endpoints import EndpointError, list_publishers, publisher_endpoint, resolve
from chunkbus.bus.sockets import Publisher, Subscriber


def check_stream(subscriber: Subscriber, topic: str, count: int = 5) -> list[int]:
    """Receive `count` newer messages of `topic` and check their content against their seq."""
    seqs = []
    newer_than = -1.0
    for _ in range(count):
        received = subscriber.wait(topic, timeout=10, newer_than=newer_than)
        newer_than = received.receive_time
        message = received.message
        seqs.append(message.seq)
        if topic == "state":
            assert isinstance(message, ArmState)
            np.testing.assert_array_equal(message.positions, state_for(message.seq))
            assert message.names == [f"joint{i}" for i in range(6)]
        else:
            image = message.image.decode() if isinstance(message.image, JpegImage) else message.image
            expected = image_for(message.seq)
            assert image.shape == expected.shape
            assert np.abs(image.astype(int) - expected).max() <= 2  # JPEG of a flat image
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs), seqs
    return seqs


def test_ipc_publisher_in_another_process_is_found_by_name(runtime_dir, processes):
    publisher = processes.helper("publish.py", "armsim")
    endpoints = processes.first_line_json(publisher)["endpoints"]
    assert endpoints == [f"ipc://{runtime_dir}/armsim.pub"]
    assert [(p.node, p.endpoint, p.live) for p in list_publishers()] == [
        ("armsim", endpoints[0], True)
    ]
    with Subscriber(["armsim"], ["state", "camera/"]) as subscriber:  # a node name resolves
        check_stream(subscriber, "state")
        check_stream(subscriber, "camera/front")
        assert subscriber.rejected == 0


@pytest.mark.parametrize("jpeg", [False, True], ids=["raw", "jpeg"])
def test_tcp_publisher_in_another_process(runtime_dir, processes, jpeg):
    args = ["cam", "--tcp", "--no-ipc"] + (["--jpeg"] if jpeg else [])
    publisher = processes.helper("publish.py", *args)
    (endpoint,) = processes.first_line_json(publisher)["endpoints"]
    assert endpoint.startswith("tcp://127.0.0.1:")
    with Subscriber([endpoint], ["camera/front"]) as subscriber:
        check_stream(subscriber, "camera/front")
        assert subscriber.topics_seen() == ["camera/front"]  # not subscribed to state


def test_subscriber_keeps_only_the_newest_and_its_age(runtime_dir):
    with Publisher("pub") as publisher, Subscriber(["pub"], ["state"]) as subscriber:
        state = ArmState("arm", 0, 0.0, ["a"], np.zeros(1, np.float32))
        deadline = time.monotonic() + 10
        while subscriber.latest("state") is None and time.monotonic() < deadline:
            publisher.publish("state", state)  # until the subscription has propagated
            time.sleep(0.01)
        # A burst within the high-water marks (past them, PUB drops the newest, not the oldest).
        for seq in range(1, 11):
            publisher.publish("state", ArmState("arm", seq, 0.0, ["a"], np.zeros(1, np.float32)))
        deadline = time.monotonic() + 10
        while subscriber.latest("state").message.seq != 10 and time.monotonic() < deadline:
            time.sleep(0.01)
        latest = subscriber.latest("state")
        assert latest.message.seq == 10
        time.sleep(0.05)
        assert latest.age >= 0.05
        assert subscriber.latest("camera/front") is None


def test_malformed_messages_are_counted_and_do_not_stop_the_subscriber(runtime_dir):
    with Subscriber([publisher_endpoint("raw")], ["state"]) as subscriber:
        context = zmq.Context.instance()
        raw = context.socket(zmq.PUB)
        raw.bind(publisher_endpoint("raw"))
        try:
            good = encode(ArmState("arm", 1, 0.0, ["a"], np.ones(1, np.float32)))
            deadline = time.monotonic() + 10
            while subscriber.latest("state") is None and time.monotonic() < deadline:
                raw.send_multipart([b"state", *good])
                time.sleep(0.01)
            truncated = encode(CameraFrame("front", 0, 0.0, np.zeros((100, 100, 3), np.uint8)))[:1]
            for garbage in ([b"state"], [b"state", b"\xc1garbage"], [b"state", *truncated]):
                raw.send_multipart(garbage)
                time.sleep(0.02)  # one at a time, so none is drained away as older
            deadline = time.monotonic() + 10
            while subscriber.rejected < 3 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert subscriber.rejected == 3
            newer = subscriber.latest("state").receive_time
            raw.send_multipart([b"state", *encode(ArmState("arm", 2, 0.0, ["a"], np.ones(1, np.float32)))])
            assert subscriber.wait("state", timeout=10, newer_than=newer).message.seq == 2
        finally:
            raw.close(linger=0)


def test_every_message_reaches_on_message(runtime_dir):
    seen = []
    # A burst of 100 fits both high-water marks, so nothing may be dropped on the way.
    with Publisher("all", sndhwm=1000) as publisher, Subscriber(
        ["all"], on_message=seen.append, rcvhwm=1000
    ):
        while not seen:
            publisher.publish("state", ArmState("arm", 0, 0.0, ["a"], np.zeros(1, np.float32)))
            time.sleep(0.01)
        first = len(seen)
        for seq in range(1, 101):
            publisher.publish("state", ArmState("arm", seq, 0.0, ["a"], np.zeros(1, np.float32)))
        deadline = time.monotonic() + 10
        while seen[-1].message.seq != 100 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert [r.message.seq for r in seen[first:]] == list(range(1, 101))


def test_a_running_node_name_cannot_be_taken(runtime_dir):
    with Publisher("camera_front"):
        with pytest.raises(EndpointError, match="in use by a running node"):
            Publisher("camera_front")


def test_stale_endpoint_of_a_dead_process_is_listed_and_reused(runtime_dir, processes):
    publisher = processes.helper("publish.py", "ghost")
    processes.first_line_json(publisher)
    publisher.kill()
    publisher.wait()
    assert [(p.node, p.live) for p in list_publishers()] == [("ghost", False)]
    with Publisher("ghost"):  # a dead process's socket file is no obstacle
        assert [(p.node, p.live) for p in list_publishers()] == [("ghost", True)]


def test_endpoint_errors_are_clear(runtime_dir, monkeypatch):
    with pytest.raises(EndpointError, match="node name 'bad name' is not valid"):
        publisher_endpoint("bad name")
    with pytest.raises(EndpointError, match="unknown transport"):
        resolve("udp://host:1")
    assert resolve("tcp://gpu:5555") == "tcp://gpu:5555"
    monkeypatch.setenv("CHUNKBUS_RUNTIME_DIR", str(runtime_dir / ("x" * 120)))
    with pytest.raises(EndpointError, match="set CHUNKBUS_RUNTIME_DIR to a shorter directory"):
        publisher_endpoint("arm")


def test_subscriber_wait_times_out_with_a_clear_message(runtime_dir):
    with Subscriber(["nobody"], ["state"]) as subscriber:
        with pytest.raises(TimeoutError, match="no message on topic 'state'.*is the publishing node running"):
            subscriber.wait("state", timeout=0.2)
