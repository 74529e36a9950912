"""``window``: sinks plus the most recent tokens, up to the budget (StreamingLLM-style)."""

from __future__ import annotations

import torch

from mosaic_ros.runtime.kv.policies.base import Selection, StoreBackedPolicy
from mosaic_ros.runtime.kv.policy import register_policy


@register_policy
class WindowPolicy(StoreBackedPolicy):
    """Question context: the first ``sink_tokens`` tokens and the newest tokens filling the rest
    of ``budget_tokens`` (within the question's time window). Ingest: sinks + last ``window_tokens``."""

    name = "window"

    def select(self, layer: int, query: torch.Tensor) -> Selection:
        budget = self.config.budget_tokens
        base, rest = self.split_candidates(layer, budget)
        room = budget - base.numel()
        return self.selection(layer, torch.cat((base, rest[max(rest.numel() - room, 0) :])))
