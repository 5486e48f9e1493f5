"""π0, π0.5 and π0-FAST checkpoints as lerobot saves them (config and processors), without weights.

At full size these policies are 2-3 B parameters, too big to build in a test; what the tests
check of them (the language path, offline assets, relative actions) lives in the config and
the processors. lerobot builds their processors with the PaliGemma tokenizer (and π0-FAST's
FAST action tokenizer) from the Hub: here a small tokenizer made locally stands in while they
are built, and the saved files name the hub tokenizers exactly as a real checkpoint does.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import torch

from chunkbus.nodes.policies.demo import ACTION_SIZE, CAMERAS, STATE_SIZE

IMAGE_SHAPE = (3, 64, 64)


def stats() -> dict:
    vector = {"mean": torch.zeros(STATE_SIZE), "std": torch.ones(STATE_SIZE), "min": -torch.ones(STATE_SIZE),
              "max": torch.ones(STATE_SIZE), "q01": -torch.ones(STATE_SIZE), "q99": torch.ones(STATE_SIZE),
              "q10": -torch.ones(STATE_SIZE) * 0.8, "q90": torch.ones(STATE_SIZE) * 0.8}
    image = {"mean": torch.full((3, 1, 1), 0.5), "std": torch.full((3, 1, 1), 0.25),
             "min": torch.zeros((3, 1, 1)), "max": torch.ones((3, 1, 1))}
    return {"observation.state": vector, "action": vector, **{camera: image for camera in CAMERAS}}


def pi_config(kind: str, **options):
    from lerobot.configs.types import FeatureType, PolicyFeature
    from lerobot.policies import make_policy_config

    inputs = {"observation.state": PolicyFeature(FeatureType.STATE, (STATE_SIZE,))}
    inputs.update({camera: PolicyFeature(FeatureType.VISUAL, IMAGE_SHAPE) for camera in CAMERAS})
    return make_policy_config(kind, input_features=inputs, device="cpu",
                              output_features={"action": PolicyFeature(FeatureType.ACTION, (ACTION_SIZE,))}, **options)


@contextlib.contextmanager
def stand_in_tokenizers(tokenizer: Path):
    """While building processors: `tokenizer` loads wherever a hub tokenizer is named, and an
    empty object stands in for π0-FAST's FAST action tokenizer (remote code on the Hub)."""
    import lerobot.processor.tokenizer_processor as tokenizer_processor
    from transformers import AutoTokenizer

    local = SimpleNamespace(from_pretrained=lambda name, *args, **kwargs: AutoTokenizer.from_pretrained(tokenizer))
    fast = SimpleNamespace(from_pretrained=lambda name, *args, **kwargs: SimpleNamespace())
    with mock.patch.object(tokenizer_processor, "AutoTokenizer", local), \
            mock.patch.object(tokenizer_processor, "AutoProcessor", fast):
        yield


def pi_processors(config, tokenizer: Path):
    """lerobot's pre- and post-processor for `config`, built with `tokenizer` standing in for the hub's."""
    from lerobot.policies import make_pre_post_processors

    with stand_in_tokenizers(tokenizer):
        return make_pre_post_processors(config, dataset_stats=stats())


def save_pi_checkpoint(kind: str, folder: Path, tokenizer: Path, **options) -> Path:
    """A `kind` checkpoint folder (config.json and the processor files, no model.safetensors)."""
    config = pi_config(kind, **options)
    preprocessor, postprocessor = pi_processors(config, tokenizer)
    folder.mkdir(parents=True, exist_ok=True)
    config._save_pretrained(folder)
    preprocessor.save_pretrained(folder)
    postprocessor.save_pretrained(folder)
    return folder
