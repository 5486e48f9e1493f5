"""Small LeRobot policies with random weights, saved like a user's checkpoint.

Each is built from lerobot's own config class, given made-up dataset statistics for
its normalisers, and saved with save_pretrained (policy and processors) into a folder,
which the worker then loads through the same code path as a trained checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import torch

STATE_SIZE = 6
ACTION_SIZE = 6
CAMERAS = ("observation.images.front", "observation.images.wrist")
IMAGE_SHAPE = (3, 96, 128)  # C, H, W

# Small enough to run on a laptop CPU in a test; no pretrained backbone download.
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
    from lerobot.configs.types import FeatureType, PolicyFeature
    from lerobot.policies import get_policy_class, make_policy_config, make_pre_post_processors

    torch.manual_seed(0)
    inputs = {"observation.state": PolicyFeature(FeatureType.STATE, (STATE_SIZE,))}
    # VQBet takes one camera; the others take both. Requests always carry both.
    cameras = CAMERAS[:1] if policy_type == "vqbet" else CAMERAS
    inputs.update({camera: PolicyFeature(FeatureType.VISUAL, IMAGE_SHAPE) for camera in cameras})
    config = make_policy_config(
        policy_type,
        input_features=inputs,
        output_features={"action": PolicyFeature(FeatureType.ACTION, (ACTION_SIZE,))},
        pretrained_backbone_weights=None,
        device="cpu",
        **OPTIONS[policy_type],
    )
    vector = {"mean": torch.zeros(STATE_SIZE), "std": torch.ones(STATE_SIZE),
              "min": -torch.ones(STATE_SIZE) * 100, "max": torch.ones(STATE_SIZE) * 100}
    image = {"mean": torch.full((3, 1, 1), 0.5), "std": torch.full((3, 1, 1), 0.25),
             "min": torch.zeros((3, 1, 1)), "max": torch.ones((3, 1, 1))}
    stats = {"observation.state": vector, "action": vector, **{camera: image for camera in cameras}}
    policy = get_policy_class(policy_type)(config)
    preprocessor, postprocessor = make_pre_post_processors(config, dataset_stats=stats)
    folder.mkdir(parents=True, exist_ok=True)
    policy.save_pretrained(folder)
    preprocessor.save_pretrained(folder)
    postprocessor.save_pretrained(folder)
    return folder
