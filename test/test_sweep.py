"""The bench's budget sweep: interpolation of the device KV a policy needs, the window rule, and
one sweep end to end on the tiny shape (each budget's point equals a single run at that budget)."""

from __future__ import annotations

import json
import math

import pytest

from mosaic_ros.cli.bench import main
from mosaic_ros.runtime.bench.sweep import kv_for_target, parse_budgets, window_for

# a maintenance budget no frame uses up: mosaic's time-boxed maintenance otherwise makes its
# results depend on how fast each run happens to be
STREAM = [
    *("--shape", "tiny", "--frames", "12", "--sinks", "4", "--questions", "2"),
    *("--maintain-ms", "10000", "--no-progress"),
]
TINY = [*STREAM, "--window", "16"]


def test_device_kv_for_a_recall_is_interpolated_in_log_bytes():
    points = [(4096.0, 0.6), (1024.0, 0.2), (2048.0, 0.4)]
    half_way = kv_for_target(points, 0.5)
    assert half_way["bound"] == "interpolated"
    assert half_way["bytes"] == pytest.approx(2.0**11.5)
    assert kv_for_target(points, 0.6) == {"bytes": 4096.0, "bound": "interpolated"}
    assert kv_for_target(points, 0.1) == {"bytes": 1024.0, "bound": "at_or_below"}
    assert kv_for_target(points, 0.7) == {"bytes": None, "bound": "not_reached"}


def test_the_first_crossing_counts_when_recall_is_not_monotonic():
    points = [(1024.0, 0.2), (2048.0, 0.5), (4096.0, 0.3), (8192.0, 0.6)]
    assert kv_for_target(points, 0.35)["bytes"] == pytest.approx(2.0 ** (10 + 0.5))


def test_window_is_an_eighth_of_the_budget_at_most_the_given_one():
    assert [window_for(b, 1024) for b in (1024, 2048, 4096, 8192, 16384)] == [128, 256, 512, 1024, 1024]


@pytest.mark.parametrize("text", ["1024", "1024,1024", "0,64", "a,b"])
def test_bad_budget_lists_are_refused(text):
    with pytest.raises(ValueError, match="--budgets"):
        parse_budgets(text)


def test_bench_refuses_a_bad_sweep_clearly(capsys):
    with pytest.raises(SystemExit):
        main([*TINY, "--budgets", "64"])
    assert "--budgets needs at least two" in capsys.readouterr().err


def test_a_sweep_reports_every_budget_and_the_kv_each_policy_needs(tmp_path, capsys):
    out, png = tmp_path / "s.json", tmp_path / "s.png"
    policies = "dense,window,rekv,mosaic"
    args = [*TINY, "--budgets", "128,32,64", "--policies", policies]
    assert main([*args, "--json", str(out), "--plot", str(png)]) == 0
    printed = capsys.readouterr().out
    assert "device KV for recall" in printed
    doc = json.loads(out.read_text())
    sweep = doc["sweep"]
    assert sweep["budgets"] == [32, 64, 128]
    assert [sweep["runs"][str(b)]["window"] for b in (32, 64, 128)] == [4, 8, 16]
    assert doc["policies"] == sweep["runs"]["128"]["policies"]  # the largest budget is the main run
    summary = sweep["summary"]
    rekv = summary["policies"]["rekv"]
    assert (summary["measure"], summary["target"]) == ("recall", rekv["points"][-1]["recall"])
    assert summary["target_source"] == "rekv at 128 tokens"
    assert rekv["kv_for_target"]["bytes"] == pytest.approx(rekv["points"][-1]["device_kv_bytes"])
    assert rekv["kv_vs_rekv"] == pytest.approx(1.0)
    device = [p["device_kv_bytes"] for p in rekv["points"]]
    assert device == sorted(device) and device[0] < device[-1]
    recalls = [p["recall"] for p in summary["policies"]["window"]["points"]]
    assert recalls == sorted(recalls)  # a larger window sees more of the stream
    for entry in summary["policies"].values():
        need = entry["kv_for_target"]
        if need["bytes"] is not None:
            assert need["bound"] in ("interpolated", "at_or_below")
            assert math.isclose(entry["kv_vs_rekv"], need["bytes"] / rekv["kv_for_target"]["bytes"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # each budget's point is the same as a single run at that budget and window
    single = tmp_path / "one.json"
    single_args = [*STREAM, "--window", "8", "--budget", "64", "--policies", policies]
    assert main([*single_args, "--json", str(single)]) == 0
    one = json.loads(single.read_text())["policies"]
    for name in policies.split(","):
        assert one[name]["recall"] == sweep["runs"]["64"]["policies"][name]["recall"]


def test_a_needle_sweep_reports_accuracy_and_the_kv_each_policy_needs_for_it(tmp_path, capsys):
    """--workload needles --budgets: one whole needle run per budget; accuracy, dense agreement and
    recall against device KV, and the device KV each policy needs for rekv's accuracy and recall
    at the largest budget. Each budget's point equals a single needle run at that budget."""
    needles = [
        *("--workload", "needles", "--model", "tiny-random:llava-ov", "--streams", "1"),
        *("--needle-frames", "6", "--needles-per-stream", "2", "--max-new-tokens", "2"),
        *("--maintain-ms", "10000", "--window", "16", "--no-progress"),
    ]
    out, png = tmp_path / "n.json", tmp_path / "n.png"
    policies = "dense,window,rekv"
    args = [*needles, "--policies", policies, "--budgets", "32,64", "--json", str(out), "--plot", str(png)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "device KV for accuracy" in printed and "device KV for recall" in printed
    doc = json.loads(out.read_text())
    sweep = doc["sweep"]
    assert sweep["budgets"] == [32, 64] and doc["run"]["budget"] == 64
    assert [sweep["runs"][b]["window"] for b in ("32", "64")] == [4, 8]
    assert doc["policies"] == sweep["runs"]["64"]["policies"]  # the largest budget is the main run
    assert len(sweep["records"]["32"]) == len(doc["records"]) == 2
    # dense keeps every token at any budget: its answers are made once and reused, timings too
    for small, large in zip(sweep["records"]["32"], doc["records"], strict=True):
        assert small["policies"]["dense"] == large["policies"]["dense"]
        assert small["context_tokens"] == large["context_tokens"]
    by_accuracy = sweep["summary_accuracy"]
    rekv = by_accuracy["policies"]["rekv"]
    assert (by_accuracy["measure"], by_accuracy["target"]) == ("accuracy", rekv["points"][-1]["accuracy"])
    assert sweep["summary"]["measure"] == "recall"
    for point in by_accuracy["policies"]["dense"]["points"]:
        assert point["dense_agreement"] == 1.0 and point["recall"] == pytest.approx(1.0, abs=1e-4)
    window = [p["device_kv_bytes"] for p in by_accuracy["policies"]["window"]["points"]]
    assert window[0] < window[1]  # a larger budget holds more on the device
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    single = tmp_path / "one.json"
    one_args = [*needles[:-3], "--window", "4", "--no-progress", "--policies", policies, "--budget", "32"]
    assert main([*one_args, "--json", str(single)]) == 0
    one = json.loads(single.read_text())["policies"]
    for name in ("dense", "window", "rekv"):
        for key in ("accuracy", "dense_agreement", "recall", "device_kv_bytes_peak"):
            assert one[name][key] == sweep["runs"]["32"]["policies"][name][key], (name, key)


def test_plot_on_a_single_needle_run_is_refused(capsys):
    with pytest.raises(SystemExit):
        main(["--workload", "needles", "--model", "tiny-random:llava-ov", "--plot", "x.png"])
    assert "--plot on the needle workload takes a --budgets sweep" in capsys.readouterr().err
