"""``PageReserve``: host pages allocated and faulted in ahead of need, on a worker thread.

A new host page costs more than its allocation: the first write to each of its memory pages
traps into the kernel, which finds and zeroes physical memory for it. A growing store pays
that on the frame's path, in whichever write first lands on the page (an append, a sealing
move). On a virtual machine with transparent huge pages that first touch ran at 0.5-1.2
GB/s (``scripts/first_touch.py``), slower than copying the same bytes, so a stream that adds
~10 MB per frame spent 10-25 ms of each frame in page faults (docs/INGEST.md).

The reserve keeps up to ``spare`` pages ready: a worker thread allocates each with the
page factory and writes one byte per 4 KiB (numpy releases the GIL for that write, so the
faults are taken on another core while the caller goes on). ``take`` hands out a ready page,
or allocates one on the spot when none is ready (counted in ``cold``). ``give`` returns a
page the owner no longer needs (already faulted in) while the reserve is below ``spare``.
``set_allowance`` bounds how many more pages the owner may take (a host cap; the owner keeps
it current): the reserve never holds more than that, so its memory is memory the owner was
allowed to hold anyway.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable

import torch

_TOUCH_STRIDE = 4096  # bytes: one write per (small) memory page faults every one of them in


def fault_in(page: torch.Tensor) -> None:
    """Write one zero byte per 4 KiB of a CPU tensor's memory (so every memory page is mapped).

    A no-op for pinned tensors, whose memory the driver maps at allocation."""
    if page.device.type != "cpu" or page.is_pinned() or page.numel() == 0:
        return
    raw = page.reshape(-1).view(torch.uint8).numpy()
    raw[::_TOUCH_STRIDE] = 0
    raw[-1] = 0


class PageReserve:
    """Pages from ``make()`` prepared ahead by a worker thread; see the module docstring."""

    def __init__(self, make: Callable[[], torch.Tensor], spare: int):
        if spare < 0:
            raise ValueError(f"spare must be >= 0, got {spare}")
        self._make = make
        self.spare = spare
        self._ready: deque[torch.Tensor] = deque()
        self._making = 0  # pages the worker is preparing now
        self._allowance: int | None = None  # None: unbounded
        self._cond = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None
        self.ready_taken = 0  # pages handed out already faulted in
        self.cold = 0  # pages allocated on the caller's thread (none was ready)
        self.given = 0  # pages taken back from the owner
        self.failures = 0  # worker allocations that raised (e.g. out of memory); it stops trying

    # ------------------------------------------------------------------ owner side
    def take(self) -> torch.Tensor:
        """A page: a ready one if any, else one allocated now. Starts the worker on first use."""
        with self._cond:
            page = self._ready.popleft() if self._ready else None
            if page is not None:
                self.ready_taken += 1
            else:
                self.cold += 1
            self._trim()
            self._start()
            self._cond.notify()
        return page if page is not None else self._make()

    def give(self, page: torch.Tensor) -> bool:
        """Keep ``page`` (no longer used by the owner) for a later ``take`` if the reserve has room;
        returns whether it was kept."""
        with self._cond:
            if self._closed or len(self._ready) + self._making >= self._target():
                return False
            self._ready.append(page)
            self.given += 1
            return True

    def set_allowance(self, pages: int | None) -> None:
        """At most ``pages`` more pages will be taken (None: no bound); extra ready pages are dropped."""
        with self._cond:
            self._allowance = None if pages is None else max(int(pages), 0)
            self._trim()
            self._cond.notify()

    @property
    def ready(self) -> int:
        with self._cond:
            return len(self._ready)

    @property
    def ready_bytes(self) -> int:
        """Bytes held in ready pages (memory the owner holds but does not use yet)."""
        with self._cond:
            return sum(p.numel() * p.element_size() for p in self._ready)

    def wait_ready(self, pages: int, timeout: float = 10.0) -> bool:
        """Block until ``pages`` pages are ready (or the worker cannot make more); for tests and
        for callers that want the reserve full before a timed section."""
        with self._cond:
            self._start()
            self._cond.notify()
            return self._cond.wait_for(
                lambda: len(self._ready) >= min(pages, self._target()) or self.failures > 0 or self._closed,
                timeout,
            )

    def close(self) -> None:
        """Stop the worker and drop the ready pages."""
        with self._cond:
            self._closed = True
            self._ready.clear()
            self._cond.notify_all()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5.0)

    # ------------------------------------------------------------------ worker side
    def _target(self) -> int:
        if self._allowance is None:
            return self.spare
        return min(self.spare, self._allowance)

    def _trim(self) -> None:
        while len(self._ready) > self._target():
            self._ready.pop()

    def _start(self) -> None:
        if self._thread is None and not self._closed and self.spare > 0:
            self._thread = threading.Thread(target=self._run, name="kv-page-reserve", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(
                    lambda: (
                        self._closed
                        or (self.failures == 0 and len(self._ready) + self._making < self._target())
                    )
                )
                if self._closed:
                    return
                self._making += 1
            try:
                page = self._make()
                fault_in(page)
            except Exception:  # out of memory and the like: the owner allocates its pages itself
                with self._cond:
                    self._making -= 1
                    self.failures += 1
                    self._cond.notify_all()
                continue
            with self._cond:
                self._making -= 1
                if not self._closed and len(self._ready) < self._target():
                    self._ready.append(page)
                self._cond.notify_all()
