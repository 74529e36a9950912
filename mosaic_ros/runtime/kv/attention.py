"""The one attention path every policy goes through, in model runs and in the benchmark.

A query block attends to a retrieved context (fully visible, it all precedes the block)
followed by local "scratch" tokens (the chunk being ingested, or the question and the
answer so far) under a causal mask.
"""

from __future__ import annotations

import torch

from mosaic_ros.runtime.kv import kernels
from mosaic_ros.runtime.kv.policy import KVContext
from mosaic_ros.runtime.kv.rope import RotaryFn, apply_rotary_into


def rotate_context(
    ctx: KVContext,
    rotary: RotaryFn,
    *,
    dtype: torch.dtype | None = None,
    scratch: Scratch | None = None,
) -> torch.Tensor:
    """Post-RoPE keys (H_kv, T, D) of ``ctx``: its pre-RoPE keys rotated by ``ctx.positions``.

    The rotation is computed in float32 and returned in ``dtype`` (default: the keys' dtype;
    pass the attention's dtype to skip a round trip through the storage precision). With a
    ``scratch`` the float32 work and the result live in its reused buffers instead of fresh
    allocations: the result is then valid until that scratch's next use for a rotation.

    When all heads share one selection (positions expanded over heads) the rotation table
    is computed once for T tokens, not for H_kv x T. Float32 keys on a CPU whose ``rotary`` has
    a ``table`` (a ``PositionTable``: ``Rotary1D``, a 1-D RoPE model's ``ModelRotary``) are rotated
    from its rows in one compiled pass, with no cos/sin tensors made.
    """
    h, t, d = ctx.keys.shape
    dtype = ctx.keys.dtype if dtype is None else dtype
    if t == 0:
        return ctx.keys.to(dtype)
    pos = ctx.positions
    table = getattr(rotary, "table", None)
    if table is not None and ctx.keys.dtype == torch.float32 and ctx.keys.device.type == "cpu":
        if scratch is None:
            out = torch.empty((h, t, d), dtype=torch.float32)
        else:
            out = scratch.take("rotated", (h, t, d), "cpu")
        if table.rotate_into(ctx.keys, pos[0].to(torch.int64), out):
            return out if dtype == torch.float32 else out.to(dtype)
    if h == 1 or pos.stride(1) == 0:
        cos, sin = rotary(pos[:, 0])
    else:
        cos, sin = rotary(pos.reshape(pos.shape[0], h * t))
        cos, sin = cos.view(h, t, d), sin.view(h, t, d)
    # widen once into contiguous float32 (the buffer's keys are a strided view), then rotate
    if scratch is None:
        keys = ctx.keys.to(torch.float32, memory_format=torch.contiguous_format)
        out = torch.empty((h, t, d), dtype=torch.float32, device=ctx.keys.device)
    else:
        keys = scratch.take("keys", (h, t, d), ctx.keys.device)
        keys.copy_(ctx.keys)
        out = scratch.take("rotated", (h, t, d), ctx.keys.device)
    apply_rotary_into(keys, cos, sin, out)
    return out if dtype == torch.float32 else out.to(dtype)


class Scratch:
    """Reusable float32 buffers, by name, for per-layer temporaries of the attention path.

    A layer's widened and rotated context is dropped as soon as the layer has attended;
    allocating it afresh per layer costs page faults on every call (tens of MB on a CPU),
    so callers that attend layer after layer pass one Scratch to ``rotate_context`` and
    ``attend``. What ``take`` returns is valid until the next ``take`` of the same name:
    one Scratch per thread of work.
    """

    def __init__(self) -> None:
        self._bufs: dict[str, torch.Tensor] = {}

    def take(self, name: str, shape: tuple[int, ...], device: torch.device | str) -> torch.Tensor:
        numel = 1
        for s in shape:
            numel *= int(s)
        device = torch.device(device)
        buf = self._bufs.get(name)
        if buf is None or buf.numel() < numel or buf.device != device:
            buf = self._bufs[name] = torch.empty(numel, dtype=torch.float32, device=device)
        return buf[:numel].view(shape)


class MemoRotary:
    """Wraps a rotary function and reuses the last table when the same positions come again.

    Layers of one step usually attend to the same stored tokens (sinks + window, or all of
    them); their positions are then equal and the table is computed once per step.
    """

    def __init__(self, rotary: RotaryFn):
        self.rotary = rotary
        self.table = getattr(rotary, "table", None)  # rotate_context reads keys' angles from it
        self._last: tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]] | None = None

    def __call__(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        last = self._last
        if last is not None and last[0].shape == positions.shape and torch.equal(last[0], positions):
            return last[1]
        table = self.rotary(positions)
        self._last = (positions.clone(), table)
        return table

    def clear(self) -> None:
        self._last = None


def attend(
    query: torch.Tensor,
    context_keys: torch.Tensor | None,
    context_values: torch.Tensor | None,
    local_keys: torch.Tensor,
    local_values: torch.Tensor,
    scaling: float | None = None,
    scratch: Scratch | None = None,
) -> torch.Tensor:
    """Attention of ``query`` (H_q, L_q, D) over context (H_kv, T, D) then local (H_kv, L_s, D).

    All tensors are post-RoPE. The last L_q local tokens are the query tokens themselves:
    query i sees the whole context and local tokens ``[0, L_s - L_q + i]``. GQA: query head
    h reads KV head ``h // (H_q // H_kv)``. The context and the local tokens are attended
    separately and merged by their log-sum-exp, so the (large) context is never copied;
    ``kernels.attention`` runs the Triton kernel on CUDA and grouped fp32 matmuls on CPU.
    With a ``scratch``, context values are widened to the query's dtype in a reused buffer.
    Returns (H_q, L_q, D) in the query's dtype.
    """
    lq = query.shape[1]
    if local_keys.shape[1] < lq:
        raise ValueError(f"local tokens ({local_keys.shape[1]}) must include the {lq} query tokens")
    has_context = context_keys is not None and context_keys.shape[1] > 0
    local = kernels.attention(
        query,
        local_keys.to(query.dtype),
        local_values.to(query.dtype),
        causal=True,
        scale=scaling,
        return_lse=has_context,
    )
    if not has_context:
        return local
    values = context_values
    if values.dtype != query.dtype:
        if scratch is not None and query.dtype == torch.float32:
            values = scratch.take("values", tuple(values.shape), values.device)
            values.copy_(context_values)
        else:
            values = values.to(query.dtype)
    ctx = kernels.attention(query, context_keys.to(query.dtype), values, scale=scaling, return_lse=True)
    out, _ = kernels.merge_attention([ctx[0], local[0]], [ctx[1], local[1]])
    return out
