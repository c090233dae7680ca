"""The staged benchmark files, read offline and converted to the fields lm-eval's tasks expect.

Each shipped task (``tasks/*.yaml`` beside this file) names one of the loaders below as its
``custom_dataset``. A loader finds its file under the data root, converts every item to the
layout of the Hugging Face dataset that lm-eval's upstream task reads, and returns a
``datasets.DatasetDict`` with the one split we have. The task's own prompt, preprocessing and
metrics then run unchanged. The conversions, item by item:

HellaSwag (``hellaswag/hellaswag_val_full.txt.bz2``, 6 lines per item)
    Line 1 is ``activity_label + ": " + ctx`` after a clean-up close to lm-eval's; lines 2-6
    the gold index and the four endings. The split of ``ctx`` into ``ctx_a`` / ``ctx_b`` is
    lost, and lm-eval capitalises ``ctx_b``. We take ``ctx_b`` to be the trailing fragment
    after the last sentence end when it starts with a lower-case letter (ActivityNet items:
    "... grabs the pole. the lady"), else empty. lm-eval's own ``process_docs`` (applied by
    the loader) then builds the query, choices and gold exactly as upstream.
PIQA (``piqa/piqa.jsonl``)
    ``query`` is ``"Question: <goal>\\n"``: ``goal`` is recovered, ``choices`` become
    ``sol1`` / ``sol2``, ``gold`` the ``label``.
ARC-Easy / ARC-Challenge (``arc/arc_{easy,challenge}.jsonl``)
    ``query`` is ``"Question: <question>"``; choices get the letters A, B, C, ... and
    ``answerKey`` the gold letter.
WinoGrande (``winogrande/winogrande.jsonl``)
    Stored in partial-evaluation form: both sentence prefixes with the option filled in,
    and the rest of the sentence. We rebuild ``sentence`` with a ``_`` blank and
    ``option1`` / ``option2`` so that lm-eval's functions give back exactly these prefixes
    and continuation (where the options share leading words, the shared words stay in the
    sentence; the scored strings are the same).
LAMBADA (OpenAI) (``lambada/lambada_openai.jsonl``)
    ``context`` and ``continuation`` are joined back into ``text`` with the space that
    lm-eval splits on (one item's continuation starts with a line break: no space then).

Data root: the ``data_root`` argument (``--data-root``, or ``data_root`` in lm-eval's
``--metadata`` / ``--model_args``), else ``$QKVLAB_DATA``, else ``../shared/data`` from the
working directory, else ``shared/data`` beside the qkvlab checkout.
"""

from __future__ import annotations

import bz2
import hashlib
import json
import os
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from qkvlab.errors import ConfigError

DATA_ENV = "QKVLAB_DATA"
TASK_DIR = Path(__file__).resolve().parent / "tasks"
_CHECKOUT = Path(__file__).resolve().parents[3]  # src/qkvlab/harness/data.py -> the checkout


@dataclass(frozen=True)
class TaskSpec:
    """One shipped task: its short name, its name in lm-eval, its data file and split."""

    name: str
    harness_name: str
    file: str
    split: str
    title: str


TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        TaskSpec("arc_easy", "qkvlab_arc_easy", "arc/arc_easy.jsonl", "test", "ARC-Easy"),
        TaskSpec("arc_challenge", "qkvlab_arc_challenge", "arc/arc_challenge.jsonl", "test", "ARC-Challenge"),
        TaskSpec("hellaswag", "qkvlab_hellaswag", "hellaswag/hellaswag_val_full.txt.bz2", "validation", "HellaSwag"),
        TaskSpec("piqa", "qkvlab_piqa", "piqa/piqa.jsonl", "validation", "PIQA"),
        TaskSpec("winogrande", "qkvlab_winogrande", "winogrande/winogrande.jsonl", "validation", "WinoGrande"),
        TaskSpec("lambada_openai", "qkvlab_lambada_openai", "lambada/lambada_openai.jsonl", "test", "LAMBADA (OpenAI)"),
    )
}
#: The paper's downstream set (Table 11), in its order.
PAPER_TASKS = ("arc_easy", "arc_challenge", "hellaswag", "piqa", "winogrande")


def resolve_tasks(names: str | list[str] | None) -> list[TaskSpec]:
    """Task specs from short names or lm-eval names (comma-separated allowed); ``all`` or
    None means every shipped task, ``paper`` the paper's five. A blank string is refused: it is
    an empty shell variable far more often than a wish for hours of every task."""
    if isinstance(names, str) and not names.replace(",", "").strip():
        raise ConfigError(f"--tasks {names!r} names no task; pass task names, 'paper' or 'all'.")
    items: list[str] = []
    for part in [names] if isinstance(names, str) else names or ["all"]:
        items.extend(p.strip() for p in str(part).split(",") if p.strip())
    by_harness = {s.harness_name: s for s in TASKS.values()}
    out: list[TaskSpec] = []
    for item in items or ["all"]:
        if item == "all":
            picked = list(TASKS.values())
        elif item == "paper":
            picked = [TASKS[n] for n in PAPER_TASKS]
        elif item in TASKS or item in by_harness:
            picked = [TASKS.get(item) or by_harness[item]]
        else:
            raise ConfigError(
                f"Unknown task {item!r}; use one of {', '.join(TASKS)}, 'paper' (the paper's five) or 'all'."
            )
        out.extend(s for s in picked if s not in out)
    return out


def data_roots(data_root: str | os.PathLike | None = None) -> list[Path]:
    """Folders searched for the staged files, in order (an explicit root is the only one)."""
    if data_root is not None and str(data_root) != "":
        return [Path(data_root).expanduser()]
    roots = []
    if os.environ.get(DATA_ENV):
        roots.append(Path(os.environ[DATA_ENV]).expanduser())
    roots += [Path.cwd().parent / "shared" / "data", _CHECKOUT.parent / "shared" / "data"]
    return list(dict.fromkeys(r.resolve() for r in roots))


def find_data_file(spec: TaskSpec, data_root: str | os.PathLike | None = None) -> Path:
    """The staged file of ``spec``; a :class:`ConfigError` saying where it looked otherwise."""
    tried = [root / spec.file for root in data_roots(data_root)]
    for path in tried:
        if path.is_file():
            return path
    looked = ", ".join(str(p) for p in tried)
    how = "pass --data-root DIR" if data_root is None else "check --data-root"
    raise ConfigError(
        f"Data file for task {spec.name!r} not found; looked for {looked}. {how} (a folder holding "
        f"{spec.file}) or set {DATA_ENV}."
    )


@cache
def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ================================================================== readers
def _jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ConfigError(f"{str(path)!r} line {number} is not JSON ({e.msg}); restore the file.") from None
    return rows


def _field(path: Path, i: int, row: dict[str, Any], key: str) -> Any:
    if key not in row:
        raise ConfigError(f"{str(path)!r} item {i} has no {key!r} field (keys: {sorted(row)}); restore the file.")
    return row[key]


# A sentence end followed by the lower-case start of the fragment the endings continue.
_TRAILING_FRAGMENT = re.compile(r"^(.*[.!?])\s+([a-z][^.!?]*)$", re.DOTALL)


def split_hellaswag_context(ctx: str) -> tuple[str, str]:
    """``(ctx_a, ctx_b)`` from the joined context: ``ctx_b`` is a trailing lower-case fragment."""
    m = _TRAILING_FRAGMENT.match(ctx)
    return (m.group(1), m.group(2)) if m else (ctx, "")


def hellaswag_items(lines: list[str], source: str = "hellaswag") -> list[dict[str, Any]]:
    """HellaSwag items in the Hugging Face layout from the 6-line text form."""
    while lines and not lines[-1].strip():
        lines = lines[:-1]
    if len(lines) % 6:
        raise ConfigError(
            f"{source!r} has {len(lines)} lines, not a multiple of 6 (context, label, 4 endings); restore the file."
        )
    items = []
    for i in range(0, len(lines), 6):
        head, label, *endings = lines[i : i + 6]
        if label.strip() not in ("0", "1", "2", "3"):
            raise ConfigError(f"{source!r} item {i // 6}: label line {label!r} is not 0-3; restore the file.")
        activity, sep, ctx = head.partition(": ")
        if not sep:  # no activity label: lm-eval's query would still start with ": "
            activity, ctx = "", head
        ctx_a, ctx_b = split_hellaswag_context(ctx)
        items.append(
            {
                "ind": i // 6,
                "activity_label": activity,
                "ctx_a": ctx_a,
                "ctx_b": ctx_b,
                "ctx": ctx,
                "endings": endings,
                "label": label.strip(),  # a string, as in the Hugging Face dataset
            }
        )
    return items


def piqa_items(rows: list[dict[str, Any]], source: str = "piqa") -> list[dict[str, Any]]:
    items = []
    for i, row in enumerate(rows):
        query, choices = _field(Path(source), i, row, "query"), _field(Path(source), i, row, "choices")
        if len(choices) != 2:
            raise ConfigError(f"{source!r} item {i} has {len(choices)} choices, PIQA has 2; restore the file.")
        goal = query.removeprefix("Question: ").removesuffix("\n")
        items.append({"goal": goal, "sol1": choices[0], "sol2": choices[1], "label": int(row["gold"])})
    return items


def arc_items(rows: list[dict[str, Any]], source: str = "arc") -> list[dict[str, Any]]:
    items = []
    for i, row in enumerate(rows):
        query, choices = _field(Path(source), i, row, "query"), _field(Path(source), i, row, "choices")
        gold = int(_field(Path(source), i, row, "gold"))
        letters = [chr(ord("A") + k) for k in range(len(choices))]
        if not 0 <= gold < len(choices):
            raise ConfigError(f"{source!r} item {i}: gold {gold} is not a choice index; restore the file.")
        items.append(
            {
                "id": str(i),
                "question": query.removeprefix("Question: "),
                "choices": {"text": list(choices), "label": letters},
                "answerKey": letters[gold],
            }
        )
    return items


def winogrande_items(rows: list[dict[str, Any]], source: str = "winogrande") -> list[dict[str, Any]]:
    items = []
    for i, row in enumerate(rows):
        options = _field(Path(source), i, row, "context_options")
        rest = _field(Path(source), i, row, "continuation")
        if len(options) != 2:
            raise ConfigError(f"{source!r} item {i} has {len(options)} options, WinoGrande has 2; restore the file.")
        first, second = options
        same = min(len(first), len(second))  # length of the shared start
        same = next((k for k in range(same) if first[k] != second[k]), same)
        # Cut the shared characters back to a word boundary so each option is whole words.
        cut = max(first.rfind(" ", 0, same), first.rfind("\n", 0, same)) + 1
        prefix = first[:cut]
        items.append(
            {
                "sentence": f"{prefix}_ {rest}",
                "option1": options[0][cut:],
                "option2": options[1][cut:],
                "answer": str(int(row["gold"]) + 1),
            }
        )
    return items


def lambada_items(rows: list[dict[str, Any]], source: str = "lambada") -> list[dict[str, Any]]:
    items = []
    for i, row in enumerate(rows):
        context, word = _field(Path(source), i, row, "context"), _field(Path(source), i, row, "continuation")
        items.append({"text": context + (word if word[:1].isspace() else " " + word)})
    return items


def read_items(spec: TaskSpec, path: Path) -> list[dict[str, Any]]:
    """Every item of ``spec``'s staged file in the layout of lm-eval's upstream dataset."""
    try:
        if spec.name == "hellaswag":
            with bz2.open(path, "rt", encoding="utf-8") as f:
                return hellaswag_items(f.read().split("\n"), str(path))
        rows = _jsonl(path)
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise ConfigError(f"Cannot read {str(path)!r}: {e}. Restore the file from shared/data.") from None
    convert = {"piqa": piqa_items, "winogrande": winogrande_items, "lambada_openai": lambada_items}
    return convert.get(spec.name, arc_items)(rows, str(path))


def load_dataset(name: str, data_root: str | os.PathLike | None = None):
    """A ``datasets.DatasetDict`` with the one split of task ``name``, built in memory."""
    import datasets

    spec = TASKS[name]
    docs = datasets.Dataset.from_list(read_items(spec, find_data_file(spec, data_root)))
    if name == "hellaswag":
        # lm-eval's own preprocessing, applied here once: as a task's process_docs it would rerun on
        # every access to the split, and an in-memory dataset has no cache to make that cheap.
        from lm_eval.tasks.hellaswag.utils import process_docs

        docs = process_docs(docs)
    return datasets.DatasetDict({spec.split: docs})


# ================================================================== task hooks
# The tasks' ``custom_dataset`` entries. lm-eval calls them with the task metadata (and,
# from its command line, the model arguments) as keywords; only ``data_root`` is read.
def hellaswag(data_root: str | None = None, **_: Any):
    return load_dataset("hellaswag", data_root)


def piqa(data_root: str | None = None, **_: Any):
    return load_dataset("piqa", data_root)


def arc_easy(data_root: str | None = None, **_: Any):
    return load_dataset("arc_easy", data_root)


def arc_challenge(data_root: str | None = None, **_: Any):
    return load_dataset("arc_challenge", data_root)


def winogrande(data_root: str | None = None, **_: Any):
    return load_dataset("winogrande", data_root)


def lambada_openai(data_root: str | None = None, **_: Any):
    return load_dataset("lambada_openai", data_root)
