"""Run every analysis on a model or a checkpoint and write ``analysis.json`` plus figures.

:func:`analyze_model` takes a model and a batch of its inputs; :func:`analyze_checkpoint`
loads a checkpoint, builds the batch (for a GPT: windows of the corpus it was trained on,
or ``data``) and writes the results. ``qkvlab analyze`` is a thin wrapper over the latter.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qkvlab.analysis.maps import (
    collect_attention,
    plot_attention_grid,
    plot_similarity,
    plot_spectra,
    plot_task_grid,
    plot_variants,
)
from qkvlab.analysis.rank import ENERGY_FRACTIONS, batched_rank, energy_key, mean, rank_summary, singular_values
from qkvlab.analysis.similarity import attention_modules, projection_similarity
from qkvlab.analysis.symmetry import attention_symmetry
from qkvlab.attention.variant import VariantSpec
from qkvlab.errors import ConfigError

METHODS = {
    "cosine": "cosine of flattened projection weights (no bias); query heads aligned with the KV head they read",
    "subspace": "per aligned head pair, mean cos^2 of principal angles between the weight blocks' row spaces "
    "(input directions); random_baseline = head_dim / d_model",
    "cka": "linear CKA of the two projections' outputs (with bias, before RoPE/QK-norm) on the batch's tokens",
    "rank.entropy": "exp(entropy of s / sum(s)) of the singular values s (Roy & Vetterli 2007)",
    "rank.energyN": "fewest singular values holding N% of sum(s^2)",
    "logit_asymmetry": "||S - S^T||_F / ||S||_F of pre-softmax logits S, no causal mask (0 = symmetric)",
    "diagonal_attention": "mean attention weight on self (after mask and softmax); uniform_baseline: uniform "
    "attention over visible keys",
}


def projection_ranks(model: nn.Module) -> tuple[dict, dict[str, list[list[float]]]]:
    """Effective ranks of each projection group per layer, and its singular values (for plots)."""
    mods = attention_modules(model)
    spec = mods[0][1].variant
    result: dict[str, Any] = {}
    spectra: dict[str, list[list[float]]] = {}
    for group in spec.groups:
        rows = []
        spectra[group] = []
        for _, attn in mods:
            w = attn.qkv.proj[group].weight
            rows.append(rank_summary(w))
            spectra[group].append(singular_values(w).tolist())
        entry: dict[str, Any] = {"roles": [r.upper() for r in group], "full": rows[0]["full"]}
        for key in ("entropy", *(energy_key(f) for f in ENERGY_FRACTIONS)):
            vals = [r[key] for r in rows]
            entry[key] = {"layers": vals, "mean": mean(vals)}
        result[group] = entry
    return result, spectra


def map_ranks(weights: list[torch.Tensor]) -> dict:
    """Entropy / energy ranks of the attention maps, per layer and head (mean over the batch)."""
    per_layer = [batched_rank(w) for w in weights]
    out: dict[str, Any] = {"size": int(weights[0].shape[-1]) if weights else None}
    for key in ("entropy", *(energy_key(f) for f in ENERGY_FRACTIONS)):
        heads = [r[key].mean(0).tolist() for r in per_layer]
        out[key] = {"layers": [mean(h) for h in heads], "per_head": heads, "mean": mean(heads)}
    return out


def model_info(model: nn.Module) -> dict:
    attn = attention_modules(model)[0][1]
    spec = attn.variant
    cfg = getattr(model, "config", None)
    return {
        "family": getattr(cfg, "family", type(model).__name__),
        "variant": spec.id,
        "paper_name": spec.paper_name,
        "groups": list(spec.groups),
        "identity_roles": list(spec.identity_roles),
        "n_layers": len(attention_modules(model)),
        "d_model": attn.o_proj.out_features,
        "n_heads": attn.n_heads,
        "n_kv_heads": attn.n_kv_heads,
        "head_dim": attn.head_dim,
        "causal": bool(attn.causal),
    }


def analyze_model(
    model: nn.Module,
    inputs: torch.Tensor | tuple | None,
    *,
    pairs: str | list[str] | None = "all",
    maps: bool = True,
    **forward_kwargs: Any,
) -> tuple[dict, dict]:
    """All measures for ``model`` on one batch of ``inputs``.

    Weight-only measures (cosine, subspace, projection ranks) need no inputs; CKA, map
    ranks and symmetry need ``inputs`` and ``maps=True`` (a linear-attention variant has no
    maps). Returns ``(result, extras)``: the JSON-ready result and, for figures, the
    capture (``extras["capture"]``) and projection spectra (``extras["spectra"]``).
    """
    info = model_info(model)
    capture = None
    if maps and inputs is not None:
        capture = collect_attention(model, inputs, **forward_kwargs)
    result: dict[str, Any] = {"model": info, "methods": METHODS}
    result["similarity"] = projection_similarity(model, capture.inputs if capture else None, pairs=pairs)
    ranks, spectra = projection_ranks(model)
    result["rank"] = {"projections": ranks}
    if capture is not None:
        result["rank"]["attention_maps"] = map_ranks(capture.weights)
        result["symmetry"] = attention_symmetry(capture.logits, capture.weights, causal=info["causal"])
    return result, {"capture": capture, "spectra": spectra}


# ---------------------------------------------------------------- checkpoints
_SPLITS: dict[str, Any] = {}


def _train_config(meta: dict[str, str]) -> dict:
    from qkvlab.checkpoint import train_config

    return train_config(meta, "the checkpoint")


def lm_batch(
    meta: dict[str, str],
    model: nn.Module,
    *,
    path: Path,
    data: str | None,
    seq_len: int | None,
    batch_size: int,
    split: str,
) -> tuple[torch.Tensor, dict]:
    """``(B, seq_len)`` windows of a corpus split, evenly spaced; the data the run trained on by default."""
    from qkvlab.train import load_splits
    from qkvlab.train.config import data_config

    trained = _train_config(meta)
    data_cfg = dict(trained["data"]) if isinstance(trained.get("data"), dict) else {}
    if data is not None:
        data_cfg["source"] = data
    elif "source" not in data_cfg:
        raise ConfigError(f"{str(path)!r} does not record its training data; pass --data SOURCE (e.g. a text file).")
    if split not in ("val", "train"):
        raise ConfigError(f"--split must be 'val' or 'train', got {split!r}.")
    max_len = model.config.max_seq_len
    seq_len = seq_len or min(trained.get("seq_len") or max_len, max_len)
    if not 2 <= seq_len <= max_len:
        raise ConfigError(f"--seq-len {seq_len} must be between 2 and the model's max_seq_len={max_len}.")
    key = json.dumps(data_cfg, sort_keys=True, default=str)
    if key not in _SPLITS:  # several checkpoints of one study share their corpus: read it once
        _SPLITS.clear()
        _SPLITS[key] = load_splits(data_config(data_cfg))
    splits = _SPLITS[key]
    tokens = splits.val if split == "val" else splits.train
    n = len(tokens)
    if n < seq_len:
        raise ConfigError(
            f"The {split} split of {data_cfg['source']!r} has {n} tokens, but attention maps of length "
            f"{seq_len} need at least {seq_len} tokens. Pass --seq-len {max(2, n)} or less, or longer data."
        )
    if splits.vocab_size > model.config.vocab_size:
        raise ConfigError(
            f"The tokenizer's vocabulary ({splits.vocab_size}) is larger than the model's "
            f"({model.config.vocab_size}); analyse with the tokenizer the model was trained with (--data only "
            "changes the corpus)."
        )
    windows = max(1, min(batch_size, n // seq_len))
    starts = torch.linspace(0, n - seq_len, windows).long().tolist()
    batch = torch.stack([torch.as_tensor(tokens[s : s + seq_len].astype("int64")) for s in starts])
    src = {"kind": "corpus", "source": data_cfg["source"], "split": split, "tokens_in_split": n}
    return batch, src


def other_batch(
    meta: dict[str, str], model: nn.Module, *, data: str | None, seq_len: int | None, batch_size: int, seed: int
) -> tuple[torch.Tensor, dict]:
    """Inputs for a non-LM model: a ``.npy`` file of inputs, or random inputs of the right shape."""
    cfg = model.config
    family = cfg.family
    if data is not None and data != "random":
        path = Path(data)
        if path.suffix != ".npy" or not path.is_file():
            raise ConfigError(
                f"--data {data!r}: for a {family!r} model pass a .npy file of model inputs (first axis = "
                "batch) or 'random'."
            )
        import numpy as np

        arr = torch.as_tensor(np.load(path)[:batch_size])
        if family in ("gpt", "encoder"):
            arr = arr.long()
        else:
            arr = arr.float()
        return arr, {"kind": "file", "source": str(path)}
    trained = _train_config(meta)
    task = trained.get("task") or {}
    if data is None and family == "encoder" and task.get("name") == "synthetic":
        return synthetic_batch(trained, batch_size=batch_size, seq_len=seq_len)
    n = seq_len or task.get("seq_len") or trained.get("seq_len") or min(cfg.max_seq_len, 64)
    gen = torch.Generator().manual_seed(seed)
    if family == "vit":
        x = torch.randn(batch_size, cfg.channels, cfg.image_size, cfg.image_size, generator=gen)
    elif family == "set":
        x = torch.randn(batch_size, n, cfg.in_features, generator=gen)
    elif family in ("encoder", "gpt"):
        if n > cfg.max_seq_len:
            raise ConfigError(f"--seq-len {n} exceeds the model's max_seq_len={cfg.max_seq_len}.")
        x = torch.randint(0, cfg.vocab_size, (batch_size, n), generator=gen)
    else:
        raise ConfigError(f"No input recipe for model family {family!r}; pass --data with a .npy file of inputs.")
    return x, {
        "kind": "random",
        "source": f"random {family} inputs, seed {seed} (weights-only measures are unaffected)",
    }


def synthetic_batch(trained: dict, *, batch_size: int, seq_len: int | None) -> tuple[torch.Tensor, dict]:
    """The first ``batch_size`` lists of the run's own test set (regenerated from its task seed)."""
    from qkvlab.data.synthetic import make_dataset
    from qkvlab.tasks.synthetic import SyntheticSettings
    from qkvlab.train import TrainConfig

    s = SyntheticSettings.from_train_config(TrainConfig.from_dict(trained))
    if seq_len is not None and seq_len != s.seq_len:
        raise ConfigError(
            f"--seq-len {seq_len}: this synthetic model was trained on lists of {s.seq_len}; "
            "leave --seq-len out (its test lists are used)."
        )
    data = make_dataset(s.kind, s.seq_len, s.n_train, s.n_test, s.seed)
    x = torch.as_tensor(data.test_x[:batch_size]).long()
    src = {"kind": "task", "source": f"synthetic {s.kind!r} test lists (seq_len {s.seq_len}, data seed {s.seed})"}
    return x, src


def analyze_checkpoint(
    path: str | Path,
    *,
    out: str | Path | None = None,
    data: str | None = None,
    seq_len: int | None = None,
    batch_size: int = 8,
    split: str = "val",
    pairs: str | list[str] | None = "all",
    plots: bool = True,
    device: str = "cpu",
    seed: int = 0,
) -> tuple[dict, dict]:
    """Analyse a checkpoint; write ``analysis.json`` (and PNGs) to ``out`` if given.

    Returns ``(result, extras)`` as :func:`analyze_model`, with ``result["inputs"]`` and
    ``result["files"]`` filled in.
    """
    from qkvlab.checkpoint import atomic_write, load_model, read_metadata

    path = Path(path)
    meta = read_metadata(path)
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1, got {batch_size}.")
    model = load_model(path, device=device).eval()
    spec = model.config.variant
    maps = not getattr(spec, "linear", False)
    if model.config.family == "gpt" and data != "random":
        x, src = lm_batch(meta, model, path=path, data=data, seq_len=seq_len, batch_size=batch_size, split=split)
    else:
        x, src = other_batch(meta, model, data=data, seq_len=seq_len, batch_size=batch_size, seed=seed)
    src["shape"] = list(x.shape)
    result, extras = analyze_model(model, x.to(device), pairs=pairs, maps=maps)
    result = {"checkpoint": str(path), "train_step": meta.get("train_step"), "inputs": src, **result}
    if not maps:
        result["notes"] = [f"{spec.paper_name} is linear attention: no softmax maps, so no CKA / map rank / symmetry."]
    files: list[str] = []
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        if plots:
            title = f"{spec.paper_name} ({spec.id})"
            if extras["capture"] is not None:
                files.append(str(plot_attention_grid(extras["capture"], out / "attention_maps.png", title=title)))
            files.append(str(plot_similarity(result["similarity"], out / "similarity.png", title=title)))
            files.append(str(plot_spectra(extras["spectra"], out / "spectra.png", title=title)))
        files.append(str(out / "analysis.json"))
        result["files"] = files
        text = json.dumps(result, indent=2)
        atomic_write(out / "analysis.json", lambda tmp: Path(tmp).write_text(text))
    return result, extras


def study_task_maps(
    study_dir: str | Path,
    path: str | Path,
    *,
    where: dict[str, Any] | None = None,
    seed: int = 0,
    layer: int = 0,
    device: str = "cpu",
) -> tuple[Path, list[dict[str, Any]]]:
    """Attention maps of a task study's runs: rows ``task.kind``, columns variants (paper's appendix figure).

    Takes the finished runs of ``seed`` whose recorded settings match ``where`` (dotted keys,
    e.g. ``{"model.d_model": 64}``), one per (task, variant); each is run on the first list of
    its own test set. Returns the figure's path and the runs drawn.
    """
    from qkvlab.checkpoint import load_model, read_metadata
    from qkvlab.study.results import STATUS_OK, ResultsStore, row_value
    from qkvlab.study.tables import table2_order

    study = Path(study_dir)
    store = ResultsStore(study)
    if not store.path.is_file():
        raise ConfigError(f"No {store.path.name} in {str(study)!r}; pass the folder of a finished study.")
    where = dict(where or {})
    rows = [
        r
        for r in store.latest().values()
        if r.get("status") == STATUS_OK
        and r.get("seed") == seed
        and row_value(r, "task.kind") is not None
        and all(str(row_value(r, k)) == str(v) for k, v in where.items())
    ]
    finished = [r for r in store.latest().values() if r.get("status") == STATUS_OK]
    if finished and all(row_value(r, "task.kind") is None for r in finished):
        raise ConfigError(
            f"{str(study)!r} holds no synthetic-task runs, and maps draws those (tasks by variants); for the "
            "attention maps of its models run qkvlab analyze on their run folders."
        )
    if not rows:
        raise ConfigError(
            f"No finished task runs with seed {seed} and settings {where or '{}'} in {str(study)!r}; "
            "check the --where values against the study's grid."
        )
    chosen: dict[tuple[str, str], dict[str, Any]] = {}
    for r in sorted(rows, key=lambda r: r["run_id"]):
        chosen.setdefault((str(row_value(r, "task.kind")), r["variant_id"]), r)
    tasks = list(dict.fromkeys(k for k, _ in chosen))
    variants = sorted({v for _, v in chosen}, key=table2_order)
    captures: dict[tuple[str, str], Any] = {}
    drawn = []
    for task in tasks:
        for vid in variants:
            r = chosen.get((task, vid))
            if r is None:
                continue
            weights = study / r["out_dir"] / "model.safetensors"
            meta = read_metadata(weights)
            model = load_model(weights, device=device).eval()
            x, _ = synthetic_batch(_train_config(meta), batch_size=1, seq_len=None)
            name = VariantSpec.parse(vid).paper_name
            captures[(task, name)] = collect_attention(model, x.to(device), keep_inputs=False)
            drawn.append({"task": task, "variant": name, "run_id": r["run_id"], "val_acc": r.get("val_acc")})
    settings = ", ".join(f"{k}={v}" for k, v in where.items())
    title = f"{_study_title(study)}: layer {layer}, head mean, seed {seed}" + (f", {settings}" if settings else "")
    return plot_task_grid(captures, path, layer=layer, title=title), drawn


def _study_title(study: Path) -> str:
    return study.resolve().name


def compare_maps(captures: dict[str, Any], path: str | Path) -> Path:
    """Side-by-side figure of several analysed models' maps (head means per layer)."""
    present = {k: v for k, v in captures.items() if v is not None}
    return plot_variants(present, path)


def summary_rows(result: dict) -> list[tuple[str, str]]:
    """``(measure, value)`` lines for a terminal summary of one analysis result."""
    rows: list[tuple[str, str]] = []

    def fmt(v) -> str:
        return "-" if v is None else f"{v:.3f}"

    for pair, e in result["similarity"].items():
        tag = " (tied)" if e["tied"] else ""
        cka = fmt(e["cka"]["mean"]) if "cka" in e else "-"
        base = e["subspace"].get("random_baseline")
        rows.append(
            (
                f"{pair}{tag}",
                f"cosine {fmt(e['cosine']['mean'])}, subspace {fmt(e['subspace']['mean'])} "
                f"(random {fmt(base)}), CKA {cka}",
            )
        )
    for group, e in result["rank"]["projections"].items():
        rows.append(
            (
                f"rank proj.{group}",
                f"entropy {e['entropy']['mean']:.1f}, 90% {e['energy90']['mean']:.1f}, "
                f"99% {e['energy99']['mean']:.1f} of {e['full']}",
            )
        )
    m = result["rank"].get("attention_maps")
    if m:
        rows.append(
            (
                "rank attention maps",
                f"entropy {m['entropy']['mean']:.1f}, 90% {m['energy90']['mean']:.1f}, "
                f"99% {m['energy99']['mean']:.1f} of {m['size']}",
            )
        )
    s = result.get("symmetry")
    if s:
        d = s["diagonal_attention"]
        rows.append(("logit asymmetry", f"{fmt(s['logit_asymmetry']['mean'])} (0 = symmetric)"))
        rows.append(("attention on self", f"{fmt(d['mean'])} (uniform {fmt(d['uniform_baseline'])})"))
    return rows
