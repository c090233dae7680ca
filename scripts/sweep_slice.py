"""Run one time-limited slice of a study sweep on a lent GPU machine and pack what it wrote.

The device tool sends the checkout (not ``../shared``) and brings back at most a few files
from ``$OUT``; checkpoints are too large to bring back and are not needed. So this script:

1. links the corpora carried in ``.data/`` to the ``../shared/data/...`` paths the configs
   name (the run ids hash those paths, so a run here and one on a workstation agree);
2. seeds the study folder with the committed results (``--results``), so finished runs are
   skipped and a slice continues where the last one stopped;
3. runs the sweep with ``--devices`` and ``--time-limit`` (only runs expected to finish start;
   with ``--stop-at-limit`` the others start too and are stopped at the limit with a checkpoint,
   which the next call on the same warm machine resumes);
4. with ``--harness-models``, scores the finished runs of those models that have no downstream
   rows yet with ``qkvlab eval harness`` (``--harness-tasks``, ``--harness-fewshot``; the task
   files from ``--harness-data``, e.g. a folder unpacked from a carried archive), appending
   ``status: "harness"`` rows to the study; checkpoints never leave the machine, so this is
   where the largest rungs get their downstream numbers;
5. writes ``$OUT/results.jsonl`` (all rows), ``$OUT/runs.tar.gz`` (each run's config.yaml,
   run.json, summary.json, metrics.jsonl, harness.json; failed runs' logs; the study's sweep.yaml)
   and ``$OUT/slice.json`` (the slice's wall time, GPU and run counts).

Merge back on the workstation with ``python scripts/merge_slice.py OUT_FOLDER RESULTS_DIR``.

    python3 scripts/sweep_slice.py configs/studies/ladder-gutenberg.yaml \\
        --results results/ladder-gutenberg --devices 0,0,0,0 --time-limit 480
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
os.environ["PYTHONPATH"] = f"{ROOT / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"  # the workers
os.environ.setdefault("QKVLAB_CACHE", str(ROOT / ".data" / "cache"))

#: What each run brings back: small files only (no weights, no checkpoints).
RUN_FILES = ("config.yaml", "run.json", "summary.json", "metrics.jsonl", "harness.json")
#: Carried corpus -> the path the configs name, relative to the checkout.
LINKS = {
    ".data/gutenberg-train.zip": "../shared/data/gutenberg/gutenberg-train.zip",
    ".data/gutenberg-val.zip": "../shared/data/gutenberg/gutenberg-val.zip",
    ".data/dickens.zip": "../shared/data/dickens/dickens.zip",
}


def link_data() -> None:
    for src, dest in LINKS.items():
        source, target = ROOT / src, (ROOT / dest).resolve()
        if target.exists() or not source.exists():
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(source)


def score_downstream(study: Path, args: argparse.Namespace) -> list[str]:
    """Score each finished run of ``--harness-models`` that has no row of this setting yet; returns
    the run ids scored. Rows go to the study (and each run's harness.json) as each run finishes."""
    from qkvlab.harness.runner import evaluate_runs
    from qkvlab.study import read_jsonl

    rows = read_jsonl(study / "results.jsonl")
    models = set(args.harness_models.split(","))
    setting = (args.harness_fewshot, args.harness_limit)
    scored_rows = [r for r in rows if r.get("status") == "harness"]
    done = {r.get("of_run") for r in scored_rows if (r.get("num_fewshot"), r.get("limit")) == setting}
    todo = [
        r["run_id"]
        for r in rows
        if r.get("status") == "ok" and r.get("model") in models and r["run_id"] not in done
        and (study / "runs" / r["run_id"] / "model.safetensors").is_file()
    ]  # fmt: skip
    scored = []
    for run_id in dict.fromkeys(todo):
        t0 = time.time()
        evaluate_runs(
            [study / "runs" / run_id], args.harness_tasks, num_fewshot=args.harness_fewshot,
            limit=args.harness_limit, batch_size=32, device=args.harness_device, data_root=args.harness_data,
            truncate=args.harness_truncate, study=study,
        )  # fmt: skip
        scored.append(run_id)
        print(f"downstream: {run_id} scored in {time.time() - t0:.0f} s", flush=True)
    return scored


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config", help="the study's sweep YAML")
    ap.add_argument("--results", required=True, help="committed results folder whose results.jsonl seeds the study")
    ap.add_argument("--devices", default="0")
    ap.add_argument("--time-limit", type=float, required=True, help="seconds for the sweep")
    ap.add_argument(
        "--stop-at-limit",
        action="store_true",
        help="also start runs that will not finish in the limit, and stop them there with a checkpoint: on a "
        "machine kept warm the next call resumes them (on a fresh machine they start over)",
    )
    ap.add_argument("--out", default=os.environ.get("OUT", "slice-out"))
    ap.add_argument("--only", action="append", default=[], help="KEY=V1,V2: run only these grid points")
    ap.add_argument("--harness-models", default="", help="comma list of models whose finished runs to score")
    ap.add_argument("--harness-tasks", default="paper", help="as qkvlab eval harness --tasks")
    ap.add_argument("--harness-fewshot", type=int, default=5)
    ap.add_argument("--harness-limit", type=int, default=None)
    ap.add_argument("--harness-data", default=None, help="folder holding hellaswag/, piqa/, arc/, ...")
    ap.add_argument("--harness-device", default="auto")
    ap.add_argument(
        "--harness-truncate",
        default="left",
        help="'left': drop a long request's oldest context tokens, as lm-eval's hf model does (few-shot prompts "
        "outgrow a small model's context; rows count them); 'error' refuses",
    )
    args = ap.parse_args()

    import torch

    from qkvlab.study import load_sweep, read_jsonl, run_sweep

    t0 = time.time()
    link_data()
    spec = load_sweep(args.config)
    study = ROOT / (spec.study_dir or f"studies/{spec.name}")
    study.mkdir(parents=True, exist_ok=True)
    committed = Path(args.results) / "results.jsonl"
    if committed.is_file() and not (study / "results.jsonl").is_file():
        shutil.copyfile(committed, study / "results.jsonl")
    # On a machine kept warm between calls the study folder already holds earlier calls' runs:
    # the slice's counts and times are this call's alone (the archive still carries every run).
    before = {r["run_id"] for r in read_jsonl(study / "results.jsonl") if r.get("status") == "ok"}
    only = {k: v.split(",") for k, _, v in (item.partition("=") for item in args.only)}
    # Stopped from outside (the call's own limit): stop the workers, then pack what finished.
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        summary = run_sweep(
            spec,
            study,
            devices=args.devices,
            time_limit=args.time_limit,
            only=only or None,
            stop_at_limit=args.stop_at_limit,
        )
    except KeyboardInterrupt:
        print("stopped: packing the runs that finished", flush=True)
        summary = None
    (study / "results.jsonl").touch()  # stopped before the first row: an empty slice
    scored = []
    if args.harness_models and summary is not None:
        try:
            scored = score_downstream(study, args)
        except KeyboardInterrupt:
            print("stopped while scoring downstream tasks: packing what finished", flush=True)
    finished = {r["run_id"] for r in read_jsonl(study / "results.jsonl") if r.get("status") == "ok"}
    ran = [rid for rid in finished if (study / "runs" / rid).is_dir()]
    failed = [] if summary is None else [rid for rid, _ in summary.failed]

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(study / "results.jsonl", out / "results.jsonl")
    with tarfile.open(out / "runs.tar.gz", "w:gz") as tar:
        tar.add(study / "sweep.yaml", arcname="sweep.yaml")  # the grid the report checks rows against
        for run_id in ran:
            for name in RUN_FILES:
                path = study / "runs" / run_id / name
                if path.is_file():
                    tar.add(path, arcname=f"runs/{run_id}/{name}")
        for run_id in failed:
            log = study / ".jobs" / f"{run_id}.log"
            if log.is_file():
                tar.add(log, arcname=f"failed/{run_id}.log")
    new = set(ran) - before
    rows = [r for r in read_jsonl(study / "results.jsonl") if r.get("run_id") in new]
    info = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.gmtime(t0)),
        "wall_s": round(time.time() - t0, 1),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "devices": args.devices,
        "time_limit_s": args.time_limit,
        "ran": len(new),
        "failed": len(failed),
        "deferred": None if summary is None else len(summary.deferred),
        "stopped_with_checkpoint": None if summary is None else len(summary.stopped),
        "stopped": summary is None,
        "harness_scored": scored,
        "train_time_s": round(sum(r.get("train_time_s") or 0 for r in rows), 1),
        "run_wall_s": round(sum(r.get("wall_s") or 0 for r in rows), 1),
    }
    (out / "slice.json").write_text(json.dumps(info, indent=1))
    print(json.dumps(info))
    return 0 if summary is not None and not failed else 1


if __name__ == "__main__":
    sys.exit(main())
