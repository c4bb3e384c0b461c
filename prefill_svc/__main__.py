"""tandem-prefill: a worker that starts in the prefill role. `python -m prefill_svc --help` lists the settings."""

from __future__ import annotations

import sys

from tandem.v1 import common_pb2
from worker.process import main_for


def main() -> int:
    return main_for(common_pb2.ROLE_PREFILL, prog="tandem-prefill", section="prefill")


if __name__ == "__main__":
    sys.exit(main())
