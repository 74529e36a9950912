"""load_model: tiny-random builds are deterministic, a saved folder loads back through the real
from_pretrained path with identical logits, and specs that cannot load fail fast and say why."""

import numpy as np
import pytest
import torch
from transformers import DynamicCache, Qwen2Config

from mosaic_ros.runtime.models import (
    ADAPTERS,
    TINY_FAMILIES,
    LlavaOnevisionAdapter,
    ModelLoadError,
    PositionCursor,
    Qwen3VLAdapter,
    Qwen25VLAdapter,
    VLMAdapter,
    load_model,
    loading,
)
from mosaic_ros.runtime.models.loading import resolve_device, resolve_dtype
from mosaic_ros.runtime.models.preprocess import HALF_MEAN, HALF_STD
from mosaic_ros.runtime.models.tiny import TINY_FRAME_TOKENS


def stream_logits(adapter: VLMAdapter) -> torch.Tensor:
    """Logits after system, two frames and a question, from raw frames."""
    rng = np.random.default_rng(3)
    frames = [rng.integers(0, 256, (96, 128, 3), dtype=np.uint8) for _ in range(2)]
    features = adapter.encode_frames(adapter.prepare_frames(frames))
    cache = DynamicCache(config=adapter.model.config.get_text_config())
    chunk = adapter.system_chunk(PositionCursor())
    adapter.forward(chunk, cache)
    for i in range(2):
        chunk = adapter.frame_chunk(features.frame(i), 1.0 * i, chunk.cursor)
        adapter.forward(chunk, cache)
    return adapter.forward(adapter.question_chunk("Where is the cup?", chunk.cursor), cache)


def test_every_family_has_an_adapter_and_a_tiny_build() -> None:
    assert set(TINY_FAMILIES) == set(ADAPTERS) == {"qwen2.5-vl", "qwen3-vl", "llava-ov"}
    assert ADAPTERS["qwen2.5-vl"] is Qwen25VLAdapter
    assert ADAPTERS["qwen3-vl"] is Qwen3VLAdapter
    assert ADAPTERS["llava-ov"] is LlavaOnevisionAdapter


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_tiny_adapter_reports_its_shape(family: str) -> None:
    adapter = load_model(f"tiny-random:{family}", device="cpu", dtype="float32")
    assert adapter.family == family
    assert (adapter.num_layers, adapter.num_heads, adapter.num_kv_heads, adapter.head_dim) == (4, 4, 2, 32)
    assert adapter.position_dims == (1 if family == "llava-ov" else 3)
    assert adapter.device == torch.device("cpu") and adapter.dtype == torch.float32
    assert adapter.tokenizer.convert_tokens_to_ids("<|im_end|>") in adapter.eos_token_ids
    assert 4 <= adapter.tokens_per_frame(480, 640) <= 64


def test_tiny_tokens_per_frame() -> None:
    counts = {
        f: load_model(f"tiny-random:{f}", device="cpu").tokens_per_frame(480, 640) for f in TINY_FAMILIES
    }
    assert counts == {"qwen2.5-vl": 20, "qwen3-vl": 20, "llava-ov": 17}


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_tiny_random_is_deterministic_per_seed(family: str) -> None:
    first = load_model(f"tiny-random:{family}", device="cpu", seed=5)
    second = load_model(f"tiny-random:{family}", device="cpu", seed=5)
    other = load_model(f"tiny-random:{family}", device="cpu", seed=6)
    assert first.tokenizer.backend_tokenizer.to_str() == second.tokenizer.backend_tokenizer.to_str()
    torch.testing.assert_close(stream_logits(first), stream_logits(second), rtol=0, atol=0)
    assert float((stream_logits(first) - stream_logits(other)).abs().max()) > 1e-3


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_saved_folder_loads_back_through_from_pretrained_with_identical_logits(family: str, tmp_path) -> None:
    original = load_model(f"tiny-random:{family}", device="cpu", dtype="float32")
    original.save_pretrained(tmp_path)
    assert {"config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json"} <= {
        p.name for p in tmp_path.iterdir()
    }
    loaded = load_model(str(tmp_path), device="cpu", dtype="float32", max_frame_tokens=TINY_FRAME_TOKENS)
    assert type(loaded) is type(original)
    assert loaded.model is not original.model
    assert (loaded.image_mean, loaded.image_std) == (original.image_mean, original.image_std)
    assert loaded.eos_token_ids == original.eos_token_ids
    torch.testing.assert_close(stream_logits(loaded), stream_logits(original), rtol=0, atol=0)


def test_folder_keeps_the_families_pixel_statistics(tmp_path) -> None:
    load_model("tiny-random:qwen3-vl", device="cpu").save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path), device="cpu")
    assert (loaded.image_mean, loaded.image_std) == (HALF_MEAN, HALF_STD)


def test_load_in_half_precision_casts_the_model() -> None:
    adapter = load_model("tiny-random:qwen2.5-vl", device="cpu", dtype="bfloat16")
    assert adapter.dtype == torch.bfloat16
    assert adapter.system_chunk(PositionCursor()).inputs_embeds.dtype == torch.bfloat16
    assert stream_logits(adapter).dtype == torch.float32


def test_missing_folder_fails_fast_saying_what_to_do() -> None:
    with pytest.raises(ModelLoadError, match=r"does not exist.*hf download.*tiny-random:"):
        load_model("/nonexistent/folder")


def test_folder_without_config_fails(tmp_path) -> None:
    with pytest.raises(ModelLoadError, match=r"no config\.json"):
        load_model(str(tmp_path))


def test_unknown_tiny_family_fails() -> None:
    with pytest.raises(ModelLoadError, match=r"unknown model family 'gpt-9'.*qwen2\.5-vl"):
        load_model("tiny-random:gpt-9")


def test_folder_of_an_unsupported_architecture_fails(tmp_path) -> None:
    Qwen2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2).save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match=r"'qwen2' model, which has no adapter"):
        load_model(str(tmp_path))


def test_hub_id_in_offline_mode_fails_without_network(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loading.huggingface_hub, "is_offline_mode", lambda: True)
    monkeypatch.setattr(loading.huggingface_hub, "model_info", pytest.fail)
    with pytest.raises(ModelLoadError, match=r"HF_HUB_OFFLINE.*hf download some-org/some-vlm"):
        load_model("some-org/some-vlm")


def test_hub_id_with_unreachable_hub_fails_after_one_probe(monkeypatch: pytest.MonkeyPatch) -> None:
    probes: list[str] = []

    def unreachable(repo_id: str, timeout: float) -> None:
        probes.append(repo_id)
        raise ConnectionError("Name or service not known")

    monkeypatch.setattr(loading.huggingface_hub, "is_offline_mode", lambda: False)
    monkeypatch.setattr(loading.huggingface_hub, "model_info", unreachable)
    with pytest.raises(ModelLoadError, match=r"hub is unreachable.*hf download some-org/some-vlm"):
        load_model("some-org/some-vlm")
    assert probes == ["some-org/some-vlm"]


def test_device_and_dtype_resolution() -> None:
    cpu = torch.device("cpu")
    assert resolve_dtype("auto", cpu) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert resolve_dtype("float16", cpu) == torch.float16
    with pytest.raises(ValueError, match="dtype must be"):
        resolve_dtype("fp8", cpu)
    assert resolve_device("cpu") == cpu
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ModelLoadError, match="CUDA is not available"):
            resolve_device("cuda")


def test_frame_budget_is_respected_or_refused() -> None:
    small = load_model("tiny-random:qwen2.5-vl", device="cpu", max_frame_tokens=8)
    assert small.tokens_per_frame(480, 640) <= 8
    with pytest.raises(ValueError, match="at least 4"):
        load_model("tiny-random:qwen2.5-vl", device="cpu", max_frame_tokens=2)
    with pytest.raises(ValueError, match="fixed by its vision tower"):
        load_model("tiny-random:llava-ov", device="cpu", max_frame_tokens=8)
