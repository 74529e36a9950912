"""A question's prefill under two policies, paired question by question, on the needle streams.

The needle bench (`mosaic-ros-bench --workload needles`) runs each policy over a whole stream
before the next, so the machine's drift over minutes lands in the comparison, and its answer
time is mostly decode passes that do the same work under every policy at equal budget. This
script times only what differs: the question's prefill (every layer's retrieval, fetch,
rotation and attention), the two policies one right after the other on the same question, in
alternating order, several times. With ``--parts``, the time inside named steps as well
(wall time around each call, summed; a step includes the steps it calls). With ``--decode N``,
each prefill is followed by N decode passes, one token each (the same fixed tokens under both
policies, so both do the same work over their own retrieved contexts), timed apart from it:
the median pass per question, paired, and the whole question (prefill and its N passes) paired,
with a 95% interval of the mean difference (the ``--parts`` then include the decode passes).

    .venv/bin/python scripts/needle_prefill.py --streams 4 --repeats 4 --parts
    .venv/bin/python scripts/needle_prefill.py --streams 2 --repeats 2 --decode 10
    .venv/bin/python scripts/needle_prefill.py --needles squad_streams --budget 128 --repeats 1 --parts

The model is the real SmolLM2 LM with the build's random vision tower unused (the needle
stream's "frames" are sentence embeddings: an oracle vision tower). Times are per question, ms.
"""

from __future__ import annotations

import argparse
import collections
import math
import statistics
import time

import torch

from mosaic_ros.runtime.bench.needles import (
    NeedleConfig,
    _stream,
    generate_needles,
    needle_files,
    read_needles,
)
from mosaic_ros.runtime.heap import freeze_startup_objects
from mosaic_ros.runtime.kv import attention, bridge, plan, store
from mosaic_ros.runtime.kv.clusters import ClusterIndex
from mosaic_ros.runtime.kv.policies import base, mosaic, rekv, units
from mosaic_ros.runtime.models import load_model

# (owner, attribute, label): the steps ``--parts`` times
PARTS = [
    (base.StoreBackedPolicy, "retrieve", "retrieve (select + fetch + reposition)"),
    (base.StoreBackedPolicy, "split_candidates", "  split_candidates"),
    (mosaic.MosaicPolicy, "_rows_for", "  _rows_for (mosaic's cluster layers)"),
    (plan, "cluster_layer_rows", "    cluster_layer_rows"),
    (mosaic, "head_shares", "  head_shares"),
    (rekv, "take_units", "  take_units (rekv's choice)"),
    (units, "unit_scores", "    unit_scores"),
    (ClusterIndex, "units_of", "  units_of"),
    (plan, "choose_blocks", "  choose_blocks"),
    (base.StoreBackedPolicy, "materialize", "  materialize (fetch)"),
    (store.HostKVStore, "_copy_in", "    copy_in"),
    (bridge, "rotate_context", "rotate_context"),
    (attention.MemoRotary, "__call__", "  rotary table"),
    (bridge, "attend", "attend"),
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--policies",
        default="rekv,mosaic",
        help="two policies, compared as second - first; the same one twice (two streams of it) "
        "measures what the pairing itself leaves",
    )
    p.add_argument("--budget", type=int, default=256)
    p.add_argument("--window", type=int, default=32)
    p.add_argument("--streams", type=int, default=4, help="generated needle streams, seeds --seed on")
    p.add_argument("--seed", type=int, default=200)
    p.add_argument(
        "--needles",
        action="append",
        default=[],
        metavar="PATH",
        help="needle streams from JSON lines (a file, or a folder of *.jsonl) instead of generated ones",
    )
    p.add_argument("--repeats", type=int, default=4, help="passes over every question")
    p.add_argument("--parts", action="store_true", help="also time the named steps")
    p.add_argument("--decode", type=int, default=0, help="decode passes timed after each prefill")
    args = p.parse_args()
    first, other = args.policies.split(",")
    second = f"{first}-2" if other == first else other  # the same policy twice: two labels
    kind = {first: first, second: other}  # label -> policy
    torch.set_num_threads(1)
    acc: dict[tuple[str, str], float] = collections.defaultdict(float)
    current = [first]
    if args.parts:
        for owner, name, label in PARTS:
            _time_calls(owner, name, label, acc, current)
    adapter = load_model("smollm2-llava:135m-instruct", device="cpu", dtype="float32")
    cfg = NeedleConfig(
        policies=sorted(set(kind.values())),
        budget_tokens=args.budget,
        window_tokens=args.window,
        options={"mosaic": {"maintain_clock": "work"}},
        maintain_ms=50,
    )
    if args.needles:
        sets = [read_needles(path) for path in needle_files(args.needles)]
    else:
        sets = [generate_needles(s, 24, 6) for s in range(args.seed, args.seed + args.streams)]
    streams = {label: [_stream(adapter, kind[label], cfg, s) for s in sets] for label in (first, second)}
    freeze_startup_objects()
    acc.clear()
    continuation = adapter.encode_text(" The answer is that it was the one in the")[: args.decode]
    if len(continuation) < args.decode:
        raise SystemExit(f"--decode is at most {len(continuation)}")

    def prefill(name: str, index: int, question: str) -> tuple[float, float, float]:
        """(prefill ms, median decode pass ms or nan, prefill + every decode pass ms)."""
        current[0] = name
        st = streams[name][index]
        chunk = adapter.question_chunk(question, st.cursor)
        t0 = time.perf_counter()
        st.bridge.begin_question(None)
        passes = []
        try:
            with torch.no_grad():
                with st.bridge.question_step(chunk.token_positions) as cache:
                    adapter.forward(chunk, cache)
                ms = (time.perf_counter() - t0) * 1e3
                cursor = chunk.cursor
                for token in continuation:
                    step = adapter.token_chunk(token, cursor)
                    t1 = time.perf_counter()
                    with st.bridge.question_step(step.token_positions) as cache:
                        adapter.forward(step, cache)
                    passes.append((time.perf_counter() - t1) * 1e3)
                    cursor = step.cursor
        finally:
            st.bridge.end_question()
        acc[(name, "prefill")] += ms / 1e3
        return ms, statistics.median(passes) if passes else math.nan, ms + sum(passes)

    diffs, pass_diffs, pass_ms, count = [], [], collections.defaultdict(list), 0
    totals: dict[str, list[float]] = collections.defaultdict(list)
    for rep in range(args.repeats):
        for index, needle_set in enumerate(sets):
            for qi, q in enumerate(needle_set.questions):
                if (rep + qi) % 2:
                    a = prefill(first, index, q.question)
                    b = prefill(second, index, q.question)
                else:
                    b = prefill(second, index, q.question)
                    a = prefill(first, index, q.question)
                diffs.append(b[0] - a[0])
                pass_diffs.append(b[1] - a[1])
                pass_ms[first].append(a[1])
                pass_ms[second].append(b[1])
                totals[first].append(a[2])
                totals[second].append(b[2])
                count += 1
    print(f"{count} prefills per policy ({len(sets)} streams x {args.repeats} passes), budget {args.budget}")
    mean, half = _mean_interval(diffs)
    print(
        f"{second} - {first} prefill per question, paired: median {statistics.median(diffs):.2f} ms, "
        f"mean {mean:.2f} ms, 95% interval [{mean - half:+.2f}, {mean + half:+.2f}] ms, {second} "
        f"faster in {sum(d < 0 for d in diffs)} of {count}"
    )
    if args.decode:
        med = {name: statistics.median(v) for name, v in pass_ms.items()}
        faster = sum(d < 0 for d in pass_diffs)
        print(
            f"decode pass ({args.decode} per question), median per question: {first} "
            f"{med[first]:.2f} ms, {second} {med[second]:.2f} ms; {second} - {first} paired: median "
            f"{statistics.median(pass_diffs):.3f} ms, mean {statistics.mean(pass_diffs):.3f} ms, "
            f"{second} faster in {faster} of {count}"
        )
        whole = [b - a for a, b in zip(totals[first], totals[second], strict=True)]
        mean, half = _mean_interval(whole)
        base = statistics.mean(totals[first])
        lo, hi = mean - half, mean + half
        pct = [100 * v / base for v in (mean, lo, hi)]
        print(
            f"whole question (prefill + {args.decode} passes): {first} {base:.1f} ms, {second} "
            f"{statistics.mean(totals[second]):.1f} ms (means); {second} - {first} paired: mean "
            f"{mean:+.2f} ms, 95% interval [{lo:+.2f}, {hi:+.2f}] ms ({pct[0]:+.2f}% [{pct[1]:+.2f}, "
            f"{pct[2]:+.2f}]), median {statistics.median(whole):+.2f} ms, {second} faster in "
            f"{sum(d < 0 for d in whole)} of {count}"
        )
    labels = ["prefill"] + [label for _, _, label in PARTS if args.parts]
    print(f"{'ms per question':40s} {first:>9s} {second:>9s}")
    for label in labels:
        print(
            f"{label:40s} {acc[(first, label)] / count * 1e3:9.2f} {acc[(second, label)] / count * 1e3:9.2f}"
        )


def _mean_interval(values: list[float]) -> tuple[float, float]:
    """(mean, half-width of its 95% interval): Student's t, its quantile for n - 1 degrees of
    freedom exact to 10 and rounded up beyond (the quantile at the band's fewest degrees)."""
    n = len(values)
    if n < 2:
        return statistics.mean(values), math.nan
    exact = (12.71, 4.30, 3.18, 2.78, 2.57, 2.45, 2.36, 2.31, 2.26, 2.23)
    df = n - 1
    t = exact[df - 1] if df <= 10 else 2.20 if df <= 20 else 2.08 if df <= 30 else 2.04 if df <= 60 else 2.00
    return statistics.mean(values), t * statistics.stdev(values) / math.sqrt(n)


def _time_calls(owner, name: str, label: str, acc: dict, current: list[str]) -> None:
    """Wrap ``owner.name`` so each call's wall time adds to ``acc[(policy now asked, label)]``."""
    inner = getattr(owner, name)

    def timed(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            acc[(current[0], label)] += time.perf_counter() - t0

    setattr(owner, name, timed)


if __name__ == "__main__":
    main()
