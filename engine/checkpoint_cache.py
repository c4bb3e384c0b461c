"""Checkpoint directories built once into a shared cache, safely from many processes.

`ensure_built(target, required, build)` returns `target` once every file in
`required` is there, building it when missing. Contract:

- Cheap when the directory is complete: no lock, no build, no heavy import.
- Atomic: `build` writes into a private staging directory beside `target`,
  which is renamed into place only when `build` returns, so no reader ever
  sees a half-written checkpoint. A failed build leaves nothing behind.
- Once per cache: builders serialize on a lock of the cache directory (a
  prefill and a decode worker starting together on one host wait for one
  build instead of each doing the same work), and a builder that finds the
  directory complete after waiting reuses it. The cache holds only the
  finished directories (and, during a build, its staging directory).
- Completeness is the presence of the `required` files; a build that records
  a digest of what it wrote (a provenance file) names that file in
  `required`, so the record marks the directory complete.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

# The files every Hugging Face checkpoint that Tandem's engines load carries.
CHECKPOINT_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def default_cache_dir() -> Path:
    """Where built-in models are built: $TANDEM_CACHE_DIR/models, default ~/.cache/tandem/models."""
    return Path(os.environ.get("TANDEM_CACHE_DIR") or Path.home() / ".cache" / "tandem") / "models"


def cache_root(cache_dir: str | os.PathLike[str] | None) -> Path:
    """`cache_dir` as a path, or the default cache when it is empty or None."""
    return Path(cache_dir) if cache_dir else default_cache_dir()


def is_complete(directory: Path, required: Sequence[str]) -> bool:
    return all((directory / name).is_file() for name in required)


def ensure_built(target: Path, required: Sequence[str], build: Callable[[Path], None]) -> Path:
    """`target`, built by `build(staging_dir)` unless every `required` file is already there.

    `build` receives an existing empty directory and must write every
    `required` file into it. Returns only once `target` is complete; whatever
    `build` raises propagates, leaving no partial directory.
    """
    if is_complete(target, required):
        return target
    root = target.parent
    root.mkdir(parents=True, exist_ok=True)
    # The lock is the cache directory itself: nothing is left behind to clean up, at the price of
    # builds of different models in one cache taking turns.
    lock = os.open(root, os.O_RDONLY)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if is_complete(target, required):
            return target
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=root))
        try:
            build(staging)
            os.rename(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    finally:
        os.close(lock)  # releases the lock
    return target
