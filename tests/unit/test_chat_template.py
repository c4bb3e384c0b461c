"""Chat templates: rendered the way the checkpoint defines them, refused with a clear InvalidRequest."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine.chat_template import ChatMessage, ChatTemplate, load_chat_template
from engine.tiny_model import CHAT_TEMPLATE
from runtime.sampling import InvalidRequest

SYSTEM_DEFAULT = (
    "{% if messages[0]['role'] != 'system' %}{{ bos_token }}system: be brief\n{% endif %}"
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def test_chatml_renders_every_turn_and_the_generation_prompt() -> None:
    template = ChatTemplate(CHAT_TEMPLATE)
    text = template.render([ChatMessage("system", "Be brief."), ChatMessage("user", "Hi ✨")])
    assert text == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi ✨<|im_end|>\n<|im_start|>assistant\n"
    assert not template.render([ChatMessage("user", "x")], add_generation_prompt=False).endswith("assistant\n")


def test_bos_and_eos_tokens_reach_the_template() -> None:
    template = ChatTemplate(SYSTEM_DEFAULT, bos_token="<s>", eos_token="</s>")
    assert template.render([ChatMessage("user", "hi")]) == "<s>system: be brief\nuser: hi</s>\nassistant:"


def test_unknown_roles_and_empty_chats_are_invalid_requests() -> None:
    template = ChatTemplate(CHAT_TEMPLATE)
    with pytest.raises(InvalidRequest, match=r"messages\[1\]\.role must be one of"):
        template.render([ChatMessage("user", "a"), ChatMessage("wizard", "b")])
    with pytest.raises(InvalidRequest, match="messages is empty"):
        template.render([])


def test_a_template_that_raises_becomes_an_invalid_request() -> None:
    template = ChatTemplate("{% if messages[-1]['role'] != 'user' %}{{ raise_exception('last turn must be the user') }}"
                            "{% endif %}ok")
    assert template.render([ChatMessage("user", "a")]) == "ok"
    with pytest.raises(InvalidRequest, match="last turn must be the user"):
        template.render([ChatMessage("assistant", "a")])


def test_the_sandbox_refuses_python_internals() -> None:
    template = ChatTemplate("{{ messages.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(InvalidRequest, match="refused"):
        template.render([ChatMessage("user", "a")])


def test_loaded_from_tokenizer_config_a_named_list_or_a_jinja_file(tmp_path: Path) -> None:
    plain, named, jinja, none = (tmp_path / name for name in ("plain", "named", "jinja", "none"))
    for directory in (plain, named, jinja, none):
        directory.mkdir()
    (plain / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE, "eos_token": "E"}))
    (named / "tokenizer_config.json").write_text(json.dumps({"chat_template": [
        {"name": "tool_use", "template": "tools"}, {"name": "default", "template": CHAT_TEMPLATE}]}))
    (jinja / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "E"}}))
    (jinja / "chat_template.jinja").write_text(SYSTEM_DEFAULT)
    (none / "tokenizer_config.json").write_text("{}")
    messages = [ChatMessage("user", "hi")]
    for directory in (plain, named):
        loaded = load_chat_template(directory)
        assert loaded is not None and loaded.render(messages) == ChatTemplate(CHAT_TEMPLATE).render(messages)
    from_file = load_chat_template(jinja)
    assert from_file is not None and from_file.render(messages) == "system: be brief\nuser: hiE\nassistant:"
    assert load_chat_template(none) is None


def test_a_template_that_does_not_compile_is_named_at_load(tmp_path: Path) -> None:
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{% for %}"}))
    with pytest.raises(ValueError, match="chat template does not compile"):
        load_chat_template(tmp_path)
