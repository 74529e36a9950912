"""mosaic-ros-bench end to end on a tiny synthetic stream, and its argument checks."""

from __future__ import annotations

import json
import operator
import os

import pytest
import torch

from mosaic_ros.cli.bench import main
from mosaic_ros.runtime.bench.report import FIELDS
from mosaic_ros.runtime.bench.runner import PolicyProcessError, in_fresh_process
from mosaic_ros.runtime.bench.shapes import SHAPES
from mosaic_ros.runtime.bench.workloads import SyntheticSpec, SyntheticWorkload

TINY = ["--shape", "tiny", "--frames", "12", "--budget", "96", "--sinks", "4", "--window", "16"]


def test_bench_writes_every_field_as_json_and_a_png(tmp_path, capsys):
    out_json, out_png = tmp_path / "b.json", tmp_path / "b.png"
    policies = "dense,window,token_topk,rekv,livevlm"
    rc = main(
        [*TINY, "--questions", "2", "--policies", policies, "--json", str(out_json), "--plot", str(out_png)]
    )
    assert rc == 0
    doc = json.loads(out_json.read_text())
    assert list(doc["policies"]) == policies.split(",")
    for name, res in doc["policies"].items():
        for key in FIELDS:
            assert key in res, (name, key)
        assert res["total_ms"] == pytest.approx(res["select_ms"] + res["transfer_ms"] + res["attn_ms"])
        assert res["device_kv_bytes_peak"] > 0
        assert 0.0 <= res["recall"] <= 1.0 + 1e-5
        assert len(res["per_question"]) == (1 if name == "dense" else 2)
        assert 0 < res["ingest_ms_median"] <= res["ingest_ms_p99"] <= res["ingest_ms_max"]
        assert res["ingest_ms_per_frame"] <= res["ingest_ms_max"]
    dense = doc["policies"]["dense"]
    assert dense["recall"] == pytest.approx(1.0, abs=1e-5)
    assert dense["out_rel_err"] == pytest.approx(0.0, abs=1e-6)
    assert dense["host_kv_bytes"] == 0
    # 12 frames x 25 tokens + 4 sinks = 304 tokens, more than the 96-token budget.
    assert doc["policies"]["window"]["recall"] < 1.0
    assert doc["policies"]["token_topk"]["bytes_moved"] > 0
    assert doc["memcpy_gbps"] > 0 and doc["memcpy_cold_gbps"] > 0
    for res in doc["policies"].values():
        assert res["transfer_vs_memcpy"] == pytest.approx(res["transfer_gbps"] / doc["memcpy_gbps"])
        assert res["transfer_vs_memcpy_cold"] == pytest.approx(res["transfer_gbps"] / doc["memcpy_cold_gbps"])
        for q in res["per_question"]:  # the copies are a part of the transfer, present iff bytes move
            assert 0.0 <= q["copy_ms"] <= q["transfer_ms"]
            assert (q["copy_ms"] > 0) == (q["bytes_moved"] > 0)
        if res["bytes_moved"] > 0:
            assert res["copy_gbps"] >= res["transfer_gbps"]
    for key in ("cpu", "cores", "ram_bytes", "torch"):
        assert key in doc["machine"]
    assert doc["command"].startswith("mosaic-ros-bench --shape tiny")
    assert doc["date"]
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "token_topk" in capsys.readouterr().out


def test_bench_with_a_budget_covering_the_stream_matches_dense(tmp_path):
    out_json = tmp_path / "b.json"
    args = ["--shape", "tiny", "--frames", "6", "--budget", "400", "--sinks", "4", "--window", "16"]
    rest = ["--questions", "2", "--dense-questions", "2", "--policies", "dense,token_topk,rekv"]
    assert main([*args, *rest, "--maintain-ms", "50", "--json", str(out_json)]) == 0
    assert json.loads(out_json.read_text())["run"]["maintain_ms"] == 50.0
    for res in json.loads(out_json.read_text())["policies"].values():
        assert res["recall"] == pytest.approx(1.0, abs=1e-4)
        assert res["out_rel_err"] == pytest.approx(0.0, abs=1e-3)


def test_each_policy_after_dense_runs_in_a_process_of_its_own_with_the_same_results(tmp_path):
    runs = {}
    for flag in ("--isolate", "--no-isolate"):
        out = tmp_path / f"{flag}.json"
        rest = ["--questions", "2", "--policies", "dense,rekv,mosaic", "--json", str(out)]
        assert main([*TINY, *rest, "--option", "mosaic.maintain_clock=work", flag]) == 0
        runs[flag] = json.loads(out.read_text())["policies"]
    isolated, shared = runs["--isolate"], runs["--no-isolate"]
    pids = {name: res["process_id"] for name, res in isolated.items()}
    assert len(set(pids.values())) == 3 and pids["dense"] == shared["dense"]["process_id"]
    assert [res["own_process"] for res in isolated.values()] == [False, True, True]
    assert not any(res["own_process"] for res in shared.values())
    assert {res["process_id"] for res in shared.values()} == {pids["dense"]}
    for name in ("rekv", "mosaic"):  # what was retrieved does not depend on the process
        for key in ("recall", "out_rel_err", "bytes_moved", "tokens_retrieved", "tokens_in_memory", "units"):
            assert isolated[name][key] == shared[name][key], (name, key)
    assert isolated["mosaic"]["recall"] != isolated["rekv"]["recall"]


def test_a_fresh_process_hands_back_results_and_errors_and_one_that_dies_is_a_clear_error():
    assert in_fresh_process("a sum", sum, [1, 2, 3]) == 6
    with pytest.raises(ZeroDivisionError):  # an exception comes back as itself
        in_fresh_process("a division", operator.truediv, 1, 0)
    with pytest.raises(PolicyProcessError, match="the process running a process that exits ended"):
        in_fresh_process("a process that exits", os._exit, 3)
    assert in_fresh_process("the next one", sum, [4, 5]) == 9  # the fork server still serves


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--frames", "-3"], "--frames must be positive"),
        (["--policies", "dense,nope"], "registered:"),
        (["--budget", "0"], "budget_tokens must be >= 1, got 0"),
        (["--questions", "0"], "--questions must be positive"),
        (["--maintain-ms", "-1"], "maintain_budget_ms must be >= 0, got -1.0"),
    ],
)
def test_bench_rejects_bad_arguments_clearly(args, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--shape", "tiny", *args])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_bench_reports_policy_errors_without_a_traceback(capsys):
    rc = main([*TINY, "--questions", "1", "--policies", "window", "--option", "window.bogus=1"])
    assert rc == 2
    assert "unknown option" in capsys.readouterr().err


def test_synthetic_chunks_are_deterministic_per_index_and_questions_hit_revisits():
    shape = SHAPES["tiny"]
    spec = SyntheticSpec(frames=80, questions=3, seed=3, sink_tokens=4)
    a, b = SyntheticWorkload(shape, spec), SyntheticWorkload(shape, spec)
    c7 = a.chunk(7)
    assert a.chunk(3).meta.positions[0, 0] == 4 + 2 * shape.tokens_per_frame
    assert torch.equal(c7.keys[1], b.chunk(7).keys[1])
    assert not torch.equal(c7.keys[0], c7.keys[1])
    assert int(c7.meta.modality.sum()) == shape.vision_tokens_per_frame
    topics = a.question_objects()
    assert topics.numel() > 0
    for obj in topics.tolist():
        scenes = (a.scene_objects == obj).any(dim=1)
        segments = torch.unique(a.segment_of_frame[scenes[a.scene_of_frame]])
        assert segments.numel() >= 2
    q = a.questions()[0]
    assert q.queries[0].shape == (shape.num_q_heads, spec.question_tokens, shape.head_dim)
    assert q.local_keys[1].shape == (shape.num_kv_heads, spec.question_tokens, shape.head_dim)
    assert int(q.positions[0, 0]) == a.total_tokens


def test_bench_replays_kv_captured_from_a_tiny_model_over_a_video(tmp_path):
    cv2 = pytest.importorskip("cv2")
    import numpy as np

    video = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 2.0, (96, 64))
    for i in range(4):
        img = np.full((64, 96, 3), 30 * i, np.uint8)
        img[10:30, 10 + 8 * i : 30 + 8 * i] = (0, 0, 255)
        writer.write(img)
    writer.release()
    out_json = tmp_path / "v.json"
    args = ["--workload", f"video:{video}", "--frames", "3", "--questions", "2", "--budget", "48"]
    rest = [
        "--sinks",
        "4",
        "--window",
        "8",
        "--policies",
        "dense,token_topk,livevlm",
        "--json",
        str(out_json),
    ]
    assert main([*args, *rest, "--no-progress"]) == 0
    doc = json.loads(out_json.read_text())
    stream = doc["run"]["stream"]
    assert stream["kind"] == "video" and stream["frames"] == 3
    assert stream["tokens"] > 48
    dense = doc["policies"]["dense"]
    assert dense["recall"] == pytest.approx(1.0, abs=1e-4)
    assert dense["out_rel_err"] == pytest.approx(0.0, abs=1e-3)
    assert 0.0 < doc["policies"]["token_topk"]["recall"] < 1.0


def test_bench_loads_each_policys_stream_and_gets_the_recall_of_the_run_that_saved_it(tmp_path, capsys):
    saved, first, second = tmp_path / "streams", tmp_path / "a.json", tmp_path / "b.json"
    policies = "dense,window,token_topk,rekv,livevlm"
    args = [*TINY, "--questions", "2", "--dense-questions", "2", "--policies", policies, "--no-progress"]
    assert main([*args, "--save", str(saved), "--json", str(first)]) == 0
    assert sorted(p.name for p in saved.iterdir()) == sorted(policies.split(","))
    assert main([*args, "--load", str(saved), "--json", str(second)]) == 0
    before = json.loads(first.read_text())["policies"]
    after = json.loads(second.read_text())
    assert after["run"]["loaded_from"] == str(saved)
    for name, res in after["policies"].items():
        assert res["loaded_from"] == str(saved / name)
        assert res["tokens_in_memory"] == before[name]["tokens_in_memory"]
        assert res["recall"] == pytest.approx(before[name]["recall"], rel=1e-6), name
        assert res["out_rel_err"] == pytest.approx(before[name]["out_rel_err"], rel=1e-5, abs=1e-7), name
        assert res["ingest_ms_per_frame"] == before[name]["ingest_ms_per_frame"]  # the saving run's
    assert after["policies"]["window"]["recall"] < 1.0  # the budget selects: recall is not trivially 1
    capsys.readouterr()
    for other, differs in (
        (["--window", "8"], "policy_config.window_tokens: snapshot 16, this session 8"),
        (["--frames", "10"], "stream.frames: snapshot 12, this session 10"),
        (
            ["--option", "window.page_rows=64"],
            "policy_config.options.page_rows: snapshot None, this session 64",
        ),
    ):
        assert main([*args, *other, "--load", str(saved)]) == 2
        err = capsys.readouterr().err
        assert "was made with another model or policy: " in err and differs in err, err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--save", "a", "--load", "b"], "give --save or --load, not both"),
        (["--budgets", "64,96", "--save", "a"], "--save and --load take one --budget, not a --budgets sweep"),
        (["--load", "nowhere"], "no snapshot in nowhere/dense"),
    ],
)
def test_bench_save_and_load_refuse_what_they_cannot_do(args, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    try:
        rc = main([*TINY, "--questions", "1", "--policies", "window", "--no-progress", *args])
    except SystemExit as exc:
        rc = exc.code
    assert rc == 2
    assert message in capsys.readouterr().err
