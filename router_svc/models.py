"""Which models the router can serve now, with their limits and tokenizers.

A model is servable when at least one worker in the view serves it. Its
tokenizer comes from, in order: the router's --tokenizer MODEL=PATH
settings; the ModelSpec's tokenizer (or checkpoint) directory; what the
workers' engine implies (the sim engine's byte tokenizer, the torch and vLLM
engines' built-in models, engine.builtin_models); the model name itself when it is a checkpoint
directory. Tokenizers are loaded once and cached.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from pathlib import Path

from engine.base import EngineError, Tokenizer
from router_svc.candidates import FleetView
from router_svc.validation import ModelLimits
from runtime.sampling import DEFAULT_MAX_TOKENS
from tandem.v1 import registry_pb2

log = logging.getLogger(__name__)

# The limit on max_tokens of a model whose ModelSpec sets none (--max-output-tokens).
DEFAULT_MAX_OUTPUT_TOKENS = 4096


class TokenizerUnavailable(Exception):
    """No tokenizer is known for a model; the message says how to configure one."""


def parse_tokenizer_map(text: str) -> dict[str, str]:
    """"name=path,name2=path2" -> {name: path}; ValueError naming a bad entry."""
    mapping = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--tokenizer entries are MODEL=PATH, got {item!r}")
        mapping[name] = path
    return mapping


class ModelCatalog:
    """Limits and tokenizers by model name. Used from one event loop."""

    def __init__(self, tokenizer_paths: Mapping[str, str], *,
                 default_max_output_tokens: int = DEFAULT_MAX_OUTPUT_TOKENS,
                 default_max_tokens: int = DEFAULT_MAX_TOKENS, default_context_tokens: int = 8192,
                 remember_s: float = 600.0) -> None:
        self.tokenizer_paths = dict(tokenizer_paths)
        self.remember_s = remember_s
        self._seen: dict[str, tuple[float, ModelLimits]] = {}
        self.default_max_output_tokens = default_max_output_tokens
        self.default_max_tokens = default_max_tokens
        self.default_context_tokens = default_context_tokens
        self._tokenizers: dict[str, Tokenizer] = {}

    def limits(self, fleet: FleetView, specs: Mapping[str, registry_pb2.ModelSpec],
               now: float | None = None) -> dict[str, ModelLimits]:
        """ModelLimits of every model some worker serves, has a spec, or served within `remember_s`.

        Models whose workers just vanished stay known for a while (workers
        re-register after etcd drops their leases, a fleet restarts): requests
        for them then wait for a worker and get UNAVAILABLE if none comes,
        rather than NOT_FOUND "unknown model".
        """
        now = time.monotonic() if now is None else now
        result = {}
        for model in fleet.models():
            spec = specs.get(model)
            contexts = [c.max_context_tokens for c in fleet.candidates(model)
                        if c.role.decodes and c.max_context_tokens]
            context = min(contexts) if contexts else self.default_context_tokens
            if spec is not None and spec.max_context_tokens:
                context = min(context, spec.max_context_tokens)
            max_output = (spec.max_output_tokens if spec is not None and spec.max_output_tokens
                          else self.default_max_output_tokens)
            tokenizer = self._tokenizers.get(model)
            result[model] = ModelLimits(
                name=model, max_context_tokens=context, max_output_tokens=max(1, min(max_output, context - 1)),
                default_max_tokens=self.default_max_tokens,
                vocab_size=tokenizer.vocab_size if tokenizer is not None else 0)
            self._seen[model] = (now, result[model])
        for model, (seen_at, limits) in list(self._seen.items()):
            if model in result:
                continue
            if now - seen_at <= self.remember_s or model in specs:
                result[model] = limits
            else:
                del self._seen[model]
        return result

    @property
    def loaded_tokenizers(self) -> int:
        """How many tokenizers are loaded (limits carry their vocabulary sizes)."""
        return len(self._tokenizers)

    def tokenizer(self, model: str, spec: registry_pb2.ModelSpec | None,
                  worker: registry_pb2.WorkerRecord | None) -> Tokenizer:
        """The model's tokenizer (loaded once); TokenizerUnavailable says how to configure one."""
        cached = self._tokenizers.get(model)
        if cached is not None:
            return cached
        tokenizer = self._load(model, spec, worker)
        self._tokenizers[model] = tokenizer
        return tokenizer

    def _load(self, model: str, spec: registry_pb2.ModelSpec | None,
              worker: registry_pb2.WorkerRecord | None) -> Tokenizer:
        from engine.hf_tokenizer import load_tokenizer

        candidates = []
        if model in self.tokenizer_paths:
            candidates.append(self.tokenizer_paths[model])
        if spec is not None:
            candidates += [p for p in (spec.tokenizer, spec.checkpoint) if p]
        for path in candidates:
            if (Path(path) / "tokenizer.json").is_file():
                try:
                    return load_tokenizer(path)
                except EngineError as exc:
                    raise TokenizerUnavailable(f"tokenizer of model {model!r} at {path}: {exc}") from None
        engine = worker.engine if worker is not None else ""
        if engine == "sim":
            from engine.byte_tokenizer import ByteTokenizer

            return ByteTokenizer()
        if engine in ("torch", "vllm"):  # smollm2-135m is one checkpoint for both engines
            from engine import builtin_models

            if builtin_models.is_builtin(model):
                # The workers' cache (TANDEM_CACHE_DIR) holds it already, converted on their first start.
                try:
                    checkpoint = builtin_models.resolve(model)
                except EngineError as exc:
                    raise TokenizerUnavailable(f"tokenizer of built-in model {model!r}: {exc}") from None
                assert checkpoint is not None
                return load_tokenizer(checkpoint)
        if (Path(model) / "tokenizer.json").is_file():
            return load_tokenizer(model)
        raise TokenizerUnavailable(
            f"no tokenizer known for model {model!r}: start the router with --tokenizer {model}=/path/to/checkpoint "
            f"or set the model spec's tokenizer (tandemctl models put {model} --tokenizer PATH)")
