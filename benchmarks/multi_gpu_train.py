"""Training on several GPUs (torchrun, NCCL) against one GPU with the same global batch and seed.

For each variant it runs the trainer three ways on the same config, through the same command a
user types (``qkvlab train``, under ``torchrun --nproc_per_node N`` for the distributed ones):
one process, N processes with DDP, N processes with FSDP2. It reports per run tokens/s per GPU,
the scaling efficiency against one GPU (tokens/s per GPU over the one-GPU tokens/s) and the peak
memory per GPU, and checks:

- the loss of every logged step against the one-process run (``--loss-rtol``: bf16 autocast
  rounds each product to 8 bits of mantissa and the processes sum gradients in another order,
  so per-step losses may differ by a few parts in a thousand and the gap grows slowly with steps;
  the smoke mode trains in fp32 on CPU, where the test holds it to 1e-6);
- an FSDP2 checkpoint written by N processes resumes on one process and on N, giving the same
  next losses as the uninterrupted run:
  the FSDP2 run is killed (SIGKILL to the process group) once its checkpoint half way exists,
  then resumed, so this is also the "a run killed on N GPUs resumes" check.

It writes a JSON with the hardware and versions (``benchutil``) and prints a table. ``--smoke``
runs all of it on CPU with gloo and a tiny model (what CI runs).

    torchrun is launched by the script itself; on a 2-GPU machine:
    python benchmarks/multi_gpu_train.py --config configs/lm/gutenberg-ladder.yaml \\
        --preset gpt2-85m --variants QKV,Q-K=V --steps 60 --nproc 2
    python benchmarks/multi_gpu_train.py --smoke          # CPU, gloo, tiny model, seconds
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch

from benchutil import env_info, write_json

ROOT = Path(__file__).resolve().parent.parent


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def train_cmd(config: Path, out: Path, nproc: int, overrides: list[str]) -> list[str]:
    qkvlab = ["-m", "qkvlab", "train", str(config), f"out_dir={out}", *overrides]
    if nproc == 1:
        return [sys.executable, *qkvlab]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    return [*torchrun, *qkvlab]


def launch(cmd: list[str], log: Path, timeout: float) -> None:
    # NVLink multicast stays off (the machine's environment sets it; keep it for the children).
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "NCCL_NVLS_ENABLE": "0"}
    with open(log, "w") as f:
        proc = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=timeout)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}); see {log}:\n{log.read_text()[-3000:]}")


def kill_after_checkpoint(cmd: list[str], out: Path, log: Path, timeout: float) -> None:
    """Start ``cmd``, SIGKILL its whole process group once a checkpoint exists."""
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "NCCL_NVLS_ENABLE": "0"}
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and proc.poll() is None:
            if any((out / "checkpoints").glob("ckpt-*/state.pt")):
                break
            time.sleep(0.05)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def max_rel_gap(a: list[dict], b: list[dict]) -> float:
    by_step = {r["step"]: r["loss"] for r in b if r.get("loss") is not None}
    gaps = [abs(r["loss"] - by_step[r["step"]]) / abs(r["loss"]) for r in a if r["step"] in by_step]
    if not gaps:
        raise SystemExit("no common logged steps to compare")
    return max(gaps)


def smoke_config(root: Path) -> Path:
    rng = np.random.default_rng(0)
    np.save(root / "tokens.npy", rng.integers(0, 64, size=20000).astype(np.uint16))
    cfg = {
        "model": {"preset": "tiny", "n_layers": 2, "d_model": 32, "n_heads": 4},
        "data": {"source": str(root / "tokens.npy")},
        "batch_size": 4,
        "seq_len": 16,
        "eval_every": 0,
        "eval_batches": 2,
        "log": {"every": 1, "progress": False, "tensorboard": False},
        "optim": {"lr": 1e-2},
        "schedule": {"warmup_steps": 2},
        "device": "cpu",
        "dtype": "fp32",
    }
    path = root / "smoke.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_variant(variant: str, args, config: Path, work: Path) -> dict:
    n, steps = args.nproc, args.steps
    base = [f"model.variant={variant}", f"max_steps={steps}", "log.every=1", "eval_every=0", *args.override]
    if args.preset:
        base.append(f"model.preset={args.preset}")
    slug = variant.replace("=", "").replace("-", "")
    runs: dict[str, dict] = {}
    for name, nproc, extra in (("1x", 1, []), ("ddp", n, ["distributed=ddp"]), ("fsdp", n, ["distributed=fsdp"])):
        out = work / f"{slug}-{name}"
        launch(train_cmd(config, out, nproc, base + extra), work / f"{slug}-{name}.log", args.timeout)
        s = summary(out)
        runs[name] = {
            "world_size": nproc,
            "tokens_per_s": s.get("train_tokens_per_s"),
            "tokens_per_s_per_gpu": (s.get("train_tokens_per_s") or 0) / nproc,
            "peak_memory_gib": s.get("peak_memory_gib"),
            "mfu": s.get("mfu"),
            "final_loss": s.get("train_loss"),
            "losses": [r["loss"] for r in metrics(out)],
        }
    one = runs["1x"]["tokens_per_s"] or float("nan")
    for name in ("ddp", "fsdp"):
        runs[name]["scaling_efficiency"] = runs[name]["tokens_per_s_per_gpu"] / one
        runs[name]["max_rel_loss_gap_vs_1x"] = max_rel_gap(
            metrics(work / f"{slug}-1x"), metrics(work / f"{slug}-{name}")
        )

    # Resume: an N-process FSDP2 run killed after its checkpoint half way goes on to the end on one
    # process, and on N; a killed run's rows after its checkpoint are dropped when it resumes.
    half = steps // 2
    whole = metrics(work / f"{slug}-fsdp")
    later = [r for r in whole if r["step"] > half]
    resume: dict[str, float] = {}
    for name, nproc in (("killed_fsdp_then_1x", 1), (f"killed_fsdp_then_{n}x", n)):
        out = work / f"{slug}-{name}"
        settings = [*base, "distributed=fsdp", f"ckpt_every={half}"]
        kill_after_checkpoint(train_cmd(config, out, n, settings), out, work / f"{slug}-{name}-a.log", args.timeout)
        killed_at = max((r["step"] for r in metrics(out)), default=0)
        launch(train_cmd(config, out, nproc, [*settings, "--resume"]), work / f"{slug}-{name}-b.log", args.timeout)
        resume[name] = max_rel_gap(later, [r for r in metrics(out) if r["step"] > half])
        resume[f"{name}_killed_at_step"] = killed_at
    return {"variant": variant, "runs": runs, "resume_max_rel_loss_gap": resume}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, default=ROOT / "configs/lm/gutenberg-ladder.yaml")
    ap.add_argument("--preset", default="gpt2-85m")
    ap.add_argument("--variants", default="QKV,Q-K=V")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--loss-rtol", type=float, default=1e-2)
    ap.add_argument("--timeout", type=float, default=540)
    ap.add_argument("--override", action="append", default=[], help="KEY=VALUE for every run")
    ap.add_argument("--work", type=Path, default=None, help="run folders (default: a temporary folder)")
    ap.add_argument("--json", default="multi_gpu_train.json")
    ap.add_argument("--smoke", action="store_true", help="CPU, gloo, a tiny model: checks, no timings")
    args = ap.parse_args()
    if args.steps < 4:
        raise SystemExit(f"--steps must be at least 4 (two checkpoints and a resume), got {args.steps}")

    work = args.work or Path(tempfile.mkdtemp(prefix="multi-gpu-"))
    work.mkdir(parents=True, exist_ok=True)
    config = args.config
    if args.smoke:
        config, args.preset, args.loss_rtol = smoke_config(work), None, 1e-6
    elif not torch.cuda.is_available() or torch.cuda.device_count() < args.nproc:
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        raise SystemExit(f"--nproc {args.nproc} needs that many GPUs, {count} visible; use --smoke on a CPU")
    results = [run_variant(v.strip(), args, config, work) for v in args.variants.split(",") if v.strip()]

    ok = True
    print(f"\n{'variant':8} {'run':5} {'tok/s/GPU':>10} {'eff.':>6} {'peak GiB':>9} {'loss gap':>9}")
    for res in results:
        for name, r in res["runs"].items():
            gap = r.get("max_rel_loss_gap_vs_1x")
            eff = r.get("scaling_efficiency")
            mem = r.get("peak_memory_gib")
            print(
                f"{res['variant']:8} {name:5} {r['tokens_per_s_per_gpu']:>10,.0f} "
                f"{'' if eff is None else f'{eff:6.2f}'} {'' if mem is None else f'{mem:9.2f}'} "
                f"{'' if gap is None else f'{gap:9.1e}'}"
            )
            ok &= gap is None or gap <= args.loss_rtol
        for name, gap in res["resume_max_rel_loss_gap"].items():
            if name.endswith("_killed_at_step"):
                continue
            killed = res["resume_max_rel_loss_gap"][f"{name}_killed_at_step"]
            print(f"{res['variant']:8} {name} (killed at step {killed}): max relative loss gap {gap:.1e}")
            ok &= gap <= args.loss_rtol
    doc = {
        "env": env_info(torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")),
        "smoke": args.smoke,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "loss_rtol": args.loss_rtol,
        "results": results,
        "checks_passed": ok,
    }
    for path in write_json(doc, args.json, str(work / args.json)):
        print(f"wrote {path}")
    print("all checks passed" if ok else "CHECKS FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
