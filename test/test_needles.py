"""The needle workload on small sizes: generated and file streams, scoring, and the replay."""

from __future__ import annotations

import json

import pytest
import torch

from mosaic_ros.cli import bench
from mosaic_ros.runtime.bench import needles
from mosaic_ros.runtime.bench.needles import (
    NeedleConfig,
    NeedleEvent,
    NeedleQuestion,
    NeedleSet,
    PolicyStream,
    generate_needles,
    needle_files,
    read_needles,
    run_needles,
    summarize,
    wilson_interval,
)
from mosaic_ros.runtime.kv import policies  # noqa: F401  (registers the built-in policies)
from mosaic_ros.runtime.kv.policy import PolicyConfig
from mosaic_ros.runtime.models import load_model
from mosaic_ros.runtime.models.base import PositionCursor, VisionFeatures


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny-random:llava-ov", device="cpu")


def test_generated_stream_spreads_needles_with_unguessable_answers():
    a, b = generate_needles(3, frames=20, needles=4), generate_needles(3, frames=20, needles=4)
    assert a == b
    assert len(a.events) == 20 and len(a.questions) == 4
    assert [e.t for e in a.events] == [2.0 * i for i in range(20)]
    depths = [q.depth for q in a.questions]
    assert depths == sorted(depths) and depths[0] < 0.25 and depths[-1] > 0.75
    for q in a.questions:
        holders = [e for e in a.events if q.answer in e.text]
        assert len(holders) == 1 and holders[0].text == f"{q.prefix} {q.answer}."
        assert len(set(q.choices)) == 4 and q.answer in q.choices
        assert q.answer not in q.question
    assert generate_needles(4, frames=20, needles=4) != a
    with pytest.raises(ValueError, match="needles"):
        generate_needles(0, frames=3, needles=4)


def test_needles_file_round_trip_and_errors(tmp_path):
    path = tmp_path / "stream.jsonl"
    lines = [
        {"t": 0.0, "text": "A cat sits on the mat."},
        {"t": 1.5, "text": "The parcel for Ada is on shelf 7."},
        {"t": 3.0, "text": "The lights go off."},
        {
            "question": "Which shelf holds Ada's parcel?",
            "answer": "7",
            "choices": ["3", "7"],
            "prefix": "Shelf",
        },
        {"question": "What happened last?", "answer": "lights"},
    ]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    got = read_needles(path)
    assert got.events == [
        NeedleEvent(0.0, "A cat sits on the mat."),
        NeedleEvent(1.5, lines[1]["text"]),
        NeedleEvent(3.0, "The lights go off."),
    ]
    assert got.questions == [
        NeedleQuestion("Which shelf holds Ada's parcel?", "7", ("3", "7"), "Shelf", 0.5),
        NeedleQuestion("What happened last?", "lights", (), "", 1.0),
    ]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"t": 2, "text": "a"}\n{"t": 1, "text": "b"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2"):
        read_needles(bad)
    bad.write_text('{"t": 0, "text": "a"}\n{"question": "q", "answer": "x", "choices": ["y"]}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2.*choices"):
        read_needles(bad)
    bad.write_text('{"t": 0, "text": "a"}\n')
    with pytest.raises(ValueError, match="at least one event and one question"):
        read_needles(bad)


def test_a_needles_folder_is_its_jsonl_streams_in_name_order(tmp_path, capsys):
    folder = tmp_path / "streams"
    folder.mkdir()
    for name in ("s10.jsonl", "s02.jsonl", "notes.txt"):
        (folder / name).write_text("")
    single = tmp_path / "one.jsonl"
    single.write_text("")
    assert needle_files([folder, single]) == [folder / "s02.jsonl", folder / "s10.jsonl", single]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=r"empty: a folder with no \*\.jsonl"):
        needle_files([empty])
    with pytest.raises(ValueError, match="gone: no such needle file or folder"):
        needle_files([tmp_path / "gone"])
    # the bench says so and stops before it loads a model
    assert bench.main(["--needles", str(empty), "--no-progress"]) != 0
    assert "a folder with no *.jsonl" in capsys.readouterr().err


def test_wilson_interval():
    lo, hi = wilson_interval(50, 100)
    assert lo == pytest.approx(0.4038, abs=1e-4) and hi == pytest.approx(0.5962, abs=1e-4)
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == 1.0
    assert wilson_interval(0, 0) == (0.0, 1.0)


def _plain_logprob(adapter, needle_set, question, continuation_ids, n_scored):
    """Sum of log p over the last ``n_scored`` ids, from one ordinary forward (no KV policy)."""
    chunks, cursor = [], PositionCursor()
    chunks.append(adapter.system_chunk(cursor))
    for event in needle_set.events:
        ids = torch.tensor(adapter.encode_text(" " + event.text))
        embeds = adapter.model.get_input_embeddings()(ids).detach()
        feats = VisionFeatures(embeds=[embeds], grid_thw=torch.tensor([[1, 1, ids.numel()]]))
        chunks.append(adapter.frame_chunk(feats, event.t, chunks[-1].cursor))
    chunks.append(adapter.question_chunk(question, chunks[-1].cursor))
    chunks.append(adapter.tokens_chunk(continuation_ids, chunks[-1].cursor))
    whole = adapter.concat_chunks(chunks)
    adapter.set_attention("sdpa")
    with torch.no_grad():
        hidden = adapter.language_model(
            inputs_embeds=whole.inputs_embeds, position_ids=whole.position_ids[0]
        ).last_hidden_state[0]
        logprobs = torch.log_softmax(adapter.model.lm_head(hidden).float(), dim=-1)
    n = whole.n_tokens
    rows = torch.arange(n - len(continuation_ids) - 1, n - 1)[-n_scored:]
    return float(logprobs[rows, torch.tensor(continuation_ids[-n_scored:])].sum())


def test_dense_stream_scores_match_a_plain_forward(tiny):
    needle_set = NeedleSet(
        "t",
        [NeedleEvent(0.0, "A red cup is on the table."), NeedleEvent(2.0, "The robot turned left.")],
        [NeedleQuestion("Where is the red cup?", "table", ("table", "door"), "The red cup is on the")],
    )
    stream = PolicyStream(tiny, "dense", PolicyConfig(budget_tokens=4096, sink_tokens=8), torch.float32)
    for event in needle_set.events:
        stream.ingest_event(event)
    q = needle_set.questions[0]
    run = stream.ask(q.question, 4, q.choices, prefix=q.prefix)
    again = stream.ask(q.question, 4, q.choices, prefix=q.prefix)
    assert run["choice_logprobs"] == again["choice_logprobs"]  # the stream is left as it was
    assert run["targets"] == run["tokens"] + ([run["stopped"]] if run["stopped"] is not None else [])
    assert run["target_logprobs"].shape == (len(run["targets"]), tiny.model.lm_head.out_features)
    assert run["target_logprobs"].argmax(-1).tolist()[: len(run["tokens"])] == run["tokens"]
    head = tiny.encode_text(q.prefix)
    for choice, got in zip(q.choices, run["choice_logprobs"], strict=True):
        ids = tiny.encode_text(f"{q.prefix} {choice}")
        want = _plain_logprob(tiny, needle_set, q.question, ids, len(ids) - len(head))
        assert got == pytest.approx(want, abs=1e-3)


def test_run_needles_reports_every_policy_and_dense_is_its_own_reference(tiny, monkeypatch):
    sets = [generate_needles(s, frames=6, needles=2) for s in (0, 1)]
    cfg = NeedleConfig(
        policies=["dense", "window", "mosaic"], budget_tokens=48, window_tokens=16, max_new_tokens=3
    )
    started = []
    make_stream = needles._stream

    def recorded(adapter, name, *args):
        started.append(name)
        return make_stream(adapter, name, *args)

    monkeypatch.setattr(needles, "_stream", recorded)
    result = run_needles(tiny, sets, cfg, progress=False)
    # dense first on every stream, the others taking turns in the places after it
    assert started == ["dense", "window", "mosaic", "dense", "mosaic", "window"]
    assert list(result["policies"]) == ["dense", "window", "mosaic"]
    assert len(result["records"]) == 4
    dense = result["policies"]["dense"]
    assert dense["questions"] == 4 and dense["choice_questions"] == 4
    assert dense["dense_agreement"] == 1.0 and dense["top1_agreement"] == 1.0
    assert dense["kl_vs_dense"] == pytest.approx(0.0, abs=1e-6)
    assert dense["recall"] == pytest.approx(1.0, abs=1e-4) and dense["out_rel_err"] < 1e-4
    window = result["policies"]["window"]
    assert window["recall"] < 0.999  # 48 of ~100 tokens: the window must lose attention mass
    for r in result["policies"].values():
        assert 0.0 <= r["accuracy_ci95"][0] <= r["accuracy"] <= r["accuracy_ci95"][1] <= 1.0
        assert r["answer_ms"] > 0 and r["replay_total_ms"] > 0
        assert 0 < r["prefill_ms"] <= r["answer_ms"]
    for record in result["records"]:  # the answer's time is its prefill plus its decode passes
        for run in record["policies"].values():
            assert 0 <= run["decode_passes"] <= 2  # max_new_tokens 3: at most 2 passes after the prefill
            decode = run["answer_ms"] - run["prefill_ms"]
            if run["decode_passes"]:
                assert run["decode_ms_per_pass"] == pytest.approx(decode / run["decode_passes"])
            else:
                assert run["decode_ms_per_pass"] is None and decode == pytest.approx(0.0)


def test_bench_cli_runs_a_needles_folder(tmp_path, capsys):
    (tmp_path / "streams").mkdir()
    path = tmp_path / "streams" / "s.jsonl"
    events = [{"t": float(i), "text": f"Event number {i} happens."} for i in range(4)]
    questions = [{"question": "Which event happened first?", "answer": "0", "choices": ["0", "3"]}]
    path.write_text("\n".join(json.dumps(x) for x in events + questions))
    out = tmp_path / "out.json"
    code = bench.main(
        ["--needles", str(path.parent), "--model", "tiny-random:llava-ov", "--policies", "dense,token_topk",
         "--budget", "32", "--window", "8", "--max-new-tokens", "2", "--no-progress", "--json", str(out)]
    )  # fmt: skip
    assert code == 0
    doc = json.loads(out.read_text())
    assert doc["run"]["workload"] == "needles" and doc["run"]["streams"] == [str(path)]
    assert set(doc["policies"]) == {"dense", "token_topk"}
    assert "oracle vision tower" in doc["run"]["note"]
    assert "accuracy [95% CI]" in capsys.readouterr().out


def test_real_lm_dense_finds_the_needles():
    """With the real SmolLM2 weights and the full cache, the greedy answers hold the needles."""
    adapter = load_model("smollm2-llava:135m-instruct", device="cpu")
    needle_set = generate_needles(0, frames=8, needles=2)
    result = run_needles(
        adapter, [needle_set], NeedleConfig(policies=["dense"], budget_tokens=4096), progress=False
    )
    texts = [r["policies"]["dense"]["text"] for r in result["records"]]
    assert result["policies"]["dense"]["accuracy"] == 1.0, texts
    assert result["policies"]["dense"]["choice_accuracy"] == 1.0


def test_stream_gives_the_policy_its_maintenance_budget_after_each_event(tiny):
    sinks = tiny.system_chunk(PositionCursor()).n_tokens
    config = PolicyConfig(budget_tokens=64, sink_tokens=sinks, window_tokens=16)
    stream = PolicyStream(tiny, "mosaic", config, torch.float32, 7.5)
    budgets = []
    inner = stream.policy.maintain
    stream.policy.maintain = lambda budget_ms: budgets.append(budget_ms) or inner(budget_ms)
    for event in generate_needles(0, frames=3, needles=1).events:
        stream.ingest_event(event)
    assert budgets == [7.5, 7.5, 7.5]
    assert stream.frames == 3 and len(stream.chunk_bounds) == 5


def test_questions_without_choices_report_forced_choice_as_not_applicable():
    from mosaic_ros.runtime.bench.report import needle_table

    def record(correct: bool, choice: bool | None) -> dict:
        run = {"correct": correct, "same_as_dense": correct, "answer_ms": 10.0, "prefill_ms": 4.0,
               "decode_passes": 0, "decode_ms_per_pass": None, "top1": [1.0], "kl": [0.0]}  # fmt: skip
        if choice is not None:
            run["choice_correct"] = choice
        return {"policies": {"dense": run}}

    plain = summarize([record(True, None), record(False, None)], ["dense"])["dense"]
    assert plain["choice_questions"] == 0 and plain["choice_accuracy"] is None and plain["accuracy"] == 0.5
    json.dumps(plain, allow_nan=False)  # strict JSON: no NaN for the missing forced choice
    assert "n/a (no choices)" in needle_table(
        {"dense": {**plain, "recall": 1.0, "out_rel_err": 0.0, "replay_total_ms": 1.0}}
    )
    mixed = summarize([record(True, True), record(False, None)], ["dense"])["dense"]
    assert mixed["choice_questions"] == 1 and mixed["choice_accuracy"] == 1.0
