"""Settings of a worker process (prefill or decode): flags, TANDEM_* variables, [prefill]/[decode] TOML tables.

Declared with `runtime.setting.setting`: default, range and help in one
place. A default that engine code also needs (EngineConfig's, the KV
transports a worker offers, the sim engine's KV payload mode) is owned there
and referenced here.
"""

# setting() returns a dataclasses.Field, as field() does; ruff cannot see through the wrapper.

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path

from engine.base import EngineConfig, engine_names
from engine.kv.selection import WORKER_DEFAULT, known_transports, usable_transports
from engine.sim.settings import DEFAULT_KV_BYTES, KV_BYTES_MODES
from registry.settings import CommonSettings
from runtime.catalog import CatalogError, default_catalog
from runtime.peers import default_node_name
from runtime.setting import ConfigError, setting, specs

# What the torch engine computes in; other engines ignore it.
DTYPES = ("float32", "bfloat16", "float16")
# The engine settings' defaults are EngineConfig's (what an engine built in code gets too).
_ENGINE = EngineConfig()


@dataclass
class WorkerSettings(CommonSettings):
    listen: str = setting("0.0.0.0:0", "gRPC listen address (port 0: any free port)")
    advertise_host: str = setting(
        "", "host other machines use to reach this worker (default: the listen host, or 127.0.0.1)")
    worker_id: str = setting("", "unique worker id (default ROLE-HOSTNAME-PID)")
    node: str = setting("", "node name, as the node agent registers it (default hostname)")
    engine: str = setting("torch", "engine that runs the model", choices=engine_names)
    model: str = setting(_ENGINE.model,
                         "checkpoint directory, 'tiny' (torch), or a profile id such as llama-3-8b (sim)")
    served_model_name: str = setting(_ENGINE.served_name, "name the model is served under (default: model)")
    device: str = setting(_ENGINE.device, "torch device: cpu, cuda, cuda:N")
    dtype: str = setting(_ENGINE.dtype, "torch compute dtype", choices=DTYPES)
    gpu_type: str = setting(_ENGINE.gpu_type, "GPU catalog id of this worker's GPUs (H100-SXM, ...); "
                            "the node inventory of claimed GPUs overrides it")
    gpu_count: int = setting(_ENGINE.gpu_count, "GPUs this worker spans", min=1, max=1024)
    gpu_uuids: str = setting("", "comma-separated GPU uuids to claim exclusively")
    max_batch_size: int = setting(_ENGINE.max_batch_size, "sequences decoded together at most", min=1)
    max_context_tokens: int = setting(_ENGINE.max_context_tokens, "context limit (0: the model's)", min=0,
                                      unit="tokens")
    kv_blocks: int = setting(_ENGINE.kv_blocks, "KV cache blocks (0: sized from memory)", min=0)
    kv_block_size: int = setting(_ENGINE.kv_block_size, "tokens per KV block", min=1, max=4096, unit="tokens")
    speedup: float = setting(_ENGINE.speedup, "sim engine: divide simulated time by this", above=0)
    cache_dir: str = setting(_ENGINE.cache_dir, "where built-in models are saved")
    seed: int = setting(_ENGINE.seed, "seed of built-in random models", min=0)
    sim_kv_bytes: str = setting(DEFAULT_KV_BYTES, "sim engine: KV payload size ('real': as large as the "
                                "simulated model's KV cache, to load the transports)", choices=KV_BYTES_MODES)
    vllm_prefix_caching: bool = setting(False, "vllm engine: keep vLLM's prefix cache and publish its blocks to "
                                        "routers (KV-aware routing)")
    kv_transports: str = setting(",".join(WORKER_DEFAULT), "KV transports offered (prefill) or accepted (decode); "
                                 "tcp is left out when serving TLS", choices=known_transports, each=True)
    kv_handle_ttl: float = setting(30.0, "how long an unreleased KV handle lives", above=0, max=3600,
                                   unit="seconds")
    max_kv_bytes: int = setting(4 << 30, "decode: largest KV payload a handle may name (larger: INVALID_ARGUMENT "
                                "before any pull)", min=1, unit="bytes")
    kv_pull_timeout_s: float = setting(120.0, "decode: deadline of one KV pull from a prefill worker", above=0,
                                       max=3600, unit="seconds")
    max_queued_requests: int = setting(256, "requests accepted but not finished before RESOURCE_EXHAUSTED",
                                       min=1)
    # Bounded state: what one caller can make a worker hold (docs/api.md, "Limits").
    max_kv_handles: int = setting(1024, "prefill: open KV handles before Prefill answers RESOURCE_EXHAUSTED",
                                  min=1, max=1_000_000)
    max_kv_handle_bytes: int = setting(8 << 30, "prefill: bytes held under open KV handles before Prefill "
                                       "answers RESOURCE_EXHAUSTED", min=1, unit="bytes")
    max_requests_per_peer: int = setting(128, "requests one caller (gRPC peer address) may have in flight "
                                         "before RESOURCE_EXHAUSTED", min=1)
    min_load_interval_ms: int = setting(50, "WatchLoad: shortest report interval; a smaller requested one is "
                                        "raised to this", min=1, max=60_000, unit="ms")
    role_switch_grace: float = setting(30.0, "live role switch: how long decode streams may run to their end "
                                       "before they are handed over (the router continues them elsewhere)", min=0,
                                       max=3600, unit="seconds")
    max_load_watchers: int = setting(64, "WatchLoad streams open at once before RESOURCE_EXHAUSTED", min=1)
    tls_cert: Path | None = setting(None, "serve TLS with this certificate")
    tls_key: Path | None = setting(None, "private key of --tls-cert")
    tls_client_ca: Path | None = setting(None, "require client certificates from this CA")

    def __post_init__(self) -> None:
        self.gpu_type = self._catalog_gpu_type()

    def _catalog_gpu_type(self) -> str:
        """--gpu-type as the catalog spells it ("h100 sxm" -> "H100-SXM"; an NVML name works too).

        A typo must not become an unknown GPU that the router prices at default
        rates: an id the catalog does not know is refused, naming the known ones.
        """
        if not self.gpu_type.strip():
            return ""
        try:
            catalog = default_catalog()
        except CatalogError as exc:
            raise ConfigError(f"the GPU catalog: {exc}") from None
        if self.gpu_type in catalog:
            return self.gpu_type
        found = catalog.match(self.gpu_type)
        if found is None:
            spec = next(spec for spec in specs(WorkerSettings) if spec.name == "gpu_type")
            raise spec.problem(f"must be a GPU catalog id ({', '.join(catalog.ids())}) or empty, "
                               f"got {self.gpu_type!r}")
        return found.catalog_id

    def resolved_worker_id(self, role: str) -> str:
        return self.worker_id or f"{role}-{socket.gethostname()}-{os.getpid()}"

    def resolved_node(self) -> str:
        return self.node or default_node_name()

    def engine_config(self) -> EngineConfig:
        # Only a non-default mode is passed: the sim engine owns the default, other engines ignore it.
        extra = {"sim_kv_bytes": self.sim_kv_bytes} if self.sim_kv_bytes != DEFAULT_KV_BYTES else {}
        if self.vllm_prefix_caching:
            extra["prefix_caching"] = "1"
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
        """The KV transports this worker offers or accepts: the setting, less what serving TLS rules out."""
        return list(usable_transports(self.kv_transports, tls=self.tls_cert is not None))

    def gpu_uuid_list(self) -> list[str]:
        return [u.strip() for u in self.gpu_uuids.split(",") if u.strip()]
