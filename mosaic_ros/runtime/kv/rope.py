"""Rotary position math shared by the model bridge and the benchmark.

The store keeps keys pre-RoPE; attention rotates them on the device with the positions the
policy hands over. A rotary function maps positions (P, N) int64 to ``(cos, sin)``, each
(N, D) float32, such that a post-RoPE vector is ``apply_rotary(x, cos, sin)``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

RotaryFn = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(..., D) -> (..., D): the pairwise quarter turn RoPE is built on."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` (..., N, D) by the angles behind ``cos``/``sin`` (N, D) (broadcast over leading dims)."""
    return x * cos + rotate_half(x) * sin


def apply_rotary_into(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, out: torch.Tensor
) -> torch.Tensor:
    """``apply_rotary`` written into ``out`` (same shape as ``x``, usually float32) in three passes.

    ``x`` may be of a lower precision: each pass converts on the fly, so no float32 copy of
    ``x`` and no temporaries are made (the plain form allocates four tensors of ``x``'s size,
    which costs more than the arithmetic on a CPU). Returns ``out``.
    """
    half = x.shape[-1] // 2
    torch.mul(x, cos, out=out)
    out[..., :half].addcmul_(x[..., half:], sin[..., :half], value=-1.0)
    out[..., half:].addcmul_(x[..., :half], sin[..., half:])
    return out


def unapply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Inverse of ``apply_rotary``: recover the position-free vector."""
    return x * cos - rotate_half(x) * sin


class Rotary1D:
    """Standard 1-D RoPE table (``theta`` base), for benchmarks and tests without a model."""

    def __init__(self, head_dim: int, theta: float = 1_000_000.0, device: torch.device | str = "cpu"):
        if head_dim % 2:
            raise ValueError(f"head_dim must be even, got {head_dim}")
        exponents = torch.arange(0, head_dim, 2, dtype=torch.float64, device=device) / head_dim
        self.inv_freq = (1.0 / theta**exponents).float()

    def __call__(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (1, N) or (N,) int64 -> cos, sin (N, D) float32."""
        pos = positions.reshape(-1).to(self.inv_freq.device, torch.float32)
        angles = torch.outer(pos, self.inv_freq)
        cos, sin = angles.cos(), angles.sin()  # both halves share the angles: trig once, then copy
        return torch.cat((cos, cos), dim=-1), torch.cat((sin, sin), dim=-1)
