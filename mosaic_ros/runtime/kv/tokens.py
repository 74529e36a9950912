"""``TokenTable``: what the store knows about tokens, apart from their K/V bytes.

Token facts (``TokenMeta``: positions, stamps, modality, frame) are shared by all layers and
indexed by logical token id (dense int64 in append order, never reused). Per layer the table
keeps the two maps between ids and physical rows of that layer's pages (``row_token``: (R,)
id per row, -1 free; ``token_row``: (N,) row per id, -1 not held), the end of the allocated
rows (``high``), how many rows hold a token (``live``), a layout version bumped whenever a
held token changes row or leaves (device buffers holding rows of the layer are then stale)
and ``appended_upto`` (one past the largest id ever placed in the layer).

The table owns no K/V: ``HostKVStore`` pairs it with a ``PagePool`` and keeps the two in step.
Its read methods return new tensors or views callers must not write to.
"""

from __future__ import annotations

import torch

from mosaic_ros.runtime.kv.policy import TokenMeta


class TokenTable:
    """Token facts and per-layer id <-> row maps (see the module docstring)."""

    def __init__(self, position_dims: int, num_layers: int):
        self.position_dims = position_dims
        self.num_tokens = 0
        self._positions = torch.zeros(position_dims, 0, dtype=torch.int64)
        self._stamps = torch.zeros(0, dtype=torch.float64)
        self._modality = torch.zeros(0, dtype=torch.uint8)
        self._frame = torch.zeros(0, dtype=torch.int64)
        self._layers_holding = torch.zeros(0, dtype=torch.int16)
        self.row_token: list[torch.Tensor] = [torch.zeros(0, dtype=torch.int64) for _ in range(num_layers)]
        self.token_row: list[torch.Tensor] = [torch.zeros(0, dtype=torch.int64) for _ in range(num_layers)]
        self.high = [0] * num_layers
        self.live = [0] * num_layers
        self.version = [0] * num_layers
        self.appended_upto = [0] * num_layers

    # ------------------------------------------------------------------ facts
    @property
    def positions(self) -> torch.Tensor:
        """(P, N) int64 rotary positions of every token ever added."""
        return self._positions[:, : self.num_tokens]

    @property
    def all_positions(self) -> torch.Tensor:
        """(P, capacity) int64: ``positions`` and the unused capacity after it (for compiled loops)."""
        return self._positions

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

    def add(self, meta: TokenMeta) -> torch.Tensor:
        """Register a chunk's token facts; returns their ids (T,) int64."""
        if meta.positions.shape[0] != self.position_dims:
            raise ValueError(
                f"positions have {meta.positions.shape[0]} components, geometry expects {self.position_dims}"
            )
        t = meta.num_tokens
        start = self.num_tokens
        self._grow(start + t)
        sl = slice(start, start + t)
        self._positions[:, sl] = meta.positions.to("cpu", torch.int64)
        self._stamps[sl] = meta.stamps.to("cpu", torch.float64)
        self._modality[sl] = meta.modality.to("cpu", torch.uint8)
        self._frame[sl] = meta.frame.to("cpu", torch.int64)
        self.num_tokens = start + t
        return torch.arange(start, start + t, dtype=torch.int64)

    def _grow(self, need: int) -> None:
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

    # ------------------------------------------------------------------ maps, read
    def rows_of(self, layer: int, token_ids: torch.Tensor) -> torch.Tensor:
        """Rows (same shape as ``token_ids``) of the tokens in ``layer``, -1 where not held."""
        return self.token_row[layer][: self.num_tokens][token_ids.to("cpu", torch.int64)]

    def tokens_at(self, layer: int, rows: torch.Tensor) -> torch.Tensor:
        """Token ids (same shape as ``rows``) held by ``rows`` of ``layer``, -1 for free rows."""
        return self.row_token[layer][rows.to("cpu", torch.int64)]

    def live_tokens(self, layer: int) -> torch.Tensor:
        """Ids (n,) int64, ascending, of the tokens ``layer`` holds."""
        if self.live[layer] == self.num_tokens:  # nothing evicted: every id, no scan
            return torch.arange(self.num_tokens)
        return torch.nonzero(self.token_row[layer][: self.num_tokens] >= 0).flatten()

    # ------------------------------------------------------------------ maps, write (the store)
    def resize_rows(self, layer: int, capacity: int) -> None:
        """Make ``row_token[layer]`` exactly ``capacity`` rows (new rows free; dropped rows must be)."""
        have = self.row_token[layer].numel()
        if capacity == have:
            return
        out = torch.full((capacity,), -1, dtype=torch.int64)
        keep = min(have, capacity)
        out[:keep] = self.row_token[layer][:keep]
        self.row_token[layer] = out

    def map(self, layer: int, token_ids: torch.Tensor, rows: torch.Tensor) -> None:
        """Newly placed tokens (T,) now live in free ``rows`` (T,)."""
        self.row_token[layer][rows] = token_ids
        self.token_row[layer][token_ids] = rows
        self._layers_holding[token_ids] += 1
        self.live[layer] += token_ids.numel()
        if token_ids.numel():
            self.appended_upto[layer] = max(self.appended_upto[layer], int(token_ids.max()) + 1)

    def remap(self, layer: int, token_ids: torch.Tensor, old: torch.Tensor, rows: torch.Tensor) -> None:
        """Held tokens (T,) moved from rows ``old`` to ``rows``."""
        self.row_token[layer][old] = -1
        self.row_token[layer][rows] = token_ids
        self.token_row[layer][token_ids] = rows
        self.version[layer] += 1

    def unmap(self, layer: int, token_ids: torch.Tensor) -> torch.Tensor:
        """Drop held tokens from ``layer``; returns the ids that were held (their rows become free)."""
        rows = self.rows_of(layer, token_ids)
        held = rows >= 0
        token_ids, rows = token_ids[held], rows[held]
        self.row_token[layer][rows] = -1
        self.token_row[layer][token_ids] = -1
        self._layers_holding[token_ids] -= 1
        self.live[layer] -= int(token_ids.numel())
        self.version[layer] += 1
        return token_ids
