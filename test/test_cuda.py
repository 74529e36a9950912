"""The CUDA path: pinned pages and side-stream copies, every policy on the device, the Triton
kernels at real shapes, and a stream session on the GPU.

Every test here is marked ``cuda``: it needs a CUDA device and is skipped, with that reason,
where there is none (``conftest.py``). ``scripts/gpu_check`` runs them on a GPU machine.
Tolerances: the Triton kernels accumulate in fp32 like the torch path; fp16/bf16 inputs are
rounded once on the way in, so outputs agree to 2e-3 (fp16) / 1e-2 (bf16) absolute, fp32 to 1e-4.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mosaic_ros.runtime.kv import kernels
from mosaic_ros.runtime.kv.policy import KVGeometry, PolicyConfig, TokenMeta, make_policy
from mosaic_ros.runtime.kv.store import DeviceBuffer, HostKVStore

pytestmark = pytest.mark.cuda

CUDA = torch.device("cuda")
GEOM = KVGeometry(num_layers=2, num_kv_heads=2, head_dim=64, num_q_heads=4)


def token_meta(start: int, n: int, frame: int) -> TokenMeta:
    return TokenMeta(
        positions=torch.arange(start, start + n)[None],
        stamps=torch.full((n,), float(frame), dtype=torch.float64),
        modality=torch.ones(n, dtype=torch.uint8),
        frame=torch.full((n,), frame, dtype=torch.int64),
    )


def pinned_store(n: int, chunk: int = 50) -> tuple[HostKVStore, dict[int, torch.Tensor]]:
    """A pinned host store of ``n`` tokens and the truth per layer, (n, 2, H_kv, D) fp16 on CPU."""
    gen = torch.Generator().manual_seed(0)
    store = HostKVStore(GEOM, page_rows=128, pin=True)
    truth: dict[int, list[torch.Tensor]] = {layer: [] for layer in range(GEOM.num_layers)}
    for start in range(0, n, chunk):
        ids = store.add_tokens(token_meta(start, chunk, start // chunk))
        for layer in range(GEOM.num_layers):
            k = torch.randn(chunk, 2, 64, generator=gen).half()
            v = torch.randn(chunk, 2, 64, generator=gen).half()
            store.append(layer, ids, k, v)
            truth[layer].append(torch.stack((k, v), dim=1))
    return store, {layer: torch.cat(rows) for layer, rows in truth.items()}


def test_store_pages_are_pinned_and_fetches_are_asynchronous_and_exact() -> None:
    store, truth = pinned_store(600)
    assert store.pin and all(page.is_pinned() for page in store.pool.pages[0])
    buf = DeviceBuffer(GEOM, 400, CUDA)
    sel = torch.cat((torch.arange(0, 200), torch.arange(300, 340), torch.tensor([401, 433, 599])))
    stats = store.fetch(0, store.rows_of(0, sel), buf)
    assert stats.events is not None  # copies were issued on the side stream
    assert stats.bytes_moved == sel.numel() * 2 * GEOM.token_row_bytes
    ctx = buf.context()
    ids = ctx.token_ids[0].cpu()
    assert sorted(ids.tolist()) == sorted(sel.tolist())
    assert ctx.keys.device.type == "cuda"
    assert torch.equal(ctx.keys.cpu(), truth[0][ids][:, 0].permute(1, 0, 2))
    assert torch.equal(ctx.values.cpu(), truth[0][ids][:, 1].permute(1, 0, 2))


def test_a_prefetch_without_waiting_is_complete_once_the_next_fetch_waits() -> None:
    store, truth = pinned_store(600)
    buf = DeviceBuffer(GEOM, 300, CUDA)
    first = torch.arange(100, 400)
    store.fetch(1, store.rows_of(1, first), buf, wait=False)
    again = store.fetch(1, store.rows_of(1, first), buf)  # all resident: nothing copied
    assert again.tokens_reused == first.numel() and again.bytes_moved == 0
    ctx = buf.context()
    ids = ctx.token_ids[0].cpu()
    assert torch.equal(ctx.keys.cpu(), truth[1][ids][:, 0].permute(1, 0, 2))


def test_fetches_into_a_buffer_on_any_gpu_use_that_gpus_stream_and_count_their_staging() -> None:
    """The copy engine keys its side streams by the buffer's device, whichever device is current."""
    store, truth = pinned_store(600)
    scattered = torch.arange(0, 600, 3)  # short runs: gathered through the pinned staging tensor
    for index in range(torch.cuda.device_count()):
        device = torch.device("cuda", index)
        buf = DeviceBuffer(GEOM, 200, device)
        with torch.cuda.device(torch.cuda.device_count() - 1 - index):
            stats = store.fetch(0, store.rows_of(0, scattered), buf)
        assert store.engine(buf).stream(device).device == device
        assert stats.events is not None and stats.device_ms() > 0
        ctx = buf.context()
        assert ctx.keys.device == device
        ids = ctx.token_ids[0].cpu()
        assert sorted(ids.tolist()) == scattered.tolist()
        assert torch.equal(ctx.keys.cpu(), truth[0][ids][:, 0].permute(1, 0, 2))
    assert store.staging_bytes >= scattered.numel() * 2 * GEOM.token_row_bytes


def stream(policy, frames: int, tokens: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    g = policy.geometry
    for f in range(frames):
        ids = policy.add_tokens(token_meta(f * tokens, tokens, f))
        for layer in range(g.num_layers):
            keys = torch.randn(tokens, g.num_kv_heads, g.head_dim, generator=gen).to(g.dtype)
            values = torch.randn(tokens, g.num_kv_heads, g.head_dim, generator=gen).to(g.dtype)
            policy.ingest_context(layer)
            policy.append(layer, keys.to(policy.device), values.to(policy.device), ids)
        policy.maintain(10_000.0)  # a budget no frame uses up: time-boxed work would differ by run


@pytest.mark.parametrize("name", ["window", "token_topk", "rekv", "livevlm", "mosaic"])
def test_every_policy_selects_on_cuda_what_it_selects_on_cpu(name: str) -> None:
    """Same stream, same question: the device's selection overlaps the CPU's by >= 90% of its
    tokens (scores summed in another order may break near-ties differently, and a cluster that
    flips moves all its tokens) and every handed token's key is the one stored for it."""
    geometry = KVGeometry(num_layers=2, num_kv_heads=2, head_dim=64, num_q_heads=4, dtype=torch.float32)
    config = PolicyConfig(budget_tokens=512, sink_tokens=8, window_tokens=64)
    query = torch.randn(4, 6, 64, generator=torch.Generator().manual_seed(9))
    picked = {}
    for device in ("cpu", "cuda"):
        policy = make_policy(name, geometry, config, device)
        stream(policy, frames=40, tokens=40, seed=1)
        policy.begin_question()
        picked[device] = []
        for layer in range(geometry.num_layers):
            ctx = policy.retrieve(layer, query.to(device))
            assert ctx.keys.device.type == device
            picked[device].append((ctx.token_ids.cpu(), ctx.keys.cpu()))
        policy.end_question()
    for (ids_cpu, keys_cpu), (ids_gpu, keys_gpu) in zip(picked["cpu"], picked["cuda"], strict=True):
        for head in range(geometry.num_kv_heads):
            cpu_set, gpu_set = set(ids_cpu[head].tolist()), set(ids_gpu[head].tolist())
            assert len(cpu_set & gpu_set) >= 0.9 * len(cpu_set)
            shared = sorted(cpu_set & gpu_set)
            cpu_rows = {t: i for i, t in enumerate(ids_cpu[head].tolist())}
            gpu_rows = {t: i for i, t in enumerate(ids_gpu[head].tolist())}
            for t in shared[:: max(1, len(shared) // 50)]:
                assert torch.equal(keys_cpu[head, cpu_rows[t]], keys_gpu[head, gpu_rows[t]])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("causal", [False, True])
def test_triton_attention_matches_torch_at_the_7b_shape(dtype: torch.dtype, causal: bool) -> None:
    gen = torch.Generator(device=CUDA).manual_seed(0)
    q = torch.randn(28, 24, 128, device=CUDA, generator=gen).to(dtype)
    k = torch.randn(4, 8192, 128, device=CUDA, generator=gen).to(dtype)
    v = torch.randn(4, 8192, 128, device=CUDA, generator=gen).to(dtype)
    ref_out, ref_lse = kernels.attention(q, k, v, causal=causal, return_lse=True, backend="torch")
    out, lse = kernels.attention(q, k, v, causal=causal, return_lse=True, backend="triton")
    tol = {torch.float16: 2e-3, torch.bfloat16: 1e-2, torch.float32: 1e-4}[dtype]
    assert (out.float() - ref_out.float()).abs().max().item() <= tol
    assert (lse - ref_lse).abs().max().item() <= 1e-3


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_triton_centroid_scores_match_torch_at_the_7b_shape(dtype: torch.dtype) -> None:
    gen = torch.Generator(device=CUDA).manual_seed(0)
    q = torch.randn(28, 24, 128, device=CUDA, generator=gen).to(dtype)
    centroids = torch.randn(2048, 4, 128, device=CUDA, generator=gen).to(dtype)
    counts = torch.randint(0, 200, (2048,), device=CUDA, generator=gen)
    ref = kernels.centroid_scores(q, centroids, counts, backend="torch")
    got = kernels.centroid_scores(q, centroids, counts, backend="triton")
    assert torch.equal(torch.isfinite(ref), torch.isfinite(got))
    finite = torch.isfinite(ref)
    assert (ref[finite] - got[finite]).abs().max().item() <= 1e-3


def test_a_stream_session_runs_on_cuda_with_prefetch() -> None:
    from mosaic_ros.runtime.models import load_model
    from mosaic_ros.runtime.session import SessionConfig, StreamSession

    adapter = load_model("tiny-random:qwen2.5-vl", device="cuda", dtype="float32")
    session = StreamSession(
        adapter,
        SessionConfig(policy="mosaic", kv=PolicyConfig(budget_tokens=96, window_tokens=32), max_new_tokens=4),
    )
    rng = np.random.default_rng(0)
    for i in range(12):
        session.ingest(rng.integers(0, 256, (96, 128, 3), dtype=np.uint8), stamp=float(i))
    answer = session.ask("What is on the table?")
    assert answer.stats.tokens_generated >= 1
    assert answer.stats.bytes_moved > 0
    assert 0.0 <= answer.stats.prefetch_hit_rate <= 1.0
    assert answer.stats.device_kv_bytes > 0
