"""The GPU benchmark scripts' CPU smoke modes: they still run, check and report (no timing is asserted).

The full runs need a CUDA GPU (``benchmarks/results/`` holds their H100 / H200 output); these keep the
scripts from rotting between those runs: every correctness check a script makes before timing
runs here on tiny shapes, and a failed check exits non-zero.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from qkvlab.kernels.kv_decode import HAS_TRITON, _interpreter_problem

ROOT = Path(__file__).resolve().parents[1]
INTERPRETER_PROBLEM = _interpreter_problem() if HAS_TRITON else "Triton is not installed"


def run_script(name: str, *args: str, interpret: bool = False) -> str:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), str(ROOT / "benchmarks")]))
    env.pop("OUT", None)  # smoke runs write no JSON
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / name), "--smoke", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=600,
    )
    assert proc.returncode == 0, f"{name} --smoke failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def test_gpu_generate_smoke_budget_batches():
    """Graph-step checks pass, and a budget holds twice the K=V rows (a K=V cache is half the bytes)."""
    out = run_script("gpu_generate.py", "--budget-decode")
    rows = {}
    for line in out.splitlines():
        m = re.match(r"\s*(\S+)\s+B=(\d+)\s+static\s+([\d.]+) tok/s", line)
        if m:
            rows[m.group(1)] = int(m.group(2))
    assert set(rows) == {"QKV", "Q-K=V", "GQA-8", "Q-GQA-8"}, out
    assert rows["Q-K=V"] >= 2 * rows["QKV"], rows
    assert rows["Q-GQA-8"] >= 2 * rows["GQA-8"], rows
    assert "G2: cached tokens" in out


@pytest.mark.skipif(INTERPRETER_PROBLEM is not None, reason=f"no working Triton interpreter: {INTERPRETER_PROBLEM}")
def test_gpu_decode_smoke_checks_every_method():
    """Each method of the decode benchmark is checked against the fp32 reference before timing."""
    out = run_script("gpu_decode.py", interpret=True)
    errs = re.findall(r"err \{([^}]*)\}", out)
    assert len(errs) == 2, out
    for err in errs:
        values = [float(v) for v in re.findall(r"'([0-9.e+-]+)'", err)]
        assert len(values) >= 5 and max(values) < 1e-2, err
