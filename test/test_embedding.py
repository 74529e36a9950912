"""Assignment-space embeddings: the count sketch's host kernel, its geometry, and a bank clustering it."""

from __future__ import annotations

import math

import pytest
import torch

from mosaic_ros.runtime.kv.clusters import ClusterConfig, ClusterIndex
from mosaic_ros.runtime.kv.embedding import CountSketch, HeadNormalized
from mosaic_ros.runtime.kv.policies.mosaic import MosaicPolicy
from mosaic_ros.runtime.kv.policy import KVGeometry, PolicyConfig


def test_the_host_kernel_equals_the_matrix_form():
    sketch = CountSketch(4, 128, 16)
    raw = torch.randn(7, 50, 4, 128) * torch.linspace(0.1, 30.0, 128)  # uneven coordinates
    kernel = sketch(raw)
    matrix = sketch(raw.transpose(0, 1)).transpose(0, 1)  # not contiguous: the matrix path
    assert kernel.shape == (7, 50, 64)
    assert torch.allclose(kernel, matrix, atol=1e-6)
    # by hand for one row and head: signed bucket sums, normalized to 1 / sqrt(H)
    x = raw[3, 9, 2]
    sums = torch.zeros(16).index_add_(0, sketch.bucket, sketch.sign * x)
    assert torch.allclose(kernel[3, 9, 32:48], sums / sums.norm() / 2.0, atol=1e-6)


def test_each_bucket_takes_the_same_number_of_coordinates_and_the_map_is_fixed():
    a, b = CountSketch(2, 64, 16), CountSketch(2, 64, 16)
    assert torch.equal(torch.bincount(a.bucket, minlength=16), torch.full((16,), 4))
    assert torch.equal(a.bucket, b.bucket) and torch.equal(a.sign, b.sign)
    assert set(a.sign.tolist()) == {-1.0, 1.0}
    assert not torch.equal(a.bucket, CountSketch(2, 64, 16, seed=1).bucket)


@pytest.mark.parametrize("dims", [0, 64, 80])
def test_a_sketch_must_be_below_the_head_dim(dims):
    with pytest.raises(ValueError, match="sketch dims"):
        CountSketch(2, 64, dims)


def test_a_sketch_that_does_not_divide_the_head_dim_has_buckets_one_coordinate_apart():
    sketch = CountSketch(3, 72, 16)  # 72 = 4 x 16 + 8: eight buckets of 5, eight of 4
    assert sorted(torch.bincount(sketch.bucket, minlength=16).tolist()) == [4] * 8 + [5] * 8
    raw = torch.randn(5, 40, 3, 72, generator=torch.Generator().manual_seed(4))
    kernel = sketch(raw)
    assert torch.allclose(kernel, sketch(raw.transpose(0, 1)).transpose(0, 1), atol=1e-6)  # matrix path
    x = raw[1, 7, 2]
    sums = torch.zeros(16).index_add_(0, sketch.bucket, sketch.sign * x)
    assert torch.allclose(kernel[1, 7, 32:48], sums / sums.norm() / math.sqrt(3), atol=1e-6)


def test_rows_are_unit_vectors_with_every_head_weighing_the_same():
    raw = torch.randn(300, 4, 128) * torch.tensor([0.01, 1.0, 50.0, 3.0])[:, None]
    for embedding in (HeadNormalized(4, 128), CountSketch(4, 128, 32)):
        unit = embedding(raw).view(300, 4, -1)
        assert torch.allclose(unit.norm(dim=-1), torch.full((300, 4), 0.5), atol=1e-5)


def test_the_sketch_keeps_squared_distances_within_a_few_tenths():
    """Near pairs (the ones a join test decides) keep their squared distance to ~10% on average."""
    gen = torch.Generator().manual_seed(3)
    base = torch.randn(400, 4, 128, generator=gen)
    near = base + 0.3 * torch.randn(400, 4, 128, generator=gen)
    full, sketch = HeadNormalized(4, 128), CountSketch(4, 128, 32)
    d_full = ((full(base) - full(near)) ** 2).sum(dim=1)
    d_sketch = ((sketch(base) - sketch(near)) ** 2).sum(dim=1)
    rel = (d_sketch - d_full) / d_full
    assert abs(float(rel.mean())) < 0.05  # unbiased
    assert float(rel.abs().mean()) < 0.2
    assert float(rel.std()) > 0.01  # it is a sketch, not the same space


def blobs(seed: int, chunks: int = 30, chunk: int = 40, heads: int = 2, dim: int = 64):
    gen = torch.Generator().manual_seed(seed)
    centers = torch.randn(5, heads, dim, generator=gen)
    for _ in range(chunks):
        label = torch.randint(5, (chunk,), generator=gen)
        yield centers[label] + 0.25 * torch.randn(chunk, heads, dim, generator=gen), label


def test_a_sketched_index_clusters_blobs_and_keeps_raw_centroids():
    index = ClusterIndex(2, 64, ClusterConfig(sketch_dims=16, max_cluster_tokens=64))
    keys_by_id = torch.zeros(2000, 2, 64)
    labels, next_id = [], 0
    for keys, label in blobs(0):
        ids = torch.arange(next_id, next_id + keys.shape[0])
        keys_by_id[ids] = keys
        next_id += keys.shape[0]
        index.assign(keys, ids)
        labels.append(label)
        index.maintain(lambda i: keys_by_id[i], budget_ms=60_000.0)
    truth = torch.cat(labels)
    pred = index.units_of(torch.arange(next_id))
    mixed = sum(int(torch.bincount(truth[pred == c]).max()) for c in pred.unique())
    assert mixed / next_id > 0.95  # no cluster mixes blobs
    index.check_invariants(lambda i: keys_by_id[i])
    assert index._bank.sum_unit.shape[2] == 32 and index._bank.sum_raw.shape[2] == 128
    # retrieval scores raw means: each cluster's centroid is the mean of its members' raw keys
    c = int(pred[0])
    members = (pred == c).nonzero().flatten()
    assert torch.allclose(index.centroids[c], keys_by_id[members].mean(dim=0), atol=1e-4)
    # removal takes the sketched rows out again exactly
    index.remove_tokens(members, keys_by_id[members])
    index.check_invariants(lambda i: keys_by_id[i])
    assert index.num_tokens == next_id - members.numel()


def test_a_head_dim_at_or_below_the_sketch_keeps_every_coordinate():
    assert isinstance(ClusterConfig(sketch_dims=64).embedding(2, 64), HeadNormalized)
    assert isinstance(ClusterConfig().embedding(2, 64), HeadNormalized)
    assert ClusterConfig(sketch_dims=16).embedding(2, 64).width == 32
    with pytest.raises(ValueError, match="sketch_dims"):
        ClusterConfig(sketch_dims=-1)


def test_mosaic_passes_its_sketch_option_to_its_clusters():
    geometry = KVGeometry(num_layers=2, num_kv_heads=2, head_dim=64, num_q_heads=4)
    policy = MosaicPolicy(
        geometry, PolicyConfig(budget_tokens=64, sink_tokens=4, window_tokens=16, options={"sketch_dims": 16})
    )
    assert policy._bank.embedding.width == 32
    assert policy._bank.proj.shape[0] == 32
