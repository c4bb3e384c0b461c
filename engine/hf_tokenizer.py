"""A Tokenizer over a Hugging Face tokenizer directory, without torch or transformers.

The router imports this to tokenize prompts and detokenize output, so it
depends only on the `tokenizers` library and reads `tokenizer.json` plus the
special-token names from `tokenizer_config.json` (or the EOS id from
`config.json` / `generation_config.json`).

`HfTokenizer` is immutable after load and safe to use from many threads.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from engine.base import EngineError, Tokenizer
from engine.chat_template import ChatTemplate, load_chat_template
from engine.checkpoint_files import read_json_object, token_text


class HfTokenizer(Tokenizer):
    """Text <-> ids with a `tokenizers.Tokenizer`; special tokens are skipped when decoding."""

    def __init__(self, backend: Any, eos_token_id: int | None, add_special_tokens: bool = True,
                 chat_template: ChatTemplate | None = None) -> None:
        self._backend = backend
        self._eos = eos_token_id
        self._add_special = add_special_tokens
        self._chat_template = chat_template

    @property
    def chat_template(self) -> ChatTemplate | None:
        return self._chat_template

    def encode_rendered_chat(self, text: str) -> list[int]:
        return list(self._backend.encode(text, add_special_tokens=False).ids)

    @property
    def eos_token_id(self) -> int | None:
        return self._eos

    @property
    def vocab_size(self) -> int:
        return int(self._backend.get_vocab_size(with_added_tokens=True))

    def encode(self, text: str) -> list[int]:
        """Ids of `text`, with the model's BOS (post-processor) if its tokenizer adds one."""
        return list(self._backend.encode(text, add_special_tokens=self._add_special).ids)

    def decode(self, token_ids: list[int]) -> str:
        """Text of the ids; an incomplete trailing UTF-8 character decodes as U+FFFD."""
        return str(self._backend.decode(list(token_ids), skip_special_tokens=True))

    def token_to_id(self, token: str) -> int | None:
        value = self._backend.token_to_id(token)
        return None if value is None else int(value)


def load_tokenizer(path: str | os.PathLike[str]) -> HfTokenizer:
    """The tokenizer of the checkpoint directory `path`; EngineError names what is missing."""
    from tokenizers import Tokenizer as Backend

    directory = Path(path)
    tokenizer_file = directory / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise EngineError(f"no tokenizer.json in {directory}; a fast (tokenizers) tokenizer file is required")
    try:
        backend = Backend.from_file(str(tokenizer_file))
    except Exception as exc:
        raise EngineError(f"cannot load {tokenizer_file}: {exc}") from exc
    try:
        template = load_chat_template(directory)
    except ValueError as exc:
        raise EngineError(f"{directory}: {exc}") from exc
    return HfTokenizer(backend, _eos_id(directory, backend), chat_template=template)


def _eos_id(directory: Path, backend: Any) -> int | None:
    token = token_text(read_json_object(directory / "tokenizer_config.json").get("eos_token"))
    if token:
        value = backend.token_to_id(token)
        if value is not None:
            return int(value)
    for name in ("generation_config.json", "config.json"):
        eos = read_json_object(directory / name).get("eos_token_id")
        if isinstance(eos, list):
            eos = eos[0] if eos else None
        if isinstance(eos, int):
            return eos
    return None

