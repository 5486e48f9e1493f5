"""Small LeRobot policies with random weights for the tests, saved like a user's checkpoint."""

from __future__ import annotations

from pathlib import Path

from chunkbus.nodes.policies.demo import ACTION_SIZE, CAMERAS, save_random_policy

__all__ = ["ACTION_SIZE", "CAMERAS", "save_tiny_policy"]

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
