"""Feeding a stream chunk by chunk equals one forward over the whole sequence, and that one
forward equals the model's own multimodal forward; positions equal ``get_rope_index``; the
adapter's rotary reproduces the model's post-RoPE keys; any Cache and attention plug in.

All in fp32 on CPU with the tiny-random builds. Logit tolerance: 1e-4 absolute (measured
differences are ~1e-6); rotary tolerance: 1e-5 absolute.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import AttentionInterface, DynamicCache
from transformers.cache_utils import Cache, CacheLayerMixin

from mosaic_ros.runtime.models import (
    TEXT,
    VISION,
    Chunk,
    PositionCursor,
    VLMAdapter,
    apply_rotary,
    load_model,
    rotate_half,
    unapply_rotary,
)
from mosaic_ros.runtime.models.base import ModelRotary

FAMILIES = ["qwen2.5-vl", "llava-ov", "qwen3-vl"]
LOGIT_ATOL = 1e-4
ROTARY_ATOL = 1e-5
# Mixed sizes so Qwen grids are not square: (96, 128) -> 3x5 merged cells at patch 14, (130, 70) -> 5x2.
FRAME_SIZES = [(96, 128), (130, 70), (96, 128), (112, 112)]
STAMPS = [0.0, 2.5, 5.0, 130.0]


def make_adapter(family: str) -> VLMAdapter:
    return load_model(f"tiny-random:{family}", device="cpu", dtype="float32")


@pytest.fixture(scope="module", params=FAMILIES)
def adapter(request: pytest.FixtureRequest) -> VLMAdapter:
    return make_adapter(request.param)


def frames() -> list[np.ndarray]:
    rng = np.random.default_rng(7)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in FRAME_SIZES]


def new_cache(adapter: VLMAdapter) -> DynamicCache:
    return DynamicCache(config=adapter.model.config.get_text_config())


def build_stream(adapter: VLMAdapter) -> list[Chunk]:
    """system, 3 frames, question, answer + resume, a frame 2 minutes later, question, 1 token."""
    features = adapter.encode_frames(adapter.prepare_frames(frames()))
    chunks = [adapter.system_chunk(PositionCursor())]
    for i in range(3):
        chunks.append(adapter.frame_chunk(features.frame(i), STAMPS[i], chunks[-1].cursor))
    chunks.append(adapter.question_chunk("What is on the table?", chunks[-1].cursor))
    chunks.append(adapter.resume_chunk("A red cup.", chunks[-1].cursor))
    chunks.append(adapter.frame_chunk(features.frame(3), STAMPS[3], chunks[-1].cursor))
    chunks.append(adapter.question_chunk("What happened two minutes ago?", chunks[-1].cursor))
    chunks.append(adapter.token_chunk(adapter.eos_token_ids[0], chunks[-1].cursor))
    return chunks


def frame_chunks(adapter: VLMAdapter, chunks: list[Chunk]) -> list[Chunk]:
    return [c for c in chunks if bool((c.modality == VISION).any())]


def test_streaming_chunk_by_chunk_equals_one_pass(adapter: VLMAdapter) -> None:
    chunks = build_stream(adapter)
    cache = new_cache(adapter)
    for k, chunk in enumerate(chunks):
        streamed = adapter.forward(chunk, cache)
        one_pass = adapter.forward(adapter.concat_chunks(chunks[: k + 1]), new_cache(adapter))
        assert streamed.shape == (1, adapter.model.config.get_text_config().vocab_size)
        assert streamed.dtype == torch.float32
        torch.testing.assert_close(streamed, one_pass, rtol=0, atol=LOGIT_ATOL)
    assert cache.get_seq_length() == sum(c.n_tokens for c in chunks)


def model_multimodal_logits(adapter: VLMAdapter, chunks: list[Chunk]) -> torch.Tensor:
    """Last-position logits of the model's own forward from token ids and pixels."""
    batch = adapter.prepare_frames(frames())
    whole = adapter.concat_chunks(chunks)
    input_ids = whole.token_ids[None]
    with torch.no_grad():
        if adapter.family == "llava-ov":
            out = adapter.model(input_ids=input_ids, pixel_values_videos=batch.pixel_values[:, None])
        else:
            out = adapter.model(
                input_ids=input_ids,
                pixel_values_videos=batch.pixel_values,
                video_grid_thw=batch.grid_thw,
                mm_token_type_ids=(whole.modality.to(torch.int32) * 2)[None],
            )
    return out.logits[:, -1, :].float()


def test_one_pass_equals_the_models_own_multimodal_forward(adapter: VLMAdapter) -> None:
    chunks = build_stream(adapter)[:-1]
    ours = adapter.forward(adapter.concat_chunks(chunks), new_cache(adapter))
    torch.testing.assert_close(ours, model_multimodal_logits(adapter, chunks), rtol=0, atol=LOGIT_ATOL)


def test_positions_equal_the_models_own_numbering(adapter: VLMAdapter) -> None:
    chunks = build_stream(adapter)
    whole = adapter.concat_chunks(chunks)
    if adapter.position_dims == 1:
        expected = torch.arange(whole.n_tokens)[None, None]
    else:
        batch = adapter.prepare_frames(frames())
        expected, _ = adapter.model.model.get_rope_index(
            whole.token_ids[None],
            mm_token_type_ids=(whole.modality.to(torch.int32) * 2)[None],
            video_grid_thw=batch.grid_thw,
        )
    assert whole.position_ids.shape == (adapter.position_dims, 1, whole.n_tokens)
    torch.testing.assert_close(whole.position_ids, expected, rtol=0, atol=0)
    torch.testing.assert_close(whole.token_positions, whole.position_ids[:, 0], rtol=0, atol=0)


def test_cursor_moves_to_one_past_the_largest_position(adapter: VLMAdapter) -> None:
    for chunk in build_stream(adapter):
        assert chunk.cursor.next_position == int(chunk.token_positions.max()) + 1


def test_frame_chunk_holds_time_marker_text_then_the_frames_vision_tokens(adapter: VLMAdapter) -> None:
    chunks = frame_chunks(adapter, build_stream(adapter))
    for chunk, (height, width), stamp in zip(chunks, FRAME_SIZES, STAMPS, strict=True):
        vision = chunk.modality == VISION
        assert int(vision.sum()) == adapter.tokens_per_frame(height, width)
        assert bool((chunk.token_ids[vision] == adapter.video_token_id).all())
        first_vision = int(vision.nonzero()[0])
        text = adapter.tokenizer.decode(chunk.token_ids[:first_vision].tolist())
        assert text.startswith(adapter.time_marker(stamp))
        assert bool((chunk.modality[:first_vision] == TEXT).all())
        assert chunk.inputs_embeds.shape == (1, chunk.n_tokens, adapter.hidden_size)


def test_time_markers_follow_the_family(adapter: VLMAdapter) -> None:
    expected = "<12.5 seconds>" if adapter.family == "qwen3-vl" else "<t=12.5s>"
    assert adapter.time_marker(12.5) == expected


def test_frame_chunk_rejects_several_frames_and_bad_stamps(adapter: VLMAdapter) -> None:
    features = adapter.encode_frames(adapter.prepare_frames(frames()[:2]))
    with pytest.raises(ValueError, match="one frame"):
        adapter.frame_chunk(features, 0.0, PositionCursor())
    for stamp in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="time stamp"):
            adapter.frame_chunk(features.frame(0), stamp, PositionCursor())


def test_qwen3_frame_chunk_carries_deepstack_features_for_its_vision_tokens() -> None:
    adapter = make_adapter("qwen3-vl")
    chunk = frame_chunks(adapter, build_stream(adapter))[0]
    mask = chunk.extra_model_kwargs["visual_pos_masks"]
    deepstack = chunk.extra_model_kwargs["deepstack_visual_embeds"]
    assert mask.shape == (1, chunk.n_tokens)
    torch.testing.assert_close(mask[0], chunk.modality == VISION, rtol=0, atol=0)
    assert len(deepstack) == len(adapter.model.config.vision_config.deepstack_visual_indexes)
    assert all(layer.shape == (int(mask.sum()), adapter.hidden_size) for layer in deepstack)
    stripped = Chunk(**{**chunk.__dict__, "extra_model_kwargs": {}})
    with_deepstack = adapter.forward(chunk, new_cache(adapter))
    without = adapter.forward(stripped, new_cache(adapter))
    assert float((with_deepstack - without).abs().max()) > 1e-3


def capture_pre_rope_keys(adapter: VLMAdapter) -> tuple[dict[int, torch.Tensor], list]:
    """Hooks recording each layer's key before RoPE as (1, H_kv, L, D): after k_norm where the
    family has one (Qwen3-VL), else after k_proj."""
    captured: dict[int, torch.Tensor] = {}
    handles = []
    for index, layer in enumerate(adapter.language_model.layers):
        attention = layer.self_attn
        module = getattr(attention, "k_norm", None) or attention.k_proj

        def hook(_module, _inputs, output, index=index):
            captured[index] = output.reshape(1, output.shape[1], -1, adapter.head_dim).transpose(1, 2)

        handles.append(module.register_forward_hook(hook))
    return captured, handles


def test_rotary_reproduces_the_models_post_rope_keys(adapter: VLMAdapter) -> None:
    chunks = build_stream(adapter)
    cache = new_cache(adapter)
    for chunk in chunks[:-3]:
        adapter.forward(chunk, cache)
    captured, handles = capture_pre_rope_keys(adapter)
    later_frame = chunks[-3]
    try:
        adapter.forward(later_frame, cache)
    finally:
        for handle in handles:
            handle.remove()
    cos, sin = adapter.rotary(later_frame.token_positions)
    assert cos.shape == sin.shape == (later_frame.n_tokens, adapter.head_dim)
    assert cos.dtype == torch.float32
    for index in range(adapter.num_layers):
        post = cache.layers[index].keys[:, :, -later_frame.n_tokens :]
        pre = captured[index]
        torch.testing.assert_close(apply_rotary(pre, cos, sin), post, rtol=0, atol=ROTARY_ATOL)
        torch.testing.assert_close(unapply_rotary(post, cos, sin), pre, rtol=0, atol=ROTARY_ATOL)


def test_unapply_rotary_inverts_apply_rotary() -> None:
    adapter = make_adapter("qwen3-vl")
    positions = torch.tensor([[5, 5, 5, 9], [5, 6, 7, 9], [5, 6, 6, 9]])
    cos, sin = adapter.rotary(positions)
    x = torch.randn(2, 4, adapter.head_dim, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(unapply_rotary(apply_rotary(x, cos, sin), cos, sin), x, rtol=0, atol=1e-6)
    torch.testing.assert_close(rotate_half(rotate_half(x)), -x, rtol=0, atol=0)


def test_rotary_rejects_positions_of_the_wrong_rank(adapter: VLMAdapter) -> None:
    with pytest.raises(ValueError, match="positions must be"):
        adapter.rotary(torch.zeros(adapter.position_dims + 1, 3, dtype=torch.long))


class PreRopeLayer(CacheLayerMixin):
    """Keeps keys without rotation on the CPU (as the KV store does) and hands the model keys
    rotated again at their positions; reports the true total length."""

    def __init__(self, owner: "PreRopeCache") -> None:
        super().__init__()
        self.owner = owner
        self.pre_keys: list[torch.Tensor] = []
        self.values_held: list[torch.Tensor] = []
        self.positions: list[torch.Tensor] = []

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        adapter, positions = self.owner.adapter, self.owner.pending_positions
        cos, sin = adapter.rotary(positions)
        self.pre_keys.append(unapply_rotary(key_states, cos, sin).cpu())
        self.values_held.append(value_states.cpu())
        self.positions.append(positions)
        all_cos, all_sin = adapter.rotary(torch.cat(self.positions, dim=1))
        keys = apply_rotary(torch.cat(self.pre_keys, dim=2).to(adapter.device), all_cos, all_sin)
        return keys, torch.cat(self.values_held, dim=2).to(adapter.device)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_seq_length(self) -> int:
        return sum(k.shape[2] for k in self.pre_keys)

    def get_max_length(self) -> int:
        return -1


class PreRopeCache(Cache):
    def __init__(self, adapter: VLMAdapter) -> None:
        super().__init__(layers=[PreRopeLayer(self) for _ in range(adapter.num_layers)])
        self.adapter = adapter
        self.pending_positions: torch.Tensor | None = None


def test_custom_cache_and_attention_give_the_same_logits(adapter: VLMAdapter) -> None:
    calls: list[int] = []

    def causal_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        calls.append(module.layer_idx)
        groups = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
        q_len, k_len = query.shape[2], key.shape[2]
        causal = torch.ones(q_len, k_len, dtype=torch.bool).tril(diagonal=k_len - q_len)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=causal, scale=scaling)
        return out.transpose(1, 2).contiguous(), None

    name = "mosaic_test_causal"
    AttentionInterface.register(name, causal_attention)
    custom = make_adapter(adapter.family)
    custom.set_attention(name)
    assert custom.model.config.get_text_config()._attn_implementation == name
    assert custom.model.config.vision_config._attn_implementation == "sdpa"
    chunks = build_stream(custom)
    reference, store = new_cache(adapter), PreRopeCache(custom)
    for chunk in chunks:
        expected = adapter.forward(chunk, reference)
        store.pending_positions = chunk.token_positions
        got = custom.forward(chunk, store)
        torch.testing.assert_close(got, expected, rtol=0, atol=LOGIT_ATOL)
    assert sorted(set(calls)) == list(range(custom.num_layers))
    assert store.get_seq_length() == reference.get_seq_length()


def test_a_1d_rope_adapter_looks_its_rotary_up_in_a_table_of_the_models_own_values() -> None:
    """llava-ov (1-D RoPE) on a CPU: ``rotary`` answers from a ``PositionTable`` that holds exactly
    what the model's rotary embedding gives, grows past its first 4,096 positions, and falls back
    to the model beyond its size limit; M-RoPE families have no table."""
    adapter = make_adapter("llava-ov")
    table = adapter.rotary.table
    assert table is not None and table.positions == 0
    pos = torch.tensor([[9, 0, 4095, 12_000, 3, 12_000]])
    cos, sin = adapter.rotary(pos)
    assert table.positions >= 12_001
    ref_cos, ref_sin = adapter.rotary.from_model(pos)
    assert torch.equal(cos, ref_cos) and torch.equal(sin, ref_sin)
    assert torch.equal(adapter.rotary(pos[:, 1:3])[0], cos[1:3])  # a lookup after growth
    table.limit = table.positions  # as if the byte limit were reached: no further growth
    far = torch.tensor([[5, table.positions + 7]])
    got, want = adapter.rotary(far), adapter.rotary.from_model(far)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert table.positions == table.limit
    assert make_adapter("qwen2.5-vl").rotary.table is None
    for varying in ("dynamic", "longrope"):  # frequencies that change with the positions asked
        adapter.language_model.rotary_emb.rope_type = varying
        assert ModelRotary(adapter).table is None
