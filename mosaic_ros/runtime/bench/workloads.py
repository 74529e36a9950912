"""Benchmark workloads: a stream of chunks (per-layer pre-RoPE KV + token facts) and questions.

A workload is replayed once per policy, so chunks are produced on demand (deterministically
per index) and never all held at once. Questions carry each layer's pre-RoPE queries and the
question tokens' own keys/values (the local tokens attention sees after the context).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Protocol

import torch

from mosaic_ros.runtime.bench.shapes import BenchShape
from mosaic_ros.runtime.kv.policy import KVGeometry, TokenMeta
from mosaic_ros.runtime.kv.rope import Rotary1D, RotaryFn


@dataclass
class Chunk:
    """One appended chunk: token facts and, per layer, keys/values (T, H_kv, D) pre-RoPE."""

    meta: TokenMeta
    keys: list[torch.Tensor]
    values: list[torch.Tensor]


@dataclass
class Question:
    """One question. Per layer: queries (H_q, L_q, D), local keys/values (H_kv, L_q, D), all pre-RoPE.

    positions: (P, L_q) int64 rotary positions of the question tokens (right after the stream).
    window: optional (t0, t1) seconds handed to ``begin_question``.
    """

    queries: list[torch.Tensor]
    local_keys: list[torch.Tensor]
    local_values: list[torch.Tensor]
    positions: torch.Tensor
    window: tuple[float, float] | None = None
    label: str = ""


class Workload(Protocol):
    geometry: KVGeometry
    rotary: RotaryFn
    num_chunks: int

    def chunk(self, index: int) -> Chunk: ...

    def chunk_tokens(self, index: int) -> int: ...

    def questions(self) -> list[Question]: ...

    def describe(self) -> dict: ...


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


@dataclass
class SyntheticSpec:
    """Structure of the synthetic stream.

    The video is a sequence of scene segments (``segment_frames`` long); each segment shows
    one of ``scenes`` scenes, drawn so that scenes come back in non-adjacent segments
    (revisits). A scene is ``objects_per_scene`` object prototypes out of ``objects`` plus a
    background; each vision token shows one object of its frame's scene (or the background,
    ``background_share``), with noise and a slow drift of the whole embedding space over
    time. Every frame starts with ``text_tokens_per_frame`` time-marker text tokens; the stream
    starts with a preamble of ``sink_tokens`` text tokens with large keys (attention sinks).
    Each layer projects token embeddings (``embed_dim``) to keys and values with its own
    random matrices (plus a shared key offset per layer), weighted towards the rotary
    dimensions that turn slowly over the stream (``_semantic_profile``). A question is about one object that
    appears in several non-adjacent segments; its queries are the layer's key projection of the
    object scaled so a matching token scores ~``sharpness`` logits above an unrelated one.
    """

    frames: int
    questions: int = 8
    seed: int = 0
    sink_tokens: int = 32
    question_tokens: int = 4
    embed_dim: int = 96
    objects: int = 48
    scenes: int = 12
    objects_per_scene: int = 6
    segment_frames: tuple[int, int] = (8, 30)
    background_share: float = 0.3
    noise: float = 0.35
    drift: float = 0.02
    sharpness: float = 5.0
    frame_seconds: float = 2.0
    extra: dict = field(default_factory=dict)


class SyntheticWorkload:
    """Seeded synthetic KV with scenes, revisits, drift and time markers (see ``SyntheticSpec``)."""

    def __init__(self, shape: BenchShape, spec: SyntheticSpec, dtype: torch.dtype = torch.float16):
        if spec.frames <= 0:
            raise ValueError(f"frames must be positive, got {spec.frames}")
        if spec.questions <= 0:
            raise ValueError(f"questions must be positive, got {spec.questions}")
        self.shape = shape
        self.spec = spec
        self.geometry = shape.geometry(dtype)
        self.rotary = Rotary1D(shape.head_dim, theta=shape.rope_theta)
        self.num_chunks = spec.frames + 1
        g = torch.Generator().manual_seed(spec.seed)
        e, hd = spec.embed_dim, shape.num_kv_heads * shape.head_dim
        self.protos = _unit(torch.randn(spec.objects, e, generator=g))
        self.sink_proto = 3.0 * _unit(torch.randn(e, generator=g))
        self.time_proto = _unit(torch.randn(e, generator=g))
        self.scene_objects = torch.stack(
            [torch.randperm(spec.objects, generator=g)[: spec.objects_per_scene] for _ in range(spec.scenes)]
        )
        self.scene_background = 0.5 * _unit(torch.randn(spec.scenes, e, generator=g))
        self.scene_of_frame, self.segment_of_frame = self._timeline(g)
        self.drift = torch.cumsum(spec.drift * torch.randn(spec.frames, e, generator=g), dim=0)
        n_layers = shape.num_layers
        profile = self._semantic_profile().repeat(shape.num_kv_heads)
        self.wk = torch.randn(n_layers, e, hd, generator=g) / math.sqrt(e) * profile
        self.bk = 0.5 * torch.randn(n_layers, hd, generator=g) * profile
        self.wv = torch.randn(n_layers, e, hd, generator=g) / math.sqrt(e)
        # Chunks are projected in bfloat16 (several times faster on CPU; the values are random anyway).
        self._wk_flat = self.wk.permute(1, 0, 2).reshape(e, n_layers * hd).to(torch.bfloat16)
        self._bk_flat = self.bk.reshape(n_layers * hd).to(torch.bfloat16)
        self._wv_flat = self.wv.permute(1, 0, 2).reshape(e, n_layers * hd).to(torch.bfloat16)
        self._question_cache: list[Question] | None = None

    def _semantic_profile(self) -> torch.Tensor:
        """(D,) per-dimension key amplitude, mean square 1: rotary pairs whose wavelength spans the
        stream get 4x the amplitude of faster ones. Real models carry semantic matching mostly in
        these slow dimensions, which is why position-free (pre-RoPE) scoring works at all."""
        wavelength = 2 * math.pi / self.rotary.inv_freq
        half = torch.where(wavelength >= self.total_tokens, 1.0, 0.25)
        amp = torch.cat((half, half))
        return amp / amp.square().mean().sqrt()

    def _timeline(self, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        spec = self.spec
        scenes, segments = [], []
        prev, seg = -1, 0
        lo, hi = spec.segment_frames
        while len(scenes) < spec.frames:
            length = int(torch.randint(lo, hi + 1, (1,), generator=g))
            scene = int(torch.randint(0, spec.scenes, (1,), generator=g))
            if spec.scenes > 1 and scene == prev:
                scene = (scene + 1) % spec.scenes
            scenes += [scene] * length
            segments += [seg] * length
            prev, seg = scene, seg + 1
        return torch.tensor(scenes[: spec.frames]), torch.tensor(segments[: spec.frames])

    @property
    def total_tokens(self) -> int:
        return self.spec.sink_tokens + self.spec.frames * self.shape.tokens_per_frame

    def _project(self, emb: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """emb (T, E) -> per layer keys, values (T, H_kv, D) in the KV dtype (views of one tensor)."""
        t = emb.shape[0]
        n_layers, h, d = self.shape.num_layers, self.shape.num_kv_heads, self.shape.head_dim
        emb = emb.to(torch.bfloat16)
        keys = torch.addmm(self._bk_flat, emb, self._wk_flat).to(self.geometry.dtype).view(t, n_layers, h, d)
        values = (emb @ self._wv_flat).to(self.geometry.dtype).view(t, n_layers, h, d)
        return [keys[:, i] for i in range(n_layers)], [values[:, i] for i in range(n_layers)]

    def chunk_tokens(self, index: int) -> int:
        """Tokens in chunk ``index`` (without generating it)."""
        return self.spec.sink_tokens if index == 0 else self.shape.tokens_per_frame

    def chunk(self, index: int) -> Chunk:
        """Chunk 0 is the sink preamble; chunk i >= 1 is frame i - 1."""
        spec, shape = self.spec, self.shape
        g = torch.Generator().manual_seed(spec.seed * 1_000_003 + index + 1)
        e = spec.embed_dim
        if index == 0:
            n = spec.sink_tokens
            emb = self.sink_proto + 0.1 * torch.randn(n, e, generator=g) / math.sqrt(e)
            meta = TokenMeta(
                positions=torch.arange(n)[None],
                stamps=torch.zeros(n, dtype=torch.float64),
                modality=torch.zeros(n, dtype=torch.uint8),
                frame=torch.full((n,), -1),
            )
        else:
            f = index - 1
            nt, nv = shape.text_tokens_per_frame, shape.vision_tokens_per_frame
            scene = int(self.scene_of_frame[f])
            text = self.time_proto + 0.2 * torch.randn(nt, e, generator=g) / math.sqrt(e)
            pick = torch.randint(0, spec.objects_per_scene, (nv,), generator=g)
            objects = self.protos[self.scene_objects[scene][pick]]
            amp = 0.8 + 0.4 * torch.rand(nv, 1, generator=g)
            background = torch.rand(nv, 1, generator=g) < spec.background_share
            vision = torch.where(background, self.scene_background[scene], objects * amp)
            vision = vision + self.drift[f] + spec.noise * torch.randn(nv, e, generator=g) / math.sqrt(e)
            emb = torch.cat((text, vision))
            n = nt + nv
            start = spec.sink_tokens + f * n
            modality = torch.ones(n, dtype=torch.uint8)
            modality[:nt] = 0
            frame = torch.full((n,), f)
            frame[:nt] = -1
            meta = TokenMeta(
                positions=torch.arange(start, start + n)[None],
                stamps=torch.full((n,), f * spec.frame_seconds, dtype=torch.float64),
                modality=modality,
                frame=frame,
            )
        keys, values = self._project(emb)
        return Chunk(meta, keys, values)

    def question_objects(self) -> torch.Tensor:
        """Objects that appear in at least two non-adjacent segments (the questions' topics)."""
        segs = []
        for obj in range(self.spec.objects):
            in_scene = (self.scene_objects == obj).any(dim=1)
            frames = in_scene[self.scene_of_frame]
            seg = torch.unique(self.segment_of_frame[frames])
            non_adjacent = seg.numel() >= 2 and bool(((seg[1:] - seg[:-1]) > 1).any())
            segs.append(seg.numel() if non_adjacent else 0)
        counts = torch.tensor(segs)
        good = torch.nonzero(counts >= 2).flatten()
        if good.numel() == 0:
            good = torch.nonzero(counts == counts.max()).flatten()
        return good

    def questions(self) -> list[Question]:
        if self._question_cache is None:
            self._question_cache = [self._question(j) for j in range(self.spec.questions)]
        return self._question_cache

    def _question(self, j: int) -> Question:
        spec, shape = self.spec, self.shape
        g = torch.Generator().manual_seed(spec.seed * 1_000_003 + 10_000_019 + j)
        e, lq = spec.embed_dim, spec.question_tokens
        topics = self.question_objects()
        obj = int(topics[int(torch.randint(0, topics.numel(), (1,), generator=g))])
        n_obj = max(lq - max(lq // 4, 1), 1)
        emb = torch.cat(
            (
                self.protos[obj] + 0.2 * torch.randn(n_obj, e, generator=g) / math.sqrt(e),
                self.time_proto + 0.2 * torch.randn(lq - n_obj, e, generator=g) / math.sqrt(e),
            )
        )
        d, hkv, hq = shape.head_dim, shape.num_kv_heads, shape.num_q_heads
        group = hq // hkv
        alpha = spec.sharpness * math.sqrt(d) * e / d
        per_head = emb[None] + 0.2 * torch.randn(hq, lq, e, generator=g) / math.sqrt(e)
        kv_head = torch.arange(hq) // group
        queries, local_keys, local_values = [], [], []
        for layer in range(shape.num_layers):
            wk = self.wk[layer].view(e, hkv, d)
            head_wk = wk.permute(1, 0, 2)[kv_head]
            queries.append(alpha * torch.einsum("hle,hed->hld", per_head, head_wk))
            k = (emb @ self.wk[layer] + self.bk[layer]).view(lq, hkv, d).transpose(0, 1)
            v = (emb @ self.wv[layer]).view(lq, hkv, d).transpose(0, 1)
            local_keys.append(k.contiguous())
            local_values.append(v.contiguous())
        start = self.total_tokens
        return Question(
            queries=queries,
            local_keys=local_keys,
            local_values=local_values,
            positions=torch.arange(start, start + lq)[None],
            label=f"object {obj}",
        )

    def describe(self) -> dict:
        spec = self.spec
        return {
            "kind": "synthetic",
            "frames": spec.frames,
            "tokens": self.total_tokens,
            "tokens_per_frame": self.shape.tokens_per_frame,
            "sink_tokens": spec.sink_tokens,
            "questions": spec.questions,
            "question_tokens": spec.question_tokens,
            "scenes": spec.scenes,
            "objects": spec.objects,
            "segments": int(self.segment_of_frame[-1]) + 1,
            "seed": spec.seed,
        }
