"""The error-message suite: every class of user mistake, through the real command line.

Each case runs ``qkvlab`` in a child process (several cases per process, each through the
console script's own ``main``) and checks the promise of the CLI: a user's mistake prints one
line, ``error: ...``, on stderr that names the value and a fix that works, exits with 2, and
never shows a traceback. Where the fix is a command, the suite runs it too.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from filelock import FileLock
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from qkvlab.study import ResultsStore
from qkvlab.train import latest_checkpoint, load_config, train

#: Runs each argv through qkvlab.cli.main in this one process; prints a JSON list of outcomes.
DRIVER = r"""
import contextlib, io, json, sys, traceback
from qkvlab import cli

results = []
for argv in json.loads(sys.stdin.read()):
    out, err, code = io.StringIO(), io.StringIO(), None
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        sys.argv = ["qkvlab", *argv]
        try:
            cli.main()
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException:
            traceback.print_exc()
            code = "escaped"
    results.append({"argv": argv, "code": code, "stdout": out.getvalue(), "stderr": err.getvalue()})
print(json.dumps(results))
"""


def child_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def run_cli(cases: list[list[str]]) -> list[dict]:
    proc = subprocess.run(
        [sys.executable, "-c", DRIVER],
        input=json.dumps(cases),
        capture_output=True,
        text=True,
        env=child_env(),
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def assert_one_line_error(result: dict, *fragments: str, code: int = 2) -> None:
    err = result["stderr"]
    where = f"qkvlab {' '.join(result['argv'])}: exit {result['code']}, stderr {err!r}"
    assert "Traceback" not in err and "Traceback" not in result["stdout"], where
    assert result["code"] == code, where
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), where
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} missing; {where}"


class Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    """A trained tiny run and the damaged copies, foreign folders and files the cases need."""
    root = tmp_path_factory.mktemp("suite")
    corpus = root / "corpus"
    corpus.mkdir()
    for d in range(12):  # a folder: one document per file
        (corpus / f"m{d}.py").write_text("\n".join(f"def f{i}(x):\n    return x * {i + d}" for i in range(20)))
    settings = {
        "model": {"preset": "tiny", "n_layers": 1, "d_model": 32, "n_heads": 4},
        "data": {"source": str(corpus), "tokenizer": "byte", "cache_dir": str(root / "cache")},
        "batch_size": 4,
        "seq_len": 16,
        "max_steps": 4,
        "ckpt_every": 2,
        "eval_every": 0,
        "eval_batches": 1,
        "log": {"progress": False, "tensorboard": False},
        "schedule": {"warmup_steps": 1},
    }
    cfg = root / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(settings))
    run = root / "run"
    torch.set_num_threads(1)
    train(load_config(cfg, [f"out_dir={run}"]), verbose=False)

    w = {"root": root, "cfg": cfg, "run": run}
    for name in ("noconfig", "linear", "torn", "hostile"):
        w[name] = root / name
        shutil.copytree(run, w[name])
    (w["noconfig"] / "config.yaml").unlink()
    (w["linear"] / "config.yaml").unlink()
    state = latest_checkpoint(w["torn"]) / "state.pt"
    state.write_bytes(state.read_bytes()[:300])
    w["marker"] = root / "payload-ran"
    torch.save({"step": 4, "x": Payload(w["marker"])}, latest_checkpoint(w["hostile"]) / "state.pt")

    w["other_run"] = root / "other-run"  # another run's files, no checkpoints
    w["other_run"].mkdir()
    for name in ("model.safetensors", "summary.json", "metrics.jsonl", "config.yaml"):
        shutil.copy(run / name, w["other_run"] / name)
    w["other_run_bytes"] = {p.name: p.read_bytes() for p in w["other_run"].iterdir()}

    sweep = {"name": "suite", "base": "cfg.yaml", "grid": {"variant": ["QKV"]}}
    w["sweep"] = root / "sweep.yaml"
    w["sweep"].write_text(yaml.safe_dump(sweep))
    w["other_study"] = root / "other-study"
    w["other_study"].mkdir()
    (w["other_study"] / "sweep.yaml").write_text(yaml.safe_dump({"name": "other", "base": {"seq_len": 8}}))
    ResultsStore(w["other_study"]).append({"run_id": "x", "status": "ok"})
    w["other_study_bytes"] = (w["other_study"] / "sweep.yaml").read_bytes()
    w["locked"] = root / "locked-study"
    w["locked"].mkdir()

    w["empty"] = root / "empty.yaml"
    w["empty"].write_text("# nothing here\n")
    w["lr"] = root / "lr.yaml"  # YAML 1.1 reads 1e-3 as text
    w["lr"].write_text(cfg.read_text().replace("schedule:", "optim:\n  lr: 1e-3\nschedule:"))
    w["latin"] = root / "latin.txt"
    w["latin"].write_bytes(("Caf\u00e9 cr\u00e8me br\u00fbl\u00e9e\n\n" * 2000).encode("latin-1"))
    w["utf16"] = root / "wide.txt"
    w["utf16"].write_bytes(("some text\n\n" * 2000).encode("utf-16-le"))  # no byte-order mark

    weights = run / "model.safetensors"
    with safe_open(str(weights), "pt") as f:
        meta = f.metadata()
    tensors, config = load_file(str(weights)), json.loads(meta["config"])
    crafted = {
        "nonjson": {"config": "{not json"},
        "alias": {"aliases": json.dumps({"lm_head.weight": "missing.weight"})},
        "layers": {"config": json.dumps({**config, "n_layers": 100_000})},
        "train_config": {"train_config": "[1, 2"},
    }
    for name, changes in crafted.items():
        w[name] = root / f"{name}.safetensors"
        save_file(tensors, str(w[name]), metadata={**meta, **changes})
    return w


@pytest.fixture(scope="module")
def outcomes(world) -> dict[str, dict]:
    w = world
    cfg, run = str(w["cfg"]), str(w["run"])
    fresh = str(w["root"] / "fresh")
    cases = {
        # nothing lost
        "another run's files": ["train", cfg, f"out_dir={w['other_run']}"],
        "another run's files, --resume": ["train", cfg, f"out_dir={w['other_run']}", "--resume"],
        "another study's folder": ["sweep", str(w["sweep"]), "--out", str(w["other_study"])],
        # wrongly accepted
        "empty config": ["train", str(w["empty"])],
        "resume without config.yaml, other heads": [
            "train", cfg, f"out_dir={w['noconfig']}", "model.n_heads=2", "--resume",
        ],
        "resume without config.yaml, linear": [
            "train", cfg, f"out_dir={w['linear']}", "model.variant=Q=K=V+linear+none", "--resume",
        ],
        "blank inside a variant": ["variants", "--preset", "tiny", "-v", "q k v"],
        "second sweep on a folder": ["sweep", str(w["sweep"]), "--out", str(w["locked"])],
        "head_dim=0": ["train", cfg, f"out_dir={fresh}", "model.head_dim=0"],
        "d_ff=0": ["train", cfg, f"out_dir={fresh}", "model.d_ff=0"],
        "bias=maybe": ["train", cfg, f"out_dir={fresh}", "model.bias=maybe"],
        "vocab_size=0": ["train", cfg, f"out_dir={fresh}", "model.vocab_size=0"],
        "norm_eps=-1": ["train", cfg, f"out_dir={fresh}", "model.norm_eps=-1"],
        "dropout=1.5": ["train", cfg, f"out_dir={fresh}", "model.dropout=1.5"],
        "seed=-1": ["train", cfg, f"out_dir={fresh}", "seed=-1"],
        "device=cuda:x": ["train", cfg, f"out_dir={fresh}", "device=cuda:x"],
        "--context -5": ["variants", "--preset", "tiny", "--context", "-5"],
        "--seq-len 0": ["variants", "--preset", "tiny", "--seq-len", "0"],
        "--batch-size 0": ["eval", "ppl", run, "--batch-size", "0"],
        "--device gpu0": ["eval", "ppl", run, "--device", "gpu0"],
        "--temperature inf": ["generate", run, "--temperature", "inf"],
        "--max-new-tokens -5": ["generate", run, "--max-new-tokens", "-5"],
        "--top-k 0": ["generate", run, "--top-k", "0"],
        "--seeds a": ["demo", "--seeds", "a", "--out", fresh],
        "--seeds past 2^32": ["demo", "--seeds", "0,99999999999", "--out", fresh],
        # a stack trace or a fix that does not work
        "truncated state.pt": ["train", cfg, f"out_dir={w['torn']}", "--resume"],
        "hostile state.pt": ["train", cfg, f"out_dir={w['hostile']}", "--resume"],
        "latin-1 corpus": ["train", cfg, f"out_dir={fresh}", f"data.source={w['latin']}"],
        "utf-16 without a mark": ["train", cfg, f"out_dir={fresh}", f"data.source={w['utf16']}"],
        "prompt longer than the context": ["generate", run, "--prompt", "x" * 40, "--max-new-tokens", "4"],
        "prompt + tokens past the context": ["generate", run, "--prompt", "def f(x):", "--max-new-tokens", "30"],
        "non-JSON config metadata": ["eval", "ppl", str(w["nonjson"])],
        "bad alias metadata": ["generate", str(w["alias"])],
        "100,000 layers": ["generate", str(w["layers"])],
        "non-JSON train_config": ["eval", "ppl", str(w["train_config"])],
        # the fixes those messages give, run: a number in YAML 1.1 form, and --force
        "fix: lr 1e-3, --force": ["train", str(w["lr"]), f"out_dir={w['other_run']}", "max_steps=1", "--force"],
        "fix: the encoding key": [
            "train", cfg, f"out_dir={w['root'] / 'latin-run'}", f"data.source={w['latin']}", "data.encoding=latin-1",
            "max_steps=1",
        ],
    }  # fmt: skip
    with FileLock(str(w["locked"] / ".sweep.lock")):  # another sweep holds this folder
        results = run_cli(list(cases.values()))
    return dict(zip(cases, results, strict=True))


@pytest.mark.parametrize(
    ("case", "fragments"),
    [
        ("another run's files", ["other-run", "already holds a run", "--resume", "--force"]),
        ("another run's files, --resume", ["other-run", "--force"]),
        ("another study's folder", ["other-study", "'other'", "--force", "another --out"]),
        ("empty config", ["empty.yaml", "is empty", "configs/lm/tiny-stdlib.yaml"]),
        ("resume without config.yaml, other heads", ["model.n_heads: saved 4, now 2", "checkpoint ckpt-0000004"]),
        ("resume without config.yaml, linear", ["model.variant", "checkpoint ckpt-0000004"]),
        ("blank inside a variant", ["'q k v'", "blank inside a name"]),
        ("second sweep on a folder", ["Another qkvlab sweep is running", "locked-study", "another --out"]),
        ("head_dim=0", ["head_dim", "got 0", "leave it unset"]),
        ("d_ff=0", ["d_ff", "got 0"]),
        ("bias=maybe", ["bias", "'maybe'", "true or false"]),
        ("vocab_size=0", ["vocab_size", "got 0"]),
        ("norm_eps=-1", ["norm_eps", "got -1", "1e-5"]),
        ("dropout=1.5", ["dropout", "1.5", "[0, 1)"]),
        ("seed=-1", ["seed", "-1", "[0, 4294967295]"]),
        ("device=cuda:x", ["'cuda:x'", "cuda[:N]"]),
        ("--context -5", ["--context", "-5"]),
        ("--seq-len 0", ["--seq-len", "got 0"]),
        ("--batch-size 0", ["--batch-size", "got 0"]),
        ("--device gpu0", ["'gpu0'", "'cpu'"]),
        ("--temperature inf", ["--temperature", "inf", "0 is greedy"]),
        ("--max-new-tokens -5", ["--max-new-tokens", "-5"]),
        ("--top-k 0", ["--top-k", "got 0"]),
        ("--seeds a", ["--seeds", "'a'", "0,1,2"]),
        ("--seeds past 2^32", ["--seeds", "'0,99999999999'", "4294967295"]),
        ("truncated state.pt", ["state.pt", "corrupt", "ckpt-0000002", "latest", "--resume"]),
        ("hostile state.pt", ["state.pt", "corrupt or unsafe", "ckpt-0000002", "--resume"]),
        ("latin-1 corpus", ["latin.txt", "not UTF-8", "data.encoding=NAME", "latin-1"]),
        ("utf-16 without a mark", ["wide.txt", "binary", "data.encoding=NAME", "utf-16-le"]),
        ("prompt longer than the context", ["40 tokens", "context is 16", "shorten the prompt to at most 12 tokens"]),
        ("prompt + tokens past the context", ["9 tokens", "context is 16", "lower --max-new-tokens to 7"]),
        ("non-JSON config metadata", ["nonjson.safetensors", "'config' is not a JSON mapping", "restore"]),
        ("bad alias metadata", ["alias.safetensors", "'aliases'", "lm_head.weight"]),
        ("100,000 layers", ["layers.safetensors", "100000 layers", "the file holds"]),
        ("non-JSON train_config", ["train_config.safetensors", "'train_config' is not a JSON mapping"]),
    ],
)
def test_each_mistake_is_one_line_with_the_value_and_a_fix(outcomes, case, fragments):
    assert_one_line_error(outcomes[case], *fragments)


def test_the_demo_checks_its_options_before_printing_anything(outcomes):
    for case in ("--seeds a", "--seeds past 2^32"):
        assert outcomes[case]["stdout"].strip() == "", outcomes[case]["stdout"][:300]  # no cost table first


def test_the_fixes_the_messages_give_work(outcomes, world):
    for case in ("fix: lr 1e-3, --force", "fix: the encoding key"):
        result = outcomes[case]
        assert result["code"] == 0 and "Traceback" not in result["stderr"], (case, result["stderr"][-2000:])
    assert load_config(world["other_run"] / "config.yaml").optim.lr == 1e-3
    assert json.loads((world["other_run"] / "summary.json").read_text())["steps"] == 1


def test_nothing_was_lost_or_run(outcomes, world):
    assert outcomes["another run's files"]["code"] == 2  # refused before the --force case replaced them
    assert (world["other_study"] / "sweep.yaml").read_bytes() == world["other_study_bytes"]
    assert not (world["locked"] / "sweep.yaml").exists()
    assert not world["marker"].exists()  # the hostile state.pt was never unpickled as code
    assert "weights_only=False" not in outcomes["hostile state.pt"]["stderr"]


def test_the_console_entry_point_refuses_another_runs_folder(world, tmp_path):
    """The same promise through ``python -m qkvlab`` itself, not the in-process driver."""
    other = tmp_path / "other"
    shutil.copytree(world["run"], other)
    before = {p.name: p.read_bytes() for p in other.iterdir() if p.is_file()}
    proc = subprocess.run(
        [sys.executable, "-m", "qkvlab", "train", str(world["cfg"]), f"out_dir={other}"],
        capture_output=True,
        text=True,
        env=child_env(),
        timeout=300,
    )
    assert_one_line_error({"argv": ["train"], "code": proc.returncode, "stdout": proc.stdout, "stderr": proc.stderr})
    assert {p.name: p.read_bytes() for p in other.iterdir() if p.is_file()} == before
