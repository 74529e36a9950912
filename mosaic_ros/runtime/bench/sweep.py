"""Budget sweep: fidelity against device KV for every policy, and the device KV each needs.

``mosaic-ros-bench --budgets 1024,2048,4096,8192`` runs the whole benchmark once per budget
(each policy ingests the same stream again into a store sized for that budget; the stream and
questions are the same seeded ones every time). The local window, part of every budget, is
``window_for(budget, window)``: an eighth of the budget, at most ``--window`` tokens, so the
largest default budget (8,192) keeps the single-run default window (1,024) and every budget
leaves seven eighths, less the sinks, to retrieval.

Device KV of a point is the policy's ``device_kv_bytes_peak``: the bytes of K and V it holds on
the compute device (its budget-sized question buffers and its ingest window buffers). From the
(device KV, recall) points of a policy, ``kv_for_recall`` finds the device KV at which its recall
first reaches a target, interpolating linearly in log2(bytes) between neighbouring budgets (the
budgets double). The default target is ``rekv``'s recall at the largest budget.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path

WINDOW_SHARE = 8  # the local window is at most budget / WINDOW_SHARE tokens


def parse_budgets(text: str) -> list[int]:
    """``"1024,2048"`` -> [1024, 2048]: distinct positive token counts, ascending."""
    try:
        budgets = [int(part) for part in text.split(",") if part.strip()]
    except ValueError as error:
        raise ValueError(f"--budgets must be comma-separated token counts, got {text!r}") from error
    if len(budgets) < 2 or any(b <= 0 for b in budgets) or len(set(budgets)) != len(budgets):
        raise ValueError(f"--budgets needs at least two distinct positive token counts, got {text!r}")
    return sorted(budgets)


def window_for(budget: int, window: int) -> int:
    """Local window tokens at ``budget``: ``min(window, budget // WINDOW_SHARE)``."""
    return min(window, budget // WINDOW_SHARE)


def kv_for_recall(points: list[tuple[float, float]], target: float) -> dict:
    """Device KV bytes at which recall first reaches ``target``.

    points: (device KV bytes, recall) per budget. Returns ``bytes`` (None when no budget of the
    sweep reaches the target) and ``bound``: ``"interpolated"`` between two budgets,
    ``"at_or_below"`` when the smallest budget already reaches it (bytes is that budget's: an
    upper bound), or ``"not_reached"``.
    """
    pts = sorted(points)
    if pts[0][1] >= target:
        return {"bytes": pts[0][0], "bound": "at_or_below"}
    for (b0, r0), (b1, r1) in itertools.pairwise(pts):
        if r1 >= target > r0:
            share = (target - r0) / (r1 - r0)
            log_bytes = math.log2(b0) + share * (math.log2(b1) - math.log2(b0))
            return {"bytes": 2.0**log_bytes, "bound": "interpolated"}
    return {"bytes": None, "bound": "not_reached"}


def summarize(runs: dict[int, dict], target: float | None) -> dict:
    """Per policy: the sweep's points and the device KV it needs for ``target`` recall (default:
    rekv's recall at the largest budget; the largest budget's first policy's when rekv is absent)."""
    budgets = sorted(runs)
    last = runs[budgets[-1]]["policies"]
    if target is None:
        reference = "rekv" if "rekv" in last else next(iter(last))
        target, target_source = last[reference]["recall"], f"{reference} at {budgets[-1]} tokens"
    else:
        target_source = "given"
    policies: dict[str, dict] = {}
    for name in last:
        points = [
            {
                "budget": b,
                "window": runs[b]["window"],
                "device_kv_bytes": runs[b]["policies"][name]["device_kv_bytes_peak"],
                "recall": runs[b]["policies"][name]["recall"],
                "out_rel_err": runs[b]["policies"][name]["out_rel_err"],
                "total_ms": runs[b]["policies"][name]["total_ms"],
            }
            for b in budgets
        ]
        needed = kv_for_recall([(p["device_kv_bytes"], p["recall"]) for p in points], target)
        policies[name] = {"points": points, "kv_for_target": needed}
    rekv = policies.get("rekv", {}).get("kv_for_target", {}).get("bytes")
    for entry in policies.values():
        mine = entry["kv_for_target"]["bytes"]
        entry["kv_vs_rekv"] = mine / rekv if mine is not None and rekv else None
    return {"target_recall": target, "target_source": target_source, "policies": policies}


def _mb(nbytes: float | None) -> str:
    """MiB with four significant digits ("–" for None)."""
    return "–" if nbytes is None else f"{nbytes / 2**20:.4g}"


def sweep_table(summary: dict) -> str:
    """Text table: per policy and budget, device MB, recall, out_rel_err; then the KV needed."""
    policies = summary["policies"]
    budgets = [p["budget"] for p in next(iter(policies.values()))["points"]]
    head = f"{'policy':<12}" + "".join(f"{f'{b} tok: MB / recall / err':>34}" for b in budgets)
    lines = [head, "-" * len(head)]
    for name, entry in policies.items():
        cells = ""
        for p in entry["points"]:
            cell = f"{_mb(p['device_kv_bytes'])} / {p['recall']:.3f} / {p['out_rel_err']:.3f}"
            cells += f"{cell:>34}"
        lines.append(f"{name:<12}{cells}")
    lines.append("")
    lines.append(f"device KV for recall {summary['target_recall']:.3f} ({summary['target_source']}):")
    for name, entry in policies.items():
        need = entry["kv_for_target"]
        ratio = entry["kv_vs_rekv"]
        vs = ""
        if ratio is not None:
            vs = f", {ratio:.2f}x rekv's ({1 - ratio:.0%} less)" if ratio <= 1 else f", {ratio:.2f}x rekv's"
        lines.append(f"  {name:<12}{_mb(need['bytes']):>8} MB ({need['bound']}){vs}")
    return "\n".join(lines)


def sweep_plot(summary: dict, path: str | Path, title: str) -> None:
    """Recall and attention-output error against device KV MB (log scale), one line per policy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_r, ax_e) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, entry in summary["policies"].items():
        mb = [p["device_kv_bytes"] / 2**20 for p in entry["points"]]
        ax_r.plot(mb, [p["recall"] for p in entry["points"]], marker="o", label=name)
        ax_e.plot(mb, [p["out_rel_err"] for p in entry["points"]], marker="o", label=name)
    ax_r.axhline(summary["target_recall"], color="grey", linestyle="--", linewidth=1)
    ax_r.text(
        0.01,
        summary["target_recall"],
        f"target ({summary['target_source']})",
        transform=ax_r.get_yaxis_transform(),
        fontsize=8,
        va="bottom",
    )
    for ax, label in (
        (ax_r, "recall (share of dense attention mass)"),
        (ax_e, "attention output rel. error"),
    ):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("device KV, MB (peak)")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
    ax_r.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
