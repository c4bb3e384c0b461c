"""Settings of a worker process (prefill or decode); flags, TANDEM_* env and TOML."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from pathlib import Path

from engine.base import EngineConfig
from registry.settings import CommonSettings
from runtime.peers import default_node_name


@dataclass
class WorkerSettings(CommonSettings):
    listen: str = field(default="0.0.0.0:0", metadata={"help": "gRPC listen address (port 0: any free port)"})
    advertise_host: str = field(default="", metadata={
        "help": "host other machines use to reach this worker (default: the listen host, or 127.0.0.1)"})
    worker_id: str = field(default="", metadata={"help": "unique worker id (default ROLE-HOSTNAME-PID)"})
    node: str = field(default="", metadata={"help": "node name, as the node agent registers it (default hostname)"})
    engine: str = field(default="torch", metadata={"help": "engine: torch, sim or vllm"})
    model: str = field(default="tiny", metadata={
        "help": "checkpoint directory, 'tiny' (torch), or a profile id such as llama-3-8b (sim)"})
    served_model_name: str = field(default="", metadata={"help": "name the model is served under (default: model)"})
    device: str = field(default="cpu", metadata={"help": "torch device: cpu, cuda, cuda:N"})
    dtype: str = field(default="float32", metadata={"help": "float32, bfloat16 or float16"})
    gpu_type: str = field(default="", metadata={"help": "GPU catalog id of this worker's GPUs (H100-SXM, ...)"})
    gpu_count: int = field(default=1, metadata={"help": "GPUs this worker spans"})
    gpu_uuids: str = field(default="", metadata={"help": "comma-separated GPU uuids to claim exclusively"})
    max_batch_size: int = field(default=16, metadata={"help": "sequences decoded together at most"})
    max_context_tokens: int = field(default=0, metadata={"help": "context limit (0: the model's)"})
    kv_blocks: int = field(default=0, metadata={"help": "KV cache blocks (0: sized from memory)"})
    kv_block_size: int = field(default=16, metadata={"help": "tokens per KV block"})
    speedup: float = field(default=1.0, metadata={"help": "sim engine: divide simulated time by this"})
    cache_dir: str = field(default="", metadata={"help": "where built-in models are saved"})
    seed: int = field(default=0, metadata={"help": "seed of built-in random models"})
    sim_kv_bytes: str = field(default="", metadata={"help": "sim engine: 'real' to move KV of the simulated size"})
    kv_transports: str = field(default="grpc,shm", metadata={
        "help": "KV transports offered (prefill) or accepted (decode), best first"})
    kv_handle_ttl: float = field(default=30.0, metadata={"help": "seconds an unreleased KV handle lives"})
    max_queued_requests: int = field(default=256, metadata={
        "help": "requests accepted but not finished before RESOURCE_EXHAUSTED"})
    tls_cert: Path | None = field(default=None, metadata={"help": "serve TLS with this certificate"})
    tls_key: Path | None = field(default=None, metadata={"help": "private key of --tls-cert"})
    tls_client_ca: Path | None = field(default=None, metadata={"help": "require client certificates from this CA"})

    def resolved_worker_id(self, role: str) -> str:
        return self.worker_id or f"{role}-{socket.gethostname()}-{os.getpid()}"

    def resolved_node(self) -> str:
        return self.node or default_node_name()

    def engine_config(self) -> EngineConfig:
        extra = {"sim_kv_bytes": self.sim_kv_bytes} if self.sim_kv_bytes else {}
        return EngineConfig(
            model=self.model,
            served_name=self.served_model_name,
            device=self.device,
            dtype=self.dtype,
            gpu_type=self.gpu_type,
            gpu_count=self.gpu_count,
            max_batch_size=self.max_batch_size,
            max_context_tokens=self.max_context_tokens,
            kv_blocks=self.kv_blocks,
            kv_block_size=self.kv_block_size,
            speedup=self.speedup,
            cache_dir=self.cache_dir,
            seed=self.seed,
            extra=extra,
        )

    def transports(self) -> list[str]:
        return [t.strip() for t in self.kv_transports.split(",") if t.strip()]

    def gpu_uuid_list(self) -> list[str]:
        return [u.strip() for u in self.gpu_uuids.split(",") if u.strip()]
