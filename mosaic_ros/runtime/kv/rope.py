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
    """``apply_rotary`` written into ``out`` (same shape as ``x``) without temporaries.

    Each half of ``out`` is one product and one fused multiply-add over halves of ``x`` and
    of the tables (the plain form allocates four tensors of ``x``'s size, which costs more
    than the arithmetic on a CPU). ``x`` must not share memory with ``out``. Returns ``out``.
    """
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    o1, o2 = out[..., :half], out[..., half:]
    torch.mul(x1, cos[..., :half], out=o1)
    o1.addcmul_(x2, sin[..., :half], value=-1.0)
    torch.mul(x2, cos[..., half:], out=o2)
    o2.addcmul_(x1, sin[..., half:])
    return out


def unapply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Inverse of ``apply_rotary``: recover the position-free vector."""
    return x * cos - rotate_half(x) * sin


class Rotary1D:
    """Standard 1-D RoPE table (``theta`` base), for benchmarks and tests without a model.

    On a CPU the cos/sin of every position seen so far are kept in a table (grown by
    doubling, 512 B per position for head_dim 128: ~1% of the KV it rotates) and looked up,
    since evaluating the trigonometry per call costs more than the whole attention over the
    same tokens there. Values are identical either way (same float32 angles, same functions).
    """

    def __init__(self, head_dim: int, theta: float = 1_000_000.0, device: torch.device | str = "cpu"):
        if head_dim % 2:
            raise ValueError(f"head_dim must be even, got {head_dim}")
        exponents = torch.arange(0, head_dim, 2, dtype=torch.float64, device=device) / head_dim
        self.inv_freq = (1.0 / theta**exponents).float()
        self._table: tuple[torch.Tensor, torch.Tensor] | None = None  # CPU: (P, D/2) cos, sin

    def _half(self, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        angles = torch.outer(pos.to(torch.float32), self.inv_freq)
        return angles.cos(), angles.sin()

    def _lookup(self, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        need = int(pos.max()) + 1 if pos.numel() else 0
        have = 0 if self._table is None else self._table[0].shape[0]
        if need > have:
            size = max(need, 2 * have, 4096)
            cos, sin = self._half(torch.arange(have, size))
            if self._table is not None:
                cos, sin = torch.cat((self._table[0], cos)), torch.cat((self._table[1], sin))
            self._table = (cos, sin)
        return self._table[0].index_select(0, pos), self._table[1].index_select(0, pos)

    def __call__(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (1, N) or (N,) int64 -> cos, sin (N, D) float32."""
        pos = positions.reshape(-1).to(self.inv_freq.device)
        if pos.device.type == "cpu" and (pos.numel() == 0 or int(pos.min()) >= 0):
            cos, sin = self._lookup(pos.to(torch.int64))
        else:
            cos, sin = self._half(pos)  # both halves share the angles: trig once, then copy
        return torch.cat((cos, cos), dim=-1), torch.cat((sin, sin), dim=-1)
