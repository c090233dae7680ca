"""Model checkpoints in safetensors: atomic writes, no unpickling, variant checked on load.

A file holds the weights (tied weights stored once) and, in its metadata, the model
family and resolved config as JSON, so :func:`load_model` rebuilds the model with
nothing else. Writes go to a temporary file in the same folder, are flushed to disk
and renamed over the target, so a crash never leaves a half-written checkpoint.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from qkvlab.errors import ConfigError

FORMAT = "qkvlab/1"
RESERVED_METADATA = ("format", "family", "config", "aliases")
# Config fields that do not change what the weights mean; they may differ on load.
RUNTIME_FIELDS = ("dropout", "attn_dropout", "emb_dropout", "backend", "init_std")


def atomic_write(path: str | os.PathLike, write) -> None:
    """Call ``write(tmp_path)`` then fsync and rename ``tmp_path`` over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def state_tensors(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``model``'s state dict on CPU with each shared tensor once, and the other names as aliases."""
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple[int, int, tuple[int, ...]], str] = {}
    for name, t in model.state_dict().items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        tensors[name] = t.detach().contiguous().cpu()
    return tensors, aliases


def _json_field(meta: dict[str, str], key: str, path: str | os.PathLike, default: Any = None) -> Any:
    """The JSON mapping stored under ``key`` in a checkpoint's metadata (``default`` if absent)."""
    if key not in meta:
        return default
    try:
        value = json.loads(meta[key])
    except (TypeError, ValueError):
        value = None
    if not isinstance(value, dict):
        raise ConfigError(
            f"Checkpoint {str(path)!r}: its metadata '{key}' is not a JSON mapping, so the file was edited or "
            "damaged; restore it from a backup or re-save the model with qkvlab.save_model."
        )
    return value


def _aliases(meta: dict[str, str], path: str | os.PathLike, names: set[str] | list[str]) -> dict[str, str]:
    """The checked ``aliases`` metadata: each tied name points at a tensor the file holds."""
    aliases = _json_field(meta, "aliases", path, {})
    bad = sorted(str(a) for a, t in aliases.items() if not isinstance(t, str) or t not in names or a in names)
    if bad:
        raise ConfigError(
            f"Checkpoint {str(path)!r}: its metadata 'aliases' ties {bad[:3]} to tensors the file does not hold, "
            "so the file was edited or damaged; restore it from a backup or re-save the model."
        )
    return aliases


def read_tensors(path: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Every tensor of a file written by :func:`save_model` or :func:`state_tensors`, aliases restored."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(
            f"Cannot read the tensors of checkpoint {str(path)!r}: {first}. The file is corrupt."
        ) from None
    for alias, target in _aliases(meta, path, list(tensors)).items():
        tensors[alias] = tensors[target]
    return tensors


def save_model(model: nn.Module, path: str | os.PathLike, *, metadata: dict[str, str] | None = None) -> Path:
    """Write ``model`` (weights + config) to ``path`` atomically; returns the path."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        raise ConfigError("save_model needs a qkvlab model (with a .config); got " + type(model).__name__)
    clash = sorted(set(metadata or {}) & set(RESERVED_METADATA))
    if clash:
        raise ConfigError(
            f"Metadata keys {clash} are reserved by qkvlab checkpoints ({', '.join(RESERVED_METADATA)}); "
            "rename them, e.g. 'user_config'."
        )
    tensors, aliases = state_tensors(model)
    meta = {
        "format": FORMAT,
        "family": config.family,
        "config": json.dumps(config.to_dict()),
        "aliases": json.dumps(aliases),
        **(metadata or {}),
    }
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))
    return Path(path)


def read_metadata(path: str | os.PathLike, *, qkvlab_only: bool = True) -> dict[str, str]:
    """The metadata of a qkvlab checkpoint; clear errors for missing or foreign files.

    ``qkvlab_only=False`` also reads a plain safetensors file (a trainer checkpoint of a model
    that is not a qkvlab model).
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"No checkpoint file at {str(path)!r}; check the path (it should be a .safetensors file).")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise ConfigError(
            f"Cannot read checkpoint {str(path)!r}: it is corrupt or not a safetensors file ({e}). "
            "Re-save it with qkvlab.save_model or restore it from a backup."
        ) from None
    if qkvlab_only and (meta.get("format") != FORMAT or "config" not in meta):
        raise ConfigError(
            f"{str(path)!r} is a safetensors file but not a qkvlab checkpoint (no qkvlab config in its "
            "metadata); convert it or load the weights yourself."
        )
    return meta


def train_config(meta: dict[str, str], path: str | os.PathLike) -> dict[str, Any]:
    """The training config a trainer stored in a checkpoint's metadata ({} when there is none)."""
    return _json_field(meta, "train_config", path, {})


def checkpoint_config(path: str | os.PathLike):
    """The resolved model config stored in a checkpoint."""
    from qkvlab.models.config import CONFIG_TYPES

    meta = read_metadata(path)
    family = meta.get("family")
    if family not in CONFIG_TYPES:
        raise ConfigError(
            f"Checkpoint {str(path)!r} names unknown model family {family!r}; qkvlab builds "
            f"{', '.join(CONFIG_TYPES)}. Re-save it with qkvlab.save_model or restore it from a backup."
        )
    stored = _json_field(meta, "config", path)
    try:
        return CONFIG_TYPES[family].from_dict(stored)
    except ConfigError as e:
        raise ConfigError(
            f"Checkpoint {str(path)!r} records a model config that cannot be built ({e}); the file was edited or "
            "damaged: restore it from a backup or re-save the model."
        ) from None
    except TypeError as e:
        raise ConfigError(
            f"Checkpoint {str(path)!r} records a model config that cannot be built ({e}); the file was edited or "
            "damaged: restore it from a backup or re-save the model."
        ) from None


def check_tensor_count(config, path: str | os.PathLike) -> None:
    """Refuse metadata that does not describe the tensors in the file, before the model is built.

    The expected number of state-dict entries and values is extrapolated from the same config
    built on the meta device with one and with two layers (every block is the same), so a
    config asking for 100,000 layers is caught in milliseconds instead of being built first.
    """
    from qkvlab.costs import build_on_meta

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            sizes = {name: math.prod(f.get_slice(name).get_shape()) for name in f.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ConfigError(f"Cannot read checkpoint {str(path)!r}: it is corrupt ({e}).".replace("\n", " ")) from None
    aliases = _aliases(meta, path, set(sizes))
    have = (len(sizes) + len(aliases), sum(sizes.values()) + sum(sizes[t] for t in aliases.values()))

    def counts(n_layers: int) -> tuple[int, int]:
        state = build_on_meta(config.replace(n_layers=n_layers)).state_dict()
        return len(state), sum(t.numel() for t in state.values())

    (k1, e1), (k2, e2) = counts(1), counts(2)
    n = config.n_layers
    want = (k1 + (n - 1) * (k2 - k1), e1 + (n - 1) * (e2 - e1))
    if want != have:
        raise ConfigError(
            f"Checkpoint {str(path)!r}: its metadata describes a model of {n} layers with {want[0]:,} tensors and "
            f"{want[1]:,} values, but the file holds {have[0]:,} tensors and {have[1]:,} values; the metadata was "
            "edited or the file is damaged. Restore it from a backup or re-save the model."
        )


def load_model(path: str | os.PathLike, *, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild the model stored at ``path`` and load its weights (no code is unpickled).

    The config in the metadata is checked against the tensors the file holds before anything
    is built, so edited metadata cannot make this allocate a model the file does not hold.
    """
    from qkvlab.models import build_model

    config = checkpoint_config(path)
    check_tensor_count(config, path)
    with torch.device(device):
        model = build_model(config)
    load_into(model, path, device=device)
    return model


def load_into(model: nn.Module, path: str | os.PathLike, *, device: str | torch.device | None = None) -> nn.Module:
    """Load the weights at ``path`` into ``model``; refuse a checkpoint of another variant or shape."""
    path = Path(path)
    check_fits(model.config, path)
    if device is None:
        device = next(model.parameters()).device
    tensors = read_tensors(path, device)
    own = model.state_dict()
    missing = sorted(set(own) - set(tensors))
    unexpected = sorted(set(tensors) - set(own))
    bad_shape = sorted(k for k in set(own) & set(tensors) if own[k].shape != tensors[k].shape)
    if missing or unexpected or bad_shape:
        raise ConfigError(
            f"Checkpoint {str(path)!r} does not fit this model: missing {missing[:5]}, unexpected "
            f"{unexpected[:5]}, shape mismatch {bad_shape[:5]}. The model config differs from the "
            "checkpoint's; use qkvlab.load_model(path) to build the matching model."
        )
    # load_state_dict would cast integer tensors silently and keep NaN / inf, which then decode to
    # garbage (or NUL bytes) with no error anywhere: a weight must be a finite float.
    floats = [k for k in own if own[k].is_floating_point()]
    not_float = [k for k in floats if not tensors[k].is_floating_point()]
    if not_float:
        raise ConfigError(
            f"Checkpoint {str(path)!r} stores {not_float[0]!r} as {tensors[not_float[0]].dtype} (and "
            f"{len(not_float) - 1} more), not as floating-point weights; it was not written by a model save. "
            "Re-save the model with qkvlab.save_model."
        )
    broken = next((k for k in floats if not bool(torch.isfinite(tensors[k]).all())), None)
    if broken is not None:
        bad = int((~torch.isfinite(tensors[broken])).sum())
        raise ConfigError(
            f"Checkpoint {str(path)!r} holds {bad} NaN or infinite value(s) in {broken!r}: it is damaged or "
            "comes from a run that diverged. Load an earlier checkpoint of the run, or restore the file."
        )
    model.load_state_dict(tensors, strict=True)
    return model


def check_fits(cfg, path: str | os.PathLike) -> None:
    """Refuse a checkpoint whose stored family, variant or architecture differs from the model config ``cfg``."""
    path = Path(path)
    meta = read_metadata(path)
    stored = _json_field(meta, "config", path)
    if meta.get("family") != cfg.family:
        raise ConfigError(
            f"Checkpoint {str(path)!r} holds a {meta.get('family')!r} model, not a {cfg.family!r} one; "
            "load it with qkvlab.load_model(path), which builds the right family."
        )
    from qkvlab.attention.variant import VariantSpec

    try:
        ck_variant = VariantSpec.parse(stored.get("variant"))
    except ConfigError as e:
        raise ConfigError(
            f"Checkpoint {str(path)!r} records a variant that cannot be read ({e}); the file was edited or "
            "damaged: restore it from a backup or re-save the model."
        ) from None
    if ck_variant != cfg.variant:
        raise ConfigError(
            f"Checkpoint {str(path)!r} holds variant {ck_variant.id!r} ({ck_variant.paper_name}) but the model "
            f"is {cfg.variant.id!r} ({cfg.variant.paper_name}). Build the model from the checkpoint with "
            "qkvlab.load_model(path), or create it with the checkpoint's variant."
        )
    own_cfg = cfg.to_dict()
    differs = sorted(
        k for k in own_cfg if k not in RUNTIME_FIELDS and k != "variant" and stored.get(k, own_cfg[k]) != own_cfg[k]
    )
    if differs:
        detail = ", ".join(f"{k}: checkpoint {stored[k]!r} vs model {own_cfg[k]!r}" for k in differs)
        raise ConfigError(
            f"Checkpoint {str(path)!r} was saved from another architecture ({detail}). Build the model from "
            "the checkpoint with qkvlab.load_model(path), or with the checkpoint's settings."
        )
