"""Model adapters: one interface (``VLMAdapter``) over Qwen2.5-VL, Qwen3-VL and LLaVA-OneVision.

``load_model(spec)`` takes a Hugging Face id, a local folder or ``tiny-random:<family>``.
"""

from mosaic_ros.runtime.kv.rope import apply_rotary, rotate_half, unapply_rotary
from mosaic_ros.runtime.models.base import (
    TEXT,
    VISION,
    Chunk,
    FrameBatch,
    FrameError,
    ModelLoadError,
    PositionCursor,
    VisionFeatures,
    VLMAdapter,
)
from mosaic_ros.runtime.models.llava_onevision import LlavaOnevisionAdapter
from mosaic_ros.runtime.models.loading import ADAPTERS, TINY_PREFIX, load_model
from mosaic_ros.runtime.models.qwen_vl import Qwen3VLAdapter, Qwen25VLAdapter, QwenVLAdapter
from mosaic_ros.runtime.models.tiny import TINY_FAMILIES

__all__ = [
    "ADAPTERS",
    "TEXT",
    "TINY_FAMILIES",
    "TINY_PREFIX",
    "VISION",
    "Chunk",
    "FrameBatch",
    "FrameError",
    "LlavaOnevisionAdapter",
    "ModelLoadError",
    "PositionCursor",
    "Qwen3VLAdapter",
    "Qwen25VLAdapter",
    "QwenVLAdapter",
    "VLMAdapter",
    "VisionFeatures",
    "apply_rotary",
    "load_model",
    "rotate_half",
    "unapply_rotary",
]
