"""The context rotation every policy's attention goes through: in-place form against the plain RoPE math."""

from __future__ import annotations

import math

import pytest
import torch

from mosaic_ros.runtime.kv.attention import Scratch, attend, rotate_context
from mosaic_ros.runtime.kv.policy import KVContext
from mosaic_ros.runtime.kv.rope import Rotary1D, apply_rotary, apply_rotary_into


def test_rotary1d_table_is_cos_and_sin_of_position_times_frequency():
    rot = Rotary1D(8, theta=10_000.0)
    pos = torch.tensor([[0, 1, 5, 250_000]])
    cos, sin = rot(pos)
    for j, p in enumerate(pos[0].tolist()):
        for i in range(8):
            freq = 10_000.0 ** (-(2 * (i % 4)) / 8)
            angle = torch.tensor(p, dtype=torch.float32) * torch.tensor(freq, dtype=torch.float32)
            assert float(cos[j, i]) == pytest.approx(math.cos(float(angle)), abs=2e-6)
            assert float(sin[j, i]) == pytest.approx(math.sin(float(angle)), abs=2e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_apply_rotary_into_equals_the_plain_form(dtype):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 50, 16, generator=gen).to(dtype)
    cos, sin = Rotary1D(16)(torch.randint(0, 300_000, (1, 50), generator=gen))
    out = torch.full((3, 50, 16), float("nan"))
    got = apply_rotary_into(x, cos, sin, out)
    assert got is out
    torch.testing.assert_close(got, apply_rotary(x.float(), cos, sin), rtol=0, atol=1e-6)
    # per-head tables (3, 50, 16) broadcast the same way
    cos_h, sin_h = cos.expand(3, 50, 16), sin.expand(3, 50, 16)
    per_head = apply_rotary_into(x, cos_h, sin_h, torch.empty(3, 50, 16))
    torch.testing.assert_close(per_head, got, rtol=0, atol=0)


def _context(per_head: bool) -> KVContext:
    gen = torch.Generator().manual_seed(1)
    h, t, d = 2, 40, 16
    keys = torch.randn(h, t, d, generator=gen).half()
    values = torch.randn(h, t, d, generator=gen).half()
    if per_head:
        pos = torch.randint(0, 10_000, (1, h, t), generator=gen)
    else:
        pos = torch.randint(0, 10_000, (1, 1, t), generator=gen).expand(1, h, t)
    return KVContext(keys=keys, values=values, positions=pos, token_ids=torch.arange(t).expand(h, t))


@pytest.mark.parametrize("per_head", [False, True])
def test_rotate_context_dtype_and_out(per_head):
    ctx = _context(per_head)
    rot = Rotary1D(16)
    h, t, d = ctx.keys.shape
    expect = torch.stack([apply_rotary(ctx.keys[g].float(), *rot(ctx.positions[:, g])) for g in range(h)])
    default = rotate_context(ctx, rot)
    assert default.dtype == torch.float16  # the keys' dtype unless told otherwise
    torch.testing.assert_close(default, expect.half(), rtol=1e-3, atol=1e-3)  # one fp16 rounding
    full = rotate_context(ctx, rot, dtype=torch.float32)
    torch.testing.assert_close(full, expect, rtol=0, atol=1e-6)
    scratch = Scratch()
    into = rotate_context(ctx, rot, dtype=torch.float32, scratch=scratch)
    assert into.data_ptr() == scratch.take("rotated", (h, t, d), "cpu").data_ptr()
    torch.testing.assert_close(into, full, rtol=0, atol=0)
    again = rotate_context(ctx, rot, dtype=torch.float16, scratch=scratch)
    torch.testing.assert_close(again, default, rtol=0, atol=0)


def test_attend_with_scratch_equals_attend_without():
    ctx = _context(per_head=False)
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(4, 3, 16, generator=gen)
    local_k, local_v = torch.randn(2, 5, 16, generator=gen), torch.randn(2, 5, 16, generator=gen)
    rot = Rotary1D(16)
    plain = attend(q, rotate_context(ctx, rot, dtype=torch.float32), ctx.values, local_k, local_v)
    scratch = Scratch()
    for _ in range(2):  # the second pass reuses the buffers
        keys = rotate_context(ctx, rot, dtype=torch.float32, scratch=scratch)
        fast = attend(q, keys, ctx.values, local_k, local_v, scratch=scratch)
        torch.testing.assert_close(fast, plain, rtol=0, atol=0)


def test_rotary1d_cpu_table_equals_direct_evaluation():
    rot = Rotary1D(16)
    pos = torch.tensor([[7, 0, 70_000, 3, 5000]])
    cos, sin = rot(pos)  # grows the table to 70,001 positions
    angles = torch.outer(pos[0].float(), rot.inv_freq)
    assert torch.equal(cos, torch.cat((angles.cos(), angles.cos()), -1))
    assert torch.equal(sin, torch.cat((angles.sin(), angles.sin()), -1))
    assert torch.equal(rot(pos[:, 1:3])[0], cos[1:3])  # lookups after growth


def test_scratch_reuses_its_buffer_and_grows_when_asked_for_more():
    s = Scratch()
    a = s.take("x", (2, 10, 4), "cpu")
    b = s.take("x", (2, 5, 4), "cpu")
    assert a.shape == (2, 10, 4) and b.shape == (2, 5, 4) and b.is_contiguous()
    assert a.data_ptr() == b.data_ptr()  # smaller request: same memory
    assert s.take("y", (2, 5, 4), "cpu").data_ptr() != a.data_ptr()  # names do not share
    c = s.take("x", (2, 20, 4), "cpu")
    assert c.shape == (2, 20, 4) and c.numel() == 160
    assert s.take("x", (2, 20, 4), "cpu").data_ptr() == c.data_ptr()


@pytest.mark.parametrize("per_head", [False, True])
def test_float32_keys_are_rotated_from_the_table_rows_as_the_plain_form_does(per_head):
    """With a ``table`` on the rotary, float32 keys (a strided view, as a buffer's are) are
    rotated in one pass from the table's rows: the plain form's values, fresh or into a scratch;
    positions beyond the table's limit take the plain path."""
    gen = torch.Generator().manual_seed(3)
    h, t, d = 3, 40, 16
    storage = torch.randn(t, 2, h, d, generator=gen)  # (slots, K/V, heads, D), like a buffer
    keys = storage[:, 0].permute(1, 0, 2)
    if per_head:
        pos = torch.randint(0, 10_000, (1, h, t), generator=gen)
    else:
        pos = torch.randint(0, 10_000, (1, 1, t), generator=gen).expand(1, h, t)
    ctx = KVContext(keys=keys, values=keys, positions=pos, token_ids=torch.arange(t).expand(h, t))
    rot = Rotary1D(d)
    expect = torch.stack([apply_rotary(keys[g], *rot(pos[:, g])) for g in range(h)])
    got = rotate_context(ctx, rot)
    assert got.dtype == torch.float32 and got.is_contiguous()
    torch.testing.assert_close(got, expect, rtol=0, atol=1e-6)
    scratch = Scratch()
    into = rotate_context(ctx, rot, scratch=scratch)
    assert into.data_ptr() == scratch.take("rotated", (h, t, d), "cpu").data_ptr()
    torch.testing.assert_close(into, got, rtol=0, atol=0)
    torch.testing.assert_close(rotate_context(ctx, rot, dtype=torch.float16), got.half(), rtol=0, atol=0)
    direct = torch.empty(h, t, d)
    assert rot.table.rotate_into(keys, pos[0], direct)  # the pass rotate_context takes
    torch.testing.assert_close(direct, got, rtol=0, atol=0)
    small = Rotary1D(d)
    small.table.limit = 5_000  # a table that may not grow to the positions asked: the plain path
    out = torch.full((h, t, d), float("nan"))
    assert not small.table.rotate_into(keys, pos[0], out) and bool(out.isnan().all())
    assert small.table.positions == 0
    torch.testing.assert_close(rotate_context(ctx, small), expect, rtol=0, atol=1e-6)
    negative = KVContext(keys=keys, values=keys, positions=pos - 20_000, token_ids=ctx.token_ids)
    far = torch.stack([apply_rotary(keys[g], *rot(pos[:, g] - 20_000)) for g in range(h)])
    torch.testing.assert_close(rotate_context(negative, rot), far, rtol=0, atol=1e-6)
