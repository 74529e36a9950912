"""The built-in KV policies: the shared budget, equality with dense, caps, windows, bad parameters."""

from __future__ import annotations

import pytest
import torch

from mosaic_ros.runtime.kv.attention import attend, rotate_context
from mosaic_ros.runtime.kv.policy import KVGeometry, KVPolicy, PolicyConfig, TokenMeta, make_policy
from mosaic_ros.runtime.kv.rope import Rotary1D

GEOM = KVGeometry(num_layers=2, num_kv_heads=2, head_dim=16, num_q_heads=4)
BUILT_IN = ["dense", "window", "token_topk", "rekv", "livevlm"]
ROTARY = Rotary1D(GEOM.head_dim)


def frame_meta(frame: int, start: int, n: int, text: int = 1) -> TokenMeta:
    """``text`` time-marker tokens then ``n - text`` vision tokens of ``frame``, stamped ``frame`` s."""
    modality = torch.ones(n, dtype=torch.uint8)
    modality[:text] = 0
    frames = torch.full((n,), frame)
    frames[:text] = -1
    return TokenMeta(
        positions=torch.arange(start, start + n)[None],
        stamps=torch.full((n,), float(frame), dtype=torch.float64),
        modality=modality,
        frame=frames,
    )


def brute_force_ingest_ids(p: KVPolicy, layer: int) -> list[int]:
    """Sinks + the last ``window_tokens`` live tokens, from a scan of every live token."""
    live = p.store.live_tokens(layer).tolist()
    sinks = [i for i in live if i < p.config.sink_tokens]
    rest = [i for i in live if i >= p.config.sink_tokens]
    return sinks + rest[max(len(rest) - p.config.window_tokens, 0) :]


def assert_map_inverts_slots(buf) -> None:
    """A device buffer's host-row -> slot map says exactly what its slots hold."""
    held = {int(r): s for s, r in enumerate(buf.slot_rows[0].tolist()) if r >= 0}
    rmap = buf.row_slots(0)[0]
    mapped = {r: int(rmap[r]) for r in range(rmap.shape[0]) if rmap[r] >= 0}
    assert mapped == held


def feed(
    policies: list[KVPolicy], frames: int, per_frame: int, seed: int = 0, geom: KVGeometry = GEOM
) -> int:
    """Stream the same random KV into every policy (ingest context asked first, as a model does)."""
    gen = torch.Generator().manual_seed(seed)
    start = 0
    for f in range(frames):
        meta = frame_meta(f, start, per_frame)
        kv = [
            (
                torch.randn(per_frame, geom.num_kv_heads, geom.head_dim, generator=gen).half(),
                torch.randn(per_frame, geom.num_kv_heads, geom.head_dim, generator=gen).half(),
            )
            for _ in range(geom.num_layers)
        ]
        for p in policies:
            ids = p.add_tokens(meta)
            for layer, (k, v) in enumerate(kv):
                ctx = p.ingest_context(layer)
                if ctx is not None and p.name != "dense":
                    assert sorted(ctx.token_ids[0].tolist()) == p.ingest_ids(layer).tolist()
                    assert p.ingest_ids(layer).tolist() == brute_force_ingest_ids(p, layer)
                    assert_map_inverts_slots(p._ingest_buffers[layer])
                p.append(layer, k, v, ids)
            p.maintain(5.0)
        start += per_frame
    return start


def context_output(ctx, query: torch.Tensor, local: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    keys = rotate_context(ctx, ROTARY)
    return attend(query, keys.float(), ctx.values.float(), local[0], local[1])


def sorted_heads(ctx) -> list[list[int]]:
    return [sorted(row) for row in ctx.token_ids.tolist()]


@pytest.mark.parametrize("name", BUILT_IN)
def test_budget_covering_the_stream_equals_dense(name):
    config = PolicyConfig(budget_tokens=512, sink_tokens=4, window_tokens=16)
    dense = make_policy("dense", GEOM, config)
    other = make_policy(name, GEOM, config)
    total = feed([dense, other], frames=12, per_frame=20)
    assert total <= config.budget_tokens
    gen = torch.Generator().manual_seed(1)
    for p in (dense, other):
        p.begin_question()
    for layer in range(GEOM.num_layers):
        query = torch.randn(GEOM.num_q_heads, 3, GEOM.head_dim, generator=gen)
        local = (
            torch.randn(2, 3, GEOM.head_dim, generator=gen),
            torch.randn(2, 3, GEOM.head_dim, generator=gen),
        )
        ref = dense.retrieve(layer, query)
        got = other.retrieve(layer, query)
        assert sorted_heads(got) == sorted_heads(ref) == [list(range(total))] * GEOM.num_kv_heads
        torch.testing.assert_close(
            context_output(got, query, local), context_output(ref, query, local), rtol=1e-5, atol=1e-5
        )
    for p in (dense, other):
        p.end_question()


@pytest.mark.parametrize("name", BUILT_IN)
def test_no_policy_exceeds_its_budget(name):
    gen = torch.Generator().manual_seed(7)
    for trial in range(6):
        budget = int(torch.randint(24, 200, (1,), generator=gen))
        sinks = int(torch.randint(0, 8, (1,), generator=gen))
        window = int(torch.randint(0, budget - sinks, (1,), generator=gen))
        config = PolicyConfig(budget_tokens=budget, sink_tokens=sinks, window_tokens=window)
        policy = make_policy(name, GEOM, config)
        frames = int(torch.randint(1, 15, (1,), generator=gen))
        total = feed([policy], frames=frames, per_frame=17, seed=trial)
        policy.begin_question()
        handed = 0
        for layer in range(GEOM.num_layers):
            ctx = policy.retrieve(layer, torch.randn(GEOM.num_q_heads, 2, GEOM.head_dim))
            handed += ctx.num_tokens
            if name != "dense":
                assert ctx.num_tokens <= budget
            if name in ("window", "token_topk"):
                assert ctx.num_tokens == min(budget, total)
            for row in ctx.token_ids.tolist():
                assert len(set(row)) == len(row)
        stats = policy.end_question()
        assert stats.tokens_retrieved == handed


@pytest.mark.parametrize("name", [*BUILT_IN, "mosaic"])
def test_a_stream_shorter_than_its_sinks_is_ingested_and_questioned(name):
    """32 sink tokens over a 17-token preamble (a small model's system prompt): the sinks are
    all the stream has, and neither ingest nor retrieval may ask for tokens beyond it."""
    config = PolicyConfig(budget_tokens=96, sink_tokens=32, window_tokens=16)
    policy = make_policy(name, GEOM, config)
    total = feed([policy], frames=1, per_frame=17)
    total += feed([policy], frames=1, per_frame=5, seed=2)  # ingested against the sinks alone
    assert total < config.sink_tokens
    for more in (0, 3):  # a question on the preamble alone, then as the stream grows past the sinks
        total += feed([policy], frames=more, per_frame=17, seed=1)
        policy.begin_question()
        for layer in range(GEOM.num_layers):
            ctx = policy.retrieve(layer, torch.randn(GEOM.num_q_heads, 2, GEOM.head_dim))
            assert 0 < ctx.num_tokens <= min(config.budget_tokens, total) or name == "dense"
        policy.end_question()


def test_window_keeps_sinks_and_the_newest_tokens():
    config = PolicyConfig(budget_tokens=40, sink_tokens=4, window_tokens=8)
    policy = make_policy("window", GEOM, config)
    total = feed([policy], frames=10, per_frame=10)
    policy.begin_question()
    ctx = policy.retrieve(0, torch.randn(4, 1, 16))
    assert sorted_heads(ctx)[0] == [0, 1, 2, 3, *range(total - 36, total)]
    ingest = policy.ingest_context(1)
    assert sorted(ingest.token_ids[0].tolist()) == [0, 1, 2, 3, *range(total - 8, total)]


@pytest.mark.parametrize("name", BUILT_IN)
def test_time_window_limits_candidates_but_keeps_sinks(name):
    config = PolicyConfig(budget_tokens=64, sink_tokens=3, window_tokens=8)
    policy = make_policy(name, GEOM, config)
    feed([policy], frames=10, per_frame=10)
    policy.begin_question(window=(4.0, 5.0))
    ctx = policy.retrieve(0, torch.randn(4, 2, 16))
    policy.end_question()
    ids = torch.tensor(sorted_heads(ctx)[0])
    stamps = policy.store.stamps[ids]
    inside = (stamps >= 4.0) & (stamps <= 5.0)
    assert bool((inside | (ids < 3)).all())
    assert {0, 1, 2} <= set(ids.tolist())
    assert set(range(40, 60)) <= set(ids.tolist())


def scanned_split(p: KVPolicy, layer: int, budget: int, window=None) -> tuple[list[int], list[int]]:
    """``split_candidates`` by its definition, from a scan of the layer's token -> row map."""
    table = p.store.table
    live = [i for i in range(table.num_tokens) if int(table.token_row[layer][i]) >= 0]
    sinks = [i for i in live if i < p.config.sink_tokens][:budget]
    stamps = p.store.stamps
    cand = [
        i
        for i in live
        if i >= p.config.sink_tokens and (window is None or window[0] <= float(stamps[i]) <= window[1])
    ]
    w = min(p.config.window_tokens, budget - len(sinks), len(cand))
    return sinks + cand[len(cand) - w :], cand[: len(cand) - w]


@pytest.mark.parametrize("evict", [False, True])
def test_live_tokens_and_the_candidate_split_match_a_scan_with_and_without_evictions(evict):
    cap = 120 * GEOM.bytes_per_token if evict else 0
    config = PolicyConfig(budget_tokens=48, sink_tokens=4, window_tokens=16, host_cap_bytes=cap)
    policy = make_policy("rekv", GEOM, config)
    for f in range(30):
        ids = policy.add_tokens(frame_meta(f, f * 10, 10))
        for layer in range(GEOM.num_layers):
            policy.append(layer, torch.randn(10, 2, 16).half(), torch.randn(10, 2, 16).half(), ids)
    assert (policy.memory().tokens_evicted > 0) == evict
    table = policy.store.table
    for layer in range(GEOM.num_layers):
        scan = [i for i in range(table.num_tokens) if int(table.token_row[layer][i]) >= 0]
        assert policy.store.live_tokens(layer).tolist() == scan
        for window in (None, (12.0, 20.0)):
            policy.begin_question(window=window)
            for budget in (48, 10, 3):
                base, rest = policy.split_candidates(layer, budget)
                assert (base.tolist(), rest.tolist()) == scanned_split(policy, layer, budget, window)
            policy.end_question()


def test_bad_parameters_raise_clear_errors():
    with pytest.raises(ValueError, match="budget_tokens must be >= 1, got 0"):
        PolicyConfig(budget_tokens=0)
    with pytest.raises(ValueError, match="exceed budget_tokens"):
        PolicyConfig(budget_tokens=10, sink_tokens=4, window_tokens=8)
    with pytest.raises(ValueError, match="unknown KV policy 'nope'"):
        make_policy("nope", GEOM)
    with pytest.raises(ValueError, match="unknown option"):
        make_policy("window", GEOM, PolicyConfig(options={"bogus": 1}))
    with pytest.raises(ValueError, match="unknown compression"):
        make_policy("window", GEOM, PolicyConfig(compression="zip"))
    policy = make_policy("window", GEOM, PolicyConfig(budget_tokens=64, sink_tokens=4, window_tokens=8))
    bad = frame_meta(0, 0, 4)
    bad.frame[2] = -5
    with pytest.raises(ValueError, match="frame indices must be >= 0"):
        policy.add_tokens(bad)
    with pytest.raises(RuntimeError, match="begin_question"):
        policy.retrieve(0, torch.randn(4, 1, 16))
    policy.begin_question()
    with pytest.raises(ValueError, match="query must be"):
        policy.retrieve(0, torch.randn(3, 1, 16))
    with pytest.raises(ValueError, match="layer 9 out of range"):
        policy.retrieve(9, torch.randn(4, 1, 16))


def test_a_host_cap_below_sinks_plus_window_is_refused_at_construction():
    config = PolicyConfig(
        budget_tokens=64, sink_tokens=4, window_tokens=16, host_cap_bytes=10 * GEOM.bytes_per_token
    )
    with pytest.raises(ValueError, match="must hold at least sinks"):
        make_policy("window", GEOM, config)


@pytest.mark.parametrize("compression", ["vsb", "drop_oldest"])
@pytest.mark.parametrize("name", BUILT_IN)
def test_host_cap_holds_over_a_long_stream_and_sinks_survive(name, compression):
    cap = 120 * GEOM.bytes_per_token
    config = PolicyConfig(
        budget_tokens=64, sink_tokens=4, window_tokens=16, host_cap_bytes=cap, compression=compression
    )
    policy = make_policy(name, GEOM, config)
    peak = 0
    for f in range(40):
        feed_one = frame_meta(f, f * 10, 10)
        ids = policy.add_tokens(feed_one)
        for layer in range(GEOM.num_layers):
            ctx = policy.ingest_context(layer)
            if ctx is not None and name != "dense":
                assert sorted(ctx.token_ids[0].tolist()) == policy.ingest_ids(layer).tolist()
            policy.append(layer, torch.randn(10, 2, 16).half(), torch.randn(10, 2, 16).half(), ids)
        mem = policy.memory()
        peak = max(peak, mem.host_kv_bytes + (mem.device_kv_bytes if name == "dense" else 0))
    mem = policy.memory()
    assert peak <= cap
    assert mem.tokens_evicted > 0
    assert mem.tokens + mem.tokens_evicted >= 400 - 10
    assert bool(policy.store.alive[:4].all())
    # The local window (the newest tokens) survives too.
    assert bool(policy.store.alive[400 - 16 :].all())


@pytest.mark.parametrize("name", ["window", "token_topk", "rekv", "livevlm"])
def test_an_identical_second_question_copies_nothing_again(name):
    config = PolicyConfig(budget_tokens=96, sink_tokens=4, window_tokens=16)
    policy = make_policy(name, GEOM, config)
    feed([policy], frames=20, per_frame=15)
    query = torch.randn(GEOM.num_q_heads, 3, GEOM.head_dim, generator=torch.Generator().manual_seed(3))
    moved = []
    for _ in range(2):
        policy.begin_question()
        for layer in range(GEOM.num_layers):
            policy.retrieve(layer, query)
        moved.append(policy.end_question().bytes_moved)
    assert moved[0] > 0
    assert moved[1] == 0


def test_livevlm_closes_gaps_so_retrieved_pages_abut_before_the_question():
    from mosaic_ros.runtime.kv.policies.livevlm import contiguous_positions

    ids = torch.tensor([0, 1, 5, 6, 7, 12])
    positions = ids[None].clone()
    shifted = contiguous_positions(ids, positions, end_id=15, end_position=15)
    # Gaps: 2..4 (3 tokens), 8..11 (4 tokens), 13..15 (3 tokens) -> everything ends at 15.
    assert shifted[0].tolist() == [10, 11, 12, 13, 14, 15]
    # M-RoPE: the gap is measured on the time component and added to all three.
    mpos = torch.tensor([[0, 0, 4], [0, 1, 7], [1, 2, 9]])
    out = contiguous_positions(torch.tensor([0, 1, 30]), mpos, end_id=30, end_position=4)
    assert out.tolist() == [[3, 3, 4], [3, 4, 7], [4, 5, 9]]


def test_livevlm_continuous_vsb_keeps_the_configured_share():
    config = PolicyConfig(budget_tokens=64, sink_tokens=4, window_tokens=20, options={"vsb_ratio": 0.5})
    policy = make_policy("livevlm", GEOM, config)
    total = feed([policy], frames=30, per_frame=10)
    live = policy.store.live_count(0)
    old = total - 20 - 4
    assert live == pytest.approx(4 + 20 + old * 0.5, abs=30)
    assert policy.memory().tokens_evicted > 0
    assert bool(policy.store.alive[:4].all()) and bool(policy.store.alive[total - 20 :].all())


def test_token_topk_keeps_the_most_dense_attention_mass_at_equal_budget():
    """Where this must hold: every token sits at rotary position 0, so rotation is the identity
    and the position-free logits token_topk scores ARE the dense logits. Its ``sum`` score of a
    token for a KV head is then exactly that token's contribution to the head's recall (the same
    softmax over all stored tokens), every policy keeps the same sinks + window and stays within
    the same budget, so per-head top scores maximise recall over every selection the others
    can make."""
    config = PolicyConfig(budget_tokens=60, sink_tokens=4, window_tokens=8)
    names = ["window", "token_topk", "rekv", "livevlm"]
    policies = [make_policy(n, GEOM, config) for n in names]
    gen = torch.Generator().manual_seed(5)
    start = 0
    stored = {layer: [] for layer in range(GEOM.num_layers)}
    for f in range(16):
        meta = frame_meta(f, start, 12)
        meta.positions.zero_()
        kv = [(torch.randn(12, 2, 16, generator=gen).half(), torch.randn(12, 2, 16, generator=gen).half())]
        kv = kv * GEOM.num_layers
        for p in policies:
            ids = p.add_tokens(meta)
            for layer, (k, v) in enumerate(kv):
                p.ingest_context(layer)
                p.append(layer, k, v, ids)
        for layer, (k, _) in enumerate(kv):
            stored[layer].append(k)
        start += 12
    group = GEOM.group_size
    recall = {}
    for name, p in zip(names, policies, strict=True):
        p.begin_question()
        per_layer = []
        for layer in range(GEOM.num_layers):
            query = 3 * torch.randn(GEOM.num_q_heads, 2, 16, generator=torch.Generator().manual_seed(layer))
            keys_all = torch.cat(stored[layer]).float().transpose(0, 1)  # (H_kv, N, D)
            kv_head = torch.arange(GEOM.num_q_heads) // group
            dense_logits = torch.einsum("hld,hnd->hln", query, keys_all[kv_head]) / 4.0
            lse = torch.logsumexp(dense_logits, dim=-1)
            ctx = p.retrieve(layer, query)
            logits = torch.einsum("hld,htd->hlt", query, ctx.keys.float()[kv_head]) / 4.0
            per_layer.append(float(torch.exp(logits - lse[..., None]).sum(-1).mean()))
        p.end_question()
        recall[name] = sum(per_layer) / len(per_layer)
    assert recall["token_topk"] < 1.0
    for name in ("window", "rekv", "livevlm"):
        assert recall["token_topk"] >= recall[name] - 1e-6, recall
