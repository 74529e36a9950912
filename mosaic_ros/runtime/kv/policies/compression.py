"""Query-agnostic compression that keeps a stream's host KV under its cap.

``vsb_compress`` is LiveVLM's Vision Sink Bucketing in our form. The policy interface sees
no queries while ingesting, so the vision-to-vision score of a stored token is the
attention the most recent vision tokens would pay it, using their pre-RoPE *keys* as probe
queries (position-free, like the stored keys): for ``probe`` tokens spread over the newest
frame, per KV head, softmax over every live token of the layer (sinks included: they
absorb mass as in real attention), summed over heads and probes. Tokens are then bucketed
along the timeline into ``buckets`` equal-count buckets, and every bucket keeps its own
top-scoring share of the budget, so every part of the video keeps representatives. Sinks
and the local window are protected by the caller; text tokens (time markers, past
questions) score above every vision token, so they go last.

``drop_oldest`` simply forgets the oldest unprotected tokens.
"""

from __future__ import annotations

import torch

from mosaic_ros.runtime.kv.store import HostKVStore


def drop_oldest(live: torch.Tensor, protected: torch.Tensor, target: int) -> torch.Tensor:
    """Ids to evict so that at most ``target`` of ``live`` (n,) ascending remain, oldest first.

    protected: (n,) bool, never evicted (so more than ``target`` may remain).
    """
    excess = max(live.numel() - target, 0)
    return live[~protected][:excess]


def _probe_keys(store: HostKVStore, layer: int, probe: int) -> torch.Tensor:
    """(m, H_kv, D) float32 pre-RoPE keys of up to ``probe`` tokens spread over the layer's newest frame."""
    live = store.live_tokens(layer)
    vision = live[store.modality[live] == 1]
    if vision.numel() == 0:
        vision = live
    frames = store.frame[vision]
    newest = vision[frames == frames[-1]]
    pick = torch.linspace(0, newest.numel() - 1, min(probe, newest.numel())).round().long()
    rows = store.rows_of(layer, newest[pick])
    return store.read_keys(layer, rows).float()


def vision_scores(
    store: HostKVStore, layer: int, among: torch.Tensor, probe: int, chunk: int = 16384
) -> torch.Tensor:
    """(n,) float32 attention mass the newest frame's probe keys pay each of ``among`` (n,) ids,
    softmax taken over ``among``, summed over probes and KV heads."""
    q = _probe_keys(store, layer, probe).permute(1, 0, 2)
    scale = q.shape[-1] ** -0.5
    rows = store.rows_of(layer, among)
    logits = torch.empty(q.shape[0], q.shape[1], among.numel())
    for a in range(0, among.numel(), chunk):
        keys = store.read_keys(layer, rows[a : a + chunk]).float().cpu().permute(1, 2, 0)
        logits[:, :, a : a + chunk] = torch.bmm(q, keys) * scale
    return torch.softmax(logits, dim=-1).sum(dim=(0, 1))


def bucket_top(scores: torch.Tensor, keep: int, buckets: int) -> torch.Tensor:
    """Mask (n,) of ``keep`` entries: ``scores`` (n,) in time order split into equal-count
    buckets, each keeping its proportional share of ``keep`` by descending score."""
    n = scores.numel()
    if keep >= n:
        return torch.ones(n, dtype=torch.bool)
    b = min(buckets, n)
    bucket = torch.arange(n) * b // n
    sizes = torch.bincount(bucket, minlength=b)
    quota = sizes * keep // n
    short = keep - int(quota.sum())
    quota[torch.argsort(sizes * keep % n, descending=True, stable=True)[:short]] += 1
    by_score = torch.argsort(scores, descending=True, stable=True)
    order = by_score[torch.argsort(bucket[by_score], stable=True)]
    starts = torch.cumsum(sizes, 0) - sizes
    rank = torch.arange(n) - starts[bucket[order]]
    mask = torch.zeros(n, dtype=torch.bool)
    mask[order[rank < quota[bucket[order]]]] = True
    return mask


def vsb_compress(
    store: HostKVStore,
    layer: int,
    live: torch.Tensor,
    protected: torch.Tensor,
    target: int,
    buckets: int,
    probe: int,
) -> torch.Tensor:
    """Ids of ``layer`` to release so that ``target`` tokens remain (protected ones always do).

    live: (n,) ascending ids the layer holds; protected: (n,) bool.
    """
    eligible = live[~protected]
    keep = max(target - int(protected.sum()), 0)
    if eligible.numel() <= keep:
        return eligible[:0]
    scores = vision_scores(store, layer, live, probe)[~protected]
    scores[store.modality[eligible] == 0] = float("inf")
    return eligible[~bucket_top(scores, keep, buckets)]
