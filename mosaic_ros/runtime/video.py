"""Reading a video file as a timestamped frame stream, sampled at a fixed rate."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np


@dataclass(frozen=True)
class VideoInfo:
    path: str
    fps: float
    frame_count: int
    width: int
    height: int


def video_info(path: str | Path) -> VideoInfo:
    """Open ``path`` and read its geometry; raises FileNotFoundError / ValueError with the reason."""
    path = str(path)
    if not Path(path).is_file():
        raise FileNotFoundError(f"video not found: {path}")
    cap = cv2.VideoCapture(path)
    try:
        if not cap.isOpened():
            raise ValueError(f"OpenCV cannot open {path} as a video")
        fps = cap.get(cv2.CAP_PROP_FPS) or 0.0
        return VideoInfo(
            path=path,
            fps=fps if fps > 0 else 25.0,
            frame_count=int(cap.get(cv2.CAP_PROP_FRAME_COUNT)),
            width=int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)),
            height=int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT)),
        )
    finally:
        cap.release()


def sampled_frames(
    path: str | Path, sample_fps: float, max_frames: int | None = None, max_side: int | None = None
) -> Iterator[tuple[float, np.ndarray]]:
    """Yield ``(stamp_s, rgb)`` with rgb (H, W, 3) uint8, at most ``sample_fps`` frames per second.

    Stamps come from the file's frame rate (frame index / fps). ``max_side`` shrinks frames so
    their longest side fits (aspect kept).
    """
    if not sample_fps > 0:
        raise ValueError(f"sample_fps must be > 0, got {sample_fps}")
    if max_frames is not None and max_frames < 0:
        raise ValueError(f"max_frames must be >= 0, got {max_frames}")
    info = video_info(path)
    cap = cv2.VideoCapture(info.path)
    period = 1.0 / sample_fps
    next_stamp = 0.0
    emitted = 0
    index = 0
    try:
        while max_frames is None or emitted < max_frames:
            ok, bgr = cap.read()
            if not ok:
                break
            stamp = index / info.fps
            index += 1
            if stamp + 1e-9 < next_stamp:
                continue
            next_stamp += period * max(1, int((stamp - next_stamp) / period) + 1)
            yield stamp, _shrink(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), max_side)
            emitted += 1
    finally:
        cap.release()


def _shrink(rgb: np.ndarray, max_side: int | None) -> np.ndarray:
    if not max_side:
        return rgb
    h, w = rgb.shape[:2]
    scale = max_side / max(h, w)
    if scale >= 1.0:
        return rgb
    return cv2.resize(rgb, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
