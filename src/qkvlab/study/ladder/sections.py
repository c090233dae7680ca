"""The scaling ladder's report sections: each returns its markdown lines and the records
``ladder_summary.json`` keeps of it (the same numbers).
"""

from __future__ import annotations

import functools
import math
import statistics
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from qkvlab.attention.variant import VariantSpec
from qkvlab.errors import ConfigError
from qkvlab.study.ladder.analysis import (
    CURVE_FRACTIONS,
    CURVE_WINDOW,
    TARGET_PRESET,
    UNSTABLE_FACTOR,
    CellKey,
    LadderAnalysis,
    budget_label,
    curve_change,
    instability,
    recipe_of,
    size_label,
)
from qkvlab.study.ladder.plots import plot_change, plot_curve_changes, plot_fits, plot_tokens
from qkvlab.study.ladder.stats import CONFIDENCE, N_DRAWS, PowerLawFit
from qkvlab.study.paper import PAPER_TABLES
from qkvlab.study.results import STATUS_FAILED, STATUS_SKIPPED, read_jsonl
from qkvlab.study.spec import parse_tokens, read_study_file, study_name
from qkvlab.study.tables import commits, fmt_count, is_qkv, markdown_table, mean_std, variant_label, variant_order


def _f(x: float | None, digits: int = 4, sign: bool = False) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    return f"{x:+.{digits}f}" if sign else f"{x:.{digits}f}"


def _pct(x: float | None, digits: int = 2) -> str:
    return "n/a" if x is None else f"{100 * x:+.{digits}f}%"


def _ratio(x: float | None, base: float | None) -> float | None:
    return None if x is None or not base else x / base


def _p(x: float | None) -> str:
    if x is None:
        return "n/a"
    return f"{x:.2g}" if x >= 1e-4 else "<1e-4"


def json_safe(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, np.floating | np.integer):
        return json_safe(obj.item())
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    return obj


# ================================================================== report sections
def _commit_counts(rows: list[dict[str, Any]]) -> dict[str, int]:
    """Runs per git commit (``+dirty`` where the tree had uncommitted changes)."""
    counts: dict[str, int] = {}
    for r in rows:
        key = str(r.get("git_commit") or "unknown") + ("+dirty" if r.get("git_dirty") else "")
        counts[key] = counts.get(key, 0) + 1
    return counts


def header_section(study: Path, a: LadderAnalysis, all_rows: list[dict[str, Any]]) -> tuple[list[str], dict[str, Any]]:
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
        "study": study_name(study),
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
        *_sharing_lines(used, head),
        *_device_time_lines(study, head),
        f"- Code (git commit of the runs): {commits(used + a.dropped)}.",
        "- Loss: validation cross-entropy (nats/token), in-domain; PPL = exp(loss). N: non-embedding "
        "parameters. Δ vs QKV: the variant's mean over QKV's at the same recipe, size and budget, minus 1.",
        "",
    ]
    return lines, head


def _sharing_lines(used: list[dict[str, Any]], head: dict[str, Any]) -> list[str]:
    """How many runs shared a GPU, and the steady MFU of the largest model's runs: an MFU counts a
    run's own FLOPs, so runs sharing a GPU each show a fraction of what the GPU did."""
    shares = sorted({int(r["runs_per_device"]) for r in used if r.get("runs_per_device")})
    lines = []
    if shares:
        head["runs_per_device"] = shares
        lines.append(
            f"- Runs sharing one GPU at a time: {', '.join(map(str, shares))} (an MFU counts the run's own FLOPs only)."
        )
    steady = [r for r in used if r.get("steady_mfu") is not None and r.get("params_nonembedding")]
    if steady:
        top = max(r["params_nonembedding"] for r in steady)
        rows = [r for r in steady if r["params_nonembedding"] == top]
        by_share: dict[int, list[float]] = {}
        for r in rows:
            by_share.setdefault(int(r.get("runs_per_device") or 1), []).append(float(r["steady_mfu"]))
        head["steady_mfu_largest"] = {
            "model": rows[0].get("model"),
            "by_runs_per_device": {k: statistics.median(v) for k, v in by_share.items()},
        }
        parts = [
            f"{100 * statistics.median(v):.1f}% with {k} run{'s' if k != 1 else ''} on the GPU "
            f"({len(v)} run{'s' if len(v) != 1 else ''})"
            for k, v in sorted(by_share.items())
        ]
        model = rows[0].get("model")
        lines.append(f"- Steady MFU (median log window after compilation) of {model}: {'; '.join(parts)}.")
    return lines


def _device_time_lines(study: Path, head: dict[str, Any]) -> list[str]:
    """The device time the study used, from the slices' leases (``slices.jsonl``, where kept)."""
    slices = read_jsonl(study / "slices.jsonl")
    leases = [float(s["lease_s"]) for s in slices if isinstance(s.get("lease_s"), int | float)]
    if not leases:
        return []
    head["device_time_s"] = sum(leases)
    return [f"- Device time (leases of {len(leases)} slices, start-up included): {sum(leases) / 3600:,.2f} h."]


def lr_section(a: LadderAnalysis) -> tuple[list[str], list[dict[str, Any]]]:
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
        body.append([recipe, model, budget_label(ch.budget), ch.basis, tried, f"{ch.chosen:g}", str(dropped)])
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


def tables_section(a: LadderAnalysis) -> tuple[list[str], list[dict[str, Any]]]:
    lines = ["## 1. Validation loss per variant and size", ""]
    records = []
    for g in a.groups:
        recipe, budget = g
        base = a.baseline(g)
        cols = [size_label(a, recipe, m) for m in a.sizes[g]]
        lines += [f"### {recipe}, {budget_label(budget)}", ""]
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


def tests_section(a: LadderAnalysis, out: Path, plots: bool, figures: list[str]) -> tuple[list[str], list[dict]]:
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
        lines += [f"### {recipe}, {budget_label(budget)}", ""]
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
                        size_label(a, recipe, m),
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
            path = plot_change(a, g, records, out)
            if path is not None:
                figures.append(path.name)
                lines += [f"![Change vs QKV by size, {recipe}, {budget_label(budget)}]({path.name})", ""]
    return lines, records


def fits_section(a: LadderAnalysis, out: Path, plots: bool, figures: list[str]) -> tuple[list[str], dict]:
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
        lines += [f"### {recipe}, {budget_label(budget)}", ""]
        if notes:
            lines += [*(f"- {note}." for note in notes), ""]
        if plots:
            path = plot_fits(a, g, out)
            if path is not None:
                figures.append(path.name)
                lines += [f"![Loss vs non-embedding parameters, {recipe}, {budget_label(budget)}]({path.name})", ""]
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
                problem = group_fit.problem(vid, base)
                body.append(
                    [
                        variant_label(vid),
                        fmt_count(p.n_variant),
                        f"{p.loss:.4f}",
                        f"{math.exp(p.loss):.3f}",
                        "baseline" if vid == base else _pct(p.ppl_change, 1),
                        "baseline" if vid == base else interval,
                        "n/a" if paper_delta is None else ("baseline" if vid == base else _pct(paper_delta, 1)),
                        problem or "ok",
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
                        "fit_problem": problem or None,
                    }
                )
            header = ["Variant", "N", "Pred. loss", "Pred. PPL", "Δ PPL vs QKV", "95% interval", "Paper Table 4 Δ"]
            header.append("Fit")
            lines += [*markdown_table(header, body), ""]
            if any(row[-1] != "ok" for row in body):
                lines += [
                    "- A row whose fit (the variant's or QKV's) is ill-determined is not a prediction: the curve "
                    "passes the points but its parameters are not pinned down by them.",
                ]
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


def tokens_section(a: LadderAnalysis, out: Path, plots: bool, figures: list[str]) -> tuple[list[str], list[dict]]:
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
                        + ("" if is_qkv(vid) or ch is None else f" ({_pct(ch)})")
                    )
                body.append(row)
            lines += [
                f"### {recipe}, {size_label(a, recipe, model)}",
                "",
                *markdown_table(["Variant", *[budget_label(b) for b in present]], body),
                "",
            ]
            for rk in a.rankings:
                if rk["recipe"] == recipe and rk["model"] == model:
                    records.append(rk)
                    pair = f"{budget_label(rk['budget_a'])} vs {budget_label(rk['budget_b'])}"
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
                path = plot_tokens(a, recipe, model, present, vids, out)
                figures.append(path.name)
                lines += [f"![Loss vs tokens, {recipe}, {model}]({path.name})", ""]
    if not any_table:
        lines += ["No size has run at two token budgets yet (not yet run).", ""]
    return lines, records


def budget_section(a: LadderAnalysis) -> tuple[list[str], list[dict]]:
    """Does each variant's change vs QKV grow or shrink from the smallest token budget to the largest?"""
    if not a.budget_changes:
        return [], []
    most = max((len(bc.sizes) for bc in a.budget_changes.values() if bc is not None), default=0)
    lines = [
        "## 4a. Change vs QKV against the token budget",
        "",
        "Per size, the variant's change vs QKV (% of QKV's loss, mean over seeds) at the smallest and the largest "
        "budget, and the difference (larger budget minus smaller, percentage points); over the sizes run at both, "
        f"the mean difference with its {CONFIDENCE:.0%} t-interval (sizes as the replicates) and a two-sided sign "
        "test of the differences (as many sizes up as down under the null). With n sizes a sign test's p cannot "
        f"go below 2^(1-n) ({2.0 ** (1 - most):.3g} for the {most} sizes here, all moving one way), so with few "
        "sizes it can say which way the data lean, not settle it.",
        "",
    ]
    records = []
    for recipe in sorted({k[0] for k in a.budget_changes}):
        keys = [k for k in a.budget_changes if k[0] == recipe]
        lo, hi = keys[0][1], keys[0][2]
        models = sorted({m for k in keys if (bc := a.budget_changes[k]) for m in bc.sizes},
                        key=lambda m: a.size_n.get((recipe, m)) or 0)  # fmt: skip
        body = []
        for key in sorted(keys, key=lambda k: variant_order(k[3])):
            bc = a.budget_changes[key]
            if bc is None:
                body.append([variant_label(key[3]), *["-"] * len(models), "fewer than 2 sizes at both budgets", "", ""])
                continue
            per = dict(zip(bc.sizes, zip(bc.small, bc.large, strict=True), strict=True))
            cells = [f"{per[m][0]:+.2f} → {per[m][1]:+.2f} ({per[m][1] - per[m][0]:+.2f})" if m in per else "-"
                     for m in models]  # fmt: skip
            ci = "" if bc.ci_low is None else f" [{bc.ci_low:+.2f}, {bc.ci_high:+.2f}]"
            body.append(
                [variant_label(key[3]), *cells, f"{bc.mean:+.2f}{ci}", f"{bc.n_up} / {bc.n_down}", _p(bc.sign_p)]
            )
            records.append(
                {
                    "recipe": recipe,
                    "budget_small": lo,
                    "budget_large": hi,
                    "variant": variant_label(key[3]),
                    "variant_id": key[3],
                    **asdict(bc),
                    "diffs": list(bc.diffs),
                }
            )
        lines += [
            f"### {recipe}: {budget_label(lo)} → {budget_label(hi)}",
            "",
            *markdown_table(
                [
                    "Variant",
                    *[size_label(a, recipe, m) for m in models],
                    "Mean difference (pts) [CI]",
                    "Sizes up / down",
                    "Sign test p",
                ],
                body,
            ),
            "",
        ]
    return lines, records


def curves_section(
    a: LadderAnalysis, study: Path, out: Path, plots: bool, figures: list[str]
) -> tuple[list[str], list[dict]]:
    """The training-loss change vs QKV along the runs, at each size's largest budget."""
    lines = [
        "## 4b. Change vs QKV during training",
        "",
        f"Training loss of each variant over QKV's, minus 1, along the runs at each size's largest budget: "
        f"each curve is a trailing mean over {CURVE_WINDOW} logged points, and a variant's run is paired "
        "with QKV's of the same seed (the same batches in the same order), then averaged over seeds. "
        "Points inside one run share its learning-rate schedule, which has barely begun to decay at a "
        "quarter of the run, so a column here is not the loss of a shorter run (section 4's budgets "
        "are). It shows whether a gap opens early and holds or keeps growing as the run goes on. "
        "-: the run has no smoothed point that early.",
        "",
    ]
    records = []
    any_table = False
    for recipe in sorted({g[0] for g in a.groups}):
        budgets = sorted((g[1] for g in a.groups if g[0] == recipe), key=lambda b: b or 0)
        models = sorted(
            {m for g in a.groups if g[0] == recipe for m in a.sizes[g]}, key=lambda m: a.size_n.get((recipe, m)) or 0
        )
        for model in models:
            budget = max((b for b in budgets if model in a.sizes[(recipe, b)]), key=lambda b: b or 0)
            base_vid = a.baseline((recipe, budget))
            base = a.cell(recipe, budget, model, base_vid) if base_vid else None
            if base is None:
                continue
            changes = {}
            for vid in a.variants[(recipe, budget)]:
                c = a.cell(recipe, budget, model, vid)
                if c is not None and not is_qkv(vid) and (cc := curve_change(c, base, study)) is not None:
                    changes[vid] = cc
            if not changes:
                continue
            any_table = True
            body = []
            for vid in sorted(changes, key=variant_order):
                cc = changes[vid]
                vals = [cc.at(f) for f in CURVE_FRACTIONS]
                body.append(
                    [variant_label(vid), str(len(cc.seeds)), *("-" if v is None else f"{v:+.2f}%" for v in vals)]
                )
                records.append(
                    dict(
                        recipe=recipe, budget=budget, model=model, variant=variant_label(vid), variant_id=vid,
                        seeds=cc.seeds, window=CURVE_WINDOW,
                        change_pct_at={str(f): v for f, v in zip(CURVE_FRACTIONS, vals, strict=True)},
                    )
                )  # fmt: skip
            head = ["Variant", "Seeds", *(f"{int(100 * f)}% of {budget_label(budget)}" for f in CURVE_FRACTIONS)]
            lines += [f"### {recipe}, {size_label(a, recipe, model)}", "", *markdown_table(head, body), ""]
            if plots and (path := plot_curve_changes(a, recipe, budget, model, changes, out)) is not None:
                figures.append(path.name)
                lines += [f"![Change vs QKV during training, {recipe}, {model}]({path.name})", ""]
    if not any_table:
        lines += ["No training curves beside QKV's (run folders with metrics.jsonl) yet.", ""]
    return lines, records


def stability_section(a: LadderAnalysis, study: Path) -> tuple[list[str], list[dict]]:
    """Runs whose gradients grew large late in training, from their logged gradient norms."""
    flagged = [x for r in a.rows if (x := instability(r, study)) is not None]
    lines = [
        "## 4c. Training stability",
        "",
        f"A run is listed when its mean gradient norm over the second half of training exceeds "
        f"{UNSTABLE_FACTOR:g}x the larger of its clipping threshold and its own median over the first half: "
        "its updates were then clipped through most of that half, and its final loss says as much about that as about "
        "the variant. Runs at a learning rate not chosen are left out, as everywhere above.",
        "",
    ]
    checked = sum(1 for r in a.rows if r.get("out_dir"))
    if not flagged:
        lines += [f"None of the {checked} runs with a run folder.", ""]
        return lines, []
    ordered = sorted(
        flagged, key=lambda x: (variant_order(x.variant_id), x.recipe, a.size_n.get((x.recipe, x.model)) or 0)
    )
    body = [
        [
            variant_label(x.variant_id), x.recipe, x.model, budget_label(x.budget), str(x.seed),
            f"{x.early_median:.2f}", f"{x.late_mean:.2f}", f"{x.max_grad_norm:.1f}",
            "-" if x.val_loss is None else f"{x.val_loss:.4f}",
        ]
        for x in ordered
    ]  # fmt: skip
    head = ["Variant", "Recipe", "Size", "Budget", "Seed", "Grad norm, 1st half (median)",
            "2nd half (mean)", "Max", "Val loss"]  # fmt: skip
    per_variant = Counter(x.variant_id for x in flagged)
    counts = ", ".join(
        f"{variant_label(v)} {n}" for v, n in sorted(per_variant.items(), key=lambda kv: variant_order(kv[0]))
    )
    lines += [
        f"{len(flagged)} of {checked} runs with a run folder ({counts}):",
        "",
        *markdown_table(head, body),
        "",
    ]
    return lines, [asdict(x) for x in flagged]


def verdict_section(a: LadderAnalysis, unstable: Sequence[dict] = ()) -> tuple[list[str], list[dict]]:
    """Section 6; ``unstable``: section 4c's records, named in the verdict of their (recipe, budget,
    variant) so that a cost partly due to runs that blew up is not read as the variant's alone."""
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
        lines += [f"### {recipe}, {budget_label(budget)}", ""]
        for k in sorted(keys, key=lambda k: variant_order(k[2])):
            text = a.verdicts[k]
            bad = [u for u in unstable if (u["recipe"], u["budget"], u["variant_id"]) == k]
            if bad:
                runs = ", ".join(f"{u['model']} seed {u['seed']}" for u in bad)
                text += f" Unstable late in training (section 4c): {runs}."
            lines.append(f"- {text}")
            t = a.trends.get(k)
            records.append(
                {
                    "recipe": recipe,
                    "budget": budget,
                    "variant": variant_label(k[2]),
                    "variant_id": k[2],
                    "text": text,
                    "trend": None if t is None else asdict(t),
                }
            )
        lines.append("")
    return lines, records


def _grid_blocks(study: Path) -> list[dict[str, Any]] | None:
    """The sweep file's grid as a list of blocks (a single mapping is one block); None if unreadable."""
    grid = read_study_file(study).get("grid")
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


def block_seeds(blocks: list[dict[str, Any]] | None) -> dict[tuple[str, int | None, str], set[Any]]:
    """(recipe, budget, model) -> the seeds the sweep's blocks list there (blocks without a seed axis
    or with an axis this code cannot read add none)."""
    out: dict[tuple[str, int | None, str], set[Any]] = {}
    for block in blocks or []:
        seeds = block.get("seed")
        if not isinstance(seeds, list):
            continue
        try:
            budgets = [parse_tokens(t) for t in block.get("tokens", [])]
        except (ConfigError, TypeError, ValueError):
            continue
        for model in map(str, block.get("model", [])):
            for budget in budgets:
                out.setdefault((recipe_of({"model": model}), budget, model), set()).update(seeds)
    return out


def coverage_section(a: LadderAnalysis, study: Path, all_rows: list[dict[str, Any]]) -> tuple[list[str], list]:
    lines = [
        "## What is not yet run",
        "",
        "Expected: every cell a run names and each sweep-file grid block's variants x sizes x budgets (without a "
        "sweep file: every variant x size x budget seen, per recipe), with the seeds any variant has there "
        "and those the sweep file lists. "
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
    blocks = _grid_blocks(study)
    expected, planned_seeds = expected_cells(all_rows, blocks), block_seeds(blocks)
    places = sorted(
        {k[:3] for k in expected},
        key=lambda k: (k[0], k[1] or 0, a.size_n.get((k[0], k[2])) or math.inf, k[2]),
    )
    for recipe, budget, model in places:
        vids = sorted((k[3] for k in expected if k[:3] == (recipe, budget, model)), key=variant_order)
        seeds = {s for v in vids if (c := a.cell(recipe, budget, model, v)) for s in c.by_seed()}
        seeds |= planned_seeds.get((recipe, budget, model), set())
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
            body.append([recipe, budget_label(budget), model, ", ".join(absent) or "-", "; ".join(partial) or "-"])
            records.append(
                {"recipe": recipe, "budget": budget, "model": model, "not_yet_run": absent, "missing_seeds": partial}
            )
    if body:
        lines += markdown_table(["Recipe", "Budget", "Size", "Not yet run", "Missing seeds"], body)
    else:
        lines.append("Nothing: the grid is complete as far as the results and the sweep file show.")
    lines.append("")
    return lines, records
