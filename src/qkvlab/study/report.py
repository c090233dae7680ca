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

A study whose metric is not perplexity (``metric: val_acc`` in the sweep file, or runs that
report accuracy and no perplexity, such as the synthetic tasks) gets a report in the layout
of the paper's Table 2 instead: one table per value of ``group_by`` (default ``task.kind``)
with a row per variant, the metric as mean ± std over every run of the group (seeds and the
other sweep settings, which are averaged), the mean seed-to-seed spread, the change vs QKV
(in points for accuracies, in % otherwise) and, with ``paper_table: table2``, the paper's
published number beside ours; then a summary table (variants x groups and their average) and
the metric per value of each averaged setting. The paper's numbers are the only numbers not
computed from results: data read from :mod:`qkvlab.study.paper` (with their source), always
labelled as the paper's. The metrics a study can compare are :data:`~qkvlab.study.metrics.METRICS`.

Plots use matplotlib's object API with the Agg canvas (no pyplot, no global backend change);
matplotlib is imported only when plotting.
"""

from __future__ import annotations

import json
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
from qkvlab.study.downstream import downstream_section
from qkvlab.study.metrics import METRICS, Metric
from qkvlab.study.paper import PAPER_TABLES, PaperTable
from qkvlab.study.results import STATUS_FAILED, STATUS_OK, STATUS_SKIPPED, ResultsStore, read_metrics
from qkvlab.study.spec import AXES, format_tokens

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
    """QKV: three projections, one KV head per query head, softmax, no 2D fix or QK-norm."""
    spec = VariantSpec.parse(variant_id)
    return (
        spec.sharing == "q_k_v" and spec.n_kv_heads is None and not spec.pos2d and not spec.qk_norm and not spec.linear
    )


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
        state = s.first("decode_state_bytes")  # linear attention: a fixed-size state, no per-token cache
        cache_cells = (
            [f"0 (fixed {fmt_bytes(state)} state)", f"{fmt_bytes(state)} (fixed)", "n/a"]
            if state
            else [
                "n/a" if kv is None else f"{kv:,}",
                fmt_bytes(None if kv is None else kv * CONTEXT),
                fmt_pct(s.first("cache_reduction"), signed=False, digits=1),
            ]
        )
        cells = [
            s.label,
            str(s.val_ppl[2] or len(s.rows)),
            fmt_mean_std(s.val_loss, 4),
            fmt_mean_std(s.val_ppl, 2),
            "baseline" if s.baseline else fmt_pct(s.ppl_change),
            *cache_cells,
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


def _sweep_settings(study_dir: Path) -> dict[str, Any]:
    sweep = study_dir / "sweep.yaml"
    try:
        d = yaml.safe_load(sweep.read_text()) if sweep.is_file() else {}
    except (OSError, yaml.YAMLError):
        d = {}
    return d if isinstance(d, dict) else {}


def write_report(
    study_dir: str | os.PathLike, *, plots: bool = True, metric: str | None = None, paper_table: str | None = None
) -> Path:
    """Write ``study_dir/report/report.md`` (+ PNGs when ``plots``) and return the markdown's path.

    ``metric``: what to compare (a key of :data:`METRICS`); default: the sweep's ``metric``,
    else ``val_ppl``, or ``val_acc`` when the runs report accuracy but no perplexity.
    ``paper_table``: a key of :data:`PAPER_TABLES` to set beside ours (default: the sweep's).
    """
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
    settings = _sweep_settings(study)
    metric = metric or settings.get("metric")
    if metric is None:
        has = {k for r in ok for k in ("val_ppl", "val_acc") if r.get(k) is not None}
        metric = "val_acc" if has == {"val_acc"} else "val_ppl"
    if metric not in METRICS:
        raise ConfigError(f"Unknown metric {metric!r}; use one of {', '.join(METRICS)}.")
    if metric != "val_ppl":
        return _metric_report(
            study,
            store,
            ok,
            skipped,
            failed,
            metric=METRICS[metric],
            group_by=settings.get("group_by"),
            paper_table=paper_table or settings.get("paper_table"),
            plots=plots,
        )

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
    paper_table = paper_table or settings.get("paper_table")
    if paper_table:
        table = PAPER_TABLES.get(paper_table)
        if table is None or table.metric != "val_ppl":
            lm_tables = [k for k, t in PAPER_TABLES.items() if t.metric == "val_ppl"]
            raise ConfigError(
                f"paper_table {paper_table!r} is not a perplexity table; use one of {', '.join(lm_tables)}."
            )
        lines += _beside_paper_lm(table, [(group_label(k), summarize_group(groups[k])) for k in order])
    lines += downstream_section(latest)[0]
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
        for stale in out.glob("*.png"):  # plots of groups that are gone (other figures stay)
            if stale not in written and stale.name.startswith(("loss-", "pareto-", "ladder-")):
                stale.unlink()
    report = out / "report.md"
    atomic_write(report, lambda tmp: Path(tmp).write_text("\n".join(lines).rstrip() + "\n", encoding="utf-8"))
    return report


def rank_correlation(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    """Spearman's rank correlation (``scipy.stats.spearmanr``: ties get their mean rank); None
    for fewer than 3 pairs or a side whose values are all equal (no ranking to compare)."""
    if len(xs) != len(ys) or len(xs) < 3 or len(set(xs)) < 2 or len(set(ys)) < 2:
        return None
    try:
        from scipy import stats
    except ImportError:
        raise ConfigError(
            "The rank agreement with the paper's table needs scipy, which is not installed: "
            "pip install 'qkvlab[plots]' (or leave paper_table out of the report)."
        ) from None
    return float(stats.spearmanr(xs, ys).statistic)


def _beside_paper_lm(table: PaperTable, groups: list[tuple[str, list[VariantStats]]]) -> list[str]:
    """Our change vs QKV per group beside the paper's perplexities and changes, with rank agreement."""
    names = list(table.values)
    lines = [
        "## Beside the paper",
        "",
        f"The paper's numbers are quoted from {table.source}: {table.title}. They are the paper's, not results "
        "of this code, and come from a model and a token budget thousands of times larger, so compare the "
        "ranking and the sign of the change vs QKV, not the values.",
        "",
    ]
    by_group = {label: {VariantSpec.parse(s.variant_id).paper_name: s for s in stats} for label, stats in groups}
    header = ["Variant", "Paper Val PPL", "Paper Δ vs QKV"] + [f"Our Δ, {label}" for label, _ in groups]
    body = []
    for name in names:
        paper = table.values[name]
        cells = [name, f"{paper['val_ppl']:.2f}", "baseline" if name == "QKV" else fmt_pct(paper["delta"], digits=1)]
        for label, _ in groups:
            st = by_group[label].get(name)
            cells.append("n/a" if st is None else ("baseline" if st.baseline else fmt_pct(st.ppl_change)))
        body.append(cells)
    lines += [*markdown_table(header, body), ""]
    for label, _ in groups:
        common = [n for n in names if n in by_group[label] and by_group[label][n].ppl_change is not None]
        ours = [by_group[label][n].ppl_change for n in common]
        theirs = [table.values[n]["delta"] for n in common]
        rho = rank_correlation(theirs, ours)
        order_ours = " < ".join(n for _, n in sorted(zip(ours, common, strict=True)))
        lines.append(
            f"- {label}: our order by change vs QKV (best first): {order_ours}. Spearman rank correlation with "
            f"the paper's Δ over these {len(common)} variants: " + ("n/a" if rho is None else f"{rho:+.2f}") + "."
        )
    paper_order = " < ".join(sorted(names, key=lambda n: table.values[n]["delta"]))
    lines += [f"- The paper's order: {paper_order}.", ""]
    return lines


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


# ================================================================== accuracy-style studies (paper Table 2)
def _row_value(row: dict[str, Any], key: str) -> Any:
    """A dotted key of a row's resolved config (``task.kind``, ``model.d_model``), else of the row."""
    node: Any = row.get("config") or {}
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return row.get(key) if node is None else node


def _table2_order(variant_id: str) -> tuple[int, int, str]:
    """QKV first, then the paper's Table 2 rows, then the LM table's order, then the rest."""
    name = VariantSpec.parse(variant_id).paper_name
    table2 = list(PAPER_TABLES["table2"].values)
    rank = table2.index(name) if name in table2 else len(table2)
    return (-1 if is_baseline(variant_id) else rank, *_variant_order(variant_id))


def _value_order(value: Any) -> tuple[int, Any]:
    from qkvlab.data.synthetic import TASKS

    if value in TASKS:
        return (0, TASKS.index(value))
    return (1, (0, value) if isinstance(value, int | float) else (1, str(value)))


def _group_name(keys: Sequence[str], values: tuple[Any, ...]) -> str:
    if len(keys) == 1:
        return str(values[0])
    return ", ".join(f"{k}={v}" for k, v in zip(keys, values, strict=True))


def _fmt_change(x: float | None, metric: Metric) -> str:
    if x is None:
        return "n/a"
    if metric.change == "points":
        return f"{100 * x:+.1f} pt"
    return f"{100 * x:+.2f}%"


@dataclass
class MetricStats:
    """One row of an accuracy-style table: a variant over every run of a group."""

    variant_id: str
    label: str
    rows: list[dict[str, Any]]
    stat: tuple[float | None, float | None, int]
    by_setting: dict[tuple, list[float]]
    seed_std: float | None
    change: float | None = None
    baseline: bool = False


def _setting(row: dict[str, Any], averaged: Sequence[str]) -> tuple:
    return tuple(_row_value(row, k) for k in averaged)


def metric_stats(rows: list[dict[str, Any]], metric: Metric, averaged: Sequence[str]) -> list[MetricStats]:
    """Per variant: mean ± std over all runs, the mean seed std per setting, and the change vs QKV.

    The change is taken over the settings both the variant and QKV finished (mean of the
    per-setting means), so a variant with skipped settings is still compared like for like.
    """
    by_variant: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        if row.get(metric.key) is not None:
            by_variant.setdefault(row["variant_id"], []).append(row)
    ids = sorted(by_variant, key=_table2_order)
    names = [VariantSpec.parse(v).paper_name for v in ids]
    stats = []
    for vid, name in zip(ids, names, strict=True):
        group = by_variant[vid]
        by_setting: dict[tuple, list[float]] = {}
        for r in group:
            by_setting.setdefault(_setting(r, averaged), []).append(float(r[metric.key]))
        stds = [statistics.stdev(v) for v in by_setting.values() if len(v) > 1]
        stats.append(
            MetricStats(
                variant_id=vid,
                label=name if names.count(name) == 1 else f"{name} (`{vid}`)",
                rows=group,
                stat=mean_std(r[metric.key] for r in group),
                by_setting=by_setting,
                seed_std=statistics.fmean(stds) if stds else None,
                baseline=is_baseline(vid),
            )
        )
    base = next((s for s in stats if s.baseline), None)
    if base is not None:
        for s in stats:
            common = [k for k in s.by_setting if k in base.by_setting]
            if not common:
                continue
            ours = statistics.fmean(statistics.fmean(s.by_setting[k]) for k in common)
            theirs = statistics.fmean(statistics.fmean(base.by_setting[k]) for k in common)
            if metric.change == "points":
                s.change = ours - theirs
            elif theirs:
                s.change = ours / theirs - 1.0
    return stats


def _paper_value(table: PaperTable | None, stat: MetricStats, group: tuple[Any, ...]) -> float | None:
    if table is None or len(group) != 1:
        return None
    return table.values.get(VariantSpec.parse(stat.variant_id).paper_name, {}).get(str(group[0]))


def _averaged_axes(rows: list[dict[str, Any]], group_by: Sequence[str]) -> list[str]:
    """Grid axes that vary over the runs, other than seed, variant and the grouping keys."""
    names: list[str] = []
    for r in rows:
        for axis in r.get("axes") or {}:
            key = AXES.get(axis, axis)
            if axis in ("seed", "variant") or key in ("seed", "model.variant") or key in group_by:
                continue
            if key not in names:
                names.append(key)
    return [k for k in names if len({json_key(_row_value(r, k)) for r in rows}) > 1]


def json_key(value: Any) -> str:
    """A hashable, printable form of a config value (numbers and strings print as themselves)."""
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)


def _parse_key(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def plot_metric_bars(
    groups: list[tuple[str, list[MetricStats]]], metric: Metric, colors: dict, path: Path, title: str
) -> Path | None:
    """The metric per group (x) and variant (bars, error bar 1 std over runs)."""
    if not groups:
        return None
    fig = _figure(width=max(7.0, 1.4 * len(groups) + 3), height=4.5)
    ax = fig.add_subplot()
    ids = list(dict.fromkeys(s.variant_id for _, stats in groups for s in stats))
    labels = {s.variant_id: s.label for _, stats in groups for s in stats}
    width = 0.8 / max(1, len(ids))
    for j, vid in enumerate(ids):
        xs, ys, errs = [], [], []
        for i, (_, stats) in enumerate(groups):
            s = next((s for s in stats if s.variant_id == vid), None)
            if s is not None and s.stat[0] is not None:
                xs.append(i + (j - (len(ids) - 1) / 2) * width)
                ys.append(s.stat[0])
                errs.append(s.stat[1] or 0.0)
        ax.bar(xs, ys, width, yerr=errs, capsize=2, color=colors[vid], label=labels[vid])
    ax.set_xticks(range(len(groups)), [name for name, _ in groups])
    ax.set_ylabel(metric.label)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8, ncol=3)
    return _save(fig, path)


def _metric_report(
    study: Path,
    store: ResultsStore,
    ok: list[dict[str, Any]],
    skipped: list[dict[str, Any]],
    failed: list[dict[str, Any]],
    *,
    metric: Metric,
    group_by: Sequence[str] | str | None,
    paper_table: str | None,
    plots: bool,
) -> Path:
    out = study / REPORT_DIR
    table = PAPER_TABLES.get(paper_table) if paper_table else None
    if paper_table and table is None:
        raise ConfigError(f"Unknown paper_table {paper_table!r}; use one of {', '.join(PAPER_TABLES)} or leave it out.")
    if table is not None and table.metric != metric.key:
        table = None  # the paper's numbers are of another metric: not comparable
    if isinstance(group_by, str):
        group_by = [group_by]
    if not group_by:
        group_by = [table.group_by] if table else (["task.kind"] if any(_row_value(r, "task.kind") for r in ok) else [])
    group_by = list(group_by)
    rows = [r for r in ok if r.get(metric.key) is not None]
    averaged = _averaged_axes(rows, group_by)
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(tuple(_row_value(r, k) for k in group_by), []).append(r)
    order = sorted(groups, key=lambda g: tuple(_value_order(v) for v in g))
    all_ids = sorted({r["variant_id"] for r in rows}, key=_table2_order)
    colors = {vid: f"C{i % 10}" for i, vid in enumerate(all_ids)}
    finished = sorted(r["finished"] for r in ok if r.get("finished"))
    seeds = sorted({r.get("seed") for r in rows}, key=str)
    better = "higher" if metric.higher_is_better else "lower"
    change = "in points (x 100)" if metric.change == "points" else "in %"

    lines = [
        f"# Study report: {_study_name(study)}",
        "",
        f"Computed from `{study / store.path.name}` ({len(ok)} finished runs, {len(skipped)} skipped grid "
        f"points, {len(failed)} failed runs); no number in this report is typed in"
        + (f", except the columns marked *paper*, which quote {table.title} from {table.source}." if table else "."),
        "",
        f"- Code (git commit of the runs): {_commits(ok)}.",
    ]
    if finished:
        lines.append(f"- Runs finished between {finished[0]} and {finished[-1]}.")
    lines += [
        f"- Metric: `{metric.key}` ({metric.label}, {better} is better), one table per "
        + (f"value of `{', '.join(group_by)}`." if group_by else "study.")
        + f" Seeds: {', '.join(map(str, seeds)) or 'none'}.",
        "- Averaged settings: "
        + (", ".join(f"`{k}`" for k in averaged) if averaged else "none (one setting)")
        + ". Mean ± std: over every run of the variant in the group (seeds x settings, n runs). Seed std: the "
        "standard deviation over seeds within one setting, averaged over settings.",
        f"- Δ vs QKV: the variant's mean minus QKV's, {change}, over the settings both finished.",
        "",
    ]
    summary: list[tuple[str, list[MetricStats]]] = []
    for g in order:
        stats = metric_stats(groups[g], metric, averaged)
        name = _group_name(group_by, g) if group_by else "all runs"
        summary.append((name, stats))
        settings = {_setting(r, averaged) for r in groups[g]}
        lines += [f"## {name}", ""]
        if group_by == ["task.kind"]:
            from qkvlab.data.synthetic import DESCRIPTIONS

            if g[0] in DESCRIPTIONS:
                lines += [f"Task: {DESCRIPTIONS[g[0]]}. {len(settings)} setting(s).", ""]
        header = ["Variant", "n", f"{metric.label} (mean ± std)", "Seed std", "Δ vs QKV", "Params (mean)"]
        if table is not None:
            header.insert(3, "Paper")
        body = []
        for s in stats:
            cells = [
                s.label,
                str(s.stat[2]),
                fmt_mean_std(s.stat, 3),
                "n/a" if s.seed_std is None else f"{s.seed_std:.3f}",
                "baseline" if s.baseline else _fmt_change(s.change, metric),
                fmt_count(mean_std(r.get("params_total") for r in s.rows)[0]),
            ]
            if table is not None:
                paper = _paper_value(table, s, g)
                cells.insert(3, "n/a" if paper is None else f"{paper:.3f}")
            body.append(cells)
        lines += [*markdown_table(header, body), ""]

    if len(summary) > 1:
        lines += _summary_table(summary, order, metric, table)
    for axis in averaged:
        lines += _by_setting_table(rows, axis, metric)
    if plots and summary:
        path = plot_metric_bars(summary, metric, colors, out / f"{_slug(metric.key)}-by-group.png", _study_name(study))
        if path is not None:
            lines += [f"![{metric.label} per group and variant]({path.name})", ""]
        for stale in out.glob("*-by-group.png"):  # this report's own plots only (attention maps etc. stay)
            if stale != path:
                stale.unlink()
    if skipped:
        lines += ["## Skipped grid points", "", "These combinations cannot be built, so they were not trained:", ""]
        merged: dict[tuple[str, str, str, str], list[Any]] = {}
        for r in skipped:
            axes = {k: v for k, v in (r.get("axes") or {}).items() if k not in ("seed", "variant")}
            setting = ", ".join(f"{k}={v}" for k, v in axes.items()) or "-"
            key = (r.get("variant", ""), setting, r.get("model", ""), r.get("reason", ""))
            merged.setdefault(key, []).append(r.get("seed"))
        lines += markdown_table(
            ["Variant", "Setting", "Model", "Seeds", "Reason"],
            [[v, st, m, ", ".join(map(str, sd)), reason] for (v, st, m, reason), sd in merged.items()],
        )
        lines.append("")
    if failed:
        lines += ["## Failed runs", "", "Rerunning the sweep retries these (resuming from their folders).", ""]
        lines += markdown_table(
            ["Run", "Variant", "Error"],
            [[f"`{r['run_id']}`", r.get("variant", ""), r.get("error", "")] for r in failed],
        )
        lines.append("")
    report = out / "report.md"
    atomic_write(report, lambda tmp: Path(tmp).write_text("\n".join(lines).rstrip() + "\n", encoding="utf-8"))
    return report


def _summary_table(
    summary: list[tuple[str, list[MetricStats]]], order: list[tuple], metric: Metric, table: PaperTable | None
) -> list[str]:
    """Variants x groups (and their average), the paper's number beside ours when there is one."""
    ids = sorted({s.variant_id for _, stats in summary for s in stats}, key=_table2_order)
    header = ["Variant"]
    for name, _ in summary:
        header += [name.upper()] + (["paper"] if table is not None else [])
    header += ["Avg"] + (["paper Avg (same groups)"] if table is not None else [])
    body = []
    for vid in ids:
        label = next(s.label for _, stats in summary for s in stats if s.variant_id == vid)
        cells, ours, theirs = [label], [], []
        for g, (_, stats) in zip(order, summary, strict=True):
            s = next((s for s in stats if s.variant_id == vid), None)
            value = None if s is None else s.stat[0]
            cells.append("n/a" if value is None else f"{value:.3f}")
            if value is not None:
                ours.append(value)
            if table is not None:
                paper = None if s is None else _paper_value(table, s, g)
                cells.append("n/a" if paper is None else f"{paper:.3f}")
                if paper is not None:
                    theirs.append(paper)
        complete = len(ours) == len(summary)
        cells.append(f"{statistics.fmean(ours):.3f}" if complete else "n/a")
        if table is not None:
            cells.append(f"{statistics.fmean(theirs):.3f}" if complete and len(theirs) == len(summary) else "n/a")
        body.append(cells)
    title = "## Summary (layout of the paper's Table 2)" if table is not None else "## Summary"
    note = f"{metric.label}, mean over all runs of each group; Avg: mean over the groups (only where all are present)."
    return [title, "", note, "", *markdown_table(header, body), ""]


def _by_setting_table(rows: list[dict[str, Any]], axis: str, metric: Metric) -> list[str]:
    """The metric per value of one averaged setting (all groups together), per variant."""
    values = sorted({json_key(_row_value(r, axis)) for r in rows}, key=lambda v: _value_order(_parse_key(v)))
    ids = sorted({r["variant_id"] for r in rows}, key=_table2_order)
    body = []
    for vid in ids:
        mine = [r for r in rows if r["variant_id"] == vid]
        cells = [VariantSpec.parse(vid).paper_name]
        for v in values:
            stat = mean_std(r[metric.key] for r in mine if json_key(_row_value(r, axis)) == v)
            cells.append(fmt_mean_std(stat, 3))
        body.append(cells)
    return [
        f"## {metric.label} by `{axis}`",
        "",
        "Mean ± std over every run at that value (all groups, seeds and other settings).",
        "",
        *markdown_table(["Variant", *[f"{axis.split('.')[-1]}={v}" for v in values]], body),
        "",
    ]
