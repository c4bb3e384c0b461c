"""Measure engine step times on a real GPU and write them as step-model rows to refit with.

    .venv/bin/python bench/gpu/measure_steps.py --model /models/Meta-Llama-3-8B --profile llama-3-8b \
        --out /tmp/steps.toml [--gpu-type H100-SXM] [--dtype bfloat16] [--repeats 5]

Loads the checkpoint the way the torch engine does (engine.torch_loader) and
times, with CUDA events around synchronised forward passes:

- prefill steps: one prompt of n tokens from scratch (n = 128 ... 8192);
- decode steps: `batch` sequences each holding `context` cached tokens,
  one new token each (batch 1 ... 64, context 512 ... 4096).

Each timing is the median of `--repeats` runs after a warm-up. The rows go
to `--out` in the format of runtime/data/published_perf.toml (kind
"step_ms", engine "tandem-torch", with a [sources] entry naming this
script, the GPU, the date and the settings); append them to that file and
refit with bench/calibrate_costmodel.py --write (docs/costmodel.md).

What it cannot measure: the torch engine runs a prompt and a decode batch
in separate forward passes, so mixed steps (prefill-decode interference)
need an engine with chunked prefill (vLLM's max_num_batched_tokens).
Single GPU only (tp = 1). `--profile` names the sim profile whose shape the
checkpoint has; the fit computes FLOPs and bytes from it.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

ENGINE = "tandem-torch"
PREFILLS = (128, 512, 1024, 2048, 4096, 8192)
DECODES = ((1, 512), (1, 4096), (8, 1024), (16, 2048), (32, 1024), (32, 4096), (64, 512), (64, 2048))


def timed(fn: Callable[[], Any], repeats: int, device: Any) -> float:
    """Median milliseconds of `fn` over `repeats` runs after one warm-up (CUDA events when on a GPU)."""
    import time

    import torch

    fn()
    samples = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(device)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            samples.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t) * 1e3)
    return statistics.median(samples)


def measure(model: Any, device: Any, vocab: int, repeats: int, max_context: int) -> list[tuple[int, int, int, float]]:
    """(batch, context, prefill, ms) for every shape that fits the model's context and the GPU's memory."""
    import torch

    rows: list[tuple[int, int, int, float]] = []
    gen = torch.Generator(device="cpu").manual_seed(0)

    def ids(batch: int, n: int) -> Any:
        return torch.randint(3, vocab, (batch, n), generator=gen).to(device)

    with torch.inference_mode():
        for n in PREFILLS:
            if n > max_context:
                continue
            prompt = ids(1, n)

            def prefill(prompt: Any = prompt) -> Any:
                return model(input_ids=prompt, use_cache=True)
            try:
                ms = timed(prefill, repeats, device)
            except torch.OutOfMemoryError:
                break
            rows.append((0, 0, n, ms))
            print(f"  prefill {n} tokens: {ms:.2f} ms", file=sys.stderr, flush=True)
        for batch, context in DECODES:
            if context + 1 > max_context:
                continue
            try:
                cache = model(input_ids=ids(batch, context), use_cache=True).past_key_values
                step = ids(batch, 1)

                def decode(cache: Any = cache, step: Any = step) -> Any:
                    out = model(input_ids=step, past_key_values=cache, use_cache=True)
                    # Drop the token just appended so every repeat decodes at the same context.
                    out.past_key_values.crop(-1)
                    return out
                ms = timed(decode, repeats, device)
            except torch.OutOfMemoryError:
                torch.cuda.empty_cache()
                continue
            rows.append((batch, context, 0, ms))
            print(f"  decode batch {batch} at context {context}: {ms:.2f} ms", file=sys.stderr, flush=True)
    return rows


def render(rows: list[tuple[int, int, int, float]], *, source: str, profile: str, gpu: str, dtype: str,
           settings: str, date: str) -> str:
    """The rows and their source in published_perf.toml's format."""
    weights = "fp8" if "8" in dtype and "float8" in dtype else "bf16"
    lines = ["rows = ["]
    for batch, context, prefill, ms in rows:
        lines.append(f'  {{ source = "{source}", kind = "step_ms", model = "{profile}", gpu = "{gpu}", tp = 1, '
                     f'weights = "{weights}", input_tokens = 0, output_tokens = 0, concurrency = 0, '
                     f"batch = {batch}, context = {context}, prefill = {prefill}, value = {ms:.4f} }},")
    lines += ["]", "", f"[sources.{source}]",
              f'title = "Tandem torch engine step times on {gpu} (bench/gpu/measure_steps.py)"',
              'address = "bench/gpu/measure_steps.py (this repository)"',
              f'date = "{date}"', f'engine = "{ENGINE}"', f'settings = "{settings}"']
    return "\n".join(lines) + "\n"


def append(data: str, measured: str) -> str:
    """`data` (a published_perf.toml) with `measured`'s rows added to its `rows` array and its source table."""
    rows_part, source_part = measured.split("\n]\n", 1)
    new_rows = rows_part.split("rows = [\n", 1)[1]
    lines = data.splitlines(keepends=True)
    start = next(i for i, line in enumerate(lines) if line.startswith("rows = ["))
    end = next(i for i in range(start, len(lines)) if lines[i].rstrip() == "]")
    lines.insert(end, new_rows + "\n")
    return "".join(lines).rstrip("\n") + "\n\n" + source_part.lstrip("\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="Hugging Face checkpoint directory (or a built-in name)")
    parser.add_argument("--profile", required=True, help="the sim profile with the checkpoint's shape (llama-3-8b)")
    parser.add_argument("--out", type=Path, required=True, help="TOML file to write the rows to")
    parser.add_argument("--append-to", type=Path, default=None,
                        help="also add the rows and their source to this data file (runtime/data/published_perf.toml)")
    parser.add_argument("--gpu-type", default="", help="GPU catalog id (default: matched from the device name)")
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N (cpu only to try the script)")
    parser.add_argument("--dtype", default="bfloat16", help="torch engine dtype (default bfloat16)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per shape (median kept)")
    args = parser.parse_args()

    import torch

    from engine.base import EngineConfig, EngineError
    from engine.sim.profiles import get_profile
    from engine.torch_loader import load_model
    from runtime.catalog import default_catalog

    try:
        get_profile(args.profile)
        loaded = load_model(EngineConfig(model=args.model, device=args.device, dtype=args.dtype, max_batch_size=64))
    except EngineError as exc:
        print(f"measure_steps.py: {exc}", file=sys.stderr)
        return 2
    device = loaded.device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    gpu = args.gpu_type
    if not gpu:
        matched = default_catalog().match(name)
        if matched is None:
            print(f"measure_steps.py: device {name!r} is not in the GPU catalog; pass --gpu-type", file=sys.stderr)
            return 2
        gpu = matched.catalog_id
    print(f"measuring {loaded.checkpoint} on {name} ({gpu}), dtype {args.dtype}", file=sys.stderr)
    rows = measure(loaded.model, device, loaded.vocab_size, args.repeats, loaded.max_context)
    today = datetime.date.today().isoformat()
    source = f"tandem-torch-{gpu.lower()}-{today}"
    settings = (f"torch {torch.__version__}, transformers forward passes as the torch engine runs them, dtype "
                f"{args.dtype}, checkpoint {loaded.checkpoint.name}, device {name}, median of {args.repeats} "
                "after one warm-up, CUDA events around synchronised passes")
    text = render(rows, source=source.replace(".", "-"), profile=args.profile, gpu=gpu, dtype=args.dtype,
                  settings=settings, date=today)
    args.out.write_text(text)
    print(f"wrote {len(rows)} rows to {args.out}", file=sys.stderr)
    if args.append_to is not None:
        args.append_to.write_text(append(args.append_to.read_text(), text))
        print(f"added them to {args.append_to}; refit: bench/calibrate_costmodel.py --write", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
