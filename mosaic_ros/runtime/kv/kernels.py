"""Retrieval-side compute ops: torch reference implementations and backend dispatch.

Two ops, each with a torch path (the reference, used on CPU) and a Triton path
(``triton_kernels``, used on CUDA):

- ``centroid_scores``: every cluster centroid of a layer, all KV heads, against a question's
  queries in one batched product, aggregated into one score per cluster.
- ``attention``: a few query tokens over a gathered context, GQA-aware, fp32 accumulation,
  optionally causal over the trailing "scratch" tokens, optionally returning the log-sum-exp
  so partial attentions over disjoint contexts can be merged exactly (``merge_attention``).

Backend choice: the ``backend`` argument, else the ``MOSAIC_KV_BACKEND`` environment variable,
else ``"auto"``. ``"auto"`` picks Triton for CUDA tensors when triton is importable and torch
otherwise; ``"torch"`` and ``"triton"`` force one (forcing Triton on CPU tensors works only
under ``TRITON_INTERPRET=1``, which the tests use).

Shapes: ``H_q`` query heads, ``H_kv`` KV heads (``H_q`` a multiple of ``H_kv``; query head
``h`` reads KV head ``h // (H_q // H_kv)``), ``L_q`` query tokens, ``T`` context tokens, ``D``
head dim, ``C`` clusters.
"""

from __future__ import annotations

import importlib.util
import math
import os
from collections.abc import Sequence

import torch
from torch import Tensor

BACKEND_ENV = "MOSAIC_KV_BACKEND"
BACKENDS = ("auto", "torch", "triton")
_LOG_TINY = math.log(torch.finfo(torch.float32).tiny)  # floor of centroid scores (log of a share)


def triton_available() -> bool:
    """Whether the triton package can be imported here."""
    return importlib.util.find_spec("triton") is not None


def resolve_backend(backend: str | None, device: torch.device) -> str:
    """The backend an op on ``device`` runs with: ``"torch"`` or ``"triton"``.

    ``backend`` overrides the ``MOSAIC_KV_BACKEND`` environment variable; both default to
    ``"auto"`` (Triton on CUDA when available, torch otherwise).
    """
    choice = backend if backend is not None else os.environ.get(BACKEND_ENV, "auto")
    if choice not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {choice!r}")
    if choice == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    return choice


def _group_size(num_q_heads: int, num_kv_heads: int) -> int:
    if num_kv_heads <= 0 or num_q_heads % num_kv_heads:
        raise ValueError(f"query heads ({num_q_heads}) must be a multiple of KV heads ({num_kv_heads})")
    return num_q_heads // num_kv_heads


# ---------------------------------------------------------------------------------------------
# Centroid scoring
# ---------------------------------------------------------------------------------------------


def centroid_scores(
    query: Tensor,
    centroids: Tensor,
    counts: Tensor,
    *,
    scale: float | None = None,
    backend: str | None = None,
) -> Tensor:
    """Score every cluster of a layer against a question: the log of its estimated attention share.

    query: (H_q, L_q, D) position-free (pre-RoPE) queries; centroids: (C, H_kv, D) mean pre-RoPE
    key of each cluster; counts: (C,) tokens per cluster (0 marks an unused slot).

    For query head ``h``, token ``i`` and cluster ``c`` (KV head ``g`` of ``h``), the cluster's
    attention mass is estimated as ``counts[c] * exp(scale * q[h, i] . centroid[c, g])`` (each of
    its tokens taken at the centroid's logit); normalizing over clusters gives the share of that
    (head, token)'s attention the cluster would receive. The score is the log of that share
    averaged over all query heads and tokens, i.e. ``logsumexp_{h,i}(z - logsumexp_c z) -
    log(H_q * L_q)`` with ``z = scale * q.c + log(count)``: the expected fraction of the dense
    attention mass the cluster holds, which is what retrieval fidelity is measured by. Each
    (head, token) weighs equally, so one head with large logits cannot drown the others.

    Returns (C,) float32 on the centroids' device, ``-inf`` for empty slots; shares below the
    smallest normal float32 (~1e-38, i.e. scores below ~-87) are floored there, so every
    non-empty cluster stays selectable. ``scale`` defaults to ``1 / sqrt(D)``.
    """
    if query.dim() != 3 or centroids.dim() != 3:
        raise ValueError(
            f"query must be (H_q, L_q, D) and centroids (C, H_kv, D), got {tuple(query.shape)} "
            f"and {tuple(centroids.shape)}"
        )
    num_clusters, num_kv, dim = centroids.shape
    if query.shape[2] != dim:
        raise ValueError(f"head dim mismatch: query {query.shape[2]}, centroids {dim}")
    if counts.shape != (num_clusters,):
        raise ValueError(f"counts must be ({num_clusters},), got {tuple(counts.shape)}")
    _group_size(query.shape[0], num_kv)
    scale = 1.0 / math.sqrt(dim) if scale is None else float(scale)
    query = query.to(centroids.device)
    counts = counts.to(centroids.device)
    if num_clusters == 0 or query.shape[1] == 0 or not bool((counts > 0).any()):
        return torch.full((num_clusters,), -math.inf, dtype=torch.float32, device=centroids.device)
    if resolve_backend(backend, centroids.device) == "triton":
        from mosaic_ros.runtime.kv import triton_kernels

        scores = triton_kernels.centroid_scores(query, centroids, counts, scale)
    else:
        scores = centroid_scores_torch(query, centroids, counts, scale)
    return scores.clamp_min(_LOG_TINY).masked_fill(counts <= 0, -math.inf)


def centroid_scores_torch(query: Tensor, centroids: Tensor, counts: Tensor, scale: float) -> Tensor:
    """Torch reference of ``centroid_scores`` (validated inputs, at least one live cluster), unfloored.

    Works in the probability domain with in-place passes over the one (H_kv, rows, C) buffer;
    shares that underflow come out as ``-inf`` (the dispatcher floors them).
    """
    num_q, num_tokens, dim = query.shape
    num_clusters, num_kv, _ = centroids.shape
    rows = num_q // num_kv * num_tokens
    q = query.float().reshape(num_kv, rows, dim) * scale
    z = torch.bmm(q, centroids.float().permute(1, 2, 0))  # (H_kv, rows, C)
    z.add_(counts.float().log())  # log(0) = -inf removes empty slots
    z.sub_(z.amax(dim=-1, keepdim=True)).exp_()
    z.div_(z.sum(dim=-1, keepdim=True))  # each (head, token) row: shares of its attention
    return (z.reshape(num_kv * rows, num_clusters).sum(dim=0) / (num_q * num_tokens)).log()


# ---------------------------------------------------------------------------------------------
# Attention over a gathered context
# ---------------------------------------------------------------------------------------------


def attention(
    query: Tensor,
    keys: Tensor,
    values: Tensor,
    *,
    causal: bool = False,
    scale: float | None = None,
    return_lse: bool = False,
    backend: str | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Attention of ``query`` (H_q, L_q, D) over ``keys``/``values`` (H_kv, T, D).

    All inputs carry the same positional encoding (post-RoPE for a model's attention).
    ``causal``: the last ``L_q`` context tokens are the query tokens themselves, so query ``i``
    sees context tokens ``[0, T - L_q + i]`` (requires ``T >= L_q``); otherwise every query sees
    the whole context. Logits are ``scale * q . k`` (``scale`` defaults to ``1 / sqrt(D)``),
    accumulated in fp32.

    Returns the output (H_q, L_q, D) in the query's dtype, and with ``return_lse`` also the
    natural-log sum of exp of the scaled logits per head and query token, (H_q, L_q) float32
    (``-inf`` where nothing is visible, e.g. ``T == 0``, with a zero output there).
    """
    if query.dim() != 3 or keys.dim() != 3 or values.shape != keys.shape:
        raise ValueError(
            "query must be (H_q, L_q, D), keys and values (H_kv, T, D) of equal shape; got "
            f"{tuple(query.shape)}, {tuple(keys.shape)}, {tuple(values.shape)}"
        )
    if query.shape[2] != keys.shape[2]:
        raise ValueError(f"head dim mismatch: query {query.shape[2]}, keys {keys.shape[2]}")
    _group_size(query.shape[0], keys.shape[0])
    if causal and keys.shape[1] < query.shape[1]:
        raise ValueError(f"causal attention needs T ({keys.shape[1]}) >= L_q ({query.shape[1]})")
    scale = 1.0 / math.sqrt(query.shape[2]) if scale is None else float(scale)
    if keys.shape[1] == 0 or query.shape[1] == 0:
        out = torch.zeros_like(query)
        lse = torch.full(query.shape[:2], -math.inf, dtype=torch.float32, device=query.device)
    elif resolve_backend(backend, query.device) == "triton":
        from mosaic_ros.runtime.kv import triton_kernels

        out, lse = triton_kernels.attention(query, keys, values, causal, scale)
    else:
        out, lse = attention_torch(query, keys, values, causal, scale)
    return (out, lse) if return_lse else out


def attention_torch(
    query: Tensor, keys: Tensor, values: Tensor, causal: bool, scale: float
) -> tuple[Tensor, Tensor]:
    """Torch reference of ``attention`` (inputs validated, ``T >= 1``): (output, lse)."""
    num_q, num_tokens, dim = query.shape
    num_kv, ctx, _ = keys.shape
    group = num_q // num_kv
    q = query.float().reshape(num_kv, group * num_tokens, dim) * scale  # scale the few query rows
    logits = torch.bmm(q, keys.float().transpose(1, 2))  # (H_kv, G * L_q, T)
    if causal:
        qpos = torch.arange(num_tokens, device=query.device).repeat(group)
        hidden = torch.arange(ctx, device=query.device)[None, :] > (ctx - num_tokens + qpos)[:, None]
        logits.masked_fill_(hidden, -math.inf)
    lse = torch.logsumexp(logits, dim=-1)
    out = torch.bmm(logits.sub_(lse[..., None]).exp_(), values.float())  # probabilities in place
    return out.reshape(num_q, num_tokens, dim).to(query.dtype), lse.reshape(num_q, num_tokens)


def merge_attention(outputs: Sequence[Tensor], lses: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """Combine attentions of the same queries over disjoint contexts into attention over their union.

    outputs: each (H_q, L_q, D); lses: each (H_q, L_q) as returned by ``attention(...,
    return_lse=True)``. Returns (output in the first output's dtype, lse float32). Parts with
    ``lse == -inf`` (nothing visible) contribute nothing.
    """
    if not outputs or len(outputs) != len(lses):
        raise ValueError("need one lse per output and at least one output")
    stacked_lse = torch.stack([lse.float() for lse in lses])  # (P, H_q, L_q)
    total = torch.logsumexp(stacked_lse, dim=0)
    weights = torch.exp(stacked_lse - total).nan_to_num(0.0)  # -inf - -inf -> nan -> 0
    out = sum(w[..., None] * o.float() for w, o in zip(weights, outputs, strict=True))
    return out.to(outputs[0].dtype), total
