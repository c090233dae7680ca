"""Statistics of the scaling ladder: paired tests, power-law fits and their extrapolation,
trends with size and rankings across budgets (numpy and scipy; the rules are in
:mod:`qkvlab.study.ladder`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from qkvlab.errors import ConfigError
from qkvlab.study.tables import variant_label, variant_order

N_SCALE = 1e6  # fit in millions of parameters so that A and alpha stay of order one
ALPHA_MAX = 2.0
CONFIDENCE = 0.95
N_DRAWS = 2000


def _scipy():
    try:
        from scipy import optimize, stats
    except ImportError:
        raise ConfigError(
            "The ladder report needs scipy, which is not installed: pip install 'qkvlab[plots]'."
        ) from None
    return stats, optimize


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

    def problem(self) -> str:
        """Why the data do not pin this fit down ("" when they do): a parameter whose standard
        error exceeds its size, or alpha at the bound of the search. Such a fit draws a curve
        through the points but says nothing beyond them, so its extrapolation is not a result."""
        loose = [
            name
            for name, value, se in (
                ("E", self.E, self.se_E),
                ("A", self.A, self.se_A),
                ("alpha", self.alpha, self.se_alpha),
            )
            if se is not None and se > abs(value)
        ]
        if loose:
            return f"ill-determined ({', '.join(loose)}: standard error larger than the value)"
        if self.alpha >= 0.99 * ALPHA_MAX:
            return f"ill-determined (alpha at the search bound {ALPHA_MAX:g})"
        return ""


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
    if fit.problem():
        fit = replace(fit, note="; ".join(filter(None, (note, fit.problem()))))
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

    def problem(self, *variants: str) -> str:
        """Why the fit of one of ``variants`` does not determine its curve ("" when each does)."""
        fits = [(v, f) for v in dict.fromkeys(variants) if (f := self.fits.get(v)) is not None]
        return "; ".join(f"{variant_label(v)}'s fit is {f.problem()}" for v, f in fits if f.problem())

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


# ================================================================== change with the budget
@dataclass(frozen=True)
class BudgetChange:
    """How a variant's change vs QKV moves from a smaller token budget to a larger one, over the
    sizes run at both: per size the difference (percentage points of loss, larger budget minus
    smaller), their mean with a t-interval over sizes, and a two-sided sign test of "up as often
    as down" (sizes with no difference left out)."""

    sizes: tuple[str, ...]
    small: tuple[float, ...]
    large: tuple[float, ...]
    mean: float
    ci_low: float | None
    ci_high: float | None
    n_up: int
    n_down: int
    sign_p: float | None

    @property
    def diffs(self) -> tuple[float, ...]:
        return tuple(b - a for a, b in zip(self.small, self.large, strict=True))


def budget_change(small: dict[str, float], large: dict[str, float], order: Sequence[str]) -> BudgetChange | None:
    """``small`` / ``large``: size -> change vs QKV (% of loss) at each budget; ``order``: the
    sizes smallest first. None for fewer than 2 sizes at both budgets."""
    sizes = tuple(m for m in order if m in small and m in large)
    if len(sizes) < 2:
        return None
    stats, _ = _scipy()
    a = tuple(float(small[m]) for m in sizes)
    b = tuple(float(large[m]) for m in sizes)
    d = np.array(b) - np.array(a)
    mean = float(d.mean())
    se = float(d.std(ddof=1)) / math.sqrt(len(d))
    half = float(stats.t.ppf(0.5 + CONFIDENCE / 2, len(d) - 1)) * se if se > 0 else None
    up, down = int((d > 0).sum()), int((d < 0).sum())
    sign_p = float(stats.binomtest(up, up + down, 0.5).pvalue) if up + down else None
    low, high = (None, None) if half is None else (mean - half, mean + half)
    return BudgetChange(sizes, a, b, mean, low, high, up, down, sign_p)
