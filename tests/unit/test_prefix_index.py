"""The router's prefix index with plain values: events, snapshots, gaps, workers leaving, the memory cap."""

from __future__ import annotations

from router_svc.prefix_index import CachedPrefix, KvIndex, KvUpdate, PrefixIndex, PrefixMatch
from runtime.prefix_hash import block_hashes

BS = 4
SYSTEM = list(range(100, 132))  # 8 blocks
PROMPT = [*SYSTEM, 7, 7, 7, 7, 9]


def hashes(tokens: list[int]) -> list[int]:
    return block_hashes(tokens, BS)


def snapshot(stored: list[int], seq: int = 0) -> KvUpdate:
    return KvUpdate(block_size=BS, since_seq=seq, last_seq=seq, stored=stored, snapshot=True)


def test_longest_cached_prefix_per_worker_and_role() -> None:
    index = KvIndex()
    assert index.apply("d1", "m", False, snapshot(hashes(SYSTEM)[:3], seq=5))
    assert index.apply("d2", "m", False, snapshot(hashes(PROMPT)))
    assert index.apply("p1", "m", True, snapshot(hashes(SYSTEM)))
    assert index.apply("o1", "other", False, snapshot(hashes(PROMPT)))
    found = index.lookup("m", PROMPT)
    assert found.decode.as_dict() == {"d1": 12, "d2": 36} and found.prefill.as_dict() == {"p1": 32}
    assert found.tokens("d2") == 36 and found.tokens("p1") == 32 and found.tokens("o1") == 0
    assert found.best(1, prefill=False) == [("d2", 36)]
    assert found.best(5, prefill=False, accept=lambda w: w != "d2") == [("d1", 12)]
    # The last token is never served from a cache: a prompt of exactly 9 blocks matches 8.
    assert index.lookup("m", PROMPT[:36]).decode.as_dict() == {"d1": 12, "d2": 32}
    assert index.lookup("nobody", PROMPT) == CachedPrefix()


def test_a_hole_in_the_chain_ends_the_match() -> None:
    index = KvIndex()
    chain = hashes(PROMPT)
    index.apply("d1", "m", False, snapshot([chain[0], chain[2], chain[3]]))
    assert index.lookup("m", PROMPT).tokens("d1") == 4


def test_deltas_apply_in_order_and_a_gap_asks_for_a_snapshot() -> None:
    index = KvIndex()
    chain = hashes(PROMPT)
    assert index.apply("d1", "m", False, snapshot(chain[:2], seq=10))
    assert index.apply("d1", "m", False, KvUpdate(BS, since_seq=10, last_seq=14, stored=chain[2:6]))
    assert index.lookup("m", PROMPT).tokens("d1") == 24
    assert index.apply("d1", "m", False, KvUpdate(BS, since_seq=14, last_seq=15, removed=[chain[5]]))
    assert index.lookup("m", PROMPT).tokens("d1") == 20
    # Events 16..17 never arrived: the next delta is refused, the worker is out of sync.
    assert not index.apply("d1", "m", False, KvUpdate(BS, since_seq=17, last_seq=18, stored=chain[5:]))
    assert index.gaps_total == 1 and not index.synced("d1")
    # Until the snapshot, what it knew stays (stale costs only performance), and no delta applies.
    assert index.lookup("m", PROMPT).tokens("d1") == 20
    assert not index.apply("d1", "m", False, KvUpdate(BS, since_seq=18, last_seq=19, stored=chain[5:]))
    assert index.apply("d1", "m", False, snapshot(chain[:1], seq=19))
    assert index.synced("d1") and index.lookup("m", PROMPT).tokens("d1") == 4
    assert index.held("d1") == {chain[0]}


def test_a_restarted_worker_starts_over_from_its_snapshot() -> None:
    index = KvIndex()
    chain = hashes(PROMPT)
    index.apply("d1", "m", False, snapshot(chain, seq=500))
    # A new process numbers its events from 0 again; its stream starts with a snapshot.
    assert index.apply("d1", "m", False, snapshot([], seq=0), fresh=True)
    assert index.lookup("m", PROMPT).tokens("d1") == 0
    assert index.apply("d1", "m", False, KvUpdate(BS, since_seq=0, last_seq=1, stored=chain[:1]))
    assert index.lookup("m", PROMPT).tokens("d1") == 4


def test_workers_that_leave_or_publish_nothing_are_forgotten() -> None:
    index = KvIndex()
    chain = hashes(PROMPT)
    for w in ("d1", "d2", "d3"):
        index.apply(w, "m", False, snapshot(chain))
    index.drop("d2")
    # A stream whose first report has no events: that engine has no prefix cache (any more).
    index.apply("d3", "m", False, None, fresh=True)
    assert index.lookup("m", PROMPT).decode.as_dict() == {"d1": 36}
    assert index.workers() == ["d1"] and index.entries == len(chain)
    index.drop("d1")
    assert index.entries == 0 and index.lookup("m", PROMPT) == CachedPrefix()
    # A freed slot is reused without inheriting anything.
    index.apply("d4", "m", False, snapshot(chain[:1]))
    assert index.lookup("m", PROMPT).decode.as_dict() == {"d4": 4}


def test_the_memory_cap_drops_the_oldest_entries_of_the_worker_that_stores() -> None:
    index = PrefixIndex(BS, max_entries=6)
    index.store("a", [1, 2, 3, 4])
    index.store("b", [10, 11])
    index.store("b", [12])  # full: b's own oldest goes
    assert index.entries == 6 and index.held("b") == {11, 12} and index.capped_total == 1
    index.store("c", [20])  # c holds nothing to give up: not stored
    assert index.held("c") == set() and index.entries == 6
    index.remove("a", [1])
    index.store("c", [20])
    assert index.held("c") == {20} and index.entries == 6


def test_a_worker_moving_to_another_model_or_block_size_leaves_the_old_index() -> None:
    index = KvIndex()
    chain = hashes(PROMPT)
    index.apply("w", "m", False, snapshot(chain))
    index.apply("w", "n", False, snapshot(chain))
    assert index.lookup("m", PROMPT) == CachedPrefix() and index.lookup("n", PROMPT).tokens("w") == 36
    index.apply("w", "n", False, KvUpdate(8, 0, 0, stored=block_hashes(PROMPT, 8), snapshot=True))
    assert index.lookup("n", PROMPT).tokens("w") == 32 and index.entries == 4
    # A delta of another block size than the synced one is a gap.
    assert not index.apply("w", "n", False, KvUpdate(BS, 0, 1, stored=chain[:1]))


def test_plain_value_matches() -> None:
    match = PrefixMatch.of({"a": 64, "b": 16, "c": 64, "z": 0})
    assert match.best(2) == [("a", 64), ("c", 64)] and match.tokens("b") == 16 and match.tokens("z") == 0
    cached = CachedPrefix.of(decode={"d": 32}, prefill={"p": 48})
    assert cached.tokens("p") == 48 and cached.best(3, prefill=True) == [("p", 48)]


def test_assumed_blocks_are_added_to_a_synced_worker_only() -> None:
    index = KvIndex()
    index.apply("d1", "m", False, snapshot([]))
    index.assume_stored("d1", PROMPT)
    index.assume_stored("d2", PROMPT)  # never synced: nothing known to add to
    assert index.lookup("m", PROMPT).decode.as_dict() == {"d1": 36}
    # The events that follow confirm it without double counting.
    index.apply("d1", "m", False, KvUpdate(BS, since_seq=0, last_seq=9, stored=hashes(PROMPT)))
    assert index.entries == 9
