"""Calibrating the step model on the published rows: load, split, fit, report, render.

bench/calibrate_costmodel.py is the command; this module is what it and the
tests share. Reads runtime/data/published_perf.toml (the rows and their
sources); the fitted parameters go to runtime/data/step_params.toml, which
runtime/stepparams.py loads for the router, the sim engine and the fleet
simulator. See docs/costmodel.md.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import tomllib
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from engine.sim.profiles import get_profile
from engine.sim.roofline import model_dims
from runtime.catalog import GpuCatalog, default_catalog
from runtime.stepfit import (
    SPLIT_RULE,
    EngineOptions,
    Errors,
    Fit,
    FitModel,
    Row,
    errors,
    fit,
    held_out,
    params_for,
    predict,
)
from runtime.stepmodel import StepParams
from runtime.stepparams import STEP_PARAMS

# Fewer calibration rows than these and a GPU type's (or engine's) rows are all held out.
MIN_GPU_ROWS, MIN_ENGINE_ROWS = 6, 3
PUBLISHED = Path(__file__).resolve().parents[2] / "runtime" / "data" / "published_perf.toml"

# The discrete engine settings the published pages do not state, tried by the fit.
OPTION_CHOICES: dict[str, list[EngineOptions]] = {
    "trtllm": [EngineOptions(max_batch=b, kv_bytes=k, kv_fraction=0.95) for b in (512, 1024, 2048) for k in (1, 2)],
    "nim": [EngineOptions(max_batch=256, kv_bytes=1, kv_fraction=0.9)],
}


def fit_model(model: str, weights: str) -> FitModel:
    profile = get_profile(model)
    if weights == "fp8":
        profile = dataclasses.replace(profile, dense_weight_bytes=1.0)
    elif weights != "bf16":
        raise ValueError(f"weights must be bf16 or fp8, got {weights!r}")
    return FitModel(model_dims(profile), profile.weight_bytes)


@dataclass(frozen=True)
class Published:
    rows: list[Row]
    sources: dict[str, dict[str, str]]
    sha256: str


def load_published(path: Path = PUBLISHED) -> Published:
    """The rows and sources; ValueError names the file and the bad row."""
    text = path.read_bytes()
    data = tomllib.loads(text.decode())
    sources = data.get("sources") or {}
    rows = []
    for i, raw in enumerate(data.get("rows") or []):
        src = sources.get(raw.get("source"))
        if src is None:
            raise ValueError(f"{path}: rows[{i}] names unknown source {raw.get('source')!r}")
        for key in ("title", "address", "date", "engine", "settings"):
            if not src.get(key):
                raise ValueError(f"{path}: sources.{raw['source']} lacks {key}")
        fields = {k: raw[k] for k in raw if k != "source"}
        rows.append(Row(source=raw["source"], engine=src["engine"], **fields))
    return Published(rows, sources, hashlib.sha256(text).hexdigest())


def split(rows: Sequence[Row]) -> tuple[list[Row], list[Row]]:
    """(calibration, held-out) by the fixed rule (SPLIT_RULE): the rows `held_out` names, then every row of a
    GPU type with fewer than MIN_GPU_ROWS calibration rows or an engine with fewer than MIN_ENGINE_ROWS (too
    few to fit its own parameters: those rows test the defaults instead)."""
    cal = [r for r in rows if not held_out(r)]
    while True:
        gpus = Counter(r.gpu for r in cal)
        engines = Counter(r.engine for r in cal)
        keep = [r for r in cal if gpus[r.gpu] >= MIN_GPU_ROWS and engines[r.engine] >= MIN_ENGINE_ROWS]
        if len(keep) == len(cal):
            break
        cal = keep  # dropping rows can leave another type or engine short: repeat until stable
    calibration = set(cal)
    return cal, [r for r in rows if r not in calibration]


def run_fit(rows: Sequence[Row], catalog: GpuCatalog | None = None, *, sweeps: int = 30) -> Fit:
    """Fits on `rows` (pass the calibration set only)."""
    cat = catalog or default_catalog()
    models: dict[tuple[str, str], FitModel] = {}

    def predictor(row: Row, values: Mapping[str, float], opts: EngineOptions) -> float:
        key = (row.model, row.weights)
        if key not in models:
            models[key] = fit_model(*key)
        return predict(row, models[key], cat.get(row.gpu), params_for(values, row.gpu, row.engine), opts)

    return fit(rows, predictor, OPTION_CHOICES, sweeps=sweeps)


def predictions(rows: Sequence[Row], result: Fit, catalog: GpuCatalog | None = None) -> list[tuple[Row, float]]:
    cat = catalog or default_catalog()
    return [(r, predict(r, fit_model(r.model, r.weights), cat.get(r.gpu), params_for(result.values, r.gpu, r.engine),
                        result.options.get(r.engine, EngineOptions()))) for r in rows]


def roofline_predictions(rows: Sequence[Row], result: Fit,
                         catalog: GpuCatalog | None = None) -> list[tuple[Row, float]]:
    """The same rows under the plain roofline the step model replaced (MFU 0.5, MBU 0.7, TP efficiency 0.9,
    no overhead, interference or all-reduce cost), with the fit's engine options: the baseline to beat."""
    cat = catalog or default_catalog()
    out = []
    for r in rows:
        tp_eff = 0.9 if r.tp > 1 else 1.0
        params = StepParams(mfu=0.5 * tp_eff, mbu=0.7 * tp_eff, overhead_s=0.0, interference=0.0, allreduce_s=0.0)
        out.append((r, predict(r, fit_model(r.model, r.weights), cat.get(r.gpu), params,
                               result.options.get(r.engine, EngineOptions()))))
    return out


def errors_by_gpu(pairs: Sequence[tuple[Row, float]]) -> dict[str, Errors]:
    out: dict[str, Errors] = {}
    for gpu in sorted({r.gpu for r, _ in pairs}):
        out[gpu] = errors([(p, r.value) for r, p in pairs if r.gpu == gpu])
    return out


def _num(x: float) -> str:
    # Six significant figures: stable across platforms, far finer than the fit's error.
    return f"{float(f'{x:.6g}')!r}"


def render_params(result: Fit, published: Published, calibration: int, held: int,
                  held_errors: Mapping[str, Errors], reference_engine: str = "trtllm") -> str:
    """The step_params.toml text for a fit (deterministic, so a re-run can be compared byte for byte)."""
    v = result.values
    gpus = sorted({n.split(":")[1] for n in v if n.startswith("mfu:")})
    engines = sorted(result.options)
    lines = [
        "# Step-model parameters fitted by bench/calibrate_costmodel.py to runtime/data/published_perf.toml.",
        "# Generated: do not edit by hand; refit instead (docs/costmodel.md).",
        "schema_version = 1",
        f'reference_engine = "{reference_engine}"',
        "",
        "[fit]",
        f'data_sha256 = "{published.sha256}"',
        f"calibration_rows = {calibration}",
        f"held_out_rows = {held}",
        f'split = "{SPLIT_RULE}"',
        f"calibration_loss = {_num(result.loss)}",
        "",
        "[shared]",
        f"interference = {_num(v['interference'])}",
        f"allreduce_s = {_num(v.get('allreduce_s', 0.0))}",
    ]
    for e in engines:
        o = result.options[e]
        lines += ["", f"[engines.{e}]", f"overhead_s = {_num(v[f'overhead_s:{e}'])}", f"max_batch = {o.max_batch}",
                  f"kv_bytes = {o.kv_bytes}", f"chunk = {o.chunk}", f"kv_fraction = {_num(o.kv_fraction)}"]
    for g in gpus:
        err = held_errors.get(g)
        lines += ["", f'[gpus."{g}"]', f"mfu = {_num(v[f'mfu:{g}'])}", f"mbu = {_num(v[f'mbu:{g}'])}"]
        if err is not None and err.count:
            lines.append(f"held_out = {{ rows = {err.count}, median_pct = {_num(err.median_pct)}, "
                         f"worst_pct = {_num(err.worst_pct)} }}")
    for g in sorted(set(held_errors) - set(gpus)):
        err = held_errors[g]
        lines += ["", f'[validation."{g}"]', "# Rows too few to fit: predicted with [gpus.default].",
                  f"held_out = {{ rows = {err.count}, median_pct = {_num(err.median_pct)}, "
                  f"worst_pct = {_num(err.worst_pct)} }}"]
    # Types with no published rows: the geometric mean of the fitted ones, unvalidated.
    lines += ["", "[gpus.default]",
              f"mfu = {_num(math.prod(v[f'mfu:{g}'] for g in gpus) ** (1 / len(gpus)))}",
              f"mbu = {_num(math.prod(v[f'mbu:{g}'] for g in gpus) ** (1 / len(gpus)))}"]
    return "\n".join(lines) + "\n"


def calibrate(published: Published | None = None, *, sweeps: int = 30) -> tuple[str, list[tuple[Row, float]], Fit]:
    """The whole procedure: split, fit on calibration rows, predict every row, render the parameter file."""
    pub = published or load_published()
    cal, held = split(pub.rows)
    result = run_fit(cal, sweeps=sweeps)
    pairs = predictions(pub.rows, result)
    held_set = set(held)
    held_pairs = [(r, p) for r, p in pairs if r in held_set]
    text = render_params(result, pub, len(cal), len(held), errors_by_gpu(held_pairs))
    return text, pairs, result


__all__ = ["PUBLISHED", "STEP_PARAMS", "calibrate", "fit_model", "load_published", "predictions", "render_params",
           "roofline_predictions", "run_fit", "split"]
