"""Language-conditioned policies (SmolVLA, π0, π0.5, π0-FAST): the task reaches the model.

A tiny SmolVLA (random weights, its VLM config and tokenizer made locally) runs for real,
over a broker. π0, π0.5 and π0-FAST are 2-3 B parameters: their processors (the language
path, relative actions) and their loading errors are checked here, the models themselves
by scripts/bench_models.py on a GPU.
"""

from __future__ import annotations

import os
import subprocess
import time

import numpy as np
import pytest
import structlog.testing
import torch
from mdp_peers import CHUNKBUS, start_broker, start_worker, wait_for
from pi_checkpoints import IMAGE_SHAPE, pi_config, pi_processors, save_pi_checkpoint, stand_in_tokenizers
from tiny_policies import ACTION_SIZE, CAMERAS, hub_settings, load_error

from chunkbus.bus import ActionChunk, Observation, ObservationRequest
from chunkbus.bus.client import BrokerClient, RequestFailed
from chunkbus.bus.endpoints import capture_topic
from chunkbus.bus.lifecycle import EXIT_PERMANENT
from chunkbus.bus.sockets import Subscriber
from chunkbus.nodes.policies import LoadOptions
from chunkbus.nodes.policies.demo import save_random_smolvla, save_text_tokenizer
from chunkbus.nodes.policies.lerobot import ImageFold, Inputs, LerobotPolicy, fold_images, postprocess, preprocess

OFFLINE = {"HF_HUB_OFFLINE": "1"}
SMOLVLA_CHUNK = 10  # the tiny SmolVLA's chunk_size


@pytest.fixture(scope="module")
def smolvla(tmp_path_factory):
    return save_random_smolvla(tmp_path_factory.mktemp("smolvla") / "checkpoint")


@pytest.fixture(scope="module")
def loaded(smolvla):
    """The tiny SmolVLA loaded as a worker loads it, its flow noise the same on every call: a
    difference between two chunks comes from their inputs alone."""
    policy = LerobotPolicy(str(smolvla), "cpu", LoadOptions(max_batch=3))
    noise = torch.randn(1, policy.config.chunk_size, policy.config.max_action_dim)
    policy.policy.model.sample_noise = lambda shape, device: noise.expand(shape[0], -1, -1).clone()
    return policy


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return save_text_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="module")
def pi_checkpoints(tokenizer, tmp_path_factory):
    """π0, π0.5 and π0-FAST checkpoints as saved (no weights), by kind."""
    root = tmp_path_factory.mktemp("pi")
    return {kind: save_pi_checkpoint(kind, root / kind, tokenizer) for kind in ("pi0", "pi05", "pi0_fast")}


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """HF_HUB_OFFLINE=1 and an empty Hugging Face cache, as a worker started with them sees them."""
    hub_settings(monkeypatch, offline=True, cache=tmp_path / "empty-cache")


def request(request_id: str, task: str, seed: int = 0, shape=(96, 128)) -> ObservationRequest:
    rng = np.random.default_rng(seed)
    images = {camera: rng.integers(0, 256, (*shape, 3), dtype=np.uint8) for camera in CAMERAS}
    observation = Observation(tick=5, time=time.monotonic(), state=rng.standard_normal(6).astype(np.float32),
                              images=images)
    return ObservationRequest(robot_id="so101", request_id=request_id, tick=5, fps=30.0,
                              send_time=time.monotonic(), task=task, observations=[observation])


# --- SmolVLA, for real ---------------------------------------------------------------------


def test_a_tiny_smolvla_is_served_over_the_broker_and_needs_a_task(smolvla, processes):
    broker = start_broker(processes)
    start_worker(processes, broker.backend, str(smolvla), "--max-batch", "2")
    with BrokerClient(broker.frontend) as client:
        service = wait_for(lambda: client.status().services.get("smolvla"), timeout=60, what="the smolvla worker")
        assert service.model.needs_task and service.model.type == "smolvla" and service.model.dtype == "float32"
        reply = client.request("smolvla", request("a", "pick up the red cube"), timeout=60)
        assert isinstance(reply, ActionChunk), reply
        assert reply.actions.shape == (SMOLVLA_CHUNK, ACTION_SIZE) and np.isfinite(reply.actions).all()
        assert reply.guided_delay is None and reply.unguided == ""
        guided = request("g", "pick up the red cube")
        guided.prefix, guided.expected_delay = reply.actions[:6].copy(), 3
        reply = client.request("smolvla", guided, timeout=60)
        assert (reply.guided_delay, reply.guided_horizon) == (3, 6) and service.model.rtc is not None
        with pytest.raises(RequestFailed) as failed:
            client.request("smolvla", request("b", ""), timeout=60)
    refused = failed.value.error
    assert refused.code == "bad_request"
    assert "language-conditioned and the request has no task" in refused.message and "--task" in refused.message
    ping = subprocess.run([CHUNKBUS, "ping", "--broker", broker.frontend, "--service", "smolvla"],
                          capture_output=True, text=True, timeout=60)
    assert ping.returncode == 0 and f"chunk shape {SMOLVLA_CHUNK} actions x {ACTION_SIZE} values" in ping.stdout, (
        ping.stdout + ping.stderr)
    status = subprocess.run([CHUNKBUS, "status", "--broker", broker.frontend], capture_output=True, text=True,
                            timeout=60).stdout
    described = f"smolvla:checkpoint (chunk {SMOLVLA_CHUNK}, {ACTION_SIZE} actions, cpu, float32, needs a task, rtc)"
    assert described in status, status


def test_each_task_in_a_batch_conditions_its_own_chunk(loaded):
    policy = loaded
    cube, towel = request("cube", "pick up the red cube"), request("towel", "fold the towel")
    alone = [policy.run([r]).results[0].actions for r in (cube, towel)]
    together = [result.actions for result in policy.run([cube, towel]).results]
    assert np.abs(alone[0] - alone[1]).max() > 1e-3, "the task does not reach the model"
    for single, batched in zip(alone, together):
        np.testing.assert_allclose(batched, single, atol=1e-4)  # members are not mixed up


def test_the_worker_answers_a_request_without_a_task_with_its_default_task(smolvla):
    policy = LerobotPolicy(str(smolvla), "cpu", LoadOptions(default_task="stack the blue cups"))
    result = policy.run([request("a", "")]).results[0]
    assert result.error is None and result.actions.shape == (SMOLVLA_CHUNK, ACTION_SIZE)


def logged(events: list[dict]) -> str:
    return "\n".join(str(event["event"]) for event in events)


def test_bfloat16_runs_where_the_cpu_has_it_and_float16_falls_back_saying_why(smolvla):
    flags = open("/proc/cpuinfo").read()
    with structlog.testing.capture_logs() as events:
        half = LerobotPolicy(str(smolvla), "cpu", LoadOptions(dtype="float16"))
    if "avx512_fp16" not in flags and "amx_fp16" not in flags:
        assert half.describe().dtype == "float32"
        assert "this CPU has no float16 instructions" in logged(events)
    if "avx512_bf16" in flags or "amx_bf16" in flags:
        bf16 = LerobotPolicy(str(smolvla), "cpu", LoadOptions(dtype="bfloat16"))
        assert bf16.describe().dtype == "bfloat16" and next(bf16.policy.parameters()).dtype == torch.bfloat16
        result = bf16.run([request("a", "open the drawer")]).results[0]
        assert result.actions.dtype == np.float32 and np.isfinite(result.actions).all()


def test_compile_without_a_compiler_is_a_logged_fallback(smolvla, monkeypatch):
    monkeypatch.setenv("CXX", "/nonexistent/g++")
    with structlog.testing.capture_logs() as events:
        policy = LerobotPolicy(str(smolvla), "cpu", LoadOptions(compile=True))
    assert policy.describe().compiled is False
    assert "--compile needs a C++ compiler (/nonexistent/g++" in logged(events)


# --- the actuator and the task ---------------------------------------------------------------


def test_the_actuator_needs_a_task_and_the_task_changes_while_the_robot_runs(smolvla, runtime_dir, processes):
    broker = start_broker(processes)
    start_worker(processes, broker.backend, str(smolvla))
    processes.start_node("arm")
    for camera in ("front", "wrist"):
        processes.start_node("camera", "--name", camera, "--width", "128", "--height", "96")
    robot = ["--broker", broker.frontend, "--service", "smolvla", "--camera", "front", "--camera", "wrist"]
    untasked = processes.start(CHUNKBUS, "--log-json", "actuator", *robot, script=True)
    assert untasked.wait(timeout=60) == EXIT_PERMANENT
    time.sleep(0.2)
    log = "".join(untasked.log_lines)
    assert log.count("smolvla is language-conditioned and this actuator has no task: give it --task") == 1, log
    tasks = []
    with Subscriber(["broker"], [capture_topic("request", "smolvla")], rcvhwm=1000,
                    on_message=lambda r: tasks.append(r.message.task)):
        actuator = processes.start_node("actuator", *robot, "--task", "open the drawer")
        wait_for(lambda: "open the drawer" in tasks, timeout=60, what="a request with the first task")
        changed = subprocess.run([CHUNKBUS, "task", "fold the towel"], capture_output=True, text=True, timeout=30)
        assert changed.returncode == 0, changed.stderr
        assert "task 'fold the towel' from tick" in changed.stdout and "(was 'open the drawer')" in changed.stdout
        wait_for(lambda: "fold the towel" in tasks, timeout=60, what="a request with the new task")
    assert "fold the towel" not in tasks[: tasks.index("fold the towel")]
    assert "open the drawer" not in tasks[tasks.index("fold the towel"):], "an old task came back"
    processes.wait_log(actuator, '"task changed"')
    empty = subprocess.run([CHUNKBUS, "task", ""], capture_output=True, text=True, timeout=30)
    assert empty.returncode != 0 and "the task cannot be empty" in empty.stderr


def test_changing_the_task_of_an_actuator_that_does_not_run_names_it(runtime_dir):
    result = subprocess.run([CHUNKBUS, "task", "--actuator", "nobody", "fold"], capture_output=True, text=True,
                            timeout=30)
    assert result.returncode == 1 and "no node 'nobody' answers" in result.stderr, result.stderr


# --- π0.5: the prompt is per batch member, relative actions come back absolute -----------------


def batch_of(states: list[np.ndarray]) -> list[list]:
    """Histories of one (state, images) step each."""
    _, height, width = IMAGE_SHAPE
    return [[(state.astype(np.float32), {c: np.zeros((height, width, 3), np.uint8) for c in CAMERAS})]
            for state in states]


@pytest.mark.parametrize("kind", ["smolvla", "pi0", "pi05", "pi0_fast"])
def test_folded_camera_frames_reach_a_vla_as_lerobots_pipeline_gives_them(kind, loaded, tokenizer):
    """Their tokenizer and relative-action steps run before the normaliser; images are not normalised."""
    if kind == "smolvla":
        preprocessor, inputs, fold = loaded.preprocessor, loaded.inputs, loaded.images
    else:
        config = pi_config(kind, use_relative_actions=True)
        preprocessor, inputs = pi_processors(config, tokenizer)[0], Inputs.of(config)
        fold = fold_images(preprocessor, inputs, "cpu")
    assert isinstance(fold, ImageFold), fold
    rng = np.random.default_rng(0)
    batch = [[(rng.standard_normal(6).astype(np.float32),
               {k: rng.integers(0, 256, (h, w, c), dtype=np.uint8) for k, (c, h, w) in inputs.image_shapes.items()})]
             for _ in range(2)]
    tasks = ["pick up the cube", "fold the towel"]
    theirs = preprocess(preprocessor, inputs, batch, tasks)[0]
    ours = preprocess(preprocessor, inputs, batch, tasks, fold)[0]
    assert theirs.keys() == ours.keys()
    for key, value in theirs.items():
        torch.testing.assert_close(ours[key], value, rtol=1e-5, atol=1e-5, msg=key)


def test_pi05_tokenizes_one_prompt_per_batch_member(tokenizer):
    from transformers import AutoTokenizer

    config = pi_config("pi05")
    preprocessor, _ = pi_processors(config, tokenizer)
    tasks = ["pick up the red cube", "fold the towel", "open the drawer"]
    steps = preprocess(preprocessor, Inputs.of(config), batch_of([np.zeros(6)] * 3), tasks)
    tokens = steps[0]["observation.language.tokens"]
    assert tokens.shape[0] == 3
    prompts = AutoTokenizer.from_pretrained(tokenizer).batch_decode(tokens, skip_special_tokens=True)
    for task, prompt in zip(tasks, prompts):
        assert task in prompt.lower() and all(other not in prompt.lower() for other in set(tasks) - {task}), prompts


@pytest.mark.parametrize("kind", ["pi0", "pi05", "pi0_fast"])
def test_a_relative_action_checkpoint_answers_absolute_actions_anchored_on_each_newest_state(kind, tokenizer,
                                                                                             tmp_path):
    from lerobot.policies import make_pre_post_processors

    folder = save_pi_checkpoint(kind, tmp_path / kind, tokenizer, use_relative_actions=True)
    config = pi_config(kind, use_relative_actions=True)
    with stand_in_tokenizers(tokenizer):  # loaded back from the saved files, as the worker does
        preprocessor, postprocessor = make_pre_post_processors(config, pretrained_path=str(folder))
    states = [np.arange(6) * 10.0, -np.arange(6) * 5.0]
    preprocess(preprocessor, Inputs.of(config), batch_of(states), ["fold the towel"] * 2)
    predicted = torch.zeros(2, 4, 6)  # the model's normalised offsets: "stay where you are"
    actions = postprocess(postprocessor, predicted)
    assert actions.shape == (2, 4, 6)
    for member, state in zip(actions, states):
        np.testing.assert_allclose(member, np.broadcast_to(state, (4, 6)), atol=1e-5)


# --- loading offline: each missing asset is named, with the fix ---------------------------------
# The messages come from the loader the worker CLI calls (load_error, in this process); one test
# runs the CLI itself, for its exit status and the options that point the tokenizers.


def worker_error(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run([CHUNKBUS, "worker", "--broker", "127.0.0.1:9", *args], capture_output=True, text=True,
                            timeout=120, env={**os.environ, **OFFLINE, **(env or {})})
    assert result.returncode == EXIT_PERMANENT, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    return result


def test_the_worker_points_both_tokenizers_where_its_options_say_and_exits_permanently(pi_checkpoints, tokenizer,
                                                                                          tmp_path):
    # Offline, without --tokenizer or --action-tokenizer reaching the loader, a hub tokenizer
    # would be named missing first; past both, this checkpoint's lack of weights is said.
    env = {"HF_HOME": str(tmp_path / "empty-cache")}
    error = worker_error("--policy", str(pi_checkpoints["pi0_fast"]), "--tokenizer", str(tokenizer),
                         "--action-tokenizer", str(tokenizer), env=env).stderr
    lines = [line for line in error.splitlines() if line.startswith("Error: ")]
    assert len(lines) == 1 and "has a config.json but no model.safetensors" in lines[0], error


@pytest.mark.parametrize("kind", ["pi0", "pi05", "pi0_fast"])
def test_a_missing_tokenizer_offline_is_named_with_the_option_and_the_download(kind, pi_checkpoints, tokenizer,
                                                                               offline):
    folder = str(pi_checkpoints[kind])
    error = load_error(folder)
    assert f"The {kind} checkpoint needs `google/paligemma-3b-pt-224`, the tokenizer that turns the task" in error
    assert "HF_HUB_OFFLINE is set" in error and "`hf download google/paligemma-3b-pt-224`" in error
    assert "`--tokenizer DIR`" in error
    if kind != "pi0_fast":
        return  # π0-FAST's path goes on through both options (the same code for all three)
    error = load_error(folder, tokenizer=str(tokenizer))
    assert "needs `lerobot/fast-action-tokenizer`, the FAST tokenizer" in error
    assert "--action-tokenizer DIR" in error
    error = load_error(folder, tokenizer=str(tokenizer), action_tokenizer=str(tokenizer))
    # Past the tokenizers: this test checkpoint has no weights, which is said, not served at random.
    assert "has a config.json but no model.safetensors" in error, error


def test_a_missing_vlm_offline_is_named(smolvla, tmp_path, offline):
    import json

    broken = tmp_path / "smolvla"
    broken.mkdir()
    for path in smolvla.iterdir():
        if path.is_file():
            (broken / path.name).write_bytes(path.read_bytes())
    config = json.loads((broken / "config.json").read_text())
    config["vlm_model_name"] = "HuggingFaceTB/SmolVLM2-500M-Video-Instruct"  # what a real checkpoint names
    (broken / "config.json").write_text(json.dumps(config))
    error = load_error(str(broken))
    assert "needs `HuggingFaceTB/SmolVLM2-500M-Video-Instruct`, its vision-language model's config" in error, error
    assert "--tokenizer DIR" in error


def test_a_missing_groot_base_model_offline_is_named(tmp_path, offline):
    config = pi_config("groot")  # GR00T builds on NVIDIA's base checkpoint, fetched from the Hub
    config._save_pretrained(tmp_path)
    error = load_error(str(tmp_path))
    assert f"The groot checkpoint needs `{config.base_model_path}`, the GR00T base model" in error, error
    assert f"`hf download {config.base_model_path}`" in error


def test_a_tokenizer_option_a_policy_does_not_read_is_an_error(tokenizer, tmp_path, offline):
    from tiny_policies import save_tiny_policy

    act = save_tiny_policy("act", tmp_path / "act")
    error = load_error(str(act), tokenizer=str(tokenizer))
    assert "--tokenizer was given, but this act checkpoint reads no such tokenizer" in error


# --- real-time chunking: the chunk is guided towards the robot's prefix -----------------------


def test_a_guided_smolvla_chunk_agrees_with_its_prefix_far_better_than_an_unguided_one(loaded):
    policy = loaded
    rtc = policy.describe().rtc
    assert rtc is not None and rtc.flow_steps == policy.config.num_steps and rtc.schedule == "LINEAR"
    free = policy.run([request("a", "fold the towel")]).results[0]
    assert free.guided is None
    prefix = (free.actions[:6] + np.linspace(3, 6, 6)[:, None]).astype(np.float32)  # somewhere else, in raw units
    asked = request("a", "fold the towel")
    asked.prefix, asked.expected_delay = prefix, 3
    guided = policy.run([asked]).results[0]
    assert guided.guided == (3, 6)
    guided_error = np.abs(guided.actions[:3] - prefix[:3]).max()
    free_error = np.abs(free.actions[:3] - prefix[:3]).max()
    assert guided_error < free_error / 10, (guided_error, free_error)
    # A batch of two (delay, horizon) groups and an unguided request: each as it is alone.
    other = request("b", "open the drawer", seed=1)
    other.prefix, other.expected_delay = prefix[:4], 2
    plain = request("c", "stack the blue cups", seed=2)
    together = policy.run([asked, other, plain]).results
    assert [r.guided for r in together] == [(3, 6), (2, 4), None]
    for result, alone in zip(together, (asked, other, plain)):
        np.testing.assert_allclose(result.actions, policy.run([alone]).results[0].actions, atol=1e-4)


@pytest.mark.parametrize("change, field", [
    (lambda r: setattr(r, "prefix", np.zeros((6, 5), np.float32)), "prefix: its rows have 5 values"),
    (lambda r: r.prefix.__setitem__((0, 0), np.nan), "prefix: it has non-finite values"),
    (lambda r: setattr(r, "expected_delay", 7), "expected_delay: 7 is outside 1..6"),
    (lambda r: setattr(r, "prefix", np.zeros((11, 6), np.float32)), "prefix: 11 rows; the model's chunk has 10"),
    (lambda r: setattr(r, "expected_delay", None), "prefix was sent without expected_delay"),
])
def test_a_wrong_prefix_is_a_bad_request_naming_the_field(loaded, change, field):
    policy = loaded
    wrong = request("a", "fold the towel")
    wrong.prefix, wrong.expected_delay = np.zeros((6, 6), np.float32), 3
    change(wrong)
    result = policy.run([wrong, request("b", "fold the towel")]).results
    assert field in str(result[0].error) and result[1].error is None and result[1].actions is not None
