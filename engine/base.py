"""The Engine interface: what prefill and decode services drive.

Lifecycle (numbered; each engine documents any extra guarantees):

1. ``create_engine(name, config)`` builds the object: cheap, no model loaded.
2. ``await engine.start()`` loads weights and tokenizer, sizes the KV cache.
   Called once. Raises ``EngineError`` with a message a person can act on.
3. Work, any number of times, concurrently from many asyncio tasks:
   - ``await engine.prefill(request)``: compute the prompt's KV cache and the
     first token; returns a ``PrefillResult`` whose ``kv`` is an exported,
     self-contained ``KvBlob`` that another worker of the same model can
     import.
   - ``engine.decode(request)``: an async iterator of token-id batches for
     one sequence. The request carries the imported ``KvBlob`` and the first
     token, or no blob (prefill locally). Closing the iterator early (the
     consumer cancels) frees the sequence's KV at once.
   - ``engine.stats()``: a snapshot for load reports; cheap, never blocks.
   - ``engine.model_shape``: the loaded model's size and KV footprint
     (``ModelShape``), published in the worker's registry record so the
     router prices work on this model, not on a default one.
4. ``await engine.close()``: frees everything. Safe to call twice, and on an
   engine whose start() failed half way.

Model work must not block the event loop: engines run it in a worker thread
(or elsewhere) so the service keeps answering health checks and
cancellations under load.

Determinism: greedy output is a pure function of the prompt; seeded sampling
draws the token at absolute position p from a generator seeded by (seed, p),
so a sequence resumed elsewhere (DecodeRequest.generated) continues exactly.
Disaggregated output (prefill here, decode there) must equal unified output
token for token.
"""

from __future__ import annotations

import abc
import dataclasses
import importlib
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

# Requests carry these shared value types; they are part of the Engine interface.
from runtime.sampling import FinishReason, InvalidRequest, Sampling  # noqa: F401

if TYPE_CHECKING:
    from engine.chat_template import ChatTemplate
    from engine.kv_events import KvEventLog


class EngineError(RuntimeError):
    """A failure of the engine itself (load failed, out of memory...)."""


class KvMismatch(ValueError):
    """A KV blob of another model or layout was offered for import."""


class CapacityExhausted(RuntimeError):
    """No KV blocks or batch slots now; the caller may retry elsewhere or later."""


@dataclass(frozen=True)
class KvLayoutSpec:
    """Shape of an engine's KV cache (mirrors tandem.v1.KvLayout). Equal specs import."""

    model_fingerprint: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str
    block_size: int = 0

    def check_compatible(self, other: KvLayoutSpec) -> None:
        """Raises KvMismatch naming the first differing field."""
        for f in dataclasses.fields(self):
            mine, theirs = getattr(self, f.name), getattr(other, f.name)
            if mine != theirs:
                raise KvMismatch(f"KV {f.name} differs: this worker has {mine!r}, the handle has {theirs!r}")


@dataclass
class KvBlob:
    """An exported KV cache: the payload bytes of `num_tokens` positions in `layout`.

    `data` is a contiguous buffer (bytes, bytearray or memoryview) that the
    KV transports move as is; its format is the engine's, described by
    `layout`. Engines may carry extra parameters (a vLLM connector's
    transfer params) in `params`.
    """

    layout: KvLayoutSpec
    num_tokens: int
    data: bytes | bytearray | memoryview
    params: dict[str, str] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return len(self.data) if not isinstance(self.data, memoryview) else self.data.nbytes


@dataclass(frozen=True)
class EngineConfig:
    """Settings every engine understands; each engine documents which it uses."""

    # Checkpoint directory (Hugging Face format), or a built-in name: "tiny"
    # for the torch engine, a model profile ("llama-3-8b") for the sim engine.
    model: str = "tiny"
    # Name the model is served under (ModelSpec.name); defaults to `model`.
    served_name: str = ""
    device: str = "cpu"
    dtype: str = "float32"
    # GPU catalog id of the GPUs this engine runs on (sim timing; reported by all).
    gpu_type: str = ""
    gpu_count: int = 1
    max_batch_size: int = 16
    # 0: the model's own limit.
    max_context_tokens: int = 0
    # KV cache size in blocks; 0: sized from the memory left after weights.
    kv_blocks: int = 0
    kv_block_size: int = 16
    # Sim engine: divide every simulated duration by this.
    speedup: float = 1.0
    # Where built-in models ("tiny") are saved in Hugging Face format.
    cache_dir: str = ""
    seed: int = 0
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.served_name or self.model


@dataclass(frozen=True)
class PrefillRequest:
    request_id: str
    prompt: tuple[int, ...]
    sampling: Sampling


@dataclass
class PrefillResult:
    first_token: int
    # None when generation ended with the first token: nothing to decode.
    kv: KvBlob | None
    finish_reason: str | None
    cached_tokens: int = 0
    queue_s: float = 0.0
    prefill_s: float = 0.0


@dataclass(frozen=True)
class DecodeRequest:
    """One sequence to decode.

    With `kv`: `kv` covers `prompt`, `first_token` follows it. Without `kv`:
    the engine prefills `prompt` locally (and yields the first token as part
    of the stream). `generated` are tokens already delivered by an earlier
    worker (migration): the engine rebuilds their KV and continues after them;
    they count against max_tokens and are not yielded again.
    """

    request_id: str
    prompt: tuple[int, ...]
    sampling: Sampling
    kv: KvBlob | None = None
    first_token: int | None = None
    generated: tuple[int, ...] = ()


@dataclass
class DecodeStep:
    """Tokens produced by one engine step for one sequence; `finish_reason` on the last."""

    token_ids: list[int]
    finish_reason: str | None = None
    # Set on the first step: time spent importing KV or prefilling locally.
    prefill_s: float = 0.0
    queue_s: float = 0.0


@dataclass(frozen=True)
class ModelShape:
    """What a router needs to price work of the loaded model (mirrors tandem.v1.ModelShape).

    Computed by the engine from what it loaded, never declared by an operator.
    """

    # Every parameter: embeddings and all experts included.
    total_params: float
    # Parameters doing matmul work for one token: no input embedding table, only the routed experts.
    active_params: float
    # Bytes the weights occupy in device memory, all GPUs together.
    weight_bytes: float
    # K and V of one token over every layer: 2 * num_layers * num_kv_heads * head_dim * dtype bytes.
    kv_bytes_per_token: int
    num_layers: int
    num_kv_heads: int
    head_dim: int


@dataclass(frozen=True)
class EngineStats:
    queued_prefill_tokens: int = 0
    active_requests: int = 0
    active_sequences: int = 0
    kv_blocks_used: int = 0
    kv_blocks_total: int = 0
    kv_block_size: int = 0
    max_batch_size: int = 0
    prefix_cache_hit_rate: float = 0.0


class Tokenizer(abc.ABC):
    """Text <-> token ids for one model."""

    @property
    @abc.abstractmethod
    def eos_token_id(self) -> int | None: ...

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int: ...

    @abc.abstractmethod
    def encode(self, text: str) -> list[int]: ...

    @abc.abstractmethod
    def decode(self, token_ids: list[int]) -> str:
        """Text of the ids; an incomplete trailing UTF-8 character decodes as U+FFFD."""

    @property
    def chat_template(self) -> ChatTemplate | None:
        """The model's chat template (engine.chat_template), or None when it has none."""
        return None

    def encode_rendered_chat(self, text: str) -> list[int]:
        """Ids of a rendered chat prompt: the template wrote the special tokens, so none are added."""
        return self.encode(text)


class Engine(abc.ABC):
    """One model on one GPU set (or CPU). See the module docstring for the lifecycle."""

    name: ClassVar[str]
    # Whether one loaded engine serves both prefill() (exporting KV) and decode() (importing it), so its
    # worker can switch role live. True for an engine that follows this interface; one whose load fixes a
    # single role (a KV connector configured producer-only or consumer-only) says False, and its worker
    # refuses role intents.
    serves_both_roles: ClassVar[bool] = True

    @abc.abstractmethod
    async def start(self) -> None: ...

    @property
    @abc.abstractmethod
    def model_name(self) -> str: ...

    @property
    @abc.abstractmethod
    def layout(self) -> KvLayoutSpec: ...

    @property
    @abc.abstractmethod
    def tokenizer(self) -> Tokenizer: ...

    @property
    @abc.abstractmethod
    def max_context_tokens(self) -> int: ...

    @abc.abstractmethod
    async def prefill(self, request: PrefillRequest) -> PrefillResult: ...

    @abc.abstractmethod
    def decode(self, request: DecodeRequest) -> AsyncGenerator[DecodeStep, None]: ...

    @abc.abstractmethod
    def stats(self) -> EngineStats: ...

    @property
    def model_shape(self) -> ModelShape | None:
        """The loaded model's shape, once start() has returned; None: unknown (the router assumes a default)."""
        return None

    def kv_events(self) -> KvEventLog | None:
        """The prefix cache's stored/evicted block hashes (engine.kv_events), once start() has returned;
        None: no prefix cache to publish (routers then price this worker's prefills as before)."""
        return None

    @abc.abstractmethod
    async def close(self) -> None: ...


# Engines register by name and import lazily, so a worker on the sim engine
# never imports torch, and one without vllm installed can still start.
_ENGINES: dict[str, str] = {
    "torch": "engine.torch_engine:TorchEngine",
    "sim": "engine.sim:SimEngine",
    "vllm": "engine.vllm.engine:VllmEngine",
}


def register_engine(name: str, target: str) -> None:
    """Register `module:Class` under `name` (plugins; tests)."""
    _ENGINES[name] = target


def engine_names() -> list[str]:
    return sorted(_ENGINES)


def create_engine(name: str, config: EngineConfig) -> Engine:
    """A new, not yet started engine of the registered kind `name`."""
    return engine_class(name)(config)


def engine_class(name: str) -> Callable[..., Engine]:
    """The Engine class registered as `name`; EngineError names the known ones."""
    try:
        target = _ENGINES[name]
    except KeyError:
        raise EngineError(f"unknown engine {name!r}; known: {', '.join(engine_names())}") from None
    module_name, _, class_name = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise EngineError(f"engine {name!r} is not installed here ({exc}); see the README's extras") from exc
    return getattr(module, class_name)
