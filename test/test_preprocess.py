"""Frame preprocessing equals the transformers Pil image processors bit for bit; bad frames are refused."""

import numpy as np
import pytest
from transformers import LlavaOnevisionImageProcessorPil, Qwen2VLImageProcessorPil

from mosaic_ros.runtime.models import FrameError, load_model
from mosaic_ros.runtime.models.preprocess import (
    CLIP_MEAN,
    CLIP_STD,
    HALF_MEAN,
    HALF_STD,
    QwenFrameSpec,
    qwen_patchify,
    qwen_resize_shape,
    square_resize,
    validate_frames,
)

# (height, width): small, budget-limited, needs upscaling, portrait, odd sizes
FRAME_SIZES = [(96, 128), (480, 640), (20, 150), (130, 70), (333, 517)]


def random_frame(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def qwen_processor(spec: QwenFrameSpec) -> Qwen2VLImageProcessorPil:
    return Qwen2VLImageProcessorPil(
        patch_size=spec.patch_size,
        merge_size=spec.merge_size,
        temporal_patch_size=spec.temporal_patch_size,
        image_mean=list(spec.mean),
        image_std=list(spec.std),
        size={"shortest_edge": spec.min_pixels, "longest_edge": spec.max_pixels},
    )


# Real-scale specs: Qwen2.5-VL at 196 tokens per frame, Qwen3-VL at 64.
QWEN25_SPEC = QwenFrameSpec(14, 2, 2, min_pixels=56**2, max_pixels=196 * 28**2, mean=CLIP_MEAN, std=CLIP_STD)
QWEN3_SPEC = QwenFrameSpec(16, 2, 2, min_pixels=64**2, max_pixels=64 * 32**2, mean=HALF_MEAN, std=HALF_STD)


@pytest.mark.parametrize("spec", [QWEN25_SPEC, QWEN3_SPEC], ids=["qwen2.5-vl", "qwen3-vl"])
@pytest.mark.parametrize("size", FRAME_SIZES)
def test_qwen_patches_equal_qwen2vl_pil_processor(spec: QwenFrameSpec, size: tuple[int, int]) -> None:
    frame = random_frame(*size)
    patches, grid = qwen_patchify(frame, spec)
    expected = qwen_processor(spec)(images=[frame], return_tensors="np")
    assert grid == tuple(expected["image_grid_thw"][0])
    assert patches.dtype == np.float32
    assert patches.shape == expected["pixel_values"].shape
    np.testing.assert_array_equal(patches, expected["pixel_values"])


def test_qwen_single_frame_fills_its_temporal_patch_with_copies() -> None:
    patches, _ = qwen_patchify(random_frame(96, 128), QWEN25_SPEC)
    per_step = patches.reshape(patches.shape[0], 3, 2, 14 * 14)
    np.testing.assert_array_equal(per_step[:, :, 0], per_step[:, :, 1])


def test_qwen_resize_keeps_within_pixel_budget() -> None:
    for height, width in FRAME_SIZES:
        resized_h, resized_w = qwen_resize_shape(height, width, QWEN25_SPEC)
        assert resized_h % 28 == 0 and resized_w % 28 == 0
        assert QWEN25_SPEC.min_pixels <= resized_h * resized_w <= QWEN25_SPEC.max_pixels


@pytest.mark.parametrize("family", ["qwen2.5-vl", "qwen3-vl"])
def test_qwen_adapter_batch_equals_processor_on_the_same_frames(family: str) -> None:
    adapter = load_model(f"tiny-random:{family}", device="cpu", dtype="float32")
    frames = [random_frame(h, w, seed=i) for i, (h, w) in enumerate(FRAME_SIZES)]
    batch = adapter.prepare_frames(frames)
    expected = qwen_processor(adapter.frame_spec)(images=frames, return_tensors="np")
    np.testing.assert_array_equal(batch.pixel_values.numpy(), expected["pixel_values"])
    np.testing.assert_array_equal(batch.grid_thw.numpy(), expected["image_grid_thw"])
    assert batch.frame_sizes == FRAME_SIZES


@pytest.mark.parametrize("size", FRAME_SIZES)
def test_llava_frame_equals_llava_onevision_pil_processor_at_real_scale(size: tuple[int, int]) -> None:
    frame = random_frame(*size)
    processor = LlavaOnevisionImageProcessorPil()
    expected = processor(images=[frame], return_tensors="np")["pixel_values"][0][0]
    pixels = square_resize(frame, 384, tuple(processor.image_mean), tuple(processor.image_std))
    assert pixels.shape == (3, 384, 384)
    np.testing.assert_array_equal(pixels, expected)


def test_llava_adapter_batch_equals_processor_on_the_same_frames() -> None:
    adapter = load_model("tiny-random:llava-ov", device="cpu", dtype="float32")
    frames = [random_frame(h, w, seed=i) for i, (h, w) in enumerate(FRAME_SIZES)]
    batch = adapter.prepare_frames(frames)
    processor = adapter._image_processor()
    for i, frame in enumerate(frames):
        expected = processor(images=[frame], return_tensors="np")["pixel_values"][0][0]
        np.testing.assert_array_equal(batch.pixel_values[i].numpy(), expected)
    assert batch.pixel_values.shape == (len(frames), 3, 112, 112)


@pytest.mark.parametrize(
    ("frames", "message"),
    [
        ([], "non-empty list"),
        ("not a list", "non-empty list"),
        ([[1, 2, 3]], "numpy array"),
        ([np.zeros((0, 0, 3), np.uint8)], "empty array"),
        ([np.zeros((0, 10, 3), np.uint8)], "empty array"),
        ([np.zeros((8, 8), np.uint8)], r"shape \(H, W, 3\)"),
        ([np.zeros((8, 8, 4), np.uint8)], r"shape \(H, W, 3\)"),
        ([np.zeros((2, 8, 8, 3), np.uint8)], r"shape \(H, W, 3\)"),
        ([np.zeros((8, 8, 3), np.float32)], "dtype uint8"),
        ([np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8, 3), np.int64)], "frame 1: expected dtype uint8"),
    ],
)
def test_bad_frames_raise_frame_error_saying_why(frames: object, message: str) -> None:
    with pytest.raises(FrameError, match=message):
        validate_frames(frames)


def test_frame_error_is_a_value_error_and_adapters_raise_it() -> None:
    assert issubclass(FrameError, ValueError)
    for family in ("qwen2.5-vl", "llava-ov"):
        adapter = load_model(f"tiny-random:{family}", device="cpu", dtype="float32")
        with pytest.raises(FrameError, match="dtype uint8"):
            adapter.prepare_frames([np.zeros((8, 8, 3), np.float64)])
