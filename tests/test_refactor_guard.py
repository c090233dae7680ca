"""A refactor must not change results: fixed CPU runs compared with values recorded before it.

Two fingerprints of the whole training path, from config to results row:

* the loss of every step of a 20-step fp32 CPU run of three variants (QKV, Q-K=V, Q-GQA-4) on
  the ``tiny`` preset, fixed seed and fixed tokens, and each run's final validation loss;
* the results rows of a tiny sweep (``tiny-llama``, two variants trained by the real trainer and
  one grid point that cannot be built), without the fields that change from run to run
  (timestamps, wall and training times, throughput, paths, git state, the processor's name).

They are compared with ``tests/data/refactor_guard.json`` bit for bit. A change that is meant to
change results (a new initialisation, a fixed bug) records new values, reviewed like code::

    .venv/bin/python tests/test_refactor_guard.py --regen

On another torch version, architecture, vector instruction set or CPU vendor than the one that
recorded them, floating point results may differ in the last bits (an AMD EPYC and the Intel
machine of the first recording differ in 20 of the values), so there the floats are compared to a
relative 1e-4 (still far below what a changed computation gives) and integers and strings stay
exact.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

EXPECTED = Path(__file__).resolve().parent / "data" / "refactor_guard.json"
VARIANTS = ("QKV", "Q-K=V", "Q-GQA-4")
STEPS = 20
#: Result-row fields that differ between two runs of the same computation, or between machines.
VOLATILE = (
    "started",
    "finished",
    "wall_s",
    "train_time_s",
    "train_tokens_per_s",
    "decode_tokens_per_s",
    "mfu",
    "steady_tokens_per_s",
    "steady_mfu",
    "device_name",
    "git_commit",
    "git_dirty",
    "out_dir",
)
REL_TOL = 1e-4


def write_tokens(path: Path, n: int = 20_000, vocab: int = 64) -> None:
    """A learnable token stream (a noisy affine chain), the same on every platform and version.

    Python's ``random`` keeps its sequence across versions, unlike numpy's ``Generator`` methods.
    """
    rng = random.Random(1234)
    tokens, x = [], 0
    for _ in range(n):
        x = (5 * x + 3 + (rng.randrange(vocab) if rng.random() < 0.2 else 0)) % vocab
        tokens.append(x)
    np.save(path, np.asarray(tokens, dtype=np.int64))


def base_config(tokens: str) -> dict[str, Any]:
    return {
        "data": {"source": tokens, "val_fraction": 0.1},
        "optim": {"lr": 3e-3},
        "schedule": {"warmup_steps": 5},
        "log": {"every": 1, "progress": False, "tensorboard": False},
        "batch_size": 8,
        "seq_len": 32,
        "eval_every": 0,
        "eval_batches": 2,
        "device": "cpu",
        "dtype": "fp32",
        "seed": 0,
    }


@contextlib.contextmanager
def fixed_environment(workdir: Path) -> Iterator[None]:
    """One intra-op thread (reductions then add in one order) and ``workdir`` as the working
    directory, so the config paths, and with them the run ids, are the same on every machine."""
    threads, cwd = torch.get_num_threads(), Path.cwd()
    torch.set_num_threads(1)
    os.chdir(workdir)
    try:
        yield
    finally:
        os.chdir(cwd)
        torch.set_num_threads(threads)


def step_losses() -> dict[str, Any]:
    from qkvlab.study.results import read_metrics
    from qkvlab.train import TrainConfig, train

    out: dict[str, Any] = {}
    for variant in VARIANTS:
        config = {
            **base_config("tokens.npy"),
            "model": {"preset": "tiny", "variant": variant},
            "max_steps": STEPS,
            "out_dir": f"runs/{variant}",
        }
        summary = train(TrainConfig.from_dict(config), verbose=False)
        rows = read_metrics(config["out_dir"])
        out[variant] = {
            "loss": [r["loss"] for r in rows if r.get("loss") is not None],
            "val_loss": summary["val_loss"],
        }
    return out


def sweep_rows() -> list[dict[str, Any]]:
    from qkvlab.study import ResultsStore, SweepSpec, run_sweep

    spec = SweepSpec.from_dict(
        {
            "name": "guard",
            "base": {**base_config("tokens.npy"), "model": {"preset": "tiny-llama"}},
            "grid": {"variant": ["QKV", "Q-K=V", "Q=K-V+GQA-4"], "tokens": [1024]},
        }
    )
    summary = run_sweep(spec, "study", verbose=False)
    assert not summary.failed, summary.failed
    rows = []
    for row in ResultsStore("study").read():
        row = {k: v for k, v in row.items() if k not in VOLATILE}
        row["config"] = {k: v for k, v in row["config"].items() if k != "out_dir"}
        rows.append(row)
    return rows


def cpu_environment() -> dict[str, str]:
    """What decides the last bits of a CPU run: torch, the architecture, the vector ISA torch
    dispatches to and the vendor (the same x86-64 build rounds differently on AMD and Intel)."""
    vendor = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("vendor_id"):
                vendor = line.split(":", 1)[1].strip()
                break
    return {
        "torch": torch.__version__,
        "machine": platform.machine(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_vendor": vendor or platform.processor(),
    }


def measure(workdir: Path) -> dict[str, Any]:
    """The guarded values, computed in ``workdir`` (empty; it is filled with runs)."""
    write_tokens(workdir / "tokens.npy")
    with fixed_environment(workdir):
        return {
            "env": cpu_environment(),
            "step_losses": step_losses(),
            "sweep_rows": sweep_rows(),
        }


def differences(got: Any, want: Any, where: str = "", *, exact: bool = True) -> list[str]:
    """Where ``got`` and ``want`` differ (floats within ``REL_TOL`` unless ``exact``)."""
    if isinstance(want, dict) and isinstance(got, dict):
        out = [f"{where}.{k}: missing" for k in want if k not in got]
        out += [f"{where}.{k}: unexpected" for k in got if k not in want]
        for k in want.keys() & got.keys():
            out += differences(got[k], want[k], f"{where}.{k}", exact=exact)
        return out
    if isinstance(want, list) and isinstance(got, list) and len(want) == len(got):
        return [
            d
            for i, (g, w) in enumerate(zip(got, want, strict=True))
            for d in differences(g, w, f"{where}[{i}]", exact=exact)
        ]
    if isinstance(want, float) and isinstance(got, float) and not exact:
        return [] if math.isclose(got, want, rel_tol=REL_TOL) else [f"{where}: {got!r} != {want!r}"]
    return [] if got == want and type(got) is type(want) else [f"{where}: {got!r} != {want!r}"]


def test_results_are_the_recorded_ones(tmp_path):
    expected = json.loads(EXPECTED.read_text())
    got = measure(tmp_path)
    same_env = got.pop("env") == expected.pop("env")
    diff = differences(got, expected, exact=same_env)
    assert not diff, (
        f"{len(diff)} guarded value(s) changed (compared {'bit for bit' if same_env else f'to {REL_TOL:g}'}), "
        f"first: {diff[:5]}. If the change is intended, rerun with --regen (see the module docstring)."
    )


if __name__ == "__main__":
    import tempfile

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--regen", action="store_true", help=f"record the current values in {EXPECTED}")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        values = measure(Path(tmp))
    if args.regen:
        EXPECTED.parent.mkdir(exist_ok=True)
        EXPECTED.write_text(json.dumps(values, indent=1, sort_keys=True) + "\n")
        print(f"wrote {EXPECTED}")
    else:
        expected = json.loads(EXPECTED.read_text())
        same_env = values.pop("env") == expected.pop("env")
        print("\n".join(differences(values, expected, exact=same_env)) or "no difference")
