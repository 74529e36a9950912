"""The CUDA checks in one run (``scripts/gpu_check``), sized for under 8 minutes on one H100/H200.

Parts, in order; each records what it ran, or why it did not, in one JSON document:

- ``cuda_tests``: ``pytest -m cuda`` (``test/test_cuda.py``: pinned pages and side-stream
  copies, every policy on the device, the Triton kernels, a stream session). On a GPU every one
  must pass and none may be skipped. Without a GPU it only collects them (how many need one).
- ``kernels``: attention over 8,192 context tokens and centroid scoring of 2,048 clusters at
  the 7B shape (28 query / 4 KV heads, head_dim 128, 24 question tokens), fp16 and bf16: the
  torch path's time on this device, and on CUDA the Triton kernel's time and its largest
  absolute difference from the torch path (times: median of ``repeats`` runs, ms; CUDA events).
- ``bandwidth`` (CUDA only): 28 layers' fetches of 7,136 tokens each as runs of 32-512 rows
  from a pinned host store into device buffers, against one contiguous pinned copy per layer
  of the same bytes in the same run (GB/s; also a pageable contiguous copy).
- ``bench``: ``mosaic-ros-bench`` at the 7B shape on CUDA with prefetch on and off (``--wall-pass``:
  each question also timed end to end, so copies hidden behind attention show as
  select + transfer + attention - wall); without a GPU the same two runs at the tiny shape on
  the CPU (with mosaic's CPU prefetch), which checks the plumbing, not the speed.

Exit status: 0 every part ran and passed on a GPU; 1 a part failed; 3 no CUDA device: the
CPU-side parts ran and passed and the CUDA parts were refused (``needs_gpu`` in the JSON);
2 bad arguments.
With a GPU, the results also replace the section between ``DOCS_BEGIN`` and ``DOCS_END`` in
``--docs`` (default docs/BENCHMARKS.md), headed with the GPU's name.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from mosaic_ros.runtime.bench.report import machine, now, write_json
from mosaic_ros.runtime.bench.runner import measure_memcpy_gbps
from mosaic_ros.runtime.bench.shapes import SHAPES
from mosaic_ros.runtime.kv import kernels
from mosaic_ros.runtime.kv.policy import TokenMeta
from mosaic_ros.runtime.kv.store import DeviceBuffer, HostKVStore

ROOT = Path(__file__).resolve().parents[3]
DOCS_BEGIN = "<!-- gpu_check: begin (written by scripts/gpu_check) -->"
DOCS_END = "<!-- gpu_check: end -->"
EXIT_OK, EXIT_FAILED, EXIT_NO_GPU = 0, 1, 3  # 2 is argparse's usage error
NEEDS_GPU = "needs_gpu"
# where the JSON goes by default: with a GPU next to the docs section it feeds; without one
# under the ignored build/ folder, so a CPU run leaves the committed figures alone
GPU_JSON, CPU_JSON = Path("docs/bench/gpu-check.json"), Path("build/gpu-check.json")

SHAPE = SHAPES["qwen2.5-vl-7b"]
QUESTION_TOKENS = 24
CONTEXT_TOKENS = 8192
CLUSTERS = 2048
FETCH_TOKENS = 7136  # a budget of 8,192 less 32 sinks and the 1,024-token local window
KERNEL_TOLERANCE = {"float16": 2e-3, "bfloat16": 1e-2}


def _timed(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Median ms of ``fn`` over ``repeats`` runs after one warm-up (CUDA events on CUDA)."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def check_kernels(device: torch.device, repeats: int) -> dict:
    """Torch path (and on CUDA the Triton kernels) at the 7B shape; see the module docstring."""
    gen = torch.Generator(device=device).manual_seed(0)
    hq, hkv, d = SHAPE.num_q_heads, SHAPE.num_kv_heads, SHAPE.head_dim
    rows = []
    for name, dtype in (("float16", torch.float16), ("bfloat16", torch.bfloat16)):
        q = torch.randn(hq, QUESTION_TOKENS, d, device=device, generator=gen).to(dtype)
        k = torch.randn(hkv, CONTEXT_TOKENS, d, device=device, generator=gen).to(dtype)
        v = torch.randn(hkv, CONTEXT_TOKENS, d, device=device, generator=gen).to(dtype)
        cen = torch.randn(CLUSTERS, hkv, d, device=device, generator=gen).to(dtype)
        counts = torch.randint(1, 200, (CLUSTERS,), device=device, generator=gen)
        ops = {
            "attention": lambda backend, q=q, k=k, v=v: kernels.attention(
                q, k, v, return_lse=True, backend=backend
            )[0],
            "centroid_scores": lambda backend, q=q, cen=cen, counts=counts: kernels.centroid_scores(
                q, cen, counts, backend=backend
            ),
        }
        for op, run in ops.items():
            row = {"op": op, "dtype": name, "torch_ms": _timed(lambda run=run: run("torch"), device, repeats)}
            if device.type == "cuda":
                row["triton_ms"] = _timed(lambda run=run: run("triton"), device, repeats)
                row["speedup"] = row["torch_ms"] / row["triton_ms"]
                ref, got = run("torch").float(), run("triton").float()
                finite = torch.isfinite(ref)
                row["max_abs_err"] = float((ref[finite] - got[finite]).abs().max())
                row["ok"] = bool(torch.equal(finite, torch.isfinite(got))) and (
                    row["max_abs_err"] <= KERNEL_TOLERANCE[name]
                )
            rows.append(row)
    result = {
        "shape": {"q_heads": hq, "kv_heads": hkv, "head_dim": d, "question_tokens": QUESTION_TOKENS},
        "context_tokens": CONTEXT_TOKENS,
        "clusters": CLUSTERS,
        "device": str(device),
        "rows": rows,
    }
    if device.type != "cuda":
        result["triton"] = NEEDS_GPU
    return result


def _run_selection(total: int, want: int, gen: torch.Generator) -> torch.Tensor:
    """Sorted unique rows in [0, total): runs of 32-512 rows at random offsets, ``want`` in all."""
    chosen = torch.zeros(total, dtype=torch.bool)
    while int(chosen.sum()) < want:
        length = int(torch.randint(32, 513, (1,), generator=gen))
        start = int(torch.randint(0, total - length, (1,), generator=gen))
        chosen[start : start + length] = True
    rows = chosen.nonzero()[:, 0]
    return rows[:want]


def check_bandwidth(device: torch.device, stream_tokens: int = 3 * 8192) -> dict:
    """Pinned store fetches against contiguous copies of the same bytes (CUDA only)."""
    geometry = SHAPE.geometry(torch.float16)
    store = HostKVStore(geometry, page_rows=8192, pin=True)
    chunk = 4096
    for start in range(0, stream_tokens, chunk):
        meta = TokenMeta(
            positions=torch.arange(start, start + chunk)[None],
            stamps=torch.zeros(chunk, dtype=torch.float64),
            modality=torch.ones(chunk, dtype=torch.uint8),
            frame=torch.full((chunk,), start // chunk, dtype=torch.int64),
        )
        ids = store.add_tokens(meta)
        kv = torch.randn(chunk, geometry.num_kv_heads, geometry.head_dim).half()
        for layer in range(geometry.num_layers):
            store.append(layer, ids, kv, kv)
    gen = torch.Generator().manual_seed(0)
    selections = [_run_selection(stream_tokens, FETCH_TOKENS, gen) for _ in range(geometry.num_layers)]
    buffers = [DeviceBuffer(geometry, FETCH_TOKENS, device) for _ in range(geometry.num_layers)]
    best, copies = math.inf, 0
    for _ in range(3):
        for buf in buffers:
            buf.invalidate()
        torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        copies = 0
        for layer, (rows, buf) in enumerate(zip(selections, buffers, strict=True)):
            copies += store.fetch(layer, store.rows_of(layer, rows), buf).copies
        torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - t0)
    nbytes = FETCH_TOKENS * 2 * geometry.token_row_bytes
    fetch_gbps = nbytes * geometry.num_layers / best / 1e9
    pinned = measure_memcpy_gbps(nbytes, geometry.num_layers, device, distinct=True)
    pageable = _pageable_gbps(nbytes, geometry.num_layers, device)
    return {
        "layers": geometry.num_layers,
        "bytes_per_layer": nbytes,
        "copies_per_fetch_of_all_layers": copies,
        "fetch_gbps": fetch_gbps,
        "contiguous_pinned_gbps": pinned,
        "contiguous_pageable_gbps": pageable,
        "fetch_vs_contiguous_pinned": fetch_gbps / pinned,
    }


def _pageable_gbps(nbytes: int, repeats: int, device: torch.device) -> float:
    src = [torch.ones(nbytes, dtype=torch.uint8) for _ in range(repeats)]
    dst = [torch.empty(nbytes, dtype=torch.uint8, device=device) for _ in range(repeats)]
    best = math.inf
    for _ in range(3):
        torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        for s, d in zip(src, dst, strict=True):
            d.copy_(s)
        torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return nbytes * repeats / best / 1e9


def bench_args(on_gpu: bool, frames: int, questions: int) -> list[str]:
    """The bench command line (without the prefetch flag and output path) for this machine."""
    if on_gpu:
        return [
            *("--shape", "qwen2.5-vl-7b", "--device", "cuda", "--frames", str(frames)),
            *("--questions", str(questions), "--budget", "8192"),
            *("--policies", "dense,token_topk,rekv,mosaic", "--wall-pass", "--no-progress"),
        ]
    # a maintenance budget no frame uses up, so both runs keep the same clusters (time-boxed
    # maintenance depends on the machine's speed) and differ only by the prefetch
    return [
        *("--shape", "tiny", "--frames", "12", "--questions", "2", "--budget", "96"),
        *("--sinks", "4", "--window", "16", "--policies", "rekv,mosaic", "--maintain-ms", "10000"),
        *("--option", "mosaic.cpu_prefetch=1", "--wall-pass", "--no-progress"),
    ]


def check_bench(on_gpu: bool, frames: int, questions: int, workdir: Path) -> dict:
    """The bench with prefetch on and off; per policy hit rate, total, wall and hidden ms."""
    from mosaic_ros.cli.bench import main as bench_main

    base = bench_args(on_gpu, frames, questions)
    runs = {}
    for label, extra in (("prefetch_on", []), ("prefetch_off", ["--no-prefetch"])):
        out = workdir / f"bench-{label}.json"
        args = [*base, *extra, "--json", str(out)]
        rc = bench_main(args)
        if rc != 0:
            raise RuntimeError(f"mosaic-ros-bench {' '.join(args)} exited with {rc}")
        doc = json.loads(out.read_text())
        runs[label] = {
            "command": doc["command"],
            "wall_s": doc["wall_s"],
            "memcpy_gbps": doc["memcpy_gbps"],
            "policies": {
                name: {
                    "total_ms": r["total_ms"],
                    "transfer_ms": r["transfer_ms"],
                    "attn_ms": r["attn_ms"],
                    "wall_ms": r["wall_ms"],
                    "hidden_ms": max(0.0, r["wall_select_transfer_ms"] + r["attn_ms"] - r["wall_ms"]),
                    "prefetch_hit_rate": r["prefetch_hit_rate"],
                    "prefetch_lookups": r["prefetch_lookups"],
                    "transfer_gbps": r["transfer_gbps"],
                    "recall": r["recall"],
                }
                for name, r in doc["policies"].items()
            },
        }
    result = {"device": "cuda" if on_gpu else "cpu", "runs": runs}
    if not on_gpu:
        result["cuda"] = NEEDS_GPU
    return result


def check_cuda_tests(on_gpu: bool) -> dict:
    """Run (on a GPU) or collect (without one) the ``cuda``-marked tests."""
    cmd = [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-rs", "-p", "no:cacheprovider"]
    if not on_gpu:
        cmd.append("--collect-only")
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=400)
    lines = [line for line in proc.stdout.strip().splitlines() if line.strip()]
    summary = lines[-1] if lines else proc.stderr.strip()[-400:]
    result = {"command": " ".join(["python", *cmd[1:]]), "returncode": proc.returncode, "summary": summary}
    if on_gpu:
        result["ok"] = proc.returncode == 0 and "skipped" not in summary
        if not result["ok"]:
            result["output_tail"] = proc.stdout[-4000:]
    else:
        result["collected"] = sum(1 for line in lines if "::" in line)
        result["ok"] = proc.returncode == 0 and result["collected"] > 0
        result["run"] = NEEDS_GPU
    return result


def docs_section(doc: dict) -> str:
    """Markdown for the GPU section of docs/BENCHMARKS.md."""
    parts = doc["parts"]
    lines = [
        DOCS_BEGIN,
        f"## GPU check: {doc['machine'].get('gpu', '?')}",
        "",
        f"`{doc['command']}` on {doc['date']} (torch {doc['machine']['torch']}); JSON: `{doc['json']}`.",
        "",
        f"CUDA tests: {parts['cuda_tests']['summary']}",
        "",
        "| kernel | dtype | torch ms | triton ms | speedup | max abs err |",
        "|---|---|---|---|---|---|",
    ]
    for r in parts["kernels"]["rows"]:
        lines.append(
            f"| {r['op']} | {r['dtype']} | {r['torch_ms']:.3f} | {r['triton_ms']:.3f} | "
            f"{r['speedup']:.2f}× | {r['max_abs_err']:.1e} |"
        )
    bw = parts["bandwidth"]
    lines += [
        "",
        f"Host to device, {bw['layers']} layers × {bw['bytes_per_layer'] / 2**20:.1f} MiB: store fetch "
        f"(runs of 32-512 rows, pinned pages, {bw['copies_per_fetch_of_all_layers']} copies) "
        f"**{bw['fetch_gbps']:.1f} GB/s**, contiguous pinned copy {bw['contiguous_pinned_gbps']:.1f} GB/s "
        f"({bw['fetch_vs_contiguous_pinned']:.0%}), pageable {bw['contiguous_pageable_gbps']:.1f} GB/s.",
        "",
        "| run | policy | total ms | transfer ms | attn ms | wall ms | hidden ms | hit rate | recall |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for label, run in parts["bench"]["runs"].items():
        for name, r in run["policies"].items():
            lines.append(
                f"| {label} | {name} | {r['total_ms']:.1f} | {r['transfer_ms']:.1f} | {r['attn_ms']:.1f} | "
                f"{r['wall_ms']:.1f} | {r['hidden_ms']:.1f} | {r['prefetch_hit_rate']:.2f} | "
                f"{r['recall']:.3f} |"
            )
    commands = "\n".join(run["command"] for run in parts["bench"]["runs"].values())
    lines += ["", "```", commands, "```", "", DOCS_END]
    return "\n".join(lines)


def write_docs(path: Path, section: str) -> None:
    """Replace the marked GPU section of ``path`` (append it when there is none)."""
    text = path.read_text()
    if DOCS_BEGIN in text and DOCS_END in text:
        head, rest = text.split(DOCS_BEGIN, 1)
        tail = rest.split(DOCS_END, 1)[1]
        text = head + section + tail
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.write_text(text)


def run(
    json_path: Path, docs_path: Path, frames: int, questions: int, repeats: int, command: str
) -> tuple[int, dict]:
    """All parts; returns (exit status, the JSON document). Prints what ran and what needs a GPU."""
    on_gpu = torch.cuda.is_available()
    device = torch.device("cuda" if on_gpu else "cpu")
    doc: dict = {"command": command, "date": now(), "json": str(json_path), "gpu": on_gpu}
    doc["machine"] = machine(str(device))
    parts: dict[str, dict] = {}
    doc["parts"] = parts
    with tempfile.TemporaryDirectory() as tmp:
        steps: list[tuple[str, Callable[[], dict]]] = [
            ("cuda_tests", lambda: check_cuda_tests(on_gpu)),
            ("kernels", lambda: check_kernels(device, repeats)),
            ("bandwidth", lambda: check_bandwidth(device)),
            ("bench", lambda: check_bench(on_gpu, frames, questions, Path(tmp))),
        ]
        for name, step in steps:
            if name == "bandwidth" and not on_gpu:
                parts[name] = {"status": NEEDS_GPU}
                print(f"gpu_check: {name}: refused, needs a CUDA device (pinned host-to-device copies)")
                continue
            t0 = time.perf_counter()
            try:
                result = step()
                result["status"] = "ok" if result.get("ok", True) else "failed"
            except Exception as error:  # a part's failure is reported, the others still run
                result = {"status": "failed", "error": f"{type(error).__name__}: {error}"}
            result["seconds"] = time.perf_counter() - t0
            parts[name] = result
            gpu_note = "" if on_gpu else " (CPU side only; the CUDA side needs a GPU)"
            print(f"gpu_check: {name}: {result['status']} in {result['seconds']:.1f} s{gpu_note}")
    write_json(doc, json_path)
    failed = [n for n, p in parts.items() if p["status"] == "failed"]
    if failed:
        print(f"gpu_check: FAILED: {', '.join(failed)} (details in {json_path})")
        return EXIT_FAILED, doc
    if not on_gpu:
        refused = [n for n, p in parts.items() if p["status"] == NEEDS_GPU or NEEDS_GPU in p.values()]
        print(
            "gpu_check: no CUDA device: ran the CPU-side parts; refused the CUDA parts "
            f"({', '.join(refused)}): run this on a GPU machine. Docs left unchanged. Exit status 3."
        )
        return EXIT_NO_GPU, doc
    write_docs(docs_path, docs_section(doc))
    print(f"gpu_check: all parts passed on {doc['machine']['gpu']}; wrote {json_path} and {docs_path}")
    return EXIT_OK, doc


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="scripts/gpu_check", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--json",
        dest="json_path",
        type=Path,
        help=f"JSON output (default: {GPU_JSON} with a GPU, {CPU_JSON} without)",
    )
    p.add_argument("--docs", default="docs/BENCHMARKS.md", help="markdown file whose GPU section is replaced")
    p.add_argument("--frames", type=int, default=300, help="frames of the 7B bench stream (GPU)")
    p.add_argument("--questions", type=int, default=8, help="questions of the 7B bench (GPU)")
    p.add_argument("--repeats", type=int, default=20, help="timed runs per kernel (median)")
    args = p.parse_args(argv)
    given = sys.argv[1:] if argv is None else argv
    command = " ".join(["scripts/gpu_check", *given])
    os.chdir(ROOT)
    json_path = args.json_path or (GPU_JSON if torch.cuda.is_available() else CPU_JSON)
    rc, _ = run(json_path, Path(args.docs), args.frames, args.questions, args.repeats, command)
    return rc


if __name__ == "__main__":
    sys.exit(main())
