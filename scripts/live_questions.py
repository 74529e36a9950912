"""Questions asked while frames stream in: what each question brings to the device buffers.

The bench asks its questions after the whole stream, so a policy's device buffers hold what the
previous question left and nothing has moved since. On a robot the questions come between
frames, and mosaic's maintenance moves rows (seals, splits) in between. This streams the
synthetic workload and, from frame ``--first`` on, asks the same question every ``--every``
frames (one random query per run, seeded, as the bench's questions are), printing per question
the bytes copied into the buffers (MB), the transfer time (ms, planning and copies) and the
whole retrieval (ms, all layers), per policy, one policy after the other in one process.

    .venv/bin/python scripts/live_questions.py --shape qwen2.5-vl-7b --frames 100 --policies rekv,mosaic

Keys and values are the synthetic stream's (random, no model); the query is random.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # as the benchmark CLI does

import torch

from mosaic_ros.runtime.bench.runner import ingest_frame
from mosaic_ros.runtime.bench.shapes import SHAPES
from mosaic_ros.runtime.bench.workloads import SyntheticSpec, SyntheticWorkload
from mosaic_ros.runtime.kv.policy import PolicyConfig, make_policy


def run(name: str, work: SyntheticWorkload, args: argparse.Namespace) -> list[tuple[float, float, float]]:
    """(MB copied, transfer ms, retrieval ms) of each question of one policy's run."""
    g = work.geometry
    options = {"sketch_dims": args.sketch_dims} if name == "mosaic" and args.sketch_dims is not None else {}
    config = PolicyConfig(
        budget_tokens=args.budget, sink_tokens=args.sinks, window_tokens=args.window, options=options
    )
    policy = make_policy(name, g, config, torch.device("cpu"))
    query = torch.randn(
        g.num_q_heads, args.question_tokens, g.head_dim, generator=torch.Generator().manual_seed(args.seed)
    ).to(g.dtype)
    out = []
    for i in range(work.num_chunks):
        ingest_frame(policy, work.chunk(i), args.maintain_ms)
        if i >= args.first and (i - args.first) % args.every == 0:
            policy.begin_question()
            t0 = time.perf_counter()
            for layer in range(g.num_layers):
                policy.retrieve(layer, query)
            stats = policy.end_question()
            out.append((stats.bytes_moved / 1e6, stats.transfer_ms, (time.perf_counter() - t0) * 1e3))
    policy.reset()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--policies", default="rekv,mosaic")
    ap.add_argument("--shape", default="qwen2.5-vl-7b", choices=sorted(SHAPES))
    ap.add_argument("--frames", type=int, default=100)
    ap.add_argument("--first", type=int, default=60, help="frame of the first question")
    ap.add_argument("--every", type=int, default=5, help="frames between questions")
    ap.add_argument("--budget", type=int, default=8192)
    ap.add_argument("--window", type=int, default=1024)
    ap.add_argument("--sinks", type=int, default=32)
    ap.add_argument("--question-tokens", type=int, default=16)
    ap.add_argument("--maintain-ms", type=float, default=5.0)
    ap.add_argument("--sketch-dims", type=int, default=None, help="mosaic's sketch_dims (unset: default)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    spec = SyntheticSpec(frames=args.frames, questions=1, seed=0, sink_tokens=args.sinks)
    work = SyntheticWorkload(SHAPES[args.shape], spec, torch.float16)
    for name in args.policies.split(","):
        rows = run(name, work, args)
        later = rows[1:]  # the first question fills empty buffers under every policy
        print(f"{name}: {len(rows)} questions, every {args.every} frames from frame {args.first}")
        for label, k in (("MB copied", 0), ("transfer ms", 1), ("retrieval ms", 2)):
            values = " ".join(f"{r[k]:6.1f}" for r in rows)
            mean = statistics.fmean(r[k] for r in later) if later else float("nan")
            print(f"  {label:13s} {values}   mean after the first: {mean:.1f}")


if __name__ == "__main__":
    main()
