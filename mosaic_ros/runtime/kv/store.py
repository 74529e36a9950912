"""``HostKVStore``: one stream's pre-RoPE KV for all layers, in large pages of host memory.

Layout. Per layer, K and V of a token share one *row* of shape (2, H_kv, D): ``row[0]`` is
the pre-RoPE key, ``row[1]`` the value. Rows live in pages of ``page_rows`` rows
(``(page_rows, 2, H_kv, D)`` tensors, pinned when asked), so a run of consecutive rows is
moved, K and V together, by ONE copy, and growing the store adds a page instead of copying
what is stored. A ``contiguous`` store keeps one page per layer that doubles when full (the
device-resident ``dense`` reference uses it so its context is a view, not a gather).

Tokens. Logical token ids are dense int64 in append order and never reused. Their facts
(``TokenMeta``: positions, stamps, modality, frame) are shared by all layers; each layer
keeps its own logical->physical row map, so a policy may append sequentially (``append``),
choose rows itself (``alloc`` + ``place``), relocate tokens (``move``, ``compact``) and drop
them per layer (``release``). A token is *alive* while at least one layer holds it.

Fetching. ``fetch(layer, rows, into=DeviceBuffer)`` fills a reusable per-layer device
buffer: rows already resident from the previous question stay (moved inside the buffer at
most), the others are copied one copy per long run and with one gather per page for the
rest (short runs and scattered rows); CPU to CPU every run is one copy. The residency plan
for a selection shared by all heads is compiled (``plan``). On CUDA the copies are
non-blocking, issued on a side stream from pinned memory, and the compute stream waits on
an event before it reads the buffer.

Disk tier. With ``disk_dir`` and ``resident_pages`` > 0 (a paged host store only) at most
``resident_pages`` page tensors, all layers together, the page reserve's ready pages included,
are held in host memory; beyond that, a cold page is written to its layer's file
(``disk.PageFiles``) and its tensor reused for the page that needed the room. Cold = least
recently used: every write into a page, every read of it (``read``, ``iter_pages``, a fetch)
marks it used. Never spilled: the page holding a layer's last allocated row (where appends and
moves land); spilled only when no other page can be: pages holding a row of
``hot_rows(layer)`` (the policy's sinks and local window). A page never written (allocated
ahead of the tail) is spilled without a write and brought back without a read.
Row ids do not change: a spilled
page keeps its rows, and everything reads through it. A fetch reads the rows a question selects
from a spilled page straight from the file (one read per run of nearby rows) into the device
buffer, leaving the page on disk (``FetchStats.disk_ms``/``disk_bytes``); ``read`` and
``iter_pages`` read spilled rows the same way into new tensors; a write into a spilled page
(a move, a compaction) first reads the whole page back into memory, spilling another.

Accounting. ``host_kv_bytes`` counts CAPACITY: the bytes of every page tensor allocated
(used or not, the page reserve's ready pages included), i.e. exactly what the process holds
for KV. ``used_kv_bytes`` counts the rows that hold a live token. ``disk_kv_bytes``: the bytes
of the spilled pages (their file ranges). Temporary tensors of one call (a ``read``'s result,
the rows of a spilled page on their way to the device buffer) are not counted.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch

from mosaic_ros.runtime.kv.disk import PageFiles
from mosaic_ros.runtime.kv.pages import PageReserve
from mosaic_ros.runtime.kv.plan import copy_runs, plan_shared, write_slot_meta
from mosaic_ros.runtime.kv.policy import KVContext, KVGeometry, TokenMeta

# host-to-host runs at least this long are copied by torch (split across its intra-op threads),
# shorter ones by numpy (a single thread, but about a microsecond less per call)
HOST_PARALLEL_ROWS = 64

# rows of a spilled page this close together are read in one call (the rows between come along)
DISK_MERGE_GAP_ROWS = 8

_NO_SESSION = nullcontext()


class StoreFullError(RuntimeError):
    """A layer cannot take more rows without exceeding its ``max_rows``; compress or evict first."""


@dataclass
class FetchStats:
    """What one ``fetch`` moved. ``bytes_moved``/``copies`` count host->device KV traffic only.

    ``tokens_reused`` were already resident in the buffer (not copied again); ``device_moves``
    counts rows shifted inside the buffer. ``copy_ms``: host wall time inside the host->device
    copy calls (on CUDA, issuing them); the rest of a fetch's time is planning. ``cuda_events``
    = (start, end) events on the copy stream when the copies are asynchronous (their elapsed
    time is the transfer time). ``disk_ms``/``disk_bytes``: wall time inside the file reads of
    rows on spilled pages (disk tier), and the bytes those reads took from the files.
    """

    copies: int = 0
    bytes_moved: int = 0
    tokens_copied: int = 0
    tokens_reused: int = 0
    device_moves: int = 0
    copy_ms: float = 0.0
    cuda_events: tuple | None = None
    disk_ms: float = 0.0
    disk_bytes: int = 0


def row_view(t: torch.Tensor) -> np.ndarray:
    """A CPU tensor (rows, ...), contiguous, as a numpy array of ``rows`` opaque byte rows sharing
    its memory: row copies through it are plain memcpys (torch's ``index_copy_`` moves 2 KiB
    rows several times slower on a CPU)."""
    rows = t.shape[0]
    nbytes = t[0].numel() * t.element_size() if rows else t.element_size()
    raw = t.reshape(rows, -1).view(torch.uint8).numpy()
    return raw.view(np.dtype((np.void, nbytes))).reshape(rows)


HUGE_PAGE_BYTES = 2 * 2**20  # an x86-64 transparent huge page


def new_page(geometry: KVGeometry, rows: int, device: torch.device, pin: bool) -> torch.Tensor:
    """An uninitialised page of ``rows`` rows (rows, 2, H_kv, D) in the geometry's dtype.

    A host page of at least a huge page starts on a huge-page boundary: torch's allocator aligns
    large blocks to 64 bytes only, so an 8 MB page used to straddle five 2 MB frames and its two
    partial ones could never be huge pages (a quarter of the store at the 3B shape, an eighth at
    7B, read through 4 KiB pages). The page is a view into a block one huge page larger; the
    slack before and after it is never written, so it takes address space, not memory.
    """
    g = geometry
    shape = (rows, 2, g.num_kv_heads, g.head_dim)
    nbytes = rows * 2 * g.token_row_bytes
    if torch.device(device).type != "cpu" or pin or nbytes < HUGE_PAGE_BYTES:
        return torch.empty(shape, dtype=g.dtype, device=device, pin_memory=pin)
    block = torch.empty(nbytes + HUGE_PAGE_BYTES, dtype=torch.uint8)
    start = -block.data_ptr() % HUGE_PAGE_BYTES
    return block[start : start + nbytes].view(g.dtype).view(shape)


def contiguous_runs(rows: torch.Tensor, break_every: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Maximal runs of consecutive values in sorted unique ``rows`` (n,) int64 (CPU).

    Returns (starts, lengths), each (R,) int64. With ``break_every`` > 0 a run never crosses a
    multiple of it (a page boundary). The same cut as a fetch's (``plan.copy_runs``).
    """
    r = np.ascontiguousarray(rows.numpy(), dtype=np.int64)
    starts, _, lengths = copy_runs(r, r, break_every if break_every > 0 else np.iinfo(np.int64).max)
    return torch.from_numpy(starts), torch.from_numpy(lengths)


def _consecutive(values: np.ndarray) -> bool:
    """Whether ``values`` (k >= 1,) are v, v + 1, ..., v + k - 1 in this order."""
    return values.size == 1 or bool((np.diff(values) == 1).all())


class DeviceBuffer:
    """A reusable device tensor holding one layer's retrieved context.

    data: (capacity, 2, H_kv, D) on ``device``. ``groups`` = 1 when all KV heads share one
    token selection (a slot holds a whole row), or H_kv when each head selects its own tokens
    (head h's token in slot s is ``data[s, :, h]``). After a fetch of n tokens per group the
    context is slots [0, n). Slot bookkeeping: ``slot_rows`` (G, capacity) int64 physical rows on
    the host (-1 empty), ``slot_ids`` (G, capacity) token ids and ``slot_pos`` (P, G, capacity)
    rotary positions on the device.
    """

    def __init__(
        self, geometry: KVGeometry, capacity: int, device: torch.device | str, per_head: bool = False
    ):
        if capacity <= 0:
            raise ValueError(f"DeviceBuffer capacity must be positive, got {capacity}")
        self.geometry = geometry
        self.capacity = capacity
        self.device = torch.device(device)
        self.groups = geometry.num_kv_heads if per_head else 1
        g, h, d = self.groups, geometry.num_kv_heads, geometry.head_dim
        self.data = torch.zeros(capacity, 2, h, d, dtype=geometry.dtype, device=self.device)
        self.slot_rows = torch.full((g, capacity), -1, dtype=torch.int64)
        self.slot_ids = torch.full((g, capacity), -1, dtype=torch.int64, device=self.device)
        self.slot_pos = torch.zeros(
            geometry.position_dims, g, capacity, dtype=torch.int64, device=self.device
        )
        self.count = 0
        self.layout_version = -1
        self.staging: torch.Tensor | None = None
        self.ready: torch.cuda.Event | None = None
        # host row -> slot (G, rows) int32, -1 where not resident: the inverse of slot_rows, so
        # planning a fetch looks residency up instead of sorting and searching the buffer
        self._row_slot = np.full((g, 0), -1, dtype=np.int32)
        self._host_rows: np.ndarray | None = None

    def host_rows(self) -> np.ndarray:
        """``row_view`` of ``data`` (a CPU buffer), made once."""
        if self._host_rows is None:
            self._host_rows = row_view(self.data)
        return self._host_rows

    @property
    def per_head(self) -> bool:
        return self.groups > 1

    @property
    def nbytes(self) -> int:
        """Device bytes of the KV data (the bookkeeping tensors are not KV)."""
        return self.data.numel() * self.data.element_size()

    def invalidate(self) -> None:
        """Forget what is resident (the store's layout changed under it)."""
        self.slot_rows.fill_(-1)
        self._row_slot.fill(-1)
        self.count = 0

    def row_slots(self, rows_needed: int) -> np.ndarray:
        """The (G, R >= rows_needed) host-row -> slot map (-1: not resident); grows on demand."""
        have = self._row_slot.shape[1]
        if rows_needed > have:
            grown = np.full((self.groups, max(rows_needed, have + have // 2)), -1, dtype=np.int32)
            grown[:, :have] = self._row_slot
            self._row_slot = grown
        return self._row_slot

    def track(self, flat_slots: np.ndarray, rows: np.ndarray | int) -> None:
        """Record that flat slots (group * capacity + slot) now hold host ``rows`` (-1: empty).

        Rows those slots held before are forgotten unless the map already points elsewhere
        (a row moved inside the buffer keeps its new slot).
        """
        if flat_slots.size == 0:
            return
        cap = self.capacity
        flat_rows = self.slot_rows.numpy().reshape(-1)
        groups, slots = np.divmod(flat_slots, cap)
        old = flat_rows[flat_slots]
        held = old >= 0
        rmap = self._row_slot
        stale = held.copy()
        stale[held] = rmap[groups[held], old[held]] == slots[held]
        rmap[groups[stale], old[stale]] = -1
        rows = np.broadcast_to(np.asarray(rows, dtype=np.int64), flat_slots.shape)
        flat_rows[flat_slots] = rows
        live = rows >= 0
        if live.any():
            need = int(rows[live].max()) + 1
            rmap = self.row_slots(need)
            rmap[groups[live], rows[live]] = slots[live]

    def context(self) -> KVContext:
        """The last fetched tokens as a ``KVContext`` of views: keys/values (H_kv, n, D)."""
        n, h = self.count, self.geometry.num_kv_heads
        keys = self.data[:n, 0].permute(1, 0, 2)
        values = self.data[:n, 1].permute(1, 0, 2)
        ids = self.slot_ids[:, :n]
        pos = self.slot_pos[:, :, :n]
        if self.groups == 1:
            ids = ids.expand(h, n)
            pos = pos.expand(-1, h, n)
        return KVContext(keys=keys, values=values, positions=pos, token_ids=ids)


class HostKVStore:
    """Pre-RoPE K/V of one stream, all layers, in pages of rows (see the module docstring).

    ``page_rows``: rows per page (a fixed-size store) or the initial capacity of a
    ``contiguous`` store. ``max_rows``: per-layer cap on rows (0 = none; ``alloc`` raises
    ``StoreFullError`` beyond it). ``pin``: page-lock the pages (for async copies to CUDA).
    ``device``: where the pages live (host ``cpu`` normally; the compute device for a
    device-resident store). ``run_min_rows``: for copies to another device, runs at least this
    long are copied one copy per run, shorter ones gathered (one gather per page for all of
    them); CPU to CPU every run is one copy. ``spare_pages``: for a paged host store, pages kept
    allocated and faulted in ahead of need by a worker thread (``PageReserve``), so growing
    does not take the first-touch page faults on the caller's path (0: none, no thread).
    ``disk_dir``/``resident_pages``: the disk tier (see the module docstring; ``resident_pages``
    0 = none), ``hot_rows(layer) -> rows (n,) int64``: rows spilled only when nothing else can be.
    """

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
        self.pin = pin and self.device.type == "cpu" and torch.cuda.is_available()
        self.contiguous = contiguous
        self.run_min_rows = run_min_rows
        n_layers = geometry.num_layers
        self.pages: list[list[torch.Tensor]] = [[] for _ in range(n_layers)]
        self.row_token: list[torch.Tensor] = [torch.zeros(0, dtype=torch.int64) for _ in range(n_layers)]
        self.token_row: list[torch.Tensor] = [torch.zeros(0, dtype=torch.int64) for _ in range(n_layers)]
        self.high = [0] * n_layers
        self.live_rows = [0] * n_layers
        self.layout_version = [0] * n_layers
        self.appended_upto = [0] * n_layers
        self.num_tokens = 0
        p = geometry.position_dims
        self._positions = torch.zeros(p, 0, dtype=torch.int64)
        self._stamps = torch.zeros(0, dtype=torch.float64)
        self._modality = torch.zeros(0, dtype=torch.uint8)
        self._frame = torch.zeros(0, dtype=torch.int64)
        self._layers_holding = torch.zeros(0, dtype=torch.int16)
        self._side_stream = torch.cuda.Stream() if self.device.type == "cpu" and self.pin else None
        # per layer, (page, row_view(page)) pairs for host pages: building a view costs microseconds
        # (tens of them right after attention has evicted the caches), a fetch touches a dozen pages
        self._views: list[list[tuple[torch.Tensor, np.ndarray]]] = [[] for _ in range(n_layers)]
        self.resident_pages = resident_pages
        self.files: PageFiles | None = None
        self._hot_rows = hot_rows
        self._used: list[list[int]] = [[] for _ in range(n_layers)]  # per page: tick of its last use
        self._written: list[set[int]] = [set() for _ in range(n_layers)]  # spilled pages with data on file
        self._blank: list[set[int]] = [set() for _ in range(n_layers)]  # pages in memory never written
        self._tick = 0
        self._resident = 0  # page tensors held, all layers
        self.disk_read_ms = 0.0  # wall time inside file reads since creation
        self.disk_write_ms = 0.0
        self.pages_spilled = 0
        self.pages_restored = 0  # spilled pages read back into memory to be written
        if resident_pages:
            if contiguous or self.device.type != "cpu":
                raise ValueError("a disk tier needs a paged store in host memory")
            page_bytes = page_rows * 2 * geometry.token_row_bytes
            self.files = PageFiles(disk_dir, n_layers, page_bytes)
        self._reserve: PageReserve | None = None
        if spare_pages > 0 and not contiguous and self.device.type == "cpu":
            make = partial(new_page, geometry, page_rows, self.device, self.pin)
            self._reserve = PageReserve(make, spare_pages)  # the factory holds no reference to the store
            self._update_allowance()
            weakref.finalize(self, self._reserve.close)

    # ------------------------------------------------------------------ token metadata
    @property
    def positions(self) -> torch.Tensor:
        """(P, N) int64 rotary positions of every token ever appended."""
        return self._positions[:, : self.num_tokens]

    @property
    def stamps(self) -> torch.Tensor:
        """(N,) float64 seconds."""
        return self._stamps[: self.num_tokens]

    @property
    def modality(self) -> torch.Tensor:
        """(N,) uint8, 0 text, 1 vision."""
        return self._modality[: self.num_tokens]

    @property
    def frame(self) -> torch.Tensor:
        """(N,) int64 frame index, -1 for text."""
        return self._frame[: self.num_tokens]

    @property
    def alive(self) -> torch.Tensor:
        """(N,) bool: held by at least one layer."""
        return self._layers_holding[: self.num_tokens] > 0

    def _grow_meta(self, need: int) -> None:
        cap = self._stamps.numel()
        if need <= cap:
            return
        new = max(need, 2 * cap, 1024)

        def grow(t: torch.Tensor, fill: float) -> torch.Tensor:
            out = torch.full((*t.shape[:-1], new), fill, dtype=t.dtype)
            out[..., :cap] = t
            return out

        self._positions = grow(self._positions, 0)
        self._stamps = grow(self._stamps, 0.0)
        self._modality = grow(self._modality, 0)
        self._frame = grow(self._frame, -1)
        self._layers_holding = grow(self._layers_holding, 0)
        self.token_row = [grow(t, -1) for t in self.token_row]

    def add_tokens(self, meta: TokenMeta) -> torch.Tensor:
        """Register a chunk's token facts; returns their logical ids (T,) int64."""
        if meta.positions.shape[0] != self.geometry.position_dims:
            raise ValueError(
                f"positions have {meta.positions.shape[0]} components, geometry expects "
                f"{self.geometry.position_dims}"
            )
        t = meta.num_tokens
        start = self.num_tokens
        self._grow_meta(start + t)
        sl = slice(start, start + t)
        self._positions[:, sl] = meta.positions.to("cpu", torch.int64)
        self._stamps[sl] = meta.stamps.to("cpu", torch.float64)
        self._modality[sl] = meta.modality.to("cpu", torch.uint8)
        self._frame[sl] = meta.frame.to("cpu", torch.int64)
        self.num_tokens = start + t
        return torch.arange(start, start + t, dtype=torch.int64)

    # ------------------------------------------------------------------ physical rows
    def capacity_rows(self, layer: int) -> int:
        """Rows allocated for ``layer`` (used or not, in memory or spilled)."""
        if self.contiguous:
            return sum(p.shape[0] for p in self.pages[layer])
        return len(self.pages[layer]) * self.page_rows

    def _row_views(self, layer: int) -> list[np.ndarray | None]:
        """``row_view`` of every page of ``layer`` (host pages; None for a spilled one), kept until
        the pages change."""
        pages, cached = self.pages[layer], self._views[layer]
        if len(cached) != len(pages) or (pages and cached[-1][0] is not pages[-1]):
            cached[:] = [(p, None if p is None else row_view(p)) for p in pages]
        return [v for _, v in cached]

    def _page_rows_of(self, layer: int) -> int:
        return self.pages[layer][0].shape[0] if self.contiguous and self.pages[layer] else self.page_rows

    def _new_page(self, rows: int) -> torch.Tensor:
        return new_page(self.geometry, rows, self.device, self.pin)

    # ------------------------------------------------------------------ disk tier
    def _page_tensor(self, keep: frozenset = frozenset()) -> torch.Tensor:
        """A page tensor for a new or restored page: from the reserve or newly allocated while the
        disk tier's ``resident_pages`` allow one more, else the tensor of a page spilled now (none
        of ``keep``, (layer, page) pairs)."""
        if self.files is not None and self._resident >= self.resident_pages:
            page = self._spill_one(keep)
            self._resident += 1
            return page
        self._resident += 1
        if self.files is not None:
            self._update_allowance()  # the reserve shrinks first, so it never holds what the cap lacks
        return self._reserve.take() if self._reserve is not None else self._new_page(self.page_rows)

    def _touch(self, layer: int, pages) -> None:
        """Mark ``pages`` (ints) of ``layer`` used now (disk tier: the spill order)."""
        if self.files is None:
            return
        self._tick += 1
        used = self._used[layer]
        for p in pages:
            used[p] = self._tick

    def _spilled(self, layer: int) -> np.ndarray:
        """(pages,) bool: which pages of ``layer`` are on disk."""
        return np.fromiter((p is None for p in self.pages[layer]), dtype=bool, count=len(self.pages[layer]))

    def _victim(self, keep: frozenset) -> tuple[int, int] | None:
        """The (layer, page) to spill: the least recently used page holding no hot row, else the
        least recently used hot one; never a layer's tail page, nor one of ``keep``."""
        best, best_key = None, None
        pr = self.page_rows
        for layer, pages in enumerate(self.pages):
            tail = (self.high[layer] - 1) // pr if self.high[layer] else -1
            hot: set[int] = set()
            if self._hot_rows is not None and self.high[layer]:
                rows = self._hot_rows(layer)
                hot = set((rows[rows >= 0] // pr).tolist())
            used = self._used[layer]
            for p in range(len(pages)):
                if p == tail or pages[p] is None or (layer, p) in keep:
                    continue
                key = (p in hot, used[p])
                if best_key is None or key < best_key:
                    best, best_key = (layer, p), key
        return best

    def _spill_one(self, keep: frozenset) -> torch.Tensor:
        """Write the ``_victim`` page to its file and return its tensor (no longer the page's)."""
        victim = self._victim(keep)
        if victim is None:
            raise StoreFullError(
                f"the disk tier holds {self.resident_pages} pages in memory and every one is in use "
                "(tail pages of the layers and the pages of this operation); raise the host cap"
            )
        layer, p = victim
        page = self.pages[layer][p]
        if p in self._blank[layer]:
            self._blank[layer].discard(p)
        else:
            t0 = time.perf_counter()
            self.files.write_page(layer, p, page.reshape(-1).view(torch.uint8).numpy())
            self.disk_write_ms += (time.perf_counter() - t0) * 1e3
            self._written[layer].add(p)
        self.pages[layer][p] = None
        self._views[layer] = []
        self._resident -= 1
        self.pages_spilled += 1
        return page

    def _restore(self, layer: int, pages: list[int]) -> None:
        """Read the spilled ones of ``pages`` of ``layer`` back into memory (spilling others)."""
        keep = frozenset((layer, p) for p in pages)
        for p in pages:
            if self.pages[layer][p] is not None:
                continue
            page = self._page_tensor(keep)
            if p in self._written[layer]:
                t0 = time.perf_counter()
                self.files.read(layer, p * self.files.page_bytes, page.reshape(-1).view(torch.uint8).numpy())
                self.disk_read_ms += (time.perf_counter() - t0) * 1e3
                self._written[layer].discard(p)
                self.pages_restored += 1
            else:
                self._blank[layer].add(p)
            self.pages[layer][p] = page
            self._views[layer] = []
        self._update_allowance()

    def _read_spilled(self, layer: int, page: int, local: np.ndarray) -> torch.Tensor:
        """Rows ``local`` (k,) int64 (offsets within the page, any order) of spilled ``page`` as a
        new (k, 2, H_kv, D) tensor, read from the file: one read per run of rows at most
        ``DISK_MERGE_GAP_ROWS`` apart."""
        g = self.geometry
        uniq, inverse = np.unique(local, return_inverse=True)
        out = torch.empty(uniq.size, 2, g.num_kv_heads, g.head_dim, dtype=g.dtype)
        if uniq.size == 0:
            return out
        out_rows = row_view(out)
        row_bytes = 2 * g.token_row_bytes
        base = page * self.files.page_bytes
        cut = np.flatnonzero(np.diff(uniq) > DISK_MERGE_GAP_ROWS + 1) + 1
        first = np.concatenate(([0], cut))
        last = np.concatenate((cut, [uniq.size]))
        t0 = time.perf_counter()
        for a, b in zip(first.tolist(), last.tolist(), strict=True):
            lo, hi = int(uniq[a]), int(uniq[b - 1]) + 1
            if hi - lo == b - a:  # every row of the range is wanted: straight into the result
                self.files.read(layer, base + lo * row_bytes, out_rows[a:b])
            else:
                span = np.empty(hi - lo, dtype=out_rows.dtype)
                self.files.read(layer, base + lo * row_bytes, span)
                out_rows[a:b] = span[uniq[a:b] - lo]
        self.disk_read_ms += (time.perf_counter() - t0) * 1e3
        if uniq.size == local.size and bool((inverse == np.arange(local.size)).all()):
            return out
        return out[torch.from_numpy(inverse.reshape(-1))]

    def close(self) -> None:
        """Stop the page reserve's worker and remove the disk tier's files; the store is unusable after."""
        if self._reserve is not None:
            self._reserve.close()
        if self.files is not None:
            self.files.close()

    def _ensure_rows(self, layer: int, rows_needed: int) -> None:
        """Grow ``layer`` so that rows [0, rows_needed) exist."""
        cap = self.capacity_rows(layer)
        if rows_needed <= cap:
            return
        if self.contiguous:
            new_cap = max(rows_needed, 2 * cap, self.page_rows)
            if self.max_rows:
                new_cap = max(min(new_cap, self.max_rows), rows_needed)
            page = self._new_page(new_cap)
            if cap:
                page[: self.high[layer]] = self.pages[layer][0][: self.high[layer]]
            self.pages[layer] = [page]
            self._views[layer] = []
        else:
            while self.capacity_rows(layer) < rows_needed:
                self.pages[layer].append(self._page_tensor())
                self._used[layer].append(self._tick)
                self._blank[layer].add(len(self.pages[layer]) - 1)
            self._update_allowance()
        new_cap = self.capacity_rows(layer)
        grown = torch.full((new_cap,), -1, dtype=torch.int64)
        grown[:cap] = self.row_token[layer]
        self.row_token[layer] = grown

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
        limit = self.max_rows or None
        live = self.live_rows[layer]
        if limit is not None and live + n > limit:
            raise StoreFullError(
                f"layer {layer}: {live} live rows + {n} new exceed max_rows={limit}; compress or evict first"
            )
        end = self.high[layer] + n
        needs_growth = end > self.capacity_rows(layer)
        over_limit = limit is not None and end > limit
        if needs_growth and ((reuse_freed and self.high[layer] > live) or over_limit):
            self.compact(layer)
            end = self.high[layer] + n
        self._ensure_rows(layer, end)
        rows = torch.arange(self.high[layer], end, dtype=torch.int64)
        self.high[layer] = end
        return rows

    def _locate(self, layer: int, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pr = self._page_rows_of(layer)
        return rows // pr, rows % pr

    def _write_rows(self, layer: int, rows: torch.Tensor, data: torch.Tensor) -> None:
        """data (n, 2, H_kv, D) into ``rows`` (n,) (one copy per run). With the disk tier, page by
        page: each spilled page is read back just before its rows are written."""
        if self.files is None:
            self._write_runs(layer, rows, data)
            return
        order = torch.argsort(rows)
        rows, data = rows[order], data[order]
        pages = rows // self.page_rows
        starts = torch.nonzero(torch.diff(pages, prepend=torch.tensor([-1]))).flatten().tolist()
        for a, b in zip(starts, [*starts[1:], rows.numel()], strict=True):
            p = int(pages[a])
            self._restore(layer, [p])
            self._touch(layer, (p,))
            self._blank[layer].discard(p)
            self._write_runs(layer, rows[a:b], data[a:b])

    def _write_runs(self, layer: int, rows: torch.Tensor, data: torch.Tensor) -> None:
        """``_write_rows`` into pages in memory."""
        pr = self._page_rows_of(layer)
        first, last, n = int(rows[0]), int(rows[-1]), rows.numel()
        if last - first == n - 1 and first // pr == last // pr and bool((rows[1:] > rows[:-1]).all()):
            self.pages[layer][first // pr][first % pr : first % pr + n].copy_(data)
            return
        order = torch.argsort(rows)
        rows, data = rows[order], data[order]
        starts, lengths = contiguous_runs(rows, self._page_rows_of(layer))
        pr = self._page_rows_of(layer)
        offset = 0
        for s, ln in zip(starts.tolist(), lengths.tolist(), strict=True):
            page = self.pages[layer][s // pr]
            page[s % pr : s % pr + ln].copy_(data[offset : offset + ln])
            offset += ln

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
        if int(token_ids.max()) >= self.num_tokens or int(token_ids.min()) < 0:
            raise ValueError("place: unknown token ids (call add_tokens first)")
        if int(rows.max()) >= self.high[layer] or bool((self.row_token[layer][rows] >= 0).any()):
            raise ValueError("place: rows must be allocated and free")
        if bool((self.token_row[layer][token_ids] >= 0).any()):
            raise ValueError(f"place: some tokens are already stored in layer {layer}")
        data = torch.stack((keys, values), dim=1).to(self.device, g.dtype)
        self._write_rows(layer, rows, data)
        self.row_token[layer][rows] = token_ids
        self.token_row[layer][token_ids] = rows
        self._layers_holding[token_ids] += 1
        self.live_rows[layer] += token_ids.numel()
        self.appended_upto[layer] = max(self.appended_upto[layer], int(token_ids.max()) + 1)

    def append(
        self, layer: int, token_ids: torch.Tensor, keys: torch.Tensor, values: torch.Tensor
    ) -> torch.Tensor:
        """Store tokens sequentially at the tail of ``layer``; returns their rows (T,) int64."""
        rows = self.alloc(layer, int(token_ids.numel()))
        self.place(layer, token_ids, rows, keys, values)
        return rows

    def read(self, layer: int, rows: torch.Tensor) -> torch.Tensor:
        """Gather ``rows`` (n,) of ``layer`` as (n, 2, H_kv, D) (K then V), one gather per page."""
        rows = rows.to("cpu", torch.int64)
        g = self.geometry
        out = torch.empty(rows.numel(), 2, g.num_kv_heads, g.head_dim, dtype=g.dtype, device=self.device)
        pages, local = self._locate(layer, rows)
        touched = torch.unique(pages).tolist()
        for p in touched:
            sel = torch.nonzero(pages == p).flatten()
            page = self.pages[layer][p]
            if page is None:
                out[sel] = self._read_spilled(layer, p, local[sel].numpy())
            else:
                out[sel] = page.index_select(0, local[sel].to(self.device))
        self._touch(layer, touched)
        return out

    def iter_pages(self, layer: int):
        """Yield (first_row, rows_view (n, 2, H_kv, D)) over the used part of every page of ``layer``.

        Views include freed rows (their ``row_token`` is -1): mask them with ``row_token``. A
        spilled page is read from its file into a new tensor instead of a view.
        """
        pr = self._page_rows_of(layer)
        high = self.high[layer]
        for i, page in enumerate(self.pages[layer]):
            start = i * pr
            if start >= high:
                break
            n = min(pr, high - start)
            if page is None:
                yield start, self._read_spilled(layer, i, np.arange(n))
            else:
                self._touch(layer, (i,))
                yield start, page[:n]

    def rows_of(self, layer: int, token_ids: torch.Tensor) -> torch.Tensor:
        """Physical rows (…) of ``token_ids`` in ``layer`` (-1 where the layer does not hold them)."""
        return self.token_row[layer][: self.num_tokens][token_ids.to("cpu", torch.int64)]

    def live_tokens(self, layer: int) -> torch.Tensor:
        """Ids (n,) int64, ascending, of the tokens ``layer`` holds."""
        return torch.nonzero(self.token_row[layer][: self.num_tokens] >= 0).flatten()

    def runs(self, layer: int, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Maximal page-bounded runs (starts, lengths) of the row set ``rows`` of ``layer``."""
        rows = torch.unique(rows.to("cpu", torch.int64))
        return contiguous_runs(rows, self._page_rows_of(layer))

    def move(self, layer: int, token_ids: torch.Tensor, rows: torch.Tensor) -> None:
        """Relocate stored tokens into allocated free ``rows`` (same length); frees their old rows."""
        token_ids = token_ids.to("cpu", torch.int64)
        rows = rows.to("cpu", torch.int64)
        old = self.rows_of(layer, token_ids)
        if bool((old < 0).any()):
            raise ValueError(f"move: some tokens are not stored in layer {layer}")
        if rows.numel() != old.numel():
            raise ValueError("move: need one destination row per token")
        if rows.numel() == 0:
            return
        if int(rows.max()) >= self.high[layer] or int(rows.min()) < 0:
            raise ValueError("move: destination rows must be allocated")
        occupied = self.row_token[layer][rows] >= 0
        if bool(occupied.any()) and not bool(torch.isin(rows[occupied], old).all()):
            raise ValueError("move: destination rows hold other tokens")
        if self.device.type == "cpu" and not bool(occupied.any()) and self._in_memory(layer, old, rows):
            self._copy_rows_host(layer, old.numpy(), rows.numpy())
            self._blank[layer].difference_update(torch.unique(rows // self._page_rows_of(layer)).tolist())
        else:  # through a copy: destinations may overlap the sources (an in-place relayout)
            self._write_rows(layer, rows, self.read(layer, old))
        self.row_token[layer][old] = -1
        self.row_token[layer][rows] = token_ids
        self.token_row[layer][token_ids] = rows
        self.layout_version[layer] += 1

    def _in_memory(self, layer: int, *row_sets: torch.Tensor) -> bool:
        """Whether every page holding one of the rows is in memory (marking them used)."""
        if self.files is None:
            return True
        pages = torch.unique(torch.cat(row_sets) // self.page_rows).tolist()
        if any(self.pages[layer][p] is None for p in pages):
            return False
        self._touch(layer, pages)
        return True

    def _copy_rows_host(self, layer: int, src: np.ndarray, dst: np.ndarray) -> None:
        """Row ``src[i]`` -> row ``dst[i]`` of ``layer`` on host pages, no row in both sets: one
        slice copy per run consecutive in both (cut at page ends), no intermediate tensor.

        Moves (sealing, compaction) read runs (a cluster's old extent, its rows of one frame in
        the ring) into fresh consecutive rows; copied as runs they go at memcpy speed, where a
        fancy-indexed copy of opaque rows costs several times as long per byte.
        """
        pr = self._page_rows_of(layer)
        order = np.argsort(dst, kind="stable")
        src = np.ascontiguousarray(src[order], dtype=np.int64)
        dst = np.ascontiguousarray(dst[order], dtype=np.int64)
        first, to, lengths = copy_runs(src, dst, pr)  # within one source page
        views = self._row_views(layer)
        for s, d, n in zip(first.tolist(), to.tolist(), lengths.tolist(), strict=True):
            while n:  # and within one destination page
                sp, so = divmod(s, pr)
                dp, do = divmod(d, pr)
                k = min(n, pr - do)
                views[dp][do : do + k] = views[sp][so : so + k]
                s, d, n = s + k, d + k, n - k

    def release(self, layer: int, token_ids: torch.Tensor) -> None:
        """Drop tokens from ``layer``: their rows become free (reused after ``compact``)."""
        token_ids = token_ids.to("cpu", torch.int64)
        rows = self.rows_of(layer, token_ids)
        held = rows >= 0
        token_ids, rows = token_ids[held], rows[held]
        self.row_token[layer][rows] = -1
        self.token_row[layer][token_ids] = -1
        self._layers_holding[token_ids] -= 1
        self.live_rows[layer] -= int(token_ids.numel())
        self.layout_version[layer] += 1

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
        rt = self.row_token[layer][: self.high[layer]]
        live_rows = torch.nonzero(rt >= 0).flatten()
        n = live_rows.numel()
        if n != self.high[layer]:
            ids = rt[live_rows]
            moving = live_rows != torch.arange(n)
            if bool(moving.any()):
                first = int(torch.nonzero(moving).flatten()[0])
                step = self.page_rows
                for a in range(first, n, step):
                    src = live_rows[a : a + step]
                    self._write_rows(layer, torch.arange(a, a + src.numel()), self.read(layer, src))
            self.row_token[layer][:n] = ids
            self.row_token[layer][n:] = -1
            self.token_row[layer][ids] = torch.arange(n)
            self.high[layer] = n
            self.layout_version[layer] += 1
        if not self.contiguous:
            keep = -(-n // self.page_rows)
            spare = [p for p in self.pages[layer][keep:] if p is not None]
            del self.pages[layer][keep:]
            del self._used[layer][keep:]
            self._written[layer] = {p for p in self._written[layer] if p < keep}
            self._blank[layer] = {p for p in self._blank[layer] if p < keep}
            self._resident -= len(spare) if self.files is not None else 0
            if self.files is not None:
                self.files.truncate(layer, keep)
            if self._reserve is not None and spare:
                self._update_allowance()
                for page in spare:  # already faulted in: the next growth takes them first
                    self._reserve.give(page)
            self._views[layer] = []
            self.row_token[layer] = self.row_token[layer][: keep * self.page_rows].clone()

    def _update_allowance(self) -> None:
        """Under ``max_rows`` the reserve holds no more pages than the layers may still add; with
        the disk tier, no more than ``resident_pages`` leave room for."""
        if self._reserve is None or not self.max_rows:
            return
        per_layer = -(-self.max_rows // self.page_rows)
        room = sum(max(per_layer - len(p), 0) for p in self.pages)
        if self.files is not None:
            room = min(room, self.resident_pages - self._resident)
        self._reserve.set_allowance(room)

    @property
    def page_reserve(self) -> PageReserve | None:
        """The reserve of pages faulted in ahead of need (None when ``spare_pages`` is 0)."""
        return self._reserve

    # ------------------------------------------------------------------ accounting
    @property
    def host_kv_bytes(self) -> int:
        """Bytes of every page tensor allocated, all layers (capacity, not used rows), and of the
        reserve's ready pages."""
        held = sum(p.numel() * p.element_size() for pages in self.pages for p in pages if p is not None)
        return held + (self._reserve.ready_bytes if self._reserve is not None else 0)

    @property
    def disk_bytes_read(self) -> int:
        """Bytes read from the disk tier's files since the store was made (0 without one)."""
        return self.files.bytes_read if self.files is not None else 0

    @property
    def disk_kv_bytes(self) -> int:
        """Bytes of the spilled pages that hold data in their files, all layers (0 without a disk tier)."""
        if self.files is None:
            return 0
        return sum(len(written) for written in self._written) * self.files.page_bytes

    @property
    def used_kv_bytes(self) -> int:
        """Bytes of the rows holding live tokens, all layers."""
        return sum(self.live_rows) * 2 * self.geometry.token_row_bytes

    # ------------------------------------------------------------------ fetching
    def fetch(self, layer: int, rows: torch.Tensor, into: DeviceBuffer, *, wait: bool = True) -> FetchStats:
        """Make ``into`` hold ``rows`` of ``layer`` in slots [0, n) (per group); returns what moved.

        rows: (n,) or (G, n) int64 physical rows, unique within a group, G = ``into.groups``.
        Resident rows are kept (shifted inside the buffer if they sit beyond n); missing rows are
        copied host->device by runs or by per-page gathers (see the class docstring).
        ``wait=False`` (a prefetch) leaves the compute stream free to run ahead of asynchronous
        copies: the buffer may be read only after a later ``fetch`` into it with ``wait=True``
        (copies share one side stream, so that fetch's event orders both). No effect off CUDA.

        Planning: a stable sort of the rows (linear on the run-structured selections policies hand
        over), then, for a selection shared by all heads, compiled passes over the buffer's
        row -> slot map (``plan.plan_shared``, ``plan.copy_runs``, ``plan.write_slot_meta``); per
        head it runs on numpy views of the same maps.
        """
        rows = rows.to("cpu", torch.int64)
        if rows.dim() == 1 and into.groups > 1:
            rows = rows[None].expand(into.groups, -1)
        g_count, n = (1, rows.shape[0]) if rows.dim() == 1 else rows.shape
        if g_count != into.groups:
            raise ValueError(f"fetch: rows have {g_count} groups, buffer has {into.groups}")
        if n > into.capacity:
            raise ValueError(f"fetch: {n} rows exceed the buffer capacity {into.capacity}")
        if into.layout_version != self.layout_version[layer]:
            into.invalidate()
            into.layout_version = self.layout_version[layer]
        stats = FetchStats()
        if g_count == 1:
            self._fetch_shared(layer, rows.numpy().reshape(-1), into, stats, wait)
            return stats
        cap = into.capacity
        want = np.sort(rows.numpy(), axis=1, kind="stable")
        rmap = into.row_slots(int(want.max()) + 1 if n else 0)
        slot = np.take_along_axis(rmap, want, axis=1) if g_count > 1 else rmap[0][want]
        hit = slot >= 0
        keep = hit & (slot < n)
        occupied = np.zeros((g_count, n), dtype=bool)
        kg, ki = np.nonzero(keep)
        occupied[kg, slot[kg, ki]] = True
        fg, fs = np.nonzero(~occupied)  # free slots in [0, n), group-major, ascending
        ng, ni = np.nonzero(~keep)  # rows that need a slot, group-major, rows ascending
        dst = fg * cap + fs
        need_rows = want[ng, ni]
        moved = hit[ng, ni]
        stats.tokens_reused = int(hit.sum())
        with self._copy_session(into, stats, wait):
            if moved.any():
                src_m = ng[moved] * cap + slot[ng[moved], ni[moved]]
                dst_m = dst[moved]
                self._device_move(into, src_m, dst_m)
                into.track(dst_m, need_rows[moved])
                into.track(src_m, -1)
                stats.device_moves = int(src_m.size)
            miss = ~moved
            if miss.any():
                self._copy_and_track(layer, into, need_rows[miss], dst[miss], stats)
        into.count = n
        stats.tokens_copied = int(miss.sum())
        return stats

    def _fetch_shared(
        self, layer: int, rows: np.ndarray, into: DeviceBuffer, stats: FetchStats, wait: bool
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
        with self._copy_session(into, stats, wait):
            if n_moved:
                moved = move_from >= 0
                self._device_move(into, move_from[moved], free[moved])
                stats.device_moves = n_moved
                rows_in, slots_in = need_rows[~moved], free[~moved]
            if rows_in.size:
                self._copy_in(layer, into, rows_in, slots_in, stats)
                self._write_slot_meta(layer, into, rows_in, slots_in)
        into.count = n
        stats.tokens_copied = int(rows_in.size)

    def copy_to_slots(
        self, layer: int, rows: torch.Tensor, into: DeviceBuffer, slots: torch.Tensor
    ) -> FetchStats:
        """Copy ``rows`` (k,) of ``layer`` into flat buffer slots ``slots`` (k,) (group * capacity + slot),
        with no residency planning: for callers that track what sits where (e.g. a sliding window).

        The buffer's ``count`` is left to the caller. Raises if the store's layout changed since
        the buffer was last filled by ``fetch`` (its resident rows would be stale).
        """
        if into.layout_version != self.layout_version[layer]:
            raise RuntimeError("copy_to_slots: the store layout changed; refill the buffer with fetch()")
        rows_np = rows.to("cpu", torch.int64).numpy().reshape(-1)
        slots_np = slots.to("cpu", torch.int64).numpy().reshape(-1)
        stats = FetchStats()
        if rows_np.size:
            with self._copy_session(into, stats):
                self._copy_and_track(layer, into, rows_np, slots_np, stats)
        stats.tokens_copied = int(rows_np.size)
        return stats

    def _copy_and_track(
        self, layer: int, into: DeviceBuffer, rows: np.ndarray, slots: np.ndarray, stats: FetchStats
    ) -> None:
        self._copy_in(layer, into, rows, slots, stats)
        into.track(slots, rows)
        self._write_slot_meta(layer, into, rows, slots)

    def _copy_session(self, into: DeviceBuffer, stats: FetchStats, wait: bool = True):
        """Run the enclosed copies on the side stream (CUDA from host) and, with ``wait``, make
        compute wait for them; nothing to set up otherwise."""
        if into.device.type != "cuda" or self.device.type == "cuda":
            return _NO_SESSION
        return self._cuda_copy_session(into, stats, wait)

    @contextmanager
    def _cuda_copy_session(self, into: DeviceBuffer, stats: FetchStats, wait: bool):
        side = self._side_stream or torch.cuda.Stream(into.device)
        self._side_stream = side
        side.wait_stream(torch.cuda.current_stream(into.device))
        events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
        with torch.cuda.stream(side):
            events[0].record()
            yield
            events[1].record()
        into.ready = events[1]
        if wait:
            torch.cuda.current_stream(into.device).wait_event(events[1])
        stats.cuda_events = events

    def _unit_views(self, into: DeviceBuffer, tensor: torch.Tensor) -> torch.Tensor:
        """(rows, 2, H, D) -> (G, rows, ...) so that a flat (group, slot) index addresses one unit."""
        if into.groups == 1:
            return tensor[None]
        return tensor.permute(2, 0, 1, 3)

    @staticmethod
    def _index(values: np.ndarray, device: torch.device) -> torch.Tensor:
        """An int64 index tensor on ``device`` from a host numpy array."""
        t = torch.from_numpy(np.ascontiguousarray(values, dtype=np.int64))
        return t if device.type == "cpu" else t.to(device, non_blocking=True)

    def _device_move(self, into: DeviceBuffer, src: np.ndarray, dst: np.ndarray) -> None:
        cap = into.capacity
        if self._host_to_host(into):
            buf = into.host_rows()
            buf[dst] = buf[src]
            ids = into.slot_ids.numpy().reshape(-1)
            ids[dst] = ids[src]
            pos = into.slot_pos.numpy().reshape(into.slot_pos.shape[0], -1)
            pos[:, dst] = pos[:, src]
            return
        dev_src, dev_dst = self._index(src, into.device), self._index(dst, into.device)
        view = self._unit_views(into, into.data)
        g_s, s_s = dev_src // cap, dev_src % cap
        g_d, s_d = dev_dst // cap, dev_dst % cap
        view[g_d, s_d] = view[g_s, s_s]
        into.slot_ids.view(-1)[dev_dst] = into.slot_ids.view(-1)[dev_src]
        p = into.slot_pos.shape[0]
        flat_pos = into.slot_pos.view(p, -1)
        flat_pos[:, dev_dst] = flat_pos[:, dev_src]

    def _write_slot_meta(self, layer: int, into: DeviceBuffer, rows: np.ndarray, dst: np.ndarray) -> None:
        if into.device.type == "cpu":
            write_slot_meta(
                np.ascontiguousarray(rows, dtype=np.int64),
                np.ascontiguousarray(dst, dtype=np.int64),
                np.ascontiguousarray(self.row_token[layer].numpy()),
                self._positions.numpy(),
                into.slot_ids.numpy().reshape(-1),
                into.slot_pos.numpy().reshape(self._positions.shape[0], -1),
            )
            return
        ids = self.row_token[layer].numpy()[rows]
        pos = self._positions.numpy()[:, ids]
        dev_dst = self._index(dst, into.device)
        into.slot_ids.view(-1)[dev_dst] = self._index(ids, into.device)
        dev_pos = torch.from_numpy(pos).to(into.device, non_blocking=True)
        into.slot_pos.view(pos.shape[0], -1)[:, dev_dst] = dev_pos

    def _copy_in(
        self, layer: int, into: DeviceBuffer, rows: np.ndarray, dst: np.ndarray, stats: FetchStats
    ) -> None:
        """Copy host ``rows`` (k,) into flat buffer slots ``dst`` (k,), group-major, rows sorted per group.

        Whole rows (one group): runs (``plan.copy_runs``) of at least ``run_min_rows`` rows are
        copied one copy per run, the rest gathered (one gather per page); CPU to CPU every run is
        one copy. Per-head units are always gathered.
        """
        unit_bytes = (2 * self.geometry.token_row_bytes) // into.groups
        stats.bytes_moved += rows.size * unit_bytes
        if self.files is not None:
            pages = rows // self.page_rows
            on_disk = self._spilled(layer)[pages]
            if on_disk.any():
                ms, read = self.disk_read_ms, self.files.bytes_read
                self._copy_from_disk(layer, into, rows[on_disk], dst[on_disk], stats)
                stats.disk_ms += self.disk_read_ms - ms
                stats.disk_bytes += self.files.bytes_read - read
                rows, dst, pages = rows[~on_disk], dst[~on_disk], pages[~on_disk]
                if rows.size == 0:
                    return
            self._touch(layer, np.unique(pages).tolist())
        if into.groups == 1:
            starts, slots, lengths = copy_runs(
                np.ascontiguousarray(rows, dtype=np.int64),
                np.ascontiguousarray(dst, dtype=np.int64),
                self._page_rows_of(layer),
            )
            # CPU to CPU a row-by-row gather (rows indexed one by one, into scattered slots through a
            # temporary) costs more than the microsecond or two of a short run's copy
            long = lengths >= (1 if self._host_to_host(into) else self.run_min_rows)
            if long.any():
                t0 = time.perf_counter()
                self._copy_runs(layer, into, starts[long], slots[long], lengths[long])
                stats.copy_ms += (time.perf_counter() - t0) * 1e3
                stats.copies += int(long.sum())
                if long.all():
                    return
                short = ~np.repeat(long, lengths)
                rows, dst = rows[short], dst[short]
        t0 = time.perf_counter()
        self._gather(layer, into, rows, dst, stats)
        stats.copy_ms += (time.perf_counter() - t0) * 1e3

    def _copy_from_disk(
        self, layer: int, into: DeviceBuffer, rows: np.ndarray, dst: np.ndarray, stats: FetchStats
    ) -> None:
        """Rows (k,) on spilled pages into flat buffer slots ``dst`` (k,): per page, the rows are
        read from the file (``_read_spilled``) and written into their slots with one copy."""
        cap, pr = into.capacity, self.page_rows
        pages = rows // pr
        order = np.argsort(pages, kind="stable")
        rows, dst, pages = rows[order], dst[order], pages[order]
        bounds = np.flatnonzero(np.concatenate(([True], pages[1:] != pages[:-1], [True])))
        groups, slots = np.divmod(dst, cap)
        for a, b in zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True):
            data = self._read_spilled(layer, int(pages[a]), rows[a:b] % pr)
            t0 = time.perf_counter()
            to_slots = self._index(slots[a:b], into.device)
            if into.groups == 1:
                into.data[to_slots] = data.to(into.device)
            else:  # each slot holds one head's K and V: pick that head of each row
                unit = data.permute(2, 0, 1, 3)[torch.from_numpy(groups[a:b]), torch.arange(b - a)]
                into.data.permute(2, 0, 1, 3)[self._index(groups[a:b], into.device), to_slots] = unit.to(
                    into.device
                )
            stats.copy_ms += (time.perf_counter() - t0) * 1e3
            stats.copies += 1

    def _host_to_host(self, into: DeviceBuffer) -> bool:
        """Whether a fetch into ``into`` is a CPU-to-CPU copy of whole rows (numpy row views)."""
        return into.groups == 1 and into.device.type == "cpu" and self.device.type == "cpu"

    def _copy_runs(
        self, layer: int, into: DeviceBuffer, starts: np.ndarray, dst: np.ndarray, lengths: np.ndarray
    ) -> None:
        """One copy per run: host rows [starts[i], starts[i] + lengths[i]) (within one page) into
        buffer slots from dst[i]."""
        pr = self._page_rows_of(layer)
        pages = self.pages[layer]
        data = into.data
        non_blocking = into.device.type == "cuda"
        # On a CPU, torch's copy_ of a long slice splits it across the intra-op threads (about
        # twice a single-threaded copy's bandwidth), but costs microseconds more per call than a
        # numpy copy: short runs, and every run when torch has one thread, go through numpy.
        host = self._host_to_host(into)
        buf = into.host_rows() if host else None
        parallel = torch.get_num_threads() > 1
        views = self._row_views(layer) if host else None
        for r, s, ln in zip(starts.tolist(), dst.tolist(), lengths.tolist(), strict=True):
            p, off = divmod(r, pr)
            if host and (ln < HOST_PARALLEL_ROWS or not parallel):
                buf[s : s + ln] = views[p][off : off + ln]
            else:
                data[s : s + ln].copy_(pages[p][off : off + ln], non_blocking=non_blocking)

    def _gather(
        self, layer: int, into: DeviceBuffer, rows: np.ndarray, dst: np.ndarray, stats: FetchStats
    ) -> None:
        """One gather per page touched (never for CPU-to-CPU whole rows, which are all runs):
        across devices through one pinned staging copy."""
        cap = into.capacity
        pr = self._page_rows_of(layer)
        pages = rows // pr
        order = np.argsort(pages, kind="stable")
        rows, dst, pages = rows[order], dst[order], pages[order]
        bounds = np.flatnonzero(np.concatenate(([True], pages[1:] != pages[:-1], [True])))
        stats.copies += len(bounds) - 1
        cross_device = self.device != into.device
        k = rows.size
        unit_shape = into.data.shape[1:] if into.groups == 1 else (2, into.data.shape[3])
        staged = self._staging(into, (k, *unit_shape)) if cross_device else None
        groups, slots = np.divmod(dst, cap)
        local = torch.from_numpy(rows % pr)
        for a, b in zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True):
            page = self.pages[layer][int(pages[a])]
            loc = local[a:b].to(page.device)
            c = b - a
            if into.groups == 1:
                if staged is not None:
                    torch.index_select(page, 0, loc, out=staged[a:b])
                elif _consecutive(dst[a:b]):  # straight into the slots
                    s0 = int(slots[a])
                    torch.index_select(page, 0, loc, out=into.data[s0 : s0 + c])
                else:
                    into.data.index_copy_(0, self._index(slots[a:b], into.device), page.index_select(0, loc))
            else:
                gathered = page.permute(2, 0, 1, 3)[self._index(groups[a:b], page.device), loc]
                if staged is not None:
                    staged[a:b] = gathered
                else:
                    into.data.permute(2, 0, 1, 3)[
                        self._index(groups[a:b], into.device), self._index(slots[a:b], into.device)
                    ] = gathered
        if staged is not None:
            dev = staged.to(into.device, non_blocking=True)
            self._unit_views(into, into.data)[
                self._index(groups, into.device), self._index(slots, into.device)
            ] = dev
            stats.copies += 1

    def _staging(self, into: DeviceBuffer, shape: tuple[int, ...]) -> torch.Tensor:
        """A pinned host tensor of ``shape`` for one fetch (waits until the last fetch's copy is done)."""
        if into.ready is not None:
            into.ready.synchronize()
        numel = 1
        for s in shape:
            numel *= s
        if into.staging is None or into.staging.numel() < numel:
            into.staging = torch.empty(max(numel, into.data.numel()), dtype=into.data.dtype, pin_memory=True)
        return into.staging[:numel].view(shape)
