"""Workers serving real LeRobot policies (random weights, saved and loaded like a checkpoint)."""

from __future__ import annotations

import subprocess
import time

import numpy as np
import pytest
import torch

from chunkbus.bus import ActionChunk, ErrorReply, JpegImage, Observation, ObservationRequest
from chunkbus.bus.client import BrokerClient
from chunkbus.nodes.lerobot_policy import LerobotPolicy, letterbox
from mdp_peers import CHUNKBUS, start_broker, start_worker, wait_for
from tiny_policies import ACTION_SIZE, CAMERAS, save_tiny_policy

POLICIES = ("act", "diffusion", "vqbet")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("checkpoints")
    return {kind: save_tiny_policy(kind, root / kind) for kind in POLICIES}


def two_camera_request(request_id: str, steps: int, tick: int = 10, jpeg_wrist: bool = False, rng=None):
    rng = rng or np.random.default_rng(0)
    history = []
    for t in range(steps):
        images = {camera: rng.integers(0, 256, (480, 640, 3), dtype=np.uint8) for camera in CAMERAS}
        if jpeg_wrist:
            images[CAMERAS[1]] = JpegImage.encode(images[CAMERAS[1]])
        history.append(
            Observation(tick=tick - steps + 1 + t, time=time.monotonic(), state=rng.standard_normal(6).astype(np.float32), images=images)
        )
    return ObservationRequest(
        robot_id="so101", request_id=request_id, tick=tick, fps=30.0, send_time=time.monotonic(),
        task="pick", observations=history,
    )


@pytest.mark.parametrize("kind", POLICIES)
def test_worker_serves_a_lerobot_checkpoint(kind, checkpoints, processes):
    broker = start_broker(processes)
    start_worker(processes, broker.backend, str(checkpoints[kind]), "--max-batch", "2")
    with BrokerClient(broker.frontend) as client:
        service = wait_for(lambda: client.status()["services"].get(kind), timeout=60, what=f"{kind} worker")
        model = service["model"]  # the service name defaults to the policy's type
        assert model["type"] == kind and model["action_size"] == ACTION_SIZE
        steps = model["n_obs_steps"]
        assert steps == {"act": 1, "diffusion": 2, "vqbet": 5}[kind]
        chunk = client.request(kind, two_camera_request("ok", steps, jpeg_wrist=True), timeout=60)
        assert isinstance(chunk, ActionChunk)
        assert chunk.actions.shape == (model["chunk_size"], ACTION_SIZE)
        assert chunk.actions.dtype == np.float32 and np.isfinite(chunk.actions).all()
        assert chunk.tick == 10 and chunk.request_id == "ok"
        assert {"decode", "preprocess", "inference", "postprocess"} <= set(chunk.timings)

        # A bad request gets an error naming the problem; the worker keeps serving.
        bad = two_camera_request("bad", steps)
        del bad.observations[-1].images[CAMERAS[0]]
        client.send(kind, bad)
        reply = client.receive(60)
        error = reply.message
        assert isinstance(error, ErrorReply) and error.code == "bad_request"
        assert f"missing camera {CAMERAS[0]!r}" in error.message
        if steps > 1:
            short = two_camera_request("short", steps - 1)
            client.send(kind, short)
            error = client.receive(60).message
            assert error.code == "bad_request" and f"needs {steps} observations" in error.message
        wrong_state = two_camera_request("state", steps)
        wrong_state.observations[-1].state = np.zeros(4, np.float32)
        client.send(kind, wrong_state)
        error = client.receive(60).message
        assert error.code == "bad_request" and "state has 4 values" in error.message
        grey = two_camera_request("grey", steps)
        grey.observations[-1].images[CAMERAS[0]] = np.zeros((480, 640, 1), np.uint8)
        client.send(kind, grey)
        error = client.receive(60).message
        assert error.code == "bad_request" and f"{CAMERAS[0]} has 1 channels; the model needs 3" in error.message
        assert client.request(kind, two_camera_request("again", steps), timeout=60).actions.shape[1] == ACTION_SIZE


def test_diffusion_uses_the_whole_history(checkpoints):
    policy = LerobotPolicy(str(checkpoints["diffusion"]))
    request = two_camera_request("a", 2, rng=np.random.default_rng(1))
    changed_past = two_camera_request("b", 2, rng=np.random.default_rng(1))
    changed_past.observations[0].state = changed_past.observations[0].state + 5  # only the older step

    def actions(r):
        torch.manual_seed(0)  # the same diffusion noise each time
        return policy.run([r]).results[0].actions

    np.testing.assert_array_equal(actions(request), actions(request))
    assert not np.allclose(actions(request), actions(changed_past))


def test_a_batch_gives_what_each_request_gives_alone(checkpoints):
    policy = LerobotPolicy(str(checkpoints["act"]))  # ACT is deterministic
    requests = [two_camera_request(f"r{i}", 1, rng=np.random.default_rng(i)) for i in range(3)]
    together = policy.run(requests).results
    for request, result in zip(requests, together):
        np.testing.assert_allclose(result.actions, policy.run([request]).results[0].actions, rtol=1e-4, atol=1e-4)


def test_letterbox_keeps_the_aspect_ratio():
    image = np.full((480, 640, 3), 255, np.uint8)
    boxed = letterbox(image, 96, 96)
    assert boxed.shape == (96, 96, 3)
    assert (boxed[12:84] == 255).all()  # 640x480 -> 96x72, centred
    assert (boxed[:12] == 0).all() and (boxed[84:] == 0).all()


def test_worker_with_a_missing_checkpoint_is_a_clear_error(tmp_path):
    result = subprocess.run(
        [CHUNKBUS, "worker", "--policy", str(tmp_path / "nothing")], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 1
    assert f"no checkpoint folder {str(tmp_path / 'nothing')!r}" in result.stderr
    result = subprocess.run(
        [CHUNKBUS, "worker", "--policy", str(tmp_path)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 1 and "cannot read a LeRobot policy config" in result.stderr
    result = subprocess.run(
        [CHUNKBUS, "worker", "--policy", "scripted:zigzag"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 1 and "unknown scripted policy 'zigzag'" in result.stderr
