"""The scaling ladder's analysis: finished rows in, every number the report shows out
(:class:`LadderAnalysis`, by :func:`analyse`): the recipe and learning rate of each row, the
chosen learning rates, the cells (variant x recipe x budget x size) and their statistics, the
verdicts in words.
"""

from __future__ import annotations

import functools
import itertools
import math
import statistics
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qkvlab.errors import ConfigError
from qkvlab.study.ladder.stats import (
    BudgetChange,
    GroupFit,
    PairedTest,
    PowerLawFit,
    Prediction,
    Trend,
    budget_change,
    change_trend,
    fit_group,
    paired_test,
    predict_change,
    rank_change,
)
from qkvlab.study.paper import PAPER_TABLES
from qkvlab.study.results import STATUS_OK, read_metrics
from qkvlab.study.spec import format_tokens
from qkvlab.study.tables import fmt_count, is_qkv, mean_std, variant_label, variant_order

TARGET_PRESET = "paper-300m"
#: Non-embedding parameters of QKV on the paper-300m shape, used only if the preset cannot be built.
TARGET_FALLBACK_N = 251_926_528

GroupKey = tuple[str, int | None]  # (recipe, token budget)
CellKey = tuple[str, int | None, str, str]  # (recipe, budget, model, variant_id)


# ================================================================== rows
def recipe_of(row: dict[str, Any]) -> str:
    """``gpt2`` or ``llama``: the config's ``model.recipe``, else the preset's, else the name's prefix."""
    model_cfg = (row.get("config") or {}).get("model") or {}
    if isinstance(model_cfg, dict) and model_cfg.get("recipe"):
        return str(model_cfg["recipe"])
    name = str(row.get("model") or "")
    from qkvlab.models.presets import PRESETS

    if name in PRESETS:
        return str(PRESETS[name]["recipe"])
    for prefix in ("gpt2", "llama"):
        if name.startswith(prefix + "-"):
            return prefix
    return "unknown"


def lr_of(row: dict[str, Any]) -> float | None:
    """``config.optim.lr`` of a run, rounded to 6 significant digits so that equal LRs compare equal."""
    optim = (row.get("config") or {}).get("optim") or {}
    lr = optim.get("lr") if isinstance(optim, dict) else None
    try:
        return float(f"{float(lr):.6g}") if lr is not None else None
    except (TypeError, ValueError):
        return None


@functools.cache
def preset_nonembedding(preset: str, variant: str) -> int | None:
    """Non-embedding parameters (:func:`qkvlab.costs.params_nonembedding`) of a preset with a variant;
    None if it cannot be built."""
    try:
        from qkvlab.costs import build_on_meta, params_nonembedding
        from qkvlab.models import get_preset

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return params_nonembedding(build_on_meta(get_preset(preset, variant=variant)))
    except (ConfigError, ImportError, KeyError, TypeError, ValueError, RuntimeError):
        return None


def nonembedding_of(row: dict[str, Any]) -> float | None:
    """The row's ``params_nonembedding``, else counted from its preset and variant."""
    n = row.get("params_nonembedding")
    if n is not None:
        return float(n)
    if row.get("model") and row.get("variant_id"):
        counted = preset_nonembedding(str(row["model"]), str(row["variant_id"]))
        return None if counted is None else float(counted)
    return None


def target_nonembedding(variant_id: str) -> tuple[float, str]:
    """(N, where it came from) of ``variant_id`` on the paper's 300M shape."""
    n = preset_nonembedding(TARGET_PRESET, variant_id)
    if n is not None:
        return float(n), f"counted on the `{TARGET_PRESET}` preset"
    return float(TARGET_FALLBACK_N), f"`{TARGET_PRESET}` could not be built: QKV's count {TARGET_FALLBACK_N:,} used"


# ================================================================== learning rate
@dataclass(frozen=True)
class LRChoice:
    """The LR sweep of one (recipe, model): mean val loss per LR at the sweep's budget, and the pick."""

    recipe: str
    model: str
    budget: int | None
    losses: dict[float, tuple[float, int]]  # lr -> (mean val loss, runs)
    chosen: float
    basis: str  # "QKV" or "all variants"


def choose_lrs(rows: Sequence[dict[str, Any]]) -> dict[tuple[str, str], LRChoice]:
    """The chosen LR per (recipe, model) that ran more than one LR; models with one LR are absent."""
    by_model: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        if lr_of(r) is not None and r.get("val_loss") is not None:
            by_model.setdefault((recipe_of(r), str(r.get("model"))), []).append(r)
    choices: dict[tuple[str, str], LRChoice] = {}
    for key, group in by_model.items():
        if len({lr_of(r) for r in group}) < 2:
            continue
        qkv = [r for r in group if is_qkv(str(r.get("variant_id", "")))]
        pool, basis = (qkv, "QKV") if len({lr_of(r) for r in qkv}) > 1 else (group, "all variants")
        budgets: dict[int | None, set[float]] = {}
        for r in pool:
            budgets.setdefault(r.get("tokens_budget"), set()).add(lr_of(r))
        budget = max(budgets, key=lambda b: (len(budgets[b]), b or 0))
        losses: dict[float, tuple[float, int]] = {}
        for lr in sorted(budgets[budget]):
            vals = [float(r["val_loss"]) for r in pool if r.get("tokens_budget") == budget and lr_of(r) == lr]
            losses[lr] = (statistics.fmean(vals), len(vals))
        chosen = min(losses, key=lambda lr: (losses[lr][0], lr))
        choices[key] = LRChoice(key[0], key[1], budget, losses, chosen, basis)
    return choices


def filter_chosen_lr(
    rows: Sequence[dict[str, Any]], choices: dict[tuple[str, str], LRChoice]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(kept, dropped): a swept model keeps only its runs at the chosen LR."""
    kept, dropped = [], []
    for r in rows:
        choice = choices.get((recipe_of(r), str(r.get("model"))))
        (kept if choice is None or lr_of(r) == choice.chosen else dropped).append(r)
    return kept, dropped


# ================================================================== cells
@dataclass
class Cell:
    """The runs of one variant at one (recipe, budget, model)."""

    recipe: str
    budget: int | None
    model: str
    variant_id: str
    rows: list[dict[str, Any]]

    def stat(self, key: str) -> tuple[float | None, float | None, int]:
        return mean_std(r.get(key) for r in self.rows)

    def by_seed(self, key: str = "val_loss") -> dict[Any, float]:
        """Mean of ``key`` per seed (a seed run twice, e.g. on two code versions, is averaged)."""
        vals: dict[Any, list[float]] = {}
        for r in self.rows:
            if r.get(key) is not None:
                vals.setdefault(r.get("seed"), []).append(float(r[key]))
        return {s: statistics.fmean(v) for s, v in vals.items()}

    @property
    def n_params(self) -> float | None:
        return mean_std(nonembedding_of(r) for r in self.rows)[0]


def build_cells(rows: Sequence[dict[str, Any]]) -> dict[CellKey, Cell]:
    cells: dict[CellKey, Cell] = {}
    for r in rows:
        key = (recipe_of(r), r.get("tokens_budget"), str(r.get("model")), str(r.get("variant_id")))
        cells.setdefault(key, Cell(*key, rows=[])).rows.append(r)
    return cells


def relative_change(value: float | None, baseline: float | None) -> float | None:
    if value is None or baseline is None or baseline == 0:
        return None
    return value / baseline - 1.0


# ================================================================== verdicts
def _pct_range(values: Sequence[float]) -> str:
    lo, hi = min(values), max(values)
    return f"{lo:+.2f}%" if abs(hi - lo) < 0.005 else f"{lo:+.2f}% to {hi:+.2f}%"


def verdict(
    label: str,
    changes: dict[str, float],
    outcomes: dict[str, str],
    trend: Trend | None,
    prediction: Prediction | None = None,
    paper_change: float | None = None,
    prediction_problem: str = "",
) -> str:
    """One plain-words line from the numbers, by the rules in the module docstring.

    ``changes``: size -> loss change vs QKV in %; ``outcomes``: size -> PairedTest.outcome.
    """
    if not changes:
        return f"{label}: not yet run beside QKV at any size."
    sizes = list(changes)
    by = {k: [s for s in sizes if outcomes.get(s) == k] for k in ("worse", "better", "undecided", "untested")}
    tested = by["worse"] + by["better"] + by["undecided"]
    parts: list[str] = []
    if not tested:
        parts.append(f"loss change {_pct_range(list(changes.values()))} (single seeds: n=1, no test)")
    elif len(by["worse"]) == len(tested):
        parts.append(f"costs {_pct_range([changes[s] for s in tested])} loss at every tested size")
    elif len(by["better"]) == len(tested):
        parts.append(f"gains {_pct_range([changes[s] for s in tested])} loss at every tested size")
    elif len(by["undecided"]) == len(tested):
        parts.append(
            f"no difference shown at any tested size (changes {_pct_range([changes[s] for s in tested])}; every "
            "interval includes 0): data cannot decide"
        )
    else:
        for kind, text in (("worse", "worse than QKV"), ("better", "better than QKV")):
            if by[kind]:
                parts.append(f"{text} at {', '.join(by[kind])} ({_pct_range([changes[s] for s in by[kind]])})")
        if by["undecided"]:
            parts.append(f"data cannot decide at {', '.join(by['undecided'])} (interval includes 0)")
    if tested and by["untested"]:
        parts.append(f"n=1, no test at {', '.join(by['untested'])}")
    if trend is None or trend.ci_low is None:
        parts.append("trend with size not assessed (fewer than 3 sizes)")
    else:
        slope = f"slope {trend.slope:+.2f} pt per decade of N, 95% CI [{trend.ci_low:+.2f}, {trend.ci_high:+.2f}]"
        # Said by the slope's direction, not as a "gap": a gap "growing" read as a growing cost
        # even where the variant was pulling ahead of QKV (a falling change of mixed sign).
        if trend.ci_low > 0:
            parts.append(f"change vs QKV rises with size: {label} loses ground to QKV as N grows ({slope})")
        elif trend.ci_high < 0:
            parts.append(f"change vs QKV falls with size: {label} gains on QKV as N grows ({slope})")
        else:
            parts.append(f"change vs QKV flat within the data ({slope}, includes 0)")
    if prediction is not None and prediction_problem:
        parts.append(f"no extrapolation to 300M ({prediction_problem})")
    elif prediction is not None:
        ci = (
            "" if prediction.ci_low is None else f" [{100 * prediction.ci_low:+.1f}%, {100 * prediction.ci_high:+.1f}%]"
        )
        paper = "" if paper_change is None else f" (paper Table 4: {100 * paper_change:+.1f}%)"
        parts.append(f"extrapolated to 300M: PPL {100 * prediction.ppl_change:+.1f}%{ci}{paper}")
    return f"{label}: " + "; ".join(parts) + "."


# ================================================================== the analysis
@dataclass
class LadderAnalysis:
    """Every number the report shows, computed from the finished runs by :func:`analyse`."""

    rows: list[dict[str, Any]]
    dropped: list[dict[str, Any]]
    lr_choices: dict[tuple[str, str], LRChoice]
    cells: dict[CellKey, Cell]
    groups: list[GroupKey]
    sizes: dict[GroupKey, list[str]]
    variants: dict[GroupKey, list[str]]
    size_n: dict[tuple[str, str], float | None]  # (recipe, model) -> QKV's non-embedding N
    tests: dict[CellKey, PairedTest] = field(default_factory=dict)
    fits: dict[GroupKey, tuple[dict[str, PowerLawFit], GroupFit | None, list[str]]] = field(default_factory=dict)
    predictions: dict[tuple[str, int | None, str], Prediction] = field(default_factory=dict)
    target_notes: dict[str, str] = field(default_factory=dict)
    trends: dict[tuple[str, int | None, str], Trend | None] = field(default_factory=dict)
    rankings: list[dict[str, Any]] = field(default_factory=list)
    # (recipe, smaller budget, larger budget, variant) -> its change vs QKV moved between them
    budget_changes: dict[tuple[str, int | None, int | None, str], BudgetChange | None] = field(default_factory=dict)
    verdicts: dict[tuple[str, int | None, str], str] = field(default_factory=dict)

    def cell(self, recipe: str, budget: int | None, model: str, vid: str) -> Cell | None:
        return self.cells.get((recipe, budget, model, vid))

    def baseline(self, group: GroupKey) -> str | None:
        return next((v for v in self.variants[group] if is_qkv(v)), None)

    def change(self, key: CellKey, metric: str = "val_loss") -> float | None:
        recipe, budget, model, _ = key
        base = self.baseline((recipe, budget))
        c, b = self.cells.get(key), (self.cells.get((recipe, budget, model, base)) if base else None)
        if c is None or b is None:
            return None
        return relative_change(c.stat(metric)[0], b.stat(metric)[0])


def _size_order(rows: Sequence[dict[str, Any]]) -> dict[tuple[str, str], float | None]:
    """QKV's non-embedding N per (recipe, model), else any variant's; None if unknown."""
    out: dict[tuple[str, str], list[float]] = {}
    anyn: dict[tuple[str, str], list[float]] = {}
    for r in rows:
        key = (recipe_of(r), str(r.get("model")))
        n = nonembedding_of(r)
        anyn.setdefault(key, [])
        if n is not None:
            anyn[key].append(n)
            if is_qkv(str(r.get("variant_id"))):
                out.setdefault(key, []).append(n)
    return {k: statistics.fmean(out.get(k) or v) if (out.get(k) or v) else None for k, v in anyn.items()}


def analyse(rows: Sequence[dict[str, Any]]) -> LadderAnalysis:
    """All sections' numbers from the finished runs (``status == "ok"``)."""
    ok = [r for r in rows if r.get("status", STATUS_OK) == STATUS_OK and r.get("val_loss") is not None]
    choices = choose_lrs(ok)
    kept, dropped = filter_chosen_lr(ok, choices)
    cells = build_cells(kept)
    size_n = _size_order(kept)
    groups = sorted({(k[0], k[1]) for k in cells}, key=lambda g: (g[0], g[1] or 0))
    sizes: dict[GroupKey, list[str]] = {}
    variants: dict[GroupKey, list[str]] = {}
    for g in groups:
        models = {k[2] for k in cells if (k[0], k[1]) == g}
        sizes[g] = sorted(models, key=lambda m: (size_n.get((g[0], m)) or math.inf, m))
        variants[g] = sorted({k[3] for k in cells if (k[0], k[1]) == g}, key=variant_order)
    a = LadderAnalysis(kept, dropped, choices, cells, groups, sizes, variants, size_n)

    for g in groups:
        base = a.baseline(g)
        recipe, budget = g
        if base is not None:
            for model in sizes[g]:
                b = a.cell(recipe, budget, model, base)
                for vid in variants[g]:
                    c = a.cell(recipe, budget, model, vid)
                    if b is not None and c is not None and vid != base:
                        a.tests[(recipe, budget, model, vid)] = paired_test(b.by_seed(), c.by_seed())
        data: dict[str, tuple[list[float], list[float]]] = {}
        for vid in variants[g]:
            pts = [
                (c.n_params, c.stat("val_loss")[0])
                for m in sizes[g]
                if (c := a.cell(recipe, budget, m, vid)) is not None and c.n_params
            ]
            if pts:
                data[vid] = ([p[0] for p in pts], [p[1] for p in pts])
        free, group_fit, notes = fit_group(data) if data else ({}, None, [])
        a.fits[g] = (free, group_fit, notes)
        if group_fit is not None and base is not None and base in group_fit.index:
            n_base, a.target_notes[base] = target_nonembedding(base)
            for vid in group_fit.index:
                n_var, a.target_notes[vid] = target_nonembedding(vid)
                a.predictions[(recipe, budget, vid)] = predict_change(group_fit, vid, base, n_var, n_base)
        for vid in variants[g]:
            if vid == base:
                continue
            pts = [
                (math.log10(n), 100 * ch)
                for m in sizes[g]
                if (ch := a.change((recipe, budget, m, vid))) is not None and (n := size_n.get((recipe, m)))
            ]
            a.trends[(recipe, budget, vid)] = change_trend([p[0] for p in pts], [p[1] for p in pts])

    for recipe in sorted({g[0] for g in groups}):
        budgets = [g[1] for g in groups if g[0] == recipe]
        models = sorted(
            {m for g in groups if g[0] == recipe for m in sizes[g]}, key=lambda m: size_n.get((recipe, m)) or 0
        )
        for model in models:
            present = [b for b in budgets if model in sizes[(recipe, b)]]
            for b1, b2 in itertools.pairwise(present):
                la = {v: c.stat("val_loss")[0] for v in variants[(recipe, b1)] if (c := a.cell(recipe, b1, model, v))}
                lb = {v: c.stat("val_loss")[0] for v in variants[(recipe, b2)] if (c := a.cell(recipe, b2, model, v))}
                res = rank_change(la, lb)
                a.rankings.append(
                    {"recipe": recipe, "model": model, "budget_a": b1, "budget_b": b2, **(res or {"variants": []})}
                )
        # Does the change vs QKV grow or shrink with more tokens? The smallest and largest budgets,
        # over every size run at both (sizes are the replicates here).
        if len(budgets) >= 2:
            lo, hi = budgets[0], budgets[-1]
            for vid in variants[(recipe, lo)]:
                if is_qkv(vid) or vid not in variants[(recipe, hi)]:
                    continue
                per = [
                    {m: 100 * ch for m in models if (ch := a.change((recipe, b, m, vid))) is not None} for b in (lo, hi)
                ]
                a.budget_changes[(recipe, lo, hi, vid)] = budget_change(per[0], per[1], models)

    paper = PAPER_TABLES["table4"].values
    for g in groups:
        base = a.baseline(g)
        for vid in variants[g]:
            if vid == base:
                continue
            changes, outcomes = {}, {}
            for m in sizes[g]:
                ch = a.change((g[0], g[1], m, vid))
                if ch is not None:
                    changes[m] = 100 * ch
                    t = a.tests.get((g[0], g[1], m, vid))
                    outcomes[m] = t.outcome if t is not None else "untested"
            group_fit = a.fits[g][1] if g in a.fits else None
            a.verdicts[(g[0], g[1], vid)] = verdict(
                variant_label(vid),
                changes,
                outcomes,
                a.trends.get((g[0], g[1], vid)),
                a.predictions.get((g[0], g[1], vid)),
                paper.get(variant_label(vid), {}).get("delta"),
                group_fit.problem(vid, base) if group_fit is not None and base is not None else "",
            )
    return a


# ================================================================== labels
def budget_label(budget: int | None) -> str:
    return "no token budget" if budget is None else f"{format_tokens(int(budget))} tokens"


def size_label(a: LadderAnalysis, recipe: str, model: str) -> str:
    n = a.size_n.get((recipe, model))
    return f"{model} ({fmt_count(n)})" if n else model


# ============================================================ change along the runs
#: Where along a run the report reads the training-loss change (fractions of its tokens).
CURVE_FRACTIONS = (0.25, 0.5, 0.75, 1.0)
#: Logged points in the trailing mean that smooths a training-loss curve (25 steps apart in the
#: ladder's config: 200 steps, about a twelfth of a full-budget run).
CURVE_WINDOW = 8


@dataclass
class CurveChange:
    """A variant's training loss against QKV's along their runs at one (recipe, budget, size):
    at each logged token count, the mean over seeds (paired: the same seed sees the same
    batches) of smoothed loss / QKV's smoothed loss - 1, in percent."""

    tokens: list[int]
    change_pct: list[float]
    seeds: list[Any]

    def at(self, fraction: float) -> float | None:
        """The change at the last logged point at or before ``fraction`` of the run's tokens."""
        if not self.tokens:
            return None
        limit = fraction * self.tokens[-1] * (1 + 1e-9)
        inside = [c for t, c in zip(self.tokens, self.change_pct, strict=True) if t <= limit]
        return inside[-1] if inside else None


def _smoothed_train_loss(run_dir: Any, window: int) -> dict[int, float]:
    """tokens -> mean training loss over the ``window`` logged points ending there."""
    pts = sorted((int(m["tokens"]), float(m["loss"])) for m in read_metrics(run_dir) if m.get("loss") is not None)
    out = {}
    for i in range(window - 1, len(pts)):
        out[pts[i][0]] = statistics.fmean(loss for _, loss in pts[i - window + 1 : i + 1])
    return out


def curve_change(cell: Cell, base: Cell, study_dir: Any, window: int = CURVE_WINDOW) -> CurveChange | None:
    """:class:`CurveChange` of ``cell`` against ``base`` (QKV) from the runs' ``metrics.jsonl``
    under ``study_dir``; None where no seed has both curves (e.g. rows without run folders)."""

    def curves(c: Cell) -> dict[Any, dict[int, float]]:
        out: dict[Any, dict[int, float]] = {}
        for r in c.rows:
            if r.get("out_dir") and r.get("seed") not in out:  # a seed run twice: its first run
                curve = _smoothed_train_loss(Path(study_dir) / r["out_dir"], window)
                if curve:
                    out[r.get("seed")] = curve
        return out

    mine, theirs = curves(cell), curves(base)
    seeds = sorted((s for s in mine if s in theirs), key=str)
    if not seeds:
        return None
    tokens = sorted(set.intersection(*(set(mine[s]) & set(theirs[s]) for s in seeds)))
    if not tokens:
        return None
    change = [100 * statistics.fmean(mine[s][t] / theirs[s][t] - 1 for s in seeds) for t in tokens]
    return CurveChange(tokens, change, seeds)


# ============================================================ training stability
#: A run is flagged when its mean gradient norm over the second half of training exceeds this many
#: times the larger of its clipping threshold and its own median over the first half.
UNSTABLE_FACTOR = 3.0


@dataclass
class Instability:
    """A run whose gradients grew large late in training (the clipped updates then carry on in a
    fixed-norm direction, and its final loss reflects that as much as the variant)."""

    run_id: str
    recipe: str
    model: str
    budget: int | None
    variant_id: str
    seed: Any
    clip: float
    early_median: float
    late_mean: float
    max_grad_norm: float
    val_loss: float | None


def instability(row: dict[str, Any], study_dir: Any, factor: float = UNSTABLE_FACTOR) -> Instability | None:
    """The row's :class:`Instability` if its logged gradient norms meet the rule above, else None
    (also None for a row without a run folder or gradient norms)."""
    if not row.get("out_dir"):
        return None
    norms = [
        float(m["grad_norm"])
        for m in sorted(read_metrics(Path(study_dir) / row["out_dir"]), key=lambda m: m.get("step") or 0)
        if m.get("loss") is not None and m.get("grad_norm") is not None
    ]
    if len(norms) < 4:
        return None
    half = len(norms) // 2
    optim = (row.get("config") or {}).get("optim") or {}
    clip = float(optim.get("grad_clip", 1.0) or 0.0) if isinstance(optim, dict) else 1.0
    early, late = statistics.median(norms[:half]), statistics.fmean(norms[half:])
    if math.isfinite(late) and late <= factor * max(clip, early):  # a NaN or infinite norm is flagged
        return None
    return Instability(
        run_id=str(row.get("run_id")), recipe=recipe_of(row), model=str(row.get("model")),
        budget=row.get("tokens_budget"), variant_id=str(row.get("variant_id")), seed=row.get("seed"),
        clip=clip, early_median=early, late_mean=late, max_grad_norm=max(norms), val_loss=row.get("val_loss"),
    )  # fmt: skip
