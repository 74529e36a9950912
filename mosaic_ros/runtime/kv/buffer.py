"""``DeviceBuffer``: one layer's retrieved context on the compute device, reused across questions."""

from __future__ import annotations

import numpy as np
import torch

from mosaic_ros.runtime.kv.policy import KVContext, KVGeometry
from mosaic_ros.runtime.kv.pool import row_view


class DeviceBuffer:
    """A reusable device tensor holding one layer's retrieved context.

    data: (capacity, 2, H_kv, D) on ``device``. ``groups`` = 1 when all KV heads share one
    token selection (a slot holds a whole row), or H_kv when each head selects its own tokens
    (head h's token in slot s is ``data[s, :, h]``). After a fetch of n tokens per group the
    context is slots [0, n). Slot bookkeeping: ``slot_rows`` (G, capacity) int64 physical rows on
    the host (-1 empty), ``slot_ids`` (G, capacity) token ids and ``slot_pos`` (P, G, capacity)
    rotary positions on the device, ``slot_tokens`` (G, capacity) the same ids on the host (a
    view of ``slot_ids`` on a CPU buffer), by which the store re-points the slots after a move.
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
        self.slot_tokens = (
            self.slot_ids.numpy() if self.device.type == "cpu" else np.full((g, capacity), -1, dtype=np.int64)
        )
        self.count = 0
        self.layout_version = -1
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
