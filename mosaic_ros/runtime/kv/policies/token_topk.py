"""``token_topk``: exact per-token retrieval, each KV head picking its own tokens (the recall upper bound).

Every stored key of the layer is scored against the question: per query head and question
token, a softmax over all live tokens of the pre-RoPE logits (scaled by 1/sqrt(D)); per KV
head the probabilities of its query-head group and all question tokens are aggregated
(``options['aggregate']``: ``sum``, the default, is the attention mass a token draws, so the
top tokens maximise the mass a head keeps; ``max`` favours tokens any single query wants).
Each KV head then takes its top tokens to fill the budget left after sinks + local window.
Scoring touches every key where the keys live (host memory, on the CPU); the gather moves
2*D-element fragments per head and token.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from mosaic_ros.runtime.kv.policies.base import Selection, StoreBackedPolicy
from mosaic_ros.runtime.kv.policies.units import grouped_queries
from mosaic_ros.runtime.kv.policy import KVGeometry, PolicyConfig, register_policy


@register_policy
class TokenTopKPolicy(StoreBackedPolicy):
    """Per-KV-head top tokens by aggregated softmax probability, plus sinks and local window."""

    name = "token_topk"
    per_head = True
    option_defaults: ClassVar[dict[str, Any]] = {"aggregate": "sum"}

    def __init__(self, geometry: KVGeometry, config: PolicyConfig, device: torch.device | str = "cpu"):
        super().__init__(geometry, config, device)
        if self.options["aggregate"] not in ("sum", "max"):
            raise ValueError(f"aggregate must be 'sum' or 'max', got {self.options['aggregate']!r}")

    def token_scores(self, layer: int, query: torch.Tensor) -> torch.Tensor:
        """(H_kv, R) float32 aggregated probability per KV head and physical row (0 for free rows)."""
        store = self.store
        q = grouped_queries(query.cpu(), self.geometry.num_kv_heads)
        scale = query.shape[-1] ** -0.5
        held = store.tokens_at(layer) >= 0
        logits = torch.full((q.shape[0], q.shape[1], held.numel()), float("-inf"))
        for first, page in store.iter_pages(layer):
            keys = page[:, 0].permute(1, 2, 0).float().cpu()
            logits[:, :, first : first + page.shape[0]] = torch.bmm(q, keys) * scale
        logits[:, :, ~held] = float("-inf")
        probs = torch.softmax(logits, dim=-1)
        return probs.sum(dim=1) if self.options["aggregate"] == "sum" else probs.amax(dim=1)

    def select(self, layer: int, query: torch.Tensor) -> Selection:
        h = self.geometry.num_kv_heads
        base, rest = self.split_candidates(layer, self.config.budget_tokens)
        room = self.config.budget_tokens - base.numel()
        if rest.numel() <= room:
            return self.selection(layer, torch.sort(torch.cat((base, rest))).values.expand(h, -1))
        scores = self.token_scores(layer, query)[:, self.store.rows_of(layer, rest)]
        top = torch.topk(scores, room, dim=1, sorted=False).indices
        picked = torch.cat((base.expand(h, -1), rest[top]), dim=1)
        return self.selection(layer, torch.sort(picked, dim=1).values)
