"""ClusterIndex / ClusterBank: cohesion-aware assignment, adaptive threshold, deferred splits, scoring,
selection, and all layers assigned at once."""

from __future__ import annotations

import random

import pytest
import torch

from mosaic_ros.runtime.kv.clusters import (
    ClusterBank,
    ClusterConfig,
    ClusterIndex,
    _fine_search_host,
    _fine_search_torch,
)

H, D = 4, 32


@pytest.fixture(autouse=True)
def one_thread():
    """These tensors are tiny: intra-op threads only add overhead (a lot of it on busy shared cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class KeyBank:
    """Keys by token id, the ``key_lookup`` the index is given."""

    def __init__(self, heads: int = H, dim: int = D, capacity: int = 1 << 16):
        self.keys = torch.zeros(capacity, heads, dim)
        self.next_id = 0

    def add(self, keys: torch.Tensor) -> torch.Tensor:
        ids = torch.arange(self.next_id, self.next_id + keys.shape[0])
        self.keys[ids] = keys.float()
        self.next_id += keys.shape[0]
        return ids

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        return self.keys[ids]


def blob_stream(blobs=6, chunks=20, chunk=50, noise=0.3, seed=0, heads=H, dim=D):
    """Chunks of keys drawn from ``blobs`` well separated Gaussian blobs: (keys, blob label) pairs."""
    gen = torch.Generator().manual_seed(seed)
    centers = torch.randn(blobs, heads, dim, generator=gen)
    out = []
    for _ in range(chunks):
        label = torch.randint(blobs, (chunk,), generator=gen)
        out.append((centers[label] + noise * torch.randn(chunk, heads, dim, generator=gen), label))
    return out


def purity(pred: torch.Tensor, truth: torch.Tensor) -> float:
    """Share of tokens whose cluster's majority label is their own label."""
    hits = sum(int(torch.bincount(truth[pred == c]).max()) for c in pred.unique())
    return hits / truth.numel()


def run_stream(index: ClusterIndex, stream, bank: KeyBank, scale: float = 1.0):
    labels = []
    for keys, label in stream:
        index.assign(keys * scale, bank.add(keys * scale))
        labels.append(label)
    truth = torch.cat(labels)
    return index.units_of(torch.arange(truth.numel())), truth


def test_recovers_blobs():
    index, bank = ClusterIndex(H, D), KeyBank()
    pred, truth = run_stream(index, blob_stream(), bank)
    assert purity(pred, truth) > 0.95  # clusters do not mix blobs
    assert purity(truth, pred) > 0.9  # each blob lives (almost) in one cluster
    assert index.num_clusters <= 12
    index.check_invariants(bank)


@pytest.mark.parametrize("factor", [10.0, 0.1])
def test_partition_does_not_depend_on_key_scale(factor):
    stream = blob_stream(noise=0.6, seed=1)
    base, bank = ClusterIndex(H, D), KeyBank()
    ref, _ = run_stream(base, stream, bank)
    scaled, bank_scaled = ClusterIndex(H, D), KeyBank()
    pred, _ = run_stream(scaled, stream, bank_scaled, scale=factor)
    assert torch.equal(pred, ref)
    assert scaled.threshold == pytest.approx(base.threshold, rel=1e-4)


def test_threshold_follows_the_spread():
    taus = []
    for noise in (0.15, 0.3):
        index, bank = ClusterIndex(H, D), KeyBank()
        pred, truth = run_stream(index, blob_stream(noise=noise, seed=2), bank)
        assert purity(pred, truth) > 0.95 and purity(truth, pred) > 0.9
        taus.append(index.threshold)
    # twice the noise is about four times the within-blob variance on the unit sphere
    assert 2.5 < taus[1] / taus[0] < 5.0


def test_leading_text_does_not_distort_the_scale():
    stream = blob_stream(seed=11)
    plain, bank = ClusterIndex(H, D), KeyBank()
    vision = [(keys, label, torch.ones(keys.shape[0], dtype=torch.uint8)) for keys, label in stream]
    for keys, _, tags in vision:
        plain.assign(keys, bank.add(keys), modality=tags)
    prompted, bank = ClusterIndex(H, D), KeyBank()
    prompt = 3.0 * torch.randn(30, H, D, generator=torch.Generator().manual_seed(12))  # a system prompt
    prompted.assign(prompt, bank.add(prompt), modality=torch.zeros(30, dtype=torch.uint8))
    for keys, _, tags in vision:
        prompted.assign(keys, bank.add(keys), modality=tags)
    assert prompted.threshold == pytest.approx(plain.threshold, rel=0.05)
    truth = torch.cat([label for _, label in stream])
    pred = prompted.units_of(torch.arange(30, 30 + truth.numel()))
    assert purity(pred, truth) > 0.95 and purity(truth, pred) > 0.9


def test_far_token_opens_a_cluster_even_next_to_a_big_one():
    gen = torch.Generator().manual_seed(3)
    center = torch.randn(H, D, generator=gen)
    index, bank = ClusterIndex(H, D), KeyBank()
    for _ in range(6):
        keys = center + 0.2 * torch.randn(64, H, D, generator=gen)
        index.assign(keys, bank.add(keys))
    assert index.num_clusters == 1
    # halfway to an unrelated direction: a single token would barely move the big cluster's
    # variance, but it lies far outside the cluster's radius
    outlier = (center + torch.randn(H, D, generator=gen))[None]
    (cid,) = index.assign(outlier, bank.add(outlier)).tolist()
    assert index.num_clusters == 2 and index.counts[cid] == 1


def test_tokens_join_their_exactly_nearest_cluster():
    # the coarse projected search must hand the exact re-rank the nearest cluster; keys share a
    # dominant common direction, as real pre-RoPE keys do. 100 blobs, all of them in every
    # chunk: more recent clusters than the exact stage takes (64), so the coarse ranking runs
    gen = torch.Generator().manual_seed(13)
    offset = 4.0 * torch.randn(H, D, generator=gen)
    centers = offset + torch.randn(100, H, D, generator=gen)
    index, bank = ClusterIndex(H, D), KeyBank()
    for step in range(13):
        label = torch.randint(100, (300,), generator=gen)
        keys = centers[label] + 0.2 * torch.randn(300, H, D, generator=gen)
        placed = index.units_of(torch.arange(bank.next_id))
        live = (index.counts > 0).nonzero().flatten()
        unit = torch.nn.functional.normalize(bank.keys[: bank.next_id], dim=-1).flatten(1) / H**0.5
        means = torch.stack([unit[placed == c].mean(0) for c in live.tolist()]) if live.numel() else None
        new_unit = torch.nn.functional.normalize(keys, dim=-1).flatten(1) / H**0.5
        cid = index.assign(keys, bank.add(keys))
        if means is None:
            continue
        joined = torch.isin(cid, live)
        assert step < 8 or joined.float().mean() > 0.9  # once every blob has been seen
        nearest = live[torch.cdist(new_unit, means).argmin(dim=1)]
        assert torch.equal(cid[joined], nearest[joined])
    assert index.search_width > 64  # the two-stage search ran


def scene_stream(scenes=12, blobs=3, chunks=5, chunk=60, seed=21):
    """Scenes of a few blobs each, shown one after the other: a list of (scene, keys) chunks."""
    gen = torch.Generator().manual_seed(seed)
    centers = torch.randn(scenes, blobs, H, D, generator=gen)

    def show(scene: int, blob: int | None = None) -> torch.Tensor:
        label = torch.randint(blobs, (chunk,), generator=gen) if blob is None else torch.full((chunk,), blob)
        return centers[scene, label] + 0.3 * torch.randn(chunk, H, D, generator=gen)

    return [(k, show(k)) for k in range(scenes) for _ in range(chunks)], show


def test_continuing_content_is_searched_among_recent_clusters_only():
    chunks, _ = scene_stream()
    index, bank = ClusterIndex(H, D), KeyBank()
    widths = []
    for i, (_, keys) in enumerate(chunks):
        before = index.num_clusters
        index.assign(keys, bank.add(keys))
        if i % 5 >= 2:  # the scene's clusters exist: its tokens join them
            assert index.num_clusters == before
            widths.append(index.search_width)
    assert index.num_clusters >= 30
    # a scene's third chunk on compares each token with the clusters of the last few chunks
    # (its own 3 blobs, at most the previous scene's too), not with every cluster made so far
    assert max(widths) <= 6
    index.check_invariants(bank)


def test_revisited_content_joins_its_old_clusters():
    chunks, show = scene_stream()
    index, bank = ClusterIndex(H, D), KeyBank()
    first = []
    for scene, keys in chunks:
        cid = index.assign(keys, bank.add(keys))
        if scene == 0:
            first.append(cid)
    scene0 = set(torch.cat(first).tolist())
    clusters = index.num_clusters
    keys = show(0)  # back to the first scene, 55 chunks later
    cid = index.assign(keys, bank.add(keys))
    assert set(cid.tolist()) <= scene0 and index.num_clusters == clusters
    assert index.search_width > clusters - 6  # no recent cluster took them: the older ones were searched
    keys = show(0)
    cid = index.assign(keys, bank.add(keys))
    assert set(cid.tolist()) <= scene0 and index.search_width <= 6  # and they are recent again
    index.check_invariants(bank)


def test_revisits_are_found_through_the_regions_of_older_clusters():
    chunks, show = scene_stream(scenes=40)
    index, bank = ClusterIndex(H, D, ClusterConfig(route_min_clusters=32)), KeyBank()
    first = []
    for scene, keys in chunks:
        cid = index.assign(keys, bank.add(keys))
        index.maintain(bank, budget_ms=50.0)
        if scene == 0:
            first.append(cid)
    scene0 = set(torch.cat(first).tolist())
    clusters = index.num_clusters
    # rebuilt at 32 and 64+ clusters (each time ceil(sqrt(C)) regions), the later clusters routed
    assert clusters == 120 and index.regions == 9
    keys = show(0, blob=1)  # one object of the first scene again
    cid = index.assign(keys, bank.add(keys))
    assert len(set(cid.tolist())) == 1 and set(cid.tolist()) <= scene0 and index.num_clusters == clusters
    # its tokens opened their 2 nearest of 9 regions: a fraction of the 117 older clusters
    assert index.search_width < 0.4 * clusters
    index.check_invariants(bank)


def test_cross_modal_tokens_share_clusters():
    gen = torch.Generator().manual_seed(4)
    centers = torch.randn(2, H, D, generator=gen)
    index, bank = ClusterIndex(H, D), KeyBank()
    labels = []
    for _ in range(4):
        label = torch.randint(2, (40,), generator=gen)
        keys = centers[label] + 0.2 * torch.randn(40, H, D, generator=gen)
        index.assign(keys, bank.add(keys), modality=torch.ones(40, dtype=torch.uint8))
        labels.append(label)
    frames_of_blob1 = index.units_of((torch.cat(labels) == 1).nonzero().flatten()).unique()
    text = centers[1][None] + 0.2 * torch.randn(3, H, D, generator=gen)  # text tokens "about" blob 1
    cid = index.assign(text, bank.add(text), modality=torch.zeros(3, dtype=torch.uint8))
    assert frames_of_blob1.numel() == 1 and cid.tolist() == frames_of_blob1.tolist() * 3
    mixed = index.modality_counts()[cid[0]]
    assert mixed[0] == 3 and mixed[1] > 0


def test_large_cluster_is_only_queued_by_assign_then_split_by_maintain():
    gen = torch.Generator().manual_seed(5)
    center = torch.randn(H, D, generator=gen)
    index, bank = ClusterIndex(H, D, ClusterConfig(max_cluster_tokens=32)), KeyBank()
    seen = torch.zeros(0, dtype=torch.int64)
    for _ in range(5):
        placed = index.units_of(seen)
        keys = center + 0.2 * torch.randn(20, H, D, generator=gen)
        ids = bank.add(keys)
        index.assign(keys, ids)
        assert torch.equal(index.units_of(seen), placed)  # assign never moves placed tokens
        seen = torch.cat((seen, ids))
    assert index.counts.max() > 32
    assert index.pending
    state = (index.counts, index.units_of(seen))
    report = index.maintain(bank, budget_ms=0.0)
    assert report.splits == [] and report.pending == len(index.pending)
    assert torch.equal(index.counts, state[0]) and torch.equal(index.units_of(seen), state[1])
    report = index.maintain(bank, budget_ms=60_000.0)
    assert report.splits and report.pending == 0 and not index.pending
    assert int(index.counts.max()) <= 32
    index.check_invariants(bank)


def test_loose_cluster_is_queued_when_the_scale_tightens_and_split_later():
    gen = torch.Generator().manual_seed(6)
    wide, tight = torch.randn(2, H, D, generator=gen)
    index, bank = ClusterIndex(H, D), KeyBank()
    for _ in range(3):
        keys = wide + 0.8 * torch.randn(40, H, D, generator=gen)
        index.assign(keys, bank.add(keys))
    (wide_id,) = index.units_of(torch.arange(120)).unique().tolist()
    assert wide_id not in index.pending
    for _ in range(30):  # the layer's local scale shrinks: the wide cluster is now loose
        keys = tight + 0.1 * torch.randn(40, H, D, generator=gen)
        index.assign(keys, bank.add(keys))
    assert wide_id in index.pending
    assert index.counts[wide_id] == 120  # queued, untouched
    parent_members = index.members(wide_id).clone()
    report = index.maintain(bank, budget_ms=60_000.0)
    first = next(s for s in report.splits if s.parent == wide_id)
    assert first.children[0] == wide_id
    assert torch.equal(torch.cat(first.members).sort().values, parent_members)
    index.check_invariants(bank)


def test_split_reports_preserve_membership():
    gen = torch.Generator().manual_seed(7)
    centers = torch.randn(3, H, D, generator=gen)
    index, bank = ClusterIndex(H, D, ClusterConfig(max_cluster_tokens=16)), KeyBank()
    for _ in range(8):
        label = torch.randint(3, (30,), generator=gen)
        keys = centers[label] + 0.3 * torch.randn(30, H, D, generator=gen)
        index.assign(keys, bank.add(keys))
    members = {c: index.members(c).clone() for c in range(index.num_slots)}
    report = index.maintain(bank, budget_ms=60_000.0)
    assert report.splits
    for split in report.splits:
        a, b = split.members
        assert split.parent == split.children[0]
        assert torch.equal(torch.cat((a, b)).sort().values, members[split.parent])
        assert not set(a.tolist()) & set(b.tolist())
        members[split.children[0]], members[split.children[1]] = a, b
    for c, m in members.items():  # replaying the report reproduces the index
        assert torch.equal(index.members(c), m)
    index.check_invariants(bank)


def test_score_ranks_the_cluster_aligned_with_the_query_first():
    gen = torch.Generator().manual_seed(8)
    centers = torch.randn(5, H, D, generator=gen)
    index, bank = ClusterIndex(H, D), KeyBank()
    for _ in range(6):
        label = torch.randint(5, (50,), generator=gen)
        keys = centers[label] + 0.3 * torch.randn(50, H, D, generator=gen)
        index.assign(keys, bank.add(keys))
    group = 2  # GQA: 8 query heads over 4 KV heads
    for target in range(5):
        query = 3.0 * centers[target].repeat_interleave(group, dim=0)[:, None, :].expand(-1, 3, -1)
        scores = index.score(query)
        truth = centers.flatten(1) @ centers[target].flatten()
        best_blob = int(truth.argmax())
        best_cluster = int(scores.argmax())
        member_keys = bank(index.members(best_cluster))
        dist = (member_keys.mean(0) - centers).flatten(1).norm(dim=1)
        assert int(dist.argmin()) == best_blob
        assert torch.exp(scores).sum() == pytest.approx(1.0, abs=1e-5)  # shares of attention


def test_remove_tokens_frees_and_reuses_ids():
    gen = torch.Generator().manual_seed(9)
    centers = torch.randn(2, H, D, generator=gen)
    index, bank = ClusterIndex(H, D), KeyBank()
    for blob in (0, 1, 0, 1):
        keys = centers[blob] + 0.2 * torch.randn(30, H, D, generator=gen)
        index.assign(keys, bank.add(keys))
    first = int(index.units_of(torch.tensor([0])))
    gone = index.members(first).clone()
    emptied = index.remove_tokens(gone, bank(gone))
    assert emptied.tolist() == [first] and index.counts[first] == 0
    assert bool((index.units_of(gone) == -1).all()) and index.num_tokens == 120 - gone.numel()
    index.check_invariants(bank)
    far = torch.randn(1, H, D, generator=gen) * 5
    assert index.assign(far, bank.add(far)).tolist() == [first]  # the freed id is reused
    index.check_invariants(bank)


def test_rejects_bad_input():
    index = ClusterIndex(H, D)
    keys = torch.randn(3, H, D)
    with pytest.raises(ValueError, match="increasing"):
        index.assign(keys, torch.tensor([0, 2, 1]))
    index.assign(keys, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="above"):
        index.assign(keys, torch.tensor([2, 3, 4]))
    with pytest.raises(ValueError, match="keys must be"):
        index.assign(torch.randn(3, H, D + 1), torch.tensor([5, 6, 7]))
    with pytest.raises(ValueError, match="route_min_clusters"):
        ClusterConfig(route_min_clusters=0)


def test_check_invariants_catches_corruption():
    index, bank = ClusterIndex(H, D), KeyBank()
    keys = torch.randn(10, H, D)
    index.assign(keys, bank.add(keys))
    index.check_invariants(bank)
    bank.keys[3] += 1.0  # stored keys no longer match the statistics
    with pytest.raises(AssertionError, match="centroids drifted"):
        index.check_invariants(bank)
    bank.keys[3] -= 1.0
    index._bank.tok_cluster[0, 0] = -1  # a token lost from the map
    with pytest.raises(AssertionError, match="tokens mapped"):
        index.check_invariants(bank)


def text_chunk_keys(rng: random.Random, gen: torch.Generator, heads: int, dim: int, longest: int):
    """Keys of a long text chunk: 100 to ``longest`` tokens drawn from 3-30 new "words", each a
    tight group of keys."""
    n = rng.randint(100, longest)
    vocab = 2 * torch.randn(rng.randint(3, 30), heads, dim, generator=gen)
    return vocab[torch.randint(len(vocab), (n,), generator=gen)] + 0.05 * torch.randn(
        n, heads, dim, generator=gen
    )


def object_chunk_keys(rng: random.Random, gen: torch.Generator, centers: torch.Tensor):
    """Keys of a frame chunk: 1-24 tokens near random ``centers`` (C, H, D), with a random spread."""
    n = rng.randint(1, 24)
    label = torch.randint(len(centers), (n,), generator=gen)
    return centers[label] + rng.choice((0.05, 0.3, 1.0)) * torch.randn(n, *centers.shape[1:], generator=gen)


def long_text_stream(index: ClusterIndex, bank: KeyBank, steps: int, seed: int) -> None:
    """Random operations on ``index``: frame chunks of 1-24 tokens near 12 objects, long text
    chunks of 100-600 tokens drawn from a few new "words" each, and maintenance."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    heads, dim = index.num_kv_heads, index.head_dim
    centers = torch.randn(12, heads, dim, generator=gen)
    for _ in range(steps):
        if rng.random() < 0.6:
            if rng.random() < 0.2:
                keys = text_chunk_keys(rng, gen, heads, dim, longest=600)
                modality = torch.zeros(keys.shape[0], dtype=torch.uint8)
            else:
                keys = object_chunk_keys(rng, gen, centers)
                modality = torch.ones(keys.shape[0], dtype=torch.uint8)
            ids = bank.add(keys)
            cid = index.assign(keys, ids, modality=modality)
            assert bool((cid >= 0).all()) and bool((index.units_of(ids) == cid).all())
        else:
            index.maintain(bank, budget_ms=rng.choice((0.0, 0.5, 5.0)))


def test_long_text_whose_regions_hold_no_older_cluster_opens_clusters():
    """Seed 7 of ``long_text_stream``: at its 9th step a long text chunk's tokens, rejected by the
    recent clusters, open regions that hold no older cluster (only the previous text chunk's
    recent ones). They must open clusters of their own, not search an empty set."""
    index = ClusterIndex(2, 8, ClusterConfig(max_cluster_tokens=24, route_min_clusters=16))
    bank = KeyBank(2, 8)
    long_text_stream(index, bank, steps=9, seed=7)
    assert index.regions > 0
    index.check_invariants(bank)


@pytest.mark.parametrize("seed", range(4))
def test_invariants_hold_over_streams_with_long_text_chunks(seed):
    index = ClusterIndex(2, 8, ClusterConfig(max_cluster_tokens=24, route_min_clusters=16))
    bank = KeyBank(2, 8, capacity=1 << 18)
    long_text_stream(index, bank, steps=300, seed=seed)
    index.check_invariants(bank)
    index.maintain(bank, budget_ms=60_000.0)
    index.check_invariants(bank)
    assert not index.pending


def test_invariants_hold_over_ten_thousand_random_operations():
    rng = random.Random(10)
    gen = torch.Generator().manual_seed(10)
    heads, dim = 2, 8
    centers = torch.randn(12, heads, dim, generator=gen)
    # regions from 16 clusters on, so routing, re-routing and rebuilds run under removals too
    index = ClusterIndex(heads, dim, ClusterConfig(max_cluster_tokens=24, route_min_clusters=16))
    bank = KeyBank(heads, dim, capacity=1 << 18)
    held: list[int] = []  # ascending
    for step in range(10_000):
        op = rng.random()
        if op < 0.5:
            if rng.random() < 0.05:  # a long text chunk (a question or answer)
                keys = text_chunk_keys(rng, gen, heads, dim, longest=400)
                modality = torch.zeros(keys.shape[0], dtype=torch.uint8)
            else:
                keys = object_chunk_keys(rng, gen, centers)
                modality = torch.randint(2, (keys.shape[0],), generator=gen).to(torch.uint8)
            ids = bank.add(keys)
            cid = index.assign(keys, ids, modality=modality)
            assert bool((cid >= 0).all()) and bool((index.units_of(ids) == cid).all())
            held.extend(ids.tolist())
        elif op < 0.75 and held:
            if len(held) > 1500:  # a memory cap: evict the oldest tokens
                gone = held[: rng.randint(100, 500)]
            else:
                gone = rng.sample(held, min(len(held), rng.randint(1, 20)))
            index.remove_tokens(torch.tensor(gone), bank(torch.tensor(gone)))
            gone_set = set(gone)
            held = [t for t in held if t not in gone_set]
        else:
            index.maintain(bank, budget_ms=rng.choice((0.0, 0.5, 5.0)))
        if step % 1000 == 999:
            index.check_invariants(bank)
            assert index.num_tokens == len(held)
    index.maintain(bank, budget_ms=60_000.0)
    index.check_invariants(bank)
    assert index.num_tokens == len(held) and not index.pending
    assert index.regions > 0


def layered_chunk(rng: random.Random, gen: torch.Generator, objects: list[torch.Tensor], noise: list[float]):
    """One chunk for every layer (same length, same tags): (keys per layer, modality).

    A frame chunk (1-24 tokens) shows objects; layer l sees each object as one of its own ``l + 1``
    variants with its own noise, so the layers' clusters differ in number and spread. A long text
    chunk (15%: 100-400 tokens) draws, per layer, from a few new "words" of its own.
    """
    heads, dim = objects[0].shape[1:]
    if rng.random() < 0.15:
        n, words = rng.randint(100, 400), rng.randint(3, 30)
        keys = []
        for _ in objects:
            vocab = torch.randn(words, heads, dim, generator=gen)
            word = torch.randint(words, (n,), generator=gen)
            keys.append(vocab[word] + 0.05 * torch.randn(n, heads, dim, generator=gen))
        return keys, torch.zeros(n, dtype=torch.uint8)
    n = rng.randint(1, 24)
    pick = torch.randint(12, (n,), generator=gen)
    keys = []
    for layer, (obj, sd) in enumerate(zip(objects, noise, strict=True)):
        variant = pick * (layer + 1) + torch.randint(layer + 1, (n,), generator=gen)
        keys.append(obj[variant] + sd * torch.randn(n, heads, dim, generator=gen))
    return keys, torch.ones(n, dtype=torch.uint8)


def test_a_bank_assigns_every_layer_as_that_layer_alone():
    """``ClusterBank.assign`` clusters a chunk in all layers at once (padded candidate sets, one
    batched product per stage); every layer must decide exactly what a one-layer index given the
    same stream decides, through regions, the coarse search, splits and long text chunks."""
    layers, heads, dim = 3, 2, 8
    cfg = ClusterConfig(max_cluster_tokens=24, route_min_clusters=16)
    bank = ClusterBank(layers, heads, dim, cfg)
    alone = [ClusterIndex(heads, dim, cfg) for _ in range(layers)]
    keys_of = [KeyBank(heads, dim, capacity=1 << 17) for _ in range(layers)]
    rng, gen = random.Random(3), torch.Generator().manual_seed(3)
    objects = [torch.randn(12 * (layer + 1), heads, dim, generator=gen) for layer in range(layers)]
    noise = [0.15, 0.3, 0.5]
    widest = 0.0
    for step in range(150):
        keys, modality = layered_chunk(rng, gen, objects, noise)
        ids = [store.add(k) for store, k in zip(keys_of, keys, strict=True)]
        ids = ids[0]  # the same ids in every layer
        together = bank.assign(torch.stack(keys), ids, modality)
        for layer, index in enumerate(alone):
            assert torch.equal(together[layer], index.assign(keys[layer], ids, modality)), (step, layer)
            assert bank.layers[layer].search_width == index.search_width
            widest = max(widest, index.search_width)
        if step % 5 == 4:  # maintenance with a budget no call uses up: the same splits either way
            for layer, index in enumerate(alone):
                mine = bank.layers[layer].maintain(keys_of[layer], 60_000.0).splits
                theirs = index.maintain(keys_of[layer], 60_000.0).splits
                assert [(s.parent, s.children) for s in mine] == [(s.parent, s.children) for s in theirs]
    clusters = [index.num_clusters for index in alone]
    assert len(set(clusters)) == layers  # the layers' sets differ in size: padding was exercised
    assert widest > 64  # a set beyond the exact-search limit: the coarse stage ran too
    for layer, index in enumerate(alone):
        view = bank.layers[layer]
        assert torch.equal(view.counts, index.counts) and view.regions == index.regions > 0
        assert view.threshold == index.threshold
        view.check_invariants(keys_of[layer])


def test_reused_chunk_buffers_change_no_decision():
    """``assign`` embeds a chunk into buffers it reuses (the float32 keys, the unit rows the
    reference hands back, the gathered rows), and takes the layers' keys stacked or as a list: a
    bank that does both must decide exactly what a bank given stacked keys and fresh buffers for
    every chunk decides, and hold the same statistics and reference, over chunks of many sizes
    (one size repeated, so the buffers are reused, and others in between)."""
    layers, heads, dim = 3, 2, 8
    cfg = ClusterConfig(max_cluster_tokens=24, route_min_clusters=16)
    reused, fresh = ClusterBank(layers, heads, dim, cfg), ClusterBank(layers, heads, dim, cfg)
    rng, gen = random.Random(5), torch.Generator().manual_seed(5)
    objects = [torch.randn(12 * (layer + 1), heads, dim, generator=gen) for layer in range(layers)]
    next_id = 0
    for step in range(120):
        if step % 3:
            keys, modality = layered_chunk(rng, gen, objects, [0.15, 0.3, 0.5])
        else:  # a run of equal-sized frames, as a video stream brings
            pick = torch.randint(12, (16,), generator=gen)
            keys = [
                obj[pick * (lay + 1)] + 0.2 * torch.randn(16, heads, dim, generator=gen)
                for lay, obj in enumerate(objects)
            ]
            modality = torch.ones(16, dtype=torch.uint8)
        ids = torch.arange(next_id, next_id + keys[0].shape[0])
        next_id += keys[0].shape[0] + 1
        fresh._raw, fresh._spare_units, fresh._gathered = None, [], {}
        half = [k.half() for k in keys]  # a list of fp16 layers, as the policy hands them over
        got = reused.assign(half if step % 2 else torch.stack(half), ids, modality)
        assert torch.equal(got, fresh.assign(torch.stack(half), ids, modality)), step
    assert reused._spare_units, "no buffer came back from the reference"
    for name in ("count", "sum_unit", "sum_raw", "sum_norm2", "sum_proj", "touched", "region"):
        assert torch.equal(getattr(reused, name), getattr(fresh, name)), name
    assert len(reused.ref) == len(fresh.ref)
    for (u, t), (v, w) in zip(reused.ref, fresh.ref, strict=True):
        assert torch.equal(u, v) and torch.equal(t, w)


def test_a_bank_takes_whole_chunks_of_every_layer():
    bank = ClusterBank(2, H, D)
    with pytest.raises(ValueError, match="keys must be"):
        bank.assign(torch.randn(3, H, D), torch.arange(3))
    with pytest.raises(ValueError, match="keys must be"):
        bank.assign([torch.randn(3, H, D)], torch.arange(3))  # one layer's keys of two
    with pytest.raises(ValueError, match="keys must be"):
        bank.assign([torch.randn(3, H, D), torch.randn(2, H, D)], torch.arange(3))
    with pytest.raises(ValueError, match="assigned together"):
        bank.layers[0].assign(torch.randn(3, H, D), torch.arange(3))


def test_the_compiled_fine_search_picks_what_the_tensor_one_picks():
    # the host kernel replaces the tensor operations on the CPU; the tensor path is what other
    # devices run, so both must pick the same cluster at the same distance
    gen = torch.Generator().manual_seed(5)
    layers_total, slots, width, rows, cands = 6, 40, 24, 30, 4
    sum_unit = torch.randn(layers_total, slots, width, generator=gen)
    count = torch.randint(1, 20, (layers_total, slots), generator=gen)
    sum_norm2 = (sum_unit * sum_unit).sum(dim=2)
    layers = torch.tensor([4, 0, 5])
    unit = torch.nn.functional.normalize(torch.randn(3, rows, width, generator=gen), dim=2)
    top = torch.randint(slots, (3, rows, cands), generator=gen)
    top[0, 0] = 7  # every candidate the same cluster: a tie, the first one wins either way
    want_d, want_c = _fine_search_torch(unit, top, layers, sum_unit, count, sum_norm2)
    got_d, got_c = torch.empty(3, rows), torch.empty(3, rows, dtype=torch.int64)
    _fine_search_host(
        unit.numpy(),
        top.numpy(),
        layers.numpy(),
        sum_unit.numpy(),
        count.numpy(),
        sum_norm2.numpy(),
        got_d.numpy(),
        got_c.numpy(),
    )
    assert torch.equal(got_c, want_c)
    assert torch.allclose(got_d, want_d, atol=1e-5)
    assert int(got_c[0, 0]) == 7
