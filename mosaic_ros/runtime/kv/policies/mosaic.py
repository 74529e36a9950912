"""``mosaic``: the cluster is the unit of KV organisation, maintenance and retrieval.

Per layer a ``ClusterIndex`` clusters the position-free keys online, across frames and
modalities (time markers, questions and answers join clusters like vision tokens do), in a
count sketch of each KV head's key (``options['sketch_dims']``, 16 by default; 0 or a head dim
at or below it: every coordinate; ``embedding.py``) while retrieval scores raw key means, and
the layer's rows in the host store are laid out so that a cluster is one contiguous extent.
The layers' indexes are one ``ClusterBank``: a chunk is held until its last layer is
appended, then clustered in every layer at once (batched products over the layers) and
written layer by layer.

Physical layout of a layer (rows of the ``HostKVStore``)::

    [sinks][ nursery ring (arrival order) ][ sealed log: extent, extent, extent, ... ]

- Sinks (the first ``sink_tokens`` tokens) stay where they were appended; every question
  takes them anyway.
- The nursery ring is a fixed block of rows filled in arrival order, like a FIFO: the chunk,
  once clustered (``ClusterBank.assign``), is written at the ring's head with one copy per
  layer, cluster by cluster (a cluster's tokens of one chunk are one run), so ingest costs one
  batched assignment and one contiguous write per layer and the local window is one or two
  runs of the ring plus part of the chunk it starts in.
- Sealing (in ``maintain``): a cluster none of whose tokens arrived in the last window plus
  ``hold_windows`` windows is finished for now; its ring tokens (and its old extent, if it had
  one) move to a fresh extent at the tail of the sealed log, members in id order. The
  clusters sealed together are written in a greedy nearest-centroid chain that starts next to
  the cluster last written, so clusters likely to be retrieved together end up adjacent. A
  cluster still growing when the ring's head comes back to its oldest tokens is sealed early
  (``maintain`` seals ``2 x largest chunk`` rows ahead of the head; ``append`` does it itself
  only if maintenance fell behind, and then clears the rows of the next 4 chunks at once).
  Every token normally moves once in its life. A seal in ``maintain`` moves only the rows its
  time budget allows at the measured cost per row.
- Deferred splits (``ClusterIndex.maintain`` within the budget): a sealed parent's extent is
  rewritten in place as the two children's extents side by side, the child closer to the
  extent's left neighbour first. Nothing else moves.
- Evictions under the host cap leave the index exactly (``remove_tokens``) and shift each
  touched extent's survivors down inside it; relocated extents leave holes, which maintenance
  compacts (order-preserving, so extents stay extents) once they exceed a quarter of the rows.

Retrieval per layer: sinks + local window (as every policy), then clusters. All centroids are
scored in one batched product (``ClusterIndex.score``: the log of each cluster's estimated
share of the question's attention; Triton on CUDA). Clusters are taken as in a fractional
knapsack, by estimated share per token, and the first cluster that no longer fits is cut to
fill the budget (``plan.choose_clusters``, compiled with the rest of the layer's choice in
``plan.cluster_layer_rows``). A cluster's value counts the copies it adds: one whose
extent touches an extent already taken extends that run and pays nothing, one that bridges
two runs earns a copy back, ring tokens of a still-open cluster cost one copy (to a GPU the
store gathers short runs together; CPU to CPU each is a copy of its own, a microsecond or
two, which this model leaves out). A copy costs ``run_penalty`` times the share of the marginal
cluster, so it only reorders choices of about marginal value. The rows go to the store's
``fetch`` into the layer's device buffer, which keeps rows resident from the previous
question; a question's time window filters candidates token by token instead.

Block layers (``options['blocks_below']``, 0.5 by default; 0: never). Where a layer's clusters
are much finer than a frame (they average fewer tokens than ``blocks_below`` x the stream's mean
frame block), its keys do not cohere beyond a few tokens: on text most words are unique
(2.4-8 tokens per cluster on SmolLM2's needle streams, whose blocks hold ~19 tokens, against
~340 per cluster and ~200 per frame on the synthetic 7B stream), and choosing clusters there is
token-level retrieval with estimated scores. Such a layer keeps the clusters as its scorer and
takes time as its unit: each KV
head scores every frame block (a frame with its time marker, or a text chunk, as ReKV's blocks)
by the sum of its tokens' estimated shares of that head's attention (``head_shares``: the
clusters' estimates per KV head; a token's share is its cluster's over its size) and takes the
best blocks whole (``plan.choose_blocks``); heads that took fewer tokens are filled up to the
fullest one with their best other tokens, so the selection is (H_kv, n) rows (``per_head_layer``;
the layer's device buffer holds a token per head per slot). A question's answer sits next to
what the question matches (a locker's number next to "red locker"): a whole block brings it
along, one token does not, and per head each KV head finds its own blocks. With
``options['block_parts']`` = k > 0 (0 by default: blocks stay whole), a block longer than a
head's free budget (budget less sinks and window) over k is cut into equal consecutive parts
(``plan.cut_blocks``), for streams of long text events (measured both ways in docs/BENCHMARKS.md,
"Long events taken in parts": it helps on SQuAD's sentences, it hurts on short events). With
``options['layer_carry']`` = b > 0 (0 by default: each layer chooses alone), a question's block
layers agree across depth: layer l's KV heads score each block by their own shares plus b x
C(l-1), where C(l) = (the block's share averaged over l's heads) + b x C(l-1), summed over the
block layers chosen so far (measured in docs/BENCHMARKS.md, "Block layers that carry the earlier
layers' choice": at 128 tokens it lifted accuracy on the benchmark's 108 questions, not on six
fresh streams, and lowered top-1 on both; at 256 it costs accuracy; on SQuAD's questions it
changes nothing, "SQuAD's questions again"). No
prefetch runs into or out of a block layer. Measured in docs/BENCHMARKS.md (the needle workload).

Cross-layer prefetch (``config.prefetch``; the base class runs it for every policy): right
after layer l's fetch, layer l+1's selection is predicted (``predict_next``) and copied into
layer l+1's buffer; the true selection then fetches only the misses. Mosaic predicts clusters
(``options['prefetch_predictor']``): ``"tokens"`` (default) carries the estimated share of
each token layer l retrieved to its cluster in layer l+1; ``"query"`` scores layer l+1's
centroids with layer l's query; the best predicted clusters fill ``prefetch_share`` of the
retrievable budget.

Shapes: keys/values (T, H_kv, D) pre-RoPE; C cluster ids per layer; rows and ids int64.
"""

from __future__ import annotations

import time
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from mosaic_ros.runtime.kv import plan
from mosaic_ros.runtime.kv.clock import make_clock
from mosaic_ros.runtime.kv.clusters import ClusterBank, ClusterConfig, ClusterIndex, Split, require
from mosaic_ros.runtime.kv.policies.base import Selection, StoreBackedPolicy
from mosaic_ros.runtime.kv.policies.units import FrameBlocks, grouped_queries
from mosaic_ros.runtime.kv.policy import KVGeometry, PolicyConfig, RetrievalStats, TokenMeta, register_policy

PREDICTORS = ("tokens", "query")
# a seal forced by the ring's head clears the held rows of this many next chunks, not only the
# chunk's own: a seal has a fixed cost (well under a millisecond at the 7B shape, against 1.5 ms
# for moving about 700 rows), paid then once per few chunks instead of every other one
_FORCE_AHEAD_CHUNKS = 4
_EMPTY = torch.zeros(0, dtype=torch.int64)


def _ranges(starts: Tensor, lengths: Tensor) -> Tensor:
    """Concatenation of ``arange(s, s + n)`` for (s, n) in zip(starts, lengths), (sum n,) int64."""
    total = int(lengths.sum()) if lengths.numel() else 0
    if total == 0:
        return _EMPTY
    offsets = torch.cumsum(lengths, 0) - lengths
    return torch.arange(total) + torch.repeat_interleave(starts - offsets, lengths)


def _marks(ids: Tensor, size: int) -> Tensor:
    """(size,) bool, True at ``ids`` (int64, each in [0, size)): ``table[x]`` is ``isin(x, ids)``."""
    table = torch.zeros(size, dtype=torch.bool)
    table[ids] = True
    return table


def _unit_rows(centroids: Tensor) -> Tensor:
    """(k, H_kv, D) centroids -> (k, H_kv * D) rows with every head L2-normalised (cosine space)."""
    c = centroids.float()
    c = c / c.norm(dim=-1, keepdim=True).clamp_min(1e-30)
    return c.reshape(c.shape[0], -1)


def chain_order(units: Tensor, start: Tensor | None) -> list[int]:
    """Greedy nearest-neighbour chain over ``units`` (k, F): positions 0..k-1 in visit order.

    The chain starts at the row most similar to ``start`` (F,) (or at row 0) and always steps
    to the most similar row not visited yet.
    """
    k = units.shape[0]
    if k <= 1:
        return list(range(k))
    # the walk in numpy on the (k, k) similarities: a torch call per step cost more than the step
    sims = (units @ units.T).numpy()
    current = 0 if start is None else int((units @ start).argmax())
    order = [current]
    sims[:, current] = -np.inf  # a visited row is never the most similar again
    for _ in range(k - 1):
        current = int(sims[current].argmax())
        order.append(current)
        sims[:, current] = -np.inf
    return order


def head_shares(query: Tensor, centroids: Tensor, counts: Tensor) -> Tensor:
    """(H_kv, C) float32 on the host: each cluster's estimated share of each KV head's attention.

    query: (H_q, L_q, D) pre-RoPE; centroids: (C, H_kv, D); counts: (C,) tokens per cluster (0:
    unused id, share 0; at least one must be live). The estimate of ``kernels.centroid_scores``
    (``counts[c] * exp(q . centroid / sqrt(D))``, normalised over clusters per query head and
    token), averaged over the KV head's query-head group and the question's tokens only.
    """
    q = grouped_queries(query, centroids.shape[1]).to(centroids.device)
    log_counts = counts.to(q.device).float().log()  # log(0) = -inf: unused ids draw nothing
    # (H_kv, G * L_q, C): log(count) + (q . centroid) / sqrt(D), one fused product
    z = torch.baddbmm(log_counts, q, centroids.float().permute(1, 2, 0), alpha=query.shape[-1] ** -0.5)
    return torch.softmax(z, dim=-1).mean(dim=1).cpu()


class _Layer:
    """One layer's clusters and physical layout (see the module docstring).

    Per cluster id (length ``>= index.num_slots``): ``ext_start``/``ext_len`` the sealed extent
    (rows [start, start + len) hold the cluster's sealed members in ascending id order; len 0:
    none), ``newest`` the largest token id ever assigned (-1: none). ``nursery``: ids (n,)
    ascending of the non-sink tokens not sealed yet, wherever their rows are. The ring is rows
    [ring_lo, ring_lo + ring_size) (size 0: none), written at ``head`` (an offset).
    ``epoch`` counts layout changes (it keys the adjacency cache).
    """

    def __init__(self, index: ClusterIndex):
        self.index = index
        self.ext_start = torch.zeros(0, dtype=torch.int64)
        self.ext_len = torch.zeros(0, dtype=torch.int64)
        self.newest = torch.zeros(0, dtype=torch.int64)
        self.nursery = _EMPTY
        self.ring_lo = 0
        self.ring_size = 0
        self.head = 0
        self.tail = -1
        self.epoch = 0
        self._adjacency: tuple[int, Tensor, Tensor] | None = None

    def grow(self) -> None:
        """Size the per-cluster tensors for every id the index uses."""
        need = self.index.num_slots
        have = self.ext_len.numel()
        if need <= have:
            return
        new = max(need, 2 * have, 64)

        def grown(t: Tensor, fill: int) -> Tensor:
            out = torch.full((new,), fill, dtype=torch.int64)
            out[:have] = t
            return out

        self.ext_start = grown(self.ext_start, 0)
        self.ext_len = grown(self.ext_len, 0)
        self.newest = grown(self.newest, -1)

    def changed(self) -> None:
        self.epoch += 1

    def adjacency(self, page_rows: int) -> tuple[Tensor, Tensor]:
        """(left, right) (C,) int64: the cluster whose extent ends where this one's starts (left) or
        starts where it ends (right), -1 if none; extents meeting at a page boundary do not touch
        (a copy never crosses a page)."""
        if self._adjacency is not None and self._adjacency[0] == self.epoch:
            return self._adjacency[1], self._adjacency[2]
        slots = self.ext_len.numel()
        left = torch.full((slots,), -1, dtype=torch.int64)
        right = torch.full((slots,), -1, dtype=torch.int64)
        live = torch.nonzero(self.ext_len > 0).flatten()
        if live.numel() > 1:
            live = live[torch.argsort(self.ext_start[live])]
            a, b = live[:-1], live[1:]
            boundary = self.ext_start[b]
            touch = (self.ext_start[a] + self.ext_len[a] == boundary) & (boundary % page_rows != 0)
            right[a[touch]] = b[touch]
            left[b[touch]] = a[touch]
        self._adjacency = (self.epoch, left, right)
        return left, right


@register_policy
class MosaicPolicy(StoreBackedPolicy):
    """Cluster-organised KV: online clustering, contiguous cluster extents, cluster retrieval."""

    name = "mosaic"
    option_defaults: ClassVar[dict[str, Any]] = {
        "ring_windows": 8.0,  # nursery ring size, in local windows (at least window + 4 chunks)
        "hold_windows": 1.0,  # a cluster idle this many windows beyond the local window is sealed
        "run_penalty": 1.0,  # copy penalty, in shares of the marginal cluster (0: plain greedy)
        "prefetch_predictor": "tokens",  # "tokens" or "query" (see the module docstring)
        "prefetch_share": 0.5,  # share of the retrievable budget a prediction fills
        "max_cluster_tokens": 256,  # ClusterIndex: clusters above this size are split
        "sketch_dims": 16,  # ClusterIndex: cluster a count sketch of each head's key, this many dims (0: all)
        "blocks_below": 0.5,  # clusters below this many frame blocks in size: retrieve blocks per head
        "block_parts": 0,  # a block layer's block is at most 1/block_parts of a head's free budget (0: whole)
        "layer_carry": 0.0,  # a block layer adds this times the earlier block layers' carried block scores
        "maintain_clock": "wall",  # what maintenance's budget is measured in: "wall" or "work" (clock.py)
    }

    def __init__(self, geometry: KVGeometry, config: PolicyConfig, device: torch.device | str = "cpu"):
        super().__init__(geometry, config, device)
        o = self.options
        if float(o["ring_windows"]) <= 1.0 or float(o["hold_windows"]) < 0.0:
            raise ValueError("ring_windows must be > 1 and hold_windows >= 0")
        if float(o["run_penalty"]) < 0.0:
            raise ValueError(f"run_penalty must be >= 0, got {o['run_penalty']}")
        if not 0.0 < float(o["prefetch_share"]) <= 1.0:
            raise ValueError(f"prefetch_share must be in (0, 1], got {o['prefetch_share']}")
        if float(o["blocks_below"]) < 0.0:
            raise ValueError(f"blocks_below must be >= 0, got {o['blocks_below']}")
        if int(o["block_parts"]) < 0 or int(o["block_parts"]) != float(o["block_parts"]):
            raise ValueError(f"block_parts must be an integer >= 0, got {o['block_parts']}")
        self._clock = make_clock(str(o["maintain_clock"]))
        if o["prefetch_predictor"] not in PREDICTORS:
            raise ValueError(
                f"prefetch_predictor must be one of {PREDICTORS}, got {o['prefetch_predictor']!r}"
            )

    # ------------------------------------------------------------------ state
    def reset(self) -> None:
        super().reset()
        cfg = ClusterConfig(
            max_cluster_tokens=int(self.options["max_cluster_tokens"]),
            sketch_dims=int(self.options["sketch_dims"]),
        )
        g = self.geometry
        self._bank = ClusterBank(g.num_layers, g.num_kv_heads, g.head_dim, cfg, self.device)
        self._layers = [_Layer(index) for index in self._bank.layers]
        self._pending: dict[int, tuple[Tensor, Tensor, Tensor]] = {}
        self._largest_chunk = 1
        self._next_maintained = 0
        self._seal_ms_per_row: float | None = None  # measured cost of maintenance's seals, ms per row
        self._order_buffers: list[Tensor | None] = [None, None]  # a chunk's keys / values in write order
        self.frame_blocks = FrameBlocks()
        self._block_layers: list[bool] | None = None  # per layer, fixed while a question is open
        self._carry = np.zeros(0, np.float32)  # (blocks,) the question's carried block scores

    def _key_lookup(self, layer: int):
        store = self.store

        def lookup(token_ids: Tensor) -> Tensor:
            return store.read_keys(layer, store.rows_of(layer, token_ids))

        return lookup

    @property
    def _window_tokens(self) -> int:
        return max(self.config.window_tokens, 1)

    # ------------------------------------------------------------------ stream
    def add_tokens(self, meta: TokenMeta) -> Tensor:
        self._settle()
        self._flush()
        self._largest_chunk = max(self._largest_chunk, meta.num_tokens)
        ids = super().add_tokens(meta)
        self.frame_blocks.add(ids, meta)
        return ids

    def append(self, layer: int, keys: Tensor, values: Tensor, token_ids: Tensor) -> None:
        """Hold the layer's chunk until every layer has it, then cluster it in all layers at once
        and write each layer's at its ring's head (``_flush``). A layer's stored KV is read only
        by the next chunk's ingest context or by questions, both after the last layer's append."""
        self._check_layer(layer)
        self._settle()
        ids = token_ids.to("cpu", torch.int64)
        if ids.numel() == 0:
            return
        if self._pending and (layer in self._pending or not torch.equal(self._pending_ids(), ids)):
            self._flush()
        self._pending[layer] = (keys, values, ids)
        if len(self._pending) == self.geometry.num_layers:
            self._flush()

    def _pending_ids(self) -> Tensor:
        return next(iter(self._pending.values()))[2]

    def _flush(self) -> None:
        """Cluster the held chunk in every layer (one ``ClusterBank.assign``: batched products over
        the layers) and write each layer's rows at its ring's head with one copy, cluster by
        cluster. A chunk some layer never received is dropped with an error."""
        pending, self._pending = self._pending, {}
        if not pending:
            return
        n = self.geometry.num_layers
        if len(pending) != n:
            missing = sorted(set(range(n)) - set(pending))
            raise ValueError(
                f"a chunk reached {len(pending)} of {n} layers (not {missing[:8]}): mosaic clusters a "
                "chunk in every layer at once, so it was dropped"
            )
        ids = next(iter(pending.values()))[2]
        keys = [pending[layer][0] for layer in range(n)]  # read once by assign, never stacked
        cids = self._bank.assign(keys, ids, self.store.modality[ids])
        # without sinks every token of the chunk goes to the ring: all layers' orders in one sort
        orders = torch.argsort(cids, dim=1, stable=True) if int(ids[0]) >= self.config.sink_tokens else None
        for layer in range(n):
            order = None if orders is None else orders[layer]
            self._write(layer, pending[layer][0], pending[layer][1], ids, cids[layer], order)

    def _write(
        self, layer: int, keys: Tensor, values: Tensor, ids: Tensor, cid: Tensor, order: Tensor | None = None
    ) -> None:
        """Write a chunk of ``layer`` (clusters ``cid`` (T,)): sinks at the tail, the rest at the
        ring's head, cluster by cluster. ``order``: the chunk's ``argsort(cid, stable=True)`` when
        it holds no sink (given by ``_flush``, which sorts every layer at once)."""
        st = self._layers[layer]
        st.grow()
        st.newest.scatter_reduce_(0, cid, ids, "amax")
        # the chunk's ring rows go cluster by cluster (ids ascending within one): a cluster's
        # tokens of one frame form one run, so fetching a still-open cluster and sealing it read
        # runs instead of rows scattered over the ring
        if order is None:
            pinned = ids < self.config.sink_tokens
            loose_at = torch.nonzero(~pinned).flatten()
            order = torch.cat(
                (torch.nonzero(pinned).flatten(), loose_at[torch.argsort(cid[loose_at], stable=True)])
            )
        else:
            loose_at = order
        rows = torch.empty_like(ids)
        n_pinned = ids.numel() - loose_at.numel()
        if n_pinned:
            rows[:n_pinned] = self._alloc(layer, n_pinned)
        if loose_at.numel():
            rows[n_pinned:] = self._ring_rows(layer, loose_at.numel())
            st.nursery = torch.cat(
                (st.nursery, ids if n_pinned == 0 else ids[ids >= self.config.sink_tokens])
            )
        dev_order = order.to(keys.device)
        self.store.place(
            layer,
            ids[order],
            rows,
            self._reordered(0, keys, dev_order),
            self._reordered(1, values, dev_order),
        )

    def _reordered(self, slot: int, x: Tensor, order: Tensor) -> Tensor:
        """``x[order]`` in a buffer reused by every layer's write (``place`` copies it into the store
        at once): a fresh chunk-sized tensor per layer was new memory, faulted in on first touch."""
        buf = self._order_buffers[slot]
        if (
            buf is None
            or buf.shape[0] < order.numel()
            or (buf.shape[1:], buf.dtype, buf.device) != (x.shape[1:], x.dtype, x.device)
        ):
            buf = torch.empty(
                (max(order.numel(), self._largest_chunk), *x.shape[1:]), dtype=x.dtype, device=x.device
            )
            self._order_buffers[slot] = buf
        return torch.index_select(x, 0, order, out=buf[: order.numel()])

    def _alloc(self, layer: int, n: int) -> Tensor:
        """``n`` fresh rows at the tail; if the store had to compact (host cap), re-derive the layout."""
        version = self.store.layout_version(layer)
        rows = self.store.alloc(layer, n, reuse_freed=False)
        if self.store.layout_version(layer) != version:
            self._rebuild(layer)
        return rows

    def _rebuild(self, layer: int) -> None:
        """Re-derive extent starts from the store after a compaction (order-preserving, so every
        extent is still contiguous); the ring's free rows are gone, so the ring is dropped (its
        tokens stay in the nursery and a new ring is made for the next chunk)."""
        st = self._layers[layer]
        sealed = st.ext_len > 0
        if bool(sealed.any()):
            live = self.store.live_tokens(layer)
            out = live[(live >= self.config.sink_tokens) & ~torch.isin(live, st.nursery)]
            cid = st.index.units_of(out)
            first = torch.full_like(st.ext_start, torch.iinfo(torch.int64).max)
            first.scatter_reduce_(0, cid, self.store.rows_of(layer, out), "amin")
            st.ext_start = torch.where(sealed, first, 0)
        st.ring_size = 0
        st.changed()

    def _ring_rows(self, layer: int, n: int) -> Tensor:
        """Rows for ``n`` new nursery tokens: the next ``n`` ring rows, or fresh tail rows when no ring
        fits (host cap) or the chunk is larger than a quarter ring. Rows still held are freed first
        by a seal of their clusters, with the clusters held in the next ``_FORCE_AHEAD_CHUNKS x n``
        rows."""
        st = self._layers[layer]
        if st.ring_size == 0:
            self._make_ring(layer)
        if st.ring_size == 0 or 4 * n > st.ring_size:
            return self._alloc(layer, n)
        # a chunk is at most a quarter ring here, so the look-ahead never wraps onto its own rows
        ahead = st.ring_lo + (st.head + torch.arange(_FORCE_AHEAD_CHUNKS * n)) % st.ring_size
        rows = ahead[:n]
        busy = self.store.tokens_at(layer, rows)
        if bool((busy >= 0).any()):  # maintenance fell behind: seal the clusters in the way now,
            busy = self.store.tokens_at(layer, ahead)  # and those of the next chunks' rows with them
        busy = busy[busy >= 0]
        if busy.numel():
            self._seal(layer, force=busy)
        if st.ring_size == 0 or bool((self.store.tokens_at(layer, rows) >= 0).any()):
            return self._alloc(layer, n)  # no room to seal under the host cap, or the ring was dropped
        st.head = (st.head + n) % st.ring_size
        return rows

    def _make_ring(self, layer: int) -> None:
        st = self._layers[layer]
        size = max(int(float(self.options["ring_windows"]) * self._window_tokens), 8 * self._largest_chunk)
        if self.max_rows:
            store = self.store
            size = min(size, self._headroom)
            free = self.max_rows - max(store.allocated_rows(layer), store.live_count(layer))
            if size > free or size < 4 * self._largest_chunk:
                return
        st.ring_lo = int(self._alloc(layer, size)[0])
        st.ring_size, st.head = size, 0

    # ------------------------------------------------------------------ sealing
    def _seal(self, layer: int, force: Tensor | None = None, limit: int | None = None) -> int:
        """Move finished clusters' nursery tokens (and their old extents) to fresh extents at the
        log tail, chain-ordered; returns the rows moved. With ``force`` (token ids), seal those
        tokens' clusters instead, every nursery token of theirs older than the local window (or
        all, if still in the way). With ``limit``, only the clusters (oldest first) whose moves
        together fit in ``limit`` rows: the rest wait for the next call."""
        st, store = self._layers[layer], self.store
        if st.nursery.numel() == 0:
            return 0
        window_lo = store.appended_upto(layer) - self._window_tokens
        ncid = st.index.units_of(st.nursery)
        slots = st.ext_len.numel()
        if force is None:
            waiting = st.nursery < window_lo
            idle = st.newest[ncid] < window_lo - int(
                float(self.options["hold_windows"]) * self._window_tokens
            )
            ahead = self._ahead_of_head(layer, st.nursery)
            seal = waiting & (idle | _marks(ncid[waiting & ahead], slots)[ncid])
        else:  # membership by lookup tables: ``isin`` sorted the whole nursery every call
            hit = _marks(st.index.units_of(force), slots)[ncid]
            in_way = torch.zeros(st.nursery.numel(), dtype=torch.bool)
            at = torch.searchsorted(st.nursery, force).clamp_(max=st.nursery.numel() - 1)
            in_way[at[st.nursery[at] == force]] = True
            seal = hit & ((st.nursery < window_lo) | in_way)
        if self.max_rows:  # under the host cap a move needs free rows: seal the oldest that fit
            seal &= self._fits(st, ncid, seal, self.max_rows - store.live_count(layer))
        if limit is not None:
            seal &= self._fits(st, ncid, seal, limit)
        if not bool(seal.any()):
            return 0
        moving, moving_cid = st.nursery[seal], ncid[seal]
        clusters = torch.unique(moving_cid)
        reopened = clusters[st.ext_len[clusters] > 0]  # sealed before: their extent moves along
        old_ids = store.tokens_at(layer, _ranges(st.ext_start[reopened], st.ext_len[reopened]))
        old_cid = torch.repeat_interleave(reopened, st.ext_len[reopened])
        ordered = clusters[self._chain(st, clusters)]
        rank = torch.empty(int(clusters.max()) + 1, dtype=torch.int64)
        rank[ordered] = torch.arange(ordered.numel())
        ids = torch.cat((old_ids, moving))
        cid = torch.cat((old_cid, moving_cid))
        perm = torch.argsort(rank[cid] * (store.num_tokens + 1) + ids)
        ids, cid = ids[perm], cid[perm]
        rows = self._alloc(layer, ids.numel())
        store.move(layer, ids, rows)
        st.nursery = st.nursery[~seal]
        counts = torch.bincount(rank[cid], minlength=ordered.numel())
        st.ext_start[ordered] = int(rows[0]) + torch.cumsum(counts, 0) - counts
        st.ext_len[ordered] = counts
        st.tail = int(ordered[-1])
        st.changed()
        return ids.numel()

    @staticmethod
    def _fits(st: _Layer, ncid: Tensor, seal: Tensor, room: int) -> Tensor:
        """(n,) bool over the nursery: tokens of the clusters (oldest nursery token first) whose move,
        old extent included, fits in ``room`` rows."""
        clusters, inverse = torch.unique(ncid[seal], return_inverse=True)
        oldest = torch.full((clusters.numel(),), torch.iinfo(torch.int64).max)
        oldest.scatter_reduce_(0, inverse, st.nursery[seal], "amin")
        need = torch.bincount(inverse, minlength=clusters.numel()) + st.ext_len[clusters]
        order = torch.argsort(oldest)
        fits = torch.zeros(st.ext_len.numel(), dtype=torch.bool)
        fits[clusters[order[torch.cumsum(need[order], 0) <= room]]] = True
        return fits[ncid]

    def _ahead_of_head(self, layer: int, ids: Tensor) -> Tensor:
        """(n,) bool: which of ``ids`` sit in ring rows the next two largest chunks will overwrite."""
        st = self._layers[layer]
        if st.ring_size == 0:
            return torch.zeros(ids.numel(), dtype=torch.bool)
        offset = self.store.rows_of(layer, ids) - st.ring_lo
        in_ring = (offset >= 0) & (offset < st.ring_size)
        dist = (offset - st.head) % st.ring_size
        return in_ring & (dist < 2 * self._largest_chunk)

    def _chain(self, st: _Layer, clusters: Tensor) -> list[int]:
        """Order (positions into ``clusters``) in which to write the clusters sealed together."""
        cents = st.index.centroids
        units = _unit_rows(cents[clusters.to(cents.device)].cpu())
        start = None
        if st.tail >= 0 and st.ext_len[st.tail] > 0:
            start = _unit_rows(cents[st.tail : st.tail + 1].cpu())[0]
        return chain_order(units, start)

    # ------------------------------------------------------------------ maintenance
    def maintain(self, budget_ms: float) -> float:
        """Deferred splits (re-laid in place), sealing and hole compaction, layer by layer in turn,
        while ``budget_ms`` lasts (a layer's work is started only while time is left); returns the
        wall milliseconds the call took.

        Time is read from the clock ``options['maintain_clock']`` names (``clock.py``): ``"wall"``
        (default) real time, ``"work"`` fixed costs per unit of work, so that benchmark runs are
        reproducible. Each step is started only if its expected cost fits in the time left: a
        split at the measured cost per member token (the index's split and the extent's
        re-layout; moving average in ``ClusterBank.split_ms_per_token``), and a seal moves only
        as many rows as the time left allows at the measured cost per row (``_seal_ms_per_row``;
        before any is measured, two chunks' worth), oldest clusters first, and only if that is
        at least half a chunk (a seal has a fixed cost: a few smaller ones would cost more than
        the rows they move). What is left waits for the next call (or, if maintenance keeps
        falling behind, is sealed by ``append`` when the ring's head reaches it). An expected
        split cost that keeps every queued split from starting shrinks by a tenth per call, so
        one slow split cannot stop splitting. What the estimates miss (fixed costs, a split
        dearer than its size says, the compaction check) shows as overrun: the call aims at the
        budget less a holdback (``ClusterBank.holdback_ms``, at most half the budget) that every
        call moves by 0.3 times its distance from nine tenths of the budget (the calls' spread
        lies mostly above the aim), so the calls keep to the budget on average.
        """
        self._settle()
        self._flush()
        wall = time.perf_counter()
        clock = self._clock
        start = clock.now_ms()
        n = self.geometry.num_layers
        bank = self._bank
        aim, budget_ms = budget_ms, budget_ms - min(bank.holdback_ms, 0.5 * budget_ms)
        for _ in range(n):
            spent = clock.now_ms() - start
            if spent >= budget_ms:
                break
            layer = self._next_maintained
            self._next_maintained = (layer + 1) % n
            st = self._layers[layer]
            t0 = clock.now_ms()
            per_token = bank.split_ms_per_token
            report = st.index.maintain(self._key_lookup(layer), budget_ms - spent, per_token, clock)
            for split in report.splits:
                self._relayout_split(layer, split)
            t1 = clock.now_ms()
            if report.splits:
                tokens = sum(m.numel() for s in report.splits for m in s.members)
                ms = (t1 - t0) / max(tokens, 1)
                bank.split_ms_per_token = ms if per_token is None else 0.7 * per_token + 0.3 * ms
            elif report.pending and per_token is not None:
                bank.split_ms_per_token = 0.9 * per_token
            cost = self._seal_ms_per_row
            left = budget_ms - (t1 - start)
            limit = 2 * self._largest_chunk if cost is None else int(left / cost)
            if left > 0 and limit >= max(1, self._largest_chunk // 2):
                moved = self._seal(layer, limit=limit)
                if moved:
                    clock.charge("seal", 1)
                    clock.charge("seal_row", moved)
                    ms = clock.now_ms() - t1
                    self._seal_ms_per_row = ms / moved if cost is None else 0.7 * cost + 0.3 * ms / moved
            clock.charge("compact_row", self._compact_holes(layer))
            clock.charge("layer", 1)
        spent = clock.now_ms() - start
        if aim > 0:
            bank.holdback_ms = min(max(bank.holdback_ms + 0.3 * (spent - 0.9 * aim), 0.0), 0.5 * aim)
        return (time.perf_counter() - wall) * 1e3

    def _relayout_split(self, layer: int, split: Split) -> None:
        """Rewrite a split parent's extent as its children's two extents, side by side."""
        st, store = self._layers[layer], self.store
        st.grow()
        parent, child = split.children
        for c, members in zip(split.children, split.members, strict=True):
            st.newest[c] = int(members.max()) if members.numel() else -1
        length = int(st.ext_len[parent])
        st.ext_len[child] = 0
        if length == 0:
            return
        start = int(st.ext_start[parent])
        rows = torch.arange(start, start + length)
        ids = store.tokens_at(layer, rows)
        to_child = torch.isin(ids, split.members[1])
        parts = [(parent, ids[~to_child]), (child, ids[to_child])]
        left, _ = st.adjacency(self.page_rows)
        if left[parent] >= 0 and self._closer_to(st, int(left[parent]), child, parent):
            parts.reverse()
        ordered = torch.cat((parts[0][1], parts[1][1]))
        if not torch.equal(ordered, ids):
            store.move(layer, ordered, rows)
        n0 = parts[0][1].numel()
        st.ext_start[parts[0][0]], st.ext_len[parts[0][0]] = start, n0
        st.ext_start[parts[1][0]], st.ext_len[parts[1][0]] = start + n0, length - n0
        if st.tail == parent:
            st.tail = parts[1][0] if length > n0 else parts[0][0]
        st.changed()

    @staticmethod
    def _closer_to(st: _Layer, anchor: int, a: int, b: int) -> bool:
        """Whether cluster ``a``'s centroid is more similar to ``anchor``'s than ``b``'s is."""
        units = _unit_rows(st.index.means(torch.tensor([anchor, a, b])).cpu())
        return bool(units[0] @ units[1] > units[0] @ units[2])

    def _compact_holes(self, layer: int) -> int:
        """Compact the layer once free rows outside the ring exceed a quarter of its rows;
        returns the rows compacted (the layer's live rows; 0: not compacted)."""
        store, st = self.store, self._layers[layer]
        free = store.allocated_rows(layer) - store.live_count(layer)
        if st.ring_size:
            ring = store.tokens_at(layer, torch.arange(st.ring_lo, st.ring_lo + st.ring_size))
            free -= int((ring < 0).sum())
        if free > max(self.page_rows, store.allocated_rows(layer) // 4):
            store.compact(layer)
            self._rebuild(layer)
            return store.live_count(layer)
        return 0

    # ------------------------------------------------------------------ host cap
    def hot_rows(self, layer: int) -> Tensor:
        """The base's sinks and local window, and the nursery ring's rows: every frame writes
        into the ring, so under the disk tier a spilled ring page would be read back at once."""
        st = self._layers[layer]
        ring = torch.arange(st.ring_lo, st.ring_lo + st.ring_size, dtype=torch.int64)
        return torch.cat((super().hot_rows(layer), ring))

    @property
    def _headroom(self) -> int:
        """Rows per layer kept free under the host cap: the nursery ring and sealing moves need
        them (a token being moved holds its old row until it lands)."""
        return self.max_rows // 8

    def _make_room(self, incoming: int) -> None:
        """Compress as the base does, early enough to leave ``_headroom`` rows free when possible."""
        spare = self.max_rows - incoming - self.config.sink_tokens - self.config.window_tokens - 1
        super()._make_room(incoming + max(0, min(self._headroom, spare)))

    def release(self, layer: int, token_ids: Tensor) -> None:
        """Evict tokens: out of the index (exact statistics), out of the nursery, and each touched
        extent's survivors shifted down so the extent stays contiguous."""
        self._settle()
        store, st = self.store, self._layers[layer]
        ids = token_ids.to("cpu", torch.int64)
        ids = ids[store.rows_of(layer, ids) >= 0]
        if ids.numel() == 0:
            return
        keys = store.read_keys(layer, store.rows_of(layer, ids))
        cid = st.index.units_of(ids)
        emptied = st.index.remove_tokens(ids, keys)
        st.nursery = st.nursery[~torch.isin(st.nursery, ids)]
        touched = torch.unique(cid[cid >= 0])
        touched = touched[st.ext_len[touched] > 0]
        before = store.tokens_at(layer, _ranges(st.ext_start[touched], st.ext_len[touched]))
        store.release(layer, ids)
        if touched.numel():
            owner = torch.repeat_interleave(touched, st.ext_len[touched])
            keep = ~torch.isin(before, ids)
            survivors, owner = before[keep], owner[keep]
            counts = torch.bincount(owner, minlength=st.ext_len.numel())[touched]
            st.ext_len[touched] = counts
            target = _ranges(st.ext_start[touched], counts)
            if not torch.equal(store.rows_of(layer, survivors), target):
                store.move(layer, survivors, target)
        st.newest[emptied] = -1
        st.ext_len[emptied] = 0
        if st.tail >= 0 and st.ext_len[st.tail] == 0:
            st.tail = -1
        st.changed()

    # ------------------------------------------------------------------ questions
    def begin_question(self, window: tuple[float, float] | None = None) -> None:
        self._settle()
        self._flush()
        self._block_layers = self._block_layer_flags()
        self._carry = np.zeros(0, np.float32)
        super().begin_question(window)

    # ------------------------------------------------------------------ selection
    def end_question(self) -> RetrievalStats:
        stats = super().end_question()
        self._block_layers = None
        return stats

    def base_ids(self, layer: int) -> Tensor:
        """Sinks + local window of ``layer`` (ids ascending), as ``split_candidates`` defines them
        with no time window, without scanning the whole stream when the window's ids are alive."""
        budget = self.config.budget_tokens
        sink_ids, recent = self.recent_ids(layer, self.config.sink_tokens, self.config.window_tokens)
        sink_ids = sink_ids[:budget]
        want = min(recent.numel(), budget - sink_ids.numel())
        return torch.cat((sink_ids, recent[recent.numel() - want :]))

    def per_head_layer(self, layer: int) -> bool:
        """A block layer (see the module docstring); decided once per question, at its start."""
        flags = self._block_layers if self._block_layers is not None else self._block_layer_flags()
        return flags[layer]

    def _block_layer_flags(self) -> list[bool]:
        """Per layer, whether its clusters average fewer tokens than ``blocks_below`` x the stream's
        mean frame block (never while it has no cluster)."""
        below = float(self.options["blocks_below"])
        if below <= 0:
            return [False] * self.geometry.num_layers
        block = self.store.num_tokens / max(self.frame_blocks.count, 1)  # tokens per block, mean
        tokens, clusters = self._bank.held_tokens(), self._bank.live_clusters()
        return [c > 0 and t < below * block * c for t, c in zip(tokens, clusters, strict=True)]

    def select(self, layer: int, query: Tensor) -> Selection:
        """What ``layer`` retrieves for the question's queries (H_q, L_q, D) pre-RoPE."""
        if self.per_head_layer(layer):
            return self._select_blocks(layer, query)
        if self._window is not None:
            return self._select_in_window(layer, query)
        base = self.base_ids(layer)
        share = self._layers[layer].index.share(query)
        return self._rows_for(layer, base, share, self.config.budget_tokens - base.numel())

    def _rows_for(self, layer: int, base: Tensor, share: Tensor, room: int) -> Selection:
        """Sinks + window ``base`` (ids) plus the clusters ``plan.choose_clusters`` takes within
        ``room`` tokens, ``share`` (C,) being their estimated shares of the question's attention
        (one compiled pass, ``plan.cluster_layer_rows``); every live token if all of them fit."""
        store, st = self.store, self._layers[layer]
        share = share.to("cpu", torch.float32).contiguous()
        counts = st.index.counts.cpu()  # the index keeps its statistics on the compute device
        base_rows = store.rows_of(layer, base)
        in_base = st.index.units_of(base)
        if int(counts.sum()) - int((in_base >= 0).sum()) <= room:
            sizes = counts - torch.bincount(in_base[in_base >= 0], minlength=counts.numel())
            live = store.live_tokens(layer)
            rest = live[~torch.isin(live, base)]
            extra = store.rows_of(layer, rest)
            per_token = share / sizes.clamp_min(1)
            return Selection(torch.cat((base_rows, extra)), extra, per_token[st.index.units_of(rest)])
        first, clusters = st.index.token_map()
        left, right = st.adjacency(self.page_rows)
        nursery = st.nursery.contiguous()
        rows, extra_share = plan.cluster_layer_rows(
            share.numpy(),
            counts.numpy(),
            clusters,
            first,
            base.contiguous().numpy(),
            base_rows.numpy(),
            self.config.sink_tokens,
            nursery.numpy(),
            store.rows_of(layer, nursery).numpy(),
            st.ext_start.numpy(),
            st.ext_len.numpy(),
            left.numpy(),
            right.numpy(),
            room,
            float(self.options["run_penalty"]),
        )
        rows_t = torch.from_numpy(rows)
        return Selection(rows_t, rows_t[base.numel() :], torch.from_numpy(extra_share))

    def _select_blocks(self, layer: int, query: Tensor) -> Selection:
        """A block layer's (H_kv, n) selection: per KV head, sinks + window and the frame blocks its
        clusters estimate draw the most of that head's attention, whole, filled up to the head
        that took the most with its best other tokens (every head hands attention n tokens)."""
        h = self.geometry.num_kv_heads
        base, rest = self.split_candidates(layer, self.config.budget_tokens)
        room = self.config.budget_tokens - base.numel()
        if rest.numel() <= room:
            return self.selection(layer, torch.cat((base, rest)).sort().values.expand(h, -1))
        index = self._layers[layer].index
        counts = index.counts.cpu()
        shares = head_shares(query, index.centroids, counts)  # (H_kv, C)
        beta = float(self.options["layer_carry"])
        parts = int(self.options["block_parts"])
        first, clusters = index.token_map()
        table, r = self.frame_blocks.table(), rest.numpy()
        # rest ascending, so its blocks (numbered in arrival order) never decrease; sinks < rest <
        # window (split_candidates, base ascending), so each head's ids come out ascending
        ids = plan.block_layer_ids(
            shares.numpy(),
            counts.numpy(),
            clusters,
            first,
            table,
            r,
            base.numpy(),
            self.config.sink_tokens,
            -(-room // parts) if parts else 0,
            room,
            (beta * self._carry).astype(np.float32),  # empty until a block layer has carried
        )
        if beta > 0:  # C(l) = this layer's head-mean block shares + beta x C(l - 1)
            unit = clusters[r - first]
            per_token = shares.numpy().mean(axis=0)[unit] / np.maximum(counts.numpy()[unit], 1)
            mine = np.bincount(table[r], weights=per_token, minlength=self.frame_blocks.count)
            prev = self._carry if self._carry.size else np.zeros_like(mine)
            self._carry = (mine + beta * prev).astype(np.float32)
        return self.selection(layer, torch.from_numpy(ids))

    def _select_in_window(self, layer: int, query: Tensor) -> Selection:
        """A question's time window: candidates filtered token by token, clusters chosen by value
        per token (copies ignored: the filtered tokens are gathered anyway)."""
        st = self._layers[layer]
        base, rest = self.split_candidates(layer, self.config.budget_tokens)
        room = self.config.budget_tokens - base.numel()
        cid = st.index.units_of(rest)
        n = st.index.num_slots
        sizes = torch.bincount(cid, minlength=n)
        share = st.index.share(query)
        none, no_runs = np.full(n, -1, np.int64), np.zeros(n, np.int64)
        whole, partial, partial_tokens = plan.choose_clusters(
            share.contiguous().numpy(), sizes.numpy(), room, no_runs, np.zeros(n, np.bool_), none, none, 0.0
        )
        picked = torch.zeros(n, dtype=torch.bool)
        picked[torch.from_numpy(whole)] = True
        taken = picked[cid]
        if partial >= 0:
            is_partial = cid == partial
            taken |= is_partial & (torch.cumsum(is_partial, 0) <= partial_tokens)
        extra = self.store.rows_of(layer, rest[taken])
        extra_share = (share / sizes.clamp_min(1))[cid[taken]]
        return Selection(torch.cat((self.store.rows_of(layer, base), extra)), extra, extra_share)

    # ------------------------------------------------------------------ prefetch
    def predict_share(self, layer: int, query: Tensor, sel: Selection) -> Tensor:
        """Predicted share (C,) of the question's attention per cluster of layer + 1, from what
        ``layer`` retrieved (``sel``) for its queries ``query`` (H_q, L_q, D).

        ``tokens``: each token ``layer`` retrieved beyond sinks + window carries its estimated
        share (``sel.extra_share``) to its cluster in layer + 1; a cluster's prediction is the sum.
        ``query``: layer + 1's centroids scored with ``layer``'s queries.
        """
        index = self._layers[layer + 1].index
        if self.options["prefetch_predictor"] == "query":
            return index.share(query)
        cid = index.units_of(self.store.tokens_at(layer, sel.extra))
        held = cid >= 0
        return torch.zeros(index.num_slots).index_add_(0, cid[held], sel.extra_share[held])

    def predict_next(self, layer: int, query: Tensor, sel: Selection) -> Selection | None:
        """Layer + 1's predicted clusters: the best-predicted ones (``predict_share``) filling
        ``prefetch_share`` of its retrievable budget, plus its sinks + window; None (no prefetch)
        into or out of a block layer."""
        target = layer + 1
        if self.per_head_layer(layer) or self.per_head_layer(target):
            return None  # block layers are selected per head from their own query
        base = self.base_ids(target)
        share = self.predict_share(layer, query, sel)
        room = int(float(self.options["prefetch_share"]) * (self.config.budget_tokens - base.numel()))
        return self._rows_for(target, base, share, room)

    # ------------------------------------------------------------------ reporting and checks
    def units(self) -> int:
        """Clusters per layer (mean)."""
        live = self._bank.live_clusters()
        return round(sum(live) / len(live))

    def check_invariants(self) -> None:
        """Raise AssertionError, saying what broke, unless every layer is consistent:

        the index is (``ClusterIndex.check_invariants``: every token in exactly one cluster,
        statistics match a recomputation from the stored keys) and holds exactly the store's live
        tokens; every extent's rows hold exactly its cluster's sealed members, ascending;
        extents do not overlap; every live token is a sink, in the nursery or in its cluster's
        extent, exactly one of them; no prefetch is running outside a question.
        """
        require(not self._prefetch.pending or self._in_question, "a prefetch is pending outside a question")
        require(not self._pending, f"a chunk is held for layers {sorted(self._pending)} only")
        store = self.store
        for layer, st in enumerate(self._layers):
            st.index.check_invariants(self._key_lookup(layer))
            live = store.live_tokens(layer)
            held = st.index.units_of(live)
            require(bool((held >= 0).all()), f"layer {layer}: live tokens missing from the index")
            require(st.index.num_tokens == live.numel(), f"layer {layer}: the index holds evicted tokens")
            require(st.index.num_slots <= st.ext_len.numel(), f"layer {layer}: per-cluster state not grown")
            slots = st.index.num_slots
            lengths = st.ext_len[:slots]
            require(bool((st.ext_len[slots:] == 0).all()), f"layer {layer}: extents beyond the cluster ids")
            sealed = torch.nonzero(lengths > 0).flatten()
            ext_rows = _ranges(st.ext_start[sealed], lengths[sealed])
            ext_ids = store.tokens_at(layer, ext_rows)
            owner = torch.repeat_interleave(sealed, lengths[sealed])
            require(bool((ext_ids >= 0).all()), f"layer {layer}: an extent covers a free row")
            require(ext_rows.unique().numel() == ext_rows.numel(), f"layer {layer}: extents overlap")
            require(
                torch.equal(st.index.units_of(ext_ids), owner),
                f"layer {layer}: an extent holds another cluster's token",
            )
            rising = (ext_ids[1:] > ext_ids[:-1]) | (owner[1:] != owner[:-1])
            require(bool(rising.all()), f"layer {layer}: an extent is not in ascending id order")
            require(
                bool((st.ext_len[:slots][st.index.counts.cpu() == 0] == 0).all()),
                f"layer {layer}: an empty cluster keeps an extent",
            )
            nursery = st.nursery
            require(bool((nursery[1:] > nursery[:-1]).all()), f"layer {layer}: nursery not ascending")
            require(
                bool((store.rows_of(layer, nursery) >= 0).all()), f"layer {layer}: nursery holds dead ids"
            )
            pinned = live[live < self.config.sink_tokens]
            require(
                bool((nursery >= self.config.sink_tokens).all()), f"layer {layer}: a sink is in the nursery"
            )
            placed = torch.cat((pinned, nursery, ext_ids)).sort().values
            require(
                torch.equal(placed, live),
                f"layer {layer}: {placed.numel()} tokens placed (sinks + nursery + extents) for "
                f"{live.numel()} live ones (a token lost or placed twice)",
            )
            if st.ring_size:
                require(
                    st.ring_lo + st.ring_size <= store.allocated_rows(layer) and 0 <= st.head < st.ring_size,
                    f"layer {layer}: the ring lies outside the allocated rows",
                )
