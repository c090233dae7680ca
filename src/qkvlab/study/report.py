"""The report of a study: paper-style markdown tables and PNG plots, from its results files only.

:func:`write_report` reads ``results.jsonl`` and each run's ``metrics.jsonl`` (never a typed-in
number) and writes ``report/report.md`` plus PNGs:

* a table per (model, token budget) in the layout of the paper's Table 4: per variant the
  validation loss and perplexity as mean ± std over seeds (n shown), the perplexity change vs
  QKV in %, KV-cache bytes per token (bf16) and their reduction vs QKV, parameters and training
  tokens/s (decode tokens/s too when runs report it);
* loss curves per variant (training loss and validation loss vs tokens) for each table;
* cache reduction vs perplexity change, the points labelled and the Pareto front drawn;
* for ladders (more than one model size or token budget): validation loss vs parameters and
  vs tokens per variant, log x;
* the grid points that were skipped (with the reason) and the runs that failed.

Plots use matplotlib's object API with the Agg canvas (no pyplot, no global backend change);
matplotlib is imported only when plotting.
"""

from __future__ import annotations

import os
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from qkvlab.attention.variant import PAPER_LM_VARIANTS, VariantSpec
from qkvlab.checkpoint import atomic_write
from qkvlab.errors import ConfigError
from qkvlab.study.results import STATUS_FAILED, STATUS_OK, STATUS_SKIPPED, ResultsStore, read_metrics
from qkvlab.study.sweep import format_tokens

REPORT_DIR = "report"
CONTEXT = 32768  # the context at which the paper quotes cache sizes (Table 7)

GroupKey = tuple[str, int | None, int | None]  # (model, token budget, max_steps when there is no budget)


# ================================================================== statistics
def mean_std(values: Iterable[float | None]) -> tuple[float | None, float | None, int]:
    """(mean, sample standard deviation, n) of the values that are not None; std is None for n < 2."""
    xs = [float(v) for v in values if v is not None]
    if not xs:
        return None, None, 0
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else None), len(xs)


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats: larger x (cache reduction) and smaller y (PPL change)."""
    front = []
    for i, (xi, yi) in enumerate(points):
        dominated = any((xj >= xi and yj <= yi) and (xj > xi or yj < yi) for j, (xj, yj) in enumerate(points) if j != i)
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: points[i][0])


def is_baseline(variant_id: str) -> bool:
    """QKV: three projections, one KV head per query head, no 2D fix or QK-norm."""
    spec = VariantSpec.parse(variant_id)
    return spec.sharing == "q_k_v" and spec.n_kv_heads is None and not spec.pos2d and not spec.qk_norm


def _variant_order(variant_id: str) -> tuple[int, str]:
    name = VariantSpec.parse(variant_id).paper_name
    rank = PAPER_LM_VARIANTS.index(name) if name in PAPER_LM_VARIANTS else len(PAPER_LM_VARIANTS)
    return (-1 if is_baseline(variant_id) else rank, variant_id)


@dataclass
class VariantStats:
    """One table row: a variant at one model size and token budget, over its seeds."""

    variant_id: str
    label: str
    rows: list[dict[str, Any]]
    val_loss: tuple[float | None, float | None, int]
    val_ppl: tuple[float | None, float | None, int]
    ppl_change: float | None = None
    baseline: bool = False

    def first(self, key: str) -> Any:
        """A value that is the same for every seed (cache bytes, parameters): the first one present."""
        return next((r[key] for r in self.rows if r.get(key) is not None), None)

    def mean(self, key: str) -> float | None:
        return mean_std(r.get(key) for r in self.rows)[0]


def group_key(row: dict[str, Any]) -> GroupKey:
    budget = row.get("tokens_budget")
    return (str(row.get("model")), budget, None if budget is not None else row.get("max_steps"))


def budget_label(key: GroupKey) -> str:
    """``1e6 tokens``, or ``400 steps`` for runs without a token budget."""
    _, budget, steps = key
    return f"{format_tokens(budget)} tokens" if budget is not None else f"{steps} steps"


def group_label(key: GroupKey) -> str:
    return f"{key[0]}, {budget_label(key)}"


def summarize_group(rows: list[dict[str, Any]]) -> list[VariantStats]:
    """Table rows for the finished runs of one (model, budget): QKV first, then the paper's order."""
    by_variant: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_variant.setdefault(row["variant_id"], []).append(row)
    ids = sorted(by_variant, key=_variant_order)
    names = [VariantSpec.parse(v).paper_name for v in ids]
    stats = []
    for vid, name in zip(ids, names, strict=True):
        label = name if names.count(name) == 1 else f"{name} (`{vid}`)"
        group = sorted(by_variant[vid], key=lambda r: r.get("seed", 0))
        stats.append(
            VariantStats(
                variant_id=vid,
                label=label,
                rows=group,
                val_loss=mean_std(r.get("val_loss") for r in group),
                val_ppl=mean_std(r.get("val_ppl") for r in group),
                baseline=is_baseline(vid),
            )
        )
    base = next((s for s in stats if s.baseline and s.val_ppl[0]), None)
    for s in stats:
        if base is not None and s.val_ppl[0] is not None:
            s.ppl_change = s.val_ppl[0] / base.val_ppl[0] - 1.0
    return stats


# ================================================================== formatting
def fmt_mean_std(stat: tuple[float | None, float | None, int], digits: int) -> str:
    mean, std, _ = stat
    if mean is None:
        return "n/a"
    return f"{mean:.{digits}f}" if std is None else f"{mean:.{digits}f} ± {std:.{digits}f}"


def fmt_pct(x: float | None, *, signed: bool = True, digits: int = 2) -> str:
    if x is None:
        return "n/a"
    return f"{x * 100:+.{digits}f}%" if signed else f"{x * 100:.{digits}f}%"


def fmt_count(n: float | None) -> str:
    """1234567 -> ``1.23M``; 40960 -> ``41.0k``."""
    if n is None:
        return "n/a"
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{suffix}" if suffix != "k" else f"{n / scale:.1f}k"
    return f"{n:g}"


def fmt_bytes(n: float | None) -> str:
    """Bytes in binary units: 2684354560 -> ``2.50 GiB``."""
    if n is None:
        return "n/a"
    for scale, unit in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def fmt_rate(x: float | None) -> str:
    return "n/a" if x is None else f"{x:,.0f}"


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return lines


def variant_table(stats: list[VariantStats], *, decode: bool) -> list[str]:
    """The paper-style table of one (model, budget) group as markdown lines."""
    header = [
        "Variant",
        "n",
        "Val loss",
        "Val PPL",
        "Δ PPL vs QKV",
        "KV cache B/token",
        f"KV cache @{CONTEXT // 1024}k",
        "Cache reduction",
        "Params",
        "Attn params",
        "Train tok/s",
    ] + (["Decode tok/s"] if decode else [])
    body = []
    for s in stats:
        kv = s.first("kv_cache_bytes_per_token")
        cells = [
            s.label,
            str(s.val_ppl[2] or len(s.rows)),
            fmt_mean_std(s.val_loss, 4),
            fmt_mean_std(s.val_ppl, 2),
            "baseline" if s.baseline else fmt_pct(s.ppl_change),
            "n/a" if kv is None else f"{kv:,}",
            fmt_bytes(None if kv is None else kv * CONTEXT),
            fmt_pct(s.first("cache_reduction"), signed=False, digits=1),
            fmt_count(s.first("params_total")),
            fmt_count(s.first("params_attention")),
            fmt_rate(s.mean("train_tokens_per_s")),
        ] + ([fmt_rate(s.mean("decode_tokens_per_s"))] if decode else [])
        body.append(cells)
    return markdown_table(header, body)


# ================================================================== plots
def _figure(width: float = 7.0, height: float = 4.5):
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ConfigError(
            "The report's plots need matplotlib, which is not installed: pip install 'qkvlab[plots]' "
            "(or call write_report(study_dir, plots=False) for the tables alone)."
        ) from None
    return Figure(figsize=(width, height), layout="constrained")


def _save(fig, path: Path) -> Path:
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    return path


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "-" for c in text).strip("-")


def plot_loss_curves(stats: list[VariantStats], study_dir: Path, path: Path, title: str, colors: dict) -> Path | None:
    """Training loss (solid) and validation loss (dashed, dots) vs tokens; one colour per variant."""
    curves = []
    for s in stats:
        for row in s.rows:
            if not row.get("out_dir"):
                continue
            metrics = read_metrics(study_dir / row["out_dir"])
            train = [(m["tokens"], m["loss"]) for m in metrics if m.get("loss") is not None and m.get("tokens")]
            val = [(m["tokens"], m["val_loss"]) for m in metrics if m.get("val_loss") is not None and m.get("tokens")]
            if train or val:
                curves.append((s, train, val))
    if not curves:
        return None
    fig = _figure()
    ax = fig.add_subplot()
    labelled: set[str] = set()
    for s, train, val in curves:
        color = colors[s.variant_id]
        label = None if s.variant_id in labelled else s.label
        labelled.add(s.variant_id)
        if train:
            ax.plot(*zip(*train, strict=True), color=color, lw=1.0, alpha=0.7, label=label)
            label = None
        if val:
            ax.plot(*zip(*val, strict=True), color=color, lw=1.5, ls="--", marker="o", ms=3, label=label)
    ax.set_xlabel("training tokens")
    ax.set_ylabel("loss (nats / token)")
    ax.set_title(f"{title}: training loss (solid), validation loss (dashed)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    return _save(fig, path)


def plot_pareto(stats: list[VariantStats], path: Path, title: str, colors: dict) -> Path | None:
    """KV-cache reduction (x, %) vs perplexity change vs QKV (y, %), the Pareto front dashed."""
    pts = [
        (s, 100 * s.first("cache_reduction"), 100 * s.ppl_change)
        for s in stats
        if s.ppl_change is not None and s.first("cache_reduction") is not None
    ]
    if len(pts) < 2:
        return None
    base_ppl = next(s.val_ppl[0] for s in stats if s.baseline)
    fig = _figure()
    ax = fig.add_subplot()
    for s, x, y in pts:
        std = s.val_ppl[1]
        ax.errorbar(x, y, yerr=None if std is None else 100 * std / base_ppl, fmt="o", color=colors[s.variant_id])
        ax.annotate(s.label, (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
    front = pareto_front([(x, y) for _, x, y in pts])
    fx, fy = [pts[i][1] for i in front], [pts[i][2] for i in front]
    ax.plot(fx, fy, ls="--", marker="o", ms=11, mfc="none", color="0.4", lw=1, label="Pareto front")
    ax.margins(x=0.12, y=0.12)
    ax.axhline(0.0, color="0.7", lw=0.8)
    ax.set_xlabel("KV-cache reduction vs QKV (%)")
    ax.set_ylabel("validation PPL change vs QKV (%), bars: 1 std", fontsize=9)
    ax.set_title(f"{title}: KV cache saved vs perplexity paid", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_ladder(
    series: dict[str, list[tuple[float, tuple[float | None, float | None, int]]]],
    labels: dict[str, str],
    colors: dict,
    path: Path,
    *,
    xlabel: str,
    title: str,
) -> Path:
    """Validation loss (mean, error bar 1 std) vs ``xlabel`` on a log axis, one line per variant."""
    fig = _figure()
    ax = fig.add_subplot()
    for vid, points in series.items():
        points = sorted(p for p in points if p[1][0] is not None)
        xs = [x for x, _ in points]
        ys = [st[0] for _, st in points]
        err = [st[1] or 0.0 for _, st in points]
        ax.errorbar(xs, ys, yerr=err, marker="o", ms=4, capsize=3, color=colors[vid], label=labels[vid])
    ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("validation loss (nats / token)")
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, ncol=2)
    return _save(fig, path)


# ================================================================== the report
def _study_name(study_dir: Path) -> str:
    sweep = study_dir / "sweep.yaml"
    try:
        name = (yaml.safe_load(sweep.read_text()) or {}).get("name") if sweep.is_file() else None
    except (OSError, yaml.YAMLError, AttributeError):
        name = None
    return str(name or study_dir.resolve().name)


def _commits(rows: list[dict[str, Any]]) -> str:
    counts: dict[str, int] = {}
    for row in rows:
        commit = row.get("git_commit")
        key = f"`{commit[:12]}`" if commit else "unknown"
        if commit and row.get("git_dirty"):
            key += " + uncommitted changes"
        counts[key] = counts.get(key, 0) + 1
    return ", ".join(f"{k} ({n} run{'s' if n != 1 else ''})" for k, n in counts.items()) or "none"


def write_report(study_dir: str | os.PathLike, *, plots: bool = True) -> Path:
    """Write ``study_dir/report/report.md`` (+ PNGs when ``plots``) and return the markdown's path."""
    study = Path(study_dir)
    store = ResultsStore(study)
    if not store.path.is_file():
        raise ConfigError(
            f"No {store.path.name} in {str(study)!r}; pass the folder of a study that `qkvlab sweep` has filled."
        )
    latest = list(store.latest().values())
    ok = [r for r in latest if r.get("status") == STATUS_OK]
    skipped = [r for r in latest if r.get("status") == STATUS_SKIPPED]
    failed = [r for r in latest if r.get("status") == STATUS_FAILED]
    out = study / REPORT_DIR
    out.mkdir(parents=True, exist_ok=True)

    groups: dict[GroupKey, list[dict[str, Any]]] = {}
    for row in ok:
        groups.setdefault(group_key(row), []).append(row)

    def size(key: GroupKey) -> tuple[float, float, float]:
        params = mean_std(r.get("params_total") for r in groups[key])[0] or 0.0
        return (params, key[1] or 0, key[2] or 0)

    order = sorted(groups, key=size)
    all_ids = sorted({r["variant_id"] for r in ok}, key=_variant_order)
    colors = {vid: f"C{i % 10}" for i, vid in enumerate(all_ids)}
    decode = any(r.get("decode_tokens_per_s") is not None for r in ok)
    finished = sorted(r["finished"] for r in ok if r.get("finished"))
    cache_dtype = ", ".join(sorted({str(r["kv_cache_dtype"]) for r in ok if r.get("kv_cache_dtype")})) or "bf16"

    lines = [
        f"# Study report: {_study_name(study)}",
        "",
        f"Computed from `{study / store.path.name}` ({len(ok)} finished runs, {len(skipped)} skipped grid "
        f"points, {len(failed)} failed runs) and the `metrics.jsonl` of each run folder under `{study / 'runs'}`; "
        "no number in this report is typed in.",
        "",
        f"- Code (git commit of the runs): {_commits(ok)}.",
    ]
    if finished:
        lines.append(f"- Runs finished between {finished[0]} and {finished[-1]}.")
    lines += [
        "- Val loss: mean cross-entropy per token (nats) on the validation split; PPL = exp(loss). Cells show "
        "mean ± sample standard deviation over seeds, n runs.",
        "- Δ PPL vs QKV: mean PPL of the variant over mean PPL of QKV at the same model size and token budget, "
        "minus 1. With few seeds, read a change smaller than about twice the spread as no difference.",
        f"- KV cache: bytes per token over all layers for a {cache_dtype} cache (the paper counts 2 bytes), and at a "
        f"{CONTEXT:,}-token context; reduction against QKV of the same shape. Params: all parameters, "
        "embeddings included; Attn params: the attention layers alone.",
        "",
    ]

    written: set[Path] = set()
    for key in order:
        stats = summarize_group(groups[key])
        title = group_label(key)
        trained = mean_std(r.get("tokens") for r in groups[key])[0]
        seeds = sorted({r.get("seed") for r in groups[key]})
        lines += [f"## {title}", ""]
        lines.append(
            f"Trained tokens per run: {fmt_rate(trained)}; seeds: {', '.join(map(str, seeds))}."
            + ("" if any(s.baseline for s in stats) else " No QKV run here, so no change vs QKV.")
        )
        lines += ["", *variant_table(stats, decode=decode), ""]
        if plots:
            slug = _slug(f"{key[0]}-" + (f"t{format_tokens(key[1])}" if key[1] is not None else f"steps{key[2]}"))
            for kind, path in (
                ("Loss curves", plot_loss_curves(stats, study, out / f"loss-{slug}.png", title, colors)),
                ("Cache reduction vs perplexity change", plot_pareto(stats, out / f"pareto-{slug}.png", title, colors)),
            ):
                if path is not None:
                    written.add(path)
                    lines += [f"![{kind}, {title}]({path.name})", ""]

    if plots:
        lines += _ladders(groups, order, colors, out, written)
    if skipped:
        lines += ["## Skipped grid points", "", "These combinations cannot be built, so they were not trained:", ""]
        lines += _skipped_table(skipped)
        lines.append("")
    if failed:
        lines += ["## Failed runs", "", "Rerunning the sweep retries these (resuming from their folders).", ""]
        lines += markdown_table(
            ["Run", "Variant", "Model", "Error"],
            [[f"`{r['run_id']}`", r.get("variant", ""), r.get("model", ""), r.get("error", "")] for r in failed],
        )
        lines.append("")

    if plots:
        for stale in out.glob("*.png"):  # plots of groups that are gone
            if stale not in written:
                stale.unlink()
    report = out / "report.md"
    atomic_write(report, lambda tmp: Path(tmp).write_text("\n".join(lines).rstrip() + "\n", encoding="utf-8"))
    return report


def _skipped_table(skipped: list[dict[str, Any]]) -> list[str]:
    """One line per (variant, model, budget, reason), the seeds listed together."""
    merged: dict[tuple[str, str, str, str], list[Any]] = {}
    for r in skipped:
        key = (r.get("variant", ""), r.get("model", ""), budget_label(group_key(r)), r.get("reason", ""))
        merged.setdefault(key, []).append(r.get("seed"))
    return markdown_table(
        ["Variant", "Model", "Budget", "Seeds", "Reason"],
        [[v, m, b, ", ".join(map(str, seeds)), reason] for (v, m, b, reason), seeds in merged.items()],
    )


def _ladders(
    groups: dict[GroupKey, list[dict[str, Any]]], order: list[GroupKey], colors: dict, out: Path, written: set[Path]
) -> list[str]:
    """Validation loss vs parameters (per budget) and vs tokens (per model), where there are 2+ points."""
    lines: list[str] = []
    labels: dict[str, str] = {}
    for key in order:
        for s in summarize_group(groups[key]):
            labels.setdefault(s.variant_id, s.label)

    def series(keys: list[GroupKey], x_of) -> dict[str, list]:
        out_series: dict[str, list] = {}
        for key in keys:
            for s in summarize_group(groups[key]):
                x = x_of(s)
                if x:
                    out_series.setdefault(s.variant_id, []).append((x, s.val_loss))
        return out_series

    budgets = sorted({(k[1], k[2]) for k in order}, key=lambda b: (b[0] or 0, b[1] or 0))
    models = list(dict.fromkeys(k[0] for k in order))
    for budget in budgets:
        keys = [k for k in order if (k[1], k[2]) == budget]
        if len(keys) > 1:
            tag = budget_label(keys[0])
            path = out / _slug(f"ladder-params-{tag.replace(' ', '-')}.png")
            plot_ladder(
                series(keys, lambda s: s.first("params_total")),
                labels,
                colors,
                path,
                xlabel="parameters",
                title=f"Validation loss vs parameters ({tag})",
            )
            written.add(path)
            lines += [f"![Validation loss vs parameters, {tag}]({path.name})", ""]
    for model in models:
        keys = [k for k in order if k[0] == model]
        if len(keys) > 1:
            path = out / _slug(f"ladder-tokens-{model}.png")
            plot_ladder(
                series(keys, lambda s: s.mean("tokens")),
                labels,
                colors,
                path,
                xlabel="training tokens",
                title=f"Validation loss vs training tokens ({model})",
            )
            written.add(path)
            lines += [f"![Validation loss vs training tokens, {model}]({path.name})", ""]
    if lines:
        lines = ["## Scaling ladders", "", *lines]
    return lines
