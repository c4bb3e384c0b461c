"""KV block accounting, the prefix cache and the batching scheduler, with plain values."""

from __future__ import annotations

import pytest

from engine.base import FinishReason, Sampling
from engine.sim.blocks import BlockManager, BlockTable
from engine.sim.scheduler import Scheduler, Work
from engine.sim.sequence import Sequence, SequenceKind, StopRules
from engine.sim.tokens import TokenStream


def computed(manager: BlockManager, tokens: list[int]) -> BlockTable:
    """A table as a finished prefill leaves it: blocks for every token, full ones committed."""
    table = BlockTable()
    assert manager.grow(table, len(tokens))
    manager.commit(table, tokens, len(tokens))
    return table


def test_repeated_prompt_reuses_full_blocks_after_release() -> None:
    manager = BlockManager(num_blocks=10, block_size=4)
    prompt = list(range(10))
    first = computed(manager, prompt)
    first_blocks = list(first.blocks)
    assert manager.num_used == 3
    manager.release(first)
    assert manager.num_used == 0 and manager.num_available == 10 and manager.num_cached == 2

    again = BlockTable()
    assert manager.share_prefix(again, prompt) == 8  # two full blocks; the partial third is recomputed
    assert manager.num_used == 2 and again.blocks == first_blocks[:2]
    # A prompt that diverges in the second block shares only the first.
    other = BlockTable()
    assert manager.share_prefix(other, [0, 1, 2, 3, 9, 9, 9, 9, 9]) == 4
    assert other.blocks[0] == again.blocks[0] and manager.num_used == 2


def test_whole_prompt_hit_still_leaves_the_last_token_to_compute() -> None:
    manager = BlockManager(num_blocks=4, block_size=4)
    manager.release(computed(manager, list(range(8))))
    assert manager.share_prefix(BlockTable(), list(range(8))) == 4
    assert manager.cached_prefix_tokens(list(range(9))) == 8


def test_lru_eviction_takes_the_oldest_released_tail_first() -> None:
    manager = BlockManager(num_blocks=4, block_size=2)
    old = computed(manager, [1, 2, 3, 4])
    manager.release(old)
    recent = computed(manager, [5, 6, 7, 8])
    manager.release(recent)
    assert manager.num_cached == 4 and manager.num_available == 4
    # One fresh block: evicts the tail of the older prompt, its head still serves.
    assert manager.grow(BlockTable(), 1)
    assert manager.cached_prefix_tokens([1, 2, 3, 4, 0]) == 2
    assert manager.cached_prefix_tokens([5, 6, 7, 8, 0]) == 4


def test_grow_refuses_without_change_and_release_is_idempotent() -> None:
    manager = BlockManager(num_blocks=3, block_size=4)
    table = BlockTable()
    assert manager.grow(table, 8)
    assert not manager.grow(table, 17)  # needs 5 blocks in all
    assert len(table.blocks) == 2 and manager.num_available == 1
    manager.release(table)
    manager.release(table)
    assert manager.num_used == 0 and manager.num_available == 3


def test_shared_blocks_stay_used_until_the_last_reference_goes() -> None:
    manager = BlockManager(num_blocks=4, block_size=2)
    a = computed(manager, [1, 2, 3, 4, 5])
    b = BlockTable()
    assert manager.share_prefix(b, [1, 2, 3, 4, 5]) == 4
    assert manager.num_used == 3
    manager.release(a)
    assert manager.num_used == 2  # b still holds the shared prefix
    manager.release(b)
    assert manager.num_used == 0


def seq(request_id: str, tokens: list[int], *, kind: SequenceKind = SequenceKind.DECODE,
        max_tokens: int = 100) -> Sequence:
    sampling = Sampling.create(max_tokens=max_tokens)
    stream = TokenStream("test", tokens, seed=None)
    return Sequence(request_id, kind, list(tokens), stream, StopRules(sampling, 10_000), arrived_at=0.0)


def run_step(sched: Scheduler) -> list[Work]:
    plan = sched.schedule(0.0)
    sched.complete(plan, 0.0)
    return plan


def test_new_sequence_joins_a_running_batch_at_a_step_boundary() -> None:
    sched = Scheduler(BlockManager(100, 4), max_batch=4, max_step_tokens=64)
    a = seq("a", list(range(10)))
    sched.add(a)
    assert [(w.seq.request_id, w.new, w.cached) for w in run_step(sched)] == [("a", 10, 0)]
    assert [(w.seq.request_id, w.new, w.cached) for w in run_step(sched)] == [("a", 1, 10)]
    b = seq("b", list(range(20, 26)))
    sched.add(b)
    assert sched.queued_prefill_tokens == 6
    # b's prompt rides along with a's decode token, then both decode together.
    assert [(w.seq.request_id, w.new) for w in run_step(sched)] == [("a", 1), ("b", 6)]
    assert [(w.seq.request_id, w.new) for w in run_step(sched)] == [("a", 1), ("b", 1)]
    assert len(a.tokens) == 10 + 4 and len(b.tokens) == 6 + 2


def test_max_batch_makes_extra_sequences_wait() -> None:
    sched = Scheduler(BlockManager(100, 4), max_batch=1, max_step_tokens=64)
    a, b = seq("a", [1, 2], max_tokens=2), seq("b", [3, 4])
    sched.add(a)
    sched.add(b)
    assert [w.seq.request_id for w in run_step(sched)] == ["a"]
    assert [w.seq.request_id for w in run_step(sched)] == ["a"]
    assert a.finish_reason == FinishReason.LENGTH and sched.num_waiting == 1
    assert [w.seq.request_id for w in run_step(sched)] == ["b"]


def test_long_prompt_prefills_in_chunks_one_prompt_at_a_time() -> None:
    sched = Scheduler(BlockManager(100, 4), max_batch=4, max_step_tokens=16)
    a, b = seq("a", list(range(40)), kind=SequenceKind.PREFILL), seq("b", list(range(5)), kind=SequenceKind.PREFILL)
    sched.add(a)
    sched.add(b)
    chunks = [[(w.seq.request_id, w.new) for w in run_step(sched)] for _ in range(4)]
    # b's first block holds the same tokens as a's: the prefix cache serves it.
    assert chunks == [[("a", 16)], [("a", 16)], [("a", 8)], [("b", 1)]]
    assert b.cached_tokens == 4
    assert a.state.value == b.state.value == "done" and sched.blocks.num_used == 0


def test_growth_without_blocks_preempts_the_newest_sequence() -> None:
    sched = Scheduler(BlockManager(2, 4), max_batch=4, max_step_tokens=64)
    a, b = seq("a", [1, 2, 3]), seq("b", [4, 5, 6])
    sched.add(a)
    sched.add(b)
    run_step(sched)  # a prefills (3 tokens + its first output: block 1 full)
    run_step(sched)  # a decodes, b prefills into the second block
    assert sched.blocks.num_available == 0
    plan = run_step(sched)  # a needs a new block: b, the newest, gives its blocks back
    assert [w.seq.request_id for w in plan] == ["a"] and b.preemptions == 1
    assert b.num_computed == 0 and sched.queued_prefill_tokens == len(b.tokens)


def test_abort_frees_blocks_wherever_the_sequence_is() -> None:
    sched = Scheduler(BlockManager(10, 4), max_batch=1, max_step_tokens=64)
    a, b = seq("a", list(range(9))), seq("b", [1])
    sched.add(a)
    sched.add(b)
    plan = sched.schedule(0.0)
    sched.abort(a)  # mid-step: its work is dropped when the step completes
    assert sched.complete(plan, 0.0) == []
    sched.abort(b)
    sched.abort(b)
    assert sched.blocks.num_used == 0 and sched.num_waiting == 0 and not sched.running


@pytest.mark.parametrize("bad", [0, -1])
def test_bad_sizes_are_refused(bad: int) -> None:
    with pytest.raises(ValueError, match="must be >= 1"):
        BlockManager(bad, 4)
    with pytest.raises(ValueError, match="must be >= 1"):
        Scheduler(BlockManager(1, 1), max_batch=bad, max_step_tokens=1)
