"""The settings reference (docs/configuration.md) and runtime/setting_names.py follow the declarations."""

from __future__ import annotations

import re
from pathlib import Path

from runtime import config_docs
from runtime.config import OTHER_VARIABLES
from runtime.setting import check_ranges, specs

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("runtime", "registry", "engine", "worker", "prefill_svc", "decode_svc", "router_svc", "controlplane")


def classes() -> list[type]:
    return [config_docs.load(config_docs.COMMON), *(config_docs.load(s.target) for s in config_docs.SERVICES)]


def test_the_generated_files_match_the_declarations() -> None:
    stale = [str(path.relative_to(REPO)) for path in config_docs.stale(REPO)]
    assert not stale, (f"{', '.join(stale)} differ from the settings' declarations; regenerate with: "
                       f".venv/bin/python -m runtime.config_docs")


def test_every_setting_has_help_and_a_default_in_its_range() -> None:
    for cls in classes():
        for spec in specs(cls):
            assert spec.help, f"{cls.__name__}.{spec.name} has no help"
            assert spec.range.check(spec.default)[1] == "", f"{cls.__name__}.{spec.name}: default out of range"
        check_ranges(cls())


def test_the_tables_are_the_sections_the_services_load() -> None:
    """Each main passes section= to load_config; the generated index and doc must use the same names."""
    sources = [path.read_text() for package in PACKAGES for path in (REPO / package).rglob("*.py")]
    loaded = {m for text in sources for m in re.findall(r'section="(\w+)"', text)}
    declared = {table for service in config_docs.SERVICES for table in service.tables}
    assert declared == loaded


def test_every_tandem_variable_the_code_names_is_known() -> None:
    """A TANDEM_* variable that is neither a setting nor listed in OTHER_VARIABLES would draw a warning."""
    settings = {spec.env for cls in classes() for spec in specs(cls)}
    found = {name for package in PACKAGES for path in (REPO / package).rglob("*.py")
             for name in re.findall(r"[\"'](TANDEM_[A-Z0-9_]+)[\"']", path.read_text())}
    found |= {name for path in (REPO / "deploy").rglob("*") if path.is_file()
              for name in re.findall(r"\b(TANDEM_[A-Z0-9_]+)=", path.read_text())}
    assert found - settings - OTHER_VARIABLES == set()
