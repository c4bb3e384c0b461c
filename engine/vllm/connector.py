"""Tandem's KV connector for vLLM: loaded by vLLM's engine core through `kv_connector_module_path`.

It moves a prompt's KV between vLLM's paged blocks and a file the Tandem
worker process reads or writes (engine.vllm.engine), on a RAM-backed
directory: the engine core runs in its own process, so the payload crosses
the process boundary once, as a file, and the worker hands it to Tandem's
KV transports unchanged.

Per-request parameters (SamplingParams.extra_args["kv_transfer_params"],
set only by VllmEngine, never by a client):

- ``{"tandem_export": PATH}`` (prefill): at the step where the whole prompt
  has been computed (also across chunked-prefill steps), the worker side
  gathers the prompt's blocks of every layer and writes the dense payload
  (engine.vllm.blocks) to PATH, before the step's output leaves the engine
  core; so once the frontend sees the first token, the file is complete.
- ``{"tandem_load": PATH, "tandem_tokens": N}`` (decode): the request's
  first N tokens are reported as computed externally; after vLLM allocates
  their blocks, the worker side reads PATH into them before the step's
  forward (a synchronous load), so only the tokens after the prompt are
  computed. A request that is preempted and resumed loads again.

Paths must lie in the directory named by ``kv_connector_extra_config["dir"]``.
Scheduler-side and worker-side methods run in the engine core; metadata is
the only thing that crosses between them.
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import os
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)

from engine.vllm.blocks import dense_shape, gather_dense, scatter_dense
from engine.vllm.lifeline import watch_parent

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

log = logging.getLogger(__name__)

EXPORT_KEY = "tandem_export"
LOAD_KEY = "tandem_load"
TOKENS_KEY = "tandem_tokens"
_LAYER_INDEX = re.compile(r"layers\.(\d+)\.")


@dataclass
class Transfer:
    """One request's KV copy this step: `num_tokens` positions from `start`, in `block_ids` (from position 0)."""

    request_id: str
    path: str
    num_tokens: int
    block_ids: list[int]
    start: int = 0


@dataclass
class TandemConnectorMetadata(KVConnectorMetadata):
    loads: list[Transfer] = field(default_factory=list)
    saves: list[Transfer] = field(default_factory=list)


@dataclass
class _Export:
    path: str
    prompt_len: int


class TandemConnector(KVConnectorBase_V1):
    """See the module docstring."""

    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        directory = self._kv_transfer_config.get_from_extra_config("dir", "")
        if not directory:
            raise ValueError("TandemConnector needs kv_connector_extra_config['dir']")
        self._dir = os.path.realpath(directory)
        if multiprocessing.parent_process() is not None:
            # Inside vLLM's engine-core or model-worker process (not a Tandem worker): end with the parent.
            watch_parent(orphaned_dir=self._dir)
        # Scheduler side.
        self._exports: dict[str, _Export] = {}
        self._pending_loads: list[Transfer] = []
        # Worker side.
        self._caches: list[torch.Tensor] | None = None

    # -- scheduler side ---------------------------------------------------------------------------

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        params = request.kv_transfer_params or {}
        if LOAD_KEY not in params:
            return 0, False
        tokens = int(params.get(TOKENS_KEY, 0))
        # At least the token after the imported ones is computed here: its logits are the next token's.
        tokens = min(tokens, request.num_tokens - 1)
        return max(0, tokens - num_computed_tokens), False

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        params = request.kv_transfer_params or {}
        if num_external_tokens > 0 and LOAD_KEY in params:
            end = request.num_computed_tokens + num_external_tokens
            self._pending_loads.append(Transfer(
                request.request_id, self._checked(params[LOAD_KEY]), end, list(blocks.get_block_ids()[0]),
                start=request.num_computed_tokens))
        if EXPORT_KEY in params:
            self._exports[request.request_id] = _Export(self._checked(params[EXPORT_KEY]),
                                                        len(request.prompt_token_ids or ()))

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        meta = TandemConnectorMetadata(loads=self._pending_loads)
        self._pending_loads = []
        computed = {r.req_id: r.num_computed_tokens for r in scheduler_output.scheduled_new_reqs}
        cached = scheduler_output.scheduled_cached_reqs
        computed.update(zip(cached.req_ids, cached.num_computed_tokens, strict=False))
        for request_id, export in list(self._exports.items()):
            scheduled = scheduler_output.num_scheduled_tokens.get(request_id)
            if scheduled is None or request_id not in computed:
                continue
            if computed[request_id] + scheduled < export.prompt_len:
                continue  # a chunk of a longer prompt: export when the last chunk is computed
            assert self._kv_cache_manager is not None
            block_ids = list(self._kv_cache_manager.get_block_ids(request_id)[0])
            meta.saves.append(Transfer(request_id, export.path, export.prompt_len, block_ids))
            del self._exports[request_id]
        return meta

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        self._exports.pop(request.request_id, None)
        return False, None

    # -- worker side ------------------------------------------------------------------------------

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        self._caches = _ordered(kv_caches)

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        assert isinstance(meta, TandemConnectorMetadata)
        for load in meta.loads:
            caches = self._layer_caches(forward_context)
            shape = dense_shape(caches, load.num_tokens)
            # Mapped, not read: the payload is copied once, from the page cache into the blocks.
            raw = torch.from_file(load.path, shared=True, size=math.prod(shape), dtype=caches[0].dtype)
            scatter_dense(caches, load.block_ids, raw.view(shape), start=load.start)

    def wait_for_layer_load(self, layer_name: str) -> None:
        return

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any) -> None:
        return  # whole prompts are saved at the end of the step (wait_for_save)

    def wait_for_save(self) -> None:
        meta = self._get_connector_metadata()
        assert isinstance(meta, TandemConnectorMetadata)
        for save in meta.saves:
            caches = self._layer_caches(None)
            shape = dense_shape(caches, save.num_tokens)
            staging = f"{save.path}.part"
            # The blocks are gathered straight into the file's pages (one copy); the worker maps the file.
            out = torch.from_file(staging, shared=True, size=math.prod(shape), dtype=caches[0].dtype)
            gather_dense(caches, save.block_ids, save.num_tokens, out=out.view(shape))
            del out
            os.replace(staging, save.path)  # the frontend never sees half a payload

    # -- helpers ----------------------------------------------------------------------------------

    def _checked(self, path: str) -> str:
        real = os.path.realpath(path)
        if os.path.dirname(real) != self._dir:
            raise ValueError(f"KV path {path!r} is outside the connector's directory {self._dir}")
        return real

    def _layer_caches(self, forward_context: ForwardContext | None) -> list[torch.Tensor]:
        if self._caches is None:
            if forward_context is None:
                from vllm.forward_context import get_forward_context

                forward_context = get_forward_context()
            found = {}
            for name, layer in forward_context.no_compile_layers.items():
                cache = getattr(layer, "kv_cache", None)
                if isinstance(cache, list | tuple):
                    cache = cache[0] if cache else None
                if isinstance(cache, torch.Tensor) and cache.numel():
                    found[name] = cache
            self._caches = _ordered(found)
        return self._caches


def _ordered(kv_caches: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """The layers' caches in model order (by the layer index in their names)."""
    def index(name: str) -> int:
        match = _LAYER_INDEX.search(name)
        return int(match.group(1)) if match else 0

    return [kv_caches[name] for name in sorted(kv_caches, key=index)]
