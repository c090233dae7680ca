"""The scaling-ladder report: fits, paired tests, LR choice, verdicts and the written report, on rows
with a known answer (L(N) = 1.5 + 4 (N / 1e6)^-0.3 for QKV)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

pytest.importorskip("scipy")
pytest.importorskip("matplotlib")

from scipy import stats

from qkvlab.attention.variant import VariantSpec
from qkvlab.errors import ConfigError
from qkvlab.study import ladder
from qkvlab.study.report import PAPER_TABLES

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
E_TRUE, A_TRUE, ALPHA_TRUE = 1.5, 4.0, 0.3
SIZES = {"gpt2-1m": 1e6, "gpt2-3m": 3e6, "gpt2-10m": 10e6, "gpt2-30m": 30e6, "gpt2-85m": 100e6}
SEEDS = (0, 1, 2)


def law(n: float | np.ndarray) -> float | np.ndarray:
    return E_TRUE + A_TRUE * (np.asarray(n, dtype=float) / 1e6) ** -ALPHA_TRUE


def row(variant: str, model: str, n: float, budget: int, seed: int, loss: float, **extra: Any) -> dict[str, Any]:
    """One finished run as the sweep writes it (the keys the ladder reads)."""
    vid = VariantSpec.parse(variant).id
    lr = extra.pop("lr", 1e-3)
    out = {
        "run_id": f"{vid}-{model}-t{budget}-s{seed}-lr{lr:g}",
        "status": "ok",
        "variant": variant,
        "variant_id": vid,
        "model": model,
        "seed": seed,
        "tokens_budget": budget,
        "tokens": budget,
        "val_loss": loss,
        "val_ppl": math.exp(loss),
        "dickens_loss": loss + 0.5,
        "dickens_ppl": math.exp(loss + 0.5),
        "params_total": int(n) + 10_000_000,
        "params_nonembedding": int(n),
        "kv_cache_bytes_per_token": 1024,
        "mfu": 0.4,
        "train_tokens_per_s": 1e5,
        "train_time_s": 10.0,
        "device_name": "NVIDIA H100 80GB HBM3",
        "git_commit": "0123456789abcdef",
        "git_dirty": False,
        "config": {"model": {"preset": model}, "optim": {"lr": lr}},
        "axes": {"variant": variant, "model": model, "seed": seed},
    }
    out.update(extra)
    return out


def noise(seed: int, key: int) -> float:
    return float(np.random.default_rng(1000 * seed + key).normal(0.0, 5e-4))


def ladder_rows() -> list[dict[str, Any]]:
    """gpt2: 5 sizes x 2 budgets x 3 seeds; Q-K=V +2% loss, Q=K=V a gap growing with size, GQA-4 = QKV.

    The larger budget lowers every loss by 0.1, so the ranking cannot change; seeds share a noise
    term across variants (as a data order would) plus a small independent one.
    """
    rows = []
    for b, budget in enumerate((1_000_000, 4_000_000)):
        for k, (model, n) in enumerate(SIZES.items()):
            base = float(law(n)) - 0.1 * b
            for s in SEEDS:
                shared = 20 * noise(s, k + 10 * b)
                rows.append(row("QKV", model, n, budget, s, base + shared + noise(s, 100 + k)))
                rows.append(row("Q-K=V", model, n, budget, s, 1.02 * base + shared + noise(s, 200 + k)))
                grow = 0.05 + 0.01 * math.log10(n / 1e6)
                rows.append(row("Q=K=V", model, n, budget, s, (1 + grow) * base + shared + noise(s, 300 + k)))
                rows.append(row("GQA-4", model, n, budget, s, base + shared + noise(s, 400 + k)))
    return rows


def write_study(path: Path, rows: list[dict[str, Any]], sweep: dict[str, Any] | None = None) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if sweep is not None:
        (path / "sweep.yaml").write_text(yaml.safe_dump(sweep))
    return path


# ================================================================== fits
def test_fit_recovers_a_known_power_law():
    n = np.array(list(SIZES.values()))
    exact = ladder.fit_power_law(n, law(n))
    assert (exact.E, exact.A, exact.alpha) == pytest.approx((E_TRUE, A_TRUE, ALPHA_TRUE), abs=1e-6)
    assert exact.dof == 2 and exact.kind == "free"

    noisy = law(n) + np.array([3e-4, -4e-4, 2e-4, -1e-4, 4e-4])
    fit = ladder.fit_power_law(n, noisy)
    assert abs(fit.E - E_TRUE) < 0.02 and abs(fit.A - A_TRUE) < 0.02
    assert fit.alpha == pytest.approx(ALPHA_TRUE, abs=3e-3)
    assert all(se is not None and se > 0 for se in (fit.se_E, fit.se_A, fit.se_alpha))
    assert abs(fit.E - E_TRUE) < 4 * fit.se_E and abs(fit.alpha - ALPHA_TRUE) < 4 * fit.se_alpha
    assert float(fit.predict(300e6)) == pytest.approx(float(law(300e6)), abs=2e-3)


def test_a_fit_the_points_do_not_pin_down_is_flagged_and_not_extrapolated():
    n = np.array(list(SIZES.values()))
    assert ladder.fit_power_law(n, law(n) + np.array([3e-4, -4e-4, 2e-4, -1e-4, 4e-4])).problem() == ""
    # flat within noise across the sizes (a budget too small for size to matter): the curve can
    # pass the points, but E, A and alpha trade off freely
    level = 4.8 + np.array([0.05, -0.03, 0.01, 0.04, -0.02])
    flat = ladder.fit_power_law(n, level)
    assert flat.problem().startswith("ill-determined") and "ill-determined" in flat.note
    _, group, _ = ladder.fit_group({"q_k_v": (n, law(n)), "qkv": (n, level)})
    assert group.problem("q_k_v") == "" and group.problem("qkv", "q_k_v").startswith("Q=K=V's fit is ill-determined")
    line = ladder.verdict(
        "Q=K=V", {"gpt2-1m": 1.0}, {"gpt2-1m": "untested"}, None, ladder.Prediction(1, 1, 3, 3, 0.1, 0.0, 0.2, 9),
        prediction_problem=group.problem("qkv", "q_k_v"),
    )  # fmt: skip
    assert "no extrapolation to 300M (Q=K=V's fit is ill-determined" in line and "+10.0%" not in line


def test_three_points_fit_exactly_and_fall_back():
    n = np.array([1e6, 3e6, 10e6])
    fit = ladder.fit_power_law(n, law(n))
    assert fit.dof == 0 and fit.se_E is None and fit.se_alpha is None
    assert "exact fit, no uncertainty" in fit.note
    with pytest.raises(ValueError):
        ladder.fit_power_law(n[:2], law(n[:2]))

    # Two variants with 3 sizes each: the shared-E joint fit has 6 points, 5 parameters.
    free, group, notes = ladder.fit_group({"q_k_v": (n, law(n)), "q_kv": (n, 1.02 * law(n))})
    assert group.kind == "shared_E" and "1 degrees of freedom" in group.note
    assert free["q_k_v"].dof == 0 and group.fits["q_kv"].E == group.fits["q_k_v"].E
    assert group.fits["q_k_v"].se_E is not None and notes == []
    # QKV alone with 3 sizes: no degree of freedom for E, so the 2-parameter power law in log space.
    free, group, notes = ladder.fit_group({"q_k_v": (n, law(n)), "q_kv": (n[:2], law(n[:2]))})
    assert group.kind == "loglog" and set(group.index) == {"q_k_v"}
    assert group.fits["q_k_v"].E == 0.0 and group.fits["q_k_v"].dof == 1
    slope, icpt = np.polyfit(np.log(n / 1e6), np.log(law(n)), 1)
    assert group.fits["q_k_v"].alpha == pytest.approx(-slope, rel=1e-6)
    assert math.isclose(group.fits["q_k_v"].A, math.exp(icpt), rel_tol=1e-6)
    assert notes == ["Q-K=V: 2 size(s), a fit needs 3: not fitted"]


def test_prediction_at_300m_matches_the_true_law():
    n = np.array(list(SIZES.values()))
    rng = np.random.default_rng(5)
    base = law(n) + rng.normal(0, 3e-4, len(n))
    variant = 1.02 * law(n) + rng.normal(0, 3e-4, len(n))
    free, group, _ = ladder.fit_group({"q_k_v": (n, base), "q_kv": (n, variant)})
    assert group.kind == "free" and set(free) == {"q_k_v", "q_kv"}
    pred = ladder.predict_change(group, "q_kv", "q_k_v", 300e6, 300e6)
    true_loss = float(law(300e6))
    true_change = math.exp(0.02 * true_loss) - 1  # the variant's law is exactly 1.02 x QKV's
    assert pred.loss_baseline == pytest.approx(true_loss, abs=5e-3)
    assert pred.ppl_change == pytest.approx(true_change, abs=2e-3)
    assert pred.ci_low < pred.ppl_change < pred.ci_high
    assert pred.ci_low < true_change < pred.ci_high
    assert pred.draws_kept > 1500
    # Seeded: the same interval every time.
    again = ladder.predict_change(group, "q_kv", "q_k_v", 300e6, 300e6)
    assert (again.ci_low, again.ci_high) == (pred.ci_low, pred.ci_high)


# ================================================================== paired test
def test_paired_test_matches_a_hand_computation():
    base = {0: 3.00, 1: 3.10, 2: 2.95}
    real = {0: 3.05, 1: 3.16, 2: 2.99, 7: 1.0}  # seed 7 has no QKV partner: left out
    t = ladder.paired_test(base, real)
    d = np.array([0.05, 0.06, 0.04])
    half = stats.t.ppf(0.975, 2) * d.std(ddof=1) / math.sqrt(3)
    assert t.n == 3 and t.seeds == (0, 1, 2)
    assert t.mean_diff == pytest.approx(0.05)
    assert (t.ci_low, t.ci_high) == pytest.approx((0.05 - half, 0.05 + half))
    assert half == pytest.approx(4.302653 * 0.01 / math.sqrt(3), rel=1e-5)
    assert t.p_value == pytest.approx(stats.ttest_1samp(d, 0.0).pvalue)
    assert t.p_value == pytest.approx(2 * stats.t.sf(0.05 / (0.01 / math.sqrt(3)), 2))
    assert t.outcome == "worse" and t.ci_low > 0

    noise_only = ladder.paired_test(base, {0: 3.01, 1: 3.08, 2: 2.965})
    assert noise_only.ci_low < 0 < noise_only.ci_high and noise_only.outcome == "undecided"
    assert noise_only.p_value > 0.05

    better = ladder.paired_test(base, {s: v - 0.03 + 0.001 * s for s, v in base.items()})
    assert better.outcome == "better" and better.ci_high < 0

    single = ladder.paired_test(base, {1: 3.2})
    assert (single.n, single.ci_low, single.p_value, single.outcome) == (1, None, None, "untested")
    assert single.mean_diff == pytest.approx(0.1)
    assert ladder.paired_test(base, {9: 1.0}).n == 0


# ================================================================== learning rate
def test_lr_selection_picks_qkv_best_and_filters():
    rows = []
    qkv = {1e-3: 3.30, 3e-3: 3.20, 1e-2: 3.25}
    for lr, loss in qkv.items():
        for s in (0, 1):
            rows.append(row("QKV", "gpt2-3m", 3e6, 1_000_000, s, loss + 0.01 * s, lr=lr))
            # The variant prefers 1e-2: QKV alone decides.
            rows.append(row("Q-K=V", "gpt2-3m", 3e6, 1_000_000, s, 3.1 if lr == 1e-2 else 3.4, lr=lr))
    rows.append(row("QKV", "gpt2-3m", 3e6, 4_000_000, 0, 3.0, lr=3e-3))
    rows.append(row("QKV", "gpt2-3m", 3e6, 4_000_000, 0, 3.0, lr=1e-3))  # another LR at the main budget
    rows += [row(v, "gpt2-10m", 1e7, 1_000_000, 0, 3.0, lr=2e-3) for v in ("QKV", "Q-K=V")]
    rows.append(row("QKV", "llama-3m", 3e6, 1_000_000, 0, 3.0, lr=5e-3, config={"optim": {"lr": 5e-3}}))

    choices = ladder.choose_lrs(rows)
    assert set(choices) == {("gpt2", "gpt2-3m")}  # one LR elsewhere: no sweep
    ch = choices[("gpt2", "gpt2-3m")]
    assert ch.chosen == 3e-3 and ch.budget == 1_000_000 and ch.basis == "QKV"
    assert ch.losses[3e-3] == (pytest.approx(3.205), 2) and ch.losses[1e-2] == (pytest.approx(3.255), 2)

    kept, dropped = ladder.filter_chosen_lr(rows, choices)
    assert len(dropped) == 2 * 2 * 2 + 1  # two other LRs x 2 variants x 2 seeds, and the 4M run at 1e-3
    assert all(ladder.lr_of(r) == 3e-3 for r in kept if r["model"] == "gpt2-3m")
    assert sum(r["model"] == "gpt2-10m" for r in kept) == 2
    assert ladder.recipe_of(rows[-1]) == "llama" and ladder.lr_of(rows[-1]) == 5e-3


# ================================================================== trends, ranking, verdicts
def test_trend_ranking_and_verdict_rules():
    flat = ladder.change_trend([6, 6.5, 7, 7.5], [2.01, 1.99, 2.0, 2.0])
    assert flat.n == 4 and flat.ci_low < 0 < flat.ci_high
    res = stats.linregress([6, 6.5, 7, 7.5], [2.01, 1.99, 2.0, 2.0])
    assert flat.slope == pytest.approx(res.slope) and flat.p_value == pytest.approx(res.pvalue)
    grow = ladder.change_trend([6, 6.5, 7, 7.5], [1.0, 1.52, 1.98, 2.51])
    assert grow.ci_low > 0
    assert ladder.change_trend([6, 7], [1.0, 2.0]).ci_low is None
    assert ladder.change_trend([6], [1.0]) is None

    sizes = {"s1": 2.0, "s2": 2.1, "s3": 1.9}
    text = ladder.verdict("Q-K=V", sizes, dict.fromkeys(sizes, "worse"), flat)
    assert text.startswith("Q-K=V: costs +1.90% to +2.10% loss at every tested size")
    assert "change vs QKV flat within the data" in text
    shrink = ladder.change_trend([6, 6.5, 7, 7.5], [3.0, 2.5, 2.0, 1.5])
    text = ladder.verdict("MQA", sizes, {"s1": "worse", "s2": "undecided", "s3": "untested"}, shrink)
    assert "worse than QKV at s1" in text and "data cannot decide at s2" in text
    assert "n=1, no test at s3" in text and "falls with size: MQA gains on QKV as N grows" in text
    text = ladder.verdict("GQA-4", {"s1": 0.1}, {"s1": "untested"}, None)
    assert "n=1, no test" in text and "trend with size not assessed" in text
    pred = ladder.Prediction(2.5e8, 2.5e8, 2.3, 2.25, 0.0513, 0.04, 0.06, 2000)
    text = ladder.verdict("Q-K=V", sizes, dict.fromkeys(sizes, "worse"), grow, pred, 0.031)
    assert "rises with size: Q-K=V loses ground to QKV as N grows" in text
    assert "PPL +5.1% [+4.0%, +6.0%] (paper Table 4: +3.1%)" in text
    # A falling change that crosses 0 (a variant pulling ahead of QKV) is said as gaining, not as a
    # growing gap.
    ahead = ladder.change_trend([6, 6.5, 7, 7.5], [0.1, -0.4, -0.9, -1.4])
    text = ladder.verdict("GQA-4", {"a": 0.1, "b": -1.4}, {"a": "undecided", "b": "undecided"}, ahead)
    assert "falls with size: GQA-4 gains on QKV as N grows" in text
    assert ladder.verdict("Q=K=V", {}, {}, None) == "Q=K=V: not yet run beside QKV at any size."

    same = ladder.rank_change({"q_k_v": 3.0, "q_kv": 3.1, "qkv": 3.3}, {"q_k_v": 2.9, "q_kv": 3.0, "qkv": 3.2})
    assert same["rho"] == pytest.approx(1.0) and not same["changed"]
    swapped = ladder.rank_change(
        {"q_k_v": 3.0, "q_kv": 3.1, "qkv": 3.3, "q_k_v+mqa": 3.2},
        {"q_k_v": 2.9, "q_kv": 2.85, "qkv": 3.2, "q_k_v+mqa": 3.1},
    )
    assert swapped["changed"] and swapped["order_b"][:2] == ["q_kv", "q_k_v"]
    assert swapped["rho"] == pytest.approx(stats.spearmanr([3.0, 3.1, 3.3, 3.2], [2.9, 2.85, 3.2, 3.1]).statistic)
    assert ladder.rank_change({"q_k_v": 3.0, "q_kv": 3.1}, {"q_k_v": 3.0, "q_kv": 3.1}) is None


def test_budget_change_by_hand():
    small = {"s1": 1.0, "s2": 0.5, "s3": 2.0, "s4": 0.0}
    large = {"s1": 2.0, "s2": 1.5, "s3": 2.5, "s4": 0.0, "s5": 9.0}  # s5: one budget only
    bc = ladder.budget_change(small, large, ["s5", "s4", "s1", "s2", "s3"])
    assert bc.sizes == ("s4", "s1", "s2", "s3") and bc.diffs == (0.0, 1.0, 1.0, 0.5)
    d = np.array(bc.diffs)
    half = stats.t.ppf(0.975, 3) * d.std(ddof=1) / 2
    assert bc.mean == pytest.approx(0.625) and (bc.ci_low, bc.ci_high) == pytest.approx((0.625 - half, 0.625 + half))
    # the size with no difference is left out of the sign test: 3 up of 3, two-sided p = 2 / 2**3
    assert (bc.n_up, bc.n_down) == (3, 0) and bc.sign_p == pytest.approx(0.25)
    assert ladder.budget_change({"s1": 1.0}, {"s1": 2.0}, ["s1"]) is None
    same = ladder.budget_change({"a": 1.0, "b": 2.0}, {"a": 1.0, "b": 2.0}, ["a", "b"])
    assert same.mean == 0.0 and same.ci_low is None and same.sign_p is None


# ================================================================== the written report
def test_expected_cells_follow_the_sweep_blocks():
    rows = [row("QKV", "gpt2-3m", 3e6, 9_850_000, 0, 3.0), row("GQA-4", "gpt2-10m", 1e7, 9_850_000, 0, 3.0)]
    blocks = [
        {"variant": ["QKV"], "model": ["gpt2-3m", "llama-3m"], "tokens": ["9.85M"], "optim.lr": [1e-3, 2e-3]},
        {"variant": ["QKV", "Q-K=V"], "model": ["gpt2-3m"], "tokens": ["9.85M", "39.4M"]},
        {"variant": ["not a variant"], "model": ["gpt2-3m"]},  # unreadable: adds nothing
    ]
    assert ladder.expected_cells(rows, blocks) == {
        ("gpt2", 9_850_000, "gpt2-3m", "q_k_v"),
        ("gpt2", 9_850_000, "gpt2-10m", "q_k_v+gqa4"),
        ("llama", 9_850_000, "llama-3m", "q_k_v"),
        ("gpt2", 9_850_000, "gpt2-3m", "q_kv"),
        ("gpt2", 39_400_000, "gpt2-3m", "q_k_v"),
        ("gpt2", 39_400_000, "gpt2-3m", "q_kv"),
    }
    # Without a sweep file: every variant x size x budget seen, per recipe.
    assert ladder.expected_cells(rows, None) == {
        ("gpt2", 9_850_000, m, v) for m in ("gpt2-3m", "gpt2-10m") for v in ("q_k_v", "q_k_v+gqa4")
    }
    # seeds a block lists count as expected where the block runs, beside the seeds rows show
    seeded = [{"variant": ["QKV"], "model": ["gpt2-3m"], "tokens": ["9.85M", "39.4M"], "seed": [0, 2]}, *blocks]
    from qkvlab.study.ladder.sections import block_seeds

    assert block_seeds(seeded) == {("gpt2", 9_850_000, "gpt2-3m"): {0, 2}, ("gpt2", 39_400_000, "gpt2-3m"): {0, 2}}
    assert block_seeds(None) == {}
    assert ladder.preset_nonembedding("paper-300m", "q_k_v") == 251_926_528
    assert ladder.preset_nonembedding("no-such-preset", "q_k_v") is None


def test_write_ladder_report_full_grid(tmp_path: Path):
    rows = ladder_rows()
    # An LR sweep at the smallest size: 3e-3 is worse for QKV, so those runs are left out.
    rows += [
        row(v, "gpt2-1m", 1e6, 1_000_000, s, float(law(1e6)) + 0.05, lr=3e-3) for v in ("QKV", "Q-K=V") for s in SEEDS
    ]
    # A llama slice with two sizes: analysed on its own, too few sizes to fit.
    rows += [
        row(v, m, n, 1_000_000, 0, float(law(n)) * f, config={"model": {"preset": m, "recipe": "llama"}})
        for m, n in (("llama-1m", 1e6), ("llama-3m", 3e6))
        for v, f in (("QKV", 1.0), ("Q-K=V", 1.01))
    ]
    for r in rows[:5]:
        r.pop("dickens_loss")  # out-of-domain numbers missing on some rows
    rows.append({"run_id": "broken", "status": "failed", "variant": "MQA", "variant_id": "q_k_v+mqa",
                 "model": "gpt2-1m", "tokens_budget": 1_000_000, "seed": 0, "error": "OOM"})  # fmt: skip
    study = write_study(tmp_path / "ladder", rows, {"name": "ladder-test", "report": "ladder"})

    report = ladder.write_ladder_report(study)
    assert report == study / "report" / "report.md"
    text = report.read_text()
    summary = json.loads((study / "report" / "ladder_summary.json").read_text())

    head = summary["header"]
    assert head["study"] == "ladder-test"
    assert (head["runs_ok"], head["runs_used"], head["runs_other_lr"], head["runs_failed"]) == (130, 124, 6, 1)
    assert head["train_time_s"] == pytest.approx(1300.0)
    assert head["devices"] == {"NVIDIA H100 80GB HBM3": 124} and head["commits"] == {"0123456789abcdef": 130}
    assert "Training time (sum over finished runs): 0.36 h" in text

    (lr,) = summary["lr_selection"]
    assert (lr["model"], lr["chosen_lr"], lr["runs_dropped"], lr["basis"]) == ("gpt2-1m", 1e-3, 6, "QKV")

    cell = next(
        c
        for c in summary["cells"]
        if (c["recipe"], c["budget"], c["model"], c["variant"]) == ("gpt2", 1_000_000, "gpt2-10m", "Q-K=V")
    )
    assert cell["n"] == 3 and cell["seeds"] == [0, 1, 2]
    assert cell["loss_change"] == pytest.approx(0.02, abs=1e-3)
    assert cell["ppl_change"] == pytest.approx(math.exp(0.02 * float(law(1e7))) - 1, abs=2e-3)

    tests = [t for t in summary["paired_tests"] if t["recipe"] == "gpt2" and t["variant"] == "Q-K=V"]
    assert len(tests) == 10 and all(t["outcome"] == "worse" and t["n"] == 3 for t in tests)
    assert all(t["ci_low_pct"] < 0.02 < t["ci_high_pct"] for t in tests)

    preds = {(p["recipe"], p["budget"], p["variant"]): p for p in summary["predictions"]}
    p = preds[("gpt2", 1_000_000, "Q-K=V")]
    n_v, n_b = p["n_variant"], p["n_baseline"]
    assert n_b == ladder.target_nonembedding("q_k_v")[0] == 251_926_528
    assert n_v == ladder.target_nonembedding("q_kv")[0] < n_b
    true_change = math.exp(1.02 * float(law(n_v)) - float(law(n_b))) - 1
    assert p["fit_kind"] == "free" and p["ppl_change"] == pytest.approx(true_change, abs=3e-3)
    assert p["ci_low"] < p["ppl_change"] < p["ci_high"]
    assert p["paper_table4_change"] == PAPER_TABLES["table4"].values["Q-K=V"]["delta"]
    assert ("llama", 1_000_000, "Q-K=V") not in preds

    fits = [f for f in summary["fits"] if f["recipe"] == "gpt2" and f["variant_id"] == "q_k_v"]
    assert {f["budget"] for f in fits} == {1_000_000, 4_000_000}
    first = next(f for f in fits if f["budget"] == 1_000_000)
    assert first["alpha"] == pytest.approx(ALPHA_TRUE, abs=0.03) and first["n_points"] == 5

    trends = {(t["budget"], t["variant"]): t for t in summary["trends"] if t["recipe"] == "gpt2"}
    assert trends[(1_000_000, "Q=K=V")]["ci_low"] > 0  # the built-in growing gap
    verdicts = {(v["recipe"], v["budget"], v["variant"]): v["text"] for v in summary["verdicts"]}
    assert verdicts[("gpt2", 1_000_000, "Q-K=V")].startswith("Q-K=V: costs +")
    assert "Q=K=V loses ground to QKV as N grows" in verdicts[("gpt2", 1_000_000, "Q=K=V")]
    assert "trend with size not assessed" in verdicts[("llama", 1_000_000, "Q-K=V")]

    ranks = [r for r in summary["rankings"] if r["recipe"] == "gpt2"]
    assert len(ranks) == 5 and all(r["rho"] == pytest.approx(1.0) and not r["changed"] for r in ranks)
    budgets = {(b["recipe"], b["variant"]): b for b in summary["change_with_budget"]}
    qkv_eq = budgets["gpt2", "Q-K=V"]  # built in: the same relative change at both budgets, plus noise
    assert qkv_eq["sizes"] == ["gpt2-1m", "gpt2-3m", "gpt2-10m", "gpt2-30m", "gpt2-85m"]
    assert abs(qkv_eq["mean"]) < 0.05 and qkv_eq["ci_low"] < 0 < qkv_eq["ci_high"]
    assert qkv_eq["budget_small"] == 1_000_000 and qkv_eq["budget_large"] == 4_000_000
    assert ("llama", "Q-K=V") not in budgets and ("gpt2", "QKV") not in budgets  # llama: one budget
    assert "## 4a. Change vs QKV against the token budget" in text and "### gpt2: 1e6 tokens → 4e6 tokens" in text

    missing = summary["not_yet_run"]
    assert {"recipe": "gpt2", "budget": 1_000_000, "model": "gpt2-1m", "not_yet_run": ["MQA (failed)"],
            "missing_seeds": []} in missing  # fmt: skip

    assert len(summary["figures"]) == 2 + 2 + 5 + 1 + 1  # fits and changes per gpt2 budget, tokens per gpt2 size, llama
    for name in summary["figures"]:
        assert (study / "report" / name).read_bytes()[:8] == PNG_MAGIC
        assert f"]({name})" in text
    for heading in ("## Learning rate", "## 1.", "## 2.", "## 3.", "## 4.", "## 5.", "## 6.", "## What is not yet run"):
        assert heading in text
    assert "### llama, 1e6 tokens" in text and "Out-of-domain (Dickens)" in text
    assert "| Q-K=V | 230.93M |" in text and "+3.1%" in text  # N at the paper's shape; the paper's Δ
    assert "NVIDIA H100 80GB HBM3 (124 runs, mean MFU 40.0%)" in text


def test_partial_grid_says_what_is_missing(tmp_path: Path):
    rows = [row("QKV", "gpt2-3m", 3e6, 1_000_000, s, 4.0 + 0.01 * s) for s in SEEDS]
    rows.append(row("Q-K=V", "gpt2-3m", 3e6, 1_000_000, 0, 4.05))
    for r in rows:
        r.pop("dickens_loss"), r.pop("mfu"), r.pop("device_name")
    rows.append({"run_id": "x", "status": "failed", "variant": "Q=K=V", "variant_id": "qkv", "model": "gpt2-3m",
                 "tokens_budget": 1_000_000, "seed": 0, "error": "killed"})  # fmt: skip
    sweep = {
        "name": "partial",
        "report": "ladder",
        "grid": {"variant": ["QKV", "Q-K=V", "Q=K=V"], "model": ["gpt2-3m", "gpt2-10m"], "tokens": ["1M"]},
    }
    study = write_study(tmp_path / "partial", rows, sweep)
    out = tmp_path / "elsewhere"
    report = ladder.write_ladder_report(study, out_dir=out)
    assert report == out / "report.md"
    text = report.read_text()
    summary = json.loads((out / "ladder_summary.json").read_text())

    (test,) = summary["paired_tests"]
    assert (test["n"], test["ci_low"], test["outcome"]) == (1, None, "untested")
    assert test["mean_diff"] == pytest.approx(0.05)
    assert "n=1, no test" in text
    assert "No variant has 3+ sizes yet: no fit (not yet run)." in text
    assert "No size has run at two token budgets yet (not yet run)." in text
    assert summary["predictions"] == [] and summary["fits"] == [] and summary["rankings"] == []
    assert summary["verdicts"][0]["text"] == (
        "Q-K=V: loss change +1.00% (single seeds: n=1, no test); trend with size not assessed (fewer than 3 sizes)."
    )
    missing = {m["model"]: m for m in summary["not_yet_run"]}
    assert missing["gpt2-3m"]["not_yet_run"] == ["Q=K=V (failed)"]
    assert missing["gpt2-3m"]["missing_seeds"] == ["Q-K=V: seeds 1, 2"]
    assert missing["gpt2-10m"]["not_yet_run"] == ["QKV", "Q-K=V", "Q=K=V"]
    assert "| gpt2 | 1e6 tokens | gpt2-10m | QKV, Q-K=V, Q=K=V | - |" in text
    assert "Hardware: unknown (4 runs)" in text
    assert summary["figures"] == [] and not list(out.glob("*.png"))  # one point per line: nothing to draw


def test_the_header_says_how_runs_shared_the_gpu_and_the_device_time_the_slices_used(tmp_path: Path):
    rows = [row(v, m, n, 1_000_000, 0, 3.0) for v in ("QKV", "Q-K=V") for m, n in (("gpt2-1m", 1e6), ("gpt2-3m", 3e6))]
    for r, (share, steady) in zip(rows, [(6, 0.01), (6, 0.20), (1, 0.02), (1, 0.30)], strict=True):
        r.update(runs_per_device=share, steady_mfu=steady)
    study = write_study(tmp_path / "ladder", rows, {"name": "ladder-test", "report": "ladder"})
    (study / "slices.jsonl").write_text('{"lease_s": 1800.0}\n{"lease_s": 900.0}\n{"note": "no lease"}\n')
    text = ladder.write_ladder_report(study).read_text()
    head = json.loads((study / "report" / "ladder_summary.json").read_text())["header"]
    assert head["runs_per_device"] == [1, 6] and head["device_time_s"] == 2700.0
    assert "- Runs sharing one GPU at a time: 1, 6 (an MFU counts the run's own FLOPs only)." in text
    assert "- Device time (leases of 2 slices, start-up included): 0.75 h." in text
    assert head["steady_mfu_largest"] == {"model": "gpt2-3m", "by_runs_per_device": {"1": 0.3, "6": 0.2}}
    assert "of gpt2-3m: 30.0% with 1 run on the GPU (1 run); 20.0% with 6 runs on the GPU (1 run)." in text


def test_empty_and_missing_studies(tmp_path: Path):
    with pytest.raises(ConfigError, match=r"No results\.jsonl"):
        ladder.write_ladder_report(tmp_path / "nothing")
    study = write_study(tmp_path / "empty", [{"run_id": "a", "status": "failed", "error": "x"}])
    text = ladder.write_ladder_report(study).read_text()
    assert "nothing to analyse (not yet run)" in text


def test_cli_report_uses_the_ladder_when_the_sweep_says_so(tmp_path: Path):
    from typer.testing import CliRunner

    from qkvlab.cli import app

    study = write_study(tmp_path / "s", ladder_rows()[:40], {"name": "cli-ladder", "report": "ladder"})
    result = CliRunner().invoke(app, ["report", str(study), "--no-plots"])
    assert result.exit_code == 0, result.output
    summary = json.loads((study / "report" / "ladder_summary.json").read_text())
    assert summary["header"]["study"] == "cli-ladder" and summary["figures"] == []

    (study / "sweep.yaml").write_text("report: [ladder\n")
    result = CliRunner().invoke(app, ["report", str(study)])
    assert isinstance(result.exception, ConfigError) and "sweep.yaml" in str(result.exception)


def test_rows_from_another_config_are_left_out_not_merged(tmp_path: Path):
    from qkvlab.study import SweepSpec, expand

    spec = SweepSpec.from_dict(
        {"name": "t", "report": "ladder", "base": {"model": {"preset": "gpt2-1m"}}, "grid": {"variant": ["QKV"]}}
    )
    (plan,) = expand(spec)
    ours = row("QKV", "gpt2-1m", 1e6, 1_000_000, 0, 4.0)
    ours["run_id"] = plan.run_id
    # The same labels, another config (another hash): it must not be averaged with ours.
    other = row("QKV", "gpt2-1m", 1e6, 1_000_000, 0, 9.0)
    other["run_id"] = plan.run_id[:-8] + "deadbeef"
    study = write_study(tmp_path / "s", [ours, other], spec.to_dict())
    report = ladder.write_ladder_report(study, plots=False)
    summary = json.loads((report.parent / "ladder_summary.json").read_text())
    assert summary["header"]["rows_from_other_configs"] == 1 and summary["header"]["runs_ok"] == 1
    (cell,) = summary["cells"]
    assert cell["val_loss_mean"] == pytest.approx(4.0) and cell["n"] == 1
    assert "deadbeef" in report.read_text()


# ================================================================== change during training
def write_curve(
    study: Path, r: dict[str, Any], losses: list[float], every: int = 25, tokens_per_step: int = 100
) -> None:
    """A run folder with the metrics.jsonl the trainer writes (a train row every ``every`` steps)."""
    r["out_dir"] = f"runs/{r['run_id']}"
    run = study / r["out_dir"]
    run.mkdir(parents=True, exist_ok=True)
    lines = [
        {"step": (i + 1) * every, "tokens": (i + 1) * every * tokens_per_step, "loss": loss, "val_loss": None}
        for i, loss in enumerate(losses)
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in lines))


def test_curve_change_pairs_seeds_and_smooths(tmp_path):
    """A variant 2% above QKV at every logged point reads +2% everywhere; a gap growing linearly
    along the run reads about its value at each fraction; seeds pair by seed and a seed one side
    lacks is left out."""
    n_log = 40
    qkv_losses = {s: [6.0 - 0.05 * i + 0.1 * (-1) ** (i + s) for i in range(n_log)] for s in (0, 1)}
    rows = []
    for s in (0, 1):
        base = row("QKV", "gpt2-3m", 3e6, 4_000_000, s, 4.0)
        write_curve(tmp_path, base, qkv_losses[s])
        flat = row("Q-K=V", "gpt2-3m", 3e6, 4_000_000, s, 4.1)
        write_curve(tmp_path, flat, [1.02 * x for x in qkv_losses[s]])
        rows += [base, flat]
    grow = row("Q=K=V", "gpt2-3m", 3e6, 4_000_000, 0, 4.4)
    write_curve(tmp_path, grow, [x * (1 + 0.1 * (i + 1) / n_log) for i, x in enumerate(qkv_losses[0])])
    lone = row("GQA-4", "gpt2-3m", 3e6, 4_000_000, 2, 4.0)  # seed 2: QKV has no run with it
    write_curve(tmp_path, lone, qkv_losses[0])
    rows += [grow, lone]
    cells = ladder.build_cells(rows)
    key = lambda v: ("gpt2", 4_000_000, "gpt2-3m", VariantSpec.parse(v).id)  # noqa: E731
    qkv = cells[key("QKV")]

    cc = ladder.curve_change(cells[key("Q-K=V")], qkv, tmp_path)
    assert cc.seeds == [0, 1] and len(cc.tokens) == n_log - ladder.CURVE_WINDOW + 1
    assert cc.tokens[0] == ladder.CURVE_WINDOW * 25 * 100  # the first point with a full window
    assert cc.change_pct == pytest.approx([2.0] * len(cc.tokens), abs=1e-9)
    assert cc.at(1.0) == pytest.approx(2.0) and cc.at(0.01) is None

    g = ladder.curve_change(cells[key("Q=K=V")], qkv, tmp_path)
    assert g.seeds == [0]
    for f in ladder.CURVE_FRACTIONS:  # the trailing window lags the growing gap by half its length
        expected = 10 * (f * n_log - (ladder.CURVE_WINDOW - 1) / 2) / n_log
        assert g.at(f) == pytest.approx(expected, abs=0.3), f
    assert g.change_pct == sorted(g.change_pct)

    assert ladder.curve_change(cells[key("GQA-4")], qkv, tmp_path) is None
    del rows[0]["out_dir"]  # a committed row without its run folder: QKV's seed 0 has no curve
    cells = ladder.build_cells(rows)
    assert ladder.curve_change(cells[key("Q-K=V")], cells[key("QKV")], tmp_path).seeds == [1]


def test_report_shows_change_during_training(tmp_path):
    """Section 4b: a table at the fractions of the largest budget and a figure, from the run folders;
    without them the section says so."""
    study = tmp_path / "study"
    rows = [r for r in ladder_rows() if r["model"] in ("gpt2-1m", "gpt2-3m")]
    write_study(study, rows)
    text = ladder.write_ladder_report(study).read_text()
    assert "## 4b. Change vs QKV during training" in text and "No training curves beside QKV's" in text

    for r in rows:
        if r["tokens_budget"] == 4_000_000 and r["model"] == "gpt2-3m":
            scale = {"QKV": 1.0, "Q-K=V": 1.02, "Q=K=V": 1.05, "GQA-4": 1.0}[r["variant"]]
            write_curve(study, r, [scale * (5.0 - 0.02 * i) for i in range(40)])
    write_study(study, rows)
    report = ladder.write_ladder_report(study)
    text = report.read_text()
    section = text[text.index("## 4b.") : text.index("## 5.")]
    assert "### gpt2, gpt2-3m" in section and "gpt2-1m" not in section
    assert "| Q-K=V | 3 | +2.00% | +2.00% | +2.00% | +2.00% |" in section
    assert "| GQA-4 | 3 | +0.00% |" in section
    figure = report.parent / "scaling-change-during-training-gpt2-gpt2-3m-4e6-tokens.png"
    assert figure.read_bytes()[:8] == PNG_MAGIC and figure.name in section
    summary = json.loads((report.parent / "ladder_summary.json").read_text())
    rec = {r["variant"]: r for r in summary["changes_during_training"]}
    assert rec["Q=K=V"]["change_pct_at"]["1.0"] == pytest.approx(5.0) and rec["Q=K=V"]["seeds"] == [0, 1, 2]


# ================================================================== training stability
def write_norms(study: Path, r: dict[str, Any], norms: list[float]) -> None:
    r["out_dir"] = f"runs/{r['run_id']}"
    (study / r["out_dir"]).mkdir(parents=True, exist_ok=True)
    lines = [{"step": 25 * (i + 1), "tokens": 2500 * (i + 1), "loss": 5.0, "grad_norm": g} for i, g in enumerate(norms)]
    (study / r["out_dir"] / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in lines))


def test_instability_rule_and_report_section(tmp_path):
    """Flagged: a second half averaging above 3x max(clip, first-half median), or not finite; a
    stable run, a brief spike and a run without a folder are not."""
    study = tmp_path / "study"
    rows = [r for r in ladder_rows() if r["model"] == "gpt2-3m" and r["tokens_budget"] == 4_000_000]
    text = ladder.write_ladder_report(write_study(study, rows)).read_text()
    assert "## 4c. Training stability" in text and "None of the 0 runs with a run folder." in text

    calm = [0.5] * 20
    blowup = [0.5] * 10 + [20.0] * 10  # late mean 20 > 3 x max(1.0, 0.5)
    spike = [0.5] * 10 + [30.0] + [0.5] * 9  # one spike: late mean 3.45 > 3? no: (30 + 9 * 0.5) / 10 = 3.45
    edge = [0.5] * 10 + [2.9] * 10  # late mean 2.9 < 3 x clip 1.0
    bad = [0.5] * 10 + [float("nan")] * 10
    by = {(r["variant"], r["seed"]): r for r in rows}
    write_norms(study, by["QKV", 0], calm)
    write_norms(study, by["Q=K=V", 0], blowup)
    write_norms(study, by["Q=K=V", 1], edge)
    write_norms(study, by["Q-K=V", 2], bad)
    write_norms(study, by["GQA-4", 1], spike)
    assert ladder.instability(by["QKV", 0], study) is None and ladder.instability(by["Q=K=V", 1], study) is None
    assert ladder.instability(by["QKV", 1], study) is None  # no run folder
    x = ladder.instability(by["Q=K=V", 0], study)
    assert (x.early_median, x.late_mean, x.max_grad_norm, x.clip) == (0.5, 20.0, 20.0, 1.0) and x.seed == 0
    assert ladder.instability(by["Q-K=V", 2], study) is not None  # NaN norms
    assert ladder.instability(by["GQA-4", 1], study) is not None  # a late spike big enough to carry the mean
    strict = dict(by["GQA-4", 1], config={**by["GQA-4", 1]["config"], "optim": {"lr": 1e-3, "grad_clip": 2.0}})
    assert ladder.instability(strict, study) is None  # 3.45 < 3 x clip 2.0

    write_study(study, rows)
    report = ladder.write_ladder_report(study)
    section = report.read_text().split("## 4c. Training stability")[1].split("## 5.")[0]
    assert "3 of 5 runs with a run folder (Q-K=V 1, Q=K=V 1, GQA-4 1):" in section
    assert "| Q=K=V | gpt2 | gpt2-3m | 4e6 tokens | 0 | 0.50 | 20.00 | 20.0 |" in section
    summary = json.loads((report.parent / "ladder_summary.json").read_text())
    assert {(u["variant_id"], u["seed"]) for u in summary["unstable_runs"]} == {
        ("q_kv", 2),
        ("qkv", 0),
        ("q_k_v+gqa4", 1),
    }
    verdicts = {v["variant"]: v["text"] for v in summary["verdicts"] if v["budget"] == 4_000_000}
    assert verdicts["Q=K=V"].endswith("Unstable late in training (section 4c): gpt2-3m seed 0.")
    assert verdicts["Q-K=V"].endswith("(section 4c): gpt2-3m seed 2.")
    assert verdicts["GQA-4"].endswith("(section 4c): gpt2-3m seed 1.") and "QKV" not in verdicts  # the baseline
    assert "Unstable late in training" in report.read_text().split("## 6. Verdict per variant")[1]
