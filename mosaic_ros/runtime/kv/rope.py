"""Rotary position math shared by the model bridge and the benchmark.

The store keeps keys pre-RoPE; attention rotates them on the device with the positions the
policy hands over. A rotary function maps positions (P, N) int64 to ``(cos, sin)``, each
(N, D) float32, such that a post-RoPE vector is ``apply_rotary(x, cos, sin)``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from numba import njit

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


@njit(
    "int64(float32[:, :, :], int64[:, :], float32[:, ::1], float32[:, ::1], float32[:, :, ::1])",
    cache=True,
    nogil=True,
)
def _rotate_from_table(keys, pos, cos, sin, out):
    """out[g, i] = keys[g, i] rotated by position pos[g, i], from half tables cos/sin (P, D/2).
    Returns 0 when done; without writing, -1 for a negative position, or the table size a
    position beyond the table needs."""
    h, t, d = keys.shape
    lo, hi = 0, -1
    for g in range(h):
        for i in range(t):
            lo = min(lo, pos[g, i])
            hi = max(hi, pos[g, i])
    if lo < 0:
        return -1
    if hi >= cos.shape[0]:
        return hi + 1
    half = d // 2
    for i in range(t):  # slot-major: a buffer holds each slot's heads side by side
        for g in range(h):
            p = pos[g, i]
            for j in range(half):
                x1 = keys[g, i, j]
                x2 = keys[g, i, half + j]
                c = cos[p, j]
                s = sin[p, j]
                out[g, i, j] = x1 * c - x2 * s
                out[g, i, half + j] = x2 * c + x1 * s
    return 0


class PositionTable:
    """Rotary cos/sin of positions 0..P-1 kept on the CPU and looked up, grown by doubling.

    On a CPU evaluating the trigonometry per call costs more than the whole attention over the
    same tokens (e.g. 0.22 ms for 768 positions at head_dim 64, against 0.02 ms for the lookup),
    and a question rotates every layer's context anew. ``half`` maps positions (N,) int64 to the
    first halves (N, D/2) float32 of cos and sin (standard RoPE repeats them in the second half);
    the table holds what ``half`` returned, so a lookup gives the same values. It costs
    ``D * 4`` bytes per position (256 B at head_dim 64) and stops growing at ``max_bytes``
    (None: no limit): ``lookup`` and ``rotate_into`` then decline positions beyond it, and
    negative ones.
    """

    def __init__(
        self,
        half: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
        head_dim: int,
        max_bytes: int | None = None,
    ):
        self.half = half
        self.limit = None if max_bytes is None else max_bytes // (head_dim * 4)
        self._cos = torch.zeros(0, head_dim // 2)
        self._sin = torch.zeros(0, head_dim // 2)

    @property
    def positions(self) -> int:
        """Positions the table holds (0..positions-1)."""
        return self._cos.shape[0]

    def _grow(self, need: int) -> bool:
        """Grow the table to at least ``need`` positions; False if the limit forbids it."""
        if self.limit is not None and need > self.limit:
            return False
        have = self.positions
        if need > have:
            size = max(need, 2 * have, 4096)
            if self.limit is not None:
                size = min(size, self.limit)
            cos, sin = self.half(torch.arange(have, size))
            self._cos, self._sin = torch.cat((self._cos, cos)), torch.cat((self._sin, sin))
        return True

    def lookup(self, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """pos (N,) int64 on the CPU -> cos, sin (N, D) float32, or None past the limit / below 0."""
        if pos.numel() == 0:
            return torch.zeros(0, 2 * self._cos.shape[1]), torch.zeros(0, 2 * self._sin.shape[1])
        lo, hi = (int(v) for v in torch.aminmax(pos))
        if lo < 0 or not self._grow(hi + 1):
            return None
        cos, sin = self._cos.index_select(0, pos), self._sin.index_select(0, pos)
        return torch.cat((cos, cos), dim=-1), torch.cat((sin, sin), dim=-1)

    def rotate_into(self, keys: torch.Tensor, pos: torch.Tensor, out: torch.Tensor) -> bool:
        """``apply_rotary`` of float32 ``keys`` (H, T, D) (any strides) by positions ``pos`` (H, T)
        int64 into ``out`` (H, T, D) float32 contiguous, in one pass that reads the table's rows
        (no (H, T, D) cos/sin made). False, ``out`` untouched, where ``lookup`` would decline."""
        k, p, o = keys.numpy(), pos.numpy(), out.numpy()
        status = _rotate_from_table(k, p, self._cos.numpy(), self._sin.numpy(), o)
        if status > 0 and self._grow(status):  # a position beyond the table: grow it, then rotate
            status = _rotate_from_table(k, p, self._cos.numpy(), self._sin.numpy(), o)
        return status == 0


class Rotary1D:
    """Standard 1-D RoPE table (``theta`` base), for benchmarks and tests without a model.

    On a CPU the cos/sin of every position seen so far are looked up in ``table``, a
    ``PositionTable`` (no size limit: 512 B per position at head_dim 128, ~1% of the KV it
    rotates). Values are identical either way (same float32 angles, same functions).
    """

    def __init__(self, head_dim: int, theta: float = 1_000_000.0, device: torch.device | str = "cpu"):
        if head_dim % 2:
            raise ValueError(f"head_dim must be even, got {head_dim}")
        exponents = torch.arange(0, head_dim, 2, dtype=torch.float64, device=device) / head_dim
        self.inv_freq = (1.0 / theta**exponents).float()
        self.table = PositionTable(self._half, head_dim) if self.inv_freq.device.type == "cpu" else None

    def _half(self, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        angles = torch.outer(pos.to(torch.float32), self.inv_freq)
        return angles.cos(), angles.sin()

    def __call__(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (1, N) or (N,) int64 -> cos, sin (N, D) float32."""
        pos = positions.reshape(-1).to(self.inv_freq.device)
        if self.table is not None:
            found = self.table.lookup(pos.to(torch.int64))
            if found is not None:
                return found
        cos, sin = self._half(pos)  # both halves share the angles: trig once, then copy
        return torch.cat((cos, cos), dim=-1), torch.cat((sin, sin), dim=-1)
