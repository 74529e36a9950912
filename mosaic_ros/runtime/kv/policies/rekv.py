"""``rekv``: ReKV-style frame-block retrieval by block-mean keys.

A block is one frame: the vision tokens of a frame plus the text that arrives with it in the
same chunk (its time marker); a text-only chunk (a question, an answer) is a block of its own.
The representative of a block is the mean pre-RoPE key of its live tokens, per KV head. A
question scores blocks (``units.LayerUnits.share``), takes the best blocks whole while they fit the
budget left after sinks + local window, and hands them over in time order. Blocks are
appended contiguously, so a fetch is a few long runs.
"""

from __future__ import annotations

import torch

from mosaic_ros.runtime.kv.policies.base import Selection, StoreBackedPolicy
from mosaic_ros.runtime.kv.policies.units import UnitMeans, take_units
from mosaic_ros.runtime.kv.policy import TokenMeta, register_policy


def chunk_blocks(meta: TokenMeta) -> tuple[torch.Tensor, int]:
    """Block index (T,) within a chunk (0-based) and the number of blocks.

    Each vision frame is a block; a text token joins the next frame of the chunk (or the
    previous one when it trails the last frame); a chunk without vision is one block.
    """
    vision = torch.nonzero(meta.modality == 1).flatten()
    t = meta.num_tokens
    if vision.numel() == 0:
        return torch.zeros(t, dtype=torch.int64), 1
    frames = meta.frame[vision].to(torch.int64)
    new_frame = torch.cat((torch.ones(1, dtype=torch.bool), frames[1:] != frames[:-1]))
    vision_block = torch.cumsum(new_frame.long(), 0) - 1
    nearest = torch.searchsorted(vision, torch.arange(t)).clamp_(max=vision.numel() - 1)
    return vision_block[nearest], int(vision_block[-1]) + 1


@register_policy
class ReKVPolicy(StoreBackedPolicy):
    """Top frame blocks by mean-key score, whole blocks in time order, plus sinks and local window."""

    name = "rekv"

    def reset(self) -> None:
        super().reset()
        self.blocks = UnitMeans(self.geometry)
        self._block_of = torch.zeros(0, dtype=torch.int64)
        self._num_blocks = 0

    def add_tokens(self, meta: TokenMeta) -> torch.Tensor:
        ids = super().add_tokens(meta)
        local, count = chunk_blocks(meta)
        need = int(ids[-1]) + 1 if ids.numel() else 0
        if self._block_of.numel() < need:
            grown = torch.full((max(need, 2 * self._block_of.numel()),), -1, dtype=torch.int64)
            grown[: self._block_of.numel()] = self._block_of
            self._block_of = grown
        self._block_of[ids] = local + self._num_blocks
        self._num_blocks += count
        return ids

    def append(self, layer: int, keys: torch.Tensor, values: torch.Tensor, token_ids: torch.Tensor) -> None:
        super().append(layer, keys, values, token_ids)
        self.blocks.add(layer, token_ids, self._block_of[token_ids], keys)

    def release(self, layer: int, token_ids: torch.Tensor) -> None:
        rows = self.store.rows_of(layer, token_ids)
        self.blocks.remove(layer, token_ids, self.store.read(layer, rows)[:, 0])
        super().release(layer, token_ids)

    def select(self, layer: int, query: torch.Tensor) -> Selection:
        base, rest = self.split_candidates(layer, self.config.budget_tokens)
        room = self.config.budget_tokens - base.numel()
        picked = take_units(rest, self.blocks.layer(layer), query, room)
        return self.selection(layer, torch.sort(torch.cat((base, picked))).values)

    def units(self) -> int:
        return self._num_blocks
