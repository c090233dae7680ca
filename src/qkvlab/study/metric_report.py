"""The study report's layout for a metric other than perplexity, after the paper's Table 2.

One table per value of ``group_by`` (default ``task.kind``) with a row per variant: the metric
as mean ± std over every run of the group (seeds and the other sweep settings, which are
averaged), the mean seed-to-seed spread, the change vs QKV (in points for accuracies, in %
otherwise) and, with a paper table of the same metric, the paper's published number beside
ours; then a summary table (variants x groups and their average), the metric per value of
each averaged setting, and a bar chart. :func:`qkvlab.study.report.write_report` puts the
header and the closing sections around it.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qkvlab.attention.variant import VariantSpec
from qkvlab.errors import ConfigError
from qkvlab.study.metrics import Metric
from qkvlab.study.paper import PAPER_TABLES, PaperTable
from qkvlab.study.plots import plot_metric_bars, slug
from qkvlab.study.results import row_value
from qkvlab.study.spec import AXES, study_name
from qkvlab.study.tables import fmt_count, fmt_mean_std, is_baseline, markdown_table, mean_std, table2_order


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
    return tuple(row_value(row, k) for k in averaged)


def metric_stats(rows: list[dict[str, Any]], metric: Metric, averaged: Sequence[str]) -> list[MetricStats]:
    """Per variant: mean ± std over all runs, the mean seed std per setting, and the change vs QKV.

    The change is taken over the settings both the variant and QKV finished (mean of the
    per-setting means), so a variant with skipped settings is still compared like for like.
    """
    by_variant: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        if row.get(metric.key) is not None:
            by_variant.setdefault(row["variant_id"], []).append(row)
    ids = sorted(by_variant, key=table2_order)
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
    return [k for k in names if len({json_key(row_value(r, k)) for r in rows}) > 1]


def json_key(value: Any) -> str:
    """A hashable, printable form of a config value (numbers and strings print as themselves)."""
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)


def _parse_key(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def metric_report(
    study: Path,
    out: Path,
    ok: list[dict[str, Any]],
    *,
    metric: Metric,
    group_by: Sequence[str] | str | None,
    paper_table: str | None,
    plots: bool,
) -> tuple[str, list[str], list[str]]:
    """The accuracy layout: (how the header's source line ends, the notes under it, the sections)."""
    table = PAPER_TABLES.get(paper_table) if paper_table else None
    if paper_table and table is None:
        raise ConfigError(f"Unknown paper_table {paper_table!r}; use one of {', '.join(PAPER_TABLES)} or leave it out.")
    if table is not None and table.metric != metric.key:
        table = None  # the paper's numbers are of another metric: not comparable
    if isinstance(group_by, str):
        group_by = [group_by]
    if not group_by:
        group_by = [table.group_by] if table else (["task.kind"] if any(row_value(r, "task.kind") for r in ok) else [])
    group_by = list(group_by)
    rows = [r for r in ok if r.get(metric.key) is not None]
    averaged = _averaged_axes(rows, group_by)
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(tuple(row_value(r, k) for k in group_by), []).append(r)
    order = sorted(groups, key=lambda g: tuple(_value_order(v) for v in g))
    all_ids = sorted({r["variant_id"] for r in rows}, key=table2_order)
    colors = {vid: f"C{i % 10}" for i, vid in enumerate(all_ids)}
    seeds = sorted({r.get("seed") for r in rows}, key=str)
    better = "higher" if metric.higher_is_better else "lower"
    change = "in points (x 100)" if metric.change == "points" else "in %"

    source = "; no number in this report is typed in" + (
        f", except the columns marked *paper*, which quote {table.title} from {table.source}." if table else "."
    )
    notes = [
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
    lines: list[str] = []
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
        path = plot_metric_bars(summary, metric, colors, out / f"{slug(metric.key)}-by-group.png", study_name(study))
        if path is not None:
            lines += [f"![{metric.label} per group and variant]({path.name})", ""]
        for stale in out.glob("*-by-group.png"):  # this report's own plots only (attention maps etc. stay)
            if stale != path:
                stale.unlink()
    return source, notes, lines


def _summary_table(
    summary: list[tuple[str, list[MetricStats]]], order: list[tuple], metric: Metric, table: PaperTable | None
) -> list[str]:
    """Variants x groups (and their average), the paper's number beside ours when there is one."""
    ids = sorted({s.variant_id for _, stats in summary for s in stats}, key=table2_order)
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
    values = sorted({json_key(row_value(r, axis)) for r in rows}, key=lambda v: _value_order(_parse_key(v)))
    ids = sorted({r["variant_id"] for r in rows}, key=table2_order)
    body = []
    for vid in ids:
        mine = [r for r in rows if r["variant_id"] == vid]
        cells = [VariantSpec.parse(vid).paper_name]
        for v in values:
            stat = mean_std(r[metric.key] for r in mine if json_key(row_value(r, axis)) == v)
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


def skipped_by_setting(skipped: list[dict[str, Any]]) -> list[str]:
    """One line per (variant, setting, model, reason), the seeds listed together."""
    if not skipped:
        return []
    merged: dict[tuple[str, str, str, str], list[Any]] = {}
    for r in skipped:
        axes = {k: v for k, v in (r.get("axes") or {}).items() if k not in ("seed", "variant")}
        setting = ", ".join(f"{k}={v}" for k, v in axes.items()) or "-"
        key = (r.get("variant", ""), setting, r.get("model", ""), r.get("reason", ""))
        merged.setdefault(key, []).append(r.get("seed"))
    return markdown_table(
        ["Variant", "Setting", "Model", "Seeds", "Reason"],
        [[v, st, m, ", ".join(map(str, sd)), reason] for (v, st, m, reason), sd in merged.items()],
    )
