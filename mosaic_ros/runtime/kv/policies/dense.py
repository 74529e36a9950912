"""``dense``: every stored token on the device, every question attends to all of them (the reference).

The store's single contiguous arena per layer lives on the compute device, so a question's
context is a view of it: no selection, no transfer. A question's time window still
restricts the context (sinks always kept), by a gather on the device.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from mosaic_ros.runtime.kv.policies.base import Selection, StoreBackedPolicy
from mosaic_ros.runtime.kv.policy import KVContext, register_policy
from mosaic_ros.runtime.kv.store import FetchStats, HostKVStore


@register_policy
class DensePolicy(StoreBackedPolicy):
    """All tokens, device-resident. ``host_kv_bytes`` is 0: the arena is counted as device KV.

    ``options['reserve_tokens']``: initial arena size in tokens per layer (it doubles when full,
    copying; a caller that knows the stream's length avoids those copies)."""

    name = "dense"
    bounded = False  # every token, whatever the budget
    reserves_question_buffers = False  # attends over its own arena, no retrieval buffers
    option_defaults: ClassVar[dict[str, Any]] = {"reserve_tokens": 0}

    def _new_store(self) -> HostKVStore:
        if self.config.disk_cap_bytes:
            raise ValueError(
                "policy 'dense' attends to every token on the compute device: it has no disk tier "
                "(set disk_cap_bytes to 0)"
            )
        reserve = int(self.options["reserve_tokens"])
        if reserve < 0:
            raise ValueError(f"reserve_tokens must be >= 0, got {reserve}")
        return HostKVStore(
            self.geometry,
            page_rows=max(self.page_rows, min(reserve, self.max_rows or reserve)),
            max_rows=self.max_rows,
            device=self.device,
            contiguous=True,
        )

    def reset(self) -> None:
        super().reset()
        self._meta_cache: dict[int, tuple[tuple[int, int], torch.Tensor, torch.Tensor]] = {}

    def append(self, layer: int, keys: torch.Tensor, values: torch.Tensor, token_ids: torch.Tensor) -> None:
        super().append(layer, keys, values, token_ids)
        self._track_device()

    def _after_eviction(self) -> None:
        for layer in range(self.geometry.num_layers):
            self.store.compact(layer)

    def _all_tokens(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids (n,) on the device, positions (P, n) on the device) of every allocated row."""
        store = self.store
        key = (store.layout_version(layer), store.allocated_rows(layer))
        cached = self._meta_cache.get(layer)
        if cached is None or cached[0] != key:
            ids = store.tokens_at(layer)
            pos = store.positions[:, ids]
            cached = (key, ids.to(self.device), pos.to(self.device))
            self._meta_cache[layer] = cached
        return cached[1], cached[2]

    def select(self, layer: int, query: torch.Tensor) -> Selection:
        """Every row (no time window), or the rows stamped inside it plus the sinks."""
        store = self.store
        if self._window is None:
            return Selection(rows=torch.arange(store.allocated_rows(layer)))
        base, rest = self.split_candidates(layer, store.num_tokens)
        return self.selection(layer, torch.sort(torch.cat((base, rest))).values)

    def materialize(self, layer: int, sel: Selection) -> tuple[KVContext, FetchStats]:
        """A view of the arena (every row), or a gather on the device (a time window): no transfer."""
        return self._context(layer, None if self._window is None else sel.rows), FetchStats()

    def _context(self, layer: int, rows: torch.Tensor | None = None) -> KVContext:
        """Attention's context over ``rows`` of the arena (None: every row, as a view)."""
        store = self.store
        h = self.geometry.num_kv_heads
        arena = store.arena(layer)
        if rows is None:
            data = arena
            ids, pos = self._all_tokens(layer)
        else:
            data = arena.index_select(0, rows.to(self.device))
            ids = store.tokens_at(layer, rows)
            pos = store.positions[:, ids].to(self.device)
            ids = ids.to(self.device)
        n = ids.numel()
        return KVContext(
            keys=data[:, 0].permute(1, 0, 2),
            values=data[:, 1].permute(1, 0, 2),
            positions=pos[:, None, :].expand(-1, h, n),
            token_ids=ids[None, :].expand(h, n),
        )

    def predict_next(self, layer: int, query: torch.Tensor, sel: Selection) -> None:
        """No prefetch: every token is on the device already."""
        return None

    def ingest_context(self, layer: int) -> KVContext | None:
        self._check_layer(layer)
        if self.store.allocated_rows(layer) == 0:
            return None
        return self._context(layer)

    def device_kv_bytes(self) -> int:
        return self.store.host_kv_bytes

    def memory(self):
        stats = super().memory()
        stats.host_kv_bytes = 0
        return stats
