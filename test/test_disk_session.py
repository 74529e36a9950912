"""The disk tier under a real model: same answers as without a cap, snapshots of spilled memory."""

from __future__ import annotations

import numpy as np
import pytest

from mosaic_ros.runtime.config import build
from mosaic_ros.runtime.models import load_model
from mosaic_ros.runtime.session import SessionConfig, StreamSession

SETTINGS = {"budget_tokens": 96, "window_tokens": 32, "max_new_tokens": 6}
QUESTIONS = ["What is in the video?", "What changed?"]


@pytest.fixture(scope="module")
def qwen():
    return load_model("tiny-random:qwen2.5-vl", device="cpu", dtype="float32", seed=0)


def _session(adapter, **settings) -> StreamSession:
    return StreamSession(adapter, build(SessionConfig, {"policy": "token_topk", **SETTINGS, **settings}))


def _ingest(session: StreamSession, frames: int) -> None:
    rng = np.random.default_rng(0)
    for i in range(frames):
        session.ingest(rng.integers(0, 256, (56, 84, 3), dtype=np.uint8), stamp=0.5 * i)


def test_a_stream_three_times_the_host_cap_answers_as_without_one_and_snapshots(qwen, tmp_path):
    probe = _session(qwen)
    row = probe.policy.geometry.bytes_per_token
    preamble = probe.status().tokens_in_memory
    cap_tokens = preamble + SETTINGS["window_tokens"] + 100
    disk = tmp_path / "disk"
    disk.mkdir()
    capped_settings = {"host_cap_mb": row * cap_tokens / 2**20, "disk_cap_mb": 16.0, "disk_dir": str(disk)}
    _ingest(probe, 1)
    per_frame = probe.status().tokens_in_memory - preamble  # every frame is as many tokens
    frames = -(-3 * cap_tokens // per_frame)
    capped = _session(qwen, **capped_settings)
    free = _session(qwen)
    _ingest(free, frames)
    _ingest(capped, frames)
    cap = capped.config.kv.host_cap_bytes
    for question in QUESTIONS:
        got, ref = capped.ask(question), free.ask(question)
        assert got.text == ref.text
        s = got.stats
        assert s.tokens_in_memory == ref.stats.tokens_in_memory >= 3 * cap_tokens
        assert s.tokens_evicted == 0 and s.host_kv_bytes <= cap < s.disk_kv_bytes
        assert s.disk_fetch_ms > 0 and s.disk_bytes_read > 0  # token_topk scores every key
        assert ref.stats.disk_fetch_ms == 0 and ref.stats.disk_bytes_read == 0 == ref.stats.disk_kv_bytes
    status = capped.status()
    assert status.host_kv_bytes <= cap < status.disk_kv_bytes == s.disk_kv_bytes
    assert free.status().disk_kv_bytes == 0
    capped.save(tmp_path / "snapshot")  # the export reads the spilled pages back
    restored = _session(qwen, **capped_settings)
    restored.load(tmp_path / "snapshot")
    assert restored.status().tokens_in_memory == capped.status().tokens_in_memory
    again, expected = restored.ask(QUESTIONS[0]), capped.ask(QUESTIONS[0])
    assert again.text == expected.text
    for session in (capped, restored):
        session.policy.close()
    assert list(disk.iterdir()) == []
