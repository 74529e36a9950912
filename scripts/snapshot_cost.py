"""What snapshots of a stream's memory cost, at a real model's KV shape, without a model.

Streams the benchmark's synthetic KV (``--shape``, random values at the model's real sizes)
into a policy frame by frame, takes an incremental snapshot (``runtime.snapshot``, the code
``StreamSession.save`` runs) every ``--every`` frames into ``--dir``, and prints per frame:
the milliseconds the stream's lock would be held to copy the new KV (``capture``), the
milliseconds spent writing and fsyncing the files afterwards, off the frame path (``write``),
and the megabytes written. Then it drops the policy and restores the last snapshot into a fresh
one (verify every file's sha256, read, replay through ``add_tokens``/``append``/``maintain``),
timed. The directory is emptied first and left behind for inspection.

    .venv/bin/python scripts/snapshot_cost.py --shape qwen2.5-vl-7b --frames 600 --every 10 \
        --policy window --dir build/snapshot-bench
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path

import torch

from mosaic_ros.runtime.bench.runner import ingest_frame
from mosaic_ros.runtime.bench.shapes import SHAPES
from mosaic_ros.runtime.bench.workloads import SyntheticSpec, SyntheticWorkload
from mosaic_ros.runtime.kv.policy import PolicyConfig, make_policy
from mosaic_ros.runtime.snapshot import SnapshotDir, capture, replay, write


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="qwen2.5-vl-7b", choices=sorted(SHAPES))
    p.add_argument("--frames", type=int, default=600)
    p.add_argument("--every", type=int, default=10, help="frames between snapshots")
    p.add_argument("--policy", default="dense")
    p.add_argument("--budget", type=int, default=8192, help="device budget per layer, tokens")
    p.add_argument("--dir", required=True, help="snapshot directory (emptied first)")
    args = p.parse_args()
    directory = Path(args.dir)
    shutil.rmtree(directory, ignore_errors=True)
    workload = SyntheticWorkload(SHAPES[args.shape], SyntheticSpec(frames=args.frames))
    geometry = workload.geometry
    config = PolicyConfig(
        budget_tokens=args.budget, sink_tokens=workload.spec.sink_tokens, window_tokens=1024
    )
    identity = {"bench_shape": args.shape, "policy": args.policy}
    policy = make_policy(args.policy, geometry, config)
    chunks: list[tuple[int, int]] = []
    lineage = None
    capture_ms, write_ms, written = [], [], []
    for i in range(workload.num_chunks):
        chunk = workload.chunk(i)
        first = policy.store.num_tokens
        ingest_frame(policy, chunk, 5.0)
        chunks.append((first, chunk.meta.num_tokens))
        if i and (i % args.every == 0 or i == workload.num_chunks - 1):
            t0 = time.perf_counter()
            cap = capture(policy, chunks, {"frames": i}, identity, str(directory), lineage)
            t1 = time.perf_counter()
            bytes_written, _ = write(cap)
            t2 = time.perf_counter()
            lineage = cap.lineage
            capture_ms.append((t1 - t0) * 1e3)
            write_ms.append((t2 - t1) * 1e3)
            written.append(bytes_written)
    tokens = int(policy.memory().tokens)
    del policy
    frames = workload.num_chunks - 1
    fresh = make_policy(args.policy, geometry, config)

    def store(meta, kv):
        ids = fresh.add_tokens(meta)
        for layer, data in enumerate(kv):
            fresh.append(layer, data[:, 0], data[:, 1], ids)
        return ids

    t0 = time.perf_counter()
    seq, manifest, _refused = SnapshotDir(directory).newest_complete(identity)
    t1 = time.perf_counter()
    replay(SnapshotDir(directory), manifest, store, lambda: fresh.maintain(5.0))
    t2 = time.perf_counter()
    assert int(fresh.memory().tokens) == tokens, (fresh.memory().tokens, tokens)
    mb = 2**20
    report = {
        "shape": args.shape,
        "policy": args.policy,
        "frames": frames,
        "snapshot_every_frames": args.every,
        "snapshots": len(written),
        "tokens": tokens,
        "kv_bytes_per_token": geometry.bytes_per_token,
        "capture_ms_per_frame": sum(capture_ms) / frames,
        "write_ms_per_frame": sum(write_ms) / frames,
        "capture_ms_per_snapshot_median": statistics.median(capture_ms),
        "capture_ms_per_snapshot_p90": statistics.quantiles(capture_ms, n=10)[-1],
        "capture_ms_per_snapshot_max": max(capture_ms),
        "write_ms_per_snapshot_median": statistics.median(write_ms),
        "write_ms_per_snapshot_max": max(write_ms),
        "mb_written_per_frame": sum(written) / mb / frames,
        "snapshot_mb": sum(int(e["bytes"]) for e in manifest["segments"]) / mb,
        "restore_verify_ms": (t1 - t0) * 1e3,
        "restore_replay_ms": (t2 - t1) * 1e3,
        "restore_total_s": (t2 - t0),
        "last_seq": seq,
        "torch": torch.__version__,
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
