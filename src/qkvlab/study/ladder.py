"""Scaling-ladder analysis of a study: variants x model sizes x token budgets x seeds.

:func:`write_ladder_report` reads ``results.jsonl`` (finished runs only) and writes
``report.md``, PNG figures and ``ladder_summary.json`` (every number the report shows). Runs
of the ``gpt2`` and ``llama`` recipes are analysed separately; the recipe is the run config's
``model.recipe``, else the preset's, else the preset name's prefix.

Learning rate. A model whose runs used more than one ``optim.lr`` had an LR sweep. The chosen
LR is the one with the lowest mean QKV validation loss at the budget with the most swept LRs
(ties: the larger budget); without QKV runs there, the mean over all variants decides. The
main analysis keeps only that model's runs at the chosen LR; models with one LR keep all.

Statistics (all on validation loss, nats/token; changes vs QKV of the same recipe, size and
budget):

* Change vs QKV: mean loss (and mean PPL) of the variant over QKV's, minus 1.
* Paired test per (size, budget): differences variant - QKV over the seeds both have; with
  n >= 2 pairs, the 95% t-interval of the mean difference (``scipy.stats.t``) and the two-sided
  p-value of a one-sample t-test (``scipy.stats.ttest_1samp``). One pair: "n=1, no test".
  A difference is claimed only where the interval excludes 0.
* Fits of ``L(N) = E + A * (N / 1e6) ** -alpha`` per variant against non-embedding parameters N
  (``scipy.optimize.curve_fit``; E >= 0, A > 0, 0 < alpha < 2; starting point from a grid over
  alpha with E and A by least squares). Standard errors come from the covariance. A variant with
  exactly 3 sizes has an exact fit without uncertainty. The fit used to extrapolate is chosen per
  (recipe, budget), the same kind for every variant there:

  1. every fitted variant has >= 4 sizes: the free 3-parameter fits;
  2. else one joint fit with E shared by all variants (the irreducible loss is a property of the
     data, not of the attention), A and alpha per variant, if it has >= 1 degree of freedom;
  3. else a 2-parameter power law ``L = A * (N / 1e6) ** -alpha`` fitted to log L.

  Variants with fewer than 3 sizes are not fitted.
* Extrapolation to the paper's 300M model: each variant at its own non-embedding count on the
  ``paper-300m`` shape (QKV: 251.9M; the paper's "300M" counts embeddings). The PPL change is
  ``exp(L_variant - L_QKV) - 1``; its 95% interval is the 2.5/97.5 percentiles of 2000 draws
  from the fit's parameter covariance (``numpy.random.default_rng(0)``; draws outside the bounds
  are dropped). This covers the fit's noise only, not a wrong functional form.
* Trend with size: ``scipy.stats.linregress`` of the change vs QKV (% of loss) on log10 N of
  QKV at each size, with the slope's 95% t-interval (3+ sizes).
* Ranking across budgets at fixed size: ``scipy.stats.spearmanr`` over the variants both
  budgets have (3+ variants).

Verdict rules, per (recipe, budget, variant):

* Level: sizes with a paired test are "worse" (interval above 0), "better" (below 0) or
  "undecided" (interval includes 0). All worse: "costs a-b% loss at every tested size"; all
  better: "gains a-b% loss at every tested size"; all undecided: "no difference shown at any tested
  size ... data cannot decide"; otherwise the sizes of each kind are listed and "data cannot
  decide" is said for the undecided ones. Sizes with one seed: "n=1, no test".
* Trend (3+ sizes): slope interval excluding 0 and of the same sign as the mean change: "gap
  grows with size"; of the opposite sign: "gap shrinks with size"; including 0: "flat within the
  data". Fewer than 3 sizes: "trend not assessed".
* The extrapolated PPL change and its interval, beside the paper's Table 4 change.
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import statistics
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from qkvlab.attention.variant import PAPER_LM_VARIANTS, VariantSpec
from qkvlab.checkpoint import atomic_write
from qkvlab.errors import ConfigError
from qkvlab.study.downstream import HARNESS_STATUS, downstream_section, harness_rows
from qkvlab.study.report import (
    PAPER_TABLES,
    REPORT_DIR,
    _commits,
    _figure,
    _save,
    _slug,
    _study_name,
    fmt_count,
    is_baseline,
    markdown_table,
    mean_std,
)
from qkvlab.study.results import STATUS_FAILED, STATUS_OK, STATUS_SKIPPED, ResultsStore

N_SCALE = 1e6  # fit in millions of parameters so that A and alpha stay of order one
ALPHA_MAX = 2.0
CONFIDENCE = 0.95
N_DRAWS = 2000
TARGET_PRESET = "paper-300m"
#: Non-embedding parameters of QKV on the paper-300m shape, used only if the preset cannot be built.
TARGET_FALLBACK_N = 251_926_528
FIG_PREFIX = "scaling-"

GroupKey = tuple[str, int | None]  # (recipe, token budget)
CellKey = tuple[str, int | None, str, str]  # (recipe, budget, model, variant_id)


# ================================================================== rows
def _scipy():
    try:
        from scipy import optimize, stats
    except ImportError:
        raise ConfigError(
            "The ladder report needs scipy, which is not installed: pip install 'qkvlab[plots]'."
        ) from None
    return stats, optimize


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


def variant_label(variant_id: str) -> str:
    try:
        return VariantSpec.parse(variant_id).paper_name
    except (ConfigError, ValueError):
        return variant_id


def _is_qkv(variant_id: str) -> bool:
    try:
        return is_baseline(variant_id)
    except (ConfigError, ValueError):
        return variant_id == "QKV"


def variant_order(variant_id: str) -> tuple[int, str]:
    """QKV first, then the paper's Table 4 order, then the rest by id."""
    if _is_qkv(variant_id):
        return (-1, variant_id)
    name = variant_label(variant_id)
    return (PAPER_LM_VARIANTS.index(name) if name in PAPER_LM_VARIANTS else len(PAPER_LM_VARIANTS), variant_id)


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
        qkv = [r for r in group if _is_qkv(str(r.get("variant_id", "")))]
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


# ================================================================== paired test
@dataclass(frozen=True)
class PairedTest:
    """Variant - QKV over common seeds: mean, 95% t-interval and two-sided p (None for n < 2)."""

    n: int
    mean_diff: float | None
    ci_low: float | None
    ci_high: float | None
    p_value: float | None
    seeds: tuple[Any, ...]

    @property
    def tested(self) -> bool:
        return self.ci_low is not None

    @property
    def outcome(self) -> str:
        """``worse`` / ``better`` (interval above / below 0), ``undecided``, or ``untested``."""
        if not self.tested:
            return "untested"
        if self.ci_low > 0:
            return "worse"
        if self.ci_high < 0:
            return "better"
        return "undecided"


def paired_test(baseline: dict[Any, float], other: dict[Any, float], confidence: float = CONFIDENCE) -> PairedTest:
    """Paired by seed: t-interval of the mean of ``other[s] - baseline[s]`` and a one-sample t-test."""
    seeds = tuple(sorted(set(baseline) & set(other), key=str))
    d = np.array([other[s] - baseline[s] for s in seeds], dtype=float)
    if len(d) == 0:
        return PairedTest(0, None, None, None, None, seeds)
    mean = float(d.mean())
    if len(d) < 2:
        return PairedTest(1, mean, None, None, None, seeds)
    stats, _ = _scipy()
    se = float(d.std(ddof=1)) / math.sqrt(len(d))
    if se == 0.0:  # identical differences: the interval is a point and the t statistic undefined
        return PairedTest(len(d), mean, mean, mean, None, seeds)
    half = float(stats.t.ppf(0.5 + confidence / 2, len(d) - 1)) * se
    p = float(stats.ttest_1samp(d, 0.0).pvalue)
    return PairedTest(len(d), mean, mean - half, mean + half, p, seeds)


# ================================================================== fits
@dataclass(frozen=True)
class PowerLawFit:
    """``L = E + A * (N / 1e6) ** -alpha`` with standard errors (None where not estimable)."""

    kind: str  # "free", "shared_E" or "loglog" (E fixed at 0)
    E: float
    A: float
    alpha: float
    se_E: float | None
    se_A: float | None
    se_alpha: float | None
    n_points: int
    dof: int
    note: str = ""

    def predict(self, n_params: float | np.ndarray) -> float | np.ndarray:
        return self.E + self.A * (np.asarray(n_params, dtype=float) / N_SCALE) ** -self.alpha


def _law(x: np.ndarray, E: float, A: float, alpha: float) -> np.ndarray:
    return E + A * x**-alpha


def _initial_guess(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    """E and A by least squares for each alpha on a grid (E clipped at 0); the best (E, A, alpha)."""
    best: tuple[float, float, float, float] | None = None
    for alpha in np.linspace(0.01, ALPHA_MAX - 0.01, 199):
        z = x**-alpha
        (E, A), *_ = np.linalg.lstsq(np.column_stack([np.ones_like(z), z]), y, rcond=None)
        if E < 0:
            E, A = 0.0, float(z @ y / (z @ z))
        if A <= 0:
            continue
        sse = float(np.sum((E + A * z - y) ** 2))
        if best is None or sse < best[0]:
            best = (sse, float(E), float(A), float(alpha))
    if best is None:  # loss does not fall with size: start flat
        return float(y.min()) * 0.5, float(y.mean()) * 0.5, 0.1
    return best[1:]


def _se(cov: np.ndarray | None, i: int | None) -> float | None:
    if cov is None or i is None or not np.isfinite(cov[i, i]) or cov[i, i] < 0:
        return None
    return float(math.sqrt(cov[i, i]))


def _fit_free(x: np.ndarray, y: np.ndarray) -> tuple[PowerLawFit, np.ndarray | None]:
    _, optimize = _scipy()
    if len(np.unique(x)) < 3:
        raise ValueError(f"a 3-parameter fit needs 3+ distinct sizes, got {len(np.unique(x))}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # exact fits warn that the covariance cannot be estimated
        popt, pcov = optimize.curve_fit(
            _law, x, y, p0=_initial_guess(x, y), bounds=([0, 0, 0], [np.inf, np.inf, ALPHA_MAX]), max_nfev=20000
        )
    dof = len(x) - 3
    cov = pcov if dof > 0 and np.all(np.isfinite(pcov)) else None
    note = "" if dof > 0 else "3 points, 3 parameters: exact fit, no uncertainty"
    fit = PowerLawFit("free", *map(float, popt), _se(cov, 0), _se(cov, 1), _se(cov, 2), len(x), dof, note)
    return fit, cov


def fit_power_law(n_params: Sequence[float], losses: Sequence[float]) -> PowerLawFit:
    """Free 3-parameter fit; needs 3+ distinct sizes (3 points: exact, no standard errors)."""
    return _fit_free(np.asarray(n_params, dtype=float) / N_SCALE, np.asarray(losses, dtype=float))[0]


def fit_log_power_law(n_params: Sequence[float], losses: Sequence[float]) -> tuple[PowerLawFit, np.ndarray | None]:
    """``log L = log A - alpha log(N / 1e6)`` by least squares: the fit and the covariance of (log A, alpha)."""
    _, optimize = _scipy()
    lx = np.log(np.asarray(n_params, dtype=float) / N_SCALE)
    ly = np.log(np.asarray(losses, dtype=float))
    if len(np.unique(lx)) < 2:
        raise ValueError("a power law needs 2+ distinct sizes")
    slope, intercept = np.polyfit(lx, ly, 1)
    p0 = (float(intercept), float(np.clip(-slope, 1e-3, ALPHA_MAX - 1e-3)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        popt, pcov = optimize.curve_fit(
            lambda t, logA, alpha: logA - alpha * t, lx, ly, p0=p0, bounds=([-np.inf, 0], [np.inf, ALPHA_MAX])
        )
    dof = len(lx) - 2
    cov = pcov if dof > 0 and np.all(np.isfinite(pcov)) else None
    A = float(math.exp(popt[0]))
    se_logA = _se(cov, 0)
    fit = PowerLawFit(
        "loglog",
        0.0,
        A,
        float(popt[1]),
        None,
        None if se_logA is None else A * se_logA,
        _se(cov, 1),
        len(lx),
        dof,
        "E fixed at 0" + ("" if dof > 0 else "; exact fit, no uncertainty"),
    )
    return fit, cov


@dataclass
class GroupFit:
    """The fit used to extrapolate every variant of one (recipe, budget), with its joint covariance.

    ``index[variant] = (i_E, i_A, i_alpha)`` into ``params``; for ``loglog`` i_E is None (E = 0)
    and ``params[i_A]`` holds log A.
    """

    kind: str
    params: np.ndarray
    cov: np.ndarray | None
    index: dict[str, tuple[int | None, int, int]]
    fits: dict[str, PowerLawFit]
    note: str

    def curve(self, variant_id: str, params: np.ndarray | None = None) -> tuple[Any, Any, Any]:
        """(E, A, alpha) of a variant; ``params`` may be a (draws, P) array of samples."""
        p = self.params if params is None else params
        iE, iA, ia = self.index[variant_id]
        E = 0.0 if iE is None else p[..., iE]
        A = np.exp(p[..., iA]) if self.kind == "loglog" else p[..., iA]
        return E, A, p[..., ia]

    def loss(self, variant_id: str, n_params: float, params: np.ndarray | None = None) -> Any:
        E, A, alpha = self.curve(variant_id, params)
        return E + A * (n_params / N_SCALE) ** -alpha


def _block_fit(kind: str, fits: dict[str, tuple[PowerLawFit, np.ndarray | None, list[float]]], note: str) -> GroupFit:
    """Independent per-variant fits as one GroupFit: a block-diagonal covariance, NaN blocks where unknown."""
    size = sum(len(p) for _, _, p in fits.values())
    params = np.zeros(size)
    cov = np.zeros((size, size))
    index: dict[str, tuple[int | None, int, int]] = {}
    i = 0
    for vid, (_, c, p) in fits.items():
        k = len(p)
        params[i : i + k] = p
        cov[i : i + k, i : i + k] = np.nan if c is None else c
        index[vid] = (i, i + 1, i + 2) if k == 3 else (None, i, i + 1)
        i += k
    return GroupFit(kind, params, cov, index, {v: f for v, (f, _, _) in fits.items()}, note)


def fit_shared_e(data: dict[str, tuple[Sequence[float], Sequence[float]]]) -> GroupFit:
    """One fit with E shared by every variant and (A, alpha) per variant."""
    _, optimize = _scipy()
    vids = list(data)
    xs = [np.asarray(data[v][0], dtype=float) / N_SCALE for v in vids]
    ys = [np.asarray(data[v][1], dtype=float) for v in vids]
    X, Y = np.concatenate(xs), np.concatenate(ys)
    which = np.concatenate([np.full(len(x), i) for i, x in enumerate(xs)])
    best = None
    for E in np.linspace(0.0, 0.99 * float(Y.min()), 100):  # E on a grid, each power law by log-space lines
        p, sse = [E], 0.0
        for x, y in zip(xs, ys, strict=True):
            slope, icpt = np.polyfit(np.log(x), np.log(y - E), 1)
            alpha = float(np.clip(-slope, 1e-3, ALPHA_MAX - 1e-3))
            A = float(np.exp(icpt))
            p += [A, alpha]
            sse += float(np.sum((E + A * x**-alpha - y) ** 2))
        if best is None or sse < best[0]:
            best = (sse, p)

    def model(_, E, *ab):
        ab = np.asarray(ab)
        return E + ab[0::2][which] * X ** -ab[1::2][which]

    k = 1 + 2 * len(vids)
    lower = [0.0] + [0.0, 0.0] * len(vids)
    upper = [np.inf] + [np.inf, ALPHA_MAX] * len(vids)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        popt, pcov = optimize.curve_fit(model, np.arange(len(X)), Y, p0=best[1], bounds=(lower, upper), max_nfev=20000)
    dof = len(X) - k
    cov = pcov if dof > 0 and np.all(np.isfinite(pcov)) else None
    index = {v: (0, 1 + 2 * i, 2 + 2 * i) for i, v in enumerate(vids)}
    fits = {
        v: PowerLawFit(
            "shared_E",
            float(popt[0]),
            float(popt[index[v][1]]),
            float(popt[index[v][2]]),
            _se(cov, 0),
            _se(cov, index[v][1]),
            _se(cov, index[v][2]),
            len(xs[i]),
            dof,
            "E shared by all variants of this budget",
        )
        for i, v in enumerate(vids)
    }
    note = f"joint fit, E shared: {len(X)} points, {k} parameters, {dof} degrees of freedom"
    return GroupFit("shared_E", np.asarray(popt, dtype=float), cov, index, fits, note)


def fit_group(
    data: dict[str, tuple[Sequence[float], Sequence[float]]],
) -> tuple[dict[str, PowerLawFit], GroupFit | None, list[str]]:
    """Free fits of the variants with 3+ sizes, the fit used to extrapolate (rules in the module
    docstring) and notes on what was not fitted."""
    notes: list[str] = []
    eligible = {v: d for v, d in data.items() if len(set(d[0])) >= 3}
    for v, d in data.items():
        if v not in eligible:
            notes.append(f"{variant_label(v)}: {len(set(d[0]))} size(s), a fit needs 3: not fitted")
    free: dict[str, tuple[PowerLawFit, np.ndarray | None, list[float]]] = {}
    for v, (n, loss) in eligible.items():
        try:
            fit, cov = _fit_free(np.asarray(n, dtype=float) / N_SCALE, np.asarray(loss, dtype=float))
        except (RuntimeError, ValueError) as e:
            notes.append(f"{variant_label(v)}: the fit did not converge ({e})")
            continue
        free[v] = (fit, cov, [fit.E, fit.A, fit.alpha])
    fits = {v: f for v, (f, _, _) in free.items()}
    if not free:
        return fits, None, notes
    if all(f.n_points >= 4 for f in fits.values()):
        return fits, _block_fit("free", free, "free 3-parameter fits (every variant has 4+ sizes)"), notes
    fitted = {v: eligible[v] for v in free}
    if sum(len(d[0]) for d in fitted.values()) - (1 + 2 * len(fitted)) >= 1:
        try:
            return fits, fit_shared_e(fitted), notes
        except (RuntimeError, ValueError) as e:
            notes.append(f"the shared-E fit did not converge ({e}); 2-parameter power laws used")
    logs: dict[str, tuple[PowerLawFit, np.ndarray | None, list[float]]] = {}
    for v, (n, loss) in fitted.items():
        fit, cov = fit_log_power_law(n, loss)
        logs[v] = (fit, cov, [math.log(fit.A), fit.alpha])
    return fits, _block_fit("loglog", logs, "2-parameter power laws in log space (too few points for E)"), notes


@dataclass(frozen=True)
class Prediction:
    """A variant vs QKV at the target sizes: predicted losses, PPL change and its 95% interval."""

    n_variant: float
    n_baseline: float
    loss: float
    loss_baseline: float
    ppl_change: float
    ci_low: float | None
    ci_high: float | None
    draws_kept: int


def predict_change(
    group: GroupFit,
    variant_id: str,
    baseline_id: str,
    n_variant: float,
    n_baseline: float,
    *,
    draws: int = N_DRAWS,
    seed: int = 0,
) -> Prediction:
    """PPL change ``exp(L_v - L_QKV) - 1`` at the given sizes, with a parametric-bootstrap interval."""
    lv = float(group.loss(variant_id, n_variant))
    lb = float(group.loss(baseline_id, n_baseline))
    change = math.exp(lv - lb) - 1.0
    idx = sorted({i for v in (variant_id, baseline_id) for i in group.index[v] if i is not None})
    sub = None if group.cov is None else group.cov[np.ix_(idx, idx)]
    if sub is None or not np.all(np.isfinite(sub)):
        return Prediction(n_variant, n_baseline, lv, lb, change, None, None, 0)
    rng = np.random.default_rng(seed)
    samples = np.tile(group.params, (draws, 1))
    samples[:, idx] = rng.multivariate_normal(group.params[idx], sub, size=draws, check_valid="ignore")
    ok = np.ones(draws, dtype=bool)
    for v in (variant_id, baseline_id):
        E, A, alpha = group.curve(v, samples)
        ok &= (np.asarray(E) >= 0) & (np.asarray(A) > 0) & (alpha > 0) & (alpha < ALPHA_MAX)
    if not ok.any():
        return Prediction(n_variant, n_baseline, lv, lb, change, None, None, 0)
    kept = samples[ok]
    d = np.exp(group.loss(variant_id, n_variant, kept) - group.loss(baseline_id, n_baseline, kept)) - 1.0
    lo, hi = np.percentile(d, [2.5, 97.5])
    return Prediction(n_variant, n_baseline, lv, lb, change, float(lo), float(hi), int(ok.sum()))


# ================================================================== trends and rankings
@dataclass(frozen=True)
class Trend:
    """Slope of the change vs QKV (% of loss) per decade of N, with its 95% interval (3+ sizes)."""

    n: int
    slope: float
    intercept: float
    ci_low: float | None
    ci_high: float | None
    p_value: float | None


def change_trend(log10_n: Sequence[float], change_pct: Sequence[float]) -> Trend | None:
    """``scipy.stats.linregress`` of change on log10 N; None for fewer than 2 sizes."""
    if len(log10_n) < 2 or len(set(log10_n)) < 2:
        return None
    stats, _ = _scipy()
    res = stats.linregress(log10_n, change_pct)
    if len(log10_n) < 3:
        return Trend(2, float(res.slope), float(res.intercept), None, None, None)
    half = float(stats.t.ppf(0.5 + CONFIDENCE / 2, len(log10_n) - 2)) * float(res.stderr)
    return Trend(
        len(log10_n), float(res.slope), float(res.intercept), res.slope - half, res.slope + half, float(res.pvalue)
    )


def rank_change(losses_a: dict[str, float], losses_b: dict[str, float]) -> dict[str, Any] | None:
    """Spearman's rho (and p) of the variants' losses at two budgets, and both orders; 3+ variants."""
    common = sorted(set(losses_a) & set(losses_b), key=variant_order)
    if len(common) < 3:
        return None
    stats, _ = _scipy()
    a = [losses_a[v] for v in common]
    b = [losses_b[v] for v in common]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # constant input: rho is undefined
        res = stats.spearmanr(a, b)
    rho, p = float(res.statistic), float(res.pvalue)
    order_a = [v for _, v in sorted(zip(a, common, strict=True))]
    order_b = [v for _, v in sorted(zip(b, common, strict=True))]
    return {
        "variants": common,
        "rho": None if math.isnan(rho) else rho,
        "p_value": None if math.isnan(p) else p,
        "order_a": order_a,
        "order_b": order_b,
        "changed": order_a != order_b,
    }


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
    mean_change = statistics.fmean(changes.values())
    if trend is None or trend.ci_low is None:
        parts.append("trend with size not assessed (fewer than 3 sizes)")
    else:
        slope = f"slope {trend.slope:+.2f} pt per decade of N, 95% CI [{trend.ci_low:+.2f}, {trend.ci_high:+.2f}]"
        if trend.ci_low > 0 or trend.ci_high < 0:
            grows = (trend.slope > 0) == (mean_change > 0)
            parts.append(f"gap {'grows' if grows else 'shrinks'} with size ({slope})")
        else:
            parts.append(f"gap flat within the data ({slope}, includes 0)")
    if prediction is not None:
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
    verdicts: dict[tuple[str, int | None, str], str] = field(default_factory=dict)

    def cell(self, recipe: str, budget: int | None, model: str, vid: str) -> Cell | None:
        return self.cells.get((recipe, budget, model, vid))

    def baseline(self, group: GroupKey) -> str | None:
        return next((v for v in self.variants[group] if _is_qkv(v)), None)

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
            if _is_qkv(str(r.get("variant_id"))):
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
            a.verdicts[(g[0], g[1], vid)] = verdict(
                variant_label(vid),
                changes,
                outcomes,
                a.trends.get((g[0], g[1], vid)),
                a.predictions.get((g[0], g[1], vid)),
                paper.get(variant_label(vid), {}).get("delta"),
            )
    return a


# ================================================================== formatting
def _budget_label(budget: int | None) -> str:
    from qkvlab.study.sweep import format_tokens

    return "no token budget" if budget is None else f"{format_tokens(int(budget))} tokens"


def _f(x: float | None, digits: int = 4, sign: bool = False) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    return f"{x:+.{digits}f}" if sign else f"{x:.{digits}f}"


def _pct(x: float | None, digits: int = 2) -> str:
    return "n/a" if x is None else f"{100 * x:+.{digits}f}%"


def _size_label(a: LadderAnalysis, recipe: str, model: str) -> str:
    n = a.size_n.get((recipe, model))
    return f"{model} ({fmt_count(n)})" if n else model


def _ratio(x: float | None, base: float | None) -> float | None:
    return None if x is None or not base else x / base


def _p(x: float | None) -> str:
    if x is None:
        return "n/a"
    return f"{x:.2g}" if x >= 1e-4 else "<1e-4"


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, np.floating | np.integer):
        return _json_safe(obj.item())
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_safe(v) for v in obj]
    return obj


# ================================================================== report sections
def _commit_counts(rows: list[dict[str, Any]]) -> dict[str, int]:
    """Runs per git commit (``+dirty`` where the tree had uncommitted changes)."""
    counts: dict[str, int] = {}
    for r in rows:
        key = str(r.get("git_commit") or "unknown") + ("+dirty" if r.get("git_dirty") else "")
        counts[key] = counts.get(key, 0) + 1
    return counts


def _header(study: Path, a: LadderAnalysis, all_rows: list[dict[str, Any]]) -> tuple[list[str], dict[str, Any]]:
    failed = [r for r in all_rows if r.get("status") == STATUS_FAILED]
    skipped = [r for r in all_rows if r.get("status") == STATUS_SKIPPED]
    used = a.rows
    devices: dict[str, int] = {}
    for r in used:
        name = r.get("device_name") or "unknown"
        devices[str(name)] = devices.get(str(name), 0) + 1
    time_s = sum(float(r.get("train_time_s") or r.get("wall_s") or 0.0) for r in used + a.dropped)
    tokens = sum(int(r.get("tokens") or 0) for r in used + a.dropped)
    mfu = {d: mean_std(r.get("mfu") for r in used if (r.get("device_name") or "unknown") == d)[0] for d in devices}
    head = {
        "study": _study_name(study),
        "runs_ok": len(used) + len(a.dropped),
        "runs_used": len(used),
        "runs_other_lr": len(a.dropped),
        "runs_failed": len(failed),
        "grid_points_skipped": len(skipped),
        "devices": devices,
        "mean_mfu": mfu,
        "train_time_s": time_s,
        "tokens_trained": tokens,
        "commits": _commit_counts(used + a.dropped),
    }
    lines = [
        f"# Scaling ladder: {head['study']}",
        "",
        f"Computed from `{study / 'results.jsonl'}`; no number here is typed in except the paper's Table 4 "
        "changes, which are labelled as the paper's.",
        "",
        f"- Runs: {head['runs_ok']} finished ({len(used)} in the analysis, {len(a.dropped)} at a learning rate "
        f"not chosen), {len(failed)} failed, {len(skipped)} grid points that cannot be built.",
        "- Hardware: "
        + (
            ", ".join(
                f"{d} ({n} run{'s' if n != 1 else ''}"
                + (f", mean MFU {100 * mfu[d]:.1f}%" if mfu[d] is not None else "")
                + ")"
                for d, n in devices.items()
            )
            or "none"
        )
        + ".",
        f"- Training time (sum over finished runs): {time_s / 3600:,.2f} h; tokens trained: {fmt_count(tokens)}.",
        f"- Code (git commit of the runs): {_commits(used + a.dropped)}.",
        "- Loss: validation cross-entropy (nats/token), in-domain; PPL = exp(loss). N: non-embedding "
        "parameters. Δ vs QKV: the variant's mean over QKV's at the same recipe, size and budget, minus 1.",
        "",
    ]
    return lines, head


def _lr_section(a: LadderAnalysis) -> tuple[list[str], list[dict[str, Any]]]:
    lines = ["## Learning rate", ""]
    records = []
    if not a.lr_choices:
        return [*lines, "Every model ran at one learning rate: all runs are used.", ""], records
    lines += [
        "Per model with an LR sweep: mean validation loss per LR at the sweep's budget; the lowest is chosen "
        "and only that model's runs at the chosen LR are used below.",
        "",
    ]
    body = []
    for (recipe, model), ch in sorted(a.lr_choices.items()):
        dropped = sum(1 for r in a.dropped if recipe_of(r) == recipe and r.get("model") == model)
        tried = ", ".join(f"{lr:g}: {loss:.4f} (n={n})" for lr, (loss, n) in ch.losses.items())
        body.append([recipe, model, _budget_label(ch.budget), ch.basis, tried, f"{ch.chosen:g}", str(dropped)])
        records.append(
            {
                "recipe": recipe,
                "model": model,
                "budget": ch.budget,
                "basis": ch.basis,
                "losses": {f"{lr:g}": {"val_loss": loss, "n": n} for lr, (loss, n) in ch.losses.items()},
                "chosen_lr": ch.chosen,
                "runs_dropped": dropped,
            }
        )
    header = ["Recipe", "Model", "Sweep budget", "Chosen by", "LR: mean val loss", "Chosen LR", "Runs not used"]
    return [*lines, *markdown_table(header, body), ""], records


def _tables_section(a: LadderAnalysis) -> tuple[list[str], list[dict[str, Any]]]:
    lines = ["## 1. Validation loss per variant and size", ""]
    records = []
    for g in a.groups:
        recipe, budget = g
        base = a.baseline(g)
        cols = [_size_label(a, recipe, m) for m in a.sizes[g]]
        lines += [f"### {recipe}, {_budget_label(budget)}", ""]
        loss_body, change_body = [], []
        for vid in a.variants[g]:
            lrow, crow = [variant_label(vid)], [variant_label(vid)]
            for m in a.sizes[g]:
                c = a.cell(recipe, budget, m, vid)
                if c is None:
                    lrow.append("not yet run")
                    crow.append("not yet run")
                    continue
                mean, std, n = c.stat("val_loss")
                lrow.append(f"{mean:.4f}" + (f" ± {std:.4f}" if std is not None else "") + f" (n={n})")
                dl, dp = a.change((recipe, budget, m, vid)), a.change((recipe, budget, m, vid), "val_ppl")
                dd = a.change((recipe, budget, m, vid), "dickens_loss")
                crow.append("baseline" if vid == base else ("no QKV" if dl is None else f"{_pct(dl)} / {_pct(dp)}"))
                records.append(
                    {
                        "recipe": recipe,
                        "budget": budget,
                        "model": m,
                        "variant": variant_label(vid),
                        "variant_id": vid,
                        "n": n,
                        "seeds": sorted(c.by_seed(), key=str),
                        "n_nonembedding": c.n_params,
                        "tokens": c.stat("tokens")[0],
                        "val_loss_mean": mean,
                        "val_loss_std": std,
                        "val_ppl_mean": c.stat("val_ppl")[0],
                        "val_ppl_std": c.stat("val_ppl")[1],
                        "dickens_loss_mean": c.stat("dickens_loss")[0],
                        "dickens_ppl_mean": c.stat("dickens_ppl")[0],
                        "loss_change": None if vid == base else dl,
                        "ppl_change": None if vid == base else dp,
                        "dickens_loss_change": None if vid == base else dd,
                        "kv_cache_bytes_per_token": c.stat("kv_cache_bytes_per_token")[0],
                        "train_tokens_per_s": c.stat("train_tokens_per_s")[0],
                        "mfu": c.stat("mfu")[0],
                    }
                )
            loss_body.append(lrow)
            change_body.append(crow)
        lines += [
            "Mean ± std over seeds (n runs):",
            "",
            *markdown_table(["Variant", *cols], loss_body),
            "",
            "Change vs QKV, loss / PPL:" + ("" if base else " no QKV run at this budget, so none."),
            "",
            *markdown_table(["Variant", *cols], change_body),
            "",
        ]
        ood = [r for r in records if r["recipe"] == recipe and r["budget"] == budget and r["dickens_loss_mean"]]
        if ood and base:
            body = []
            for vid in a.variants[g]:
                row = [variant_label(vid)]
                for m in a.sizes[g]:
                    c = a.cell(recipe, budget, m, vid)
                    d = c.stat("dickens_loss")[0] if c else None
                    ch = a.change((recipe, budget, m, vid), "dickens_loss")
                    row.append("n/a" if d is None else f"{d:.4f}" + ("" if vid == base else f" ({_pct(ch)})"))
                body.append(row)
            lines += [
                "Out-of-domain (Dickens) loss, mean over seeds (change vs QKV):",
                "",
                *markdown_table(["Variant", *cols], body),
                "",
            ]
    return lines, records


def _tests_section(a: LadderAnalysis, out: Path, plots: bool, figures: list[str]) -> tuple[list[str], list[dict]]:
    lines = [
        "## 2. Change vs QKV by size, with a paired test",
        "",
        f"Per size: val loss of the variant minus QKV's, paired by seed over the seeds both have; "
        f"{int(100 * CONFIDENCE)}% t-interval of the mean difference and the two-sided p of a one-sample t-test. "
        "A difference is claimed only where the interval excludes 0.",
        "",
    ]
    records = []
    for g in a.groups:
        recipe, budget = g
        base = a.baseline(g)
        lines += [f"### {recipe}, {_budget_label(budget)}", ""]
        if base is None:
            lines += ["No QKV run at this budget: nothing to compare against (not yet run).", ""]
            continue
        body = []
        for vid in a.variants[g]:
            if vid == base:
                continue
            for m in a.sizes[g]:
                t = a.tests.get((recipe, budget, m, vid))
                if t is None:
                    continue
                b = a.cell(recipe, budget, m, base)
                bmean = statistics.fmean(b.by_seed()[s] for s in t.seeds) if t.seeds else None
                rel = functools.partial(_ratio, base=bmean)
                result = {
                    "worse": "worse (interval > 0)",
                    "better": "better (interval < 0)",
                    "undecided": "no difference shown (interval includes 0)",
                    "untested": "no common seeds" if t.n == 0 else "n=1, no test",
                }[t.outcome]
                ci = "n/a" if not t.tested else f"[{t.ci_low:+.4f}, {t.ci_high:+.4f}]"
                ci_pct = "n/a" if not t.tested else f"[{_pct(rel(t.ci_low))}, {_pct(rel(t.ci_high))}]"
                body.append(
                    [
                        variant_label(vid),
                        _size_label(a, recipe, m),
                        str(t.n),
                        _f(t.mean_diff, 4, sign=True),
                        ci,
                        f"{_pct(rel(t.mean_diff))} {ci_pct}",
                        _p(t.p_value),
                        result,
                    ]
                )
                records.append(
                    {
                        "recipe": recipe,
                        "budget": budget,
                        "model": m,
                        "variant": variant_label(vid),
                        "variant_id": vid,
                        **asdict(t),
                        "qkv_mean_loss_paired": bmean,
                        "mean_diff_pct": rel(t.mean_diff),
                        "ci_low_pct": rel(t.ci_low),
                        "ci_high_pct": rel(t.ci_high),
                        "outcome": t.outcome,
                    }
                )
        header = ["Variant", "Size", "Pairs", "Δ loss", "95% CI", "Δ % of QKV loss [CI]", "p", "Result"]
        lines += [*(markdown_table(header, body) if body else ["No variant ran beside QKV here yet."]), ""]
        if plots:
            path = _plot_change(a, g, records, out)
            if path is not None:
                figures.append(path.name)
                lines += [f"![Change vs QKV by size, {recipe}, {_budget_label(budget)}]({path.name})", ""]
    return lines, records


def _fits_section(a: LadderAnalysis, out: Path, plots: bool, figures: list[str]) -> tuple[list[str], dict]:
    paper = PAPER_TABLES["table4"]
    lines = [
        "## 3. Fits L(N) = E + A (N / 1e6)^-alpha and extrapolation to the paper's 300M",
        "",
        "N: non-embedding parameters of each variant; losses: the mean over seeds. Standard errors from the "
        "fit's covariance. The extrapolation is to each variant's N on the paper's 300M shape "
        f"(`{TARGET_PRESET}`), with a 95% interval from {N_DRAWS} parametric-bootstrap draws of the fit. "
        "Reading: extrapolating several times beyond the largest size from a few points is weak; the interval "
        "covers the fit's noise under the assumed law, not whether the law holds that far.",
        "",
    ]
    fit_records, pred_records = [], []
    for g in a.groups:
        recipe, budget = g
        free, group_fit, notes = a.fits[g]
        lines += [f"### {recipe}, {_budget_label(budget)}", ""]
        if notes:
            lines += [*(f"- {note}." for note in notes), ""]
        if plots:
            path = _plot_fits(a, g, out)
            if path is not None:
                figures.append(path.name)
                lines += [f"![Loss vs non-embedding parameters, {recipe}, {_budget_label(budget)}]({path.name})", ""]
        if not free:
            lines += ["No variant has 3+ sizes yet: no fit (not yet run).", ""]
            continue
        body = []
        for vid, fit in free.items():
            body.append(_fit_row(vid, fit))
            fit_records.append({"recipe": recipe, "budget": budget, "variant_id": vid, **asdict(fit)})
        lines += ["Free 3-parameter fits:", "", *markdown_table(_FIT_HEADER, body), ""]
        if group_fit is not None and group_fit.kind != "free":
            body = [_fit_row(v, f) for v, f in group_fit.fits.items()]
            lines += [f"Used to extrapolate: {group_fit.note}.", "", *markdown_table(_FIT_HEADER, body), ""]
            for vid, fit in group_fit.fits.items():
                fit_records.append({"recipe": recipe, "budget": budget, "variant_id": vid, **asdict(fit)})
        elif group_fit is not None:
            lines += [f"Used to extrapolate: {group_fit.note}.", ""]
        preds = [(v, p) for (r, b, v), p in a.predictions.items() if (r, b) == g]
        if preds:
            largest = max((a.size_n.get((recipe, m)) or 0) for m in a.sizes[g])
            base = a.baseline(g)
            n_target = a.predictions[(recipe, budget, base)].n_baseline
            beyond = f", {n_target / largest:.1f}x the largest size here ({fmt_count(largest)})" if largest else ""
            lines += [f"Predicted at the paper's 300M (QKV N = {fmt_count(n_target)}{beyond}):", ""]
            body = []
            for vid, p in sorted(preds, key=lambda t: variant_order(t[0])):
                paper_delta = paper.values.get(variant_label(vid), {}).get("delta")
                interval = "n/a" if p.ci_low is None else f"[{_pct(p.ci_low, 1)}, {_pct(p.ci_high, 1)}]"
                body.append(
                    [
                        variant_label(vid),
                        fmt_count(p.n_variant),
                        f"{p.loss:.4f}",
                        f"{math.exp(p.loss):.3f}",
                        "baseline" if vid == base else _pct(p.ppl_change, 1),
                        "baseline" if vid == base else interval,
                        "n/a" if paper_delta is None else ("baseline" if vid == base else _pct(paper_delta, 1)),
                    ]
                )
                pred_records.append(
                    {
                        "recipe": recipe,
                        "budget": budget,
                        "variant": variant_label(vid),
                        "variant_id": vid,
                        "fit_kind": group_fit.kind,
                        **asdict(p),
                        "ppl": math.exp(p.loss),
                        "paper_table4_change": paper_delta,
                        "target_note": a.target_notes.get(vid),
                        "largest_n": largest,
                    }
                )
            header = ["Variant", "N", "Pred. loss", "Pred. PPL", "Δ PPL vs QKV", "95% interval", "Paper Table 4 Δ"]
            lines += [*markdown_table(header, body), ""]
            lines += [
                f"- Target N: {a.target_notes.get(base, '')}. Paper numbers: {paper.title}, quoted from "
                f"{paper.source}; they are the paper's, at 10B tokens, far beyond these budgets.",
                "",
            ]
        else:
            lines += ["No QKV fit at this budget: no extrapolated change (not yet run).", ""]
    return lines, {"fits": fit_records, "predictions": pred_records}


_FIT_HEADER = ["Variant", "Points", "Kind", "E ± se", "A ± se", "alpha ± se", "Note"]


def _fit_row(vid: str, fit: PowerLawFit) -> list[str]:
    def pm(x: float, se: float | None) -> str:
        return f"{x:.4g}" + ("" if se is None else f" ± {se:.2g}")

    return [
        variant_label(vid),
        str(fit.n_points),
        fit.kind,
        pm(fit.E, fit.se_E) if fit.kind != "loglog" else "0 (fixed)",
        pm(fit.A, fit.se_A),
        pm(fit.alpha, fit.se_alpha),
        fit.note or "-",
    ]


def _tokens_section(a: LadderAnalysis, out: Path, plots: bool, figures: list[str]) -> tuple[list[str], list[dict]]:
    lines = ["## 4. Loss against tokens at fixed size", ""]
    records = []
    recipes = sorted({g[0] for g in a.groups})
    any_table = False
    for recipe in recipes:
        budgets = [g[1] for g in a.groups if g[0] == recipe]
        models = sorted(
            {m for g in a.groups if g[0] == recipe for m in a.sizes[g]}, key=lambda m: a.size_n.get((recipe, m)) or 0
        )
        for model in models:
            present = [b for b in budgets if model in a.sizes[(recipe, b)]]
            if len(present) < 2:
                continue
            any_table = True
            vids = sorted({v for b in present for v in a.variants[(recipe, b)]}, key=variant_order)
            body = []
            for vid in vids:
                row = [variant_label(vid)]
                for b in present:
                    c = a.cell(recipe, b, model, vid)
                    if c is None:
                        row.append("not yet run")
                        continue
                    mean, std, _ = c.stat("val_loss")
                    ch = a.change((recipe, b, model, vid))
                    row.append(
                        f"{mean:.4f}"
                        + (f" ± {std:.4f}" if std is not None else "")
                        + ("" if _is_qkv(vid) or ch is None else f" ({_pct(ch)})")
                    )
                body.append(row)
            lines += [
                f"### {recipe}, {_size_label(a, recipe, model)}",
                "",
                *markdown_table(["Variant", *[_budget_label(b) for b in present]], body),
                "",
            ]
            for rk in a.rankings:
                if rk["recipe"] == recipe and rk["model"] == model:
                    records.append(rk)
                    pair = f"{_budget_label(rk['budget_a'])} vs {_budget_label(rk['budget_b'])}"
                    if not rk["variants"]:
                        lines.append(f"- {pair}: fewer than 3 variants at both budgets, ranking not compared.")
                        continue
                    oa = " < ".join(variant_label(v) for v in rk["order_a"])
                    ob = " < ".join(variant_label(v) for v in rk["order_b"])
                    rho = "n/a" if rk["rho"] is None else f"{rk['rho']:+.2f} (p {_p(rk['p_value'])})"
                    lines.append(
                        f"- {pair}: Spearman rho over {len(rk['variants'])} variants {rho}; ranking "
                        + (f"changes: {oa} became {ob}." if rk["changed"] else f"unchanged: {oa}.")
                    )
            lines.append("")
            if plots:
                path = _plot_tokens(a, recipe, model, present, vids, out)
                figures.append(path.name)
                lines += [f"![Loss vs tokens, {recipe}, {model}]({path.name})", ""]
    if not any_table:
        lines += ["No size has run at two token budgets yet (not yet run).", ""]
    return lines, records


def _verdict_section(a: LadderAnalysis) -> tuple[list[str], list[dict]]:
    lines = [
        "## 6. Verdict per variant",
        "",
        "Generated from the numbers above by fixed rules (see `qkvlab.study.ladder`): a size counts as worse or "
        "better only where the paired 95% interval excludes 0; the trend is the slope of the loss change (% "
        "points) per decade of N and its 95% interval.",
        "",
    ]
    records = []
    for g in a.groups:
        recipe, budget = g
        keys = [k for k in a.verdicts if (k[0], k[1]) == g]
        if not keys:
            continue
        lines += [f"### {recipe}, {_budget_label(budget)}", ""]
        for k in sorted(keys, key=lambda k: variant_order(k[2])):
            lines.append(f"- {a.verdicts[k]}")
            t = a.trends.get(k)
            records.append(
                {
                    "recipe": recipe,
                    "budget": budget,
                    "variant": variant_label(k[2]),
                    "variant_id": k[2],
                    "text": a.verdicts[k],
                    "trend": None if t is None else asdict(t),
                }
            )
        lines.append("")
    return lines, records


def _grid_blocks(study: Path) -> list[dict[str, Any]] | None:
    """The sweep file's grid as a list of blocks (a single mapping is one block); None if unreadable."""
    path = study / "sweep.yaml"
    try:
        sweep = yaml.safe_load(path.read_text()) if path.is_file() else None
    except (OSError, yaml.YAMLError):
        return None
    grid = sweep.get("grid") if isinstance(sweep, dict) else None
    blocks = [grid] if isinstance(grid, dict) else grid
    if not isinstance(blocks, list) or not all(isinstance(b, dict) for b in blocks):
        return None
    return blocks


def expected_cells(rows: Sequence[dict[str, Any]], blocks: list[dict[str, Any]] | None) -> set[CellKey]:
    """(recipe, budget, model, variant_id) that should have runs.

    With sweep blocks: every cell a row names, plus each block's variants x models x budgets (an
    axis a block leaves out takes the values the rows of that recipe show). Without: per recipe,
    every variant x size x budget that any row names.
    """
    from qkvlab.study.sweep import parse_tokens

    seen = {
        (recipe_of(r), r.get("tokens_budget"), str(r["model"]), str(r["variant_id"]))
        for r in rows
        if r.get("model") and r.get("variant_id")
    }
    by_recipe: dict[str, list[set]] = {}
    for recipe, budget, model, vid in seen:
        axes = by_recipe.setdefault(recipe, [set(), set(), set()])
        axes[0].add(budget)
        axes[1].add(model)
        axes[2].add(vid)
    if blocks is None:
        return {(recipe, b, m, v) for recipe, (bs, ms, vs) in by_recipe.items() for b in bs for m in ms for v in vs}
    expected = set(seen)
    for block in blocks:
        try:
            models = [str(m) for m in block.get("model", [])]
            variants = [VariantSpec.parse(str(v)).id for v in block.get("variant", [])]
            budgets = [parse_tokens(t) for t in block.get("tokens", [])]
        except (ConfigError, TypeError, ValueError):
            continue  # a block this code cannot read adds nothing
        for model in models:
            recipe = recipe_of({"model": model})
            bs, _, vs = by_recipe.get(recipe, [set(), set(), set()])
            for b in budgets or bs:
                for v in variants or vs:
                    expected.add((recipe, b, model, v))
    return expected


def _coverage_section(a: LadderAnalysis, study: Path, all_rows: list[dict[str, Any]]) -> tuple[list[str], list]:
    lines = [
        "## What is not yet run",
        "",
        "Expected: every cell a run names and each sweep-file grid block's variants x sizes x budgets (without a "
        "sweep file: every variant x size x budget seen, per recipe), with the seeds any variant has there. "
        "Swept models count only their runs at the chosen LR.",
        "",
    ]
    failed = {
        (recipe_of(r), r.get("tokens_budget"), r.get("model"), r.get("variant_id"))
        for r in all_rows
        if r.get("status") == STATUS_FAILED
    }
    skipped = {
        (recipe_of(r), r.get("tokens_budget"), r.get("model"), r.get("variant_id"))
        for r in all_rows
        if r.get("status") == STATUS_SKIPPED
    }
    records, body = [], []
    expected = expected_cells(all_rows, _grid_blocks(study))
    places = sorted(
        {k[:3] for k in expected},
        key=lambda k: (k[0], k[1] or 0, a.size_n.get((k[0], k[2])) or math.inf, k[2]),
    )
    for recipe, budget, model in places:
        vids = sorted((k[3] for k in expected if k[:3] == (recipe, budget, model)), key=variant_order)
        seeds = {s for v in vids if (c := a.cell(recipe, budget, model, v)) for s in c.by_seed()}
        absent, partial = [], []
        for vid in vids:
            key = (recipe, budget, model, vid)
            if key in skipped and key not in a.cells:
                continue
            c = a.cells.get(key)
            if c is None:
                absent.append(variant_label(vid) + (" (failed)" if key in failed else ""))
            elif missing := sorted(seeds - set(c.by_seed()), key=str):
                partial.append(f"{variant_label(vid)}: seeds {', '.join(map(str, missing))}")
        if absent or partial:
            body.append([recipe, _budget_label(budget), model, ", ".join(absent) or "-", "; ".join(partial) or "-"])
            records.append(
                {"recipe": recipe, "budget": budget, "model": model, "not_yet_run": absent, "missing_seeds": partial}
            )
    if body:
        lines += markdown_table(["Recipe", "Budget", "Size", "Not yet run", "Missing seeds"], body)
    else:
        lines.append("Nothing: the grid is complete as far as the results and the sweep file show.")
    lines.append("")
    return lines, records


# ================================================================== plots
def _colors(a: LadderAnalysis) -> dict[str, str]:
    vids = sorted({k[3] for k in a.cells}, key=variant_order)
    return {v: f"C{i % 10}" for i, v in enumerate(vids)}


def _plot_fits(a: LadderAnalysis, g: GroupKey, out: Path) -> Path | None:
    """Loss vs N (log-log), points with 1-std bars, fitted curves dashed out to the 300M target."""
    recipe, budget = g
    if len(a.sizes[g]) < 2:
        return None
    _, group_fit, _ = a.fits[g]
    colors = _colors(a)
    fig = _figure()
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
        ax.errorbar(
            [p[0] for p in pts],
            [p[1] for p in pts],
            yerr=[p[2] or 0.0 for p in pts],
            marker="o",
            ms=4,
            capsize=2,
            color=colors[vid],
            label=variant_label(vid),
        )
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
    ax.set_title(f"{recipe}, {_budget_label(budget)}{kind}", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, ncol=2)
    return _save(fig, out / _slug(f"{FIG_PREFIX}loss-vs-params-{recipe}-{_budget_label(budget)}.png"))


def _log_loss_axis(ax) -> None:
    """A log y axis labelled with plain loss values (losses span well under a decade)."""
    from matplotlib.ticker import FixedLocator, FormatStrFormatter, NullFormatter

    lo, hi = ax.get_ylim()
    ax.set_yscale("log")
    ax.yaxis.set_major_locator(FixedLocator(np.geomspace(lo, hi, 6)))
    ax.yaxis.set_major_formatter(FormatStrFormatter("%.2f"))
    ax.yaxis.set_minor_formatter(NullFormatter())


def _plot_change(a: LadderAnalysis, g: GroupKey, records: list[dict], out: Path) -> Path | None:
    """Loss change vs QKV (%) vs N of QKV, error bars the paired 95% t-interval; hollow: no test."""
    recipe, budget = g
    mine = [r for r in records if r["recipe"] == recipe and r["budget"] == budget and r["mean_diff_pct"] is not None]
    if len({r["model"] for r in mine}) < 2:  # a single size is the table's row, not a trend
        return None
    colors = _colors(a)
    fig = _figure()
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
    ax.set_title(f"{recipe}, {_budget_label(budget)}: change vs QKV (hollow: n=1, no test)", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, ncol=2)
    return _save(fig, out / _slug(f"{FIG_PREFIX}change-vs-size-{recipe}-{_budget_label(budget)}.png"))


def _plot_tokens(a: LadderAnalysis, recipe: str, model: str, budgets: list, vids: list[str], out: Path) -> Path:
    """Loss vs tokens trained at one size, one line per variant, 1-std bars."""
    colors = _colors(a)
    fig = _figure()
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
        ax.errorbar(
            [p[0] for p in pts],
            [p[1] for p in pts],
            yerr=[p[2] or 0.0 for p in pts],
            marker="o",
            ms=4,
            capsize=2,
            color=colors[vid],
            label=variant_label(vid),
        )
    ax.set_xscale("log")
    ax.set_xlabel("tokens trained")
    ax.set_ylabel("validation loss (nats / token)")
    ax.set_title(f"{recipe}, {_size_label(a, recipe, model)}: loss vs tokens", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, ncol=2)
    return _save(fig, out / _slug(f"{FIG_PREFIX}loss-vs-tokens-{recipe}-{model}.png"))


# ================================================================== entry point
def _planned_ids(study: Path) -> set[str] | None:
    """Run ids of the grid in the study's ``sweep.yaml`` (None when the study has none)."""
    from qkvlab.study.sweep import SweepSpec, expand

    path = study / "sweep.yaml"
    if not path.is_file():
        return None
    try:
        return {p.run_id for p in expand(SweepSpec.from_dict(yaml.safe_load(path.read_text(encoding="utf-8"))))}
    except (yaml.YAMLError, ConfigError):
        return None  # a partial sweep.yaml (only the report settings): every row is the study's


def write_ladder_report(study_dir: str | Path, out_dir: str | Path | None = None, *, plots: bool = True) -> Path:
    """Write ``report.md``, PNG figures and ``ladder_summary.json`` (default folder: ``study_dir/report``)."""
    study = Path(study_dir)
    store = ResultsStore(study)
    if not store.path.is_file():
        raise ConfigError(
            f"No {store.path.name} in {str(study)!r}; pass the folder of a study that `qkvlab sweep` has filled."
        )
    all_rows = list(store.latest().values())
    # A row whose run id is not a point of the study's current grid came from another config
    # (run ids hash the whole config): it is left out, never merged with the grid's rows.
    planned = _planned_ids(study)
    # Downstream rows (`qkvlab eval harness --study`) name the training run they scored instead.
    downstream = harness_rows(all_rows)
    all_rows = [r for r in all_rows if r.get("status") != HARNESS_STATUS]
    foreign = [r for r in all_rows if planned is not None and r.get("run_id") not in planned]
    all_rows = [r for r in all_rows if planned is None or r.get("run_id") in planned]
    out = Path(out_dir) if out_dir is not None else study / REPORT_DIR
    out.mkdir(parents=True, exist_ok=True)
    a = analyse([r for r in all_rows if r.get("status") == STATUS_OK])
    figures: list[str] = []

    lines, head = _header(study, a, all_rows)
    head["rows_from_other_configs"] = len(foreign)
    if foreign:
        lines += [
            f"{len(foreign)} result row(s) are not points of this study's grid (another config; run ids hash "
            f"the whole config) and are left out: {', '.join(sorted(str(r.get('run_id')) for r in foreign)[:5])}"
            + (" ..." if len(foreign) > 5 else ""),
            "",
        ]
    if not a.rows:
        lines += ["No finished runs with a validation loss yet: nothing to analyse (not yet run).", ""]
    lr_lines, lr_records = _lr_section(a)
    table_lines, cell_records = _tables_section(a)
    test_lines, test_records = _tests_section(a, out, plots, figures)
    fit_lines, fit_records = _fits_section(a, out, plots, figures)
    token_lines, rank_records = _tokens_section(a, out, plots, figures)
    verdict_lines, verdict_records = _verdict_section(a)
    cover_lines, cover_records = _coverage_section(a, study, all_rows)
    lines += lr_lines + table_lines + test_lines + fit_lines + token_lines
    listed = ", ".join(f"`{f}`" for f in figures) if figures else "none (plots off, or too few points)"
    lines += ["## 5. Figures", "", f"Shown with their sections above: {listed}.", "", *verdict_lines, *cover_lines]
    downstream_lines, downstream_records = downstream_section(downstream)
    lines += downstream_lines

    summary = {
        "header": head,
        "lr_selection": lr_records,
        "cells": cell_records,
        "paired_tests": test_records,
        **fit_records,
        "trends": [
            {"recipe": k[0], "budget": k[1], "variant": variant_label(k[2]), "variant_id": k[2], **asdict(t)}
            for k, t in a.trends.items()
            if t is not None
        ],
        "rankings": rank_records,
        "verdicts": verdict_records,
        "not_yet_run": cover_records,
        "downstream": downstream_records,
        "figures": figures,
        "settings": {
            "confidence": CONFIDENCE,
            "bootstrap_draws": N_DRAWS,
            "n_scale": N_SCALE,
            "target_preset": TARGET_PRESET,
        },
    }
    if plots:
        for stale in out.glob(f"{FIG_PREFIX}*.png"):
            if stale.name not in figures:
                stale.unlink()
    text = json.dumps(_json_safe(summary), indent=2, allow_nan=False)
    atomic_write(out / "ladder_summary.json", lambda tmp: Path(tmp).write_text(text + "\n", encoding="utf-8"))
    report = out / "report.md"
    atomic_write(report, lambda tmp: Path(tmp).write_text("\n".join(lines).rstrip() + "\n", encoding="utf-8"))
    return report
