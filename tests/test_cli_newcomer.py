"""What a newcomer trips over on the command line: -h, help text, Ctrl-C, budgets, silent minutes."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import typer
import yaml
from typer.testing import CliRunner

import qkvlab.study
from qkvlab.cli import app
from qkvlab.data.vision import ImageDataset
from qkvlab.tasks.anomaly import AnomalySettings, compute_features
from qkvlab.train import TrainConfig, latest_checkpoint
from qkvlab.train.trainer import Trainer


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def command_paths(group=None, prefix=()) -> list[tuple[str, ...]]:
    """Every command and group of the CLI as the words that name it, the top level first."""
    group = group or typer.main.get_command(app)
    paths = [prefix]
    for name, command in group.commands.items():
        if hasattr(command, "commands"):
            paths += command_paths(command, (*prefix, name))
        else:
            paths.append((*prefix, name))
    return paths


# ====================================================================== -h and help text
@pytest.mark.parametrize("path", command_paths(), ids=lambda p: " ".join(p) or "qkvlab")
def test_dash_h_is_help_everywhere_and_reads_as_plain_text(path):
    short = CliRunner().invoke(app, [*path, "-h"], env={"COLUMNS": "120"}, prog_name="qkvlab")
    assert short.exit_code == 0, short.output
    long = CliRunner().invoke(app, [*path, "--help"], env={"COLUMNS": "120"}, prog_name="qkvlab")
    assert short.output == long.output and "Usage: qkvlab" in short.output
    for markup in ("``", "`", ":class:", ":func:", ":mod:", "[/"):
        assert markup not in short.output, f"{markup!r} in the help of {' '.join(path) or 'qkvlab'}:\n{short.output}"


def test_top_level_help_says_what_it_is_and_where_to_start():
    out = CliRunner().invoke(app, ["-h"], env={"COLUMNS": "120"}).output
    assert "attention" in out and "qkvlab demo" in out and "-h" in out


# ====================================================================== Ctrl-C
@pytest.fixture
def lm_config(tmp_path) -> Path:
    rng = np.random.default_rng(0)
    phrases = rng.integers(0, 64, size=(8, 16))
    np.save(tmp_path / "tokens.npy", phrases[rng.integers(0, 8, size=400)].reshape(-1).astype(np.uint16))
    config = {
        "data": {"source": str(tmp_path / "tokens.npy"), "val_fraction": 0.1},
        "model": {"preset": "tiny", "n_layers": 1, "d_model": 32, "n_heads": 4},
        "schedule": {"warmup_steps": 2},
        "log": {"every": 1, "progress": False, "tensorboard": False},
        "batch_size": 8,
        "seq_len": 32,
        "max_steps": 10,
        "eval_every": 0,
        "eval_batches": 2,
        "ckpt_every": 4,
        "device": "cpu",
        "dtype": "fp32",
        "out_dir": str(tmp_path / "run"),
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def interrupt_at(monkeypatch, step: int) -> None:
    """Ctrl-C arrives when the run is about to take optimizer step ``step + 1``."""
    real = Trainer.train_step

    def train_step(self):
        if self.step == step:
            raise KeyboardInterrupt
        return real(self)

    monkeypatch.setattr(Trainer, "train_step", train_step)


def resume_line(stderr: str) -> tuple[str, list[str]]:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    message, sep, command = lines[0].partition("; resume with: ")
    assert sep, lines[0]
    return message, shlex.split(command)


def test_ctrl_c_in_train_prints_the_resume_command_and_exits_130(lm_config, tmp_path, monkeypatch):
    interrupt_at(monkeypatch, 6)
    stopped = CliRunner().invoke(app, ["train", str(lm_config), "model.variant=Q-K=V", "optim.lr=2e-3"])
    assert stopped.exit_code == 130, stopped.output
    message, command = resume_line(stopped.stderr)
    assert message == f"Training stopped; its last checkpoint is step 4 in {tmp_path / 'run'}"
    assert command == ["qkvlab", "train", str(lm_config), "model.variant=Q-K=V", "optim.lr=2e-3", "--resume"]

    monkeypatch.undo()
    resumed = CliRunner().invoke(app, command[1:])
    assert resumed.exit_code == 0, resumed.output
    assert "at step 4" in resumed.stdout and "done: step 10" in resumed.stdout


def test_ctrl_c_before_the_first_checkpoint_restarts_with_resume_not_force(lm_config, tmp_path, monkeypatch):
    interrupt_at(monkeypatch, 2)
    stopped = CliRunner().invoke(app, ["train", str(lm_config), "ckpt_every=0", "--force"])
    assert stopped.exit_code == 130, stopped.output
    message, command = resume_line(stopped.stderr)
    assert "no checkpoint" in message and "from step 0" in message
    assert command == ["qkvlab", "train", str(lm_config), "ckpt_every=0", "--resume"]  # --force would delete the run

    monkeypatch.undo()
    resumed = CliRunner().invoke(app, command[1:])
    assert resumed.exit_code == 0, resumed.output
    assert latest_checkpoint(tmp_path / "run").name == "ckpt-0000010"


def test_ctrl_c_in_sweep_and_demo_prints_the_command_that_continues(tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(qkvlab.study, "run_sweep", interrupted)
    sweep = tmp_path / "s.yaml"
    sweep.write_text(yaml.safe_dump({"name": "s", "base": {"model": {"preset": "tiny"}}, "grid": {"variant": ["QKV"]}}))
    args = ["sweep", str(sweep), "--out", str(tmp_path / "study"), "--time-limit", "90", "--only", "variant=QKV"]
    stopped = CliRunner().invoke(app, args)
    assert stopped.exit_code == 130, stopped.output
    message, command = resume_line(stopped.stderr)
    assert str(tmp_path / "study" / "results.jsonl") in message
    assert command == ["qkvlab", *args]

    stopped = CliRunner().invoke(app, ["demo", "--out", str(tmp_path / "demo"), "--tokens", "6k"])
    assert stopped.exit_code == 130, stopped.output
    _, command = resume_line(stopped.stderr)
    assert command == ["qkvlab", "demo", "--out", str(tmp_path / "demo"), "--tokens", "6k"]


def child_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_to_a_real_training_process(lm_config, tmp_path, sig):
    """Ctrl-C (SIGINT) says how to resume and exits 130; SIGTERM still ends the process at once
    (its default action: the last checkpoint is intact, --resume continues from it)."""
    argv = [sys.executable, "-m", "qkvlab.cli", "train", str(lm_config), "max_steps=100000", "ckpt_every=2"]
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env()) as proc:
        for line in proc.stdout:
            if line.startswith("checkpoint saved step="):
                proc.send_signal(sig)
                break
        _, stderr = proc.communicate(timeout=120)
    assert latest_checkpoint(tmp_path / "run") is not None
    if sig == signal.SIGINT:
        assert proc.returncode == 130, stderr
        message, command = resume_line(stderr)
        assert message.startswith("Training stopped; its last checkpoint is step ")
        assert command == ["qkvlab", "train", str(lm_config), "max_steps=100000", "ckpt_every=2", "--resume"]
    else:
        assert proc.returncode == -signal.SIGTERM and "resume with" not in stderr


# ====================================================================== max_steps beside a task's epochs
def synthetic(**top) -> dict:
    return {
        "task": {"name": "synthetic", "kind": "reverse", "seq_len": 6, "n_train": 16, "n_test": 8, "epochs": 1},
        "model": {"preset": None, "d_model": 16, "n_layers": 1, "n_heads": 2},
        "log": {"progress": False, "tensorboard": False},
        "batch_size": 8,
        "eval_every": 0,
        "device": "cpu",
        **top,
    }


def test_max_steps_beside_task_epochs_is_named_in_a_warning():
    with pytest.warns(UserWarning, match=r"max_steps=5 is not used: task\.epochs=1 sets the step budget") as caught:
        config = TrainConfig.from_dict(synthetic(max_steps=5))
    assert "task.epochs=null" in str(caught[0].message)  # the fix
    assert config.max_steps == 5  # the rule is unchanged: epochs set the budget
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        TrainConfig.from_dict(synthetic())  # epochs alone
        TrainConfig.from_dict(synthetic(max_steps=5, task={**synthetic()["task"], "epochs": None}))  # steps alone
        TrainConfig.from_dict(TrainConfig.from_dict(synthetic()).to_dict())  # as a run saves it: every key


def test_the_command_line_prints_that_warning_as_one_line(tmp_path):
    config = tmp_path / "reverse.yaml"
    config.write_text(yaml.safe_dump(synthetic(out_dir=str(tmp_path / "run"))))
    argv = [sys.executable, "-m", "qkvlab.cli", "train", str(config), "max_steps=5"]
    proc = subprocess.run(argv, capture_output=True, text=True, env=child_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines == [
        "warning: max_steps=5 is not used: task.epochs=1 sets the step budget of the 'synthetic' task; drop "
        "max_steps, or set task.epochs=null to train for max_steps."
    ]
    assert "done: step 2" in proc.stdout  # ceil(1 * 16 / 8): the epochs' budget, as before


# ====================================================================== the anomaly task's backbone
def toy_images(seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(3), 8)
    images = (rng.integers(0, 64, size=(24, 8, 8, 3)) + 60 * labels[:, None, None, None]).astype(np.uint8)
    return images, labels


def test_anomaly_backbone_reports_progress_and_computes_the_same(tmp_path, capsys):
    ds = ImageDataset(*toy_images(0), *toy_images(1), ["a", "b", "c"], {"fingerprint": "toy"})
    task = {"name": "anomaly", "dataset": "cifar10", "backbone_epochs": 2, "backbone_width": 4, "set_size": 3}
    config = {
        "task": {**task, "cache_dir": str(tmp_path / "a")},
        "model": {"preset": None, "d_model": 16, "n_layers": 1, "n_heads": 2},
    }
    settings = AnomalySettings.from_train_config(TrainConfig.from_dict(config))
    loud = compute_features(settings, torch.device("cpu"), ds, progress=True)
    out, err = capsys.readouterr()
    assert "anomaly: training the backbone CNN on 12 images for 2 epochs" in out
    assert "backbone CNN" in err and "2/2" in err and "train features" in err  # tqdm bars, as the trainer's

    quiet_settings = AnomalySettings.from_train_config(
        TrainConfig.from_dict({**config, "task": {**task, "cache_dir": str(tmp_path / "b")}})
    )
    quiet = compute_features(quiet_settings, torch.device("cpu"), ds)
    assert capsys.readouterr() == ("", "")
    np.testing.assert_array_equal(quiet.train_features, loud.train_features)  # progress changes nothing computed
    np.testing.assert_array_equal(quiet.test_features, loud.test_features)

    compute_features(settings, torch.device("cpu"), ds, progress=True)
    assert "from the cache" in capsys.readouterr().out


def test_ctrl_c_during_training_asks_for_a_stop_and_a_second_one_interrupts():
    """The first SIGINT only sets the trainer's stop request (a flag the loop reads: it cannot be
    swallowed by a finaliser the way a KeyboardInterrupt can); the second interrupts at once; after
    the block the handler and the flag are as they were."""
    from qkvlab.cli import _ctrl_c_stops_the_run
    from qkvlab.train import trainer

    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt), _ctrl_c_stops_the_run():
        os.kill(os.getpid(), signal.SIGINT)
        assert trainer._stop.is_set()
        os.kill(os.getpid(), signal.SIGINT)
        pytest.fail("a second Ctrl-C must interrupt")
    assert not trainer._stop.is_set()
    assert signal.getsignal(signal.SIGINT) is before
