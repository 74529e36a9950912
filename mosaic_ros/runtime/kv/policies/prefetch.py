"""Cross-layer prefetch: start layer l+1's copy while layer l attends, fetch only the misses later.

``Prefetcher`` holds at most one pending prefetch, for the next layer. The caller predicts
that layer's rows on its own thread (selection work: small tensor ops and a short Python
loop, which would hold the GIL against the attention it is meant to overlap), then the copy
is issued:

- on CUDA on the calling thread: the store issues its copies on its side stream without
  making the compute stream wait (``fetch(..., wait=False)``), so they overlap the attention
  kernels queued for layer l; the true fetch of layer l+1 orders both;
- on CPU on one worker thread (torch copies release the GIL), so the copy of layer l+1
  overlaps layer l's attention when a core is free.

The result (``PrefetchResult``) is collected with ``join`` before anything reads the target
layer's buffer or changes the store: the policy joins at the start of every call
(``retrieve``, ``append``, ``maintain``, ``end_question``, ``reset``...), so the worker never
runs concurrently with a change of the state it reads, and no thread outlives a question
(``close`` shuts the worker down and waits for it).

Accounting is physical, the same on both devices: the predictor's time counts as selection,
the prefetch copy's time as transfer (CPU: its wall time on the worker; CUDA: its side-stream
events), its copies and bytes as traffic, whether or not they overlapped other work. The
benchmark's ``total_ms`` therefore never credits the overlap; it is an upper bound on latency.
Hit rate, in tokens: of the tokens a layer truly retrieves (sinks and local window excluded,
they are always known in advance), the share the prediction had fetched.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from mosaic_ros.runtime.kv.store import FetchStats


@dataclass
class PrefetchResult:
    """What one prefetch did for ``layer``: the rows it fetched beyond sinks + window (k,) int64,
    the predictor's and the fetch's milliseconds (CPU wall time) and the fetch's traffic."""

    layer: int
    predicted_rows: torch.Tensor
    predict_ms: float
    fetch_ms: float
    fetch: FetchStats


FetchFn = Callable[[torch.Tensor, bool], FetchStats]
"""``fetch(rows, wait)``: fetch ``rows`` into the target layer's buffer."""


class Prefetcher:
    """At most one pending prefetch; see the module docstring. ``threaded``: run jobs on a worker."""

    def __init__(self, threaded: bool):
        self.threaded = threaded
        self._executor: ThreadPoolExecutor | None = None
        self._pending: Future | PrefetchResult | None = None

    @property
    def pending(self) -> bool:
        """Whether a prefetch was started and not yet joined."""
        return self._pending is not None

    def start(
        self, layer: int, rows: torch.Tensor, predicted: torch.Tensor, predict_ms: float, fetch: FetchFn
    ) -> None:
        """Fetch ``rows`` (n,) for ``layer``; ``predicted`` (k,) are those beyond sinks + window and
        ``predict_ms`` what predicting them cost. Joins any earlier prefetch first (its result is
        dropped)."""
        self.join()

        def job() -> PrefetchResult:
            t0 = time.perf_counter()
            stats = fetch(rows, False)
            return PrefetchResult(layer, predicted, predict_ms, (time.perf_counter() - t0) * 1e3, stats)

        if not self.threaded:
            self._pending = job()
            return
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mosaic-prefetch")
        self._pending = self._executor.submit(job)

    def join(self) -> PrefetchResult | None:
        """Wait for the pending prefetch and return its result (None if there was none).

        A job's exception is raised here, in the caller's thread.
        """
        pending, self._pending = self._pending, None
        if isinstance(pending, Future):
            return pending.result()
        return pending

    def close(self) -> None:
        """Join the pending prefetch (dropping its result) and stop the worker thread."""
        try:
            self.join()
        finally:
            if self._executor is not None:
                self._executor.shutdown(wait=True)
                self._executor = None


def count_hits(true_rows: torch.Tensor, predicted_rows: torch.Tensor) -> int:
    """How many of ``true_rows`` (n,) int64 the prediction ``predicted_rows`` (k,) had fetched."""
    if true_rows.numel() == 0 or predicted_rows.numel() == 0:
        return 0
    return int(torch.isin(true_rows, predicted_rows).sum())
