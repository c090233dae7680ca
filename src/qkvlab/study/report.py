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
report accuracy and no perplexity, such as the synthetic tasks) gets the layout of the paper's
Table 2 instead (:mod:`qkvlab.study.metric_report`); a study whose sweep file says
``report: ladder`` gets the scaling-ladder analysis (:mod:`qkvlab.study.ladder`). The paper's
numbers are the only numbers not computed from results: data read from :mod:`qkvlab.study.paper`
(with their source), always labelled as the paper's. The metrics a study can compare are
:data:`~qkvlab.study.metrics.METRICS`.

The report reads only results: the rows (:mod:`qkvlab.study.results`), each run's
``metrics.jsonl`` for the loss curves, and the study's name and report settings from the sweep
file the sweep left beside them (:func:`~qkvlab.study.spec.read_study_file`). Both layouts share
the header, the skipped and failed sections and the file handling here; their cells come from
:mod:`qkvlab.study.tables` and their figures from :mod:`qkvlab.study.plots`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qkvlab.attention.variant import VariantSpec
from qkvlab.checkpoint import atomic_write
from qkvlab.errors import ConfigError
from qkvlab.study.downstream import downstream_section
from qkvlab.study.metric_report import metric_report, skipped_by_setting
from qkvlab.study.metrics import METRICS
from qkvlab.study.paper import PAPER_TABLES, PaperTable
from qkvlab.study.plots import plot_ladder, plot_loss_curves, plot_pareto, slug
from qkvlab.study.results import REPORT_DIR, STATUS_FAILED, STATUS_OK, STATUS_SKIPPED, ResultsStore, usable_rows
from qkvlab.study.spec import format_tokens, read_study_file, study_name
from qkvlab.study.tables import (
    commits,
    fmt_bytes,
    fmt_count,
    fmt_mean_std,
    fmt_pct,
    fmt_rate,
    is_baseline,
    markdown_table,
    mean_std,
    pareto_front,
    variant_order,
)

__all__ = ["PAPER_TABLES", "REPORT_DIR", "pareto_front", "rank_correlation", "summarize_group", "write_report"]

CONTEXT = 32768  # the context at which the paper quotes cache sizes (Table 7)

GroupKey = tuple[str, int | None, int | None]  # (model, token budget, max_steps when there is no budget)


# ================================================================== the report
def write_report(
    study_dir: str | os.PathLike, *, plots: bool = True, metric: str | None = None, paper_table: str | None = None
) -> Path:
    """Write ``study_dir/report/report.md`` (+ PNGs when ``plots``) and return the markdown's path.

    ``metric``: what to compare (a key of :data:`METRICS`); default: the sweep's ``metric``,
    else ``val_ppl``, or ``val_acc`` when the runs report accuracy but no perplexity.
    ``paper_table``: a key of :data:`PAPER_TABLES` to set beside ours (default: the sweep's).
    A study whose sweep file says ``report: ladder`` gets the scaling-ladder analysis instead
    (:func:`qkvlab.study.ladder.write_ladder_report`).
    """
    study = Path(study_dir)
    store = ResultsStore(study)
    if not store.path.is_file():
        raise ConfigError(
            f"No {store.path.name} in {str(study)!r}; pass the folder of a study that `qkvlab sweep` has filled."
        )
    settings = read_study_file(study, strict=True)  # a broken file must not hide `report: ladder`
    if settings.get("report") == "ladder":
        from qkvlab.study.ladder import write_ladder_report

        return write_ladder_report(study, plots=plots)
    latest = list(store.latest().values())
    ok = usable_rows([r for r in latest if r.get("status") == STATUS_OK], store.path)
    skipped = [r for r in latest if r.get("status") == STATUS_SKIPPED]
    failed = [r for r in latest if r.get("status") == STATUS_FAILED]
    out = study / REPORT_DIR
    out.mkdir(parents=True, exist_ok=True)
    metric = metric or settings.get("metric")
    if metric is None:
        has = {k for r in ok for k in ("val_ppl", "val_acc") if r.get(k) is not None}
        metric = "val_acc" if has == {"val_acc"} else "val_ppl"
    if metric not in METRICS:
        raise ConfigError(f"Unknown metric {metric!r}; use one of {', '.join(METRICS)}.")
    paper_table = paper_table or settings.get("paper_table")
    if metric == "val_ppl":
        source, notes, sections = _perplexity_report(study, out, ok, latest, paper_table=paper_table, plots=plots)
        closing = _skipped_section(_skipped_by_budget(skipped)) + _failed_section(failed, with_model=True)
    else:
        source, notes, sections = metric_report(
            study, out, ok, metric=METRICS[metric], group_by=settings.get("group_by"), paper_table=paper_table,
            plots=plots,
        )  # fmt: skip
        closing = _skipped_section(skipped_by_setting(skipped)) + _failed_section(failed, with_model=False)
    counts = f"{len(ok)} finished runs, {len(skipped)} skipped grid points, {len(failed)} failed runs"
    lines = [f"# Study report: {study_name(study)}", "", f"Computed from `{store.path}` ({counts}){source}"]
    lines += [*_provenance(ok), *notes, *sections, *closing]
    report = out / "report.md"
    atomic_write(report, lambda tmp: Path(tmp).write_text("\n".join(lines).rstrip() + "\n", encoding="utf-8"))
    return report


def _provenance(ok: list[dict[str, Any]]) -> list[str]:
    """The lines under the header that say where the runs came from."""
    finished = sorted(r["finished"] for r in ok if r.get("finished"))
    lines = ["", f"- Code (git commit of the runs): {commits(ok)}."]
    if finished:
        lines.append(f"- Runs finished between {finished[0]} and {finished[-1]}.")
    return lines


def _skipped_section(table: list[str]) -> list[str]:
    if not table:
        return []
    intro = ["## Skipped grid points", "", "These combinations cannot be built, so they were not trained:", ""]
    return [*intro, *table, ""]


def _failed_section(failed: list[dict[str, Any]], *, with_model: bool) -> list[str]:
    if not failed:
        return []
    header = ["Run", "Variant", "Model", "Error"] if with_model else ["Run", "Variant", "Error"]
    body = [
        [f"`{r['run_id']}`", r.get("variant", ""), *([r.get("model", "")] if with_model else []), r.get("error", "")]
        for r in failed
    ]
    intro = ["## Failed runs", "", "Rerunning the sweep retries these (resuming from their folders).", ""]
    return [*intro, *markdown_table(header, body), ""]


def _skipped_by_budget(skipped: list[dict[str, Any]]) -> list[str]:
    """One line per (variant, model, budget, reason), the seeds listed together."""
    if not skipped:
        return []
    merged: dict[tuple[str, str, str, str], list[Any]] = {}
    for r in skipped:
        key = (r.get("variant", ""), r.get("model", ""), budget_label(group_key(r)), r.get("reason", ""))
        merged.setdefault(key, []).append(r.get("seed"))
    return markdown_table(
        ["Variant", "Model", "Budget", "Seeds", "Reason"],
        [[v, m, b, ", ".join(map(str, seeds)), reason] for (v, m, b, reason), seeds in merged.items()],
    )


# ================================================================== perplexity studies (paper Table 4)
def group_key(row: dict[str, Any]) -> GroupKey:
    budget = row.get("tokens_budget")
    return (str(row.get("model")), budget, None if budget is not None else row.get("max_steps"))


def budget_label(key: GroupKey) -> str:
    """``1e6 tokens``, or ``400 steps`` for runs without a token budget."""
    _, budget, steps = key
    return f"{format_tokens(budget)} tokens" if budget is not None else f"{steps} steps"


def group_label(key: GroupKey) -> str:
    return f"{key[0]}, {budget_label(key)}"


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


def summarize_group(rows: list[dict[str, Any]]) -> list[VariantStats]:
    """Table rows for the finished runs of one (model, budget): QKV first, then the paper's order."""
    by_variant: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_variant.setdefault(row["variant_id"], []).append(row)
    ids = sorted(by_variant, key=variant_order)
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


def _perplexity_report(
    study: Path, out: Path, ok: list[dict[str, Any]], latest: list[dict[str, Any]], *, paper_table: str | None,
    plots: bool,
) -> tuple[str, list[str], list[str]]:  # fmt: skip
    """The perplexity layout: (how the header's source line ends, the notes under it, the sections)."""
    groups: dict[GroupKey, list[dict[str, Any]]] = {}
    for row in ok:
        groups.setdefault(group_key(row), []).append(row)

    def size(key: GroupKey) -> tuple[float, float, float]:
        params = mean_std(r.get("params_total") for r in groups[key])[0] or 0.0
        return (params, key[1] or 0, key[2] or 0)

    order = sorted(groups, key=size)
    all_ids = sorted({r["variant_id"] for r in ok}, key=variant_order)
    colors = {vid: f"C{i % 10}" for i, vid in enumerate(all_ids)}
    decode = any(r.get("decode_tokens_per_s") is not None for r in ok)
    cache_dtype = ", ".join(sorted({str(r["kv_cache_dtype"]) for r in ok if r.get("kv_cache_dtype")})) or "bf16"

    source = (
        f" and the `metrics.jsonl` of each run folder under `{study / 'runs'}`; no number in this report is typed in."
    )
    notes = [
        "- Val loss: mean cross-entropy per token (nats) on the validation split; PPL = exp(loss). Cells show "
        "mean ± sample standard deviation over seeds, n runs.",
        "- Δ PPL vs QKV: mean PPL of the variant over mean PPL of QKV at the same model size and token budget, "
        "minus 1. With few seeds, read a change smaller than about twice the spread as no difference.",
        f"- KV cache: bytes per token over all layers for a {cache_dtype} cache (the paper counts 2 bytes), and at a "
        f"{CONTEXT:,}-token context; reduction against QKV of the same shape. Params: all parameters, "
        "embeddings included; Attn params: the attention layers alone.",
        "",
    ]
    lines: list[str] = []
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
            name = slug(f"{key[0]}-" + (f"t{format_tokens(key[1])}" if key[1] is not None else f"steps{key[2]}"))
            for kind, path in (
                ("Loss curves", plot_loss_curves(stats, study, out / f"loss-{name}.png", title, colors)),
                ("Cache reduction vs perplexity change", plot_pareto(stats, out / f"pareto-{name}.png", title, colors)),
            ):
                if path is not None:
                    written.add(path)
                    lines += [f"![{kind}, {title}]({path.name})", ""]
                elif kind == "Loss curves":
                    lines += [
                        "Loss curves: not drawn; the runs' `metrics.jsonl` files are not under this study folder "
                        "(a study rebuilt from its committed `results.jsonl` alone has the rows, not the run folders).",
                        "",
                    ]

    if plots:
        lines += _ladders(groups, order, colors, out, written)
    if paper_table:
        table = PAPER_TABLES.get(paper_table)
        if table is None or table.metric != "val_ppl":
            lm_tables = [k for k, t in PAPER_TABLES.items() if t.metric == "val_ppl"]
            raise ConfigError(
                f"paper_table {paper_table!r} is not a perplexity table; use one of {', '.join(lm_tables)}."
            )
        lines += _beside_paper_lm(table, [(group_label(k), summarize_group(groups[k])) for k in order])
    lines += downstream_section(latest)[0]
    if plots:
        for stale in out.glob("*.png"):  # plots of groups that are gone (other figures stay)
            if stale not in written and stale.name.startswith(("loss-", "pareto-", "ladder-")):
                stale.unlink()
    return source, notes, lines


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
            path = out / slug(f"ladder-params-{tag.replace(' ', '-')}.png")
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
            path = out / slug(f"ladder-tokens-{model}.png")
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
