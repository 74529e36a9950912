"""Qwen-VL frame pairing: two consecutive frames in one temporal patch, as the models' video path.

The transformers video processors need torchvision, which this project does not install, so
their ``patchify`` (the layout of a video's pixels into temporal patches) is run from its own
source: the method is read out of the installed module file and executed with torch alone.
Frames are made at the resized size already, so no resize (torchvision's, in that path) is
involved; the pixel values come from ``preprocess.normalize``, which equals
``Qwen2VLImageProcessorPil`` (``test_preprocess.py``). Vision features of paired chunks are then
checked against the model's own ``get_video_features`` on the whole video's patches.
"""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from mosaic_ros.runtime.models import VISION, PositionCursor, load_model
from mosaic_ros.runtime.models.preprocess import QwenFrameSpec, normalize, qwen_patchify

# frames already on the resize grid: tiny Qwen2.5-VL (patch 14, merge 2) 4x5 cells = 20 tokens,
# tiny Qwen3-VL (patch 16) likewise
FRAME_SIZE = {"qwen2.5-vl": (112, 140), "qwen3-vl": (128, 160)}
VIDEO_PROCESSOR = {
    "qwen2.5-vl": ("qwen2_vl/video_processing_qwen2_vl.py", "Qwen2VLVideoProcessor"),
    "qwen3-vl": ("qwen3_vl/video_processing_qwen3_vl.py", "Qwen3VLVideoProcessor"),
}


def transformers_patchify(family: str):
    """The video processor's own ``patchify`` method, executed from its source with torch only."""
    relative, class_name = VIDEO_PROCESSOR[family]
    path = Path(importlib.util.find_spec("transformers").submodule_search_locations[0], "models", relative)
    tree = ast.parse(path.read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == class_name)
    method = next(n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "patchify")
    namespace: dict = {"torch": torch}
    exec(compile(ast.Module(body=[method], type_ignores=[]), str(path), "exec"), namespace)
    return namespace["patchify"]


def camera_frames(family: str, n: int, seed: int = 3) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (*FRAME_SIZE[family], 3), dtype=np.uint8) for _ in range(n)]


def video_pixels(frames: list[np.ndarray], spec: QwenFrameSpec, family: str) -> tuple[torch.Tensor, list]:
    """(pixel_values_videos, [grid_t, grid_h, grid_w]) of ``frames`` as one video, transformers layout."""
    video = torch.from_numpy(np.stack([normalize(f, spec.mean, spec.std) for f in frames]))[None]
    patches, grid_t, grid_h, grid_w = transformers_patchify(family)(
        None, video, spec.patch_size, spec.merge_size, spec.temporal_patch_size
    )
    return patches[0], [grid_t, grid_h, grid_w]


@pytest.fixture(scope="module", params=["qwen2.5-vl", "qwen3-vl"])
def family(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.mark.parametrize("n_frames", [2, 4, 5])
def test_paired_patches_equal_the_transformers_video_layout(family: str, n_frames: int) -> None:
    """Pairs in order, and an odd last frame repeated, exactly as the video path pads a video."""
    adapter = load_model(f"tiny-random:{family}", device="cpu", dtype="float32", pair_frames=True)
    frames = camera_frames(family, n_frames)
    batch = adapter.prepare_frames(frames)
    expected, grid = video_pixels(frames, adapter.frame_spec, family)
    chunks = (n_frames + 1) // 2
    assert grid[0] == chunks
    assert batch.grid_thw.tolist() == [[1, grid[1], grid[2]]] * chunks
    assert torch.equal(batch.pixel_values, expected)
    assert batch.frame_sizes == [FRAME_SIZE[family]] * n_frames


def test_an_unpaired_frame_is_a_pair_of_itself(family: str) -> None:
    adapter = load_model(f"tiny-random:{family}", device="cpu", dtype="float32")
    frame = camera_frames(family, 1)[0]
    alone, grid = qwen_patchify(frame, adapter.frame_spec)
    doubled, _ = qwen_patchify(frame, adapter.frame_spec, (frame,))
    assert np.array_equal(alone, doubled)
    expected, video_grid = video_pixels([frame], adapter.frame_spec, family)
    assert np.array_equal(alone, expected.numpy()) and list(grid) == video_grid


def test_paired_features_equal_the_models_own_video_features(family: str) -> None:
    adapter = load_model(f"tiny-random:{family}", device="cpu", dtype="float32", pair_frames=True)
    frames = camera_frames(family, 4)
    features = adapter.encode_frames(adapter.prepare_frames(frames))
    pixels, grid = video_pixels(frames, adapter.frame_spec, family)
    with torch.no_grad():
        own = adapter.model.model.get_video_features(
            pixel_values_videos=pixels, video_grid_thw=torch.tensor([grid])
        )
    torch.testing.assert_close(torch.cat(features.embeds), own.pooler_output[0], rtol=0, atol=1e-5)
    if family == "qwen3-vl":  # deepstack features split the same way
        for layer, whole in enumerate(own.deepstack_features):
            ours = torch.cat([chunk[layer] for chunk in features.deepstack])
            torch.testing.assert_close(ours, whole[0], rtol=0, atol=1e-5)


def test_pairing_halves_the_vision_tokens_per_frame(family: str) -> None:
    single = load_model(f"tiny-random:{family}", device="cpu", dtype="float32")
    paired = load_model(f"tiny-random:{family}", device="cpu", dtype="float32", pair_frames=True)
    height, width = FRAME_SIZE[family]
    assert (single.frames_per_chunk, paired.frames_per_chunk) == (1, 2)
    per_frame_single = single.tokens_per_frame(height, width) / single.frames_per_chunk
    per_frame_paired = paired.tokens_per_frame(height, width) / paired.frames_per_chunk
    assert per_frame_paired == per_frame_single / 2 == 10
    frames = camera_frames(family, 4)
    vision = {}
    for name, adapter in (("single", single), ("paired", paired)):
        features = adapter.encode_frames(adapter.prepare_frames(frames))
        cursor, tokens = PositionCursor(), 0
        for i in range(features.num_frames):
            chunk = adapter.frame_chunk(features.frame(i), float(i), cursor)
            cursor = chunk.cursor
            tokens += int((chunk.modality == VISION).sum())
        vision[name] = tokens
    assert vision == {"single": 80, "paired": 40}


def test_a_pair_is_stamped_at_the_midpoint_of_its_frames(family: str) -> None:
    paired = load_model(f"tiny-random:{family}", device="cpu", dtype="float32", pair_frames=True)
    single = load_model(f"tiny-random:{family}", device="cpu", dtype="float32")
    assert paired.chunk_stamp([10.0, 10.5]) == 10.25
    assert single.chunk_stamp([7.5]) == 7.5
    with pytest.raises(ValueError, match="holds 2 frame"):
        paired.chunk_stamp([1.0])
    features = paired.encode_frames(paired.prepare_frames(camera_frames(family, 2)))
    chunk = paired.frame_chunk(features, paired.chunk_stamp([10.0, 10.5]), PositionCursor())
    marker = paired.time_marker(10.25)
    first_vision = int((chunk.modality == VISION).nonzero()[0])
    assert paired.tokenizer.decode(chunk.token_ids[:first_vision].tolist()).startswith(marker)


def test_pairing_is_refused_where_a_family_has_no_temporal_patch() -> None:
    with pytest.raises(ValueError, match="Qwen-VL option"):
        load_model("tiny-random:llava-ov", device="cpu", dtype="float32", pair_frames=True)
