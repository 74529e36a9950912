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
from mosaic_ros.runtime.kv.policies.units import FrameBlocks, UnitMeans, take_units
from mosaic_ros.runtime.kv.policy import TokenMeta, register_policy


@register_policy
class ReKVPolicy(StoreBackedPolicy):
    """Top frame blocks by mean-key score, whole blocks in time order, plus sinks and local window."""

    name = "rekv"

    def reset(self) -> None:
        super().reset()
        self.blocks = UnitMeans(self.geometry)
        self.frame_blocks = FrameBlocks()

    def add_tokens(self, meta: TokenMeta) -> torch.Tensor:
        ids = super().add_tokens(meta)
        self.frame_blocks.add(ids, meta)
        return ids

    def append(self, layer: int, keys: torch.Tensor, values: torch.Tensor, token_ids: torch.Tensor) -> None:
        super().append(layer, keys, values, token_ids)
        self.blocks.add(layer, token_ids, self.frame_blocks.of(token_ids), keys)

    def release(self, layer: int, token_ids: torch.Tensor) -> None:
        rows = self.store.rows_of(layer, token_ids)
        self.blocks.remove(layer, token_ids, self.store.read_keys(layer, rows))
        super().release(layer, token_ids)

    def select(self, layer: int, query: torch.Tensor) -> Selection:
        base, rest = self.split_candidates(layer, self.config.budget_tokens)
        room = self.config.budget_tokens - base.numel()
        picked = take_units(rest, self.blocks.layer(layer), query, room)
        return self.selection(layer, torch.sort(torch.cat((base, picked))).values)

    def units(self) -> int:
        return self.frame_blocks.count
