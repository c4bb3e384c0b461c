"""deploy/grafana/build_dashboard.py: --help only prints, and the committed JSON is what it builds."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "build_dashboard.py"
DASHBOARD = SCRIPT.with_name("tandem-dashboard.json")


def test_help_prints_usage_and_writes_nothing() -> None:
    before = DASHBOARD.stat().st_mtime_ns
    done = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "usage:" in done.stdout and "wrote" not in done.stdout
    assert DASHBOARD.stat().st_mtime_ns == before


def test_committed_dashboard_is_what_the_script_builds(tmp_path: Path) -> None:
    out = tmp_path / "dashboard.json"
    subprocess.run([sys.executable, str(SCRIPT), "--output", str(out)], check=True, capture_output=True, timeout=60)
    assert out.read_text() == DASHBOARD.read_text(), "run deploy/grafana/build_dashboard.py and commit the JSON"
