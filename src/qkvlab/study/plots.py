"""The figures of the variant report, drawn from results only, and what every report's figures share.

Plots use matplotlib's object API with the Agg canvas (no pyplot, no global backend change);
matplotlib is imported only when plotting. A figure is written atomically as a PNG.
"""

from __future__ import annotations

from pathlib import Path

from qkvlab.checkpoint import atomic_write
from qkvlab.errors import ConfigError
from qkvlab.study.metrics import Metric
from qkvlab.study.results import read_metrics
from qkvlab.study.tables import pareto_front


def figure(width: float = 7.0, height: float = 4.5):
    """A matplotlib ``Figure`` (Agg, constrained layout); a clear error without matplotlib."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ConfigError(
            "The report's plots need matplotlib, which is not installed: pip install 'qkvlab[plots]' "
            "(or call write_report(study_dir, plots=False) for the tables alone)."
        ) from None
    return Figure(figsize=(width, height), layout="constrained")


def save_png(fig, path: Path) -> Path:
    """Write ``fig`` to ``path`` as a PNG, atomically."""
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    return path


def slug(text: str) -> str:
    """``text`` as a file name: anything but letters, digits and ``._-`` becomes ``-``."""
    return "".join(c if c.isalnum() or c in "._-" else "-" for c in text).strip("-")


def plot_loss_curves(stats: list, study_dir: Path, path: Path, title: str, colors: dict) -> Path | None:
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
    fig = figure()
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
    return save_png(fig, path)


def plot_pareto(stats: list, path: Path, title: str, colors: dict) -> Path | None:
    """KV-cache reduction (x, %) vs perplexity change vs QKV (y, %), the Pareto front dashed."""
    pts = [
        (s, 100 * s.first("cache_reduction"), 100 * s.ppl_change)
        for s in stats
        if s.ppl_change is not None and s.first("cache_reduction") is not None
    ]
    if len(pts) < 2:
        return None
    base_ppl = next(s.val_ppl[0] for s in stats if s.baseline)
    fig = figure()
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
    return save_png(fig, path)


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
    fig = figure()
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
    return save_png(fig, path)


def plot_metric_bars(groups: list, metric: Metric, colors: dict, path: Path, title: str) -> Path | None:
    """The metric per group (x) and variant (bars, error bar 1 std over runs)."""
    if not groups:
        return None
    fig = figure(width=max(7.0, 1.4 * len(groups) + 3), height=4.5)
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
    return save_png(fig, path)
