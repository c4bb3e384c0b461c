"""tandem-decode: a worker that starts in the decode role. `python -m decode_svc --help` lists the settings."""

from __future__ import annotations

import sys

from tandem.v1 import common_pb2
from worker.process import main_for


def main() -> int:
    return main_for(common_pb2.ROLE_DECODE, prog="tandem-decode", section="decode")


if __name__ == "__main__":
    sys.exit(main())
