"""Shared helpers of the GPU benchmarks: the hardware and versions every JSON records."""

from __future__ import annotations

import datetime as dt
import platform
import subprocess

import torch

from qkvlab.costs import BF16_PEAK, bf16_peak  # noqa: F401  (the benchmarks take them from here)


def source_commit() -> str | None:
    """The commit of the qkvlab sources the benchmark imports (:func:`qkvlab.provenance.code_version`:
    ``$QKVLAB_GIT_COMMIT`` where set, else git; None for a package outside a checkout, as a
    copied tree is), with ``+dirty`` for uncommitted changes."""
    from qkvlab.provenance import code_version

    commit, dirty = code_version()
    return None if commit is None else commit + ("+dirty" if dirty else "")


def env_info(device: torch.device) -> dict:
    """Date, source commit, Python / torch / CUDA / cuDNN / Triton versions, GPU name, SMs, memory,
    driver, clocks."""
    info = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "commit": source_commit(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda_runtime": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update(gpu=p.name, sm_count=p.multi_processor_count, memory_GiB=round(p.total_memory / 2**30, 1))
        info["l2_MB"] = round(getattr(p, "L2_cache_size", 0) / 1e6, 1)
        try:
            q = "--query-gpu=driver_version,clocks.max.sm,clocks.max.mem"
            out = subprocess.run(["nvidia-smi", q, "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
            info["driver"], info["max_sm_clock"], info["max_mem_clock"] = (x.strip() for x in out.stdout.split(","))
        except (OSError, ValueError, subprocess.SubprocessError):
            info["driver"] = None
    else:
        info.update(gpu=f"cpu ({platform.processor() or platform.machine()}), Triton interpreter")
    return info


def write_json(doc: dict, name: str, extra_path: str | None = None) -> list[str]:
    """Write ``doc`` to ``extra_path`` (if given) and to ``$OUT/name`` (on the device machine).

    Called after every case as well as at the end, so a run stopped at its time limit still
    leaves the rows it finished. Each write replaces the file atomically.
    """
    import json
    import os
    from pathlib import Path

    out_env = os.environ.get("OUT") and os.path.join(os.environ["OUT"], name)
    written = []
    for path in filter(None, [extra_path, out_env]):
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_suffix(p.suffix + ".tmp")
        tmp.write_text(json.dumps(doc, indent=1, default=float) + "\n")
        tmp.replace(p)
        written.append(str(p))
    return written
