"""vLLM's paged KV blocks <-> Tandem's dense KV payload. Pure tensor work, no vLLM import.

Dense payload (the torch engine's format, engine.torch_kv): one C-contiguous
array [num_layers, 2 (keys, values), num_kv_heads, num_tokens, head_dim].
Because it holds exactly the prompt's positions, its size is what the
decode worker's handle check expects of the layout (worker.handle_check).

vLLM's CPU backend keeps one tensor per layer, [num_blocks, num_kv_heads,
block_size, 2 * head_dim] (vllm/v1/attention/backends/cpu_attn.py). Inside
one (block, head) its float32 "vec" kernels store the keys dimension-major,
[head_dim, block_size], then the values token-major, [block_size, head_dim]
(measured against the torch engine's cache of the same checkpoint:
tests/vllm). Whole blocks are selected with one indexed copy per layer, then
laid out per position; `KV_VIEW` names this view in the layout fingerprint,
so a worker whose backend stores blocks otherwise refuses the payload.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

KV_VIEW = "cpu-vec-KdV"  # per (block, head): keys [head_dim, block_size], then values [block_size, head_dim]
# The CUDA backends' views (5-D, token-major): named apart so CPU and GPU workers never exchange KV.
KV_VIEW_CUDA = "cuda-NHD"


def split_block_view(cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values of one layer's cache, each [num_blocks, heads, block_size, head_dim] (views, no copy).

    4-D: vLLM's CPU layout (module docstring). 5-D: the CUDA backends' token-major layouts,
    [2, num_blocks, block_size, heads, head_dim] or [num_blocks, 2, block_size, heads, head_dim]
    (not exercised on this CPU-only project's machines: bench/gpu/vllm_check.py checks a GPU host).
    """
    if cache.dim() == 5:
        pair = cache if cache.shape[0] == 2 else cache.transpose(0, 1)
        return pair[0].permute(0, 2, 1, 3), pair[1].permute(0, 2, 1, 3)
    num_blocks, heads, block_size, width = cache.shape
    halves = cache.view(num_blocks, heads, 2, block_size * (width // 2))
    keys = halves[:, :, 0].view(num_blocks, heads, width // 2, block_size).transpose(2, 3)
    values = halves[:, :, 1].view(num_blocks, heads, block_size, width // 2)
    return keys, values


def dense_shape(caches: Sequence[torch.Tensor], num_tokens: int) -> tuple[int, int, int, int, int]:
    """[num_layers, 2, num_kv_heads, num_tokens, head_dim] of the dense payload for these caches."""
    keys, _ = split_block_view(caches[0])
    return (len(caches), 2, keys.shape[1], num_tokens, keys.shape[3])


def gather_dense(caches: Sequence[torch.Tensor], block_ids: Sequence[int], num_tokens: int,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """The first `num_tokens` positions held in `block_ids` of every layer, as a dense payload.

    Written into `out` (dense_shape, on the CPU: a file mapping, so the payload is copied once) or a new tensor.
    """
    if out is None:
        out = torch.empty(dense_shape(caches, num_tokens), dtype=caches[0].dtype)
    block_size = split_block_view(caches[0])[0].shape[2]
    for layer, cache in enumerate(caches):
        for kind, source in enumerate(split_block_view(cache)):
            target = out[layer, kind]  # [H, T, D]
            for index, block in enumerate(block_ids):
                lo = index * block_size
                if lo >= num_tokens:
                    break
                hi = min(num_tokens, lo + block_size)
                target[:, lo:hi].copy_(source[block, :, :hi - lo])
    return out


def scatter_dense(caches: Sequence[torch.Tensor], block_ids: Sequence[int], dense: torch.Tensor,
                  start: int = 0) -> None:
    """Writes positions start..dense.shape[3] of `dense` into the blocks `block_ids` (which cover position 0 on).

    Only those positions are written: a block's other slots (a shared prefix
    before `start`, the sequence's next tokens after the end) are untouched.
    """
    end = dense.shape[3]
    if end <= start:
        return
    block_size = split_block_view(caches[0])[0].shape[2]
    first, last = start // block_size, (end - 1) // block_size
    for layer, cache in enumerate(caches):
        keys, values = split_block_view(cache)
        for kind, target in enumerate((keys, values)):
            source = dense[layer, kind].to(cache.device, cache.dtype)  # [H, T, D]
            for block in range(first, last + 1):
                lo, hi = max(start, block * block_size), min(end, (block + 1) * block_size)
                target[block_ids[block], :, lo - block * block_size:hi - block * block_size] = source[:, lo:hi]


def blocks_needed(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)
