"""StreamSession end to end on tiny random models: streaming exactness, policies, threads, bad input."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from mosaic_ros.runtime.kv.policy import PolicyConfig
from mosaic_ros.runtime.models import load_model
from mosaic_ros.runtime.models.base import FrameError, PositionCursor
from mosaic_ros.runtime.session import (
    QuestionError,
    SessionConfig,
    StampError,
    StreamSession,
    TimeWindow,
)

FAMILIES = ["qwen2.5-vl", "qwen3-vl", "llava-ov"]


def _frames(n: int, seed: int = 0, size: tuple[int, int] = (56, 84)) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (*size, 3), dtype=np.uint8) for _ in range(n)]


@pytest.fixture(scope="module", params=FAMILIES)
def adapter(request):
    return load_model(f"tiny-random:{request.param}", device="cpu", dtype="float32", seed=0)


@pytest.fixture(scope="module")
def qwen():
    return load_model("tiny-random:qwen2.5-vl", device="cpu", dtype="float32", seed=0)


def _one_pass_logits(adapter, frames, stamps, question) -> torch.Tensor:
    """Logits of the question's last token from ONE forward over the whole sequence, stock sdpa."""
    cursor = PositionCursor()
    chunks = [adapter.system_chunk(cursor)]
    for frame, stamp in zip(frames, stamps, strict=True):
        features = adapter.encode_frames(adapter.prepare_frames([frame]))
        chunks.append(adapter.frame_chunk(features, stamp, chunks[-1].cursor))
    chunks.append(adapter.question_chunk(question, chunks[-1].cursor))
    whole = adapter.concat_chunks(chunks)
    adapter.set_attention("sdpa")
    try:
        from transformers import DynamicCache

        with torch.no_grad():
            return adapter.forward(whole, DynamicCache(config=adapter.model.config))
    finally:
        adapter.set_attention("mosaic_kv")


def _session_question_logits(session: StreamSession, question: str) -> torch.Tensor:
    """Logits the session computes for the question's last token (its greedy first token's source)."""
    ad = session.adapter
    with session._lock, torch.no_grad():
        chunk = ad.question_chunk(question, session._cursor)
        session.bridge.begin_question(None)
        try:
            with session.bridge.question_step(chunk.token_positions) as cache:
                return ad.forward(chunk, cache)
        finally:
            session.bridge.end_question()


def test_dense_streaming_matches_one_pass_forward(adapter):
    """Chunk-by-chunk ingest through the dense policy reproduces a single forward pass (fp32, 1e-4)."""
    frames = _frames(4)
    stamps = [0.0, 0.5, 1.0, 1.5]
    session = StreamSession(adapter, SessionConfig(policy="dense", remember_dialogue=False))
    for frame, stamp in zip(frames, stamps, strict=True):
        session.ingest(frame, stamp)
    streamed = _session_question_logits(session, "What moved?")
    reference = _one_pass_logits(adapter, frames, stamps, "What moved?")
    assert streamed.shape == reference.shape
    torch.testing.assert_close(streamed, reference, atol=1e-4, rtol=1e-4)


def test_window_larger_than_stream_equals_dense(qwen):
    frames = _frames(3, seed=1)
    logits = {}
    for policy in ("dense", "window"):
        session = StreamSession(
            qwen,
            SessionConfig(
                policy=policy,
                kv=PolicyConfig(budget_tokens=4096, window_tokens=2048),
                remember_dialogue=False,
            ),
        )
        for i, frame in enumerate(frames):
            session.ingest(frame, float(i))
        logits[policy] = _session_question_logits(session, "Where is the red box?")
    torch.testing.assert_close(logits["window"], logits["dense"], atol=1e-5, rtol=1e-5)


def test_answer_carries_every_stat_and_counts_tokens(qwen):
    session = StreamSession(qwen, SessionConfig(policy="dense", max_new_tokens=5, remember_dialogue=False))
    added = sum(session.ingest(f, float(i)).tokens for i, f in enumerate(_frames(2)))
    preamble = session.status().tokens_in_memory - added
    pieces = []
    answer = session.ask("What is here?", on_token=lambda piece, tok: pieces.append(piece) is None)
    s = answer.stats
    assert s.policy == "dense"
    assert 1 <= s.tokens_generated <= 5
    assert "".join(pieces).strip() == answer.text
    assert s.frames_in_memory == 2
    assert s.tokens_in_memory == preamble + added
    # dense keeps its whole arena on the compute device: all of it counts as device KV
    assert s.host_kv_bytes == 0 and s.device_kv_bytes >= s.tokens_in_memory * qwen.num_layers * 2
    assert s.total_ms >= s.prefill_ms > 0 and s.ttft_ms > 0
    assert s.tokens_retrieved > 0


def test_streaming_callback_can_stop_generation(qwen):
    session = StreamSession(qwen, SessionConfig(policy="dense", max_new_tokens=8, remember_dialogue=False))
    session.ingest(_frames(1)[0], 0.0)
    answer = session.ask("Count.", on_token=lambda piece, tok: False)
    assert answer.cancelled and answer.stats.tokens_generated == 1
    cancel = threading.Event()
    cancel.set()
    assert session.ask("Count.", cancel=cancel).cancelled


def test_remembered_dialogue_becomes_stream_tokens(qwen):
    session = StreamSession(qwen, SessionConfig(policy="dense", max_new_tokens=3, remember_dialogue=True))
    session.ingest(_frames(1)[0], 0.0)
    before = session.status().tokens_in_memory
    answer = session.ask("What is here?")
    after = session.status().tokens_in_memory
    q_tokens = qwen.question_chunk("What is here?", PositionCursor()).n_tokens
    assert after >= before + q_tokens + (1 if answer.text else 0)


def test_concurrent_ingest_and_ask_keep_consistent_counts(qwen):
    """An ingest thread and an ask thread run together; nothing raises, token counts add up."""
    session = StreamSession(
        qwen,
        SessionConfig(
            policy="window",
            kv=PolicyConfig(budget_tokens=512, window_tokens=256),
            max_new_tokens=3,
            remember_dialogue=False,
        ),
    )
    session.ingest(_frames(1)[0], 0.0)
    errors: list[BaseException] = []
    added: list[int] = []

    def ingest():
        try:
            for i, f in enumerate(_frames(8, seed=3)):
                added.append(session.ingest(f, 1.0 + i).tokens)
        except BaseException as exc:
            errors.append(exc)

    def ask():
        try:
            for _ in range(4):
                session.ask("What changed?")
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=ingest), threading.Thread(target=ask)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors
    st = session.status()
    assert st.frames_ingested == 9
    assert len(added) == 8
    first = qwen.system_chunk(PositionCursor()).n_tokens
    per_frame = (st.tokens_in_memory - first) / 9
    assert per_frame == pytest.approx(added[0])


@pytest.mark.parametrize(
    "frame, match",
    [
        (np.zeros((0, 0, 3), np.uint8), "empty|zero"),
        (np.zeros((32, 32, 3), np.float32), "dtype|uint8"),
        (np.zeros((32, 32), np.uint8), "shape|channel|dim"),
        (np.zeros((32, 32, 5), np.uint8), "shape|channel"),
    ],
)
def test_bad_frames_raise_clear_errors_and_session_stays_usable(qwen, frame, match):
    session = StreamSession(qwen, SessionConfig(policy="dense", max_new_tokens=2, remember_dialogue=False))
    with pytest.raises(FrameError, match=match):
        session.ingest(frame, 0.0)
    session.ingest(_frames(1)[0], 0.0)
    assert session.ask("Still there?").stats.frames_in_memory == 1


def test_bad_questions_and_stamps(qwen):
    session = StreamSession(
        qwen, SessionConfig(policy="dense", max_new_tokens=2, max_question_chars=50, remember_dialogue=False)
    )
    with pytest.raises(QuestionError, match="no frame"):
        session.ask("Anything?")
    session.ingest(_frames(1)[0], 5.0)
    with pytest.raises(QuestionError, match="empty"):
        session.ask("   ")
    with pytest.raises(QuestionError, match="limit is 50"):
        session.ask("x" * 51)
    with pytest.raises(StampError, match="older"):
        session.ingest(_frames(1)[0], 4.0)
    with pytest.raises(StampError, match="finite"):
        session.ingest(_frames(1)[0], float("nan"))
    assert session.ask("Fine?").stats.frames_in_memory == 1


def test_reset_forgets_the_stream(qwen):
    session = StreamSession(qwen, SessionConfig(policy="dense", remember_dialogue=False))
    empty = session.status().tokens_in_memory
    session.ingest(_frames(1)[0], 0.0)
    assert session.status().tokens_in_memory > empty
    session.reset()
    st = session.status()
    assert st.tokens_in_memory == empty and st.frames_ingested == 0 and st.last_stamp is None
    session.ingest(_frames(1)[0], 0.0)
    assert session.status().frames_ingested == 1


def test_time_window_validation():
    with pytest.raises(ValueError):
        TimeWindow(5.0, 1.0)
    with pytest.raises(ValueError):
        TimeWindow.last(0.0, 10.0)
    assert TimeWindow.last(3.0, 10.0) == TimeWindow(7.0, 10.0)


@pytest.mark.parametrize("policy", ["window", "token_topk", "rekv", "livevlm"])
def test_ingest_context_stays_bounded_as_the_stream_grows(qwen, policy):
    """Flat per-frame ingest cost: a new frame attends to sinks + the local window, never to all."""
    window = 48
    session = StreamSession(
        qwen,
        SessionConfig(
            policy=policy, kv=PolicyConfig(budget_tokens=256, window_tokens=window), remember_dialogue=False
        ),
    )
    sinks = session.policy.config.sink_tokens
    sizes = []
    for i, frame in enumerate(_frames(12, seed=5)):
        session.ingest(frame, float(i))
        sizes.append(session.policy.ingest_context(0).num_tokens)
    assert session.status().tokens_in_memory > 3 * (sinks + window)
    assert max(sizes) <= sinks + window
    assert sizes[-1] == sizes[-2] == sinks + window
