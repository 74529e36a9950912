"""LLaVA-OneVision: SigLIP vision tower, Qwen2 language model with 1-D RoPE.

A streamed frame is a video of one frame, as the model's video path treats it: resized to the
tower's square input, encoded, projected, bilinearly pooled 2x per side (27x27 -> 14x14 = 196
tokens at real scale) and followed by the learned ``image_newline`` embedding that closes a
video, so a frame is ``<time marker>`` then 197 ``<video>`` tokens. Positions are 1-D.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import numpy as np
import torch
from transformers import LlavaOnevisionForConditionalGeneration, LlavaOnevisionImageProcessorPil

from mosaic_ros.runtime.models.base import (
    VISION,
    Chunk,
    ChunkPart,
    FrameBatch,
    PositionCursor,
    VisionFeatures,
    VLMAdapter,
)
from mosaic_ros.runtime.models.preprocess import square_resize, validate_frames


class LlavaOnevisionAdapter(VLMAdapter):
    """LLaVA-OneVision adapter. Chunk ``position_ids`` are (1, 1, L); the model gets (1, L).

    The tokens per frame are fixed by the vision tower (``pooled_side**2 + 1``);
    ``max_frame_tokens``, if given, must not be below that.
    """

    family: ClassVar[str] = "llava-ov"
    model_type: ClassVar[str] = "llava_onevision"
    model_class: ClassVar[type] = LlavaOnevisionForConditionalGeneration
    position_dims: ClassVar[int] = 1

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        *,
        image_mean: tuple[float, ...],
        image_std: tuple[float, ...],
        max_frame_tokens: int | None = None,
    ) -> None:
        super().__init__(model, tokenizer, image_mean=image_mean, image_std=image_std)
        vision = model.config.vision_config
        self.image_side = int(vision.image_size)
        self.pooled_side = math.ceil((vision.image_size // vision.patch_size) / 2)
        self.frame_tokens = self.pooled_side * self.pooled_side + 1
        if max_frame_tokens is not None and max_frame_tokens < self.frame_tokens:
            raise ValueError(
                f"llava-ov frames are {self.frame_tokens} tokens, fixed by its vision tower; "
                f"max_frame_tokens={max_frame_tokens} cannot be met"
            )
        self.video_token_id = int(model.config.video_token_id)

    def tokens_per_frame(self, height: int, width: int) -> int:
        return self.frame_tokens

    def prepare_frames(self, frames: list[np.ndarray]) -> FrameBatch:
        validate_frames(frames)
        side, mean, std = self.image_side, self.image_mean, self.image_std
        pixels = np.stack([square_resize(frame, side, mean, std) for frame in frames])
        grid = torch.tensor([[1, self.pooled_side, self.pooled_side]] * len(frames), dtype=torch.long)
        return FrameBatch(
            pixel_values=torch.from_numpy(pixels),
            grid_thw=grid,
            frame_sizes=[(int(f.shape[0]), int(f.shape[1])) for f in frames],
        )

    def encode_frames(self, batch: FrameBatch) -> VisionFeatures:
        with torch.no_grad():
            out = self.model.model.get_video_features(
                pixel_values_videos=batch.pixel_values[:, None].to(self.device, self.dtype)
            )
        return VisionFeatures(embeds=list(out.pooler_output), grid_thw=batch.grid_thw)

    def frame_chunk(self, features: VisionFeatures, stamp_s: float, cursor: PositionCursor) -> Chunk:
        self._single_frame(features)
        self._check_stamp(stamp_s)
        n = int(features.embeds[0].shape[0])
        vision = ChunkPart(
            token_ids=torch.full((n,), self.video_token_id, dtype=torch.long),
            offsets=torch.arange(n, dtype=torch.long)[None],
            span=n,
            modality=VISION,
            embeds=features.embeds[0],
        )
        return self._chunk([self._text_part(self.encode_text(self.time_marker(stamp_s))), vision], cursor)

    def _model_position_ids(self, position_ids: torch.Tensor) -> torch.Tensor:
        return position_ids[0]

    def _image_processor(self) -> LlavaOnevisionImageProcessorPil:
        return LlavaOnevisionImageProcessorPil(
            image_mean=list(self.image_mean),
            image_std=list(self.image_std),
            size={"height": self.image_side, "width": self.image_side},
        )
