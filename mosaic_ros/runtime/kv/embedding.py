"""Assignment-space rows of pre-RoPE keys: what ``clusters.ClusterBank`` clusters.

An embedding maps a key row ``(H_kv, D)`` to a unit vector of ``width`` values in which each KV
head weighs the same (each head's part has norm ``1 / sqrt(H_kv)``), so a squared distance is
``2 - 2 * mean_h cos_h`` of the heads' parts and a cluster's variance is ``1 - |mean|^2``.

``HeadNormalized`` (width ``H_kv * D``) keeps every coordinate: each head L2-normalized.

``CountSketch`` (width ``H_kv * m``, ``m < D``) first sums each head's ``D`` coordinates into
``m`` buckets with a fixed random sign per coordinate (a count sketch: every coordinate in one
bucket, ``D / m`` per bucket, rounded up or down where m does not divide D), then normalizes each
head's ``m`` sums. The sketch is linear and
preserves squared distances in expectation (a relative spread of about ``sqrt(2 / width)``), so
the clusters' cosine geometry is kept approximately at ``m / D`` of the cost of every product,
sum and reference row of the assignment. It changes what the assignment decides; the raw keys
(what retrieval scores) are untouched.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from numba import njit
from torch import Tensor


class HeadNormalized:
    """Every coordinate of the key, each head L2-normalized: width ``H_kv * D``."""

    def __init__(self, num_kv_heads: int, head_dim: int):
        self.num_kv_heads, self.head_dim = num_kv_heads, head_dim
        self.width = num_kv_heads * head_dim

    def __call__(self, raw: Tensor, out: Tensor | None = None) -> Tensor:
        """raw (..., H_kv, D) float32 -> unit rows (..., width) float32 (into ``out`` if given)."""
        if out is None:
            out = torch.empty((*raw.shape[:-2], self.width), dtype=torch.float32, device=raw.device)
        return _normalized_heads(raw, out)


class CountSketch:
    """Each head's ``D`` coordinates summed into ``m`` signed buckets, then normalized: width ``H_kv * m``.

    The buckets and signs are drawn once from ``seed``: every bank built with the same shape and
    seed embeds a key the same way (a split or a check recomputes what ``assign`` computed).
    """

    def __init__(self, num_kv_heads: int, head_dim: int, dims: int, seed: int = 0):
        if not 0 < dims < head_dim:
            raise ValueError(f"sketch dims must be in 1 .. {head_dim - 1} (below the head dim), got {dims}")
        self.num_kv_heads, self.head_dim, self.dims = num_kv_heads, head_dim, dims
        self.width = num_kv_heads * dims
        gen = torch.Generator().manual_seed(seed)
        bucket = torch.empty(head_dim, dtype=torch.int64)
        bucket[torch.randperm(head_dim, generator=gen)] = torch.arange(head_dim) % dims
        sign = torch.where(torch.rand(head_dim, generator=gen) < 0.5, -1.0, 1.0)
        self.bucket, self.sign = bucket, sign
        # the host kernel gathers: members[k, b] is bucket b's k-th coordinate (ascending), with
        # its sign in signs[k, b], so each head's m sums are ceil(D / m) passes over m lanes; a
        # bucket with fewer coordinates is padded with coordinate 0 at sign 0 after its last one
        order = torch.argsort(bucket, stable=True)
        sizes = torch.bincount(bucket, minlength=dims)
        rank = torch.arange(head_dim) - (torch.cumsum(sizes, 0) - sizes)[bucket[order]]
        self.members = torch.zeros(int(sizes.max()), dims, dtype=torch.int64)
        self.signs = torch.zeros(int(sizes.max()), dims)
        self.members[rank, bucket[order]] = order
        self.signs[rank, bucket[order]] = sign[order]
        # the same map as a (D, m) matrix, for keys on other devices
        self.matrix = torch.zeros(head_dim, dims).index_put_((torch.arange(head_dim), bucket), sign)

    def __call__(self, raw: Tensor, out: Tensor | None = None) -> Tensor:
        """raw (..., H_kv, D) float32 -> unit rows (..., width) float32 (into ``out`` if given)."""
        lead = raw.shape[:-2]
        if out is None:
            out = torch.empty((*lead, self.width), dtype=torch.float32, device=raw.device)
        if raw.device.type == "cpu" and raw.is_contiguous() and out.is_contiguous():
            _sketch(
                raw.view(-1, self.num_kv_heads, self.head_dim).numpy(),
                self.members.numpy(),
                self.signs.numpy(),
                out.view(-1, self.width).numpy(),
            )
            return out
        return _normalized_heads(raw @ self.matrix.to(raw.device), out)  # sums (..., H_kv, m)


def _normalized_heads(x: Tensor, out: Tensor) -> Tensor:
    """x (..., H_kv, d) -> out (..., H_kv * d): each head divided by its norm times sqrt(H_kv)."""
    inv = (x.norm(dim=-1, keepdim=True).clamp_min(1e-30) * math.sqrt(x.shape[-2])).reciprocal_()
    torch.mul(x, inv, out=out.view(x.shape))
    return out


@njit("void(float32[:, :, ::1], int64[:, ::1], float32[:, ::1], float32[:, ::1])", cache=True, nogil=True)
def _sketch(raw, members, signs, out):
    """out[n, h * m + b] = (sum over k of signs[k, b] * raw[n, h, members[k, b]]), each head's m
    sums divided by their norm times sqrt(H): ``CountSketch`` on the host in one pass. A gather
    per bucket, not a scatter per coordinate: the m lanes of each step are independent, so the
    loop vectorizes (~20% faster at the 7B shape than the scatter), and each bucket still adds
    its coordinates in ascending order."""
    rows, heads, _ = raw.shape
    per, m = members.shape
    acc = np.zeros(m, np.float32)
    scale = np.float32(1.0 / math.sqrt(heads))
    for r in range(rows):
        for h in range(heads):
            x = raw[r, h]
            for b in range(m):
                acc[b] = signs[0, b] * x[members[0, b]]
            for k in range(1, per):
                for b in range(m):
                    acc[b] += signs[k, b] * x[members[k, b]]
            norm2 = np.float32(0.0)
            for b in range(m):
                norm2 += acc[b] * acc[b]
            inv = scale / max(math.sqrt(norm2), 1e-30)
            for b in range(m):
                out[r, h * m + b] = acc[b] * inv
