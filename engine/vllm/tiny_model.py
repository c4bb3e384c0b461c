"""A tiny seeded random Llama shaped for vLLM's CPU backend, saved in Hugging Face format.

vLLM's CPU attention takes head_dim 32..512 and blocks of a multiple of 32
tokens, so the torch engine's `tiny` model (head_dim 16) does not load there.
This one has head_dim 64 and reuses the tiny model's byte-level BPE tokenizer
(engine.tiny_model.build_tokenizer) and its ChatML chat template, so every
string encodes and chat requests work.

`ensure_tiny_vllm_checkpoint()` returns the directory (config.json,
model.safetensors, tokenizer.json, tokenizer_config.json), built once per
(spec, seed, library versions) and safe to call from many processes at once
(each builder writes a private directory and renames it into place).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from engine.tiny_model import CHAT_TEMPLATE, EOS_TOKEN, build_tokenizer, default_cache_dir

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
_REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def tiny_vllm_key(seed: int = 0) -> str:
    """Cache key: the spec, the seed and the torch/transformers/tokenizers versions."""
    import importlib.metadata as md

    versions = {}
    for name in ("torch", "transformers", "tokenizers"):
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            versions[name] = "none"
    blob = json.dumps({"v": SPEC_VERSION, "spec": TINY_VLLM_SPEC, "seed": seed, "versions": versions},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def ensure_tiny_vllm_checkpoint(cache_dir: str | os.PathLike[str] | None = None, seed: int = 0) -> Path:
    """The checkpoint directory under `cache_dir` (default ~/.cache/tandem/models), built if missing."""
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    target = root / f"{NAME}-{tiny_vllm_key(seed)}"
    if _complete(target):
        return target
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=root))
    try:
        build_tiny_vllm_checkpoint(staging, seed)
        try:
            os.rename(staging, target)
        except OSError:
            if not _complete(target):  # another process renamed its copy first
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def build_tiny_vllm_checkpoint(directory: Path, seed: int = 0) -> None:
    """Writes model and tokenizer into `directory` (which must exist). Deterministic in `seed`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer(int(TINY_VLLM_SPEC["vocab_size"]))
    tokenizer.save(str(directory / "tokenizer.json"))
    eos_id = tokenizer.token_to_id(EOS_TOKEN)
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": EOS_TOKEN,
        "bos_token": EOS_TOKEN,
        "unk_token": None,
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(TINY_VLLM_SPEC["max_position_embeddings"]),
        "chat_template": CHAT_TEMPLATE,
    }, indent=2, sort_keys=True) + "\n")
    spec: dict[str, Any] = dict(TINY_VLLM_SPEC)
    config = LlamaConfig(**spec, bos_token_id=eos_id, eos_token_id=eos_id, tie_word_embeddings=False,
                         dtype="float32")
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    finally:
        torch.random.set_rng_state(state)
    model.save_pretrained(str(directory), safe_serialization=True)


def _complete(path: Path) -> bool:
    return all((path / name).is_file() for name in _REQUIRED_FILES)


if __name__ == "__main__":
    # `python -m engine.vllm.tiny_model [CACHE_DIR]`: builds the model if missing and prints its directory
    # (tandemctl up --engine vllm hands it to the router as the model's tokenizer).
    import sys

    print(ensure_tiny_vllm_checkpoint(sys.argv[1] if len(sys.argv) > 1 else None))
