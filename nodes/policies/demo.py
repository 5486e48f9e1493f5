"""LeRobot policies with random weights, saved like a user's checkpoint.

The demo serves one (`--policy demo:act`) when the user names no checkpoint of their own,
and the tests build small ones. Each is built from lerobot's own config class, given
made-up dataset statistics for its normalisers, and saved with save_pretrained (policy
and processors) into a folder, which a worker loads like any trained checkpoint.
"""

from __future__ import annotations

import os
from pathlib import Path

from ...bus.log import get_logger

STATE_SIZE = 6
ACTION_SIZE = 6
CAMERAS = ("observation.images.front", "observation.images.wrist")
DEMO_IMAGE_SHAPE = (3, 240, 320)  # C, H, W: the demo's synthetic cameras send 320x240
DEMO_VERSION = 1  # bump to rebuild cached demo policies


def save_random_policy(
    policy_type: str, folder: Path, image_shape=DEMO_IMAGE_SHAPE, cameras=CAMERAS, seed: int = 0, **options
) -> Path:
    import torch
    from lerobot.configs.types import FeatureType, PolicyFeature
    from lerobot.policies import get_policy_class, make_policy_config, make_pre_post_processors

    torch.manual_seed(seed)
    inputs = {"observation.state": PolicyFeature(FeatureType.STATE, (STATE_SIZE,))}
    inputs.update({camera: PolicyFeature(FeatureType.VISUAL, tuple(image_shape)) for camera in cameras})
    config = make_policy_config(
        policy_type,
        input_features=inputs,
        output_features={"action": PolicyFeature(FeatureType.ACTION, (ACTION_SIZE,))},
        pretrained_backbone_weights=None,  # nothing to download
        device="cpu",
        **options,
    )
    vector = {"mean": torch.zeros(STATE_SIZE), "std": torch.full((STATE_SIZE,), 20.0),
              "min": torch.full((STATE_SIZE,), -100.0), "max": torch.full((STATE_SIZE,), 100.0)}
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


def demo_checkpoint(kind: str) -> str:
    """The cached demo checkpoint for `kind` (only "act"), made on first use."""
    if kind != "act":
        raise ValueError(f"no demo policy {kind!r}: the demo has demo:act")
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "chunkbus"
    folder = cache / f"demo-{kind}-v{DEMO_VERSION}"
    log = get_logger()
    if not (folder / "model.safetensors").exists():
        log.info("making the demo policy once", folder=str(folder))
        partial = folder.with_name(folder.name + f".partial-{os.getpid()}")
        save_random_policy(kind, partial, chunk_size=50, n_action_steps=50)
        partial.rename(folder)  # atomic: a half-written folder is never used
    log.warning(
        "serving an UNTRAINED demo ACT policy with random weights: the arm will move, but "
        "not usefully. Serve your own with POLICY=/path/to/checkpoint (make demo) or --policy",
        folder=str(folder),
    )
    return str(folder)
