"""The node's memory keeper without ROS: periodic snapshots off the frame path, the last one at
close, restore at start, and what it does with torn or foreign snapshots."""

from __future__ import annotations

import time

import numpy as np
import pytest
from helpers import assert_documented

from mosaic_ros.nodes.camera_stream import CameraStream, ModelGate
from mosaic_ros.nodes.memory_keeper import MemoryKeeper, check_camera_id
from mosaic_ros.runtime.models import load_model
from mosaic_ros.runtime.session import SessionConfig, StreamSession

CONFIG = SessionConfig(policy="dense", max_new_tokens=4)


class Log:
    def __init__(self):
        self.lines: list[tuple[str, str]] = []

    def info(self, text: str) -> None:
        self.lines.append(("info", text))

    def warning(self, text: str) -> None:
        self.lines.append(("warning", text))

    def error(self, text: str) -> None:
        self.lines.append(("error", text))

    def of(self, level: str) -> list[str]:
        return [text for lvl, text in self.lines if lvl == level]


@pytest.fixture(scope="module")
def qwen():
    return load_model("tiny-random:qwen2.5-vl", device="cpu", dtype="float32", seed=0)


def streams_of(adapter, log: Log, config: SessionConfig = CONFIG) -> dict[str, CameraStream]:
    gate = ModelGate()
    return {
        "cam": CameraStream(
            "cam", "/cam/image_raw", StreamSession(adapter, config), gate, 100.0, 448, lambda: 0.0, log
        )
    }


def feed(stream: CameraStream, frames: int) -> None:
    """``frames`` more frames, 1 s apart after the stream's newest."""
    rng = np.random.default_rng(0)
    start = (stream.session.last_stamp or 0.0) + 1.0
    for i in range(frames):
        stream.session.ingest(rng.integers(0, 256, (56, 84, 3), dtype=np.uint8), stamp=start + i)


def test_periodic_snapshots_and_the_last_one_at_close_are_restored_at_start(qwen, tmp_path):
    log = Log()
    streams = streams_of(qwen, log)
    keeper = MemoryKeeper(streams, str(tmp_path), period_s=0.05, log=log)
    assert keeper.state("cam").age_s == -1.0
    keeper.start()
    feed(streams["cam"], 2)
    deadline = time.monotonic() + 60
    while keeper.state("cam").snapshot_bytes == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert keeper.state("cam").snapshot_bytes > 0 and keeper.state("cam").error == ""
    feed(streams["cam"], 1)  # after the last periodic one, perhaps: close takes it
    keeper.close()
    shutdown = "memory snapshot at shutdown: saved 1 stream: cam: "
    assert any(line.startswith(shutdown) for line in log.of("info"))
    before = streams["cam"].session.status()

    log = Log()
    restarted = streams_of(qwen, log)
    MemoryKeeper(restarted, str(tmp_path), period_s=0.0, log=log).restore()
    after = restarted["cam"].session.status()
    assert (after.frames_ingested, after.tokens_in_memory) == (3, before.tokens_in_memory)
    [line] = log.of("info")
    assert line.startswith("camera 'cam': restored ")
    assert restarted["cam"].snapshot().memory.tokens_in_memory == before.tokens_in_memory


def test_a_foreign_or_torn_snapshot_is_warned_about_and_the_stream_starts_empty(qwen, tmp_path):
    streams = streams_of(qwen, Log())
    feed(streams["cam"], 1)
    ok, report = MemoryKeeper(streams, str(tmp_path), 0.0, Log()).save_all()
    assert ok, report

    log = Log()
    other = streams_of(qwen, log, SessionConfig(policy="window", max_new_tokens=4))
    MemoryKeeper(other, str(tmp_path), 0.0, log).restore()
    [warning] = log.of("warning")
    assert "policy: snapshot 'dense', this session 'window'" in warning
    assert_documented(warning)
    assert other["cam"].session.status().frames_ingested == 0

    for segment in (tmp_path / "cam").glob("seg-*.safetensors"):
        segment.write_bytes(segment.read_bytes()[:100])
    log = Log()
    torn = streams_of(qwen, log)
    MemoryKeeper(torn, str(tmp_path), 0.0, log).restore()
    [warning] = log.of("warning")
    assert warning.startswith("camera 'cam': no complete snapshot in ")
    assert_documented(warning)
    assert torn["cam"].session.status().frames_ingested == 0


@pytest.mark.parametrize("name", ["..", "a/b", "front cam"])
def test_camera_ids_that_cannot_name_a_directory_are_refused(name):
    why = check_camera_id(name)
    assert why is not None and name in why
    assert_documented(why)
    assert check_camera_id("front_left-2.rgb") is None
