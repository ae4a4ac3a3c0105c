"""The launchers stay quiet when their reader leaves early, as in `submit.py --list | head -1`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_list_into_a_closed_pipe_is_no_traceback():
    read, write = os.pipe()
    os.close(read)  # the reader is gone before the first line: every write meets a broken pipe
    try:
        done = subprocess.run([sys.executable, str(ROOT / "launch" / "submit.py"), "--list"], stdout=write,
                              stderr=subprocess.PIPE, text=True, timeout=120, cwd=ROOT)
    finally:
        os.close(write)
    assert "Traceback" not in done.stderr and "BrokenPipeError" not in done.stderr, done.stderr
    assert done.returncode == 1, (done.returncode, done.stderr)
