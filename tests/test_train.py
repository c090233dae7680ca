"""The trainer: packed batches, the loss mask, configs, the loop, checkpoints, resume and the CLI."""

from __future__ import annotations

import itertools
import json
import math
import os
import signal
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file
from torch import nn

import qkvlab.train.state
from qkvlab import GPT, ConfigError, GPTConfig, load_model
from qkvlab.train import (
    PackedBatches,
    TrainConfig,
    apply_overrides,
    eval_windows,
    latest_checkpoint,
    lm_loss,
    load_config,
    lr_at,
    mask_padding,
    train,
)
from qkvlab.train.trainer import (
    LMTask,
    RunContext,
    RunStopped,
    Trainer,
    build_optimizer,
    evaluate_lm,
    load_splits,
    request_stop,
)

REPO = Path(__file__).resolve().parents[1]
# A tiny model: 2 layers, d_model 32, 4 heads; the vocabulary comes from the data (64 ids).
TINY = ["model.n_layers=2", "model.d_model=32", "model.n_heads=4"]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest (and never wait on a busy core) with one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def child_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def tokens_file(tmp_path_factory) -> Path:
    """20k ids in 0..63: eight fixed random 16-token phrases in random order, so there is something to learn."""
    rng = np.random.default_rng(0)
    phrases = rng.integers(0, 64, size=(8, 16))
    ids = phrases[rng.integers(0, 8, size=1250)].reshape(-1).astype(np.uint16)
    path = tmp_path_factory.mktemp("data") / "tokens.npy"
    np.save(path, ids)
    return path


def tiny_config(tokens_file: Path, out_dir: Path, *overrides: str) -> TrainConfig:
    base = [
        f"data.source={tokens_file}",
        f"out_dir={out_dir}",
        *TINY,
        "batch_size=8",
        "seq_len=32",
        "max_steps=20",
        "eval_every=10",
        "eval_batches=4",
        "log.every=1",
        "log.progress=false",
        "log.tensorboard=false",
        "optim.lr=3e-3",
        "schedule.warmup_steps=3",
    ]
    return load_config(None, [*base, *overrides])


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


# ====================================================================== batches
def test_windows_are_shifted_pairs_read_from_the_corpus():
    tokens = np.arange(1000, dtype=np.uint16)
    x, y = PackedBatches(tokens, batch_size=4, seq_len=16, seed=1).next()
    assert x.shape == y.shape == (4, 16) and x.dtype == y.dtype == torch.int64
    assert torch.equal(y, x + 1)  # targets are the next tokens
    assert torch.all(x[:, 0] % 16 == 0)  # windows start on the fixed grid of seq_len


def test_every_window_once_per_epoch_in_a_new_order():
    tokens = np.arange(161)  # (161 - 1) // 16 = 10 windows
    batches = PackedBatches(tokens, batch_size=5, seq_len=16, seed=0)
    epoch = [batches.next()[0][:, 0] // 16 for _ in range(4)]
    first, second = torch.cat(epoch[:2]), torch.cat(epoch[2:])
    assert sorted(first.tolist()) == sorted(second.tolist()) == list(range(10))
    assert not torch.equal(first, second)
    other_seed = PackedBatches(tokens, batch_size=5, seq_len=16, seed=1).next()[0]
    assert not torch.equal(other_seed[:, 0] // 16, epoch[0])


@pytest.mark.parametrize("world_size", [2, 4])
def test_ranks_split_the_global_batch_exactly(world_size):
    tokens = np.random.default_rng(0).integers(0, 100, size=37 * 8 + 1)  # 37 windows: batches cross epochs
    single = PackedBatches(tokens, batch_size=8, seq_len=8, seed=3)
    ranks = [
        PackedBatches(tokens, 8 // world_size, 8, seed=3, rank=r, world_size=world_size) for r in range(world_size)
    ]
    for _ in range(12):
        x, y = single.next()
        parts = [b.next() for b in ranks]
        assert torch.equal(x, torch.cat([p[0] for p in parts]))
        assert torch.equal(y, torch.cat([p[1] for p in parts]))


def test_resume_continues_the_same_stream_on_any_process_count():
    tokens = np.random.default_rng(0).integers(0, 100, size=2000)
    a = PackedBatches(tokens, batch_size=4, seq_len=10, seed=5)
    for _ in range(7):
        a.next()
    state = a.state_dict()
    expected = [a.next() for _ in range(30)]  # runs past the end of an epoch (199 windows)
    b = PackedBatches(tokens, batch_size=4, seq_len=10, seed=5)
    b.load_state_dict(state)
    assert all(torch.equal(b.next()[0], e[0]) for e in expected)
    # The state counts global batches, so two processes resume it to the same batches.
    halves = [PackedBatches(tokens, 2, 10, seed=5, rank=r, world_size=2) for r in range(2)]
    for h in halves:
        h.load_state_dict(state)
    assert torch.equal(torch.cat([h.next()[0] for h in halves]), expected[0][0])
    with pytest.raises(ConfigError, match="seq_len: saved 10 vs now 12"):
        PackedBatches(tokens, batch_size=4, seq_len=12, seed=5).load_state_dict(state)


def test_eval_windows_are_fixed_disjoint_and_shared_out_evenly():
    tokens = np.arange(10 * 8 + 1)  # 10 windows of 8
    one = torch.cat([x for x, _ in eval_windows(tokens, batch_size=3, seq_len=8)])
    assert one[:, 0].tolist() == [0, 8, 16, 24, 32, 40, 48, 56, 64, 72]  # in order, no overlap
    assert torch.equal(one, torch.cat([x for x, _ in eval_windows(tokens, batch_size=3, seq_len=8)]))
    shares = [
        torch.cat([x for x, _ in eval_windows(tokens, 2, 8, max_windows=8, rank=r, world_size=2)]) for r in (0, 1)
    ]
    assert torch.equal(torch.cat(shares), one[:8])
    with pytest.raises(ConfigError, match="too few for one window"):
        next(eval_windows(np.arange(8), batch_size=2, seq_len=8))


def test_padding_is_never_scored():
    """Loss over a right-padded batch with masked targets == loss over the real tokens alone."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layers=2, d_model=32, n_heads=4, vocab_size=50, max_seq_len=16)).eval()
    seqs = [torch.randint(1, 50, (n,)) for n in (5, 9, 12)]
    T, pad = 12, 0
    x = torch.full((3, T - 1), pad)
    y = torch.full((3, T - 1), pad)
    for i, s in enumerate(seqs):
        x[i, : len(s) - 1] = s[:-1]
        y[i, : len(s) - 1] = s[1:]
    keep = torch.arange(T - 1)[None, :] < torch.tensor([len(s) - 1 for s in seqs])[:, None]
    with torch.no_grad():
        padded = lm_loss(model(x), mask_padding(y, keep))
        unmasked = lm_loss(model(x), y)
        per_token = torch.cat([lm_loss(model(s[None, :-1]), s[None, 1:], reduction="none") for s in seqs])
    assert torch.allclose(padded, per_token.mean(), atol=1e-6)
    assert not torch.allclose(unmasked, per_token.mean(), atol=1e-3)  # scoring the padding would change it
    with pytest.raises(ConfigError, match="bool tensor"):
        mask_padding(y, keep.long())


# ====================================================================== configs
def test_config_round_trips_through_yaml_and_dicts(tmp_path):
    cfg = load_config(REPO / "configs/lm/tiny-stdlib.yaml", ["optim.betas=[0.8,0.99]", "model.variant=Q-K=V"])
    assert cfg.optim.betas == (0.8, 0.99) and cfg.model["variant"] == "Q-K=V"
    path = tmp_path / "c.yaml"
    path.write_text(cfg.to_yaml())
    assert load_config(path) == cfg
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    assert TrainConfig.from_dict({}) == TrainConfig()


def test_overrides_are_dotted_key_equals_yaml_value():
    d = apply_overrides(
        {"optim": {"lr": 1.0}},
        ["optim.lr=3e-4", "model.variant=Q=K=V", "data.max_docs=null", "seq_len=64", "log.progress=false"],
    )
    assert d == {
        "optim": {"lr": 3e-4},
        "model": {"variant": "Q=K=V"},
        "data": {"max_docs": None},
        "seq_len": 64,
        "log": {"progress": False},
    }
    cfg = TrainConfig.from_dict(d)
    assert cfg.model_config(256).variant.paper_name == "Q=K=V"
    budget = load_config(None, ["max_tokens=1e6", "batch_size=8", "seq_len=100"])
    assert budget.max_tokens == 1_000_000 and budget.total_steps == 1250  # a token budget replaces max_steps
    with pytest.raises(ConfigError, match="not KEY=VALUE"):
        apply_overrides({}, ["optim.lr"])
    with pytest.raises(ConfigError, match="is a value, not a section"):
        apply_overrides({"seq_len": 3}, ["seq_len.x=1"])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optim.lrr=1", r"Unknown config key 'optim.lrr'. Did you mean 'optim.lr'\? Valid keys under 'optim': lr, "),
        ("batch_sise=4", r"Did you mean 'batch_size'\?.*Valid keys at the top level: model, data"),
        ("model.varaint=QKV", r"Did you mean 'model.variant'\?.*preset, n_layers"),
        ("optim.lr=abc", r"optim.lr must be a number, got 'abc'"),
        ("optim.betas=[0.9]", r"optim.betas must be a list of 2 numbers"),
        ("batch_size=0", r"batch_size must be >= 1"),
        ("dtype=fp16", r"dtype must be one of auto, fp32, bf16"),
        ("model.preset=huge", r"Unknown model.preset 'huge'"),
        ("model.variant=Q-GQA-3", r"n_kv_heads=3 must divide n_heads=8"),
        ("model.max_seq_len=64", r"model.max_seq_len=64 is shorter than seq_len=128"),
    ],
)
def test_config_mistakes_are_one_clear_error(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, ["seq_len=128", override])


def test_model_gets_the_tokenizers_vocabulary():
    cfg = load_config(None, ["model.preset=gpt2-1m"])
    assert cfg.model_config(257).vocab_size == 257
    assert cfg.model_config(257).max_seq_len == cfg.seq_len
    assert load_config(None, ["model.vocab_size=512"]).model_config(257).vocab_size == 512
    with pytest.raises(ConfigError, match="smaller than the tokenizer's vocabulary"):
        load_config(None, ["model.vocab_size=100"]).model_config(257)


def test_every_shipped_lm_config_loads():
    paths = sorted((REPO / "configs/lm").glob("*.yaml"))
    assert len(paths) >= 3
    for path in paths:
        cfg = load_config(path)
        assert cfg.model_config(256).vocab_size == 256, path


def test_lr_schedule_warms_up_then_decays_to_min_lr():
    kw = dict(lr=1.0, min_lr=0.1, warmup=4, total=20)
    lrs = [lr_at(s, **kw) for s in range(20)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert lrs[4] == 1.0 and math.isclose(lrs[-1], 0.1)
    assert all(a >= b for a, b in itertools.pairwise(lrs[4:]))


def test_lr_schedule_multistep_and_constant():
    kw = dict(lr=1.0, min_lr=0.1, warmup=2, total=20)
    lrs = [lr_at(s, kind="multistep", milestones=[0.5, 0.75], gamma=0.1, **kw) for s in range(20)]
    assert lrs[:2] == [0.5, 1.0]  # warmup first
    assert lrs[2:10] == [1.0] * 8  # steps 10 and 15 are the milestones (MultiStepLR at 50% / 75%)
    assert all(math.isclose(x, 0.1) for x in lrs[10:15]) and all(math.isclose(x, 0.01) for x in lrs[15:])
    assert [lr_at(s, kind="constant", **kw) for s in range(2, 20)] == [1.0] * 18


@pytest.mark.parametrize(
    "override, words",
    [
        ("schedule.kind=linear", ["schedule.kind", "cosine, multistep, constant", "'linear'"]),
        ("schedule.milestones=[0.75,0.5]", ["schedule.milestones", "increasing"]),
        ("schedule.milestones=[1.5]", ["schedule.milestones", "(0, 1)"]),
        ("schedule.gamma=0", ["schedule.gamma", "(0, 1]"]),
    ],
)
def test_bad_schedule_settings_name_the_value(override, words):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert all(w in str(err.value) for w in words), str(err.value)


def test_multistep_schedule_drives_training(tokens_file, tmp_path):
    """The trainer applies schedule.kind: the logged lr drops by gamma at the milestones."""
    overrides = ["max_steps=8", "eval_every=0", "schedule.warmup_steps=0", "schedule.kind=multistep"]
    cfg = tiny_config(tokens_file, tmp_path / "ms", *overrides)
    train(cfg, verbose=False)
    rows = [json.loads(r) for r in (tmp_path / "ms" / "metrics.jsonl").read_text().splitlines()]
    lrs = {r["step"]: r["lr"] for r in rows if "lr" in r}
    assert len(lrs) >= 6, rows[:3]
    for step, lr in lrs.items():  # rows carry the step count after the update of step - 1
        expect = lr_at(step - 1, lr=3e-3, min_lr=3e-4, warmup=0, total=8, kind="multistep")
        assert math.isclose(lr, expect, rel_tol=1e-9), (step, lr, expect)
    assert math.isclose(min(lrs.values()), 3e-5)  # both milestones were reached: 3e-3 * 0.1**2


def test_weight_decay_applies_to_matrices_only():
    model = GPT(GPTConfig(n_layers=2, d_model=32, n_heads=4, vocab_size=64))
    opt = build_optimizer(model, load_config(None, ["optim.weight_decay=0.1"]))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


# ====================================================================== training
def test_training_learns_and_writes_the_run_folder(tokens_file, tmp_path):
    cfg = tiny_config(tokens_file, tmp_path / "run", "max_steps=40", "eval_every=20", "optim.lr=1e-2")
    summary = train(cfg, verbose=False)
    out = tmp_path / "run"
    assert summary["steps"] == 40 and summary["tokens"] == 40 * cfg.tokens_per_step
    assert summary["val_loss"] < 0.75 * math.log(64)  # well below chance (a uniform guess)
    assert math.isclose(summary["val_ppl"], math.exp(summary["val_loss"]))

    assert load_config(out / "config.yaml") == cfg
    run = json.loads((out / "run.json").read_text())
    assert run["git"]["commit"] and run["versions"]["torch"] == torch.__version__
    assert {"python", "numpy", "qkvlab"} <= set(run["versions"]) and run["hardware"]["cpu_count"]
    assert run["model"]["vocab_size"] == 64 and run["params"] == summary["params"]

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 41))
    assert {"step", "tokens", "loss", "lr", "tokens_per_s", "val_loss", "val_ppl"} <= set(rows[0])
    assert [r["step"] for r in rows if r["val_loss"] is not None] == [20, 40]
    assert rows[-1]["val_loss"] == summary["val_loss"] and rows[0]["loss"] > rows[-1]["loss"] + 1.0
    # the steady rate leaves out the first log window, which holds the warm-up
    assert summary["steady_tokens_per_s"] == statistics.median(r["tokens_per_s"] for r in rows[1:])

    model = load_model(out / "model.safetensors")  # a plain qkvlab checkpoint
    again = evaluate_lm(model, load_splits(cfg.data).val, seq_len=32, batch_size=8, max_windows=32)
    assert math.isclose(again["val_loss"], summary["val_loss"], rel_tol=1e-6)
    assert latest_checkpoint(out).name == "ckpt-0000040"


def test_grad_accumulation_matches_one_big_batch(tokens_file, tmp_path):
    big = train(tiny_config(tokens_file, tmp_path / "big", "max_steps=5", "batch_size=8"), verbose=False)
    acc = train(
        tiny_config(tokens_file, tmp_path / "acc", "max_steps=5", "batch_size=4", "grad_accum=2"), verbose=False
    )
    assert acc["tokens"] == big["tokens"]
    losses = [
        [json.loads(r)["loss"] for r in (tmp_path / n / "metrics.jsonl").read_text().splitlines()]
        for n in ("big", "acc")
    ]
    assert np.allclose(losses[0], losses[1], rtol=0, atol=1e-5)
    a, b = weights(tmp_path / "big/model.safetensors"), weights(tmp_path / "acc/model.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def test_sigkill_right_after_a_checkpoint_then_resume_is_bit_identical(tokens_file, tmp_path):
    """A run killed with SIGKILL and resumed ends with the very weights of an uninterrupted run."""
    settings = {
        "model": {"preset": "tiny", "n_layers": 2, "d_model": 32, "n_heads": 4, "dropout": 0.1},  # RNG matters
        "data": {"source": str(tokens_file)},
        "batch_size": 8,
        "seq_len": 32,
        "max_steps": 60,
        "ckpt_every": 5,
        "eval_every": 10,
        "eval_batches": 2,
        "log": {"every": 1, "progress": False, "tensorboard": False},
        "optim": {"lr": 3e-3},
        "schedule": {"warmup_steps": 5},
    }
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(settings))
    cmd = [sys.executable, "-m", "qkvlab", "train", str(config)]

    def run(out: Path, *extra: str) -> None:
        proc = subprocess.run([*cmd, f"out_dir={out}", *extra], env=child_env(), capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr

    run(tmp_path / "whole")
    killed = tmp_path / "killed"
    with open(tmp_path / "stderr.txt", "w") as err:
        proc = subprocess.Popen(
            [*cmd, f"out_dir={killed}"], env=child_env(), stdout=subprocess.PIPE, stderr=err, text=True
        )
        for line in proc.stdout:
            if line.startswith("checkpoint saved step="):
                os.kill(proc.pid, signal.SIGKILL)
                break
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    step = int(latest_checkpoint(killed).name.split("-")[1])
    assert 5 <= step < 60  # it died mid-run
    run(killed, "--resume")

    a, b = weights(tmp_path / "whole/model.safetensors"), weights(killed / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows = [
        [{k: v for k, v in json.loads(r).items() if k != "tokens_per_s"} for r in (d / "metrics.jsonl").open()]
        for d in (tmp_path / "whole", killed)
    ]
    assert rows[0] == rows[1]  # every logged loss, lr and eval identical, no duplicated rows


def test_a_failed_checkpoint_write_keeps_the_previous_one(tokens_file, tmp_path, monkeypatch):
    whole = train(tiny_config(tokens_file, tmp_path / "whole", "ckpt_every=4", "max_steps=12"), verbose=False)
    real_save, calls = torch.save, []

    def disk_full(obj, path, *a, **kw):
        calls.append(path)
        if len(calls) == 2:
            real_save(obj, path, *a, **kw)  # half a file lies on disk when the disk fills up
            raise OSError(28, "No space left on device")
        return real_save(obj, path, *a, **kw)

    monkeypatch.setattr(qkvlab.train.state.torch, "save", disk_full)
    cfg = tiny_config(tokens_file, tmp_path / "run", "ckpt_every=4", "max_steps=12")
    with pytest.raises(ConfigError, match=r"checkpoint of step 8 .*No space left.*previous checkpoint \(step 4\)"):
        train(cfg, verbose=False)
    monkeypatch.setattr(qkvlab.train.state.torch, "save", real_save)
    assert latest_checkpoint(tmp_path / "run").name == "ckpt-0000004"
    assert not list((tmp_path / "run/checkpoints").glob(".*.tmp"))  # no half-written folder left

    resumed = train(cfg, resume=True, verbose=False)
    assert resumed["val_loss"] == whole["val_loss"]
    a, b = weights(tmp_path / "whole/model.safetensors"), weights(tmp_path / "run/model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_stop_request_saves_the_step_reached_and_the_resumed_run_ends_as_an_unstopped_one(
    tokens_file, tmp_path, monkeypatch
):
    whole = train(tiny_config(tokens_file, tmp_path / "whole"), verbose=False)
    step_once = Trainer.train_step

    def stop_after_step_7(self):
        out = step_once(self)
        if self.step == 7:
            request_stop()  # as a sweep's time limit does, from a signal handler or a timer thread
        return out

    monkeypatch.setattr(Trainer, "train_step", stop_after_step_7)
    cfg = tiny_config(tokens_file, tmp_path / "run")
    with pytest.raises(RunStopped, match=r"stopped at step 7 of 20 with a checkpoint"):
        train(cfg, verbose=False)
    assert latest_checkpoint(tmp_path / "run").name == "ckpt-0000007"  # saved at the step reached
    monkeypatch.setattr(Trainer, "train_step", step_once)
    first = qkvlab.train.state.load_state(latest_checkpoint(tmp_path / "run"))
    assert first["train_time_s"] > 0 and first["train_time_tokens"] == 7 * cfg.tokens_per_step
    resumed = train(cfg, resume=True, verbose=False)  # the request was answered: this run goes on
    assert resumed["steps"] == 20 and resumed["val_loss"] == whole["val_loss"]
    # time and rate are the whole run's: both parts' seconds, every token
    assert resumed["train_time_s"] > first["train_time_s"]
    assert resumed["train_tokens_per_s"] == pytest.approx(resumed["tokens"] / resumed["train_time_s"])
    a, b = weights(tmp_path / "whole/model.safetensors"), weights(tmp_path / "run/model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    # a request withdrawn before any run answers it stops nothing
    request_stop()
    request_stop(False)
    assert train(tiny_config(tokens_file, tmp_path / "again"), verbose=False)["val_loss"] == whole["val_loss"]


def test_steps_checked_in_windows_as_on_a_gpu_log_the_same_losses_and_catch_the_bad_step(
    tokens_file, tmp_path, monkeypatch
):
    every = train(tiny_config(tokens_file, tmp_path / "a", "max_steps=8", "log.every=1"), verbose=False)
    monkeypatch.setattr("qkvlab.train.trainer.reads_every_step", lambda device: False)
    windowed = train(tiny_config(tokens_file, tmp_path / "b", "max_steps=8", "log.every=1"), verbose=False)
    losses = [
        [json.loads(line)["loss"] for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        for run in ("a", "b")
    ]
    assert losses[0] == losses[1] and len(losses[0]) == 8
    assert windowed["val_loss"] == every["val_loss"]
    # A NaN at step 6 is found when the window 5..8 is read: the run stops naming step 6, and the
    # checkpoint of step 4 (saved after its window was checked) is the last good one.
    cfg = tiny_config(tokens_file, tmp_path / "c", "ckpt_every=4", "log.every=4", "max_steps=10")
    with pytest.raises(ConfigError, match=r"diverged at step 6: loss=nan.*checkpoint is step 4"):
        train(cfg, task=NaNAfter(cfg, load_splits(cfg.data)), verbose=False)
    assert latest_checkpoint(tmp_path / "c").name == "ckpt-0000004"


def test_resume_refuses_a_changed_config_and_a_new_run_refuses_to_overwrite(tokens_file, tmp_path):
    cfg = tiny_config(tokens_file, tmp_path / "run", "max_steps=4")
    train(cfg, verbose=False)
    with pytest.raises(ConfigError, match=r"already holds a run .*pass --resume"):
        train(cfg, verbose=False)
    changed = tiny_config(tokens_file, tmp_path / "run", "max_steps=4", "optim.weight_decay=0.2")
    with pytest.raises(ConfigError, match=r"changed config \(optim.weight_decay: saved 0.1, now 0.2, per "):
        train(changed, resume=True, verbose=False)
    more_logging = tiny_config(tokens_file, tmp_path / "run", "max_steps=4", "log.every=2", "ckpt_every=1")
    assert train(more_logging, resume=True, verbose=False)["steps"] == 4  # runtime keys may change


class NaNAfter(LMTask):
    """The LM task, except that the loss turns NaN on training step ``bad_step``."""

    bad_step = 6

    def __init__(self, config, splits):
        super().__init__(config, splits)
        self.calls = 0

    def loss(self, model, batch):
        self.calls += 1
        loss = super().loss(model, batch)
        return loss * float("nan") if self.calls == self.bad_step else loss


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tokens_file, tmp_path):
    cfg = tiny_config(tokens_file, tmp_path / "run", "ckpt_every=4", "max_steps=10")
    task = NaNAfter(cfg, load_splits(cfg.data))
    with pytest.raises(ConfigError, match=r"diverged at step 6: loss=nan.*checkpoint is step 4"):
        train(cfg, task=task, verbose=False)
    assert latest_checkpoint(tmp_path / "run").name == "ckpt-0000004"


class Stream:
    """Endless batches of a toy regression task: is x[0] + x[1] > 0?"""

    def __init__(self, batch_size: int, seed: int):
        self.gen = torch.Generator().manual_seed(seed)
        self.batch_size = batch_size

    def next(self):
        x = torch.randn(self.batch_size, 4, generator=self.gen)
        return x, (x[:, 0] + x[:, 1] > 0).long()

    def state_dict(self):
        return {"rng": self.gen.get_state()}

    def load_state_dict(self, state):
        self.gen.set_state(state["rng"])


class ToyTask:
    """A non-LM task: the trainer only needs the Task protocol, not a GPT."""

    def build_model(self) -> nn.Module:
        return nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 2))

    def batches(self, batch_size, *, seed, ctx):
        return Stream(batch_size, seed + ctx.rank)

    def loss(self, model, batch):
        x, y = batch
        return nn.functional.cross_entropy(model(x), y)

    def count(self, batch):
        return len(batch[0])

    @torch.no_grad()
    def evaluate(self, model, *, batch_size, max_batches, ctx: RunContext):
        x, y = Stream(512, seed=999).next()
        return {
            "val_loss": self.loss(model, (x, y)).item(),
            "val_acc": (model(x).argmax(-1) == y).float().mean().item(),
        }

    def info(self):
        return {"task": "toy"}


def test_other_tasks_plug_into_the_same_loop(tmp_path):
    cfg = load_config(
        None, [f"out_dir={tmp_path}", "max_steps=60", "eval_every=30", "optim.lr=1e-2", "log.progress=false"]
    )
    summary = train(cfg, task=ToyTask(), verbose=False)
    assert summary["val_acc"] > 0.9
    assert set(weights(tmp_path / "model.safetensors")) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    resumed = train(cfg, task=ToyTask(), resume=True, verbose=False)  # finished: nothing left to do
    assert resumed["steps"] == 60 and resumed["val_acc"] == summary["val_acc"]
    assert resumed["train_loss"] == summary["train_loss"]


# ====================================================================== command line
def test_cli_trains_and_scores_perplexity(tokens_file, tmp_path, capsys, monkeypatch):
    from qkvlab import cli

    cfg = tmp_path / "c.yaml"
    cfg.write_text(tiny_config(tokens_file, tmp_path / "run", "max_steps=6").to_yaml())
    monkeypatch.setattr(sys, "argv", ["qkvlab", "train", str(cfg), "eval_every=0"])
    with pytest.raises(SystemExit) as done:
        cli.main()
    assert done.value.code in (0, None)
    out = capsys.readouterr().out
    assert "checkpoint saved step=6" in out and "done: step 6" in out
    summary = json.loads((tmp_path / "run/summary.json").read_text())

    monkeypatch.setattr(sys, "argv", ["qkvlab", "eval", "ppl", str(tmp_path / "run"), "--json", "--max-batches", "4"])
    with pytest.raises(SystemExit):
        cli.main()
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert math.isclose(result["loss"], summary["val_loss"], rel_tol=1e-6) and result["tokens"] == summary["val_tokens"]

    monkeypatch.setattr(sys, "argv", ["qkvlab", "train", str(cfg), "optim.lrr=1"])
    with pytest.raises(SystemExit) as bad:
        cli.main()
    err = capsys.readouterr().err
    assert bad.value.code == 2 and err.count("\n") == 1 and "Did you mean 'optim.lr'?" in err


@pytest.mark.skipif(
    sys.platform == "win32" or not any(map(__import__("shutil").which, ("cc", "gcc", "clang"))),
    reason="torch.compile on CPU needs a C compiler",
)
def test_compiled_training_loss_matches_eager(tokens_file, tmp_path):
    """compile=true compiles model + loss as one graph; the losses and weights match eager training."""
    runs = {}
    for name, flag in (("eager", "false"), ("compiled", "true")):
        cfg = tiny_config(tokens_file, tmp_path / name, "max_steps=4", "eval_every=0", f"compile={flag}")
        train(cfg, verbose=False)
        runs[name] = [json.loads(r)["loss"] for r in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    losses = [[r for r in runs[n] if r is not None] for n in ("eager", "compiled")]
    assert len(losses[0]) == len(losses[1]) == 4
    assert np.allclose(losses[0], losses[1], rtol=0, atol=1e-4)
    a, b = weights(tmp_path / "eager/model.safetensors"), weights(tmp_path / "compiled/model.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-4) for k in a)
