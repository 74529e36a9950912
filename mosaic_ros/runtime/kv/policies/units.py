"""Retrieval by units: one protocol (``UnitIndex``) for ReKV's frame blocks, LiveVLM's pages and
Mosaic's clusters.

A unit is a group of stored tokens of one layer retrieved together; its representative is
the mean pre-RoPE key of its live tokens. Every unit index answers the same four questions:
which unit each token is in (``units_of``), how many tokens each unit holds (``counts``), the
units' mean keys (``means``) and the share of a question's attention each unit is estimated to
draw (``share``). ``LayerUnits`` (one layer of a ``UnitMeans``: running key sums per unit, so
appends cost O(chunk)) estimates shares as ReKV does (``unit_scores``: a softmax over the
candidate units' mean keys); ``clusters.ClusterIndex`` estimates them from its count-weighted
centroids. What is taken within the budget is the policy's rule: ``take_units`` takes whole
units by share (ReKV, LiveVLM); Mosaic takes clusters by share per token, copy-aware, with the
last one cut to fill the budget (``plan.choose_clusters``).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np
import torch

from mosaic_ros.runtime.kv.policy import KVGeometry, TokenMeta


def chunk_blocks(meta: TokenMeta) -> tuple[torch.Tensor, int]:
    """Frame block index (T,) of each token of a chunk (0-based) and the number of blocks.

    Each vision frame is a block; a text token joins the next frame of the chunk (or the
    previous one when it trails the last frame), so a frame's time marker is in its block; a
    chunk without vision (a question, an answer, a text event) is one block.
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


class FrameBlocks:
    """The frame block (``chunk_blocks``) of every token id of the stream, numbered in arrival order."""

    def __init__(self) -> None:
        self._block_of = torch.zeros(0, dtype=torch.int64)
        self.count = 0

    def add(self, token_ids: torch.Tensor, meta: TokenMeta) -> None:
        """A chunk's ids (T,) ascending, as ``add_tokens`` gave them, with its metadata."""
        local, blocks = chunk_blocks(meta)
        need = int(token_ids[-1]) + 1 if token_ids.numel() else 0
        if self._block_of.numel() < need:
            grown = torch.full((max(need, 2 * self._block_of.numel()),), -1, dtype=torch.int64)
            grown[: self._block_of.numel()] = self._block_of
            self._block_of = grown
        self._block_of[token_ids] = local + self.count
        self.count += blocks

    def of(self, token_ids: torch.Tensor) -> torch.Tensor:
        """(n,) int64 block of each id."""
        return self._block_of[token_ids]

    def table(self) -> np.ndarray:
        """(N,) int64 block of every token id seen (-1 above the last), a view valid until the
        next ``add``: for compiled planning; not to be written."""
        return self._block_of.numpy()


def grouped_queries(query: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """(H_q, L_q, D) -> (H_kv, G * L_q, D) float32: each KV head's query-head group, flattened."""
    hq, lq, d = query.shape
    return query.float().reshape(num_kv_heads, (hq // num_kv_heads) * lq, d)


def unit_scores(query: torch.Tensor, means: torch.Tensor) -> torch.Tensor:
    """Score units for a question: query (H_q, L_q, D), means (U, H_kv, D) -> (U,) float32 on the host.

    Per query head and question token, a softmax over the units of the logits against the
    unit mean keys (scaled by 1/sqrt(D)), averaged over heads and tokens: the share of the
    question's attention each unit would draw if it were one key at its mean (ReKV's block
    score).
    """
    if means.shape[0] == 0:
        return torch.zeros(0)
    q = grouped_queries(query, means.shape[1])
    logits = torch.bmm(q, means.to(q.device).permute(1, 2, 0)) * query.shape[-1] ** -0.5
    return torch.softmax(logits, dim=-1).mean(dim=(0, 1)).cpu()


@runtime_checkable
class UnitIndex(Protocol):
    """One layer's retrieval units (see the module docstring). Unit ids index every per-unit tensor."""

    def units_of(self, token_ids: torch.Tensor) -> torch.Tensor:
        """(n,) int64 unit of each token id, -1 for tokens in no unit."""
        ...

    @property
    def counts(self) -> torch.Tensor:
        """(U,) tokens per unit id (0 for an empty or unused id)."""
        ...

    def means(self, units: torch.Tensor) -> torch.Tensor:
        """(len(units), H_kv, D) float32 mean pre-RoPE key of each unit."""
        ...

    def share(self, query: torch.Tensor, units: torch.Tensor) -> torch.Tensor:
        """(len(units),) float32 on the host: estimated share of the attention of ``query``
        (H_q, L_q, D) pre-RoPE that each of ``units`` draws."""
        ...


class UnitMeans:
    """Per layer: the unit of every token, and per-unit key sums (U, H_kv, D) float32 and counts (U,)."""

    def __init__(self, geometry: KVGeometry):
        self.geometry = geometry
        n = geometry.num_layers
        self.unit_of: list[torch.Tensor] = [torch.zeros(0, dtype=torch.int64) for _ in range(n)]
        self.sums: list[torch.Tensor] = [self._zeros(0) for _ in range(n)]
        self.counts: list[torch.Tensor] = [torch.zeros(0) for _ in range(n)]

    def _zeros(self, units: int) -> torch.Tensor:
        return torch.zeros(units, self.geometry.num_kv_heads, self.geometry.head_dim)

    def _grow(self, layer: int, tokens: int, units: int) -> None:
        if self.unit_of[layer].numel() < tokens:
            grown = torch.full((max(tokens, 2 * self.unit_of[layer].numel()),), -1, dtype=torch.int64)
            grown[: self.unit_of[layer].numel()] = self.unit_of[layer]
            self.unit_of[layer] = grown
        have = self.counts[layer].numel()
        if have < units:
            new = max(units, 2 * have)
            sums = self._zeros(new)
            sums[:have] = self.sums[layer]
            counts = torch.zeros(new)
            counts[:have] = self.counts[layer]
            self.sums[layer], self.counts[layer] = sums, counts

    def add(self, layer: int, token_ids: torch.Tensor, units: torch.Tensor, keys: torch.Tensor) -> None:
        """Tokens ``token_ids`` (T,) join ``units`` (T,) (-1: none) with pre-RoPE keys (T, H_kv, D)."""
        top = int(units.max()) + 1 if units.numel() else 0
        self._grow(layer, int(token_ids.max()) + 1 if token_ids.numel() else 0, top)
        self.unit_of[layer][token_ids] = units
        has = units >= 0
        self.sums[layer].index_add_(0, units[has], keys[has].float().cpu())
        self.counts[layer].index_add_(0, units[has], torch.ones(int(has.sum())))

    def remove(self, layer: int, token_ids: torch.Tensor, keys: torch.Tensor) -> None:
        """Tokens (T,) with pre-RoPE keys (T, H_kv, D) leave their units (their means update exactly)."""
        units = self.unit_of[layer][token_ids]
        has = units >= 0
        self.sums[layer].index_add_(0, units[has], keys[has].float().cpu(), alpha=-1.0)
        self.counts[layer].index_add_(0, units[has], torch.ones(int(has.sum())), alpha=-1.0)
        self.unit_of[layer][token_ids] = -1

    def means(self, layer: int, units: torch.Tensor) -> torch.Tensor:
        """(len(units), H_kv, D) float32 mean keys of ``units``."""
        return self.sums[layer][units] / self.counts[layer][units].clamp_min(1)[:, None, None]

    def layer(self, layer: int) -> LayerUnits:
        """One layer's units as a ``UnitIndex``."""
        return LayerUnits(self, layer)


class LayerUnits:
    """``UnitIndex`` over one layer of a ``UnitMeans``; shares by ``unit_scores`` (ReKV's estimate)."""

    def __init__(self, means: UnitMeans, layer: int):
        self._means, self._layer = means, layer

    def units_of(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self._means.unit_of[self._layer][token_ids]

    @property
    def counts(self) -> torch.Tensor:
        return self._means.counts[self._layer]

    def means(self, units: torch.Tensor) -> torch.Tensor:
        return self._means.means(self._layer, units)

    def share(self, query: torch.Tensor, units: torch.Tensor) -> torch.Tensor:
        return unit_scores(query, self.means(units))


def take_units(rest: torch.Tensor, index: UnitIndex, query: torch.Tensor, room: int) -> torch.Tensor:
    """Tokens of ``rest`` (n,) whose units win: the units with the largest ``index.share`` of the
    question ``query`` first, whole, while their tokens fit ``room``.

    A unit's size is its number of tokens in ``rest``; only units with a token in ``rest`` are
    scored. Returns ids ascending.
    """
    if room <= 0 or rest.numel() == 0:
        return rest[:0]
    if rest.numel() <= room:
        return rest
    units, inverse, sizes = torch.unique(index.units_of(rest), return_inverse=True, return_counts=True)
    order = torch.argsort(index.share(query, units), descending=True, stable=True)
    fits = torch.cumsum(sizes[order], 0) <= room
    chosen = torch.zeros(units.numel(), dtype=torch.bool)
    chosen[order[fits]] = True
    return rest[chosen[inverse]]
