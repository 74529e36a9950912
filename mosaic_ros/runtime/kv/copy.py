"""Copy engines: how rows of a ``PagePool`` reach a ``DeviceBuffer``, and what that cost.

``HostKVStore.fetch`` plans a fetch (which rows are resident in the buffer, which slots the
others take, which rows move inside the buffer); a copy engine carries the plan out and owns
everything device-specific about it: streams, events, staging memory and timing.

- ``HostCopyEngine``: host pages into a buffer in host memory (a CPU "device"). Whole rows go
  by runs of at least ``HOST_RUN_MIN_ROWS`` rows, each run one copy (numpy row views, or
  torch's threaded ``copy_`` for long ones); rows of shorter runs are gathered into their slots
  by a compiled row loop, one call per page touched. Per-head units are copied by a compiled loop
  over int64-word views. Copies are synchronous: their time is wall time.
- ``CudaCopyEngine``: pages (pinned host memory, or on the device itself) into a buffer on a
  CUDA device. Runs of at least ``run_min_rows`` rows are copied one copy per run, shorter ones
  gathered per page into one pinned staging tensor and sent with one copy. From host memory the
  copies are issued without blocking on a side stream of the buffer's own device (one stream
  per device index, so buffers on any GPU are served by a stream of that GPU), framed by two
  timing events; with ``wait`` the buffer's device's compute stream waits on the end event.
  Staging tensors are per buffer, pinned, reused, and counted (``staging_bytes``).

Timing (``FetchStats``): ``copy_ms`` is host wall time inside the copy calls (on CUDA the time
to issue them), the same meaning on every engine; ``events`` are the (start, end) events on the
copy stream, whose elapsed time is the copies' own device time (``device_ms``). On a CPU the
device time is the host time.
"""

from __future__ import annotations

import time
import weakref
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from itertools import pairwise

import numpy as np
import torch

from mosaic_ros.runtime.kv.buffer import DeviceBuffer
from mosaic_ros.runtime.kv.plan import copy_runs, gather_heads, gather_rows, write_slot_meta
from mosaic_ros.runtime.kv.pool import PagePool

# host-to-host runs at least this long are copied by torch (split across its intra-op threads),
# shorter ones by numpy (a single thread, but about a microsecond less per call)
HOST_PARALLEL_ROWS = 64
# host-to-host runs shorter than this are gathered (a compiled row loop per page touched)
# instead of copied one Python call each (~1.3 us a run): a window that slides through a
# chunk laid out cluster by cluster gets its new rows in ~100 runs of 1-3 rows per layer
HOST_RUN_MIN_ROWS = 16

_NO_SESSION = nullcontext()


@dataclass
class FetchStats:
    """What one ``fetch`` moved. ``bytes_moved``/``copies`` count host->device KV traffic only.

    ``tokens_reused`` were already resident in the buffer (not copied again); ``device_moves``
    counts rows shifted inside the buffer. ``copy_ms``: host wall time inside the copy calls (on
    CUDA, issuing them); the rest of a fetch's time is planning. ``events``: (start, end) CUDA
    events on the copy stream when the copies are asynchronous (``device_ms`` reads them).
    ``disk_ms``/``disk_bytes``: wall time inside the file reads of rows on spilled pages (disk
    tier), and the bytes those reads took from the files.
    """

    copies: int = 0
    bytes_moved: int = 0
    tokens_copied: int = 0
    tokens_reused: int = 0
    device_moves: int = 0
    copy_ms: float = 0.0
    events: tuple | None = None
    disk_ms: float = 0.0
    disk_bytes: int = 0

    def device_ms(self) -> float:
        """The copies' time on the device (waits for them on CUDA); ``copy_ms`` when synchronous."""
        if self.events is None:
            return self.copy_ms
        start, end = self.events
        end.synchronize()
        return start.elapsed_time(end)


def _consecutive(values: np.ndarray) -> bool:
    """Whether ``values`` (k >= 1,) are v, v + 1, ..., v + k - 1 in this order."""
    return values.size == 1 or bool((np.diff(values) == 1).all())


def _index(values: np.ndarray, device: torch.device) -> torch.Tensor:
    """An int64 index tensor on ``device`` from a host numpy array."""
    t = torch.from_numpy(np.ascontiguousarray(values, dtype=np.int64))
    return t if device.type == "cpu" else t.to(device, non_blocking=True)


def page_segments(pages: np.ndarray) -> list[tuple[int, int]]:
    """(start, end) of each maximal stretch of equal values in ``pages`` (k,), in order."""
    bounds = np.flatnonzero(np.concatenate(([True], pages[1:] != pages[:-1], [True]))).tolist()
    return list(pairwise(bounds))


def _words(raw: np.ndarray) -> np.ndarray:
    """A uint8 array's last axis as int64 words (the compiled copies move them ~2x faster than
    bytes), or the bytes themselves where that axis is not a multiple of 8 long."""
    return raw.view(np.int64) if raw.shape[-1] % 8 == 0 else raw


def _word_units(tensor: torch.Tensor) -> np.ndarray:
    """A contiguous CPU tensor (rows, 2, H_kv, D) as a numpy view (rows, 2, H_kv, W) of ``_words``."""
    return _words(tensor.view(torch.uint8).numpy())


def _word_rows(tensor: torch.Tensor) -> np.ndarray:
    """A contiguous CPU tensor (rows, ...) as a numpy view (rows, W) of ``_words``."""
    return _words(tensor.view(torch.uint8).numpy().reshape(tensor.shape[0], -1))


def _unit_views(into: DeviceBuffer, tensor: torch.Tensor) -> torch.Tensor:
    """(rows, 2, H, D) -> (G, rows, ...) so that a flat (group, slot) index addresses one unit."""
    if into.groups == 1:
        return tensor[None]
    return tensor.permute(2, 0, 1, 3)


class CopyEngine:
    """Carries out a fetch's copies into buffers of one kind of device (see the module docstring).

    ``run_min_rows``: whole-row runs at least this long are copied one copy per run, shorter
    ones gathered (one gather per page).
    """

    def __init__(self, run_min_rows: int):
        self.run_min_rows = run_min_rows

    def session(self, into: DeviceBuffer, stats: FetchStats, wait: bool = True):
        """Context for one fetch's copies into ``into``; nothing to set up by default."""
        return _NO_SESSION

    @property
    def staging_bytes(self) -> int:
        """Host bytes held for staging copies (pinned)."""
        return 0

    def copy_in(
        self,
        pool: PagePool,
        layer: int,
        into: DeviceBuffer,
        rows: np.ndarray,
        dst: np.ndarray,
        stats: FetchStats,
    ) -> None:
        """Rows (k,) of ``layer`` on pages in memory into flat buffer slots ``dst`` (k,)
        (group * capacity + slot), group-major, rows sorted per group."""
        if into.groups == 1:
            starts, slots, lengths = copy_runs(
                np.ascontiguousarray(rows, dtype=np.int64),
                np.ascontiguousarray(dst, dtype=np.int64),
                pool.rows_per_page(layer),
            )
            long = lengths >= self._min_run()
            if long.any():
                t0 = time.perf_counter()
                self._copy_runs(pool, layer, into, starts[long], slots[long], lengths[long])
                stats.copy_ms += (time.perf_counter() - t0) * 1e3
                stats.copies += int(long.sum())
                if long.all():
                    return
                short = ~np.repeat(long, lengths)
                rows, dst = rows[short], dst[short]
        t0 = time.perf_counter()
        self._gather(pool, layer, into, rows, dst, stats)
        stats.copy_ms += (time.perf_counter() - t0) * 1e3

    def put(self, into: DeviceBuffer, dst: np.ndarray, data: torch.Tensor, stats: FetchStats) -> None:
        """Host rows ``data`` (k, 2, H_kv, D) into flat slots ``dst`` (k,) with one copy (for a
        per-head buffer, each slot takes its own head of its row)."""
        t0 = time.perf_counter()
        groups, slots = np.divmod(dst, into.capacity)
        to_slots = _index(slots, into.device)
        if into.groups == 1:
            into.data[to_slots] = data.to(into.device)
        else:
            unit = data.permute(2, 0, 1, 3)[torch.from_numpy(groups), torch.arange(dst.size)]
            into.data.permute(2, 0, 1, 3)[_index(groups, into.device), to_slots] = unit.to(into.device)
        stats.copy_ms += (time.perf_counter() - t0) * 1e3
        stats.copies += 1

    def move_slots(self, into: DeviceBuffer, src: np.ndarray, dst: np.ndarray) -> None:
        """Flat slots ``src`` (k,) -> ``dst`` (k,) inside the buffer: data, token ids, positions."""
        cap = into.capacity
        dev_src, dev_dst = _index(src, into.device), _index(dst, into.device)
        view = _unit_views(into, into.data)
        view[dev_dst // cap, dev_dst % cap] = view[dev_src // cap, dev_src % cap]
        into.slot_ids.view(-1)[dev_dst] = into.slot_ids.view(-1)[dev_src]
        host_ids = into.slot_tokens.reshape(-1)
        host_ids[dst] = host_ids[src]
        flat_pos = into.slot_pos.view(into.slot_pos.shape[0], -1)
        flat_pos[:, dev_dst] = flat_pos[:, dev_src]

    def write_slot_meta(
        self,
        into: DeviceBuffer,
        rows: np.ndarray,
        dst: np.ndarray,
        row_token: np.ndarray,
        positions: np.ndarray,
    ) -> None:
        """Token ids and positions of host ``rows`` (k,) into flat slots ``dst`` (k,); ``row_token``
        (R,) is the layer's row -> id map, ``positions`` (P, capacity) every token's positions."""
        ids = row_token[rows]
        dev_dst = _index(dst, into.device)
        into.slot_ids.view(-1)[dev_dst] = _index(ids, into.device)
        into.slot_tokens.reshape(-1)[dst] = ids
        pos = torch.from_numpy(positions[:, ids]).to(into.device, non_blocking=True)
        into.slot_pos.view(positions.shape[0], -1)[:, dev_dst] = pos

    # ------------------------------------------------------------------ hooks
    def _min_run(self) -> int:
        return self.run_min_rows

    def _copy_runs(
        self,
        pool: PagePool,
        layer: int,
        into: DeviceBuffer,
        starts: np.ndarray,
        dst: np.ndarray,
        lengths: np.ndarray,
    ) -> None:
        """One copy per run: rows [starts[i], starts[i] + lengths[i]) (within one page) into buffer
        slots from dst[i]."""
        pr = pool.rows_per_page(layer)
        pages = pool.pages[layer]
        non_blocking = into.device.type == "cuda"
        for r, s, ln in zip(starts.tolist(), dst.tolist(), lengths.tolist(), strict=True):
            p, off = divmod(r, pr)
            into.data[s : s + ln].copy_(pages[p][off : off + ln], non_blocking=non_blocking)

    def _gather(
        self,
        pool: PagePool,
        layer: int,
        into: DeviceBuffer,
        rows: np.ndarray,
        dst: np.ndarray,
        stats: FetchStats,
    ) -> None:
        """One gather per page touched, straight into the buffer's slots."""
        self._gather_pages(pool, layer, into, rows, dst, stats, staged=None)

    def _gather_pages(
        self,
        pool: PagePool,
        layer: int,
        into: DeviceBuffer,
        rows: np.ndarray,
        dst: np.ndarray,
        stats: FetchStats,
        staged: torch.Tensor | None,
    ) -> None:
        """One gather per page touched: straight into the slots or, with ``staged`` (k, unit...)
        given, into it (rows ordered by page) and from there to the slots with one copy."""
        cap = into.capacity
        pr = pool.rows_per_page(layer)
        pages = rows // pr
        order = np.argsort(pages, kind="stable")
        rows, dst, pages = rows[order], dst[order], pages[order]
        segments = page_segments(pages)
        stats.copies += len(segments)
        groups, slots = np.divmod(dst, cap)
        local = torch.from_numpy(rows % pr)
        for a, b in segments:
            page = pool.pages[layer][int(pages[a])]
            loc = local[a:b].to(page.device)
            if into.groups == 1:
                if staged is not None:
                    torch.index_select(page, 0, loc, out=staged[a:b])
                elif _consecutive(dst[a:b]):  # straight into the slots
                    s0 = int(slots[a])
                    torch.index_select(page, 0, loc, out=into.data[s0 : s0 + b - a])
                else:
                    into.data.index_copy_(0, _index(slots[a:b], into.device), page.index_select(0, loc))
            else:
                gathered = page.permute(2, 0, 1, 3)[_index(groups[a:b], page.device), loc]
                if staged is not None:
                    staged[a:b] = gathered
                else:
                    into.data.permute(2, 0, 1, 3)[
                        _index(groups[a:b], into.device), _index(slots[a:b], into.device)
                    ] = gathered
        if staged is not None:
            dev = staged.to(into.device, non_blocking=True)
            _unit_views(into, into.data)[_index(groups, into.device), _index(slots, into.device)] = dev
            stats.copies += 1


class HostCopyEngine(CopyEngine):
    """Host pages into a buffer in host memory (see the module docstring)."""

    def move_slots(self, into: DeviceBuffer, src: np.ndarray, dst: np.ndarray) -> None:
        if into.groups > 1:
            heads, src_slots = np.divmod(src, into.capacity)
            units = _word_units(into.data)
            gather_heads(units, src_slots, heads, dst % into.capacity, units)  # sources >= n > targets
        else:
            buf = into.host_rows()
            buf[dst] = buf[src]
        ids = into.slot_ids.numpy().reshape(-1)
        ids[dst] = ids[src]
        pos = into.slot_pos.numpy().reshape(into.slot_pos.shape[0], -1)
        pos[:, dst] = pos[:, src]

    def write_slot_meta(
        self,
        into: DeviceBuffer,
        rows: np.ndarray,
        dst: np.ndarray,
        row_token: np.ndarray,
        positions: np.ndarray,
    ) -> None:
        write_slot_meta(
            np.ascontiguousarray(rows, dtype=np.int64),
            np.ascontiguousarray(dst, dtype=np.int64),
            np.ascontiguousarray(row_token),
            positions,
            into.slot_ids.numpy().reshape(-1),
            into.slot_pos.numpy().reshape(positions.shape[0], -1),
        )

    def _min_run(self) -> int:
        return HOST_RUN_MIN_ROWS

    def _gather(
        self,
        pool: PagePool,
        layer: int,
        into: DeviceBuffer,
        rows: np.ndarray,
        dst: np.ndarray,
        stats: FetchStats,
    ) -> None:
        if into.groups == 1:
            # one compiled copy per page touched, row by row into the slots
            pr = pool.rows_per_page(layer)
            pages = rows // pr
            order = np.argsort(pages, kind="stable")
            rows, dst, pages = rows[order], dst[order], pages[order]
            out = _word_rows(into.data)
            segments = page_segments(pages)
            for a, b in segments:
                page = _word_rows(pool.pages[layer][int(pages[a])])
                gather_rows(page, np.ascontiguousarray(rows[a:b] % pr), np.ascontiguousarray(dst[a:b]), out)
            stats.copies += len(segments)
            return
        # per head: one compiled copy per page touched (torch's indexing of the (G, slot) units of
        # permuted views costs tens of microseconds per layer)
        pr = pool.rows_per_page(layer)
        pages = rows // pr
        segments = page_segments(pages)
        heads, slots = np.divmod(dst, into.capacity)
        out = _word_units(into.data)
        for a, b in segments:
            page = _word_units(pool.pages[layer][int(pages[a])])
            gather_heads(page, rows[a:b] % pr, heads[a:b], slots[a:b], out)
        stats.copies += len(segments)

    def _copy_runs(
        self,
        pool: PagePool,
        layer: int,
        into: DeviceBuffer,
        starts: np.ndarray,
        dst: np.ndarray,
        lengths: np.ndarray,
    ) -> None:
        # torch's copy_ of a long slice splits it across the intra-op threads (about twice a
        # single-threaded copy's bandwidth), but costs microseconds more per call than a numpy
        # copy: short runs, and every run when torch has one thread, go through numpy
        pr = pool.rows_per_page(layer)
        pages = pool.pages[layer]
        buf = into.host_rows()
        views = pool.row_views(layer)
        parallel = torch.get_num_threads() > 1
        for r, s, ln in zip(starts.tolist(), dst.tolist(), lengths.tolist(), strict=True):
            p, off = divmod(r, pr)
            if ln < HOST_PARALLEL_ROWS or not parallel:
                buf[s : s + ln] = views[p][off : off + ln]
            else:
                into.data[s : s + ln].copy_(pages[p][off : off + ln])


class CudaCopyEngine(CopyEngine):
    """Pages (pinned host memory, or on a CUDA device) into buffers on CUDA devices."""

    def __init__(self, run_min_rows: int, pool_device: torch.device):
        super().__init__(run_min_rows)
        self.from_host = pool_device.type == "cpu"
        self._streams: dict[int, torch.cuda.Stream] = {}
        # per buffer: its pinned staging tensor and the event after which it may be rewritten
        self._staging: weakref.WeakKeyDictionary[DeviceBuffer, list] = weakref.WeakKeyDictionary()

    def stream(self, device: torch.device) -> torch.cuda.Stream:
        """The side stream that copies into buffers on ``device`` (made on that device, once)."""
        index = device.index if device.index is not None else torch.cuda.current_device()
        side = self._streams.get(index)
        if side is None:
            side = torch.cuda.Stream(device=torch.device("cuda", index))
            self._streams[index] = side
        return side

    def session(self, into: DeviceBuffer, stats: FetchStats, wait: bool = True):
        if not self.from_host:
            return _NO_SESSION  # device pages: copies are ordinary kernels on the compute stream
        return self._side_session(into, stats, wait)

    @contextmanager
    def _side_session(self, into: DeviceBuffer, stats: FetchStats, wait: bool):
        with torch.cuda.device(into.device):
            side = self.stream(into.device)
            compute = torch.cuda.current_stream(into.device)
            side.wait_stream(compute)
            events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            with torch.cuda.stream(side):
                events[0].record(side)
                yield
                events[1].record(side)
            entry = self._staging.get(into)
            if entry is not None:
                entry[1] = events[1]
            if wait:
                compute.wait_event(events[1])
        stats.events = events

    @property
    def staging_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t, _ in self._staging.values())

    def _gather(
        self,
        pool: PagePool,
        layer: int,
        into: DeviceBuffer,
        rows: np.ndarray,
        dst: np.ndarray,
        stats: FetchStats,
    ) -> None:
        """Across devices through one pinned staging copy; on the device itself straight in."""
        staged = None
        if pool.device != into.device:
            unit_shape = into.data.shape[1:] if into.groups == 1 else (2, into.data.shape[3])
            staged = self._stage(into, (rows.size, *unit_shape))
        self._gather_pages(pool, layer, into, rows, dst, stats, staged)

    def _stage(self, into: DeviceBuffer, shape: tuple[int, ...]) -> torch.Tensor:
        """A pinned host tensor of ``shape`` for one fetch (waits until the last fetch's copy is done)."""
        entry = self._staging.get(into)
        if entry is not None and entry[1] is not None:
            entry[1].synchronize()
        numel = int(np.prod(shape))
        if entry is None or entry[0].numel() < numel:
            tensor = torch.empty(max(numel, into.data.numel()), dtype=into.data.dtype, pin_memory=True)
            entry = [tensor, None]
            self._staging[into] = entry
        return entry[0][:numel].view(shape)
