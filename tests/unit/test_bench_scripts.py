"""Every benchmark in bench/ starts: its imports resolve when run as `python bench/NAME.py`.

Running a script puts bench/ first on sys.path, so a script named like a
top-level package (bench/registry.py once shadowed the `registry` package)
breaks every benchmark that imports it. `--help` exercises the imports and
the argument parser without running the benchmark.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
SCRIPTS = sorted(p for p in BENCH.glob("*.py") if not p.name.startswith("_"))


def test_there_are_benchmarks() -> None:
    assert SCRIPTS, f"no benchmark scripts in {BENCH}"


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_benchmark_script_starts(script: Path) -> None:
    done = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=120,
                          cwd=BENCH.parent)
    assert done.returncode == 0, f"{script.name} --help failed:\n{done.stderr[-2000:]}"
    assert "usage:" in done.stdout


def test_planner_shift_quick_runs_every_arm(tmp_path: Path) -> None:
    """The planner benchmark's smoke run: both fleets, static splits, aggregated and the planner enacting."""
    figures_path = tmp_path / "planner_shift.json"
    done = subprocess.run([sys.executable, str(BENCH / "planner_shift.py"), "--quick", "--json", str(figures_path)],
                          capture_output=True, text=True, timeout=120, cwd=BENCH.parent)
    assert done.returncode == 0, f"planner_shift.py --quick failed:\n{done.stderr[-2000:]}"
    figures = json.loads(figures_path.read_text())
    assert [f["fleet"] for f in figures["fleets"]] == ["2 x H100-SXM + 2 x A100-80GB", "4 x H100-SXM"]
    for fleet in figures["fleets"]:
        assert fleet["best_static"]["overall"] == max(s["overall"] for s in fleet["statics"])
        assert len(fleet["ratio_per_phase"]) == 3 and fleet["aggregated"]["overall"] > 0
        # The workload shifts from prompt-heavy to decode-heavy: the planner moves workers between roles.
        assert {(s["from"], s["to"]) for s in fleet["planner"]["switches"]} == {("decode", "prefill"),
                                                                              ("prefill", "decode")}
    assert done.stdout.count("planner / best static over the run") == 2


def test_fleet_sim_switch_hands_over_decode_streams_and_loses_none(monkeypatch: pytest.MonkeyPatch) -> None:
    """A decode worker switching to prefill takes no new work, hands its streams over after the grace
    period (re-prefilled elsewhere, continuing their token count), then prefills; every request finishes."""
    monkeypatch.syspath_prepend(str(BENCH))
    from _fleet_sim import HANDOVER_GRACE_S, Phase, shifting_trace
    from planner_shift import FLEETS, _sim, fleet_specs

    from router_svc.candidates import Role

    fleet = FLEETS["h100"]
    sim = _sim(fleet_specs(fleet, ((fleet.gpus[0][0], 1),)))
    # Streams of 5000+ tokens outlast the grace period even in small batches.
    trace = shifting_trace([Phase("long outputs", 10.0, 4.0, (300, 600), (5000, 7000))], seed=3)
    sim.load(trace)
    sim.advance(5.0)
    switch = sim.switch("h100-1", Role.PREFILL)
    assert switch is not None
    sim.advance(5.0 + HANDOVER_GRACE_S / 2)
    switching = sim.workers["h100-1"].candidate("m", sim.now)
    assert not switching.routable
    sim.advance(400.0)
    assert sim.idle
    [ended] = sim.switches
    assert ended.handed_over > 0 and ended.ended is not None
    assert ended.ended - ended.started >= HANDOVER_GRACE_S
    assert sim.workers["h100-1"].role is Role.PREFILL
    assert all(r.done and r.tokens == r.output for r in trace)
    moved = [r for r in trace if r.migrations]
    assert len(moved) == ended.handed_over
