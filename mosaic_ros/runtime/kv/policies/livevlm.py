"""``livevlm``: LiveVLM's Vision Sink Bucketing (VSB) + Position-agnostic page Retrieval (PaR).

VSB (``compression.vsb_compress``) keeps host memory bounded: at the host cap by default,
and with ``options['vsb_ratio']`` in (0, 1) also continuously, each token block that leaves
the local window keeping that fraction of itself (bucketed by frame, by vision-to-vision
score), so the store grows ``vsb_ratio`` times slower.

PaR: keys are stored position-free (every store is); the live non-sink tokens of a layer
are grouped, in arrival order, into pages of ``options['page_tokens']`` tokens, each
represented by its mean key (pages thin out, never regroup, when VSB drops tokens). A
question takes the best pages whole while they fit the budget left after sinks + local
window. Positions are then re-applied contiguously: every gap of non-retrieved tokens
(dropped or not selected) is closed by adding, to each retrieved token, the total position
size of the gaps between it and the end of the stream, so retrieved pages abut and the
question keeps its true position. A gap's size is measured on the first rotary component
(time for M-RoPE, where a frame's tokens share it) and added to every component.
"""

from __future__ import annotations

import math
import time
from typing import Any, ClassVar

import torch

from mosaic_ros.runtime.kv.policies.base import Selection, StoreBackedPolicy
from mosaic_ros.runtime.kv.policies.compression import bucket_top, vision_scores
from mosaic_ros.runtime.kv.policies.units import UnitMeans, take_units
from mosaic_ros.runtime.kv.policy import KVGeometry, PolicyConfig, register_policy


def contiguous_positions(
    ids: torch.Tensor, positions: torch.Tensor, end_id: int, end_position: int
) -> torch.Tensor:
    """Positions (P, n) of retrieved ``ids`` (n,) ascending with every gap before the end closed.

    positions: (P, n) their original positions; ``end_id``/``end_position``: the id and first
    rotary component of the last stored token (the question follows it). A gap is a run of
    ids not retrieved; its size is the first component's advance across it minus one.
    """
    p0 = positions[0]
    next_p0 = torch.cat((p0[1:], torch.tensor([end_position + 1])))
    next_id = torch.cat((ids[1:], torch.tensor([end_id + 1])))
    gap = torch.where(next_id - ids > 1, (next_p0 - p0 - 1).clamp_min(0), 0)
    shift = torch.flip(torch.cumsum(torch.flip(gap, (0,)), 0), (0,))
    return positions + shift[None]


@register_policy
class LiveVLMPolicy(StoreBackedPolicy):
    """Best mean-key pages re-positioned contiguously, plus sinks and local window; VSB compression."""

    name = "livevlm"
    option_defaults: ClassVar[dict[str, Any]] = {"page_tokens": 16, "vsb_ratio": 0.0}

    def __init__(self, geometry: KVGeometry, config: PolicyConfig, device: torch.device | str = "cpu"):
        super().__init__(geometry, config, device)
        if int(self.options["page_tokens"]) <= 0:
            raise ValueError(f"page_tokens must be positive, got {self.options['page_tokens']}")
        if not 0.0 <= float(self.options["vsb_ratio"]) < 1.0:
            raise ValueError(
                f"vsb_ratio must be in [0, 1) (0 = only at the host cap), got {self.options['vsb_ratio']}"
            )

    def reset(self) -> None:
        super().reset()
        self.pages = UnitMeans(self.geometry)
        self._paged = [0] * self.geometry.num_layers
        self._compressed_upto = 0

    def append(self, layer: int, keys: torch.Tensor, values: torch.Tensor, token_ids: torch.Tensor) -> None:
        super().append(layer, keys, values, token_ids)
        pages = torch.full((token_ids.numel(),), -1, dtype=torch.int64)
        paged = token_ids >= self.config.sink_tokens
        k = int(paged.sum())
        pages[paged] = (self._paged[layer] + torch.arange(k)) // int(self.options["page_tokens"])
        self._paged[layer] += k
        self.pages.add(layer, token_ids, pages, keys)

    def release(self, layer: int, token_ids: torch.Tensor) -> None:
        rows = self.store.rows_of(layer, token_ids)
        self.pages.remove(layer, token_ids, self.store.read_keys(layer, rows))
        super().release(layer, token_ids)

    def maintain(self, budget_ms: float) -> float:
        """Continuous VSB (when ``vsb_ratio`` > 0) of the tokens that left the local window."""
        ratio = float(self.options["vsb_ratio"])
        store = self.store
        window_start = max(store.num_tokens - self.config.window_tokens, self.config.sink_tokens)
        if ratio == 0.0 or window_start <= self._compressed_upto:
            return 0.0
        t0 = time.perf_counter()
        before = sum(store.live_counts())
        lo = max(self._compressed_upto, self.config.sink_tokens)
        for layer in range(self.geometry.num_layers):
            live = store.live_tokens(layer)
            block = live[(live >= lo) & (live < window_start)]
            if block.numel() == 0:
                continue
            keep = math.ceil(ratio * block.numel())
            sinks = live[live < self.config.sink_tokens]
            scores = vision_scores(store, layer, torch.cat((sinks, block)), int(self.options["vsb_probe"]))
            scores = scores[sinks.numel() :]
            scores[store.modality[block] == 0] = float("inf")
            frames = int(torch.unique(store.frame[block]).numel())
            self.release(layer, block[~bucket_top(scores, keep, frames)])
        self._compressed_upto = window_start
        self._count_evicted(before)
        return (time.perf_counter() - t0) * 1e3

    def select(self, layer: int, query: torch.Tensor) -> Selection:
        """The best pages within the budget, with contiguous positions (``Selection.positions``)."""
        store = self.store
        base, rest = self.split_candidates(layer, self.config.budget_tokens)
        room = self.config.budget_tokens - base.numel()
        picked = take_units(rest, self.pages.layer(layer), query, room)
        ids = torch.sort(torch.cat((base, picked))).values
        sel = self.selection(layer, ids)
        if ids.numel():
            last = int(store.live_tokens(layer)[-1])
            sel.positions = contiguous_positions(
                ids, store.positions[:, ids], last, int(store.positions[0, last])
            )
        return sel

    def units(self) -> int:
        return max(-(-n // int(self.options["page_tokens"])) for n in self._paged)
