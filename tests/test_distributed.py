"""Two CPU processes under torchrun (gloo) train exactly what one process with the same global batch does."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import yaml

from qkvlab import load_model

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="torch.distributed with gloo is not available"
)

STEPS = 6


@pytest.fixture(scope="module")
def run_config(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("dist")
    rng = np.random.default_rng(0)
    np.save(root / "tokens.npy", rng.integers(0, 64, size=8000).astype(np.uint16))
    settings = {
        "model": {"preset": "tiny", "n_layers": 2, "d_model": 32, "n_heads": 4},
        "data": {"source": str(root / "tokens.npy")},
        "batch_size": 4,  # global: 2 sequences per process under torchrun
        "grad_accum": 2,
        "seq_len": 16,
        "max_steps": STEPS,
        "eval_every": 3,
        "eval_batches": 2,
        "log": {"every": 1, "progress": False, "tensorboard": False},
        "optim": {"lr": 1e-2},
        "schedule": {"warmup_steps": 2},
    }
    path = root / "run.yaml"
    path.write_text(yaml.safe_dump(settings))
    return path


def launch(args: list[str]) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def single(run_config) -> Path:
    out = run_config.parent / "single"
    launch([sys.executable, "-m", "qkvlab", "train", str(run_config), f"out_dir={out}"])
    return out


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_match_one_with_the_same_global_batch(run_config, single, strategy):
    out = run_config.parent / strategy
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone"]
    launch([*torchrun, "-m", "qkvlab", "train", str(run_config), f"out_dir={out}", f"distributed={strategy}"])

    one, two = rows(single), rows(out)
    assert [r["step"] for r in two] == list(range(1, STEPS + 1))  # one writer: process 0
    assert [r["tokens"] for r in two] == [r["tokens"] for r in one]
    for a, b in zip(one, two, strict=True):
        assert abs(a["loss"] - b["loss"]) < 1e-6, (a, b)
        assert abs(a["lr"] - b["lr"]) < 1e-12
        if a["val_loss"] is not None:
            assert abs(a["val_loss"] - b["val_loss"]) < 1e-6
    assert json.loads((out / "run.json").read_text())["hardware"]["world_size"] == 2
    # The same final model. Compare what it computes, not every weight: the key bias gets a
    # gradient that is zero in exact arithmetic (softmax ignores a shift shared by all keys), so
    # Adam turns float rounding there into visible, harmless weight differences.
    m1, m2 = load_model(single / "model.safetensors"), load_model(out / "model.safetensors")
    assert m1.state_dict().keys() == m2.state_dict().keys()
    x = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(m1(x), m2(x), atol=1e-5)


# ============================================== evaluation of an example-based task
#: 17 test examples, global batch 8: 9 and 8 examples a process in batches of 4, so 3 and 2
#: batches; process 1 must run a padding batch or FSDP's parameter all-gathers fall out of step.
EVAL_TASK = {"name": "synthetic", "kind": "reverse", "seq_len": 6, "n_train": 16, "n_test": 17}


def eval_config(strategy: str = "ddp"):
    from qkvlab.train import TrainConfig

    return TrainConfig.from_dict(
        {
            "task": dict(EVAL_TASK),
            "model": {"preset": None, "d_model": 16, "n_layers": 2, "n_heads": 2},
            "batch_size": 8,
            "device": "cpu",
            "dtype": "fp32",
            "distributed": strategy,
        }
    )


def evaluate_example_tasks(config, ctx, wrap) -> tuple[dict, dict]:
    """The synthetic task's metrics and :func:`evaluate_classifier`'s, with each model's forward passes counted."""
    from torch import nn

    from qkvlab.tasks.synthetic import SyntheticTask
    from qkvlab.train.evaluation import evaluate_classifier

    task = SyntheticTask(config)
    torch.manual_seed(0)
    model = task.build_model()
    classifier = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3))
    forwards = {"synthetic": 0, "classifier": 0}
    for name, m in (("synthetic", model), ("classifier", classifier)):
        m.register_forward_hook(lambda *_, name=name: forwards.__setitem__(name, forwards[name] + 1))
    model, classifier = wrap(model), wrap(classifier)
    metrics = {"synthetic": task.evaluate(model, batch_size=config.batch_size, max_batches=0, ctx=ctx)}
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(13, 5)).astype(np.float32), rng.integers(0, 3, size=13)  # 7 + 6 examples, 3 a batch
    metrics["classifier"] = evaluate_classifier(classifier, x, y, batch_size=6, ctx=ctx, count_key="n")
    return metrics, forwards


def eval_worker(out: Path, strategy: str) -> None:
    from qkvlab.train.context import setup_context, wrap_model

    config = eval_config(strategy)
    ctx = setup_context(config)
    metrics, forwards = evaluate_example_tasks(config, ctx, lambda m: wrap_model(m, config, ctx))
    (out / f"rank{ctx.rank}.json").write_text(json.dumps({"metrics": metrics, "forwards": forwards}))
    # both processes done with every collective before either tears the group down: a process that
    # closed its connections first could abort the other one mid-teardown
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_example_task_evaluation_over_two_processes_matches_one(tmp_path, strategy):
    import signal

    from qkvlab.train.context import RunContext

    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [*torchrun, __file__, "--eval-worker", str(tmp_path), strategy],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)  # torchrun passes it on to its workers (each in a session of its own)
        try:
            output, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            output = ""
        pytest.fail(f"the evaluation under {strategy} hung (uneven forward passes?):\n{output[-3000:]}")
    assert proc.returncode == 0, output[-3000:]

    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["forwards"] == ranks[1]["forwards"] == {"synthetic": 3, "classifier": 3}
    assert ranks[0]["metrics"] == ranks[1]["metrics"]  # the sums are added over processes
    one, _ = evaluate_example_tasks(eval_config(), RunContext(), lambda m: m)
    assert one["synthetic"]["val_tokens"] == 17 * 6 and one["classifier"]["n"] == 13
    for name, metrics in one.items():
        got = ranks[0]["metrics"][name]
        assert got.keys() == metrics.keys()
        for key, value in metrics.items():  # other batches: the float sums add up in another order
            assert got[key] == pytest.approx(value, rel=1e-6, abs=1e-12), (name, key)


if __name__ == "__main__" and sys.argv[1:2] == ["--eval-worker"]:
    eval_worker(Path(sys.argv[2]), sys.argv[3])
