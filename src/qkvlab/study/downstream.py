"""Downstream accuracy in study reports, set beside the paper's Table 11.

``qkvlab eval harness RUN... --study DIR`` appends one row per (run, task, metric, shot count)
to ``DIR/results.jsonl`` with ``status: "harness"`` (see :mod:`qkvlab.harness.runner`). This
module only reads those rows: it needs neither lm-eval nor a model, so a report renders them
on any machine.

The table shows ``acc`` for the paper's five tasks (the paper does not say whether it used
``acc`` or ``acc_norm``; ``acc`` is lm-eval's primary metric for each of them), their mean
(the paper's "Avg") and LAMBADA's accuracy and perplexity, the task that still separates small
models whose multiple-choice accuracies sit at chance.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

from qkvlab.attention.variant import PAPER_LM_VARIANTS
from qkvlab.study.paper import PAPER_TABLES
from qkvlab.study.tables import markdown_table

HARNESS_STATUS = "harness"
#: The paper's five tasks (Table 11's columns) and the chance accuracy of each: the reciprocal
#: of the number of choices (ARC's few 3- and 5-choice questions moved aside).
PAPER_TASKS = ("arc_challenge", "arc_easy", "hellaswag", "piqa", "winogrande")
CHANCE = {"arc_challenge": 0.25, "arc_easy": 0.25, "hellaswag": 0.25, "piqa": 0.5, "winogrande": 0.5}
TASK_LABEL = {
    "arc_challenge": "ARC-C",
    "arc_easy": "ARC-E",
    "hellaswag": "HellaSwag",
    "piqa": "PIQA",
    "winogrande": "WinoGrande",
}
PAPER_TABLE = "table11"

RunKey = tuple[str, str, Any, Any]  # (of_run, variant name, model, tokens)
Setting = tuple[int, Any]  # (num_fewshot, limit)


def harness_rows(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows ``qkvlab eval harness --study`` wrote (training rows have another status)."""
    return [r for r in rows if r.get("status") == HARNESS_STATUS]


def _variant(row: dict[str, Any]) -> str:
    return str(row.get("paper_name") or row.get("variant") or row.get("variant_id") or "?")


def _value(rows: dict[tuple[str, str], dict[str, Any]], task: str, metric: str) -> tuple[float | None, float | None]:
    r = rows.get((task, metric))
    if r is None or r.get("value") is None:
        return None, None
    return float(r["value"]), (None if r.get("stderr") is None else float(r["stderr"]))


def average(values: Sequence[tuple[float | None, float | None]]) -> tuple[float | None, float | None]:
    """Mean of the five accuracies and its standard error (tasks are independent samples)."""
    if not values or any(v is None for v, _ in values):
        return None, None
    mean = sum(v for v, _ in values) / len(values)
    if any(s is None for _, s in values):
        return mean, None
    return mean, math.sqrt(sum(s * s for _, s in values)) / len(values)


def points(x: float | None, se: float | None = None, *, signed: bool = False) -> str:
    """An accuracy (a fraction) in points, one decimal, with its standard error when given."""
    if x is None:
        return "-"
    text = f"{100 * x:+.1f}" if signed else f"{100 * x:.1f}"
    return text + (f" ± {100 * se:.1f}" if se is not None else "")


def _run_order(key: RunKey) -> tuple:
    """By model, token budget, then QKV first and the paper's Table 4 order."""
    name = key[1]
    rank = PAPER_LM_VARIANTS.index(name) if name in PAPER_LM_VARIANTS else len(PAPER_LM_VARIANTS)
    return (str(key[2]), float(key[3] or 0), rank, name, key[0])


def collect(rows: Iterable[dict[str, Any]]) -> dict[Setting, dict[RunKey, dict[tuple[str, str], dict[str, Any]]]]:
    """Harness rows grouped by (shots, limit), then by evaluated run, then by (task, metric)."""
    out: dict[Setting, dict[RunKey, dict[tuple[str, str], dict[str, Any]]]] = {}
    for r in harness_rows(rows):
        setting = (int(r.get("num_fewshot") or 0), r.get("limit"))
        run = (str(r.get("of_run") or r.get("checkpoint") or "?"), _variant(r), r.get("model"), r.get("tokens"))
        out.setdefault(setting, {}).setdefault(run, {})[(str(r.get("task")), str(r.get("metric")))] = r
    return out


def run_summary(metrics: dict[tuple[str, str], dict[str, Any]]) -> dict[str, Any]:
    """One evaluated run: acc (and stderr) per paper task, their average, LAMBADA acc and ppl."""
    acc = {t: _value(metrics, t, "acc") for t in PAPER_TASKS}
    avg = average([acc[t] for t in PAPER_TASKS])
    seed = next((r.get("seed") for r in metrics.values() if r.get("seed") is not None), None)
    return {
        "seed": seed,
        "acc": {t: v for t, (v, _) in acc.items()},
        "acc_stderr": {t: s for t, (_, s) in acc.items()},
        "avg": avg[0],
        "avg_stderr": avg[1],
        "lambada_acc": _value(metrics, "lambada_openai", "acc")[0],
        "lambada_acc_stderr": _value(metrics, "lambada_openai", "acc")[1],
        "lambada_ppl": _value(metrics, "lambada_openai", "perplexity")[0],
    }


def _baseline(runs: dict[RunKey, dict[str, Any]], key: RunKey) -> dict[str, Any] | None:
    """The QKV run of the same model, token budget and seed as ``key``."""
    seed = runs[key]["seed"]
    for other, s in runs.items():
        if other[1] == "QKV" and other[2:] == key[2:] and s["seed"] == seed:
            return s
    return None


def _paper_lines() -> list[str]:
    table = PAPER_TABLES[PAPER_TABLE]
    base = table.values.get("QKV", {}).get("avg")
    header = ["Paper (1.2B)", *(TASK_LABEL[t] for t in PAPER_TASKS), "Avg", "Δ Avg vs QKV (pts)"]
    rows = []
    for name, vals in table.values.items():
        cells = [f"{vals[t]:.2f}" if t in vals else "not found" for t in PAPER_TASKS]
        avg = vals.get("avg")
        delta = "" if name == "QKV" or avg is None or base is None else f"{avg - base:+.2f}"
        rows.append([name, *cells, f"{avg:.2f}" if avg is not None else "-", delta])
    return markdown_table(header, rows)


def downstream_section(
    rows: Iterable[dict[str, Any]], *, heading: str = "## Downstream accuracy (lm-evaluation-harness)"
) -> tuple[list[str], list[dict[str, Any]]]:
    """Markdown lines and JSON records for every harness row in ``rows``; nothing when there are none."""
    grouped = collect(rows)
    if not grouped:
        return [], []
    lines = [
        heading,
        "",
        "Rows written by `qkvlab eval harness RUN --study DIR` (lm-eval's own prompts and metrics on the staged "
        "task files; docs/harness.md). Accuracy in points (%), ± lm-eval's standard error; Avg is the mean of "
        "the five multiple-choice tasks, as the paper's; Δ Avg is against the QKV run of the same model, token "
        "budget and seed, and its ± combines both standard errors as if independent (both score the same "
        "items, so it overstates the noise). Chance: "
        + ", ".join(f"{TASK_LABEL[t]} {100 * CHANCE[t]:.0f}" for t in PAPER_TASKS)
        + ". At these sizes the multiple-choice accuracies sit near chance; LAMBADA (accuracy and perplexity "
        "of the last word) carries more of the signal.",
        "",
    ]
    records: list[dict[str, Any]] = []
    for (shots, limit), runs in sorted(grouped.items(), key=lambda kv: (kv[0][0], kv[0][1] is not None, kv[0][1])):
        title = f"### {shots}-shot" + (f", first {limit} items of each task" if limit is not None else ", every item")
        lines += [title, ""]
        summaries = {k: run_summary(m) for k, m in runs.items()}
        header = [
            "Run",
            "Variant",
            "Model",
            "Seed",
            *(TASK_LABEL[t] for t in PAPER_TASKS),
            "Avg",
            "Δ Avg vs QKV",
            "LAMBADA acc",
            "LAMBADA ppl",
        ]
        table_rows = []
        for key in sorted(summaries, key=_run_order):
            s = summaries[key]
            base = _baseline(summaries, key) if key[1] != "QKV" else None
            delta = delta_se = None
            if base is not None and s["avg"] is not None and base["avg"] is not None:
                delta = s["avg"] - base["avg"]
                if s["avg_stderr"] is not None and base["avg_stderr"] is not None:
                    delta_se = math.hypot(s["avg_stderr"], base["avg_stderr"])
            ppl = s["lambada_ppl"]
            cells = [
                f"`{key[0]}`",
                key[1],
                str(key[2] if key[2] is not None else "-"),
                str(s["seed"] if s["seed"] is not None else "-"),
                *(points(s["acc"][t], s["acc_stderr"][t]) for t in PAPER_TASKS),
                points(s["avg"], s["avg_stderr"]),
                points(delta, delta_se, signed=True) if delta is not None else "",
                points(s["lambada_acc"], s["lambada_acc_stderr"]),
                "-" if ppl is None else f"{ppl:.4g}",
            ]
            table_rows.append(cells)
            records.append(
                {
                    "num_fewshot": shots,
                    "limit": limit,
                    "run": key[0],
                    "variant": key[1],
                    "model": key[2],
                    "tokens": key[3],
                    **s,
                    "avg_change_vs_qkv": delta,
                    "avg_change_stderr": delta_se,
                }
            )
        lines += [*markdown_table(header, table_rows), ""]
    lines += [
        f"Beside them, the paper's {PAPER_TABLES[PAPER_TABLE].title} ({PAPER_TABLES[PAPER_TABLE].source}). Its "
        "models are 1.2B parameters on SlimPajama, so compare the changes against QKV, not the levels; the paper "
        "groups 8 heads per key at that size.",
        "",
        *_paper_lines(),
        "",
    ]
    return lines, records
