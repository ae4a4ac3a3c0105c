"""The command-line entry points (submit, status), and what they share as programs."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable


def run_program(main: Callable[[], int]) -> None:
    """Exit with main()'s code; a reader that leaves early (`submit.py --list | head -1`) is not a traceback.

    Python reports the closed pipe as BrokenPipeError at the next write, and again when it
    flushes stdout on exit; pointing stdout at /dev/null stops the second report.
    """
    try:
        code = main()
        sys.stdout.flush()
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = 1  # not everything was delivered, as `yes | head` also ends with a failure code
    sys.exit(code)
