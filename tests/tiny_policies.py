"""Small LeRobot policies with random weights for the tests, saved like a user's checkpoint,
and what loading one that is wrong says."""

from __future__ import annotations

from pathlib import Path

import pytest

from chunkbus.nodes.policies import LoadOptions, PolicyLoadError, load_policy
from chunkbus.nodes.policies.demo import ACTION_SIZE, CAMERAS, save_random_policy

__all__ = ["ACTION_SIZE", "CAMERAS", "hub_settings", "load_error", "save_tiny_policy"]

IMAGE_SHAPE = (3, 96, 128)  # C, H, W

# Small enough to run on a laptop CPU in a test.
OPTIONS = {
    "act": dict(chunk_size=20, n_action_steps=20, dim_model=64, n_heads=2, dim_feedforward=128,
                n_encoder_layers=1, n_decoder_layers=1, use_vae=False),
    "diffusion": dict(n_obs_steps=2, horizon=16, n_action_steps=8, down_dims=(32, 64),
                      diffusion_step_embed_dim=32, num_inference_steps=3, crop_shape=(84, 112),
                      spatial_softmax_num_keypoints=8),
    "vqbet": dict(n_obs_steps=5, n_action_pred_token=3, action_chunk_size=5, vqvae_n_embed=8,
                  vqvae_embedding_dim=32, vqvae_enc_hidden_dim=32, gpt_n_layer=1, gpt_n_head=2,
                  gpt_hidden_dim=64, gpt_input_dim=64, gpt_output_dim=64, spatial_softmax_num_keypoints=8,
                  crop_shape=(84, 112)),
}


def save_tiny_policy(policy_type: str, folder: Path) -> Path:
    # VQBet takes one camera; the others take both. Requests always carry both.
    cameras = CAMERAS[:1] if policy_type == "vqbet" else CAMERAS
    return save_random_policy(policy_type, folder, IMAGE_SHAPE, cameras, **OPTIONS[policy_type])


def load_error(spec: str, device: str = "cpu", **options) -> str:
    """What load_policy says of a policy it cannot load, in this process: a worker process
    (nodes/cli.py) runs the same call and prints a PolicyLoadError as its one `Error:` line,
    exiting EXIT_PERMANENT, which a few tests check through the CLI. Starting a worker for
    each message would cost seconds of importing torch and lerobot."""
    with pytest.raises(PolicyLoadError) as raised:  # anything else would be a traceback
        load_policy(spec, device, LoadOptions(**options))
    message = str(raised.value)
    assert "\n" not in message and message.count("`") % 2 == 0 and message.endswith("."), message
    return message


def hub_settings(monkeypatch, offline: bool = True, cache: Path | None = None, endpoint: str | None = None):
    """What HF_HUB_OFFLINE, HF_HOME (its hub cache) and HF_ENDPOINT would set in a fresh worker
    process: huggingface_hub reads them once, at import, so in this process they are patched."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)
    if cache is not None:
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache / "hub"))
    if endpoint is not None:
        monkeypatch.setattr(constants, "ENDPOINT", endpoint)
