"""KV shapes of the models we benchmark at (random values, real sizes)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mosaic_ros.runtime.kv.policy import KVGeometry


@dataclass(frozen=True)
class BenchShape:
    """A model's KV geometry and how many tokens a frame brings (vision + time-marker text)."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    num_q_heads: int
    vision_tokens_per_frame: int
    text_tokens_per_frame: int
    rope_theta: float

    def geometry(self, dtype: torch.dtype) -> KVGeometry:
        return KVGeometry(
            num_layers=self.num_layers,
            num_kv_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            num_q_heads=self.num_q_heads,
            position_dims=1,
            dtype=dtype,
        )

    @property
    def tokens_per_frame(self) -> int:
        return self.vision_tokens_per_frame + self.text_tokens_per_frame


# Frames are counted at 196 visual tokens (LLaVA-OneVision's video pooling) for every 7B/3B
# shape so runs compare at one token count; Qwen2.5-VL at 448x448 brings ~128.
SHAPES: dict[str, BenchShape] = {
    "qwen2.5-vl-7b": BenchShape(28, 4, 128, 28, 196, 2, 1_000_000.0),
    "qwen2.5-vl-3b": BenchShape(36, 2, 128, 16, 196, 2, 1_000_000.0),
    "llava-ov-7b": BenchShape(28, 4, 128, 28, 196, 2, 1_000_000.0),
    "tiny": BenchShape(2, 2, 16, 4, 24, 1, 10_000.0),
}
