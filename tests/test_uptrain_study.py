"""scripts/uptrain_study.py end to end on a tiny GQA model built here (CPU, seconds).

The no-training half (convert_study.py) converts the model to Q-K=V (fit) and Q-MQA (mean); then
``config`` writes the uptraining sweep, qkvlab's own ``run_sweep`` trains each conversion at two
small budgets on a learnable text, and ``score`` adds one row per run to the no-training JSON,
on the same windows. Checked: the grid, the rows and their tokens, the window hashes, that the
scored weights are the trained ones (their loss on the val books is below their init's), that
``--resume`` adds nothing and that other windows or a wrong label are refused.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from qkvlab import GPT, GPTConfig, save_model
from qkvlab.data.tokenizers import train_bpe
from qkvlab.study.results import ResultsStore
from qkvlab.study.spec import load_sweep
from qkvlab.study.sweep import expand, run_sweep

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 300
SHAPE = dict(recipe="llama", variant="GQA-2", vocab_size=VOCAB, n_layers=2, d_model=32, n_heads=4, max_seq_len=64)
# One short paragraph over and over: a few dozen steps learn much of it.
PROSE = (
    "It was the best of times, it was the worst of times; the capital of France is Paris, "
    "and the river that runs through it is the Seine. "
)
BUDGETS = (1024, 2048)  # 8 and 16 steps of 8 x 16 tokens


def load_script(name: str):
    sys.path.insert(0, str(ROOT / "scripts"))
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def scripts():
    return load_script("convert_study"), load_script("uptrain_study")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A BPE tokenizer folder, train and val zips of the same prose, a 'Dickens' text, calibration text."""
    root = tmp_path_factory.mktemp("data")
    tok = train_bpe([PROSE * 20, "Call me Ishmael. Some years ago, never mind how long. " * 20], VOCAB, cache_dir=root)
    (root / "tokenizer").mkdir()
    for f in tok.files:
        (root / "tokenizer" / f.name).write_bytes(f.read_bytes())
    with zipfile.ZipFile(root / "train.zip", "w") as z:
        z.writestr("0000_a.txt", PROSE * 40)
        z.writestr("0001_b.txt", PROSE * 40)
    with zipfile.ZipFile(root / "val.zip", "w") as z:
        z.writestr("0000_book.txt", PROSE * 8)
        z.writestr("0001_other.txt", PROSE * 6)
    with zipfile.ZipFile(root / "other-val.zip", "w") as z:
        z.writestr("0000_book.txt", "Call me Ishmael. Some years ago, never mind how long. " * 12)
    (root / "dickens.txt").write_text("Marley was dead, to begin with. There is no doubt whatever about that.\n\n" * 12)
    (root / "calib.txt").write_text(PROSE * 30)
    return root


def make_source(folder: Path, data: Path) -> Path:
    torch.manual_seed(0)
    folder.mkdir(parents=True)
    save_model(GPT(GPTConfig(**SHAPE)).eval(), folder / "model.safetensors")
    (folder / "tokenizer").mkdir()
    for f in (data / "tokenizer").iterdir():
        (folder / "tokenizer" / f.name).write_bytes(f.read_bytes())
    return folder


def test_parse_labelled(scripts):
    _, up = scripts
    assert up.parse_labelled("Q-K=V:fit=/tmp/x") == ("Q-K=V:fit", "Q-K=V", "fit", Path("/tmp/x"))
    assert up.parse_labelled("Q-K=V:fit=/tmp/a=b") == ("Q-K=V:fit", "Q-K=V", "fit", Path("/tmp/a=b"))
    assert up.parse_labelled("MQA=/tmp/mqa") == ("MQA", "MQA", None, Path("/tmp/mqa"))
    assert up.parse_labelled("Q-K=V:fit+refit=/tmp/r") == ("Q-K=V:fit+refit", "Q-K=V", "fit+refit", Path("/tmp/r"))
    assert up.parse_labelled("MQA:refit=/tmp/m") == ("MQA:refit", "MQA", "refit", Path("/tmp/m"))
    label = "Q-MQA:fit+poolfit+refit"
    assert up.parse_labelled(f"{label}=/tmp/p") == (label, "Q-MQA", "fit+poolfit+refit", Path("/tmp/p"))
    for bad in ("Q-K=V:fit", "Q-K=V:best=/tmp/x", "Q-MQA=/tmp/x", "nonsense=/tmp/x", "Q-K=V:fit+best=/tmp/x"):
        with pytest.raises(SystemExit, match="--conversion takes"):
            up.parse_labelled(bad)


def test_check_label_reads_refit_from_interop(scripts, tmp_path):
    _, up = scripts
    meta = {"action": "convert", "init": "fit", "refit_output": True, "variant": "q_kv+rope", "paper_name": "Q-K=V"}
    up.check_label("Q-K=V:fit+refit", "Q-K=V", "fit+refit", tmp_path, meta)
    with pytest.raises(SystemExit, match=r"records init 'fit\+refit'.*not 'fit'"):
        up.check_label("Q-K=V:fit", "Q-K=V", "fit", tmp_path, meta)
    up.check_label("Q-K=V:fit", "Q-K=V", "fit", tmp_path, {**meta, "refit_output": False})
    pooled = {
        "action": "convert",
        "init": None,
        "refit_output": True,
        "variant": "q_k_v+gqa1+rope",
        "paper_name": "MQA",
    }
    up.check_label("MQA:refit", "MQA", "refit", tmp_path, pooled)
    up.check_label("MQA:poolfit+refit", "MQA", "poolfit+refit", tmp_path, {**pooled, "pool": "fit"})
    with pytest.raises(SystemExit, match="records init 'poolfit\\+refit'"):
        up.check_label("MQA:refit", "MQA", "refit", tmp_path, {**pooled, "pool": "fit"})
    with pytest.raises(SystemExit, match="records init 'refit'"):
        up.check_label("MQA", "MQA", None, tmp_path, pooled)


@pytest.fixture
def one_thread():
    """Tiny models gain nothing from threads, and lose seconds to them on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_uptrain_study_end_to_end(scripts, data, tmp_path, monkeypatch, capsys, one_thread):
    cs, up = scripts
    monkeypatch.setenv("QKVLAB_CACHE", str(tmp_path / "cache"))
    work, into, study = tmp_path / "work", tmp_path / "convert.json", tmp_path / "study"
    source = make_source(tmp_path / "src", data)
    # The no-training half: the source and two conversions, scored on 16-token windows.
    baseline = cs.main([str(source), "--model-name", "tiny", "--work", str(work), "--val-zip", str(data / "val.zip"),
                        "--dickens", str(data / "dickens.txt"), "--calib", str(data / "calib.txt"),
                        "--calib-tokens", "256", "--calib-seq-len", "16", "--seq-len", "16", "--windows-per-book", "2",
                        "--dickens-windows", "3", "--new-tokens", "3", "--device", "cpu",
                        "--convert", "Q-K=V:fit", "--convert", "Q-MQA:mean", "--out", str(into)])  # fmt: skip
    no_training = {(r["to"], r["init"]): r for r in baseline["rows"]}
    conversions = {("Q-K=V", "fit"): work / "q-kv-fit", ("Q-MQA", "mean"): work / "q-mqa-mean"}
    folders = {(None, None): source, **conversions}  # the source, uptrained too: the control

    # config: one block per conversion, each at both budgets, every point runnable.
    yaml_path = tmp_path / "uptrain.yaml"
    cfg_args = ["config", "--out", str(yaml_path), "--study-dir", str(study), "--tokens", ",".join(map(str, BUDGETS)),
                "--train-zip", str(data / "train.zip"), "--val-zip", str(data / "val.zip"), "--lr", "1e-2",
                "--warmup-steps", "2", "--seq-len", "16", "--batch-size", "8", "--no-compile", "--device", "cpu",
                "--set", "log.progress=false", "--set", "eval_batches=2", "--control", str(source),
                *(a for (to, i), f in conversions.items() for a in ("--conversion", f"{to}:{i}={f}"))]  # fmt: skip
    up.main(cfg_args)
    plans = expand(load_sweep(yaml_path))
    grid = [(str(f), t) for f in folders.values() for t in BUDGETS]
    assert [(p.config["init_from"], p.tokens) for p in plans] == grid
    assert {p.variant for p in plans} == {"GQA-2", "Q-GQA-2", "Q-MQA"} and all(p.status == "pending" for p in plans)
    assert all(p.config["data"]["tokenizer"] == f"bpe:{p.config['init_from']}/tokenizer" for p in plans)
    text = yaml_path.read_text()
    assert f"#   Q-K=V:fit   {work / 'q-kv-fit'}" in text and "#   Q-MQA:mean" in text
    assert f"#   source      {source}" in text
    sidecar = json.loads((tmp_path / "uptrain.conversions.json").read_text())
    assert [(c["to"], c["init"], c["folder"]) for c in sidecar["conversions"]] == [
        (to, init, str(f)) for (to, init), f in folders.items()
    ]
    labels = up.label_map(argparse.Namespace(into=into, labels=tmp_path / "uptrain.conversions.json", conversion=None),
                          {"rows": []})  # fmt: skip
    assert {k: v[:2] for k, v in labels.items()} == {str(f.resolve()): key for key, f in folders.items()}
    with pytest.raises(SystemExit, match="records init 'fit', not 'mean'"):  # a label the folder contradicts
        up.main([*cfg_args[:-4], "--conversion", f"Q-K=V:mean={work / 'q-kv-fit'}"])
    with pytest.raises(SystemExit, match="holds a conversion"):  # a control that is not the source
        up.main([*cfg_args[:-6], "--control", str(work / "q-kv-fit")])

    # qkvlab's own sweep trains them.
    summary = run_sweep(yaml_path, verbose=False)
    assert len(summary.ran) == 6 and not summary.failed, summary.failed
    runs = {r["run_id"]: r for r in ResultsStore(study).latest().values()}

    # score: one row per (conversion, budget), on the no-training rows' windows.
    before = into.read_text()
    (tmp_path / "no-training.json").write_text(before)
    with pytest.raises(SystemExit, match="evaluation windows differ"):
        up.main(["score", str(study), "--into", str(into), "--device", "cpu", "--val-zip", str(data / "other-val.zip")])
    assert into.read_text() == before
    capsys.readouterr()
    result = up.main(["score", str(study), "--into", str(into), "--device", "cpu"])
    assert json.loads(into.read_text()) == json.loads(json.dumps(result))
    table = capsys.readouterr().out
    assert table.count("| Q-GQA-2 | fit |") == 6 and "| Q-GQA-2 | fit | 2 | 1,024 |" in table
    uptrained = [r for r in result["rows"] if r["uptrain_tokens"]]
    assert result["rows"][: len(baseline["rows"])] == json.loads(json.dumps(baseline["rows"]))
    assert sorted((str(r["to"]), str(r["init"]), r["uptrain_tokens"]) for r in uptrained) == sorted(
        (str(to), str(init), t) for to, init in folders for t in BUDGETS
    )
    controls = {r["uptrain_tokens"]: r for r in uptrained if r["to"] is None}
    hashes = {k: s["tokens_sha256"] for k, s in result["eval"].items()}
    for row in uptrained:
        run = runs[row["uptrain"]["run_id"]]
        assert row["uptrain_tokens"] == run["tokens"] == run["steps"] * 8 * 16
        assert row["uptrain"]["batch_tokens"] == 128 and row["uptrain"]["lr"] == 1e-2
        assert row["uptrain"]["init_from"] == str(folders[row["to"], row["init"]])
        assert row["checkpoint"] == str(study / run["out_dir"]) and row["eval_tokens_sha256"] == hashes
        assert row["val_tokens"] == no_training[row["to"], row["init"]]["val_tokens"]
        base = no_training[row["to"], row["init"]]
        assert row["target"] == base["target"] and row["kv_cache_bytes_per_token"] == base["kv_cache_bytes_per_token"]
        # trained weights, not the init's: lower loss on the val books (the same prose as training)
        assert row["val_loss_all"] < base["val_loss_all"] - 0.5, (row["val_loss_all"], base["val_loss_all"])
        assert row["val_ppl_ratio"] == row["val_ppl_all"] / no_training[None, None]["val_ppl_all"]
        control = controls[row["uptrain_tokens"]]  # the source trained on the same tokens
        assert row["val_ppl_ratio_same_tokens"] == row["val_ppl_all"] / control["val_ppl_all"]
        assert result["rows"][0]["val_ppl_all"] == no_training[None, None]["val_ppl_all"]
    assert "val ppl / source's at the same tokens" in table and "| GQA-2 (source) |  | 2 | 1,024 |" in table
    assert result["uptrain_runs"][0]["study"] == str(study)

    # --resume adds nothing; the no-training script keeps the uptrained rows on its own --resume.
    again = up.main(["score", str(study), "--into", str(into), "--device", "cpu", "--resume"])
    assert again["rows"] == result["rows"] and len(again["uptrain_runs"]) == 2
    kept = cs.main([str(source), "--model-name", "tiny", "--work", str(work), "--val-zip", str(data / "val.zip"),
                    "--dickens", str(data / "dickens.txt"), "--calib", str(data / "calib.txt"), "--calib-tokens", "256",
                    "--calib-seq-len", "16", "--seq-len", "16", "--windows-per-book", "2", "--dickens-windows", "3",
                    "--new-tokens", "3", "--device", "cpu", "--convert", "Q-K=V:fit", "--convert", "Q-MQA:mean",
                    "--out", str(into), "--resume"])  # fmt: skip
    assert sorted(json.dumps(r, sort_keys=True) for r in kept["rows"]) == sorted(
        json.dumps(r, sort_keys=True) for r in result["rows"]
    )
    assert kept["uptrain_runs"] == again["uptrain_runs"]
    # a new file from the no-training one: the same rows, the same scores
    fresh = tmp_path / "uptrained.json"
    up.main(["score", str(study), "--into", str(fresh), "--baseline", str(tmp_path / "no-training.json"),
             "--device", "cpu", "--conversion", f"Q-K=V:fit={work / 'q-kv-fit'}"])  # fmt: skip
    new = json.loads(fresh.read_text())
    assert new["uptrain_baseline"] == str(tmp_path / "no-training.json")
    assert [(r["to"], r["init"], r["uptrain_tokens"], r["val_loss_all"]) for r in new["rows"]] == [
        (r["to"], r["init"], r["uptrain_tokens"], r["val_loss_all"]) for r in result["rows"]
    ]
