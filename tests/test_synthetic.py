"""Synthetic tasks: generators, the task in the trainer (budget, resume, scoring), sweeps and reports."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file
from torch import nn

from qkvlab.attention.variant import VariantSpec
from qkvlab.data import synthetic as synth
from qkvlab.errors import ConfigError
from qkvlab.models import EncoderConfig, SequenceEncoder
from qkvlab.study import ResultsStore, SweepSpec, expand, load_sweep, run_sweep, write_report
from qkvlab.study.report import PAPER_TABLES
from qkvlab.tasks import TASKS, build_task, model_config, task_class
from qkvlab.tasks.synthetic import SyntheticTask
from qkvlab.train import TrainConfig, load_config, train
from qkvlab.train.batches import ExampleBatches
from qkvlab.train.trainer import RunContext, total_steps

REPO = Path(__file__).resolve().parents[1]
TINY_MODEL = {"preset": None, "d_model": 16, "n_layers": 1, "n_heads": 2}


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def run_config(out: Path, task: dict | None = None, **top) -> TrainConfig:
    d = {
        "task": {"name": "synthetic", "kind": "reverse", "seq_len": 6, "n_train": 64, "n_test": 32, **(task or {})},
        "model": dict(TINY_MODEL),
        "optim": {"lr": 3e-3},
        "schedule": {"warmup_steps": 1},
        "log": {"every": 1, "progress": False, "tensorboard": False},
        "batch_size": 8,
        "max_steps": 2,
        "eval_every": 0,
        "out_dir": str(out),
        **top,
    }
    return TrainConfig.from_dict(d)


# ====================================================================== generators
def test_targets_of_the_paper_tasks_on_hand_checked_examples():
    x = np.array([[3, 1, 4, 1, 5, 9]])
    assert synth.targets("reverse", x).tolist() == [[9, 5, 1, 4, 1, 3]]
    assert synth.targets("sort", x).tolist() == [[1, 1, 3, 4, 5, 9]]
    assert synth.targets("sub", x).tolist() == [[6, 8, 5, 8, 4, 0]]
    assert synth.targets("swap", x).tolist() == [[1, 5, 9, 3, 1, 4]]
    assert synth.targets("copy", x).tolist() == [[3, 1, 4, 1, 5, 9]]


def test_targets_of_the_probes_on_hand_checked_examples():
    I, S, P = synth.IGNORE_INDEX, synth.SEP, synth.PAD
    assert synth.targets("shift", np.array([[3, 1, 4, 1]])).tolist() == [[I, 3, 1, 4]]
    # successor: the digit after the FIRST occurrence of the query 4 (positions 1 and 3) is 7
    x = np.array([[2, 4, 7, 4, 0, S, 4]])
    assert synth.targets("successor", x).tolist() == [[I, I, I, I, I, I, 7]]
    # recall, even length: pairs (5->2), (1->8), (5->2); query 1 -> 8
    x = np.array([[5, 2, 1, 8, 5, 2, S, 1]])
    assert synth.targets("recall", x).tolist() == [[I] * 7 + [8]]
    # recall, odd length: one PAD first, then pairs (3->0), (6->6); query 6 -> 6
    x = np.array([[P, 3, 0, 6, 6, S, 6]])
    assert synth.targets("recall", x).tolist() == [[I] * 6 + [6]]
    with pytest.raises(ConfigError, match="no match"):
        synth.targets("successor", np.array([[1, 2, 3, 4, S, 9]]))


@pytest.mark.parametrize("kind", synth.TASKS)
def test_generated_examples_are_valid_and_deterministic(kind):
    a = synth.make_dataset(kind, 10, 200, 50, seed=3)
    b = synth.make_dataset(kind, 10, 200, 50, seed=3)
    c = synth.make_dataset(kind, 10, 200, 50, seed=4)
    assert np.array_equal(a.train_x, b.train_x) and np.array_equal(a.test_y, b.test_y)
    assert not np.array_equal(a.train_x, c.train_x)
    assert a.train_x.shape == a.train_y.shape == (200, 10) and a.test_x.shape == (50, 10)
    assert a.train_x.min() >= 0 and a.train_x.max() < synth.VOCAB_SIZE
    scored = a.train_y != synth.IGNORE_INDEX
    assert (scored.sum(1) == synth.scored_positions(kind, 10)).all()
    assert a.train_y[scored].min() >= 0 and a.train_y[scored].max() < synth.N_LABELS
    assert np.array_equal(a.train_y, synth.targets(kind, a.train_x))  # targets follow from the inputs
    if kind in ("successor", "recall"):
        assert (a.train_x[:, -2] == synth.SEP).all()


def test_train_and_test_inputs_are_disjoint_and_the_test_set_is_fixed():
    # 1000 possible lists of 3 digits: collisions are certain, and are dropped from the test set
    d = synth.make_dataset("copy", 3, 500, 200, seed=0)
    train_rows = {r.tobytes() for r in d.train_x}
    test_rows = [r.tobytes() for r in d.test_x]
    assert len(test_rows) == len(set(test_rows)) == 200 and not train_rows & set(test_rows)
    # the test set comes from its own stream: more training data leaves it as it was
    small = synth.make_dataset("reverse", 12, 100, 40, seed=0)
    large = synth.make_dataset("reverse", 12, 400, 40, seed=0)
    assert np.array_equal(small.test_x, large.test_x) and np.array_equal(small.train_x, large.train_x[:100])
    with pytest.raises(ConfigError, match=r"too few distinct inputs.*lower task\.n_test"):
        synth.make_dataset("copy", 2, 100, 50)


@pytest.mark.parametrize(
    "kind, seq_len, message",
    [
        ("revers", 8, r"Unknown synthetic task 'revers'; use one of reverse, sort, sub, swap, copy, shift"),
        ("swap", 7, r"seq_len must be even; got seq_len=7. Use 6 or 8"),
        ("successor", 3, r"seq_len=3 is too short for task 'successor'.*use seq_len >= 4"),
        ("recall", 2, r"seq_len=2 is too short for task 'recall'.*use seq_len >= 4"),
    ],
)
def test_bad_generator_input_is_a_config_error(kind, seq_len, message):
    with pytest.raises(ConfigError, match=message):
        synth.make_dataset(kind, seq_len, 10, 10)


# ====================================================================== task config
@pytest.mark.parametrize(
    "task, top, message",
    [
        ({"kind": "sot"}, {}, r"Unknown synthetic task 'sot'; use one of reverse, sort"),
        ({"kind": "swap", "seq_len": 5}, {}, r"seq_len must be even; got seq_len=5"),
        ({"kind": "recall", "seq_len": 3}, {}, r"too short for task 'recall'"),
        ({"n_trian": 5}, {}, r"Unknown config key 'task.n_trian'. Did you mean 'task.n_train'\?"),
        ({"epochs": 2}, {"max_tokens": 1000}, r"Both task.epochs=2 and max_tokens=1000 set the step budget"),
        ({"epochs": -1}, {}, r"task.epochs must be a positive number"),
        ({"name": "synthetik"}, {}, r"Unknown task.name 'synthetik'; use one of lm, synthetic, vision, anomaly"),
        ({}, {"model": {**TINY_MODEL, "d_modle": 8}}, r"Unknown config key 'model.d_modle'. Did you mean"),
        ({}, {"model": {**TINY_MODEL, "vocab_size": 10}}, r"model.vocab_size=10 cannot hold the synthetic vocab"),
        ({}, {"model": {**TINY_MODEL, "max_seq_len": 4}}, r"max_seq_len=4 is shorter than the task's seq_len=6"),
    ],
)
def test_task_config_mistakes_are_one_clear_error(tmp_path, task, top, message):
    with pytest.raises(ConfigError, match=message):
        run_config(tmp_path, task, **top)


def test_the_registry_builds_tasks_lazily_and_names_the_valid_ones():
    assert set(TASKS) == {"lm", "synthetic", "vision", "anomaly"}
    assert task_class("synthetic") is SyntheticTask
    with pytest.raises(ConfigError, match=r"Unknown task\.name 'nope'; use one of lm, synthetic, vision, anomaly"):
        task_class("nope")
    with pytest.raises(ConfigError, match=r"task\.kind.*Valid keys under 'task': name"):
        load_config(None, ["task.kind=reverse"])  # the lm task takes no settings


def test_the_2d_fix_is_refused_for_causal_models_and_built_for_the_encoder(tmp_path):
    for variant in ("(Q=K-V)+", "qkv+2d"):
        with pytest.raises(ConfigError, match="non-causal models only"):
            load_config(None, [f"model.variant={variant}"])  # the language model is causal
    cfg = model_config(run_config(tmp_path, model={**TINY_MODEL, "variant": "(Q=K-V)+"}))
    assert isinstance(cfg, EncoderConfig) and cfg.variant.pos2d and cfg.variant.sharing == "qk_v"
    assert (cfg.vocab_size, cfg.n_labels, cfg.max_seq_len) == (synth.VOCAB_SIZE, 10, 6)
    # an LM sweep lists the 2D fix as a skipped grid point, with the reason
    lm = {"base": {"model": {"preset": "tiny"}, "seq_len": 32}, "grid": {"variant": ["QKV", "(Q=K-V)+"]}}
    plans = expand(SweepSpec.from_dict(lm))
    assert [p.status for p in plans] == ["pending", "skipped"] and "non-causal" in plans[1].reason


# ====================================================================== the task in the trainer
def test_budget_by_epochs_by_scored_positions_and_by_steps(tmp_path):
    cfg = run_config(tmp_path, {"epochs": 2}, batch_size=8, grad_accum=2)
    task = SyntheticTask(cfg)
    assert total_steps(cfg, task) == math.ceil(2 * 64 / 16) == 8
    cfg = run_config(tmp_path, {"kind": "successor", "seq_len": 8}, max_tokens=100)  # 1 scored position per list
    assert total_steps(cfg, SyntheticTask(cfg)) == math.ceil(100 / 8)
    cfg = run_config(tmp_path, {"kind": "shift", "seq_len": 8}, max_tokens=100)  # 7 per list
    assert total_steps(cfg, SyntheticTask(cfg)) == math.ceil(100 / (8 * 7))
    assert total_steps(run_config(tmp_path, max_steps=5), task) == 5


def test_ignored_positions_are_never_scored(tmp_path):
    cfg = run_config(tmp_path, {"kind": "successor", "seq_len": 8, "n_test": 40})
    task = build_task(cfg, RunContext())
    x, y = task.batches(8, seed=0, ctx=RunContext()).next()
    assert task.count((x, y)) == 8  # one scored position per list

    class Oracle(nn.Module):
        """Right at the scored positions, wrong (and confident) everywhere else."""

        def __init__(self, garbage: float):
            super().__init__()
            self.garbage = garbage

        def forward(self, x):
            y = torch.from_numpy(synth.targets("successor", x.numpy()))
            logits = torch.full((*x.shape, 10), self.garbage)
            logits[..., 0] = 50.0  # the unscored positions predict 0
            rows = (y != synth.IGNORE_INDEX).nonzero(as_tuple=True)
            logits[rows] = -50.0
            logits[(*rows, y[rows])] = 50.0
            return logits

    a = task.evaluate(Oracle(0.0), batch_size=16, max_batches=1, ctx=RunContext())
    b = task.evaluate(Oracle(-7.0), batch_size=16, max_batches=1, ctx=RunContext())
    assert a["val_acc"] == a["val_seq_acc"] == 1.0 and a["val_tokens"] == 40
    assert a["val_loss"] == b["val_loss"] < 1e-6  # what the unscored positions hold changes nothing
    assert task.loss(Oracle(0.0), (x, y)).item() == task.loss(Oracle(-7.0), (x, y)).item()


def test_two_steps_through_train_write_an_accuracy_run(tmp_path):
    cfg = run_config(tmp_path / "run", model={**TINY_MODEL, "variant": "(Q=K=V)+"})
    summary = train(cfg, verbose=False)
    assert summary["steps"] == 2 and summary["tokens"] == 2 * 8 * 6  # scored positions
    assert 0.0 <= summary["val_acc"] <= 1.0 and summary["val_tokens"] == 32 * 6 and "val_ppl" not in summary
    info = json.loads((tmp_path / "run/run.json").read_text())
    assert info["task"]["kind"] == "reverse" and info["model_family"] == "encoder" and info["total_steps"] == 2
    rows = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["val_acc"] == summary["val_acc"] and "val_ppl" not in rows[-1]
    weights = load_file(str(tmp_path / "run/model.safetensors"))
    assert any("pos2d" in k for k in weights) and weights["embed.weight"].shape == (synth.VOCAB_SIZE, 16)
    assert load_config(tmp_path / "run/config.yaml") == cfg  # the task section round-trips


def test_a_killed_synthetic_run_resumes_to_the_same_result(tmp_path):
    settings = {"max_steps": 6, "ckpt_every": 2}
    whole = train(run_config(tmp_path / "a", **settings), verbose=False)

    class Killed(Exception):
        pass

    def kill(step, path):
        if step == 4:
            raise Killed

    cfg = run_config(tmp_path / "b", **settings)
    with pytest.raises(Killed):
        train(cfg, on_checkpoint=kill, verbose=False)
    resumed = train(cfg, resume=True, verbose=False)
    assert resumed["steps"] == 6 and resumed["tokens"] == whole["tokens"]
    assert resumed["val_acc"] == whole["val_acc"] and resumed["train_loss"] == whole["train_loss"]
    a, b = load_file(str(tmp_path / "a/model.safetensors")), load_file(str(tmp_path / "b/model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_example_batches_split_over_ranks_and_resume():
    x = np.arange(20)[:, None].repeat(3, 1)
    one = ExampleBatches(x, x, 4, seed=1)
    seen = [one.next()[0][:, 0].tolist() for _ in range(5)]
    assert sorted(itertools.chain(*seen)) == list(range(20))  # one epoch: every example once
    ranks = [ExampleBatches(x, x, 2, seed=1, rank=r, world_size=2) for r in range(2)]
    assert ranks[0].next()[0][:, 0].tolist() + ranks[1].next()[0][:, 0].tolist() == seen[0]
    again = ExampleBatches(x, x, 4, seed=1)
    again.load_state_dict({**one.state_dict(), "batch": 3})
    assert again.next()[0][:, 0].tolist() == seen[3]
    with pytest.raises(ConfigError, match="does not match this run"):
        ExampleBatches(x, x, 5, seed=1).load_state_dict(one.state_dict())


# ====================================================================== sweeps and reports
def test_a_micro_sweep_and_its_accuracy_report(tmp_path):
    spec = SweepSpec.from_dict(
        {
            "name": "micro",
            "base": {
                "task": {"name": "synthetic", "kind": "copy", "seq_len": 4, "n_train": 32, "n_test": 16},
                "model": dict(TINY_MODEL),
                "schedule": {"warmup_steps": 1},
                "log": {"progress": False, "tensorboard": False},
                "batch_size": 8,
                "max_steps": 2,
                "eval_every": 0,
            },
            "metric": "val_acc",
            "paper_table": "table2",
            "grid": {"variant": ["QKV", "Q=K=V", "qk_v+mqa"], "task.kind": ["copy"], "seed": [0, 1]},
        }
    )
    summary = run_sweep(spec, tmp_path / "study", verbose=False)
    assert len(summary.ran) == 4 and len(summary.skipped) == 2 and not summary.failed, summary.failed
    rows = [r for r in ResultsStore(tmp_path / "study").read() if r["status"] == "ok"]
    assert all(r["run_id"].startswith("copy-") and 0 <= r["val_acc"] <= 1 and r["params_total"] for r in rows)
    assert all(r["kv_cache_bytes_per_token"] is None and r["tokens"] == 2 * 8 * 4 for r in rows)
    report = write_report(tmp_path / "study", plots=False).read_text()
    assert "## copy" in report and "Val acc (mean ± std)" in report and "| Paper |" in report
    accs = {v: [r["val_acc"] for r in rows if r["variant"] == v] for v in ("QKV", "Q=K=V")}
    for variant, values in accs.items():
        mean, std = np.mean(values), np.std(values, ddof=1)
        paper = PAPER_TABLES["table2"].values[variant]["copy"]
        assert f"| {variant} | 2 | {mean:.3f} ± {std:.3f} | {paper:.3f} |" in report
    change = 100 * (np.mean(accs["Q=K=V"]) - np.mean(accs["QKV"]))
    assert f"{change:+.1f} pt" in report
    assert "## Skipped grid points" in report and "cannot be grouped" in report
    assert "quote paper Table 2" in report  # the paper's numbers are labelled as the paper's


def test_the_report_groups_by_task_and_averages_the_other_settings(tmp_path):
    """A hand-made results file: two tasks x two settings x two seeds; every cell checked."""
    store = ResultsStore(tmp_path)
    accs = {}
    for kind, d, seed, variant in itertools.product(["reverse", "swap"], [32, 64], [0, 1], ["q_k_v", "qk_v+2d"]):
        acc = 0.5 + 0.1 * (kind == "swap") + 0.01 * (d == 64) + 0.002 * seed + 0.05 * (variant != "q_k_v")
        accs[(kind, d, seed, variant)] = acc
        config = {"task": {"name": "synthetic", "kind": kind}, "model": {"d_model": d, "variant": variant}}
        store.append(
            {
                "run_id": f"{kind}-{d}-{seed}-{variant}",
                "status": "ok",
                "variant": "QKV" if variant == "q_k_v" else "(Q=K-V)+",
                "variant_id": variant,
                "seed": seed,
                "axes": {"task.kind": kind, "model.d_model": d, "seed": seed, "variant": variant},
                "config": config,
                "val_acc": acc,
                "params_total": 1000,
            }
        )
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump({"name": "hand", "metric": "val_acc"}))
    report = write_report(tmp_path, plots=False).read_text()
    assert report.index("## reverse") < report.index("## swap")
    values = [a for (k, _, _, v), a in accs.items() if k == "swap" and v == "qk_v+2d"]
    assert f"| (Q=K-V)+ | 4 | {np.mean(values):.3f} ± {np.std(values, ddof=1):.3f} |" in report
    assert "| 0.001 | +5.0 pt |" in report  # seed std (0.002 / sqrt 2 = 0.0014) and the change vs QKV
    assert "## Val acc by `model.d_model`" in report and "d_model=32" in report
    assert "| Variant | REVERSE | SWAP | Avg |" in report


# ====================================================================== shipped configs
def test_every_shipped_task_config_loads_and_builds_its_model():
    paths = sorted((REPO / "configs/tasks").glob("*.yaml"))
    assert any(p.name == "synthetic-reverse.yaml" for p in paths)
    for path in paths:
        cfg = load_config(path)
        assert cfg.task["name"] in TASKS, path
        if cfg.task["name"] == "synthetic":
            assert isinstance(model_config(cfg), EncoderConfig), path
    cfg = load_config(REPO / "configs/tasks/synthetic-reverse.yaml")
    assert total_steps(cfg, SyntheticTask(cfg)) == math.ceil(2 * 10_000 / 64)  # the paper's 2 epochs
    assert (cfg.optim.lr, cfg.optim.grad_clip, cfg.optim.weight_decay) == (1e-3, 5.0, 0.0)
    SequenceEncoder(model_config(cfg))  # it builds


def test_the_synthetic_studies_load_and_expand():
    paper = load_sweep(REPO / "configs/studies/synthetic-paper.yaml")
    assert paper.metric == "val_acc" and paper.paper_table == "table2" and paper.group_by == ["task.kind"]
    assert paper.grid["model.d_model"] == [32, 64, 256] and paper.grid["task.seq_len"] == [16, 64, 128]
    assert paper.grid["task.kind"] == list(synth.PAPER_TASKS) and paper.grid["seed"] == [0, 1, 2]
    assert math.prod(len(v) for v in paper.grid.values()) == 3240
    names = list(PAPER_TABLES["table2"].values)
    assert [VariantSpec.parse(v).paper_name for v in paper.grid["variant"]] == names
    cpu = load_sweep(REPO / "configs/studies/synthetic-cpu.yaml")
    plans = expand(cpu)
    assert len(plans) == 192 and all(p.status == "pending" for p in plans)
    assert set(cpu.grid["task.kind"]) >= {"shift", "successor", "recall"}
    for plan in plans[:: len(plans) // 8]:  # a sample of points: configs the trainer accepts
        TrainConfig.from_dict({**plan.config, "out_dir": "unused"})
