"""The scaling ladder's training side: the paper's recipe options, a corpus split by book with an
out-of-domain set, the tokenizer saved with each run, FLOPs / MFU, grid blocks and sweep slices."""

from __future__ import annotations

import json
import math
import re
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from qkvlab.costs import bf16_peak, build_on_meta, count_params, params_nonembedding, train_flops_per_token
from qkvlab.data.lm import load_lm_data
from qkvlab.errors import ConfigError
from qkvlab.models import GPT, GPTConfig, get_preset
from qkvlab.study import ResultsStore, SweepSpec, expand, load_sweep, run_sweep
from qkvlab.train import TrainConfig, latest_checkpoint, load_config, train
from qkvlab.train.trainer import build_optimizer, decay_rule

ROOT = Path(__file__).resolve().parent.parent


# ================================================================== the paper's recipe
def _std(model: nn.Module, suffix: str) -> float:
    return torch.cat([p.detach().flatten() for n, p in model.named_parameters() if n.endswith(suffix)]).std().item()


@pytest.mark.parametrize("recipe", ["gpt2", "llama"])
def test_paper_init_gives_every_matrix_the_same_std_and_scaled_shrinks_the_output_projections(recipe: str):
    torch.manual_seed(0)
    shape = dict(n_layers=8, d_model=256, n_heads=8, vocab_size=512, max_seq_len=64, recipe=recipe)
    paper, scaled = GPT(GPTConfig(**shape, init="paper")), GPT(GPTConfig(**shape))
    assert GPTConfig(**shape).init == "scaled"  # the default is unchanged
    for suffix in ("o_proj.weight", "mlp.down.weight", "mlp.up.weight", "wte.weight"):
        assert _std(paper, suffix) == pytest.approx(0.02, rel=0.02)
    factor = 1 / math.sqrt(2 * 8)
    for suffix in ("o_proj.weight", "mlp.down.weight"):
        assert _std(scaled, suffix) == pytest.approx(0.02 * factor, rel=0.02)
    assert _std(scaled, "mlp.up.weight") == pytest.approx(0.02, rel=0.02)
    biases = [p for n, p in paper.named_parameters() if n.endswith(".bias")]
    assert all(torch.count_nonzero(b) == 0 for b in biases)


def test_the_paper_presets_use_the_paper_init_and_a_bad_init_is_refused():
    assert get_preset("paper-300m").init == "paper" and get_preset("paper-1.2b").init == "paper"
    assert get_preset("gpt2-3m").init == "scaled"
    with pytest.raises(ConfigError, match="init must be one of scaled, paper, got 'gpt3'"):
        GPTConfig(init="gpt3")
    with pytest.raises(ConfigError, match="init_std must be a positive number"):
        GPTConfig(init_std=0)


def _groups(model: nn.Module, overrides: list[str]) -> tuple[int, int]:
    opt = build_optimizer(model, load_config(None, ["optim.weight_decay=0.1", *overrides]))
    decayed = [g for g in opt.param_groups if g["weight_decay"] == 0.1]
    plain = [g for g in opt.param_groups if g["weight_decay"] == 0.0]
    return sum(len(g["params"]) for g in decayed), sum(len(g["params"]) for g in plain)


def test_decay_all_decays_every_parameter_and_matrices_skips_biases_and_norms():
    model = GPT(GPTConfig(n_layers=2, d_model=32, n_heads=4, vocab_size=64, max_seq_len=16))
    params = list(model.parameters())
    n_matrices = sum(p.dim() >= 2 for p in params)
    assert _groups(model, ["optim.decay=all"]) == (len(params), 0)
    assert _groups(model, ["optim.decay=matrices"]) == (n_matrices, len(params) - n_matrices)
    assert 0 < n_matrices < len(params)
    # auto follows the model's init: the paper's recipe as a whole, or GPT-2's
    assert _groups(model, []) == (n_matrices, len(params) - n_matrices)
    paper = GPT(GPTConfig(n_layers=2, d_model=32, n_heads=4, vocab_size=64, max_seq_len=16, init="paper"))
    assert decay_rule(paper, load_config(None)) == "all"
    assert _groups(paper, []) == (len(list(paper.parameters())), 0)
    with pytest.raises(ConfigError, match=re.escape("optim.decay must be one of auto, matrices, all, got 'some'")):
        load_config(None, ["optim.decay=some"])


# ================================================================== costs
def test_nonembedding_parameters_and_training_flops_by_hand():
    cfg = GPTConfig(n_layers=2, d_model=32, n_heads=4, vocab_size=100, max_seq_len=16)  # gpt2: tied, learned pos
    model = GPT(cfg)
    counts = count_params(model)
    assert params_nonembedding(model) == counts["total"] - 100 * 32 - 16 * 32
    per_layer = 4 * 32 * 32 + 2 * 32 * 128  # q, k, v, o; MLP up and down
    assert train_flops_per_token(model, seq_len=16) == 6 * (2 * per_layer + 100 * 32) + 12 * 16 * 2 * 32
    untied = GPT(GPTConfig(n_layers=2, d_model=32, n_heads=4, vocab_size=100, max_seq_len=16, recipe="llama"))
    assert params_nonembedding(untied) == count_params(untied)["total"] - 2 * 100 * 32
    # Q-K=V has one projection fewer; the non-embedding count drops by exactly that matrix per layer
    kv = GPT(GPTConfig(n_layers=2, d_model=32, n_heads=4, vocab_size=100, max_seq_len=16, variant="Q-K=V"))
    assert params_nonembedding(model) - params_nonembedding(kv) == 2 * (32 * 32 + 32)
    assert params_nonembedding(build_on_meta(cfg)) == params_nonembedding(model)
    assert bf16_peak("NVIDIA H200") == bf16_peak("NVIDIA H100 80GB HBM3") == 989.4e12
    assert bf16_peak("NVIDIA H100 PCIe") == 756e12 and bf16_peak("Apple M3") is None


# ================================================================== a corpus split by book
def _zip(path: Path, books: dict[str, str]) -> str:
    with zipfile.ZipFile(path, "w") as z:
        for name, text in books.items():
            z.writestr(name, text)
    return str(path)


@pytest.fixture
def split_corpus(tmp_path: Path) -> dict[str, str]:
    words = "the cat sat on a mat and the dog ran to the old red barn while rain fell".split()  # noqa: SIM905

    def book(seed: int, n: int = 400) -> str:
        g = torch.Generator().manual_seed(seed)
        return " ".join(words[i] for i in torch.randint(len(words), (n,), generator=g).tolist())

    return {
        "train": _zip(tmp_path / "train.zip", {f"b{i}.txt": book(i) for i in range(6)}),
        "val": _zip(tmp_path / "val.zip", {"v0.txt": book(100), "v1.txt": book(101)}),
        "ood": _zip(tmp_path / "ood.zip", {"o.txt": book(200, 900)}),
    }


def test_a_given_validation_corpus_and_an_extra_set_are_tokenised_whole(tmp_path: Path, split_corpus):
    data = load_lm_data(
        split_corpus["train"],
        "byte",
        val_source=split_corpus["val"],
        extra={"ood": split_corpus["ood"]},
        cache_dir=tmp_path / "cache",
    )
    assert data.meta["n_docs_train"] == 6 and data.meta["n_docs_val"] == 2
    with zipfile.ZipFile(split_corpus["val"]) as z:
        val_chars = sum(len(z.read(n)) for n in z.namelist())
    with zipfile.ZipFile(split_corpus["ood"]) as z:
        ood_chars = sum(len(z.read(n)) for n in z.namelist())
    assert len(data.val) == val_chars + 2 and len(data.extra["ood"]) == ood_chars + 1  # bytes + one EOT per doc
    again = load_lm_data(
        split_corpus["train"],
        "byte",
        val_source=split_corpus["val"],
        extra={"ood": split_corpus["ood"]},
        cache_dir=tmp_path / "cache",
    )
    assert again.meta["cache_hit"] and (again.extra["ood"] == data.extra["ood"]).all()
    plain = load_lm_data(split_corpus["train"], "byte", val_fraction=0.2, cache_dir=tmp_path / "cache")
    assert plain.meta["cache_path"] != data.meta["cache_path"] and not plain.extra
    with pytest.raises(ConfigError, match="'Dickens' must be a lower-case identifier"):
        load_lm_data(split_corpus["train"], "byte", extra={"Dickens": split_corpus["ood"]}, cache_dir=tmp_path)


def test_a_run_scores_the_extra_set_at_the_end_and_saves_its_tokenizer(tmp_path: Path, split_corpus):
    cfg = TrainConfig.from_dict(
        {
            "model": {"preset": "tiny", "init": "paper"},
            "data": {
                "source": split_corpus["train"],
                "val_source": split_corpus["val"],
                "eval_sources": {"ood": split_corpus["ood"]},
                "tokenizer": "bpe",
                "vocab_size": 300,
                "cache_dir": str(tmp_path / "cache"),
            },
            "batch_size": 4,
            "seq_len": 32,
            "max_steps": 4,
            "eval_every": 2,
            "eval_batches": 1,
            "final_eval_batches": 3,
            "out_dir": str(tmp_path / "run"),
            "log": {"tensorboard": False, "progress": False},
        }
    )
    summary = train(cfg, verbose=False)
    assert summary["val_tokens"] == 3 * 4 * 32 and summary["ood_tokens"] == 3 * 4 * 32
    assert summary["ood_ppl"] == pytest.approx(math.exp(summary["ood_loss"]))
    assert summary["flops_per_token"] > 0 and "mfu" not in summary  # no GPU peak on a CPU
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if r.get("val_loss") is not None]
    assert [r["step"] for r in evals] == [2, 4] and "ood_loss" not in evals[0] and "ood_loss" in evals[1]
    assert evals[0]["val_tokens"] == 4 * 32  # the periodic pass takes eval_batches
    saved = tmp_path / "run" / "tokenizer"
    assert sorted(p.name for p in saved.iterdir()) == ["merges.txt", "meta.json", "vocab.json"]
    from qkvlab.cli import _tokenizer_for
    from qkvlab.data import get_tokenizer

    tok = _tokenizer_for(tmp_path / "run" / "model.safetensors", {}, "bpe")
    cached = get_tokenizer(f"bpe:{next((tmp_path / 'cache' / 'tokenizers').glob('bpe300-*'))}")
    text = "the old red barn while rain fell on a cat"
    assert tok.encode(text) == cached.encode(text) and tok.decode(tok.encode(text)) == text


def test_data_mistakes_are_one_clear_line(split_corpus):
    with pytest.raises(ConfigError, match=re.escape("data.eval_sources key 'Out Of' must be a lower-case name")):
        load_config(None, ["data.eval_sources={'Out Of': x.txt}"])
    with pytest.raises(ConfigError, match=re.escape("data.eval_sources must be a mapping")):
        load_config(None, ["data.eval_sources=[a, b]"])
    from qkvlab.train.trainer import load_splits

    cfg = load_config(None, ["data.source=ids.npy", f"data.val_source={split_corpus['val']}"])
    with pytest.raises(ConfigError, match="need text corpora to tokenise"):
        load_splits(cfg.data)


# ================================================================== sweeps in blocks and slices
BASE = {"model": {"preset": "tiny"}, "seq_len": 32, "batch_size": 4, "optim": {"lr": 1e-3}}


def test_grid_blocks_run_their_union_in_order_and_a_shared_point_once():
    s = SweepSpec.from_dict(
        {
            "base": BASE,
            "grid": [
                {"variant": ["QKV"], "tokens": [256], "optim.lr": [1e-3, 2e-3]},
                {"variant": ["QKV", "Q-K=V"], "tokens": [256], "optim.lr": [1e-3]},
            ],
        }
    )
    plans = expand(s)
    assert [(p.variant, p.config["optim"]["lr"]) for p in plans] == [
        ("QKV", 1e-3),
        ("QKV", 2e-3),
        ("Q-K=V", 1e-3),
    ]
    with pytest.raises(ConfigError, match=r"grid\[1\] must map axis names to lists"):
        SweepSpec.from_dict({"base": BASE, "grid": [{"variant": ["QKV"]}, ["QKV"]]})
    with pytest.raises(ConfigError, match="'grid' is an empty list"):
        SweepSpec.from_dict({"base": BASE, "grid": []})
    with pytest.raises(ConfigError, match="report must be one of variants, ladder, got 'fancy'"):
        SweepSpec.from_dict({"base": BASE, "grid": {"variant": ["QKV"]}, "report": "fancy"})


class Clocked:
    """A fake trainer that advances a fake clock by ``fixed`` + ``seconds_per_token`` x tokens;
    with ``fixed`` it reports its training time apart, as the real trainer does."""

    def __init__(self, clock: list[float], seconds_per_token: float, fixed: float = 0.0):
        self.clock, self.rate, self.fixed, self.calls = clock, seconds_per_token, fixed, []

    def __call__(self, config: dict[str, Any], *, resume: bool = False) -> dict[str, Any]:
        Path(config["out_dir"]).mkdir(parents=True, exist_ok=True)
        self.calls.append(config["max_tokens"])
        train = self.rate * config["max_tokens"]
        self.clock[0] += self.fixed + train
        out = {"tokens": config["max_tokens"], "val_loss": 3.0, "val_ppl": math.exp(3.0)}
        return {**out, "train_time_s": train} if self.fixed else out


def test_a_time_limit_starts_only_runs_expected_to_finish_and_the_next_slice_does_the_rest(tmp_path: Path, monkeypatch):
    clock = [0.0]
    monkeypatch.setattr("qkvlab.study.sweep.time.monotonic", lambda: clock[0])
    monkeypatch.setattr("qkvlab.study.sweep.time.perf_counter", lambda: clock[0])
    s = SweepSpec.from_dict({"base": BASE, "grid": {"variant": ["QKV", "Q-K=V", "GQA-4"], "tokens": [1000, 4000]}})
    ids = [p.run_id for p in expand(s)]
    # 0.01 s per token: the 1000-token runs take 10 s, the 4000-token ones 40 s. With 65 s the
    # first run (no rate known yet) starts, then the other 1000-token runs; of the 4000-token
    # runs only one fits in what is left (65 - 30 = 35 < 40: none does).
    trainer = Clocked(clock, 0.01)
    summary = run_sweep(s, tmp_path, run_fn=trainer, verbose=False, time_limit=65)
    assert trainer.calls == [1000, 1000, 1000] and len(summary.deferred) == 3
    assert "3 left for a later call (time limit)" in str(summary)
    trainer = Clocked(clock, 0.01)
    summary = run_sweep(s, tmp_path, run_fn=trainer, verbose=False, time_limit=85)
    assert trainer.calls == [4000, 4000] and len(summary.deferred) == 1
    summary = run_sweep(s, tmp_path, run_fn=Clocked(clock, 0.01), verbose=False, time_limit=100)
    assert ResultsStore(tmp_path).finished_ids() == set(ids) and not summary.deferred
    with pytest.raises(ConfigError, match="time_limit must be a positive number of seconds"):
        run_sweep(s, tmp_path, run_fn=trainer, verbose=False, time_limit=0)


def test_the_time_estimate_charges_a_runs_fixed_start_up_once_not_per_token(tmp_path: Path, monkeypatch):
    clock = [0.0]
    monkeypatch.setattr("qkvlab.study.sweep.time.monotonic", lambda: clock[0])
    monkeypatch.setattr("qkvlab.study.sweep.time.perf_counter", lambda: clock[0])
    s = SweepSpec.from_dict({"base": BASE, "grid": {"variant": ["QKV", "Q-K=V"], "tokens": [1000, 4000]}})
    # Each run: 30 s fixed (compilation, evaluation) + 0.01 s per token, so 40 s and 70 s. Wall
    # time per token alone would expect 160 s of the 4000-token run after seeing the 1000-token
    # ones; fixed + rate expects its true 70 s, so with 100 s left after the first two it starts.
    trainer = Clocked(clock, 0.01, fixed=30.0)
    only_small = {"tokens": [1000]}
    run_sweep(s, tmp_path, run_fn=trainer, verbose=False, only=only_small)
    summary = run_sweep(s, tmp_path, run_fn=trainer, verbose=False, time_limit=100)
    assert trainer.calls == [1000, 1000, 4000] and len(summary.deferred) == 1
    assert summary.deferred == [p.run_id for p in expand(s) if p.tokens == 4000][1:]


def test_the_time_estimate_prefers_runs_that_shared_their_device_as_this_sweep_will(tmp_path: Path):
    from qkvlab.study.sweep import _Timer

    store = ResultsStore(tmp_path)
    for k, (share, wall, trained) in enumerate([(6, 100.0, 80.0), (6, 110.0, 90.0), (1, 40.0, 20.0)]):
        row = {"run_id": f"r{k}", "status": "ok", "model": "m", "tokens": 1000, "wall_s": wall}
        store.append({**row, "train_time_s": trained, "runs_per_device": share})
    assert _Timer(store, None, runs_per_device=6).estimate("m", 2000) == pytest.approx(20 + 0.085 * 2000)
    assert _Timer(store, None, runs_per_device=1).estimate("m", 2000) == pytest.approx(20 + 0.02 * 2000)
    # no run at this sharing yet: every run of the model; no run of the model: no estimate
    assert _Timer(store, None, runs_per_device=3).estimate("m", 1000) == pytest.approx(20 + 80)
    assert _Timer(store, None, runs_per_device=6).estimate("other", 1000) is None


def test_the_time_estimate_fits_a_line_through_runs_at_two_budgets(tmp_path: Path):
    """A run's own train time includes its compilation, so from one budget the rate comes out
    high; runs at two budgets give the line through their wall times instead."""
    from qkvlab.study.sweep import _Timer

    store = ResultsStore(tmp_path)
    # wall = 50 s + 1 ms per token; train time = 20 s of compilation + 1 ms per token
    for k, tokens in enumerate([10_000, 10_000, 40_000]):
        wall, trained = 50 + tokens / 1000, 20 + tokens / 1000
        store.append({"run_id": f"r{k}", "status": "ok", "model": "m", "tokens": tokens, "wall_s": wall,
                      "train_time_s": trained})  # fmt: skip
    assert _Timer(store, None).estimate("m", 100_000) == pytest.approx(150.0)
    one_budget = ResultsStore(tmp_path / "one")
    one_budget.append({"run_id": "r", "status": "ok", "model": "m", "tokens": 10_000, "wall_s": 60.0,
                       "train_time_s": 30.0})  # fmt: skip
    assert _Timer(one_budget, None).estimate("m", 100_000) == pytest.approx(30 + 300)  # fixed + rate: high


def test_a_sweep_stopped_at_its_limit_keeps_each_runs_step_and_the_next_call_resumes_it(tmp_path: Path):
    """The slices' path (runs in worker processes): at the limit a run still training saves a
    checkpoint and leaves no row; the next call resumes it from there and records it."""
    ids = np.random.default_rng(0).integers(0, 64, size=20_000).astype(np.uint16)
    np.save(tmp_path / "tokens.npy", ids)
    base = {
        "model": {"preset": "tiny", "n_layers": 1, "d_model": 16, "n_heads": 2},
        "data": {"source": str(tmp_path / "tokens.npy")},
        "batch_size": 2,
        "seq_len": 16,
        "max_steps": 100_000,  # far more than the limit allows
        "eval_batches": 1,
        "log": {"every": 50, "progress": False, "tensorboard": False},
    }
    s = SweepSpec.from_dict({"base": base, "grid": {"variant": ["Q-K=V"]}})
    (plan,) = expand(s)
    study = tmp_path / "study"
    with pytest.raises(ConfigError, match=r"--stop-at-limit \(stop_at_limit\) stops runs at the time limit"):
        run_sweep(s, study, devices="cpu,cpu", verbose=False, stop_at_limit=True)
    summary = run_sweep(s, study, devices="cpu,cpu", verbose=False, time_limit=7, stop_at_limit=True)
    assert summary.stopped == [plan.run_id] and summary.deferred == [plan.run_id] and not summary.ran
    assert "1 stopped with a checkpoint (the next call resumes them)" in str(summary)
    assert not ResultsStore(study).latest()  # no row for a run that has not finished
    saved = latest_checkpoint(study / "runs" / plan.run_id)
    assert saved is not None  # it reached its training loop well inside the limit
    step = int(saved.name.split("-")[1])
    assert 0 < step < 100_000
    # the next call resumes the run from that step (and stops it again at its own limit)
    summary = run_sweep(s, study, devices="cpu,cpu", verbose=False, time_limit=7, stop_at_limit=True)
    assert summary.stopped == [plan.run_id]
    assert int(latest_checkpoint(study / "runs" / plan.run_id).name.split("-")[1]) > step
    metrics = [json.loads(line) for line in (study / "runs" / plan.run_id / "metrics.jsonl").read_text().splitlines()]
    steps = [row["step"] for row in metrics]
    assert steps == sorted(steps) and len(steps) == len(set(steps))  # went on from the step, logged nothing twice
    # one device, in this process: a timer asks the run to stop, the same way
    summary = run_sweep(s, tmp_path / "one", devices="cpu", verbose=False, time_limit=3, stop_at_limit=True)
    assert summary.stopped == [plan.run_id] and latest_checkpoint(tmp_path / "one" / "runs" / plan.run_id)


def test_the_ladder_study_config_loads_and_expands_to_the_intended_grid():
    spec = load_sweep(ROOT / "configs" / "studies" / "ladder-gutenberg.yaml")
    assert spec.report == "ladder" and spec.paper_table == "table4"
    plans = expand(spec)
    assert all(p.status == "pending" for p in plans)
    base = TrainConfig.from_dict({**plans[0].config, "out_dir": "unused"})
    assert base.data.val_source.endswith("gutenberg-val.zip") and "dickens" in base.data.eval_sources
    assert base.model["init"] == "paper" and base.optim.decay == "all" and base.compile
    assert base.final_eval_batches * base.batch_size * base.seq_len >= 1_130_087  # the whole val split
    sizes = {p.model for p in plans if p.model.startswith("gpt2-")}
    nonemb = {m: params_nonembedding(build_on_meta(get_preset(m, vocab_size=8192))) for m in sizes}
    assert len(sizes) >= 4 and max(nonemb.values()) / min(nonemb.values()) >= 20
    lr_points = {}
    for p in plans:
        if p.variant == "QKV" and p.tokens == 9_850_000 and p.seed == 0:
            lr_points.setdefault(p.model, set()).add(p.config["optim"]["lr"])
    assert all(len(lrs) >= 3 for lrs in lr_points.values()) and len(lr_points) >= 6


def test_only_selects_grid_points_in_any_spelling_and_names_a_value_no_point_has(tmp_path: Path):
    from qkvlab.study.sweep import select

    s = SweepSpec.from_dict(
        {"base": BASE, "grid": {"variant": ["QKV", "Q-K=V"], "tokens": [1000, 4000], "optim.lr": [1e-3, 2e-3]}}
    )
    plans = expand(s)
    assert len(select(plans, None)) == 8
    chosen = select(plans, {"variant": ["q_kv"], "tokens": ["4k"], "optim.lr": ["2e-3"]})
    assert [(p.variant, p.tokens, p.config["optim"]["lr"]) for p in chosen] == [("Q-K=V", 4000, 2e-3)]
    with pytest.raises(ConfigError, match="No grid point has model=gpt2-3m"):
        select(plans, {"model": ["gpt2-3m"]})
    trainer = Clocked([0.0], 0.0)
    summary = run_sweep(s, tmp_path, run_fn=trainer, verbose=False, only={"tokens": ["1000"]})
    assert trainer.calls == [1000] * 4 and summary.planned == 4


# ================================================================== uptraining from a checkpoint
def test_init_from_starts_a_run_from_the_checkpoint_and_refuses_another_model(tmp_path: Path):
    from qkvlab import load_model

    tokens = torch.randint(0, 64, (6000,), generator=torch.Generator().manual_seed(0)).numpy().astype("uint16")
    np.save(tmp_path / "tokens.npy", tokens)
    common = {
        "data": {"source": str(tmp_path / "tokens.npy")},
        "batch_size": 4,
        "seq_len": 16,
        "eval_batches": 1,
        "log": {"progress": False, "tensorboard": False},
    }
    model = {"preset": "tiny", "variant": "Q-K=V", "n_layers": 1, "d_model": 32, "n_heads": 4}
    first = TrainConfig.from_dict({**common, "model": model, "max_steps": 3, "out_dir": str(tmp_path / "a")})
    train(first, verbose=False)
    source = load_model(tmp_path / "a" / "model.safetensors")
    # A second run from those weights, at a rate so small that one step leaves them as they were.
    cfg = {**common, "init_from": str(tmp_path / "a"), "max_steps": 1, "optim": {"lr": 1e-12}, "seed": 5}
    cfg["model"] = {"dropout": 0.1, "variant": "q_kv"}  # a dropout change is allowed; the variant agrees
    second = TrainConfig.from_dict({**cfg, "out_dir": str(tmp_path / "b")})
    resolved = second.model_config(64)
    assert resolved.variant == source.config.variant and resolved.dropout == 0.1
    train(second, verbose=False)
    after = load_model(tmp_path / "b" / "model.safetensors")
    for (name, a), (_, b) in zip(source.state_dict().items(), after.state_dict().items(), strict=True):
        assert torch.allclose(a, b, atol=1e-9), name
    with pytest.raises(ConfigError, match=r"model.variant='QKV' differs from the checkpoint"):
        TrainConfig.from_dict({**cfg, "model": {"variant": "QKV"}, "out_dir": str(tmp_path / "c")})
    with pytest.raises(ConfigError, match=r"init_from='.*nowhere': no weights file there"):
        TrainConfig.from_dict({**cfg, "model": {}, "init_from": str(tmp_path / "nowhere"), "out_dir": "x"})
