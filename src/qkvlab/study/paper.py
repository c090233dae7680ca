"""The paper's published numbers, set beside ours in reports: data, never results of this code.

They live in ``paper_tables.json`` beside this module (shipped as package data), one entry
per table: a title, where in ``PAPER.md`` the numbers are quoted from, the metric, the config
key whose values are the columns (``task.kind`` for Table 2) and ``values[variant][column]``
with the variant in the paper's notation. A sweep file names a table with ``paper_table``.

Example::

    from qkvlab.study.paper import PAPER_TABLES

    PAPER_TABLES["table4"].values["Q-K=V"]["val_ppl"]   # 5.27, as the paper prints it
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources

DATA_FILE = "paper_tables.json"


@dataclass(frozen=True)
class PaperTable:
    """Published reference numbers (not results): ``values[variant paper name][group value]``."""

    title: str
    source: str
    metric: str
    group_by: str
    values: dict[str, dict[str, float]]


def load_paper_tables() -> dict[str, PaperTable]:
    """The tables of ``paper_tables.json``, in the file's order."""
    text = resources.files(__package__).joinpath(DATA_FILE).read_text(encoding="utf-8")
    return {name: PaperTable(**fields) for name, fields in json.loads(text).items()}


#: The paper's own numbers, quoted to set ours beside them. Never results of this code.
PAPER_TABLES: dict[str, PaperTable] = load_paper_tables()
