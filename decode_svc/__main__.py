"""tandem-decode: a decode worker. `python -m decode_svc --help` lists the settings."""

from __future__ import annotations

import sys

from decode_svc.servicer import DecodeRole
from worker.process import main_for


def main() -> int:
    return main_for(DecodeRole(), prog="tandem-decode", section="decode")


if __name__ == "__main__":
    sys.exit(main())
