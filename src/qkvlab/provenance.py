"""Where a result came from: the qkvlab code version, the libraries, the machine and the time,
as runs and rows record them.

Example::

    from qkvlab.provenance import code_version, environment, now

    commit, dirty = code_version()   # ("85b748b...", True) in a checkout with edits; (None, None) elsewhere
    started = now()                  # "2026-01-01T12:00:00+0000"
    environment()["versions"]["torch"]
"""

from __future__ import annotations

import functools
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any


def now() -> str:
    """The local time with its UTC offset, as every run and results row writes it."""
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def code_version() -> tuple[str | None, bool | None]:
    """(git commit, uncommitted changes to tracked files) of the qkvlab source tree, or
    (None, None) outside a git checkout or without git.

    Whoever copies a commit's files with ``git archive`` (a device slice) names that commit in
    ``QKVLAB_GIT_COMMIT``; it wins over whatever ``.git`` the copy may sit in, which describes
    another tree.
    """
    named = os.environ.get("QKVLAB_GIT_COMMIT", "").strip()
    if named:
        return named, False
    src = Path(__file__).resolve().parent
    try:
        run = dict(cwd=src, capture_output=True, text=True, timeout=10, check=True)
        commit = subprocess.run(["git", "rev-parse", "HEAD"], **run).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], **run).stdout.strip())
        return commit or None, dirty
    except (OSError, subprocess.SubprocessError):
        return None, None


#: :func:`code_version` looked up once per process, for a process that writes many rows.
process_code_version = functools.cache(code_version)


def environment() -> dict[str, Any]:
    """Library versions and the machine (processor, cores, GPUs), as a run records them."""
    import numpy as np
    import torch

    import qkvlab

    gpus = (
        [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    )
    return {
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "numpy": np.__version__,
            "qkvlab": qkvlab.__version__,
            "cuda": torch.version.cuda,
        },
        "hardware": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "gpus": gpus,
        },
    }
