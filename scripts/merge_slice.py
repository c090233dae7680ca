"""Merge a sweep slice brought back from a device run into a committed results folder.

``results.jsonl`` of the slice holds the committed rows it started from plus its new ones:
rows are merged by run id (a row already committed is kept as it is; a run id is a hash of
the run's whole config, so rows of different configs never merge), run files are unpacked
under ``runs/``, and the slice's timing is appended to ``slices.jsonl`` (once: merging the same
slice again adds nothing).

    python scripts/merge_slice.py /path/to/files_at results/ladder-gutenberg [--lease-s 540]
"""

from __future__ import annotations

import argparse
import json
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))


def main() -> int:
    from qkvlab.checkpoint import atomic_write
    from qkvlab.study import read_jsonl

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("slice", type=Path, help="folder holding results.jsonl, runs.tar.gz, slice.json")
    ap.add_argument("results", type=Path, help="the committed results folder")
    ap.add_argument("--lease-s", type=float, default=None, help="device seconds the call held the machine")
    args = ap.parse_args()

    args.results.mkdir(parents=True, exist_ok=True)
    target = args.results / "results.jsonl"
    old = read_jsonl(target) if target.is_file() else []
    known = {r["run_id"] for r in old if r.get("status") == "ok"}
    new = [r for r in read_jsonl(args.slice / "results.jsonl") if r.get("run_id") not in known]
    seen = {json.dumps(r, sort_keys=True) for r in old}
    added = [r for r in new if json.dumps(r, sort_keys=True) not in seen]
    rows = old + added
    atomic_write(target, lambda p: Path(p).write_text("".join(json.dumps(r) + "\n" for r in rows)))
    with tarfile.open(args.slice / "runs.tar.gz") as tar:
        tar.extractall(args.results, filter="data")
    info = json.loads((args.slice / "slice.json").read_text())
    info["lease_s"] = args.lease_s
    log = args.results / "slices.jsonl"
    slices = read_jsonl(log) if log.is_file() else []
    # A slice is known by its start time: merging the same one again must not count its device
    # time twice (its rows are already skipped above).
    if any(s.get("started") == info.get("started") for s in slices):
        print(f"slice started {info.get('started')} is already in {log}: its timing is not added again")
    else:
        slices.append(info)
        atomic_write(log, lambda p: Path(p).write_text("".join(json.dumps(s) + "\n" for s in slices)))
    print(f"{len(added)} rows added ({sum(r.get('status') == 'ok' for r in added)} ok); {len(rows)} in {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
