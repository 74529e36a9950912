"""Re-selecting a question's context during decoding (``KVBridge(reselect_every=k)``)."""

from __future__ import annotations

import pytest
import torch

from mosaic_ros.runtime.bench.needles import NeedleEvent, PolicyStream
from mosaic_ros.runtime.kv import policies  # noqa: F401  (registers the built-in policies)
from mosaic_ros.runtime.kv.policy import PolicyConfig
from mosaic_ros.runtime.models import load_model

EVENTS = [
    NeedleEvent(2.0 * i, text)
    for i, text in enumerate(
        [
            "A red cup is on the table.",
            "The robot turned left at the door.",
            "The number on the blue locker is 4817.",
            "A courier waits beside the stairs.",
            "The word on the grey drawer is walrus.",
            "Two boxes lie under the window.",
        ]
    )
]
QUESTION = "What is the number on the blue locker?"
PREFIX = "The number on the blue locker is"
CHOICES = ("4817", "2290", "7731")


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny-random:llava-ov", device="cpu")


def _stream(tiny, policy: str, every: int, budget: int = 40) -> PolicyStream:
    config = PolicyConfig(budget_tokens=budget, sink_tokens=8, window_tokens=8, reselect_every=every)
    stream = PolicyStream(tiny, policy, config, torch.float32, maintain_ms=50.0)
    for event in EVENTS:
        stream.ingest_event(event)
    return stream


class _Recorder:
    """Wraps a policy's ``retrieve``: records (layer, query length, the ids it handed out)."""

    def __init__(self, policy):
        self.calls: list[tuple[int, int, torch.Tensor]] = []
        self._retrieve = policy.retrieve
        policy.retrieve = self

    def __call__(self, layer, query):
        ctx = self._retrieve(layer, query)
        self.calls.append((layer, int(query.shape[1]), ctx.token_ids[0].clone()))
        return ctx


def test_reselect_every_k_retrieves_at_the_prefill_and_every_kth_decode_pass(tiny):
    stream = _stream(tiny, "token_topk", every=2)
    rec = _Recorder(stream.policy)
    layers = tiny.num_layers
    out = stream.ask(QUESTION, max_new_tokens=6, targets=[])
    passes = len(out["tokens"]) - 1  # decode passes after the prefill (the last token is not fed)
    assert passes == 5
    q_len = tiny.question_chunk(QUESTION, stream.cursor).n_tokens
    want = [(layer, q_len) for layer in range(layers)] + [
        (layer, 1) for _ in (2, 4) for layer in range(layers)
    ]
    assert [(layer, n) for layer, n, _ in rec.calls] == want
    assert out["retrieval"].tokens_retrieved == 3 * layers * 40


def test_without_reselection_the_prefill_selection_serves_the_whole_answer(tiny):
    stream = _stream(tiny, "token_topk", every=0)
    rec = _Recorder(stream.policy)
    stream.ask(QUESTION, max_new_tokens=6, targets=[])
    assert len(rec.calls) == tiny.num_layers


def test_a_decode_pass_attends_to_what_its_own_query_selects(tiny):
    """With k=1 every decode pass's context is the policy's selection for that pass's query:
    the same ids a fresh retrieval with the same query returns."""
    stream = _stream(tiny, "token_topk", every=1, budget=24)
    queries: list[tuple[int, torch.Tensor, torch.Tensor]] = []
    inner = stream.policy.retrieve

    def retrieve(layer, query):
        ctx = inner(layer, query)
        queries.append((layer, query.clone(), ctx.token_ids[0].sort().values))
        return ctx

    stream.policy.retrieve = retrieve
    stream.ask(QUESTION, max_new_tokens=4, targets=[])
    decode = [q for q in queries if q[1].shape[1] == 1]
    assert len(decode) == 3 * tiny.num_layers
    assert any(not torch.equal(decode[i][2], decode[i + tiny.num_layers][2]) for i in range(tiny.num_layers))
    stream.policy.retrieve = inner
    stream.bridge.begin_question()
    try:
        for layer, query, ids in decode:
            assert torch.equal(stream.policy.retrieve(layer, query).token_ids[0].sort().values, ids)
    finally:
        stream.bridge.end_question()


def test_dense_answers_are_unchanged_by_reselection(tiny):
    once = _stream(tiny, "dense", every=0, budget=4096).ask(QUESTION, 6, CHOICES, prefix=PREFIX)
    every = _stream(tiny, "dense", every=1, budget=4096).ask(QUESTION, 6, CHOICES, prefix=PREFIX)
    assert once["tokens"] == every["tokens"]
    torch.testing.assert_close(once["target_logprobs"], every["target_logprobs"], rtol=0, atol=1e-4)
    assert once["choice_logprobs"] == pytest.approx(every["choice_logprobs"], abs=1e-4)


@pytest.mark.parametrize("policy", ["token_topk", "mosaic", "rekv"])
def test_teacher_forcing_follows_greedy_decoding_under_reselection(tiny, policy):
    """Teacher-forced along its own greedy answer, a re-selecting stream predicts that answer
    again: each forced token re-selects exactly as its greedy pass did."""
    out = _stream(tiny, policy, every=1).ask(QUESTION, 6)
    assert out["target_logprobs"].argmax(-1).tolist()[: len(out["tokens"])] == out["tokens"]


@pytest.mark.parametrize("every", [1, 2, 3])
def test_choices_score_on_the_prefill_selection_whatever_ran_before(tiny, every):
    """Truncating back to the question restores the prefill's context even after decode passes
    re-selected: the forced-choice scores do not depend on a greedy answer decoded first."""
    after_greedy = _stream(tiny, "token_topk", every).ask(QUESTION, 6, CHOICES, prefix=PREFIX)
    alone = _stream(tiny, "token_topk", every).ask(QUESTION, 1, CHOICES, targets=[], prefix=PREFIX)
    assert after_greedy["choice_logprobs"] == pytest.approx(alone["choice_logprobs"], abs=1e-4)


def test_negative_reselect_every_is_refused():
    with pytest.raises(ValueError, match="reselect_every"):
        PolicyConfig(reselect_every=-1)


def test_a_session_re_selects_while_it_answers():
    """Through ``StreamSession`` (M-RoPE model, real frames): the setting reaches the bridge, each
    decode pass of an answer fetches again, and an answer over a budget that holds the whole
    stream is the same with and without re-selection."""
    import numpy as np

    from mosaic_ros.runtime.session import SessionConfig, StreamSession

    qwen = load_model("tiny-random:qwen2.5-vl", device="cpu", dtype="float32", seed=0)
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (56, 84, 3), dtype=np.uint8) for _ in range(4)]
    answers = {}
    for budget, every in ((64, 0), (64, 1), (4096, 0), (4096, 1)):
        kv = PolicyConfig(budget_tokens=budget, window_tokens=16, reselect_every=every)
        session = StreamSession(
            qwen, SessionConfig(policy="token_topk", kv=kv, max_new_tokens=6, remember_dialogue=False)
        )
        for i, frame in enumerate(frames):
            session.ingest(frame, float(i))
        answers[budget, every] = session.ask("Where is the red box?")
    small_once, small_every = answers[64, 0].stats, answers[64, 1].stats
    assert small_once.tokens_generated == small_every.tokens_generated == 6
    assert small_once.tokens_retrieved == qwen.num_layers * 64
    assert small_every.tokens_retrieved == 6 * qwen.num_layers * 64  # the prefill, then 5 decode passes
    assert answers[4096, 0].text == answers[4096, 1].text
