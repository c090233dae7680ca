"""Training checkpoints: atomic on disk, loadable without unpickling code.

Layout of a run folder::

    out_dir/checkpoints/ckpt-0000100/model.safetensors   weights (+ model and train config)
    out_dir/checkpoints/ckpt-0000100/state.pt            optimizer, RNG, data position, step
    out_dir/checkpoints/latest                           the name of the newest complete one

A checkpoint is written into a hidden temporary folder, every file fsynced, the folder
renamed to ``ckpt-<step>`` and only then the ``latest`` pointer replaced atomically, so a
crash at any moment leaves ``latest`` naming a complete checkpoint. ``state.pt`` holds only
tensors, numbers, strings and containers and is read with ``torch.load(weights_only=True)``:
the step and token count, the optimizer state (keyed by parameter name), the data stream's
position, every process's RNG states (torch, CUDA, numpy, Python) and the last evaluation.
The learning-rate schedule is a pure function of the step, so the step is its whole state.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn

from qkvlab.checkpoint import atomic_write, read_tensors, save_model, state_tensors
from qkvlab.errors import ConfigError

CHECKPOINTS = "checkpoints"
LATEST = "latest"
WEIGHTS = "model.safetensors"
STATE = "state.pt"


def checkpoint_name(step: int) -> str:
    return f"ckpt-{step:07d}"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # not every platform can open a folder
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ------------------------------------------------------------------ weights
def save_weights(model: nn.Module, path: Path, metadata: dict[str, str]) -> None:
    """Weights of ``model`` to safetensors; qkvlab models via :func:`qkvlab.save_model`.

    Any other module is stored the same way (tied tensors once, their other names as
    ``aliases`` in the metadata) so :func:`load_weights` reads both.
    """
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_dict"):
        save_model(model, path, metadata=metadata)
        return
    tensors, aliases = state_tensors(model)
    meta = {**metadata, "aliases": json.dumps(aliases)}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    """The full state dict stored by :func:`save_weights` (tied names restored), on CPU."""
    return read_tensors(path)


# ------------------------------------------------------------------ RNG
def rng_state() -> dict[str, Any]:
    """Every random generator a training step may draw from, as weights-only-loadable data."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    version, py_state, py_gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos, "has_gauss": has_gauss, "gauss": gauss},
        "python": {"version": version, "state": torch.tensor(py_state, dtype=torch.int64), "gauss": py_gauss},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["state"].tolist()), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ------------------------------------------------------------------ checkpoints
def save_checkpoint(
    out_dir: str | os.PathLike,
    step: int,
    *,
    model: nn.Module,
    state: dict[str, Any],
    metadata: dict[str, str],
    keep: int = 2,
) -> Path:
    """Write checkpoint ``step`` (weights of ``model`` + ``state``), point ``latest`` at it, prune.

    Returns the checkpoint folder. The newest ``keep`` checkpoints are kept.
    """
    root = Path(out_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    name = checkpoint_name(step)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=root))
    try:
        save_weights(model, tmp / WEIGHTS, metadata)
        torch.save(state, tmp / STATE)
        with open(tmp / STATE, "rb") as f:
            os.fsync(f.fileno())
        _fsync_dir(tmp)
        final = root / name
        if final.exists():  # written by a run that died before pointing `latest` at it
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    atomic_write(root / LATEST, lambda p: Path(p).write_text(name + "\n"))
    _prune(root, keep=keep, current=name)
    return final


def _prune(root: Path, *, keep: int, current: str) -> None:
    """Delete all but the newest ``keep`` checkpoints (never ``current``) and stale temporaries."""
    ckpts = sorted(p for p in root.glob("ckpt-*") if p.is_dir())
    for old in ckpts[:-keep]:
        if old.name != current:
            shutil.rmtree(old, ignore_errors=True)
    for tmp in root.glob(".ckpt-*.tmp"):
        shutil.rmtree(tmp, ignore_errors=True)


def latest_checkpoint(out_dir: str | os.PathLike) -> Path | None:
    """The folder named by ``out_dir/checkpoints/latest``; None when there is no checkpoint yet."""
    pointer = Path(out_dir) / CHECKPOINTS / LATEST
    if not pointer.is_file():
        return None
    path = pointer.parent / pointer.read_text().strip()
    if not (path / WEIGHTS).is_file() or not (path / STATE).is_file():
        raise ConfigError(
            f"{str(pointer)!r} names {path.name!r}, which is missing or incomplete; the run folder was edited "
            "by hand. Point 'latest' at a complete ckpt-* folder or start a new run in another out_dir."
        )
    return path


def load_state(path: Path) -> dict[str, Any]:
    """``state.pt`` of the checkpoint folder ``path``, read without unpickling code."""
    try:
        return torch.load(path / STATE, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError) as e:
        raise ConfigError(f"Cannot read training state {str(path / STATE)!r}: {e}. The file is corrupt.") from None
