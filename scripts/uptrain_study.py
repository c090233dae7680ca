"""The conversion study, uptraining half: each K=V / fewer-KV-head conversion trained on from its
converted weights with qkvlab's own trainer, then scored on exactly the tokens of the no-training
half, as rows of the same JSON (``uptrain_tokens`` > 0 beside the rows with 0).

For SmolLM2-135M-Instruct (docs/interop.md, "Uptraining a converted model"), after
``scripts/convert_study.py`` wrote the conversions into /tmp/convert-smollm2::

    python scripts/uptrain_study.py config --out studies/uptrain-smollm2.yaml --tokens 5M,20M \\
        --conversion Q-K=V:fit=/tmp/convert-smollm2/q-kv-fit \\
        --conversion Q-MQA:fit=/tmp/convert-smollm2/q-mqa-fit
    qkvlab sweep studies/uptrain-smollm2.yaml
    python scripts/uptrain_study.py score studies/uptrain-smollm2 \\
        --into results/convert-smollm2/convert-no-training-cpu.json --device cuda

``config`` writes a sweep file (qkvlab's format, :mod:`qkvlab.study.spec`): one grid block per
``--conversion TO:INIT=FOLDER`` (``TO=FOLDER`` for a target without an init, e.g. ``MQA``; the
label's ``+poolfit`` / ``+refit`` parts, as convert_study.py writes them, for a conversion made
with ``--pool fit`` / ``--refit-output``, e.g. ``Q-MQA:fit+poolfit+refit=FOLDER``), each
``init_from`` that folder, trained with its own tokenizer (``bpe:FOLDER/tokenizer``) on
``--train-zip`` at every ``--tokens`` budget. The blocks also name the checkpoint's model config
(shape and variant), so the file says what each run trains; the grid and the trainer take the
model from ``init_from`` anyway and refuse a model key that differs from the checkpoint's. The
labels are written as comments in the YAML and into a sidecar ``<out stem>.conversions.json``;
each folder's own ``interop.json`` (written by ``qkvlab convert``) must agree with its label.
``--control FOLDER`` adds the unconverted source (the folder the conversions were made from) as
one more block, trained with the same recipe on the same tokens: continued training on a new text
lowers the source's perplexity on that text too, so a conversion is measured against the source
uptrained on as many tokens (``val_ppl_ratio_same_tokens``), not only against the source as it
came (``val_ppl_ratio``).

``score`` takes a study folder that ``qkvlab sweep`` filled: every run of ``results.jsonl`` with
status ``ok`` and an ``init_from`` is scored by convert_study's own evaluation (the same val
windows per book, the same Dickens windows, the same sequence length, prompt and continuation
length, all read from ``--into``), after checking that the windows' sha256 equal the ones
``--into`` records, and added to ``--into`` as a row with ``to``, ``init`` (the conversion the run
started from), ``uptrain_tokens`` (the tokens it trained on) and ``uptrain`` (how: run id, rate,
batch, losses, time, device). A run's conversion is found by, in order: ``--conversion`` labels,
the ``--labels`` sidecar, the no-training row of ``--into`` whose ``checkpoint`` is the run's
``init_from``. The file is rewritten atomically after every row; ``--resume`` keeps the rows it
already has (key: ``to``, ``init``, ``uptrain_tokens``), else they are scored again. With
``--baseline`` a new ``--into`` starts as a copy of that no-training JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import yaml

# The no-training half's script, beside this one: its evaluation is the one these rows must share.
sys.path.insert(0, str(Path(__file__).resolve().parent))
import convert_study as cs

from qkvlab.attention.variant import VariantSpec
from qkvlab.checkpoint import atomic_write, checkpoint_config
from qkvlab.data import get_tokenizer
from qkvlab.errors import ConfigError
from qkvlab.interop.convert import INITS
from qkvlab.provenance import code_version, now
from qkvlab.study.results import STATUS_OK, ResultsStore
from qkvlab.study.spec import load_sweep, parse_tokens
from qkvlab.study.sweep import check_with_trainer, expand
from qkvlab.train.config import load_yaml, parse_override, set_dotted

SIDECAR_SCHEMA = "qkvlab-uptrain-conversions/1"
CONTROL = "source"  # the label of the unconverted source's runs (their rows have ``to`` null)

# The uptraining recipe for a small pretrained model (SmolLM2-135M). This is continued
# pretraining, not training from scratch: a peak rate of 1e-4, well below the rates models of this
# size are pretrained at, so the updates repair the converted attention without erasing what the
# weights already know. Checked on a CPU on the Q-K=V fit conversion, 16 steps of 4,096 tokens
# (results/convert-smollm2/uptrain-lr-check-cpu.json): 3e-4 wrecked it (val perplexity 63 -> 741),
# 1e-4 and 3e-5 repaired it (40 and 41). A short warmup (20 steps) lets the Adam moments settle;
# a longer one would spend a good share of a 5M-token run (153 steps) below the peak. Then a cosine
# decay to a tenth.
# AdamW with betas (0.9, 0.95), weight decay 0.1 on matrices only and gradients clipped at norm
# 1.0: the usual settings for pretraining models of this kind. Sequences are 2048 tokens long,
# the length of the windows the study scores: shorter training windows would leave the later
# positions untrained after the conversion changed them. 16 sequences a step give 32,768 tokens
# per step; by estimate (not measured) that fits an 80 GB GPU in bf16 (the trainer's dtype auto
# on CUDA) with the compiled loss; --grad-accum 2 --batch-size 8 keeps the step and halves it.
RECIPE = {
    "lr": 1e-4,
    "warmup_steps": 20,
    "betas": [0.9, 0.95],
    "weight_decay": 0.1,
    "grad_clip": 1.0,
    "seq_len": 2048,
    "batch_size": 16,
}


# --------------------------------------------------------------------------- labels
def parse_labelled(spec: str) -> tuple[str, str, str | None, Path]:
    """``TO:INIT=FOLDER`` or ``TO=FOLDER`` -> (label, to, init, folder).

    The label may hold '=' (``Q-K=V:fit``) and so may the folder: the split taken is the last
    whose left part is a conversion ``qkvlab convert`` makes (``--convert``'s form; a K=V target or
    one with grouped KV heads, init one of qkvlab's), preferring one whose folder exists."""
    found = []
    for i in range(len(spec) - 1, 0, -1):
        if spec[i] != "=" or i == len(spec) - 1:
            continue
        label = spec[:i]
        try:
            to, init = cs.parse_conversion(label)
        except SystemExit:
            continue
        target = VariantSpec.parse(to)
        if target.kv_shared or target.n_kv_heads is not None:  # parse_conversion checked the init
            found.append((label, to, init, Path(spec[i + 1 :])))
    if not found:
        raise SystemExit(
            f"--conversion takes TO:INIT=FOLDER (e.g. Q-K=V:fit=/tmp/convert-smollm2/q-kv-fit) or TO=FOLDER "
            f"(MQA=/tmp/convert-smollm2/mqa), INIT one of {', '.join(INITS)}, optionally followed by +refit; "
            f"got {spec!r}"
        )
    return next((f for f in found if f[3].is_dir()), found[0])


def read_interop(folder: Path) -> dict[str, Any] | None:
    path = folder / "interop.json"
    return json.loads(path.read_text()) if path.is_file() else None


def check_label(label: str, to: str, init: str | None, folder: Path, meta: dict[str, Any] | None) -> None:
    """Refuse a label that the folder's interop.json contradicts (another init, or K and V shared
    where the label keeps them apart)."""
    if meta is None:
        return
    if meta.get("action") != "convert":
        raise SystemExit(f"{folder} was not written by qkvlab convert (its interop.json says {meta.get('action')!r})")
    recorded = cs.recipe_label(meta.get("init"), bool(meta.get("refit_output")), meta.get("pool"))
    if recorded != init:
        raise SystemExit(
            f"{folder} is labelled {label}, but its interop.json records init {recorded!r}, not {init!r} (a "
            "conversion made with --pool fit / --refit-output is labelled INIT+poolfit / INIT+refit, in that order)"
        )
    if VariantSpec.parse(meta["variant"]).kv_shared != VariantSpec.parse(to).kv_shared:
        raise SystemExit(f"{folder} is labelled {label}, but holds {meta.get('paper_name')} ({meta['variant']})")


def control_entry(folder: Path) -> dict[str, Any]:
    """``--control``: the unconverted source, uptrained beside the conversions as their control."""
    for need in ("model.safetensors", "tokenizer"):
        if not (folder / need).exists():
            raise SystemExit(f"--control {folder}: {folder / need} is missing; give the folder qkvlab import wrote")
    check_control(folder, read_interop(folder))
    return block_entry(CONTROL, None, None, folder, source=str(folder))


def block_entry(label: str, to: str | None, init: str | None, folder: Path, source: str | None) -> dict[str, Any]:
    """A block of the sweep: its label, conversion, folder and the checkpoint's model config."""
    cfg = checkpoint_config(folder / "model.safetensors")
    return {
        "label": label,
        "to": to,
        "init": init,
        "folder": str(folder),
        "variant": cfg.variant.id,
        "paper_name": cfg.variant.paper_name,
        "source": source,
        "model": {k: v for k, v in cfg.to_dict().items() if k != "variant"},
    }


def check_control(folder: Path, meta: dict[str, Any] | None) -> None:
    if meta is not None and meta.get("action") == "convert":
        raise SystemExit(
            f"--control {folder} holds a conversion (its interop.json says action 'convert'); the control is the "
            f"source the conversions were made from ({meta.get('source') or 'its interop.json names it'})"
        )


def conversion_entry(spec: str) -> dict[str, Any]:
    """One ``--conversion`` of ``config``, checked against its folder."""
    label, to, init, folder = parse_labelled(spec)
    for need in ("model.safetensors", "tokenizer", "interop.json"):
        if not (folder / need).exists():
            raise SystemExit(f"--conversion {spec}: {folder / need} is missing; give a folder qkvlab convert wrote")
    meta = read_interop(folder)
    check_label(label, to, init, folder, meta)
    return block_entry(label, to, init, folder, source=meta.get("source"))


# --------------------------------------------------------------------------- config
def sweep_mapping(args: argparse.Namespace, conversions: list[dict[str, Any]]) -> dict[str, Any]:
    """The sweep file's content: the recipe as base, one grid block per conversion."""
    models = [c["model"] for c in conversions]
    common = {k: v for k, v in models[0].items() if all(k in m and m[k] == v for m in models)}
    base: dict[str, Any] = {
        # The checkpoints' own config, written out so the file says what each run trains (the grid
        # and the trainer take the model from init_from anyway, and refuse a key that differs).
        "model": {"preset": None, **common},
        "data": {"source": str(args.train_zip), "val_source": str(args.val_zip)},
        "optim": {
            "lr": args.lr,
            "betas": RECIPE["betas"],
            "weight_decay": RECIPE["weight_decay"],
            "grad_clip": RECIPE["grad_clip"],
            "decay": "matrices",
        },
        "schedule": {"warmup_steps": args.warmup_steps, "kind": "cosine"},
        "log": {"every": 10, "tensorboard": False},
        "batch_size": args.batch_size,
        "grad_accum": args.grad_accum,
        "seq_len": args.seq_len,
        "eval_every": 0,
        "compile": args.compile,
        "device": args.device,
        "seed": 0,
    }
    for item in args.set or []:
        set_dotted(base, *parse_override(item))
    blocks = []
    for c, m in zip(conversions, models, strict=True):
        block: dict[str, Any] = {
            "init_from": [c["folder"]],
            "data.tokenizer": [f"bpe:{Path(c['folder']) / 'tokenizer'}"],
            "model.variant": [c["variant"]],
        }
        block.update({f"model.{k}": [v] for k, v in m.items() if k not in common})
        block["tokens"] = [int(t) if t.isdigit() else t for t in args.tokens]
        blocks.append(block)
    return {
        "name": args.name,
        "study_dir": args.study_dir,
        "description": "The conversion study's uptraining half (scripts/uptrain_study.py): "
        + ", ".join(f"{c['label']} from {c['folder']}" for c in conversions),
        "base": base,
        "grid": blocks,
    }


def write_config(args: argparse.Namespace) -> dict[str, Any]:
    if not args.conversion and args.control is None:
        raise SystemExit("config needs at least one --conversion TO:INIT=FOLDER (or --control FOLDER)")
    try:
        args.tokens = [t.strip() for t in args.tokens.split(",") if t.strip()]
        budgets = [parse_tokens(t) for t in args.tokens]
    except ConfigError as e:
        raise SystemExit(f"--tokens: {e}") from None
    conversions = [control_entry(args.control)] if args.control is not None else []
    conversions += [conversion_entry(s) for s in args.conversion or []]
    folders = [str(Path(c["folder"]).resolve()) for c in conversions]
    if len(set(folders)) < len(folders) or len({(c["to"], c["init"]) for c in conversions}) < len(conversions):
        raise SystemExit("each --conversion needs its own folder and its own TO:INIT")
    spec = sweep_mapping(args, conversions)
    sidecar = args.out.with_name(args.out.stem + ".conversions.json")
    width = max(len(c["label"]) for c in conversions)
    header = [
        "# The conversion study's uptraining half, written by scripts/uptrain_study.py config: each",
        "# conversion trained on from its converted weights (init_from) at each token budget, then",
        "# scored on the no-training rows' windows:",
        f"#   qkvlab sweep {args.out}",
        f"#   python scripts/uptrain_study.py score {args.study_dir} --into <the no-training JSON>",
        f"# Conversions (label: init_from folder; also in {sidecar.name}):",
        *(f"#   {c['label']:<{width}}  {c['folder']}  ({c['paper_name']}, {c['variant']})" for c in conversions),
        f"# Recipe: AdamW lr {args.lr} (warmup {args.warmup_steps} steps, cosine to a tenth), betas 0.9/0.95,",
        "# weight decay 0.1 on matrices, clip 1.0; "
        f"{args.batch_size * args.grad_accum * args.seq_len:,} tokens a step "
        f"({args.batch_size} x {args.grad_accum} x {args.seq_len}); bf16 on CUDA (dtype auto).",
    ]
    text = "\n".join(header) + "\n" + yaml.safe_dump(spec, sort_keys=False, width=120)
    atomic_write(args.out, lambda tmp: Path(tmp).write_text(text))
    side = {
        "schema": SIDECAR_SCHEMA,
        "sweep": str(args.out),
        "study_dir": args.study_dir,
        "conversions": [{k: v for k, v in c.items() if k != "model"} for c in conversions],
    }
    atomic_write(sidecar, lambda tmp: Path(tmp).write_text(json.dumps(side, indent=2) + "\n"))
    # What qkvlab sweep will do with it: the grid, every point checked by the trainer's config.
    plans = expand(load_sweep(args.out))
    skipped = [f"{p.run_id}: {p.reason}" for p in plans if p.status != "pending"]
    if skipped or len(plans) != len(conversions) * len(budgets):
        raise SystemExit(f"{args.out}: expected {len(conversions) * len(budgets)} runs, got {len(plans)}: {skipped}")
    try:
        check_with_trainer(plans)
    except ConfigError as e:
        raise SystemExit(f"{args.out}: {e}") from None
    print(f"wrote {args.out} ({len(plans)} runs) and {sidecar}")
    for p in plans:
        print(f"  {p.run_id}: {p.config['init_from']}, {p.tokens:,} tokens")
    return {"sweep": spec, "sidecar": side, "plans": plans}


# --------------------------------------------------------------------------- score
def label_map(args: argparse.Namespace, result: dict[str, Any]) -> dict[str, tuple[str, str | None, str]]:
    """Resolved init folder -> (to, init, where the label came from); later sources win."""
    out: dict[str, tuple[str, str | None, str]] = {}
    for r in result["rows"]:
        if r["uptrain_tokens"] == 0 and r.get("checkpoint"):  # the source's row too: the control's init
            out[str(Path(r["checkpoint"]).resolve())] = (r["to"], r["init"], f"{args.into}'s no-training row")
    if args.labels is not None:
        side = json.loads(args.labels.read_text())
        if side.get("schema") != SIDECAR_SCHEMA:
            raise SystemExit(f"--labels {args.labels}: not a sidecar of uptrain_study.py config")
        for c in side["conversions"]:
            out[str(Path(c["folder"]).resolve())] = (c["to"], c["init"], str(args.labels))
    for spec in args.conversion or []:
        label, to, init, folder = parse_labelled(spec)
        out[str(folder.resolve())] = (to, init, f"--conversion {label}")
    return out


def finished_runs(args: argparse.Namespace, labels: dict[str, tuple[str, str | None, str]]) -> list[dict[str, Any]]:
    """The study's finished init_from runs, each with its conversion and folder."""
    store = ResultsStore(args.study)
    if not store.path.is_file():
        raise SystemExit(f"{store.path} does not exist: run qkvlab sweep on the config first")
    runs = []
    for row in store.latest().values():
        init_from = (row.get("config") or {}).get("init_from")
        if row.get("status") != STATUS_OK or not init_from:
            continue
        key = str(Path(init_from).resolve())
        if key not in labels:
            raise SystemExit(
                f"run {row['run_id']} started from {init_from}, which no label names: pass "
                f"--conversion TO:INIT={init_from} (or --labels with config's sidecar)"
            )
        to, init, where = labels[key]
        if to is None:
            check_control(Path(init_from), read_interop(Path(key)))
        else:
            name = f"{to}:{init}" if init else to
            check_label(f"{name} ({where})", to, init, Path(init_from), read_interop(Path(key)))
        run_dir = Path(row["out_dir"])
        run_dir = run_dir if run_dir.is_absolute() else args.study / run_dir
        if not (run_dir / "model.safetensors").is_file():
            raise SystemExit(f"run {row['run_id']}: no {run_dir / 'model.safetensors'}")
        runs.append({"row": row, "dir": run_dir, "to": to, "init": init, "tokens": int(row["tokens"])})
    if not runs:
        raise SystemExit(f"{store.path} has no finished run with an init_from")
    seen: dict[tuple, str] = {}
    for r in runs:
        key = (r["to"], r["init"], r["tokens"])
        if key in seen:
            raise SystemExit(
                f"runs {seen[key]} and {r['row']['run_id']} both uptrained {r['to'] or CONTROL} {r['init'] or ''} on "
                f"{r['tokens']:,} tokens; a results file holds one row of each"
            )
        seen[key] = r["row"]["run_id"]
    return runs


def eval_args(args: argparse.Namespace, result: dict[str, Any]) -> argparse.Namespace:
    """convert_study's evaluation settings, as the results file records them.

    Windows per book: the most any book got (spread_windows gives a book fewer only when it is too
    short for more, so the same count reproduces every book's)."""
    ev = result["eval"]
    dickens = ev.get("dickens")
    return argparse.Namespace(
        seq_len=result["seq_len"],
        val_zip=Path(args.val_zip or ev["val"]["source"]),
        windows_per_book=max(len(g["starts"]) for g in ev["val"]["groups"]),
        dickens=None if dickens is None else str(args.dickens or dickens["source"]),
        dickens_windows=None if dickens is None else len(dickens["groups"][0]["starts"]),
        prompt=result["prompt"],
        new_tokens=result["new_tokens"],
    )


def check_windows(sets: dict[str, Any], result: dict[str, Any], into: Path, tokenizer: str) -> None:
    """Refuse windows whose tokens are not the no-training rows' (by the sha256 the file records)."""
    mine = {k: s["tokens_sha256"] for k, s in sets.items()}
    theirs = {k: s["tokens_sha256"] for k, s in result["eval"].items()}
    if mine != theirs:
        differ = ", ".join(
            f"{k}: {(mine.get(k) or 'none')[:12]} here, {(theirs.get(k) or 'none')[:12]} in the file"
            for k in sorted(set(mine) | set(theirs))
            if mine.get(k) != theirs.get(k)
        )
        raise SystemExit(
            f"the evaluation windows differ from the ones {into} was scored on (sha256 {differ}; tokenizer "
            f"{tokenizer}): uptrained rows would not compare with its rows. Score with the same text and tokenizer "
            "(--val-zip / --dickens may name the same files elsewhere)."
        )


def run_tokenizer(run: dict[str, Any]) -> str:
    """The tokenizer a run trained with: the copy in its folder, else its config's."""
    own = run["dir"] / "tokenizer"
    if (own / "tokenizer.json").is_file() or (own / "vocab.json").is_file():
        return f"bpe:{own}"
    return run["row"]["config"]["data"]["tokenizer"]


def uptrain_record(run: dict[str, Any], study: Path) -> dict[str, Any]:
    """How the run trained: its own config.yaml (every key resolved), else the sweep's config."""
    row, cfg = run["row"], run["row"]["config"]
    resolved = run["dir"] / "config.yaml"
    if resolved.is_file():
        cfg = load_yaml(resolved.read_text())
    batch_tokens = cfg["batch_size"] * cfg["grad_accum"] * cfg["seq_len"]
    return {
        "run_id": row["run_id"],
        "study": str(study),
        "init_from": cfg["init_from"],
        "tokens_budget": row.get("tokens_budget"),
        "steps": row.get("steps"),
        "lr": cfg["optim"]["lr"],
        "warmup_steps": cfg["schedule"]["warmup_steps"],
        "seq_len": cfg["seq_len"],
        "batch_size": cfg["batch_size"],
        "grad_accum": cfg["grad_accum"],
        "batch_tokens": batch_tokens,
        "train_loss": row.get("train_loss"),
        "trainer_val_loss": row.get("val_loss"),  # the trainer's own last evaluation, not these windows
        "train_time_s": row.get("train_time_s"),
        "train_tokens_per_s": row.get("train_tokens_per_s"),
        "steady_tokens_per_s": row.get("steady_tokens_per_s"),
        "device_name": row.get("device_name"),
        "dtype": cfg.get("dtype", "auto"),
        "compile": cfg.get("compile", False),
        "git_commit": row.get("git_commit"),
        "finished": row.get("finished"),
    }


def load_into(args: argparse.Namespace) -> dict[str, Any]:
    if args.into.is_file():
        result = json.loads(args.into.read_text())
    elif args.baseline is not None:
        result = json.loads(args.baseline.read_text())
        result["uptrain_baseline"] = str(args.baseline)
    else:
        raise SystemExit(f"--into {args.into} does not exist; give the no-training JSON, or --baseline to start one")
    if result.get("schema") != cs.SCHEMA:
        raise SystemExit(f"{args.into}: not a results file of convert_study.py (schema {result.get('schema')!r})")
    return result


def score_runs(args: argparse.Namespace) -> dict[str, Any]:
    device, ctx = cs.scoring_context(args)
    dtype = "float32" + (" (bf16 autocast)" if args.amp == "bf16" else "")
    started, t_start = now(), time.perf_counter()
    result = load_into(args)
    runs = finished_runs(args, label_map(args, result))
    ev_args = eval_args(args, result)
    # The windows of each tokenizer, checked against the file's before any row is scored.
    tokenizers: dict[str, tuple[Any, dict[str, Any]]] = {}
    for run in runs:
        name = run_tokenizer(run)
        if name not in tokenizers:
            tok = get_tokenizer(name)
            sets = cs.eval_sets(ev_args, tok)
            check_windows(sets, result, args.into, name)
            tokenizers[name] = (tok, sets)
        run["tokenizer"] = name
    by_key = {(r["to"], r["init"], r["uptrain_tokens"]): r for r in result["rows"]}
    targets = {(r["to"], r["init"]): r["target"] for r in result["rows"] if r["uptrain_tokens"] == 0}
    for run in runs:
        got = checkpoint_config(run["dir"] / "model.safetensors").variant.paper_name
        want = targets.get((run["to"], run["init"]))
        if want is not None and got != want:
            raise SystemExit(f"run {run['row']['run_id']} holds {got}, but {run['to']} {run['init']} rows hold {want}")
    commit, dirty = code_version()
    hardware = cs.hardware(device)
    invocation = {
        "study": str(args.study),
        "started": started,
        "command": " ".join([Path(sys.argv[0]).name, *(args.argv if args.argv is not None else sys.argv[1:])]),
        "hardware": hardware,
        "versions": cs.versions(),
        "dtype": dtype,
        "git_commit": commit,
        "git_dirty": dirty,
    }
    result.setdefault("uptrain_runs", []).append(invocation)

    def save() -> None:
        invocation["finished"] = now()
        invocation["wall_s"] = round(time.perf_counter() - t_start, 1)
        if any(r["to"] is None and r["uptrain_tokens"] == 0 for r in result["rows"]):
            cs.relative_to_source(result["rows"])
        atomic_write(args.into, lambda tmp: Path(tmp).write_text(json.dumps(result, indent=2) + "\n"))

    for run in runs:
        key = (run["to"], run["init"], run["tokens"])
        init = f" init {run['init']}" if run["init"] else ""
        label = f"{run['to'] or CONTROL}{init} + {run['tokens']:,} tokens"
        if args.resume and key in by_key:
            print(f"{label}: kept", flush=True)
            continue
        t0 = time.perf_counter()
        tok, sets = tokenizers[run["tokenizer"]]
        ev = cs.evaluate_run(run["dir"], ev_args, sets, tok, ctx)
        row = cs.study_row(
            result["model"],
            run["to"],
            run["init"],
            ev,
            checkpoint=run["dir"],
            conversion=None,
            device=hardware["device"],
            dtype=dtype,
            commit=(commit, dirty),
            t0=t0,
            uptrain_tokens=run["tokens"],
            uptrain=uptrain_record(run, args.study),
        )
        row["eval_tokens_sha256"] = {k: s["tokens_sha256"] for k, s in sets.items()}
        if key in by_key:
            result["rows"].remove(by_key[key])
        result["rows"].append(row)
        by_key[key] = row
        save()
        dk = f", Dickens {row['dickens_ppl']:.2f}" if "dickens_ppl" in row else ""
        print(f"{label} -> {row['target']}: val {row['val_ppl_all']:.2f}{dk}, {row['wall_s']:.0f} s", flush=True)
    save()
    print(cs.markdown_table(result))
    return result


# --------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("config", help="write the uptraining sweep YAML (and its labels sidecar)")
    c.add_argument("--conversion", action="append", metavar="TO:INIT=FOLDER",
                   help="a converted folder and its label (repeatable), e.g. Q-K=V:fit=/tmp/q-kv-fit")  # fmt: skip
    c.add_argument("--control", type=Path, default=None, metavar="FOLDER",
                   help="the unconverted source, trained with the same recipe: the conversions' control")  # fmt: skip
    c.add_argument("--tokens", default="5M,20M", help="token budgets, comma-separated (k / M / B suffixes)")
    c.add_argument("--out", type=Path, default=Path("studies/uptrain-smollm2.yaml"), help="the sweep YAML")
    c.add_argument("--name", default="uptrain-smollm2", help="the study's name")
    c.add_argument("--study-dir", default="studies/uptrain-smollm2", help="the study folder qkvlab sweep fills")
    c.add_argument("--train-zip", type=Path, default=Path("../shared/data/gutenberg/gutenberg-train.zip"),
                   help="the training text")  # fmt: skip
    c.add_argument("--val-zip", type=Path, default=Path("../shared/data/gutenberg/gutenberg-val.zip"),
                   help="the trainer's own validation set (score takes its windows from the JSON)")  # fmt: skip
    c.add_argument("--lr", type=float, default=RECIPE["lr"], help="peak learning rate (AdamW)")
    c.add_argument("--warmup-steps", type=int, default=RECIPE["warmup_steps"], help="linear warmup, in steps")
    c.add_argument("--seq-len", type=int, default=RECIPE["seq_len"], help="tokens per training sequence")
    c.add_argument("--batch-size", type=int, default=RECIPE["batch_size"], help="sequences per micro-step")
    c.add_argument("--grad-accum", type=int, default=1, help="micro-steps per step (less memory, same batch)")
    c.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                   help="torch.compile the training loss (for a GPU; --no-compile on a CPU)")  # fmt: skip
    c.add_argument("--device", default="auto", help="the trainer's device: auto, cpu or cuda")
    c.add_argument("--set", action="append", metavar="KEY=VALUE", help="any other train config key (repeatable)")
    s = sub.add_parser("score", help="score the study's finished runs into the results JSON")
    s.add_argument("study", type=Path, help="the study folder (results.jsonl, runs/)")
    s.add_argument("--into", type=Path, required=True, help="the results JSON of convert_study.py the rows go to")
    s.add_argument("--baseline", type=Path, default=None, help="a no-training JSON that a new --into starts from")
    s.add_argument("--conversion", action="append", metavar="TO:INIT=FOLDER", help="label of an init_from folder")
    s.add_argument("--labels", type=Path, default=None, help="the .conversions.json that config wrote")
    s.add_argument("--val-zip", type=Path, default=None, help="the val books (default: the path the JSON records)")
    s.add_argument("--dickens", default=None, help="the Dickens corpus (default: the path the JSON records)")
    s.add_argument("--device", default="auto", help="auto, cpu or cuda")
    s.add_argument("--amp", choices=("none", "bf16"), default="none", help="bf16 autocast for the scoring (GPU)")
    s.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    s.add_argument("--resume", action="store_true", help="keep the uptrained rows --into already has")
    args = p.parse_args(argv)
    args.argv = argv
    if args.command == "config":
        return write_config(args)
    return score_runs(args)


if __name__ == "__main__":
    main()
