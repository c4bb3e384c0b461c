"""KV cache <-> KvBlob, and stacking per-sequence caches into one batch, for transformers' DynamicCache.

Blob format (the engine's, described by KvLayoutSpec): one C-contiguous
array of shape [num_layers, 2 (keys, values), num_kv_heads, num_tokens,
head_dim] in the layout's dtype, native byte order (little-endian on every
supported host). Same-fingerprint engines import it as is.

Only caches whose layers are all plain `DynamicLayer` (full attention, no
sliding window, no quantization) can be exported, imported or stacked;
`cache_is_plain` tells. Other architectures run per sequence and cannot
export KV (they still decode locally).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from engine.base import EngineError, KvBlob, KvLayoutSpec, KvMismatch
from engine.kv.checksum import crc32c

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def model_fingerprint(checkpoint: Path, dtype: str) -> str:
    """Hash of config.json, the weight files' CRC32C and the compute dtype: equal => interchangeable KV.

    CRC32C runs at several GB/s, so a multi-GB checkpoint adds about a second to load.
    """
    digest = hashlib.sha256()
    config = json.loads((checkpoint / "config.json").read_text())
    digest.update(json.dumps(config, sort_keys=True).encode())
    digest.update(dtype.encode())
    weights = sorted(p for p in checkpoint.iterdir() if p.suffix in (".safetensors", ".bin", ".pt"))
    for path in weights:
        digest.update(path.name.encode())
        digest.update(f"{_file_crc(path):08x}".encode())
    return digest.hexdigest()[:32]


def _file_crc(path: Path) -> int:
    value = 0
    view = memoryview(bytearray(16 << 20))
    with path.open("rb", buffering=0) as handle:
        while n := handle.readinto(view):
            value = crc32c(view[:n], value)
    return value


def cache_is_plain(cache: Any) -> bool:
    return isinstance(cache, DynamicCache) and all(type(layer) is DynamicLayer for layer in cache.layers)


def new_cache(config: Any) -> DynamicCache:
    return DynamicCache(config=config)


def export_kv(cache: DynamicCache, layout: KvLayoutSpec, num_tokens: int) -> KvBlob:
    """The first `num_tokens` positions of a batch-1 plain cache as one contiguous CPU buffer."""
    if not cache_is_plain(cache):
        raise EngineError("this model's KV cache has sliding-window or special layers: KV export is not supported")
    parts = []
    layers: list[Any] = list(cache.layers)
    for layer in layers:
        keys, values = layer.keys, layer.values
        parts.append(torch.stack((keys[0, :, :num_tokens], values[0, :, :num_tokens])))
    tensor = torch.stack(parts).to("cpu").contiguous()
    data = memoryview(tensor.view(torch.uint8).numpy()).cast("B")  # type: ignore[arg-type]
    return KvBlob(layout=layout, num_tokens=num_tokens, data=data)


def import_kv(blob: KvBlob, layout: KvLayoutSpec, config: Any, device: torch.device) -> DynamicCache:
    """A batch-1 cache holding `blob`; KvMismatch when its layout or size is not ours."""
    layout.check_compatible(blob.layout)
    shape = (layout.num_layers, 2, layout.num_kv_heads, blob.num_tokens, layout.head_dim)
    dtype = DTYPES[layout.dtype]
    expected = _numel(shape) * torch.empty((), dtype=dtype).element_size()
    if blob.nbytes != expected:
        raise KvMismatch(f"KV payload has {blob.nbytes} bytes; {blob.num_tokens} tokens in this layout need {expected}")
    raw = blob.data
    if isinstance(raw, bytes) or (isinstance(raw, memoryview) and raw.readonly):
        raw = bytearray(raw)  # torch.frombuffer wants a writable buffer
    tensor = torch.frombuffer(raw, dtype=torch.uint8).view(dtype).reshape(shape).to(device)
    layers = [(tensor[i, 0].unsqueeze(0), tensor[i, 1].unsqueeze(0)) for i in range(shape[0])]
    return DynamicCache(layers, config=config)


def stack_caches(caches: list[DynamicCache], config: Any) -> tuple[DynamicCache, torch.Tensor, list[int]]:
    """Left-pads batch-1 caches into one batch cache.

    Returns it, the attention mask (one extra column for the token about to
    be fed) and each sequence's length.
    """
    lengths = [cache.get_seq_length() for cache in caches]
    width = max(lengths)
    layers = []
    for index in range(len(caches[0].layers)):
        keys, values = [], []
        for cache in caches:
            layer: Any = cache.layers[index]
            pad = width - layer.keys.shape[-2]
            keys.append(torch.nn.functional.pad(layer.keys, (0, 0, pad, 0)))
            values.append(torch.nn.functional.pad(layer.values, (0, 0, pad, 0)))
        layers.append((torch.cat(keys), torch.cat(values)))
    device = layers[0][0].device
    mask = torch.zeros((len(caches), width + 1), dtype=torch.long, device=device)
    for row, length in enumerate(lengths):
        mask[row, width - length:] = 1
    return DynamicCache(layers, config=config), mask, lengths


def unstack_cache(batch: DynamicCache, caches: list[DynamicCache], lengths: list[int]) -> None:
    """Writes row b of `batch` (one new position appended) back into caches[b], dropping its padding."""
    width = batch.get_seq_length()
    for row, (cache, length) in enumerate(zip(caches, lengths, strict=True)):
        start = width - (length + 1)
        pairs: list[tuple[Any, Any]] = list(zip(cache.layers, batch.layers, strict=True))
        for layer, batch_layer in pairs:
            layer.keys = batch_layer.keys[row:row + 1, :, start:].clone()
            layer.values = batch_layer.values[row:row + 1, :, start:].clone()


def _numel(shape: tuple[int, ...]) -> int:
    total = 1
    for size in shape:
        total *= size
    return total
