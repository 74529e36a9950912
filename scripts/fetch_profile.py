"""Where a policy's question-time transfer goes: copies by kind and size, and planning.

Streams the benchmark's synthetic KV (``--shape``) into each policy with the benchmark's own
per-frame step, then asks the workload's questions twice (the first round warms the buffers;
the second is measured). Between layers a 64 MiB write stands in for attention, which would
evict the caches. Prints, per policy, transfer / copy / planning ms per question, the rows
copied as runs (by run length) and gathered row by row, the bandwidth of each kind, and how
much of the planning the compiled planning kernels (``runtime/kv/plan.py``) take.

    .venv/bin/python scripts/fetch_profile.py --shape qwen2.5-vl-7b --frames 300 --policies mosaic,rekv

No attention, no fidelity: for comparing fetch paths (e.g. two commits) on one machine.
"""

from __future__ import annotations

import argparse
import os
import time
from collections import defaultdict

os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # as the benchmark CLI does

import torch

from mosaic_ros.runtime.bench.runner import ingest_frame
from mosaic_ros.runtime.bench.shapes import SHAPES
from mosaic_ros.runtime.bench.workloads import SyntheticSpec, SyntheticWorkload
from mosaic_ros.runtime.kv import copy as copy_module
from mosaic_ros.runtime.kv import store as store_module
from mosaic_ros.runtime.kv.copy import CopyEngine, HostCopyEngine
from mosaic_ros.runtime.kv.policy import PolicyConfig, make_policy


class CopyLog:
    """Wraps the store's run copies and gathers for question buffers (``capacity == budget``)."""

    def __init__(self, budget: int):
        self.budget = budget
        self.runs: dict[int, int] = defaultdict(int)  # run length bucket (power of 2) -> rows
        self.run_copies = [0, 0.0]  # rows, seconds
        self.gathered = [0, 0.0]
        self._runs, self._gather = HostCopyEngine._copy_runs, CopyEngine._gather
        log = self

        def copy_runs(engine, pool, layer, into, starts, dst, lengths):
            t0 = time.perf_counter()
            log._runs(engine, pool, layer, into, starts, dst, lengths)
            if into.capacity == log.budget:
                log.run_copies[0] += int(lengths.sum())
                log.run_copies[1] += time.perf_counter() - t0
                for ln in lengths.tolist():
                    log.runs[1 << (int(ln).bit_length() - 1)] += ln

        def gather(engine, pool, layer, into, rows, dst, stats):
            t0 = time.perf_counter()
            log._gather(engine, pool, layer, into, rows, dst, stats)
            if into.capacity == log.budget:
                log.gathered[0] += rows.size
                log.gathered[1] += time.perf_counter() - t0

        HostCopyEngine._copy_runs, CopyEngine._gather = copy_runs, gather

    def reset(self) -> None:
        self.runs.clear()
        self.run_copies = [0, 0.0]
        self.gathered = [0, 0.0]


class KernelLog:
    """Times the store's calls of the planning kernels while ``active``."""

    def __init__(self):
        self.active = False
        self.seconds = 0.0
        for module, name in (
            (store_module, "plan_shared"),
            (copy_module, "copy_runs"),
            (copy_module, "write_slot_meta"),
        ):
            setattr(module, name, self._timed(getattr(module, name)))

    def _timed(self, kernel):
        def call(*args):
            t0 = time.perf_counter()
            out = kernel(*args)
            if self.active:
                self.seconds += time.perf_counter() - t0
            return out

        return call


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="qwen2.5-vl-7b", choices=sorted(SHAPES))
    ap.add_argument("--frames", type=int, default=300)
    ap.add_argument("--policies", default="mosaic,rekv")
    ap.add_argument("--questions", type=int, default=8)
    ap.add_argument("--budget", type=int, default=8192)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    spec = SyntheticSpec(frames=args.frames, questions=args.questions, seed=0, sink_tokens=32)
    work = SyntheticWorkload(SHAPES[args.shape], spec, torch.float16)
    row_bytes = 2 * work.geometry.token_row_bytes
    flush = torch.empty(64 * 2**20, dtype=torch.uint8)
    log = CopyLog(args.budget)
    kernels = KernelLog()
    print(f"{args.shape}, {args.frames} frames, {args.threads} torch threads")
    for name in args.policies.split(","):
        config = PolicyConfig(budget_tokens=args.budget, sink_tokens=32, window_tokens=1024)
        policy = make_policy(name, work.geometry, config, torch.device("cpu"))
        for i in range(work.num_chunks):
            ingest_frame(policy, work.chunk(i), 5.0)
        totals = [0.0, 0.0, 0]
        kernels.seconds = 0.0
        for measured in (False, True):
            log.reset()
            kernels.active = measured
            for q in work.questions():
                policy.begin_question(q.window)
                for layer in range(work.geometry.num_layers):
                    flush.fill_(1)  # stands in for attention between layers
                    policy.retrieve(layer, q.queries[layer])
                stats = policy.end_question()
                if measured:
                    totals[0] += stats.transfer_ms
                    totals[1] += stats.copy_ms
                    totals[2] += stats.bytes_moved
        kernels.active = False
        nq = len(work.questions())
        tr, cp = totals[0] / nq, totals[1] / nq
        print(
            f"{name}: transfer {tr:.1f} ms/q = copies {cp:.1f} + planning {tr - cp:.1f}; "
            f"{totals[2] / nq / 1e6:.0f} MB/q, copies at {totals[2] / totals[1] / 1e6:.2f} GB/s"
        )
        for kind, (rows, secs) in (("copied as runs", log.run_copies), ("gathered row by row", log.gathered)):
            if rows:
                gbps = rows * row_bytes / secs / 1e9
                print(f"  {kind}: {rows / nq:.0f} rows/q at {gbps:.2f} GB/s")
        by_length = ", ".join(f"{b}+: {rows / nq:.0f}" for b, rows in sorted(log.runs.items()))
        print(f"  rows/q by run length: {by_length}")
        fetches = nq * work.geometry.num_layers
        plan_us = (tr - cp) / work.geometry.num_layers * 1e3
        kernel_us = kernels.seconds / fetches * 1e6
        print(f"  planning per fetch: {plan_us:.0f} us, of which the planning kernels {kernel_us:.0f} us")
        del policy


if __name__ == "__main__":
    main()
