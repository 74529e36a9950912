"""A benchmark workload captured from a real model over a real video.

A ``StreamSession`` with the ``dense`` policy ingests the video's frames (sampled at
``sample_fps``); its store then holds every token's pre-RoPE K/V and facts, which are
recorded chunk by chunk (the system preamble, then one chunk per frame) so every policy can
replay exactly the stream the model produced. Questions are asked through
``session.question_queries`` (each layer's pre-RoPE prefill queries). The session API gives
no question keys/values, so the question's local tokens are zero keys and values: every
policy sees the same null local tokens, the context part of attention is unchanged.
The whole capture is held in memory: meant for the small ``tiny-random`` models.
"""

from __future__ import annotations

import torch

from mosaic_ros.runtime.bench.workloads import Chunk, Question
from mosaic_ros.runtime.kv.policy import KVGeometry, PolicyConfig, TokenMeta

QUESTIONS = (
    "What is happening in the video?",
    "Who walks past the camera?",
    "What did the person on the left carry?",
    "How many people are visible at the start?",
    "What changed between the beginning and the end?",
    "Where did the group go?",
    "What colour is the coat of the person in the middle?",
    "Did anyone stop walking?",
)


class VideoWorkload:
    """KV of ``model`` (default ``tiny-random:qwen2.5-vl``) over the video at ``path``."""

    def __init__(
        self,
        path: str,
        frames: int,
        questions: int,
        seed: int = 0,
        dtype: torch.dtype = torch.float16,
        device: str = "cpu",
        model: str = "tiny-random:qwen2.5-vl",
        sample_fps: float = 2.0,
        max_side: int = 448,
    ):
        from mosaic_ros.runtime.models import load_model
        from mosaic_ros.runtime.session import SessionConfig, StreamSession
        from mosaic_ros.runtime.video import sampled_frames

        if frames <= 0 or questions <= 0:
            raise ValueError(f"frames and questions must be positive, got {frames}, {questions}")
        self.path, self.model = path, model
        adapter = load_model(model, device=device, seed=seed)
        session = StreamSession(
            adapter,
            SessionConfig(
                policy="dense",
                kv=PolicyConfig(budget_tokens=1 << 30),
                kv_dtype=dtype,
                remember_dialogue=False,
            ),
        )
        store = session.policy.store
        bounds = [store.num_tokens]
        for stamp, rgb in sampled_frames(path, sample_fps, max_frames=frames, max_side=max_side):
            session.ingest(rgb, stamp)
            bounds.append(store.num_tokens)
        if len(bounds) < 2:
            raise ValueError(f"no frame could be read from {path}")
        self.frames = len(bounds) - 1
        self.geometry: KVGeometry = session.policy.geometry
        self.rotary = session.rotary
        self.num_chunks = len(bounds)
        self._chunks: list[Chunk] = []
        for a, b in zip([0, *bounds[:-1]], bounds, strict=True):
            ids = torch.arange(a, b)
            meta = TokenMeta(
                positions=store.positions[:, a:b].clone(),
                stamps=store.stamps[a:b].clone(),
                modality=store.modality[a:b].clone(),
                frame=store.frame[a:b].clone(),
            )
            keys, values = [], []
            for layer in range(self.geometry.num_layers):
                kv = store.read(layer, store.rows_of(layer, ids)).cpu()
                keys.append(kv[:, 0].contiguous())
                values.append(kv[:, 1].contiguous())
            self._chunks.append(Chunk(meta, keys, values))
        next_pos = int(store.positions.max()) + 1
        texts = [QUESTIONS[i % len(QUESTIONS)] for i in range(questions)]
        self._questions = [self._question(session, text, next_pos) for text in texts]

    def _question(self, session, text: str, next_pos: int) -> Question:
        queries = [q.cpu() for q in session.question_queries(text)]
        g = self.geometry
        lq = queries[0].shape[1]
        zeros = torch.zeros(g.num_kv_heads, lq, g.head_dim)
        return Question(
            queries=queries,
            local_keys=[zeros] * g.num_layers,
            local_values=[zeros] * g.num_layers,
            positions=(next_pos + torch.arange(lq))[None].expand(g.position_dims, lq).clone(),
            label=text,
        )

    def chunk(self, index: int) -> Chunk:
        """Chunk 0 is the session's system preamble; chunk i >= 1 is frame i - 1."""
        return self._chunks[index]

    def chunk_tokens(self, index: int) -> int:
        return self._chunks[index].meta.num_tokens

    def questions(self) -> list[Question]:
        return self._questions

    def describe(self) -> dict:
        return {
            "kind": "video",
            "path": self.path,
            "model": self.model,
            "frames": self.frames,
            "tokens": sum(c.meta.num_tokens for c in self._chunks),
            "questions": len(self._questions),
            "position_dims": self.geometry.position_dims,
        }
