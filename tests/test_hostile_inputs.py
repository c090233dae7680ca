"""Inputs a hostile review tried: nothing lost, nothing wrongly accepted, one clear error with a fix that works.

Each test here failed before its fix; tests/test_error_suite.py checks the same classes end to
end through the command line.
"""

from __future__ import annotations

import codecs
import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from filelock import FileLock
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

import qkvlab.train.state
from qkvlab import GPT, ConfigError, EncoderConfig, GPTConfig, SetConfig, ViTConfig, load_model, parse_variant
from qkvlab.data.corpus import load_corpus
from qkvlab.study import ResultsStore, SweepSpec, expand, load_sweep, run_sweep
from qkvlab.train import DataConfig, latest_checkpoint, load_config, load_splits, train
from qkvlab.train.trainer import LMTask

TINY = ["model.n_layers=1", "model.d_model=32", "model.n_heads=4"]


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tokens_file(tmp_path_factory) -> Path:
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("data") / "tokens.npy"
    np.save(path, rng.integers(0, 64, size=4000).astype(np.uint16))
    return path


def tiny(tokens_file: Path, out_dir: Path, *overrides: str):
    base = [
        f"data.source={tokens_file}",
        f"out_dir={out_dir}",
        *TINY,
        "batch_size=4",
        "seq_len=16",
        "max_steps=4",
        "ckpt_every=2",
        "eval_every=0",
        "eval_batches=1",
        "log.progress=false",
        "log.tensorboard=false",
        "schedule.warmup_steps=1",
    ]
    return load_config(None, [*base, *overrides])


def rewind(out: Path, step: int) -> None:
    """Leave ``out`` as a run killed right after its checkpoint of ``step``."""
    name = f"ckpt-{step:07d}"
    for ckpt in (out / "checkpoints").glob("ckpt-*"):
        if ckpt.name > name:
            shutil.rmtree(ckpt)
    (out / "checkpoints" / "latest").write_text(name + "\n")
    for done in ("summary.json", "model.safetensors"):
        (out / done).unlink(missing_ok=True)


def one_line(err: pytest.ExceptionInfo, *fragments: str) -> str:
    message = str(err.value)
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return message


# ====================================================================== nothing lost
def test_a_new_run_refuses_a_folder_holding_another_runs_files(tokens_file, tmp_path):
    out = tmp_path / "other"
    out.mkdir()
    files = {"model.safetensors": b"weights", "summary.json": b"{}", "metrics.jsonl": b"{}\n", "config.yaml": b"a: 1\n"}
    for name, data in files.items():
        (out / name).write_bytes(data)
    for resume in (False, True):  # no checkpoint: a resume cannot show these are its files either
        with pytest.raises(ConfigError) as err:
            train(tiny(tokens_file, out), resume=resume, verbose=False)
        one_line(err, str(out))
    assert {n: (out / n).read_bytes() for n in files} == files  # untouched
    note = out / "notes.txt"
    note.write_text("mine")
    summary = train(tiny(tokens_file, out), force=True, verbose=False)  # --force replaces the run's files only
    assert summary["steps"] == 4 and note.read_text() == "mine"
    assert json.loads((out / "summary.json").read_text())["steps"] == 4
    with pytest.raises(ConfigError, match="pass only one"):
        train(tiny(tokens_file, out), resume=True, force=True, verbose=False)


def test_force_keeps_the_previous_run_when_the_new_one_cannot_start(tokens_file, tmp_path):
    out = tmp_path / "victim"
    train(tiny(tokens_file, out), verbose=False)
    before = sorted(p.relative_to(out).as_posix() for p in out.rglob("*"))
    bad_data = tiny(tokens_file, out, f"data.source={tmp_path / 'missing.txt'}")
    np.save(tmp_path / "short.npy", np.arange(20, dtype=np.uint16))  # too short for a validation window
    short = tiny(tokens_file, out, f"data.source={tmp_path / 'short.npy'}")
    for config, name in ((bad_data, "missing.txt"), (short, "seq_len=16")):
        with pytest.raises(ConfigError) as err:
            train(config, force=True, verbose=False)
        one_line(err, name)
        assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == before


def test_force_does_not_delete_files_that_only_share_a_runs_names(tokens_file, tmp_path):
    out = tmp_path / "project"
    (out / "tokenizer").mkdir(parents=True)
    (out / "tokenizer" / "vocab.json").write_text("my notes")
    (out / "config.yaml").write_text("# my own config\nmax_steps: 2\n")
    for resume, force in ((False, False), (True, False), (False, True)):
        with pytest.raises(ConfigError) as err:
            train(tiny(tokens_file, out), resume=resume, force=force, verbose=False)
        message = one_line(err, str(out), "config.yaml", "another out_dir")
        assert "pass --force" not in message
    assert (out / "tokenizer" / "vocab.json").read_text() == "my notes"
    assert (out / "config.yaml").read_text().startswith("# my own config")


def test_interop_force_refuses_an_output_that_holds_its_input_or_the_current_folder(tmp_path, monkeypatch):
    from qkvlab.checkpoint import save_model
    from qkvlab.interop import convert_checkpoint

    run = tmp_path / "runs" / "tiny"
    run.mkdir(parents=True)
    model = GPT(GPTConfig(recipe="llama", vocab_size=64, n_layers=1, d_model=32, n_heads=4, max_seq_len=32))
    save_model(model, run / "model.safetensors")
    (tmp_path / "runs" / "other.txt").write_text("precious")
    for out in (run, run.parent, tmp_path):
        with pytest.raises(ConfigError) as err:
            convert_checkpoint(run, out, force=True)
        one_line(err, str(out), "--force would delete it", "new folder")
    with pytest.raises(ConfigError) as err:  # the weights file named itself, inside the output
        convert_checkpoint(run / "model.safetensors", run, force=True)
    one_line(err, "holds the input")
    monkeypatch.chdir(tmp_path / "runs")
    for out in (".", ".."):
        with pytest.raises(ConfigError) as err:
            convert_checkpoint(run, out, force=True)
        one_line(err, "current folder")
    assert (run / "model.safetensors").is_file() and (tmp_path / "runs" / "other.txt").read_text() == "precious"
    bad_values = [
        ({"calib": "stdlib", "init": "fit", "calib_seq_len": 0}, "--calib-seq-len must be at least 2"),
        ({"calib": "stdlib", "init": "fit", "calib_tokens": 1}, "--calib-tokens must be at least one calibration"),
        ({"kv_heads": 0}, "--kv-heads must be at least 1"),
        ({"kv_heads": -2}, "--kv-heads must be at least 1"),
    ]
    for kwargs, fragment in bad_values:
        with pytest.raises(ConfigError) as err:
            convert_checkpoint(run, tmp_path / "runs" / "converted", **kwargs)
        one_line(err, fragment)
    convert_checkpoint(run, tmp_path / "runs" / "converted")  # a new folder beside them is the fix
    convert_checkpoint(run, tmp_path / "runs" / "converted", force=True)  # and replacing it
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["converted", "other.txt", "tiny"]


def test_a_bad_token_file_is_one_clear_error_before_the_run_writes_anything(tmp_path):
    files = {
        "negative.npy": np.array([-1, 2, 3] * 100),
        "huge.npy": np.array([0, 2**40] * 100),
        "objects.npy": np.array([{"a": 1}] * 10, dtype=object),
    }
    for name, array in files.items():
        np.save(tmp_path / name, array, allow_pickle=True)
    good = np.random.default_rng(0).integers(0, 300, 2000)
    np.save(tmp_path / "good.npy", good)
    (tmp_path / "truncated.npy").write_bytes((tmp_path / "good.npy").read_bytes()[:500])
    fragments = {
        "negative.npy": "token id -1",
        "huge.npy": "token id 1099511627776",
        "objects.npy": "not a plain integer array",
        "truncated.npy": "damaged",
    }
    for name, fragment in fragments.items():
        out = tmp_path / f"run-{name}"
        with pytest.raises(ConfigError) as err:
            train(tiny(tmp_path / name, out), verbose=False)
        one_line(err, name, fragment)
        assert not out.exists() or not any(out.iterdir())  # nothing a corrected rerun would have to --force


def test_budgets_with_decimals_are_the_whole_numbers_they_name():
    from qkvlab.study.spec import parse_tokens

    assert [parse_tokens(v) for v in ("4.1M", "8.2M", "2.01k", "1.5M", 1e6)] == [
        4_100_000,
        8_200_000,
        2010,
        1_500_000,
        10**6,
    ]
    for bad in ("1e400", "1.5X", "0.5", 1.5, True):
        with pytest.raises(ConfigError):
            parse_tokens(bad)


def test_a_corpus_trained_bpe_reads_other_text_with_its_own_vocabulary(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from qkvlab.cli import app

    monkeypatch.setenv("QKVLAB_CACHE", str(tmp_path / "cache"))
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "omega", "sigma", "theta", "kappa"]
    (tmp_path / "train.txt").write_text("\n\n".join(" ".join(rng.choice(words, 12)) for _ in range(900)))
    (tmp_path / "other.txt").write_text("\n\n".join(" ".join(rng.choice(words[::-1], 9)) + " zeta" for _ in range(600)))
    out = tmp_path / "run"
    train(tiny(tmp_path / "train.txt", out, "data.tokenizer=bpe:300"), verbose=False)
    base = ["eval", "ppl", str(out), "--data", str(tmp_path / "other.txt"), "--json", "--max-batches", "2"]
    implicit = CliRunner().invoke(app, base)
    explicit = CliRunner().invoke(app, [*base, "--tokenizer", f"bpe:{out / 'tokenizer'}"])
    assert implicit.exit_code == 0 and explicit.exit_code == 0, implicit.output + explicit.output
    assert json.loads(implicit.stdout)["loss"] == json.loads(explicit.stdout)["loss"]
    from qkvlab.interop.common import tokenizer_folder

    kept = out / "checkpoints" / "ckpt-0000002" / "model.safetensors"
    assert tokenizer_folder(kept) == out / "tokenizer"  # a kept checkpoint finds its run's tokenizer


def test_results_of_a_kept_checkpoint_go_where_pruning_does_not_reach(tmp_path):
    from qkvlab.harness.runner import run_folder
    from qkvlab.train.state import results_folder

    run = tmp_path / "run"
    ckpt = run / "checkpoints" / "ckpt-0000004"
    ckpt.mkdir(parents=True)
    (ckpt / "model.safetensors").write_bytes(b"")
    for path in (ckpt, ckpt / "model.safetensors"):
        assert results_folder(path) == run and run_folder(path) == run  # harness.json goes there too
    (tmp_path / "ckpt-0000004").mkdir()  # the same name outside a run's checkpoints/ is an ordinary folder
    assert results_folder(tmp_path / "ckpt-0000004") == tmp_path / "ckpt-0000004"
    assert results_folder(run / "model.safetensors") == run


def test_a_run_killed_before_its_first_checkpoint_resumes_as_the_same_run(tokens_file, tmp_path):
    out = tmp_path / "run"
    train(tiny(tokens_file, out), verbose=False)
    shutil.rmtree(out / "checkpoints")
    (out / "summary.json").unlink()
    (out / "model.safetensors").unlink()
    with pytest.raises(ConfigError, match="pass --resume"):
        train(tiny(tokens_file, out), verbose=False)
    assert train(tiny(tokens_file, out), resume=True, verbose=False)["steps"] == 4  # config.yaml shows it is this run


def _other_study(root: Path) -> dict:
    sweep = {"name": "other", "base": {"model": {"preset": "tiny"}, "seq_len": 8}, "grid": {"seed": [0]}}
    root.mkdir(parents=True)
    (root / "sweep.yaml").write_text(yaml.safe_dump(sweep))
    ResultsStore(root).append({"run_id": "x", "status": "ok", "val_loss": 1.0})
    return sweep


def fake_run(config, *, resume=False):
    out = Path(config["out_dir"])
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.jsonl").write_text(json.dumps({"step": 1, "val_loss": 2.0, "val_ppl": math.exp(2.0)}) + "\n")
    return {"tokens": 64, "val_loss": 2.0, "val_ppl": math.exp(2.0)}


BASE = {"model": {"preset": "tiny"}, "seq_len": 32, "batch_size": 4, "optim": {"lr": 1e-3}}


def test_a_sweep_refuses_another_studys_folder(tmp_path):
    study = tmp_path / "study"
    stored = _other_study(study)
    before = (study / "sweep.yaml").read_text(), (study / "results.jsonl").read_text()
    mine = SweepSpec.from_dict({"name": "mine", "base": BASE, "grid": {"variant": ["QKV"]}})
    with pytest.raises(ConfigError) as err:
        run_sweep(mine, study, run_fn=fake_run, verbose=False)
    one_line(err, str(study), "'other'", "--force")
    same_name = SweepSpec.from_dict({"name": "other", "base": BASE, "grid": {"variant": ["QKV"]}})
    with pytest.raises(ConfigError) as err:
        run_sweep(same_name, study, run_fn=fake_run, verbose=False)
    one_line(err, "another base config", "seq_len")
    assert ((study / "sweep.yaml").read_text(), (study / "results.jsonl").read_text()) == before
    run_sweep(mine, study, run_fn=fake_run, verbose=False, force=True)  # forced: rows of both stay
    assert yaml.safe_load((study / "sweep.yaml").read_text())["name"] == "mine" != stored["name"]
    assert len(ResultsStore(study).read()) == 2
    seeded = tmp_path / "seeded"
    ResultsStore(seeded).append({"run_id": "y", "status": "ok"})  # results seeded by hand, no sweep.yaml yet
    assert run_sweep(mine, seeded, run_fn=fake_run, verbose=False).ran
    assert yaml.safe_load((seeded / "sweep.yaml").read_text())["name"] == "mine"


def test_sweep_messages_give_fixes_that_are_valid(tmp_path, monkeypatch):
    from qkvlab.study.sweep import check_same_study, parse_devices

    with pytest.raises(ConfigError) as err:
        SweepSpec.from_dict({"name": "s", "base": BASE, "grid": {"variant": []}})
    one_line(err, "grid.variant must be a non-empty list, e.g. [QKV, Q-K=V]")
    with pytest.raises(ConfigError) as err:
        SweepSpec.from_dict({"name": "../../escape", "base": BASE, "grid": {"variant": ["QKV"]}})
    one_line(err, "'../../escape'", "plain name")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError) as err:
        parse_devices("7")
    message = one_line(err, "Device 7", "0 CUDA device(s)", "run without --devices")
    assert "below 0" not in message
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "sweep.yaml").write_text("todo: write the sweep\n")  # someone's own file of that name
    spec = SweepSpec.from_dict({"name": "s", "base": BASE, "grid": {"variant": ["QKV"]}})
    with pytest.raises(ConfigError) as err:
        check_same_study(spec, folder)
    one_line(err, "is not a study's sweep file", "another --out")


def test_a_report_leaves_out_rows_it_cannot_use_and_says_which(tmp_path):
    from qkvlab.study.report import write_report
    from qkvlab.study.results import UnusableRowWarning

    study = tmp_path / "study"
    spec = SweepSpec.from_dict({"name": "s", "base": BASE, "grid": {"variant": ["QKV", "Q-K=V"]}})
    run_sweep(spec, study, run_fn=fake_run, verbose=False)
    store = ResultsStore(study)
    good = store.read()[-1]
    store.append({"run_id": 5, "status": "ok"})  # a foreign row
    store.append({**good, "run_id": "hand-edited", "val_loss": "abc"})
    with pytest.warns(UnusableRowWarning) as caught:
        report = write_report(study, plots=False)
    messages = [str(w.message) for w in caught]
    assert any("run 5" in m and "run_id is 5" in m for m in messages)
    assert any("'hand-edited'" in m and "val_loss is 'abc'" in m for m in messages)
    assert Path(report).read_text().count("Q-K=V") >= 1  # the usable rows are reported


def test_the_same_study_rerun_into_its_folder_resumes_and_may_grow(tmp_path):
    """Same name and base: a rerun continues; added grid points and blocks run, finished ones do not."""
    study = tmp_path / "study"
    first = {"name": "s", "base": BASE, "grid": {"variant": ["QKV"], "seed": [0]}}
    run_sweep(SweepSpec.from_dict(first), study, run_fn=fake_run, verbose=False)
    grown = {**first, "grid": [{"variant": ["QKV", "Q-K=V"], "seed": [0]}, {"variant": ["QKV"], "seed": [1]}]}
    grown["description"] = "now with Q-K=V"  # settings outside the name and base may change too
    summary = run_sweep(SweepSpec.from_dict(grown), study, run_fn=fake_run, verbose=False)
    assert len(summary.already_done) == 1 and len(summary.ran) == 2
    assert len(ResultsStore(study).finished_ids()) == 3


def test_a_second_sweep_on_one_folder_is_refused(tmp_path):
    study = tmp_path / "study"
    study.mkdir()
    s = SweepSpec.from_dict({"name": "s", "base": BASE, "grid": {"variant": ["QKV"]}})
    with FileLock(str(study / ".sweep.lock")), pytest.raises(ConfigError) as err:
        run_sweep(s, study, run_fn=fake_run, verbose=False)
    one_line(err, "Another qkvlab sweep is running", str(study), "another --out")
    assert not (study / "sweep.yaml").exists() and not (study / "results.jsonl").exists()
    assert run_sweep(s, study, run_fn=fake_run, verbose=False).ran  # the lock was released


# ====================================================================== wrongly accepted
def test_a_key_written_twice_in_a_config_or_sweep_file_is_refused(tmp_path):
    config = tmp_path / "dup.yaml"
    config.write_text("optim:\n  lr: 0.1\nmax_steps: 2\noptim:\n  eps: 0.5\n")  # the first optim's lr was lost
    with pytest.raises(ConfigError) as err:
        load_config(config)
    one_line(err, "'optim'", "lines 1 and 4", "write it once")
    nested = tmp_path / "nested.yaml"
    nested.write_text("optim:\n  lr: 0.1\n  lr: 0.2\n")
    with pytest.raises(ConfigError) as err:
        load_config(nested)
    one_line(err, "'lr'", "lines 2 and 3")
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text("name: s\nbase: {}\ngrid:\n  variant: [QKV]\ngrid:\n  seed: [0, 1]\n")
    with pytest.raises(ConfigError) as err:
        load_sweep(sweep)
    one_line(err, "'grid'", "lines 3 and 5")
    from qkvlab.train.config import load_yaml

    merged = load_yaml("a: &x {p: 1, q: 1}\nb:\n  <<: *x\n  q: 2\n")  # a key over a merge is no duplicate
    assert merged == {"a": {"p": 1, "q": 1}, "b": {"p": 1, "q": 2}}


def test_an_empty_config_file_is_refused(tmp_path):
    path = tmp_path / "empty.yaml"
    for text in ("", "# only a comment\n"):
        path.write_text(text)
        with pytest.raises(ConfigError) as err:
            load_config(path)
        one_line(err, str(path), "empty", "configs/lm/tiny-stdlib.yaml")
    path.write_text("{}\n")  # an explicit empty mapping is a deliberate "all defaults"
    assert load_config(path).max_steps == 1000
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(f"base: {path.name}\ngrid: {{variant: [QKV]}}\n")
    path.write_text("")
    with pytest.raises(ConfigError, match="is empty"):
        load_sweep(sweep)


@pytest.mark.parametrize(
    ("change", "where"),
    [("model.n_heads=2", "model.n_heads"), ("model.variant=Q=K=V+linear", "model.variant")],
)
def test_resume_checks_the_checkpoints_own_config_when_config_yaml_is_gone(tokens_file, tmp_path, change, where):
    out = tmp_path / "run"
    train(tiny(tokens_file, out), verbose=False)
    rewind(out, 2)
    (out / "config.yaml").unlink()
    with pytest.raises(ConfigError) as err:
        train(tiny(tokens_file, out, change), resume=True, verbose=False)
    one_line(err, where, "checkpoint ckpt-0000002")
    assert train(tiny(tokens_file, out), resume=True, verbose=False)["steps"] == 4
    assert (out / "config.yaml").is_file()  # written again


def test_resume_checks_the_model_against_the_checkpoints_model_metadata(tokens_file, tmp_path):
    out = tmp_path / "run"
    train(tiny(tokens_file, out), verbose=False)
    rewind(out, 2)
    weights = latest_checkpoint(out) / "model.safetensors"
    with safe_open(str(weights), "pt") as f:
        meta = f.metadata()
    stored = json.loads(meta["config"])
    save_file(load_file(str(weights)), str(weights), metadata={**meta, "config": json.dumps({**stored, "n_heads": 8})})
    with pytest.raises(ConfigError) as err:
        train(tiny(tokens_file, out), resume=True, verbose=False)
    one_line(err, "n_heads: checkpoint 8 vs model 4")


@pytest.mark.parametrize(
    ("text", "canonical"),
    [("q k v", None), ("Q K V", None), ("GQA-1 6", None), ("Q - K = V", "q_kv"), (" q_kv + mqa ", "q_kv+mqa")],
)
def test_variant_blanks_are_stripped_at_the_ends_and_separators_only(text, canonical):
    if canonical is None:
        with pytest.raises(ConfigError) as err:
            parse_variant(text)
        one_line(err, repr(text), "blank inside a name")
    else:
        assert parse_variant(text).id == canonical
    assert parse_variant("Q=K=V (linear)").id == "qkv+linear"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("head_dim", 0),
        ("d_ff", 0),
        ("d_ff", -3),
        ("bias", "maybe"),
        ("vocab_size", 0),
        ("norm_eps", -1),
        ("norm_eps", float("nan")),
        ("dropout", 1.5),
        ("attn_dropout", -0.1),
        ("emb_dropout", float("nan")),
        ("rope_theta", 0),
        ("pos2d_channels", 0),
        ("tie_embeddings", "yes"),
        ("head_dim", 2.5),
        ("init_std", float("inf")),
    ],
)
def test_model_fields_are_validated(field, value):
    with pytest.raises(ConfigError) as err:
        GPTConfig(n_layers=1, d_model=32, n_heads=4, **{field: value})
    one_line(err, field, repr(value))


def test_other_families_validate_their_fields():
    for make, field in [
        (lambda: EncoderConfig(vocab_size=0), "vocab_size"),
        (lambda: EncoderConfig(n_labels=0), "n_labels"),
        (lambda: ViTConfig(patch_size=0), "patch_size"),
        (lambda: ViTConfig(channels=-1), "channels"),
        (lambda: SetConfig(in_features=0), "in_features"),
    ]:
        with pytest.raises(ConfigError) as err:
            make()
        one_line(err, field)


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("seed=-1", "seed must be in [0, 4294967295]"),
        ("data.seed=4294967296", "data.seed must be in"),
        ("device=cuda:x", "cuda[:N]"),
        ("device=cpu:0", "cuda[:N]"),
        ("optim.eps=.inf", "optim.eps"),
        ("schedule.min_lr=.inf", "schedule.min_lr"),
        ("data.encoding=klingon", "data.encoding 'klingon'"),
        ("data.encoding=rot13", "data.encoding 'rot13' is not a text encoding"),
        ("model.preset=[tiny]", "Unknown model.preset ['tiny']"),
        ("model.backend=[x]", "Unknown attention backend ['x']"),
        ("data.encoding=base64", "data.encoding 'base64' is not a text encoding"),
        ("model.dropout=1.5", "dropout must be a probability"),
    ],
)
def test_out_of_range_config_values_never_reach_torch(override, fragment):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    one_line(err, fragment)


# ====================================================================== fixes that work
def test_yaml_1_1_exponents_are_numbers_in_configs_and_sweeps(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("optim:\n  lr: 1e-3\n  eps: 1E-8\nmax_tokens: 4e5\nout_dir: '1e5'\n")
    loaded = load_config(cfg)
    assert (loaded.optim.lr, loaded.optim.eps, loaded.max_tokens) == (1e-3, 1e-8, 400_000)
    assert loaded.out_dir == "1e5"  # quoted stays text
    sweep = tmp_path / "s.yaml"
    sweep.write_text(
        "base: c.yaml\ngrid:\n  optim.lr: [1e-3, 3e-3]\n  tokens: [1e6]\noverrides:\n  schedule.min_lr: 1e-5\n"
    )
    plans = expand(load_sweep(sweep))
    assert [p.config["optim"]["lr"] for p in plans] == [1e-3, 3e-3]
    assert plans[0].config["schedule"]["min_lr"] == 1e-5 and plans[0].tokens == 1_000_000


class Payload:
    """Pickles as a call to os.system: what a hostile state.pt would run if it were unpickled."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_corrupt_or_hostile_state_names_the_previous_checkpoint(tokens_file, tmp_path):
    out = tmp_path / "run"
    cfg = tiny(tokens_file, out, "max_steps=4")
    train(cfg, verbose=False)
    state = latest_checkpoint(out) / "state.pt"
    good = state.read_bytes()
    marker = tmp_path / "payload-ran"
    torch.save({"step": 4, "x": Payload(marker)}, state)
    with pytest.raises(ConfigError) as err:
        train(cfg, resume=True, verbose=False)
    msg = one_line(err, str(state), "corrupt or unsafe", "ckpt-0000002", "--resume")
    assert "weights_only=False" not in msg and not marker.exists()
    state.write_bytes(good[: len(good) // 2])
    with pytest.raises(ConfigError) as err:
        train(cfg, resume=True, verbose=False)
    one_line(err, str(state), "corrupt", "ckpt-0000002")
    torch.save({"step": 4}, state)  # loads, but is not a training state
    with pytest.raises(ConfigError) as err:
        train(cfg, resume=True, verbose=False)
    one_line(err, "corrupt", "ckpt-0000002")
    # The advice works: point 'latest' at the previous checkpoint and resume.
    (out / "checkpoints" / "latest").write_text("ckpt-0000002\n")
    assert train(cfg, resume=True, verbose=False)["steps"] == 4


@pytest.mark.parametrize(
    "error", [RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed"), SafetensorError]
)
def test_a_full_disk_during_a_save_is_one_clear_error(tokens_file, tmp_path, monkeypatch, error):
    real, calls = qkvlab.train.state.save_weights, []

    def full(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise (
                error("Error while serializing: IoError(No space left on device)")
                if error is SafetensorError
                else error
            )
        return real(*args, **kwargs)

    monkeypatch.setattr(qkvlab.train.state, "save_weights", full)
    with pytest.raises(ConfigError) as err:
        train(tiny(tokens_file, tmp_path / "run"), verbose=False)
    one_line(err, "checkpoint of step 4", "previous checkpoint (step 2) is intact", "--resume")
    monkeypatch.undo()
    assert train(tiny(tokens_file, tmp_path / "run"), resume=True, verbose=False)["steps"] == 4


class NaNAt3(LMTask):
    calls = 0

    def loss(self, model, batch):
        type(self).calls += 1
        loss = super().loss(model, batch)
        return loss * float("nan") if type(self).calls == 3 else loss


def test_the_advice_after_a_divergence_works(tokens_file, tmp_path):
    out = tmp_path / "run"
    cfg = tiny(tokens_file, out, "ckpt_every=2", "optim.lr=1e-2")
    with pytest.raises(ConfigError) as err:
        train(cfg, task=NaNAt3(cfg, load_splits(cfg.data)), verbose=False)
    msg = one_line(err, "diverged at step 3", "step 2", "--resume optim.lr=0.005")
    assert "--force" in msg
    lower = tiny(tokens_file, out, "ckpt_every=2", "optim.lr=0.005")
    assert train(lower, resume=True, verbose=False)["steps"] == 4
    assert load_config(out / "config.yaml").optim.lr == 0.005  # the run records the rate it continued with
    rows = [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["lr"] <= 0.005


def test_a_torn_last_metrics_line_does_not_block_resume(tokens_file, tmp_path):
    out = tmp_path / "run"
    cfg = tiny(tokens_file, out, "log.every=1")
    train(cfg, verbose=False)
    rewind(out, 2)
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "tok')  # killed mid-line
    assert train(cfg, resume=True, verbose=False)["steps"] == 4
    rows = [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]


def test_a_suggested_encoding_is_a_key_that_works(tmp_path):
    text = "Caf\u00e9 cr\u00e8me br\u00fbl\u00e9e\n\n" * 2000
    path = tmp_path / "latin.txt"
    path.write_bytes(text.encode("latin-1"))
    with pytest.raises(ConfigError) as err:
        load_splits(DataConfig(source=str(path), cache_dir=str(tmp_path / "c")))
    one_line(err, "data.encoding=NAME", "latin-1")
    cfg = load_config(None, [f"data.source={path}", "data.encoding=latin-1", f"data.cache_dir={tmp_path / 'c'}"])
    splits = load_splits(cfg.data)
    assert len(splits.train) + len(splits.val) > 0


def test_a_one_document_corpus_suggests_fixes_that_the_trainer_accepts(tmp_path):
    path = tmp_path / "short.txt"
    path.write_text("tiny text\n" * 20)
    with pytest.raises(ConfigError) as err:
        load_splits(DataConfig(source=str(path), cache_dir=str(tmp_path / "c")))
    one_line(err, "1 document", "data.val_source")
    cfg = load_config(None, [f"data.source={path}", f"data.val_source={path}", f"data.cache_dir={tmp_path / 'c'}"])
    assert len(load_splits(cfg.data).val) > 0
    with pytest.raises(ConfigError) as err:
        load_config(None, ["data.val_fraction=0"])
    one_line(err, "data.val_fraction", "data.val_source")


@pytest.mark.parametrize("codec", ["utf-16", "utf-16-be", "utf-32"])
def test_utf16_and_utf32_files_are_text(tmp_path, codec):
    text = "héllo wörld\n\n" * 50
    path = tmp_path / "wide.txt"
    data = text.encode(codec)
    if codec == "utf-16-be":
        data = codecs.BOM_UTF16_BE + data
    path.write_bytes(data)
    assert "".join(load_corpus(path).documents) == text
    bare = tmp_path / "bare.txt"
    bare.write_bytes(text.encode("utf-16-le"))  # no byte-order mark: NUL bytes, so binary unless told
    with pytest.raises(ConfigError) as err:
        load_corpus(bare)
    one_line(err, "binary", "utf-16-le")
    assert "".join(load_corpus(bare, encoding="utf-16-le").documents) == text


def _craft(path: Path, out: Path, **changes) -> Path:
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    save_file(load_file(str(path)), str(out), metadata={**meta, **changes})
    return out


def test_crafted_checkpoint_metadata_is_checked_before_building(tmp_path):
    path = tmp_path / "m.safetensors"
    from qkvlab import save_model

    save_model(GPT(GPTConfig(n_layers=1, d_model=32, n_heads=4, vocab_size=64, max_seq_len=16)), path)
    with safe_open(str(path), "pt") as f:
        config = json.loads(f.metadata()["config"])
    cases = [
        ({"config": "{not json"}, "'config' is not a JSON mapping"),
        ({"aliases": json.dumps({"lm_head.weight": "nope"})}, "'aliases' ties ['lm_head.weight']"),
        ({"config": json.dumps({**config, "n_layers": 100_000})}, "100000 layers"),
        ({"config": json.dumps({**config, "d_model": 10**6})}, "the file holds"),
        ({"config": json.dumps({**config, "dropout": 1.5})}, "dropout"),
        ({"train_config": "[1, 2"}, "'train_config' is not a JSON mapping"),
    ]
    for i, (changes, fragment) in enumerate(cases):
        crafted = _craft(path, tmp_path / f"c{i}.safetensors", **changes)
        with pytest.raises(ConfigError) as err:
            if "train_config" in changes:
                from qkvlab.checkpoint import read_metadata, train_config

                train_config(read_metadata(crafted), crafted)
            else:
                load_model(crafted)
        one_line(err, str(crafted), fragment)


def test_a_study_moved_to_another_machine_is_still_the_same_study(tmp_path):
    """Keys that do not change what a run computes (device, cache folder) may differ in the base."""
    study = tmp_path / "study"
    here = {**BASE, "data": {"cache_dir": str(tmp_path / "here")}}
    run_sweep(SweepSpec.from_dict({"name": "s", "base": here, "grid": {"seed": [0]}}), study, run_fn=fake_run)
    moved = {**BASE, "device": "cpu", "data": {"cache_dir": str(tmp_path / "elsewhere")}}
    summary = run_sweep(
        SweepSpec.from_dict({"name": "s", "base": moved, "grid": {"seed": [0, 1]}}), study, run_fn=fake_run
    )
    assert len(summary.already_done) == 1 and len(summary.ran) == 1


def test_a_latest_pointer_out_of_the_checkpoints_folder_is_refused(tokens_file, tmp_path):
    out = tmp_path / "run"
    train(tiny(tokens_file, out), verbose=False)
    (out / "checkpoints" / "latest").write_text("../../elsewhere/ckpt-0000004\n")
    with pytest.raises(ConfigError) as err:
        latest_checkpoint(out)
    one_line(err, "not a checkpoint folder name", "ckpt-")
