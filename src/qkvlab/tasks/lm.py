"""The language-model task: next-token prediction on packed token windows of a corpus.

The default task of a train config (``task: {name: lm}``): :func:`load_splits` reads the
``data`` section's corpus (a pre-tokenised ``.npy`` file, or anything :mod:`qkvlab.data`
reads and tokenises), :class:`LMTask` trains on random packed windows and scores validation
loss and perplexity over fixed windows (:func:`evaluate_lm`). Every GPT variant uses it.

Example::

    from qkvlab.tasks.lm import LMTask
    from qkvlab.train import RunContext, load_config

    task = LMTask.from_config(load_config("configs/lm/tiny-stdlib.yaml"), RunContext())
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from qkvlab.errors import ConfigError
from qkvlab.train.batches import IGNORE_INDEX, PackedBatches, eval_windows, lm_loss
from qkvlab.train.context import RunContext
from qkvlab.train.evaluation import evaluate_sums

if TYPE_CHECKING:
    from qkvlab.train.config import DataConfig, TrainConfig

Batch = Any


@dataclass
class LMSplits:
    """Token ids of a corpus: ``train`` and ``val`` 1-D arrays, the vocabulary size, metadata."""

    train: np.ndarray
    val: np.ndarray
    vocab_size: int
    eot_id: int | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, np.ndarray] = field(default_factory=dict)


#: A pre-tokenised file's ids stay below this (the largest vocabularies in use are about 2^18): a
#: stray large id would make the embedding table that many rows.
MAX_TOKEN_ID = 2**22


def load_splits(data: DataConfig) -> LMSplits:
    """Tokens for ``data``: a pre-tokenised ``.npy`` file here, everything else via :mod:`qkvlab.data`."""
    if data.source.endswith(".npy"):
        if data.val_source is not None or data.eval_sources:
            raise ConfigError(
                "data.val_source and data.eval_sources need text corpora to tokenise; with a .npy token file "
                "the validation split is its last data.val_fraction. Remove them, or give a text source."
            )
        path = Path(data.source)
        if not path.is_file():
            raise ConfigError(f"No token file at {data.source!r}; data.source must name an existing .npy file.")
        try:  # never unpickled: an array of Python objects is refused, not built
            tokens = np.load(path, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError, EOFError) as e:
            raise ConfigError(
                f"Cannot read the token file {data.source!r} ({str(e).rstrip('.')}): it is damaged or not a plain "
                "integer array; write it again with numpy.save(path, ids.astype(numpy.uint32))."
            ) from None
        if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer) or len(tokens) < 4:
            raise ConfigError(
                f"{data.source!r} must hold a 1-D integer array of at least 4 token ids, "
                f"got {tokens.dtype} {tuple(tokens.shape)}."
            )
        low, high = int(tokens.min()), int(tokens.max())
        if low < 0 or high >= MAX_TOKEN_ID:
            bad = low if low < 0 else high
            raise ConfigError(
                f"{data.source!r} holds the token id {bad}; ids must lie in [0, {MAX_TOKEN_ID:,}) (the vocabulary "
                "is the largest id + 1). Check how the file was written: ids are a tokenizer's, never raw data."
            )
        n_val = max(2, int(len(tokens) * data.val_fraction))
        meta = {"source": str(path.resolve()), "tokenizer": "pre-tokenised", "n_tokens": len(tokens)}
        return LMSplits(tokens[:-n_val], tokens[-n_val:], high + 1, None, meta)
    try:
        from qkvlab.data.lm import load_lm_data
    except ImportError as e:
        raise ConfigError(
            f"Reading data.source={data.source!r} needs qkvlab.data.lm, which failed to import ({e}); "
            "pass a .npy file of token ids instead."
        ) from None
    s = load_lm_data(
        data.source,
        data.tokenizer,
        cache_dir=data.cache_dir,
        val_fraction=data.val_fraction,
        seed=data.seed,
        max_docs=data.max_docs,
        vocab_size=data.vocab_size,
        encoding=data.encoding,
        val_source=data.val_source,
        extra=data.eval_sources,
    )
    return LMSplits(s.train, s.val, int(s.vocab_size), s.eot_id, dict(s.meta), dict(s.extra))


def evaluate_lm(
    model: nn.Module,
    tokens: np.ndarray,
    *,
    seq_len: int,
    batch_size: int,
    max_windows: int | None = None,
    ctx: RunContext | None = None,
    prefix: str = "val_",
) -> dict[str, float]:
    """Token-weighted cross-entropy and perplexity of ``model`` over fixed windows of ``tokens``.

    ``batch_size`` is global: each of the ``ctx.world_size`` processes scores its share.
    Returns ``{prefix}loss``, ``{prefix}ppl`` and ``{prefix}tokens`` (the scored count).
    """
    ctx = ctx or RunContext()
    windows = eval_windows(
        tokens,
        max(1, batch_size // ctx.world_size),
        seq_len,
        max_windows=max_windows,
        rank=ctx.rank,
        world_size=ctx.world_size,
    )

    def score(logits: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return lm_loss(logits, y, reduction="sum").double(), (y != IGNORE_INDEX).sum()

    total = evaluate_sums(model, windows, score, n_sums=2, ctx=ctx)  # (summed loss, scored tokens)
    loss = (total[0] / total[1]).item()
    return {f"{prefix}loss": loss, f"{prefix}ppl": math.exp(min(loss, 700.0)), f"{prefix}tokens": int(total[1].item())}


class LMTask:
    """Next-token prediction on packed token windows; evaluation is validation loss and perplexity.

    The model maps ids ``(B, T)`` to logits ``(B, T, V)``; any such module works.
    """

    metric_keys = ("val_loss", "val_ppl")

    def __init__(self, config: TrainConfig, splits: LMSplits):
        self.config = config
        self.splits = splits
        self.model_config = config.model_config(splits.vocab_size)
        if len(splits.val) < config.seq_len + 1:  # fail now, not at the first evaluation
            more = "give a longer data.val_source" if config.data.val_source else "raise data.val_fraction"
            raise ConfigError(
                f"The validation split has {len(splits.val)} tokens, too few for one window of "
                f"seq_len={config.seq_len}; {more} or lower seq_len."
            )

    @classmethod
    def from_config(cls, config: TrainConfig, ctx: RunContext) -> LMTask:
        # Process 0 reads (and caches) the corpus first, so the others find the cache ready.
        if not ctx.is_main:
            ctx.barrier()
        splits = load_splits(config.data)
        if ctx.is_main:
            ctx.barrier()
        return cls(config, splits)

    def build_model(self) -> nn.Module:
        from qkvlab.models import build_model

        return build_model(self.model_config)

    def batches(self, batch_size: int, *, seed: int, ctx: RunContext) -> PackedBatches:
        return PackedBatches(
            self.splits.train, batch_size, self.config.seq_len, seed=seed, rank=ctx.rank, world_size=ctx.world_size
        )

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        x, y = batch
        return lm_loss(model(x), y)

    def count(self, batch: Batch) -> int:
        return int((batch[1] != IGNORE_INDEX).sum())

    def evaluate(
        self, model: nn.Module, *, batch_size: int, max_batches: int, ctx: RunContext, final: bool = False
    ) -> dict[str, float]:
        """Validation loss and perplexity over the first ``max_batches`` global batches of windows;
        the final pass also scores each extra evaluation set (``<name>_loss``, ``<name>_ppl``)."""
        sets = {"val": self.splits.val, **(self.splits.extra if final else {})}
        metrics: dict[str, float] = {}
        for name, tokens in sets.items():
            if len(tokens) < self.config.seq_len + 1:
                continue  # an extra set shorter than one window has nothing to score
            metrics.update(
                evaluate_lm(
                    model,
                    tokens,
                    seq_len=self.config.seq_len,
                    batch_size=batch_size,
                    max_windows=max_batches * batch_size,
                    ctx=ctx,
                    prefix=f"{name}_",
                )
            )
        return metrics

    def flops_per_token(self, model: nn.Module) -> int:
        from qkvlab.costs import train_flops_per_token

        return train_flops_per_token(model, self.config.seq_len)

    def info(self) -> dict[str, Any]:
        from qkvlab.costs import build_on_meta, params_nonembedding

        return {
            "data": {**self.splits.meta, "train_tokens": len(self.splits.train), "val_tokens": len(self.splits.val)},
            "params_nonembedding": params_nonembedding(build_on_meta(self.model_config)),
            "model": self.model_config.to_dict(),
            "vocab_size": self.splits.vocab_size,
        }
