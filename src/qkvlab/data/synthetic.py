"""Synthetic sequence tasks: the paper's five digit-list tasks and three directional probes.

Every task maps an input of ``seq_len`` token ids to a target of the same length; a position
with nothing to predict has the target :data:`IGNORE_INDEX` (-100) and is never scored.
All tasks share one encoder vocabulary of :data:`VOCAB_SIZE` ids, and every target is a digit
(:data:`N_LABELS` classes):

====== =============================================================
id      token
====== =============================================================
0..9    the digits
10      ``SEP``: separates a probe's context from its query
11      ``PAD``: filler where a probe's layout leaves a position empty
====== =============================================================

The paper's tasks (PAPER.md 2.1, Table 2): fixed-length lists of digits 0-9, every position
scored.

* ``reverse``: the list reversed (mirrored-position routing, anti-diagonal attention).
* ``sort``: the list sorted ascending (content-dependent routing).
* ``sub``: each digit x -> 9 - x (per position, diagonal attention).
* ``swap``: first and second halves exchanged (fixed-offset routing; even ``seq_len`` only).
* ``copy``: the list itself (per position).

Directional probes (ours): each needs "position i reads position j" to differ from
"j reads i", which a symmetric score map (Q = K) cannot express directly.

* ``shift``: output i is input i-1, a strict one-step shift (position 0 is not scored).
* ``successor``: context digits, ``SEP``, a query digit q; the last position must output the
  digit that follows the first occurrence of q in the context (only that position is scored).
* ``recall``: key/value digit pairs under a per-example mapping, ``SEP``, a query key; the last
  position must output the query's value (only that position is scored; odd lengths start
  with one ``PAD``).

Data sets are a pure function of ``(kind, seq_len, n_train, n_test, seed)``: the training
set is drawn from one numpy stream and the test set from another, then test inputs that also
occur in the training set (or twice in the test set) are dropped and redrawn, so **train and
test inputs are disjoint** and the test set does not depend on ``n_train`` except for those
drops. Duplicate inputs inside the training set are allowed (they are rare beyond 6 digits).

Example::

    data = make_dataset("reverse", seq_len=16, n_train=10_000, n_test=2_000, seed=0)
    data.train_x.shape, data.train_y.shape            # (10000, 16) int64 each
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np

from qkvlab.errors import ConfigError

IGNORE_INDEX = -100  # the target the loss skips (qkvlab.train.batches.IGNORE_INDEX)
N_DIGITS = 10
SEP = 10
PAD = 11
VOCAB_SIZE = 12
N_LABELS = N_DIGITS

#: The paper's five tasks, in the column order of its Table 2.
PAPER_TASKS = ("reverse", "sort", "sub", "swap", "copy")
#: Directional probes that separate symmetric from asymmetric attention more sharply.
PROBES = ("shift", "successor", "recall")
TASKS = PAPER_TASKS + PROBES

#: One line per task (shown in reports and error messages).
DESCRIPTIONS = {
    "reverse": "the list reversed",
    "sort": "the list sorted ascending",
    "sub": "each digit x -> 9 - x",
    "swap": "first and second halves exchanged",
    "copy": "the list itself",
    "shift": "output i = input i-1 (a strict shift; position 0 unscored)",
    "successor": "the digit after the first occurrence of the query digit (last position only)",
    "recall": "the value of the query key among key/value pairs (last position only)",
}

#: Shortest valid ``seq_len`` per task.
MIN_LEN = {"reverse": 1, "sort": 1, "sub": 1, "swap": 2, "copy": 1, "shift": 2, "successor": 4, "recall": 4}


def check_task(kind: str, seq_len: int) -> None:
    """Raise :class:`ConfigError` unless ``kind`` is a task and ``seq_len`` suits it."""
    if kind not in TASKS:
        raise ConfigError(
            f"Unknown synthetic task {kind!r}; use one of {', '.join(TASKS)} (set task.kind to one of them)."
        )
    if isinstance(seq_len, bool) or not isinstance(seq_len, int | np.integer):
        raise ConfigError(f"seq_len of the synthetic task must be an integer, got {seq_len!r}.")
    if seq_len < MIN_LEN[kind]:
        what = {
            "successor": "a context of 2 digits, SEP and the query",
            "recall": "one key/value pair, SEP and the query",
            "shift": "at least one position with a predecessor",
            "swap": "two halves",
        }.get(kind, "one digit")
        raise ConfigError(
            f"seq_len={seq_len} is too short for task {kind!r}, which needs {what}; use seq_len >= {MIN_LEN[kind]}."
        )
    if kind == "swap" and seq_len % 2:
        raise ConfigError(
            f"Task 'swap' exchanges two equal halves, so seq_len must be even; got seq_len={seq_len}. "
            f"Use {seq_len - 1} or {seq_len + 1}."
        )


def scored_positions(kind: str, seq_len: int) -> int:
    """Scored (target) positions per example."""
    check_task(kind, seq_len)
    if kind == "shift":
        return seq_len - 1
    if kind in ("successor", "recall"):
        return 1
    return seq_len


# ================================================================== inputs and targets
def generate_inputs(kind: str, n: int, seq_len: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` random inputs of task ``kind``, shape ``(n, seq_len)`` int64."""
    check_task(kind, seq_len)
    rows = np.arange(n)
    if kind in PAPER_TASKS or kind == "shift":
        return rng.integers(0, N_DIGITS, size=(n, seq_len), dtype=np.int64)
    x = np.empty((n, seq_len), dtype=np.int64)
    x[:, -2] = SEP
    if kind == "successor":
        m = seq_len - 2  # context length
        ctx = rng.integers(0, N_DIGITS, size=(n, m), dtype=np.int64)
        p = rng.integers(0, m - 1, size=n)  # an occurrence with a successor inside the context
        x[:, :m] = ctx
        x[:, -1] = ctx[rows, p]
        return x
    # recall: a random mapping key -> value per example, pairs (k, f(k)), then SEP and a key
    n_pairs, start = (seq_len - 2) // 2, seq_len % 2
    mapping = rng.integers(0, N_DIGITS, size=(n, N_DIGITS), dtype=np.int64)
    keys = rng.integers(0, N_DIGITS, size=(n, n_pairs), dtype=np.int64)
    x[:, :start] = PAD
    x[:, start : seq_len - 2 : 2] = keys
    x[:, start + 1 : seq_len - 2 : 2] = mapping[rows[:, None], keys]
    x[:, -1] = keys[rows, rng.integers(0, n_pairs, size=n)]
    return x


def targets(kind: str, x: np.ndarray) -> np.ndarray:
    """The targets of inputs ``x`` ``(n, seq_len)``: same shape, :data:`IGNORE_INDEX` where unscored."""
    x = np.asarray(x, dtype=np.int64)
    if x.ndim != 2:
        raise ConfigError(f"Inputs must be a (examples, seq_len) array, got shape {x.shape}.")
    n, seq_len = x.shape
    check_task(kind, seq_len)
    if kind == "reverse":
        return x[:, ::-1].copy()
    if kind == "sort":
        return np.sort(x, axis=1)
    if kind == "sub":
        return (N_DIGITS - 1) - x
    if kind == "swap":
        h = seq_len // 2
        return np.concatenate([x[:, h:], x[:, :h]], axis=1)
    if kind == "copy":
        return x.copy()
    y = np.full_like(x, IGNORE_INDEX)
    if kind == "shift":
        y[:, 1:] = x[:, :-1]
        return y
    rows, q = np.arange(n), x[:, -1]
    if kind == "successor":
        match = x[:, : seq_len - 3] == q[:, None]  # occurrences that have a successor in the context
        first = match.argmax(axis=1)
        found = match.any(axis=1)
        y[:, -1] = x[rows, first + 1]
    else:  # recall
        start = seq_len % 2
        keys, values = x[:, start : seq_len - 2 : 2], x[:, start + 1 : seq_len - 2 : 2]
        match = keys == q[:, None]
        found = match.any(axis=1)
        y[:, -1] = values[rows, match.argmax(axis=1)]
    if not found.all():
        bad = int(np.flatnonzero(~found)[0])
        raise ConfigError(f"Input {bad} is not a valid {kind!r} example: its query digit {int(q[bad])} has no match.")
    return y


# ================================================================== data sets
@dataclass
class SyntheticData:
    """A fixed train/test split of one task: inputs ``*_x`` and targets ``*_y``, ``(n, seq_len)`` int64."""

    kind: str
    seq_len: int
    seed: int
    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray

    @property
    def scored_per_example(self) -> int:
        return scored_positions(self.kind, self.seq_len)


def _stream(kind: str, seed: int, split: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), zlib.crc32(kind.encode()), split])


def make_dataset(kind: str, seq_len: int, n_train: int, n_test: int, seed: int = 0) -> SyntheticData:
    """The train and test sets of ``kind`` (see the module docstring for what is fixed by what)."""
    check_task(kind, seq_len)
    for name, value in (("n_train", n_train), ("n_test", n_test)):
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
            raise ConfigError(f"task.{name} must be a positive integer, got {value!r}.")
    train_x = generate_inputs(kind, n_train, seq_len, _stream(kind, seed, 0))
    seen = {row.tobytes() for row in train_x}
    rng = _stream(kind, seed, 1)
    test_rows: list[np.ndarray] = []
    for _ in range(20):
        for row in generate_inputs(kind, n_test, seq_len, rng):
            key = row.tobytes()
            if key not in seen:
                seen.add(key)
                test_rows.append(row)
                if len(test_rows) == n_test:
                    break
        if len(test_rows) == n_test:
            break
    else:
        raise ConfigError(
            f"Task {kind!r} with seq_len={seq_len} has too few distinct inputs for {n_test} test examples "
            f"unseen among {n_train} training ones (found {len(test_rows)}); lower task.n_test or "
            "task.n_train, or raise seq_len."
        )
    test_x = np.stack(test_rows)
    return SyntheticData(kind, seq_len, seed, train_x, targets(kind, train_x), test_x, targets(kind, test_x))
