"""Chat messages -> prompt text with a checkpoint's own chat template (Jinja, as Hugging Face defines it).

The template comes from the checkpoint: `chat_template` in
tokenizer_config.json (a string, or a list of named templates of which
"default" is used), else a `chat_template.jinja` file. It is rendered in a
sandbox (no attribute access to Python internals), with the variables
templates expect: `messages`, `add_generation_prompt`, `bos_token`,
`eos_token`, `raise_exception`, `strftime_now`.

`ChatTemplate` is immutable after load and safe to use from many threads.
Rendering a hostile template can raise or produce any text, never run code.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from engine.checkpoint_files import read_json_object, token_text
from runtime.sampling import InvalidRequest

ROLES = ("system", "user", "assistant", "tool", "developer")


@dataclass(frozen=True)
class ChatMessage:
    role: str
    content: str


class ChatTemplate:
    """One compiled template. `render()` raises InvalidRequest for messages the template refuses."""

    def __init__(self, source: str, *, bos_token: str = "", eos_token: str = "") -> None:
        from jinja2.exceptions import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        # trim_blocks/lstrip_blocks: the settings the templates are written for.
        environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        environment.globals["raise_exception"] = _raise_exception
        environment.globals["strftime_now"] = _strftime_now
        try:
            self._template = environment.from_string(source)
        except TemplateError as exc:
            raise ValueError(f"chat template does not compile: {exc}") from exc
        self.source = source
        self.bos_token = bos_token
        self.eos_token = eos_token

    def render(self, messages: Sequence[ChatMessage], *, add_generation_prompt: bool = True) -> str:
        from jinja2.exceptions import TemplateError

        if not messages:
            raise InvalidRequest("messages is empty: send at least one message")
        for i, message in enumerate(messages):
            if message.role not in ROLES:
                raise InvalidRequest(f"messages[{i}].role must be one of {', '.join(ROLES)}, got {message.role!r}")
        try:
            return self._template.render(
                messages=[{"role": m.role, "content": m.content} for m in messages],
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token, eos_token=self.eos_token)
        except InvalidRequest:
            raise
        except TemplateError as exc:
            raise InvalidRequest(f"the model's chat template refused these messages: {exc}") from None


def load_chat_template(directory: Path) -> ChatTemplate | None:
    """The checkpoint's chat template, or None when it has none. ValueError when it does not compile."""
    config = read_json_object(directory / "tokenizer_config.json")
    source = config.get("chat_template")
    if isinstance(source, list):  # named templates: [{"name": "default", "template": "..."}, ...]
        named = {item.get("name"): item.get("template") for item in source if isinstance(item, Mapping)}
        source = named.get("default")
    if not isinstance(source, str) or not source:
        jinja = directory / "chat_template.jinja"
        source = jinja.read_text() if jinja.is_file() else None
    if not source:
        return None
    return ChatTemplate(source, bos_token=token_text(config.get("bos_token")),
                        eos_token=token_text(config.get("eos_token")))


def _raise_exception(message: str) -> None:
    raise InvalidRequest(f"the model's chat template refused these messages: {message}")


def _strftime_now(fmt: str) -> str:
    return datetime.datetime.now().strftime(fmt)

