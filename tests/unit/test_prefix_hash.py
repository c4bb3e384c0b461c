"""The block hash routers and engines share, and the sim engine's events, with plain values."""

from __future__ import annotations

from hashlib import blake2b

import pytest

from engine.kv_events import KvEventLog
from engine.sim.blocks import BlockManager, BlockTable
from runtime.prefix_hash import ROOT_HASH, block_hashes, chain, iter_block_hashes, prefix_blocks


def test_the_hash_is_the_documented_blake2b_chain() -> None:
    tokens = [1, 2, 3, 4, 70000, 6, 7, 8, 9]
    first = int.from_bytes(blake2b(ROOT_HASH.to_bytes(8, "little") + b"".join(
        t.to_bytes(4, "little") for t in tokens[:4]), digest_size=8).digest(), "little")
    second = int.from_bytes(blake2b(first.to_bytes(8, "little") + b"".join(
        t.to_bytes(4, "little") for t in tokens[4:8]), digest_size=8).digest(), "little")
    assert block_hashes(tokens, 4) == [first, second]  # the partial third block has no hash
    assert chain(ROOT_HASH, tokens[:4]) == first and chain(first, tokens[4:8]) == second
    assert list(iter_block_hashes(tokens, 4, 5)) == [first, second]
    assert block_hashes(tokens, 4, parent=first, first_block=1) == [second]
    # A frozen value: changing the hash is a wire change every engine and router must make together.
    assert block_hashes(list(range(16)), 16) == [0x784D430BE8CB124F]


def test_equal_hashes_mean_equal_prefixes_not_equal_blocks() -> None:
    a = block_hashes([1, 1, 2, 2], 2)
    b = block_hashes([3, 3, 2, 2], 2)
    assert a[1] != b[1]  # same second block, different prefix
    assert block_hashes([1, 1, 2, 2, 5], 2) == a


def test_prefix_blocks_never_covers_the_last_token() -> None:
    assert prefix_blocks(8, 4) == 1 and prefix_blocks(9, 4) == 2 and prefix_blocks(0, 4) == 0
    with pytest.raises(ValueError):
        block_hashes([1], 0)


def test_the_event_log_gives_net_deltas_and_a_snapshot_when_a_reader_fell_behind() -> None:
    held: set[int] = set()
    log = KvEventLog(16, lambda: held, capacity=4)
    assert log.delta_since(0) is not None and log.delta_since(0).empty
    for h in (10, 11, 12):
        log.stored(h)
        held.add(h)
    log.removed(11)
    held.discard(11)
    delta = log.delta_since(0)
    assert delta is not None and (delta.since_seq, delta.last_seq) == (0, 4)
    assert delta.stored == (10, 12) and delta.removed == (11,)
    later = log.delta_since(2)
    assert later is not None and later.stored == (12,) and later.removed == (11,)
    log.stored(13)
    held.add(13)
    assert log.delta_since(0) is None  # event 1 fell out of the 4-event log
    snap = log.snapshot()
    assert snap.snapshot and snap.last_seq == 5 and set(snap.stored) == {10, 12, 13}
    assert log.delta_since(6) is None  # a reader ahead of the log (another process): snapshot


def test_the_sim_cache_publishes_stored_and_evicted_blocks_with_the_shared_hash() -> None:
    manager = BlockManager(num_blocks=4, block_size=2)
    first = BlockTable()
    assert manager.grow(first, 4)
    manager.commit(first, [1, 2, 3, 4], 4)
    manager.release(first)
    stored = block_hashes([1, 2, 3, 4], 2)
    delta = manager.events.delta_since(0)
    assert delta is not None and delta.stored == tuple(stored) and not delta.removed
    # Three fresh blocks (6 tokens): two free ones, then the LRU evicts the tail of [1, 2, 3, 4] first.
    assert manager.grow(BlockTable(), 6)
    delta = manager.events.delta_since(2)
    assert delta is not None and delta.removed == (stored[1],)
    assert set(manager.events.snapshot().stored) == {stored[0]}
    assert manager.cached_prefix_tokens([1, 2, 3, 4, 5]) == 2


def test_a_load_stream_cursor_sends_a_snapshot_then_deltas_then_a_snapshot_when_behind() -> None:
    from tandem.v1 import worker_pb2
    from worker.load import KvCursor

    held: set[int] = {1}
    log = KvEventLog(16, lambda: held, capacity=2)
    cursor = KvCursor(lambda: log)
    first = worker_pb2.LoadReport()
    cursor.fill(first)
    assert first.kv_events.snapshot and list(first.kv_events.stored) == [1] and first.kv_events.last_seq == 0
    quiet = worker_pb2.LoadReport()
    cursor.fill(quiet)
    assert not quiet.HasField("kv_events")  # nothing new: nothing sent
    log.stored(2)
    held.add(2)
    delta = worker_pb2.LoadReport()
    cursor.fill(delta)
    assert not delta.kv_events.snapshot and (delta.kv_events.since_seq, delta.kv_events.last_seq) == (0, 1)
    assert list(delta.kv_events.stored) == [2]
    for h in (3, 4, 5):  # three events: more than the 2-event log keeps
        log.stored(h)
        held.add(h)
    behind = worker_pb2.LoadReport()
    cursor.fill(behind)
    assert behind.kv_events.snapshot and set(behind.kv_events.stored) == {1, 2, 3, 4, 5}
    assert behind.kv_events.last_seq == 4
    # An engine without a prefix cache: no events at all.
    none = worker_pb2.LoadReport()
    KvCursor(lambda: None).fill(none)
    assert not none.HasField("kv_events")


def test_a_queued_prompt_counts_only_its_uncached_rest_as_queued_work() -> None:
    from engine.base import Sampling
    from engine.sim.scheduler import Scheduler
    from engine.sim.sequence import Sequence, SequenceKind, StopRules
    from engine.sim.tokens import TokenStream

    manager = BlockManager(num_blocks=64, block_size=4)
    computed = BlockTable()
    assert manager.grow(computed, 16)
    manager.commit(computed, list(range(16)), 16)
    manager.release(computed)
    scheduler = Scheduler(manager, max_batch=4, max_step_tokens=64)

    def seq(tokens: list[int]) -> Sequence:
        sampling = Sampling(max_tokens=1)
        return Sequence("r", SequenceKind.PREFILL, tokens, TokenStream("f", tokens, seed=None),
                        StopRules(sampling, 1000), 0.0)

    scheduler.add(seq([*range(16), 99, 98]))  # 16 of 18 tokens cached
    scheduler.add(seq([50] * 10))
    assert scheduler.queued_prefill_tokens == 2 + 10


def test_a_snapshot_over_the_limit_keeps_the_most_recent_blocks() -> None:
    held = {10: None, 11: None, 12: None}
    log = KvEventLog(16, lambda: held.keys())
    assert log.snapshot(2).stored == (11, 12) and log.snapshot().stored == (10, 11, 12)
