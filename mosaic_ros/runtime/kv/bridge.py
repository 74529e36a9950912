"""Routes a transformers model's attention through a ``KVPolicy``.

The model runs unchanged; two standard extension points are used:

* ``StreamCache`` (a ``transformers.Cache``) whose layers keep only the *local* tokens of
  the current step (the chunk being ingested, or the question and the answer so far), and
  report the stream's true length;
* an attention function registered under ``ATTENTION_NAME`` that, per layer, asks the
  bridge for the stored context (``policy.ingest_context`` while ingesting,
  ``policy.retrieve`` for a question), rotates it with the model's own rotary positions,
  and attends over context + local tokens (``kv.attention.attend``). After an ingest step
  the chunk's keys are un-rotated and handed to ``policy.append``.

A question retrieves at its prefill, with the question's queries. With the policy's
``config.reselect_every = k`` (> 0) it retrieves again at every k-th decode pass after the
prefill, with that pass's own queries: the token that writes an answer looks at other stored
tokens than the question did, and the context it attends to is then chosen for it. Between
re-selections a pass reuses the latest context.

The bridge is not thread-safe; its owner serialises forward passes.
"""

from __future__ import annotations

import contextvars
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import Enum

import torch
from transformers import AttentionInterface
from transformers.cache_utils import Cache, CacheLayerMixin

from mosaic_ros.runtime.kv.attention import MemoRotary, Scratch, attend, rotate_context
from mosaic_ros.runtime.kv.policy import KVPolicy, RetrievalStats, TokenMeta
from mosaic_ros.runtime.kv.rope import RotaryFn, unapply_rotary

ATTENTION_NAME = "mosaic_kv"

_ACTIVE: contextvars.ContextVar[KVBridge | None] = contextvars.ContextVar("mosaic_kv_bridge", default=None)


class Mode(Enum):
    INGEST = "ingest"
    QUESTION = "question"


@dataclass
class _Step:
    """Facts of the forward pass in flight: positions of its tokens and, for ingest, their ids."""

    cos: torch.Tensor
    sin: torch.Tensor
    token_ids: torch.Tensor | None


@dataclass
class _Question:
    """Per-question state: each layer's rotated context (fetched at prefill, reused by decode
    passes until a re-selection replaces it), the decode passes since the prefill, and what the
    pass in flight does: ``select`` re-selects with its own queries, ``restore`` selects again
    with the prefill's queries (kept in ``prefill_queries`` when re-selecting is on)."""

    context: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    capture: list[torch.Tensor] | None = None
    prefill_queries: dict[int, torch.Tensor] | None = None
    passes: int = -1
    select: bool = False
    restore: bool = False
    reselected: bool = False


class _LocalLayer(CacheLayerMixin):
    """Holds one layer's local tokens (post-RoPE) for the step in flight; the store holds the rest."""

    is_sliding = False
    is_compileable = False

    def __init__(self, bridge: KVBridge):
        super().__init__()
        self._bridge = bridge

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.keys is None or self.keys.numel() == 0:
            self.keys, self.values = key_states, value_states
        else:
            self.keys = torch.cat((self.keys, key_states), dim=-2)
            self.values = torch.cat((self.values, value_states), dim=-2)
        return self.keys, self.values

    def local_length(self) -> int:
        return 0 if self.keys is None else int(self.keys.shape[-2])

    def clear(self) -> None:
        self.keys = self.values = None

    def get_seq_length(self) -> int:
        return self._bridge.stored_tokens + self.local_length()

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1


class StreamCache(Cache):
    """A ``Cache`` whose layers keep only local tokens; stored tokens live behind the policy."""

    def __init__(self, bridge: KVBridge, num_layers: int):
        super().__init__(layers=[_LocalLayer(bridge) for _ in range(num_layers)])

    def clear_local(self) -> None:
        for layer in self.layers:
            layer.clear()


def _attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Attention function registered with transformers; delegates to the active bridge."""
    bridge = _ACTIVE.get()
    if bridge is None:
        raise RuntimeError(
            f"attention implementation {ATTENTION_NAME!r} called outside a KVBridge step; "
            "run the model through StreamSession"
        )
    out = bridge.layer_attention(module.layer_idx, query, key, value, scaling)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(ATTENTION_NAME, _attention)


class KVBridge:
    """Connects one stream's policy to the model's attention layers.

    ``rotary`` maps positions (P, N) to (cos, sin) (N, D) exactly as the model rotates. The
    policy's ``config.reselect_every`` is the number of decode passes between re-selections of a
    question's context (0: the prefill's selection serves the whole answer).
    """

    def __init__(self, policy: KVPolicy, rotary: RotaryFn, num_layers: int):
        self.policy = policy
        self.rotary = rotary
        self.reselect_every = int(policy.config.reselect_every)
        self._context_rotary = MemoRotary(rotary)
        self._scratch = Scratch()  # ingest's rotated context lives for one layer only
        self.num_layers = num_layers
        self.cache = StreamCache(self, num_layers)
        self.stored_tokens = 0
        self._mode: Mode | None = None
        self._step: _Step | None = None
        self._question: _Question | None = None

    # ---- steps -------------------------------------------------------------------------

    @contextmanager
    def ingest_step(self, positions: torch.Tensor, token_ids: torch.Tensor) -> Iterator[StreamCache]:
        """One chunk of the stream: positions (P, T), logical token ids (T,) from ``policy.add_tokens``."""
        if self._question is not None:
            raise RuntimeError("cannot ingest while a question is open")
        cos, sin = self.rotary(positions)
        with self._active(Mode.INGEST, _Step(cos, sin, token_ids)):
            try:
                yield self.cache
            finally:
                self.cache.clear_local()
        self.stored_tokens += int(token_ids.numel())

    def replay(self, meta: TokenMeta, kv: list[torch.Tensor]) -> torch.Tensor:
        """Store a chunk whose KV is already known (restoring a snapshot), without the model:
        ``policy.add_tokens(meta)``, then per layer ``policy.append`` of ``kv[layer]`` (T, 2, H_kv, D)
        pre-RoPE K then V, as an ingest step would. Returns the chunk's token ids (T,)."""
        if self._question is not None:
            raise RuntimeError("cannot replay while a question is open")
        token_ids = self.policy.add_tokens(meta)
        for layer, data in enumerate(kv):
            self.policy.append(layer, data[:, 0], data[:, 1], token_ids)
        self.stored_tokens += int(token_ids.numel())
        return token_ids

    def begin_question(self, window: tuple[float, float] | None = None, capture: bool = False) -> None:
        """Open a question; with ``capture`` the pre-RoPE prefill queries of each layer are kept."""
        if self._question is not None:
            raise RuntimeError("a question is already open")
        self.policy.begin_question(window)
        self._question = _Question(
            capture=[None] * self.num_layers if capture else None,
            prefill_queries={} if self.reselect_every else None,
        )

    @contextmanager
    def question_step(self, positions: torch.Tensor) -> Iterator[StreamCache]:
        """Question prefill or one decode step: positions (P, L) of the new tokens."""
        question = self._question
        if question is None:
            raise RuntimeError("begin_question() first")
        question.passes += 1
        every = self.reselect_every
        question.select = bool(every) and question.passes > 0 and question.passes % every == 0
        cos, sin = self.rotary(positions)
        try:
            with self._active(Mode.QUESTION, _Step(cos, sin, None)):
                yield self.cache
        finally:
            question.reselected |= question.select
            question.restore = question.select = False

    def truncate_question(self, local_tokens: int) -> None:
        """Drop the open question's local tokens past its first ``local_tokens``, so another
        continuation of the same prefix can be scored on the same retrieval: the prefill's
        context stays, or, if a decode pass re-selected since, the next pass selects again with
        the prefill's queries; decode passes count from the prefill again."""
        question = self._question
        if question is None:
            raise RuntimeError("no question is open")
        if question.reselected:
            question.restore, question.reselected = True, False
        question.passes = 0
        for layer in self.cache.layers:
            if layer.local_length() < local_tokens:
                raise ValueError(f"the question holds {layer.local_length()} local tokens, < {local_tokens}")
            layer.keys = layer.keys[..., :local_tokens, :]
            layer.values = layer.values[..., :local_tokens, :]

    def end_question(self) -> RetrievalStats:
        """Close the question, drop its local tokens and context; returns the retrieval cost."""
        if self._question is None:
            raise RuntimeError("no question is open")
        self._question = None
        self.cache.clear_local()
        return self.policy.end_question()

    @property
    def captured_queries(self) -> list[torch.Tensor]:
        """Pre-RoPE prefill queries per layer, (H_q, L_q, D), of the open capturing question."""
        if self._question is None or self._question.capture is None:
            raise RuntimeError("no capturing question is open")
        return self._question.capture

    def reset(self) -> None:
        if self._question is not None:
            self.end_question()
        self.policy.reset()
        self.cache.clear_local()
        self._context_rotary.clear()
        self.stored_tokens = 0

    @contextmanager
    def _active(self, mode: Mode, step: _Step) -> Iterator[None]:
        token = _ACTIVE.set(self)
        self._mode, self._step = mode, step
        try:
            yield
        finally:
            self._mode, self._step = None, None
            _ACTIVE.reset(token)

    # ---- per layer ---------------------------------------------------------------------

    def layer_attention(
        self, layer: int, query: torch.Tensor, local_keys: torch.Tensor, local_values: torch.Tensor, scaling
    ) -> torch.Tensor:
        """query (1, H_q, L, D) post-RoPE; local (1, H_kv, L_s, D) post-RoPE -> (1, H_q, L, D)."""
        step = self._step
        if self._mode is Mode.INGEST:
            ctx = self.policy.ingest_context(layer)
            ctx_keys = None
            if ctx is not None:
                ctx_keys = rotate_context(ctx, self._context_rotary, dtype=query.dtype, scratch=self._scratch)
            ctx_values = ctx.values if ctx is not None else None
            out = attend(
                query[0], ctx_keys, ctx_values, local_keys[0], local_values[0], scaling, scratch=self._scratch
            )
            new_keys = unapply_rotary(local_keys[0].float(), step.cos, step.sin).transpose(0, 1)
            self.policy.append(layer, new_keys, local_values[0].transpose(0, 1), step.token_ids)
            return out[None]
        question = self._question
        if layer not in question.context or question.select or question.restore:
            if question.select or layer not in question.context:
                query_pre = unapply_rotary(query[0].float(), step.cos, step.sin)
            else:
                query_pre = question.prefill_queries[layer]
            if layer not in question.context:
                if question.capture is not None:
                    question.capture[layer] = query_pre.detach().clone()
                if question.prefill_queries is not None:
                    question.prefill_queries[layer] = query_pre
            ctx = self.policy.retrieve(layer, query_pre)
            question.context[layer] = (rotate_context(ctx, self._context_rotary), ctx.values)
        ctx_keys, ctx_values = question.context[layer]
        return attend(query[0], ctx_keys, ctx_values, local_keys[0], local_values[0], scaling)[None]
