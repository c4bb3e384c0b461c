"""Conversions between engine.base KV types and their tandem.v1 messages. Pure, no I/O."""

from __future__ import annotations

from engine.base import KvLayoutSpec
from tandem.v1.common_pb2 import KvLayout


def layout_to_proto(spec: KvLayoutSpec) -> KvLayout:
    return KvLayout(
        model_fingerprint=spec.model_fingerprint,
        num_layers=spec.num_layers,
        num_kv_heads=spec.num_kv_heads,
        head_dim=spec.head_dim,
        dtype=spec.dtype,
        block_size=spec.block_size,
    )


def layout_from_proto(message: KvLayout) -> KvLayoutSpec:
    return KvLayoutSpec(
        model_fingerprint=message.model_fingerprint,
        num_layers=message.num_layers,
        num_kv_heads=message.num_kv_heads,
        head_dim=message.head_dim,
        dtype=message.dtype,
        block_size=message.block_size,
    )
