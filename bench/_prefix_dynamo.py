"""Dynamo's side of bench/prefix_routing.py: the same conversations against NVIDIA Dynamo frontends with mockers.

    add_dynamo_arguments(parser)                          # --dynamo-venv and the rest
    print("\n".join(describe(settings)))                  # what the fleets are, what differs
    rows, figures, notes = run_fleets(fleets(args.dynamo_routers, args.dynamo_fleets), settings, args,
                                      drive, summarize)   # drive(url) runs the workload, summarize makes a row

Not a benchmark itself. Each fleet is a fresh deployment (cold caches, as
each Tandem policy gets): a Dynamo frontend with `--router-mode` kv or
round-robin, and mockers (Dynamo's simulated engine) with prefix caching
on, the KV block size, KV capacity, batch limit and speed of Tandem's sim
workers. Two shapes:

- "disagg": 4 prefill + 2 decode mockers, Tandem's shape. Dynamo's KV
  router routes both phases (prefill by prefix overlap and load, decode by
  load: decode mockers publish no KV events).
- "agg": 4 aggregated mockers, the 4 prefill caches (4 x the KV capacity)
  of Tandem's fleet, each prefilling and decoding.

Hit rate = prompt tokens served from a prefill cache / prompt tokens, from
one of three counts, all printed:
- the answers' usage.prompt_tokens_details.cached_tokens: the mocker's own
  hits where it prefilled ("agg"); in "disagg" they are the decode
  mocker's, not the prefill's, so not used there;
- the KV events the mockers publish (also in vLLM's format on a ZMQ port
  each, counted by `_dynamo.StoredBlocks`): a mocker stores every whole
  block it computes and never a hit, so the prompt tokens computed follow
  from the tokens stored and the prompt lengths; the figure for "disagg"
  (in "agg" it agrees with the answers', the check on the method);
- the KV router's match (`..._router_kv_selected_cached_prefix_tokens_total`,
  kv only): blocks the router knew of when it chose; a prompt that shares
  a prefix still being prefilled is a miss there, a hit in the mocker
  (it shares blocks as they are allocated, as vLLM does).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from _dynamo import Deployment, StoredBlocks, ensure_model

SHAPES = {"disagg": (4, 2), "agg": (0, 4)}  # (prefill, decode or aggregated) mockers
ROUTER_MODES = ("kv", "round-robin")
SELECTED = "dynamo_component_router_kv_selected_cached_prefix_tokens_total"

Outcome = dict[str, object]  # what a drive returns: "records" (order, prompt, cached, TTFT ms, ...), "errors", ...
Summarize = Callable[[str, Outcome], tuple[list[str], dict[str, float]]]


def add_dynamo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dynamo-venv", type=Path, default=None,
                        help="also run NVIDIA Dynamo (a venv with ai-dynamo) on the same workload; implies --http")
    parser.add_argument("--dynamo-model-dir", type=Path, default=Path(tempfile.gettempdir()) / "tandem-vs-dynamo-model",
                        help="where the mocker's model directory is cached (written when absent)")
    parser.add_argument("--dynamo-routers", default="kv,round-robin", help="Dynamo frontend router modes to run")
    parser.add_argument("--dynamo-fleets", default="disagg,agg",
                        help="Dynamo fleets: disagg (4 prefill + 2 decode mockers), agg (4 aggregated mockers)")


@dataclass(frozen=True)
class Settings:
    """What Tandem's sim workers are given, for the mockers; and the model name both sides serve."""

    model_name: str
    speedup: float
    block: int
    kv_blocks: int
    max_seqs: int


@dataclass(frozen=True)
class Fleet:
    router_mode: str
    shape: str

    @property
    def label(self) -> str:
        prefill, decode = SHAPES[self.shape]
        fleet = f"{prefill}P+{decode}D" if prefill else f"{decode} agg"
        return f"Dynamo {self.router_mode}, {fleet}"


def fleets(router_modes: str, shapes: str) -> list[Fleet]:
    """Every (router mode, shape) named, shape by shape; raises ValueError on an unknown name."""
    modes = [m for m in router_modes.split(",") if m]
    kinds = [s for s in shapes.split(",") if s]
    for name in modes:
        if name not in ROUTER_MODES:
            raise ValueError(f"unknown Dynamo router mode {name!r} (known: {', '.join(ROUTER_MODES)})")
    for name in kinds:
        if name not in SHAPES:
            raise ValueError(f"unknown Dynamo fleet {name!r} (known: {', '.join(SHAPES)})")
    return [Fleet(mode, shape) for shape in kinds for mode in modes]


def describe(settings: Settings) -> list[str]:
    """Header lines: what the Dynamo fleets are and why, and what differs between the two simulators."""
    return [
        f"# Dynamo fleets: frontend (--router-mode kv or round-robin) + mockers, one process each, "
        f"--block-size {settings.block} --num-gpu-blocks-override {settings.kv_blocks} "
        f"--max-num-seqs {settings.max_seqs} --speedup-ratio {settings.speedup:g}, prefix caching on; "
        "4P+2D is Tandem's shape (Dynamo's KV router routes disaggregated prefill); 4 agg mockers hold the "
        "4 prefill caches of Tandem's fleet; hit rate: agg from the answers (the mocker's own hits), 4P+2D "
        "from the prefill mockers' KV events (its answers report the decode mocker's hits)",
        "# simulators differ: Tandem's sim prices each step on an A100-80GB roofline for llama-3-8b; Dynamo's "
        "mocker has its own timing model (its built-in vLLM-like curves, not an A100), its own scheduler "
        "(it batches prefills and shares blocks still being computed; Tandem's sim prefills one prompt at a "
        "time, which then hits what was computed before it) and KV transfer: TTFT is comparable only "
        "roughly; the hit rate is the like-for-like figure",
    ]


def run_fleet(fleet: Fleet, venv: Path, model: Path, root: Path,
              drive: Callable[[str], Outcome], settings: Settings, max_tokens: int) -> Outcome:
    """Starts `fleet`, runs `drive(url)` on it, stops it; returns what `drive` returned, plus:

    "cached" (prompt tokens served from a prefill cache, or None where unknown) and "source" (where
    that figure comes from); the three counts it is chosen from: "answers_cached" (the answers'
    cached_tokens), "events_cached" (from the KV events, see `_events_cached`) and "router_cached"
    (the KV router's match, None without it); and "left" (processes still alive after the stop).
    """
    prefill, decode = SHAPES[fleet.shape]
    mocker = ("--block-size", str(settings.block), "--num-gpu-blocks-override", str(settings.kv_blocks),
              "--max-num-seqs", str(settings.max_seqs), "--enable-prefix-caching")
    name = f"{fleet.shape}-{fleet.router_mode}"
    dyn = Deployment(fleet.shape, venv, model, root, model_name=settings.model_name, speedup=settings.speedup,
                     prefill_workers=prefill, decode_workers=decode, router_mode=fleet.router_mode,
                     frontend_args=("--kv-cache-block-size", str(settings.block)), mocker_args=mocker,
                     kv_event_ports=True, name=name)
    stored: StoredBlocks | None = None
    kv = fleet.router_mode == "kv"
    try:
        dyn.start()
        dyn.wait_ready(settle=3.0)
        stored = StoredBlocks(venv, list(dyn.kv_event_ports.values())).start()
        before = dyn.counts(SELECTED, "phase") if kv else None
        out = drive(f"http://127.0.0.1:{dyn.port}")
        time.sleep(1.0)  # the last KV events reach the router and the counter
        after = dyn.counts(SELECTED, "phase") if kv else None
        blocks = stored.stop()
    except BaseException:
        print(f"Dynamo {name} frontend log, last lines:\n{dyn.log_tail('front')}", file=sys.stderr)
        raise
    finally:
        if stored is not None:
            stored.close()
        left = dyn.close()
    records = out["records"]
    assert isinstance(records, list)
    answers = sum(r[2] for r in records)
    router = None
    if before is not None and after is not None:
        router = sum(n for phase, n in (after - before).items() if phase != "decode")
    # A prefill mocker computes the prompt only; an aggregated one the replies too, but the last token's KV.
    computes = 1 if fleet.shape == "disagg" else max_tokens
    events = _events_cached([r[1] for r in records], blocks, settings.block, computes)
    if fleet.shape == "agg":
        cached, source = answers, "answers (mocker's own hits)"
    else:
        cached, source = events, "prefill mockers' KV events"
    return {**out, "cached": cached, "source": source, "router_cached": router, "answers_cached": answers,
            "events_cached": events, "left": left}


def _events_cached(prompts: list[int], stored: dict[str, int], block: int, computes: int) -> int | None:
    """Prompt tokens served from cache, from the tokens the mockers stored (None if some events were unread).

    A mocker stores each whole block it computes, prompt and reply alike, and never a hit. A request of
    L prompt tokens whose mocker then writes the KV of `computes` - 1 reply tokens (none on a prefill
    mocker; all but the last of max_tokens on an aggregated one) stores its whole blocks below
    L + computes - 1 beyond its hit; the prompt's partial last block is computed but stored only if the
    reply fills it.
    """
    if stored["unread"]:
        return None
    whole = sum((length + computes - 1) // block * block for length in prompts)
    computed = stored["tokens"] - (whole - sum(prompts))
    return sum(prompts) - computed


def run_fleets(dynamo: list[Fleet], settings: Settings, args: argparse.Namespace,
               drive: Callable[[str], Outcome], summarize: Summarize
               ) -> tuple[list[list[str]], dict[str, dict[str, float]], list[str]]:
    """Each fleet on the workload, in order: table rows (with where the hit rate comes from), figures by
    label, and notes on the hit counts. Every deployment is stopped, and its directory removed, before return."""
    model = ensure_model(args.dynamo_venv, args.dynamo_model_dir)
    root = Path(tempfile.mkdtemp(prefix="tandem-prefix-dynamo-"))
    rows: list[list[str]] = []
    figures: dict[str, dict[str, float]] = {}
    notes: list[str] = []
    try:
        for fleet in dynamo:
            out = run_fleet(fleet, args.dynamo_venv, model, root, drive, settings, args.max_tokens)
            errors, records = out["errors"], out["records"]
            assert isinstance(errors, list) and isinstance(records, list)
            if errors:
                print(f"  {fleet.label}: {len(errors)} errors, e.g. {errors[:3]}", file=sys.stderr)
            if out["left"]:
                notes.append(f"!!! {fleet.label}: still running after close: {out['left']}")
            row, figures[fleet.label] = summarize(fleet.label, out)
            rows.append([*row, str(out["source"])])
            prompt = sum(r[1] for r in records)
            counts = {"the answers' cached_tokens" + (" (decode mockers' hits)" if fleet.shape == "disagg" else ""):
                      out["answers_cached"], "the KV events": out["events_cached"],
                      "the KV router's match": out["router_cached"]}
            shown = [f"{name} {n / prompt:.1%}" for name, n in counts.items() if isinstance(n, int) and prompt]
            notes.append(f"{fleet.label}: hit rate from {', '.join(shown)}")
            print(f"  measured: {fleet.label}", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return rows, figures, notes


def compare(figures: dict[str, dict[str, float]]) -> str:
    """One line: Tandem's prefix-aware policy against Dynamo's KV router on Tandem's shape (4P+2D), and what
    each gains over round-robin on its own simulator (whose caches differ: see `describe`)."""
    tandem, dyn = figures.get("expected-time"), figures.get(Fleet("kv", "disagg").label)
    if tandem is None or dyn is None:
        return "Tandem's expected-time or Dynamo's KV router on 4P+2D did not run: no side-by-side line"
    line = (f"Tandem expected-time vs Dynamo's KV router, both 4P+2D: hit rate {tandem['hit']:.1%} vs "
            f"{dyn['hit']:.1%}, prefill tokens computed {tandem['computed']:,.0f} vs {dyn['computed']:,.0f}; "
            f"TTFT p50 {tandem['p50']:.1f} vs {dyn['p50']:.1f} ms, p99 {tandem['p99']:.1f} vs {dyn['p99']:.1f} ms "
            "(different simulators)")
    tandem_rr, dyn_rr = figures.get("round-robin"), figures.get(Fleet("round-robin", "disagg").label)
    if tandem_rr is not None and dyn_rr is not None:
        line += (f"\nover round-robin on the same simulator: Tandem {(tandem['hit'] - tandem_rr['hit']) * 100:+.1f} "
                 f"points of hit rate ({tandem_rr['computed'] / tandem['computed']:.2f}x fewer prefill tokens), "
                 f"Dynamo {(dyn['hit'] - dyn_rr['hit']) * 100:+.1f} points "
                 f"({dyn_rr['computed'] / dyn['computed']:.2f}x fewer)")
    return line
