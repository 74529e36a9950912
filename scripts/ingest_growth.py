"""Ingest cost per frame against stream length, for one KV policy, without a model.

Streams the benchmark's synthetic KV (``--shape``) into the policy with the benchmark's own
per-frame step (``runner.ingest_frame``) and prints
the mean ingest and maintenance milliseconds per frame over consecutive blocks of frames,
so growth with the stream shows in one run. For policies that cluster (``mosaic``) it also
prints the part of ingest spent in ``ClusterBank.assign`` (all layers at once), the clusters per
layer and the clusters the nearest-cluster search ranked per token (``search_width``, mean
over layers): the cluster count grows with the stream, the search must not. For every policy
it prints the rows the store relocated per frame (``HostKVStore.move``: mosaic's sealing,
splits and compaction) with the milliseconds those moves took, and the kernel (system) CPU
time per frame, mostly first-touch page faults of new store pages. With ``--parts`` it then
prints where the last block's ingest and maintenance went: wall milliseconds per frame in each
named step (a step's time includes the steps it calls, e.g. ``_seal`` inside ``_ring_rows``),
with the minor page faults and kernel CPU milliseconds per frame of the stepping thread in it.

    .venv/bin/python scripts/ingest_growth.py --policy mosaic --shape qwen2.5-vl-3b --frames 1200
    .venv/bin/python scripts/ingest_growth.py --policy mosaic --shape qwen2.5-vl-7b --frames 120 \\
        --block 60 --parts
    .venv/bin/python scripts/ingest_growth.py --policy mosaic --shape qwen2.5-vl-7b --frames 240 \\
        --block 120 --parts --after rekv
"""

from __future__ import annotations

import argparse
import gc
import os
import resource
import statistics
import time

os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # as the benchmark CLI does

import torch

from mosaic_ros.runtime.bench.runner import ingest_frame
from mosaic_ros.runtime.bench.shapes import SHAPES
from mosaic_ros.runtime.bench.workloads import SyntheticSpec, SyntheticWorkload
from mosaic_ros.runtime.heap import freeze_startup_objects
from mosaic_ros.runtime.kv.clusters import ClusterBank
from mosaic_ros.runtime.kv.policies.base import StoreBackedPolicy
from mosaic_ros.runtime.kv.policies.mosaic import MosaicPolicy
from mosaic_ros.runtime.kv.policies.units import UnitMeans
from mosaic_ros.runtime.kv.policy import PolicyConfig, make_policy
from mosaic_ros.runtime.kv.store import HostKVStore


class AssignClock:
    """Wall time spent in ``ClusterBank.assign`` (all layers at once) and the search width of each
    call (mean over the layers)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.widths: list[float] = []
        inner = ClusterBank.assign
        clock = self

        def timed(bank, keys, token_ids, modality=None):
            t0 = time.perf_counter()
            out = inner(bank, keys, token_ids, modality)
            clock.seconds += time.perf_counter() - t0
            clock.widths.append(statistics.fmean(index.search_width for index in bank.layers))
            return out

        ClusterBank.assign = timed

    def take(self) -> tuple[float, float]:
        """(seconds, mean width) since the last take."""
        out = (self.seconds, statistics.fmean(self.widths) if self.widths else 0.0)
        self.seconds, self.widths = 0.0, []
        return out


class MoveClock:
    """Rows relocated by ``HostKVStore.move`` and the wall time of those moves."""

    def __init__(self) -> None:
        self.rows = 0
        self.seconds = 0.0
        inner = HostKVStore.move
        clock = self

        def timed(store, layer, token_ids, rows):
            t0 = time.perf_counter()
            inner(store, layer, token_ids, rows)
            clock.seconds += time.perf_counter() - t0
            clock.rows += int(rows.numel())

        HostKVStore.move = timed

    def take(self) -> tuple[int, float]:
        """(rows, seconds) since the last take."""
        out = (self.rows, self.seconds)
        self.rows, self.seconds = 0, 0.0
        return out


# (label, class, method): the steps --parts times; indented labels run inside the one above
PARTS = (
    ("ingest_context (window to the device)", StoreBackedPolicy, "ingest_context"),
    ("ClusterBank.assign", ClusterBank, "assign"),
    ("  scale sample", ClusterBank, "_scale_sample"),
    ("  join test", ClusterBank, "_join_existing"),
    ("  embedding", ClusterBank, "_embed_chunk"),
    ("  statistics", ClusterBank, "_add_stats"),
    ("  violators", ClusterBank, "_queue_violators"),
    ("  _chain", MosaicPolicy, "_chain"),
    ("ring rows (forced seals included)", MosaicPolicy, "_ring_rows"),
    ("  _seal", MosaicPolicy, "_seal"),
    ("chunk reordering", MosaicPolicy, "_reordered"),
    ("HostKVStore.place (new tokens written)", HostKVStore, "place"),
    ("HostKVStore.move (rows relocated)", HostKVStore, "move"),
    ("block means (UnitMeans.add)", UnitMeans, "add"),
    ("maintain", MosaicPolicy, "maintain"),
)


class PartClock:
    """Wall time, minor page faults and kernel CPU time of this thread per step of ``PARTS``,
    counted while ``on`` (the page reserve's worker faults pages in on its own thread)."""

    def __init__(self) -> None:
        self.on = False
        labels = [label for label, _, _ in PARTS]
        self.seconds = dict.fromkeys(labels, 0.0)
        self.faults = dict.fromkeys(labels, 0)
        self.system = dict.fromkeys(labels, 0.0)
        for label, cls, name in PARTS:
            self._wrap(label, cls, name)

    def _wrap(self, label: str, cls: type, name: str) -> None:
        inner = getattr(cls, name)
        clock = self

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            r0 = resource.getrusage(resource.RUSAGE_THREAD)
            try:
                return inner(*args, **kwargs)
            finally:
                if clock.on:
                    clock.seconds[label] += time.perf_counter() - t0
                    r1 = resource.getrusage(resource.RUSAGE_THREAD)
                    clock.faults[label] += r1.ru_minflt - r0.ru_minflt
                    clock.system[label] += r1.ru_stime - r0.ru_stime

        setattr(cls, name, timed)

    def report(self, frames: int) -> None:
        print(f"  {'step':42s} {'ms':>8s} {'faults':>8s} {'system ms':>10s}")
        for label, seconds in self.seconds.items():
            if seconds:
                faults, system = self.faults[label] / frames, self.system[label] * 1e3 / frames
                print(f"  {label:42s} {seconds * 1e3 / frames:8.2f} {faults:8.1f} {system:10.2f}")


class FullCollections:
    """The garbage collector's full (generation 2) passes while the stream runs: count and ms."""

    def __init__(self) -> None:
        self.ms: list[float] = []
        self._start = 0.0
        gc.callbacks.append(self._seen)

    def _seen(self, phase: str, info: dict) -> None:
        if info["generation"] != 2:
            return
        if phase == "start":
            self._start = time.perf_counter()
        else:
            self.ms.append((time.perf_counter() - self._start) * 1e3)


def _system_seconds() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_stime


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--policy", default="mosaic")
    ap.add_argument("--shape", default="qwen2.5-vl-3b", choices=sorted(SHAPES))
    ap.add_argument("--frames", type=int, default=1200)
    ap.add_argument("--block", type=int, default=100, help="frames per reported block")
    ap.add_argument("--budget", type=int, default=8192)
    ap.add_argument("--window", type=int, default=1024)
    ap.add_argument("--sinks", type=int, default=32)
    ap.add_argument("--maintain-ms", type=float, default=5.0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--spare-pages", type=int, default=None, help="the policy's spare_pages option")
    ap.add_argument("--sketch-dims", type=int, default=None, help="mosaic's sketch_dims option")
    ap.add_argument("--parts", action="store_true", help="time the named steps of the last block")
    ap.add_argument(
        "--after",
        default=None,
        help="first stream --after-frames frames into this policy in the same process and drop it, as "
        "a benchmark run with --no-isolate does before the next policy (which then writes into memory "
        "already faulted in)",
    )
    ap.add_argument("--after-frames", type=int, default=600)
    ap.add_argument(
        "--no-freeze",
        action="store_true",
        help="leave the startup objects to the garbage collector's full passes (heap.py), as before",
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    spec = SyntheticSpec(frames=args.frames, questions=1, seed=0, sink_tokens=args.sinks)
    work = SyntheticWorkload(SHAPES[args.shape], spec, torch.float16)
    options = {} if args.spare_pages is None else {"spare_pages": args.spare_pages}
    if args.sketch_dims is not None:
        options["sketch_dims"] = args.sketch_dims
    config = PolicyConfig(
        budget_tokens=args.budget, sink_tokens=args.sinks, window_tokens=args.window, options=options
    )
    if args.after:
        first_spec = SyntheticSpec(frames=args.after_frames, questions=1, seed=0, sink_tokens=args.sinks)
        first_work = SyntheticWorkload(SHAPES[args.shape], first_spec, torch.float16)
        first = make_policy(args.after, first_work.geometry, config, torch.device("cpu"))
        for i in range(first_work.num_chunks):
            ingest_frame(first, first_work.chunk(i), args.maintain_ms)
        del first, first_work
        gc.collect()
        print(f"after {args.after_frames} frames of {args.after} in this process")
    policy = make_policy(args.policy, work.geometry, config, torch.device("cpu"))
    if not args.no_freeze:
        freeze_startup_objects()
    clock = AssignClock()
    moves = MoveClock()
    full_gc = FullCollections()
    layers = getattr(policy, "_layers", [])
    ingest, maintain = [], []
    print(f"{args.policy} {args.shape}: block means per frame")
    print(
        " frame  ingest ms  max ms  maintain ms  assign ms  clusters/layer  search width"
        "  moved rows  move ms  system ms"
    )
    parts = PartClock() if args.parts else None
    last_block = (work.num_chunks - 1) // args.block * args.block - args.block + 1  # first frame of it
    system = _system_seconds()
    for i in range(work.num_chunks):
        chunk = work.chunk(i)
        if parts is not None:
            parts.on = i >= last_block
        frame_ingest, frame_maintain = ingest_frame(policy, chunk, args.maintain_ms)
        if i == 0:  # chunk 0 is the sink preamble
            clock.take()
            moves.take()
            system = _system_seconds()
            continue
        ingest.append(frame_ingest)
        maintain.append(frame_maintain)
        if i % args.block == 0:
            assign_s, width = clock.take()
            moved, move_s = moves.take()
            now = _system_seconds()
            n = len(ingest)
            clusters = statistics.fmean(st.index.num_clusters for st in layers) if layers else 0.0
            print(
                f"{i:6d} {statistics.fmean(ingest):10.1f} {max(ingest):7.1f}"
                f" {statistics.fmean(maintain):12.1f}"
                f" {assign_s * 1e3 / n:10.1f} {clusters:15.0f} {width:13.1f}"
                f" {moved / n:11.0f} {move_s * 1e3 / n:8.1f} {(now - system) * 1e3 / n:10.1f}",
                flush=True,
            )
            system = now
            ingest, maintain = [], []
    if parts is not None:
        print(f"ms per frame in each step, frames {last_block}-{last_block + args.block - 1}:")
        parts.report(args.block)
    if full_gc.ms:
        print(
            f"full GC passes while streaming: {len(full_gc.ms)}, {sum(full_gc.ms):.1f} ms in all, "
            f"longest {max(full_gc.ms):.1f} ms"
        )
    reserve = getattr(getattr(policy, "store", None), "page_reserve", None)
    if reserve is not None:
        print(
            f"page reserve (spare {reserve.spare}): {reserve.ready_taken} pages taken ready, "
            f"{reserve.cold} allocated on the frame's path, {reserve.given} given back"
        )


if __name__ == "__main__":
    main()
