"""``PagePool``: the pages that hold one stream's K/V rows, per layer, and where they live.

A row is one token's K and V of one layer, (2, H_kv, D) (``row[0]`` the pre-RoPE key,
``row[1]`` the value). A layer's rows [0, capacity) live in pages of ``page_rows`` rows
((page_rows, 2, H_kv, D) tensors, pinned when asked), so row ``r`` is row ``r % page_rows``
of page ``r // page_rows`` and growing a layer adds a page instead of copying what is stored.
A ``contiguous`` pool keeps one page per layer that doubles when full (the device-resident
``dense`` reference uses it so its context is a view, not a gather).

The pool knows rows, not tokens: which row holds which token is the ``TokenTable``'s, and
``HostKVStore`` keeps both in step. It owns allocation of page tensors (from a ``PageReserve``
of pages faulted in ahead of need by a worker thread, when ``spare_pages`` > 0), reading and
writing rows, and the disk tier.

Disk tier. With ``disk_dir`` and ``resident_pages`` > 0 (a paged host pool only) at most
``resident_pages`` page tensors, all layers together, the page reserve's ready pages included,
are held in host memory; beyond that, a cold page is written to its layer's file
(``disk.PageFiles``) and its tensor reused for the page that needed the room. Cold = least
recently used: every write into a page, every read of it (``read``, ``iter_pages``, a fetch)
marks it used. Never spilled: the page holding a layer's last allocated row (where appends and
moves land); spilled only when no other page can be: pages holding a row of
``hot_rows(layer)`` (the policy's sinks and local window). A page never written (allocated
ahead of the tail) is spilled without a write and brought back without a read. Row ids do not
change: a spilled page keeps its rows; ``read`` and ``iter_pages`` read spilled rows from the
file into new tensors (``read_spilled``: one read per run of nearby rows), and a write into a
spilled page first reads the whole page back into memory, spilling another.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable
from functools import partial

import numpy as np
import torch

from mosaic_ros.runtime.kv.disk import PageFiles
from mosaic_ros.runtime.kv.pages import PageReserve
from mosaic_ros.runtime.kv.plan import copy_runs
from mosaic_ros.runtime.kv.policy import KVGeometry

HUGE_PAGE_BYTES = 2 * 2**20  # an x86-64 transparent huge page

# rows of a spilled page this close together are read in one call (the rows between come along)
DISK_MERGE_GAP_ROWS = 8


class StoreFullError(RuntimeError):
    """A layer cannot take more rows without exceeding its ``max_rows``; compress or evict first."""


def row_view(t: torch.Tensor) -> np.ndarray:
    """A CPU tensor (rows, ...), contiguous, as a numpy array of ``rows`` opaque byte rows sharing
    its memory: row copies through it are plain memcpys (torch's ``index_copy_`` moves 2 KiB
    rows several times slower on a CPU)."""
    rows = t.shape[0]
    nbytes = t[0].numel() * t.element_size() if rows else t.element_size()
    raw = t.reshape(rows, -1).view(torch.uint8).numpy()
    return raw.view(np.dtype((np.void, nbytes))).reshape(rows)


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


class PagePool:
    """Pages of rows for every layer (see the module docstring).

    ``allocated(layer) -> int``: one past the layer's last allocated row (its tail page is never
    spilled); ``hot_rows(layer) -> (n,) int64``: rows spilled only when nothing else can be.
    """

    def __init__(
        self,
        geometry: KVGeometry,
        *,
        page_rows: int,
        device: torch.device,
        pin: bool,
        contiguous: bool,
        spare_pages: int,
        max_rows: int,
        disk_dir: str,
        resident_pages: int,
        allocated: Callable[[int], int],
        hot_rows: Callable[[int], torch.Tensor] | None,
    ):
        self.geometry = geometry
        self.page_rows = page_rows
        self.device = device
        self.pin = pin
        self.contiguous = contiguous
        self.max_rows = max_rows
        n_layers = geometry.num_layers
        self.pages: list[list[torch.Tensor | None]] = [[] for _ in range(n_layers)]
        # per layer, (page, row_view(page)) pairs for host pages: building a view costs microseconds
        # (tens of them right after attention has evicted the caches), a fetch touches a dozen pages
        self._views: list[list[tuple[torch.Tensor | None, np.ndarray | None]]] = [[] for _ in range(n_layers)]
        self._allocated = allocated
        self._hot_rows = hot_rows
        self.resident_pages = resident_pages
        self.files: PageFiles | None = None
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
            if contiguous or device.type != "cpu":
                raise ValueError("a disk tier needs a paged store in host memory")
            self.files = PageFiles(disk_dir, n_layers, page_rows * 2 * geometry.token_row_bytes)
        self.reserve: PageReserve | None = None
        if spare_pages > 0 and not contiguous and device.type == "cpu":
            make = partial(new_page, geometry, page_rows, device, pin)
            self.reserve = PageReserve(make, spare_pages)  # the factory holds no reference to the pool
            self._update_allowance()
            weakref.finalize(self, self.reserve.close)

    # ------------------------------------------------------------------ geometry
    def capacity(self, layer: int) -> int:
        """Rows allocated for ``layer`` (used or not, in memory or spilled)."""
        if self.contiguous:
            return sum(p.shape[0] for p in self.pages[layer])
        return len(self.pages[layer]) * self.page_rows

    def rows_per_page(self, layer: int) -> int:
        """The page size that cuts ``layer``'s rows (a contiguous pool: its one page)."""
        return self.pages[layer][0].shape[0] if self.contiguous and self.pages[layer] else self.page_rows

    def arena(self, layer: int) -> torch.Tensor:
        """A contiguous pool's single page of ``layer`` (capacity, 2, H_kv, D)."""
        if not self.contiguous:
            raise RuntimeError("arena() is for a contiguous store")
        if not self.pages[layer]:
            g = self.geometry
            return torch.zeros(0, 2, g.num_kv_heads, g.head_dim, dtype=g.dtype, device=self.device)
        return self.pages[layer][0]

    def row_views(self, layer: int) -> list[np.ndarray | None]:
        """``row_view`` of every page of ``layer`` (host pages; None for a spilled one), kept until
        the pages change."""
        pages, cached = self.pages[layer], self._views[layer]
        if len(cached) != len(pages) or (pages and cached[-1][0] is not pages[-1]):
            cached[:] = [(p, None if p is None else row_view(p)) for p in pages]
        return [v for _, v in cached]

    def spilled(self, layer: int) -> np.ndarray:
        """(pages,) bool: which pages of ``layer`` are on disk."""
        return np.fromiter((p is None for p in self.pages[layer]), dtype=bool, count=len(self.pages[layer]))

    def in_memory(self, layer: int, rows: torch.Tensor) -> bool:
        """Whether every page holding one of ``rows`` is in memory (marking them used)."""
        if self.files is None:
            return True
        pages = torch.unique(rows // self.page_rows).tolist()
        if any(self.pages[layer][p] is None for p in pages):
            return False
        self.touch(layer, pages)
        return True

    # ------------------------------------------------------------------ growth
    def _new_page(self, rows: int) -> torch.Tensor:
        return new_page(self.geometry, rows, self.device, self.pin)

    def ensure(self, layer: int, rows_needed: int, used: int) -> None:
        """Grow ``layer`` so that rows [0, rows_needed) exist; ``used`` rows are kept (a contiguous
        pool copies them into its doubled page)."""
        cap = self.capacity(layer)
        if rows_needed <= cap:
            return
        if self.contiguous:
            new_cap = max(rows_needed, 2 * cap, self.page_rows)
            if self.max_rows:
                new_cap = max(min(new_cap, self.max_rows), rows_needed)
            page = self._new_page(new_cap)
            if cap:
                page[:used] = self.pages[layer][0][:used]
            self.pages[layer] = [page]
            self._views[layer] = []
            return
        while self.capacity(layer) < rows_needed:
            self.pages[layer].append(self._page_tensor())
            self._used[layer].append(self._tick)
            self._blank[layer].add(len(self.pages[layer]) - 1)
        self._update_allowance()

    def shrink(self, layer: int, used: int) -> None:
        """Free the pages of ``layer`` past the first ``used`` rows (paged pool; ready pages go back
        to the reserve)."""
        if self.contiguous:
            return
        keep = -(-used // self.page_rows)
        spare = [p for p in self.pages[layer][keep:] if p is not None]
        del self.pages[layer][keep:]
        del self._used[layer][keep:]
        self._written[layer] = {p for p in self._written[layer] if p < keep}
        self._blank[layer] = {p for p in self._blank[layer] if p < keep}
        if self.files is not None:
            self._resident -= len(spare)
            self.files.truncate(layer, keep)
        if self.reserve is not None and spare:
            self._update_allowance()
            for page in spare:  # already faulted in: the next growth takes them first
                self.reserve.give(page)
        self._views[layer] = []

    def _update_allowance(self) -> None:
        """Under ``max_rows`` the reserve holds no more pages than the layers may still add; with
        the disk tier, no more than ``resident_pages`` leave room for."""
        if self.reserve is None or not self.max_rows:
            return
        per_layer = -(-self.max_rows // self.page_rows)
        room = sum(max(per_layer - len(p), 0) for p in self.pages)
        if self.files is not None:
            room = min(room, self.resident_pages - self._resident)
        self.reserve.set_allowance(room)

    # ------------------------------------------------------------------ rows
    def write(self, layer: int, rows: torch.Tensor, data: torch.Tensor) -> None:
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
            self.touch(layer, (p,))
            self._blank[layer].discard(p)
            self._write_runs(layer, rows[a:b], data[a:b])

    def _write_runs(self, layer: int, rows: torch.Tensor, data: torch.Tensor) -> None:
        """``write`` into pages in memory."""
        pr = self.rows_per_page(layer)
        first, last, n = int(rows[0]), int(rows[-1]), rows.numel()
        if last - first == n - 1 and first // pr == last // pr and bool((rows[1:] > rows[:-1]).all()):
            self.pages[layer][first // pr][first % pr : first % pr + n].copy_(data)
            return
        order = torch.argsort(rows)
        rows, data = rows[order], data[order]
        starts, lengths = contiguous_runs(rows, pr)
        offset = 0
        for s, ln in zip(starts.tolist(), lengths.tolist(), strict=True):
            page = self.pages[layer][s // pr]
            page[s % pr : s % pr + ln].copy_(data[offset : offset + ln])
            offset += ln

    def read(self, layer: int, rows: torch.Tensor, part: int | None = None) -> torch.Tensor:
        """Gather ``rows`` (n,) of ``layer`` as (n, 2, H_kv, D) (K then V), or with ``part`` 0 / 1
        only the keys / values as (n, H_kv, D) (half the bytes moved); one gather per page."""
        g = self.geometry
        shape = (rows.numel(), g.num_kv_heads, g.head_dim)
        if part is None:
            shape = (shape[0], 2, *shape[1:])
        out = torch.empty(shape, dtype=g.dtype, device=self.device)
        pr = self.rows_per_page(layer)
        pages, local = rows // pr, rows % pr
        touched = torch.unique(pages).tolist()
        for p in touched:
            sel = torch.nonzero(pages == p).flatten()
            page = self.pages[layer][p]
            if page is None:
                got = self.read_spilled(layer, p, local[sel].numpy())
                out[sel] = got if part is None else got[:, part]
            else:
                page = page if part is None else page[:, part]
                out[sel] = page.index_select(0, local[sel].to(self.device))
        self.touch(layer, touched)
        return out

    def iter_pages(self, layer: int, used: int):
        """Yield (first_row, rows (n, 2, H_kv, D)) over rows [0, used) of ``layer``, page by page:
        views of pages in memory, new tensors read from the file for spilled ones."""
        pr = self.rows_per_page(layer)
        for i, page in enumerate(self.pages[layer]):
            start = i * pr
            if start >= used:
                break
            n = min(pr, used - start)
            if page is None:
                yield start, self.read_spilled(layer, i, np.arange(n))
            else:
                self.touch(layer, (i,))
                yield start, page[:n]

    def copy_host(self, layer: int, src: np.ndarray, dst: np.ndarray) -> None:
        """Row ``src[i]`` -> row ``dst[i]`` of ``layer`` on host pages in memory, no row in both sets:
        one slice copy per run consecutive in both (cut at page ends), no intermediate tensor.

        Moves (sealing, compaction) read runs (a cluster's old extent, its rows of one frame in
        the ring) into fresh consecutive rows; copied as runs they go at memcpy speed, where a
        fancy-indexed copy of opaque rows costs several times as long per byte.
        """
        pr = self.rows_per_page(layer)
        order = np.argsort(dst, kind="stable")
        src = np.ascontiguousarray(src[order], dtype=np.int64)
        dst = np.ascontiguousarray(dst[order], dtype=np.int64)
        first, to, lengths = copy_runs(src, dst, pr)  # within one source page
        views = self.row_views(layer)
        for s, d, n in zip(first.tolist(), to.tolist(), lengths.tolist(), strict=True):
            while n:  # and within one destination page
                sp, so = divmod(s, pr)
                dp, do = divmod(d, pr)
                k = min(n, pr - do)
                views[dp][do : do + k] = views[sp][so : so + k]
                s, d, n = s + k, d + k, n - k
        self._blank[layer].difference_update(np.unique(dst // pr).tolist())

    # ------------------------------------------------------------------ disk tier
    def touch(self, layer: int, pages) -> None:
        """Mark ``pages`` (ints) of ``layer`` used now (disk tier: the spill order)."""
        if self.files is None:
            return
        self._tick += 1
        used = self._used[layer]
        for p in pages:
            used[p] = self._tick

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
        return self.reserve.take() if self.reserve is not None else self._new_page(self.page_rows)

    def _victim(self, keep: frozenset) -> tuple[int, int] | None:
        """The (layer, page) to spill: the least recently used page holding no hot row, else the
        least recently used hot one; never a layer's tail page, nor one of ``keep``."""
        best, best_key = None, None
        pr = self.page_rows
        for layer, pages in enumerate(self.pages):
            used_rows = self._allocated(layer)
            tail = (used_rows - 1) // pr if used_rows else -1
            hot: set[int] = set()
            if self._hot_rows is not None and used_rows:
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

    def read_spilled(self, layer: int, page: int, local: np.ndarray) -> torch.Tensor:
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

    # ------------------------------------------------------------------ accounting
    @property
    def host_bytes(self) -> int:
        """Bytes of every page tensor allocated, all layers (capacity, not used rows), and of the
        reserve's ready pages."""
        held = sum(p.numel() * p.element_size() for pages in self.pages for p in pages if p is not None)
        return held + (self.reserve.ready_bytes if self.reserve is not None else 0)

    @property
    def disk_bytes(self) -> int:
        """Bytes of the spilled pages that hold data in their files, all layers (0 without a disk tier)."""
        if self.files is None:
            return 0
        return sum(len(written) for written in self._written) * self.files.page_bytes

    @property
    def disk_bytes_read(self) -> int:
        """Bytes read from the disk tier's files since the pool was made (0 without one)."""
        return self.files.bytes_read if self.files is not None else 0

    def close(self) -> None:
        """Stop the page reserve's worker and remove the disk tier's files; the pool is unusable after."""
        if self.reserve is not None:
            self.reserve.close()
        if self.files is not None:
            self.files.close()
