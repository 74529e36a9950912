"""PageReserve: pages faulted in ahead by a worker thread, bounded by the store's host cap."""

from __future__ import annotations

import gc
import threading

import pytest
import torch
from test_store import GEOM, filled_store, meta

from mosaic_ros.runtime.kv.pages import PageReserve, fault_in
from mosaic_ros.runtime.kv.policy import KVGeometry, PolicyConfig, make_policy
from mosaic_ros.runtime.kv.store import HostKVStore


def _page() -> torch.Tensor:
    return torch.empty(64, 2, 2, 8, dtype=torch.float16)


def test_take_hands_out_ready_pages_and_the_worker_refills():
    reserve = PageReserve(_page, spare=2)
    try:
        assert reserve.ready == 0  # no thread until first use
        assert reserve.wait_ready(2)
        assert reserve.ready == 2
        page = reserve.take()
        assert page.shape == (64, 2, 2, 8) and page.dtype == torch.float16
        assert (reserve.ready_taken, reserve.cold) == (1, 0)
        assert reserve.wait_ready(2)  # refilled
        assert reserve.ready_bytes == 2 * page.numel() * page.element_size()
    finally:
        reserve.close()


def test_without_a_ready_page_take_allocates_on_the_callers_thread():
    reserve = PageReserve(_page, spare=0)  # never prepares anything, never starts a thread
    page = reserve.take()
    assert page.shape == (64, 2, 2, 8)
    assert (reserve.ready_taken, reserve.cold, reserve.ready) == (0, 1, 0)
    assert reserve._thread is None


def test_a_failing_worker_stops_trying_and_the_caller_still_gets_pages():
    def make() -> torch.Tensor:
        if threading.current_thread().name == "kv-page-reserve":
            raise MemoryError("no memory for a spare page")
        return _page()

    reserve = PageReserve(make, spare=3)
    try:
        reserve.wait_ready(3)
        assert reserve.failures == 1 and reserve.ready == 0
        assert reserve.take().shape == (64, 2, 2, 8)
        assert reserve.cold == 1
    finally:
        reserve.close()


def test_allowance_caps_the_ready_pages_and_give_keeps_at_most_the_target():
    worker_may_finish = threading.Event()
    worker_may_finish.set()

    def make() -> torch.Tensor:
        worker_may_finish.wait()
        return _page()

    reserve = PageReserve(make, spare=4)
    try:
        reserve.set_allowance(1)
        reserve.wait_ready(4)
        assert reserve.ready == 1
        reserve.set_allowance(0)  # the owner may take no more pages: ready ones are dropped
        assert reserve.ready == 0
        assert not reserve.give(_page())
        # The worker now holds at most the one page it is making: the reserve stays below its
        # target of 4 whenever give runs (without this the worker could fill it first).
        worker_may_finish.clear()
        reserve.set_allowance(None)
        assert reserve.give(_page())
        assert reserve.given == 1
    finally:
        worker_may_finish.set()
        reserve.close()


def test_fault_in_writes_zeros_one_byte_per_4k_and_leaves_the_rest():
    page = torch.full((3 * 4096 + 10,), 7, dtype=torch.uint8)
    fault_in(page)
    zero = torch.nonzero(page == 0).flatten().tolist()
    assert zero == [0, 4096, 8192, 12288, page.numel() - 1]


def test_store_with_spare_pages_keeps_data_across_growth_and_compaction():
    store, truth = filled_store(200, page_rows=16, spare_pages=3)
    reserve = store.page_reserve
    assert reserve is not None and reserve.ready_taken + reserve.cold == 2 * 13  # 200 rows: 13 pages a layer
    every = torch.arange(200)
    for layer in range(GEOM.num_layers):
        assert torch.equal(store.read(layer, store.rows_of(layer, every)), truth[layer][every])
    reserve.wait_ready(3)
    store.evict(torch.arange(0, 150))
    store.compact(0)  # 50 live rows: 4 pages kept, 9 freed; the reserve keeps none beyond its 3
    assert len(store.pool.pages[0]) == 4
    assert reserve.ready == 3
    held = sum(p.numel() * p.element_size() for pages in store.pool.pages for p in pages)
    assert store.host_kv_bytes == held + reserve.ready_bytes  # ready pages are held for KV too
    for layer in range(GEOM.num_layers):
        live = torch.arange(150, 200)
        assert torch.equal(store.read(layer, store.rows_of(layer, live)), truth[layer][live])


def test_under_a_host_cap_the_reserve_holds_no_more_pages_than_may_still_be_added():
    store = HostKVStore(GEOM, page_rows=16, max_rows=48, spare_pages=8)  # 3 pages a layer
    reserve = store.page_reserve
    ids = store.add_tokens(meta(0, 40))
    for layer in range(GEOM.num_layers):
        store.append(layer, ids, torch.zeros(40, 2, 8).half(), torch.zeros(40, 2, 8).half())
    reserve.wait_ready(8)
    assert reserve.ready == 0  # both layers hold their 3 pages: nothing more may be added
    cap_bytes = 2 * 48 * 2 * GEOM.token_row_bytes
    assert store.host_kv_bytes == cap_bytes


def test_the_worker_ends_with_its_store():
    store, _ = filled_store(40, page_rows=16, spare_pages=2)
    thread = store.page_reserve._thread
    assert thread is not None and thread.is_alive()
    del store
    gc.collect()
    thread.join(timeout=5.0)
    assert not thread.is_alive()


def test_policies_take_spare_pages_as_an_option_and_reject_negative_ones():
    geom = KVGeometry(num_layers=1, num_kv_heads=1, head_dim=8, num_q_heads=1)
    policy = make_policy(
        "rekv",
        geom,
        PolicyConfig(budget_tokens=64, sink_tokens=4, window_tokens=16, options={"spare_pages": 2}),
        "cpu",
    )
    assert policy.store.page_reserve is not None and policy.store.page_reserve.spare == 2
    none = make_policy(
        "rekv",
        geom,
        PolicyConfig(budget_tokens=64, sink_tokens=4, window_tokens=16, options={"spare_pages": 0}),
        "cpu",
    )
    assert none.store.page_reserve is None
    with pytest.raises(ValueError, match="spare_pages"):
        make_policy(
            "rekv",
            geom,
            PolicyConfig(budget_tokens=64, sink_tokens=4, window_tokens=16, options={"spare_pages": -1}),
            "cpu",
        )


def test_compaction_gives_freed_pages_back_and_growth_takes_them_first():
    store = HostKVStore(GEOM, page_rows=16, spare_pages=3)
    reserve = store.page_reserve
    make = reserve._make

    def caller_only() -> torch.Tensor:  # the worker prepares nothing: only given pages are ready
        if threading.current_thread().name == "kv-page-reserve":
            raise MemoryError("no spare pages in this test")
        return make()

    reserve._make = caller_only
    gen = torch.Generator().manual_seed(1)
    truth = []
    for start in range(0, 96, 8):
        ids = store.add_tokens(meta(start, 8))
        kv = torch.randn(8, 2, 2, 8, generator=gen).half()
        for layer in range(GEOM.num_layers):
            store.append(layer, ids, kv[:, 0], kv[:, 1])
        truth.append(kv)
    truth = torch.cat(truth)
    assert reserve.ready_taken == 0 and reserve.cold == 12  # 6 pages a layer, all on the caller
    store.evict(torch.arange(0, 80))
    store.compact(0)  # 16 live rows: 1 page kept, 5 freed, 3 of them kept ready
    assert (reserve.given, reserve.ready) == (3, 3)
    freed = list(reserve._ready)
    ids = store.add_tokens(meta(96, 32))
    kv = torch.randn(32, 2, 2, 8, generator=gen).half()
    store.append(0, ids, kv[:, 0], kv[:, 1])  # layer 0 grows by 2 pages: both recycled
    assert reserve.ready_taken == 2 and reserve.cold == 12
    assert any(p is freed[0] for p in store.pool.pages[0]) and any(p is freed[1] for p in store.pool.pages[0])
    live = torch.arange(80, 96)
    assert torch.equal(store.read(0, store.rows_of(0, live)), truth[live])
    assert torch.equal(store.read(0, store.rows_of(0, ids)), kv)
