"""The metrics a study can compare, and how each one reads.

A sweep file's ``metric`` and a report's tables name one of :data:`METRICS`; the direction
says which way is better and ``change`` how a variant's change against QKV is shown.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Metric:
    """A metric a study can compare: its column label, its direction and how change vs QKV is shown."""

    key: str
    label: str
    higher_is_better: bool
    change: str  # "points" (difference x 100, for rates in [0, 1]) or "relative" (ratio - 1, in %)


METRICS: dict[str, Metric] = {
    m.key: m
    for m in (
        Metric("val_ppl", "Val PPL", False, "relative"),
        Metric("val_loss", "Val loss", False, "relative"),
        Metric("val_acc", "Val acc", True, "points"),
        Metric("val_seq_acc", "Val sequence acc", True, "points"),
        Metric("val_auroc", "Val AUROC", True, "points"),
    )
}
