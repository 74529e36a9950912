"""Run several policies over the same stream and questions, one policy at a time.

For each policy: ingest the whole stream into its own store (timing ingest and maintenance
per frame), then per question and layer time ``retrieve`` (select and transfer, from the
policy's ``RetrievalStats``) and attention (``rotate_context`` + ``attend``), then free the
policy. With ``isolate`` (the default) every policy after the first runs in a process of its
own (forked from a fork server that has run nothing, handed the workload and the reference):
in one process a policy's store is written into memory the previous policy freed, already
faulted in, so the second policy's ingest skipped the first-touch cost the first one paid
(measured at the 7B shape: mosaic's row moves 12.5 ms per frame fresh, 3.5 ms after ReKV),
and the ingest ratio depended on the order. ``dense`` always runs first (reported only when
asked for). Once it holds the stream, the reference is computed layer by layer (each layer's
keys rotated once for all questions), outside any timed region: per question and layer, the
dense attention output and the log-sum-exp of the dense logits over every stored token, by the
same math as ``attend`` (checked equal in the tests). ``dense`` itself is then timed on its first
``dense_questions`` questions only: its work does not depend on the question, and rotating
and attending over the whole stream per question and layer is what makes it the slowest.
A policy's fidelity is computed from the reference, outside the timed region:

- ``recall``: the share of dense attention probability mass on the tokens the policy handed
  attention, i.e. sum over its tokens of exp(logit - LSE_dense), with logits taken at the
  tokens' ORIGINAL positions (each query head uses its KV head's own set), averaged over
  layers, heads, question tokens and questions;
- ``out_rel_err``: ||out - out_dense|| / ||out_dense|| of the attention output, where the
  policy's output uses the positions it chose (LiveVLM re-positions).

No real weights exist here, so answer accuracy is approximated by this fidelity to dense.
"""

from __future__ import annotations

import gc
import json
import multiprocessing
import os
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from tqdm import tqdm

from mosaic_ros.runtime.bench.workloads import Question, Workload
from mosaic_ros.runtime.config import ConfigError, check, internal, nested, setting, strict
from mosaic_ros.runtime.kv.attention import Scratch, attend, rotate_context
from mosaic_ros.runtime.kv.bridge import KVBridge
from mosaic_ros.runtime.kv.policy import KVContext, KVPolicy, PolicyConfig, make_policy
from mosaic_ros.runtime.kv.rope import apply_rotary
from mosaic_ros.runtime.snapshot import SnapshotDir, capture, replay, write


@strict
@dataclass
class BenchConfig:
    """What to run (a level of the configuration tree, ``runtime.config``: its settings are
    ``mosaic-ros-bench``'s flags). ``policies`` in report order; ``kv``: the settings every policy
    runs with (sinks default to the synthetic stream's 32-token preamble); ``options`` maps a
    policy name to its own options. ``save_dir``/``load_dir``: each policy's stream after ingest
    is saved to, or loaded instead of ingested from, ``DIR/<policy>`` (``save_stream``)."""

    policies: list[str] = internal(factory=lambda: ["dense", "window", "token_topk", "rekv", "livevlm"])
    kv: PolicyConfig = nested(PolicyConfig, exclude=("options",), sink_tokens=32)
    device: str = setting("cpu", "Torch device the policies fetch to and attend on: cpu or cuda[:N].")
    options: dict[str, dict] = internal(factory=dict)
    dense_questions: int = setting(
        1,
        "Questions dense is timed on (its cost does not depend on the question; fidelity uses all).",
        low=1,
        high=1 << 20,
    )
    progress: bool = internal(True)
    maintain_budget_ms: float = setting(
        5.0, "Maintenance budget between frames.", unit="ms", low=0.0, high=10000.0, flags=("--maintain-ms",)
    )
    wall_pass: bool = setting(
        False, "Time every question again end to end, without per-layer syncs (shows overlapped copies)."
    )
    save_dir: str = setting(
        "",
        "After ingest, save each policy's stream into DIR/<policy> (a snapshot, as mosaic-ros-run's).",
        name="save",
        metavar="DIR",
    )
    load_dir: str = setting(
        "",
        "Load each policy's stream from DIR/<policy> (saved by --save with the same stream, shape, "
        "policy and options) instead of ingesting it; ingest figures are the saving run's.",
        name="load",
        metavar="DIR",
    )
    isolate: bool = setting(
        True,
        "Run each policy after dense in a fresh process, so that none writes into memory another "
        "one freed (already faulted in) and the ingest figures do not depend on the policies' order.",
    )

    def __post_init__(self) -> None:
        check(self)
        if self.save_dir and self.load_dir:
            raise ConfigError("give --save or --load, not both")


@dataclass
class _Reference:
    """Dense results per question and layer: out (H_q, L_q, D) float32, lse (H_q, L_q) float32."""

    out: list[list[torch.Tensor]] = field(default_factory=list)
    lse: list[list[torch.Tensor]] = field(default_factory=list)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _PreparedQuestion:
    """A question's rotated queries and local tokens per layer, on the compute device."""

    def __init__(self, q: Question, workload: Workload, device: torch.device, dtype: torch.dtype):
        cos, sin = workload.rotary(q.positions)
        cos, sin = cos.to(device), sin.to(device)
        self.window = q.window
        self.pre = [x.to(device) for x in q.queries]
        self.rot = [apply_rotary(x.to(device).float(), cos, sin).to(dtype) for x in q.queries]
        self.local_k = [apply_rotary(x.to(device).float(), cos, sin).to(dtype) for x in q.local_keys]
        self.local_v = [x.to(device).to(dtype) for x in q.local_values]


def _grouped_logits(q_rot: torch.Tensor, keys_rot: torch.Tensor) -> torch.Tensor:
    """q (H_q, L, D), keys (H_kv, T, D) (one set per KV head) -> logits (H_q, L, T) float32, scaled."""
    hq, lq, d = q_rot.shape
    hkv = keys_rot.shape[0]
    q = q_rot.float().reshape(hkv, (hq // hkv) * lq, d)
    logits = torch.bmm(q, keys_rot.float().transpose(1, 2)) * d**-0.5
    return logits.reshape(hq, lq, -1)


def reference_attention(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    local_keys: torch.Tensor,
    local_values: torch.Tensor,
    blocks: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """What ``attend`` computes, grouped per KV head, plus the context's log-sum-exp.

    query (H_q, B * L, D): ``blocks`` = B independent questions of L tokens side by side, each
    with its own local tokens (H_kv, B * L_s, D) (its block of ``local_keys``/``local_values``);
    keys/values (H_kv, T, D) the shared context. All post-RoPE, float32. Returns the lse over
    the context only (H_q, B * L) and the output (H_q, B * L, D).
    """
    hq, bl, d = query.shape
    hkv = keys.shape[0]
    lq, ls = bl // blocks, local_keys.shape[1] // blocks
    q = query.reshape(hkv, (hq // hkv) * bl, d)
    scale = d**-0.5
    ctx = torch.bmm(q, keys.transpose(1, 2)) * scale
    local = torch.bmm(q, local_keys.transpose(1, 2)) * scale
    col = torch.arange(blocks * ls)
    row = torch.arange(q.shape[1]) % bl
    same_block = (col // ls)[None, :] == (row // lq)[:, None]
    causal = (col % ls)[None, :] <= (ls - lq + row % lq)[:, None]
    local = local.masked_fill(~(same_block & causal).to(local.device), float("-inf"))
    top = torch.maximum(ctx.amax(dim=-1), local.amax(dim=-1))[..., None]
    weights = ctx.sub_(top).exp_()
    local_weights = local.sub_(top).exp_()
    mass = weights.sum(dim=-1)
    lse_ctx = torch.log(mass) + top[..., 0]
    out = torch.bmm(weights, values).add_(torch.bmm(local_weights, local_values))
    out = out / (mass + local_weights.sum(dim=-1))[..., None]
    return lse_ctx.reshape(hq, bl), out.reshape(hq, bl, d)


def _same_length_batches(questions: list[_PreparedQuestion], layer: int, batch: int):
    """(first index, questions) runs of up to ``batch`` consecutive questions of one length."""
    first = 0
    while first < len(questions):
        lq = questions[first].rot[layer].shape[1]
        end = first + 1
        while end < min(first + batch, len(questions)) and questions[end].rot[layer].shape[1] == lq:
            end += 1
        yield first, questions[first:end]
        first = end


def dense_reference(
    policy: KVPolicy, questions: list[_PreparedQuestion], rotary, bar, batch: int = 8
) -> _Reference:
    """Reference outputs and context LSEs from a ``dense`` policy holding the whole stream.

    Layer by layer (keys rotated once per layer), up to ``batch`` questions of one length per
    product."""
    n_layers = policy.geometry.num_layers
    ref = _Reference(out=[[None] * n_layers for _ in questions], lse=[[None] * n_layers for _ in questions])
    for layer in range(n_layers):
        ctx = policy.ingest_context(layer)
        # rotated in the precision the timed attention uses, so dense's own recall is exactly 1
        keys = rotate_context(ctx, rotary, dtype=questions[0].rot[layer].dtype).float()
        values = ctx.values.float()
        for first, group in _same_length_batches(questions, layer, batch):
            lse, out = reference_attention(
                torch.cat([q.rot[layer].float() for q in group], dim=1),
                keys,
                values,
                torch.cat([q.local_k[layer].float() for q in group], dim=1),
                torch.cat([q.local_v[layer].float() for q in group], dim=1),
                blocks=len(group),
            )
            lq = lse.shape[1] // len(group)
            for i in range(len(group)):
                ref.lse[first + i][layer] = lse[:, i * lq : (i + 1) * lq].cpu()
                ref.out[first + i][layer] = out[:, i * lq : (i + 1) * lq].cpu()
        del keys, values
        bar.update(1)
    return ref


def ingest_frame(policy: KVPolicy, chunk, maintain_budget_ms: float) -> tuple[float, float]:
    """Stream one chunk into ``policy`` as a model run does (``add_tokens``, per layer
    ``ingest_context`` + ``append``), then ``maintain``; returns (ingest ms, maintenance ms)."""
    keys = [k.to(policy.device) for k in chunk.keys]
    values = [v.to(policy.device) for v in chunk.values]
    _sync(policy.device)
    t0 = time.perf_counter()
    ids = policy.add_tokens(chunk.meta)
    for layer in range(policy.geometry.num_layers):
        policy.ingest_context(layer)
        policy.append(layer, keys[layer], values[layer], ids)
    _sync(policy.device)
    t1 = time.perf_counter()
    m = policy.maintain(maintain_budget_ms)
    t2 = time.perf_counter()
    return (t1 - t0) * 1e3, max(m, (t2 - t1) * 1e3)


def _ingest(
    policy: KVPolicy, workload: Workload, bar, maintain_budget_ms: float = 5.0
) -> tuple[dict, torch.Tensor, list[tuple[int, int]]]:
    """Stream every chunk into ``policy``. Returns (per-frame ingest/maintenance means in ms, the
    rotary positions (P, N) int64 of every token by id, (first id, tokens) of each chunk: ids
    are handed out in order from 0 by ``add_tokens``)."""
    ingest_ms, maintain_ms = [], []
    positions, chunks = [], []
    first = 0
    for i in range(workload.num_chunks):
        chunk = workload.chunk(i)
        frame_ms = ingest_frame(policy, chunk, maintain_budget_ms)
        if i:  # chunk 0 is the sink preamble
            ingest_ms.append(frame_ms[0])
            maintain_ms.append(frame_ms[1])
        positions.append(chunk.meta.positions)
        chunks.append((first, chunk.meta.num_tokens))
        first += chunk.meta.num_tokens
        bar.update(1)
    timing = {
        "ingest_ms_per_frame": statistics.fmean(ingest_ms) if ingest_ms else 0.0,
        **_tail(ingest_ms),
        "maintain_ms_per_frame": statistics.fmean(maintain_ms) if maintain_ms else 0.0,
    }
    return timing, torch.cat(positions, dim=1), chunks


def _tail(ingest_ms: list[float]) -> dict:
    """Median, 99th percentile and longest frame of the ingest (ms): a robot's frames wait on
    the slow ones (a seal's or an append's first touch of new pages), which a mean hides."""
    if not ingest_ms:
        return {"ingest_ms_median": 0.0, "ingest_ms_p99": 0.0, "ingest_ms_max": 0.0}
    p99 = (
        statistics.quantiles(ingest_ms, n=100, method="inclusive")[98] if len(ingest_ms) > 1 else ingest_ms[0]
    )
    return {
        "ingest_ms_median": statistics.median(ingest_ms),
        "ingest_ms_p99": p99,
        "ingest_ms_max": max(ingest_ms),
    }


def stream_identity(workload: Workload, policy: KVPolicy) -> dict:
    """What a saved stream must match to be loaded (``snapshot.check_identity`` names each
    difference): the stream (the workload's description, its questions aside), the KV geometry,
    the policy and its whole ``PolicyConfig`` (options included)."""
    stream = {k: v for k, v in workload.describe().items() if not k.startswith("question")}
    identity = {
        "stream": stream,
        "geometry": asdict(policy.geometry),
        "policy": policy.name,
        "policy_config": asdict(policy.config),
    }
    return json.loads(json.dumps(identity, default=str))  # the form it has after a round trip


def save_stream(
    policy: KVPolicy, workload: Workload, chunks: list[tuple[int, int]], timing: dict, directory: Path
) -> None:
    """Snapshot ``policy``'s ingested stream into ``directory`` (crash-safe, ``runtime.snapshot``),
    with its identity and ``timing`` (the ingest figures a loading run reports). ``SnapshotError``
    when the memory cannot be exported or written."""
    identity = stream_identity(workload, policy)
    write(capture(policy, chunks, {"timing": timing}, identity, str(directory), None))


def load_stream(
    policy: KVPolicy, workload: Workload, directory: Path, maintain_budget_ms: float
) -> tuple[dict, torch.Tensor]:
    """Replay the newest complete snapshot in ``directory`` into the empty ``policy``, as the
    session's ``load`` does. Returns (the saving run's ingest figures, with ``loaded_from``; the
    rotary positions (P, N) int64 of the policy's tokens by id). Raises ``SnapshotIncompatible``
    when it was saved from another stream, shape, policy or options (the message names each
    difference), ``SnapshotError`` when there is none or none is complete."""
    snapshots = SnapshotDir(directory)
    _, manifest, _ = snapshots.newest_complete(stream_identity(workload, policy))
    bridge = KVBridge(policy, workload.rotary, policy.geometry.num_layers)
    ids, _ = replay(snapshots, manifest, bridge.replay, lambda: policy.maintain(maintain_budget_ms))
    positions = torch.zeros((policy.geometry.position_dims, int(ids.max()) + 1), dtype=torch.int64)
    offset = 0
    for entry in manifest["segments"]:
        with safe_open(snapshots.path / entry["file"], "pt") as f:
            saved = f.get_tensor("positions")
        held = ids[offset : offset + saved.shape[1]]
        alive = held >= 0
        positions[:, held[alive]] = saved[:, alive]
        offset += saved.shape[1]
    return {**manifest["state"]["timing"], "loaded_from": str(directory)}, positions


def _ask(
    policy: KVPolicy,
    questions: list[_PreparedQuestion],
    workload: Workload,
    positions: torch.Tensor,
    rotary,
    reference: _Reference,
    bar,
) -> dict:
    """Time every question through ``policy``; fidelity against ``reference`` (untimed)."""
    n_layers = workload.geometry.num_layers
    per_q = []
    recalls, errs = [], []
    scratch = Scratch()
    for qi, q in enumerate(questions):
        policy.begin_question(q.window)
        attn_ms = 0.0
        q_recall, q_err = [], []
        for layer in range(n_layers):
            ctx = policy.retrieve(layer, q.pre[layer])
            _sync(policy.device)
            t0 = time.perf_counter()
            keys = rotate_context(ctx, rotary, dtype=q.rot[layer].dtype, scratch=scratch)
            out = attend(q.rot[layer], keys, ctx.values, q.local_k[layer], q.local_v[layer], scratch=scratch)
            _sync(policy.device)
            attn_ms += (time.perf_counter() - t0) * 1e3
            orig_pos = positions[:, ctx.token_ids.to(positions.device)]
            if not torch.equal(orig_pos, ctx.positions.to(orig_pos.device)):
                keys = rotate_context(
                    KVContext(ctx.keys, ctx.values, orig_pos, ctx.token_ids), rotary, dtype=q.rot[layer].dtype
                )
            logits = _grouped_logits(q.rot[layer], keys)
            out = out.float()
            lse = reference.lse[qi][layer].to(logits.device)
            q_recall.append(float(torch.exp(logits - lse[..., None]).sum(-1).mean()))
            ref = reference.out[qi][layer].to(out.device)
            q_err.append(float((out - ref).norm() / ref.norm().clamp_min(1e-30)))
        stats = policy.end_question()
        recalls.append(statistics.fmean(q_recall))
        errs.append(statistics.fmean(q_err))
        per_q.append(
            {
                "select_ms": stats.select_ms,
                "transfer_ms": stats.transfer_ms,
                "copy_ms": stats.copy_ms,
                "copy_device_ms": stats.copy_device_ms,
                "attn_ms": attn_ms,
                "total_ms": stats.select_ms + stats.transfer_ms + attn_ms,
                "copies": stats.copies,
                "bytes_moved": stats.bytes_moved,
                "tokens_retrieved": stats.tokens_retrieved / n_layers,
                "prefetch_hits": stats.prefetch_hits,
                "prefetch_lookups": stats.prefetch_lookups,
            }
        )
        bar.update(1)
    med = {k: statistics.median(p[k] for p in per_q) for k in per_q[0]}
    moved = sum(p["bytes_moved"] for p in per_q)
    transfer_s = sum(p["transfer_ms"] for p in per_q) / 1e3
    med["transfer_gbps"] = moved / transfer_s / 1e9 if transfer_s > 0 and moved else 0.0
    copy_s = sum(p["copy_ms"] for p in per_q) / 1e3
    med["copy_gbps"] = moved / copy_s / 1e9 if copy_s > 0 and moved else 0.0  # the copies alone
    lookups = sum(p["prefetch_lookups"] for p in per_q)
    med["prefetch_hit_rate"] = sum(p["prefetch_hits"] for p in per_q) / lookups if lookups else 0.0
    med["recall"] = statistics.fmean(recalls)
    med["out_rel_err"] = statistics.fmean(errs)
    med["per_question"] = per_q
    return med


def _wall_pass(policy: KVPolicy, questions: list[_PreparedQuestion], rotary) -> dict:
    """Every question again, timed end to end (retrieve, rotate, attend, all layers) with no
    synchronisation between layers, so copies that overlap attention (prefetch on a side
    stream) are not serialised as in ``_ask``'s per-part timing. Residency carries over from
    ``_ask`` (question i follows question i - 1, the first follows the last). Returns, in ms,
    medians over questions: ``wall_ms`` and ``wall_select_transfer_ms`` (this pass's select +
    transfer from its ``RetrievalStats``). Whatever of the parts' sum exceeds ``wall_ms`` ran
    overlapped: the transfer hidden behind attention."""
    scratch = Scratch()
    walls, parts = [], []
    for q in questions:
        _sync(policy.device)
        t0 = time.perf_counter()
        policy.begin_question(q.window)
        for layer in range(policy.geometry.num_layers):
            ctx = policy.retrieve(layer, q.pre[layer])
            keys = rotate_context(ctx, rotary, dtype=q.rot[layer].dtype, scratch=scratch)
            attend(q.rot[layer], keys, ctx.values, q.local_k[layer], q.local_v[layer], scratch=scratch)
        stats = policy.end_question()
        _sync(policy.device)
        walls.append((time.perf_counter() - t0) * 1e3)
        parts.append(stats.select_ms + stats.transfer_ms)
    return {"wall_ms": statistics.median(walls), "wall_select_transfer_ms": statistics.median(parts)}


def measure_memcpy_gbps(nbytes: int, repeats: int, device: torch.device, *, distinct: bool = False) -> float:
    """Best-of-3 GB/s of ``repeats`` contiguous host->device copies of ``nbytes`` each.

    ``distinct=False`` copies one source to one destination ``repeats`` times: once the first
    copy has run, both sit in the CPU caches when they fit (a few MB), so on a CPU this is a
    cache-warm limit. ``distinct=True`` copies ``repeats`` different sources into as many
    different destinations after the caches are flushed by a larger write, as a fetch does
    (every layer reads its own cold host rows into its own buffer): the limit for cold data.
    """
    nbytes = max(int(nbytes), 1)
    pin = device.type == "cuda"
    count = repeats if distinct else 1
    srcs = [torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin).fill_(1) for _ in range(count)]
    dsts = [torch.empty(nbytes, dtype=torch.uint8, device=device) for _ in range(count)]
    flush = torch.empty(256 * 2**20, dtype=torch.uint8) if distinct and not pin else None
    for s, d in zip(srcs, dsts, strict=True):
        d.copy_(s)
    best = float("inf")
    for _ in range(3):
        if flush is not None:
            flush.fill_(2)
        _sync(device)
        t0 = time.perf_counter()
        for i in range(repeats):
            dsts[i % count].copy_(srcs[i % count], non_blocking=pin)
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return nbytes * repeats / best / 1e9


def run_policies(workload: Workload, cfg: BenchConfig) -> dict:
    """Run ``cfg.policies`` over ``workload``; returns {"policies": {name: results}, "memcpy": {...}}."""
    device = torch.device(cfg.device)
    geom = workload.geometry
    questions, rotary = _prepared(workload, device)
    reference: _Reference | None = None
    order = ["dense"] + [p for p in cfg.policies if p != "dense"]
    results: dict[str, dict] = {}
    for name in order:
        if reference is not None and cfg.isolate:
            args = (name, workload, cfg, reference, torch.get_num_threads())
            res = in_fresh_process(f"policy {name!r}", _run_isolated, *args)
            results[name] = {**res, "own_process": True}
            continue
        res, reference = _run_policy(name, workload, cfg, questions, rotary, reference)
        if res is not None:
            results[name] = {**res, "own_process": False}
    moved = [r["bytes_moved"] for n, r in results.items() if n != "dense" and r["bytes_moved"] > 0]
    per_layer = (
        statistics.median(moved) / geom.num_layers
        if moved
        else cfg.kv.budget_tokens * 2 * geom.token_row_bytes
    )
    memcpy = {
        "bytes_per_copy": int(per_layer),
        "copies": geom.num_layers,
        "gbps": measure_memcpy_gbps(int(per_layer), geom.num_layers, device),
        "cold_gbps": measure_memcpy_gbps(int(per_layer), geom.num_layers, device, distinct=True),
    }
    results = {name: results[name] for name in cfg.policies}
    for r in results.values():  # effective transfer bandwidth as a share of each copy limit
        r["transfer_vs_memcpy"] = r["transfer_gbps"] / memcpy["gbps"]
        r["transfer_vs_memcpy_cold"] = r["transfer_gbps"] / memcpy["cold_gbps"]
        r["copy_vs_memcpy_cold"] = r["copy_gbps"] / memcpy["cold_gbps"]
    _add_ratios(results)
    return {"policies": results, "memcpy": memcpy}


def _run_policy(
    name: str,
    workload: Workload,
    cfg: BenchConfig,
    questions: list[_PreparedQuestion],
    rotary,
    reference: _Reference | None,
) -> tuple[dict | None, _Reference]:
    """Ingest the stream into a new ``name`` policy and time its questions; with no ``reference``
    yet (``dense``, run first) make it from this policy. Returns (its results, None when it was
    run for the reference only; the reference)."""
    device = torch.device(cfg.device)
    geom = workload.geometry
    policy_config = replace(cfg.kv, options=_options(name, cfg, workload))
    t_policy = time.perf_counter()
    policy = make_policy(name, geom, policy_config, device)
    asked = questions
    total = workload.num_chunks + len(questions)
    if reference is None:
        asked = questions[: cfg.dense_questions] if name in cfg.policies else []
        total = workload.num_chunks + geom.num_layers + len(asked)
    with tqdm(total=total, desc=name, disable=not cfg.progress, leave=False) as bar:
        if cfg.load_dir:
            timing, positions = load_stream(
                policy, workload, Path(cfg.load_dir) / name, cfg.maintain_budget_ms
            )
            bar.update(workload.num_chunks)
        else:
            timing, positions, chunks = _ingest(policy, workload, bar, cfg.maintain_budget_ms)
            if cfg.save_dir:
                save_stream(policy, workload, chunks, timing, Path(cfg.save_dir) / name)
        positions = positions.to(device)
        if reference is None:
            reference = dense_reference(policy, questions, rotary, bar)
        if not asked:
            del policy
            gc.collect()
            return None, reference
        res = _ask(policy, asked, workload, positions, rotary, reference, bar)
        if cfg.wall_pass:
            res.update(_wall_pass(policy, asked, rotary))
    mem = policy.memory()
    res.update(timing)
    res["questions_timed"] = len(asked)
    res.update(
        {
            "device_kv_bytes_peak": mem.device_kv_bytes_peak,
            "host_kv_bytes": mem.host_kv_bytes,
            "tokens_in_memory": mem.tokens,
            "tokens_evicted": mem.tokens_evicted,
            "units": mem.units,
            "wall_s": time.perf_counter() - t_policy,
            "process_rss_bytes": _rss_bytes(),
            "process_id": os.getpid(),
        }
    )
    del policy
    gc.collect()
    return res, reference


class PolicyProcessError(RuntimeError):
    """The process running one policy of the benchmark ended without an answer (killed, e.g. for
    memory, or crashed in native code); its own stderr says more."""


def in_fresh_process(what: str, fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` in a new process; its exceptions are raised here, and a process that ends
    without answering raises ``PolicyProcessError`` naming ``what``. The process is forked from
    multiprocessing's fork server, which imported this module once and has run nothing
    (single-threaded, so forking it is safe): every call starts from that heap, and starting
    costs a fork, not a fresh interpreter's imports."""
    server = multiprocessing.get_context("forkserver")
    server.set_forkserver_preload([__name__, "mosaic_ros.runtime.kv.policies"])
    with ProcessPoolExecutor(max_workers=1, mp_context=server) as pool:
        try:
            return pool.submit(fn, *args).result()
        except BrokenProcessPool:
            raise PolicyProcessError(
                f"the process running {what} ended without an answer (killed, e.g. for memory, or a "
                "crash in native code: see its messages above)"
            ) from None


def _run_isolated(
    name: str, workload: Workload, cfg: BenchConfig, reference: _Reference, threads: int
) -> dict:
    """``_run_policy`` of ``name`` in a process of its own (``in_fresh_process``): the workload and
    the reference came by pickle, the torch threads are the parent's."""
    from mosaic_ros.runtime.heap import freeze_startup_objects
    from mosaic_ros.runtime.kv import policies  # noqa: F401  (registers the built-in policies)

    torch.set_num_threads(threads)
    questions, rotary = _prepared(workload, torch.device(cfg.device))
    freeze_startup_objects()
    res, _ = _run_policy(name, workload, cfg, questions, rotary, reference)
    return res


def _rss_bytes() -> int:
    """Resident memory of this process now (0 where /proc is missing)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


def _options(name: str, cfg: BenchConfig, workload: Workload) -> dict:
    """The policy's options; ``dense`` reserves its device arena for the whole stream up front."""
    options = dict(cfg.options.get(name, {}))
    if name == "dense":
        tokens = sum(workload.chunk_tokens(i) for i in range(workload.num_chunks))
        options.setdefault("reserve_tokens", tokens)
    return options


def _prepared(workload: Workload, device: torch.device) -> tuple[list[_PreparedQuestion], Any]:
    """The workload's questions prepared on ``device`` (attention in the KV dtype on CUDA, float32
    on a CPU) and its rotary function with its tables there."""
    attn_dtype = workload.geometry.dtype if device.type == "cuda" else torch.float32
    questions = [_PreparedQuestion(q, workload, device, attn_dtype) for q in workload.questions()]
    return questions, _device_rotary(workload, device)


def _device_rotary(workload: Workload, device: torch.device):
    """The workload's rotary function with its tables on ``device``."""
    rot = workload.rotary
    if hasattr(rot, "inv_freq"):
        rot.inv_freq = rot.inv_freq.to(device)
    return rot


def _add_ratios(results: dict[str, dict]) -> None:
    """Speed relative to the token-level baselines: baseline total_ms / policy total_ms."""
    for base in ("token_topk", "rekv"):
        if base not in results:
            continue
        ref = results[base]["total_ms"]
        for r in results.values():
            r[f"speedup_vs_{base}"] = ref / r["total_ms"] if r["total_ms"] > 0 else 0.0
