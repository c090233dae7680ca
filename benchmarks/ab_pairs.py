"""Before/after pairs of a generation benchmark: is a source change faster, and by how much?

Runs ``gpu_generate_vs_hf.py`` (with the arguments after ``--``) alternately on two source
trees, ``--before-src`` and ``--after-src`` (default: this checkout's ``src``), ``--pairs``
times, each run its own process, in the order before/after, after/before, before/after, ... so
that a drift of the machine over the call does not favour one side. Between two runs of the
same code the tokens/s of a 30-step row vary by up to about 2% on an H100, more than many kernel
changes are worth: a single before/after run decides nothing, pairs on one machine do.

For every row (system, variant, batch, context) it prints each pair's tokens/s and ratio, the
mean ratio (geometric), how many pairs the change won, the exact two-sided sign test over the
pairs, and a one-sample t-test of the log ratios (scipy, where installed), and writes all runs'
rows and the summary to JSON with the hardware and versions, after every run: a call stopped at
its time limit keeps the runs it finished, and a run that fails or overruns ``--timeout`` ends
the pairs with one line, its place recorded under ``stopped``. A step row is paired twice: its
waited steps (what a caller reading every token sees) and, as "<system> in a row", the same
steps back to back (the GPU's part alone, steadier between runs). ``--summary-of FILE`` prints
the table of an earlier run's JSON with this summary.

A side can also differ by its environment alone: ``--before-env`` / ``--after-env NAME=VALUE``
(repeatable) set variables for that side's runs, and without ``--before-src`` both sides run this
``src``; e.g. a decode launch against the default, ``--after-env
QKVLAB_DECODE_CONFIG='{"block_n": 64, "num_stages": 6}'``.

A tree to compare against is any folder holding a ``qkvlab`` package, e.g. this checkout's
``src`` with one file taken from an earlier commit (on a machine without ``.git``, carry it)::

    cp -r src /tmp/src_before && git show HEAD~1:src/qkvlab/kernels/gemv.py > /tmp/src_before/qkvlab/kernels/gemv.py
    PYTHONPATH=src:benchmarks python3 benchmarks/ab_pairs.py --before-src /tmp/src_before --pairs 3 \\
        --out $OUT/ab.json -- --variants Q-GQA-8,QKV --points 1x32768 --systems qkvlab --prefill none \\
        --no-gemma --fuse --gemv kernel --steps 200
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from benchutil import env_info, write_json

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_generate_vs_hf.py"


def tree_digest(src: Path) -> str:
    """SHA-256 over the ``qkvlab`` package's ``.py`` files (relative paths and contents): which
    code a side ran, where the environment's one source commit cannot tell two trees apart."""
    import hashlib

    h = hashlib.sha256()
    for path in sorted((src / "qkvlab").rglob("*.py")):
        h.update(path.relative_to(src).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def sign_test_p(wins: int, n: int) -> float:
    """Exact two-sided sign test: the probability of a split at least this uneven under 50/50."""
    if n == 0:
        return 1.0
    k = min(wins, n - wins)
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n)


def log_ratio_t_test(ratios: list[float]) -> dict | None:
    """One-sample t-test of the log ratios against 0 (scipy); None without scipy or with < 2 pairs."""
    if len(ratios) < 2:
        return None
    try:
        from scipy import stats
    except ImportError:
        return None
    logs = [math.log(r) for r in ratios]
    if max(logs) == min(logs):
        return None  # no spread: the t statistic is undefined
    res = stats.ttest_1samp(logs, 0.0)
    return {"t": float(res.statistic), "p": float(res.pvalue), "df": len(logs) - 1}


def row_key(r: dict) -> tuple:
    return (r["system"], r["variant"], r["B"], r["context"])


def timed_rows(doc: dict) -> list[dict]:
    """A run's rows with a tokens/s: its decode steps, and its whole ``generate`` calls (``--generate``)
    as rows of system ``"generate <system>"`` whose context is the prompt's length."""
    rows = [r for r in doc["rows"] if "tokens_per_s" in r]
    return rows + [
        {**r, "system": f"generate {r['system']}", "context": r["prompt"]}
        for r in doc.get("generate", [])
        if "tokens_per_s" in r
    ]


def summarise(runs: list[dict]) -> list[dict]:
    """Per row key: tokens/s of each pair's before and after, ratios, wins and the tests. A step row
    that also timed its steps back to back gives a second key, its system followed by "in a row"."""
    by_pair: dict[int, dict[str, dict[tuple, float]]] = {}
    for run in runs:
        side = by_pair.setdefault(run["pair"], {}).setdefault(run["side"], {})
        for r in run["rows"]:
            side[row_key(r)] = r["tokens_per_s"]
            if "tokens_per_s_in_a_row" in r:
                # the same steps back to back: the GPU's share alone, without the host's lead-in to
                # each waited step, whose spread between runs can hide a change of a percent
                side[(f"{r['system']} in a row", *row_key(r)[1:])] = r["tokens_per_s_in_a_row"]
    keys = sorted({k for p in by_pair.values() for s in p.values() for k in s}, key=str)
    out = []
    for key in keys:
        before, after = [], []
        for i in sorted(by_pair):
            b, a = by_pair[i].get("before", {}).get(key), by_pair[i].get("after", {}).get(key)
            if b is not None and a is not None:
                before.append(b)
                after.append(a)
        ratios = [a / b for a, b in zip(after, before, strict=True)]
        wins = sum(r > 1 for r in ratios)
        out.append(
            {
                "system": key[0],
                "variant": key[1],
                "B": key[2],
                "context": key[3],
                "before_tokens_per_s": before,
                "after_tokens_per_s": after,
                "ratios": ratios,
                "geomean_ratio": math.exp(statistics.fmean(math.log(r) for r in ratios)) if ratios else None,
                "after_wins": wins,
                "pairs": len(ratios),
                "sign_test_p": sign_test_p(wins, len(ratios)),
                "log_ratio_t_test": log_ratio_t_test(ratios),
            }
        )
    return out


def table(summary: list[dict]) -> str:
    lines = [f"{'row':<42} {'before tok/s':>22} {'after tok/s':>22} {'ratio':>7} {'wins':>5} {'sign p':>7} {'t p':>7}"]
    for s in summary:
        name = f"{s['system']} {s['variant']} B={s['B']} S={s['context']}"
        b = "/".join(f"{v:.1f}" for v in s["before_tokens_per_s"])
        a = "/".join(f"{v:.1f}" for v in s["after_tokens_per_s"])
        t = s["log_ratio_t_test"]
        t_p = f"{t['p']:.3f}" if t else "-"
        ratio = f"{s['geomean_ratio']:.3f}" if s["geomean_ratio"] else "-"
        lines.append(
            f"{name:<42} {b:>22} {a:>22} {ratio:>7} {s['after_wins']:>2}/{s['pairs']:<2} "
            f"{s['sign_test_p']:7.3f} {t_p:>7}"
        )
    lines.append("ratio: geometric mean of after/before over the pairs; wins: pairs where after was faster;")
    lines.append("sign p: exact two-sided sign test; t p: one-sample t-test of the log ratios (scipy)")
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    given = list(argv)
    passthrough = []
    if "--" in argv:
        i = argv.index("--")
        argv, passthrough = argv[:i], argv[i + 1 :]
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--before-src",
        type=Path,
        help="a folder holding the 'before' qkvlab package (required unless the sides' --*-env differ)",
    )
    ap.add_argument("--after-src", type=Path, default=ROOT / "src", help="the 'after' one (default: this src)")
    for side in ("before", "after"):
        ap.add_argument(
            f"--{side}-env",
            action="append",
            default=[],
            metavar="NAME=VALUE",
            help=f"an environment variable for the {side!r} side's runs (repeatable)",
        )
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--timeout", type=int, default=300, help="seconds a run may take")
    ap.add_argument("--smoke", action="store_true", help="pass --smoke to each run (CPU; the plumbing only)")
    ap.add_argument(
        "--summary-of",
        type=Path,
        default=None,
        help="print the table of an earlier run's JSON, summarised by this script (runs nothing)",
    )
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.summary_of is not None:
        try:
            runs = json.loads(args.summary_of.read_text())["runs"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            ap.error(f"--summary-of {args.summary_of}: not a JSON this script wrote ({type(e).__name__}: {e})")
        print(table(summarise(runs)))
        return 0
    envs = {}
    for side in ("before", "after"):
        pairs = getattr(args, f"{side}_env")
        bad = [p for p in pairs if "=" not in p or not p.split("=", 1)[0].strip()]
        if bad:
            ap.error(f"--{side}-env {bad[0]!r}: give NAME=VALUE, e.g. QKVLAB_PDL=0")
        envs[side] = dict(p.split("=", 1) for p in pairs)
    if args.before_src is None:
        if envs["before"] == envs["after"]:
            ap.error(
                "--before-src is required (the folder that holds the 'before' qkvlab/), "
                "unless --before-env / --after-env make the sides differ"
            )
        args.before_src = args.after_src
    for name in ("before_src", "after_src"):
        src = getattr(args, name)
        if not (src / "qkvlab" / "__init__.py").is_file():
            ap.error(f"--{name.replace('_', '-')} {src}: no qkvlab package there (give the folder that holds qkvlab/)")
    if args.pairs < 1:
        ap.error(f"--pairs must be at least 1, got {args.pairs}")
    if any(a == "--out" or a.startswith("--out=") for a in passthrough):
        ap.error("give --out before '--': each run's JSON is written by this script")
    if args.smoke:
        passthrough = ["--smoke", *passthrough]
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    doc = {
        "benchmark": "ab_pairs",
        "env": env_info(device),
        "argv": given,
        "runs_args": passthrough,
        "before_src": str(args.before_src),
        "after_src": str(args.after_src),
        "before_env": envs["before"],
        "after_env": envs["after"],
        "before_sha256": tree_digest(args.before_src),
        "after_sha256": tree_digest(args.after_src),
        "runs": [],
        "summary": [],
    }
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.pairs):
            order = ("before", "after") if i % 2 == 0 else ("after", "before")
            for side in order:
                src = args.before_src if side == "before" else args.after_src
                out = Path(tmp) / f"{side}_{i}.json"
                env = dict(os.environ, **envs[side])
                env["PYTHONPATH"] = os.pathsep.join([str(src), str(ROOT / "benchmarks")])
                env.pop("OUT", None)  # the runs' own JSON stays here; this script writes the record
                try:
                    proc = subprocess.run(
                        [sys.executable, str(SCRIPT), *passthrough, "--out", str(out)],
                        env=env,
                        cwd=ROOT,
                        capture_output=True,
                        text=True,
                        timeout=args.timeout,
                    )
                    failed = None if proc.returncode == 0 and out.is_file() else f"exit {proc.returncode}"
                    tail = proc.stdout[-2000:] + proc.stderr[-2000:]
                except subprocess.TimeoutExpired as e:
                    # TimeoutExpired holds bytes whatever text= said
                    got = [
                        x.decode(errors="replace") if isinstance(x, bytes) else x or "" for x in (e.output, e.stderr)
                    ]
                    failed, tail = f"over its {args.timeout} s limit", got[0][-2000:] + got[1][-2000:]
                if failed:
                    doc["stopped"] = {"pair": i, "side": side, "why": failed}
                    write_json(doc, "ab_pairs.json", args.out)  # the pairs finished so far stay
                    print(f"pair {i} {side}: gpu_generate_vs_hf.py failed ({failed}); stopping")
                    print(tail)
                    return 1
                rows = timed_rows(json.loads(out.read_text()))
                doc["runs"].append({"pair": i, "side": side, "rows": rows})
                # written after every run: a call cut off at its time limit keeps what it measured
                doc["summary"] = summarise(doc["runs"])
                write_json(doc, "ab_pairs.json", args.out)
                print(
                    f"pair {i} {side}: " + ", ".join(f"{r['variant']} {r['tokens_per_s']:.1f}" for r in rows),
                    flush=True,
                )
    print(table(doc["summary"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
