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
* Change vs QKV against the budget (:func:`budget_change`): per size, the change at the largest
  budget minus the change at the smallest; over the sizes run at both, the mean with a t-interval
  (sizes as replicates) and a two-sided sign test (``scipy.stats.binomtest``; sizes with no
  difference left out). The variants share QKV's runs, so their rows are not independent.
* Training stability (:func:`instability`): a run whose mean gradient norm over the second half
  of its logged steps exceeds ``UNSTABLE_FACTOR`` times the larger of its clipping threshold and
  its own first-half median (or is not finite) is listed in the report, with its final loss.
* Change during training (:func:`curve_change`): each run's logged training loss, a trailing
  mean over ``CURVE_WINDOW`` points, over QKV's run of the same seed (the batch order is a
  function of the seed alone), minus 1, averaged over the seeds both have; read at
  ``CURVE_FRACTIONS`` of the run. Inside one run the learning-rate schedule is shared, so these
  are not the losses of shorter runs.

Verdict rules, per (recipe, budget, variant):

* Level: sizes with a paired test are "worse" (interval above 0), "better" (below 0) or
  "undecided" (interval includes 0). All worse: "costs a-b% loss at every tested size"; all
  better: "gains a-b% loss at every tested size"; all undecided: "no difference shown at any tested
  size ... data cannot decide"; otherwise the sizes of each kind are listed and "data cannot
  decide" is said for the undecided ones. Sizes with one seed: "n=1, no test".
* Trend (3+ sizes): the slope of the change per decade of N. Its interval above 0: "change vs
  QKV rises with size: <variant> loses ground to QKV as N grows"; below 0: "falls with size:
  <variant> gains on QKV as N grows" (said by direction, which is unambiguous whatever the sign of
  the change); including 0: "flat within the data". Fewer than 3 sizes: "trend not assessed".
* The extrapolated PPL change and its interval, beside the paper's Table 4 change.

The package, one job a module: :mod:`~qkvlab.study.ladder.stats` (tests and fits),
:mod:`~qkvlab.study.ladder.analysis` (rows to numbers), :mod:`~qkvlab.study.ladder.sections`
(numbers to markdown and records), :mod:`~qkvlab.study.ladder.plots` (figures) and
:mod:`~qkvlab.study.ladder.report` (:func:`write_ladder_report`, the entry point).
"""

from qkvlab.study.ladder.analysis import (
    CURVE_FRACTIONS,
    CURVE_WINDOW,
    TARGET_PRESET,
    UNSTABLE_FACTOR,
    Cell,
    CurveChange,
    Instability,
    LadderAnalysis,
    LRChoice,
    analyse,
    build_cells,
    choose_lrs,
    curve_change,
    filter_chosen_lr,
    instability,
    lr_of,
    nonembedding_of,
    preset_nonembedding,
    recipe_of,
    target_nonembedding,
    verdict,
)
from qkvlab.study.ladder.plots import FIG_PREFIX
from qkvlab.study.ladder.report import write_ladder_report
from qkvlab.study.ladder.sections import expected_cells
from qkvlab.study.ladder.stats import (
    CONFIDENCE,
    N_DRAWS,
    N_SCALE,
    BudgetChange,
    GroupFit,
    PairedTest,
    PowerLawFit,
    Prediction,
    Trend,
    budget_change,
    change_trend,
    fit_group,
    fit_log_power_law,
    fit_power_law,
    fit_shared_e,
    paired_test,
    predict_change,
    rank_change,
)

__all__ = [
    "CONFIDENCE",
    "CURVE_FRACTIONS",
    "CURVE_WINDOW",
    "FIG_PREFIX",
    "N_DRAWS",
    "N_SCALE",
    "TARGET_PRESET",
    "UNSTABLE_FACTOR",
    "BudgetChange",
    "Cell",
    "CurveChange",
    "GroupFit",
    "Instability",
    "LRChoice",
    "LadderAnalysis",
    "PairedTest",
    "PowerLawFit",
    "Prediction",
    "Trend",
    "analyse",
    "budget_change",
    "build_cells",
    "change_trend",
    "choose_lrs",
    "curve_change",
    "expected_cells",
    "filter_chosen_lr",
    "fit_group",
    "fit_log_power_law",
    "fit_power_law",
    "fit_shared_e",
    "instability",
    "lr_of",
    "nonembedding_of",
    "paired_test",
    "predict_change",
    "preset_nonembedding",
    "rank_change",
    "recipe_of",
    "target_nonembedding",
    "verdict",
    "write_ladder_report",
]
