"""vLLM's prefix-cache events translated into Tandem's block hashes (engine.vllm.prefix_events), with plain values.

vLLM names blocks by its own hashes (here strings: any hashable will do);
the log must hold runtime.prefix_hash's hashes of the same tokens, the ones
a router computes from a prompt.
"""

from __future__ import annotations

from engine.kv_events import KvDelta
from engine.vllm.prefix_events import Cleared, Removed, Stored, VllmPrefixEvents
from runtime.prefix_hash import block_hashes

BS = 4
PROMPT = list(range(100, 100 + 4 * BS + 2))  # four full blocks and a partial one
HASHES = block_hashes(PROMPT, BS)


def blocks(first: int, last: int) -> list[int]:
    """Tokens of PROMPT's blocks first..last (inclusive)."""
    return PROMPT[first * BS:(last + 1) * BS]


def held(events: VllmPrefixEvents) -> set[int]:
    return set(events.log.snapshot().stored)


def since(events: VllmPrefixEvents, seq: int) -> KvDelta:
    delta = events.log.delta_since(seq)
    assert delta is not None
    return delta


def test_a_prompts_blocks_chain_across_events_and_parents() -> None:
    events = VllmPrefixEvents(BS)
    events.apply(Stored(["v0", "v1"], None, blocks(0, 1), BS))
    # A later step caches the next blocks: vLLM names the parent by its own hash.
    events.apply(Stored(["v2", "v3"], "v1", blocks(2, 3), BS))
    assert since(events, 0).stored == tuple(HASHES)
    assert events.held() == HASHES


def test_a_shared_prefix_then_another_tail() -> None:
    events = VllmPrefixEvents(BS)
    events.apply(Stored(["v0", "v1"], None, blocks(0, 1), BS))
    other = [*blocks(0, 0), 7, 7, 7, 7]
    events.apply(Stored(["w1"], "v0", other[BS:], BS))
    assert held(events) == {*HASHES[:2], block_hashes(other, BS)[1]}


def test_removal_by_vllm_hash_removes_the_tandem_hash() -> None:
    events = VllmPrefixEvents(BS)
    events.apply(Stored(["v0", "v1", "v2"], None, blocks(0, 2), BS))
    seq = events.log.seq
    events.apply(Removed(["v2", "v1"]))
    assert since(events, seq).removed == (HASHES[2], HASHES[1])
    assert events.held() == HASHES[:1]
    events.apply(Removed(["v1", "unknown"]))  # removed already, never seen: nothing happens
    assert events.log.seq == seq + 2


def test_a_hash_held_by_two_blocks_stays_until_both_are_removed() -> None:
    """vLLM does not deduplicate: two requests computing one prefix at once each cache a block under its hash."""
    events = VllmPrefixEvents(BS)
    events.apply(Stored(["v0"], None, blocks(0, 0), BS))
    events.apply(Stored(["v0"], None, blocks(0, 0), BS))
    assert events.log.seq == 1
    events.apply(Removed(["v0"]))
    assert events.held() == HASHES[:1]
    events.apply(Removed(["v0"]))
    assert events.held() == [] and events.log.seq == 2


def test_an_unknown_parent_is_not_translated_nor_are_its_children() -> None:
    events = VllmPrefixEvents(BS)
    events.apply(Stored(["v2"], "lost", blocks(2, 2), BS))
    events.apply(Stored(["v3"], "v2", blocks(3, 3), BS))
    assert events.held() == [] and events.log.seq == 0
    assert events.untranslated_blocks == 2


def test_blocks_a_plain_prompt_cannot_hit_are_not_translated() -> None:
    events = VllmPrefixEvents(BS)
    events.apply(Stored(["salted"], None, blocks(0, 0), BS, extra_keys=True))
    events.apply(Stored(["big"], None, blocks(0, 1), 2 * BS))
    events.apply(Stored(["short"], None, blocks(0, 0)[:-1], BS))
    assert events.held() == []


def test_cleared_removes_everything() -> None:
    events = VllmPrefixEvents(BS)
    events.apply(Stored(["v0", "v1"], None, blocks(0, 1), BS))
    seq = events.log.seq
    events.apply(Cleared())
    assert set(since(events, seq).removed) == set(HASHES[:2])
    assert events.held() == []
    # The chain starts again from nothing: a child of a cleared block is unknown.
    events.apply(Stored(["v2"], "v1", blocks(2, 2), BS))
    assert events.held() == []


def stored(first: int, last: int, parent: str | None) -> list[Stored]:
    return [Stored([f"v{i}" for i in range(first, last + 1)], parent, blocks(first, last), BS)]


def test_batches_apply_in_order_and_a_gap_is_refused() -> None:
    events = VllmPrefixEvents(BS)
    assert events.accept(0, stored(0, 0, None))
    assert not events.accept(2, stored(2, 2, "v1"))  # batch 1 missing
    assert events.held() == HASHES[:1] and events.next_seq == 1
    # The replay brings 1 and 2, then the live batch 2 is a duplicate.
    assert events.accept(1, stored(1, 1, "v0"), replayed=True)
    assert events.accept(2, stored(2, 2, "v1"), replayed=True)
    assert events.accept(2, stored(2, 2, "v1"))
    assert events.held() == HASHES[:3] and events.next_seq == 3
    assert events.log.seq == 3


def test_a_lost_gap_forgets_everything_and_goes_on() -> None:
    events = VllmPrefixEvents(BS)
    events.accept(0, stored(0, 1, None))
    events.skip_to(5)
    assert events.held() == [] and events.next_seq == 5
    assert events.accept(5, stored(0, 0, None))
    assert events.held() == HASHES[:1]


def test_a_publisher_restart_starts_over() -> None:
    events = VllmPrefixEvents(BS)
    events.accept(0, stored(0, 1, None))
    events.accept(1, stored(2, 2, "v1"))
    # A new engine core numbers from 0 again, with an empty cache.
    assert events.accept(0, stored(0, 0, None))
    assert events.held() == HASHES[:1] and events.next_seq == 1
    # Its batch 0 was missed: refused as a gap (the replay fills it), not taken for a duplicate.
    events = VllmPrefixEvents(BS)
    events.accept(0, stored(0, 1, None))
    events.accept(1, stored(2, 2, "v1"))
    assert not events.accept(1, stored(1, 1, "v0"))
    assert events.held() == [] and events.next_seq == 0
    assert events.accept(0, stored(0, 0, None), replayed=True)
    assert events.accept(1, stored(1, 1, "v0"))
    assert events.held() == HASHES[:2]


def test_snapshots_list_the_newest_blocks_last() -> None:
    events = VllmPrefixEvents(BS)
    events.apply(Stored(["v0", "v1", "v2"], None, blocks(0, 2), BS))
    assert events.log.snapshot(limit=2).stored == tuple(HASHES[1:3])


def test_a_new_publisher_starts_from_batch_0_with_an_empty_cache() -> None:
    events = VllmPrefixEvents(BS)
    events.accept(0, stored(0, 1, None))
    events.accept(1, stored(2, 2, "v1"))
    events.restarted()
    assert events.held() == [] and events.next_seq == 0
    assert events.accept(0, stored(0, 0, None))
    assert events.held() == HASHES[:1]
