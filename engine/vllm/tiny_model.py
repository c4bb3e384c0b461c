"""A tiny seeded random Llama shaped for vLLM's CPU backend, saved in Hugging Face format.

vLLM's CPU attention takes head_dim 32..512 and blocks of a multiple of 32
tokens, so the torch engine's `tiny` model (head_dim 16) does not load there.
This one has head_dim 64 and is otherwise made like `tiny`
(engine.tiny_model.build_random_llama): the same byte-level BPE tokenizer
and ChatML chat template, so every string encodes and chat requests work.

`ensure_tiny_vllm_checkpoint()` returns the directory (config.json,
model.safetensors, tokenizer.json, tokenizer_config.json), built once per
(spec, seed, library versions) and safe to call from many processes at once
(engine.checkpoint_cache).
"""

from __future__ import annotations

import os
from pathlib import Path

from engine.checkpoint_cache import CHECKPOINT_FILES, cache_root, ensure_built
from engine.tiny_model import build_random_llama, spec_key

# The name engines and `tandemctl up --engine vllm` accept in place of a checkpoint path.
NAME = "tiny-vllm"
# Bump when anything below changes what is written: the cache key includes it.
SPEC_VERSION = 1
# vLLM's CPU backend needs a block size that is a multiple of 32.
BLOCK_SIZE = 32

TINY_VLLM_SPEC: dict[str, int | float | str] = {
    "vocab_size": 512,
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "max_position_embeddings": 4096,
    # Wide weights make logits peaked, so near-ties that float rounding could flip are rare.
    "initializer_range": 0.3,
    "rope_theta": 10000.0,
}


def tiny_vllm_key(seed: int = 0) -> str:
    """Cache key: the spec, the seed and the torch/transformers/tokenizers versions."""
    return spec_key(SPEC_VERSION, TINY_VLLM_SPEC, seed)


def ensure_tiny_vllm_checkpoint(cache_dir: str | os.PathLike[str] | None = None, seed: int = 0) -> Path:
    """The checkpoint directory under `cache_dir` (default ~/.cache/tandem/models), built if missing."""
    target = cache_root(cache_dir) / f"{NAME}-{tiny_vllm_key(seed)}"
    return ensure_built(target, CHECKPOINT_FILES, lambda staging: build_tiny_vllm_checkpoint(staging, seed))


def build_tiny_vllm_checkpoint(directory: Path, seed: int = 0) -> None:
    """Writes model and tokenizer into `directory` (which must exist). Deterministic in `seed`."""
    build_random_llama(directory, TINY_VLLM_SPEC, seed)


if __name__ == "__main__":
    # `python -m engine.vllm.tiny_model [CACHE_DIR]`: builds the model if missing and prints its directory
    # (tandemctl up --engine vllm hands it to the router as the model's tokenizer).
    import sys

    print(ensure_tiny_vllm_checkpoint(sys.argv[1] if len(sys.argv) > 1 else None))
