"""What every report's tables are made of: statistics over rows, the order of variants, cells
and markdown tables.

The variant report (:mod:`qkvlab.study.report`), the scaling ladder (:mod:`qkvlab.study.ladder`)
and the attention-map figure (:mod:`qkvlab.analysis.runner`) share these, so a variant is
named, ordered and formatted the same everywhere.

Example::

    from qkvlab.study.tables import fmt_mean_std, markdown_table, mean_std

    stat = mean_std([3.1, 3.3, None])              # (3.2, 0.1414..., 2)
    markdown_table(["Variant", "Val loss"], [["QKV", fmt_mean_std(stat, 2)]])
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Sequence
from typing import Any

from qkvlab.attention.variant import PAPER_LM_VARIANTS, VariantSpec
from qkvlab.errors import ConfigError
from qkvlab.study.paper import PAPER_TABLES


# ================================================================== statistics
def mean_std(values: Iterable[float | None]) -> tuple[float | None, float | None, int]:
    """(mean, sample standard deviation, n) of the values that are not None; std is None for n < 2."""
    xs = [float(v) for v in values if v is not None]
    if not xs:
        return None, None, 0
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else None), len(xs)


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats: larger x (cache reduction) and smaller y (PPL change)."""
    front = []
    for i, (xi, yi) in enumerate(points):
        dominated = any((xj >= xi and yj <= yi) and (xj > xi or yj < yi) for j, (xj, yj) in enumerate(points) if j != i)
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: points[i][0])


# ================================================================== variants
def is_baseline(variant_id: str) -> bool:
    """QKV: three projections, one KV head per query head, softmax, no 2D fix or QK-norm."""
    spec = VariantSpec.parse(variant_id)
    return (
        spec.sharing == "q_k_v" and spec.n_kv_heads is None and not spec.pos2d and not spec.qk_norm and not spec.linear
    )


def variant_label(variant_id: str) -> str:
    """The paper's name of a variant; an id this code cannot parse as it is."""
    try:
        return VariantSpec.parse(variant_id).paper_name
    except (ConfigError, ValueError):
        return variant_id


def is_qkv(variant_id: str) -> bool:
    try:
        return is_baseline(variant_id)
    except (ConfigError, ValueError):
        return variant_id == "QKV"


def variant_order(variant_id: str) -> tuple[int, str]:
    """Sort key: QKV first, then the paper's Table 4 order, then the rest by id."""
    if is_qkv(variant_id):
        return (-1, variant_id)
    name = variant_label(variant_id)
    return (PAPER_LM_VARIANTS.index(name) if name in PAPER_LM_VARIANTS else len(PAPER_LM_VARIANTS), variant_id)


def table2_order(variant_id: str) -> tuple[int, int, str]:
    """Sort key: QKV first, then the paper's Table 2 rows, then the Table 4 order, then the rest."""
    name = variant_label(variant_id)
    table2 = list(PAPER_TABLES["table2"].values)
    rank = table2.index(name) if name in table2 else len(table2)
    return (-1 if is_qkv(variant_id) else rank, *variant_order(variant_id))


# ================================================================== cells
def fmt_mean_std(stat: tuple[float | None, float | None, int], digits: int) -> str:
    mean, std, _ = stat
    if mean is None:
        return "n/a"
    return f"{mean:.{digits}f}" if std is None else f"{mean:.{digits}f} ± {std:.{digits}f}"


def fmt_pct(x: float | None, *, signed: bool = True, digits: int = 2) -> str:
    if x is None:
        return "n/a"
    return f"{x * 100:+.{digits}f}%" if signed else f"{x * 100:.{digits}f}%"


def fmt_count(n: float | None) -> str:
    """1234567 -> ``1.23M``; 40960 -> ``41.0k``."""
    if n is None:
        return "n/a"
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{suffix}" if suffix != "k" else f"{n / scale:.1f}k"
    return f"{n:g}"


def fmt_bytes(n: float | None) -> str:
    """Bytes in binary units: 2684354560 -> ``2.50 GiB``."""
    if n is None:
        return "n/a"
    for scale, unit in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def fmt_rate(x: float | None) -> str:
    return "n/a" if x is None else f"{x:,.0f}"


def commits(rows: Iterable[dict[str, Any]]) -> str:
    """The code the runs came from: each commit (12 digits, uncommitted changes said) and its run count."""
    counts: dict[str, int] = {}
    for row in rows:
        commit = row.get("git_commit")
        key = f"`{commit[:12]}`" if commit else "unknown"
        if commit and row.get("git_dirty"):
            key += " + uncommitted changes"
        counts[key] = counts.get(key, 0) + 1
    return ", ".join(f"{k} ({n} run{'s' if n != 1 else ''})" for k, n in counts.items()) or "none"


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return lines
