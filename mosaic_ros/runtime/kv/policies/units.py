"""Retrieval by units (ReKV frame blocks, LiveVLM pages): running mean keys and their scoring.

A unit is a group of stored tokens of one layer retrieved together; its representative is
the mean pre-RoPE key of its live tokens. ``UnitMeans`` keeps per-layer sums so appends cost
O(chunk), and rebuilds a layer from the store after evictions.
"""

from __future__ import annotations

import torch

from mosaic_ros.runtime.kv.policy import KVGeometry


def grouped_queries(query: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """(H_q, L_q, D) -> (H_kv, G * L_q, D) float32: each KV head's query-head group, flattened."""
    hq, lq, d = query.shape
    return query.float().reshape(num_kv_heads, (hq // num_kv_heads) * lq, d)


def unit_scores(query: torch.Tensor, means: torch.Tensor) -> torch.Tensor:
    """Score units for a question: query (H_q, L_q, D), means (U, H_kv, D) -> (U,) float32 on the host.

    Per query head and question token, a softmax over the units of the logits against the
    unit mean keys (scaled by 1/sqrt(D)), summed over heads and tokens: the attention mass a
    unit would draw if each of its tokens looked like its mean.
    """
    if means.shape[0] == 0:
        return torch.zeros(0)
    q = grouped_queries(query, means.shape[1])
    logits = torch.bmm(q, means.to(q.device).permute(1, 2, 0)) * query.shape[-1] ** -0.5
    return torch.softmax(logits, dim=-1).sum(dim=(0, 1)).cpu()


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

    def units_of(self, layer: int, token_ids: torch.Tensor) -> torch.Tensor:
        return self.unit_of[layer][token_ids]


def take_units(rest: torch.Tensor, rest_units: torch.Tensor, scores_of, room: int) -> torch.Tensor:
    """Tokens of ``rest`` (n,) whose units win: best-scored units first while their tokens fit ``room``.

    rest_units: (n,) unit of each token; ``scores_of(units (U,)) -> (U,)`` scores candidate units.
    A unit's size is its number of tokens in ``rest``. Returns ids ascending.
    """
    if room <= 0 or rest.numel() == 0:
        return rest[:0]
    if rest.numel() <= room:
        return rest
    units, inverse, sizes = torch.unique(rest_units, return_inverse=True, return_counts=True)
    order = torch.argsort(scores_of(units), descending=True, stable=True)
    fits = torch.cumsum(sizes[order], 0) <= room
    chosen = torch.zeros(units.numel(), dtype=torch.bool)
    chosen[order[fits]] = True
    return rest[chosen[inverse]]
