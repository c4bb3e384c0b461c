"""Loading a Hugging Face causal LM for the torch engine: checkpoint, device, dtype, layout, shape, KV budget.

Blocking (reads the weights); the engine calls it on a worker thread. Every
failure is an EngineError that names the setting or the file.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from engine.base import EngineConfig, EngineError, KvLayoutSpec, ModelShape
from engine.torch_kv import DTYPES, cache_is_plain, model_fingerprint, new_cache

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    model: Any
    checkpoint: Path
    device: torch.device
    layout: KvLayoutSpec
    max_context: int
    kv_blocks_total: int
    vocab_size: int
    shape: ModelShape


def resolve_checkpoint(config: EngineConfig) -> Path:
    """The checkpoint directory for `config.model`: a built-in name (made on first use) or a directory."""
    from engine import builtin_models

    builtin = builtin_models.resolve(config.model, config.cache_dir or None, seed=config.seed)
    if builtin is not None:
        return builtin
    path = Path(config.model).expanduser()
    if not (path / "config.json").is_file():
        raise EngineError(f"model must be a built-in name ({', '.join(builtin_models.names())}) or a Hugging "
                          f"Face checkpoint directory with config.json, got {config.model!r}")
    return path


def parse_device(name: str) -> torch.device:
    if name != "cpu" and name != "cuda" and not (name.startswith("cuda:") and name[5:].isdigit()):
        raise EngineError(f'device must be "cpu", "cuda" or "cuda:N", got {name!r}')
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise EngineError(f"device {name!r} asked for, but this torch build sees no CUDA device")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise EngineError(f"device {name!r}: only {torch.cuda.device_count()} CUDA devices here")
    return device


def load_model(config: EngineConfig) -> LoadedModel:
    if config.dtype not in DTYPES:
        raise EngineError(f"dtype must be one of {', '.join(DTYPES)}, got {config.dtype!r}")
    if not 1 <= config.max_batch_size <= 4096:
        raise EngineError(f"max_batch_size must be 1..4096, got {config.max_batch_size}")
    if not 1 <= config.kv_block_size <= 4096:
        raise EngineError(f"kv_block_size must be 1..4096, got {config.kv_block_size}")
    device = parse_device(config.device)
    checkpoint = resolve_checkpoint(config)
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        model = AutoModelForCausalLM.from_pretrained(str(checkpoint), dtype=DTYPES[config.dtype])
    except Exception as exc:
        raise EngineError(f"cannot load the model in {checkpoint}: {exc}") from exc
    model = model.to(device).eval()  # type: ignore[arg-type]
    layout = _probe_layout(model, device, model_fingerprint(checkpoint, config.dtype), config)
    model_limit = int(getattr(model.config, "max_position_embeddings", 0) or 0) or 2048
    if config.max_context_tokens < 0:
        raise EngineError(f"max_context_tokens must be >= 0, got {config.max_context_tokens}")
    max_context = min(model_limit, config.max_context_tokens) if config.max_context_tokens else model_limit
    vocab = int(model.get_output_embeddings().weight.shape[0]) if model.get_output_embeddings() is not None \
        else int(model.config.vocab_size)
    return LoadedModel(model, checkpoint, device, layout, max_context,
                       _kv_blocks(config, layout, device), vocab, model_shape(model, layout))


def model_shape(model: Any, layout: KvLayoutSpec) -> ModelShape:
    """The loaded model's size, counted from its tensors (no guessing from config names).

    An untied input embedding is a lookup, not a matmul, so it is not active;
    a tied one is the output projection too. Mixture-of-experts checkpoints
    count every expert as active (their routing is not read from the config):
    the router then overestimates their compute, the same for every worker.
    """
    params = list(model.parameters())  # shared (tied) tensors appear once
    total = sum(p.numel() for p in params)
    weight_bytes = sum(p.numel() * p.element_size() for p in params)
    embedding, output = model.get_input_embeddings(), model.get_output_embeddings()
    tied = embedding is not None and output is not None and output.weight is embedding.weight
    lookup = embedding.weight.numel() if embedding is not None and not tied else 0
    element = torch.empty((), dtype=DTYPES[layout.dtype]).element_size()
    return ModelShape(
        total_params=float(total), active_params=float(max(1, total - lookup)), weight_bytes=float(weight_bytes),
        kv_bytes_per_token=2 * layout.num_layers * layout.num_kv_heads * layout.head_dim * element,
        num_layers=layout.num_layers, num_kv_heads=layout.num_kv_heads, head_dim=layout.head_dim,
    )


def _probe_layout(model: Any, device: torch.device, fingerprint: str, config: EngineConfig) -> KvLayoutSpec:
    """Runs one token to read the cache shape the model really produces (no guessing from config names)."""
    cache = new_cache(model.config)
    with torch.inference_mode():
        model(input_ids=torch.zeros((1, 1), dtype=torch.long, device=device), use_cache=True,
              **{_cache_kw(model): cache})
    if not cache_is_plain(cache):
        log.warning("model cache is not a plain DynamicCache: decode runs per sequence and KV export is refused")
    first: Any = cache.layers[0]
    keys = first.keys
    return KvLayoutSpec(
        model_fingerprint=fingerprint,
        num_layers=len(cache.layers),
        num_kv_heads=int(keys.shape[1]),
        head_dim=int(keys.shape[-1]),
        dtype=config.dtype,
        block_size=0,  # the blob is one contiguous array, not blocks: any kv_block_size imports it
    )


def _kv_blocks(config: EngineConfig, layout: KvLayoutSpec, device: torch.device) -> int:
    if config.kv_blocks < 0:
        raise EngineError(f"kv_blocks must be >= 0 (0: from free memory), got {config.kv_blocks}")
    if config.kv_blocks:
        return config.kv_blocks
    element = torch.empty((), dtype=DTYPES[layout.dtype]).element_size()
    block_bytes = 2 * layout.num_layers * layout.num_kv_heads * layout.head_dim * element * config.kv_block_size
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = int(free * 0.9)
    else:
        budget = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
    return max(1, budget // block_bytes)


def _cache_kw(model: Any) -> str:
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
