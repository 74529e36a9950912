"""``mosaic-ros-bench``: every KV policy on the same stream and questions, each after ``dense``
in a process of its own (``--no-isolate``: all in this one).

    mosaic-ros-bench --shape qwen2.5-vl-7b --workload synthetic --frames 600 --budget 8192 \
        --questions 8 --policies dense,token_topk,rekv,livevlm --json out.json --plot out.png

Prints a table (per question, all layers, medians: select / transfer / attention ms,
copies, bytes, effective GB/s, recall and output error against dense, memory) and writes
the same as JSON and a PNG plot. ``--budgets 1024,2048,4096,8192`` sweeps the budget instead
(``bench.sweep``): recall and output error against device KV per policy, and the device KV each
policy needs to reach a recall. The policies' settings are flags derived from the configuration
tree (``runtime.config``); ``--save DIR`` keeps each policy's stream after ingest in
``DIR/<policy>``, and a later ``--load DIR`` replays them instead of ingesting.
"""

from __future__ import annotations

import os

# Before torch allocates anything: large CPU tensors get transparent huge pages. Every
# question allocates hundred-megabyte temporaries (rotated keys, logits); with 4 KiB pages
# their first-touch page faults, not the work, dominate CPU timings.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import argparse
import dataclasses
import shlex
import sys
import time

import torch

from mosaic_ros.runtime import config
from mosaic_ros.runtime.bench.report import machine, now, plot, table, write_json
from mosaic_ros.runtime.bench.runner import BenchConfig, PolicyProcessError, run_policies
from mosaic_ros.runtime.bench.shapes import SHAPES
from mosaic_ros.runtime.bench.sweep import (
    NEEDLE_FIELDS,
    kv_table,
    parse_budgets,
    summarize,
    sweep_plot,
    sweep_table,
    window_for,
)
from mosaic_ros.runtime.bench.workloads import SyntheticSpec, SyntheticWorkload
from mosaic_ros.runtime.heap import freeze_startup_objects
from mosaic_ros.runtime.kv.policy import POLICIES
from mosaic_ros.runtime.snapshot import SnapshotError

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mosaic-ros-bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="tiny", help="model KV shape")
    p.add_argument("--workload", default="synthetic", help="synthetic | video:PATH | needles")
    p.add_argument("--frames", type=int, default=60, help="frames streamed before the questions")
    p.add_argument(
        "--budgets",
        help="a sweep, e.g. 1024,2048,4096,8192: the whole run once per budget (replaces --budget; "
        "window: an eighth of each budget, at most --window); prints recall and error (needles: "
        "also accuracy and dense agreement) against device KV and the device KV each policy needs "
        "for --target-recall (needles: also for rekv's accuracy at the largest budget)",
    )
    p.add_argument(
        "--target-recall",
        type=float,
        help="recall the sweep asks each policy's device KV for "
        "(default: rekv's recall at the largest budget)",
    )
    p.add_argument("--questions", type=int, default=8)
    p.add_argument("--policies", default="dense,window,token_topk,rekv,livevlm", help="comma-separated")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float16", help="KV storage dtype")
    p.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="POLICY.KEY=VALUE",
        help="a policy option, e.g. livevlm.page_tokens=32 (repeatable)",
    )
    config.add_arguments(
        p.add_argument_group("the policies' settings (the configuration tree)"), BenchConfig()
    )
    p.add_argument("--json", dest="json_path", help="write the results as JSON here")
    p.add_argument("--plot", dest="plot_path", help="write a PNG plot here")
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="CPU threads for torch; 0 = all cores, or 1 when other processes already keep the cores busy",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    needles = p.add_argument_group(
        "needle workload (--workload needles: a real LM answers questions with checkable answers)"
    )
    needles.add_argument(
        "--needles",
        action="append",
        default=[],
        metavar="PATH",
        help="a stream of JSON lines ({'t','text'} events, {'question','answer','choices'} questions) "
        "instead of generated ones, or a folder of such *.jsonl streams, read in name order "
        "(repeatable; implies --workload needles)",
    )
    needles.add_argument("--model", default="smollm2-llava:135m-instruct", help="a 1-D RoPE (llava-ov) model")
    needles.add_argument("--streams", type=int, default=18, help="generated streams (seeds --seed on)")
    needles.add_argument("--needle-frames", type=int, default=24, help="events per generated stream")
    needles.add_argument("--needles-per-stream", type=int, default=6, help="needles (questions) per stream")
    needles.add_argument("--max-new-tokens", type=int, default=16, help="greedy answer length limit")
    return p


def _parse_options(items: list[str]) -> dict[str, dict]:
    """``POLICY.KEY=VALUE`` items as each policy's options, typed by their defaults
    (``ConfigError`` for an unknown policy or key, listing the known ones)."""
    grouped: dict[str, list[str]] = {}
    for item in items:
        policy, dot, rest = item.partition(".")
        if not dot or not policy or "=" not in rest:
            raise config.ConfigError(f"--option must look like POLICY.KEY=VALUE, got {item!r}")
        grouped.setdefault(policy, []).append(rest)
    return {policy: config.parse_options(policy, rest) for policy, rest in grouped.items()}


def _workload(args: argparse.Namespace):
    shape = SHAPES[args.shape]
    dtype = DTYPES[args.dtype]
    if args.workload == "synthetic":
        spec = SyntheticSpec(
            frames=args.frames, questions=args.questions, seed=args.seed, sink_tokens=args.sink_tokens
        )
        return SyntheticWorkload(shape, spec, dtype)
    if args.workload.startswith("video:"):
        from mosaic_ros.runtime.bench.video import VideoWorkload

        return VideoWorkload(
            args.workload.removeprefix("video:"),
            frames=args.frames,
            questions=args.questions,
            seed=args.seed,
            dtype=dtype,
            device=args.device,
        )
    raise ValueError(f"--workload must be 'synthetic' or 'video:PATH', got {args.workload!r}")


def choose_threads(requested: int) -> int:
    """Threads for torch. Auto (0): torch's default, except 1 when the 1-minute load average
    already covers the cores: an oversubscribed multi-threaded op waits on descheduled
    threads and runs many times slower than on one thread."""
    if requested > 0:
        return requested
    cores = os.cpu_count() or 1
    busy = os.getloadavg()[0] >= cores - 0.5 if hasattr(os, "getloadavg") else False
    return 1 if busy and cores > 1 else torch.get_num_threads()


def needles_main(args: argparse.Namespace, names: list[str], budgets: list[int], argv: list[str]) -> int:
    """``--workload needles``: the answers of a real LM under each policy (``bench.needles``), at
    one budget or, with ``--budgets``, at each (``bench.sweep``)."""
    from mosaic_ros.runtime.bench.needles import (
        NeedleConfig,
        generate_needles,
        needle_files,
        read_needles,
        run_needles,
    )
    from mosaic_ros.runtime.bench.report import needle_table
    from mosaic_ros.runtime.models import ModelLoadError, load_model

    torch.set_num_threads(choose_threads(args.threads))
    t0 = time.perf_counter()
    runs: dict[int, dict] = {}
    dense_cache: dict = {}  # dense's answers do not depend on the budget: made once per stream
    try:
        if args.needles:
            sets = [read_needles(path) for path in needle_files(args.needles)]
        else:
            seeds = range(args.seed, args.seed + args.streams)
            sets = [generate_needles(s, args.needle_frames, args.needles_per_stream) for s in seeds]
        adapter = load_model(args.model, device=args.device, dtype="float32")
        freeze_startup_objects()
        for budget in budgets:
            window = window_for(budget, args.window_tokens) if args.budgets else args.window_tokens
            cfg = NeedleConfig(
                policies=names,
                budget_tokens=budget,
                window_tokens=window,
                options=_parse_options(args.option),
                max_new_tokens=args.max_new_tokens,
                maintain_ms=args.maintain_budget_ms,
                reselect_every=args.reselect_every,
            )
            runs[budget] = {
                "window": window,
                **run_needles(adapter, sets, cfg, progress=not args.no_progress, dense_cache=dense_cache),
            }
    except (ValueError, ModelLoadError) as exc:
        print(f"mosaic-ros-bench: error: {exc}", file=sys.stderr)
        return 2
    wall = time.perf_counter() - t0
    result = runs[budgets[-1]]
    doc = {
        "command": shlex.join(["mosaic-ros-bench", *argv]),
        "date": now(),
        "wall_s": wall,
        "machine": machine(args.device),
        "run": {
            "workload": "needles",
            "model": args.model,
            "note": "real LM; each event's sentence embeddings stand in for its visual tokens (an oracle "
            "vision tower); the build's own vision tower is random and unused",
            "streams": [s.name for s in sets],
            "budget": budgets[-1],
            "window": result["window"],
            "max_new_tokens": args.max_new_tokens,
            "maintain_ms": args.maintain_budget_ms,
        },
        "policies": result["policies"],
        "records": result["records"],
    }
    print(needle_table(result["policies"]))
    if args.budgets:
        by_recall = summarize(runs, args.target_recall, "recall", NEEDLE_FIELDS)
        by_accuracy = summarize(runs, None, "accuracy", NEEDLE_FIELDS)
        doc["sweep"] = {
            "budgets": budgets,
            "runs": {b: {"window": r["window"], "policies": r["policies"]} for b, r in runs.items()},
            "records": {b: r["records"] for b, r in runs.items() if b != budgets[-1]},
            "summary": by_recall,
            "summary_accuracy": by_accuracy,
        }
        print(sweep_table(by_accuracy, ("accuracy", "dense_agreement", "recall")))
        print(kv_table(by_recall))
    print(f"wall time {wall:.1f} s")
    if args.json_path:
        write_json(doc, args.json_path)
    if args.plot_path and args.budgets:
        title = f"needles ({args.model}), {len(sets)} streams, {args.device}: budget sweep"
        sweep_plot(by_accuracy, args.plot_path, title, other="recall")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from mosaic_ros.runtime.kv import policies  # noqa: F401  (registers the built-in policies)

    names = [n.strip() for n in args.policies.split(",") if n.strip()]
    unknown = [n for n in names if n not in POLICIES]
    if not names or unknown:
        parser.error(
            f"unknown or missing policies {unknown or names}; registered: {', '.join(sorted(POLICIES))}"
        )
    try:
        budgets = parse_budgets(args.budgets) if args.budgets else [args.budget_tokens]
    except ValueError as exc:
        parser.error(str(exc))
    if args.workload == "needles" or args.needles:  # its sinks are the model's preamble
        if args.save or args.load:
            parser.error("--save and --load take the synthetic and video workloads, not needles")
        if args.plot_path and not args.budgets:
            parser.error("--plot on the needle workload takes a --budgets sweep")
        return needles_main(args, names, budgets, sys.argv[1:] if argv is None else argv)
    try:
        cfg = config.from_arguments(BenchConfig(), args)
    except config.ConfigError as exc:
        parser.error(str(exc))
    if args.frames <= 0:
        parser.error(f"--frames must be positive, got {args.frames}")
    if args.questions <= 0:
        parser.error(f"--questions must be positive, got {args.questions}")
    if args.budgets and (cfg.save_dir or cfg.load_dir):
        parser.error("--save and --load take one --budget, not a --budgets sweep")
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda asked for, but no CUDA device is available")
    if args.threads < 0:
        parser.error(f"--threads must be >= 0, got {args.threads}")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    torch.set_num_threads(choose_threads(args.threads))
    try:
        cfg = dataclasses.replace(
            cfg, policies=names, options=_parse_options(args.option), progress=not args.no_progress
        )
        t0 = time.perf_counter()
        workload = _workload(args)
        freeze_startup_objects()
        runs = {}
        for budget in budgets:
            window = window_for(budget, args.window_tokens) if args.budgets else args.window_tokens
            kv = dataclasses.replace(cfg.kv, budget_tokens=budget, window_tokens=window)
            runs[budget] = {"window": window, **run_policies(workload, dataclasses.replace(cfg, kv=kv))}
        result = runs[budgets[-1]]
        wall = time.perf_counter() - t0
    except (ValueError, SnapshotError, PolicyProcessError) as exc:
        print(f"mosaic-ros-bench: error: {exc}", file=sys.stderr)
        return 2
    doc = {
        "command": shlex.join(["mosaic-ros-bench", *(sys.argv[1:] if argv is None else argv)]),
        "date": now(),
        "wall_s": wall,
        "machine": {
            **machine(args.device),
            "load_average_at_start": load,
            "thp_alloc": os.environ.get("THP_MEM_ALLOC_ENABLE", ""),
        },
        "run": {
            "shape": args.shape,
            "workload": args.workload,
            "frames": args.frames,
            "budget": budgets[-1],
            "window_at_budget": result["window"],
            "questions": args.questions,
            "dense_questions": min(cfg.dense_questions, args.questions),
            "sinks": cfg.kv.sink_tokens,
            "window": cfg.kv.window_tokens,
            "maintain_ms": cfg.maintain_budget_ms,
            "prefetch": cfg.kv.prefetch,
            "host_cap_bytes": cfg.kv.host_cap_bytes,
            "saved_to": cfg.save_dir,
            "loaded_from": cfg.load_dir,
            "dtype": args.dtype,
            "seed": args.seed,
            "stream": workload.describe(),
        },
        "memcpy_gbps": result["memcpy"]["gbps"],
        "memcpy_cold_gbps": result["memcpy"]["cold_gbps"],
        "memcpy": result["memcpy"],
        "policies": result["policies"],
    }
    print(table(doc))
    if args.budgets:
        summary = summarize(runs, args.target_recall)
        doc["sweep"] = {"budgets": budgets, "runs": runs, "summary": summary}
        print(sweep_table(summary))
    print(f"wall time {wall:.1f} s")
    if args.json_path:
        write_json(doc, args.json_path)
    if args.plot_path:
        if args.budgets:
            title = f"{args.shape}, {args.workload}, {args.frames} frames, {args.device}: budget sweep"
            sweep_plot(summary, args.plot_path, title)
        else:
            plot(doc, args.plot_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
