"""The shared evaluation loop and batch samplers: sharding over processes, sums, masks, resume."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qkvlab.data import synthetic as synth
from qkvlab.errors import ConfigError
from qkvlab.train.batches import IGNORE_INDEX, ExampleBatches, PackedBatches, lm_loss
from qkvlab.train.context import RunContext
from qkvlab.train.evaluation import PaddingBatch, evaluate_classifier, evaluate_sums, strided_batches


@dataclass
class OneRank(RunContext):
    """One process of several, without a process group: its sums are its own (added by the test)."""

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        return values


def classifier_data(n: int = 23, classes: int = 4) -> tuple[np.ndarray, np.ndarray, nn.Module]:
    torch.manual_seed(0)
    x = np.random.default_rng(0).normal(size=(n, 5)).astype(np.float32)
    y = np.random.default_rng(1).integers(0, classes, size=n)
    return x, y, nn.Linear(5, classes)


def test_strided_batches_give_every_example_to_one_process_once():
    x = np.arange(23)
    y = x * 10
    shares = [list(strided_batches(x, y, batch_size=6, ctx=OneRank(rank=r, world_size=2))) for r in range(2)]
    assert all(len(bx) <= 3 for share in shares for bx, _ in share)  # batch_size is global
    seen = sorted(int(v) for share in shares for bx, _ in share for v in bx)
    assert seen == list(range(23))
    assert all(torch.equal(by, bx * 10) for share in shares for bx, by in share)


def test_classifier_metrics_are_the_means_and_add_up_over_processes():
    x, y, model = classifier_data()
    one = evaluate_classifier(model, x, y, batch_size=5, ctx=RunContext(), count_key="val_n")
    logits = model(torch.from_numpy(x))
    assert one["val_n"] == 23
    assert one["val_loss"] == pytest.approx(F.cross_entropy(logits, torch.from_numpy(y)).item(), rel=1e-6)
    assert one["val_acc"] == (logits.argmax(-1).numpy() == y).mean()

    def score(logits, y):
        return F.cross_entropy(logits, y, reduction="sum").double(), (logits.argmax(-1) == y).sum(), len(y)

    parts = [
        evaluate_sums(
            model,
            strided_batches(x, y, batch_size=6, ctx=OneRank(rank=r, world_size=2)),
            score,
            n_sums=3,
            ctx=OneRank(rank=r, world_size=2),
        )
        for r in range(2)
    ]
    total = parts[0] + parts[1]
    assert total[2].item() == 23 and total[1].item() / 23 == one["val_acc"]
    # each batch's loss is summed in float32, and the two paths batch differently (5 and 6 rows),
    # so they agree to float32 rounding, not bit for bit (the last bits differ between CPUs)
    assert total[0].item() / 23 == pytest.approx(one["val_loss"], rel=1e-6)


@pytest.mark.parametrize(("n", "batch_size", "world_size"), [(13, 6, 2), (23, 6, 2), (7, 9, 3), (10, 4, 4), (1, 4, 2)])
def test_every_process_gets_as_many_batches_and_padding_is_the_only_repeat(n, batch_size, world_size):
    x = np.arange(n)
    shares = [
        list(strided_batches(x, x * 10, batch_size=batch_size, ctx=OneRank(rank=r, world_size=world_size)))
        for r in range(world_size)
    ]
    assert len({len(share) for share in shares}) == 1  # FSDP: the same number of forward passes everywhere
    real = [b for share in shares for b in share if not isinstance(b, PaddingBatch)]
    assert sorted(int(v) for bx, _ in real for v in bx) == list(range(n))
    assert all(torch.equal(by, bx * 10) for share in shares for bx, by in share)
    if (n, batch_size) == (13, 6):  # 7 and 6 examples in batches of 3: process 1 pads its third
        assert [isinstance(b, PaddingBatch) for b in shares[1]] == [False, False, True]


def test_padding_batches_are_run_but_not_scored():
    x, y, model = classifier_data(n=13)
    one = evaluate_classifier(model, x, y, batch_size=6, ctx=RunContext(), count_key="n")
    calls = [0, 0]
    parts = []
    for r in range(2):

        def forward(batch, r=r):
            calls[r] += 1
            return model(batch)

        parts.append(
            evaluate_classifier(
                model, x, y, batch_size=6, ctx=OneRank(rank=r, world_size=2), count_key="n", forward=forward
            )
        )
    assert calls == [3, 3]  # 7 and 6 examples, 3 a batch: 3 and 2 batches, and one padding batch
    assert parts[0]["n"] + parts[1]["n"] == one["n"] == 13
    acc = (parts[0]["val_acc"] * parts[0]["n"] + parts[1]["val_acc"] * parts[1]["n"]) / 13
    loss = (parts[0]["val_loss"] * parts[0]["n"] + parts[1]["val_loss"] * parts[1]["n"]) / 13
    assert acc == pytest.approx(one["val_acc"], rel=1e-12) and loss == pytest.approx(one["val_loss"], rel=1e-6)


def test_evaluation_runs_in_eval_mode_without_gradients():
    x, y, model = classifier_data()
    model.train()
    modes = []

    def forward(batch):
        modes.append((model.training, torch.is_grad_enabled()))
        return model(batch)

    evaluate_classifier(model, x, y, batch_size=8, ctx=RunContext(), count_key="n", forward=forward)
    assert modes and set(modes) == {(False, False)} and not model.training


def test_the_masked_loss_skips_what_the_synthetic_data_leaves_unscored():
    assert synth.IGNORE_INDEX == IGNORE_INDEX
    logits = torch.randn(2, 3, 5)
    y = torch.tensor([[1, IGNORE_INDEX, 2], [IGNORE_INDEX, IGNORE_INDEX, 4]])
    keep = y != IGNORE_INDEX
    want = F.cross_entropy(logits[keep], y[keep])
    assert torch.allclose(lm_loss(logits, y), want)
    assert torch.allclose(lm_loss(logits, y, reduction="sum"), want * keep.sum())


def test_samplers_share_their_checks_and_resume_rules():
    x = np.arange(30)[:, None]
    tokens = np.arange(400) % 7
    with pytest.raises(ConfigError, match=r"rank must be in \[0, world_size=2\)"):
        ExampleBatches(x, x, 4, rank=2, world_size=2)
    with pytest.raises(ConfigError, match="batch_size must be >= 1"):
        PackedBatches(tokens, 0, 8)
    a = ExampleBatches(x, x, 4, seed=3)
    a.next()
    assert a.state_dict() == {"batch": 1, "seed": 3, "global_batch": 4, "n_examples": 30}
    with pytest.raises(ConfigError, match="n_examples: saved 30 vs now 20"):
        ExampleBatches(x[:20], x[:20], 4, seed=3).load_state_dict(a.state_dict())
    p = PackedBatches(tokens, 4, 8, seed=3)
    assert p.state_dict() == {"batch": 0, "seed": 3, "global_batch": 4, "seq_len": 8, "n_tokens": 400}
    assert p.epoch == 0.0 and a.epoch == 4 / 30
