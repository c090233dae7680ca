"""The conversion study, no-training half: a QKV / GQA model and its K=V / fewer-head conversions,
scored on the same tokens, as one JSON file of rows.

For SmolLM2-135M-Instruct imported from its GGUF (docs/interop.md, results/convert-smollm2/)::

    python scripts/convert_study.py /tmp/smol-import --work /tmp/convert-smollm2 --device cpu \\
        --out results/convert-smollm2/convert-no-training-cpu.json

Rows, in order: the source model itself (``to`` and ``init`` null), then one conversion per
``--convert TO:INIT`` (default: ``Q-K=V``, which keeps the source's KV heads, with each of ``key``,
``value``, ``mean``, ``fit`` and ``fit+refit``; ``Q-MQA`` with ``mean``, ``fit``, ``fit+refit``,
``fit+poolfit`` and ``fit+poolfit+refit``; and ``MQA``, head pooling alone with K and V kept apart,
written without an init, with ``MQA:refit`` and ``MQA:poolfit+refit``),
each made by qkvlab's ``convert_checkpoint`` (what ``qkvlab convert`` runs; the row records the
equivalent command) into ``--work`` and scored with no training. ``+refit`` (``refit`` alone for
pooling) is ``qkvlab convert --refit-output``: calibrated layer by layer, with each ``o_proj``
refitted to the source's attention outputs; ``+poolfit`` is ``--pool fit``: pooled heads fitted
to their group's source heads instead of averaged. A row's ``init`` holds that label.

- perplexity on ``--windows-per-book`` windows of ``--seq-len`` tokens from every book of
  ``--val-zip`` (evenly spaced: the centre of each of ``k`` equal parts of the book) and on
  ``--dickens-windows`` windows spread the same way over ``--dickens`` (tokenised as qkvlab's corpus
  loader cuts it: CRLF -> LF, paragraph chunks, concatenated). Every window is scored by qkvlab's
  ``evaluate_lm``; per book and per set, the token-weighted mean loss and its perplexity. The
  windows' start offsets and a sha256 of their tokens are recorded, so a later run (another
  device, an uptrained model) can show it scored the same tokens;
- KV-cache bytes per token, measured from a :class:`~qkvlab.attention.cache.KVCache` allocated
  for the model (bfloat16, the unit the convert report and qkvlab's cost tables use; and float32);
- the greedy continuation of ``--prompt``.

``fit`` is calibrated on ``--calib`` (default: the Gutenberg *training* books; never the val
books). Rows are shaped so uptrained rows (``init_from:`` training configs on a converted folder,
made and scored by ``scripts/uptrain_study.py``) fit beside them: ``uptrain_tokens`` is 0 here.
The file is rewritten atomically after every row; ``--resume`` keeps every row of an earlier run
with the same evaluation settings and makes the missing ones (the earlier invocations are listed
in ``earlier_runs``; every row keeps its own commit, device and wall time).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import sys
import time
import zipfile
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from qkvlab.attention.cache import KVCache
from qkvlab.attention.variant import VariantSpec
from qkvlab.checkpoint import atomic_write, load_model
from qkvlab.costs import count_params
from qkvlab.data import get_tokenizer
from qkvlab.data.corpus import load_corpus
from qkvlab.errors import ConfigError
from qkvlab.interop.convert import INITS, convert_checkpoint
from qkvlab.provenance import code_version, now
from qkvlab.study.downstream import PAPER_TASKS, TASK_LABEL, points, run_summary
from qkvlab.tasks.lm import evaluate_lm
from qkvlab.train.context import RunContext

DEFAULT_CONVERSIONS = (
    "Q-K=V:key",
    "Q-K=V:value",
    "Q-K=V:mean",
    "Q-K=V:fit",
    "Q-MQA:mean",
    "Q-MQA:fit",
    "MQA",
    "Q-K=V:fit+refit",
    "Q-MQA:fit+refit",
    "MQA:refit",
    "Q-MQA:fit+poolfit",
    "Q-MQA:fit+poolfit+refit",
    "MQA:poolfit+refit",
)
SCHEMA = "qkvlab-convert-study/1"


# --------------------------------------------------------------------------- evaluation tokens
def spread_windows(n_tokens: int, k: int, seq_len: int) -> list[int]:
    """Start offsets of ``k`` windows of ``seq_len + 1`` tokens, one centred in each of ``k`` equal
    parts of ``n_tokens`` (fewer when the parts are shorter than a window; at least one)."""
    span = seq_len + 1
    if n_tokens < span:
        raise ValueError(f"{n_tokens} tokens are fewer than one window of {seq_len} (+1 target)")
    k = max(1, min(k, n_tokens // span))
    part = n_tokens / k
    return [int(j * part + (part - span) / 2) for j in range(k)]


def eval_sets(args: argparse.Namespace, tok) -> dict[str, Any]:
    """The evaluation windows: ``{"val": {...}, "dickens": {...}}``, each with its groups of windows."""
    L = args.seq_len
    groups = []
    with zipfile.ZipFile(args.val_zip) as z:
        names = sorted(n for n in z.namelist() if not n.endswith("/"))
        texts = [z.read(n).decode("utf-8").replace("\r\n", "\n") for n in names]
    for name, ids in zip(names, tok.encode_batch_np(texts, dtype=np.int64), strict=True):
        starts = spread_windows(ids.size, args.windows_per_book, L)
        groups.append({"name": name, "source_tokens": int(ids.size), "starts": starts, "windows": _cut(ids, starts, L)})
    sets = {"val": {"source": str(args.val_zip), "groups": groups}}
    if args.dickens is not None:
        corpus = load_corpus(str(args.dickens))
        ids = np.concatenate(tok.encode_batch_np(corpus.documents, dtype=np.int64))
        starts = spread_windows(ids.size, args.dickens_windows, L)
        sets["dickens"] = {
            "source": str(args.dickens),
            "corpus_hash": corpus.hash,
            "groups": [
                {"name": corpus.name, "source_tokens": int(ids.size), "starts": starts, "windows": _cut(ids, starts, L)}
            ],
        }
    for s in sets.values():
        h = hashlib.sha256()
        for g in s["groups"]:
            for w in g["windows"]:
                h.update(w.astype("<i8").tobytes())
        s["tokens_sha256"] = h.hexdigest()
        s["scored_tokens"] = L * sum(len(g["windows"]) for g in s["groups"])
    return sets


def _cut(ids: np.ndarray, starts: list[int], L: int) -> list[np.ndarray]:
    return [ids[s : s + L + 1] for s in starts]


def describe_sets(sets: dict[str, Any]) -> dict[str, Any]:
    """The evaluation sets as the JSON records them (no tokens)."""
    return {
        key: {
            **{k: v for k, v in s.items() if k != "groups"},
            "groups": [{k: v for k, v in g.items() if k != "windows"} for g in s["groups"]],
        }
        for key, s in sets.items()
    }


def score(model, sets: dict[str, Any], seq_len: int, ctx: RunContext) -> dict[str, Any]:
    """Per set: token-weighted loss and perplexity overall and per group (book)."""
    out: dict[str, Any] = {}
    for key, s in sets.items():
        total_loss = total_tokens = 0.0
        per_group = {}
        for g in s["groups"]:
            g_loss = g_tokens = 0.0
            for w in g["windows"]:
                r = evaluate_lm(model, w, seq_len=seq_len, batch_size=1, ctx=ctx, prefix="")
                g_loss += r["loss"] * r["tokens"]
                g_tokens += r["tokens"]
            per_group[g["name"]] = {
                "loss": g_loss / g_tokens,
                "ppl": float(np.exp(g_loss / g_tokens)),
                "tokens": int(g_tokens),
            }
            total_loss += g_loss
            total_tokens += g_tokens
        out[key] = {
            "loss": total_loss / total_tokens,
            "ppl": float(np.exp(total_loss / total_tokens)),
            "tokens": int(total_tokens),
            "groups": per_group,
        }
    return out


# --------------------------------------------------------------------------- one row
def kv_bytes_per_token(model) -> dict[str, float]:
    """Measured from caches allocated for the model: bytes per cached token, all layers."""
    out = {}
    for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        cache = KVCache(model.cache_layout(), batch_size=1, max_len=16, dtype=dtype, device="cpu")
        out[name] = cache.measured_bytes_per_token
    return out


def greedy(model, tok, prompt: str, n: int, device: torch.device) -> str:
    ids = torch.tensor([tok.encode(prompt)], device=device)
    out = model.generate(ids, n, temperature=0.0, cuda_graph=False)
    return tok.decode(out[0, ids.shape[1] :].tolist())


def evaluate_run(run: Path, args, sets, tok, ctx: RunContext) -> dict[str, Any]:
    model = load_model(run / "model.safetensors", device=ctx.device).eval()
    cfg = model.config
    t0 = time.perf_counter()
    scores = score(model, sets, args.seq_len, ctx)
    row = {
        "target": cfg.variant.paper_name,
        "variant": cfg.variant.id,
        "kv_heads": cfg.n_kv_heads,
        "query_heads": cfg.n_heads,
        "cached_tensors_per_layer": cfg.variant.cached_tensors,
        "val_ppl": {name: g["ppl"] for name, g in scores["val"]["groups"].items()},
        "val_ppl_all": scores["val"]["ppl"],
        "val_loss_all": scores["val"]["loss"],
        "val_tokens": scores["val"]["tokens"],
    }
    if "dickens" in scores:
        row.update(
            dickens_ppl=scores["dickens"]["ppl"],
            dickens_loss=scores["dickens"]["loss"],
            dickens_tokens=scores["dickens"]["tokens"],
        )
    row["val_loss"] = {name: g["loss"] for name, g in scores["val"]["groups"].items()}
    kv = kv_bytes_per_token(model)
    row["kv_cache_bytes_per_token"], row["kv_cache_bytes_per_token_fp32"] = kv["bf16"], kv["fp32"]
    row["params"] = count_params(model)["total"]
    row["greedy_continuation"] = greedy(model, tok, args.prompt, args.new_tokens, ctx.device)
    row["wall_s_eval"] = round(time.perf_counter() - t0, 1)
    del model
    return row


def study_row(
    model_name: str,
    to: str | None,
    init: str | None,
    ev: dict[str, Any],
    *,
    checkpoint: Path,
    conversion: dict[str, Any] | None,
    device: str,
    dtype: str,
    commit: tuple[str | None, bool | None],
    t0: float,
    uptrain_tokens: int = 0,
    uptrain: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One row of the results JSON from :func:`evaluate_run`'s ``ev``; ``uptrain_tokens`` is 0 for a
    conversion scored as written, else the tokens it was trained on from there (``uptrain`` says how)."""
    ev = dict(ev)
    return {
        "model": model_name,
        "target": ev.pop("target"),
        "variant": ev.pop("variant"),
        "to": to,
        "init": init,
        "kv_heads": ev.pop("kv_heads"),
        "uptrain_tokens": uptrain_tokens,
        "uptrain": uptrain,
        **ev,
        "checkpoint": str(checkpoint),
        "conversion": conversion,
        "device": device,
        "dtype": dtype,
        "git_commit": commit[0],
        "git_dirty": commit[1],
        "wall_s": round(time.perf_counter() - t0, 1),
    }


def relative_to_source(rows: list[dict[str, Any]]) -> None:
    """Set each row's cache reduction and perplexity ratios against the source row (``to`` null,
    not uptrained), in place; and, where the source was uptrained on as many tokens (the control),
    the ratio to that row too (``val_ppl_ratio_same_tokens``, ``dickens_ppl_ratio_same_tokens``)."""
    src = next(r for r in rows if r["to"] is None and r["uptrain_tokens"] == 0)
    controls = {r["uptrain_tokens"]: r for r in rows if r["to"] is None}
    for row in rows:
        row["kv_cache_reduction"] = 1.0 - row["kv_cache_bytes_per_token"] / src["kv_cache_bytes_per_token"]
        row["val_ppl_ratio"] = row["val_ppl_all"] / src["val_ppl_all"]
        if "dickens_ppl" in row:
            row["dickens_ppl_ratio"] = row["dickens_ppl"] / src["dickens_ppl"]
        control = controls.get(row["uptrain_tokens"])
        if control is None:
            continue
        row["val_ppl_ratio_same_tokens"] = row["val_ppl_all"] / control["val_ppl_all"]
        if "dickens_ppl" in row and "dickens_ppl" in control:
            row["dickens_ppl_ratio_same_tokens"] = row["dickens_ppl"] / control["dickens_ppl"]


REFIT, POOL_FIT = "refit", "poolfit"


class Recipe(NamedTuple):
    """How a conversion was made: ``qkvlab convert --init`` (None for pooling alone), ``--pool``
    and ``--refit-output``."""

    init: str | None
    pool: str = "mean"
    refit: bool = False


def split_recipe(label: str | None) -> Recipe:
    """A row's ``init`` label -> :class:`Recipe`. The label is ``+``-joined parts in this order: the
    init, ``poolfit`` (``--pool fit``), ``refit`` (``--refit-output``); e.g. ``fit+refit``,
    ``fit+poolfit+refit``, or ``poolfit+refit`` for head pooling alone. Unknown or misordered parts
    come back unchanged in ``init`` (``parse_conversion`` refuses them)."""
    if label is None:
        return Recipe(None)
    parts = label.split("+")
    refit = parts[-1] == REFIT
    parts = parts[:-1] if refit else parts
    pool = "fit" if parts and parts[-1] == POOL_FIT else "mean"
    parts = parts[:-1] if pool == "fit" else parts
    return Recipe("+".join(parts) or None, pool, refit)


def recipe_label(init: str | None, refit: bool = False, pool: str | None = "mean") -> str | None:
    """The inverse of :func:`split_recipe`."""
    parts = [p for p in (init, POOL_FIT if pool == "fit" else None, REFIT if refit else None) if p]
    return "+".join(parts) or None


def parse_conversion(spec: str) -> tuple[str, str | None]:
    """``TO:INIT`` for a K=V target (``Q-K=V:fit``), ``TO`` alone for head pooling only (``MQA``);
    ``+poolfit`` (``--pool fit``) and then ``+refit`` (``--refit-output``) after the init
    (``Q-MQA:fit+poolfit+refit``), or in place of it for pooling alone (``MQA:poolfit``,
    ``MQA:refit``). Returns (to, the row's init label)."""
    to, sep, label = spec.rpartition(":") if ":" in spec else (spec, "", None)
    if not to or (sep and not label):
        raise SystemExit(f"--convert takes TO:INIT (e.g. Q-K=V:fit) or TO (e.g. MQA), got {spec!r}")
    try:
        shared = VariantSpec.parse(to).kv_shared
    except ConfigError as e:
        raise SystemExit(f"--convert {spec!r}: {e}") from None
    r = split_recipe(label)
    if r.init is not None and r.init not in INITS:
        raise SystemExit(
            f"--convert {spec!r}: the init is one of {', '.join(INITS)}, optionally followed by +{POOL_FIT} and then "
            f"+{REFIT} (e.g. {to}:fit+{REFIT})"
        )
    if shared and r.init is None:
        raise SystemExit(f"--convert {spec!r}: a K=V target needs an init (key, value, mean or fit): {to}:mean")
    if not shared and r.init is not None:
        raise SystemExit(
            f"--convert {spec!r}: {to} keeps separate K and V, so it takes no init; write {to} (or {to}:{REFIT})"
        )
    return to, label


def convert_command(run: Path, out: Path, to: str, label: str | None, args) -> str:
    r = split_recipe(label)
    cmd = f"qkvlab convert {run} {out} --to {to}{f' --init {r.init}' if r.init else ''} --device {args.device} --force"
    if r.init == "fit" or r.refit or r.pool == "fit":
        cmd += f" --calib {args.calib} --calib-tokens {args.calib_tokens} --calib-seq-len {args.calib_seq_len}"
    if r.pool == "fit":
        cmd += " --pool fit"
    if r.refit:
        cmd += " --refit-output"
    return cmd


# --------------------------------------------------------------------------- report
def _num(x: float) -> str:
    return f"{x:.2f}" if x < 1000 else f"{x:,.0f}"


def table_order(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows with each conversion's uptrained rows after its no-training row, by tokens; the
    conversions in the order they first appear."""
    first: dict[tuple, int] = {}
    for r in rows:
        first.setdefault((r["to"], r["init"]), len(first))
    return sorted(rows, key=lambda r: (first[r["to"], r["init"]], r["uptrain_tokens"]))


def markdown_table(result: dict[str, Any]) -> str:
    """The rows as Markdown tables (what results/convert-smollm2/README.md shows): all val books
    and Dickens, then per val book (with a column of uptraining tokens when some row has them)."""
    rows = table_order(result["rows"])
    # With an uptrained source (the control), each row is also set against the source trained on as many tokens.
    control = any(r["to"] is None and r["uptrain_tokens"] for r in rows)
    lines = [
        "| model | init | KV heads | uptrain tokens | KV cache B/token (bf16) | cache vs source | val ppl "
        "| Dickens ppl | val ppl / source's | "
        + ("val ppl / source's at the same tokens | " if control else "")
        + "key / value error (calib.) | greedy continuation | wall s |",
        "|" + "---|" * (12 + control),
    ]

    def name(r: dict[str, Any]) -> str:
        return f"{r['target']}{' (source)' if r['to'] is None else ''} | {r['init'] or ''}"

    for r in rows:
        conv = r.get("conversion") or {}
        err = conv.get("mean_key_error")
        err = f"{err:.3f} / {conv['mean_value_error']:.3f}" if err is not None else ""
        cont = json.dumps(r["greedy_continuation"], ensure_ascii=False)[1:-1].replace("|", "\\|")
        dickens = _num(r["dickens_ppl"]) if "dickens_ppl" in r else ""
        same = ""
        if control:
            same = f"{_num(r['val_ppl_ratio_same_tokens']) if 'val_ppl_ratio_same_tokens' in r else ''} | "
        lines.append(
            f"| {name(r)} | {r['kv_heads']} | {r['uptrain_tokens']:,} | {r['kv_cache_bytes_per_token']:,.0f} "
            f"| {-r.get('kv_cache_reduction', 0.0) or 0.0:.0%} | {_num(r['val_ppl_all'])} | {dickens} "
            f"| {_num(r.get('val_ppl_ratio', 1.0))} | {same}{err} | `{cont}` | {r['wall_s']:.0f} |"
        )
    books = list(rows[0]["val_ppl"]) if rows else []
    uptrained = any(r["uptrain_tokens"] for r in rows)
    tokens_head = "uptrain tokens | " if uptrained else ""
    lines += [
        "",
        f"| model | init | {tokens_head}" + " | ".join(b.split("__")[0] for b in books) + " |",
        "|" + "---|" * (2 + int(uptrained) + len(books)),
    ]
    for r in rows:
        tokens = f"{r['uptrain_tokens']:,} | " if uptrained else ""
        lines.append(f"| {name(r)} | {tokens}" + " | ".join(_num(r["val_ppl"][b]) for b in books) + " |")
    return "\n".join(lines)


def harness_results(root: Path) -> dict[str, list[dict[str, Any]]]:
    """The ``harness.json`` files under ``root`` (``qkvlab eval harness`` wrote one into each model
    folder on the machine that held the checkpoints), by the name of the folder they scored."""
    out: dict[str, list[dict[str, Any]]] = {}
    for path in sorted(root.rglob("harness.json")):
        doc = json.loads(path.read_text())
        if doc.get("format") != "qkvlab-harness/1":
            raise SystemExit(f"{path}: not a harness.json of qkvlab eval harness")
        for r in doc["rows"]:
            checkpoint = Path(r["checkpoint"])
            folder = checkpoint.parent if checkpoint.suffix == ".safetensors" else checkpoint
            out.setdefault(folder.name, []).append(r)
    return out


def harness_table(result: dict[str, Any], root: Path) -> str:
    """Zero-shot accuracy of each row's model (lm-eval's ``acc``, in points, ± its standard error),
    the five tasks' mean, its change against the source trained on as many tokens (the control;
    else the source as it came) and LAMBADA; a row whose folder has no harness.json is left out."""
    scored = harness_results(root)
    order = []  # (row, its summary) for the rows whose folder was scored, in table order
    for r in table_order(result["rows"]):
        rows = scored.get(Path(r["checkpoint"]).name) if r.get("checkpoint") else None
        if rows:
            order.append((r, {**run_summary({(x["task"], x["metric"]): x for x in rows}), "n": rows[0].get("n")}))
    controls = {r["uptrain_tokens"]: s for r, s in order if r["to"] is None}

    lines = [
        "| model | init | uptrain tokens | "
        + " | ".join(TASK_LABEL[t] for t in PAPER_TASKS)
        + " | Avg | Δ Avg vs source | LAMBADA acc | LAMBADA ppl | items a task |",
        "|" + "---|" * (len(PAPER_TASKS) + 8),
    ]
    for r, s in order:
        base = controls.get(r["uptrain_tokens"], controls.get(0))
        delta = ""
        if r["to"] is not None and base is not None and s["avg"] is not None and base["avg"] is not None:
            errs = (s["avg_stderr"], base["avg_stderr"])  # combined as if independent: different models
            delta = points(s["avg"] - base["avg"], None if None in errs else math.hypot(*errs), signed=True)
        accs = " | ".join(points(s["acc"][t], s["acc_stderr"][t]) for t in PAPER_TASKS)
        ppl = "-" if s["lambada_ppl"] is None else f"{s['lambada_ppl']:.1f}"
        lambada = points(s["lambada_acc"], s["lambada_acc_stderr"])
        lines.append(
            f"| {r['target']}{' (source)' if r['to'] is None else ''} | {r['init'] or ''} | {r['uptrain_tokens']:,} "
            f"| {accs} | {points(s['avg'], s['avg_stderr'])} | {delta} | {lambada} | {ppl} | {s['n'] or ''} |"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------- main
def hardware(device: torch.device) -> dict[str, Any]:
    if device.type == "cuda":
        return {"device": torch.cuda.get_device_name(device), "cuda": torch.version.cuda}
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"device": "cpu", "cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads()}


def versions() -> dict[str, str]:
    import tokenizers

    import qkvlab

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "tokenizers": tokenizers.__version__,
        "qkvlab": qkvlab.__version__,
    }


def scoring_context(args: argparse.Namespace) -> tuple[torch.device, RunContext]:
    """The device and autocast the scoring runs under (``--threads``, ``--device``, ``--amp``);
    ``args.device`` is resolved in place, so the rows name the device that ran."""
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    return device, RunContext(device=device, amp_dtype=torch.bfloat16 if args.amp == "bf16" else None)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "run",
        type=Path,
        help="the source run folder (model.safetensors + tokenizer/), or a results "
        "JSON of this script, whose table is then printed",
    )
    p.add_argument("--model-name", default="SmolLM2-135M-Instruct", help="the 'model' field of every row")
    p.add_argument("--work", type=Path, default=Path("/tmp/convert-smollm2"), help="where conversions are written")
    p.add_argument("--convert", action="append", default=None, metavar="TO:INIT",
                   help=f"a conversion (repeatable; default: {' '.join(DEFAULT_CONVERSIONS)})")  # fmt: skip
    p.add_argument("--val-zip", type=Path, default=Path("../shared/data/gutenberg/gutenberg-val.zip"))
    p.add_argument("--windows-per-book", type=int, default=2)
    p.add_argument("--dickens", default="../shared/data/dickens/dickens.zip", help="a corpus source, or '' for none")
    p.add_argument("--dickens-windows", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--calib", default="../shared/data/gutenberg/gutenberg-train.zip", help="calibration text for fit")
    p.add_argument("--calib-tokens", type=int, default=32768)
    p.add_argument("--calib-seq-len", type=int, default=512)
    p.add_argument("--prompt", default="The capital of France is")
    p.add_argument("--new-tokens", type=int, default=8)
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--amp", choices=("none", "bf16"), default="none", help="bf16 autocast for the scoring (GPU)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--resume", action="store_true", help="keep rows of --out made with the same settings")
    p.add_argument("--out", type=Path, default=None, help="the results JSON (required unless RUN is one)")
    p.add_argument("--harness", type=Path, default=None, help="with a results JSON: its models' harness.json folder")
    args = p.parse_args(argv)
    if args.run.suffix == ".json":
        result = json.loads(args.run.read_text())
        print(markdown_table(result))
        if args.harness is not None:
            print("\n" + harness_table(result, args.harness))
        return result
    if args.out is None:
        p.error("--out is required")
    args.dickens = args.dickens or None
    device, ctx = scoring_context(args)
    conversions = [parse_conversion(s) for s in (args.convert or DEFAULT_CONVERSIONS)]
    started, t_start = now(), time.perf_counter()

    tok = get_tokenizer(f"bpe:{args.run / 'tokenizer'}")
    sets = eval_sets(args, tok)
    commit, dirty = code_version()
    interop_file = args.run / "interop.json"
    interop = json.loads(interop_file.read_text()) if interop_file.is_file() else {}
    settings = {
        "seq_len": args.seq_len,
        "eval": describe_sets(sets),
        "prompt": args.prompt,
        "new_tokens": args.new_tokens,
        "calibration": {"source": args.calib, "tokens": args.calib_tokens, "seq_len": args.calib_seq_len},
    }
    for key, s in settings["eval"].items():
        print(f"{key}: {len(s['groups'])} group(s), {s['scored_tokens']:,} tokens, sha256 {s['tokens_sha256'][:12]}")
    result: dict[str, Any] = {
        "schema": SCHEMA,
        "study": "conversion study, no training: a pretrained QKV/GQA model converted to K=V and fewer KV heads",
        "model": args.model_name,
        "source_run": str(args.run),
        "source": interop.get("source"),
        **settings,
        "dtype": "float32" + (" (bf16 autocast)" if args.amp == "bf16" else ""),
        "hardware": hardware(device),
        "versions": versions(),
        "git_commit": commit,
        "git_dirty": dirty,
        "started": started,
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "rows": [],
    }
    done: dict[tuple, dict] = {}
    if args.resume and args.out.is_file():
        old = json.loads(args.out.read_text())
        differ = [k for k, v in settings.items() if old.get(k) != v]
        if differ:
            raise SystemExit(f"--resume: {args.out} was made with other {', '.join(differ)}; give another --out")
        done = {(r["to"], r["init"], r["uptrain_tokens"]): r for r in old.get("rows", [])}
        earlier = ("started", "finished", "command", "hardware", "versions", "git_commit", "git_dirty", "wall_s")
        result["earlier_runs"] = [*old.get("earlier_runs", []), {k: old.get(k) for k in earlier}]
        result.update({k: old[k] for k in ("uptrain_baseline", "uptrain_runs") if k in old})  # uptrain_study.py's
        print(f"resuming: {len(done)} row(s) of {args.out} kept")

    def save() -> None:
        result["finished"] = now()
        result["wall_s"] = round(time.perf_counter() - t_start, 1)
        atomic_write(args.out, lambda tmp: Path(tmp).write_text(json.dumps(result, indent=2) + "\n"))

    plan: list[tuple[str | None, str | None]] = [(None, None), *conversions]
    for to, init in plan:
        label = "source" if to is None else to + (f" init {init}" if init else "")
        t0 = time.perf_counter()
        kept = done.pop((to, init, 0), None)
        # A row whose conversion is not on this machine is made again: what comes after (the
        # uptraining) starts from that folder. Its scores come out the same on the same kind of device.
        if kept is not None and (to is None or (Path(kept["checkpoint"]) / "model.safetensors").is_file()):
            result["rows"].append(kept)
            print(f"{label}: kept", flush=True)
            continue
        if kept is not None:
            print(f"{label}: {kept['checkpoint']} is not here; converting again", flush=True)
        if to is None:
            run, conversion = args.run, None
        else:
            run = args.work / (to.replace("=", "").lower() + (f"-{init.replace('+', '-')}" if init else ""))
            r = split_recipe(init)
            report = convert_checkpoint(
                args.run,
                run,
                to=to,
                init=r.init or "mean",  # not used when the target keeps separate K and V
                refit_output=r.refit,
                pool=r.pool,
                calib=args.calib if r.init == "fit" or r.refit or r.pool == "fit" else None,
                calib_tokens=args.calib_tokens,
                calib_seq_len=args.calib_seq_len,
                device=args.device,
                force=True,
            )
            conversion = {
                "command": convert_command(args.run, run, to, init, args),
                "notes": report["notes"],
                "calibration": report["calibration"],
                "mean_key_error": report.get("mean_key_error"),
                "mean_value_error": report.get("mean_value_error"),
                "mean_output_error_before_refit": report.get("mean_output_error_before_refit"),
                "mean_output_error": report.get("mean_output_error"),
                "wall_s": round(time.perf_counter() - t0, 1),
            }
        ev = evaluate_run(run, args, sets, tok, ctx)
        row = study_row(
            args.model_name,
            to,
            init,
            ev,
            checkpoint=run,
            conversion=conversion,
            device=result["hardware"]["device"],
            dtype=result["dtype"],
            commit=(commit, dirty),
            t0=t0,
        )
        result["rows"].append(row)
        save()
        dk = f", Dickens {row['dickens_ppl']:.2f}" if "dickens_ppl" in row else ""
        print(
            f"{label} -> {row['target']}: val {row['val_ppl_all']:.2f}{dk}, "
            f"{row['kv_cache_bytes_per_token']:.0f} B/token (bf16), {row['greedy_continuation']!r}, "
            f"{row['wall_s']:.0f} s",
            flush=True,
        )
    others = list(done.values())  # popped above: the rows of the plan
    if others:  # rows of the file this run was not asked for (uptrained ones, say) stay, after the plan's
        print(f"kept {len(others)} other row(s) of {args.out}")
        result["rows"].extend(others)
    relative_to_source(result["rows"])
    save()
    print(markdown_table(result))
    return result


if __name__ == "__main__":
    main()
