"""The compiled fetch-planning kernels against plain-Python statements of what they must do."""

import numpy as np
import pytest

from mosaic_ros.runtime.kv.plan import (
    copy_runs,
    gather_heads,
    gather_rows,
    plan_per_head,
    plan_shared,
    write_slot_meta,
)


def reference_plan(want, rmap, held):
    """What ``plan_shared`` promises, written the slow way on copies of the maps."""
    n = len(want)
    rmap, held = rmap.copy(), held.copy()
    slot = {r: int(rmap[r]) for r in want}
    kept = {r for r in want if 0 <= slot[r] < n}
    occupied = {slot[r] for r in kept}
    free = [s for s in range(n) if s not in occupied]
    need = [r for r in sorted(want) if r not in kept]
    move_from = [slot[r] if slot[r] >= 0 else -1 for r in need]
    for s in free:
        if held[s] >= 0:
            rmap[held[s]] = -1
    for s in move_from:
        if s >= 0:
            held[s] = -1
    for r, s in zip(need, free, strict=True):
        held[s] = r
        rmap[r] = s
    return need, free, move_from, rmap, held


def random_buffer(rng, rows, capacity):
    """A buffer state: a random set of rows resident in random slots, maps mutually inverse."""
    rmap = np.full(rows, -1, dtype=np.int32)
    held = np.full(capacity, -1, dtype=np.int64)
    resident = rng.choice(rows, size=rng.integers(0, capacity + 1), replace=False)
    slots = rng.choice(capacity, size=resident.size, replace=False)
    rmap[resident] = slots
    held[slots] = resident
    return rmap, held


@pytest.mark.parametrize("seed", range(40))
def test_plan_shared_matches_the_reference(seed):
    rng = np.random.default_rng(seed)
    rows, capacity = 300, 64
    rmap, held = random_buffer(rng, rows, capacity)
    n = int(rng.integers(1, capacity + 1))
    # mostly runs, as policies hand over, with some resident rows among them
    starts = rng.choice(rows - 8, size=n, replace=False)
    want = np.unique(np.concatenate([np.arange(s, s + rng.integers(1, 8)) for s in starts]))[:n]
    want = np.sort(want.astype(np.int64))
    need_ref, free_ref, move_ref, rmap_ref, held_ref = reference_plan(want.tolist(), rmap, held)
    need, free, move_from, moved = plan_shared(want, rmap, held)
    assert need.tolist() == need_ref
    assert free.tolist() == free_ref
    assert move_from.tolist() == move_ref
    assert moved == sum(s >= 0 for s in move_ref)
    assert np.array_equal(rmap, rmap_ref) and np.array_equal(held, held_ref)
    # afterwards the wanted rows fill slots [0, n) exactly and the maps are inverse
    assert sorted(held[:n].tolist()) == want.tolist()
    live = np.flatnonzero(held >= 0)
    assert np.array_equal(rmap[held[live]], live)
    assert int((rmap >= 0).sum()) == live.size


def test_plan_shared_keeps_resident_rows_in_place_and_moves_those_beyond_n():
    rmap = np.full(20, -1, dtype=np.int32)
    held = np.full(8, -1, dtype=np.int64)
    for r, s in ((3, 0), (4, 6), (9, 2)):  # rows 3, 4, 9 resident in slots 0, 6, 2
        rmap[r], held[s] = s, r
    need, free, move_from, moved = plan_shared(np.array([3, 4, 5, 6], dtype=np.int64), rmap, held)
    # 3 stays in slot 0; 9 (slot 2) is not wanted, so slot 2 is free; 4 sits in slot 6 >= n: moved
    assert need.tolist() == [4, 5, 6] and free.tolist() == [1, 2, 3]
    assert move_from.tolist() == [6, -1, -1] and moved == 1
    assert rmap[9] == -1 and held[6] == -1
    assert held[:4].tolist() == [3, 4, 5, 6]


@pytest.mark.parametrize("seed", range(20))
def test_copy_runs_cuts_at_gaps_in_rows_or_slots_and_at_page_ends(seed):
    rng = np.random.default_rng(seed)
    page_rows = int(rng.integers(3, 20))
    rows = np.sort(rng.choice(200, size=int(rng.integers(1, 120)), replace=False)).astype(np.int64)
    slots = np.sort(rng.choice(200, size=rows.size, replace=False)).astype(np.int64)
    first, slot0, length = copy_runs(rows, slots, page_rows)
    # every row is covered once, in order, by runs consecutive in both and within one page
    assert int(length.sum()) == rows.size and (length > 0).all()
    back_rows = np.concatenate([np.arange(f, f + n) for f, n in zip(first, length, strict=True)])
    back_slots = np.concatenate([np.arange(s, s + n) for s, n in zip(slot0, length, strict=True)])
    assert np.array_equal(back_rows, rows) and np.array_equal(back_slots, slots)
    assert ((first // page_rows) == ((first + length - 1) // page_rows)).all()
    # and maximal: two runs meet only where rows or slots jump, or a page ends
    end_rows, end_slots = first[:-1] + length[:-1], slot0[:-1] + length[:-1]
    joinable = (end_rows == first[1:]) & (end_slots == slot0[1:]) & (first[1:] % page_rows != 0)
    assert not joinable.any()


def test_copy_runs_of_nothing_is_empty():
    first, slot0, length = copy_runs(np.zeros(0, np.int64), np.zeros(0, np.int64), 8)
    assert first.size == slot0.size == length.size == 0


def test_write_slot_meta_writes_ids_and_every_position_component():
    row_token = np.array([7, 5, -1, 2, 0], dtype=np.int64)
    positions = np.arange(3 * 8, dtype=np.int64).reshape(3, 8)
    slot_ids = np.full(6, -1, dtype=np.int64)
    slot_pos = np.zeros((3, 6), dtype=np.int64)
    write_slot_meta(
        np.array([0, 3, 4], np.int64), np.array([5, 1, 2], np.int64), row_token, positions, slot_ids, slot_pos
    )
    assert slot_ids.tolist() == [-1, 2, 0, -1, -1, 7]
    assert slot_pos[:, 5].tolist() == positions[:, 7].tolist()
    assert slot_pos[:, 1].tolist() == positions[:, 2].tolist()
    assert slot_pos[:, 2].tolist() == positions[:, 0].tolist()
    assert (slot_pos[:, [0, 3, 4]] == 0).all()


@pytest.mark.parametrize("seed", range(10))
def test_plan_per_head_is_plan_shared_per_group_on_flat_slots(seed):
    rng = np.random.default_rng(100 + seed)
    rows, capacity, groups = 300, 64, 3
    states = [random_buffer(rng, rows, capacity) for _ in range(groups)]
    rmap = np.stack([s[0] for s in states])
    held = np.stack([s[1] for s in states])
    n = int(rng.integers(1, capacity + 1))
    want = np.stack([np.sort(rng.choice(rows, size=n, replace=False)) for _ in range(groups)])
    want = want.astype(np.int64)
    expect_moves, expect_copies = [], []
    rmap_ref, held_ref = rmap.copy(), held.copy()
    for g in range(groups):
        need, free, move_from, _ = plan_shared(want[g], rmap_ref[g], held_ref[g])
        for r, s, f in zip(need.tolist(), free.tolist(), move_from.tolist(), strict=True):
            if f >= 0:
                expect_moves.append((f + g * capacity, s + g * capacity))
            else:
                expect_copies.append((r, s + g * capacity))
    move_src, move_dst, copy_rows, copy_dst = plan_per_head(want, rmap, held, capacity)
    assert list(zip(move_src.tolist(), move_dst.tolist(), strict=True)) == expect_moves
    assert list(zip(copy_rows.tolist(), copy_dst.tolist(), strict=True)) == expect_copies
    assert np.array_equal(rmap, rmap_ref) and np.array_equal(held, held_ref)
    for g in range(groups):  # each group's slots [0, n) hold its wanted rows
        assert sorted(held[g, :n].tolist()) == want[g].tolist()


@pytest.mark.parametrize("dtype", [np.int64, np.uint8])
def test_gather_rows_copies_each_row_into_its_slot_and_nothing_else(dtype):
    rng = np.random.default_rng(3)
    page = rng.integers(0, 100, size=(20, 6)).astype(dtype)
    out = np.full((10, 6), 7, dtype=dtype)
    rows = np.array([19, 2, 2, 5], dtype=np.int64)
    slots = np.array([0, 9, 4, 3], dtype=np.int64)
    gather_rows(page, rows, slots, out)
    for r, s in zip(rows, slots, strict=True):
        assert out[s].tolist() == page[r].tolist()
    untouched = np.setdiff1d(np.arange(10), slots)
    assert (out[untouched] == 7).all()


@pytest.mark.parametrize("dtype", [np.int64, np.uint8])
def test_gather_heads_copies_one_heads_key_and_value_into_its_slot(dtype):
    rng = np.random.default_rng(4)
    page = rng.integers(0, 100, size=(12, 2, 3, 5)).astype(dtype)
    out = np.full((6, 2, 3, 5), 7, dtype=dtype)
    rows = np.array([11, 0, 4], dtype=np.int64)
    heads = np.array([2, 0, 2], dtype=np.int64)
    slots = np.array([5, 5, 1], dtype=np.int64)
    gather_heads(page, rows, heads, slots, out)
    expect = np.full_like(out, 7)
    for r, h, s in zip(rows, heads, slots, strict=True):
        expect[s, :, h] = page[r, :, h]
    assert (out == expect).all()
