"""The node's request logic without DDS: QuestionDesk admission, checks, windows, stages, faults,
and the StreamSession limits behind them, on a real (tiny, random) model."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from helpers import ListLog, assert_documented, wait_for

from mosaic_ros.nodes.camera_stream import CameraStream, ModelGate
from mosaic_ros.nodes.questions import Question, QuestionDesk, RequestError, Stage, time_window
from mosaic_ros.runtime.kv.policy import PolicyConfig
from mosaic_ros.runtime.models import load_model
from mosaic_ros.runtime.session import SessionConfig, SessionError, StampError, StreamFault, StreamSession


@pytest.fixture(scope="module")
def adapter():
    return load_model("tiny-random:qwen2.5-vl", device="cpu", dtype="float32", seed=0)


def make_desk(adapter, cameras=("front", "rear"), frames=3, max_pending=2, **config):
    gate, log = ModelGate(), ListLog()
    streams = {}
    for camera in cameras:
        session = StreamSession(adapter, SessionConfig(policy="dense", max_new_tokens=4, **config))
        for i in range(frames):
            frame = np.random.default_rng(i).integers(0, 256, (28, 56, 3), dtype=np.uint8)
            session.ingest(frame, 10.0 + i)
        streams[camera] = CameraStream(
            camera, f"/{camera}", session, gate, 100.0, 0, now=lambda: 0.0, log=log
        )
    desk = QuestionDesk(
        streams,
        gate,
        "dense",
        max_pending=max_pending,
        default_max_new_tokens=4,
        max_new_tokens_cap=64,
        log=log,
    )
    return desk, log


def never() -> bool:
    return False


def test_a_good_question_is_answered_through_every_stage_in_order(adapter):
    desk, log = make_desk(adapter)
    stages: list[Stage] = []
    outcome = desk.answer(Question("What do you see?"), lambda s, text, n: stages.append(s), never)
    assert outcome.success, outcome.error
    assert stages[:2] == [Stage.QUEUED, Stage.RETRIEVING] and stages[-1] == Stage.DONE
    assert set(stages[2:-1]) <= {Stage.GENERATING}
    assert stages.count(Stage.GENERATING) == outcome.stats.tokens_generated
    assert outcome.stats.frames_in_memory == 3 and outcome.stats.policy == "dense"
    assert any("answered on 'front'" in line for line in log.lines)
    assert desk.pending == 0


@pytest.mark.parametrize(
    ("request_", "error"),
    [
        (Question(""), "question is empty"),
        (Question("  \n"), "question is empty"),
        (Question("x" * 2001), "question has 2001 characters; the limit is 2000"),
        (Question("hi", camera_id="side"), "unknown camera_id 'side'; known: front, rear"),
        (Question("hi", max_new_tokens=65), "max_new_tokens 65 is above the limit of 64"),
        (Question("hi", window_seconds=-1.0), "window_seconds must be >= 0, got -1.0"),
        (Question("hi", window_seconds=float("nan")), "window_seconds must be >= 0, got nan"),
        (
            Question("hi", window_seconds=2.0, window_start=10.0),
            "give either window_seconds or window_start/window_end, not both",
        ),
        (Question("hi", window_start=12.0, window_end=11.0), "invalid time window [12.0, 11.0]"),
        (
            Question("hi", window_start=100.0),
            "the time window [100.000, 100.000] s holds no video; the stream holds [10.000, 12.000] s",
        ),
        (
            Question("hi", window_start=1.0, window_end=5.0),
            "the time window [1.000, 5.000] s holds no video; the stream holds [10.000, 12.000] s",
        ),
    ],
)
def test_bad_requests_are_refused_with_their_reason_and_the_desk_still_answers(adapter, request_, error):
    desk, _ = make_desk(adapter)
    outcome = desk.answer(request_, None, never)
    assert (outcome.success, outcome.error) == (False, error)
    assert_documented(error)
    assert outcome.stats.policy == "dense" and outcome.stats.total_ms >= 0
    assert desk.answer(Question("Still there?"), None, never).success


def test_a_question_before_any_frame_says_so(adapter):
    desk, _ = make_desk(adapter, frames=0)
    outcome = desk.answer(Question("What happened?", camera_id="rear"), None, never)
    assert outcome.error == "no frame has been ingested on camera 'rear' yet; ask again once it streams"
    assert_documented(outcome.error)


def test_a_question_of_many_tokens_but_few_characters_is_refused_for_its_tokens(adapter):
    desk, _ = make_desk(adapter, max_question_tokens=512)
    emoji = "\U0001f600" * 1000  # under the 2000-character limit, several tokens each
    outcome = desk.answer(Question(emoji), None, never)
    assert not outcome.success
    tokens = len(adapter.encode_text(emoji))
    assert tokens > 512
    assert outcome.error == f"question is {tokens} tokens long; the limit is 512"
    assert_documented(outcome.error)


def test_windows_are_cut_to_the_stream_and_infinity_means_all_of_it():
    assert time_window(Question("q", window_seconds=float("inf")), 10.0, 12.0).start == 10.0
    assert time_window(Question("q", window_seconds=1e308), 10.0, 12.0).start == 10.0
    window = time_window(Question("q", window_seconds=1.5), 10.0, 12.0)
    assert (window.start, window.end) == (10.5, 12.0)
    window = time_window(Question("q", window_start=11.0), 10.0, 12.0)
    assert (window.start, window.end) == (11.0, 12.0)  # end 0: up to the newest frame
    assert time_window(Question("q"), 10.0, 12.0) is None
    with pytest.raises(RequestError, match="invalid time window"):
        time_window(Question("q", window_start=float("-inf"), window_end=11.0), 10.0, 12.0)


def test_beyond_max_pending_requests_are_refused_at_once_and_none_is_lost(adapter):
    """3 x max_pending + 10 requests at once while the model is held: every one gets an outcome,
    exactly max_pending are answered and the others are refused as busy."""
    max_pending = 2
    desk, _ = make_desk(adapter, max_pending=max_pending)
    gate = desk._gate
    outcomes = []
    lock = threading.Lock()

    def ask(i: int) -> None:
        outcome = desk.answer(Question(f"Question {i}?"), None, never)
        with lock:
            outcomes.append(outcome)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(3 * max_pending + 10)]
    with gate.frame(never):  # the model is busy ingesting: admitted questions wait
        for thread in threads:
            thread.start()
        wait_for(
            lambda: desk.pending == max_pending and gate.questions_waiting == max_pending, 30, "queue full"
        )
        wait_for(lambda: len(outcomes) == len(threads) - max_pending, 30, "refusals")
        busy = [o.error for o in outcomes]
        assert busy == [f"busy: {max_pending} questions pending; ask again later"] * len(busy)
        assert_documented(busy[0])
    for thread in threads:
        thread.join(60)
    assert len(outcomes) == len(threads)
    assert sum(o.success for o in outcomes) == max_pending
    assert desk.pending == 0


def test_a_question_cancelled_while_queued_gives_up_its_place(adapter):
    desk, _ = make_desk(adapter)
    cancel = threading.Event()
    result = []
    with desk._gate.frame(never):
        thread = threading.Thread(
            target=lambda: result.append(desk.answer(Question("q?"), None, cancel.is_set))
        )
        thread.start()
        wait_for(lambda: desk._gate.questions_waiting == 1, 30, "question queued")
        cancel.set()
        thread.join(30)
    assert (result[0].success, result[0].error, result[0].cancelled) == (
        False,
        "cancelled while queued",
        True,
    )
    assert_documented(result[0].error)


def test_an_internal_failure_is_an_error_reply_and_a_fault_on_the_stream(adapter, monkeypatch):
    desk, log = make_desk(adapter)
    stream = desk.streams["front"]

    def broken(*args, **kwargs):
        raise RuntimeError("the model fell over")

    monkeypatch.setattr(stream.session, "ask", broken)
    outcome = desk.answer(Question("q?"), None, never)
    assert (outcome.success, outcome.error) == (False, "internal error: RuntimeError: the model fell over")
    assert_documented(outcome.error)
    counters = stream.snapshot().counters
    assert (
        counters.faults == 1
        and counters.last_error == "answering a question: RuntimeError: the model fell over"
    )
    assert any("Traceback" in line for line in log.lines)  # the first failure is logged with its stack
    monkeypatch.undo()
    assert desk.answer(Question("Still there?"), None, never).success
    assert desk.pending == 0


# ---- the session behind the desk ------------------------------------------------------------


def test_total_and_prefill_time_count_keeping_the_dialogue_in_memory(adapter, monkeypatch):
    """Writing the question and answer into memory is on the request's path: a fake clock that
    jumps 5 s during it must show in total_ms and prefill_ms."""
    import mosaic_ros.runtime.session as session_module

    session = StreamSession(adapter, SessionConfig(policy="dense", max_new_tokens=3, remember_dialogue=True))
    session.ingest(np.zeros((28, 56, 3), np.uint8), 1.0)
    clock = [100.0]
    monkeypatch.setattr(session_module.time, "perf_counter", lambda: clock[0])
    remember = session._remember

    def slow_remember(question, answer):
        clock[0] += 5.0
        remember(question, answer)

    monkeypatch.setattr(session, "_remember", slow_remember)
    monkeypatch.setattr(session.adapter.tokenizer, "decode", lambda ids, **kw: "x" * len(ids))
    answer = session.ask("What is there?")
    assert answer.text
    assert answer.stats.prefill_ms == pytest.approx(5000.0)
    assert answer.stats.total_ms == pytest.approx(5000.0)
    assert answer.stats.tokens_in_memory == session.status().tokens_in_memory  # the dialogue included


def test_a_failure_inside_the_policy_resets_the_stream_and_it_keeps_ingesting(adapter, monkeypatch):
    session = StreamSession(
        adapter, SessionConfig(policy="mosaic", kv=PolicyConfig(budget_tokens=256, window_tokens=32))
    )
    frame = np.zeros((28, 56, 3), np.uint8)
    for i in range(3):
        session.ingest(frame, float(i))
    empty_tokens = StreamSession(adapter, SessionConfig(policy="mosaic")).status().tokens_in_memory
    original = session.policy.maintain

    def broken(budget_ms):
        raise IndexError("min(): Expected reduction dim 1 to have non-zero size.")

    monkeypatch.setattr(session.policy, "maintain", broken)
    with pytest.raises(
        StreamFault, match=r"IndexError while ingesting a frame: .*; the stream's memory was reset"
    ):
        session.ingest(frame, 3.0)
    status = session.status()
    assert (status.frames_ingested, status.tokens_in_memory, status.last_stamp) == (0, empty_tokens, None)
    monkeypatch.setattr(session.policy, "maintain", original)
    session.ingest(frame, 4.0)
    assert session.status().frames_ingested == 1
    assert session.ask("What now?", max_new_tokens=2).stats.frames_in_memory == 1


@pytest.mark.parametrize("stamp", [-1.0, float("nan"), float("inf")])
def test_a_negative_or_non_finite_stamp_is_refused_by_the_session(adapter, stamp):
    session = StreamSession(adapter, SessionConfig(policy="dense"))
    with pytest.raises(StampError, match="frame stamp must be a finite number of seconds >= 0"):
        session.ingest(np.zeros((28, 56, 3), np.uint8), stamp)
    session.ingest(np.zeros((28, 56, 3), np.uint8), 0.0)
    assert session.status().frames_ingested == 1


def test_a_text_event_joins_the_memory_between_frames(adapter):
    session = StreamSession(
        adapter, SessionConfig(policy="mosaic", kv=PolicyConfig(budget_tokens=512, window_tokens=32))
    )
    frame = np.zeros((28, 56, 3), np.uint8)
    session.ingest(frame, 1.0)
    before = session.status().tokens_in_memory
    note = "Operator: the charger moved to bay 7."
    result = session.add_text(note, 1.5)
    marker_and_note = len(adapter.encode_text(f"{adapter.time_marker(1.5)} {note}\n"))
    assert result.tokens == marker_and_note
    status = session.status()
    assert (status.tokens_in_memory, status.texts_ingested, status.frames_ingested) == (
        before + marker_and_note,
        1,
        1,
    )
    session.ingest(frame, 2.0)
    assert session.ask("Where is the charger?", max_new_tokens=2).stats.tokens_in_memory > before
    session.policy.check_invariants()


@pytest.mark.parametrize(
    ("text", "stamp", "error"),
    [
        ("   ", 1.0, "text event is empty"),
        ("fine", -1.0, "text stamp must be a finite number of seconds >= 0, got -1.0"),
        ("fine", float("nan"), "text stamp must be a finite number of seconds >= 0, got nan"),
        ("word " * 600, 1.0, r"text event is \d+ tokens long; the limit is 512"),
    ],
)
def test_bad_text_events_are_refused_and_the_memory_is_unchanged(adapter, text, stamp, error):
    session = StreamSession(adapter, SessionConfig(policy="dense"))
    session.ingest(np.zeros((28, 56, 3), np.uint8), 1.0)
    before = session.status().tokens_in_memory
    with pytest.raises(SessionError, match=error) as refused:
        session.add_text(text, stamp)
    if "text event" in error:
        assert_documented(str(refused.value))
    assert session.status().tokens_in_memory == before


@pytest.mark.parametrize("policy", ["dense", "mosaic"])
def test_a_fact_from_a_text_event_is_answered_by_the_real_lm(policy):
    """Real SmolLM2 weights (the vision tower is random: frames are noise to it): a note that
    arrived between frames is in memory and retrieved for the question about it."""
    real = load_model("smollm2-llava:135m-instruct", device="cpu")
    session = StreamSession(
        real,
        SessionConfig(
            policy=policy, kv=PolicyConfig(budget_tokens=256, window_tokens=64), remember_dialogue=False
        ),
    )
    rng = np.random.default_rng(0)
    session.ingest(rng.integers(0, 256, (120, 160, 3), dtype=np.uint8), 0.0)
    session.add_text("Operator note: the spare battery is in locker 4817.", 0.5)
    for stamp in (1.0, 1.5, 2.0):
        session.ingest(rng.integers(0, 256, (120, 160, 3), dtype=np.uint8), stamp)
    answer = session.ask("Which locker holds the spare battery?", max_new_tokens=16)
    assert "4817" in answer.text, answer.text


def test_paired_frames_enter_memory_two_at_a_time_with_half_the_tokens():
    """Qwen-VL's temporal patch of 2: a pair of frames is one chunk at their midpoint stamp."""
    single = load_model("tiny-random:qwen2.5-vl", device="cpu", dtype="float32", seed=0)
    paired = load_model("tiny-random:qwen2.5-vl", device="cpu", dtype="float32", seed=0, pair_frames=True)
    frames = [np.random.default_rng(i).integers(0, 256, (56, 84, 3), dtype=np.uint8) for i in range(4)]
    added = {}
    for name, adapter in (("single", single), ("paired", paired)):
        session = StreamSession(adapter, SessionConfig(policy="dense"))
        empty = session.status().tokens_in_memory
        results = [session.ingest(frame, 1.0 + i) for i, frame in enumerate(frames)]
        status = session.status()
        added[name] = status.tokens_in_memory - empty
        assert status.frames_ingested == 4
        if name == "paired":
            assert [r.held for r in results] == [True, False, True, False]
            assert [r.tokens for r in results][::2] == [0, 0]
            assert (status.first_stamp, status.last_stamp) == (1.5, 3.5)
            session.ingest(frames[0], 5.0)  # held: not in memory, and a reset drops it
            assert session.status().tokens_in_memory == status.tokens_in_memory
            with pytest.raises(StampError, match="older than the last one"):
                session.ingest(frames[0], 4.5)
            assert session.ask("What moved?", max_new_tokens=2).stats.frames_in_memory == 4
    # A single frame is duplicated into its temporal patch: a pair's chunk costs what one
    # frame's did, so the same video takes half the tokens.
    assert added["paired"] * 2 == added["single"]
