"""Workers serving real LeRobot policies (random weights, saved and loaded like a checkpoint)."""

from __future__ import annotations

import importlib.util
import os
import signal
import socket
import subprocess
import time

import numpy as np
import pytest
import torch
from mdp_peers import CHUNKBUS, start_broker, start_worker, wait_for
from safetensors.torch import save_file
from tiny_policies import ACTION_SIZE, CAMERAS, hub_settings, load_error, save_tiny_policy

from chunkbus.bus import ActionChunk, ErrorReply, JpegImage, Observation, ObservationRequest
from chunkbus.bus.client import BrokerClient
from chunkbus.bus.lifecycle import EXIT_PERMANENT
from chunkbus.nodes.images import letterbox
from chunkbus.nodes.policies import LoadOptions
from chunkbus.nodes.policies.lerobot import ImageFold, Inputs, LerobotPolicy, fold_images, preprocess

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
            Observation(
                tick=tick - steps + 1 + t,
                time=time.monotonic(),
                state=rng.standard_normal(6).astype(np.float32),
                images=images,
            )
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
        service = wait_for(lambda: client.status().services.get(kind), timeout=60, what=f"{kind} worker")
        model = service.model  # the service name defaults to the policy's type
        assert model.type == kind and model.action_size == ACTION_SIZE
        steps = model.n_obs_steps
        assert steps == {"act": 1, "diffusion": 2, "vqbet": 5}[kind]
        chunk = client.request(kind, two_camera_request("ok", steps, jpeg_wrist=True), timeout=60)
        assert isinstance(chunk, ActionChunk)
        assert chunk.actions.shape == (model.chunk_size, ACTION_SIZE)
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


def test_a_compiled_policy_answers_what_the_eager_one_does(checkpoints, monkeypatch):
    import torch._inductor.config as inductor

    # Inductor's vector instructions from the CPU's flags, unprobed: it otherwise checks each
    # with a Python subprocess importing torch, 10 s here before any of the model is compiled.
    monkeypatch.setattr(inductor.cpp, "vec_isa_ok", True)
    eager = LerobotPolicy(str(checkpoints["act"]))
    compiled = LerobotPolicy(str(checkpoints["act"]), "cpu", LoadOptions(compile=True))  # compiled before it returns
    assert compiled.describe().compiled and not eager.describe().compiled
    calls = []
    compiled_predict = compiled.compiled_predict
    compiled.compiled_predict = lambda *args, **kwargs: calls.append(1) or compiled_predict(*args, **kwargs)
    request = two_camera_request("a", 1)
    np.testing.assert_allclose(compiled.run([request]).results[0].actions, eager.run([request]).results[0].actions,
                               rtol=1e-4, atol=1e-4)
    assert calls == [1], "the request did not go through torch.compile's function"


def test_letterbox_keeps_the_aspect_ratio():
    image = np.full((480, 640, 3), 255, np.uint8)
    boxed = letterbox(image, 96, 96)
    assert boxed.shape == (96, 96, 3)
    assert (boxed[12:84] == 255).all()  # 640x480 -> 96x72, centred
    assert (boxed[:12] == 0).all() and (boxed[84:] == 0).all()


def worker_fails(policy: str, *options: str, env: dict | None = None, timeout: float = 120):
    """Run a worker that should not get as far as the broker; its result and seconds taken."""
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    start = time.monotonic()
    result = subprocess.run([CHUNKBUS, "worker", "--broker", "127.0.0.1:9", "--policy", policy, *options],
                            capture_output=True, text=True, timeout=timeout, env=environment)
    return result, time.monotonic() - start


def error_line(result: subprocess.CompletedProcess) -> str:
    """The one `Error:` line a configuration error gives: exit status EXIT_PERMANENT, no traceback."""
    assert result.returncode == EXIT_PERMANENT, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1, result.stderr
    assert errors[0].count("`") % 2 == 0 and errors[0].endswith("."), errors[0]
    return errors[0]


def test_a_worker_that_cannot_load_its_policy_exits_permanently_with_one_line(tmp_path, checkpoints):
    # Through the CLI here for a scripted policy (no torch to import), and for a LeRobot one in
    # test_an_uncached_hub_id_...; the other cases call the loader the CLI calls (load_error).
    result = worker_fails("scripted:zigzag")[0]
    assert result.returncode == EXIT_PERMANENT and "unknown scripted policy 'zigzag'" in result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    # No such folder.
    missing = tmp_path / "nothing"
    assert f"There is no checkpoint folder `{missing}`" in load_error(str(missing))
    # A folder that is not a LeRobot checkpoint.
    assert "Cannot read a LeRobot policy config from" in load_error(str(tmp_path))
    (tmp_path / "config.json").write_text('{"type": "no_such_policy"}')
    assert "is a `no_such_policy` policy, a type this lerobot does not know" in load_error(str(tmp_path))
    # A checkpoint missing its weights.
    broken = tmp_path / "no_weights"
    broken.mkdir()
    (broken / "config.json").write_text((checkpoints["act"] / "config.json").read_text())
    assert "model.safetensors" in load_error(str(broken))
    # Not a device.
    assert "`gpu` is not a torch device" in load_error(str(checkpoints["act"]), "gpu")
    assert "cuda:99" in load_error(str(checkpoints["act"]), "cuda:99")


def test_an_uncached_hub_id_fails_in_seconds_offline_saying_to_download_it(tmp_path):
    result, seconds = worker_fails("chunkbus-tests/no-such-model", env={"HF_HOME": str(tmp_path / "hf")})
    line = error_line(result)
    assert "Cannot fetch `chunkbus-tests/no-such-model` from the Hugging Face Hub" in line
    assert "HF_HUB_OFFLINE is set" in line and "`hf download chunkbus-tests/no-such-model`" in line
    assert "pass a local checkpoint folder" in line and "unset HF_HUB_OFFLINE" in line
    assert seconds < 20


def test_an_unreachable_hub_fails_in_seconds_saying_to_download_it(tmp_path, monkeypatch):
    # No network, as a refused local port: fails at once, not after huggingface_hub's retries.
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{closed.getsockname()[1]}"
    hub_settings(monkeypatch, offline=False, cache=tmp_path / "hf", endpoint=endpoint)
    start = time.monotonic()
    line = load_error("chunkbus-tests/no-such-model")
    assert f"{endpoint} cannot be reached" in line and "`hf download chunkbus-tests/no-such-model`" in line
    assert time.monotonic() - start < 20


@pytest.mark.skipif(importlib.util.find_spec("torchdiffeq") is not None, reason="lerobot[wallx] is installed")
def test_a_policy_whose_lerobot_extra_is_missing_exits_permanently(tmp_path, monkeypatch):
    # chunkbus installs the extras of the policies it tests (smolvla, pi, groot), not WALL-OSS's.
    from lerobot.configs.types import FeatureType, PolicyFeature
    from lerobot.policies import make_policy_config

    config = make_policy_config(
        "wall_x", input_features={"observation.state": PolicyFeature(FeatureType.STATE, (6,))},
        output_features={"action": PolicyFeature(FeatureType.ACTION, (6,))}, device="cpu",
    )
    config._save_pretrained(tmp_path)
    save_file({}, tmp_path / "model.safetensors")  # the extra is missing before any weight is read
    hub_settings(monkeypatch, offline=True)
    line = load_error(str(tmp_path))
    assert "The `wall_x` policy needs a library that is not installed" in line and "lerobot[wallx]" in line


def test_lerobot_prints_while_loading_become_one_structured_line(checkpoints, processes):
    worker = processes.start(CHUNKBUS, "worker", "--broker", "127.0.0.1:9", "--policy", str(checkpoints["act"]),
                             script=True, env={"HF_HUB_OFFLINE": "1"})
    processes.wait_log(worker, "worker ready", timeout=120)
    os.killpg(worker.pid, signal.SIGTERM)
    worker.wait(timeout=30)
    time.sleep(0.2)  # the reader thread's last lines
    stdout = worker.stdout.read()
    assert "Loading weights" not in stdout, stdout
    loading = [line for line in worker.log_lines if "Loading weights from local directory" in line]
    assert len(loading) == 1, "".join(worker.log_lines)
    assert "[info" in loading[0] and "component=lerobot" in loading[0] and "node=worker" in loading[0]


def test_a_policy_without_real_time_chunking_ignores_a_prefix_and_says_so(checkpoints):
    policy = LerobotPolicy(str(checkpoints["act"]))
    assert policy.describe().rtc is None
    request = two_camera_request("a", 1)
    plain = policy.run([request]).results[0].actions
    request.prefix, request.expected_delay = np.ones((5, ACTION_SIZE), np.float32), 2
    result = policy.run([request]).results[0]
    assert result.guided is None and "act cannot guide a chunk" in result.unguided
    np.testing.assert_allclose(result.actions, plain, atol=1e-5)


# --- camera frames folded into one pass: what the model gets is what lerobot's pipeline gives --


def assert_same_model_inputs(preprocessor, inputs, batch, tasks, fold):
    """The folded path against lerobot's own (x / 255 as float, then the whole pre-processor)."""
    assert isinstance(fold, ImageFold), fold
    theirs = preprocess(preprocessor, inputs, batch, tasks)
    ours = preprocess(preprocessor, inputs, batch, tasks, fold)
    for their_step, our_step in zip(theirs, ours, strict=True):
        assert their_step.keys() == our_step.keys()
        for key, value in their_step.items():
            assert our_step[key].dtype == value.dtype and our_step[key].shape == value.shape, key
            assert our_step[key].is_contiguous(), key
            torch.testing.assert_close(our_step[key], value, rtol=1e-5, atol=1e-5, msg=key)


def random_batch(inputs, members: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return [[(rng.standard_normal(inputs.state_size).astype(np.float32),
              {k: rng.integers(0, 256, (h, w, c), dtype=np.uint8) for k, (c, h, w) in inputs.image_shapes.items()})
             for _ in range(inputs.n_obs_steps)] for _ in range(members)]


@pytest.mark.parametrize("mode", ["MEAN_STD", "MIN_MAX", "IDENTITY", "QUANTILES"])
def test_folded_images_are_what_lerobots_normaliser_makes_of_them(mode):
    from lerobot.configs.types import FeatureType, NormalizationMode, PolicyFeature
    from lerobot.policies import make_policy_config, make_pre_post_processors

    features = {"observation.state": PolicyFeature(FeatureType.STATE, (6,))}
    features.update({camera: PolicyFeature(FeatureType.VISUAL, (3, 48, 64)) for camera in CAMERAS})
    config = make_policy_config("act", input_features=features, device="cpu", pretrained_backbone_weights=None,
                                output_features={"action": PolicyFeature(FeatureType.ACTION, (6,))},
                                normalization_mapping={"VISUAL": NormalizationMode(mode), "STATE": "MEAN_STD",
                                                       "ACTION": "MEAN_STD"})
    vector = {"mean": torch.ones(6), "std": torch.full((6,), 2.0)}
    image = {"mean": torch.tensor([0.2, 0.5, 0.7]), "std": torch.tensor([0.1, 0.3, 0.05]),
             "min": torch.tensor([0.0, 0.1, 0.2]), "max": torch.tensor([1.0, 0.8, 0.9]),
             "q01": torch.tensor([0.05, 0.1, 0.0]), "q99": torch.tensor([0.9, 0.95, 0.7])}
    stats = {"observation.state": vector, "action": vector, **{camera: image for camera in CAMERAS}}
    preprocessor, _ = make_pre_post_processors(config, dataset_stats=stats)
    inputs = Inputs.of(config)
    fold = fold_images(preprocessor, inputs, "cpu")
    assert_same_model_inputs(preprocessor, inputs, random_batch(inputs, 2), ["pick"] * 2, fold)


@pytest.mark.parametrize("kind", POLICIES)  # ACT and Diffusion normalise images by mean and std; VQBet does not
def test_a_loaded_checkpoints_model_gets_the_images_lerobots_pipeline_gives(kind, checkpoints):
    policy = LerobotPolicy(str(checkpoints[kind]))
    batch = random_batch(policy.inputs, 2, seed=3)
    assert_same_model_inputs(policy.preprocessor, policy.inputs, batch, ["pick"] * 2, policy.images)


def test_a_pre_processor_step_chunkbus_does_not_know_before_the_normaliser_keeps_lerobots_float_images(checkpoints):
    from lerobot.processor import IdentityProcessorStep

    policy = LerobotPolicy(str(checkpoints["act"]))
    pipeline = policy.preprocessor
    steps = list(pipeline.steps)
    pipeline.steps = [*steps[:1], IdentityProcessorStep(), *steps[1:]]  # it might read or change the images
    try:
        assert fold_images(pipeline, policy.inputs, "cpu") == "IdentityProcessorStep runs before the normaliser"
    finally:
        pipeline.steps = steps
