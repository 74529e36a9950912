"""Online, cohesion-aware clustering of position-free keys: one ``ClusterIndex`` per layer.

A token's pre-RoPE key row ``(H_kv, D)`` (all KV heads together) belongs to exactly one cluster
of its layer, so the store can lay a layer's KV out cluster by cluster. Clusters are
cross-modal and cross-time: any two tokens whose keys are close share a cluster, whatever frame
or modality they came from.

Assignment space
    Each head of a key is L2-normalized, the heads are concatenated and the row is divided by
    ``sqrt(H_kv)``: a unit vector of ``F = H_kv * D`` values. The squared distance of two rows
    is ``2 - 2 * mean_h cos_h``: each head weighs the same whatever its norm, and scaling keys
    changes nothing. Since every row has norm 1, a cluster's variance (its Welford ``M2 / n``,
    the mean squared distance of its members to their mean) equals ``1 - |mean|^2``, so per
    cluster the index keeps the count and the SUM of member rows (exactly reversible when
    tokens are removed) plus the sum of the raw keys, whose mean is what retrieval scores.

Local scale ``s`` and cohesion threshold ``tau`` (adapt per layer; no per-model constant)
    ``s`` is how far a token's key lies from the nearest key of the chunks just before it (the
    reference: the last ``2 * largest chunk`` rows, about two frames): the lower quartile over
    the chunk of ``min_j |x - y_j|^2 / 2`` (half a squared pair distance = the variance of a
    pair), tokens compared only with tokens of the same modality tag. It measures how much
    "the same content" moves from frame to frame in this layer. The lower quartile rather than
    the median: it still measures the same-content mode when only a quarter of a chunk's tokens
    have a match in the reference (new objects, another camera in between). It depends on the
    data only, not on the clusters, so it cannot feed back into itself; it is tracked as a
    moving average of its logarithm (evenly weighted over the first chunks, then
    ``scale_momentum`` per full chunk).
    ``tau = cohesion * s`` (``cohesion = 4``, a ratio of variances, the same for every model and
    layer). A chunk is judged with the scale of the chunks before it and only then updates it,
    so a scene cut cannot loosen its own threshold. A chunk with no same-modality reference
    (the first one) uses its own tokens' nearest neighbours; that sample does not enter the
    average.

Assignment of a chunk (vectorized; small matrix products against the centroids)
    A token is first tested against the clusters the last 4 chunks added to (the content the
    stream is showing now: a handful of clusters whatever the stream's length); only tokens
    none of those accepts are tested against the older clusters, so a revisited scene still
    joins its old clusters. Once a layer has many clusters (``route_min_clusters``, 256),
    ``maintain`` groups them into about ``sqrt(C)`` regions (k-means over cluster means; a
    cluster is re-routed whenever it takes tokens, so an older cluster's region is where it
    ended), and those tokens are compared only with the older clusters of their 2 nearest
    regions: the search stays a small share of the clusters however long the stream. Within
    a set of up to 64 clusters the exact distances to all are computed; in a larger set the
    nearest cluster is found in two stages: a
    coarse ranking in a centred 64-dimensional random projection (one (T, 64) x (64, K)
    product), then exact distances to the 4 best-ranked. A token joins that nearest cluster if
    (a) the cluster's variance after the join stays ``<= tau`` (cohesion);
    (b) the token's squared distance to the centroid is at most
        ``join_radius * max(v, s) * (1 + 1/n)`` for a cluster of ``n`` tokens and variance ``v``
        (a new member of a group of spread ``v`` lands at ``v * (1 + 1/n)`` on average): the
        token looks like a member of THIS cluster, so a big or diffuse cluster cannot swallow a
        token that barely moves its variance;
    (c) the cluster is below the hard cap ``2 * max_cluster_tokens``.
    The other tokens are grouped among themselves (densest first: a leader takes every remaining
    token within ``2 * join_radius * s``, the same rule as joining a one-token cluster) and each
    group opens a new cluster. Every token is tested against the clusters as they were before
    the chunk, so several tokens joining one cluster together may leave it somewhat above
    ``tau``; the looseness check below catches that.

Deferred splitting
    After each assignment, clusters whose variance exceeds ``loose_factor * tau`` or whose size
    exceeds ``max_cluster_tokens`` are queued, never split there. ``maintain`` pops the queue
    and splits each cluster by 2-means (deterministic farthest-point seeds), recomputes the
    children's statistics exactly from their keys and re-queues children that still violate.

Cluster ids index every per-cluster tensor (``num_slots`` of them). Ids of clusters emptied by
``remove_tokens`` are reused by later clusters; a split keeps the parent's id for its first
child. Callers that cache by cluster id apply ``MaintenanceReport``s and removals in order.
"""

from __future__ import annotations

import heapq
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from mosaic_ros.runtime.kv.kernels import centroid_scores

KeyLookup = Callable[[Tensor], Tensor]
"""``key_lookup(token_ids (n,) int64) -> (n, H_kv, D)`` pre-RoPE keys of those tokens."""

_MIN_SCALE = 1e-6  # floor of the local scale (unit-sphere variance units)
_SCALE_QUANTILE = 0.25  # share of a chunk's tokens that need a same-content match in the reference
_REF_CHUNKS = 2  # the reference holds this many largest-chunk sizes of the most recent rows
_SCALE_PROBES = 64  # tokens per chunk whose nearest reference distance is measured
_PROJ_DIM = 64  # dimensions of the coarse nearest-cluster search
_CANDIDATES = 4  # clusters per token whose exact distance the fine search evaluates
_EXACT_MAX = 64  # up to this many clusters, exact distances to all of them (no coarse stage)
_RECENT_CHUNKS = 4  # clusters touched by this many latest chunks are searched first
_PROBE_REGIONS = 2  # regions of older clusters a rejected token's search opens
_REGION_ITERS = 5  # k-means iterations when the regions are rebuilt


@dataclass(frozen=True)
class ClusterConfig:
    """Knobs of a ``ClusterIndex``. All are ratios or sizes; none depends on the model.

    cohesion: ``tau`` (the largest variance a join may leave) in units of the layer's local scale.
    join_radius: a token may join a cluster of ``n`` tokens only within squared distance
        ``join_radius * max(variance, local scale) * (1 + 1/n)`` of its centroid.
    loose_factor: clusters with variance above ``loose_factor * tau`` are queued for splitting.
    max_cluster_tokens: clusters above this size are queued for splitting; at twice this size a
        cluster accepts no more tokens.
    scale_momentum: weight of one chunk (of the largest chunk size seen) in the moving average of
        the log local scale; the first chunks are averaged evenly.
    split_iters: 2-means iterations per split.
    route_min_clusters: from this many live clusters on, ``maintain`` groups the clusters into
        about ``sqrt(C)`` regions, and a token no recent cluster accepts is compared with the
        older clusters of its nearest regions only.
    """

    cohesion: float = 4.0
    join_radius: float = 3.0
    loose_factor: float = 1.5
    max_cluster_tokens: int = 256
    scale_momentum: float = 0.2
    split_iters: int = 6
    route_min_clusters: int = 256

    def __post_init__(self) -> None:
        if self.cohesion <= 0 or self.join_radius <= 0 or self.loose_factor < 1:
            raise ValueError("cohesion and join_radius must be > 0 and loose_factor >= 1")
        if self.max_cluster_tokens < 1 or self.split_iters < 1 or self.route_min_clusters < 1:
            raise ValueError("max_cluster_tokens, split_iters and route_min_clusters must be >= 1")
        if not 0 < self.scale_momentum <= 1:
            raise ValueError(f"scale_momentum must be in (0, 1], got {self.scale_momentum}")


@dataclass
class Split:
    """One split: ``parent`` was replaced by ``children`` (``children[0] == parent``).

    members: the children's token ids, (n0,) and (n1,) int64 ascending; together exactly the
    parent's members before the split.
    """

    parent: int
    children: tuple[int, int]
    members: tuple[Tensor, Tensor]


@dataclass
class MaintenanceReport:
    """What one ``maintain`` call did: the splits in order, the milliseconds spent, clusters still queued."""

    splits: list[Split]
    ms: float
    pending: int


def require(ok: bool, message: str) -> None:
    """``AssertionError(message)`` unless ``ok``: the failures of ``check_invariants``."""
    if not ok:
        raise AssertionError(message)


class ClusterIndex:
    """Clusters of one layer's position-free keys, built online, scored in one batched product.

    Statistics live on ``device`` (float32); token bookkeeping (token -> cluster, members) on the
    CPU. Token ids are int64, strictly increasing across ``assign`` calls (gaps allowed).
    Not thread-safe.
    """

    def __init__(
        self,
        num_kv_heads: int,
        head_dim: int,
        config: ClusterConfig | None = None,
        device: torch.device | str = "cpu",
    ) -> None:
        if num_kv_heads <= 0 or head_dim <= 0:
            raise ValueError(f"num_kv_heads and head_dim must be positive, got {num_kv_heads}, {head_dim}")
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.config = config or ClusterConfig()
        self.device = torch.device(device)
        width = num_kv_heads * head_dim
        self._slots = 0
        self._count = torch.zeros(0, dtype=torch.int64, device=self.device)
        self._sum_unit = torch.zeros(0, width, dtype=torch.float32, device=self.device)
        self._sum_raw = torch.zeros(0, width, dtype=torch.float32, device=self.device)
        self._sum_norm2 = torch.zeros(0, dtype=torch.float32, device=self.device)  # |sum_unit|^2
        proj_dim = min(width, _PROJ_DIM)
        if proj_dim == width:
            self._proj = torch.eye(width, device=self.device)
        else:
            gen = torch.Generator().manual_seed(0)
            self._proj = (torch.randn(width, proj_dim, generator=gen) / math.sqrt(proj_dim)).to(self.device)
        self._sum_proj = torch.zeros(0, proj_dim, dtype=torch.float32, device=self.device)  # sum_unit @ proj
        self._touched = torch.zeros(0, dtype=torch.int64, device=self.device)  # last chunk that added to it
        self._chunks = 0  # chunks assigned so far
        # regions over the clusters (rebuilt in maintain): region id per cluster (-1: none yet),
        # centres (G, P) in the projected space, and the live clusters when last built
        self._region = torch.zeros(0, dtype=torch.int64, device=self.device)
        self._region_centers: Tensor | None = None
        self._routed = 0
        self._ranked = 0  # (token, cluster) pairs the coarse search of the last chunk ranked
        self._ranked_tokens = 0
        self._free: list[int] = []  # heap of reusable ids
        self._members: list[list[Tensor]] = []
        self._queue: deque[int] = deque()
        self._queued: set[int] = set()
        self._centroid_cache: Tensor | None = None
        # token bookkeeping, CPU: entry i describes token id ``_base + i``
        self._base = 0
        self._tok_len = 0
        self._tok_cluster = torch.zeros(0, dtype=torch.int64)
        self._tok_modality = torch.zeros(0, dtype=torch.uint8)
        self._last_id: int | None = None
        self._assigned = 0
        self._removed = 0
        # local scale
        self._ref = torch.zeros(0, width, dtype=torch.float32, device=self.device)
        self._ref_modality = torch.zeros(0, dtype=torch.uint8, device=self.device)
        self._chunk_max = 0
        self._log_scale: float | None = None
        self._scale_updates = 0

    # -----------------------------------------------------------------------------------------
    # accessors
    # -----------------------------------------------------------------------------------------

    @property
    def num_slots(self) -> int:
        """Length C of every per-cluster tensor (live clusters plus unused ids)."""
        return self._slots

    @property
    def num_clusters(self) -> int:
        """Live (non-empty) clusters."""
        return int((self._count[: self._slots] > 0).sum())

    @property
    def num_tokens(self) -> int:
        """Tokens currently held (assigned minus removed)."""
        return self._assigned - self._removed

    @property
    def counts(self) -> Tensor:
        """(C,) int64 tokens per cluster id (0 for unused ids)."""
        return self._count[: self._slots].clone()

    @property
    def centroids(self) -> Tensor:
        """(C, H_kv, D) float32 mean RAW pre-RoPE key per cluster (zeros for unused ids). Read-only."""
        if self._centroid_cache is None:
            n = self._count[: self._slots].clamp_min(1).to(torch.float32)
            mean = self._sum_raw[: self._slots] / n[:, None]
            self._centroid_cache = mean.view(self._slots, self.num_kv_heads, self.head_dim)
        return self._centroid_cache

    @property
    def variances(self) -> Tensor:
        """(C,) float32 variance of each cluster in the assignment space (0 for unused ids)."""
        return self._variance(self._count[: self._slots], self._sum_norm2[: self._slots])

    @property
    def local_scale(self) -> float | None:
        """Current local scale ``s`` of the layer (unit-sphere variance), None before it is known."""
        return None if self._log_scale is None else math.exp(self._log_scale)

    @property
    def threshold(self) -> float | None:
        """Current cohesion threshold ``tau = cohesion * s``, None before any scale is known."""
        scale = self.local_scale
        return None if scale is None else self.config.cohesion * scale

    @property
    def search_width(self) -> float:
        """Clusters the last chunk's nearest-cluster search ranked per token (0 before any search)."""
        return self._ranked / self._ranked_tokens if self._ranked_tokens else 0.0

    @property
    def regions(self) -> int:
        """Regions the older clusters are grouped into for the search (0: none built yet)."""
        return 0 if self._region_centers is None else self._region_centers.shape[0]

    @property
    def pending(self) -> list[int]:
        """Cluster ids queued for splitting, in queue order."""
        return list(self._queue)

    def members(self, cluster_id: int) -> Tensor:
        """(n,) int64 ascending token ids of a cluster (empty for an unused id). Read-only."""
        if not 0 <= cluster_id < self._slots:
            raise IndexError(f"cluster id {cluster_id} out of range [0, {self._slots})")
        parts = self._members[cluster_id]
        if not parts:
            return torch.zeros(0, dtype=torch.int64)
        if len(parts) > 1:
            parts[:] = [torch.cat(parts)]
        return parts[0]

    def cluster_of(self, token_ids: Tensor) -> Tensor:
        """(n,) int64 cluster id of each token id, -1 for ids not held (never assigned or removed)."""
        ids = token_ids.to("cpu", torch.int64).reshape(-1)
        idx = ids - self._base
        known = (idx >= 0) & (idx < self._tok_len)
        out = torch.full_like(ids, -1)
        out[known] = self._tok_cluster[idx[known]]
        return out

    def modality_counts(self) -> Tensor:
        """(C, M) int64 tokens per cluster and modality value (M = largest modality held + 1)."""
        cid = self._tok_cluster[: self._tok_len]
        held = cid >= 0
        mod = self._tok_modality[: self._tok_len][held].to(torch.int64)
        width = int(mod.max()) + 1 if mod.numel() else 1
        flat = torch.bincount(cid[held] * width + mod, minlength=self._slots * width)
        return flat.view(self._slots, width)

    # -----------------------------------------------------------------------------------------
    # assignment
    # -----------------------------------------------------------------------------------------

    def assign(self, keys: Tensor, token_ids: Tensor, modality: Tensor | None = None) -> Tensor:
        """Place a chunk of tokens into clusters; returns their cluster ids, (T,) int64 on the CPU.

        keys: (T, H_kv, D) pre-RoPE keys, any float dtype/device; token_ids: (T,) int64 strictly
        increasing and above every id given before; modality: optional (T,) uint8 per-token tag
        (0 when omitted). Tokens of any modality may share a cluster; the tag only keeps the
        local-scale measurement within a modality and feeds ``modality_counts``. Clusters that
        become too loose or too large are queued for ``maintain``, never split here.
        """
        count = self._check_chunk(keys, token_ids, modality)
        ids = token_ids.to("cpu", torch.int64)
        if count == 0:
            return ids.clone()
        unit, raw = self._embed(keys)
        proj = unit @ self._proj  # (T, P): the coarse search, region routing and projected sums
        tags = torch.zeros(count, dtype=torch.uint8) if modality is None else modality.to("cpu", torch.uint8)
        tags = tags.to(self.device)
        sample, from_reference = self._scale_sample(unit, tags)
        scale = self.local_scale if self._log_scale is not None else sample
        cid = torch.full((count,), -1, dtype=torch.int64, device=self.device)
        self._ranked, self._ranked_tokens = 0, count
        if scale is not None and self.num_clusters > 0:
            cid = self._join_existing(unit, proj, scale)
        rejected = (cid < 0).nonzero().squeeze(1)
        if rejected.numel():
            radius = None if scale is None else 2.0 * self.config.join_radius * scale
            labels, groups = self._group(unit[rejected], radius)
            new_ids = torch.tensor(self._alloc(groups), dtype=torch.int64, device=self.device)
            cid[rejected] = new_ids[labels]
        self._add_stats(cid, unit, raw, sign=1.0, proj=proj)
        self._route(cid.unique())  # where they stand now: an older cluster's region stays current
        self._chunks += 1
        self._touched[cid] = self._chunks
        cid = cid.cpu()
        self._record(ids, cid, modality)
        if from_reference:
            self._update_scale(sample, count)
        self._chunk_max = max(self._chunk_max, count)
        keep = _REF_CHUNKS * self._chunk_max
        self._ref = torch.cat((self._ref, unit))[-keep:]
        self._ref_modality = torch.cat((self._ref_modality, tags))[-keep:]
        self._queue_violators()
        return cid

    def _check_chunk(self, keys: Tensor, token_ids: Tensor, modality: Tensor | None) -> int:
        shape = (self.num_kv_heads, self.head_dim)
        if keys.dim() != 3 or tuple(keys.shape[1:]) != shape:
            raise ValueError(f"keys must be (T, {shape[0]}, {shape[1]}), got {tuple(keys.shape)}")
        count = keys.shape[0]
        if token_ids.shape != (count,):
            raise ValueError(f"token_ids must be ({count},), got {tuple(token_ids.shape)}")
        if modality is not None and modality.shape != (count,):
            raise ValueError(f"modality must be ({count},), got {tuple(modality.shape)}")
        if count:
            ids = token_ids.to("cpu", torch.int64)
            if count > 1 and not bool((ids[1:] > ids[:-1]).all()):
                raise ValueError("token_ids must be strictly increasing")
            if self._last_id is not None and int(ids[0]) <= self._last_id:
                raise ValueError(f"token id {int(ids[0])} is not above the last assigned id {self._last_id}")
        return count

    def _embed(self, keys: Tensor) -> tuple[Tensor, Tensor]:
        """(unit (T, F) assignment-space rows, raw (T, F) float32 keys) on the index's device."""
        raw = keys.to(self.device, torch.float32).reshape(keys.shape[0], self.num_kv_heads, self.head_dim)
        unit = raw / raw.norm(dim=-1, keepdim=True).clamp_min(1e-30) / math.sqrt(self.num_kv_heads)
        return unit.reshape(raw.shape[0], -1), raw.reshape(raw.shape[0], -1)

    def _scale_sample(self, unit: Tensor, tags: Tensor) -> tuple[float | None, bool]:
        """(lower quartile of half the squared nearest-neighbour distance, whether from the reference).

        Tokens are only compared with tokens of the same modality tag (a frame after the system
        prompt is not measured against text). The reference is the previous chunk(s), probed by
        at most ``_SCALE_PROBES`` evenly spaced tokens of the chunk (a quantile needs no more).
        When no probe has a same-modality reference row, every token of the chunk is compared
        with the chunk's other tokens instead; that sample decides this chunk only.
        """
        if self._ref.shape[0]:
            stride = -(-unit.shape[0] // _SCALE_PROBES)
            sims = unit[::stride] @ self._ref.T
            sims.masked_fill_(tags[::stride, None] != self._ref_modality[None, :], -math.inf)
            sample = self._quartile(sims)
            if sample is not None:
                return sample, True
        sims = (unit @ unit.T).fill_diagonal_(-math.inf)
        return self._quartile(sims.masked_fill_(tags[:, None] != tags[None, :], -math.inf)), False

    @staticmethod
    def _quartile(sims: Tensor) -> float | None:
        """Lower quartile over rows of ``1 - max_j sims[i, j]`` (rows with a finite max), floored."""
        best = sims.max(dim=1).values if sims.shape[1] else sims.new_zeros(0)
        best = best[best > -math.inf]
        if best.numel() == 0:
            return None
        nearest = (2.0 - 2.0 * best).clamp_min(0.0)
        return max(float(nearest.quantile(_SCALE_QUANTILE)) / 2.0, _MIN_SCALE)

    def _update_scale(self, sample: float, count: int) -> None:
        self._scale_updates += 1
        if self._log_scale is None:
            self._log_scale = math.log(sample)
            return
        rate = max(self.config.scale_momentum, 1.0 / self._scale_updates) * min(1.0, count / self._chunk_max)
        self._log_scale += rate * (math.log(sample) - self._log_scale)

    @staticmethod
    def _variance(count: Tensor, sum_norm2: Tensor) -> Tensor:
        """Variance ``1 - |sum / n|^2`` of unit rows from count and squared norm of their sum (0 if empty)."""
        n = count.clamp_min(1).to(torch.float32)
        return torch.where(count > 0, (1.0 - sum_norm2 / (n * n)).clamp_min(0.0), torch.zeros_like(n))

    def _join_existing(self, unit: Tensor, proj: Tensor, scale: float) -> Tensor:
        """Join test for every token at once: cluster id, or -1 where rejected.

        Recent clusters first: a chunk's tokens are tested against the clusters the last
        ``_RECENT_CHUNKS`` chunks touched (consecutive frames mostly show the same content, so
        these few clusters take most tokens). Only the tokens they reject are tested against the
        older clusters, so content seen long ago (a revisited scene) still joins its clusters,
        while a chunk that continues the recent content costs the same however many clusters
        the stream has made.
        """
        live = self._count[: self._slots] > 0
        recent = live & (self._touched[: self._slots] > self._chunks - _RECENT_CHUNKS)
        older = live & ~recent
        if not bool(recent.any()) or not bool(older.any()):
            return self._nearest_join(unit, proj, scale, live.nonzero().squeeze(1))
        cid = self._nearest_join(unit, proj, scale, recent.nonzero().squeeze(1))
        rejected = (cid < 0).nonzero().squeeze(1)
        if rejected.numel():
            unit, proj = unit[rejected], proj[rejected]
            # The opened regions may hold no older cluster (only the recent ones, or none: a
            # long run of new content routes its own clusters there): then nothing older is
            # near, and the rejected tokens open clusters of their own.
            older = self._probe_regions(proj, older)
            if bool(older.any()):
                cid[rejected] = self._nearest_join(unit, proj, scale, older.nonzero().squeeze(1))
        return cid

    def _probe_regions(self, proj: Tensor, older: Tensor) -> Tensor:
        """The part of the ``older`` mask (C,) the rows' searches open: once regions exist, the
        clusters of each row's ``_PROBE_REGIONS`` nearest regions (their union over the rows:
        rows that start new content together are alike) plus clusters not routed yet."""
        centers = self._region_centers
        if centers is None:
            return older
        probe = min(_PROBE_REGIONS, centers.shape[0])
        near = self._nearness(proj, centers).topk(probe, dim=1).indices
        opened = torch.zeros(centers.shape[0] + 1, dtype=torch.bool, device=self.device)
        opened[near.reshape(-1)] = True
        opened[-1] = True  # region -1 (not routed) indexes the last entry
        return older & opened[self._region[: self._slots]]

    def _nearest_join(self, unit: Tensor, proj: Tensor, scale: float, clusters: Tensor) -> Tensor:
        """Nearest of ``clusters`` (live ids, (K,) K >= 1) for every row, if it may join: its id, else -1.

        ``unit`` (T, F) rows and ``proj`` (T, P) their projections. Up to ``_EXACT_MAX`` clusters
        (the recent ones, as a rule) the exact distances to all of them come from one (T, F) x
        (F, K) product. Beyond, search in two stages. Coarse: rows and centroids, centred on
        the mean of the recent reference rows (keys share a large common direction; centring
        keeps the projection error proportional to the small differences that matter) and
        projected to ``P = min(F, 64)`` dimensions with a fixed random matrix (``proj``), rank
        the clusters in one (T, P) x (P, K) product.
        Fine: the exact distances to the ``_CANDIDATES`` best-ranked clusters pick the nearest.
        The projection is linear, so per-cluster projected sums are kept alongside the sums.
        """
        self._ranked += unit.shape[0] * clusters.numel()
        inv_n = 1.0 / self._count[clusters].to(torch.float32)
        if clusters.numel() > _EXACT_MAX:
            center = self._ref.mean(dim=0) @ self._proj  # (P,)
            mean_proj = self._sum_proj[clusters] * inv_n[:, None] - center  # (K, P) centred projected means
            rank = (proj - center) @ mean_proj.T  # (T, K)
            rank.sub_(0.5 * (mean_proj * mean_proj).sum(dim=1))
            cand = clusters[rank.topk(_CANDIDATES, dim=1).indices]  # (T, k) ids
            cand_inv_n = 1.0 / self._count[cand].to(torch.float32)
            dots = torch.bmm(self._sum_unit[cand], unit[:, :, None])[:, :, 0]  # (T, k) x . sums
            dist = 1.0 - 2.0 * dots * cand_inv_n + self._sum_norm2[cand] * cand_inv_n * cand_inv_n
            nearest_dist, pick = dist.min(dim=1)
            nearest = cand.gather(1, pick[:, None])[:, 0]
        else:
            dots = unit @ self._sum_unit[clusters].T  # (T, K)
            dist = 1.0 - 2.0 * dots * inv_n + self._sum_norm2[clusters] * inv_n * inv_n
            nearest_dist, pick = dist.min(dim=1)
            nearest = clusters[pick]
        nearest_dist = nearest_dist.clamp_min(0.0)
        size = self._count[nearest].to(torch.float32)
        var = self._variance(self._count[nearest], self._sum_norm2[nearest])
        var_after = (size * var + size / (size + 1.0) * nearest_dist) / (size + 1.0)
        ok = (
            (var_after <= self.config.cohesion * scale)
            & (nearest_dist <= self.config.join_radius * var.clamp_min(scale) * (1.0 + 1.0 / size))
            & (size < 2 * self.config.max_cluster_tokens)
        )
        return torch.where(ok, nearest, torch.full_like(nearest, -1))

    @staticmethod
    def _group(unit: Tensor, radius: float | None) -> tuple[Tensor, int]:
        """Group rows (R, F) densest-first, squared pair distance ``<= radius``: (labels (R,), groups).

        ``radius`` None (no scale known yet) gives every row its own group.
        """
        rows = unit.shape[0]
        if radius is None or rows == 1:
            return torch.arange(rows, device=unit.device), rows
        near = (2.0 - 2.0 * (unit @ unit.T)) <= radius  # (R, R), diagonal true
        labels = torch.empty(rows, dtype=torch.int64, device=unit.device)
        free = torch.ones(rows, dtype=torch.bool, device=unit.device)
        groups, left = 0, rows
        while left:
            degree = (near & free[None, :]).sum(dim=1).masked_fill(~free, -1)
            members = near[int(degree.argmax())] & free
            labels[members] = groups
            free &= ~members
            left -= int(members.sum())
            groups += 1
        return labels, groups

    @staticmethod
    def _nearness(points: Tensor, centers: Tensor) -> Tensor:
        """(n, G) ``x . c - |c|^2 / 2``: for each point, larger means a nearer centre."""
        return points @ centers.T - 0.5 * (centers * centers).sum(dim=1)

    def _route(self, clusters: Tensor) -> None:
        """Put ``clusters`` (ids, statistics set) into their nearest regions, if regions exist."""
        centers = self._region_centers
        if centers is None or clusters.numel() == 0:
            return
        mean = self._sum_proj[clusters] / self._count[clusters].clamp_min(1).to(torch.float32)[:, None]
        near = self._nearness(mean, centers).argmax(dim=1)
        self._region[clusters] = near

    def _rebuild_regions(self) -> None:
        """Group the live clusters into ``ceil(sqrt(C))`` regions: k-means over their projected means
        (seeds: evenly spaced live clusters; deterministic)."""
        live = (self._count[: self._slots] > 0).nonzero().squeeze(1)
        mean = self._sum_proj[live] / self._count[live].to(torch.float32)[:, None]
        k = math.isqrt(live.numel() - 1) + 1
        centers = mean[torch.linspace(0, live.numel() - 1, k, device=self.device).round().long()].clone()
        for _ in range(_REGION_ITERS):
            near = self._nearness(mean, centers).argmax(dim=1)
            sums = torch.zeros_like(centers).index_add_(0, near, mean)
            sizes = torch.bincount(near, minlength=k).to(torch.float32)
            centers = torch.where(sizes[:, None] > 0, sums / sizes.clamp_min(1)[:, None], centers)
        near = self._nearness(mean, centers).argmax(dim=1)
        self._region.fill_(-1)
        self._region[live] = near
        self._region_centers = centers
        self._routed = live.numel()

    def _alloc(self, k: int) -> list[int]:
        """k cluster ids for new clusters: smallest unused first, then fresh ones."""
        ids = [heapq.heappop(self._free) for _ in range(min(k, len(self._free)))]
        fresh = k - len(ids)
        if fresh:
            self._grow(self._slots + fresh)
            ids.extend(range(self._slots, self._slots + fresh))
            self._members.extend([] for _ in range(fresh))
            self._slots += fresh
        return ids

    def _grow(self, slots: int) -> None:
        capacity = self._count.shape[0]
        if slots <= capacity:
            return
        capacity = max(slots, 2 * capacity, 16)
        old = (self._count, self._sum_unit, self._sum_raw, self._sum_norm2, self._sum_proj, self._touched)
        grown = [torch.zeros((capacity, *t.shape[1:]), dtype=t.dtype, device=self.device) for t in old]
        for new, t in zip(grown, old, strict=True):
            new[: t.shape[0]] = t
        self._count, self._sum_unit, self._sum_raw, self._sum_norm2, self._sum_proj, self._touched = grown
        region = torch.full((capacity,), -1, dtype=torch.int64, device=self.device)
        region[: self._region.shape[0]] = self._region
        self._region = region

    def _add_stats(
        self, cid: Tensor, unit: Tensor, raw: Tensor, sign: float, proj: Tensor | None = None
    ) -> None:
        cid = cid.to(self.device)
        self._count.index_add_(0, cid, torch.full_like(cid, int(sign)))
        self._sum_unit.index_add_(0, cid, unit, alpha=sign)
        self._sum_raw.index_add_(0, cid, raw, alpha=sign)
        self._sum_proj.index_add_(0, cid, unit @ self._proj if proj is None else proj, alpha=sign)
        touched = cid.unique()
        self._sum_norm2[touched] = (self._sum_unit[touched] ** 2).sum(dim=1)
        self._centroid_cache = None

    def _record(self, ids: Tensor, cid: Tensor, modality: Tensor | None) -> None:
        """Token map and member lists for a new chunk (ids ascending, cid on the CPU)."""
        if self._last_id is None:
            self._base = int(ids[0])
        needed = int(ids[-1]) - self._base + 1
        if needed > self._tok_cluster.shape[0]:
            capacity = max(needed, 2 * self._tok_cluster.shape[0], 1024)
            cluster = torch.full((capacity,), -1, dtype=torch.int64)
            cluster[: self._tok_len] = self._tok_cluster[: self._tok_len]
            mod = torch.zeros(capacity, dtype=torch.uint8)
            mod[: self._tok_len] = self._tok_modality[: self._tok_len]
            self._tok_cluster, self._tok_modality = cluster, mod
        self._tok_len = needed
        self._tok_cluster[ids - self._base] = cid
        if modality is not None:
            self._tok_modality[ids - self._base] = modality.to("cpu", torch.uint8)
        self._last_id = int(ids[-1])
        self._assigned += ids.shape[0]
        order = torch.argsort(cid, stable=True)
        touched, sizes = torch.unique_consecutive(cid[order], return_counts=True)
        for c, part in zip(touched.tolist(), torch.split(ids[order], sizes.tolist()), strict=True):
            self._members[c].append(part)

    def _violates(self, count: Tensor, sum_norm2: Tensor) -> Tensor:
        """Boolean per cluster: too large, or looser than ``loose_factor * tau``."""
        bad = count > self.config.max_cluster_tokens
        tau = self.threshold
        if tau is not None:
            bad |= (count > 1) & (self._variance(count, sum_norm2) > self.config.loose_factor * tau)
        return bad

    def _queue_violators(self) -> None:
        bad = self._violates(self._count[: self._slots], self._sum_norm2[: self._slots])
        for c in bad.nonzero().squeeze(1).tolist():
            if c not in self._queued:
                self._queued.add(c)
                self._queue.append(c)

    # -----------------------------------------------------------------------------------------
    # removal (eviction)
    # -----------------------------------------------------------------------------------------

    def remove_tokens(self, token_ids: Tensor, keys: Tensor) -> Tensor:
        """Drop tokens (e.g. evicted under a memory cap); returns ids of clusters left empty, (k,) int64.

        token_ids: (n,) int64 distinct; keys: (n, H_kv, D) their pre-RoPE keys as given to
        ``assign`` (needed to take them out of the running sums). Ids not held are ignored.
        Emptied cluster ids become free for reuse by later clusters.
        """
        ids = token_ids.to("cpu", torch.int64).reshape(-1)
        if keys.shape != (ids.shape[0], self.num_kv_heads, self.head_dim):
            raise ValueError(f"keys must be ({ids.shape[0]}, {self.num_kv_heads}, {self.head_dim})")
        if ids.unique().shape[0] != ids.shape[0]:
            raise ValueError("token_ids must be distinct")
        cid = self.cluster_of(ids)
        held = (cid >= 0).nonzero().squeeze(1)
        if held.numel() == 0:
            return torch.zeros(0, dtype=torch.int64)
        ids, cid = ids[held], cid[held]
        unit, raw = self._embed(keys[held.to(keys.device)])
        self._add_stats(cid, unit, raw, sign=-1.0)
        self._tok_cluster[ids - self._base] = -1
        self._removed += ids.shape[0]
        order = torch.argsort(cid, stable=True)
        touched, sizes = torch.unique_consecutive(cid[order], return_counts=True)
        emptied = []
        for c, gone in zip(touched.tolist(), torch.split(ids[order], sizes.tolist()), strict=True):
            keep = self.members(c)
            keep = keep[~torch.isin(keep, gone)]
            self._members[c] = [keep] if keep.numel() else []
            if not keep.numel():
                emptied.append(c)
        for c in emptied:  # exact zeros, not float residue
            self._sum_unit[c] = 0.0
            self._sum_raw[c] = 0.0
            self._sum_norm2[c] = 0.0
            self._sum_proj[c] = 0.0
            heapq.heappush(self._free, c)
        if self._queued.intersection(emptied):
            self._queued.difference_update(emptied)
            self._queue = deque(c for c in self._queue if c in self._queued)
        self._trim_token_map()
        return torch.tensor(emptied, dtype=torch.int64)

    def _trim_token_map(self) -> None:
        """Forget the leading run of removed token ids once it is most of the map."""
        held = (self._tok_cluster[: self._tok_len] >= 0).nonzero()
        drop = int(held[0]) if held.numel() else self._tok_len
        if drop >= 1024 and 2 * drop >= self._tok_len:
            self._tok_cluster = self._tok_cluster[drop:].clone()
            self._tok_modality = self._tok_modality[drop:].clone()
            self._base += drop
            self._tok_len -= drop

    # -----------------------------------------------------------------------------------------
    # maintenance
    # -----------------------------------------------------------------------------------------

    def maintain(self, key_lookup: KeyLookup, budget_ms: float) -> MaintenanceReport:
        """Split queued clusters, oldest first, while less than ``budget_ms`` milliseconds have passed.

        A split is started only while time is left, so the call may overrun the budget by one
        split (a few hundred member keys: well under a millisecond of work plus ``key_lookup``).
        ``budget_ms <= 0`` does nothing. Queued clusters that no longer violate are dropped.
        First, once there are ``route_min_clusters`` live clusters and twice as many as when the
        regions were last built, the regions are rebuilt (a few k-means passes over the cluster
        means: about a millisecond per thousand clusters).
        """
        start = time.perf_counter()
        splits: list[Split] = []
        live = self.num_clusters
        if budget_ms > 0 and live >= self.config.route_min_clusters and live >= 2 * self._routed:
            self._rebuild_regions()
        while self._queue and (time.perf_counter() - start) * 1e3 < budget_ms:
            c = self._queue.popleft()
            self._queued.discard(c)
            count = self._count[c : c + 1]
            if int(count) >= 2 and bool(self._violates(count, self._sum_norm2[c : c + 1])):
                splits.append(self._split(c, key_lookup))
        return MaintenanceReport(splits, (time.perf_counter() - start) * 1e3, len(self._queue))

    def _split(self, parent: int, key_lookup: KeyLookup) -> Split:
        members = self.members(parent)
        unit, raw = self._embed(key_lookup(members))
        side = self._two_means(unit, self.config.split_iters)
        (child,) = self._alloc(1)
        # both children's sums in one product: rows (side == 0, side == 1) x members
        onehot = torch.stack((~side, side)).to(torch.float32)
        sums_unit, sums_raw = onehot @ unit, onehot @ raw
        pair = [parent, child]
        self._count[pair] = onehot.sum(dim=1).to(torch.int64)
        self._sum_unit[pair] = sums_unit
        self._sum_raw[pair] = sums_raw
        self._sum_norm2[pair] = (sums_unit * sums_unit).sum(dim=1)
        self._sum_proj[pair] = sums_unit @ self._proj
        self._touched[child] = self._touched[parent]
        self._route(torch.tensor(pair, device=self.device))
        side = side.cpu()
        halves = (members[~side], members[side])
        self._members[parent] = [halves[0]]
        self._members[child] = [halves[1]]
        self._tok_cluster[halves[1] - self._base] = child
        self._centroid_cache = None
        bad = self._violates(self._count[pair], self._sum_norm2[pair])
        for c, b in zip(pair, bad.tolist(), strict=True):
            if b and c not in self._queued:
                self._queued.add(c)
                self._queue.append(c)
        return Split(parent, (parent, child), halves)

    @staticmethod
    def _two_means(unit: Tensor, iters: int) -> Tensor:
        """Boolean side (n,) of a 2-means partition of unit rows (n >= 2); both sides non-empty.

        Seeds: the row farthest from the mean, then the row farthest from it (deterministic).
        Side means come from products with the side mask, not from gathered copies. Identical
        rows fall back to halving in token order.
        """
        n = unit.shape[0]
        total = unit.sum(dim=0)
        a = unit[int((unit @ total).argmin())]
        b = unit[int((unit @ a).argmin())]
        side = torch.zeros(n, dtype=torch.bool, device=unit.device)
        for _ in range(iters):
            # closer to b than to a: |x - b|^2 < |x - a|^2  <=>  x.(b - a) > (|b|^2 - |a|^2) / 2
            new_side = unit @ (b - a) > 0.5 * float(b @ b - a @ a)
            n_b = int(new_side.sum())
            done = n_b in (0, n) or torch.equal(new_side, side)
            side = new_side
            if done:
                break
            sum_b = new_side.to(unit.dtype) @ unit
            a, b = (total - sum_b) / (n - n_b), sum_b / n_b
        if not 0 < int(side.sum()) < n:
            side = torch.arange(n, device=unit.device) >= n // 2
        return side

    # -----------------------------------------------------------------------------------------
    # retrieval
    # -----------------------------------------------------------------------------------------

    def score(self, query: Tensor, *, scale: float | None = None, backend: str | None = None) -> Tensor:
        """(C,) float32 log estimated attention share of every cluster for ``query`` (H_q, L_q, D).

        ``query`` must be position-free (pre-RoPE) like the centroids. All clusters and KV heads
        go through one batched product (``kernels.centroid_scores``, which documents the
        aggregation) on the index's device; unused ids score ``-inf``.
        """
        counts = self._count[: self._slots]
        return centroid_scores(query, self.centroids, counts, scale=scale, backend=backend)

    # -----------------------------------------------------------------------------------------
    # checks
    # -----------------------------------------------------------------------------------------

    def check_invariants(self, key_lookup: KeyLookup, atol: float = 1e-3) -> None:
        """Raise AssertionError, saying what broke, unless the index is consistent.

        Every token assigned and not removed is in exactly one cluster (token map and member
        lists agree, nothing is lost by splits); counts, centroids (assignment space, its
        projection for the coarse search, and raw) and variances match a recomputation from the
        member keys within ``atol`` (float32 running sums drift by about one rounding per
        update; raw centroids are compared relative to the largest key magnitude); unused ids
        are empty and reusable; the split queue is valid.
        """
        slots = self._slots
        count = self._count[:slots].cpu()
        cid = self._tok_cluster[: self._tok_len]
        held_idx = (cid >= 0).nonzero().squeeze(1)
        held_ids = held_idx + self._base
        held_cid = cid[held_idx]
        require(
            held_ids.numel() == self.num_tokens,
            f"{held_ids.numel()} tokens mapped to clusters, expected {self._assigned} assigned - "
            f"{self._removed} removed = {self.num_tokens}",
        )
        require(bool((held_cid < slots).all()), "a token maps to a cluster id beyond num_slots")
        mapped = torch.bincount(held_cid, minlength=slots)
        require(
            torch.equal(mapped, count),
            f"counts disagree with the token map at ids {(mapped != count).nonzero().flatten().tolist()}",
        )
        members = [self.members(c) for c in range(slots)]
        sizes = torch.tensor([m.numel() for m in members], dtype=torch.int64)
        bad = (sizes != count).nonzero().flatten().tolist()
        require(not bad, f"member lists disagree with counts at cluster ids {bad[:10]}")
        if members:
            flat = torch.cat(members)
            owner = torch.repeat_interleave(torch.arange(slots), sizes)
            wrong = owner[self.cluster_of(flat) != owner].unique().tolist()
            require(not wrong, f"clusters {wrong[:10]} list a token mapped elsewhere (duplicated or lost)")
            rising = (flat[1:] > flat[:-1]) | (owner[1:] != owner[:-1])
            unsorted = owner[1:][~rising].unique().tolist()
            require(not unsorted, f"clusters {unsorted[:10]} have members not strictly ascending")
        free = set(self._free)
        require(len(free) == len(self._free), "an unused id is listed twice")
        live = set((count > 0).nonzero().flatten().tolist())
        require(not free & live, f"ids {sorted(free & live)} are both free and live")
        require(free | live == set(range(slots)), f"ids {sorted(set(range(slots)) - free - live)} are lost")
        require(
            set(self._queue) == self._queued and len(self._queue) == len(self._queued),
            "split queue and its membership set disagree (or an id is queued twice)",
        )
        regions = 0 if self._region_centers is None else self._region_centers.shape[0]
        region = self._region[:slots].cpu()
        stray = ((region < -1) | (region >= regions)).nonzero().flatten()[:10].tolist()
        require(not stray, f"region ids outside [-1, {regions}) at clusters {stray}")
        if held_ids.numel() == 0:
            return
        unit, raw = self._embed(key_lookup(held_ids))
        dev_cid = held_cid.to(self.device)
        sum_unit = torch.zeros_like(self._sum_unit[:slots]).index_add_(0, dev_cid, unit)
        sum_raw = torch.zeros_like(self._sum_raw[:slots]).index_add_(0, dev_cid, raw)
        n = count.clamp_min(1).to(self.device, torch.float32)[:, None]
        mean_unit, stored_unit = sum_unit / n, self._sum_unit[:slots] / n
        err = float((mean_unit - stored_unit).abs().max())
        require(err <= atol, f"assignment-space centroids drifted by {err:.3g} (> {atol})")
        raw_scale = max(1.0, float(raw.abs().max()))
        err = float((sum_raw / n - self._sum_raw[:slots] / n).abs().max()) / raw_scale
        require(err <= atol, f"raw centroids drifted by {err:.3g} of the key scale (> {atol})")
        dev = unit - mean_unit[dev_cid]
        true_var = torch.zeros(slots, device=self.device).index_add_(0, dev_cid, (dev * dev).sum(dim=1))
        true_var = true_var / n[:, 0]
        err = float((true_var - self.variances).abs().max())
        require(err <= atol, f"cluster variances off by {err:.3g} (> {atol})")
        err = float(((sum_unit @ self._proj) / n - self._sum_proj[:slots] / n).abs().max())
        require(err <= atol, f"projected centroids of the coarse search drifted by {err:.3g} (> {atol})")
