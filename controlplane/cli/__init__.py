"""tandemctl, the admin CLI (`python -m controlplane.cli`, console script `tandemctl`)."""

from __future__ import annotations

from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> None:
    from controlplane.cli.app import main as run

    run(argv)
