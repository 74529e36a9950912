"""``HostKVStore``: one stream's pre-RoPE KV for all layers, the only door policies use.

The store is three parts kept in step behind one narrow API (``HostKVStore.API``):

- a ``PagePool`` (``pool.py``): the pages of rows per layer, their allocation (a page reserve
  faulted in ahead of need), reading and writing rows, the disk tier;
- a ``TokenTable`` (``tokens.py``): token facts shared by all layers (``TokenMeta``) and per
  layer the id <-> row maps, the end of the allocated rows and a layout version;
- a copy engine (``copy.py``: ``HostCopyEngine``, ``CudaCopyEngine``) that carries a fetch's
  copies into a ``DeviceBuffer`` and owns streams, events, staging and their timing.

Tokens. Logical token ids are dense int64 in append order and never reused. A policy may
append sequentially (``append``), choose rows itself (``alloc`` + ``place``), relocate tokens
(``move``, ``compact``) and drop them per layer (``release``). A token is *alive* while at
least one layer holds it. Reads (``rows_of``, ``tokens_at``, ``live_tokens``, the facts) never
expose the tables themselves.

Fetching. ``fetch(layer, rows, into=DeviceBuffer)`` fills a reusable per-layer device
buffer: rows already resident from the previous question stay (moved inside the buffer at
most), the others are copied by the engine. Residency follows tokens, not rows: a buffer keeps
its slots' token ids, and after moves or compaction (a new layout version) ``repoint`` points
the held slots at their tokens' new rows, since a token's KV never changes once placed. Rows
on spilled pages are read from their file
straight into the buffer (``FetchStats.disk_ms``/``disk_bytes``), leaving the page on disk.
The residency plan for a selection shared by all heads is compiled (``plan``).

Accounting. ``host_kv_bytes`` counts CAPACITY: the bytes of every page tensor allocated
(used or not, the page reserve's ready pages included), i.e. exactly what the process holds
for KV. ``used_kv_bytes`` counts the rows that hold a live token. ``disk_kv_bytes``: the bytes
of the spilled pages (their file ranges). ``staging_bytes``: pinned host memory the copy engine
holds for gathers to a GPU. Temporary tensors of one call are not counted.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from mosaic_ros.runtime.kv.buffer import DeviceBuffer
from mosaic_ros.runtime.kv.copy import CopyEngine, CudaCopyEngine, FetchStats, HostCopyEngine, page_segments
from mosaic_ros.runtime.kv.plan import plan_per_head, plan_shared
from mosaic_ros.runtime.kv.policy import KVGeometry, TokenMeta
from mosaic_ros.runtime.kv.pool import PagePool, StoreFullError, contiguous_runs
from mosaic_ros.runtime.kv.tokens import TokenTable

__all__ = ["DeviceBuffer", "FetchStats", "HostKVStore", "StoreFullError"]


class HostKVStore:
    """Pre-RoPE K/V of one stream, all layers, in pages of rows (see the module docstring).

    ``page_rows``: rows per page (a fixed-size store) or the initial capacity of a
    ``contiguous`` store. ``max_rows``: per-layer cap on rows (0 = none; ``alloc`` raises
    ``StoreFullError`` beyond it). ``pin``: page-lock the pages (for async copies to CUDA).
    ``device``: where the pages live (host ``cpu`` normally; the compute device for a
    device-resident store). ``run_min_rows``: for copies to another device, runs at least this
    long are copied one copy per run, shorter ones gathered (one gather per page for all of
    them); CPU to CPU every run is one copy. ``spare_pages``: for a paged host store, pages kept
    allocated and faulted in ahead of need by a worker thread (``PageReserve``; 0: none).
    ``disk_dir``/``resident_pages``: the disk tier (``pool.py``; ``resident_pages`` 0 = none),
    ``hot_rows(layer) -> rows (n,) int64``: rows spilled only when nothing else can be.
    """

    API = frozenset(
        {
            # construction facts
            "geometry",
            "page_rows",
            "max_rows",
            "device",
            # token facts, all layers
            "num_tokens",
            "positions",
            "stamps",
            "modality",
            "frame",
            "alive",
            "add_tokens",
            # one layer's rows and maps (read)
            "rows_of",
            "tokens_at",
            "live_tokens",
            "live_count",
            "live_counts",
            "allocated_rows",
            "capacity_rows",
            "layout_version",
            "appended_upto",
            "runs",
            "read",
            "read_keys",
            "iter_pages",
            "arena",
            # one layer's rows (write)
            "alloc",
            "place",
            "append",
            "move",
            "release",
            "evict",
            "compact",
            # to the device
            "fetch",
            "copy_to_slots",
            "repoint",
            # accounting and lifetime
            "host_kv_bytes",
            "used_kv_bytes",
            "disk_kv_bytes",
            "disk_bytes_read",
            "disk_read_ms",
            "staging_bytes",
            "page_reserve",
            "close",
        }
    )
    """What callers (policies) may use; everything else is the store's own."""

    def __init__(
        self,
        geometry: KVGeometry,
        *,
        page_rows: int = 8192,
        max_rows: int = 0,
        pin: bool = False,
        device: torch.device | str = "cpu",
        contiguous: bool = False,
        run_min_rows: int = 32,
        spare_pages: int = 0,
        disk_dir: str = "",
        resident_pages: int = 0,
        hot_rows: Callable[[int], torch.Tensor] | None = None,
    ):
        if page_rows <= 0:
            raise ValueError(f"page_rows must be positive, got {page_rows}")
        if max_rows < 0:
            raise ValueError(f"max_rows must be >= 0, got {max_rows}")
        self.geometry = geometry
        self.page_rows = page_rows
        self.max_rows = max_rows
        self.device = torch.device(device)
        self.table = TokenTable(geometry.position_dims, geometry.num_layers)
        self.pool = PagePool(
            geometry,
            page_rows=page_rows,
            device=self.device,
            pin=pin and self.device.type == "cpu" and torch.cuda.is_available(),
            contiguous=contiguous,
            spare_pages=spare_pages,
            max_rows=max_rows,
            disk_dir=disk_dir,
            resident_pages=resident_pages,
            allocated=self.allocated_rows,
            hot_rows=hot_rows,
        )
        self._host_engine = HostCopyEngine(run_min_rows)
        self._cuda_engine = CudaCopyEngine(run_min_rows, self.device) if torch.cuda.is_available() else None

    def engine(self, into: DeviceBuffer) -> CopyEngine:
        """The copy engine for fetches into ``into`` (by the buffer's device)."""
        if into.device.type == "cpu":
            if self.device.type != "cpu":
                raise ValueError("a device-resident store fetches only into buffers on its device")
            return self._host_engine
        if self._cuda_engine is None:
            raise RuntimeError(f"no CUDA to copy into a buffer on {into.device}")
        return self._cuda_engine

    # ------------------------------------------------------------------ token facts
    @property
    def num_tokens(self) -> int:
        """Tokens ever added (ids [0, num_tokens))."""
        return self.table.num_tokens

    @property
    def positions(self) -> torch.Tensor:
        """(P, N) int64 rotary positions of every token ever added."""
        return self.table.positions

    @property
    def stamps(self) -> torch.Tensor:
        """(N,) float64 seconds."""
        return self.table.stamps

    @property
    def modality(self) -> torch.Tensor:
        """(N,) uint8, 0 text, 1 vision."""
        return self.table.modality

    @property
    def frame(self) -> torch.Tensor:
        """(N,) int64 frame index, -1 for text."""
        return self.table.frame

    @property
    def alive(self) -> torch.Tensor:
        """(N,) bool: held by at least one layer."""
        return self.table.alive

    def add_tokens(self, meta: TokenMeta) -> torch.Tensor:
        """Register a chunk's token facts; returns their logical ids (T,) int64."""
        return self.table.add(meta)

    # ------------------------------------------------------------------ one layer, read
    def rows_of(self, layer: int, token_ids: torch.Tensor) -> torch.Tensor:
        """Physical rows (same shape) of ``token_ids`` in ``layer`` (-1 where the layer lacks them)."""
        return self.table.rows_of(layer, token_ids)

    def tokens_at(self, layer: int, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Token ids (same shape as ``rows``) held by ``rows`` of ``layer``, -1 for free rows;
        ``rows=None``: every allocated row, (allocated_rows,) (a copy)."""
        if rows is None:
            return self.table.row_token[layer][: self.table.high[layer]].clone()
        return self.table.tokens_at(layer, rows)

    def live_tokens(self, layer: int) -> torch.Tensor:
        """Ids (n,) int64, ascending, of the tokens ``layer`` holds."""
        return self.table.live_tokens(layer)

    def live_count(self, layer: int) -> int:
        """Rows of ``layer`` that hold a token."""
        return self.table.live[layer]

    def live_counts(self) -> list[int]:
        """``live_count`` of every layer."""
        return list(self.table.live)

    def allocated_rows(self, layer: int) -> int:
        """One past the last allocated row of ``layer`` (rows [0, allocated) are used or freed)."""
        return self.table.high[layer]

    def capacity_rows(self, layer: int) -> int:
        """Rows allocated for ``layer`` (used or not, in memory or spilled)."""
        return self.pool.capacity(layer)

    def layout_version(self, layer: int) -> int:
        """Bumped whenever a held token of ``layer`` changes row or leaves."""
        return self.table.version[layer]

    def appended_upto(self, layer: int) -> int:
        """One past the largest token id ever placed in ``layer``."""
        return self.table.appended_upto[layer]

    def runs(self, layer: int, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Maximal page-bounded runs (starts, lengths) of the row set ``rows`` of ``layer``."""
        rows = torch.unique(rows.to("cpu", torch.int64))
        return contiguous_runs(rows, self.pool.rows_per_page(layer))

    def read(self, layer: int, rows: torch.Tensor) -> torch.Tensor:
        """Gather ``rows`` (n,) of ``layer`` as (n, 2, H_kv, D) (K then V), one gather per page."""
        return self.pool.read(layer, rows.to("cpu", torch.int64))

    def read_keys(self, layer: int, rows: torch.Tensor) -> torch.Tensor:
        """The keys of ``rows`` (n,) of ``layer``, (n, H_kv, D) pre-RoPE: ``read`` without the values."""
        return self.pool.read(layer, rows.to("cpu", torch.int64), part=0)

    def iter_pages(self, layer: int):
        """Yield (first_row, rows (n, 2, H_kv, D)) over the allocated rows of ``layer``, page by page.

        Rows include freed ones (``tokens_at`` gives -1 for them): mask them. A spilled page is
        read from its file into a new tensor instead of a view.
        """
        return self.pool.iter_pages(layer, self.table.high[layer])

    def arena(self, layer: int) -> torch.Tensor:
        """A ``contiguous`` store's rows [0, allocated_rows) of ``layer`` as one view (n, 2, H_kv, D)."""
        return self.pool.arena(layer)[: self.table.high[layer]]

    # ------------------------------------------------------------------ one layer, write
    def alloc(self, layer: int, n: int, *, reuse_freed: bool = True) -> torch.Tensor:
        """Reserve ``n`` consecutive free rows at the tail of ``layer``; returns them (n,) int64.

        When the tail has no room (a new page would exceed ``max_rows``, or freed rows exist and
        the tail would need a new page) the layer is compacted first, which reuses freed rows.
        ``reuse_freed=False`` grows by a page instead while ``max_rows`` allows it: for a policy
        that keeps free rows on purpose (reserved slots it fills later) and would otherwise see
        its layout compacted away at every page boundary. Raises ``StoreFullError`` when even
        compaction leaves no room.
        """
        if n < 0:
            raise ValueError(f"cannot allocate {n} rows")
        t = self.table
        limit = self.max_rows or None
        live = t.live[layer]
        if limit is not None and live + n > limit:
            raise StoreFullError(
                f"layer {layer}: {live} live rows + {n} new exceed max_rows={limit}; compress or evict first"
            )
        end = t.high[layer] + n
        needs_growth = end > self.pool.capacity(layer)
        over_limit = limit is not None and end > limit
        if needs_growth and ((reuse_freed and t.high[layer] > live) or over_limit):
            self.compact(layer)
            end = t.high[layer] + n
        self._ensure_rows(layer, end)
        rows = torch.arange(t.high[layer], end, dtype=torch.int64)
        t.high[layer] = end
        return rows

    def _ensure_rows(self, layer: int, rows_needed: int) -> None:
        self.pool.ensure(layer, rows_needed, self.table.high[layer])
        self.table.resize_rows(layer, self.pool.capacity(layer))

    def place(
        self,
        layer: int,
        token_ids: torch.Tensor,
        rows: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
    ) -> None:
        """Write tokens' keys/values (T, H_kv, D) into free, allocated ``rows`` (T,) and map them."""
        token_ids = token_ids.to("cpu", torch.int64)
        rows = rows.to("cpu", torch.int64)
        if (
            keys.shape != values.shape
            or keys.shape[0] != token_ids.numel()
            or rows.numel() != token_ids.numel()
        ):
            raise ValueError("place: token_ids, rows, keys and values must agree on T")
        g = self.geometry
        if tuple(keys.shape[1:]) != (g.num_kv_heads, g.head_dim):
            raise ValueError(f"keys must be (T, {g.num_kv_heads}, {g.head_dim}), got {tuple(keys.shape)}")
        if token_ids.numel() == 0:
            return
        t = self.table
        if int(token_ids.max()) >= t.num_tokens or int(token_ids.min()) < 0:
            raise ValueError("place: unknown token ids (call add_tokens first)")
        if int(rows.max()) >= t.high[layer] or bool((t.row_token[layer][rows] >= 0).any()):
            raise ValueError("place: rows must be allocated and free")
        if bool((t.token_row[layer][token_ids] >= 0).any()):
            raise ValueError(f"place: some tokens are already stored in layer {layer}")
        data = torch.stack((keys, values), dim=1).to(self.device, g.dtype)
        self.pool.write(layer, rows, data)
        t.map(layer, token_ids, rows)

    def append(
        self, layer: int, token_ids: torch.Tensor, keys: torch.Tensor, values: torch.Tensor
    ) -> torch.Tensor:
        """Store tokens sequentially at the tail of ``layer``; returns their rows (T,) int64."""
        rows = self.alloc(layer, int(token_ids.numel()))
        self.place(layer, token_ids, rows, keys, values)
        return rows

    def move(self, layer: int, token_ids: torch.Tensor, rows: torch.Tensor) -> None:
        """Relocate stored tokens into allocated free ``rows`` (same length); frees their old rows."""
        t = self.table
        token_ids = token_ids.to("cpu", torch.int64)
        rows = rows.to("cpu", torch.int64)
        old = t.rows_of(layer, token_ids)
        if bool((old < 0).any()):
            raise ValueError(f"move: some tokens are not stored in layer {layer}")
        if rows.numel() != old.numel():
            raise ValueError("move: need one destination row per token")
        if rows.numel() == 0:
            return
        if int(rows.max()) >= t.high[layer] or int(rows.min()) < 0:
            raise ValueError("move: destination rows must be allocated")
        occupied = t.row_token[layer][rows] >= 0
        if bool(occupied.any()) and not bool(torch.isin(rows[occupied], old).all()):
            raise ValueError("move: destination rows hold other tokens")
        if (
            self.device.type == "cpu"
            and not bool(occupied.any())
            and self.pool.in_memory(layer, torch.cat((old, rows)))
        ):
            self.pool.copy_host(layer, old.numpy(), rows.numpy())
        else:  # through a copy: destinations may overlap the sources (an in-place relayout)
            self.pool.write(layer, rows, self.pool.read(layer, old))
        t.remap(layer, token_ids, old, rows)

    def release(self, layer: int, token_ids: torch.Tensor) -> None:
        """Drop tokens from ``layer``: their rows become free (reused after ``compact``)."""
        self.table.unmap(layer, token_ids.to("cpu", torch.int64))

    def evict(self, token_ids: torch.Tensor) -> None:
        """Drop tokens from every layer."""
        for layer in range(self.geometry.num_layers):
            self.release(layer, token_ids)

    def compact(self, layer: int) -> None:
        """Order-preserving compaction: live rows move down to [0, live); spare pages are freed.

        Runs stay runs (relative order is kept), so a placement laid out by a policy survives.
        Rows move a page's worth at a time, in ascending order (a row only ever moves down, so a
        step never overwrites rows a later step reads).
        """
        t, pool = self.table, self.pool
        rt = t.row_token[layer][: t.high[layer]]
        live_rows = torch.nonzero(rt >= 0).flatten()
        n = live_rows.numel()
        if n != t.high[layer]:
            ids = rt[live_rows]
            moving = live_rows != torch.arange(n)
            if bool(moving.any()):
                first = int(torch.nonzero(moving).flatten()[0])
                step = self.page_rows
                for a in range(first, n, step):
                    src = live_rows[a : a + step]
                    pool.write(layer, torch.arange(a, a + src.numel()), pool.read(layer, src))
            t.row_token[layer][:n] = ids
            t.row_token[layer][n:] = -1
            t.token_row[layer][ids] = torch.arange(n)
            t.high[layer] = n
            t.version[layer] += 1
        pool.shrink(layer, n)
        t.resize_rows(layer, pool.capacity(layer))

    # ------------------------------------------------------------------ accounting
    @property
    def host_kv_bytes(self) -> int:
        """Bytes of every page tensor allocated, all layers (capacity, not used rows), and of the
        reserve's ready pages."""
        return self.pool.host_bytes

    @property
    def disk_bytes_read(self) -> int:
        """Bytes read from the disk tier's files since the store was made (0 without one)."""
        return self.pool.disk_bytes_read

    @property
    def disk_read_ms(self) -> float:
        """Wall time inside the disk tier's file reads since the store was made."""
        return self.pool.disk_read_ms

    @property
    def disk_kv_bytes(self) -> int:
        """Bytes of the spilled pages that hold data in their files, all layers (0 without a disk tier)."""
        return self.pool.disk_bytes

    @property
    def used_kv_bytes(self) -> int:
        """Bytes of the rows holding live tokens, all layers."""
        return sum(self.table.live) * 2 * self.geometry.token_row_bytes

    @property
    def page_reserve(self):
        """The ``PageReserve`` of pages faulted in ahead of need (None when ``spare_pages`` is 0)."""
        return self.pool.reserve

    @property
    def staging_bytes(self) -> int:
        """Pinned host bytes the copy engine holds to stage gathers to a GPU."""
        return self._cuda_engine.staging_bytes if self._cuda_engine is not None else 0

    def close(self) -> None:
        """Stop the page reserve's worker and remove the disk tier's files; the store is unusable after."""
        self.pool.close()

    # ------------------------------------------------------------------ fetching
    def fetch(self, layer: int, rows: torch.Tensor, into: DeviceBuffer, *, wait: bool = True) -> FetchStats:
        """Make ``into`` hold ``rows`` of ``layer`` in slots [0, n) (per group); returns what moved.

        rows: (n,) or (G, n) int64 physical rows, unique within a group, G = ``into.groups``.
        Resident rows are kept (shifted inside the buffer if they sit beyond n); missing rows are
        copied host->device by the copy engine. ``wait=False`` (a prefetch) leaves the compute
        stream free to run ahead of asynchronous copies: the buffer may be read only after a later
        ``fetch`` into it with ``wait=True`` (copies into one device share one side stream, so
        that fetch's event orders both). No effect off CUDA.

        Planning: a stable sort of the rows (linear on the run-structured selections policies hand
        over), then compiled passes over the buffer's row -> slot map (``plan.plan_shared``), once
        for a selection shared by all heads, once per group for a per-head one.
        """
        rows = rows.to("cpu", torch.int64)
        if rows.dim() == 1 and into.groups > 1:
            rows = rows[None].expand(into.groups, -1)
        g_count, n = (1, rows.shape[0]) if rows.dim() == 1 else rows.shape
        if g_count != into.groups:
            raise ValueError(f"fetch: rows have {g_count} groups, buffer has {into.groups}")
        if n > into.capacity:
            raise ValueError(f"fetch: {n} rows exceed the buffer capacity {into.capacity}")
        self.repoint(layer, into)  # rows moved since the last fetch stay resident
        engine = self.engine(into)
        stats = FetchStats()
        if g_count == 1:
            self._fetch_shared(engine, layer, rows.numpy().reshape(-1), into, stats, wait)
            return stats
        self._fetch_per_head(engine, layer, rows.numpy(), into, stats, wait)
        return stats

    def _fetch_per_head(
        self,
        engine: CopyEngine,
        layer: int,
        rows: np.ndarray,
        into: DeviceBuffer,
        stats: FetchStats,
        wait: bool,
    ) -> None:
        """``fetch`` for one selection per head (G, n): each group planned as a shared selection is
        (``plan.plan_per_head``: ``plan_shared`` on each group's maps, updated in place), then every
        group's moves and copies carried out together on flat slots (group * capacity + slot)."""
        g_count, n = rows.shape
        cap = into.capacity
        want = np.sort(rows.astype(np.int64, copy=False), axis=1, kind="stable")
        rmap = into.row_slots(int(want.max()) + 1 if n else 0)
        move_src, move_dst, rows_in, slots_in = plan_per_head(want, rmap, into.slot_rows.numpy(), cap)
        stats.tokens_reused = g_count * n - rows_in.size
        with engine.session(into, stats, wait):
            if move_src.size:
                engine.move_slots(into, move_src, move_dst)
                stats.device_moves = move_src.size
            if rows_in.size:
                self._copy_in(engine, layer, into, rows_in, slots_in, stats)
                self._write_slot_meta(engine, layer, into, rows_in, slots_in)
        into.count = n
        stats.tokens_copied = int(rows_in.size)

    def _fetch_shared(
        self,
        engine: CopyEngine,
        layer: int,
        rows: np.ndarray,
        into: DeviceBuffer,
        stats: FetchStats,
        wait: bool,
    ) -> None:
        """``fetch`` for one selection shared by all heads: the same plan on flat arrays, with the
        row -> slot map updated in place (the generic ``track`` re-derives what is known here)."""
        n = rows.size
        # stable: a merge sort, linear on the run-structured selections policies hand over
        want = np.sort(rows.astype(np.int64, copy=False), kind="stable")
        rmap = into.row_slots(int(want[-1]) + 1 if n else 0)[0]
        held = into.slot_rows.numpy()[0]
        need_rows, free, move_from, n_moved = plan_shared(want, rmap, held)
        stats.tokens_reused = n - need_rows.size + n_moved
        rows_in, slots_in = need_rows, free
        with engine.session(into, stats, wait):
            if n_moved:
                moved = move_from >= 0
                engine.move_slots(into, move_from[moved], free[moved])
                stats.device_moves = n_moved
                rows_in, slots_in = need_rows[~moved], free[~moved]
            if rows_in.size:
                self._copy_in(engine, layer, into, rows_in, slots_in, stats)
                self._write_slot_meta(engine, layer, into, rows_in, slots_in)
        into.count = n
        stats.tokens_copied = int(rows_in.size)

    def repoint(self, layer: int, into: DeviceBuffer) -> None:
        """Bring a buffer up to ``layer``'s layout without copying: each held slot is pointed at the
        row where its token (``into.slot_tokens``) lives now, and slots whose token left the layer
        become empty. A token's keys and values never change once placed, so moves and compaction
        (which change the layout version) leave the buffer's data valid and only its row maps
        stale. ``fetch`` does this itself; ``copy_to_slots`` requires it. ``count`` is kept."""
        version = self.table.version[layer]
        if into.layout_version == version:
            return
        held = np.flatnonzero(into.slot_rows.numpy().reshape(-1) >= 0)
        tokens = into.slot_tokens.reshape(-1)[held]
        into.track(held, self.table.token_row[layer].numpy()[tokens])  # -1: the token left
        into.layout_version = version

    def copy_to_slots(
        self, layer: int, rows: torch.Tensor, into: DeviceBuffer, slots: torch.Tensor
    ) -> FetchStats:
        """Copy ``rows`` (k,) of ``layer`` into flat buffer slots ``slots`` (k,) (group * capacity + slot),
        with no residency planning: for callers that track what sits where (e.g. a sliding window).

        The buffer's ``count`` is left to the caller. Raises if the store's layout changed since
        the buffer's last ``fetch`` or ``repoint`` (its rows would be stale).
        """
        if into.layout_version != self.table.version[layer]:
            raise RuntimeError("copy_to_slots: the store layout changed; repoint() or fetch() the buffer")
        rows_np = rows.to("cpu", torch.int64).numpy().reshape(-1)
        slots_np = slots.to("cpu", torch.int64).numpy().reshape(-1)
        stats = FetchStats()
        if rows_np.size:
            engine = self.engine(into)
            with engine.session(into, stats):
                self._copy_and_track(engine, layer, into, rows_np, slots_np, stats)
        stats.tokens_copied = int(rows_np.size)
        return stats

    def _copy_and_track(
        self,
        engine: CopyEngine,
        layer: int,
        into: DeviceBuffer,
        rows: np.ndarray,
        slots: np.ndarray,
        stats: FetchStats,
    ) -> None:
        self._copy_in(engine, layer, into, rows, slots, stats)
        into.track(slots, rows)
        self._write_slot_meta(engine, layer, into, rows, slots)

    def _write_slot_meta(
        self, engine: CopyEngine, layer: int, into: DeviceBuffer, rows: np.ndarray, dst: np.ndarray
    ) -> None:
        engine.write_slot_meta(
            into, rows, dst, self.table.row_token[layer].numpy(), self.table.all_positions.numpy()
        )

    def _copy_in(
        self,
        engine: CopyEngine,
        layer: int,
        into: DeviceBuffer,
        rows: np.ndarray,
        dst: np.ndarray,
        stats: FetchStats,
    ) -> None:
        """Copy host ``rows`` (k,) into flat buffer slots ``dst`` (k,), group-major, rows sorted per
        group: rows on spilled pages read from their files page by page (one copy each), the rest
        by the engine."""
        pool = self.pool
        stats.bytes_moved += rows.size * (2 * self.geometry.token_row_bytes) // into.groups
        if pool.files is not None:
            pages = rows // self.page_rows
            on_disk = pool.spilled(layer)[pages]
            if on_disk.any():
                ms, read = pool.disk_read_ms, pool.disk_bytes_read
                self._copy_from_disk(engine, layer, into, rows[on_disk], dst[on_disk], stats)
                stats.disk_ms += pool.disk_read_ms - ms
                stats.disk_bytes += pool.disk_bytes_read - read
                rows, dst, pages = rows[~on_disk], dst[~on_disk], pages[~on_disk]
                if rows.size == 0:
                    return
            pool.touch(layer, np.unique(pages).tolist())
        engine.copy_in(pool, layer, into, rows, dst, stats)

    def _copy_from_disk(
        self,
        engine: CopyEngine,
        layer: int,
        into: DeviceBuffer,
        rows: np.ndarray,
        dst: np.ndarray,
        stats: FetchStats,
    ) -> None:
        """Rows (k,) on spilled pages into flat buffer slots ``dst`` (k,): per page, the rows are
        read from the file (``PagePool.read_spilled``) and put into their slots with one copy."""
        pr = self.page_rows
        pages = rows // pr
        order = np.argsort(pages, kind="stable")
        rows, dst, pages = rows[order], dst[order], pages[order]
        for a, b in page_segments(pages):
            data = self.pool.read_spilled(layer, int(pages[a]), rows[a:b] % pr)
            engine.put(into, dst[a:b], data, stats)
