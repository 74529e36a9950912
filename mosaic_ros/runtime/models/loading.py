"""``load_model``: a model spec (hub id, local folder, ``tiny-random:<family>`` or
``smollm2-llava:135m-instruct``) -> an adapter.

Loading never waits on an unreachable hub: a spec that is not a folder is looked up in the
local Hugging Face cache first; only if it is missing there, and offline mode is off, is the hub
asked once with a short timeout before any download starts.
"""

from __future__ import annotations

import json
from pathlib import Path

import huggingface_hub
import torch
from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError
from transformers import AutoConfig, AutoTokenizer
from transformers.utils import cached_file

from mosaic_ros.runtime.models.base import ModelLoadError, VLMAdapter
from mosaic_ros.runtime.models.llava_onevision import LlavaOnevisionAdapter
from mosaic_ros.runtime.models.preprocess import CLIP_MEAN, CLIP_STD, HALF_MEAN, HALF_STD
from mosaic_ros.runtime.models.qwen_vl import Qwen3VLAdapter, Qwen25VLAdapter, QwenVLAdapter
from mosaic_ros.runtime.models.smollm2 import SMOLLM2_PREFIX
from mosaic_ros.runtime.models.smollm2 import resolve as resolve_smollm2
from mosaic_ros.runtime.models.tiny import TINY_FRAME_TOKENS, build_tiny

TINY_PREFIX = "tiny-random:"
ADAPTERS: dict[str, type[VLMAdapter]] = {
    cls.family: cls for cls in (Qwen25VLAdapter, LlavaOnevisionAdapter, Qwen3VLAdapter)
}
# Normalization each family's released processors use, when a folder carries no processor config.
DEFAULT_IMAGE_STATS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "qwen2.5-vl": (CLIP_MEAN, CLIP_STD),
    "qwen3-vl": (HALF_MEAN, HALF_STD),
    "llava-ov": (CLIP_MEAN, CLIP_STD),
}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
HUB_PROBE_TIMEOUT_S = 10.0


def resolve_device(device: str) -> torch.device:
    """``auto`` -> cuda if available else cpu; anything else is taken as a torch device name."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device {device!r} requested but CUDA is not available; use device='cpu'")
    return resolved


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto`` -> bfloat16 on CUDA, float32 elsewhere; else one of float32, float16, bfloat16."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be 'auto' or one of {sorted(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def load_model(
    spec: str,
    device: str = "auto",
    dtype: str = "auto",
    seed: int = 0,
    *,
    max_frame_tokens: int | None = None,
    pair_frames: bool = False,
) -> VLMAdapter:
    """Load the model named by ``spec`` and wrap it in its family's adapter.

    spec: a Hugging Face model id, a local folder (``save_pretrained`` layout), or
        ``tiny-random:<family>`` (families: qwen2.5-vl, llava-ov, qwen3-vl) for a toy-size
        random-weight model whose weights are drawn from ``seed`` (ignored otherwise), or
        ``smollm2-llava:135m-instruct``: LLaVA-OneVision with the REAL SmolLM2-135M-Instruct
        language model and a small RANDOM vision tower (``models.smollm2``; converted once by
        scripts/setup): real attention over text, pixels that mean nothing to it.
    max_frame_tokens: Qwen families: at most this many vision tokens per frame (default 196,
        24 for tiny-random models); LLaVA-OneVision's count is fixed by its vision tower.
    pair_frames: Qwen families: two consecutive frames per chunk, one temporal patch (half the
        tokens per frame; ``QwenVLAdapter``); a ``ValueError`` for LLaVA-OneVision.
    Raises ``ModelLoadError`` (fast, with what to do) when the spec cannot be loaded.
    """
    resolved_device = resolve_device(device)
    resolved_dtype = resolve_dtype(dtype, resolved_device)
    if spec.startswith(TINY_PREFIX):
        family = spec[len(TINY_PREFIX) :]
        adapter_class = _adapter_for_family(family)
        model, tokenizer = build_tiny(family, adapter_class.model_class, seed)
        mean, std = DEFAULT_IMAGE_STATS[family]
        return adapter_class(
            model.to(resolved_device, resolved_dtype),
            tokenizer,
            image_mean=mean,
            image_std=std,
            max_frame_tokens=TINY_FRAME_TOKENS if max_frame_tokens is None else max_frame_tokens,
            **_frame_options(adapter_class, pair_frames),
        )
    if spec.startswith(SMOLLM2_PREFIX):
        spec = str(resolve_smollm2(spec))
    source, local_only = _locate(spec)
    try:
        config = AutoConfig.from_pretrained(source, local_files_only=local_only)
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"cannot read the model config of {spec!r}: {error}") from error
    adapter_class = _adapter_for_model_type(config.model_type, spec)
    try:
        model = adapter_class.model_class.from_pretrained(
            source, dtype=resolved_dtype, attn_implementation="sdpa", local_files_only=local_only
        )
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local_only)
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"cannot load the weights or tokenizer of {spec!r}: {error}") from error
    mean, std = _image_stats(source, local_only, adapter_class.family)
    model = model.to(resolved_device)
    return adapter_class(
        model,
        tokenizer,
        image_mean=mean,
        image_std=std,
        max_frame_tokens=max_frame_tokens,
        **_frame_options(adapter_class, pair_frames),
    )


def _frame_options(adapter_class: type[VLMAdapter], pair_frames: bool) -> dict[str, bool]:
    if not pair_frames:
        return {}
    if not issubclass(adapter_class, QwenVLAdapter):
        raise ValueError(f"pair_frames is a Qwen-VL option; {adapter_class.family} has one frame per chunk")
    return {"pair_frames": True}


def _how_to_get_weights(spec: str) -> str:
    return (
        f"download the weights on a connected machine with `hf download {spec} --local-dir <folder>`, "
        "copy the folder here and pass its path as the model spec; or use "
        f"'{TINY_PREFIX}<family>' ({', '.join(ADAPTERS)}) for a random-weight model that runs offline"
    )


def _adapter_for_family(family: str) -> type[VLMAdapter]:
    if family not in ADAPTERS:
        raise ModelLoadError(f"unknown model family {family!r}; known families: {', '.join(ADAPTERS)}")
    return ADAPTERS[family]


def _adapter_for_model_type(model_type: str, spec: str) -> type[VLMAdapter]:
    for adapter_class in ADAPTERS.values():
        if adapter_class.model_type == model_type:
            return adapter_class
    known = ", ".join(f"{a.model_type} ({a.family})" for a in ADAPTERS.values())
    raise ModelLoadError(f"{spec!r} is a {model_type!r} model, which has no adapter; supported: {known}")


def _looks_like_path(spec: str) -> bool:
    return spec.startswith(("/", ".", "~")) or spec.count("/") > 1 or spec.endswith("/")


def _locate(spec: str) -> tuple[str, bool]:
    """(what to pass to from_pretrained, whether to stay offline) for a folder or hub id."""
    folder = Path(spec).expanduser()
    if folder.is_dir():
        if not (folder / "config.json").is_file():
            raise ModelLoadError(f"folder {spec!r} has no config.json; is it a Hugging Face model folder?")
        return str(folder), True
    if _looks_like_path(spec):
        raise ModelLoadError(f"model folder {spec!r} does not exist; {_how_to_get_weights('<model id>')}")
    if isinstance(huggingface_hub.try_to_load_from_cache(spec, "config.json"), str):
        return spec, True
    if huggingface_hub.is_offline_mode():
        raise ModelLoadError(
            f"{spec!r} is not a folder nor in the local Hugging Face cache, and HF_HUB_OFFLINE is set; "
            + _how_to_get_weights(spec)
        )
    try:
        huggingface_hub.model_info(spec, timeout=HUB_PROBE_TIMEOUT_S)
    except GatedRepoError as error:
        raise ModelLoadError(f"{spec!r} is gated on the hub: accept its terms and `hf auth login`") from error
    except RepositoryNotFoundError as error:
        raise ModelLoadError(f"{spec!r} is neither a local folder nor a model id on the hub") from error
    except Exception as error:
        raise ModelLoadError(
            f"{spec!r} is not a local folder and the Hugging Face hub is unreachable ({error}); "
            + _how_to_get_weights(spec)
        ) from error
    return spec, False


def _image_stats(source: str, local_only: bool, family: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Pixel mean/std from the model's processor config if it has one, else the family default."""
    for name in ("video_preprocessor_config.json", "preprocessor_config.json"):
        path = cached_file(
            source,
            name,
            local_files_only=local_only,
            _raise_exceptions_for_missing_entries=False,
            _raise_exceptions_for_connection_errors=False,
        )
        if path is None:
            continue
        settings = json.loads(Path(path).read_text())
        if "image_mean" in settings and "image_std" in settings:
            return tuple(settings["image_mean"]), tuple(settings["image_std"])
    return DEFAULT_IMAGE_STATS[family]
