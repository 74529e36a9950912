"""What every store-backed policy shares: storage, budget rules, the host cap, fetching and stats.

A subclass decides only *which* tokens a layer hands attention for a question
(``select``) and, if it is not a plain retrieval policy, what a chunk attends to while
ingesting. The base class turns token ids into store rows, fetches them into a reusable
per-layer ``DeviceBuffer`` (sized to the budget, allocated once), times ``select`` and
``transfer`` separately, and keeps host memory under ``config.host_cap_bytes``: by compression,
or, with a disk tier (``config.disk_cap_bytes``), by spilling cold store pages to files under
``config.disk_dir`` first (the store does it; policies see the same rows), compressing only once
the disk cap is reached too.

Budget: ``config.budget_tokens`` per layer per question, sinks and local window included.
Sinks are the stream's first ``sink_tokens`` tokens; the local window is the last
``window_tokens`` live tokens. Both are never evicted by compression. A question's time
window (``begin_question(window=(t0, t1))``) restricts every candidate, the local window
included, to tokens stamped inside [t0, t1]; sinks are always allowed.
"""

from __future__ import annotations

import math
import time
import weakref
from abc import abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from mosaic_ros.runtime.kv.policies.compression import drop_oldest, vsb_compress
from mosaic_ros.runtime.kv.policies.prefetch import Prefetcher, PrefetchResult, count_hits
from mosaic_ros.runtime.kv.policy import (
    COMPRESSIONS,
    ExportedTokens,
    KVContext,
    KVGeometry,
    KVPolicy,
    MemoryStats,
    PolicyConfig,
    RetrievalStats,
    TokenMeta,
)
from mosaic_ros.runtime.kv.store import DeviceBuffer, FetchStats, HostKVStore


@dataclass
class Selection:
    """What ``select`` decides for one layer and one question.

    rows: (n,) int64 physical rows of the layer shared by all KV heads, or (H_kv, n) one set per
    head (a ``per_head`` policy); n <= ``budget_tokens`` for a bounded policy. Sinks + local
    window first is customary, not required. extra: (k,) the rows beyond sinks + window, when
    the policy knows them (prefetch hit accounting; derived otherwise). extra_share: (k,) float32
    an estimated attention share per ``extra`` row, for a predictor that wants it. positions:
    (P, n) rotary positions to attend with, aligned with ``rows`` (shared rows only), instead of
    the stored ones (LiveVLM closes gaps).
    """

    rows: torch.Tensor
    extra: torch.Tensor | None = None
    extra_share: torch.Tensor | None = None
    positions: torch.Tensor | None = None


COMMON_OPTIONS: dict[str, Any] = {
    "cpu_prefetch": False,  # cross-layer prefetch (config.prefetch) on a CPU device too (worker thread)
    "page_rows": 8192,  # store rows per page
    "spare_pages": 4,  # host pages faulted in ahead of need by a worker thread (0: none)
    "run_min_rows": 32,  # to another device: runs at least this long copied one by one, shorter ones gathered
    "compress_to": 0.75,  # at the host cap, compress live tokens to this fraction of the cap
    "vsb_buckets": 32,  # VSB timeline buckets (each keeps its own top tokens)
    "vsb_probe": 16,  # VSB probe tokens taken from the most recent vision tokens
}

# with a disk tier, pages are made small enough that the host cap holds at least this many per
# layer (a layer's tail page, and the pages one move or compaction step writes, stay in memory)
DISK_MIN_PAGES_PER_LAYER = 4


def _hot_rows_of(policy: StoreBackedPolicy) -> Callable[[int], torch.Tensor]:
    """``policy.hot_rows`` for its store, holding the policy only weakly (no reference cycle)."""
    ref = weakref.ref(policy)

    def hot_rows(layer: int) -> torch.Tensor:
        owner = ref()
        return owner.hot_rows(layer) if owner is not None else torch.zeros(0, dtype=torch.int64)

    return hot_rows


class StoreBackedPolicy(KVPolicy):
    """Base of the built-in policies: one template for a question's layer (``retrieve``).

    A subclass decides *which* rows a layer hands attention (``select``, returning a
    ``Selection``); ``retrieve`` does everything else once for every policy: checks, timing
    (``select_ms``, ``transfer_ms``, disk reads apart), the budget, the fetch into the layer's
    device buffer (``materialize``), accounting, positions a selection overrides, and cross-layer
    prefetch (``config.prefetch``): after layer l's fetch, ``predict_next`` guesses layer l+1's
    rows and a ``Prefetcher`` copies them into its buffer while layer l attends (on CUDA; on a
    CPU device only with ``options['cpu_prefetch']``). The default prediction is layer l's
    tokens in layer l+1; a policy with a better predictor overrides ``predict_next``.

    ``per_head``: selections differ per KV head (``Selection.rows`` is (H_kv, n)) instead of
    one (n,) set shared by all heads; a policy that decides this per layer overrides
    ``per_head_layer``. ``bounded``: selections must respect ``budget_tokens``.
    ``option_defaults``: the policy's own ``config.options`` keys with defaults; any other key
    is an error. ``reserves_question_buffers``: the per-layer budget-sized device buffers are
    allocated when a question begins (the device pool a question needs), so a first question
    does not pay for the allocation inside its transfers.
    """

    per_head: ClassVar[bool] = False
    bounded: ClassVar[bool] = True
    reserves_question_buffers: ClassVar[bool] = True
    option_defaults: ClassVar[dict[str, Any]] = {}

    @classmethod
    def known_options(cls) -> dict[str, Any]:
        return {**COMMON_OPTIONS, **cls.option_defaults}

    def __init__(self, geometry: KVGeometry, config: PolicyConfig, device: torch.device | str = "cpu"):
        super().__init__(geometry, config, device)
        known = self.known_options()
        unknown = sorted(set(config.options) - set(known))
        if unknown:
            raise ValueError(
                f"policy {self.name!r}: unknown option(s) {unknown}; known: {', '.join(sorted(known))}"
            )
        self.options = {**known, **config.options}
        if config.compression not in COMPRESSIONS:
            raise ValueError(f"unknown compression {config.compression!r}; known: {', '.join(COMPRESSIONS)}")
        if not 0.0 < float(self.options["compress_to"]) <= 1.0:
            raise ValueError(f"compress_to must be in (0, 1], got {self.options['compress_to']}")
        for key in ("page_rows", "run_min_rows", "vsb_buckets", "vsb_probe"):
            if int(self.options[key]) <= 0:
                raise ValueError(f"option {key} must be positive, got {self.options[key]}")
        if int(self.options["spare_pages"]) < 0:
            raise ValueError(f"option spare_pages must be >= 0, got {self.options['spare_pages']}")
        self.page_rows, self.max_rows, self.resident_pages = self._cap_layout()
        self.reset()

    # ------------------------------------------------------------------ construction helpers
    def _cap_layout(self) -> tuple[int, int, int]:
        """(page_rows, max_rows per layer, pages in host memory for all layers) honouring
        ``host_cap_bytes`` (0 = no cap) and the disk tier (``disk_cap_bytes``; 0 = none: the last
        figure is 0). With a disk tier, ``max_rows`` is what host cap and disk cap hold together,
        and pages are cut to at most a ``DISK_MIN_PAGES_PER_LAYER``-th of a layer's share of the
        host cap."""
        page = int(self.options["page_rows"])
        cap = self.config.host_cap_bytes
        if not cap:
            return page, 0, 0
        cap_rows = cap // self.geometry.bytes_per_token
        floor = self.config.sink_tokens + self.config.window_tokens + 1
        if cap_rows < floor:
            raise ValueError(
                f"host_cap_bytes={cap} holds {cap_rows} tokens ({self.geometry.bytes_per_token} B/token); "
                f"it must hold at least sinks + window + 1 = {floor}"
            )
        disk = self.config.disk_cap_bytes
        if not disk:
            n_pages = math.ceil(cap_rows / page)
            page = cap_rows // n_pages
            return page, page * n_pages, 0
        page = min(page, cap_rows // DISK_MIN_PAGES_PER_LAYER)
        page_bytes = page * 2 * self.geometry.token_row_bytes
        per_layer = (cap + disk) // (self.geometry.num_layers * page_bytes)
        return page, page * per_layer, cap // page_bytes

    def _new_store(self) -> HostKVStore:
        return HostKVStore(
            self.geometry,
            page_rows=self.page_rows,
            max_rows=self.max_rows,
            pin=self.device.type == "cuda",
            run_min_rows=int(self.options["run_min_rows"]),
            spare_pages=int(self.options["spare_pages"]),
            disk_dir=self.config.disk_dir,
            resident_pages=self.resident_pages,
            hot_rows=_hot_rows_of(self),
        )

    def hot_rows(self, layer: int) -> torch.Tensor:
        """Rows (n,) int64 of ``layer`` the disk tier spills only when nothing else can go: the sinks
        and the local window (every frame and question reads them)."""
        rows = self.store.rows_of(layer, self.ingest_ids(layer))
        return rows[rows >= 0]

    def reset(self) -> None:
        if getattr(self, "_prefetch", None) is not None:
            self._prefetch.close()
        old = getattr(self, "store", None)
        if old is not None:
            old.close()
        self._prefetch = Prefetcher(threaded=self.device.type != "cuda")
        self.store = self._new_store()
        self._buffers: dict[int, DeviceBuffer] = {}
        self._ingest_buffers: dict[int, DeviceBuffer] = {}
        self._ingest_upto: dict[int, int] = {}
        self._stats = RetrievalStats()
        self._fetches: list[FetchStats] = []
        self._window: tuple[float, float] | None = None
        self._in_question = False
        self.tokens_evicted = 0
        self._evicted_rows = 0
        self._device_peak = 0

    # ------------------------------------------------------------------ stream
    def add_tokens(self, meta: TokenMeta) -> torch.Tensor:
        frame = meta.frame
        if bool((frame < -1).any()):
            raise ValueError(f"frame indices must be >= 0 (or -1 for text), got min {int(frame.min())}")
        if bool(((meta.modality == 1) & (frame < 0)).any()):
            raise ValueError("vision tokens need a frame index >= 0")
        if not bool(torch.isfinite(meta.stamps).all()):
            raise ValueError("stamps must be finite seconds")
        self._settle()
        if self.max_rows:
            self._make_room(meta.num_tokens)
        return self.store.add_tokens(meta)

    def append(self, layer: int, keys: torch.Tensor, values: torch.Tensor, token_ids: torch.Tensor) -> None:
        self._check_layer(layer)
        self._settle()
        self.store.append(layer, token_ids, keys, values)

    def _check_layer(self, layer: int) -> None:
        if not 0 <= layer < self.geometry.num_layers:
            raise ValueError(f"layer {layer} out of range [0, {self.geometry.num_layers})")

    # ------------------------------------------------------------------ host cap
    def _protected(self, live: torch.Tensor, incoming: int) -> torch.Tensor:
        """Mask over ``live`` ids (ascending) of tokens compression must keep: sinks + local window."""
        keep = live < self.config.sink_tokens
        room = self.max_rows - incoming - int(keep.sum())
        if room < 0:
            raise ValueError(
                f"a chunk of {incoming} tokens does not fit under the host cap ({self.max_rows} tokens per "
                f"layer with {int(keep.sum())} sinks)"
            )
        window = min(self.config.window_tokens, room)
        if window:
            keep[-window:] = True
        return keep

    def _make_room(self, incoming: int) -> None:
        """Compress or evict so that ``incoming`` more tokens fit under ``max_rows`` in every layer."""
        live_counts = self.store.live_counts()
        if max(live_counts) + incoming <= self.max_rows:
            return
        target = max(int(float(self.options["compress_to"]) * self.max_rows) - incoming, 0)
        before = sum(live_counts)
        if self.config.compression == "drop_oldest":
            live = torch.nonzero(self.store.alive).flatten()
            protected = self._protected(live, incoming)
            victims = drop_oldest(live, protected, target)
            for layer in range(self.geometry.num_layers):
                self.release(layer, victims)
        else:
            for layer in range(self.geometry.num_layers):
                live = self.store.live_tokens(layer)
                protected = self._protected(live, incoming)
                victims = vsb_compress(
                    self.store,
                    layer,
                    live,
                    protected,
                    target,
                    buckets=int(self.options["vsb_buckets"]),
                    probe=int(self.options["vsb_probe"]),
                )
                self.release(layer, victims)
        self._count_evicted(before)
        self._after_eviction()

    def _count_evicted(self, live_rows_before: int) -> None:
        self._evicted_rows += live_rows_before - sum(self.store.live_counts())
        self.tokens_evicted = self._evicted_rows // self.geometry.num_layers

    def release(self, layer: int, token_ids: torch.Tensor) -> None:
        """Drop tokens from ``layer`` (compression); policies that index tokens override to forget them."""
        self.store.release(layer, token_ids)

    def _after_eviction(self) -> None:
        """Hook run once a compression pass is over (e.g. to compact a device-resident store)."""

    # ------------------------------------------------------------------ token sets
    def live_ids(self, layer: int) -> torch.Tensor:
        """Ids (n,) ascending that ``layer`` holds."""
        return self.store.live_tokens(layer)

    def split_candidates(self, layer: int, budget: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(base, rest): base = sinks + local window (ids ascending, at most ``budget``), rest = the
        other tokens a question may retrieve (ascending), both within the question's time window.
        """
        live = self.live_ids(layer)
        first = int(torch.searchsorted(live, self.config.sink_tokens))  # live ascending: sinks first
        sink_ids, cand = live[:first][:budget], live[first:]
        if self._window is not None:
            cand = cand[self._in_time_window(cand)]
        w = min(self.config.window_tokens, budget - sink_ids.numel(), cand.numel())
        window = cand[cand.numel() - w :]
        return torch.cat((sink_ids, window)), cand[: cand.numel() - w]

    def _in_time_window(self, ids: torch.Tensor) -> torch.Tensor:
        """(n,) bool: which of ``ids`` the open question's time window (set) holds."""
        stamps = self.store.stamps[ids]
        return (stamps >= self._window[0]) & (stamps <= self._window[1])

    def recent_ids(self, layer: int, sinks: int, window: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(the live ids below ``sinks``, the last ``window`` live ids at or above it), ascending.

        Looks only at the most recent ``2 * window`` ids while enough of them are alive, so the
        cost does not grow with the stream; scans every live token only when evictions have
        thinned the recent past.
        """
        store = self.store
        n = store.num_tokens
        sink_ids = torch.arange(min(sinks, n))
        sink_ids = sink_ids[store.rows_of(layer, sink_ids) >= 0]
        lo = max(sinks, n - 2 * window)
        recent = torch.arange(lo, max(lo, n))  # empty while the stream is shorter than the sinks
        recent = recent[store.rows_of(layer, recent) >= 0]
        if recent.numel() < window and lo > sinks:
            live = store.live_tokens(layer)
            recent = live[live >= sinks]
        return sink_ids, recent[recent.numel() - min(window, recent.numel()) :]

    def ingest_ids(self, layer: int) -> torch.Tensor:
        """Sinks + the last ``window_tokens`` live tokens (ascending ids), ignoring time windows."""
        sink_ids, recent = self.recent_ids(layer, self.config.sink_tokens, self.config.window_tokens)
        return torch.cat((sink_ids, recent))

    # ------------------------------------------------------------------ ingest
    def ingest_context(self, layer: int) -> KVContext | None:
        """Sinks + last ``window_tokens`` live tokens, kept in a per-layer device buffer that slides:
        each call copies only the tokens appended since the last one into the slots of the
        tokens that left the window. Rows the policy moved (or compaction) only re-point its slots
        (``HostKVStore.repoint``); it is refilled whole only when a slot inside the context lost
        its token (eviction)."""
        self._check_layer(layer)
        store = self.store
        n_tok = store.appended_upto(layer)
        if store.live_count(layer) == 0:
            return None
        buf = self._ingest_buffers.get(layer)
        if buf is None:
            cap = max(self.config.sink_tokens + self.config.window_tokens, 1)
            buf = DeviceBuffer(self.geometry, cap, self.device)
            self._ingest_buffers[layer] = buf
            self._ingest_upto[layer] = 0
            self._track_device()
        store.repoint(layer, buf)
        held = torch.where(buf.slot_rows[0] >= 0, torch.from_numpy(buf.slot_tokens[0]), -1)
        sinks = self.config.sink_tokens
        lo = max(n_tok - self.config.window_tokens, sinks)
        upto = self._ingest_upto[layer]
        new_sinks = torch.arange(upto, max(upto, min(sinks, n_tok)))
        start = max(upto, lo)
        new = torch.cat((new_sinks, torch.arange(start, max(start, n_tok))))
        new_rows = store.rows_of(layer, new)
        # in row order: a policy that lays a chunk out by its own order (mosaic, cluster by cluster)
        # still has it in consecutive rows, copied as one run into the slots its oldest chunk left
        new_rows = torch.sort(new_rows[new_rows >= 0]).values
        stale = (held >= sinks) & (held < lo)
        free = torch.nonzero((held < 0) | stale).flatten()[: new_rows.numel()]
        buf.track(torch.nonzero(stale).flatten().numpy(), -1)  # slots and row -> slot map alike
        store.copy_to_slots(layer, new_rows, buf, free)
        self._ingest_upto[layer] = n_tok
        valid = buf.slot_rows[0] >= 0
        count = int(valid.sum())
        if not bool(valid[:count].all()):  # a hole inside the context (eviction): refill it whole
            store.fetch(layer, store.rows_of(layer, self.ingest_ids(layer)), buf)
            count = buf.count
        buf.count = count
        return buf.context()

    # ------------------------------------------------------------------ questions
    def begin_question(self, window: tuple[float, float] | None = None) -> None:
        if window is not None:
            t0, t1 = float(window[0]), float(window[1])
            if not t0 <= t1:
                raise ValueError(f"time window must have start <= end, got {window}")
            window = (t0, t1)
        self._settle()
        self._window = window
        if self.reserves_question_buffers:
            # the question's device pool is reserved up front, not paid for inside a layer's transfer
            for layer in range(self.geometry.num_layers):
                self._buffer(layer)
        self._stats = RetrievalStats()
        self._fetches = []
        self._in_question = True

    @abstractmethod
    def select(self, layer: int, query: torch.Tensor) -> Selection:
        """What ``layer`` hands attention for the question's queries (H_q, L_q, D) pre-RoPE."""

    def selection(self, layer: int, ids: torch.Tensor) -> Selection:
        """The ``Selection`` of token ids (n,) or (H_kv, n) held by ``layer``."""
        return Selection(rows=self.store.rows_of(layer, ids))

    def per_head_layer(self, layer: int) -> bool:
        """Whether ``layer``'s selections are per KV head ((H_kv, n) rows) in the question now
        open; it must not change between ``begin_question`` and ``end_question``. Default: the
        class's ``per_head``."""
        return self.per_head

    def _buffer(self, layer: int) -> DeviceBuffer:
        per_head = self.per_head_layer(layer)
        buf = self._buffers.get(layer)
        if buf is None or buf.per_head != per_head:
            buf = DeviceBuffer(self.geometry, self.config.budget_tokens, self.device, per_head=per_head)
            self._buffers[layer] = buf
            self._track_device()
        return buf

    def _check_retrieve(self, layer: int, query: torch.Tensor) -> None:
        """The preconditions of ``retrieve``: a known layer, an open question, a (H_q, L_q, D) query."""
        self._check_layer(layer)
        if not self._in_question:
            raise RuntimeError("retrieve() outside a question: call begin_question() first")
        g = self.geometry
        if query.dim() != 3 or query.shape[0] != g.num_q_heads or query.shape[2] != g.head_dim:
            raise ValueError(f"query must be ({g.num_q_heads}, L_q, {g.head_dim}), got {tuple(query.shape)}")

    def retrieve(self, layer: int, query: torch.Tensor) -> KVContext:
        """The template every policy follows (see the class docstring); not to be overridden."""
        self._check_retrieve(layer, query)
        store = self.store
        prefetched = self._settle()
        disk_ms, disk_bytes = store.disk_read_ms, store.disk_bytes_read
        t0 = time.perf_counter()
        sel = self.select(layer, query)
        t1 = time.perf_counter()
        scan_ms = store.disk_read_ms - disk_ms  # a selection that scores every key reads spilled pages
        self._stats.disk_fetch_ms += scan_ms
        self._stats.disk_bytes_read += store.disk_bytes_read - disk_bytes
        n = sel.rows.shape[-1]
        if (sel.rows.dim() == 2) != self.per_head_layer(layer):
            raise AssertionError(
                f"{self.name} layer {layer}: rows {tuple(sel.rows.shape)} do not match its per-head mode"
            )
        if self.bounded and n > self.config.budget_tokens:
            raise AssertionError(
                f"{self.name} selected {n} tokens over the budget {self.config.budget_tokens}"
            )
        if prefetched is not None and prefetched.layer == layer:
            extra = self._extra_rows(layer, sel)
            self._stats.prefetch_lookups += extra.numel()
            self._stats.prefetch_hits += count_hits(extra, prefetched.predicted_rows)
        ctx, fs = self.materialize(layer, sel)
        t2 = time.perf_counter()
        self._account(fs, (t1 - t0) * 1e3 - scan_ms, (t2 - t1) * 1e3, n)
        if sel.positions is not None:
            ctx = self._reposition(layer, ctx, sel)
            self._stats.select_ms += (time.perf_counter() - t2) * 1e3
        if self._prefetching and layer + 1 < self.geometry.num_layers and self._window is None:
            self._start_prefetch(layer, query, sel)
        return ctx

    def materialize(self, layer: int, sel: Selection) -> tuple[KVContext, FetchStats]:
        """The selection as attention's context: fetched into the layer's device buffer."""
        buf = self._buffer(layer)
        fs = self.store.fetch(layer, sel.rows, buf)
        return buf.context(), fs

    def _reposition(self, layer: int, ctx: KVContext, sel: Selection) -> KVContext:
        """``ctx`` with ``sel.positions`` in slot order (the fetch may put rows in any slot)."""
        rows = sel.rows.reshape(-1)
        slot_rows = self._buffers[layer].slot_rows[0, : ctx.num_tokens]
        if bool((rows[1:] > rows[:-1]).all()):  # rows ascending (ids ascending, append order)
            at = torch.searchsorted(rows, slot_rows)
        else:
            order = torch.argsort(rows)
            at = order[torch.searchsorted(rows[order], slot_rows)]
        pos = sel.positions[:, at].to(self.device, non_blocking=True)
        h = self.geometry.num_kv_heads
        return KVContext(ctx.keys, ctx.values, pos[:, None, :].expand(-1, h, -1), ctx.token_ids)

    def _account(self, fs: FetchStats, select_ms: float, transfer_ms: float, tokens: int) -> None:
        """Add one fetch and the times around it; its disk reads count apart from ``transfer_ms``."""
        s = self._stats
        s.select_ms += select_ms
        s.transfer_ms += transfer_ms - fs.disk_ms
        s.disk_fetch_ms += fs.disk_ms
        s.disk_bytes_read += fs.disk_bytes
        self._fetches.append(fs)
        s.copies += fs.copies
        s.copy_ms += fs.copy_ms
        s.bytes_moved += fs.bytes_moved
        s.tokens_retrieved += tokens

    def end_question(self) -> RetrievalStats:
        """Closes the question (joining any prefetch). ``transfer_ms`` is host wall time (planning
        and copies; on CUDA, issuing them); ``copy_device_ms`` the copies' own time on the device
        (CUDA events; on a CPU the same as ``copy_ms``)."""
        self._settle()
        self._prefetch.close()
        for fs in self._fetches:
            self._stats.copy_device_ms += fs.device_ms()
        self._fetches = []
        self._in_question = False
        self._window = None
        return self._stats

    # ------------------------------------------------------------------ prefetch
    @property
    def _prefetching(self) -> bool:
        return self.config.prefetch and (self.device.type == "cuda" or bool(self.options["cpu_prefetch"]))

    def _settle(self) -> PrefetchResult | None:
        """Finish any prefetch (accounting its cost) before the store changes or a layer's buffer
        is read; returns its result."""
        result = self._prefetch.join()
        if result is not None:
            self._stats.select_ms += result.predict_ms
            self._account(result.fetch, 0.0, result.fetch_ms, 0)
        return result

    def _extra_rows(self, layer: int, sel: Selection) -> torch.Tensor:
        """(k,) the selection's rows beyond sinks + local window (``sel.extra`` when given)."""
        if sel.extra is not None:
            return sel.extra
        rows = sel.rows.reshape(-1)
        base = self.store.rows_of(layer, self.ingest_ids(layer))
        return torch.unique(rows[~torch.isin(rows, base)])

    def predict_next(self, layer: int, query: torch.Tensor, sel: Selection) -> Selection | None:
        """A guess of layer + 1's selection from ``layer``'s (``sel``, for queries ``query``), or
        None for no prefetch. Default: the same tokens, where layer + 1 holds them."""
        target = layer + 1
        ids = self.store.tokens_at(layer, sel.rows)
        rows = self.store.rows_of(target, ids.clamp_min(0))
        held = (ids >= 0) & (rows >= 0)
        if rows.dim() == 1:
            rows = rows[held]
        elif not bool(held.all()):
            return None  # per head, every head must keep as many rows
        return Selection(rows=rows)

    def _start_prefetch(self, layer: int, query: torch.Tensor, sel: Selection) -> None:
        """Copy ``predict_next``'s rows into layer + 1's buffer ahead of its ``retrieve``."""
        target = layer + 1
        t0 = time.perf_counter()
        predicted = self.predict_next(layer, query, sel)
        if predicted is None:
            return
        extra = self._extra_rows(target, predicted)
        buf, store = self._buffer(target), self.store

        def fetch(rows: torch.Tensor, wait: bool) -> FetchStats:
            return store.fetch(target, rows, buf, wait=wait)

        ms = (time.perf_counter() - t0) * 1e3
        self._prefetch.start(target, predicted.rows, extra, ms, fetch)

    # ------------------------------------------------------------------ memory
    def device_kv_bytes(self) -> int:
        """KV bytes held on the compute device now (budget buffers and ingest buffers)."""
        bufs = list(self._buffers.values()) + list(self._ingest_buffers.values())
        return sum(b.nbytes for b in bufs)

    def _track_device(self) -> None:
        self._device_peak = max(self._device_peak, self.device_kv_bytes())

    def units(self) -> int:
        """Retrieval units per layer (pages, blocks); 0 for token-level policies."""
        return 0

    # ------------------------------------------------------------------ export
    def live_token_ids(self) -> torch.Tensor:
        live = self.store.live_tokens(0)
        for layer in range(1, self.geometry.num_layers):
            other = self.store.live_tokens(layer)
            if not torch.equal(other, live):
                raise ValueError(
                    f"layers 0 and {layer} hold different tokens ({live.numel()} and {other.numel()}; "
                    "per-layer compression under the host cap): this memory cannot be exported; "
                    "compression 'drop_oldest' keeps every layer on the same tokens"
                )
        return live

    def export_tokens(self, token_ids: torch.Tensor) -> ExportedTokens:
        store = self.store
        ids = token_ids.to("cpu", torch.int64)
        kv = []
        for layer in range(self.geometry.num_layers):
            rows = store.rows_of(layer, ids)
            if bool((rows < 0).any()):
                raise ValueError(f"export_tokens: some tokens are not held by layer {layer}")
            kv.append(store.read(layer, rows).to("cpu"))
        meta = TokenMeta(
            positions=store.positions[:, ids].clone(),
            stamps=store.stamps[ids].clone(),
            modality=store.modality[ids].clone(),
            frame=store.frame[ids].clone(),
        )
        return ExportedTokens(ids=ids.clone(), meta=meta, kv=kv)

    def memory(self) -> MemoryStats:
        return MemoryStats(
            tokens=int(self.store.alive.sum()),
            host_kv_bytes=self.store.host_kv_bytes,
            disk_kv_bytes=self.store.disk_kv_bytes,
            device_kv_bytes=self.device_kv_bytes(),
            device_kv_bytes_peak=self._device_peak,
            units=self.units(),
            tokens_evicted=self.tokens_evicted,
            staging_bytes=self.store.staging_bytes,
        )

    def close(self) -> None:
        self._prefetch.close()
        self.store.close()
