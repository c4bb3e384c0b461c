"""Model profiles for the sim engine: the shape of a model, no weights.

A profile carries what the roofline needs (parameter counts, bytes per
weight, attention shape for FLOPs and KV size) and what the KV layout
reports. Figures are from the published configs and model cards.

Weight bytes: dense weights (attention, embeddings, norms, MoE routers) in
bf16; MoE expert weights as shipped. gpt-oss-120b ships its experts in MXFP4
(4-bit values plus one 8-bit scale per 32: 4.25 bits, 0.53125 bytes per
parameter), which is what lets it fit one 80 GB GPU; the sim counts them so.
Compute is always charged at the bf16 rate (Hopper and Ampere have no FP4
tensor cores; the kernels dequantize).
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.base import EngineError, ModelShape

BF16_BYTES = 2.0
MXFP4_BYTES = 4.25 / 8


@dataclass(frozen=True)
class ModelProfile:
    """One model's shape. `total_params` includes embeddings and every expert."""

    profile_id: str
    version: int
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    total_params: float
    # The input embedding table: looked up, never multiplied, so it costs
    # memory but neither FLOPs nor per-step reads.
    embedding_params: float
    max_context_tokens: int
    dense_weight_bytes: float = BF16_BYTES
    # MoE: every expert of every layer together, and routing top-k of n.
    expert_params: float = 0.0
    num_experts: int = 0
    experts_per_token: int = 0
    expert_weight_bytes: float = BF16_BYTES
    kv_dtype: str = "bfloat16"
    kv_dtype_bytes: int = 2

    @property
    def fingerprint(self) -> str:
        """Equal fingerprints mean interchangeable (simulated) KV caches."""
        return f"sim:{self.profile_id}:v{self.version}"

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def dense_params(self) -> float:
        """Everything but the experts, embedding table included."""
        return self.total_params - self.expert_params

    @property
    def active_params(self) -> float:
        """Parameters that do matmul work for one token: all but the embedding and the unrouted experts."""
        idle_experts = self.expert_params * (1 - self.experts_per_token / self.num_experts) if self.is_moe else 0.0
        return self.total_params - self.embedding_params - idle_experts

    @property
    def weight_bytes(self) -> float:
        """Bytes the weights occupy in GPU memory (all GPUs together)."""
        return self.dense_params * self.dense_weight_bytes + self.expert_params * self.expert_weight_bytes

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V for every layer: 2 * layers * kv_heads * head_dim * dtype bytes."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.kv_dtype_bytes

    def model_shape(self) -> ModelShape:
        """The shape a sim worker publishes for the router's cost model."""
        return ModelShape(
            total_params=self.total_params, active_params=self.active_params, weight_bytes=self.weight_bytes,
            kv_bytes_per_token=self.kv_bytes_per_token, num_layers=self.num_layers,
            num_kv_heads=self.num_kv_heads, head_dim=self.head_dim,
        )

    def describe(self) -> str:
        """One line for benchmark output."""
        kind = f"MoE {self.experts_per_token}/{self.num_experts} experts" if self.is_moe else "dense"
        return (
            f"{self.profile_id}: {kind}, {self.total_params / 1e9:.1f}B params"
            f" ({self.active_params / 1e9:.2f}B active),"
            f" weights {self.weight_bytes / 1e9:.1f} GB, KV {self.kv_bytes_per_token / 1024:.0f} KiB/token,"
            f" context {self.max_context_tokens}"
        )


PROFILES: dict[str, ModelProfile] = {
    p.profile_id: p
    for p in (
        # meta-llama/Meta-Llama-3-8B: untied embeddings, 128256 x 4096 each.
        ModelProfile(
            profile_id="llama-3-8b", version=1, num_layers=32, hidden_size=4096, num_heads=32, num_kv_heads=8,
            head_dim=128, vocab_size=128256, total_params=8.03e9, embedding_params=128256 * 4096,
            max_context_tokens=8192,
        ),
        # meta-llama/Meta-Llama-3-70B.
        ModelProfile(
            profile_id="llama-3-70b", version=1, num_layers=80, hidden_size=8192, num_heads=64, num_kv_heads=8,
            head_dim=128, vocab_size=128256, total_params=70.6e9, embedding_params=128256 * 8192,
            max_context_tokens=8192,
        ),
        # openai/gpt-oss-120b: 36 layers x 128 experts of 24.88M parameters
        # (gate_up 2880x5760 + down 2880x2880, with biases), top-4 routing;
        # 116.8B total, ~5.1B active. Half its layers use a 128-token sliding
        # window; the sim charges every layer full context (conservative).
        ModelProfile(
            profile_id="gpt-oss-120b", version=1, num_layers=36, hidden_size=2880, num_heads=64, num_kv_heads=8,
            head_dim=64, vocab_size=201088, total_params=116.8e9, embedding_params=201088 * 2880,
            max_context_tokens=131072, expert_params=114.65e9, num_experts=128, experts_per_token=4,
            expert_weight_bytes=MXFP4_BYTES,
        ),
    )
}


def get_profile(profile_id: str) -> ModelProfile:
    """The built-in profile `profile_id`; EngineError names the known ones."""
    try:
        return PROFILES[profile_id]
    except KeyError:
        raise EngineError(f"unknown sim model profile {profile_id!r}; known: {', '.join(sorted(PROFILES))}") from None
