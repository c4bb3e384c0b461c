"""What the engines that load a Hugging Face checkpoint share: accessors and request checks.

`CheckpointEngine` is an Engine whose start() loads a checkpoint and fills
in its tokenizer (Tandem's, engine.hf_tokenizer), KV layout, model shape,
context limit and vocabulary size; the torch and vLLM engines derive from
it. It answers the loaded-model accessors (EngineError before start()) and
validates prompts and decode requests the same way for both, so a request
is refused with the same message whichever engine serves it.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

from engine.base import (
    DecodeRequest,
    Engine,
    EngineConfig,
    EngineError,
    InvalidRequest,
    KvLayoutSpec,
    ModelShape,
    Sampling,
    Tokenizer,
)
from engine.hf_tokenizer import HfTokenizer


class CheckpointEngine(Engine):
    """An Engine over a loaded checkpoint. Subclasses set the loaded fields in start()."""

    def __init__(self, config: EngineConfig) -> None:
        self._config = config
        self._tokenizer: HfTokenizer | None = None
        self._layout: KvLayoutSpec | None = None
        self._shape: ModelShape | None = None
        self._max_context = 0
        self._vocab_size = 0
        self._ids = itertools.count(1)
        self._closed = False
        # The checkpoint directory loaded (a built-in name resolved), once start() has run.
        self.checkpoint: Path | None = None

    # -- properties -------------------------------------------------------------------------------

    @property
    def model_name(self) -> str:
        return self._config.name

    @property
    def layout(self) -> KvLayoutSpec:
        return self._require(self._layout, "layout")

    @property
    def model_shape(self) -> ModelShape:
        return self._require(self._shape, "model")

    @property
    def tokenizer(self) -> Tokenizer:
        return self._require(self._tokenizer, "tokenizer")

    @property
    def max_context_tokens(self) -> int:
        return self._max_context

    # -- checks -----------------------------------------------------------------------------------

    def _check_prompt(self, prompt: tuple[int, ...], known: tuple[int, ...]) -> None:
        """InvalidRequest unless `prompt` (non-empty) and the `known` tokens after it are in the vocabulary
        and leave room for one more token within the context limit."""
        if not prompt:
            raise InvalidRequest("prompt must have at least 1 token, got 0")
        bad = next((t for t in (*prompt, *known) if not 0 <= t < self._vocab_size), None)
        if bad is not None:
            raise InvalidRequest(f"token ids must be 0..{self._vocab_size - 1}, got {bad}")
        total = len(prompt) + len(known)
        if total >= self._max_context:
            raise InvalidRequest(
                f"prompt plus generated tokens must be under the context limit of {self._max_context}, got {total}"
            )

    def _check_decode(self, request: DecodeRequest) -> tuple[int, ...]:
        """Tokens after the prompt already chosen (first_token, then generated).

        InvalidRequest on inconsistent fields; KvMismatch when the KV's layout is not this engine's.
        """
        known = request.generated
        if request.kv is not None:
            if request.kv.num_tokens != len(request.prompt):
                raise InvalidRequest(
                    f"kv covers {request.kv.num_tokens} tokens but the prompt has {len(request.prompt)}"
                )
            if request.first_token is None and not known:
                raise InvalidRequest("first_token is required with kv")
            if request.first_token is not None and known and known[0] != request.first_token:
                raise InvalidRequest("generated must start with first_token when both are given")
            self.layout.check_compatible(request.kv.layout)
        if request.first_token is not None and not known:
            known = (request.first_token,)
        self._check_prompt(request.prompt, known)
        return known

    def _rule(self, sampling: Sampling, generated_before: tuple[int, ...]) -> Any:
        """The StopRule (engine.torch_sampling) deciding when a sequence with these sampling settings ends."""
        from engine.torch_sampling import StopRule

        tokenizer = self._require(self._tokenizer, "tokenizer")
        return StopRule(sampling, eos_token_id=tokenizer.eos_token_id, max_context_tokens=self._max_context,
                        decode=tokenizer.decode, generated_before=generated_before)

    def _require(self, value: Any, what: str) -> Any:
        if value is None:
            raise EngineError(f"the {self.name} engine's {what} is not loaded: call start() first")
        return value
