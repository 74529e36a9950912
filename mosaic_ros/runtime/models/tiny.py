"""Tiny random-weight builds of each family, for tests and offline runs.

Each is the family's real architecture at toy size (4 LM layers, hidden 128, 4 query heads,
2 KV heads, head_dim 32; a 2-layer vision tower) with a byte-level BPE tokenizer trained in
milliseconds on a built-in corpus plus the family's special tokens. The same seed gives the
same weights and the same tokenizer every time.
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    LlavaOnevisionConfig,
    PretrainedConfig,
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen3VLConfig,
)

QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
LLAVA_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>")

# Frames per token budget that keeps CPU tests fast: a 480x640 frame becomes 4x5 = 20 tokens.
TINY_FRAME_TOKENS = 24

_CORPUS = (
    "You are a helpful assistant.",
    "system user assistant",
    "What happened two minutes ago? What did the robot see at the door?",
    "Where is the red cup? The red cup is on the kitchen table next to the sink.",
    "A person walks into the room, picks up a box and leaves through the door.",
    "The robot turned left at the corridor and stopped in front of the elevator.",
    "Is the light on? Yes, the light in the hallway is on. No, it is off.",
    "How many people are in the room? There are two people and one dog.",
    "<t=0.0s> <t=1.5s> <t=12.5s> <t=120.0s> <t=3600.0s>",
    "<0.0 seconds> <2.5 seconds> <12.5 seconds> <61.0 seconds>",
    "0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 30 45 60 90 100",
    "first, then, after that, before, while, at the same time, finally",
    "green blue yellow white black chair bottle laptop window floor shelf",
)

_LM = {
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 32768,
    "initializer_range": 0.05,
}


def tiny_tokenizer(special_tokens: tuple[str, ...], vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on the built-in corpus; special tokens get ids 0..k-1."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_CORPUS, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )


def _padded_vocab(tokenizer: PreTrainedTokenizerFast) -> int:
    return -(-len(tokenizer) // 64) * 64


def _token_ids(tokenizer: PreTrainedTokenizerFast) -> dict[str, int]:
    vocab = tokenizer.get_vocab()
    return {
        "bos_token_id": vocab["<|endoftext|>"],
        "eos_token_id": vocab["<|im_end|>"],
        "pad_token_id": vocab["<|endoftext|>"],
    }


def qwen25_vl_config(tokenizer: PreTrainedTokenizerFast) -> Qwen2_5_VLConfig:
    """Qwen2.5-VL at toy size: patch 14, 2x2 merge, window attention in vision layer 0."""
    vocab = tokenizer.get_vocab()
    return Qwen2_5_VLConfig(
        text_config={
            **_LM,
            **_token_ids(tokenizer),
            "vocab_size": _padded_vocab(tokenizer),
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 6, 6]},
        },
        vision_config={
            "depth": 2,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_heads": 2,
            "out_hidden_size": _LM["hidden_size"],
            "patch_size": 14,
            "window_size": 56,
            "fullatt_block_indexes": [1],
        },
        image_token_id=vocab["<|image_pad|>"],
        video_token_id=vocab["<|video_pad|>"],
        vision_start_token_id=vocab["<|vision_start|>"],
        vision_end_token_id=vocab["<|vision_end|>"],
    )


def qwen3_vl_config(tokenizer: PreTrainedTokenizerFast) -> Qwen3VLConfig:
    """Qwen3-VL at toy size: patch 16, 2x2 merge, interleaved M-RoPE, deepstack from both vision
    layers into LM layers 0 and 1."""
    vocab = tokenizer.get_vocab()
    return Qwen3VLConfig(
        text_config={
            **_LM,
            **_token_ids(tokenizer),
            "head_dim": 32,
            "vocab_size": _padded_vocab(tokenizer),
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 10000.0,
                "mrope_section": [6, 5, 5],
                "mrope_interleaved": True,
            },
        },
        vision_config={
            "depth": 2,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_heads": 2,
            "out_hidden_size": _LM["hidden_size"],
            "patch_size": 16,
            "num_position_embeddings": 64,
            "deepstack_visual_indexes": [0, 1],
        },
        image_token_id=vocab["<|image_pad|>"],
        video_token_id=vocab["<|video_pad|>"],
        vision_start_token_id=vocab["<|vision_start|>"],
        vision_end_token_id=vocab["<|vision_end|>"],
    )


def llava_ov_config(tokenizer: PreTrainedTokenizerFast) -> LlavaOnevisionConfig:
    """LLaVA-OneVision at toy size: 112-pixel SigLIP input, patch 14 -> 8x8 -> pooled 4x4 = 16
    tokens + 1 newline per frame."""
    vocab = tokenizer.get_vocab()
    return LlavaOnevisionConfig(
        text_config={
            **_LM,
            **_token_ids(tokenizer),
            "model_type": "qwen2",
            "vocab_size": _padded_vocab(tokenizer),
        },
        vision_config={
            "model_type": "siglip_vision_model",
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "patch_size": 14,
            "image_size": 112,
            "vision_use_head": False,
        },
        image_token_index=vocab["<image>"],
        video_token_index=vocab["<video>"],
    )


_BUILDERS = {
    "qwen2.5-vl": (QWEN_SPECIAL_TOKENS, qwen25_vl_config),
    "qwen3-vl": (QWEN_SPECIAL_TOKENS, qwen3_vl_config),
    "llava-ov": (LLAVA_SPECIAL_TOKENS, llava_ov_config),
}

TINY_FAMILIES = tuple(_BUILDERS)


def build_tiny(family: str, model_class: type, seed: int) -> tuple[torch.nn.Module, PreTrainedTokenizerFast]:
    """(fp32 CPU model with weights drawn from ``seed``, its tokenizer) for ``family``."""
    special_tokens, make_config = _BUILDERS[family]
    tokenizer = tiny_tokenizer(special_tokens)
    config: PretrainedConfig = make_config(tokenizer)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_class(config)
    return model.eval(), tokenizer
