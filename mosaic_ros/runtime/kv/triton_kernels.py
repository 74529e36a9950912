"""Triton kernels behind ``kernels.centroid_scores`` and ``kernels.attention`` (CUDA path).

Same contracts as the torch references in ``kernels`` (inputs arrive validated from there).
Both kernels process a KV head's whole query group in one program, so the ``G * L_q`` query
rows of a group share every centroid/key load (GQA). Dot products accumulate in fp32; fp32
inputs use IEEE fp32 products (no TF32) so results match the reference to ~1e-5.

Importing this module imports triton; under ``TRITON_INTERPRET=1`` the kernels also run on CPU
tensors (slowly), which is how they are tested on machines without a GPU.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from mosaic_ros.runtime.kv.kernels import merge_attention

_MIN_DOT = 16  # tl.dot needs every block dimension >= 16
_TARGET_PROGRAMS = 128  # split long contexts until about this many programs run in parallel


def _pow2(n: int) -> int:
    return max(_MIN_DOT, triton.next_power_of_2(n))


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


@triton.jit
def _row_lse_kernel(
    q_ptr, c_ptr, logn_ptr, lse_ptr,
    rows, clusters, dim, num_kv, scale,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):
    """lse[g, r] = logsumexp_c(scale * q[g, r] . cen[c, g] + log n[c]); one program per (g, row block)."""
    g = tl.program_id(0)
    r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    d = tl.arange(0, BLOCK_D)
    q = tl.load(
        q_ptr + g * rows * dim + r[:, None] * dim + d[None, :],
        mask=(r[:, None] < rows) & (d[None, :] < dim), other=0.0,
    ).to(tl.float32)
    m = tl.full([BLOCK_R], -float("inf"), tl.float32)
    s = tl.zeros([BLOCK_R], tl.float32)
    for c0 in range(0, clusters, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        cen = tl.load(
            c_ptr + c[None, :] * num_kv * dim + g * dim + d[:, None],
            mask=(c[None, :] < clusters) & (d[:, None] < dim), other=0.0,
        ).to(tl.float32)
        logn = tl.load(logn_ptr + c, mask=c < clusters, other=-float("inf"))
        z = tl.dot(q, cen, input_precision=PRECISION) * scale + logn[None, :]
        m_new = tl.maximum(m, tl.max(z, axis=1))
        m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)
        s = s * tl.exp(m - m_safe) + tl.sum(tl.exp(z - m_safe[:, None]), axis=1)
        m = m_new
    m_safe = tl.where(m == -float("inf"), 0.0, m)
    tl.store(lse_ptr + g * rows + r, m_safe + tl.log(s), mask=r < rows)


@triton.jit
def _cluster_share_kernel(
    q_ptr, c_ptr, logn_ptr, lse_ptr, out_ptr,
    rows, clusters, dim, num_kv, scale,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):
    """out[c] = logsumexp_{g,r}(z[g, r, c] - lse[g, r]); one program per cluster block."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    d = tl.arange(0, BLOCK_D)
    logn = tl.load(logn_ptr + c, mask=c < clusters, other=-float("inf"))
    m = tl.full([BLOCK_C], -float("inf"), tl.float32)
    s = tl.zeros([BLOCK_C], tl.float32)
    for g in range(0, num_kv):
        cen = tl.load(
            c_ptr + c[None, :] * num_kv * dim + g * dim + d[:, None],
            mask=(c[None, :] < clusters) & (d[:, None] < dim), other=0.0,
        ).to(tl.float32)
        for r0 in range(0, rows, BLOCK_R):
            r = r0 + tl.arange(0, BLOCK_R)
            q = tl.load(
                q_ptr + g * rows * dim + r[:, None] * dim + d[None, :],
                mask=(r[:, None] < rows) & (d[None, :] < dim), other=0.0,
            ).to(tl.float32)
            row_lse = tl.load(lse_ptr + g * rows + r, mask=r < rows, other=float("inf"))
            z = tl.dot(q, cen, input_precision=PRECISION) * scale + logn[None, :] - row_lse[:, None]
            m_new = tl.maximum(m, tl.max(z, axis=0))
            m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)
            s = s * tl.exp(m - m_safe) + tl.sum(tl.exp(z - m_safe[None, :]), axis=0)
            m = m_new
    m_safe = tl.where(m == -float("inf"), 0.0, m)
    tl.store(out_ptr + c, m_safe + tl.log(s), mask=c < clusters)


def centroid_scores(query: Tensor, centroids: Tensor, counts: Tensor, scale: float) -> Tensor:
    """Triton path of ``kernels.centroid_scores``: (C,) float32 log average attention share."""
    num_q, num_tokens, dim = query.shape
    num_clusters, num_kv, _ = centroids.shape
    rows = num_q // num_kv * num_tokens
    q = query.contiguous().view(num_kv, rows, dim)
    cen = centroids.contiguous()
    logn = counts.float().log().contiguous()
    row_lse = torch.empty(num_kv, rows, dtype=torch.float32, device=query.device)
    out = torch.empty(num_clusters, dtype=torch.float32, device=query.device)
    block_r = _pow2(min(rows, 64))
    block_c = 64
    block_d = _pow2(dim)
    precision = _precision(torch.promote_types(query.dtype, centroids.dtype))
    _row_lse_kernel[(num_kv, triton.cdiv(rows, block_r))](
        q, cen, logn, row_lse, rows, num_clusters, dim, num_kv, scale,
        BLOCK_R=block_r, BLOCK_C=block_c, BLOCK_D=block_d, PRECISION=precision,
    )
    _cluster_share_kernel[(triton.cdiv(num_clusters, block_c),)](
        q, cen, logn, row_lse, out, rows, num_clusters, dim, num_kv, scale,
        BLOCK_R=block_r, BLOCK_C=block_c, BLOCK_D=block_d, PRECISION=precision,
    )
    return out - math.log(num_q * num_tokens)


@triton.jit
def _attention_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr,
    stride_kh, stride_kt, stride_vh, stride_vt,
    rows, num_tokens, ctx, dim, split_len, scale,
    CAUSAL: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Partial attention of one (KV head, row block) over one context split, online softmax.

    q: (H_kv, rows, D) contiguous, row ``r`` = query token ``r % L_q`` of the group's head
    ``r // L_q``. Writes o[split, g, r, :] (normalized within the split) and lse[split, g, r].
    """
    g = tl.program_id(0)
    r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    split = tl.program_id(2)
    d = tl.arange(0, BLOCK_D)
    row_ok = r < rows
    d_ok = d < dim
    q_offs = g * rows * dim + r[:, None] * dim + d[None, :]
    q = tl.load(q_ptr + q_offs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    last_visible = ctx - num_tokens + r % num_tokens  # causal: last context index row r may see
    start = split * split_len
    stop = tl.minimum(start + split_len, ctx)
    m = tl.full([BLOCK_R], -float("inf"), tl.float32)
    l_sum = tl.zeros([BLOCK_R], tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
    for n0 in range(start, stop, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        n_ok = n < stop
        k_offs = g * stride_kh + n[None, :] * stride_kt + d[:, None]
        k = tl.load(k_ptr + k_offs, mask=n_ok[None, :] & d_ok[:, None], other=0.0)
        logits = tl.dot(q, k, input_precision=PRECISION) * scale
        visible = n_ok[None, :]
        if CAUSAL:
            visible = visible & (n[None, :] <= last_visible[:, None])
        logits = tl.where(visible, logits, -float("inf"))
        m_new = tl.maximum(m, tl.max(logits, axis=1))
        m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)
        alpha = tl.exp(m - m_safe)
        p = tl.exp(logits - m_safe[:, None])
        l_sum = l_sum * alpha + tl.sum(p, axis=1)
        v_offs = g * stride_vh + n[:, None] * stride_vt + d[None, :]
        v = tl.load(v_ptr + v_offs, mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m = m_new
    m_safe = tl.where(m == -float("inf"), 0.0, m)
    out = acc / tl.where(l_sum > 0.0, l_sum, 1.0)[:, None]
    base = (split * tl.num_programs(0) + g) * rows
    tl.store(o_ptr + (base + r[:, None]) * dim + d[None, :], out, mask=row_ok[:, None] & d_ok[None, :])
    tl.store(lse_ptr + base + r, m_safe + tl.log(l_sum), mask=row_ok)


def attention(
    query: Tensor, keys: Tensor, values: Tensor, causal: bool, scale: float
) -> tuple[Tensor, Tensor]:
    """Triton path of ``kernels.attention`` (validated inputs, ``T >= 1``): (output, lse).

    Long contexts are cut into splits processed by separate programs (so a handful of heads
    still fills the GPU); the per-split partial results are merged by ``merge_attention``.
    """
    num_q, num_tokens, dim = query.shape
    num_kv, ctx, _ = keys.shape
    rows = num_q // num_kv * num_tokens
    q = query.contiguous().view(num_kv, rows, dim)
    keys = keys.to(query.dtype)
    values = values.to(query.dtype)
    if keys.stride(-1) != 1:
        keys = keys.contiguous()
    if values.stride(-1) != 1:
        values = values.contiguous()
    block_r = _pow2(min(rows, 64))
    block_n = 64
    block_d = _pow2(dim)
    row_blocks = triton.cdiv(rows, block_r)
    ctx_blocks = triton.cdiv(ctx, block_n)
    splits = max(1, min(ctx_blocks, _TARGET_PROGRAMS // (num_kv * row_blocks)))
    split_len = triton.cdiv(ctx_blocks, splits) * block_n
    splits = triton.cdiv(ctx, split_len)
    out = torch.empty(splits, num_kv, rows, dim, dtype=torch.float32, device=query.device)
    lse = torch.empty(splits, num_kv, rows, dtype=torch.float32, device=query.device)
    precision = _precision(torch.promote_types(query.dtype, keys.dtype))
    _attention_kernel[(num_kv, row_blocks, splits)](
        q, keys, values, out, lse,
        keys.stride(0), keys.stride(1), values.stride(0), values.stride(1),
        rows, num_tokens, ctx, dim, split_len, scale,
        CAUSAL=causal, BLOCK_R=block_r, BLOCK_N=block_n, BLOCK_D=block_d, PRECISION=precision,
    )
    out = out.view(splits, num_q, num_tokens, dim)
    lse = lse.view(splits, num_q, num_tokens)
    if splits == 1:
        return out[0].to(query.dtype), lse[0]
    merged, merged_lse = merge_attention(list(out), list(lse))
    return merged.to(query.dtype), merged_lse
