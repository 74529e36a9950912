"""Budget sweep: fidelity against device KV for every policy, and the device KV each needs.

``mosaic-ros-bench --budgets 1024,2048,4096,8192`` runs the whole benchmark once per budget
(each policy ingests the same stream again into a store sized for that budget; the stream and
questions are the same seeded ones every time). The local window, part of every budget, is
``window_for(budget, window)``: an eighth of the budget, at most ``--window`` tokens, so the
largest default budget (8,192) keeps the single-run default window (1,024) and every budget
leaves seven eighths, less the sinks, to retrieval.

Device KV of a point is the policy's ``device_kv_bytes_peak``: the bytes of K and V it holds on
the compute device (its budget-sized question buffers and its ingest window buffers). From the
(device KV, measure) points of a policy, ``kv_for_target`` finds the device KV at which the
measure (recall; on the needle workload also answer accuracy) first reaches a target,
interpolating linearly in log2(bytes) between neighbouring budgets (the budgets double). The
default target is ``rekv``'s value at the largest budget.

The needle workload (``--workload needles --budgets ...``) sweeps the same way: each point is a
whole needle run at that budget (answers, dense agreement, and the replay's recall and error).
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path

WINDOW_SHARE = 8  # the local window is at most budget / WINDOW_SHARE tokens
# what a point keeps of each policy's results: the synthetic and video runs, the needle runs
SYNTHETIC_FIELDS = ("recall", "out_rel_err", "total_ms")
NEEDLE_FIELDS = ("accuracy", "dense_agreement", "top1_agreement", "recall", "out_rel_err", "replay_total_ms")


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


def kv_for_target(points: list[tuple[float, float]], target: float) -> dict:
    """Device KV bytes at which a measure first reaches ``target``.

    points: (device KV bytes, value) per budget. Returns ``bytes`` (None when no budget of the
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


def summarize(
    runs: dict[int, dict], target: float | None, measure: str = "recall", fields: tuple = SYNTHETIC_FIELDS
) -> dict:
    """Per policy: the sweep's points (budget, window, device KV and ``fields`` of its results) and
    the device KV it needs for ``target`` of ``measure`` (default: rekv's value at the largest
    budget; the largest budget's first policy's when rekv is absent)."""
    budgets = sorted(runs)
    last = runs[budgets[-1]]["policies"]
    if target is None:
        reference = "rekv" if "rekv" in last else next(iter(last))
        target, target_source = last[reference][measure], f"{reference} at {budgets[-1]} tokens"
    else:
        target_source = "given"
    policies: dict[str, dict] = {}
    for name in last:
        points = []
        for b in budgets:
            result = runs[b]["policies"][name]
            points.append(
                {
                    "budget": b,
                    "window": runs[b]["window"],
                    "device_kv_bytes": result["device_kv_bytes_peak"],
                    **{field: result[field] for field in fields},
                }
            )
        needed = kv_for_target([(p["device_kv_bytes"], p[measure]) for p in points], target)
        policies[name] = {"points": points, "kv_for_target": needed}
    rekv = policies.get("rekv", {}).get("kv_for_target", {}).get("bytes")
    for entry in policies.values():
        mine = entry["kv_for_target"]["bytes"]
        entry["kv_vs_rekv"] = mine / rekv if mine is not None and rekv else None
    return {"measure": measure, "target": target, "target_source": target_source, "policies": policies}


def _mb(nbytes: float | None) -> str:
    """MiB with four significant digits ("–" for None)."""
    return "–" if nbytes is None else f"{nbytes / 2**20:.4g}"


def sweep_table(summary: dict, columns: tuple[str, ...] = ("recall", "out_rel_err")) -> str:
    """Text table: per policy and budget, device MB and ``columns`` of the points; then
    ``kv_table``."""
    policies = summary["policies"]
    budgets = [p["budget"] for p in next(iter(policies.values()))["points"]]
    names = " / ".join(("MB", *(c.replace("_", " ") for c in columns)))
    width = max(34, len(names) + 12)
    head = f"{'policy':<12}" + "".join(f"{f'{b} tok: {names}':>{width}}" for b in budgets)
    lines = [head, "-" * len(head)]
    for name, entry in policies.items():
        cells = ""
        for p in entry["points"]:
            cell = " / ".join((_mb(p["device_kv_bytes"]), *(f"{p[c]:.3f}" for c in columns)))
            cells += f"{cell:>{width}}"
        lines.append(f"{name:<12}{cells}")
    return "\n".join(lines) + "\n\n" + kv_table(summary)


def kv_table(summary: dict) -> str:
    """Text lines: the device KV each policy needs for the summary's target, against rekv's."""
    lines = [f"device KV for {summary['measure']} {summary['target']:.3f} ({summary['target_source']}):"]
    for name, entry in summary["policies"].items():
        need = entry["kv_for_target"]
        ratio = entry["kv_vs_rekv"]
        vs = ""
        if ratio is not None:
            vs = f", {ratio:.2f}x rekv's ({1 - ratio:.0%} less)" if ratio <= 1 else f", {ratio:.2f}x rekv's"
        lines.append(f"  {name:<12}{_mb(need['bytes']):>8} MB ({need['bound']}){vs}")
    return "\n".join(lines)


LABELS = {
    "recall": "recall (share of dense attention mass)",
    "out_rel_err": "attention output rel. error",
    "accuracy": "answer accuracy (real LM)",
    "dense_agreement": "same greedy answer as dense",
}


def sweep_plot(summary: dict, path: str | Path, title: str, other: str = "out_rel_err") -> None:
    """The summary's measure (its target dashed) and ``other`` against device KV MB (log scale),
    one line per policy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measure = summary["measure"]
    fig, (ax_m, ax_o) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, entry in summary["policies"].items():
        mb = [p["device_kv_bytes"] / 2**20 for p in entry["points"]]
        ax_m.plot(mb, [p[measure] for p in entry["points"]], marker="o", label=name)
        ax_o.plot(mb, [p[other] for p in entry["points"]], marker="o", label=name)
    ax_m.axhline(summary["target"], color="grey", linestyle="--", linewidth=1)
    ax_m.text(
        0.01,
        summary["target"],
        f"target ({summary['target_source']})",
        transform=ax_m.get_yaxis_transform(),
        fontsize=8,
        va="bottom",
    )
    for ax, field in ((ax_m, measure), (ax_o, other)):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("device KV, MB (peak)")
        ax.set_ylabel(LABELS.get(field, field))
        ax.grid(True, alpha=0.3)
    ax_m.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
