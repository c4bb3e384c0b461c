"""tandem-prefill: a prefill worker. `python -m prefill_svc --help` lists the settings."""

from __future__ import annotations

import sys

from prefill_svc.servicer import PrefillRole
from worker.process import main_for


def main() -> int:
    return main_for(PrefillRole(), prog="tandem-prefill", section="prefill")


if __name__ == "__main__":
    sys.exit(main())
