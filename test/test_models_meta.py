"""Real-size checks without weights: each family's published configuration on torch's meta device.

The configurations in ``data/published_configs/`` are the numbers of each model's published
``config.json`` (Qwen/Qwen2.5-VL-3B-Instruct, Qwen/Qwen2.5-VL-7B-Instruct, Qwen/Qwen3-VL-8B-Instruct,
llava-hf/llava-onevision-qwen2-7b-ov-hf), written out by hand in the layout those files use; the
fifth puts SmolLM2-135M (Llama: hidden 576, 30 layers, 9 query / 3 KV heads, head_dim 64,
rope base 1e5, vocab 49152, tied embeddings) as the text model of LLaVA-OneVision with the 7B's
SigLIP tower. Its image/video ids (49152, 49153) are placeholders just past the text vocabulary:
the meta device never reads them. Each loads through ``AutoConfig`` from a folder, as a real
model folder does, and is instantiated under ``torch.device("meta")``: every parameter has its
real shape and no memory.

What runs, at real size: the adapter's frame preprocessing (real pixels, real patch grids);
the vision tower's shape-setting modules (LLaVA-OneVision: the whole tower, projector and
pooling; Qwen: patch embedding, merger and Qwen3-VL's deepstack mergers, because the Qwen towers
derive their window and rotary indices from the grid's values, which a meta tensor does not
have); the adapter's chunks and rotary positions; and the whole language model through
``KVBridge`` into a real ``rekv`` policy and its host store, for a system chunk, two frames and
a question (Qwen3-VL without the deepstack addition, whose inputs are checked for shape: it
indexes by the mask's values). Meta tensors carry no values, so nothing numeric is checked
there: the policy is handed zeros of the shapes the bridge produced (``MetaBoundary``), which
proves shapes, head counts, layer order and the store's allocation, not attention results.
M-RoPE sections are checked on the model's own rotary embedding class built on CPU from the
same configuration, and frame positions against the model's ``get_rope_index`` at the real grid.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoConfig

from mosaic_ros.runtime.kv.bridge import ATTENTION_NAME, KVBridge
from mosaic_ros.runtime.kv.policy import (
    KVContext,
    KVGeometry,
    KVPolicy,
    MemoryStats,
    PolicyConfig,
    RetrievalStats,
    TokenMeta,
    make_policy,
)
from mosaic_ros.runtime.models import ADAPTERS, VISION, PositionCursor, VisionFeatures, VLMAdapter
from mosaic_ros.runtime.models.tiny import LLAVA_SPECIAL_TOKENS, QWEN_SPECIAL_TOKENS, tiny_tokenizer

CONFIGS = Path(__file__).parent / "data" / "published_configs"
META = torch.device("meta")
FRAME = (480, 640)  # a VGA camera frame
PAGE_ROWS = 256  # small store pages: the host store holds real (zero) rows at real row width


@dataclass(frozen=True)
class Published:
    """What the published configuration says, and what follows from it for the KV."""

    name: str
    family: str
    params_billions: float  # all parameters, vision tower included, as the model card rounds them
    layers: int
    q_heads: int
    kv_heads: int
    head_dim: int
    hidden: int
    vocab: int
    vision_tokens: int  # per 480x640 frame
    kv_bytes_per_token: int  # bf16 K and V over all layers
    mrope_section: tuple[int, int, int] | None = None
    mrope_interleaved: bool = False
    deepstack_layers: int = 0


MODELS = [
    # 480x640 at the default 196-token cap: 24x32 patches of 14 px -> 12x16 merged cells = 192.
    Published("qwen2.5-vl-3b", "qwen2.5-vl", 3.75, 36, 16, 2, 128, 2048, 151936, 192, 36_864, (16, 24, 24)),
    Published("qwen2.5-vl-7b", "qwen2.5-vl", 8.29, 28, 28, 4, 128, 3584, 152064, 192, 57_344, (16, 24, 24)),
    # patch 16: 480x640 -> 12x16 merged cells of 32 px = 192 tokens.
    Published(
        "qwen3-vl-8b", "qwen3-vl", 8.77, 36, 32, 8, 128, 4096, 151936, 192, 147_456, (24, 20, 20), True, 3
    ),
    # SigLIP 384 px, patch 14: 27x27 -> pooled 14x14 = 196 + the newline token.
    Published("llava-onevision-qwen2-7b", "llava-ov", 8.03, 28, 28, 4, 128, 3584, 152128, 197, 57_344),
    Published("llava-onevision-smollm2-135m", "llava-ov", 0.53, 30, 9, 3, 64, 576, 49152, 197, 23_040),
]


def load_meta(published: Published, tmp_path: Path) -> VLMAdapter:
    """The published config, read from a model folder, instantiated on the meta device in bf16."""
    folder = tmp_path / published.name
    folder.mkdir()
    shutil.copy(CONFIGS / f"{published.name}.json", folder / "config.json")
    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    matching = [a for a in ADAPTERS.values() if a.model_type == config.model_type]
    assert [a.family for a in matching] == [published.family]
    adapter_class = matching[0]
    with META:
        model = adapter_class.model_class(config)
    model = model.to(torch.bfloat16)
    specials = LLAVA_SPECIAL_TOKENS if published.family == "llava-ov" else QWEN_SPECIAL_TOKENS
    adapter = adapter_class(model, tiny_tokenizer(specials), image_mean=(0.5,) * 3, image_std=(0.5,) * 3)
    adapter.set_attention(ATTENTION_NAME)
    return adapter


def encode_on_meta(adapter: VLMAdapter, frame: np.ndarray) -> VisionFeatures:
    """Vision features of one frame with the tower's shape-setting modules (see the module docstring)."""
    batch = adapter.prepare_frames([frame])
    if adapter.family == "llava-ov":
        return adapter.encode_frames(batch)
    tower = adapter.model.model.visual
    patches = tower.patch_embed(batch.pixel_values.to(META, adapter.dtype))
    deepstack = None
    if adapter.family == "qwen3-vl":
        deepstack = [[merger(patches) for merger in tower.deepstack_merger_list]]
    return VisionFeatures(embeds=[tower.merger(patches)], grid_thw=batch.grid_thw, deepstack=deepstack)


class MetaBoundary(KVPolicy):
    """Passes the bridge's meta tensors to a real CPU policy as zeros of the same shape, and hands
    its contexts back on the meta device; records what each layer was given."""

    name = "meta_boundary"

    def __init__(self, inner: KVPolicy):
        super().__init__(inner.geometry, inner.config, META)
        self.inner = inner
        self.appended: list[tuple[int, tuple[int, ...], tuple[int, ...]]] = []
        self.queries: list[tuple[int, tuple[int, ...]]] = []

    @staticmethod
    def _zeros(t: torch.Tensor) -> torch.Tensor:
        assert t.device == META
        return torch.zeros(t.shape, dtype=t.dtype)

    @staticmethod
    def _to_meta(ctx: KVContext | None) -> KVContext | None:
        if ctx is None:
            return None
        return KVContext(ctx.keys.to(META), ctx.values.to(META), ctx.positions, ctx.token_ids)

    def add_tokens(self, meta: TokenMeta) -> torch.Tensor:
        return self.inner.add_tokens(meta)

    def ingest_context(self, layer: int) -> KVContext | None:
        return self._to_meta(self.inner.ingest_context(layer))

    def append(self, layer: int, keys: torch.Tensor, values: torch.Tensor, token_ids: torch.Tensor) -> None:
        self.appended.append((layer, tuple(keys.shape), tuple(values.shape)))
        self.inner.append(layer, self._zeros(keys), self._zeros(values), token_ids)

    def begin_question(self, window: tuple[float, float] | None = None) -> None:
        self.inner.begin_question(window)

    def retrieve(self, layer: int, query: torch.Tensor) -> KVContext:
        self.queries.append((layer, tuple(query.shape)))
        return self._to_meta(self.inner.retrieve(layer, self._zeros(query)))

    def end_question(self) -> RetrievalStats:
        return self.inner.end_question()

    def memory(self) -> MemoryStats:
        return self.inner.memory()

    def reset(self) -> None:
        self.inner.reset()


def geometry_of(adapter: VLMAdapter) -> KVGeometry:
    """The KV geometry a stream session builds from an adapter (as ``StreamSession`` does)."""
    return KVGeometry(
        num_layers=adapter.num_layers,
        num_kv_heads=adapter.num_kv_heads,
        head_dim=adapter.head_dim,
        num_q_heads=adapter.num_heads,
        position_dims=adapter.position_dims,
        dtype=adapter.dtype,
    )


@pytest.fixture(params=MODELS, ids=[m.name for m in MODELS])
def published(request: pytest.FixtureRequest) -> Published:
    return request.param


def test_published_config_builds_the_real_model_on_meta(published: Published, tmp_path: Path) -> None:
    adapter = load_meta(published, tmp_path)
    params = sum(p.numel() for p in adapter.model.parameters())
    assert round(params / 1e9, 2) == published.params_billions
    assert all(p.device == META for p in adapter.model.parameters())
    assert (adapter.num_layers, adapter.num_heads, adapter.num_kv_heads, adapter.head_dim) == (
        published.layers,
        published.q_heads,
        published.kv_heads,
        published.head_dim,
    )
    assert adapter.hidden_size == published.hidden
    assert adapter.model.config.get_text_config().vocab_size == published.vocab
    attention = adapter.language_model.layers[0].self_attn
    assert attention.k_proj.out_features == published.kv_heads * published.head_dim
    assert attention.q_proj.out_features == published.q_heads * published.head_dim
    assert geometry_of(adapter).bytes_per_token == published.kv_bytes_per_token
    assert adapter.tokens_per_frame(*FRAME) == published.vision_tokens


def test_smollm2_text_model_has_the_published_size(tmp_path: Path) -> None:
    """SmolLM2-135M's 134,515,008 parameters (tied embeddings counted once)."""
    adapter = load_meta(MODELS[-1], tmp_path)
    lm = adapter.language_model
    assert sum(p.numel() for p in lm.parameters()) == 134_515_008
    assert adapter.model.lm_head.weight is lm.embed_tokens.weight


def test_frames_stream_through_adapter_bridge_and_store_at_real_size(
    published: Published, tmp_path: Path
) -> None:
    adapter = load_meta(published, tmp_path)
    geometry = geometry_of(adapter)
    config = PolicyConfig(
        budget_tokens=512, sink_tokens=16, window_tokens=256, options={"page_rows": PAGE_ROWS}
    )
    inner = make_policy("rekv", geometry, config, "cpu")
    policy = MetaBoundary(inner)
    bridge = KVBridge(policy, adapter.rotary, adapter.num_layers)
    features = encode_on_meta(adapter, np.zeros((*FRAME, 3), dtype=np.uint8))
    assert features.embeds[0].shape == (published.vision_tokens, published.hidden)
    if published.deepstack_layers:
        assert [tuple(t.shape) for t in features.deepstack[0]] == [
            (published.vision_tokens, published.hidden)
        ] * published.deepstack_layers

    vocab = published.vocab
    chunks = [adapter.system_chunk(PositionCursor())]
    for stamp in (0.0, 2.0):
        chunk = adapter.frame_chunk(features, stamp, chunks[-1].cursor)
        if published.deepstack_layers:
            check_deepstack_inputs(chunk.extra_model_kwargs, chunk.modality, published)
            # the model adds them to the vision rows by boolean indexing, which needs the mask's
            # values; it changes no shape, so the meta forward runs without it
            chunk.extra_model_kwargs = {}
        chunks.append(chunk)
    for frame, chunk in enumerate(chunks):
        n = chunk.n_tokens
        frames = torch.full((n,), -1, dtype=torch.int64)
        frames[chunk.modality.bool()] = frame - 1
        meta = TokenMeta(chunk.token_positions, torch.zeros(n, dtype=torch.float64), chunk.modality, frames)
        before = len(policy.appended)
        with bridge.ingest_step(chunk.token_positions, policy.add_tokens(meta)) as cache:
            logits = adapter.forward(chunk, cache)
        assert logits.shape == (1, vocab)
        assert policy.appended[before:] == [
            (layer, (n, published.kv_heads, published.head_dim), (n, published.kv_heads, published.head_dim))
            for layer in range(published.layers)
        ]
    vision = chunks[1].modality == VISION
    assert int(vision.sum()) == published.vision_tokens

    stored = sum(c.n_tokens for c in chunks)
    store = inner.store
    assert store.num_tokens == stored
    pages = -(-stored // PAGE_ROWS)
    for layer_pages in store.pool.pages:
        assert len(layer_pages) == pages
        for page in layer_pages:
            assert page.shape == (PAGE_ROWS, 2, published.kv_heads, published.head_dim)
            assert page.dtype == torch.bfloat16
    page_bytes = PAGE_ROWS * published.kv_bytes_per_token // published.layers
    assert inner.memory().host_kv_bytes >= published.layers * pages * page_bytes
    assert store.used_kv_bytes == stored * published.kv_bytes_per_token

    question = adapter.question_chunk("What is on the table?", chunks[-1].cursor)
    bridge.begin_question()
    with bridge.question_step(question.token_positions) as cache:
        logits = adapter.forward(question, cache)
    stats = bridge.end_question()
    assert logits.shape == (1, vocab)
    assert policy.queries == [
        (layer, (published.q_heads, question.n_tokens, published.head_dim))
        for layer in range(published.layers)
    ]
    assert stats.tokens_retrieved == published.layers * min(config.budget_tokens, stored)
    # per layer, a budget-sized question buffer and a sinks + window ingest buffer
    device_tokens = config.budget_tokens + config.sink_tokens + config.window_tokens
    assert inner.memory().device_kv_bytes == device_tokens * published.kv_bytes_per_token


def check_deepstack_inputs(kwargs: dict, modality: torch.Tensor, published: Published) -> None:
    mask = kwargs["visual_pos_masks"]
    assert mask.shape == (1, modality.numel()) and mask.dtype == torch.bool
    assert [tuple(t.shape) for t in kwargs["deepstack_visual_embeds"]] == [
        (published.vision_tokens, published.hidden)
    ] * published.deepstack_layers


def mrope_axes(section: tuple[int, int, int], interleaved: bool) -> list[int]:
    """Which position axis (0 t, 1 h, 2 w) drives each of the head_dim/2 rotary frequencies."""
    n = sum(section)
    if not interleaved:
        return [axis for axis, width in enumerate(section) for _ in range(width)]
    axes = [0] * n
    for axis in (1, 2):
        for j in range(axis, 3 * section[axis], 3):
            axes[j] = axis
    return axes


@pytest.mark.parametrize("published", [m for m in MODELS if m.mrope_section], ids=lambda m: m.name)
def test_mrope_sections_follow_the_published_layout(published: Published, tmp_path: Path) -> None:
    adapter = load_meta(published, tmp_path)
    text_config = adapter.model.config.get_text_config()
    section = tuple(text_config.rope_parameters["mrope_section"])
    assert section == published.mrope_section
    assert 2 * sum(section) == published.head_dim
    rotary = type(adapter.language_model.rotary_emb)(config=text_config)  # on CPU, with values
    probe = torch.zeros((), dtype=torch.float32)
    half = published.head_dim // 2
    expected = mrope_axes(section, published.mrope_interleaved)
    for axis in range(3):
        # one token at position 7 on ``axis``, 0 on the others: sin is non-zero exactly on the
        # frequencies that axis drives (sin, not cos: cos of the slowest ones rounds to 1)
        positions = torch.zeros(3, 1, 1, dtype=torch.long)
        positions[axis] = 7
        _, sin = rotary(probe, positions)
        driven = (sin[0, 0, :half] != 0).tolist()
        assert driven == [a == axis for a in expected], f"axis {axis}"
        assert torch.equal(sin[0, 0, :half], sin[0, 0, half:])


@pytest.mark.parametrize("published", [m for m in MODELS if m.mrope_section], ids=lambda m: m.name)
def test_frame_positions_equal_the_models_rope_index_at_real_grid(
    published: Published, tmp_path: Path
) -> None:
    adapter = load_meta(published, tmp_path)
    frame = np.zeros((*FRAME, 3), dtype=np.uint8)
    grid = adapter.prepare_frames([frame, frame]).grid_thw
    embeds = torch.zeros(published.vision_tokens, published.hidden, device=META)
    deepstack = [[embeds] * published.deepstack_layers] * 2 if published.deepstack_layers else None
    features = VisionFeatures(embeds=[embeds] * 2, grid_thw=grid, deepstack=deepstack)
    chunks = [adapter.system_chunk(PositionCursor())]
    for i, stamp in enumerate((0.0, 2.0)):
        chunks.append(adapter.frame_chunk(features.frame(i), stamp, chunks[-1].cursor))
    chunks.append(adapter.question_chunk("What is on the table?", chunks[-1].cursor))
    whole = torch.cat([c.token_positions for c in chunks], dim=1)
    token_ids = torch.cat([c.token_ids for c in chunks])
    modality = torch.cat([c.modality for c in chunks])
    expected, _ = adapter.model.model.get_rope_index(
        token_ids[None], mm_token_type_ids=(modality.to(torch.int32) * 2)[None], video_grid_thw=grid
    )
    assert expected.device.type == "cpu"
    torch.testing.assert_close(whole, expected[:, 0], rtol=0, atol=0)


def test_published_configs_are_valid_json() -> None:
    names = sorted(p.stem for p in CONFIGS.glob("*.json"))
    assert names == sorted(m.name for m in MODELS)
    for path in CONFIGS.glob("*.json"):
        assert "model_type" in json.loads(path.read_text())
