"""What the disk tier costs a question, at a real model's KV shape, without a model.

Streams the benchmark's synthetic KV (``--shape``, random values at the model's real sizes)
into a policy whose host KV is capped at ``--host-cap-mb`` with a disk tier in ``--dir``
(``--frames`` defaults to three times what the cap holds), and the same stream into the same
policy with no cap (everything in host memory, the reference). Then it asks the workload's
questions of both, and prints per question: the disk run's disk fetch (ms, MB read) next to
its host fetch (``transfer_ms``, host -> device copies of what is in memory and of what came
from disk) and the reference's host fetch, with host KV against the cap and tokens dropped.
Before each question of the disk run the page cache of its files is dropped (``fdatasync``,
then ``posix_fadvise(DONTNEED)``), so every disk read reaches the disk. The directory is made
if missing; the store removes its files at the end.

    .venv/bin/python scripts/disk_tier.py --shape qwen2.5-vl-7b --host-cap-mb 1024 \
        --policy rekv --dir build/disk-bench
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import torch

from mosaic_ros.runtime.bench.runner import ingest_frame
from mosaic_ros.runtime.bench.shapes import SHAPES
from mosaic_ros.runtime.bench.workloads import SyntheticSpec, SyntheticWorkload
from mosaic_ros.runtime.kv.policy import PolicyConfig, make_policy

MB = 2**20


def drop_page_cache(directory: str) -> None:
    """Write back and drop the page cache of every file under ``directory`` (a cold disk)."""
    for name in os.listdir(directory):
        path = os.path.join(directory, name)
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def ask(policy, question) -> tuple[object, float]:
    """Every layer's retrieval for ``question``; returns (``RetrievalStats``, wall ms)."""
    t0 = time.perf_counter()
    policy.begin_question(question.window)
    for layer, query in enumerate(question.queries):
        policy.retrieve(layer, query)
    stats = policy.end_question()
    return stats, (time.perf_counter() - t0) * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="qwen2.5-vl-7b", choices=sorted(SHAPES))
    p.add_argument("--host-cap-mb", type=float, default=1024.0, help="host KV cap of the disk run, MiB")
    p.add_argument("--disk-cap-mb", type=float, default=0.0, help="disk cap, MiB (0: what the stream needs)")
    p.add_argument("--frames", type=int, default=0, help="frames streamed (0: three times the host cap)")
    p.add_argument("--policy", default="rekv")
    p.add_argument("--budget", type=int, default=8192, help="device budget per layer, tokens")
    p.add_argument("--questions", type=int, default=8)
    p.add_argument("--dir", required=True, help="directory of the disk tier's files")
    args = p.parse_args()
    shape = SHAPES[args.shape]
    geometry = shape.geometry(torch.float16)
    host_cap = int(args.host_cap_mb * MB)
    cap_tokens = host_cap // geometry.bytes_per_token
    frames = args.frames or math.ceil(3 * cap_tokens / shape.tokens_per_frame)
    workload = SyntheticWorkload(shape, SyntheticSpec(frames=frames, questions=args.questions))
    stream_bytes = workload.total_tokens * geometry.bytes_per_token
    disk_cap = int(args.disk_cap_mb * MB) or 2 * stream_bytes
    Path(args.dir).mkdir(parents=True, exist_ok=True)
    base = dict(budget_tokens=args.budget, sink_tokens=workload.spec.sink_tokens, window_tokens=1024)
    disk = make_policy(
        args.policy,
        geometry,
        PolicyConfig(**base, host_cap_bytes=host_cap, disk_cap_bytes=disk_cap, disk_dir=args.dir),
    )
    ram = make_policy(args.policy, geometry, PolicyConfig(**base))
    ingest = {"disk": 0.0, "ram": 0.0}
    over_cap = 0
    for i in range(workload.num_chunks):
        chunk = workload.chunk(i)
        for name, policy in (("disk", disk), ("ram", ram)):
            ms, maintain_ms = ingest_frame(policy, chunk, 5.0)
            ingest[name] += ms + maintain_ms
        over_cap += disk.memory().host_kv_bytes > host_cap
    rows = []
    for j, question in enumerate(workload.questions()):
        drop_page_cache(disk.store.pool.files.path)
        stats, disk_wall = ask(disk, question)
        ref, ram_wall = ask(ram, question)
        mem = disk.memory()
        rows.append(
            {
                "question": j,
                "disk_fetch_ms": stats.disk_fetch_ms,
                "disk_mb_read": stats.disk_bytes_read / MB,
                "host_fetch_ms": stats.transfer_ms,
                "select_ms": stats.select_ms,
                "retrieval_wall_ms": disk_wall,
                "mb_to_device": stats.bytes_moved / MB,
                "ram_host_fetch_ms": ref.transfer_ms,
                "ram_select_ms": ref.select_ms,
                "ram_retrieval_wall_ms": ram_wall,
                "ram_mb_to_device": ref.bytes_moved / MB,
                "host_kv_mb": mem.host_kv_bytes / MB,
                "disk_kv_mb": mem.disk_kv_bytes / MB,
                "tokens_in_memory": mem.tokens,
                "tokens_evicted": mem.tokens_evicted,
            }
        )
    store = disk.store
    report = {
        "shape": args.shape,
        "policy": args.policy,
        "frames": frames,
        "tokens": workload.total_tokens,
        "stream_mb": stream_bytes / MB,
        "host_cap_mb": host_cap / MB,
        "disk_cap_mb": disk_cap / MB,
        "page_rows": disk.page_rows,
        "pages_in_memory_max": disk.resident_pages,
        "frames_over_host_cap": over_cap,
        "ingest_ms_per_frame_disk": ingest["disk"] / workload.num_chunks,
        "ingest_ms_per_frame_ram": ingest["ram"] / workload.num_chunks,
        "spill_write_ms_per_frame": store.disk_write_ms / workload.num_chunks,
        "pages_spilled": store.pool.pages_spilled,
        "pages_read_back": store.pool.pages_restored,
        "questions": rows,
        "torch": torch.__version__,
    }
    disk.close()
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
