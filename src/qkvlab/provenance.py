"""Where a result came from: the qkvlab code version and the time, as runs and rows record them.

Example::

    from qkvlab.provenance import code_version, now

    commit, dirty = code_version()   # ("85b748b...", True) in a checkout with edits; (None, None) elsewhere
    started = now()                  # "2026-01-01T12:00:00+0000"
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path


def now() -> str:
    """The local time with its UTC offset, as every run and results row writes it."""
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def code_version() -> tuple[str | None, bool | None]:
    """(git commit, uncommitted changes to tracked files) of the qkvlab source tree, or
    (None, None) outside a git checkout or without git.

    A copy made with ``git archive COMMIT`` has no ``.git``; whoever made it names the commit
    in ``QKVLAB_GIT_COMMIT`` (a clean copy by construction), so its rows still say where they
    came from.
    """
    src = Path(__file__).resolve().parent
    try:
        run = dict(cwd=src, capture_output=True, text=True, timeout=10, check=True)
        commit = subprocess.run(["git", "rev-parse", "HEAD"], **run).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], **run).stdout.strip())
        return commit or None, dirty
    except (OSError, subprocess.SubprocessError):
        named = os.environ.get("QKVLAB_GIT_COMMIT", "").strip()
        return (named, False) if named else (None, None)
