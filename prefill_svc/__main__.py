"""tandem-prefill: a prefill worker. `python -m prefill_svc --help` lists the settings."""

from __future__ import annotations

import sys

from engine.serving.process import main_for
from prefill_svc.servicer import PrefillRole


def main() -> int:
    return main_for(PrefillRole(), prog="tandem-prefill", section="prefill")


if __name__ == "__main__":
    sys.exit(main())
