"""A run folder: training checkpoints (atomic on disk, loadable without unpickling code),
the metrics log, and what a new run must not overwrite.

Layout of a run folder::

    out_dir/config.yaml                                  the resolved train config
    out_dir/run.json                                     code version, libraries, hardware, model
    out_dir/metrics.jsonl                                one row per log or eval step (MetricsLog)
    out_dir/checkpoints/ckpt-0000100/model.safetensors   weights (+ model and train config)
    out_dir/checkpoints/ckpt-0000100/state.pt            optimizer, RNG, data position, step
    out_dir/checkpoints/latest                           the name of the newest complete one
    out_dir/model.safetensors, summary.json              the final weights and the run's result
    out_dir/tokenizer/                                   a BPE trained on the corpus (save_tokenizer)

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
import math
import os
import pickle
import random
import re
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


def results_folder(path: str | os.PathLike) -> Path:
    """Where results computed from a checkpoint belong: the folder named or a weights file's folder,
    but for a checkpoint in a run's ``checkpoints/``, the run folder, since pruning deletes old
    checkpoint folders whole (and whatever was written into them)."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    if re.fullmatch(r"ckpt-[0-9]+", folder.name) and folder.parent.name == CHECKPOINTS:
        return folder.parent.parent
    return folder


def latest_checkpoint(out_dir: str | os.PathLike) -> Path | None:
    """The folder named by ``out_dir/checkpoints/latest``; None when there is no checkpoint yet."""
    pointer = Path(out_dir) / CHECKPOINTS / LATEST
    if not pointer.is_file():
        return None
    name = pointer.read_text(errors="replace").strip()
    if re.fullmatch(r"ckpt-[0-9]+", name) is None:  # never a path out of the checkpoints folder
        raise ConfigError(
            f"{str(pointer)!r} names {name[:80]!r}, which is not a checkpoint folder name (ckpt-<step>); write the "
            "name of a complete ckpt-* folder beside it into it, or start a new run with --force."
        )
    path = pointer.parent / name
    if not (path / WEIGHTS).is_file() or not (path / STATE).is_file():
        raise ConfigError(
            f"{str(pointer)!r} names {path.name!r}, which is missing or incomplete; the run folder was edited "
            "by hand. Point 'latest' at a complete ckpt-* folder or start a new run in another out_dir."
        )
    return path


def previous_checkpoint(path: Path) -> Path | None:
    """The newest complete checkpoint older than the checkpoint folder ``path``, if one is kept."""
    older = [
        p
        for p in Path(path).parent.glob("ckpt-*")
        if p.name < Path(path).name and (p / WEIGHTS).is_file() and (p / STATE).is_file()
    ]
    return max(older, default=None)


def fallback_hint(path: Path) -> str:
    """How to resume without the damaged checkpoint ``path``: from the previous one, or afresh."""
    prev = previous_checkpoint(path)
    if prev is None:
        return "no earlier checkpoint is kept, so start the run again with --force (or in another out_dir)"
    pointer = Path(path).parent / LATEST
    return f"the previous checkpoint is {prev.name}: write {prev.name!r} into {str(pointer)!r} and rerun with --resume"


#: What every trainer ``state.pt`` holds; anything else is not a qkvlab training state.
STATE_KEYS = ("step", "tokens", "optimizer", "data", "rng")


def load_state(path: Path) -> dict[str, Any]:
    """``state.pt`` of the checkpoint folder ``path``, read without unpickling code.

    A damaged file, or one that holds objects other than tensors and plain data (which is
    never unpickled: that would run its code), is a :class:`ConfigError` naming the previous
    checkpoint to resume from instead.
    """
    file = path / STATE
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # torch's own message advises weights_only=False, which would run whatever the file holds.
        raise ConfigError(
            f"Training state {str(file)!r} is corrupt or unsafe: it holds something other than tensors and plain "
            f"data, and is never unpickled as code; {fallback_hint(path)}."
        ) from None
    except Exception as e:  # a damaged file surfaces as RuntimeError, EOFError, OSError, ValueError, ...
        first = (str(e).splitlines() or [type(e).__name__])[0].split(". ")[0]  # torch's advice follows
        raise ConfigError(f"Training state {str(file)!r} is corrupt ({first}); {fallback_hint(path)}.") from None
    if not isinstance(state, dict) or any(k not in state for k in STATE_KEYS):
        raise ConfigError(
            f"Training state {str(file)!r} is corrupt (it lacks the step, optimizer, data or RNG state); "
            f"{fallback_hint(path)}."
        )
    return state


# ================================================================== the rest of a run folder
TOKENIZER_FILES = ("vocab.json", "merges.txt", "meta.json", "tokenizer.json")

#: What a run writes into its out_dir; a new run refuses a folder holding any of them.
RUN_FILES = (
    "config.yaml",
    "run.json",
    "metrics.jsonl",
    "summary.json",
    "model.safetensors",
    CHECKPOINTS,
    "tensorboard",
    "tokenizer",
)


def save_tokenizer(task: Any, out: Path) -> Path | None:
    """Copy a BPE trained on the corpus into ``out/tokenizer`` so the run carries its own
    vocabulary (the cache it came from may be gone when the run is evaluated elsewhere)."""
    spec = str((getattr(getattr(task, "splits", None), "meta", None) or {}).get("tokenizer_spec") or "")
    kind, _, folder = spec.partition(":")
    source = Path(folder)
    if kind != "bpe" or not (source / "vocab.json").is_file():
        return None
    dest = out / "tokenizer"
    dest.mkdir(exist_ok=True)
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            data = (source / name).read_bytes()
            atomic_write(dest / name, lambda p, data=data: Path(p).write_bytes(data))
    return dest


def clear_run(out: Path) -> list[str]:
    """Delete what a run wrote into ``out`` (:data:`RUN_FILES`; nothing else); the names deleted."""
    gone = []
    for name in RUN_FILES:
        path = out / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
        else:
            continue
        gone.append(name)
    return gone


def _row_step(line: str) -> int | None:
    """The step of one ``metrics.jsonl`` line; None for a line a killed writer left torn."""
    try:
        step = json.loads(line).get("step")
    except (ValueError, AttributeError):
        return None
    return step if isinstance(step, int) else None


class MetricsLog:
    """``metrics.jsonl`` (one JSON object per row) and, when available, TensorBoard."""

    KEYS = ("step", "tokens", "loss", "lr", "grad_norm", "tokens_per_s", "val_loss", "val_ppl")
    TRAIN_KEYS = KEYS[:6]

    def __init__(
        self,
        out_dir: Path,
        *,
        resume_step: int | None,
        tensorboard: bool,
        metric_keys: tuple[str, ...] = ("val_loss", "val_ppl"),
    ):
        """``metric_keys``: evaluation columns written in every row (None where not evaluated)."""
        self.keys = (*self.TRAIN_KEYS, *metric_keys)
        self.path = out_dir / "metrics.jsonl"
        if resume_step is None:
            self.path.write_text("")
        elif self.path.exists():  # drop rows a killed run wrote after its last checkpoint
            rows = [line for line in self.path.read_text(errors="replace").splitlines() if line.strip()]
            kept = [r for r in rows if (_row_step(r) or math.inf) <= resume_step]  # a torn line goes too
            atomic_write(self.path, lambda p: Path(p).write_text("".join(r + "\n" for r in kept)))
        self.file = open(self.path, "a")  # noqa: SIM115 (closed in close())
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out_dir / "tensorboard"))
            except ImportError:
                pass

    def write(self, row: dict[str, Any]) -> None:
        row = {k: row.get(k) for k in self.keys} | {k: v for k, v in row.items() if k not in self.keys}
        try:
            self.file.write(json.dumps(row) + "\n")
            self.file.flush()
        except OSError as e:
            raise ConfigError(
                f"Could not write {str(self.path)!r} at step {row.get('step')}: {e.strerror or e}. Free disk space "
                "or fix permissions, then rerun with --resume (the last checkpoint is intact)."
            ) from None
        if self.tb is not None:
            for k, v in row.items():
                if k not in ("step", "tokens") and isinstance(v, int | float):
                    self.tb.add_scalar(k, v, row["step"])

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()
