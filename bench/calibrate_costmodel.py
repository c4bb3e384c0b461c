"""Calibrate the step-time model on published measurements; predict the held-out rows.

    .venv/bin/python bench/calibrate_costmodel.py            # fit, print every row and the held-out errors
    .venv/bin/python bench/calibrate_costmodel.py --write    # ... and write runtime/data/step_params.toml
    .venv/bin/python bench/calibrate_costmodel.py --check    # exit 1 if the committed parameters differ

The rows and their sources are runtime/data/published_perf.toml. They are
split by a fixed rule (runtime/stepfit.py: SPLIT_RULE) before anything is
fitted; the fit sees only the calibration rows. Goal: held-out median
absolute error under 15 % and worst under 35 %, per GPU type.
See docs/costmodel.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import print_header, table

from engine.sim.calibration import (
    STEP_PARAMS,
    calibrate,
    errors_by_gpu,
    load_published,
    roofline_predictions,
    split,
)
from runtime.stepfit import SPLIT_RULE

GOAL_MEDIAN_PCT, GOAL_WORST_PCT = 15.0, 35.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--write", action="store_true", help=f"write the fitted parameters to {STEP_PARAMS}")
    mode.add_argument("--check", action="store_true", help="fail unless the committed parameters match the fit")
    args = parser.parse_args()

    started = time.monotonic()
    published = load_published()
    text, pairs, result = calibrate(published)
    held_rows = set(split(published.rows)[1])
    fitted_gpus = {name.split(":")[1] for name in result.values if name.startswith("mfu:")}

    def held_out(row: object) -> bool:
        return row in held_rows
    print_header(f"step-model calibration: {len(published.rows)} published rows, "
                 f"{len(published.sources)} sources (fit in {time.monotonic() - started:.1f} s)")
    print(f"split: {SPLIT_RULE}")
    rows = []
    for r, p in pairs:
        rows.append(["held-out" if held_out(r) else "calib", r.describe(), f"{r.value:g}", f"{p:.4g}",
                     f"{(p / r.value - 1) * 100:+.1f}%"])
    print(table(["set", "row", "published", "predicted", "error"], rows))

    print("\nfitted parameters:")
    for name in result.names:
        value = result.values[name]
        unit = " us" if name.startswith(("overhead_s", "allreduce_s")) else ""
        shown = value * 1e6 if unit else value
        print(f"  {name} = {shown:.4g}{unit}")
    for engine, opts in sorted(result.options.items()):
        print(f"  {engine}: max_batch {opts.max_batch}, KV {opts.kv_bytes} byte(s)/element, chunk {opts.chunk} tokens, "
              f"KV fraction {opts.kv_fraction}")

    held = [(r, p) for r, p in pairs if held_out(r)]
    cal = [(r, p) for r, p in pairs if not held_out(r)]
    summary = []
    ok = True
    for gpu, err in errors_by_gpu(held).items():
        cal_err = errors_by_gpu(cal).get(gpu)
        meets = err.median_pct < GOAL_MEDIAN_PCT and err.worst_pct < GOAL_WORST_PCT
        fitted = gpu in fitted_gpus
        ok &= meets or not fitted
        verdict = ("yes" if meets else "NO") if fitted else "no rows to fit: checks the defaults"
        summary.append([gpu, str(err.count), f"{err.median_pct:.1f}%", f"{err.worst_pct:.1f}%",
                        f"{cal_err.median_pct:.1f}%" if cal_err else "-", verdict])
    baseline = errors_by_gpu([(r, p) for r, p in roofline_predictions([r for r, _ in held], result)])
    for line in summary:
        base = baseline[line[0]]
        line.insert(5, f"{base.median_pct:.0f}% / {base.worst_pct:.0f}%")
    print("\nheld-out absolute percentage error per GPU type (goal: median < 15 %, worst < 35 %):")
    print(table(["GPU", "held-out rows", "median", "worst", "calibration median", "plain roofline median / worst",
                 "meets goal"], summary))
    print(f"\nheld-out goal met for every fitted GPU type: {'yes' if ok else 'NO'}")

    committed = STEP_PARAMS.read_text() if STEP_PARAMS.exists() else ""
    if args.write:
        STEP_PARAMS.write_text(text)
        print(f"wrote {STEP_PARAMS}")
    elif args.check:
        if committed != text:
            print(f"{STEP_PARAMS} differs from the fit: run with --write and commit it", file=sys.stderr)
            return 1
        print(f"{STEP_PARAMS} matches the fit")
    elif committed != text:
        print(f"note: {STEP_PARAMS} differs from this fit (--write to update)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
