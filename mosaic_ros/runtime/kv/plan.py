"""Compiled host-side planning for ``HostKVStore.fetch`` (numba, no Python per row), and the
per-head copy a CPU buffer gets its units by.

A fetch into a device buffer first decides, for up to a budget of rows, which are resident,
which slots are free, which rows move inside the buffer and which are copied, then cuts the
copies into runs and writes each filled slot's token id and position. Done with numpy that
is about twenty passes over a few thousand rows, each a fresh temporary, and after attention
has evicted the CPU caches each pass costs tens of microseconds: half a millisecond per layer,
as much as copying the rows. The kernels below do the same in three passes over small
int arrays, in place where the result is a map update.

Mosaic's block layers choose, per KV head and layer, which frame blocks (or parts of them) a
question gets and fill every head up to the same count (``cut_blocks``, ``choose_blocks``):
one pass each, where tensor operations, a Python sort and a top-k per head cost about 0.3 ms
per layer, 30 layers per question.
``block_layer_ids`` runs both from the candidates' ids and returns each head's ids: the
lookups and the concatenation around them had cost as much again (about 0.1 ms per layer).

``gather_rows`` copies whole rows of a page into scattered slots of a CPU buffer with no
temporary (numpy's indexed copy makes one, a fresh allocation each time).

Signatures are given so the kernels compile (or load from numba's cache) at import, not
inside the first question.
"""

from __future__ import annotations

import numpy as np
from numba import njit

_I64 = "int64[::1]"
_F32 = "float32[::1]"
_I32 = "int32[::1]"


@njit(f"Tuple((int64[::1], int64[::1], int64[::1], int64))({_I64}, {_I32}, {_I64})", cache=True, nogil=True)
def plan_shared(want, rmap, held):
    """Residency plan for n unique rows shared by all heads, updating the maps in place.

    want (n,): wanted host rows, ascending (numpy's vectorised sort is several times faster
    than a compiled quicksort, so the caller sorts). rmap: host row -> slot (-1 not resident), held:
    slot -> host row (-1 empty), the buffer's two inverse maps. A wanted row resident in a
    slot below ``n`` stays; slots below ``n`` holding nothing wanted are freed; every other
    wanted row, rows ascending, takes the next free slot, ascending. Returns
    (need_rows, free_slots, move_from, moved): the rows given a new slot, their slots, and
    for each the slot it is moved from inside the buffer (-1: copied from the host), with
    ``moved`` the number moved. Both maps describe the buffer after the fetch on return.
    """
    n = want.size
    occupied = np.zeros(n, np.bool_)
    kept = 0
    for i in range(n):
        s = rmap[want[i]]
        if 0 <= s < n:
            occupied[s] = True
            kept += 1
    k = n - kept  # rows without a slot below n, and as many free slots
    free = np.empty(k, np.int64)
    j = 0
    for s in range(n):
        if not occupied[s]:
            free[j] = s
            j += 1
    for i in range(k):  # whatever sits in a free slot is not wanted (a wanted row's map entry is kept)
        r = held[free[i]]
        if r >= 0:
            rmap[r] = -1
    need = np.empty(k, np.int64)
    move_from = np.empty(k, np.int64)
    moved = 0
    j = 0
    for i in range(n):
        s = rmap[want[i]]
        if 0 <= s < n:
            continue
        need[j] = want[i]
        move_from[j] = s if s >= 0 else -1
        if s >= 0:
            held[s] = -1
            moved += 1
        j += 1
    for i in range(k):
        held[free[i]] = need[i]
        rmap[need[i]] = free[i]
    return need, free, move_from, moved


@njit(
    f"Tuple(({_I64}, {_I64}, {_I64}, {_I64}))(int64[:, ::1], int32[:, ::1], int64[:, ::1], int64)",
    cache=True,
    nogil=True,
)
def plan_per_head(want, rmap, held, capacity):
    """``plan_shared`` for each of G groups' selections at once (a per-head fetch), on flat slots.

    want (G, n): each group's wanted rows, ascending per group; rmap (G, R) and held (G,
    ``capacity``): the buffer's maps per group, updated in place. Returns (move_src, move_dst,
    copy_rows, copy_dst), group-major: the flat slots (group * capacity + slot) rows move
    from and to inside the buffer, and the host rows to copy in (ascending per group) with
    their flat slots.
    """
    g_count = want.shape[0]
    needs, frees, froms = [], [], []
    moved = 0
    for g in range(g_count):
        need, free, move_from, m = plan_shared(want[g], rmap[g], held[g])
        needs.append(need)
        frees.append(free)
        froms.append(move_from)
        moved += m
    copies = 0
    for g in range(g_count):
        copies += needs[g].size
    copies -= moved
    move_src = np.empty(moved, np.int64)
    move_dst = np.empty(moved, np.int64)
    copy_rows = np.empty(copies, np.int64)
    copy_dst = np.empty(copies, np.int64)
    j = k = 0
    for g in range(g_count):
        base = g * capacity
        for i in range(needs[g].size):
            s = froms[g][i]
            if s >= 0:
                move_src[j] = s + base
                move_dst[j] = frees[g][i] + base
                j += 1
            else:
                copy_rows[k] = needs[g][i]
                copy_dst[k] = frees[g][i] + base
                k += 1
    return move_src, move_dst, copy_rows, copy_dst


@njit(f"Tuple((int64[::1], int64[::1], int64[::1]))({_I64}, {_I64}, int64)", cache=True, nogil=True)
def copy_runs(rows, slots, page_rows):
    """Maximal runs of rows (k,) that are consecutive in both ``rows`` and ``slots`` and stay
    within one page of ``page_rows``: (first row, first slot, length) per run."""
    k = rows.size
    first = np.empty(k, np.int64)
    slot0 = np.empty(k, np.int64)
    length = np.empty(k, np.int64)
    r_count = 0
    i = 0
    while i < k:
        j = i + 1
        page_end = (rows[i] // page_rows + 1) * page_rows
        while j < k and rows[j] == rows[j - 1] + 1 and slots[j] == slots[j - 1] + 1 and rows[j] < page_end:
            j += 1
        first[r_count] = rows[i]
        slot0[r_count] = slots[i]
        length[r_count] = j - i
        r_count += 1
        i = j
    return first[:r_count].copy(), slot0[:r_count].copy(), length[:r_count].copy()


@njit(f"void({_I64}, {_I64}, {_I64}, int64[:, ::1], {_I64}, int64[:, ::1])", cache=True, nogil=True)
def write_slot_meta(rows, slots, row_token, positions, slot_ids, slot_pos):
    """slot_ids[slots] = row_token[rows] and slot_pos[:, slots] = positions[:, those tokens]."""
    p = positions.shape[0]
    for i in range(rows.size):
        t = row_token[rows[i]]
        s = slots[i]
        slot_ids[s] = t
        for d in range(p):
            slot_pos[d, s] = positions[d, t]


@njit(
    [f"void({t}[:, :, :, ::1], {_I64}, {_I64}, {_I64}, {t}[:, :, :, ::1])" for t in ("int64", "uint8")],
    cache=True,
    nogil=True,
)
def gather_heads(page, rows, heads, slots, out):
    """out[slots[i], :, heads[i]] = page[rows[i], :, heads[i]] for every i: one KV head's key and
    value of a row into a per-head buffer's slot. page (R, 2, H_kv, W) and out (capacity, 2, H_kv,
    W) are int64 views (W = head_dim x element size / 8), or byte views where a head's bytes are
    not a multiple of 8, so any dtype copies bit for bit (int64 words ~2x faster than bytes)."""
    for i in range(rows.size):
        r, h, s = rows[i], heads[i], slots[i]
        out[s, 0, h, :] = page[r, 0, h, :]
        out[s, 1, h, :] = page[r, 1, h, :]


@njit([f"void({t}[:, ::1], {_I64}, {_I64}, {t}[:, ::1])" for t in ("int64", "uint8")], cache=True, nogil=True)
def gather_rows(page, rows, slots, out):
    """out[slots[i]] = page[rows[i]] for every i: whole rows of a page into a buffer's slots, with
    no temporary. page (R, W) and out (capacity, W) are int64 (or, where a row's bytes are not a
    multiple of 8, uint8) views of (rows, 2, H_kv, D) tensors: int64 words copy ~2x faster."""
    for i in range(rows.size):
        out[slots[i], :] = page[rows[i], :]


@njit(f"int64[::1]({_I64}, int64)", cache=True, nogil=True)
def cut_blocks(block, most):
    """Part number (n,) of each of n candidates: ``block`` (n,) their block numbers, which never
    decrease (any values), renumbered 0.. in order, with every block of more than ``most``
    tokens cut into the fewest equal consecutive parts of at most ``most`` tokens (sizes
    differing by at most one, the larger first). ``most`` <= 0: blocks are not cut."""
    n = block.size
    out = np.empty(n, np.int64)
    part = 0
    i = 0
    while i < n:
        j = i + 1
        while j < n and block[j] == block[i]:
            j += 1
        size = j - i
        pieces = 1 if most <= 0 else (size + most - 1) // most
        small, larger = size // pieces, size % pieces  # the first ``larger`` parts hold small + 1
        at = i
        for p in range(pieces):
            end = at + small + (1 if p < larger else 0)
            for k in range(at, end):
                out[k] = part
            part += 1
            at = end
        i = j
    return out


@njit(f"int64[:, ::1](float32[:, ::1], {_I64}, {_I64}, {_I64}, int64, {_F32})", cache=True, nogil=True)
def choose_blocks(shares, counts, unit, part, room, carried):
    """(H, m) int64: per KV head, the candidates it takes, ascending indices into the n candidates.

    ``shares`` (H, C): each unit's estimated share of each head's attention; ``counts`` (C,): the
    units' token counts; ``unit`` (n,): each candidate's unit, so its share is
    ``shares[h, unit] / max(counts[unit], 1)`` (float32). ``part`` (n,): each candidate's part,
    0.. in order, none skipped (``cut_blocks``). A head scores a part by the sum of its
    candidates' shares (float32, in candidate order), takes parts best score first (ties: lower
    part first), each one that still fits within ``room`` tokens (one too large for what is left
    is passed over), and stops once what is left is less than the smallest part. Every head then
    hands attention as many tokens as the head that took the most (m): the others add their
    best candidates outside the parts they took (ties: lower index first). ``carried`` (n,) or
    (0,): a score added to each candidate's share in every head (what earlier layers carried).
    """
    h, n = shares.shape[0], unit.size
    if n == 0 or room <= 0:
        return np.zeros((h, 0), np.int64)
    per_token = np.empty((h, n), np.float32)
    for g in range(h):
        for i in range(n):
            c = unit[i]
            per_token[g, i] = shares[g, c] / np.float32(max(counts[c], 1))
            if carried.size:
                per_token[g, i] += carried[i]
    parts = part[n - 1] + 1
    sizes = np.zeros(parts, np.int64)
    for i in range(n):
        sizes[part[i]] += 1
    smallest = sizes.min()
    taken = np.zeros((h, n), np.bool_)
    took_tokens = np.zeros(h, np.int64)
    for g in range(h):
        score = np.zeros(parts, np.float32)
        for i in range(n):
            score[part[i]] += per_token[g, i]
        took = np.zeros(parts, np.bool_)
        left = room
        for b in np.argsort(-score, kind="mergesort"):  # stable: ties keep part order
            if sizes[b] <= left:
                took[b] = True
                left -= sizes[b]
                if left < smallest:
                    break
        for i in range(n):
            taken[g, i] = took[part[i]]
        took_tokens[g] = room - left
    m = took_tokens.max()
    out = np.empty((h, m), np.int64)
    for g in range(h):
        short = m - took_tokens[g]
        if short:
            others = np.nonzero(~taken[g])[0]
            best = others[np.argsort(-per_token[g, others], kind="mergesort")[:short]]
            for i in best:
                taken[g, i] = True
        k = 0
        for i in range(n):
            if taken[g, i]:
                out[g, k] = i
                k += 1
    return out


@njit(
    f"int64[:, ::1](float32[:, ::1], {_I64}, {_I64}, int64, {_I64}, {_I64}, {_I64}, int64, int64, int64, "
    f"{_F32})",
    cache=True,
    nogil=True,
)
def block_layer_ids(shares, counts, clusters, first, block_of, rest, base, sink_tokens, most, room, carry):
    """(H, b + m) int64: each KV head's token ids in a block layer, ascending: the sinks of ``base``,
    the m candidates ``choose_blocks`` gives the head, the rest of ``base`` (the local window).

    ``shares`` (H, C), ``counts`` (C,) and ``room`` as ``choose_blocks`` takes them; ``clusters``
    (N,): the cluster of token id ``first + i`` (-1: not held); ``block_of``: the frame block of
    every token id; ``rest`` (n,) candidate ids, ascending, each above every sink and below every
    window id; ``base`` (b,) sinks (ids below ``sink_tokens``) then window, ascending; ``most``
    as ``cut_blocks`` takes it; ``carry`` (B,) or (0,): a score per frame block, spread evenly over
    its candidates (``choose_blocks``'s ``carried``). One pass for what took a lookup, two kernels
    and a concatenation.
    """
    n = rest.size
    unit = np.empty(n, np.int64)
    block = np.empty(n, np.int64)
    for i in range(n):
        at = rest[i] - first
        if at < 0 or at >= clusters.size or clusters[at] < 0:
            raise ValueError("a candidate token is in no cluster")
        if rest[i] >= block_of.size or block_of[rest[i]] < 0:
            raise ValueError("a candidate token is in no frame block")
        unit[i] = clusters[at]
        block[i] = block_of[rest[i]]
        if carry.size and block[i] >= carry.size:
            raise ValueError("a candidate's frame block has no carried score")
    carried = np.zeros(0, np.float32)
    if carry.size:  # each block's carried score, spread over its candidates
        size = np.zeros(carry.size, np.int64)
        for i in range(n):
            size[block[i]] += 1
        carried = np.empty(n, np.float32)
        for i in range(n):
            carried[i] = carry[block[i]] / np.float32(size[block[i]])
    pick = choose_blocks(shares, counts, unit, cut_blocks(block, most), room, carried)
    sinks = np.searchsorted(base, sink_tokens)
    h, m = pick.shape
    out = np.empty((h, base.size + m), np.int64)
    for g in range(h):
        out[g, :sinks] = base[:sinks]
        for j in range(m):
            out[g, sinks + j] = rest[pick[g, j]]
        out[g, sinks + m :] = base[sinks:]
    return out
