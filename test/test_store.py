"""HostKVStore: accounting, placement and relocation, run detection, fetch and buffer reuse."""

from __future__ import annotations

import pytest
import torch
from test_policies import assert_map_inverts_slots

from mosaic_ros.runtime.kv.copy import HOST_PARALLEL_ROWS, HOST_RUN_MIN_ROWS
from mosaic_ros.runtime.kv.policy import KVGeometry, TokenMeta
from mosaic_ros.runtime.kv.pool import contiguous_runs
from mosaic_ros.runtime.kv.store import DeviceBuffer, HostKVStore, StoreFullError

GEOM = KVGeometry(num_layers=2, num_kv_heads=2, head_dim=8, num_q_heads=4)


def meta(start: int, n: int, frame: int = 0) -> TokenMeta:
    return TokenMeta(
        positions=torch.arange(start, start + n)[None],
        stamps=torch.full((n,), float(frame)),
        modality=torch.ones(n, dtype=torch.uint8),
        frame=torch.full((n,), frame),
    )


def filled_store(
    n: int, page_rows: int = 16, chunk: int = 5, seed: int = 0, **kw
) -> tuple[HostKVStore, dict]:
    """A store with ``n`` tokens appended in chunks, and the ground truth per layer (n, 2, H, D)."""
    gen = torch.Generator().manual_seed(seed)
    store = HostKVStore(GEOM, page_rows=page_rows, **kw)
    truth = {layer: [] for layer in range(GEOM.num_layers)}
    for start in range(0, n, chunk):
        c = min(chunk, n - start)
        ids = store.add_tokens(meta(start, c, frame=start // chunk))
        for layer in range(GEOM.num_layers):
            k = torch.randn(c, 2, 8, generator=gen).half()
            v = torch.randn(c, 2, 8, generator=gen).half()
            store.append(layer, ids, k, v)
            truth[layer].append(torch.stack((k, v), dim=1))
    return store, {layer: torch.cat(t) for layer, t in truth.items()}


def test_host_bytes_equal_the_sum_of_page_tensor_sizes():
    store, _ = filled_store(50, page_rows=16)
    expected = sum(p.numel() * p.element_size() for pages in store.pool.pages for p in pages)
    assert store.host_kv_bytes == expected
    # 50 rows -> 4 pages of 16 rows per layer; a row is K+V = 2 * 2 heads * 8 dims * 2 bytes.
    assert store.host_kv_bytes == 2 * 4 * 16 * 64
    assert store.used_kv_bytes == 2 * 50 * 64


def test_read_returns_what_was_appended():
    store, truth = filled_store(37)
    rows = store.rows_of(1, torch.arange(37))
    assert torch.equal(store.read(1, rows), truth[1])
    shuffled = rows[torch.randperm(37, generator=torch.Generator().manual_seed(3))]
    assert torch.equal(store.read_keys(1, shuffled), store.read(1, shuffled)[:, 0])  # the keys alone


def test_contiguous_runs_split_at_gaps_and_page_boundaries():
    starts, lengths = contiguous_runs(torch.tensor([0, 1, 2, 5, 6, 14, 15, 16, 17]), break_every=16)
    assert starts.tolist() == [0, 5, 14, 16]
    assert lengths.tolist() == [3, 2, 2, 2]


def test_place_and_move_relocate_without_changing_data():
    store, truth = filled_store(20, page_rows=8)
    ids = torch.tensor([3, 11, 17])
    dest = store.alloc(0, 3)
    store.move(0, ids, dest)
    assert store.rows_of(0, ids).tolist() == dest.tolist()
    assert torch.equal(store.read(0, dest), truth[0][ids])
    assert torch.equal(store.read(0, store.rows_of(0, torch.arange(20))), truth[0])
    # The other layer is untouched.
    assert store.rows_of(1, ids).tolist() == ids.tolist()


def test_repoint_follows_moved_and_compacted_tokens_without_copying():
    store, truth = filled_store(20, page_rows=8)
    buf = DeviceBuffer(GEOM, 6, "cpu")
    store.fetch(0, store.rows_of(0, torch.tensor([3, 11, 17, 4])), buf)
    held = buf.slot_ids[0, :4].clone()
    data_before = buf.data.clone()
    store.move(0, torch.tensor([3, 17]), store.alloc(0, 2))  # two of them move
    store.release(0, torch.tensor([4]))  # one leaves the layer
    store.compact(0)  # and everything shifts down
    with pytest.raises(RuntimeError, match="layout changed"):
        store.copy_to_slots(0, store.rows_of(0, torch.tensor([5])), buf, torch.tensor([5]))
    store.repoint(0, buf)
    assert torch.equal(buf.data, data_before)  # nothing copied
    kept = held != 4
    assert buf.slot_rows[0, :4][kept].tolist() == store.rows_of(0, held[kept]).tolist()
    assert (buf.slot_rows[0, :4][~kept] == -1).all() and (buf.slot_rows[0, 4:] == -1).all()
    assert_map_inverts_slots(buf)
    store.copy_to_slots(0, store.rows_of(0, torch.tensor([5])), buf, torch.tensor([5]))  # current
    # a fetch after further moves keeps every resident token and copies only the new one
    store.move(0, torch.tensor([11]), store.alloc(0, 1))
    stats = store.fetch(0, store.rows_of(0, torch.tensor([3, 11, 17, 9])), buf)
    assert stats.tokens_copied == 1
    ctx = buf.context()
    assert sorted(ctx.token_ids[0].tolist()) == [3, 9, 11, 17]
    want = truth[0][ctx.token_ids[0]]
    assert torch.equal(ctx.keys.permute(1, 0, 2), want[:, 0])
    assert torch.equal(ctx.values.permute(1, 0, 2), want[:, 1])


def test_place_writes_into_rows_the_policy_chose():
    store = HostKVStore(GEOM, page_rows=8)
    ids = store.add_tokens(meta(0, 4))
    rows = store.alloc(0, 10)
    chosen = rows[torch.tensor([9, 2, 5, 0])]
    k = torch.randn(4, 2, 8).half()
    v = torch.randn(4, 2, 8).half()
    store.place(0, ids, chosen, k, v)
    assert torch.equal(store.read(0, chosen), torch.stack((k, v), dim=1))
    with pytest.raises(ValueError, match="free"):
        store.place(0, ids, chosen, k, v)


def test_release_then_compact_reuses_rows_and_frees_pages():
    store, truth = filled_store(64, page_rows=16)
    gone = torch.arange(8, 48)
    store.evict(gone)
    assert store.live_counts() == [24, 24]
    assert not bool(store.alive[gone].any())
    for layer in range(2):
        store.compact(layer)
    assert store.host_kv_bytes == 2 * 2 * 16 * 64  # 24 live rows need 2 pages of 16
    kept = torch.cat((torch.arange(8), torch.arange(48, 64)))
    assert store.rows_of(0, kept).tolist() == list(range(24))
    assert torch.equal(store.read(0, torch.arange(24)), truth[0][kept])


def test_alloc_compacts_instead_of_growing_past_max_rows():
    store, truth = filled_store(32, page_rows=16, max_rows=32)
    store.evict(torch.arange(4, 14))
    ids = store.add_tokens(meta(32, 6, frame=99))
    k = torch.randn(6, 2, 8).half()
    for layer in range(2):
        store.append(layer, ids, k, k)
    assert store.host_kv_bytes == 2 * 2 * 16 * 64
    kept = torch.cat((torch.arange(4), torch.arange(14, 32)))
    assert torch.equal(store.read(1, store.rows_of(1, kept)), truth[1][kept])
    with pytest.raises(StoreFullError):
        store.alloc(0, 10)


def test_alloc_without_reusing_freed_rows_grows_and_keeps_the_layout():
    store, truth = filled_store(32, page_rows=16)
    store.release(0, torch.arange(4, 14))
    version = store.layout_version(0)
    rows = store.alloc(0, 6, reuse_freed=False)
    assert rows.tolist() == list(range(32, 38))
    assert store.layout_version(0) == version  # no compaction: the freed rows stay where they were
    kept = torch.cat((torch.arange(4), torch.arange(14, 32)))
    assert store.rows_of(0, kept).tolist() == kept.tolist()
    assert torch.equal(store.read(0, store.rows_of(0, kept)), truth[0][kept])
    store.alloc(0, 12)  # the default still compacts before it grows past the last page
    assert store.rows_of(0, kept).tolist() == list(range(22))


@pytest.mark.parametrize("run_min_rows", [1, 5, 10_000])
def test_host_fetch_copies_long_runs_and_gathers_the_rest_whatever_the_run_threshold(run_min_rows):
    # run_min_rows picks runs or gathers for copies to another device; CPU to CPU a run of at
    # least HOST_RUN_MIN_ROWS rows is one copy, the rows of shorter runs one gather per page
    assert HOST_RUN_MIN_ROWS == 16  # the selection below is cut for it
    store, truth = filled_store(60, page_rows=16, run_min_rows=run_min_rows)
    sel = torch.cat((torch.arange(0, 4), torch.arange(10, 32), torch.tensor([41, 43, 59])))
    buf = DeviceBuffer(GEOM, 40, "cpu")
    fs = store.fetch(0, store.rows_of(0, sel), buf)
    ctx = buf.context()
    ids = ctx.token_ids[0]
    assert ids.tolist() == sel.tolist()
    assert torch.equal(ctx.keys, truth[0][ids][:, 0].permute(1, 0, 2))
    assert torch.equal(ctx.values, truth[0][ids][:, 1].permute(1, 0, 2))
    assert torch.equal(ctx.positions[0, 0], ids)
    assert fs.bytes_moved == sel.numel() * 2 * GEOM.token_row_bytes
    # runs [0,4) [10,16) [16,32) (split at row 16), 41, 43, 59: [16,32) is copied; the others are
    # gathered from pages 0, 2 and 3
    assert fs.copies == 4
    assert fs.tokens_copied == sel.numel() and fs.tokens_reused == 0


@pytest.fixture(params=[1, 2], ids=["1-thread", "2-threads"])
def torch_threads(request):
    """Runs a test with torch using 1 and 2 intra-op threads (host copies pick their path by it)."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


def test_fetch_into_fragmented_free_slots_copies_long_and_short_runs_exactly(torch_threads):
    """Long runs (torch copies, >= HOST_PARALLEL_ROWS rows, with 2 threads), shorter runs (numpy)
    and single rows (a compiled gather per page) fill the free slots a previous question left
    around its resident rows."""
    store, truth = filled_store(600, page_rows=256, chunk=50)
    buf = DeviceBuffer(GEOM, 400, "cpu")
    first = torch.cat((torch.arange(0, 100), torch.arange(300, 400)))  # slots 0..199
    store.fetch(0, store.rows_of(0, first), buf)
    long_run = torch.arange(420, 420 + HOST_PARALLEL_ROWS + 10)
    sel = torch.cat(
        (
            torch.arange(0, 40),  # resident in slots 0..39
            torch.arange(360, 400),  # resident in slots 160..199 (the last three beyond n: moved)
            long_run,
            torch.arange(520, 560),  # a run copied by numpy
            torch.tensor([100, 200, 599]),  # scattered: gathered, one copy per page (0 and 2)
        )
    )
    fs = store.fetch(0, store.rows_of(0, sel), buf)
    ctx = buf.context()
    ids = ctx.token_ids[0]
    assert sorted(ids.tolist()) == sorted(sel.tolist())
    assert torch.equal(ctx.keys, truth[0][ids][:, 0].permute(1, 0, 2))
    assert torch.equal(ctx.values, truth[0][ids][:, 1].permute(1, 0, 2))
    assert torch.equal(ctx.positions[0, 0], ids)
    assert fs.tokens_reused == 80 and fs.device_moves == 3
    assert fs.tokens_copied == long_run.numel() + 40 + 3
    assert fs.copies == 4  # the two runs, and the three scattered rows from two pages
    # the missing rows fill the hole in row order: 100, 200, the three moved rows, then the run
    assert ids[45 : 45 + long_run.numel()].tolist() == long_run.tolist()


def test_fetch_skips_rows_already_resident():
    store, truth = filled_store(60, page_rows=16)
    buf = DeviceBuffer(GEOM, 32, "cpu")
    first = torch.arange(10, 40)
    store.fetch(0, store.rows_of(0, first), buf)
    again = store.fetch(0, store.rows_of(0, first), buf)
    assert again.bytes_moved == 0 and again.copies == 0 and again.tokens_reused == 30
    shifted = torch.arange(20, 50)
    fs = store.fetch(0, store.rows_of(0, shifted), buf)
    assert fs.tokens_reused == 20 and fs.tokens_copied == 10
    assert fs.bytes_moved == 10 * 2 * GEOM.token_row_bytes
    ctx = buf.context()
    order = torch.argsort(ctx.token_ids[0])
    assert torch.equal(ctx.token_ids[0][order], shifted)
    assert torch.equal(ctx.keys[:, order], truth[0][shifted][:, 0].permute(1, 0, 2))


def test_rows_moved_inside_the_buffer_are_tracked_where_they_land():
    store, truth = filled_store(60, page_rows=64)
    buf = DeviceBuffer(GEOM, 32, "cpu")
    store.fetch(0, torch.arange(0, 30), buf)
    moved = store.fetch(0, torch.arange(20, 30), buf)  # resident beyond slot 10: shifted down
    assert moved.device_moves == 10 and moved.bytes_moved == 0
    again = store.fetch(0, torch.arange(0, 10), buf)  # slots 0-9 now hold rows 20-29, not 0-9
    assert again.tokens_copied == 10
    ctx = buf.context()
    assert ctx.token_ids[0].tolist() == list(range(10))
    assert torch.equal(ctx.keys, truth[0][:10, 0].permute(1, 0, 2))


def test_fetch_after_relocation_keeps_the_moved_tokens_resident_and_serves_their_data():
    store, truth = filled_store(30, page_rows=16)
    buf = DeviceBuffer(GEOM, 30, "cpu")
    sel = torch.arange(5, 15)
    store.fetch(0, store.rows_of(0, sel), buf)
    store.move(0, sel, store.alloc(0, 10))
    # the moved tokens' old rows now hold others: a row-keyed residency would serve those
    store.move(0, torch.arange(20, 30), torch.arange(5, 15))  # into rows 5-14, freed by the move
    fs = store.fetch(0, store.rows_of(0, torch.cat((sel, torch.arange(20, 23)))), buf)
    assert (fs.tokens_reused, fs.tokens_copied) == (10, 3)
    ctx = buf.context()
    assert torch.equal(ctx.keys, truth[0][ctx.token_ids[0]][:, 0].permute(1, 0, 2))
    assert sorted(ctx.token_ids[0].tolist()) == [*range(5, 15), 20, 21, 22]


def test_a_per_head_buffer_keeps_its_tokens_resident_across_moves():
    store, truth = filled_store(40, page_rows=16)
    sel = torch.tensor([[0, 3, 17, 33], [1, 2, 20, 39]])
    buf = DeviceBuffer(GEOM, 8, "cpu", per_head=True)
    store.fetch(1, store.rows_of(1, sel), buf)
    store.move(1, torch.tensor([3, 20, 39]), store.alloc(1, 3))
    again = store.fetch(1, store.rows_of(1, sel), buf)
    assert again.bytes_moved == 0
    ctx = buf.context()
    for h in range(2):
        assert torch.equal(ctx.keys[h], truth[1][ctx.token_ids[h], 0, h])
        assert sorted(ctx.token_ids[h].tolist()) == sorted(sel[h].tolist())


def test_per_head_fetch_gives_each_head_its_own_tokens():
    store, truth = filled_store(40, page_rows=16)
    sel = torch.tensor([[0, 3, 17, 33], [1, 2, 20, 39]])
    buf = DeviceBuffer(GEOM, 8, "cpu", per_head=True)
    fs = store.fetch(1, store.rows_of(1, sel), buf)
    ctx = buf.context()
    assert torch.equal(ctx.token_ids, sel)
    for h in range(2):
        assert torch.equal(ctx.keys[h], truth[1][sel[h], 0, h])
        assert torch.equal(ctx.values[h], truth[1][sel[h], 1, h])
        assert torch.equal(ctx.positions[0, h], sel[h])
    assert fs.bytes_moved == 8 * 2 * GEOM.head_dim * 2
    again = store.fetch(1, store.rows_of(1, sel), buf)
    assert again.bytes_moved == 0


def test_contiguous_store_grows_by_doubling_and_keeps_data():
    store, truth = filled_store(45, page_rows=8, contiguous=True)
    assert [len(p) for p in store.pool.pages] == [1, 1]
    assert store.capacity_rows(0) == 64
    assert torch.equal(store.pool.pages[0][0][:45], truth[0])


def _assert_map_inverts_slots(buf: DeviceBuffer) -> None:
    """The buffer's row -> slot map is exactly the inverse of ``slot_rows``."""
    rmap = buf.row_slots(0)
    for g in range(buf.groups):
        held = {int(r): s for s, r in enumerate(buf.slot_rows[g].tolist()) if r >= 0}
        assert len(held) == sum(1 for r in buf.slot_rows[g].tolist() if r >= 0)  # no row twice
        mapped = {r: int(rmap[g, r]) for r in range(rmap.shape[1]) if rmap[g, r] >= 0}
        assert mapped == held


@pytest.mark.parametrize("per_head", [False, True])
def test_random_fetch_sequences_keep_residency_exact(per_head):
    """200 random selections (runs, scattered rows, sizes up to the capacity) plus sliding-window
    style copy_to_slots: every context equals the store's rows, reuse equals the overlap with
    what was resident, and the row -> slot map never disagrees with the slots."""
    store, truth = filled_store(300, page_rows=32, run_min_rows=4)
    cap = 48
    buf = DeviceBuffer(GEOM, cap, "cpu", per_head=per_head)
    groups = buf.groups
    gen = torch.Generator().manual_seed(3)
    for step in range(200):
        if step % 25 == 24:  # a caller that places rows itself, in slots it chose
            slots = torch.randperm(groups * cap, generator=gen)[:5]
            rows = torch.randperm(300, generator=gen)
            rows = rows[~torch.isin(rows, buf.slot_rows.flatten())][:5]  # callers never hold a row twice
            store.copy_to_slots(0, rows, buf, slots)
            _assert_map_inverts_slots(buf)
            continue
        n = int(torch.randint(1, cap + 1, (1,), generator=gen))
        sel = []
        for _ in range(groups):
            start = int(torch.randint(0, 300 - n, (1,), generator=gen))
            run = torch.arange(start, start + n // 2)
            rest = torch.randperm(300, generator=gen)
            rest = rest[~torch.isin(rest, run)][: n - run.numel()]
            sel.append(torch.cat((run, rest))[torch.randperm(n, generator=gen)])
        sel = torch.stack(sel)
        resident = [set(buf.slot_rows[g].tolist()) - {-1} for g in range(groups)]
        expect_reused = sum(len(resident[g] & set(sel[g].tolist())) for g in range(groups))
        fs = store.fetch(0, sel if per_head else sel[0], buf)
        assert fs.tokens_reused == expect_reused
        assert fs.tokens_copied == groups * n - expect_reused
        ctx = buf.context()
        for g in range(groups):
            assert sorted(ctx.token_ids[g].tolist()) == sorted(sel[g].tolist())
            ids = ctx.token_ids[g]
            if per_head:
                assert torch.equal(ctx.keys[g], truth[0][ids, 0, g])
                assert torch.equal(ctx.values[g], truth[0][ids, 1, g])
            else:
                assert torch.equal(ctx.keys, truth[0][ids][:, 0].permute(1, 0, 2))
                assert torch.equal(ctx.values, truth[0][ids][:, 1].permute(1, 0, 2))
        _assert_map_inverts_slots(buf)


def test_moves_across_pages_keep_every_tokens_data():
    """Tokens scattered over several pages move to fresh rows (the direct host copy) and back
    into rows they partly held themselves (the in-place path); data follows the tokens."""
    store, truth = filled_store(90, page_rows=16)
    gen = torch.Generator().manual_seed(5)
    ids = torch.randperm(90, generator=gen)[:40]
    rows = store.alloc(0, 40)  # fresh rows at the tail, on pages of their own
    store.move(0, ids, rows)
    assert torch.equal(store.rows_of(0, ids), rows)
    back = store.rows_of(0, ids)[torch.randperm(40, generator=gen)]  # in place: a permutation
    store.move(0, ids, back)
    for layer in range(GEOM.num_layers):
        every = torch.arange(90)
        assert torch.equal(store.read(layer, store.rows_of(layer, every)), truth[layer][every])


def test_move_of_runs_across_source_and_destination_page_ends():
    """Runs of consecutive rows whose source and destination cross page ends at different
    offsets, handed over out of order: every row lands where asked, with its own data."""
    store, truth = filled_store(90, page_rows=16)
    ids = torch.cat((torch.arange(40, 60), torch.arange(5, 25)))  # cross rows 48 and 16
    rows = store.alloc(0, 40)  # 90..129: crosses 96, 112, 128
    assert rows.tolist() == list(range(90, 130))
    dest = torch.cat((rows[20:], rows[:20]))  # ids 40.. go to 110.., ids 5.. to 90..
    store.move(0, ids, dest)
    assert torch.equal(store.rows_of(0, ids), dest)
    assert bool((store.tokens_at(0, ids) == -1).all())  # the old rows are free
    every = torch.arange(90)
    assert torch.equal(store.read(0, store.rows_of(0, every)), truth[0][every])
    assert torch.equal(store.read(0, dest), truth[0][ids])


def test_host_pages_of_a_huge_page_or_more_start_on_a_huge_page_boundary():
    from mosaic_ros.runtime.kv.pool import HUGE_PAGE_BYTES, new_page

    rows = HUGE_PAGE_BYTES // (2 * GEOM.token_row_bytes)  # exactly one huge page
    for n in (rows, 3 * rows + 5):
        page = new_page(GEOM, n, torch.device("cpu"), False)
        assert page.shape == (n, 2, GEOM.num_kv_heads, GEOM.head_dim) and page.dtype == GEOM.dtype
        assert page.is_contiguous() and page.data_ptr() % HUGE_PAGE_BYTES == 0
    small = new_page(GEOM, 16, torch.device("cpu"), False)
    assert small.shape == (16, 2, GEOM.num_kv_heads, GEOM.head_dim)
    # a store on such pages keeps every row's data, across the page end
    store, truth = filled_store(rows + 40, page_rows=rows, chunk=rows // 4 + 3)
    assert all(p.data_ptr() % HUGE_PAGE_BYTES == 0 for pages in store.pool.pages for p in pages)
    every = torch.arange(rows + 40)
    for layer in range(GEOM.num_layers):
        assert torch.equal(store.read(layer, store.rows_of(layer, every)), truth[layer][every])
