"""Retrieval kernels: torch references against naive float64 math, Triton kernels against the references.

The Triton kernels run under ``TRITON_INTERPRET=1`` (CPU) in a subprocess, since the variable
must be set before triton is first imported. Tolerances: torch references vs float64 math
1e-5 (fp32); Triton vs torch 1e-4 for fp32 inputs, 2e-3 for fp16 outputs (the output is rounded
to fp16 and the probabilities go through fp16 before the P.V product).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mosaic_ros.runtime.kv import kernels
from mosaic_ros.runtime.kv.kernels import (
    attention,
    attention_torch,
    centroid_scores,
    centroid_scores_torch,
    merge_attention,
    resolve_backend,
)

ROOT = Path(__file__).resolve().parents[1]
GQA = [(4, 2), (7, 1)]


def naive_attention(q, k, v, causal, scale):
    """Per head and query token, float64, no batching: (out, lse)."""
    hq, lq, d = q.shape
    hkv, t, _ = k.shape
    out = torch.zeros(hq, lq, d, dtype=torch.float64)
    lse = torch.zeros(hq, lq, dtype=torch.float64)
    for h in range(hq):
        g = h // (hq // hkv)
        for i in range(lq):
            visible = t - lq + i + 1 if causal else t
            logits = scale * (k[g, :visible].double() @ q[h, i].double())
            lse[h, i] = torch.logsumexp(logits, 0)
            out[h, i] = torch.softmax(logits, 0) @ v[g, :visible].double()
    return out, lse


def naive_scores(q, cen, counts, scale):
    hq, lq, _ = q.shape
    hkv = cen.shape[1]
    share = torch.zeros(cen.shape[0], dtype=torch.float64)
    for h in range(hq):
        for i in range(lq):
            z = scale * (cen[:, h // (hq // hkv)].double() @ q[h, i].double()) + counts.double().log()
            share += torch.softmax(z, 0)
    return (share / (hq * lq)).log()


@pytest.mark.parametrize(("hq", "hkv"), GQA)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(("lq", "t"), [(1, 1), (3, 37), (5, 130)])
def test_attention_reference_matches_naive(hq, hkv, causal, lq, t):
    gen = torch.Generator().manual_seed(hq * 100 + t)
    q, k, v = (torch.randn(s, generator=gen) for s in ((hq, lq, 24), (hkv, t, 24), (hkv, t, 24)))
    scale = 1 / math.sqrt(24)
    out, lse = attention_torch(q, k, v, causal, scale)
    want_out, want_lse = naive_attention(q, k, v, causal, scale)
    torch.testing.assert_close(out.double(), want_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.double(), want_lse, atol=1e-5, rtol=1e-5)


def test_attention_empty_context_and_validation():
    q = torch.randn(4, 2, 16)
    out, lse = attention(q, torch.zeros(2, 0, 16), torch.zeros(2, 0, 16), return_lse=True)
    assert bool((out == 0).all()) and bool(torch.isneginf(lse).all())
    with pytest.raises(ValueError, match="multiple"):
        attention(torch.randn(3, 1, 16), torch.randn(2, 4, 16), torch.randn(2, 4, 16))
    with pytest.raises(ValueError, match="causal"):
        attention(q, torch.randn(2, 1, 16), torch.randn(2, 1, 16), causal=True)


def test_merging_partial_attentions_equals_attention_over_the_union():
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(4, 3, 16, generator=gen)
    k, v = torch.randn(2, 50, 16, generator=gen), torch.randn(2, 50, 16, generator=gen)
    full, full_lse = attention(q, k, v, causal=True, return_lse=True, backend="torch")
    parts = [
        attention(q, k[:, :20], v[:, :20], return_lse=True, backend="torch"),
        attention(q, k[:, :0], v[:, :0], return_lse=True, backend="torch"),  # nothing visible
        attention(q, k[:, 20:], v[:, 20:], causal=True, return_lse=True, backend="torch"),
    ]
    out, lse = merge_attention([p[0] for p in parts], [p[1] for p in parts])
    torch.testing.assert_close(out, full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, full_lse, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("hq", "hkv"), GQA)
def test_centroid_scores_reference_matches_naive(hq, hkv):
    gen = torch.Generator().manual_seed(hq)
    q = torch.randn(hq, 3, 16, generator=gen)
    cen = torch.randn(9, hkv, 16, generator=gen)
    counts = torch.randint(1, 50, (9,), generator=gen)
    scores = centroid_scores_torch(q, cen, counts, 0.25)
    torch.testing.assert_close(scores.double(), naive_scores(q, cen, counts, 0.25), atol=1e-5, rtol=1e-5)
    assert torch.exp(scores).sum().item() == pytest.approx(1.0, abs=1e-5)  # average shares sum to one


def test_centroid_scores_count_empty_slots_out_and_weigh_size():
    cen = torch.tensor([[[1.0, 0.0]], [[1.0, 0.0]], [[0.0, 1.0]]])
    q = torch.tensor([[[2.0, 0.0]]])
    scores = centroid_scores(q, cen, torch.tensor([1, 9, 0]))
    assert torch.isneginf(scores[2])
    # same centroid logit: the cluster with 9x the tokens gets 9x the estimated attention mass
    assert (scores[1] - scores[0]).item() == pytest.approx(math.log(9.0), abs=1e-5)
    assert bool(torch.isneginf(centroid_scores(q, cen, torch.zeros(3, dtype=torch.int64))).all())
    # a share far below float32 range is floored, not lost: the cluster stays selectable
    far = centroid_scores(q, torch.tensor([[[100.0, 0.0]], [[-100.0, 0.0]]]), torch.tensor([1, 1]))
    assert far[0].item() == pytest.approx(0.0, abs=1e-6)
    assert far[1].item() == pytest.approx(math.log(torch.finfo(torch.float32).tiny))


def test_backend_choice(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.delenv(kernels.BACKEND_ENV, raising=False)
    assert resolve_backend(None, cpu) == "torch"
    assert resolve_backend("triton", cpu) == "triton"
    monkeypatch.setenv(kernels.BACKEND_ENV, "triton")
    assert resolve_backend(None, cpu) == "triton"
    assert resolve_backend("torch", cpu) == "torch"  # the argument wins over the environment
    monkeypatch.setenv(kernels.BACKEND_ENV, "auto")
    expected = "triton" if kernels.triton_available() else "torch"
    assert resolve_backend(None, torch.device("cuda")) == expected
    with pytest.raises(ValueError, match="backend"):
        resolve_backend("cuda", cpu)


TRITON_SCRIPT = r"""
import json, math, torch
from mosaic_ros.runtime.kv.kernels import attention, centroid_scores

gen = torch.Generator().manual_seed(0)
errors = []


def compare_attention(hq, hkv, lq, t, d, causal, dtype):
    q, k, v = (torch.randn(s, generator=gen).to(dtype) for s in ((hq, lq, d), (hkv, t, d), (hkv, t, d)))
    ref = attention(q, k, v, causal=causal, return_lse=True, backend="torch")
    got = attention(q, k, v, causal=causal, return_lse=True, backend="triton")
    errors.append({"op": "attention", "dtype": str(dtype), "case": [hq, hkv, lq, t, d, causal],
                   "out": (ref[0].float() - got[0].float()).abs().max().item(),
                   "lse": (ref[1] - got[1]).abs().max().item()})


for hq, hkv in [(4, 2), (7, 1)]:
    for lq, t in [(1, 1), (3, 37), (5, 130), (2, 200)]:
        for d in (16, 24):
            for causal in (False, True):
                for dtype in (torch.float32, torch.float16):
                    compare_attention(hq, hkv, lq, t, d, causal, dtype)
    for lq, c in [(1, 1), (3, 37), (2, 130)]:
        for d in (16, 24):
            q = torch.randn(hq, lq, d, generator=gen)
            cen = torch.randn(c, hkv, d, generator=gen)
            counts = torch.randint(0, 30, (c,), generator=gen)
            counts[0] = 5
            ref = centroid_scores(q, cen, counts, backend="torch")
            got = centroid_scores(q, cen, counts, backend="triton")
            same_inf = bool(torch.equal(torch.isfinite(ref), torch.isfinite(got)))
            finite = torch.isfinite(ref)
            errors.append({"op": "scores", "dtype": "torch.float32", "case": [hq, hkv, lq, c, d],
                           "out": (ref[finite] - got[finite]).abs().max().item() if same_inf else math.inf,
                           "lse": 0.0})
print(json.dumps(errors))
"""


@pytest.mark.skipif(not kernels.triton_available(), reason="triton is not installed")
def test_triton_kernels_match_torch_under_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT), PYTHONWARNINGS="ignore")
    proc = subprocess.run(
        [sys.executable, "-c", TRITON_SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    errors = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(errors) == 2 * 4 * 2 * 2 * 2 + 2 * 3 * 2
    for e in errors:
        tol = 2e-3 if e["dtype"] == "torch.float16" else 1e-4
        assert e["out"] <= tol and e["lse"] <= 1e-4, e
