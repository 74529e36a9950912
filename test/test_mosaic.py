"""The mosaic policy: contiguous cluster extents, scale-free clustering, deferred splits, prefetch,
invariants under random operations, the budget, equality with dense, and a real model run."""

from __future__ import annotations

import math
import random
import threading
import time

import numpy as np
import pytest
import torch
from test_policies import assert_map_inverts_slots, brute_force_ingest_ids

from mosaic_ros.runtime.kv.attention import attend, rotate_context
from mosaic_ros.runtime.kv.clock import WorkClock
from mosaic_ros.runtime.kv.policies.mosaic import MosaicPolicy, Selection, chain_order
from mosaic_ros.runtime.kv.policy import KVGeometry, PolicyConfig, TokenMeta, make_policy
from mosaic_ros.runtime.kv.rope import Rotary1D

GEOM = KVGeometry(num_layers=2, num_kv_heads=2, head_dim=16, num_q_heads=4)
GEOM3 = KVGeometry(num_layers=3, num_kv_heads=2, head_dim=16, num_q_heads=4)
NONE = np.zeros(0, np.float32)  # no carried block scores (``plan.choose_blocks``)
ROTARY = Rotary1D(16)
HUGE_MS = 1e6  # a maintenance budget that always finishes the queued work (deterministic tests)


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Tiny tensors: with one thread no op waits on a descheduled worker of a busy shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class Stream:
    """A structured stream: frames show a few objects (key prototypes per layer plus noise); each
    frame starts with one time-marker text token; the first chunk is ``sinks`` text tokens.

    ``log[layer]`` keeps every appended (keys, values) by token id, for checking what comes back.
    """

    def __init__(self, geom: KVGeometry, sinks: int = 4, objects: int = 6, seed: int = 0, key_scale=1.0):
        self.geom = geom
        self.gen = torch.Generator().manual_seed(seed)
        shape = (objects, geom.num_kv_heads, geom.head_dim)
        self.protos = [torch.randn(shape, generator=self.gen) for _ in range(geom.num_layers)]
        self.text = [torch.randn(geom.num_kv_heads, geom.head_dim, generator=self.gen) for _ in self.protos]
        self.key_scale = key_scale
        self.sinks = sinks
        self.next_id = 0
        self.frame = 0
        self.log: list[dict[int, tuple[torch.Tensor, torch.Tensor]]] = [{} for _ in range(geom.num_layers)]

    def chunk(self, n: int, objects: list[int] | None = None, text_only: bool = False):
        """(meta, keys per layer, values per layer) of the next chunk of ``n`` tokens."""
        g, geom = self.gen, self.geom
        first = self.next_id == 0
        n_text = n if first or text_only else 1
        modality = torch.ones(n, dtype=torch.uint8)
        modality[:n_text] = 0
        frame = torch.full((n,), -1 if first or text_only else self.frame)
        frame[:n_text] = -1
        pick = torch.tensor(objects or [0, 1, 2])[
            torch.randint(0, len(objects or [0, 1, 2]), (n,), generator=g)
        ]
        keys, values = [], []
        for layer in range(geom.num_layers):
            k = self.protos[layer][pick] + 0.25 * torch.randn(
                n, geom.num_kv_heads, geom.head_dim, generator=g
            )
            k[:n_text] = self.text[layer] + 0.25 * torch.randn(
                n_text, geom.num_kv_heads, geom.head_dim, generator=g
            )
            keys.append((k * self.key_scale).to(geom.dtype))
            values.append(torch.randn(n, geom.num_kv_heads, geom.head_dim, generator=g).to(geom.dtype))
        meta = TokenMeta(
            positions=torch.arange(self.next_id, self.next_id + n)[None],
            stamps=torch.full((n,), float(self.frame), dtype=torch.float64),
            modality=modality,
            frame=frame,
        )
        self.next_id += n
        if not (first or text_only):
            self.frame += 1
        return meta, keys, values

    def feed(self, policies, meta, keys, values, maintain_ms: float | None = HUGE_MS) -> torch.Tensor:
        for p in policies:
            ids = p.add_tokens(meta)
            for layer in range(self.geom.num_layers):
                ctx = p.ingest_context(layer)
                if ctx is not None and p.name != "dense":
                    assert p.ingest_ids(layer).tolist() == brute_force_ingest_ids(p, layer)
                    assert_map_inverts_slots(p._ingest_buffers[layer])
                    # the slots hold those tokens' own keys and values, after any rows moved
                    held = ctx.token_ids[0].tolist()
                    assert sorted(held) == p.ingest_ids(layer).tolist()
                    want_k = torch.stack([self.log[layer][t][0] for t in held], dim=1)
                    want_v = torch.stack([self.log[layer][t][1] for t in held], dim=1)
                    assert torch.equal(ctx.keys, want_k) and torch.equal(ctx.values, want_v)
                p.append(layer, keys[layer], values[layer], ids)
            if maintain_ms is not None:
                p.maintain(maintain_ms)
        for layer in range(self.geom.num_layers):
            for i, t in enumerate(ids.tolist()):
                self.log[layer][t] = (keys[layer][i], values[layer][i])
        return ids

    def run(self, policies, frames: int, per_frame: int = 13, objects=None, maintain_ms=HUGE_MS) -> None:
        if self.next_id == 0:
            self.feed(policies, *self.chunk(self.sinks), maintain_ms=maintain_ms)
        for _ in range(frames):
            self.feed(policies, *self.chunk(per_frame, objects), maintain_ms=maintain_ms)


def by_token(ctx, stream: Stream, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids ascending, keys (n, H, D), values (n, H, D)) of a context; checks them against the log."""
    ids = ctx.token_ids[0]
    order = torch.argsort(ids)
    keys = ctx.keys.permute(1, 0, 2)[order]
    values = ctx.values.permute(1, 0, 2)[order]
    for i, t in enumerate(ids[order].tolist()):
        k, v = stream.log[layer][t]
        assert torch.equal(keys[i], k) and torch.equal(values[i], v), f"token {t} came back changed"
    return ids[order], keys, values


def output(ctx, query, local) -> torch.Tensor:
    return attend(query, rotate_context(ctx, ROTARY).float(), ctx.values.float(), local[0], local[1])


def small_config(**kw) -> PolicyConfig:
    defaults = {"budget_tokens": 96, "sink_tokens": 4, "window_tokens": 24}
    return PolicyConfig(**{**defaults, **kw})


# ------------------------------------------------------------------------------------------ layout


def test_sealed_clusters_are_contiguous_and_ring_chunks_are_grouped_by_cluster():
    policy = make_policy("mosaic", GEOM, small_config())
    stream = Stream(GEOM)
    for phase in range(4):  # scenes of 15 frames with different objects, so clusters finish and seal
        stream.run([policy], frames=15, objects=[2 * phase % 6, (2 * phase + 1) % 6])
    policy.check_invariants()
    store = policy.store
    for layer, st in enumerate(policy._layers):
        sealed = torch.nonzero(st.ext_len > 0).flatten()
        assert sealed.numel() >= 4
        sealed_tokens = 0
        for c in sealed.tolist():
            members = st.index.members(c)
            members = members[(members >= 4) & ~torch.isin(members, st.nursery)]
            rows = store.rows_of(layer, members)
            start, length = int(st.ext_start[c]), int(st.ext_len[c])
            assert rows.tolist() == list(range(start, start + length)), f"cluster {c} is not one extent"
            sealed_tokens += length
        assert sealed_tokens + st.nursery.numel() + 4 == store.live_count(layer)
        assert sealed_tokens > store.live_count(layer) // 2  # most of the stream is sealed
        window = policy.base_ids(layer)[4:]
        # the window starts inside a chunk; with that chunk whole it is one run of the ring, or
        # two where the ring wraps
        first_frame = store.frame[window[0]]
        whole = torch.unique(torch.cat((window, torch.nonzero(store.frame == first_frame).flatten())))
        starts, _ = store.runs(layer, store.rows_of(layer, whole))
        assert starts.numel() <= 2
        # inside a chunk the ring rows go cluster by cluster: each cluster's tokens are one run
        last = torch.nonzero(store.frame == store.frame[-1]).flatten()
        cid = st.index.units_of(last)
        for c in torch.unique(cid).tolist():
            starts, _ = store.runs(layer, store.rows_of(layer, last[cid == c]))
            assert starts.numel() == 1 or int(starts[0]) == st.ring_lo  # (a wrap splits it)


def test_clustering_and_layout_do_not_depend_on_the_key_scale():
    """Keys scaled by 2^-6 and 2^6 (exact in float32): same clusters, same threshold, same layout."""
    geom = KVGeometry(num_layers=2, num_kv_heads=2, head_dim=16, num_q_heads=4, dtype=torch.float32)
    layouts = []
    for scale in (2.0**-6, 1.0, 2.0**6):
        policy = make_policy("mosaic", geom, small_config())
        stream = Stream(geom, key_scale=scale)
        for phase in range(3):
            stream.run([policy], frames=12, objects=[phase, phase + 3])
        policy.check_invariants()
        ids = torch.arange(stream.next_id)
        layouts.append(
            [
                (
                    st.index.units_of(ids),
                    st.index.threshold,
                    st.ext_start[st.ext_len > 0],
                    st.ext_len[st.ext_len > 0],
                    policy.store.rows_of(layer, ids),
                )
                for layer, st in enumerate(policy._layers)
            ]
        )
    for other in layouts[1:]:
        for (cid, tau, start, length, rows), (cid2, tau2, start2, length2, rows2) in zip(
            layouts[0], other, strict=True
        ):
            assert torch.equal(cid, cid2)
            assert tau == pytest.approx(tau2, rel=1e-6)
            assert torch.equal(start, start2) and torch.equal(length, length2) and torch.equal(rows, rows2)


def test_splits_wait_for_maintain_and_the_relayout_keeps_every_token(monkeypatch):
    """A sealed cluster that grows again past ``max_cluster_tokens`` is split in ``maintain`` only,
    its extent rewritten in place as the two children's extents, and every K/V comes back intact."""
    config = small_config(budget_tokens=1024, options={"max_cluster_tokens": 16})
    policy = make_policy("mosaic", GEOM, config)
    relaid = []
    original = MosaicPolicy._relayout_split

    def spy(self, layer, split):
        relaid.append(int(self._layers[layer].ext_len[split.parent]))
        original(self, layer, split)

    monkeypatch.setattr(MosaicPolicy, "_relayout_split", spy)
    stream = Stream(GEOM)
    stream.run([policy], frames=10, objects=[0])
    stream.run([policy], frames=10, objects=[1])  # object 0's clusters go idle and are sealed
    st = policy._layers[0]
    sealed_before = (st.ext_len > 0).sum()
    assert sealed_before > 0
    for _ in range(4):  # object 0 again, no maintenance: its sealed clusters grow past the limit
        stream.feed([policy], *stream.chunk(13, [0]), maintain_ms=None)
        policy.check_invariants()
    counts = st.index.counts
    assert st.index.pending and int(counts.max()) > 16
    extents = (st.ext_start.clone(), st.ext_len.clone())
    assert torch.equal(st.ext_len, extents[1])  # appends never touch sealed extents
    policy.maintain(HUGE_MS)
    policy.check_invariants()
    assert not st.index.pending and int(st.index.counts.max()) <= 16
    assert any(length > 0 for length in relaid), "no sealed extent was split and re-laid"
    policy.begin_question()
    for layer in range(GEOM.num_layers):
        ctx = policy.retrieve(layer, torch.randn(4, 2, 16))
        ids, _, _ = by_token(ctx, stream, layer)
        assert ids.tolist() == list(range(stream.next_id))
    policy.end_question()


def test_a_seal_under_a_row_limit_moves_the_oldest_clusters_and_leaves_the_rest():
    """Maintenance's time box: ``_seal(limit=k)`` moves at most k rows, the finished clusters with
    the oldest ring tokens first; the next seal moves the rest, so together the two seal exactly
    the tokens one unlimited seal does."""
    limited, whole = (make_policy("mosaic", GEOM, small_config(budget_tokens=512)) for _ in range(2))
    stream = Stream(GEOM)
    stream.run([limited, whole], frames=6, objects=[0, 1], maintain_ms=None)
    stream.run([limited, whole], frames=6, objects=[2, 3], maintain_ms=None)  # 0 and 1 go idle unsealed
    st = limited._layers[0]
    waiting = st.nursery.clone()
    idle = [int(n) for n in torch.bincount(st.index.units_of(waiting)) if 30 < n < 60]
    assert len(idle) >= 2  # objects 0 and 1, finished, ~39 tokens each: one fits in 60 rows
    first = limited._seal(0, limit=60)
    assert 0 < first <= 60
    sealed = waiting[~torch.isin(waiting, st.nursery)]
    still = st.nursery[st.nursery < int(sealed.max())]
    # what stayed behind older than the newest sealed token is a cluster still open, not a finished one
    assert not bool(torch.isin(st.index.units_of(still), st.index.units_of(sealed)).any())
    limited.check_invariants()
    rest = limited._seal(0)
    assert rest > 0 and whole._seal(0) > 0
    assert torch.equal(st.nursery, whole._layers[0].nursery)
    limited.check_invariants()


def test_a_seal_forced_by_the_ring_head_frees_the_rows_of_the_next_chunks_too():
    """Without maintenance the ring's head comes back to rows still held; the append that finds
    them seals their clusters and those held in the rows of the next chunks, so the next three
    chunks of that size find their rows free (a seal's fixed cost is paid once per four chunks)."""
    policy = make_policy("mosaic", GEOM, small_config())
    stream = Stream(GEOM)
    forced: list[int] = []
    seal = policy._seal

    def checked(layer, force=None, limit=None):
        moved = seal(layer, force=force, limit=limit)
        if force is not None:
            st = policy._layers[layer]
            ahead = st.ring_lo + (st.head + torch.arange(4 * 13)) % st.ring_size
            assert bool((policy.store.tokens_at(layer, ahead) < 0).all())
            forced.append(layer)
        return moved

    policy._seal = checked
    stream.run([policy], frames=80, per_frame=13, maintain_ms=None)
    ring = policy._layers[0].ring_size
    assert ring == 8 * 24  # 192 rows: the head comes back to its first rows after ~15 frames
    wraps = 80 * 13 // ring
    per_layer = [forced.count(layer) for layer in range(GEOM.num_layers)]
    # every wrap needs seals (nothing else frees the ring), at most one per four chunks
    assert all(wraps <= n <= 80 // 4 + 1 for n in per_layer), per_layer
    policy.check_invariants()


def test_a_chunk_is_clustered_once_every_layer_has_it_and_a_partial_one_is_refused():
    policy = make_policy("mosaic", GEOM, small_config())
    stream = Stream(GEOM)
    stream.run([policy], frames=3)
    meta, keys, values = stream.chunk(13)
    ids = policy.add_tokens(meta)
    policy.append(0, keys[0], values[0], ids)
    assert int(policy.store.rows_of(0, ids[-1:])) < 0  # held, not written yet
    policy.append(1, keys[1], values[1], ids)
    assert bool((policy.store.rows_of(0, ids) >= 0).all()) and bool((policy.store.rows_of(1, ids) >= 0).all())
    policy.check_invariants()
    meta, keys, values = stream.chunk(13)
    ids = policy.add_tokens(meta)
    policy.append(1, keys[1], values[1], ids)  # layer 0 never gets this chunk
    with pytest.raises(ValueError, match="reached 1 of 2 layers"):
        policy.add_tokens(stream.chunk(13)[0])
    policy.check_invariants()


def test_evictions_under_the_host_cap_keep_the_index_and_extents_exact():
    cap_tokens = 200
    config = small_config(host_cap_bytes=cap_tokens * GEOM.bytes_per_token)
    policy = make_policy("mosaic", GEOM, config)
    stream = Stream(GEOM)
    for phase in range(6):
        stream.run([policy], frames=10, objects=[phase % 6, (phase + 2) % 6])
        policy.check_invariants()
    assert policy.memory().tokens_evicted > 0
    for layer, st in enumerate(policy._layers):
        assert st.index.num_tokens == policy.store.live_count(layer) <= cap_tokens
    policy.begin_question()
    ctx = policy.retrieve(0, torch.randn(4, 2, 16))
    by_token(ctx, stream, 0)
    policy.end_question()


# ------------------------------------------------------------------------------------------ retrieval


def test_budget_covering_the_stream_equals_dense():
    config = small_config(budget_tokens=512)
    mosaic = make_policy("mosaic", GEOM, config)
    dense = make_policy("dense", GEOM, config)
    stream = Stream(GEOM)
    for phase in range(3):
        stream.run([mosaic, dense], frames=10, objects=[phase, phase + 3])
    assert stream.next_id <= config.budget_tokens
    assert (mosaic._layers[0].ext_len > 0).any()  # extents are part of what is fetched
    gen = torch.Generator().manual_seed(3)
    for p in (mosaic, dense):
        p.begin_question()
    for layer in range(GEOM.num_layers):
        query = torch.randn(4, 3, 16, generator=gen)
        local = (torch.randn(2, 3, 16, generator=gen), torch.randn(2, 3, 16, generator=gen))
        got, ref = mosaic.retrieve(layer, query), dense.retrieve(layer, query)
        assert (
            sorted(got.token_ids[0].tolist())
            == sorted(ref.token_ids[0].tolist())
            == list(range(stream.next_id))
        )
        torch.testing.assert_close(output(got, query, local), output(ref, query, local), rtol=1e-5, atol=1e-5)
    for p in (mosaic, dense):
        p.end_question()


def test_retrieval_takes_the_clusters_the_question_is_about():
    """Object 5 appears only in the first scene; a question aimed at it retrieves its tokens."""
    policy = make_policy("mosaic", GEOM, small_config(budget_tokens=80))
    stream = Stream(GEOM)
    stream.run([policy], frames=8, objects=[5])
    for phase in range(4):
        stream.run([policy], frames=8, objects=[phase])
    first_scene = set(range(4, 4 + 8 * 13))
    policy.begin_question()
    for layer in range(GEOM.num_layers):
        query = 4.0 * stream.protos[layer][5].repeat_interleave(2, dim=0)[:, None, :]
        ctx = policy.retrieve(layer, query)
        ids = set(ctx.token_ids[0].tolist())
        assert len(ids & first_scene) >= 50
    policy.end_question()


def test_a_question_after_seals_keeps_the_tokens_it_already_had_and_serves_their_own_data():
    """Rows moved between two questions (seals of the frames in between) stay resident."""
    policy = make_policy("mosaic", GEOM, small_config(budget_tokens=80))
    stream = Stream(GEOM)
    stream.run([policy], frames=8, objects=[5])
    stream.run([policy], frames=16, objects=[0, 1])
    query = [4.0 * stream.protos[layer][5].repeat_interleave(2, dim=0)[:, None, :] for layer in range(2)]

    def ask() -> list[set[int]]:
        policy.begin_question()
        held = [
            set(by_token(policy.retrieve(layer, query[layer]), stream, layer)[0].tolist())
            for layer in range(2)
        ]
        stats = policy.end_question()
        return held, stats

    first, _ = ask()
    before = [policy.store.rows_of(layer, torch.tensor(sorted(first[layer]))) for layer in range(2)]
    moves = policy.store.layout_version(0), policy.store.layout_version(1)
    stream.run([policy], frames=6, objects=[2, 3])  # new clusters; the old ones seal and move
    assert (policy.store.layout_version(0), policy.store.layout_version(1)) != moves
    moved = sum(
        int((policy.store.rows_of(layer, torch.tensor(sorted(first[layer]))) != before[layer]).sum())
        for layer in range(2)
    )
    assert moved > 0  # some of the first question's tokens now live in other rows
    second, stats = ask()  # by_token checked every token's keys and values against the log
    kept = sum(len(first[layer] & second[layer]) for layer in range(2))
    assert kept > moved // 2
    # only the tokens the first question did not have are copied
    new = sum(len(second[layer] - first[layer]) for layer in range(2))
    assert stats.bytes_moved == new * 2 * GEOM.token_row_bytes


def test_choose_clusters_fills_the_room_by_value_per_token_and_prefers_extending_runs():
    from mosaic_ros.runtime.kv.plan import choose_clusters

    share = np.array([0.5, 0.1, 0.1, 0.3], np.float32)
    sizes = np.array([10, 10, 10, 10])
    no_frag = np.zeros(4, np.int64)
    has = np.ones(4, np.bool_)
    left = np.array([-1, -1, 0, -1])  # extent 2 starts where extent 0 ends
    right = np.array([2, -1, -1, -1])

    def choose(room: int, penalty: float, sizes=sizes) -> tuple[list[int], int, int]:
        whole, partial, tokens = choose_clusters(share, sizes, room, no_frag, has, left, right, penalty)
        return whole.tolist(), partial, tokens

    assert choose(30, 0.0) == ([0, 1, 3], -1, 0)  # by share per token; ties: lower id first
    assert choose(30, 1.0) == ([0, 2, 3], -1, 0)  # 2 extends 0's run: one copy fewer
    assert choose(25, 0.0) == ([0, 3], 1, 5)  # the room left is filled from the next best cluster
    # a small cluster with a high share per token goes first; a big one that does not fit is cut
    assert choose(15, 0.0, sizes=np.array([40, 2, 10, 10])) == ([1, 3], 0, 3)
    assert choose(0, 0.0) == ([], -1, 0)  # no room
    assert choose(100, 1.0) == ([0, 1, 2, 3], -1, 0)  # everything fits


def test_chain_order_visits_nearest_neighbours_first():
    units = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.9, 0.1], [0.1, 0.9]])
    units = units / units.norm(dim=1, keepdim=True)
    assert chain_order(units, torch.tensor([0.0, 1.0])) in ([1, 3, 2, 0], [3, 1, 2, 0])
    assert chain_order(units, None) == [0, 2, 3, 1]


def test_chain_order_is_the_greedy_walk_over_every_similarity():
    """The walk against a plain restatement: from the row most similar to ``start``, always the
    most similar unvisited row (first on ties), over sets with many near and exact ties."""
    gen = torch.Generator().manual_seed(5)
    for k in (2, 3, 17, 64):
        units = torch.randn(k, 8, generator=gen)
        units[k // 2 :] = units[: k - k // 2].round()  # duplicated rows: ties
        units = units / units.norm(dim=1, keepdim=True).clamp_min(1e-6)
        start = torch.randn(8, generator=gen)
        for s in (start, None):
            sims = units @ units.T
            current = 0 if s is None else int(torch.argmax(units @ s))
            want, seen = [current], {current}
            while len(want) < k:
                row = [(-math.inf if j in seen else float(sims[current, j])) for j in range(k)]
                current = max(range(k), key=lambda j: (row[j], -j))
                want.append(current)
                seen.add(current)
            assert chain_order(units, s) == want


# ------------------------------------------------------------------------------------------ prefetch


class ScriptedPredictor(MosaicPolicy):
    """Mosaic whose layer-(l+1) prediction is scripted from the true selection: ``wrong`` predicts
    exactly the clusters layer l+1 will NOT retrieve, otherwise exactly those it will."""

    def __init__(self, *args, queries, wrong: bool, **kw):
        super().__init__(*args, **kw)
        self.queries, self.wrong = queries, wrong

    def predict_share(self, layer: int, query: torch.Tensor, sel: Selection) -> torch.Tensor:
        target = layer + 1
        truth = self.select(target, self.queries[target])
        index = self._layers[target].index
        taken = torch.zeros(index.num_slots, dtype=torch.bool)
        taken[index.units_of(self.store.tokens_at(target, truth.extra))] = True
        return (taken != self.wrong).float()


@pytest.mark.parametrize("wrong", [True, False])
def test_prefetch_is_exact_whatever_it_predicts_and_counts_its_hits(wrong):
    config = small_config(budget_tokens=64, options={"prefetch_share": 1.0, "cpu_prefetch": True})
    gen = torch.Generator().manual_seed(11)
    questions = [[3 * torch.randn(4, 2, 16, generator=gen) for _ in range(3)] for _ in range(3)]
    plain = MosaicPolicy(GEOM3, small_config(budget_tokens=64))  # no prefetch on a CPU by default
    scripted = ScriptedPredictor(GEOM3, config, queries=questions[0], wrong=wrong)
    stream = Stream(GEOM3)
    for phase in range(3):
        stream.run([plain, scripted], frames=8, objects=[phase, phase + 3])
    lookups = hits = 0
    for queries in questions:
        scripted.queries = queries
        for p in (plain, scripted):
            p.begin_question()
        for layer in range(3):
            local = (torch.randn(2, 2, 16, generator=gen), torch.randn(2, 2, 16, generator=gen))
            ref, got = plain.retrieve(layer, queries[layer]), scripted.retrieve(layer, queries[layer])
            ref_ids, ref_k, ref_v = by_token(ref, stream, layer)
            ids, k, v = by_token(got, stream, layer)
            assert torch.equal(ids, ref_ids) and torch.equal(k, ref_k) and torch.equal(v, ref_v)
            torch.testing.assert_close(
                output(got, queries[layer], local), output(ref, queries[layer], local), rtol=1e-6, atol=1e-6
            )
            if layer:
                lookups += ref.num_tokens - scripted.base_ids(layer).numel()
        stats = scripted.end_question()
        plain.end_question()
        hits += stats.prefetch_hits
        assert stats.prefetch_lookups > 0
        assert stats.bytes_moved >= plain._stats.bytes_moved  # prefetch traffic is counted
    assert lookups > 0
    assert hits == (0 if wrong else lookups)
    assert not [t for t in threading.enumerate() if t.name.startswith("mosaic-prefetch")]


def test_prefetch_worker_is_joined_before_changes_and_stopped_after_questions():
    config = small_config(budget_tokens=64, options={"cpu_prefetch": True})
    policy = make_policy("mosaic", GEOM3, config)
    stream = Stream(GEOM3)
    stream.run([policy], frames=12)
    policy.begin_question()
    policy.retrieve(0, torch.randn(4, 2, 16))
    assert policy._prefetch.pending  # layer 1's copy is in flight
    policy.retrieve(1, torch.randn(4, 2, 16))
    stats = policy.end_question()
    assert not policy._prefetch.pending
    assert stats.prefetch_lookups > 0 and 0 <= stats.prefetch_hits <= stats.prefetch_lookups
    assert not [t for t in threading.enumerate() if t.name.startswith("mosaic-prefetch")]
    policy.begin_question()
    policy.retrieve(0, torch.randn(4, 2, 16))
    policy.reset()  # mid-question: the pending prefetch is joined and the worker stopped
    assert not policy._prefetch.pending
    assert not [t for t in threading.enumerate() if t.name.startswith("mosaic-prefetch")]


# ------------------------------------------------------------------------------------------ invariants


def test_invariants_hold_after_ten_thousand_random_operations():
    """Appends of random sizes and modalities, maintenance with random budgets, questions (some with
    time windows), evictions under a host cap; invariants checked along the way and at the end."""
    rng = random.Random(1234)
    budget = 48
    config = small_config(
        budget_tokens=budget,
        window_tokens=12,
        host_cap_bytes=160 * GEOM.bytes_per_token,
        options={"cpu_prefetch": True},  # the worker runs between the random operations
    )
    policy = make_policy("mosaic", GEOM, config)
    stream = Stream(GEOM, seed=5)
    stream.feed([policy], *stream.chunk(4), maintain_ms=None)
    ops = {"append": 0, "maintain": 0, "question": 0}
    for step in range(10_000):
        r = rng.random()
        if r < 0.4:
            n = rng.randint(1, 12)
            objects = rng.sample(range(6), rng.randint(1, 3))
            stream.feed([policy], *stream.chunk(n, objects, text_only=rng.random() < 0.1), maintain_ms=None)
            ops["append"] += 1
        elif r < 0.85:
            policy.maintain(rng.choice([0.0, 0.05, 0.5, HUGE_MS]))
            ops["maintain"] += 1
        else:
            window = None
            if rng.random() < 0.3:
                t0 = rng.uniform(0, stream.frame)
                window = (t0, t0 + rng.uniform(0, 20))
            policy.begin_question(window)
            for layer in range(GEOM.num_layers):
                base = policy.base_ids(layer) if window is None else None
                ctx = policy.retrieve(layer, torch.randn(4, rng.randint(1, 3), 16))
                assert ctx.num_tokens <= budget
                assert len(set(ctx.token_ids[0].tolist())) == ctx.num_tokens
                if base is not None:  # sinks and the local window are always there
                    assert set(base.tolist()) <= set(ctx.token_ids[0].tolist())
            policy.end_question()
            ops["question"] += 1
        if step % 50 == 0:
            policy.check_invariants()
    policy.check_invariants()
    assert policy.memory().tokens_evicted > 0
    assert min(ops.values()) > 1000
    policy.begin_question()
    for layer in range(GEOM.num_layers):
        by_token(policy.retrieve(layer, torch.randn(4, 2, 16)), stream, layer)
    policy.end_question()


# ------------------------------------------------------------------------------------------ model run


def test_mosaic_runs_inside_a_real_model_and_matches_the_full_context_when_everything_fits():
    """A real (tiny, random) Qwen2.5-VL run. Every streaming policy ingests against sinks + window,
    so the reference is ``window`` with a budget covering the stream: same KV, whole context."""
    from mosaic_ros.runtime.models import load_model
    from mosaic_ros.runtime.session import SessionConfig, StreamSession

    adapter = load_model("tiny-random:qwen2.5-vl", device="cpu", dtype="float32", seed=0)
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (56, 84, 3), dtype=np.uint8) for _ in range(4)]
    logits = {}
    for name in ("window", "mosaic"):
        session = StreamSession(
            adapter,
            SessionConfig(
                policy=name, kv=PolicyConfig(budget_tokens=4096, window_tokens=8), max_new_tokens=4
            ),
        )
        for i, frame in enumerate(frames):
            session.ingest(frame, float(i))
        answer = session.ask("What moved?")
        assert answer.stats.policy == name and answer.stats.tokens_generated >= 0
        ad = session.adapter
        with session._lock, torch.no_grad():
            chunk = ad.question_chunk("Where is the red box?", session._cursor)
            session.bridge.begin_question(None)
            try:
                with session.bridge.question_step(chunk.token_positions) as cache:
                    logits[name] = ad.forward(chunk, cache)
            finally:
                session.bridge.end_question()
        if name == "mosaic":
            session.policy.check_invariants()
            assert session.status().clusters_in_memory > 0
            sealed = sum(int((st.ext_len > 0).sum()) for st in session.policy._layers)
            assert sealed > 0  # the dialogue and frames left the small window and were sealed
    torch.testing.assert_close(logits["mosaic"], logits["window"], atol=1e-4, rtol=1e-4)


def test_the_bench_runs_mosaic_and_reports_its_prefetch_hit_rate(tmp_path):
    import json

    from mosaic_ros.cli.bench import main

    out = tmp_path / "b.json"
    args = ["--shape", "tiny", "--frames", "30", "--budget", "128", "--sinks", "4", "--window", "16"]
    args += ["--questions", "2", "--policies", "rekv,mosaic", "--option", "mosaic.cpu_prefetch=1"]
    assert main([*args, "--no-progress", "--json", str(out)]) == 0
    res = json.loads(out.read_text())["policies"]
    assert 0.0 < res["mosaic"]["prefetch_hit_rate"] <= 1.0
    assert res["rekv"]["prefetch_hit_rate"] == 0.0
    assert res["mosaic"]["units"] > 0 and 0.0 < res["mosaic"]["recall"] <= 1.0 + 1e-5


# ------------------------------------------------------------------------------------ block layers


def feed_unclustered(policy, frames: int, seed: int = 0) -> tuple[list[torch.Tensor], list[dict]]:
    """A 4-token preamble, then frames of a time marker and 9 vision tokens: the marker and 3
    tokens repeat (nearly) in every frame, the other 6 are unique, as words are in text. The
    repeats set a small local scale, so the unique tokens stay alone: clusters of ~1.5 tokens.
    Returns each frame's ids (the preamble first) and every token's key per layer."""
    g = torch.Generator().manual_seed(seed)
    repeat = torch.randn(policy.geometry.num_layers, 4, 2, 16, generator=g)
    frame_ids, keys = [], [{} for _ in range(policy.geometry.num_layers)]
    next_id = 0
    for f in range(frames + 1):
        n = 4 if f == 0 else 10
        modality = (
            torch.zeros(n, dtype=torch.uint8) if f == 0 else torch.tensor([0] + [1] * 9, dtype=torch.uint8)
        )
        meta = TokenMeta(
            positions=torch.arange(next_id, next_id + n)[None],
            stamps=torch.full((n,), float(f), dtype=torch.float64),
            modality=modality,
            frame=torch.where(modality.bool(), f, -1),
        )
        ids = policy.add_tokens(meta)
        for layer in range(policy.geometry.num_layers):
            k = torch.randn(n, 2, 16, generator=g)
            if f:
                k[:4] = repeat[layer] + 0.01 * torch.randn(4, 2, 16, generator=g)
            policy.append(layer, k, torch.randn(n, 2, 16, generator=g), ids)
            keys[layer].update({int(t): k[i] for i, t in enumerate(ids.tolist())})
        policy.maintain(HUGE_MS)
        frame_ids.append(ids)
        next_id += n
    return frame_ids, keys


def aimed_query(keys: dict, token_per_head: list[int]) -> torch.Tensor:
    """(4, 1, 16) queries: KV head g's two query heads point at token ``token_per_head[g]``'s key."""
    return torch.stack([4.0 * keys[t][g] for g, t in enumerate(token_per_head) for _ in range(2)])[:, None]


def test_layers_whose_clusters_do_not_cohere_retrieve_whole_frame_blocks_per_head():
    config = PolicyConfig(budget_tokens=64, sink_tokens=4, window_tokens=8)
    policy = make_policy("mosaic", GEOM, config)
    frames, keys = feed_unclustered(policy, frames=12)
    for layer in range(GEOM.num_layers):
        index = policy._layers[layer].index
        assert index.num_tokens < 2 * index.num_clusters  # the keys do not cohere
        assert policy.per_head_layer(layer)
    policy.check_invariants()
    base = set(range(4)) | set(range(policy.store.num_tokens - 8, policy.store.num_tokens))
    policy.begin_question()
    for layer in range(GEOM.num_layers):
        # KV head 0 asks about a unique token of frame 2, KV head 1 about one of frame 5
        ctx = policy.retrieve(layer, aimed_query(keys[layer], [int(frames[2][7]), int(frames[5][8])]))
        ids = ctx.token_ids
        assert ids.shape[0] == 2 and ids.shape[1] <= config.budget_tokens
        assert set(frames[2].tolist()) <= set(ids[0].tolist()) and set(frames[5].tolist()) <= set(
            ids[1].tolist()
        )
        for g in range(2):
            got = set(ids[g].tolist())
            assert base <= got
            for block in frames[1:]:  # outside sinks + window, a frame comes whole or not at all
                outside = set(block.tolist()) - base
                assert not outside & got or outside <= got
            for slot, t in enumerate(ids[g].tolist()):  # each head's own key of each of its tokens
                assert torch.equal(ctx.keys[g, slot], keys[layer][t][g].to(ctx.keys.dtype))
    policy.end_question()
    # with room for one block only, each head takes exactly the frame its queries ask about
    narrow = make_policy("mosaic", GEOM, PolicyConfig(budget_tokens=22, sink_tokens=4, window_tokens=8))
    frames, keys = feed_unclustered(narrow, frames=12)
    narrow.begin_question()
    for layer in range(GEOM.num_layers):
        ids = narrow.retrieve(
            layer, aimed_query(keys[layer], [int(frames[2][7]), int(frames[5][8])])
        ).token_ids
        assert [sorted(set(ids[g].tolist()) - base) for g in range(2)] == [
            frames[2].tolist(),
            frames[5].tolist(),
        ]
    narrow.end_question()


def test_a_block_layer_carries_the_earlier_block_layers_choice_with_layer_carry():
    """Room for one frame per head. Layer 0's heads ask about frames 2 and 5, layer 1's both about
    frame 8: alone, layer 1 takes frame 8; with a large ``layer_carry`` the block scores layer 0
    carried outweigh its own, and each head takes a frame layer 0 chose. A question starts with
    nothing carried."""
    chosen = {}
    for carry in (0.0, 50.0):
        options = {"layer_carry": carry}
        policy = make_policy(
            "mosaic", GEOM3, PolicyConfig(budget_tokens=22, sink_tokens=4, window_tokens=8, options=options)
        )
        frames, keys = feed_unclustered(policy, frames=12)
        base = set(range(4)) | set(range(policy.store.num_tokens - 8, policy.store.num_tokens))
        assert all(policy.per_head_layer(layer) for layer in range(GEOM3.num_layers))
        aim = {0: [int(frames[2][7]), int(frames[5][8])], 1: [int(frames[8][7])] * 2}
        for _ in range(2):  # the same question twice: the same choice
            policy.begin_question()
            picked = []
            for layer in (0, 1):
                ids = policy.retrieve(layer, aimed_query(keys[layer], aim[layer])).token_ids
                picked.append([sorted(set(ids[g].tolist()) - base) for g in range(2)])
            policy.end_question()
            assert chosen.setdefault(carry, picked) == picked
        policy.begin_question()  # layer 1 asked first: nothing carried yet
        ids = policy.retrieve(1, aimed_query(keys[1], aim[1])).token_ids
        assert [sorted(set(ids[g].tolist()) - base) for g in range(2)] == [frames[8].tolist()] * 2
        policy.end_question()
        layer0 = [frames[2].tolist(), frames[5].tolist()]
        assert chosen[carry][0] == layer0
    assert chosen[0.0][1] == [frames[8].tolist()] * 2
    assert all(block in layer0 for block in chosen[50.0][1])


def test_a_block_longer_than_a_part_of_the_free_budget_is_taken_in_parts():
    from mosaic_ros.runtime.kv.plan import cut_blocks

    block = np.array([3] * 10 + [4] * 3 + [9] * 8)  # any block numbers that never decrease
    assert cut_blocks(block, 4).tolist() == [0] * 4 + [1] * 3 + [2] * 3 + [3] * 3 + [4] * 4 + [5] * 4
    assert cut_blocks(block, 10).tolist() == [0] * 10 + [1] * 3 + [2] * 8
    assert cut_blocks(block, 0).tolist() == [0] * 10 + [1] * 3 + [2] * 8  # 0: renumbered, not cut
    assert cut_blocks(block, 1).tolist() == list(range(21))
    # free budget 52 - 12 = 40 tokens per head, 13 parts: at most 4 tokens per part, so a frame of
    # 10 tokens is taken as parts of 4, 3 and 3 (positions 0-3, 4-6, 7-9 of the frame)
    config = PolicyConfig(budget_tokens=52, sink_tokens=4, window_tokens=8, options={"block_parts": 13})
    policy = make_policy("mosaic", GEOM, config)
    frames, keys = feed_unclustered(policy, frames=12)
    base = set(range(4)) | set(range(policy.store.num_tokens - 8, policy.store.num_tokens))
    parts = [[f[:4], f[4:7], f[7:]] for f in frames[1:]]
    policy.begin_question()
    for layer in range(GEOM.num_layers):
        # KV head 0 asks about position 8 of frame 2 (its last part), KV head 1 about 5 of frame 5
        query = aimed_query(keys[layer], [int(frames[2][8]), int(frames[5][5])])
        ids = policy.retrieve(layer, query).token_ids
        assert set(frames[2][7:].tolist()) <= set(ids[0].tolist())
        assert set(frames[5][4:7].tolist()) <= set(ids[1].tolist())
        for g in range(2):
            got = set(ids[g].tolist()) - base
            whole = [set(p.tolist()) for f in parts for p in f if set(p.tolist()) <= got]
            assert len(whole) >= 8  # 40 free tokens: parts, not two whole frames and a bit
            # what is not whole parts is the fill up to the fullest head (its best other tokens)
            assert len(got - set().union(*whole)) < 4
            # and a frame is taken in part (whole blocks would take every frame whole or not at all)
            assert any(0 < len(set(f.tolist()) & got) < 10 for f in frames[1:])
    policy.end_question()


def test_block_layers_honour_a_time_window_and_blocks_below_zero_keeps_shared_clusters():
    config = PolicyConfig(budget_tokens=40, sink_tokens=4, window_tokens=8)
    policy = make_policy("mosaic", GEOM, config)
    frames, keys = feed_unclustered(policy, frames=12)
    policy.begin_question(window=(3.0, 6.0))
    for layer in range(GEOM.num_layers):
        ids = policy.retrieve(
            layer, aimed_query(keys[layer], [int(frames[9][7]), int(frames[4][7])])
        ).token_ids
        stamps = policy.store.stamps[ids.flatten()]
        base = (ids.flatten() < 4) | (ids.flatten() >= policy.store.num_tokens - 8)
        assert bool(((stamps >= 3.0) & (stamps <= 6.0) | base).all())
        assert set(frames[4].tolist()) <= set(ids[1].tolist())  # head 1's block is in the window
    policy.end_question()
    shared = make_policy(
        "mosaic",
        GEOM,
        PolicyConfig(budget_tokens=40, sink_tokens=4, window_tokens=8, options={"blocks_below": 0.0}),
    )
    feed_unclustered(shared, frames=12)
    assert not shared.per_head_layer(0)
    coherent = make_policy("mosaic", GEOM, small_config())  # a few objects: clusters span frames
    Stream(GEOM).run([coherent], frames=12)
    assert not any(coherent.per_head_layer(layer) for layer in range(GEOM.num_layers))
    shared.begin_question()
    ids = shared.retrieve(0, aimed_query(keys[0], [int(frames[2][7]), int(frames[5][8])])).token_ids
    assert torch.equal(ids[0], ids[1])  # one set for both heads
    shared.end_question()


def test_head_shares_average_to_the_centroid_scores_and_choose_blocks_fills_by_score():
    from mosaic_ros.runtime.kv.kernels import centroid_scores
    from mosaic_ros.runtime.kv.plan import choose_blocks
    from mosaic_ros.runtime.kv.policies.mosaic import head_shares

    gen = torch.Generator().manual_seed(4)
    query, centroids = torch.randn(4, 3, 16, generator=gen), torch.randn(7, 2, 16, generator=gen)
    counts = torch.tensor([3, 1, 0, 5, 2, 2, 1])
    shares = head_shares(query, centroids, counts)
    assert shares.shape == (2, 7) and bool((shares[:, 2] == 0).all())
    torch.testing.assert_close(shares.sum(dim=1), torch.ones(2))
    torch.testing.assert_close(
        shares.mean(dim=0), centroid_scores(query, centroids, counts).exp().masked_fill(counts == 0, 0)
    )
    # four parts of 10, 10, 25 and 5 tokens, each one unit; a part scores the sum of its tokens'
    # shares, a token's share is its unit's over the unit's size
    sizes = np.array([10, 10, 25, 5])
    part = np.repeat(np.arange(4), sizes)
    score = np.array([[0.1, 0.5, 0.3, 0.2]], np.float32)

    def picked(shares, room):  # (H, m) candidate indices, each row ascending
        pick = choose_blocks(np.ascontiguousarray(shares, np.float32), sizes, part, part, room, NONE)
        assert all(list(row) == sorted(set(row.tolist())) for row in pick)
        return pick

    def chosen(shares, room):  # the parts each head took whole (no head is filled up here)
        out = []
        for row in picked(shares, room):
            taken = np.zeros(part.size, bool)
            taken[row] = True
            assert all(len(set(taken[part == b].tolist())) == 1 for b in range(4))  # parts whole
            out.append([bool(taken[part == b][0]) for b in range(4)])
        return out

    assert chosen(score, 20) == [[False, True, False, True]]  # 2 is passed over
    assert chosen(score, 45) == [[False, True, True, True]]  # 0 no longer fits
    assert chosen(score, 4) == [[False] * 4]
    assert chosen(score, 0) == [[False] * 4]
    tie = np.array([[0.1, 0.1, 0.25, 0.05]], np.float32)  # parts 0 and 1 tie: the lower goes first
    assert chosen(tie, 10) == [[True, False, False, False]]
    other = [0.9, 0.1, 0.2, 0.3]
    assert chosen(np.stack((score[0], other)), 20) == [  # each head decides alone
        [False, True, False, True],
        [True, False, False, True],
    ]
    # head 1 cannot fit its best part (25 tokens) and takes parts 0 and 1 (20 tokens); head 0
    # takes 1 and 3 (15) and is filled up to 20 with its best other tokens: part 2's share per
    # token (0.3 / 25) beats part 0's (0.1 / 10), equal ones go by index
    pick = picked(np.stack((score[0], [0.06, 0.05, 0.85, 0.04])), 20)
    assert pick.shape == (2, 20)
    assert pick[0].tolist() == list(range(10, 25)) + list(range(45, 50))
    assert pick[1].tolist() == list(range(20))
    # a carried score per candidate adds to its part's: 0.05 on each of part 0's ten tokens
    # lifts it to 0.6, above part 1's 0.5, so with room for 20 tokens parts 0 and 1 are taken
    carried = np.where(part == 0, 0.05, 0.0).astype(np.float32)
    pick = choose_blocks(score, sizes, part, part, 20, carried)
    assert pick.tolist() == [list(range(20))]


# ------------------------------------------------------------------------ maintenance clocks


def layout(policy) -> list[tuple[list[int], list[int], list[int]]]:
    """Per layer: the live ids, their rows and their cluster ids."""
    out = []
    for layer in range(policy.geometry.num_layers):
        ids = policy.live_ids(layer)
        units = policy._layers[layer].index.units_of(ids)
        out.append((ids.tolist(), policy.store.rows_of(layer, ids).tolist(), units.tolist()))
    return out


def test_a_cluster_layer_takes_base_then_whole_extents_then_ring_tokens_and_cuts_the_partial_one():
    from mosaic_ros.runtime.kv.plan import cluster_layer_rows

    # ids 0-1 sinks, 10-11 the window; clusters 0, 1, 2 (-1: the sinks, not clustered)
    clusters = np.array([-1, -1, 0, 0, 1, 1, 2, 2, 0, 1, 2, 0])
    token_row = np.array([30, 31, 20, 21, 1, 2, 23, 24, 5, 4, 6, 22])
    base = np.array([0, 1, 10, 11])
    nursery = np.array([4, 5, 8, 9, 10])  # not sealed yet; 11 was sealed while in the window
    ext_start, ext_len = np.array([20, 0, 23]), np.array([3, 0, 2])  # 0: ids 2, 3, 11; 2: ids 6, 7
    counts = np.bincount(clusters[clusters >= 0])
    share = np.array([0.6, 0.1, 0.3], np.float32)
    none = np.full(3, -1, np.int64)

    def rows_for(room: int, clusters=clusters) -> tuple[list[int], list[float]]:
        rows, extra_share = cluster_layer_rows(
            share, counts, clusters, 0, base, token_row[base], 2, nursery, token_row[nursery],
            ext_start, ext_len, none, none, room, 0.0,
        )  # fmt: skip
        return rows.tolist(), extra_share.tolist()

    # outside base the clusters hold 3, 3 and 2 tokens: shares per token 0.2, 0.1 / 3 and 0.15
    per_token = [share[c] / np.float32(n) for c, n in enumerate((3, 3, 2))]
    rows, extra_share = rows_for(4)
    # cluster 0 whole: its extent less the window's sealed row 22, then its ring token 8 (row 5);
    # cluster 2 cut to the one token left of the room: its extent's first row (its ring token is
    # in the window)
    assert rows == [30, 31, 6, 22, 20, 21, 23, 5]
    assert extra_share == [per_token[0]] * 2 + [per_token[2], per_token[0]]
    # clusters 0 and 2 whole, then the first 2 of 1's 3 ring tokens: ring tokens in id order
    rows, extra_share = rows_for(7)
    assert rows == [30, 31, 6, 22, 20, 21, 23, 24, 1, 2, 5]
    assert extra_share == [per_token[0]] * 2 + [per_token[2]] * 2 + [per_token[1]] * 2 + [per_token[0]]
    bad = clusters.copy()
    bad[4] = -1
    with pytest.raises(ValueError, match="no cluster"):  # a nursery token outside base unclustered
        rows_for(4, clusters=bad)


def test_block_layer_ids_are_the_sinks_the_chosen_candidates_and_the_window_of_each_head():
    from mosaic_ros.runtime.kv.plan import block_layer_ids, choose_blocks, cut_blocks

    gen = np.random.default_rng(5)
    sinks, window = np.arange(4), np.arange(90, 98)
    rest = np.sort(gen.choice(np.arange(4, 90), 60, replace=False))  # candidates, gaps between ids
    first = 2  # the token map starts at id 2: ids 0-1 are not held by the clusters
    clusters = np.full(100, -1, np.int64)
    clusters[rest - first] = gen.integers(0, 9, rest.size)
    block_of = np.full(110, -1, np.int64)
    block_of[rest] = np.arange(rest.size) // 7  # blocks of 7 candidates, the last one short
    shares = gen.random((3, 9)).astype(np.float32)
    counts = np.bincount(clusters[rest - first], minlength=9).astype(np.int64)
    base = np.concatenate((sinks, window))
    for most in (0, 3):
        ids = block_layer_ids(shares, counts, clusters, first, block_of, rest, base, 4, most, 20, NONE)
        unit = clusters[rest - first]
        pick = choose_blocks(shares, counts, unit, cut_blocks(block_of[rest], most), 20, NONE)
        assert ids.shape == (3, base.size + pick.shape[1])
        for g in range(3):
            assert ids[g].tolist() == sinks.tolist() + rest[pick[g]].tolist() + window.tolist()
    # a block's carried score is spread evenly over its candidates
    carry = gen.random(block_of[rest].max() + 1).astype(np.float32)
    ids = block_layer_ids(shares, counts, clusters, first, block_of, rest, base, 4, 0, 20, carry)
    size = np.bincount(block_of[rest])
    carried = (carry[block_of[rest]] / size[block_of[rest]]).astype(np.float32)
    pick = choose_blocks(shares, counts, clusters[rest - first], cut_blocks(block_of[rest], 0), 20, carried)
    unaided = block_layer_ids(shares, counts, clusters, first, block_of, rest, base, 4, 0, 20, NONE)
    assert not np.array_equal(ids, unaided)  # the carry decides something here
    for g in range(3):
        assert ids[g].tolist() == sinks.tolist() + rest[pick[g]].tolist() + window.tolist()
    block_of[rest[7]] = -1  # a candidate of no block, or one the clusters do not hold: errors
    with pytest.raises(ValueError, match="in no frame block"):
        block_layer_ids(shares, counts, clusters, first, block_of, rest, base, 4, 0, 20, NONE)
    clusters[rest[5] - first] = -1
    with pytest.raises(ValueError, match="in no cluster"):
        block_layer_ids(shares, counts, clusters, first, block_of, rest, base, 4, 0, 20, NONE)


def test_work_clock_maintenance_is_the_same_however_slow_the_machine_is(monkeypatch):
    """With ``maintain_clock="work"`` the budget is spent in fixed costs per split, sealed row and
    layer, so a machine on which every timer read is a second later decides exactly as a fast
    one; the wall clock there does no maintenance at all. The budget binds (unbounded
    maintenance lays the stream out differently), so the clock is what decides."""

    def run(clock: str, budget_ms: float, slow: bool):
        policy = make_policy(
            "mosaic",
            GEOM,
            small_config(budget_tokens=512, options={"max_cluster_tokens": 16, "maintain_clock": clock}),
        )
        stream = Stream(GEOM, seed=3)
        with monkeypatch.context() as m:
            if slow:
                ticks = iter(range(10**9))
                m.setattr(time, "perf_counter", lambda: 1000.0 * next(ticks))
            stream.run([policy], frames=24, objects=[0, 1, 2, 3], maintain_ms=budget_ms)
        return policy

    fast, slow = run("work", 3.0, slow=False), run("work", 3.0, slow=True)
    assert layout(fast) == layout(slow)
    assert fast._clock.now_ms() == slow._clock.now_ms() > 0
    assert layout(run("work", HUGE_MS, slow=False)) != layout(fast)
    assert layout(run("wall", 3.0, slow=True)) != layout(fast)


def test_work_clock_charges_fixed_costs_and_unknown_clocks_are_refused():
    clock = WorkClock()
    clock.charge("split_token", 10)
    clock.charge("layer", 2)
    assert clock.now_ms() == pytest.approx(
        10 * WorkClock.COSTS_MS["split_token"] + 2 * WorkClock.COSTS_MS["layer"]
    )
    with pytest.raises(ValueError, match="maintain_clock must be one of"):
        make_policy("mosaic", GEOM, small_config(options={"maintain_clock": "sundial"}))
