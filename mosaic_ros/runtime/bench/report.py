"""Benchmark output: machine description, the text table, the JSON document and the plot."""

from __future__ import annotations

import json
import os
import platform
from datetime import UTC, datetime
from pathlib import Path

import torch

FIELDS = (
    "select_ms",
    "transfer_ms",
    "attn_ms",
    "total_ms",
    "copies",
    "bytes_moved",
    "transfer_gbps",
    "copy_ms",
    "copy_gbps",
    "recall",
    "out_rel_err",
    "device_kv_bytes_peak",
    "host_kv_bytes",
    "ingest_ms_per_frame",
    "ingest_ms_median",
    "ingest_ms_p99",
    "ingest_ms_max",
    "maintain_ms_per_frame",
)


def machine(device: str) -> dict:
    """CPU model, cores, RAM, torch version and threads; the GPU name on CUDA."""
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    ram = 0
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal"):
                    ram = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "ram_bytes": ram,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "device": device,
        "python": platform.python_version(),
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _ratio(r: dict, key: str) -> str:
    return f"{r[key]:.2f}x" if key in r else "-"


MB = 2**20
COLUMNS = (
    ("select", 8, lambda r: f"{r['select_ms']:.1f}"),
    ("transfer", 9, lambda r: f"{r['transfer_ms']:.1f}"),
    ("attn", 8, lambda r: f"{r['attn_ms']:.1f}"),
    ("total", 8, lambda r: f"{r['total_ms']:.1f}"),
    ("vs topk", 8, lambda r: _ratio(r, "speedup_vs_token_topk")),
    ("vs rekv", 8, lambda r: _ratio(r, "speedup_vs_rekv")),
    ("copies", 7, lambda r: f"{r['copies']:.0f}"),
    ("MB/q", 8, lambda r: f"{r['bytes_moved'] / MB:.1f}"),
    ("GB/s", 6, lambda r: f"{r['transfer_gbps']:.1f}"),
    ("copy GB/s", 9, lambda r: f"{r.get('copy_gbps', 0.0):.1f}"),
    ("recall", 7, lambda r: f"{r['recall']:.3f}"),
    ("out err", 8, lambda r: f"{r['out_rel_err']:.4f}"),
    ("dev MB", 8, lambda r: f"{r['device_kv_bytes_peak'] / MB:.0f}"),
    ("host MB", 8, lambda r: f"{r['host_kv_bytes'] / MB:.0f}"),
    ("ingest/f", 9, lambda r: f"{r['ingest_ms_per_frame']:.2f}"),
    ("maint/f", 8, lambda r: f"{r['maintain_ms_per_frame']:.2f}"),
)


def table(doc: dict) -> str:
    """A fixed-width text table of the per-policy results (per question, all layers, medians)."""
    head = f"{'policy':<11}" + "".join(f" {name:>{width}}" for name, width, _ in COLUMNS)
    lines = [head, "-" * len(head)]
    for name, r in doc["policies"].items():
        lines.append(f"{name:<11}" + "".join(f" {fmt(r):>{width}}" for _, width, fmt in COLUMNS))
    mc = doc["memcpy"]
    lines.append(
        "ms per question (all layers, median); MB/q and copies per question; ingest/maint ms per frame; "
        f"contiguous copy of {mc['bytes_per_copy'] / MB:.1f} MB x{mc['copies']}: {mc['gbps']:.1f} GB/s "
        f"repeated (cache-warm), {mc.get('cold_gbps', float('nan')):.1f} GB/s distinct cold buffers"
    )
    return "\n".join(lines)


def write_json(doc: dict, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(doc, indent=2) + "\n")


def plot(doc: dict, path: str | Path) -> None:
    """Two panels: per-question latency split (select / transfer / attention) and recall per policy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(doc["policies"])
    res = [doc["policies"][n] for n in names]
    fig, (ax_t, ax_r) = plt.subplots(1, 2, figsize=(11, 4.2))
    bottom = [0.0] * len(names)
    for key, color in (("select_ms", "#4C72B0"), ("transfer_ms", "#DD8452"), ("attn_ms", "#55A868")):
        vals = [r[key] for r in res]
        ax_t.bar(names, vals, bottom=bottom, color=color, label=key.removesuffix("_ms"))
        bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
    ax_t.set_ylabel("ms per question (all layers, median)")
    ax_t.set_title("Where the time goes")
    ax_t.legend()
    recall = [r["recall"] for r in res]
    bars = ax_r.bar(names, recall, color="#8172B3")
    for bar, r in zip(bars, res, strict=True):
        ax_r.text(
            bar.get_x() + bar.get_width() / 2,
            bar.get_height(),
            f"err {r['out_rel_err']:.3f}",
            ha="center",
            va="bottom",
            fontsize=8,
        )
    ax_r.set_ylim(0, 1.1)
    ax_r.set_ylabel("share of dense attention mass kept")
    ax_r.set_title("Recall (label: attention output rel. error)")
    run = doc.get("run", {})
    fig.suptitle(
        f"{run.get('shape', '')}, {run.get('workload', '')}, {run.get('frames', '')} frames, "
        f"budget {run.get('budget', '')} tokens, {doc.get('machine', {}).get('device', '')}",
        fontsize=10,
    )
    for ax in (ax_t, ax_r):
        ax.tick_params(axis="x", rotation=20)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


NEEDLE_COLUMNS = (
    (
        "accuracy [95% CI]",
        19,
        lambda r: f"{r['accuracy']:.3f} [{r['accuracy_ci95'][0]:.2f},{r['accuracy_ci95'][1]:.2f}]",
    ),
    (
        "choice [95% CI]",
        19,
        lambda r: (
            "n/a (no choices)"
            if r["choice_accuracy"] is None
            else f"{r['choice_accuracy']:.3f} [{r['choice_ci95'][0]:.2f},{r['choice_ci95'][1]:.2f}]"
        ),
    ),
    ("=dense", 7, lambda r: f"{r['dense_agreement']:.3f}"),
    ("top1", 6, lambda r: f"{r['top1_agreement']:.3f}"),
    ("KL", 6, lambda r: f"{r['kl_vs_dense']:.3f}"),
    ("recall", 7, lambda r: f"{r['recall']:.3f}"),
    ("out err", 8, lambda r: f"{r['out_rel_err']:.4f}"),
    ("answer ms", 9, lambda r: f"{r['answer_ms']:.0f}"),
    ("prefill ms", 10, lambda r: f"{r['prefill_ms']:.0f}"),
    ("ms/pass", 7, lambda r: "n/a" if r["decode_ms_per_pass"] is None else f"{r['decode_ms_per_pass']:.1f}"),
    ("attn ms", 8, lambda r: f"{r['replay_total_ms']:.1f}"),
)


def needle_table(summary: dict[str, dict]) -> str:
    """The needle workload's per-policy table (see ``bench.needles``)."""
    head = f"{'policy':<11}" + "".join(f" {name:>{width}}" for name, width, _ in NEEDLE_COLUMNS)
    lines = [head, "-" * len(head)]
    for name, r in summary.items():
        lines.append(f"{name:<11}" + "".join(f" {fmt(r):>{width}}" for _, width, fmt in NEEDLE_COLUMNS))
    n = next(iter(summary.values()))["questions"] if summary else 0
    lines.append(
        f"{n} questions; accuracy: expected answer in the greedy answer; choice: forced choice by "
        "log-likelihood; =dense: same greedy answer as dense; top1 / KL: next token vs dense over "
        "dense's answer (teacher-forced); recall / out err: attention vs dense at the question "
        "(mean over layers); answer ms: greedy answer through the model (median), of it prefill ms: "
        "the question's pass with every layer's retrieval (median), ms/pass: one decode pass (median); "
        "attn ms: "
        "select + transfer + attention over all layers in the replay (median)"
    )
    return "\n".join(lines)
