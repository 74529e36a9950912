"""Frame validation and pixel preprocessing for the model families, in numpy and PIL.

No torchvision: frames are resized with PIL (bicubic, on uint8, as the transformers ``*Pil``
image processors do), rescaled to [0, 1] and normalized in float32, then laid out the way
each vision tower expects. The results equal the transformers Pil image processors
(``Qwen2VLImageProcessorPil`` for the Qwen families, the first, whole-image view of
``LlavaOnevisionImageProcessorPil`` for LLaVA-OneVision); the tests pin that down.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

from mosaic_ros.runtime.models.base import FrameError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HALF_MEAN = (0.5, 0.5, 0.5)
HALF_STD = (0.5, 0.5, 0.5)


def validate_frames(frames: list[np.ndarray]) -> None:
    """Raise ``FrameError`` unless ``frames`` is a non-empty list of RGB uint8 arrays (H, W, 3)."""
    if not isinstance(frames, (list, tuple)) or len(frames) == 0:
        raise FrameError("expected a non-empty list of frames (RGB uint8 arrays of shape (H, W, 3))")
    for i, frame in enumerate(frames):
        if not isinstance(frame, np.ndarray):
            raise FrameError(f"frame {i}: expected a numpy array, got {type(frame).__name__}")
        if frame.size == 0:
            raise FrameError(f"frame {i}: empty array of shape {frame.shape}; a frame needs H, W > 0")
        if frame.ndim != 3 or frame.shape[2] != 3:
            raise FrameError(
                f"frame {i}: expected shape (H, W, 3) with RGB channels last, got shape {frame.shape}"
            )
        if frame.dtype != np.uint8:
            raise FrameError(
                f"frame {i}: expected dtype uint8 (0..255), got {frame.dtype}; convert with "
                "np.clip(x * 255, 0, 255).astype(np.uint8) for float images in [0, 1]"
            )


def resize_bicubic(frame: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize an RGB uint8 frame (H, W, 3) to (height, width, 3) uint8 with PIL's bicubic filter."""
    if frame.shape[0] == height and frame.shape[1] == width:
        return np.ascontiguousarray(frame)
    image = Image.fromarray(np.ascontiguousarray(frame))
    return np.asarray(image.resize((width, height), resample=Image.Resampling.BICUBIC))


def normalize(frame: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """uint8 (H, W, 3) -> float32 (3, H, W): ``(x / 255 - mean) / std`` per channel.

    The rescale is done in float64 and cast to float32 before normalizing, the same order of
    operations as the transformers image processors, so the values agree bit for bit.
    """
    scaled = (frame.astype(np.float64) * (1.0 / 255.0)).astype(np.float32)
    out = (scaled - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return np.ascontiguousarray(out.transpose(2, 0, 1))


@dataclass(frozen=True)
class QwenFrameSpec:
    """How a Qwen-VL vision tower wants a frame.

    ``patch_size`` pixels per patch side, ``merge_size`` patches merged per LM token side,
    ``temporal_patch_size`` frames per temporal patch; the resized frame has between
    ``min_pixels`` and ``max_pixels`` pixels, each side a multiple of ``patch_size * merge_size``.
    """

    patch_size: int
    merge_size: int
    temporal_patch_size: int
    min_pixels: int
    max_pixels: int
    mean: tuple[float, ...] = CLIP_MEAN
    std: tuple[float, ...] = CLIP_STD

    @property
    def factor(self) -> int:
        """Side granularity of the resized frame in pixels."""
        return self.patch_size * self.merge_size


def qwen_resize_shape(height: int, width: int, spec: QwenFrameSpec) -> tuple[int, int]:
    """Target (height, width) in pixels for a frame of (height, width): aspect kept as well as the
    ``spec.factor`` grid allows, area within [min_pixels, max_pixels]."""
    factor = spec.factor
    if max(height, width) / min(height, width) > 200:
        raise FrameError(f"frame aspect ratio {max(height, width) / min(height, width):.0f} exceeds 200")
    target_h = round(height / factor) * factor
    target_w = round(width / factor) * factor
    if target_h * target_w > spec.max_pixels:
        shrink = math.sqrt(height * width / spec.max_pixels)
        target_h = max(factor, math.floor(height / shrink / factor) * factor)
        target_w = max(factor, math.floor(width / shrink / factor) * factor)
    elif target_h * target_w < spec.min_pixels:
        grow = math.sqrt(spec.min_pixels / (height * width))
        target_h = math.ceil(height * grow / factor) * factor
        target_w = math.ceil(width * grow / factor) * factor
    return target_h, target_w


def qwen_patchify(
    frame: np.ndarray, spec: QwenFrameSpec, later_frames: tuple[np.ndarray, ...] = ()
) -> tuple[np.ndarray, tuple[int, int, int]]:
    """RGB uint8 frames (H, W, 3) of one temporal patch -> (patches, grid_thw) for a Qwen-VL tower.

    ``frame`` and the up to ``temporal_patch_size - 1`` ``later_frames`` after it fill one
    temporal patch, in order; when fewer are given the last is repeated, as the transformers
    video processor pads a video (a lone frame becomes its own copies). The later frames are
    resized to the first frame's target size (a camera's frames share one).
    patches: float32 (grid_h * grid_w, 3 * temporal_patch_size * patch_size**2), rows ordered
    merge-window by merge-window as the patch merger expects; grid_thw = (1, grid_h, grid_w).
    """
    p, m, t = spec.patch_size, spec.merge_size, spec.temporal_patch_size
    if len(later_frames) >= t:
        raise FrameError(f"a temporal patch holds {t} frames, got {1 + len(later_frames)}")
    height, width = qwen_resize_shape(frame.shape[0], frame.shape[1], spec)
    frames = (frame, *later_frames)
    pixels = [normalize(resize_bicubic(f, height, width), spec.mean, spec.std) for f in frames]
    pixels += [pixels[-1]] * (t - len(pixels))
    grid_h, grid_w = height // p, width // p
    # (time, channel, rows of windows, row in window, py, cols of windows, col in window, px)
    blocks = np.stack(pixels).reshape(t, 3, grid_h // m, m, p, grid_w // m, m, p)
    # -> (rows of windows, cols of windows, row in window, col in window, channel, time, py, px)
    blocks = blocks.transpose(2, 5, 3, 6, 1, 0, 4, 7)
    return np.ascontiguousarray(blocks).reshape(grid_h * grid_w, 3 * t * p * p), (1, grid_h, grid_w)


def square_resize(
    frame: np.ndarray, side: int, mean: tuple[float, ...], std: tuple[float, ...]
) -> np.ndarray:
    """One RGB uint8 frame (H, W, 3) -> float32 (3, side, side), resized without keeping aspect
    (as LLaVA-OneVision's video path does), rescaled and normalized."""
    return normalize(resize_bicubic(frame, side, side), mean, std)
