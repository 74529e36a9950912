"""The clocks that deferred maintenance keeps its budget by (milliseconds).

Mosaic's maintenance (``MosaicPolicy.maintain``, ``ClusterIndex.maintain``) starts a split or a
seal only if its expected cost fits in the budget left, and learns those costs from what past
work cost. Which clock it reads decides what "cost" means:

- ``WallClock`` (the default, for a robot): milliseconds as they pass. Maintenance takes what
  a frame leaves of the CPU, whatever else the machine is doing, so two runs of one stream end
  with different clusters wherever the budget runs out.
- ``WorkClock`` (for benchmarks): milliseconds charged at a fixed cost per unit of work done
  (``COSTS_MS``), never read from a timer, so the same stream gets the same maintenance, and the
  same clusters, in every run and on every machine. The costs were measured on one machine
  (``WorkClock``): there a work budget of B ms does about the work of B ms of an idle CPU.

The maintenance code reads ``now_ms`` around its steps and calls ``charge`` for each step it
finishes; a wall clock ignores charges (the work took its time).
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from typing import ClassVar

CLOCKS = ("wall", "work")


class MaintenanceClock(ABC):
    """Milliseconds by which maintenance measures its own cost."""

    @abstractmethod
    def now_ms(self) -> float:
        """The clock's reading, ms (only differences mean anything)."""

    @abstractmethod
    def charge(self, work: str, units: int) -> None:
        """``units`` of ``work`` (a key of ``WorkClock.COSTS_MS``) were just done."""


class WallClock(MaintenanceClock):
    """Real time: the work's charges are the time it took."""

    def now_ms(self) -> float:
        return time.perf_counter() * 1e3

    def charge(self, work: str, units: int) -> None:
        """Nothing to add: the work has already taken its time."""


class WorkClock(MaintenanceClock):
    """Time as the sum of fixed costs of the work done (see the module docstring).

    ``COSTS_MS``: ms per unit, fitted (least squares, cost = fixed + per unit) to every split and
    seal of unbounded maintenance on three needle streams (SmolLM2: 30 layers, 3 KV heads x 64;
    3,813 splits, 1,674 seals) on a 2-core AMD EPYC VM with one torch thread: a split (the
    index's split and the extent's re-layout) and its member tokens, a seal and its rows, a
    layer visited (the checks every layer costs). Two are estimates, not fitted (too rare on
    those streams): a compacted row, and a cluster in a rebuild of the routing regions (about
    a millisecond per thousand clusters).
    """

    COSTS_MS: ClassVar[dict[str, float]] = {
        "split": 0.78,
        "split_token": 0.002,
        "seal": 0.79,
        "seal_row": 0.004,
        "layer": 0.23,
        "compact_row": 0.005,
        "region_cluster": 0.001,
    }

    def __init__(self) -> None:
        self._ms = 0.0

    def now_ms(self) -> float:
        return self._ms

    def charge(self, work: str, units: int) -> None:
        self._ms += self.COSTS_MS[work] * units


def make_clock(name: str) -> MaintenanceClock:
    """The clock named ``name`` (one of ``CLOCKS``)."""
    if name == "wall":
        return WallClock()
    if name == "work":
        return WorkClock()
    raise ValueError(f"maintain_clock must be one of {CLOCKS}, got {name!r}")
