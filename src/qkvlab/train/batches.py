"""Batches for the trainer, and the masked cross-entropy that every token-labelling task uses.

A corpus is one 1-D array of token ids: documents packed end to end with an end-of-text
separator, so every window is full and nothing needs padding. A training window of
``seq_len + 1`` tokens gives the inputs ``x = w[:-1]`` and the targets ``y = w[1:]``.

Sampling is a pure function of ``(seed, position)``: the windows ``[i*T, i*T + T + 1)``
are visited in a fresh random order every epoch (each window once per epoch), and global
batch ``k`` is positions ``k*G .. k*G + G - 1`` of that stream (``G`` = global batch size).
Rank ``r`` of ``W`` takes the ``r``-th contiguous slice of ``G / W`` windows, so ``W``
processes together see exactly the batch that one process with batch ``G`` sees, and the
state to resume is one integer. :class:`ExampleBatches` samples a fixed set of examples (the
synthetic, vision and anomaly tasks) the same way; both are :class:`StreamBatches`.

Example::

    batches = PackedBatches(tokens, batch_size=8, seq_len=128, seed=0)
    x, y = batches.next()                          # (8, 128) int64 each
    state = batches.state_dict()                   # {"batch": 1, ...}
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from qkvlab.errors import ConfigError

IGNORE_INDEX = -100
"""Target value that the loss skips (PyTorch's default ``ignore_index``)."""


class EpochStream:
    """An endless stream over ``n`` items that visits them in a fresh random order every epoch.

    Position ``p`` holds item ``order(p // n)[p % n]``, where the order of epoch ``e`` is a
    permutation drawn from ``(seed, e)`` alone: a pure function of the position, so a sampler
    built on it resumes from one integer. Both the packed LM windows and the example-based
    tasks sample through it.
    """

    def __init__(self, n: int, seed: int):
        self.n, self.seed = n, seed
        self._epoch, self._order = -1, np.empty(0, dtype=np.int64)

    def order(self, epoch: int) -> np.ndarray:
        """The permutation of epoch ``epoch`` (the latest one is kept)."""
        if epoch != self._epoch:
            self._order = np.random.default_rng([self.seed, epoch]).permutation(self.n)
            self._epoch = epoch
        return self._order

    def items(self, start: int, count: int) -> np.ndarray:
        """The items at stream positions ``start .. start + count - 1`` (across epochs)."""
        out = np.empty(count, dtype=np.int64)
        done = 0
        while done < count:
            epoch, offset = divmod(start + done, self.n)
            take = min(count - done, self.n - offset)
            out[done : done + take] = self.order(epoch)[offset : offset + take]
            done += take
        return out


def _check_tokens(tokens: np.ndarray, seq_len: int, what: str) -> int:
    """Number of full ``seq_len + 1`` windows in ``tokens``; a clear error when there are none."""
    if tokens.ndim != 1:
        raise ConfigError(f"The {what} tokens must be a 1-D array of ids, got shape {tuple(tokens.shape)}.")
    if seq_len < 1:
        raise ConfigError(f"seq_len must be >= 1, got {seq_len}.")
    n_windows = (len(tokens) - 1) // seq_len
    if n_windows < 1:
        raise ConfigError(
            f"The {what} split has {len(tokens)} tokens, too few for one window of seq_len={seq_len} "
            f"(needs {seq_len + 1}); use a larger corpus or a shorter seq_len."
        )
    return n_windows


def _gather(tokens: np.ndarray, starts: np.ndarray, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Windows starting at ``starts`` as ``(x, y)``, each ``(len(starts), seq_len)`` int64."""
    idx = starts[:, None] + np.arange(seq_len + 1)[None, :]
    w = torch.from_numpy(np.asarray(tokens[idx], dtype=np.int64))
    return w[:, :-1].contiguous(), w[:, 1:].contiguous()


class StreamBatches:
    """Rank ``rank``'s share of global batches drawn from an :class:`EpochStream` of ``n`` items.

    Global batch ``k`` is stream positions ``k*G .. k*G + G - 1`` (``G = batch_size *
    world_size``; a batch may straddle two epochs) and rank ``r`` takes the ``r``-th contiguous
    slice of ``batch_size``. The whole resumable state is ``batch``, the number of global
    batches consumed; :meth:`state_dict` adds what identifies the stream (:meth:`identity`), so
    a resume on other data or another batch shape is refused. Subclasses turn the item indices
    of :meth:`take` into tensors.
    """

    #: What a resume must keep the same, for the error message.
    keep_same = "the same data, seed and global batch size"

    def __init__(self, n: int, batch_size: int, *, seed: int = 0, rank: int = 0, world_size: int = 1):
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}.")
        if not 0 <= rank < world_size:
            raise ConfigError(f"rank must be in [0, world_size={world_size}), got {rank}.")
        self.n = n
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.global_batch = batch_size * world_size
        self.batch = 0  # global batches consumed so far: the whole resumable state
        self._stream = EpochStream(n, seed)

    @property
    def epoch(self) -> float:
        """Passes over the items so far (fractional)."""
        return self.batch * self.global_batch / self.n

    def take(self) -> np.ndarray:
        """The item indices of this rank's slice of the next global batch."""
        items = self._stream.items(self.batch * self.global_batch + self.rank * self.batch_size, self.batch_size)
        self.batch += 1
        return items

    def identity(self) -> dict[str, int]:
        """What the stream is drawn from, besides seed and global batch size (subclasses)."""
        return {}

    # ------------------------------------------------------------ resume
    def state_dict(self) -> dict[str, int]:
        """Position and sampling identity; world size is not part of it (batches are global)."""
        return {"batch": self.batch, "seed": self.seed, "global_batch": self.global_batch, **self.identity()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state``; refuse a state taken on other data or another batch shape."""
        mine = self.state_dict()
        differs = [k for k in mine if k != "batch" and k in state and int(state[k]) != mine[k]]
        if differs:
            detail = ", ".join(f"{k}: saved {state[k]} vs now {mine[k]}" for k in differs)
            raise ConfigError(
                f"The saved batch stream does not match this run ({detail}); resume with {self.keep_same} "
                "it was saved with."
            )
        self.batch = int(state["batch"])

    def __iter__(self) -> Iterator[Any]:
        while True:
            yield self.next()

    def next(self) -> Any:
        raise NotImplementedError


class PackedBatches(StreamBatches):
    """Deterministic, resumable, rank-sharded batches of ``(x, y)`` windows from packed tokens.

    Args:
        tokens: 1-D array of token ids (a ``np.memmap`` works; only the windows are read).
        batch_size: windows per call of :meth:`next` on *this* rank.
        seq_len: tokens per window (inputs); each window reads ``seq_len + 1`` tokens.
        seed: the order of windows in epoch ``e`` is a permutation drawn from ``(seed, e)``.
        rank, world_size: this process's share of each global batch of
            ``batch_size * world_size`` windows.
    """

    keep_same = "the same data, seed, global batch size and seq_len"

    def __init__(
        self,
        tokens: np.ndarray,
        batch_size: int,
        seq_len: int,
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ):
        self.tokens = tokens
        self.seq_len = seq_len
        self.n_windows = _check_tokens(tokens, seq_len, "training")
        super().__init__(self.n_windows, batch_size, seed=seed, rank=rank, world_size=world_size)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's slice of the next global batch: ``x, y`` of shape ``(batch_size, seq_len)``."""
        return _gather(self.tokens, self.take() * self.seq_len, self.seq_len)

    def identity(self) -> dict[str, int]:
        return {"seq_len": self.seq_len, "n_tokens": len(self.tokens)}


class ExampleBatches(StreamBatches):
    """Deterministic, resumable, rank-sharded batches ``(x[idx], y[idx])`` from a fixed set of
    examples (arrays of the same length), visited in a fresh random order each epoch."""

    keep_same = "the same training set, seed and global batch size"

    def __init__(
        self, x: np.ndarray, y: np.ndarray, batch_size: int, *, seed: int = 0, rank: int = 0, world_size: int = 1
    ):
        self.x, self.y = x, y
        super().__init__(len(x), batch_size, seed=seed, rank=rank, world_size=world_size)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        idx = self.take()
        return torch.from_numpy(self.x[idx]), torch.from_numpy(self.y[idx])

    def identity(self) -> dict[str, int]:
        return {"n_examples": self.n}


def epoch_budget(config: Any, *, epochs: float | None, n_examples: int, count_per_step: int) -> int:
    """Optimizer steps of an example-based task: ``epochs`` passes over ``n_examples`` when set,
    else ``max_tokens`` counted in the task's units (``count_per_step`` a step), else ``max_steps``."""
    if epochs is not None:
        return max(1, math.ceil(epochs * n_examples / (config.batch_size * config.grad_accum)))
    if config.max_tokens is not None:
        return max(1, math.ceil(config.max_tokens / count_per_step))
    return config.max_steps


def eval_windows(
    tokens: np.ndarray,
    batch_size: int,
    seq_len: int,
    *,
    max_windows: int | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Fixed, non-overlapping windows over ``tokens`` in order, as batches of ``(x, y)``.

    The first ``max_windows`` windows (all by default), rounded down to a multiple of
    ``world_size``, are split into equal contiguous shares, one per rank, so every rank runs
    the same number of forward passes (FSDP needs that) and the ranks together score every
    chosen window once. Each rank yields batches of at most ``batch_size`` windows.
    """
    n = _check_tokens(tokens, seq_len, "validation")
    if max_windows is not None:
        n = min(n, max_windows)
    share = n // world_size
    if share < 1:
        raise ConfigError(
            f"The validation split has {n} window(s) of seq_len={seq_len}, fewer than the {world_size} "
            "processes; use more validation data (data.val_fraction) or a shorter seq_len."
        )
    first = rank * share
    for lo in range(first, first + share, batch_size):
        hi = min(lo + batch_size, first + share)
        yield _gather(tokens, np.arange(lo, hi, dtype=np.int64) * seq_len, seq_len)


def mask_padding(targets: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``targets`` with every position where ``keep`` is False set to :data:`IGNORE_INDEX`.

    ``keep`` is a bool tensor of the targets' shape, True for real (scored) tokens; for
    right-padded sequences of lengths ``L_b`` it is ``arange(T) < L_b - 1`` on the targets.
    """
    if keep.shape != targets.shape or keep.dtype != torch.bool:
        raise ConfigError(
            f"keep must be a bool tensor of the targets' shape {tuple(targets.shape)}, "
            f"got {keep.dtype} {tuple(keep.shape)}."
        )
    return targets.masked_fill(~keep, IGNORE_INDEX)


def lm_loss(logits: torch.Tensor, targets: torch.Tensor, *, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of ``logits`` ``(B, T, V)`` against ``targets`` ``(B, T)``, in fp32.

    Targets equal to :data:`IGNORE_INDEX` (padding, unlabelled positions) are not scored: the
    mean is over the scored tokens only. ``reduction="sum"`` gives the summed loss (for token-weighted evals).
    """
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(),
        targets.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction=reduction,
    )
