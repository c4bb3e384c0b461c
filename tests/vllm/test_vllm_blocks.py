"""vLLM's paged CPU KV blocks <-> Tandem's dense payload (engine.vllm.blocks), on plain tensors."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from engine.vllm.blocks import dense_shape, gather_dense, scatter_dense, split_block_view

LAYERS, HEADS, BLOCK, DIM = 3, 2, 32, 64


def caches(seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(10, HEADS, BLOCK, 2 * DIM, generator=generator) for _ in range(LAYERS)]


def reference(layer_caches: list[torch.Tensor], block_ids: list[int], tokens: int) -> torch.Tensor:
    """Position p of the sequence lives in block block_ids[p // BLOCK], slot p % BLOCK."""
    out = torch.empty(LAYERS, 2, HEADS, tokens, DIM)
    for layer, cache in enumerate(layer_caches):
        for kind, source in enumerate(split_block_view(cache)):
            for position in range(tokens):
                out[layer, kind, :, position] = source[block_ids[position // BLOCK], :, position % BLOCK]
    return out


def test_keys_are_stored_dimension_major_values_token_major() -> None:
    """The CPU kernel's block interior: keys [head_dim, block_size], then values [block_size, head_dim]."""
    cache = torch.arange(10 * HEADS * BLOCK * 2 * DIM, dtype=torch.float32).view(10, HEADS, BLOCK, 2 * DIM)
    keys, values = split_block_view(cache)
    flat = cache.view(10, HEADS, -1)
    assert keys[4, 1, 3, 5] == flat[4, 1, 5 * BLOCK + 3]
    assert values[4, 1, 3, 5] == flat[4, 1, BLOCK * DIM + 3 * DIM + 5]


@pytest.mark.parametrize("tokens", [1, BLOCK - 1, BLOCK, BLOCK + 1, 2 * BLOCK, 70])
def test_gather_and_scatter_round_trip_through_a_file(tmp_path: Path, tokens: int) -> None:
    source = caches()
    block_ids = [7, 2, 5][:-(-tokens // BLOCK)]
    shape = dense_shape(source, tokens)
    path = str(tmp_path / "kv")
    mapped = torch.from_file(path, shared=True, size=math.prod(shape), dtype=torch.float32).view(shape)
    gather_dense(source, block_ids, tokens, out=mapped)
    payload = torch.from_file(path, shared=True, size=math.prod(shape), dtype=torch.float32).view(shape)
    assert torch.equal(payload, reference(source, block_ids, tokens))
    target = caches(seed=1)
    before = [c.clone() for c in target]
    scatter_dense(target, [1, 8, 3][:len(block_ids)], payload)
    assert torch.equal(gather_dense(target, [1, 8, 3][:len(block_ids)], tokens), payload)
    # Nothing outside the sequence's positions was written: other blocks, and the last block's free slots.
    for cache, old in zip(target, before, strict=True):
        assert torch.equal(cache[[0, 2, 4, 5, 6, 7, 9]], old[[0, 2, 4, 5, 6, 7, 9]])
        keys, values = split_block_view(cache)
        old_keys, old_values = split_block_view(old)
        last, used = [1, 8, 3][len(block_ids) - 1], tokens - (len(block_ids) - 1) * BLOCK
        assert torch.equal(keys[last, :, used:], old_keys[last, :, used:])
        assert torch.equal(values[last, :, used:], old_values[last, :, used:])


def test_scatter_from_an_offset_leaves_the_prefix() -> None:
    source, target = caches(), caches(seed=2)
    payload = gather_dense(source, [4, 6], 40)
    prefix = gather_dense(target, [1, 2], 40)[:, :, :, :10].clone()
    scatter_dense(target, [1, 2], payload, start=10)
    after = gather_dense(target, [1, 2], 40)
    assert torch.equal(after[:, :, :, :10], prefix)
    assert torch.equal(after[:, :, :, 10:], payload[:, :, :, 10:])
