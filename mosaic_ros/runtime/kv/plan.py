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

In a cluster layer (clusters coarser than a frame) mosaic takes clusters by value per token,
copy-aware, in a greedy knapsack (``choose_clusters``), and ``cluster_layer_rows`` turns the
choice into rows: about twenty tensor operations and a Python heap had cost 1.6 ms per layer
at the 7B shape, 28 layers per question.

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


@njit("boolean(float64[::1], int64[::1], int64, int64)", cache=True, nogil=True)
def _before(key, ident, a, b):
    """Heap order of entries a and b: (key, id) ascending, as Python compares tuples."""
    return key[a] < key[b] or (key[a] == key[b] and ident[a] < ident[b])


@njit("void(float64[::1], int64[::1], int64, int64)", cache=True, nogil=True)
def _sift_down(key, ident, at, size):
    """Move heap entry ``at`` down to its place among the first ``size`` entries."""
    while True:
        low, a, b = at, 2 * at + 1, 2 * at + 2
        if a < size and _before(key, ident, a, low):
            low = a
        if b < size and _before(key, ident, b, low):
            low = b
        if low == at:
            return
        key[at], key[low], ident[at], ident[low] = key[low], key[at], ident[low], ident[at]
        at = low


@njit("void(float64[::1], int64[::1], int64)", cache=True, nogil=True)
def _sift_up(key, ident, at):
    """Move heap entry ``at`` up to its place."""
    while at > 0:
        up = (at - 1) // 2
        if not _before(key, ident, at, up):
            return
        key[at], key[up], ident[at], ident[up] = key[up], key[at], ident[up], ident[at]
        at = up


@njit(
    f"float64(int64, {_F32}, {_I64}, {_I64}, boolean[::1], {_I64}, {_I64}, boolean[::1], float64)",
    cache=True,
    nogil=True,
)
def _value(c, share, sizes, fragments, has_extent, left, right, taken, penalty):
    """``choose_clusters``'s value per token of cluster ``c`` given the clusters ``taken``."""
    runs = min(fragments[c], 1)
    if has_extent[c]:
        runs += 1 - (left[c] >= 0 and taken[left[c]]) - (right[c] >= 0 and taken[right[c]])
    return (np.float64(share[c]) - penalty * runs) / np.float64(sizes[c])


@njit(
    f"Tuple((int64[::1], int64, int64))({_F32}, {_I64}, int64, {_I64}, boolean[::1], {_I64}, {_I64}, "
    "float64)",
    cache=True,
    nogil=True,
)
def choose_clusters(share, sizes, room, fragments, has_extent, left, right, run_penalty):
    """Clusters to retrieve within ``room`` tokens: (whole (k,) int64 ascending, a partial cluster
    id or -1, how many of its tokens to take).

    share: (C,) estimated share of the question's attention per cluster (0 for empty ids);
    sizes: (C,) retrievable tokens per cluster; fragments: (C,) runs its ring tokens form;
    has_extent: (C,) bool; left/right: (C,) the cluster whose extent touches this one's on that
    side (-1 none).

    A greedy fractional knapsack: clusters are taken by value per token, and the first one that
    no longer fits is taken in part to fill the room (a cluster is a group of near-identical
    keys, so part of it keeps about its share per token). A cluster's value is its share minus
    ``penalty x`` the copies it adds: one if it has ring tokens (to a GPU the store gathers the
    short runs of a page in one call; CPU to CPU each is a short copy, not counted), plus one
    for its extent unless a touching extent is already taken, minus one if it joins two taken
    runs. ``penalty = run_penalty x`` the share of the last cluster taken whole when copies are
    ignored (the marginal cluster), so it only reorders choices of about marginal value;
    ``run_penalty = 0`` ignores copies. Ties go to the lower id; values are float64 from the
    float32 shares.
    """
    n = share.size
    density = np.empty(n, np.float32)
    usable = 0
    for c in range(n):
        if sizes[c] > 0 and share[c] > 0:
            density[c] = share[c] / np.float32(sizes[c])
            usable += 1
        else:
            density[c] = -1.0
    empty = np.zeros(0, np.int64)
    if usable == 0 or room <= 0:
        return empty, -1, 0
    order = np.argsort(-density, kind="mergesort")[:usable]  # stable: ties keep id order
    fits, total = 0, 0
    while fits < usable and total + sizes[order[fits]] <= room:
        total += sizes[order[fits]]
        fits += 1
    if run_penalty <= 0 or fits == 0:
        whole = np.sort(order[:fits])
        if fits == usable or total == room:
            return whole, -1, 0
        return whole, order[fits], room - total
    penalty = run_penalty * np.float64(share[order[fits - 1]])
    # candidates: the densest clusters (several times what fits) and their extent neighbours
    cand = np.zeros(n, np.bool_)
    for i in range(min(4 * fits + 32, usable)):
        c = order[i]
        cand[c] = True
        for nb in (left[c], right[c]):
            if nb >= 0 and sizes[nb] > 0 and share[nb] > 0:
                cand[nb] = True
    taken = np.zeros(n, np.bool_)
    ids = np.flatnonzero(cand)
    cap = 3 * ids.size  # every candidate once, and at most two pushes per cluster taken
    key = np.empty(cap, np.float64)
    ident = np.empty(cap, np.int64)
    size = 0
    for c in ids:  # pushed in any order: the pops depend only on the entries
        key[size] = -_value(c, share, sizes, fragments, has_extent, left, right, taken, penalty)
        ident[size] = c
        size += 1
    for start in range(size // 2 - 1, -1, -1):  # heapify
        _sift_down(key, ident, start, size)
    left_room = room
    while size:
        neg, c = key[0], ident[0]
        size -= 1
        key[0], ident[0] = key[size], ident[size]
        _sift_down(key, ident, 0, size)
        if taken[c] or -neg != _value(c, share, sizes, fragments, has_extent, left, right, taken, penalty):
            continue  # taken, or a stale entry (a fresher one is queued)
        if sizes[c] > left_room:
            return np.flatnonzero(taken), c if left_room else -1, left_room
        taken[c] = True
        left_room -= sizes[c]
        for nb in (left[c], right[c]):
            if nb >= 0 and cand[nb] and not taken[nb]:
                value = _value(nb, share, sizes, fragments, has_extent, left, right, taken, penalty)
                key[size], ident[size] = -value, nb
                _sift_up(key, ident, size)
                size += 1
    return np.flatnonzero(taken), -1, 0


@njit(
    f"Tuple((int64[::1], float32[::1]))({_F32}, {_I64}, {_I64}, int64, {_I64}, {_I64}, int64, {_I64}, "
    f"{_I64}, {_I64}, {_I64}, {_I64}, {_I64}, int64, float64)",
    cache=True,
    nogil=True,
)
def cluster_layer_rows(
    share,
    counts,
    clusters,
    first,
    base,
    base_rows,
    sink_tokens,
    nursery,
    nursery_rows,
    ext_start,
    ext_len,
    left,
    right,
    room,
    penalty,
):
    """(rows, extra_share) of a mosaic cluster layer's selection: ``base_rows``, then the rows of the
    clusters ``choose_clusters`` takes within ``room`` tokens, each cluster's sealed extent
    before its ring tokens; ``extra_share`` (e,) float32: each extra row's estimated share per
    token (its cluster's share over its tokens outside ``base``).

    ``share`` (C,) per cluster; ``counts`` (C,) its tokens; ``clusters`` (N,): the cluster of token
    id ``first + i`` (-1: not held); ``base`` (b,) sinks (ids below ``sink_tokens``) then window,
    ascending, and ``base_rows`` (b,) their rows; ``nursery`` (n,) the ids not sealed yet,
    ascending, and ``nursery_rows`` (n,) their rows; ``ext_start``/``ext_len``/``left``/``right``
    (>= C,) each cluster's extent and its touching neighbours; ``penalty``: ``choose_clusters``'s
    ``run_penalty``. One pass for what took about twenty tensor operations.
    """
    n = share.size
    b = base.size
    sizes = counts.copy()
    for i in range(b):
        at = base[i] - first
        if at >= 0 and at < clusters.size and clusters[at] >= 0:
            sizes[clusters[at]] -= 1
    per_token = np.empty(n, np.float32)
    for c in range(n):
        per_token[c] = share[c] / np.float32(max(sizes[c], 1))
    # the nursery's tokens outside base (both ascending), their clusters and rows
    ncid = np.empty(nursery.size, np.int64)
    nrows = np.empty(nursery.size, np.int64)
    m, j = 0, 0
    for i in range(nursery.size):
        t = nursery[i]
        while j < b and base[j] < t:
            j += 1
        if j < b and base[j] == t:
            continue
        at = t - first
        if at < 0 or at >= clusters.size or clusters[at] < 0:
            raise ValueError("a nursery token is in no cluster")
        ncid[m] = clusters[at]
        nrows[m] = nursery_rows[i]
        m += 1
    ncid, nrows = ncid[:m], nrows[:m]
    # the runs of consecutive rows each cluster's nursery tokens form
    fragments = np.zeros(n, np.int64)
    if m:
        lo = nrows.min()
        at_row = np.full(nrows.max() - lo + 1, -1, np.int64)  # the cluster of each nursery row taken
        for i in range(m):
            at_row[nrows[i] - lo] = ncid[i]
        for i in range(m):  # a run starts where the row before holds no nursery token of the cluster
            r = nrows[i] - lo
            if r == 0 or at_row[r - 1] != ncid[i]:
                fragments[ncid[i]] += 1
    whole, partial, partial_tokens = choose_clusters(
        share, sizes, room, fragments, ext_len[:n] > 0, left[:n].copy(), right[:n].copy(), penalty
    )
    chosen = np.empty(whole.size + (1 if partial >= 0 else 0), np.int64)
    chosen[: whole.size] = whole
    if partial >= 0:
        chosen[whole.size] = partial
    picked = np.zeros(n, np.bool_)
    for c in chosen:
        picked[c] = True
    # base tokens sealed while still in the window: their extent rows are in base_rows already
    sealed = np.empty(b, np.int64)
    s, j = 0, 0
    for i in range(b):
        t = base[i]
        if t < sink_tokens:
            continue
        while j < nursery.size and nursery[j] < t:
            j += 1
        if j < nursery.size and nursery[j] == t:
            continue
        sealed[s] = base_rows[i]
        s += 1
    sealed = np.sort(sealed[:s])
    most = m
    for c in chosen:
        most += ext_len[c]
    out = np.empty(b + most, np.int64)
    extra_share = np.empty(most, np.float32)
    out[:b] = base_rows
    k = 0
    left_of_partial = partial_tokens
    for c in chosen:
        for r in range(ext_start[c], ext_start[c] + ext_len[c]):
            if s:
                at = np.searchsorted(sealed, r)
                if at < s and sealed[at] == r:
                    continue
            if c == partial:
                if left_of_partial == 0:
                    continue
                left_of_partial -= 1
            out[b + k] = r
            extra_share[k] = per_token[c]
            k += 1
    for i in range(m):
        c = ncid[i]
        if not picked[c]:
            continue
        if c == partial:
            if left_of_partial == 0:
                continue
            left_of_partial -= 1
        out[b + k] = nrows[i]
        extra_share[k] = per_token[c]
        k += 1
    return out[: b + k].copy(), extra_share[:k].copy()
