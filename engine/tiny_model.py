"""A small seeded random Llama model with a real byte-level BPE tokenizer, saved in Hugging Face format.

`ensure_tiny_checkpoint()` returns a checkpoint directory (config.json,
model.safetensors, tokenizer.json, tokenizer_config.json) that the torch
engine loads through the same path as any downloaded checkpoint. Contract:

- Same spec and seed => byte-identical files, so every process (prefill and
  decode workers, tests) computes identical outputs.
- Safe to call from many processes at once, and cheap when the directory
  exists (no torch import then): engine.checkpoint_cache builds it once,
  in a staging directory renamed into place.

The tokenizer round-trips any UTF-8 text: it is byte-level, so every string
encodes, and decoding the ids gives the string back.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from engine.checkpoint_cache import CHECKPOINT_FILES, cache_root, ensure_built

# Bump when anything below changes what is written: the cache key includes it.
SPEC_VERSION = 2

TINY_SPEC: dict[str, int | float | str] = {
    "vocab_size": 512,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 4096,
    # Wider than Llama's default 0.02 so logits are peaked: near-ties between
    # the two best tokens, which float rounding could flip, become rare.
    "initializer_range": 0.3,
    "rope_theta": 10000.0,
}
EOS_TOKEN = "<|endoftext|>"
# ChatML, so chat requests work on the tiny model too (its answers are noise either way).
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# A small mixed corpus so the merges cover common English, code and some
# non-Latin text; anything else falls back to single bytes.
_CORPUS = [
    "The quick brown fox jumps over the lazy dog. " * 4,
    "Tandem turns a fleet of GPUs into one inference factory: prefill and decode run in separate workers.",
    "A router pairs one prefill worker with one decode worker for every request, and the KV cache moves between.",
    "def main():\n    for i in range(10):\n        print(i, i * i)\n    return 0\n",
    "Hello, world! How are you today? I am fine, thank you. The weather is nice and the sun is shining.",
    "héllo wörld, naïve café, crème brûlée, Größe, señor, 你好世界, こんにちは, привет мир, 🚀✨",
    "0123456789 " * 3 + "{\"key\": [1, 2, 3], \"value\": null, \"ok\": true}",
    "Once upon a time there was a little model that generated tokens one after another until it stopped.",
]


def tiny_key(seed: int = 0) -> str:
    """Cache key: changes with the spec, the seed, and the torch/transformers versions (init RNG may differ)."""
    return spec_key(SPEC_VERSION, TINY_SPEC, seed)


def spec_key(spec_version: int, spec: dict[str, int | float | str], seed: int) -> str:
    """The cache key of a seeded random model: its spec and seed, and the library versions that draw it."""
    import importlib.metadata as md

    versions = {name: _version(md, name) for name in ("torch", "transformers", "tokenizers")}
    blob = json.dumps({"v": spec_version, "spec": spec, "seed": seed, "versions": versions}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def ensure_tiny_checkpoint(cache_dir: str | os.PathLike[str] | None = None, seed: int = 0) -> Path:
    """The tiny checkpoint's directory under `cache_dir` (default ~/.cache/tandem/models), built if missing.

    Safe to call concurrently from several processes; returns only once the
    directory is complete.
    """
    target = cache_root(cache_dir) / f"tiny-{tiny_key(seed)}"
    return ensure_built(target, CHECKPOINT_FILES, lambda staging: build_tiny_checkpoint(staging, seed))


def build_tiny_checkpoint(directory: Path, seed: int = 0) -> None:
    """Writes the model and tokenizer into `directory` (which must exist). Deterministic in `seed`."""
    build_random_llama(directory, TINY_SPEC, seed)


def build_random_llama(directory: Path, spec: dict[str, int | float | str], seed: int) -> None:
    """A Llama of `spec` with weights drawn from `seed`, and the byte-level tokenizer, written into `directory`.

    Deterministic: the same spec, seed and library versions give byte-identical files.
    """
    tokenizer = build_tokenizer(int(spec["vocab_size"]))
    tokenizer.save(str(directory / "tokenizer.json"))
    eos_id = tokenizer.token_to_id(EOS_TOKEN)
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": EOS_TOKEN,
        "bos_token": EOS_TOKEN,
        "unk_token": None,
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(spec["max_position_embeddings"]),
        "chat_template": CHAT_TEMPLATE,
    }, indent=2, sort_keys=True) + "\n")
    _build_model(directory, spec, seed, eos_id)


def build_tokenizer(vocab_size: int) -> Any:
    """A byte-level BPE trained on the built-in corpus; id 0 is the end-of-text token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS, trainer=trainer)
    return tokenizer


def _build_model(directory: Path, spec: dict[str, int | float | str], seed: int, eos_id: int) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    fields: dict[str, Any] = dict(spec)
    config = LlamaConfig(
        **fields,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        tie_word_embeddings=False,
        dtype="float32",
    )
    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    finally:
        torch.random.set_rng_state(generator_state)
    model.save_pretrained(str(directory), safe_serialization=True)
    # save_pretrained may add generation_config.json; keep it, it is deterministic too.


def _version(md: Any, name: str) -> str:
    try:
        return str(md.version(name))
    except md.PackageNotFoundError:
        return "none"
