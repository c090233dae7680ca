"""scripts/convert_study.py end to end on a tiny random GQA model built here (CPU, seconds).

Checks the JSON's shape (the rows uptrained rows will sit beside), that the source row is no
conversion, what is exact about each init (``key``: the key path, RoPE included, so the first
layer's attention scores; ``value``: the value path), the cache bytes per token, and that a source
whose key and value projections are equal converts to Q-K=V with no change in perplexity.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import zipfile
from pathlib import Path

import pytest
import torch

from qkvlab import GPT, GPTConfig, load_model, save_model
from qkvlab.data.tokenizers import train_bpe

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 300
SHAPE = dict(recipe="llama", variant="GQA-2", vocab_size=VOCAB, n_layers=2, d_model=32, n_heads=4, max_seq_len=64)
PROSE = (
    "It was the best of times, it was the worst of times; the capital of France is Paris, "
    "and the river that runs through it is the Seine. Numbers such as 1848 and 2048 appear. "
)


def load_script():
    spec = importlib.util.spec_from_file_location("convert_study", ROOT / "scripts" / "convert_study.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def study():
    return load_script()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A BPE tokenizer folder, a val zip of two books, a 'Dickens' text and calibration text."""
    root = tmp_path_factory.mktemp("data")
    docs = [PROSE * 20, "Call me Ishmael. Some years ago, never mind how long precisely. " * 20]
    tok = train_bpe(docs, VOCAB, cache_dir=root)
    (root / "tokenizer").mkdir()
    for f in tok.files:
        (root / "tokenizer" / f.name).write_bytes(f.read_bytes())
    with zipfile.ZipFile(root / "val.zip", "w") as z:
        z.writestr("0000_book.txt", PROSE * 8)
        z.writestr("0001_other.txt", "Call me Ishmael. Some years ago, never mind how long precisely. " * 10)
    (root / "dickens.txt").write_text("Marley was dead, to begin with. There is no doubt whatever about that.\n\n" * 12)
    (root / "calib.txt").write_text(PROSE * 30)
    return root


def make_run(folder: Path, data: Path, tie_kv: bool = False) -> Path:
    gen = torch.Generator().manual_seed(0)
    model = GPT(GPTConfig(**SHAPE))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
        if tie_kv:  # W_v = W_k: a model that K=V computes exactly
            for blk in model.backbone.blocks:
                blk.attn.qkv.proj["v"].weight.copy_(blk.attn.qkv.proj["k"].weight)
    folder.mkdir(parents=True)
    save_model(model.eval(), folder / "model.safetensors")
    (folder / "tokenizer").mkdir()
    for f in (data / "tokenizer").iterdir():
        (folder / "tokenizer" / f.name).write_bytes(f.read_bytes())
    return folder


def run_study(study, tmp_path: Path, data: Path, run: Path, *extra: str) -> dict:
    out = tmp_path / "study.json"
    args = [str(run), "--model-name", "tiny", "--work", str(tmp_path / "work"), "--val-zip", str(data / "val.zip"),
            "--dickens", str(data / "dickens.txt"), "--calib", str(data / "calib.txt"), "--calib-tokens", "256",
            "--calib-seq-len", "16", "--seq-len", "16", "--windows-per-book", "2", "--dickens-windows", "3",
            "--new-tokens", "3", "--device", "cpu", "--out", str(out), *extra]  # fmt: skip
    result = study.main(args)
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    return result


@torch.no_grad()
def roles(model: GPT, x: torch.Tensor, offset: int = 3):
    """(key role, value) of the first layer for block input ``x``, as the attention computes them."""
    attn = model.backbone.blocks[0].attn
    _, k_raw, v_raw = attn.qkv(x)
    k = attn._heads(k_raw, attn.n_kv_heads)
    v = k if attn.kv_shared else attn._heads(v_raw, attn.n_kv_heads)
    return attn.key_role(k, offset), v


def test_spread_windows(study):
    assert study.spread_windows(100, 2, 9) == [20, 70]  # centred in each half
    assert study.spread_windows(25, 4, 9) == [1, 13]  # only two windows of 10 fit
    assert study.spread_windows(15, 4, 9) == [2]
    with pytest.raises(ValueError):
        study.spread_windows(5, 1, 9)


def test_parse_conversion(study):
    assert study.parse_conversion("Q-K=V:fit") == ("Q-K=V", "fit")
    assert study.parse_conversion("MQA") == ("MQA", None)
    assert study.parse_conversion("Q-MQA:fit+refit") == ("Q-MQA", "fit+refit")
    assert study.parse_conversion("MQA:refit") == ("MQA", "refit")
    assert study.parse_conversion("Q-MQA:fit+poolfit+refit") == ("Q-MQA", "fit+poolfit+refit")
    assert study.parse_conversion("MQA:poolfit") == ("MQA", "poolfit")
    assert study.split_recipe("fit+refit") == ("fit", "mean", True) and study.split_recipe("refit") == (
        None,
        "mean",
        True,
    )
    assert study.split_recipe("fit+poolfit+refit") == ("fit", "fit", True)
    assert study.split_recipe("poolfit") == (None, "fit", False)
    assert study.split_recipe("mean") == ("mean", "mean", False) and study.split_recipe(None) == (None, "mean", False)
    for label in ("fit+refit", "refit", "fit+poolfit+refit", "poolfit", "mean", None):
        assert study.recipe_label(*study.split_recipe(label)[::2], study.split_recipe(label).pool) == label
    for bad in ("Q-K=V", "MQA:mean", "Q-K=V:", "nonsense:key", "Q-K=V:refit", "Q-K=V:fit+tune", "MQA:mean+refit",
                "Q-K=V:best+refit", "Q-K=V:fit+refit+refit", "Q-MQA:fit+refit+poolfit", "Q-MQA:poolfit"):  # fmt: skip
        with pytest.raises(SystemExit):
            study.parse_conversion(bad)


def test_convert_study_end_to_end(study, tmp_path, data, capsys):
    run = make_run(tmp_path / "src", data)
    result = run_study(study, tmp_path, data, run)
    rows = result["rows"]
    assert [(r["to"], r["init"]) for r in rows] == [(None, None)] + [
        study.parse_conversion(s) for s in study.DEFAULT_CONVERSIONS
    ]
    by = {(r["to"], r["init"]): r for r in rows}
    assert by["MQA", None]["target"] == "MQA"
    for key in ("hardware", "versions", "git_commit", "eval", "seq_len", "started", "finished", "command"):
        assert key in result
    assert result["eval"]["val"]["scored_tokens"] == 2 * 2 * 16 and result["eval"]["dickens"]["scored_tokens"] == 48
    fields = {"model", "target", "variant", "init", "kv_heads", "uptrain_tokens", "val_ppl", "val_ppl_all",
              "dickens_ppl", "kv_cache_bytes_per_token", "params", "device", "dtype", "git_commit", "wall_s",
              "greedy_continuation", "conversion", "checkpoint"}  # fmt: skip
    for row in rows:
        assert fields <= row.keys()
        assert row["model"] == "tiny" and row["uptrain_tokens"] == 0 and row["device"] == "cpu"
        assert set(row["val_ppl"]) == {"0000_book.txt", "0001_other.txt"}
        assert row["val_tokens"] == 64 and row["dickens_tokens"] == 48
        assert all(1.0 < p < 10 * VOCAB for p in [*row["val_ppl"].values(), row["dickens_ppl"]])
    source = rows[0]
    assert source["target"] == "GQA-2" and source["conversion"] is None and source["init"] is None
    assert source["checkpoint"] == str(run) and source["kv_cache_reduction"] == 0.0
    # bf16 bytes per token: layers * cached tensors * KV heads * head_dim * 2
    assert source["kv_cache_bytes_per_token"] == 2 * 2 * 2 * 8 * 2
    assert by["Q-K=V", "key"]["target"] == "Q-GQA-2" and by["Q-K=V", "key"]["kv_heads"] == 2
    assert by["Q-K=V", "key"]["kv_cache_bytes_per_token"] == 2 * 1 * 2 * 8 * 2
    assert (
        by["Q-MQA", "fit"]["target"] == "Q-MQA" and by["Q-MQA", "fit"]["kv_cache_bytes_per_token"] == 2 * 1 * 1 * 8 * 2
    )
    assert by["Q-MQA", "fit"]["kv_cache_reduction"] == 0.75
    fit = by["Q-K=V", "fit"]["conversion"]
    assert fit["calibration"]["tokens"] == 256 and "--calib" in fit["command"]
    assert by["Q-K=V", "mean"]["conversion"]["calibration"] is None
    # +refit: qkvlab convert --refit-output, calibrated layer by layer; pooling alone takes it too
    for key in (("Q-K=V", "fit+refit"), ("Q-MQA", "fit+refit"), ("MQA", "refit")):
        conv = by[key]["conversion"]
        assert conv["command"].endswith("--refit-output") and conv["calibration"]["mode"] == "sequential"
        assert conv["mean_output_error"] <= conv["mean_output_error_before_refit"]
    for refit, plain in ((("Q-K=V", "fit+refit"), ("Q-K=V", "fit")), (("MQA", "refit"), ("MQA", None))):
        assert by[refit]["kv_cache_bytes_per_token"] == by[plain]["kv_cache_bytes_per_token"]
    assert "--init" not in by["MQA", "refit"]["conversion"]["command"]
    # +poolfit: qkvlab convert --pool fit, the pooled heads fitted to the source's
    for key in (("Q-MQA", "fit+poolfit"), ("Q-MQA", "fit+poolfit+refit"), ("MQA", "poolfit+refit")):
        assert " --pool fit" in by[key]["conversion"]["command"]
        interop = json.loads((Path(by[key]["checkpoint"]) / "interop.json").read_text())
        assert interop["pool"] == "fit" and interop["refit_output"] == key[1].endswith("+refit")
    assert " --pool" not in by["Q-MQA", "fit+refit"]["conversion"]["command"]
    assert Path(by["Q-K=V", "fit+refit"]["checkpoint"]).name == "q-kv-fit-refit"
    # What is exact: init key keeps the key path (so the first layer's scores), init value the value path.
    src = load_model(run / "model.safetensors")
    x = torch.randn(2, 10, 32, generator=torch.Generator().manual_seed(1))
    k_src, v_src = roles(src, x)
    k_key, v_key = roles(load_model(Path(by["Q-K=V", "key"]["checkpoint"]) / "model.safetensors"), x)
    k_val, v_val = roles(load_model(Path(by["Q-K=V", "value"]["checkpoint"]) / "model.safetensors"), x)
    assert torch.equal(k_key, k_src) and not torch.equal(v_key, v_src)
    assert torch.equal(v_val, v_src) and not torch.equal(k_val, k_src)
    # --resume keeps every row made with the same settings
    again = run_study(study, tmp_path, data, run, "--resume")
    assert [r["wall_s"] for r in again["rows"]] == [r["wall_s"] for r in rows]
    assert again["earlier_runs"][0]["started"] == result["started"]
    fewer = run_study(study, tmp_path, data, run, "--resume", "--convert", "MQA")  # rows not asked for stay
    assert [(r["to"], r["init"]) for r in fewer["rows"]] == [(None, None), ("MQA", None)] + [
        (r["to"], r["init"]) for r in rows[1:] if (r["to"], r["init"]) != ("MQA", None)
    ]
    # a kept row whose conversion folder is gone (a fresh machine) is converted again: what comes
    # after (the uptraining) starts from that folder; the other rows stay as they were
    shutil.rmtree(by["MQA", None]["checkpoint"])
    capsys.readouterr()
    redone = run_study(study, tmp_path, data, run, "--resume", "--convert", "MQA")
    assert "MQA: " + by["MQA", None]["checkpoint"] + " is not here; converting again" in capsys.readouterr().out
    assert (Path(by["MQA", None]["checkpoint"]) / "model.safetensors").is_file()
    new = {(r["to"], r["init"]): r for r in redone["rows"]}
    assert new["MQA", None]["val_ppl_all"] == pytest.approx(by["MQA", None]["val_ppl_all"], rel=1e-6)
    assert [r for k, r in new.items() if k != ("MQA", None)] == [r for k, r in by.items() if k != ("MQA", None)]
    fewer = redone
    with pytest.raises(SystemExit, match="seq_len"):  # other settings: refused, the file is kept
        run_study(study, tmp_path, data, run, "--resume", "--seq-len", "8")
    assert json.loads((tmp_path / "study.json").read_text())["rows"] == fewer["rows"]
    # a results JSON in place of the run prints its table: one line per row, twice (all books, per book)
    capsys.readouterr()
    study.main([str(tmp_path / "study.json")])
    table = capsys.readouterr().out
    assert table.count("| Q-MQA | fit |") == 2 and table.count("| GQA-2 (source) |") == 2


def test_a_source_with_equal_key_and_value_weights_converts_without_loss(study, tmp_path, data):
    run = make_run(tmp_path / "src", data, tie_kv=True)
    args = ["--convert", "Q-K=V:key", "--convert", "Q-K=V:mean", "--convert", "MQA"]
    source, key, mean, mqa = run_study(study, tmp_path, data, run, *args)["rows"]
    assert mqa["kv_cache_bytes_per_token"] == source["kv_cache_bytes_per_token"] / 2  # 2 tensors x 1 head
    assert mqa["conversion"]["command"].count("--init") == 0
    for row in (key, mean):
        assert row["kv_cache_bytes_per_token"] == source["kv_cache_bytes_per_token"] / 2
        assert row["val_ppl_all"] == pytest.approx(source["val_ppl_all"], rel=1e-5)
        assert row["dickens_ppl"] == pytest.approx(source["dickens_ppl"], rel=1e-5)
        assert row["greedy_continuation"] == source["greedy_continuation"]


def test_harness_table_matches_folders_and_sets_each_row_against_its_control(study, tmp_path):
    """Accuracies found by the folder each harness.json scored; the change against the source
    trained on as many tokens where there is one, else against the source as it came."""

    def row(to, init, tokens, checkpoint):
        return {"to": to, "init": init, "uptrain_tokens": tokens, "checkpoint": checkpoint, "target": to or "GQA-3"}

    result = {
        "rows": [
            row(None, None, 0, "/tmp/smol-import"),
            row("Q-K=V", "fit", 0, "/tmp/convert/q-kv-fit"),
            row("Q-K=V", "fit", 1000, "studies/up/runs/q_kv-fit-t1e3"),
            row(None, None, 1000, "studies/up/runs/src-t1e3"),
            row("MQA", None, 0, "/tmp/convert/mqa"),  # never scored: left out
        ]
    }
    accs = {"smol-import": 0.50, "q-kv-fit": 0.30, "q_kv-fit-t1e3": 0.45, "src-t1e3": 0.60}
    for i, (folder, acc) in enumerate(accs.items()):
        where = tmp_path / f"m{i}" / folder  # wherever the tarball put them: only the folder's name counts
        where.mkdir(parents=True)
        rows = [{"task": t, "metric": "acc", "value": acc, "stderr": 0.01, "n": 100,
                 "checkpoint": f"/elsewhere/{folder}/model.safetensors"} for t in study.PAPER_TASKS]  # fmt: skip
        rows += [{"task": "lambada_openai", "metric": "perplexity", "value": 12.5, "stderr": 1.0, "n": 100,
                  "checkpoint": f"/elsewhere/{folder}/model.safetensors"}]  # fmt: skip
        (where / "harness.json").write_text(json.dumps({"format": "qkvlab-harness/1", "rows": rows}))
    lines = study.harness_table(result, tmp_path).splitlines()
    body = {tuple(c.strip() for c in line.split("|")[1:4]): line for line in lines[2:]}
    assert list(body) == [
        ("GQA-3 (source)", "", "0"),
        ("GQA-3 (source)", "", "1,000"),
        ("Q-K=V", "fit", "0"),
        ("Q-K=V", "fit", "1,000"),
    ]
    se = f"{100 * 2**0.5 * (5 * 0.01**2) ** 0.5 / 5:.1f}"  # two averages of five, each of stderr 1 point
    assert f"| -20.0 ± {se} |" in body["Q-K=V", "fit", "0"]  # against the source as it came
    assert f"| -15.0 ± {se} |" in body["Q-K=V", "fit", "1,000"]  # against the source trained on 1,000 tokens
    assert "| 45.0 ± 1.0 |" in body["Q-K=V", "fit", "1,000"] and "| 12.5 | 100 |" in body["Q-K=V", "fit", "1,000"]
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "harness.json").write_text(json.dumps({"format": "other", "rows": []}))
    with pytest.raises(SystemExit, match=r"not a harness\.json"):
        study.harness_table(result, tmp_path)
