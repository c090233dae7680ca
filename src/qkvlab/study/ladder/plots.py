"""The scaling ladder's figures: loss vs size with the fitted curves, the change vs QKV per
size, loss vs tokens per size.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from qkvlab.study.ladder.analysis import GroupKey, LadderAnalysis, budget_label, size_label, target_nonembedding
from qkvlab.study.plots import figure, save_png, slug
from qkvlab.study.tables import variant_label, variant_order

FIG_PREFIX = "scaling-"


def _colors(a: LadderAnalysis) -> dict[str, str]:
    vids = sorted({k[3] for k in a.cells}, key=variant_order)
    return {v: f"C{i % 10}" for i, v in enumerate(vids)}


def plot_fits(a: LadderAnalysis, g: GroupKey, out: Path) -> Path | None:
    """Loss vs N (log-log), points with 1-std bars, fitted curves dashed out to the 300M target."""
    recipe, budget = g
    if len(a.sizes[g]) < 2:
        return None
    _, group_fit, _ = a.fits[g]
    colors = _colors(a)
    fig = figure()
    ax = fig.add_subplot()
    for vid in a.variants[g]:
        pts = sorted(
            [
                (c.n_params, *c.stat("val_loss")[:2])
                for m in a.sizes[g]
                if (c := a.cell(recipe, budget, m, vid)) is not None and c.n_params
            ],
            key=lambda t: t[0],
        )
        if not pts:
            continue
        _loss_points(ax, pts, colors[vid], variant_label(vid))
        if group_fit is not None and vid in group_fit.index:
            target = target_nonembedding(vid)[0]
            xs = np.geomspace(pts[0][0], max(target, pts[-1][0]), 100)
            ax.plot(xs, group_fit.loss(vid, xs), ls="--", lw=1, color=colors[vid])
    if group_fit is not None:
        ax.axvline(target_nonembedding("q_k_v")[0], color="0.6", lw=0.8, ls=":")
    ax.set_xscale("log")
    _log_loss_axis(ax)
    ax.set_xlabel("non-embedding parameters N")
    ax.set_ylabel("validation loss (nats / token)")
    kind = "" if group_fit is None else f"; dashed: {group_fit.kind} fit to the paper's 300M (dotted)"
    ax.set_title(f"{recipe}, {budget_label(budget)}{kind}", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, ncol=2)
    return save_png(fig, out / slug(f"{FIG_PREFIX}loss-vs-params-{recipe}-{budget_label(budget)}.png"))


def _loss_points(ax, pts: list[tuple], color: str, label: str) -> None:
    """(x, mean loss, spread over seeds) points joined by a line, with error bars."""
    ax.errorbar(
        [p[0] for p in pts],
        [p[1] for p in pts],
        yerr=[p[2] or 0.0 for p in pts],
        marker="o",
        ms=4,
        capsize=2,
        color=color,
        label=label,
    )


def _log_loss_axis(ax) -> None:
    """A log y axis labelled with plain loss values (losses span well under a decade)."""
    from matplotlib.ticker import FixedLocator, FormatStrFormatter, NullFormatter

    lo, hi = ax.get_ylim()
    ax.set_yscale("log")
    ax.yaxis.set_major_locator(FixedLocator(np.geomspace(lo, hi, 6)))
    ax.yaxis.set_major_formatter(FormatStrFormatter("%.2f"))
    ax.yaxis.set_minor_formatter(NullFormatter())


def plot_change(a: LadderAnalysis, g: GroupKey, records: list[dict], out: Path) -> Path | None:
    """Loss change vs QKV (%) vs N of QKV, error bars the paired 95% t-interval; hollow: no test."""
    recipe, budget = g
    mine = [r for r in records if r["recipe"] == recipe and r["budget"] == budget and r["mean_diff_pct"] is not None]
    if len({r["model"] for r in mine}) < 2:  # a single size is the table's row, not a trend
        return None
    colors = _colors(a)
    fig = figure()
    ax = fig.add_subplot()
    for vid in a.variants[g]:
        pts = sorted(
            [
                (a.size_n[(recipe, r["model"])], r)
                for r in mine
                if r["variant_id"] == vid and a.size_n.get((recipe, r["model"]))
            ],
            key=lambda t: t[0],
        )
        if not pts:
            continue
        color = colors[vid]
        ax.plot([x for x, _ in pts], [100 * r["mean_diff_pct"] for _, r in pts], color=color, label=variant_label(vid))
        tested = [(x, r) for x, r in pts if r["ci_low_pct"] is not None]
        if tested:
            ys = [100 * r["mean_diff_pct"] for _, r in tested]
            lo = [y - 100 * r["ci_low_pct"] for y, (_, r) in zip(ys, tested, strict=True)]
            hi = [100 * r["ci_high_pct"] - y for y, (_, r) in zip(ys, tested, strict=True)]
            ax.errorbar([x for x, _ in tested], ys, yerr=[lo, hi], fmt="o", ms=4, capsize=3, color=color)
        untested = [(x, 100 * r["mean_diff_pct"]) for x, r in pts if r["ci_low_pct"] is None]
        if untested:
            ax.plot(*zip(*untested, strict=True), "o", ms=6, mfc="white", color=color)
    ax.axhline(0.0, color="0.6", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("non-embedding parameters N (QKV)")
    ax.set_ylabel("val loss change vs QKV (%), bars: 95% t-interval", fontsize=8)
    ax.set_title(f"{recipe}, {budget_label(budget)}: change vs QKV (hollow: n=1, no test)", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, ncol=2)
    return save_png(fig, out / slug(f"{FIG_PREFIX}change-vs-size-{recipe}-{budget_label(budget)}.png"))


def plot_tokens(a: LadderAnalysis, recipe: str, model: str, budgets: list, vids: list[str], out: Path) -> Path:
    """Loss vs tokens trained at one size, one line per variant, 1-std bars."""
    colors = _colors(a)
    fig = figure()
    ax = fig.add_subplot()
    for vid in vids:
        pts = sorted(
            [
                (c.stat("tokens")[0] or (b or 0), *c.stat("val_loss")[:2])
                for b in budgets
                if (c := a.cell(recipe, b, model, vid)) is not None
            ],
            key=lambda t: t[0],
        )
        _loss_points(ax, pts, colors[vid], variant_label(vid))
    ax.set_xscale("log")
    ax.set_xlabel("tokens trained")
    ax.set_ylabel("validation loss (nats / token)")
    ax.set_title(f"{recipe}, {size_label(a, recipe, model)}: loss vs tokens", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, ncol=2)
    return save_png(fig, out / slug(f"{FIG_PREFIX}loss-vs-tokens-{recipe}-{model}.png"))


def plot_curve_changes(
    a: LadderAnalysis, recipe: str, budget: int | None, model: str, changes: dict, out: Path
) -> Path | None:
    """Training-loss change vs QKV (%) along the runs, one line per variant (``changes``: variant
    id -> :class:`~qkvlab.study.ladder.analysis.CurveChange`)."""
    if not changes:
        return None
    colors = _colors(a)
    fig = figure()
    ax = fig.add_subplot()
    for vid in sorted(changes, key=variant_order):
        c = changes[vid]
        ax.plot(c.tokens, c.change_pct, color=colors[vid], lw=1.2, label=f"{variant_label(vid)} (n={len(c.seeds)})")
    ax.axhline(0.0, color="0.6", lw=0.8)
    ax.set_xlabel("training tokens")
    ax.set_ylabel("training loss change vs QKV (%)")
    ax.set_title(
        f"{recipe}, {size_label(a, recipe, model)}, {budget_label(budget)}: change vs QKV during training "
        "(smoothed, mean over paired seeds)",
        fontsize=8,
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    return save_png(fig, out / slug(f"{FIG_PREFIX}change-during-training-{recipe}-{model}-{budget_label(budget)}.png"))
