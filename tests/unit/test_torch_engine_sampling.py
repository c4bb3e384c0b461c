"""Token choice and stop rules of the torch engine, with plain values."""

from __future__ import annotations

import torch

from engine.base import FinishReason, Sampling
from engine.torch_sampling import StopRule, choose_token, position_seed

LOGITS = torch.tensor([0.1, 2.0, 1.9, -1.0, 0.5])


def test_greedy_takes_the_argmax() -> None:
    assert choose_token(LOGITS, Sampling.create(), seed=0, position=3) == 1


def test_a_draw_depends_only_on_seed_and_position() -> None:
    sampling = Sampling.create(temperature=1.0)
    draws = [choose_token(LOGITS, sampling, seed=5, position=p) for p in range(40)]
    assert draws == [choose_token(LOGITS, sampling, seed=5, position=p) for p in range(40)]
    assert draws != [choose_token(LOGITS, sampling, seed=6, position=p) for p in range(40)]
    assert position_seed(5, 1) != position_seed(5, 2) and position_seed(5, 1) == position_seed(5, 1)


def test_top_k_one_and_tiny_top_p_are_greedy() -> None:
    for sampling in (Sampling.create(temperature=2.0, top_k=1), Sampling.create(temperature=2.0, top_p=0.01)):
        assert {choose_token(LOGITS, sampling, seed=1, position=p) for p in range(30)} == {1}


def test_top_k_limits_the_candidates() -> None:
    sampling = Sampling.create(temperature=5.0, top_k=2)
    assert {choose_token(LOGITS, sampling, seed=1, position=p) for p in range(60)} == {1, 2}


def rule(sampling: Sampling, *, context: int = 100, before: tuple[int, ...] = ()) -> StopRule:
    text = {1: "a", 2: "b", 3: "c", 9: ""}
    return StopRule(sampling, eos_token_id=9, max_context_tokens=context,
                    decode=lambda ids: "".join(text[i] for i in ids), generated_before=before)


def test_eos_stops_unless_ignored() -> None:
    assert rule(Sampling.create(max_tokens=5)).check(9, 10) == FinishReason.STOP_TOKEN
    assert rule(Sampling.create(max_tokens=5, ignore_eos=True)).check(9, 10) is None
    assert rule(Sampling.create(max_tokens=5, stop_token_ids=(3,))).check(3, 10) == FinishReason.STOP_TOKEN


def test_stop_string_across_tokens_and_earlier_tokens() -> None:
    stops = rule(Sampling.create(max_tokens=9, stop=("abc",)), before=(1,))
    assert stops.check(2, 10) is None
    assert stops.check(3, 11) == FinishReason.STOP_STRING


def test_max_tokens_counts_earlier_tokens_and_context_fills() -> None:
    limited = rule(Sampling.create(max_tokens=3), before=(1, 2))
    assert limited.check(1, 10) == FinishReason.LENGTH
    assert rule(Sampling.create(max_tokens=3), before=(1, 2, 3)).already_finished(10) == FinishReason.LENGTH
    assert rule(Sampling.create(max_tokens=9), context=8).check(1, 8) == FinishReason.CONTEXT_FULL
    assert rule(Sampling.create(max_tokens=9), context=8).check(1, 7) is None
