"""The disk tier: cold store pages spill to files under a host cap and come back when selected."""

from __future__ import annotations

import fcntl
import os

import numpy as np
import pytest
import torch
from test_policies import GEOM, context_output, frame_meta
from test_store import GEOM as STORE_GEOM
from test_store import filled_store

from mosaic_ros.runtime.kv.disk import PageFiles
from mosaic_ros.runtime.kv.policy import PolicyConfig, make_policy
from mosaic_ros.runtime.kv.store import DeviceBuffer

SETTINGS = dict(budget_tokens=64, sink_tokens=4, window_tokens=16)
HOST_CAP = 200 * GEOM.bytes_per_token  # 200 tokens of KV (51,200 B)
FRAMES, PER_FRAME = 40, 20  # 800 tokens: four times what the host cap holds


def disk_policy(name: str, root, disk_cap: int = 20 * HOST_CAP, **kw):
    config = PolicyConfig(
        **SETTINGS, host_cap_bytes=HOST_CAP, disk_cap_bytes=disk_cap, disk_dir=str(root), **kw
    )
    return make_policy(name, GEOM, config)


def stream(policies, frames: int = FRAMES, seed: int = 0, after_frame=None) -> dict:
    """Stream the same random KV into every policy; returns the truth {layer: (N, 2, H, D)}."""
    gen = torch.Generator().manual_seed(seed)
    truth = {layer: [] for layer in range(GEOM.num_layers)}
    for f in range(frames):
        meta = frame_meta(f, f * PER_FRAME, PER_FRAME)
        kv = [
            tuple(
                torch.randn(PER_FRAME, GEOM.num_kv_heads, GEOM.head_dim, generator=gen).half() for _ in "kv"
            )
            for _ in range(GEOM.num_layers)
        ]
        for p in policies:
            ids = p.add_tokens(meta)
            for layer, (k, v) in enumerate(kv):
                p.ingest_context(layer)
                p.append(layer, k, v, ids)
            p.maintain(5.0)
            if after_frame is not None:
                after_frame(p)
        for layer, (k, v) in enumerate(kv):
            truth[layer].append(torch.stack((k, v), dim=1))
    return {layer: torch.cat(t) for layer, t in truth.items()}


def within_caps(p, disk_cap: int) -> None:
    mem = p.memory()
    assert mem.host_kv_bytes <= HOST_CAP
    assert mem.disk_kv_bytes <= disk_cap


def ask(p, gen: torch.Generator):
    """One question over every layer: per layer (context, attention output); then its stats."""
    p.begin_question()
    out = []
    for layer in range(GEOM.num_layers):
        query = torch.randn(GEOM.num_q_heads, 3, GEOM.head_dim, generator=gen)
        local = tuple(torch.randn(2, 3, GEOM.head_dim, generator=gen) for _ in "kv")
        ctx = p.retrieve(layer, query)
        out.append((ctx, context_output(ctx, query, local)))
    return out, p.end_question()


@pytest.mark.parametrize("name", ["token_topk", "window", "rekv", "livevlm", "mosaic"])
def test_a_stream_four_times_the_host_cap_keeps_every_token_and_answers_as_without_a_cap(name, tmp_path):
    capped = disk_policy(name, tmp_path)
    free = make_policy(name, GEOM, PolicyConfig(**SETTINGS))
    disk_cap = capped.config.disk_cap_bytes
    truth = stream([capped, free], after_frame=lambda p: p is capped and within_caps(p, disk_cap))
    total = FRAMES * PER_FRAME
    mem = capped.memory()
    assert mem.tokens == total and mem.tokens_evicted == 0
    assert mem.host_kv_bytes <= HOST_CAP < mem.disk_kv_bytes
    assert capped.store.pool.pages_spilled > 0
    read_from_disk = 0
    for q in range(3):
        got, stats = ask(capped, torch.Generator().manual_seed(q))
        ref, ref_stats = ask(free, torch.Generator().manual_seed(q))
        for layer, ((ctx, out), (ref_ctx, ref_out)) in enumerate(zip(got, ref, strict=True)):
            for h in range(GEOM.num_kv_heads):  # what was streamed, not stale rows
                ids = ctx.token_ids[h]
                assert torch.equal(ctx.keys[h], truth[layer][ids, 0, h])
                assert torch.equal(ctx.values[h], truth[layer][ids, 1, h])
            if name == "mosaic":
                # its selection depends on the layout (page size, host cap headroom) and on its
                # time-budgeted maintenance: the same budget, other clusters
                assert ctx.num_tokens == ref_ctx.num_tokens
                continue
            assert torch.equal(ctx.token_ids, ref_ctx.token_ids)
            assert torch.equal(ctx.keys, ref_ctx.keys) and torch.equal(ctx.values, ref_ctx.values)
            assert torch.equal(ctx.positions, ref_ctx.positions)
            assert torch.equal(out, ref_out)  # bit-identical attention output
        assert stats.tokens_retrieved == ref_stats.tokens_retrieved
        assert ref_stats.disk_fetch_ms == 0 and ref_stats.disk_bytes_read == 0
        read_from_disk += stats.disk_bytes_read
        within_caps(capped, disk_cap)
    if name == "window":  # sinks and the newest tokens: never on disk
        assert read_from_disk == 0
    else:
        assert read_from_disk > 0
    if name == "mosaic":
        capped.check_invariants()
    capped.close()


def test_disk_fetch_time_and_bytes_are_counted_apart_from_the_host_transfer(tmp_path):
    p = disk_policy("rekv", tmp_path)
    stream([p])
    _, stats = ask(p, torch.Generator().manual_seed(0))
    row = 2 * GEOM.token_row_bytes
    assert stats.disk_bytes_read > 0 and stats.disk_bytes_read % row == 0
    assert stats.disk_fetch_ms > 0 and stats.transfer_ms >= 0
    # every retrieved token reaches the buffer once: what came from disk is part of bytes_moved
    assert stats.bytes_moved >= stats.disk_bytes_read // (
        1 + 8
    )  # merged reads bring at most 8 rows more per row
    p.close()


def test_token_topk_scores_spilled_keys_from_disk_inside_the_question(tmp_path):
    p = disk_policy("token_topk", tmp_path)
    stream([p])
    spilled = sum(page is None for page in p.store.pool.pages[0]) + sum(
        page is None for page in p.store.pool.pages[1]
    )
    _, stats = ask(p, torch.Generator().manual_seed(0))
    # every spilled page is read whole for scoring (all its rows are in use: no hole in this stream)
    assert stats.disk_bytes_read >= spilled * p.store.pool.files.page_bytes
    p.close()


@pytest.mark.parametrize("compression", ["drop_oldest", "vsb"])
def test_compression_evicts_only_once_the_disk_cap_is_reached(compression, tmp_path):
    disk_cap = HOST_CAP  # host and disk together hold about 400 of the 800 tokens
    p = disk_policy("token_topk", tmp_path, disk_cap=disk_cap, compression=compression)
    evicted_at = []

    def check(policy):
        within_caps(policy, disk_cap)
        if policy.memory().tokens_evicted and not evicted_at:
            evicted_at.append(policy.store.num_tokens)

    stream([p], after_frame=check)
    mem = p.memory()
    held = sum(p.store.live_counts()) // GEOM.num_layers  # vsb keeps other tokens in each layer
    assert mem.tokens_evicted > 0 and held + mem.tokens_evicted == FRAMES * PER_FRAME
    assert evicted_at[0] > 200 + PER_FRAME  # not at the host cap: the disk took the first overflow
    assert mem.disk_kv_bytes > 0
    ask(p, torch.Generator().manual_seed(0))
    p.close()


def test_export_reads_spilled_pages_back_and_a_replay_answers_the_same(tmp_path):
    p = disk_policy("token_topk", tmp_path)
    truth = stream([p])
    ids = p.live_token_ids()
    exported = p.export_tokens(ids)
    for layer in range(GEOM.num_layers):
        assert torch.equal(exported.kv[layer], truth[layer])
    fresh = make_policy("token_topk", GEOM, PolicyConfig(**SETTINGS))
    fresh.add_tokens(exported.meta)
    for layer in range(GEOM.num_layers):
        kv = exported.kv[layer]
        fresh.append(layer, kv[:, 0], kv[:, 1], ids)
    got, _ = ask(p, torch.Generator().manual_seed(3))
    ref, _ = ask(fresh, torch.Generator().manual_seed(3))
    for (ctx, out), (ref_ctx, ref_out) in zip(got, ref, strict=True):
        assert torch.equal(ctx.token_ids, ref_ctx.token_ids) and torch.equal(out, ref_out)
    p.close()


def test_reset_and_close_remove_the_files(tmp_path):
    p = disk_policy("rekv", tmp_path)
    stream([p], frames=20)
    first = p.store.pool.files.path
    layer_files = sorted(os.listdir(first))
    assert layer_files == ["layer-000.kv", "layer-001.kv", "lock"]
    assert os.path.getsize(os.path.join(first, "layer-000.kv")) > 0
    p.reset()
    assert not os.path.exists(first)
    assert os.listdir(tmp_path) == [os.path.basename(p.store.pool.files.path)]
    stream([p], frames=20)
    p.close()
    assert os.listdir(tmp_path) == []


def test_a_new_store_removes_the_files_of_a_dead_process_but_not_of_a_live_one(tmp_path):
    live = PageFiles(str(tmp_path), 1, 64)
    dead = tmp_path / "kv-killed"
    dead.mkdir()
    (dead / "lock").touch()  # nobody holds its lock: the process that made it is gone
    (dead / "layer-000.kv").write_bytes(b"x" * 64)
    held = tmp_path / "kv-held"
    held.mkdir()
    fd = os.open(held / "lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)  # another live store (a lock is per open file)
    other = PageFiles(str(tmp_path), 1, 64)
    assert sorted(os.listdir(tmp_path)) == sorted(
        ["kv-held", os.path.basename(live.path), os.path.basename(other.path)]
    )
    os.close(fd)
    live.close()
    other.close()
    assert os.listdir(tmp_path) == ["kv-held"]


def test_an_unusable_disk_dir_is_refused_clearly(tmp_path):
    with pytest.raises(ValueError, match=r"disk_dir '.*missing' does not exist: create it"):
        disk_policy("window", tmp_path / "missing")
    (tmp_path / "file").touch()
    with pytest.raises(ValueError, match=r"disk_dir '.*file' is not a directory"):
        disk_policy("window", tmp_path / "file")
    with pytest.raises(ValueError, match="disk_dir '/sys' is not writable"):
        disk_policy("window", "/sys")
    with pytest.raises(ValueError, match="disk_cap_bytes > 0 needs host_cap_bytes > 0"):
        PolicyConfig(disk_cap_bytes=1, disk_dir=str(tmp_path))
    with pytest.raises(ValueError, match="disk_cap_bytes > 0 needs a disk_dir"):
        PolicyConfig(host_cap_bytes=HOST_CAP, disk_cap_bytes=1)
    with pytest.raises(ValueError, match="policy 'dense' attends to every token on the compute device"):
        disk_policy("dense", tmp_path)


def test_store_reads_moves_and_compacts_through_spilled_pages(tmp_path):
    store, truth = filled_store(
        200, page_rows=16, chunk=7, disk_dir=str(tmp_path), resident_pages=6, spare_pages=2, max_rows=4096
    )
    page_bytes = 16 * 2 * STORE_GEOM.token_row_bytes
    assert store.host_kv_bytes <= 6 * page_bytes
    assert store.disk_kv_bytes == (2 * 13 - 6) * page_bytes  # 13 pages a layer, 6 in memory
    for layer in range(STORE_GEOM.num_layers):
        rows = store.rows_of(layer, torch.arange(200))
        assert torch.equal(store.read(layer, rows), truth[layer])
        assert torch.equal(store.read_keys(layer, rows), truth[layer][:, 0])  # spilled pages too
        pages = [page for _, page in store.iter_pages(layer)]
        assert torch.equal(torch.cat(pages), truth[layer])
    # a fetch of scattered rows, shared and per head, into CPU buffers
    wanted = torch.tensor([0, 3, 17, 18, 19, 40, 90, 91, 150, 199])
    shared = DeviceBuffer(STORE_GEOM, 16, "cpu")
    fs = store.fetch(0, store.rows_of(0, wanted), shared)
    assert fs.disk_bytes > 0
    assert torch.equal(shared.data[: wanted.numel()], truth[0][wanted])
    per_head = DeviceBuffer(STORE_GEOM, 16, "cpu", per_head=True)
    heads = torch.stack((wanted, wanted.flip(0) // 2)).sort(dim=1).values
    store.fetch(1, store.rows_of(1, heads), per_head)
    for h in range(STORE_GEOM.num_kv_heads):
        assert torch.equal(per_head.data[: wanted.numel(), :, h], truth[1][heads[h], :, h])
    # release every third token, move some of the rest to the tail, compact: contents survive
    gone = torch.arange(0, 200, 3)
    store.evict(gone)
    kept = torch.tensor([i for i in range(200) if i % 3])
    moving = kept[::5]
    for layer in range(STORE_GEOM.num_layers):
        store.move(layer, moving, store.alloc(layer, moving.numel(), reuse_freed=False))
        store.compact(layer)
        assert torch.equal(store.read(layer, store.rows_of(layer, kept)), truth[layer][kept])
        assert store.allocated_rows(layer) == kept.numel()
    assert store.host_kv_bytes <= 6 * page_bytes
    assert np.all([len(p) == -(-kept.numel() // 16) for p in store.pool.pages])
    path = store.pool.files.path
    store.close()
    assert not os.path.exists(path)


def test_mosaic_names_its_nursery_ring_hot_so_the_tier_keeps_it_in_memory(tmp_path):
    p = disk_policy("mosaic", tmp_path)
    rings = []

    def check(policy) -> None:
        for layer in range(GEOM.num_layers):
            st = policy._layers[layer]
            hot = policy.hot_rows(layer)
            ring = torch.arange(st.ring_lo, st.ring_lo + st.ring_size)
            assert bool(torch.isin(ring, hot).all())
            assert bool(torch.isin(policy.store.rows_of(layer, policy.ingest_ids(layer)), hot).all())
            rings.append(st.ring_size)

    stream([p], after_frame=check)
    assert max(rings) > 0  # a ring existed (it is dropped and remade at relayouts)
    p.close()
