"""What import, export and convert share: output folders, checkpoints, tokenizers, optional packages."""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qkvlab.checkpoint import atomic_write, read_metadata, save_model
from qkvlab.errors import ConfigError

#: Where a qkvlab run folder written by import / convert keeps its weights and report.
WEIGHTS = "model.safetensors"
REPORT = "interop.json"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def require(module: str, what: str):
    """Import an optional package or raise one clear line saying how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ConfigError(
            f"{what} needs the {module!r} package, which is not installed; install it with pip install 'qkvlab[hf]'."
        ) from None


def dtype_of(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ConfigError(f"Unknown dtype {name!r}; use one of {', '.join(DTYPES)}.")
    return DTYPES[name]


def check_output(out: str | os.PathLike, *, force: bool, inputs: Sequence[str | os.PathLike] = ()) -> Path:
    """Refuse an output folder that cannot be written, or whose replacement would lose data.

    ``--force`` replaces an existing ``out`` whole, so it is refused where that would delete what the
    command reads (``out`` is, or holds, one of ``inputs``) or the folder the user stands in (or one
    above it): those are slips of the path, never a wish to lose the source.
    """
    out = Path(out)
    if not out.exists():
        return out
    if not force:
        raise ConfigError(f"Output folder {str(out)!r} already exists; pass --force to replace it.")
    if not out.is_dir():
        raise ConfigError(f"Output {str(out)!r} is a file, not a folder; choose another path.")
    target = out.resolve()
    here = Path.cwd().resolve()
    if target == here or target in here.parents:
        raise ConfigError(
            f"Output folder {str(out)!r} is the current folder or holds it; --force would delete it. "
            "Name a new folder for the output."
        )
    for src in inputs:
        source = Path(src).resolve()
        if source == target or target in source.parents:
            raise ConfigError(
                f"Output folder {str(out)!r} holds the input {str(src)!r}; --force would delete it. "
                "Name a new folder for the output."
            )
    return out


@contextlib.contextmanager
def output_folder(out: str | os.PathLike, *, force: bool, inputs: Sequence[str | os.PathLike] = ()) -> Iterator[Path]:
    """Yield a fresh temporary folder that becomes ``out`` when the block succeeds.

    ``out`` is checked as by :func:`check_output`; an existing one is replaced only after the new
    folder is complete, so a failure never leaves half an output or loses the old one.
    """
    out = check_output(out, force=force, inputs=inputs)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's folder is private; the output is an ordinary folder
    try:
        yield tmp
        old = None
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, old)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def checkpoint_file(path: str | os.PathLike) -> Path:
    """A qkvlab weights file from a ``.safetensors`` path, a checkpoint folder or a run folder."""
    path = Path(path)
    if path.is_file():
        return path
    if (path / WEIGHTS).is_file():
        return path / WEIGHTS
    from qkvlab.train import latest_checkpoint

    latest = latest_checkpoint(path) if path.is_dir() else None
    if latest is None:
        raise ConfigError(
            f"No qkvlab checkpoint at {str(path)!r}; pass a .safetensors file, a ckpt-* folder or a run folder "
            "(with model.safetensors or checkpoints/latest)."
        )
    return latest / WEIGHTS


def tokenizer_folder(weights: Path) -> Path | None:
    """The ``tokenizer/`` folder a run carries next to (or above) its weights file."""
    for folder in list(weights.parents)[:3]:
        tok = folder / "tokenizer"
        if (tok / "tokenizer.json").is_file() or (tok / "vocab.json").is_file():
            return tok
    return None


def train_config(meta: dict[str, str]) -> dict[str, Any]:
    return json.loads(meta["train_config"]) if "train_config" in meta else {}


def run_tokenizer(weights: Path):
    """The qkvlab tokenizer a checkpoint was trained (or imported) with, or None if it names none."""
    from qkvlab.data import get_tokenizer

    folder = tokenizer_folder(weights)
    if folder is not None:
        return get_tokenizer(f"bpe:{folder}")
    name = (train_config(read_metadata(weights)).get("data") or {}).get("tokenizer")
    if name in ("byte",) or (isinstance(name, str) and name.startswith("gpt2")):
        return get_tokenizer(name)
    return None


def write_run(
    folder: Path,
    model: nn.Module,
    *,
    report: dict[str, Any],
    tokenizer_from: Path | None = None,
) -> Path:
    """Write a qkvlab run folder: ``model.safetensors`` (a normal qkvlab checkpoint, loadable with
    :func:`qkvlab.load_model`), ``interop.json`` (what was done) and a copy of a ``tokenizer/``."""
    folder = Path(folder)
    save_model(model, folder / WEIGHTS, metadata={"interop": json.dumps(report)})
    text = json.dumps(report, indent=2)
    atomic_write(folder / REPORT, lambda p: Path(p).write_text(text + "\n"))
    if tokenizer_from is not None and tokenizer_from.resolve() != (folder / "tokenizer").resolve():
        shutil.copytree(tokenizer_from, folder / "tokenizer", dirs_exist_ok=True)
    return folder / WEIGHTS


def model_from_tensors(cfg, tensors: dict[str, torch.Tensor], *, where: str) -> nn.Module:
    """A float32 qkvlab model of ``cfg`` holding ``tensors`` (its whole state dict; a tied head may
    be left out). Built on the meta device first, so no random initialisation is spent."""
    from qkvlab.attention.positional import Rotary
    from qkvlab.models import build_model

    with torch.device("meta"):
        model = build_model(cfg)
    own = model.state_dict()
    if getattr(cfg, "tie_embeddings", False):
        tensors = {**tensors, "lm_head.weight": tensors["wte.weight"]}
    missing = sorted(set(own) - set(tensors))
    unexpected = sorted(set(tensors) - set(own))
    bad = sorted(k for k in set(own) & set(tensors) if tuple(own[k].shape) != tuple(tensors[k].shape))
    if missing or unexpected or bad:
        raise ConfigError(
            f"{where}: the weights do not fit the model its config describes: missing {missing[:4]}, "
            f"unexpected {unexpected[:4]}, wrong shape {bad[:4]}."
        )
    model = model.to_empty(device="cpu")
    model.load_state_dict({k: v.to(torch.float32) for k, v in tensors.items()}, strict=True)
    for module in model.modules():  # non-persistent tables the meta build left empty
        if isinstance(module, Rotary):
            fresh = Rotary(module.cos.shape[1] * 2, module.max_seq_len, cfg.rope_theta)
            module.cos, module.sin = fresh.cos, fresh.sin
    if getattr(cfg, "tie_embeddings", False):
        model.lm_head.weight = model.wte.weight  # to_empty gave the two names separate storage
    return model.eval()


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """``max |a - b| / max |b|``, the figure reports print for an exact mapping."""
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))
