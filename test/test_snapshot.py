"""Snapshots of a stream's memory: round trips per policy, incremental saves, torn and foreign snapshots."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from helpers import assert_documented
from safetensors import safe_open

from mosaic_ros.cli import run
from mosaic_ros.nodes.demo import render_synthetic_clip
from mosaic_ros.runtime.config import build
from mosaic_ros.runtime.kv.policy import known_policies
from mosaic_ros.runtime.models import load_model
from mosaic_ros.runtime.session import SessionConfig, SessionStatus, StreamSession
from mosaic_ros.runtime.snapshot import SnapshotError, SnapshotIncompatible, SnapshotTorn

QUESTION = "What is in the video?"
# small budgets so that the retrieval policies select (a budget above the stream would keep all)
CONFIG = {"budget_tokens": 96, "window_tokens": 32, "max_new_tokens": 8}


def _config(**settings) -> SessionConfig:
    """A session's config from settings by their flat names, as the node and the CLIs give them."""
    return build(SessionConfig, settings)


@pytest.fixture(scope="module")
def qwen():
    return load_model("tiny-random:qwen2.5-vl", device="cpu", dtype="float32", seed=0)


def _frames(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (56, 84, 3), dtype=np.uint8) for _ in range(n)]


def _stream(adapter, policy: str, frames: int, **config) -> StreamSession:
    session = StreamSession(adapter, _config(policy=policy, **{**CONFIG, **config}))
    for i, frame in enumerate(_frames(frames)):
        session.ingest(frame, stamp=0.5 * i)
    return session


def _memory(session: StreamSession) -> SessionStatus:
    """The session's status without its wall-clock field and its allocations: device buffers
    (caches a restored stream allocates on its first ingest or question) and host pages (a
    worker thread allocates spare pages ahead of need)."""
    return dataclasses.replace(session.status(), ingest_ms_mean=0.0, device_kv_bytes=0, host_kv_bytes=0)


def _answer(session: StreamSession, question: str = QUESTION) -> tuple[list[int], torch.Tensor]:
    """(greedy token ids, the question's prefill logits (1, vocab)) without writing the dialogue."""
    tokens: list[int] = []
    with session._lock, torch.no_grad():
        chunk = session.adapter.question_chunk(question, session._cursor)
        session.bridge.begin_question(None)
        try:
            with session.bridge.question_step(chunk.token_positions) as cache:
                logits = session.adapter.forward(chunk, cache).clone()
        finally:
            session.bridge.end_question()
    config = session.config.remember_dialogue
    session.config.remember_dialogue = False
    try:
        session.ask(question, on_token=lambda _piece, token: tokens.append(token))
    finally:
        session.config.remember_dialogue = config
    return tokens, logits


@pytest.mark.parametrize("policy", known_policies())
def test_round_trip_keeps_every_token_and_the_session_state(qwen, policy, tmp_path):
    # no question before the save: a question leaves the retrieval buffers of the original with
    # another slot order than a fresh stream's, and attention sums in slot order (last bits)
    session = _stream(qwen, policy, 5)
    session.add_text("a door opened", stamp=2.5)
    info = session.save(tmp_path)
    assert info.tokens == session.status().tokens_in_memory
    assert info.snapshot_bytes > 0 and info.bytes_written == info.snapshot_bytes
    restored = StreamSession(qwen, session.config)
    restore = restored.load(tmp_path)

    def memory(s: StreamSession) -> SessionStatus:
        if policy == "mosaic":  # replay re-clusters the tokens (maintenance is time-bounded)
            return dataclasses.replace(_memory(s), clusters_in_memory=0)
        return _memory(s)

    before, after = memory(session), memory(restored)
    assert after == before
    assert restore.tokens == before.tokens_in_memory and restore.frames == 5 and restore.refused == []
    assert restored._cursor == session._cursor
    if policy == "mosaic":
        restored.policy.check_invariants()
    tokens_a, logits_a = _answer(session)
    tokens_b, logits_b = _answer(restored)
    if policy in ("dense", "window"):
        assert tokens_a == tokens_b
        assert torch.equal(logits_a, logits_b)
    else:
        assert torch.isfinite(logits_b).all() and len(tokens_b) > 0
    # the restored stream goes on like the original
    for s in (session, restored):
        s.ingest(_frames(1, seed=9)[0], stamp=3.0)
    assert memory(restored) == memory(session)


def test_the_remembered_dialogue_survives_a_restore(qwen, tmp_path):
    session = _stream(qwen, "dense", 3)
    session.ask("Anything moving?")  # question and answer join the stream's memory
    session.save(tmp_path)
    restored = StreamSession(qwen, session.config)
    restored.load(tmp_path)
    assert _memory(restored) == _memory(session)
    tokens_a, logits_a = _answer(session)
    tokens_b, logits_b = _answer(restored)
    assert tokens_a == tokens_b and torch.equal(logits_a, logits_b)


def test_incremental_save_writes_only_new_chunks_and_replays_in_order(qwen, tmp_path):
    session = _stream(qwen, "dense", 3)
    first = session.save(tmp_path)
    again = session.save(tmp_path)
    assert again == first  # nothing new: nothing written
    for i, frame in enumerate(_frames(2, seed=1)):
        session.ingest(frame, stamp=2.0 + i)
    second = session.save(tmp_path)
    assert second.seq == first.seq + 1
    assert 0 < second.bytes_written < first.bytes_written  # 2 new frames, not the 3 + preamble again
    manifest = json.loads((tmp_path / f"manifest-{second.seq:08d}.json").read_text())
    assert [s["file"] for s in manifest["segments"]] == [
        f"seg-{first.seq:08d}.safetensors",
        f"seg-{second.seq:08d}.safetensors",
    ]
    restored = StreamSession(qwen, session.config)
    restored.load(tmp_path)
    assert _memory(restored) == _memory(session)
    tokens_a, logits_a = _answer(session)
    tokens_b, logits_b = _answer(restored)
    assert tokens_a == tokens_b and torch.equal(logits_a, logits_b)
    # saving on from a restored stream continues the same lineage
    restored.ingest(_frames(1, seed=2)[0], stamp=5.0)
    third = restored.save(tmp_path)
    assert third.seq == second.seq + 1 and third.bytes_written < second.bytes_written


def test_tokens_evicted_after_a_snapshot_are_not_restored(qwen, tmp_path):
    session = _stream(qwen, "window", 3)
    session.save(tmp_path)
    victims = torch.arange(40, 60)  # tokens of the first frame, dropped from every layer
    for layer in range(qwen.num_layers):
        session.policy.release(layer, victims)
    session.ingest(_frames(1, seed=3)[0], stamp=3.0)
    second = session.save(tmp_path)
    evicted = safe_open(tmp_path / f"seg-{second.seq:08d}.safetensors", "pt").get_tensor("evicted")
    assert torch.equal(evicted, victims)
    restored = StreamSession(qwen, session.config)
    restored.load(tmp_path)
    assert restored.status().tokens_in_memory == session.status().tokens_in_memory
    assert restored.policy.store.num_tokens == session.policy.store.num_tokens - victims.numel()
    tokens_a, logits_a = _answer(session)
    tokens_b, logits_b = _answer(restored)
    assert tokens_a == tokens_b and torch.equal(logits_a, logits_b)


def test_a_torn_snapshot_is_refused_and_the_previous_one_used(qwen, tmp_path):
    session = _stream(qwen, "dense", 2)
    first = session.save(tmp_path)
    status_first = _memory(session)
    session.ingest(_frames(1, seed=4)[0], stamp=5.0)
    second = session.save(tmp_path)
    segment = tmp_path / f"seg-{second.seq:08d}.safetensors"
    segment.write_bytes(segment.read_bytes()[:-100])  # truncated, as by a crash mid-write
    restored = StreamSession(qwen, session.config)
    info = restored.load(tmp_path)
    assert info.seq == first.seq
    assert len(info.refused) == 1 and "truncated or torn" in info.refused[0]
    assert_documented(info.refused[0])
    assert _memory(restored) == status_first


def test_no_complete_snapshot_is_refused_with_what_is_wrong(qwen, tmp_path):
    session = _stream(qwen, "dense", 1)
    info = session.save(tmp_path)
    manifest = tmp_path / f"manifest-{info.seq:08d}.json"
    manifest.write_text(manifest.read_text()[:50])
    restored = StreamSession(qwen, session.config)
    with pytest.raises(SnapshotTorn) as torn:
        restored.load(tmp_path)
    assert_documented(str(torn.value))
    with pytest.raises(SnapshotError) as missing:
        restored.load(tmp_path / "nothing-here")
    assert_documented(str(missing.value))
    assert restored.status().frames_ingested == 0


@pytest.mark.parametrize(
    ("other", "differs"),
    [
        ({"policy": "window"}, "policy: snapshot 'dense', this session 'window'"),
        ({"budget_tokens": 128}, "policy_config.budget_tokens: snapshot 96, this session 128"),
        ({"policy_options": {"reserve_tokens": 64}}, "policy_config.options.reserve_tokens"),
    ],
)
def test_a_snapshot_of_another_policy_is_refused(qwen, tmp_path, other, differs):
    session = _stream(qwen, "dense", 1)
    session.save(tmp_path)
    foreign = StreamSession(qwen, _config(**{**CONFIG, "policy": "dense", **other}))
    with pytest.raises(SnapshotIncompatible) as refused:
        foreign.load(tmp_path)
    assert differs in str(refused.value)
    assert_documented(str(refused.value))
    assert foreign.status().frames_ingested == 0


def test_a_snapshot_of_another_model_is_refused(qwen, tmp_path):
    _stream(qwen, "dense", 1).save(tmp_path)
    other = load_model("tiny-random:qwen2.5-vl", device="cpu", dtype="float32", seed=1)
    with pytest.raises(SnapshotIncompatible, match=r"model\.weights_sample_sha256"):
        StreamSession(other, _config(policy="dense", **CONFIG)).load(tmp_path)


def test_reset_makes_the_next_snapshot_empty(qwen, tmp_path):
    session = _stream(qwen, "dense", 3)
    session.save(tmp_path)
    session.reset()
    info = session.save(tmp_path)
    restored = StreamSession(qwen, session.config)
    restored.load(tmp_path)
    assert _memory(restored) == _memory(session)
    assert restored.status().frames_ingested == 0 and info.tokens == session.status().tokens_in_memory


def test_layers_holding_different_tokens_cannot_be_saved(qwen, tmp_path):
    session = _stream(qwen, "window", 2)
    session.policy.store.release(1, torch.arange(40, 44))
    with pytest.raises(SnapshotError) as refused:
        session.save(tmp_path)
    assert_documented(str(refused.value))
    assert list(tmp_path.iterdir()) == []


def test_mosaic_ros_run_saves_a_stream_and_loads_it_again(tmp_path, capsys):
    video = render_synthetic_clip(tmp_path / "clip.avi", frames=4, fps=2.0, size=(84, 56))
    snapshot = tmp_path / "snapshot"
    common = ["--video", str(video), "--device", "cpu", "--dtype", "float32", "--sample-fps", "2", "--json"]
    assert run.main([*common, "--save", str(snapshot)]) == 0
    first = json.loads(capsys.readouterr().out)
    assert first["saved"]["tokens"] == first["tokens_in_memory"]
    again = [*common, "--max-frames", "1", "--load", str(snapshot), "--ask", "What happened?"]
    assert run.main(again) == 0
    second = json.loads(capsys.readouterr().out)
    assert second["restored"]["tokens"] == first["tokens_in_memory"]
    assert second["frames_ingested"] == first["frames_ingested"] + 1
    assert run.main([*common, "--policy", "window", "--load", str(snapshot)]) == 2
    assert "policy: snapshot 'dense', this session 'window'" in capsys.readouterr().err


@pytest.mark.parametrize("policy", ["dense", "rekv"])
def test_mosaic_ros_run_loads_a_stream_and_answers_as_the_run_that_saved_it(tmp_path, capsys, policy):
    """The tiny seeded model on the CPU: the same memory gives the same answer, bit for bit. The
    dialogue is not remembered, so the saved memory is the video's alone, as the loading run's."""
    video = render_synthetic_clip(tmp_path / "clip.avi", frames=6, fps=2.0, size=(84, 56))
    snapshot = tmp_path / "snapshot"
    common = ["--video", str(video), "--device", "cpu", "--dtype", "float32", "--sample-fps", "2"]
    common += ["--policy", policy, "--budget", "96", "--window", "32", "--max-new-tokens", "12"]
    common += ["--no-remember-dialogue", "--ask", QUESTION, "--json"]
    assert run.main([*common, "--save", str(snapshot)]) == 0
    first = json.loads(capsys.readouterr().out)
    assert run.main([*common, "--max-frames", "0", "--load", str(snapshot)]) == 0
    second = json.loads(capsys.readouterr().out)
    assert second["restored"]["tokens"] == second["tokens_in_memory"] == first["tokens_in_memory"]
    assert second["frames_ingested"] == first["frames_ingested"] > 0
    (asked,), (again,) = first["answers"], second["answers"]
    assert asked["stats"]["tokens_generated"] > 0
    assert again["answer"] == asked["answer"]
    assert again["stats"]["tokens_retrieved"] == asked["stats"]["tokens_retrieved"]


def test_a_capped_stream_that_dropped_its_oldest_tokens_round_trips(qwen, tmp_path):
    probe = _stream(qwen, "window", 0)
    row = probe.policy.geometry.bytes_per_token
    preamble = probe.status().tokens_in_memory
    config = _config(
        policy="window",
        compression="drop_oldest",
        host_cap_mb=row * (preamble + CONFIG["window_tokens"] + 80) / 2**20,
        **CONFIG,
    )
    session = StreamSession(qwen, config)
    for i, frame in enumerate(_frames(8)):
        session.ingest(frame, stamp=0.5 * i)
        if i == 3:
            session.save(tmp_path)  # the later evictions go into the next snapshot's list
    assert session.status().tokens_evicted > 0
    session.save(tmp_path)
    restored = StreamSession(qwen, config)
    restored.load(tmp_path)
    assert _memory(restored) == _memory(session)
    tokens_a, logits_a = _answer(session)
    tokens_b, logits_b = _answer(restored)
    assert tokens_a == tokens_b and torch.equal(logits_a, logits_b)
