"""Built-in model names the vLLM engine accepts in place of a checkpoint directory.

- `tiny-vllm` (engine.vllm.tiny_model): a seeded random Llama shaped for
  vLLM's CPU backend (head_dim 64); speed, where the text does not matter.
- `smollm2-135m` (engine.builtin_models): SmolLM2-135M-Instruct, converted
  once from its packaged GGUF file into the same Hugging Face checkpoint the
  torch engine loads (head_dim 64 as well); real text.

The torch engine's `tiny` (head_dim 16) is not among them: vLLM's CPU
attention takes head_dim 32..512 only.
"""

from __future__ import annotations

import os
from pathlib import Path

from engine.builtin_models import SMOLLM2_135M, resolve
from engine.vllm.tiny_model import NAME as TINY_VLLM
from engine.vllm.tiny_model import ensure_tiny_vllm_checkpoint

NAMES = (TINY_VLLM, SMOLLM2_135M.name)


def resolve_vllm_model(name: str, cache_dir: str | os.PathLike[str] | None = None, *, seed: int = 0) -> Path | None:
    """The checkpoint directory of built-in `name` (made in the cache on first use); None when not built in.

    Blocking; EngineError names what to install when a built-in model's package is missing.
    """
    if name == TINY_VLLM:
        return ensure_tiny_vllm_checkpoint(cache_dir, seed=seed)
    if name == SMOLLM2_135M.name:
        return resolve(name, cache_dir)
    return None
