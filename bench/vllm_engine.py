"""vLLM engine throughput, unified vs disaggregated, and the KV export/import paths against memcpy.

(Not named vllm.py: run as a script, that name would shadow the vllm package.)

    .venv/bin/python bench/vllm_engine.py [--quick] [--model tiny-vllm|smollm2-135m|DIR] [--prompt 256]
                                          [--tokens 64] [--question-only]

One VllmEngine (engine.vllm) on `--model` (default the tiny vLLM model,
engine.vllm.tiny_model), in this process; its engine core runs in its own
process as on a worker.

- start: seconds from start() to a ready engine (model built or converted
  beforehand, outside the timing);
- question: one chat-templated greedy answer to "What is the capital of
  France?" (up to 32 tokens), its seconds and its text (noise on tiny-vllm,
  real text on smollm2-135m). `--question-only` stops there.

- unified: decode() without KV prefills locally and decodes;
- disaggregated: prefill() (one token, the prompt's KV exported from vLLM's
  blocks into a KvBlob), then decode() of that blob (imported into the
  blocks vLLM allocated). Both roles run on the same engine one after the
  other, and the blob passes in memory: transports are bench/kv_transfer.py.

Prefill tokens/s: prompt tokens over the wall time to the first token of
all `batch` requests sent together. Decode tokens/s: tokens after each
stream's first step, over the wall time from the earliest first step to the
last step (unified streams still prefill their neighbours meanwhile).

KV paths (the code the connector and the engine run, on a vLLM-shaped CPU
cache of an 8B-like model, 32 layers x 8 KV heads x 128 dims, float32):
export = gather the blocks of every layer straight into the pages of a
RAM-backed file, map it in the worker and touch every page; import = write
the blob to a file, map it, scatter it into the blocks. Baseline: memcpy
of the same number of bytes (torch copy_ between two preallocated buffers),
measured in the same run; the ratio is printed last. Every figure is the
best of `--repeat` runs. Not a pass/fail test.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "protos"))

from bench._common import print_header

GB = 1e9


async def _run_engine(args: argparse.Namespace) -> dict[str, float]:
    from engine.base import DecodeRequest, EngineConfig, PrefillRequest, Sampling, create_engine
    from engine.vllm.models import resolve_vllm_model

    resolve_vllm_model(args.model)  # build or convert outside the timing
    # tiny-vllm's KV is small enough for 2048 blocks; a real model's comes from VLLM_CPU_KVCACHE_SPACE.
    engine = create_engine("vllm", EngineConfig(model=args.model, kv_block_size=32, max_batch_size=16,
                                                max_context_tokens=4096,
                                                kv_blocks=2048 if args.model == "tiny-vllm" else 0))
    started = time.perf_counter()
    await engine.start()
    results: dict[str, float] = {"start_s": time.perf_counter() - started}
    print(f"engine started in {results['start_s']:.1f} s", file=sys.stderr, flush=True)
    results["question_s"], answer = await _question(engine)
    print(f"answer: {answer!r}", flush=True)
    if args.question_only:
        await engine.close()
        return results
    sampling = Sampling(max_tokens=args.tokens, ignore_eos=True)

    def prompt(i: int) -> tuple[int, ...]:
        return tuple((j * 7 + i * 13) % 500 + 1 for j in range(args.prompt))

    async def stream(i: int, kv: object = None, first: int | None = None) -> tuple[float, float, int]:
        """(time of the first step, of the last step, tokens after the first step's), absolute."""
        first_at = last_at = 0.0
        count = 0
        async for step in engine.decode(DecodeRequest(f"b{i}", prompt(i), sampling, kv=kv,  # type: ignore[arg-type]
                                                      first_token=first)):
            now = time.perf_counter()
            if not first_at:
                first_at = now
                count -= 1 if first is None else 0  # the first step of a unified stream holds the prompt's token
            last_at = now
            count += len(step.token_ids)
        return first_at, last_at, count

    for batch in args.batches:
        await asyncio.gather(*(stream(i) for i in range(batch)))  # warm-up at this batch size
        for _ in range(args.repeat):  # best of `repeat`: single runs on a shared 2-core VM stall at random
            t0 = time.perf_counter()
            unified = await asyncio.gather(*(stream(i) for i in range(batch)))
            _best(results, f"unified prefill b{batch}", batch * args.prompt / (max(r[0] for r in unified) - t0))
            _best(results, f"unified decode b{batch}", _decode_rate(unified))
            t0 = time.perf_counter()
            prefills = await asyncio.gather(*(engine.prefill(PrefillRequest(f"p{i}", prompt(i), sampling))
                                              for i in range(batch)))
            _best(results, f"disagg prefill b{batch}", batch * args.prompt / (time.perf_counter() - t0))
            split = await asyncio.gather(*(stream(i, p.kv, p.first_token) for i, p in enumerate(prefills)))
            _best(results, f"disagg decode b{batch}", _decode_rate(split))
        print(f"  measured batch {batch}", file=sys.stderr, flush=True)
    await engine.close()
    return results


async def _question(engine: Any) -> tuple[float, str]:
    """Seconds and text of one chat-templated greedy answer (unified), the tokens decoded as they come."""
    from engine.base import DecodeRequest, Sampling
    from engine.chat_template import ChatMessage

    tokenizer = engine.tokenizer
    prompt = tokenizer.encode_rendered_chat(tokenizer.chat_template.render(
        [ChatMessage("user", "What is the capital of France?")]))
    tokens: list[int] = []
    started = time.perf_counter()
    async for step in engine.decode(DecodeRequest("question", tuple(prompt), Sampling.create(max_tokens=32))):
        tokens.extend(step.token_ids)
    return time.perf_counter() - started, tokenizer.decode(tokens)


def _best(results: dict[str, float], key: str, rate: float) -> None:
    results[key] = max(results.get(key, 0.0), rate)


def _decode_rate(streams: list[tuple[float, float, int]]) -> float:
    """Tokens after each stream's first step, over the wall time from the earliest first step to the last step."""
    return sum(s[2] for s in streams) / (max(s[1] for s in streams) - min(s[0] for s in streams))


def _kv_paths(tokens: int, repeat: int) -> dict[str, float]:
    import math

    import torch

    from engine.base import KvBlob, KvLayoutSpec
    from engine.vllm.blocks import dense_shape, gather_dense, scatter_dense
    from engine.vllm.engine import _take_file

    layers, heads, dim, block = 32, 8, 128, 32
    blocks = -(-tokens // block)
    caches = [torch.randn(blocks * 2, heads, block, 2 * dim) for _ in range(layers)]
    block_ids = list(range(1, 2 * blocks, 2))  # every other block: a real sequence's blocks are scattered
    shape = dense_shape(caches, tokens)
    nbytes = math.prod(shape) * 4
    source, target = torch.empty(nbytes // 4), torch.empty(nbytes // 4)
    source.normal_()
    directory = Path(tempfile.mkdtemp(dir="/dev/shm" if Path("/dev/shm").is_dir() else None))
    best = {"memcpy": float("inf"), "export": float("inf"), "import": float("inf")}
    for _ in range(repeat):
        t0 = time.perf_counter()
        target.copy_(source)
        best["memcpy"] = min(best["memcpy"], time.perf_counter() - t0)
        # Export, as the connector and the engine run it: gather into the file's pages, map it in the worker.
        t0 = time.perf_counter()
        staging, path = directory / "out.part", directory / "out"
        out = torch.from_file(str(staging), shared=True, size=math.prod(shape), dtype=torch.float32)
        gather_dense(caches, block_ids, tokens, out=out.view(shape))
        del out
        os.replace(staging, path)
        view = _take_file(path)
        view.cast("B")[::4096].tobytes()  # touch every page, as a transport reading it would
        best["export"] = min(best["export"], time.perf_counter() - t0)
        blob = KvBlob(KvLayoutSpec("bench", layers, heads, dim, "float32", block), tokens, view)
        # Import: the worker writes the blob to a file, the connector maps it and scatters it into the blocks.
        t0 = time.perf_counter()
        path = directory / "in"
        with path.open("wb") as handle:
            handle.write(blob.data)
        mapped = torch.from_file(str(path), shared=True, size=math.prod(shape), dtype=torch.float32)
        scatter_dense(caches, block_ids, mapped.view(shape))
        del mapped
        path.unlink()
        best["import"] = min(best["import"], time.perf_counter() - t0)
    os.rmdir(directory)
    return {name: nbytes / seconds / GB for name, seconds in best.items()} | {"bytes": float(nbytes)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller prompts, fewer tokens and repeats")
    parser.add_argument("--model", default="tiny-vllm", help="a built-in name (engine.vllm.models) or a checkpoint")
    parser.add_argument("--question-only", action="store_true", help="start time and one answer; no throughput")
    parser.add_argument("--prompt", type=int, default=256, help="prompt tokens per request")
    parser.add_argument("--tokens", type=int, default=64, help="max_tokens per request")
    parser.add_argument("--kv-tokens", type=int, default=2048, help="tokens of the KV payload timed (8B-like shape)")
    parser.add_argument("--repeat", type=int, default=5, help="runs per measurement; the best is printed")
    args = parser.parse_args()
    if args.quick:
        args.prompt, args.tokens, args.kv_tokens, args.repeat = 128, 32, 512, 2
    args.batches = (1, 16)
    print_header("vLLM engine: unified vs disaggregated, KV export/import vs memcpy")
    engine = asyncio.run(_run_engine(args))
    print(f"{args.model}: engine start {engine['start_s']:.1f} s, one chat answer (<= 32 tokens, greedy) "
          f"{engine['question_s']:.2f} s")
    if args.question_only:
        return
    paths = _kv_paths(args.kv_tokens, args.repeat)
    print(f"{args.model} model, prompt {args.prompt} tokens, {args.tokens} tokens out, one engine (CPU), "
          f"best of {args.repeat}")
    print(f"{'tokens/s':<10}{'unified':>12}{'disagg':>12}{'ratio':>8}")
    for kind in ("prefill", "decode"):
        for batch in args.batches:
            u, d = engine[f"unified {kind} b{batch}"], engine[f"disagg {kind} b{batch}"]
            print(f"{kind} b{batch:<4}{u:>12.0f}{d:>12.0f}{d / u:>8.2f}")
    print()
    print(f"KV paths, {args.kv_tokens} tokens of a 32-layer 8x128 float32 cache ({paths['bytes'] / 2**20:.0f} MiB):")
    for name in ("memcpy", "export", "import"):
        print(f"  {name:<8}{paths[name]:>8.2f} GB/s")
    print(f"export vs memcpy: {paths['export'] / paths['memcpy']:.0%}; "
          f"import vs memcpy: {paths['import'] / paths['memcpy']:.0%}")


if __name__ == "__main__":
    main()
