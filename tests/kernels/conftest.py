"""Runs the interpreter checks once per session, in a child process with TRITON_INTERPRET=1.

Triton reads TRITON_INTERPRET when it decorates a kernel, and other test files in the same pytest process
may import triton (or megamoe.kernels) first; a child process is immune to import order and keeps the
variable out of this process, where CUDA tests run the compiled kernels.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.kernels._checks import MARKER

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def interpreted():
    """{"kind/case": "ok" or the failure} from tests/kernels/_interpret_worker.py."""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join(
        [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    proc = subprocess.run([sys.executable, "-m", "tests.kernels._interpret_worker"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(MARKER)]
    if proc.returncode != 0 or not lines:
        pytest.fail(f"interpreter worker failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1][len(MARKER):])
