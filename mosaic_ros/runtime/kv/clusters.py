"""Online, cohesion-aware clustering of position-free keys: one ``ClusterIndex`` per layer.

A token's pre-RoPE key row ``(H_kv, D)`` (all KV heads together) belongs to exactly one cluster
of its layer, so the store can lay a layer's KV out cluster by cluster. Clusters are
cross-modal and cross-time: any two tokens whose keys are close share a cluster, whatever frame
or modality they came from.

Assignment space (``embedding.py``)
    Each head of a key is L2-normalized, the heads are concatenated and the row is divided by
    ``sqrt(H_kv)``: a unit vector of ``F = H_kv * D`` values (with ``sketch_dims`` = m, each head
    is first count-sketched to m values, ``F = H_kv * m``). The squared distance of two rows
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
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from numba import njit
from torch import Tensor

from mosaic_ros.runtime.kv.clock import MaintenanceClock, WallClock
from mosaic_ros.runtime.kv.embedding import CountSketch, HeadNormalized
from mosaic_ros.runtime.kv.kernels import centroid_scores

KeyLookup = Callable[[Tensor], Tensor]
"""``key_lookup(token_ids (n,) int64) -> (n, H_kv, D)`` pre-RoPE keys of those tokens."""

_MIN_SCALE = 1e-6  # floor of the local scale (unit-sphere variance units)
_SCALE_QUANTILE = 0.25  # share of a chunk's tokens that need a same-content match in the reference
_REF_CHUNKS = 2  # the reference holds this many largest-chunk sizes of the most recent rows
_SCALE_PROBES = 16  # tokens per chunk whose nearest reference distance is measured
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
    sketch_dims: 0 (the default) clusters every coordinate of the keys (``HeadNormalized``); m > 0
        clusters a count sketch of each head's D coordinates into m (``CountSketch``); a head
        dim of at most m keeps every coordinate. ``MosaicPolicy`` sets 16 by default.
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
    sketch_dims: int = 0

    def __post_init__(self) -> None:
        if self.cohesion <= 0 or self.join_radius <= 0 or self.loose_factor < 1:
            raise ValueError("cohesion and join_radius must be > 0 and loose_factor >= 1")
        if self.max_cluster_tokens < 1 or self.split_iters < 1 or self.route_min_clusters < 1:
            raise ValueError("max_cluster_tokens, split_iters and route_min_clusters must be >= 1")
        if not 0 < self.scale_momentum <= 1:
            raise ValueError(f"scale_momentum must be in (0, 1], got {self.scale_momentum}")
        if self.sketch_dims < 0:
            raise ValueError(f"sketch_dims must be >= 0, got {self.sketch_dims}")

    def embedding(self, num_kv_heads: int, head_dim: int) -> HeadNormalized | CountSketch:
        """The assignment space of keys (H_kv, D) under this configuration."""
        if 0 < self.sketch_dims < head_dim:
            return CountSketch(num_kv_heads, head_dim, self.sketch_dims)
        return HeadNormalized(num_kv_heads, head_dim)


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


class ClusterBank:
    """The clusters of every layer of a model, their statistics stacked over layers.

    Per-cluster statistics are ``(L, capacity, ...)`` tensors on ``device`` (float32), so a chunk
    is assigned in every layer at once (``assign``): the embedding, the scale sample, the join
    tests and the grouping of rejected tokens are batched products over the layers, with each
    layer's candidate clusters padded to a common count, instead of one small product per layer.
    Every layer decides exactly what it would decide alone (``test_clusters``: a bank of L layers
    against L one-layer banks). Token bookkeeping (token -> cluster per layer) is on the CPU;
    token ids are int64, strictly increasing across ``assign`` calls (gaps allowed), and every
    chunk goes to every layer. Maintenance, removal, scoring and checks are per layer
    (``layers[l]``, a ``ClusterIndex``). Not thread-safe.
    """

    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        config: ClusterConfig | None = None,
        device: torch.device | str = "cpu",
    ) -> None:
        if num_layers <= 0 or num_kv_heads <= 0 or head_dim <= 0:
            raise ValueError(
                f"num_layers, num_kv_heads and head_dim must be positive, got {num_layers}, {num_kv_heads}, "
                f"{head_dim}"
            )
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.config = config or ClusterConfig()
        self.device = torch.device(device)
        self.embedding = self.config.embedding(num_kv_heads, head_dim)
        n, width = num_layers, self.embedding.width
        proj_dim = min(width, _PROJ_DIM)
        if proj_dim == width:
            self.proj = torch.eye(width, device=self.device)
        else:
            gen = torch.Generator().manual_seed(0)
            self.proj = (torch.randn(width, proj_dim, generator=gen) / math.sqrt(proj_dim)).to(self.device)
        dev = self.device
        # per cluster, (L, capacity): count, sums of unit rows / raw keys / projected unit rows,
        # |sum_unit|^2, the last chunk that added to it, its region (-1: none)
        self.count = torch.zeros(n, 0, dtype=torch.int64, device=dev)
        self.sum_unit = torch.zeros(n, 0, width, device=dev)
        self.sum_raw = torch.zeros(n, 0, num_kv_heads * head_dim, device=dev)
        self.sum_norm2 = torch.zeros(n, 0, device=dev)
        self.sum_proj = torch.zeros(n, 0, proj_dim, device=dev)
        self.touched = torch.zeros(n, 0, dtype=torch.int64, device=dev)
        self.region = torch.zeros(n, 0, dtype=torch.int64, device=dev)
        # regions (rebuilt per layer in maintain): centres (L, G_cap, P), G per layer (0: none yet)
        self.centers = torch.zeros(n, 0, proj_dim, device=dev)
        self.num_regions = [0] * n
        self.routed = [0] * n  # live clusters of the layer when its regions were last built
        self.slots = [0] * n
        self.free: list[list[int]] = [[] for _ in range(n)]  # heaps of reusable ids
        self.queue: list[deque[int]] = [deque() for _ in range(n)]
        self.queued: list[set[int]] = [set() for _ in range(n)]
        self.ranked = [0] * n  # (token, cluster) pairs the search of the last chunk ranked
        self.ranked_tokens = [0] * n
        self.centroid_cache: list[Tensor | None] = [None] * n
        self.chunks = 0  # chunks assigned so far
        # kept by the caller of ``maintain``: expected milliseconds of a split per member token
        # (None: unknown), and how much of its maintenance budget it holds back for what its
        # estimates miss (ms)
        self.split_ms_per_token: float | None = None
        self.holdback_ms = 0.0
        # token bookkeeping, CPU: column i describes token id ``base + i``
        self.base = 0
        self.tok_len = 0
        self.tok_cluster = torch.zeros(n, 0, dtype=torch.int64)
        self.tok_modality = torch.zeros(0, dtype=torch.uint8)
        self.last_id: int | None = None
        self.assigned = 0
        self.removed = [0] * n
        # local scale: the reference, the latest rows as (unit rows (L, n, F), tags (n,)) pieces of
        # the chunks they came in (views, never copied), and the log scale per layer (L,) float64
        self.ref: deque[tuple[Tensor, Tensor]] = deque()
        self._ref_mean: Tensor | None = None  # (L, F) mean reference row, None until asked for
        # buffers reused across chunks, so a chunk's large temporaries do not take fresh memory
        # (first-touch page faults cost more than the arithmetic): the float32 keys of the chunk
        # (``_raw``), free unit-row buffers (``_spare_units``; a chunk's unit rows live on in the
        # reference, and return here when the reference drops them), gathered rows (``_gathered``)
        self._raw: Tensor | None = None
        self._spare_units: list[Tensor] = []
        self._ref_buffers: deque[Tensor] = deque()
        self._gathered: dict[str, Tensor] = {}
        self.chunk_max = 0
        self.log_scale: Tensor | None = None
        self.scale_updates = 0
        self.layers = [ClusterIndex._of(self, layer) for layer in range(n)]

    @property
    def capacity(self) -> int:
        return self.count.shape[1]

    def live_clusters(self) -> list[int]:
        """Live (non-empty) clusters of every layer, one count per layer (``layers[l].num_clusters``)."""
        return (self.count > 0).sum(dim=1).tolist()

    def held_tokens(self) -> list[int]:
        """Tokens every layer holds now (``layers[l].num_tokens``)."""
        return [self.assigned - removed for removed in self.removed]

    # -----------------------------------------------------------------------------------------
    # assignment
    # -----------------------------------------------------------------------------------------

    def assign(
        self, keys: Tensor | Sequence[Tensor], token_ids: Tensor, modality: Tensor | None = None
    ) -> Tensor:
        """Place one chunk into clusters in every layer; returns cluster ids (L, T) int64 on the CPU.

        keys: (L, T, H_kv, D) pre-RoPE keys of the chunk per layer, any float dtype/device, or a
        sequence of the L layers' (T, H_kv, D) keys (not stacked: each is read once, into float32);
        token_ids: (T,) int64 strictly increasing and above every id given before; modality:
        optional (T,) uint8 per-token tag (0 when omitted). Tokens of any modality may share a
        cluster; the tag only keeps the local-scale measurement within a modality and feeds
        ``modality_counts``. Clusters that become too loose or too large are queued for
        ``maintain``, never split here.
        """
        count = self._check_chunk(keys, token_ids, modality)
        ids = token_ids.to("cpu", torch.int64)
        if count == 0:
            return ids.expand(self.num_layers, 0).clone()
        unit, raw = self._embed_chunk(keys, count)
        tags = torch.zeros(count, dtype=torch.uint8) if modality is None else modality.to("cpu", torch.uint8)
        tags = tags.to(self.device)
        sample, from_reference = self._scale_sample(unit, tags)
        scale = sample if self.log_scale is None else self.log_scale.exp()
        cid = torch.full((self.num_layers, count), -1, dtype=torch.int64, device=self.device)
        self.ranked, self.ranked_tokens = [0] * self.num_layers, [count] * self.num_layers
        scale_dev = None if scale is None else scale.to(self.device, torch.float32)
        if scale_dev is not None and max(self.slots) > 0:
            cid = self._join_existing(unit, scale_dev)
        rejected = cid < 0
        if bool(rejected.any()):
            radius = None if scale is None else (2.0 * self.config.join_radius * scale).to(self.device)
            rows, valid = _padded_rows(rejected)
            labels, groups = self._group(self._take_rows(unit, rows, "rejected"), valid, radius)
            table = torch.full((self.num_layers, max(groups) + 1), -1, dtype=torch.int64)
            for layer, g in enumerate(groups):
                if g:
                    table[layer, :g] = torch.tensor(self._alloc(layer, g), dtype=torch.int64)
            table = table.to(self.device)
            new = table.gather(1, labels.clamp_min(0))
            layer_of, at = valid.nonzero(as_tuple=True)
            cid[layer_of, rows[layer_of, at]] = new[layer_of, at]
        layer_ids = torch.arange(self.num_layers, device=self.device)[:, None].expand_as(cid)
        self._add_stats(layer_ids, cid, unit, raw, sign=1.0)
        self._route(layer_ids.reshape(-1), cid.reshape(-1))  # an older cluster's region stays current
        self.chunks += 1
        self.touched.scatter_(1, cid, self.chunks)
        cid = cid.cpu()
        self._record(ids, cid, modality)
        if from_reference:
            self._update_scale(sample, count)
        self.chunk_max = max(self.chunk_max, count)
        self._keep_reference(unit, tags, _REF_CHUNKS * self.chunk_max)
        self._queue_violators()
        return cid

    def _check_chunk(
        self, keys: Tensor | Sequence[Tensor], token_ids: Tensor, modality: Tensor | None
    ) -> int:
        shape = (self.num_layers, self.num_kv_heads, self.head_dim)
        if isinstance(keys, Tensor):
            if keys.dim() != 4 or (keys.shape[0], *keys.shape[2:]) != shape:
                want = f"({shape[0]}, T, {shape[1]}, {shape[2]})"
                raise ValueError(f"keys must be {want}, got {tuple(keys.shape)}")
            count = keys.shape[1]
        else:
            count = keys[0].shape[0] if len(keys) else 0
            want = (count, *shape[1:])
            if len(keys) != shape[0] or any(tuple(k.shape) != want for k in keys):
                got = [tuple(k.shape) for k in keys]
                raise ValueError(f"keys must be {shape[0]} tensors {want}, got {got[:4]}")
        if token_ids.shape != (count,):
            raise ValueError(f"token_ids must be ({count},), got {tuple(token_ids.shape)}")
        if modality is not None and modality.shape != (count,):
            raise ValueError(f"modality must be ({count},), got {tuple(modality.shape)}")
        if count:
            ids = token_ids.to("cpu", torch.int64)
            if count > 1 and not bool((ids[1:] > ids[:-1]).all()):
                raise ValueError("token_ids must be strictly increasing")
            if self.last_id is not None and int(ids[0]) <= self.last_id:
                raise ValueError(f"token id {int(ids[0])} is not above the last assigned id {self.last_id}")
        return count

    def embed(self, keys: Tensor) -> tuple[Tensor, Tensor]:
        """Keys (..., T, H_kv, D) -> (unit (..., T, F) assignment-space rows (``self.embedding``),
        raw (..., T, H_kv * D) float32)."""
        raw = keys.to(self.device, torch.float32).contiguous()
        return self.embedding(raw), raw.flatten(-2)

    def _embed_chunk(self, keys: Tensor | Sequence[Tensor], count: int) -> tuple[Tensor, Tensor]:
        """``embed`` of a chunk's keys (L, T, H_kv, D) or L layers' (T, H_kv, D), into reused buffers:
        the raw rows are valid until the next chunk, the unit rows until the reference drops them."""
        shape = (self.num_layers, count, self.num_kv_heads, self.head_dim)
        if self._raw is None or self._raw.shape != shape:
            self._raw = torch.empty(shape, device=self.device)
        raw = self._raw
        if isinstance(keys, Tensor):
            raw.copy_(keys)
        else:
            for layer, k in enumerate(keys):
                raw[layer].copy_(k)
        unit_shape = (self.num_layers, count, self.embedding.width)
        spare = next((i for i, b in enumerate(self._spare_units) if b.shape == unit_shape), None)
        unit = torch.empty(unit_shape, device=self.device) if spare is None else self._spare_units.pop(spare)
        self.embedding(raw, out=unit)
        self._ref_buffers.append(unit)
        return unit, raw.flatten(-2)

    def _take_rows(self, x: Tensor, rows: Tensor, name: str) -> Tensor:
        """x (L, T, F) rows ``rows`` (L, R) per layer -> (L, R, F), in the reused buffer ``name``
        (valid until that buffer's next use)."""
        shape = (*rows.shape, x.shape[2])
        need = math.prod(shape)
        buf = self._gathered.get(name)
        if buf is None or buf.numel() < need or buf.dtype != x.dtype:
            buf = self._gathered[name] = torch.empty(need, dtype=x.dtype, device=x.device)
        out = buf[:need].view(shape)
        return torch.gather(x, 1, rows[:, :, None].expand(-1, -1, x.shape[2]), out=out)

    def _keep_reference(self, unit: Tensor, tags: Tensor, keep: int) -> None:
        """Append a chunk's rows to the reference and keep its latest ``keep`` rows."""
        self._ref_mean = None
        self.ref.append((unit, tags))
        total = sum(t.shape[0] for _, t in self.ref)
        while total - self.ref[0][1].shape[0] >= keep:
            total -= self.ref.popleft()[1].shape[0]
            self._spare_units.append(self._ref_buffers.popleft())
        del self._spare_units[:-2]  # a chunk of another size (the sink preamble) is not kept
        if total > keep:
            oldest, oldest_tags = self.ref[0]
            self.ref[0] = (oldest[:, total - keep :], oldest_tags[total - keep :])

    def _reference_mean(self, layers: Tensor) -> Tensor:
        """(l, F) mean reference row of each of ``layers``; the (L, F) means of every layer are
        computed once per reference (a chunk's searches all centre on them)."""
        if self._ref_mean is None:
            rows = sum(t.shape[0] for _, t in self.ref)
            self._ref_mean = sum(u.sum(dim=1) for u, _ in self.ref) / rows
        return self._ref_mean.index_select(0, layers)

    def _scale_sample(self, unit: Tensor, tags: Tensor) -> tuple[Tensor | None, bool]:
        """((L,) float64 lower quartile of half the squared nearest-neighbour distance, whether
        from the reference), or (None, False) when no token has a same-modality neighbour.

        Tokens are only compared with tokens of the same modality tag (a frame after the system
        prompt is not measured against text). The reference is the previous chunk(s), probed by
        at most ``_SCALE_PROBES`` evenly spaced tokens of the chunk (a quantile needs no more).
        When no probe has a same-modality reference row, every token of the chunk is compared
        with the chunk's other tokens instead; that sample decides this chunk only. Tags are the
        same in every layer, so every layer measures the same tokens.
        """
        if self.ref:
            stride = -(-unit.shape[1] // _SCALE_PROBES)
            probes, probe_tags = unit[:, ::stride], tags[::stride]
            best = None
            for ref, ref_tags in self.ref:
                sims = torch.bmm(probes, ref.transpose(1, 2))
                sims.masked_fill_((probe_tags[:, None] != ref_tags[None, :])[None], -math.inf)
                piece = sims.max(dim=2).values
                best = piece if best is None else torch.maximum(best, piece)
            sample = _quartile(best)
            if sample is not None:
                return sample, True
        sims = torch.bmm(unit, unit.transpose(1, 2))
        sims.diagonal(dim1=1, dim2=2).fill_(-math.inf)
        sims.masked_fill_((tags[:, None] != tags[None, :])[None], -math.inf)
        return _quartile(sims.max(dim=2).values), False

    def _update_scale(self, sample: Tensor, count: int) -> None:
        self.scale_updates += 1
        if self.log_scale is None:
            self.log_scale = sample.log()
            return
        rate = max(self.config.scale_momentum, 1.0 / self.scale_updates) * min(1.0, count / self.chunk_max)
        self.log_scale = self.log_scale + rate * (sample.log() - self.log_scale)

    def _join_existing(self, unit: Tensor, scale: Tensor) -> Tensor:
        """Join test for every token of every layer at once: (L, T) cluster id, or -1 where rejected.

        Recent clusters first: a chunk's tokens are tested against the clusters the last
        ``_RECENT_CHUNKS`` chunks touched (consecutive frames mostly show the same content, so
        these few clusters take most tokens). Only the tokens they reject are tested against the
        older clusters, so content seen long ago (a revisited scene) still joins its clusters,
        while a chunk that continues the recent content costs the same however many clusters
        the stream has made. A layer with no recent or no older cluster tests all of them at once.
        """
        width = max(self.slots)
        live = self.count[:, :width] > 0
        recent = live & (self.touched[:, :width] > self.chunks - _RECENT_CHUNKS)
        older = live & ~recent
        two_stage = recent.any(dim=1) & older.any(dim=1)  # (L,)
        first = torch.where(two_stage[:, None], recent, live)
        cid = self._nearest_join(unit, None, scale, first)
        again = (cid < 0) & two_stage[:, None]
        if bool(again.any()):
            rows, valid = _padded_rows(again)
            sub_unit = self._take_rows(unit, rows, "again")
            # The opened regions may hold no older cluster (only the recent ones, or none: a
            # long run of new content routes its own clusters there): then nothing older is
            # near, and the rejected tokens open clusters of their own.
            opened = self._probe_regions(sub_unit, valid, older & two_stage[:, None])
            found = self._nearest_join(sub_unit, valid, scale, opened)
            layer_of, at = valid.nonzero(as_tuple=True)
            cid[layer_of, rows[layer_of, at]] = found[layer_of, at]
        return cid

    def _probe_regions(self, unit: Tensor, valid: Tensor, older: Tensor) -> Tensor:
        """The part of the ``older`` mask (L, C) the rows' searches open: in a layer with regions, the
        clusters of each valid row's ``_PROBE_REGIONS`` nearest regions (their union over the rows:
        rows that start new content together are alike) plus clusters not routed yet; in a layer
        without regions, all of ``older``. ``unit`` (L, R, F) rows, ``valid`` (L, R) bool."""
        sizes = torch.tensor(self.num_regions, device=self.device)
        most = int(sizes.max())
        if most == 0:
            return older
        centers = self.centers[:, :most]
        near = _nearness(unit @ self.proj, centers).masked_fill_(
            (torch.arange(most, device=self.device)[None, :] >= sizes[:, None])[:, None, :], -math.inf
        )
        picks = near.topk(min(_PROBE_REGIONS, most), dim=2).indices  # (L, R, k)
        # a layer with fewer regions than probes picks padded entries: no cluster is routed there
        picks = torch.where(valid[:, :, None], picks, most)  # padded rows open only "not routed"
        opened = torch.zeros(self.num_layers, most + 1, dtype=torch.bool, device=self.device)
        opened.scatter_(1, picks.flatten(1), True)
        opened[:, most] = True  # region -1 (not routed) indexes the last entry
        region = self.region[:, : older.shape[1]]
        in_opened = opened.gather(1, torch.where(region < 0, most, region))
        return torch.where((sizes > 0)[:, None], older & in_opened, older)

    def _nearest_join(self, unit: Tensor, valid: Tensor | None, scale: Tensor, member: Tensor) -> Tensor:
        """Nearest cluster of ``member`` (L, C) bool for every row, if it may join: (L, n) id, else -1.

        ``unit`` (L, n, F) rows, ``valid`` (L, n) the rows that count (None: all), ``scale`` (L,)
        float32 local scales. A layer whose set has up to
        ``_EXACT_MAX`` clusters (the recent ones, as a rule) gets the exact distances to all of
        them from one (n, F) x (F, K) product, batched over such layers. Beyond, search in two
        stages. Coarse: rows and centroids, centred on the mean of the recent reference rows
        (keys share a large common direction; centring keeps the projection error proportional
        to the small differences that matter) and projected to ``P = min(F, 64)`` dimensions
        with a fixed random matrix (``self.proj``), rank the clusters in one (n, P) x (P, K)
        product. Fine: the exact distances to the ``_CANDIDATES`` best-ranked clusters pick the
        nearest. The projection is linear, so per-cluster projected sums are kept alongside the
        sums (as the projection of each touched cluster's sum).
        """
        sizes = member.sum(dim=1)
        rows = torch.full((self.num_layers,), unit.shape[1]) if valid is None else valid.sum(dim=1).cpu()
        for layer, (r, k) in enumerate(zip(rows.tolist(), sizes.tolist(), strict=True)):
            self.ranked[layer] += r * k
        shape = unit.shape[:2]
        nearest = torch.full(shape, -1, dtype=torch.int64, device=self.device)
        dist = torch.full(shape, math.inf, device=self.device)
        for group in (sizes > 0) & (sizes <= _EXACT_MAX), sizes > _EXACT_MAX:
            layers = group.nonzero().squeeze(1)
            if layers.numel() == 0:
                continue
            k = int(sizes[layers].max())
            # each layer's set, ascending ids, padded to k entries
            cand = torch.sort((~member[layers]).to(torch.uint8), dim=1, stable=True).indices[:, :k]
            pad = torch.arange(k, device=self.device)[None, :] >= sizes[layers, None]  # (l, k)
            lay = layers[:, None]
            inv_n = 1.0 / self.count[lay, cand].clamp_min(1).to(torch.float32)  # (l, k)
            rows_u = unit if layers.numel() == self.num_layers else unit.index_select(0, layers)
            if k <= _EXACT_MAX:
                dots = torch.bmm(rows_u, self.sum_unit[lay, cand].transpose(1, 2))  # (l, n, k)
                d = (
                    1.0
                    - 2.0 * dots * inv_n[:, None, :]
                    + (self.sum_norm2[lay, cand] * inv_n * inv_n)[:, None, :]
                )
                best, pick = d.masked_fill_(pad[:, None, :], math.inf).min(dim=2)
                near = cand.gather(1, pick)
            else:
                center = self._reference_mean(layers) @ self.proj  # (l, P)
                mean_proj = self.sum_proj[lay, cand] * inv_n[:, :, None] - center[:, None, :]  # (l, k, P)
                rows_p = rows_u @ self.proj - center[:, None, :]  # (l, n, P)
                rank = torch.bmm(rows_p, mean_proj.transpose(1, 2))  # (l, n, k)
                rank.sub_(0.5 * (mean_proj * mean_proj).sum(dim=2)[:, None, :])
                rank.masked_fill_(pad[:, None, :], -math.inf)
                top = cand.gather(1, rank.topk(_CANDIDATES, dim=2).indices.flatten(1)).view(
                    *rank.shape[:2], -1
                )
                best, near = self._fine_search(rows_u, top, layers)
            nearest[layers], dist[layers] = near, best
        found = nearest >= 0
        at = nearest.clamp_min(0)
        lay = torch.arange(self.num_layers, device=self.device)[:, None]
        dist = dist.clamp_min(0.0)
        n = self.count[lay, at]
        size = n.to(torch.float32)
        var = _variance(n, self.sum_norm2[lay, at])
        var_after = (size * var + size / (size + 1.0) * dist) / (size + 1.0)
        s = scale[:, None]
        ok = (
            found
            & (var_after <= self.config.cohesion * s)
            & (dist <= self.config.join_radius * torch.maximum(var, s) * (1.0 + 1.0 / size.clamp_min(1.0)))
            & (size < 2 * self.config.max_cluster_tokens)
        )
        return torch.where(ok, nearest, -1)

    def _fine_search(self, rows: Tensor, top: Tensor, layers: Tensor) -> tuple[Tensor, Tensor]:
        """Nearest of each row's candidate clusters by exact distance: rows (l, n, F) of ``layers``
        (l,), candidates ``top`` (l, n, c) live cluster ids -> (squared distance (l, n) float32,
        cluster id (l, n) int64); ties go to the earlier candidate. On the CPU one compiled pass
        (no (l, n, c, F) gather of the candidates' sums); elsewhere the same in tensor operations."""
        if self.device.type == "cpu":
            best = torch.empty(top.shape[:2])
            near = torch.empty(top.shape[:2], dtype=torch.int64)
            _fine_search_host(
                rows.contiguous().numpy(),
                top.contiguous().numpy(),
                layers.contiguous().numpy(),
                self.sum_unit.numpy(),
                self.count.numpy(),
                self.sum_norm2.numpy(),
                best.numpy(),
                near.numpy(),
            )
            return best, near
        return _fine_search_torch(rows, top, layers, self.sum_unit, self.count, self.sum_norm2)

    @staticmethod
    def _group(unit: Tensor, valid: Tensor, radius: Tensor | None) -> tuple[Tensor, list[int]]:
        """Group each layer's valid rows densest-first, squared pair distance ``<= radius``.

        unit (L, R, F), valid (L, R) bool, radius (L,) or None (no scale known yet: every row
        its own group). Returns labels (L, R) int64 (-1 for invalid rows) and groups per layer.
        A leader (the row with the most free neighbours) takes every free row within the radius;
        all layers take their next leader in the same step.
        """
        layers, rows = valid.shape
        counts = valid.sum(dim=1)
        if radius is None:
            labels = torch.arange(rows, device=unit.device).expand(layers, rows)
            return torch.where(valid, labels, -1), counts.tolist()
        near = (2.0 - 2.0 * torch.bmm(unit, unit.transpose(1, 2))) <= radius.to(unit.dtype)[:, None, None]
        near &= valid[:, :, None] & valid[:, None, :]
        near.diagonal(dim1=1, dim2=2).copy_(valid)  # a row always groups with itself
        labels = torch.full((layers, rows), -1, dtype=torch.int64, device=unit.device)
        free = valid.clone()
        groups = torch.zeros(layers, dtype=torch.int64, device=unit.device)
        lay = torch.arange(layers, device=unit.device)
        near_f = near.to(unit.dtype)
        while bool(free.any()):
            # free neighbours per row, as a product (exact small integers in float32)
            degree = torch.bmm(near_f, free.to(unit.dtype)[:, :, None])[:, :, 0].masked_fill_(~free, -1.0)
            active = free.any(dim=1)
            members = near[lay, degree.argmax(dim=1)] & free & active[:, None]
            labels = torch.where(members, groups[:, None], labels)
            free &= ~members
            groups += active
        return labels, groups.tolist()

    def _route(self, layers: Tensor, clusters: Tensor) -> None:
        """Put ``clusters`` (ids (n,) of ``layers`` (n,), statistics set) into their layers' nearest
        regions, where the layer has regions."""
        sizes = torch.tensor(self.num_regions, device=self.device)
        most = int(sizes.max())
        if most == 0 or clusters.numel() == 0:
            return
        pairs = torch.unique(layers * self.capacity + clusters)
        layers, clusters = pairs // self.capacity, pairs % self.capacity
        routed = sizes[layers] > 0
        layers, clusters = layers[routed], clusters[routed]
        n = self.count[layers, clusters].clamp_min(1).to(torch.float32)
        mean = self.sum_proj[layers, clusters] / n[:, None]
        centers = self.centers[layers, :most]  # (n, G, P)
        near = torch.bmm(centers, mean[:, :, None])[:, :, 0] - 0.5 * (centers * centers).sum(dim=2)
        near.masked_fill_(torch.arange(most, device=self.device)[None, :] >= sizes[layers, None], -math.inf)
        self.region[layers, clusters] = near.argmax(dim=1)

    def rebuild_regions(self, layer: int) -> None:
        """Group the layer's live clusters into ``ceil(sqrt(C))`` regions: k-means over their
        projected means (seeds: evenly spaced live clusters; deterministic)."""
        live = (self.count[layer, : self.slots[layer]] > 0).nonzero().squeeze(1)
        mean = self.sum_proj[layer, live] / self.count[layer, live].to(torch.float32)[:, None]
        k = math.isqrt(live.numel() - 1) + 1
        centers = mean[torch.linspace(0, live.numel() - 1, k, device=self.device).round().long()].clone()
        for _ in range(_REGION_ITERS):
            near = _nearness(mean, centers).argmax(dim=1)
            sums = torch.zeros_like(centers).index_add_(0, near, mean)
            sizes = torch.bincount(near, minlength=k).to(torch.float32)
            centers = torch.where(sizes[:, None] > 0, sums / sizes.clamp_min(1)[:, None], centers)
        near = _nearness(mean, centers).argmax(dim=1)
        if k > self.centers.shape[1]:
            grown = torch.zeros(self.num_layers, max(k, 2 * self.centers.shape[1]), self.proj.shape[1])
            grown[:, : self.centers.shape[1]] = self.centers
            self.centers = grown.to(self.device)
        self.region[layer].fill_(-1)
        self.region[layer, live] = near
        self.centers[layer, :k] = centers
        self.num_regions[layer] = k
        self.routed[layer] = live.numel()

    def _alloc(self, layer: int, k: int) -> list[int]:
        """k cluster ids for new clusters of ``layer``: smallest unused first, then fresh ones."""
        free = self.free[layer]
        ids = [heapq.heappop(free) for _ in range(min(k, len(free)))]
        fresh = k - len(ids)
        if fresh:
            slots = self.slots[layer]
            self._grow(slots + fresh)
            ids.extend(range(slots, slots + fresh))
            self.slots[layer] = slots + fresh
        return ids

    def _grow(self, slots: int) -> None:
        capacity = self.capacity
        if slots <= capacity:
            return
        capacity = max(slots, 2 * capacity, 16)
        names = ("count", "sum_unit", "sum_raw", "sum_norm2", "sum_proj", "touched", "region")
        for name in names:
            old = getattr(self, name)
            fill = -1 if name == "region" else 0
            new = torch.full(
                (self.num_layers, capacity, *old.shape[2:]), fill, dtype=old.dtype, device=self.device
            )
            new[:, : old.shape[1]] = old
            setattr(self, name, new)

    def add_stats(self, layers: Tensor, cid: Tensor, unit: Tensor, raw: Tensor, sign: float) -> None:
        """Add (sign 1) or take out (sign -1) rows ``unit``/``raw`` (..., F) of clusters ``cid`` (...)
        of ``layers`` (...) in the running sums; the touched clusters' |sum|^2 and projected sums
        are recomputed from their sums."""
        self._add_stats(layers, cid, unit, raw, sign)

    def _add_stats(self, layers: Tensor, cid: Tensor, unit: Tensor, raw: Tensor, sign: float) -> None:
        flat = (layers.to(self.device) * self.capacity + cid.to(self.device)).reshape(-1)
        width = unit.shape[-1]
        unit, raw = unit.reshape(-1, width), raw.reshape(-1, raw.shape[-1])
        self.count.view(-1).index_add_(0, flat, torch.full_like(flat, int(sign)))
        self.sum_unit.view(-1, width).index_add_(0, flat, unit, alpha=sign)
        self.sum_raw.view(-1, raw.shape[1]).index_add_(0, flat, raw, alpha=sign)
        touched = flat.unique()
        sums = self.sum_unit.view(-1, width)[touched]
        self.sum_norm2.view(-1)[touched] = (sums * sums).sum(dim=1)
        self.sum_proj.view(-1, self.proj.shape[1])[touched] = sums @ self.proj
        for layer in torch.unique(touched // self.capacity).tolist():
            self.centroid_cache[layer] = None

    def _record(self, ids: Tensor, cid: Tensor, modality: Tensor | None) -> None:
        """Token maps of a new chunk (ids ascending, cid (L, T) on the CPU)."""
        if self.last_id is None:
            self.base = int(ids[0])
        needed = int(ids[-1]) - self.base + 1
        if needed > self.tok_cluster.shape[1]:
            capacity = max(needed, 2 * self.tok_cluster.shape[1], 1024)
            cluster = torch.full((self.num_layers, capacity), -1, dtype=torch.int64)
            cluster[:, : self.tok_len] = self.tok_cluster[:, : self.tok_len]
            mod = torch.zeros(capacity, dtype=torch.uint8)
            mod[: self.tok_len] = self.tok_modality[: self.tok_len]
            self.tok_cluster, self.tok_modality = cluster, mod
        self.tok_len = needed
        self.tok_cluster[:, ids - self.base] = cid
        if modality is not None:
            self.tok_modality[ids - self.base] = modality.to("cpu", torch.uint8)
        self.last_id = int(ids[-1])
        self.assigned += ids.shape[0]

    def threshold(self, layer: int) -> float | None:
        """Cohesion threshold ``tau = cohesion * s`` of ``layer``, None before any scale is known."""
        if self.log_scale is None:
            return None
        return self.config.cohesion * math.exp(float(self.log_scale[layer]))

    def violates(self, layer: int, count: Tensor, sum_norm2: Tensor) -> Tensor:
        """Boolean per cluster of ``layer``: too large, or looser than ``loose_factor * tau``."""
        bad = count > self.config.max_cluster_tokens
        tau = self.threshold(layer)
        if tau is not None:
            bad |= (count > 1) & (_variance(count, sum_norm2) > self.config.loose_factor * tau)
        return bad

    def _queue_violators(self) -> None:
        width = max(self.slots)
        count, norm2 = self.count[:, :width], self.sum_norm2[:, :width]
        bad = count > self.config.max_cluster_tokens
        if self.log_scale is not None:
            limit = self.config.loose_factor * (self.config.cohesion * self.log_scale.exp())
            bad |= (count > 1) & (_variance(count, norm2) > limit.to(self.device, torch.float32)[:, None])
        # with maintenance behind, a thousand (layer, cluster) pairs can be bad at once: two flat
        # lists, not a list of pairs (a small list per pair made the garbage collector run often)
        layer_of, cluster_of = bad.nonzero().cpu().numpy().T
        for layer, c in zip(layer_of.tolist(), cluster_of.tolist(), strict=True):
            if c not in self.queued[layer]:
                self.queued[layer].add(c)
                self.queue[layer].append(c)

    def enqueue(self, layer: int, clusters: list[int], bad: list[bool]) -> None:
        """Queue the ``bad`` ones of ``clusters`` of ``layer`` for splitting (once)."""
        for c, b in zip(clusters, bad, strict=True):
            if b and c not in self.queued[layer]:
                self.queued[layer].add(c)
                self.queue[layer].append(c)

    def trim_token_map(self) -> None:
        """Forget the leading run of token ids removed in every layer once it is most of the map."""
        held = (self.tok_cluster[:, : self.tok_len] >= 0).any(dim=0).nonzero()
        drop = int(held[0]) if held.numel() else self.tok_len
        if drop >= 1024 and 2 * drop >= self.tok_len:
            self.tok_cluster = self.tok_cluster[:, drop:].clone()
            self.tok_modality = self.tok_modality[drop:].clone()
            self.base += drop
            self.tok_len -= drop


def _fine_search_torch(
    rows: Tensor, top: Tensor, layers: Tensor, sum_unit: Tensor, count: Tensor, sum_norm2: Tensor
) -> tuple[Tensor, Tensor]:
    """``ClusterBank._fine_search`` in tensor operations (any device): ``sum_unit`` (L, C, F),
    ``count`` (L, C), ``sum_norm2`` (L, C) the bank's statistics."""
    lay3 = layers[:, None, None]
    inv_n = 1.0 / count[lay3, top].to(torch.float32)  # (l, n, c)
    dots = (sum_unit[lay3, top] * rows[:, :, None, :]).sum(dim=3)  # (l, n, c)
    d = 1.0 - 2.0 * dots * inv_n + sum_norm2[lay3, top] * inv_n * inv_n
    best, pick = d.min(dim=2)
    return best, top.gather(2, pick[:, :, None])[:, :, 0]


@njit(
    "void(float32[:, :, ::1], int64[:, :, ::1], int64[::1], float32[:, :, ::1], int64[:, ::1], "
    "float32[:, ::1], float32[:, ::1], int64[:, ::1])",
    cache=True,
    nogil=True,
)
def _fine_search_host(rows, top, layers, sum_unit, count, sum_norm2, best, near):
    """``_fine_search_torch`` on the host in one pass, into ``best`` (l, n) and ``near`` (l, n)."""
    width = rows.shape[2]
    for i in range(top.shape[0]):
        layer = layers[i]
        for j in range(top.shape[1]):
            best_d = np.float32(np.inf)
            best_c = -1
            for k in range(top.shape[2]):
                c = top[i, j, k]
                inv = np.float32(1.0) / np.float32(count[layer, c])
                dot = np.float32(0.0)
                for x in range(width):
                    dot += sum_unit[layer, c, x] * rows[i, j, x]
                d = np.float32(1.0) - np.float32(2.0) * dot * inv + sum_norm2[layer, c] * inv * inv
                if d < best_d or best_c < 0:
                    best_d, best_c = d, c
            best[i, j] = best_d
            near[i, j] = best_c


def _variance(count: Tensor, sum_norm2: Tensor) -> Tensor:
    """Variance ``1 - |sum / n|^2`` of unit rows from count and squared norm of their sum (0 if empty)."""
    n = count.clamp_min(1).to(torch.float32)
    return torch.where(count > 0, (1.0 - sum_norm2 / (n * n)).clamp_min(0.0), torch.zeros_like(n))


def _quartile(best: Tensor) -> Tensor | None:
    """(L,) float64 lower quartile over rows of ``1 - best[l, i]``, floored, for the best similarity
    of each row (L, n), over the rows with a finite one (the same rows in every layer); None if none."""
    best = best[:, best[0] > -math.inf]
    if best.shape[1] == 0:
        return None
    nearest = (2.0 - 2.0 * best).clamp_min(0.0)
    return (nearest.quantile(_SCALE_QUANTILE, dim=1).to("cpu", torch.float64) / 2.0).clamp_min(_MIN_SCALE)


def _nearness(points: Tensor, centers: Tensor) -> Tensor:
    """(..., n, G) ``x . c - |c|^2 / 2`` for points (..., n, P), centres (..., G, P): larger is nearer."""
    return points @ centers.transpose(-1, -2) - 0.5 * (centers * centers).sum(dim=-1)[..., None, :]


def _padded_rows(mask: Tensor) -> tuple[Tensor, Tensor]:
    """Positions of each layer's true entries of ``mask`` (L, T), ascending, padded to the largest
    count: (rows (L, R) int64, valid (L, R) bool); padded positions point at row 0."""
    counts = mask.sum(dim=1)
    width = int(counts.max())
    rows = torch.sort((~mask).to(torch.uint8), dim=1, stable=True).indices[:, :width]
    valid = torch.arange(width, device=mask.device)[None, :] < counts[:, None]
    return torch.where(valid, rows, 0), valid


class ClusterIndex:
    """The clusters of one layer's position-free keys, scored in one batched product.

    ``ClusterIndex(num_kv_heads, head_dim)`` is a stand-alone one-layer index (its ``assign``
    takes one layer's chunk); the layers of a ``ClusterBank`` are ``bank.layers[l]`` and are
    assigned together by ``ClusterBank.assign``. Statistics live on ``device`` (float32); token
    bookkeeping on the CPU. Not thread-safe. A ``policies.units.UnitIndex`` (``units_of``,
    ``counts``, ``means``, ``share``), as ReKV's blocks and LiveVLM's pages are.
    """

    def __init__(
        self,
        num_kv_heads: int,
        head_dim: int,
        config: ClusterConfig | None = None,
        device: torch.device | str = "cpu",
    ) -> None:
        bank = ClusterBank(1, num_kv_heads, head_dim, config, device)
        self._bank, self.layer = bank, 0
        bank.layers[0] = self

    @classmethod
    def _of(cls, bank: ClusterBank, layer: int) -> ClusterIndex:
        index = cls.__new__(cls)
        index._bank, index.layer = bank, layer
        return index

    # -----------------------------------------------------------------------------------------
    # accessors
    # -----------------------------------------------------------------------------------------

    @property
    def num_kv_heads(self) -> int:
        return self._bank.num_kv_heads

    @property
    def head_dim(self) -> int:
        return self._bank.head_dim

    @property
    def config(self) -> ClusterConfig:
        return self._bank.config

    @property
    def device(self) -> torch.device:
        return self._bank.device

    @property
    def num_slots(self) -> int:
        """Length C of every per-cluster tensor (live clusters plus unused ids)."""
        return self._bank.slots[self.layer]

    @property
    def num_clusters(self) -> int:
        """Live (non-empty) clusters."""
        return int((self._count() > 0).sum())

    @property
    def num_tokens(self) -> int:
        """Tokens currently held (assigned minus removed)."""
        return self._bank.assigned - self._bank.removed[self.layer]

    def _count(self) -> Tensor:
        return self._bank.count[self.layer, : self.num_slots]

    @property
    def counts(self) -> Tensor:
        """(C,) int64 tokens per cluster id (0 for unused ids)."""
        return self._count().clone()

    @property
    def centroids(self) -> Tensor:
        """(C, H_kv, D) float32 mean RAW pre-RoPE key per cluster (zeros for unused ids). Read-only."""
        b, layer = self._bank, self.layer
        if b.centroid_cache[layer] is None:
            slots = self.num_slots
            n = self._count().clamp_min(1).to(torch.float32)
            mean = b.sum_raw[layer, :slots] / n[:, None]
            b.centroid_cache[layer] = mean.view(slots, self.num_kv_heads, self.head_dim)
        return b.centroid_cache[layer]

    @property
    def variances(self) -> Tensor:
        """(C,) float32 variance of each cluster in the assignment space (0 for unused ids)."""
        return _variance(self._count(), self._bank.sum_norm2[self.layer, : self.num_slots])

    @property
    def local_scale(self) -> float | None:
        """Current local scale ``s`` of the layer (unit-sphere variance), None before it is known."""
        log_scale = self._bank.log_scale
        return None if log_scale is None else math.exp(float(log_scale[self.layer]))

    @property
    def threshold(self) -> float | None:
        """Current cohesion threshold ``tau = cohesion * s``, None before any scale is known."""
        return self._bank.threshold(self.layer)

    @property
    def search_width(self) -> float:
        """Clusters the last chunk's nearest-cluster search ranked per token (0 before any search)."""
        b = self._bank
        tokens = b.ranked_tokens[self.layer]
        return b.ranked[self.layer] / tokens if tokens else 0.0

    @property
    def regions(self) -> int:
        """Regions the older clusters are grouped into for the search (0: none built yet)."""
        return self._bank.num_regions[self.layer]

    @property
    def pending(self) -> list[int]:
        """Cluster ids queued for splitting, in queue order."""
        return list(self._bank.queue[self.layer])

    def members(self, cluster_id: int) -> Tensor:
        """(n,) int64 ascending token ids of a cluster (empty for an unused id)."""
        if not 0 <= cluster_id < self.num_slots:
            raise IndexError(f"cluster id {cluster_id} out of range [0, {self.num_slots})")
        b = self._bank
        return (b.tok_cluster[self.layer, : b.tok_len] == cluster_id).nonzero().squeeze(1) + b.base

    def units_of(self, token_ids: Tensor) -> Tensor:
        """(n,) int64 cluster id of each token id, -1 for ids not held (never assigned or removed)."""
        b = self._bank
        ids = token_ids.to("cpu", torch.int64).reshape(-1)
        idx = ids - b.base
        lo, hi = torch.aminmax(idx) if idx.numel() else (-1, -1)
        if int(lo) >= 0 and int(hi) < b.tok_len:
            return b.tok_cluster[self.layer, idx]  # every id held (the nursery, a chunk): no mask
        known = (idx >= 0) & (idx < b.tok_len)
        out = torch.full_like(ids, -1)
        out[known] = b.tok_cluster[self.layer, idx[known]]
        return out

    def token_map(self) -> tuple[int, np.ndarray]:
        """(first, clusters): the cluster id of token id ``first + i`` is ``clusters[i]`` (int64, -1
        for ids not held), the lookup ``units_of`` makes, as a view for compiled planning: valid
        until the next ``assign``, removal or trim; not to be written."""
        b = self._bank
        return b.base, b.tok_cluster[self.layer].numpy()

    def modality_counts(self) -> Tensor:
        """(C, M) int64 tokens per cluster and modality value (M = largest modality held + 1)."""
        b = self._bank
        cid = b.tok_cluster[self.layer, : b.tok_len]
        held = cid >= 0
        mod = b.tok_modality[: b.tok_len][held].to(torch.int64)
        width = int(mod.max()) + 1 if mod.numel() else 1
        flat = torch.bincount(cid[held] * width + mod, minlength=self.num_slots * width)
        return flat.view(self.num_slots, width)

    # -----------------------------------------------------------------------------------------
    # assignment
    # -----------------------------------------------------------------------------------------

    def assign(self, keys: Tensor, token_ids: Tensor, modality: Tensor | None = None) -> Tensor:
        """``ClusterBank.assign`` of a one-layer index: keys (T, H_kv, D); returns (T,) int64 on the CPU."""
        if self._bank.num_layers != 1:
            raise ValueError("the layers of a multi-layer bank are assigned together: ClusterBank.assign")
        shape = (self.num_kv_heads, self.head_dim)
        if keys.dim() != 3 or tuple(keys.shape[1:]) != shape:
            raise ValueError(f"keys must be (T, {shape[0]}, {shape[1]}), got {tuple(keys.shape)}")
        return self._bank.assign(keys[None], token_ids, modality)[0]

    # -----------------------------------------------------------------------------------------
    # removal (eviction)
    # -----------------------------------------------------------------------------------------

    def remove_tokens(self, token_ids: Tensor, keys: Tensor) -> Tensor:
        """Drop tokens (e.g. evicted under a memory cap); returns ids of clusters left empty, (k,) int64.

        token_ids: (n,) int64 distinct; keys: (n, H_kv, D) their pre-RoPE keys as given to
        ``assign`` (needed to take them out of the running sums). Ids not held are ignored.
        Emptied cluster ids become free for reuse by later clusters.
        """
        b, layer = self._bank, self.layer
        ids = token_ids.to("cpu", torch.int64).reshape(-1)
        if keys.shape != (ids.shape[0], self.num_kv_heads, self.head_dim):
            raise ValueError(f"keys must be ({ids.shape[0]}, {self.num_kv_heads}, {self.head_dim})")
        if ids.unique().shape[0] != ids.shape[0]:
            raise ValueError("token_ids must be distinct")
        cid = self.units_of(ids)
        held = (cid >= 0).nonzero().squeeze(1)
        if held.numel() == 0:
            return torch.zeros(0, dtype=torch.int64)
        ids, cid = ids[held], cid[held]
        unit, raw = b.embed(keys[held.to(keys.device)])
        b.add_stats(torch.full_like(cid, layer), cid, unit, raw, sign=-1.0)
        b.tok_cluster[layer, ids - b.base] = -1
        b.removed[layer] += ids.shape[0]
        touched = cid.unique()
        emptied = touched[b.count[layer, touched.to(self.device)].cpu() == 0]
        if emptied.numel():  # exact zeros, not float residue
            at = emptied.to(self.device)
            b.sum_unit[layer, at] = 0.0
            b.sum_raw[layer, at] = 0.0
            b.sum_norm2[layer, at] = 0.0
            b.sum_proj[layer, at] = 0.0
            for c in emptied.tolist():
                heapq.heappush(b.free[layer], c)
        gone = set(emptied.tolist())
        if b.queued[layer] & gone:
            b.queued[layer] -= gone
            b.queue[layer] = deque(c for c in b.queue[layer] if c in b.queued[layer])
        b.trim_token_map()
        return emptied

    # -----------------------------------------------------------------------------------------
    # maintenance
    # -----------------------------------------------------------------------------------------

    def maintain(
        self,
        key_lookup: KeyLookup,
        budget_ms: float,
        ms_per_token: float | None = None,
        clock: MaintenanceClock | None = None,
    ) -> MaintenanceReport:
        """Split queued clusters, oldest first, while less than ``budget_ms`` milliseconds of
        ``clock`` (default: a ``WallClock``) have passed.

        A split is started only while time is left and, given ``ms_per_token`` (the caller's
        expected cost of a split per member token, everything it does per split included), only
        if the cluster's expected cost still fits in the time left; without it the call may
        overrun the budget by one split (a few hundred member keys: about a millisecond of work
        plus ``key_lookup``). ``budget_ms <= 0`` does nothing. Queued clusters that no longer
        violate are dropped. First, once there are ``route_min_clusters`` live clusters and
        twice as many as when the regions were last built, the regions are rebuilt (a few
        k-means passes over the cluster means: about a millisecond per thousand clusters).
        Each split is charged to ``clock`` (once and per member token), a rebuild per live cluster.
        """
        b, layer = self._bank, self.layer
        clock = clock if clock is not None else WallClock()
        start = clock.now_ms()
        splits: list[Split] = []
        live = self.num_clusters
        if budget_ms > 0 and live >= self.config.route_min_clusters and live >= 2 * b.routed[layer]:
            b.rebuild_regions(layer)
            clock.charge("region_cluster", live)
        queue, queued = b.queue[layer], b.queued[layer]
        while queue and clock.now_ms() - start < budget_ms:
            c = queue[0]
            count = b.count[layer, c : c + 1]
            n = int(count)
            if n >= 2 and bool(b.violates(layer, count, b.sum_norm2[layer, c : c + 1])):
                if ms_per_token is not None and clock.now_ms() - start + ms_per_token * n > budget_ms:
                    break  # expected not to fit: it waits at the head of the queue
                queue.popleft()
                queued.discard(c)
                splits.append(self._split(c, key_lookup))
                clock.charge("split", 1)
                clock.charge("split_token", n)
            else:
                queue.popleft()
                queued.discard(c)
        return MaintenanceReport(splits, clock.now_ms() - start, len(queue))

    def _split(self, parent: int, key_lookup: KeyLookup) -> Split:
        b, layer = self._bank, self.layer
        members = self.members(parent)
        unit, raw = b.embed(key_lookup(members))
        side = self._two_means(unit, self.config.split_iters)
        (child,) = b._alloc(layer, 1)
        # both children's sums in one product: rows (side == 0, side == 1) x members
        onehot = torch.stack((~side, side)).to(torch.float32)
        sums_unit, sums_raw = onehot @ unit, onehot @ raw
        pair = torch.tensor([parent, child], device=self.device)
        b.count[layer, pair] = onehot.sum(dim=1).to(torch.int64)
        b.sum_unit[layer, pair] = sums_unit
        b.sum_raw[layer, pair] = sums_raw
        b.sum_norm2[layer, pair] = (sums_unit * sums_unit).sum(dim=1)
        b.sum_proj[layer, pair] = sums_unit @ b.proj
        b.touched[layer, child] = b.touched[layer, parent]
        b._route(torch.full_like(pair, layer), pair)
        side = side.cpu()
        halves = (members[~side], members[side])
        b.tok_cluster[layer, halves[1] - b.base] = child
        b.centroid_cache[layer] = None
        bad = b.violates(layer, b.count[layer, pair], b.sum_norm2[layer, pair])
        b.enqueue(layer, [parent, child], bad.tolist())
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

    def means(self, units: Tensor) -> Tensor:
        """(k, H_kv, D) float32 raw centroids of cluster ids ``units`` (the ``UnitIndex`` protocol):
        from the centroids when they are current, else from those k clusters' sums alone (the
        same values: after a split, maintenance asks for three, not all C)."""
        b, units = self._bank, units.to(self.device)
        if b.centroid_cache[self.layer] is not None:
            return b.centroid_cache[self.layer][units]
        n = b.count[self.layer, units].clamp_min(1).to(torch.float32)
        return (b.sum_raw[self.layer, units] / n[:, None]).view(-1, self.num_kv_heads, self.head_dim)

    def share(self, query: Tensor, units: Tensor | None = None) -> Tensor:
        """(C,) (or (len(units),)) float32 on the host: each cluster's estimated share of the
        attention of ``query`` (H_q, L_q, D), ``exp(score)`` (the ``UnitIndex`` protocol; the
        shares are normalised over all clusters, whichever are asked for)."""
        share = self.score(query).exp().cpu()
        return share if units is None else share[units]

    def score(self, query: Tensor, *, scale: float | None = None, backend: str | None = None) -> Tensor:
        """(C,) float32 log estimated attention share of every cluster for ``query`` (H_q, L_q, D).

        ``query`` must be position-free (pre-RoPE) like the centroids. All clusters and KV heads
        go through one batched product (``kernels.centroid_scores``, which documents the
        aggregation) on the index's device; unused ids score ``-inf``.
        """
        return centroid_scores(query, self.centroids, self._count(), scale=scale, backend=backend)

    # -----------------------------------------------------------------------------------------
    # checks
    # -----------------------------------------------------------------------------------------

    def check_invariants(self, key_lookup: KeyLookup, atol: float = 1e-3) -> None:
        """Raise AssertionError, saying what broke, unless the layer's index is consistent.

        Every token assigned and not removed is in exactly one cluster (the token map, which
        also lists each cluster's members, agrees with the counts: nothing is lost by splits);
        counts, centroids (assignment space, its projection for the coarse search, and raw) and
        variances match a recomputation from the member keys within ``atol`` (float32 running
        sums drift by about one rounding per update; raw centroids are compared relative to the
        largest key magnitude); unused ids are empty and reusable; the split queue is valid.
        """
        b, layer = self._bank, self.layer
        slots = self.num_slots
        count = self._count().cpu()
        cid = b.tok_cluster[layer, : b.tok_len]
        held_idx = (cid >= 0).nonzero().squeeze(1)
        held_ids = held_idx + b.base
        held_cid = cid[held_idx]
        require(
            held_ids.numel() == self.num_tokens,
            f"{held_ids.numel()} tokens mapped to clusters, expected {b.assigned} assigned - "
            f"{b.removed[layer]} removed = {self.num_tokens}",
        )
        require(bool((held_cid < slots).all()), "a token maps to a cluster id beyond num_slots")
        mapped = torch.bincount(held_cid, minlength=slots)
        require(
            torch.equal(mapped, count),
            f"counts disagree with the token map at ids {(mapped != count).nonzero().flatten().tolist()}",
        )
        beyond = b.count[layer, slots:]
        require(not bool((beyond != 0).any()), "a cluster id beyond num_slots holds tokens")
        free = set(b.free[layer])
        require(len(free) == len(b.free[layer]), "an unused id is listed twice")
        live = set((count > 0).nonzero().flatten().tolist())
        require(not free & live, f"ids {sorted(free & live)} are both free and live")
        require(free | live == set(range(slots)), f"ids {sorted(set(range(slots)) - free - live)} are lost")
        queue, queued = b.queue[layer], b.queued[layer]
        require(
            set(queue) == queued and len(queue) == len(queued),
            "split queue and its membership set disagree (or an id is queued twice)",
        )
        regions = b.num_regions[layer]
        region = b.region[layer, :slots].cpu()
        stray = ((region < -1) | (region >= regions)).nonzero().flatten()[:10].tolist()
        require(not stray, f"region ids outside [-1, {regions}) at clusters {stray}")
        if held_ids.numel() == 0:
            return
        unit, raw = b.embed(key_lookup(held_ids))
        dev_cid = held_cid.to(self.device)
        sum_unit = torch.zeros_like(b.sum_unit[layer, :slots]).index_add_(0, dev_cid, unit)
        sum_raw = torch.zeros_like(b.sum_raw[layer, :slots]).index_add_(0, dev_cid, raw)
        n = count.clamp_min(1).to(self.device, torch.float32)[:, None]
        mean_unit, stored_unit = sum_unit / n, b.sum_unit[layer, :slots] / n
        err = float((mean_unit - stored_unit).abs().max())
        require(err <= atol, f"assignment-space centroids drifted by {err:.3g} (> {atol})")
        raw_scale = max(1.0, float(raw.abs().max()))
        err = float((sum_raw / n - b.sum_raw[layer, :slots] / n).abs().max()) / raw_scale
        require(err <= atol, f"raw centroids drifted by {err:.3g} of the key scale (> {atol})")
        dev = unit - mean_unit[dev_cid]
        true_var = torch.zeros(slots, device=self.device).index_add_(0, dev_cid, (dev * dev).sum(dim=1))
        true_var = true_var / n[:, 0]
        err = float((true_var - self.variances).abs().max())
        require(err <= atol, f"cluster variances off by {err:.3g} (> {atol})")
        err = float(((sum_unit @ b.proj) / n - b.sum_proj[layer, :slots] / n).abs().max())
        require(err <= atol, f"projected centroids of the coarse search drifted by {err:.3g} (> {atol})")
