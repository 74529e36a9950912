"""The code's shape, checked: policies use only the store's public API and follow one template.

Also the pieces that template rests on: the generic cross-layer prefetch (any policy, exact
whatever it fetches ahead) and the host copy engine's timing, tested on the CPU.
"""

from __future__ import annotations

import ast
import pathlib

import pytest
import torch

from mosaic_ros.runtime.kv import policies as policies_pkg
from mosaic_ros.runtime.kv.copy import HostCopyEngine
from mosaic_ros.runtime.kv.policies.base import StoreBackedPolicy
from mosaic_ros.runtime.kv.policies.units import UnitIndex
from mosaic_ros.runtime.kv.policy import POLICIES, KVGeometry, PolicyConfig, TokenMeta, make_policy
from mosaic_ros.runtime.kv.store import DeviceBuffer, HostKVStore

POLICY_DIR = pathlib.Path(policies_pkg.__file__).parent
GEOM = KVGeometry(num_layers=3, num_kv_heads=2, head_dim=16, num_q_heads=4, dtype=torch.float32)


def store_uses(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, attribute) of every attribute read or written on a store: ``self.store.X``, or
    ``store.X`` on a name ``store`` (the local alias and the parameter name policies use)."""
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute):
            continue
        base = node.value
        on_self_store = (
            isinstance(base, ast.Attribute)
            and base.attr == "store"
            and isinstance(base.value, ast.Name)
            and base.value.id == "self"
        )
        on_name = isinstance(base, ast.Name) and base.id == "store"
        if on_self_store or on_name:
            found.append((node.lineno, node.attr))
    return found


def test_the_store_api_lists_only_what_the_store_has_and_none_of_its_parts():
    store = HostKVStore(GEOM, page_rows=8)
    missing = sorted(name for name in HostKVStore.API if not hasattr(store, name))
    assert missing == []
    assert not {"pool", "table", "engine"} & HostKVStore.API  # the parts stay behind the door
    assert not any(name.startswith("_") for name in HostKVStore.API)


def test_policies_touch_the_store_only_through_its_public_api():
    files = sorted(POLICY_DIR.glob("*.py"))
    assert len(files) >= 8  # the scan sees the policies, not an empty folder
    seen, outside = set(), []
    for path in files:
        for line, attr in store_uses(ast.parse(path.read_text(), filename=str(path))):
            seen.add(attr)
            if attr not in HostKVStore.API:
                outside.append(f"{path.name}:{line}: store.{attr}")
    assert outside == []
    assert {"rows_of", "fetch", "tokens_at", "live_tokens"} <= seen  # the scan finds real uses


def test_the_scan_catches_an_internal_access():
    tree = ast.parse(
        "def f(self):\n    x = self.store.pool.pages\n    store = self.store\n    store.table.high\n"
    )
    assert [attr for _, attr in store_uses(tree)] == ["pool", "table"]


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_no_policy_overrides_the_retrieval_template(name):
    cls = POLICIES[name]
    assert issubclass(cls, StoreBackedPolicy)
    overriding = [k.__name__ for k in cls.__mro__ if k is not StoreBackedPolicy and "retrieve" in vars(k)]
    assert overriding == [] or overriding == ["KVPolicy"]
    assert "select" in vars(cls) and not getattr(cls.select, "__isabstractmethod__", False)


def test_a_policy_without_select_cannot_be_made():
    class Nothing(StoreBackedPolicy):
        name = "nothing"

    with pytest.raises(TypeError, match="select"):
        Nothing(GEOM, PolicyConfig(budget_tokens=8, sink_tokens=2, window_tokens=4))


def test_blocks_pages_and_clusters_are_one_kind_of_unit_index():
    """ReKV's blocks, LiveVLM's pages and Mosaic's clusters answer the same questions alike."""
    policies = {
        name: make_policy(name, GEOM, PolicyConfig(budget_tokens=40, sink_tokens=4, window_tokens=8))
        for name in ("rekv", "livevlm", "mosaic")
    }
    indexes = {}
    for name, policy in policies.items():
        fill(policy, frames=6)
        indexes[name] = {
            "rekv": lambda p: p.blocks.layer(1),
            "livevlm": lambda p: p.pages.layer(1),
            "mosaic": lambda p: p._layers[1].index,
        }[name](policy)
    query = torch.randn(4, 2, 16)
    live = policies["rekv"].store.live_tokens(1)
    for name, index in indexes.items():
        assert isinstance(index, UnitIndex), name
        of = index.units_of(live)
        units = torch.unique(of[of >= 0])
        assert units.numel() >= 1
        held = torch.bincount(of[of >= 0], minlength=int(units.max()) + 1)
        assert torch.equal(index.counts[units].cpu().long(), held[units]), name
        store = policies[name].store
        first = units[0]
        want = store.read(1, store.rows_of(1, live[of == first]))[:, 0].float().mean(0)
        assert torch.allclose(index.means(first[None])[0].cpu(), want, atol=1e-4), name
        share = index.share(query, units)
        assert share.shape == units.shape and bool((share >= 0).all()) and float(share.sum()) <= 1 + 1e-4
    for policy in policies.values():
        policy.close()


# ------------------------------------------------------------------------------------------ prefetch


def fill(policy, frames: int = 12, tokens: int = 10, seed: int = 3) -> None:
    gen = torch.Generator().manual_seed(seed)
    g = policy.geometry
    for f in range(frames):
        start = policy.store.num_tokens
        ids = policy.add_tokens(
            TokenMeta(
                positions=torch.arange(start, start + tokens)[None],
                stamps=torch.full((tokens,), float(f), dtype=torch.float64),
                modality=torch.ones(tokens, dtype=torch.uint8),
                frame=torch.full((tokens,), f),
            )
        )
        for layer in range(g.num_layers):
            keys = torch.randn(tokens, g.num_kv_heads, g.head_dim, generator=gen)
            values = torch.randn(tokens, g.num_kv_heads, g.head_dim, generator=gen)
            policy.append(layer, keys, values, ids)
        policy.maintain(50.0)


def answer(policy, queries):
    """Per layer, (ids (H_kv, n), keys (H_kv, n, D)) of the context, each head's tokens in id order."""
    policy.begin_question()
    out = []
    for layer, q in enumerate(queries):
        ctx = policy.retrieve(layer, q)
        ids, order = torch.sort(ctx.token_ids.cpu(), dim=1)
        keys = torch.gather(ctx.keys.cpu(), 1, order[:, :, None].expand(-1, -1, ctx.keys.shape[-1]))
        out.append((ids, keys))
    return out, policy.end_question()


@pytest.mark.parametrize("name", ["window", "rekv", "livevlm", "token_topk"])
def test_the_shared_prefetch_serves_any_policy_exactly_and_counts_its_hits(name):
    gen = torch.Generator().manual_seed(5)
    queries = [torch.randn(4, 2, 16, generator=gen) for _ in range(GEOM.num_layers)]
    base = dict(budget_tokens=40, sink_tokens=4, window_tokens=8)
    plain = make_policy(name, GEOM, PolicyConfig(**base, prefetch=False))
    ahead = make_policy(name, GEOM, PolicyConfig(**base, prefetch=True, options={"cpu_prefetch": True}))
    fill(plain)
    fill(ahead)
    for _ in range(2):
        want, plain_stats = answer(plain, queries)
        got, stats = answer(ahead, queries)
        for (ids_a, keys_a), (ids_b, keys_b) in zip(want, got, strict=True):
            assert torch.equal(ids_a, ids_b) and torch.equal(keys_a, keys_b)
        assert plain_stats.prefetch_lookups == 0
        assert stats.prefetch_lookups > 0  # layers 1 and 2 were predicted from layers 0 and 1
        assert 0 <= stats.prefetch_hits <= stats.prefetch_lookups
    plain.close()
    ahead.close()


def test_prefetch_is_off_on_a_cpu_device_unless_asked():
    config = PolicyConfig(budget_tokens=40, sink_tokens=4, window_tokens=8, prefetch=True)
    policy = make_policy("rekv", GEOM, config)
    fill(policy)
    _, stats = answer(policy, [torch.randn(4, 2, 16) for _ in range(GEOM.num_layers)])
    assert stats.prefetch_lookups == 0
    policy.close()


# ------------------------------------------------------------------------------------------ copy engine


def test_the_host_engine_serves_cpu_buffers_and_its_device_time_is_its_copy_time():
    policy = make_policy("window", GEOM, PolicyConfig(budget_tokens=64, sink_tokens=4, window_tokens=8))
    fill(policy, frames=8)
    store = policy.store
    buf = DeviceBuffer(GEOM, 64, "cpu")
    assert isinstance(store.engine(buf), HostCopyEngine)
    rows = store.rows_of(1, torch.arange(10, 60))
    stats = store.fetch(1, rows, buf)
    assert stats.events is None and stats.copies >= 1
    assert stats.device_ms() == stats.copy_ms > 0
    assert torch.equal(buf.context().keys, store.read(1, rows)[:, 0].permute(1, 0, 2))
    policy.begin_question()
    policy.retrieve(0, torch.randn(4, 2, 16))
    retrieval = policy.end_question()
    assert retrieval.copy_device_ms == pytest.approx(retrieval.copy_ms)
    assert policy.memory().staging_bytes == 0  # no GPU: nothing staged
    policy.close()


def test_a_device_resident_store_refuses_a_host_buffer_it_cannot_serve():
    store = HostKVStore(GEOM, page_rows=8, device="meta", contiguous=True)
    with pytest.raises(ValueError, match="device-resident"):
        store.engine(DeviceBuffer(GEOM, 4, "cpu"))
