"""The scaling-ladder report: ``report.md``, its figures and ``ladder_summary.json`` from a
study folder's rows.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from qkvlab.checkpoint import atomic_write
from qkvlab.errors import ConfigError
from qkvlab.study.downstream import HARNESS_STATUS, downstream_section, harness_rows
from qkvlab.study.grid import planned_ids
from qkvlab.study.ladder.analysis import TARGET_PRESET, analyse
from qkvlab.study.ladder.plots import FIG_PREFIX
from qkvlab.study.ladder.sections import (
    budget_section,
    coverage_section,
    curves_section,
    fits_section,
    header_section,
    json_safe,
    lr_section,
    stability_section,
    tables_section,
    tests_section,
    tokens_section,
    verdict_section,
)
from qkvlab.study.ladder.stats import CONFIDENCE, N_DRAWS, N_SCALE
from qkvlab.study.results import REPORT_DIR, STATUS_OK, ResultsStore
from qkvlab.study.tables import variant_label


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
    planned = planned_ids(study)
    # Downstream rows (`qkvlab eval harness --study`) name the training run they scored instead.
    downstream = harness_rows(all_rows)
    all_rows = [r for r in all_rows if r.get("status") != HARNESS_STATUS]
    foreign = [r for r in all_rows if planned is not None and r.get("run_id") not in planned]
    all_rows = [r for r in all_rows if planned is None or r.get("run_id") in planned]
    out = Path(out_dir) if out_dir is not None else study / REPORT_DIR
    out.mkdir(parents=True, exist_ok=True)
    a = analyse([r for r in all_rows if r.get("status") == STATUS_OK])
    figures: list[str] = []

    lines, head = header_section(study, a, all_rows)
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
    lr_lines, lr_records = lr_section(a)
    table_lines, cell_records = tables_section(a)
    test_lines, test_records = tests_section(a, out, plots, figures)
    fit_lines, fit_records = fits_section(a, out, plots, figures)
    token_lines, rank_records = tokens_section(a, out, plots, figures)
    budget_lines, budget_records = budget_section(a)
    curve_lines, curve_records = curves_section(a, study, out, plots, figures)
    stability_lines, stability_records = stability_section(a, study)
    verdict_lines, verdict_records = verdict_section(a, stability_records)
    cover_lines, cover_records = coverage_section(a, study, all_rows)
    lines += lr_lines + table_lines + test_lines + fit_lines + token_lines + budget_lines + curve_lines
    lines += stability_lines
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
        "change_with_budget": budget_records,
        "changes_during_training": curve_records,
        "unstable_runs": stability_records,
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
    text = json.dumps(json_safe(summary), indent=2, allow_nan=False)
    atomic_write(out / "ladder_summary.json", lambda tmp: Path(tmp).write_text(text + "\n", encoding="utf-8"))
    report = out / "report.md"
    atomic_write(report, lambda tmp: Path(tmp).write_text("\n".join(lines).rstrip() + "\n", encoding="utf-8"))
    return report
