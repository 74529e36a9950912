"""Qwen2.5-VL and Qwen3-VL: M-RoPE over (temporal, height, width), frames as one-patch videos.

Each frame chunk is a video of one temporal patch: ``<time marker><|vision_start|>``, the
chunk's ``<|video_pad|>`` tokens, ``<|vision_end|>``. Its vision tokens all take the temporal
position where the chunk starts and spread over height/width positions from there; the text
after them continues at that start + max(rows, cols), as ``get_rope_index`` numbers a sequence
of one-patch videos. Elapsed time reaches the model through the time marker text.

A temporal patch holds ``temporal_patch_size`` (2) frames. By default a chunk is one frame,
copied into both halves of its patch: no frame waits for another. With ``pair_frames`` two
consecutive frames share one patch, as the models' own video path puts them: half the vision
tokens, KV and vision-tower work per second of video, at the price of holding each pair's first
frame back until its second arrives (one frame period); the chunk is marked at the midpoint of
the pair's two stamps (``chunk_stamp``).
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch
from transformers import (
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLImageProcessorPil,
    Qwen3VLForConditionalGeneration,
)

from mosaic_ros.runtime.models.base import (
    VISION,
    Chunk,
    ChunkPart,
    FrameBatch,
    PositionCursor,
    VisionFeatures,
    VLMAdapter,
)
from mosaic_ros.runtime.models.preprocess import (
    QwenFrameSpec,
    qwen_patchify,
    qwen_resize_shape,
    validate_frames,
)


class QwenVLAdapter(VLMAdapter):
    """What Qwen2.5-VL and Qwen3-VL share: patchified frames, M-RoPE positions, vision delimiters.

    ``max_frame_tokens`` bounds the vision tokens per frame chunk (frames are resized so that
    their merged patch grid has at most that many cells, aspect kept); default 196.
    ``pair_frames``: two consecutive frames per chunk, one temporal patch (see the module
    docstring); off by default.
    """

    position_dims: ClassVar[int] = 3
    model_class: ClassVar[type]
    default_frame_tokens: ClassVar[int] = 196
    min_frame_tokens: ClassVar[int] = 4

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        *,
        image_mean: tuple[float, ...],
        image_std: tuple[float, ...],
        max_frame_tokens: int | None = None,
        pair_frames: bool = False,
    ) -> None:
        super().__init__(model, tokenizer, image_mean=image_mean, image_std=image_std)
        budget = self.default_frame_tokens if max_frame_tokens is None else int(max_frame_tokens)
        if budget < self.min_frame_tokens:
            raise ValueError(f"max_frame_tokens must be at least {self.min_frame_tokens}, got {budget}")
        vision = model.config.vision_config
        if pair_frames and vision.temporal_patch_size != 2:
            raise ValueError(f"pair_frames needs temporal_patch_size 2, got {vision.temporal_patch_size}")
        self.frames_per_chunk = 2 if pair_frames else 1
        factor = vision.patch_size * vision.spatial_merge_size
        self.frame_spec = QwenFrameSpec(
            patch_size=vision.patch_size,
            merge_size=vision.spatial_merge_size,
            temporal_patch_size=vision.temporal_patch_size,
            min_pixels=self.min_frame_tokens * factor * factor,
            max_pixels=budget * factor * factor,
            mean=self.image_mean,
            std=self.image_std,
        )
        self.video_token_id = int(model.config.video_token_id)
        self.vision_start_token_id = int(model.config.vision_start_token_id)
        self.vision_end_token_id = int(model.config.vision_end_token_id)

    def tokens_per_frame(self, height: int, width: int) -> int:
        resized_h, resized_w = qwen_resize_shape(height, width, self.frame_spec)
        return (resized_h // self.frame_spec.factor) * (resized_w // self.frame_spec.factor)

    def prepare_frames(self, frames: list[np.ndarray]) -> FrameBatch:
        validate_frames(frames)
        step = self.frames_per_chunk
        groups = [frames[i : i + step] for i in range(0, len(frames), step)]
        patches, grids = zip(
            *(qwen_patchify(group[0], self.frame_spec, tuple(group[1:])) for group in groups), strict=True
        )
        return FrameBatch(
            pixel_values=torch.from_numpy(np.concatenate(patches, axis=0)),
            grid_thw=torch.tensor(grids, dtype=torch.long),
            frame_sizes=[(int(f.shape[0]), int(f.shape[1])) for f in frames],
        )

    def encode_frames(self, batch: FrameBatch) -> VisionFeatures:
        with torch.no_grad():
            out = self.model.model.get_video_features(
                pixel_values_videos=batch.pixel_values.to(self.device, self.dtype),
                video_grid_thw=batch.grid_thw.to(self.device),
            )
        return VisionFeatures(
            embeds=list(out.pooler_output), grid_thw=batch.grid_thw, deepstack=self._deepstack(out)
        )

    def _deepstack(self, vision_output: Any) -> list[list[torch.Tensor]] | None:
        return None

    def frame_chunk(self, features: VisionFeatures, stamp_s: float, cursor: PositionCursor) -> Chunk:
        self._single_frame(features)
        self._check_stamp(stamp_s)
        merge = self.frame_spec.merge_size
        rows = int(features.grid_thw[0, 1]) // merge
        cols = int(features.grid_thw[0, 2]) // merge
        n = rows * cols
        offsets = torch.stack(
            [
                torch.zeros(n, dtype=torch.long),
                torch.arange(rows, dtype=torch.long).repeat_interleave(cols),
                torch.arange(cols, dtype=torch.long).repeat(rows),
            ]
        )
        vision = ChunkPart(
            token_ids=torch.full((n,), self.video_token_id, dtype=torch.long),
            offsets=offsets,
            span=max(rows, cols),
            modality=VISION,
            embeds=features.embeds[0],
        )
        opening = [*self.encode_text(self.time_marker(stamp_s)), self.vision_start_token_id]
        parts = [self._text_part(opening), vision, self._text_part([self.vision_end_token_id])]
        return self._chunk(parts, cursor)

    def _image_processor(self) -> Qwen2VLImageProcessorPil:
        spec = self.frame_spec
        return Qwen2VLImageProcessorPil(
            patch_size=spec.patch_size,
            merge_size=spec.merge_size,
            temporal_patch_size=spec.temporal_patch_size,
            image_mean=list(spec.mean),
            image_std=list(spec.std),
            size={"shortest_edge": spec.min_pixels, "longest_edge": spec.max_pixels},
        )


class Qwen25VLAdapter(QwenVLAdapter):
    """Qwen2.5-VL: M-RoPE in contiguous (temporal, height, width) frequency sections."""

    family: ClassVar[str] = "qwen2.5-vl"
    model_type: ClassVar[str] = "qwen2_5_vl"
    model_class: ClassVar[type] = Qwen2_5_VLForConditionalGeneration


class Qwen3VLAdapter(QwenVLAdapter):
    """Qwen3-VL: interleaved M-RoPE, native ``<12.5 seconds>`` time markers, and deepstack:
    features from intermediate vision layers are added to the vision tokens' hidden states after
    the first LM layers. A frame chunk carries them in ``extra_model_kwargs``
    (``visual_pos_masks`` (1, L) bool, ``deepstack_visual_embeds``: one (n_vision, hidden) per layer)."""

    family: ClassVar[str] = "qwen3-vl"
    model_type: ClassVar[str] = "qwen3_vl"
    model_class: ClassVar[type] = Qwen3VLForConditionalGeneration

    def time_marker(self, stamp_s: float) -> str:
        return f"<{stamp_s:.1f} seconds>"

    def _deepstack(self, vision_output: Any) -> list[list[torch.Tensor]]:
        per_layer = vision_output.deepstack_features
        return [[layer[i] for layer in per_layer] for i in range(len(vision_output.pooler_output))]

    def frame_chunk(self, features: VisionFeatures, stamp_s: float, cursor: PositionCursor) -> Chunk:
        chunk = super().frame_chunk(features, stamp_s, cursor)
        chunk.extra_model_kwargs = self._deepstack_kwargs(chunk.modality, features.deepstack[0])
        return chunk

    def _deepstack_kwargs(self, modality: torch.Tensor, deepstack: list[torch.Tensor]) -> dict[str, Any]:
        return {
            "visual_pos_masks": (modality == VISION)[None].to(self.device),
            "deepstack_visual_embeds": [layer.to(self.device, self.dtype) for layer in deepstack],
        }

    def _concat_extra(self, chunks: list[Chunk]) -> dict[str, Any]:
        stacks = [c.extra_model_kwargs["deepstack_visual_embeds"] for c in chunks if c.extra_model_kwargs]
        if not stacks:
            return {}
        per_layer = [torch.cat([stack[i] for stack in stacks]) for i in range(len(stacks[0]))]
        return self._deepstack_kwargs(torch.cat([c.modality for c in chunks]), per_layer)
