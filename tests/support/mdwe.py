"""Runs a module as `python -m MODULE ARGS...` would, with memory-deny-write-execute on, as systemd's
MemoryDenyWriteExecute=yes does (prctl PR_SET_MDWE, Linux 6.3+: no mapping may become writable and executable).

    python -m tests.support.mdwe router_svc --listen ...

Exits 3 without running the module where the kernel lacks PR_SET_MDWE; callers check `supported()` first.
"""

from __future__ import annotations

import ctypes
import runpy
import sys

PR_SET_MDWE = 65
PR_GET_MDWE = 66
PR_MDWE_REFUSE_EXEC_GAIN = 1


def _prctl(*args: int) -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    return int(libc.prctl(*args, *([0] * (5 - len(args)))))


def supported() -> bool:
    """Whether this kernel has PR_SET_MDWE (checked without turning it on)."""
    return _prctl(PR_GET_MDWE) >= 0


def main() -> None:
    if _prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN) != 0 or _prctl(PR_GET_MDWE) != PR_MDWE_REFUSE_EXEC_GAIN:
        print("mdwe: PR_SET_MDWE unsupported by this kernel", file=sys.stderr)
        raise SystemExit(3)
    module, sys.argv = sys.argv[1], sys.argv[1:]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
