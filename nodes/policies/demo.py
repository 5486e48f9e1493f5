"""LeRobot policies with random weights, saved like a user's checkpoint.

The demo serves one (`--policy demo:act`, or the language-conditioned `demo:smolvla`) when
the user names no checkpoint of their own, and the tests and benchmarks build others. Each
is built from lerobot's own config class, given made-up dataset statistics for its
normalisers, and saved with save_pretrained (policy and processors) into a folder, which a
worker loads like any trained checkpoint.

SmolVLA is built on a vision-language model that lerobot fetches from the Hub
(SmolVLM2-500M); `save_random_smolvla` makes that model's config and a small tokenizer
locally instead, in the checkpoint's `vlm/` folder, so nothing is downloaded.
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
    import dataclasses

    import torch
    from lerobot.configs.policies import PreTrainedConfig
    from lerobot.configs.types import FeatureType, PolicyFeature
    from lerobot.policies import get_policy_class, make_policy_config, make_pre_post_processors

    torch.manual_seed(seed)
    config_fields = {f.name for f in dataclasses.fields(PreTrainedConfig.get_choice_class(policy_type))}
    if "pretrained_backbone_weights" in config_fields:
        options.setdefault("pretrained_backbone_weights", None)  # an ImageNet ResNet: nothing to download
    inputs = {"observation.state": PolicyFeature(FeatureType.STATE, (STATE_SIZE,))}
    inputs.update({camera: PolicyFeature(FeatureType.VISUAL, tuple(image_shape)) for camera in cameras})
    config = make_policy_config(
        policy_type,
        input_features=inputs,
        output_features={"action": PolicyFeature(FeatureType.ACTION, (ACTION_SIZE,))},
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


# SmolVLM2-500M-Video-Instruct's published dimensions ("full", what SmolVLA is built on),
# and a tiny model of the same shape of parts that runs in a test on a laptop CPU.
VLM_SIZES = {
    "full": dict(
        text=dict(hidden_size=960, intermediate_size=2560, num_hidden_layers=32, num_attention_heads=15,
                  num_key_value_heads=5, head_dim=64, vocab_size=49280, max_position_embeddings=8192),
        vision=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                    image_size=512, patch_size=16),
        scale_factor=4, image_seq_len=64,
        smolvla=dict(num_vlm_layers=16, resize_imgs_with_padding=(512, 512)),
    ),
    "tiny": dict(
        text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, vocab_size=512, max_position_embeddings=512),
        vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                    image_size=64, patch_size=8),
        scale_factor=2, image_seq_len=16,
        smolvla=dict(num_vlm_layers=4, self_attn_every_n_layers=2, resize_imgs_with_padding=(64, 64),
                     chunk_size=10, n_action_steps=10, max_state_dim=8, max_action_dim=8,
                     tokenizer_max_length=16),
    ),
}
_VLM_SPECIAL_TOKENS = {  # what SmolVLMProcessor looks up by name
    "fake_image_token": "<fake_token_around_image>", "image_token": "<image>", "global_image_token": "<global-img>",
    "end_of_utterance_token": "<end_of_utterance>", "video_token": "<video>",
}
_TASK_WORDS = ["pick up the red cube and put it in the box", "push the green block to the left",
               "stack the blue cups", "open the drawer", "fold the towel", "hand me the screwdriver"]


def save_text_tokenizer(folder: Path, vocab_size: int = 400, **special_tokens: str) -> Path:
    """A small byte-level BPE tokenizer, trained here on a few task sentences, saved as
    transformers saves one: it stands in for a hub tokenizer (PaliGemma's, SmolVLM's)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<eos>", *special_tokens.values()]
    tokenizer = Tokenizer(models.BPE(unk_token="<pad>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(_TASK_WORDS * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", unk_token="<pad>",
                                   eos_token="<eos>", extra_special_tokens=special_tokens)
    fast.save_pretrained(folder)
    return folder


def save_random_vlm(folder: Path, size: str = "tiny") -> Path:
    """A SmolVLM config and processor (tokenizer, image processor) of `size`, no weights:
    what SmolVLA reads from its `vlm_model_name` when it does not load the VLM's weights."""
    from transformers import AutoTokenizer, SmolVLMConfig, SmolVLMProcessor
    from transformers.models.smolvlm import SmolVLMImageProcessor
    from transformers.models.smolvlm.video_processing_smolvlm import SmolVLMVideoProcessor

    dims = VLM_SIZES[size]
    save_text_tokenizer(folder, **_VLM_SPECIAL_TOKENS)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    config = SmolVLMConfig(text_config=dict(model_type="llama", **dims["text"]), vision_config=dims["vision"],
                           scale_factor=dims["scale_factor"], image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
                           vocab_size=dims["text"]["vocab_size"])
    config.save_pretrained(folder)
    edge = {"longest_edge": dims["vision"]["image_size"]}
    processor = SmolVLMProcessor(image_processor=SmolVLMImageProcessor(size=edge, max_image_size=edge),
                                 tokenizer=tokenizer, video_processor=SmolVLMVideoProcessor(),
                                 image_seq_len=dims["image_seq_len"])
    processor.save_pretrained(folder)
    return folder


def save_random_smolvla(folder: Path, size: str = "tiny", image_shape=(3, 96, 128), cameras=CAMERAS, seed: int = 0,
                        vlm_folder: Path | None = None, **options) -> Path:
    """A SmolVLA with random weights on a locally made VLM of `size` ("tiny" or "full"), kept
    in `vlm_folder` (the checkpoint's vlm/ by default): the checkpoint names its absolute path."""
    vlm = save_random_vlm(vlm_folder or folder / "vlm", size)
    options = {"load_vlm_weights": False, **VLM_SIZES[size]["smolvla"], **options}
    return save_random_policy("smolvla", folder, image_shape, cameras, seed, vlm_model_name=str(vlm), **options)


DEMO_POLICIES = {"act": "ACT", "smolvla": "SmolVLA"}  # kind -> its name in a sentence


def demo_checkpoint(kind: str) -> str:
    """The cached demo checkpoint for `kind` (act, or a tiny smolvla), made on first use."""
    if kind not in DEMO_POLICIES:
        raise ValueError(f"no demo policy {kind!r}: the demo has {', '.join('demo:' + k for k in DEMO_POLICIES)}")
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "chunkbus"
    folder = cache / f"demo-{kind}-v{DEMO_VERSION}"
    log = get_logger()
    if not (folder / "model.safetensors").exists():
        log.info("making the demo policy once", folder=str(folder))
        partial = folder.with_name(folder.name + f".partial-{os.getpid()}")
        if kind == "act":
            save_random_policy(kind, partial, chunk_size=50, n_action_steps=50)
        else:
            # The checkpoint names its VLM's absolute path: it must not move with the rename.
            vlm = folder.with_name(folder.name + "-vlm")
            save_random_smolvla(partial, image_shape=DEMO_IMAGE_SHAPE, vlm_folder=vlm)
        partial.rename(folder)  # atomic: a half-written folder is never used
    log.warning(
        f"serving an UNTRAINED demo {DEMO_POLICIES[kind]} policy with random weights: the arm will move, but "
        "not usefully. Serve your own with POLICY=/path/to/checkpoint (make demo) or --policy",
        folder=str(folder),
    )
    return str(folder)
