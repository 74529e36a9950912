"""``mosaic-ros-demo --json`` end to end over a short real clip, and its synthetic fallback."""

from __future__ import annotations

import json
import subprocess
import sys

import cv2
import numpy as np
import pytest

from mosaic_ros.nodes.demo import TINY_NOTE, default_video, render_synthetic_clip
from mosaic_ros.runtime.stats import LatencyStats

TIMEOUT_S = 300.0


def run_demo(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "mosaic_ros.nodes.demo", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT_S)


@pytest.mark.ros
def test_demo_json_answers_during_and_after_playback(tmp_path):
    video = default_video(tmp_path)
    result = run_demo(
        "--video", str(video), "--json", "--max-frames", "15", "--fps", "5", "--max-side", "160",
        "--max-new-tokens", "6", "--rate", "2", "--questions", "What is happening?", "Who is there?",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["model"] == "tiny-random:qwen2.5-vl"
    assert report["policy"] == "mosaic"
    assert report["source"] == str(video)
    assert report["note"] == TINY_NOTE
    assert report["frames_published"] == 15
    assert [(a["phase"], a["question"]) for a in report["answers"]] == [
        ("during playback", "What is happening?"),
        ("after playback", "Who is there?"),
    ]
    for answer in report["answers"]:
        assert answer["success"], answer["error"]
        stats = answer["stats"]
        assert list(stats) == LatencyStats.field_names()
        assert stats["tokens_generated"] <= 6
        assert stats["total_ms"] >= stats["ttft_ms"] > 0
    during, after = report["answers"]
    assert 1 <= during["stats"]["frames_in_memory"] <= after["stats"]["frames_in_memory"]
    status = report["status"]
    assert status["frames_received"] == 15
    # 15 frames at 5 fps span 2.8 s; sampled at 2 fps: one frame per half second, 6 in all.
    assert status["frames_sampled"] == 6
    assert status["frames_ingested"] + status["frames_dropped_busy"] == 6
    assert after["stats"]["frames_in_memory"] == status["frames_ingested"]


def test_demo_reports_a_video_it_cannot_read(tmp_path):
    result = run_demo("--video", str(tmp_path / "missing.avi"))
    assert result.returncode == 1
    assert "cannot open video" in result.stderr


def test_synthetic_clip_shows_moving_shapes(tmp_path):
    path = render_synthetic_clip(tmp_path / "clip.avi", frames=12, fps=10.0, size=(160, 120))
    capture = cv2.VideoCapture(str(path))
    assert capture.get(cv2.CAP_PROP_FPS) == 10.0
    frames = []
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        frames.append(frame)
    assert len(frames) == 12
    assert frames[0].shape == (120, 160, 3)
    red = [np.argwhere((f[:, :, 2] > 150) & (f[:, :, 0] < 100))[:, 1].mean() for f in (frames[0], frames[-1])]
    assert red[1] - red[0] > 60  # the red disc crossed most of the frame, left to right
