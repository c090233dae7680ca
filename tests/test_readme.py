"""The documentation works as written.

- Every command in the README's ```bash blocks runs exactly as written (in a scratch folder, so
  nothing in the repository is written), except the commands listed in ``NOT_RUN`` with the
  reason; the README's ```python blocks run too.
- Every relative link in README.md and docs/*.md points at a file that exists (and at a heading
  that exists, for ``file.md#anchor``).
- Every file under benchmarks/results/ is cited by the docs or named by code, and every result
  file the docs cite exists.
- The tables of docs/benchmarks.md are generated from the JSON they cite: each sits under a
  ``<!-- table: KIND FILE... -->`` line and must equal what ``TABLES[KIND](FILE...)`` makes.
  ``python tests/test_readme.py --write`` rewrites them from the JSON.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
BENCH_DOC = ROOT / "docs" / "benchmarks.md"
RESULTS = ROOT / "benchmarks" / "results"

# README commands no test runs, and why. Every other command in a ```bash block of the README runs.
NOT_RUN = {
    "make demo": "the main job, minutes of training; tests/test_demo.py runs `qkvlab demo` on a small budget",
    "make test": "the test suite itself (.ci/run calls it)",
}

# Folders of the repository the README's commands read, linked (read-only) or copied into the scratch folder.
LINKED = ("configs", ".venv")  # .venv: `source .venv/bin/activate`
COPIED = ("results",)


# ----------------------------------------------------------------------------- markdown helpers


def fenced_blocks(text: str) -> list[tuple[str, str]]:
    """(language, body) of each fenced code block, in order."""
    return [(m.group(1), m.group(2)) for m in re.finditer(r"^```(\w*)\n(.*?)^```", text, re.M | re.S)]


def commands(block: str) -> list[str]:
    """The commands of a shell block (continuation lines joined), without their trailing comments."""
    out, pending = [], ""
    for line in block.splitlines():
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        line = pending + line
        pending = ""
        cmd = re.sub(r"\s+#.*$", "", line).strip()
        if cmd and not cmd.startswith("#"):
            out.append(cmd)
    return out


def unfenced(text: str) -> str:
    """``text`` without its fenced blocks."""
    return re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)


def prose(text: str) -> str:
    """``text`` without fenced blocks and inline code (links there are examples, not links)."""
    return re.sub(r"`[^`\n]*`", "", unfenced(text))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    s = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return s.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    return {slug(m.group(1)) for m in re.finditer(r"^#+\s+(.*)$", unfenced(path.read_text()), re.M)}


# ----------------------------------------------------------------------------- the README's commands


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    """A folder that looks like a fresh clone to the README's commands."""
    root = tmp_path_factory.mktemp("readme")
    for name in LINKED:
        if (ROOT / name).exists():
            (root / name).symlink_to(ROOT / name, target_is_directory=True)
    if not (root / ".venv" / "bin" / "activate").exists():  # tests run in another environment: activate that one
        (root / ".venv" / "bin").mkdir(parents=True, exist_ok=True)
        (root / ".venv" / "bin" / "activate").write_text(f'export PATH="{Path(sys.executable).parent}:$PATH"\n')
    for name in COPIED:
        shutil.copytree(ROOT / name, root / name, ignore=shutil.ignore_patterns("analysis"))
    return root


def shell_env() -> dict[str, str]:
    """The environment a user has after ``source .venv/bin/activate``: this interpreter's bin first."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.pop("OUT", None)
    return env


def test_readme_keeps_the_ci_test_command():
    """.ci/run runs the README's test command; the README shows it and no test runs it."""
    ci = (ROOT / ".ci" / "run").read_text()
    shown = [c for lang, body in fenced_blocks(README.read_text()) if lang == "bash" for c in commands(body)]
    assert "make test" in shown and "make demo" in shown
    assert re.search(r"^make test$", ci, re.M), ci


def test_readme_bash_blocks_run_as_written(scratch):
    blocks = [body for lang, body in fenced_blocks(README.read_text()) if lang == "bash"]
    assert blocks, "the README has no ```bash block"
    ran = 0
    for body in blocks:
        cmds = commands(body)
        skipped = [c for c in cmds if c in NOT_RUN]
        if skipped:
            assert skipped == cmds, f"a ```bash block mixes commands that run with ones that do not: {cmds}"
            continue
        proc = subprocess.run(
            ["bash", "-e", "-o", "pipefail", "-c", body],
            cwd=scratch,
            env=shell_env(),
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert proc.returncode == 0, (
            f"README block failed:\n{body}\n--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-3000:]}"
        )
        ran += len(cmds)
    assert ran, "no README command ran"
    report = scratch / "my-dickens" / "report" / "report.md"
    if report.exists():  # the quick start's report: tables, and no loss curves without run folders (said so)
        text = report.read_text()
        assert "| QKV |" in text and "![Loss curves" not in text and "Loss curves: not drawn" in text


def test_readme_python_blocks_run_as_written(scratch):
    blocks = [body for lang, body in fenced_blocks(README.read_text()) if lang == "python"]
    assert blocks, "the README has no ```python block"
    for i, body in enumerate(blocks):
        script = scratch / f"readme_block_{i}.py"
        script.write_text(body)
        proc = subprocess.run(
            [sys.executable, script.name], cwd=scratch, env=shell_env(), capture_output=True, text=True, timeout=600
        )
        assert proc.returncode == 0, f"README python block failed:\n{body}\n{proc.stderr[-3000:]}"


def test_readme_stays_short():
    assert len(README.read_text().splitlines()) <= 200, "the README is for users: put depth in docs/"


# ----------------------------------------------------------------------------- links and citations


@pytest.mark.parametrize("doc", [README, *DOCS], ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(doc: Path):
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", prose(doc.read_text())):
        if re.match(r"[a-z]+:", target):
            continue  # http(s), mailto
        path, _, anchor = target.partition("#")
        dest = (doc.parent / path).resolve() if path else doc
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target}: no heading #{anchor} in {dest.name}")
    assert not broken, f"{doc.name}: {broken}"


def cited_result_files() -> set[str]:
    text = "\n".join(p.read_text() for p in [README, *DOCS])
    return {m.group(1) for m in re.finditer(r"(?<![\w/.-])(?:benchmarks/results/)?([\w=.-]+\.(?:json|txt))\b", text)}


def test_benchmark_results_are_cited_and_citations_exist():
    files = {p.name for p in RESULTS.iterdir() if p.is_file()}
    cited_in_bench = {
        m for m in cited_result_files() if m in files or m.startswith(("gpu_", "cpu_", "ncu_", "profile_"))
    }
    missing = sorted(cited_in_bench - files)
    assert not missing, f"docs cite files that are not under benchmarks/results/: {missing}"
    code = "\n".join(
        p.read_text(errors="replace")
        for folder in ("src", "benchmarks", "scripts", "tests")
        for p in (ROOT / folder).rglob("*")
        if p.suffix in {".py", ".sh", ".yaml"} and p.is_file()
    )
    unused = sorted(f for f in files if f not in cited_in_bench and f not in code)
    assert not unused, f"benchmarks/results/ files no doc cites and no code names (history lives in git): {unused}"


# ----------------------------------------------------------------------------- benchmark tables from JSON


def _load(name: str) -> dict:
    return json.loads((RESULTS / name).read_text())


def _n(x: float) -> str:
    return f"{x:,.0f}"


def _table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def _ctx(s: int) -> str:
    return f"{s // 1024}k" if s >= 1024 and s % 1024 == 0 else str(s)


def cpu_table(name: str) -> str:
    rows = [
        [
            r["variant"],
            f"{r['train']['ratio_vs_qkv']:.3f}",
            f"{r['decode']['ratio_vs_qkv']:.3f}",
            _n(r["cache"]["bytes_per_token"]),
            f"{r['cache']['ratio_vs_qkv']:.3f}",
        ]
        for r in _load(name)["rows"]
    ]
    return _table(["variant", "train vs QKV", "decode vs QKV", "cache B/token", "cache vs QKV"], rows)


def _decode_table(name: str, full: bool) -> str:
    d = _load(name)
    head = ["batch x context, KV heads", "RoPE K=V, our kernel"]
    if full:
        head += ["same, no RoPE", "with QK-norm", "MHA, our kernel", "best MHA SDPA", "K=V aliased in cuDNN, no RoPE"]
    else:
        head += ["with QK-norm", "best MHA SDPA", "K=V aliased in cuDNN"]
    head += ["stream_read", "vs MHA", "/ alias", "% of copy BW"]
    rows = []
    for p in d["points"]:
        m = p["methods"]
        ours, mha, alias = m["ours_rope_kv"]["us"], m[p["best_mha"]]["us"], m["alias_cudnn"]["us"]
        label = f"{p['B']} x {_ctx(p['S'])}, {p['Hkv']}" + (f" (GQA-{p['Hkv']})" if p["Hkv"] != p["Hq"] else "")
        cells = [label, f"{ours:.1f} us"]
        if full:
            cells += [f"{m[k]['us']:.1f}" for k in ("ours_kv", "ours_rope_qkn_kv", "ours_sep_kv")]
        else:
            cells.append(f"{m['ours_rope_qkn_kv']['us']:.1f}")
        cells += [
            f"{mha:.1f} ({p['best_mha'].removeprefix('sdpa_')})",
            f"{alias:.1f}",
            f"{m['stream_read']['us']:.1f}",
            f"{mha / ours:.2f}x",
            f"{ours / alias:.3f}",
            f"{m['ours_rope_kv']['GBps'] / d['copy_GBps']:.0%}",
        ]
        rows.append(cells)
    return _table(head, rows)


def decode_table(name: str) -> str:
    return _decode_table(name, full=False)


def decode_full_table(name: str) -> str:
    return _decode_table(name, full=True)


def generate_table(*names: str) -> str:
    rows = [r for n in names for r in _load(n)["rows"]]
    points = sorted({(r["B"], r["context"]) for r in rows})
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    by = {(r["variant"], r["B"], r["context"]): r for r in rows}
    per_token = {v: b["bytes_per_token"] for n in names for v, b in _load(n).get("budget", {}).items()}
    out = []
    for v in variants:
        cells = [v]
        for b, s in points:
            r, base = by[(v, b, s)], by[(variants[0], b, s)]
            parts = []
            for mode in ("static", "compiled"):
                t = r[f"{mode}_tokens_per_s"]
                parts.append(_n(t) + (f" ({t / base[f'{mode}_tokens_per_s']:.2f}x)" if v != variants[0] else ""))
            cells.append(" / ".join(parts))
        out.append([*cells, _n(per_token[v])])
    head = ["variant", *(f"B={b}, {_ctx(s)}" for b, s in points), "cache bytes / token"]
    return _table(head, out)


def budget_table(name: str) -> str:
    d = _load(name)
    base = next(iter(d["budget"].values()))["decode"]
    rows = []
    for v, x in d["budget"].items():
        dec = x["decode"]
        g, c = dec["static_tokens_per_s"], dec["compiled_tokens_per_s"]
        rows.append(
            [
                v,
                str(x["batch"]),
                f"{dec['cache_GiB']:.1f} GiB",
                f"{_n(g)} / {_n(c)}",
                f"{g / base['static_tokens_per_s']:.2f}x / {c / base['compiled_tokens_per_s']:.2f}x",
            ]
        )
    head = ["variant", f"rows in {d['budget_GiB']:g} GiB", "cache", "tokens/s, graph / compiled", "vs QKV"]
    return _table(head, rows)


def train_table(name: str) -> str:
    pairs: dict[tuple, dict[str, dict]] = {}
    for run in _load(name)["runs"]:
        for r in run["rows"]:
            if r.get("source") == "qkvlab":
                mode = r["case"].split(f" {r['variant']} ", 1)[1]
                pairs.setdefault((r["preset"], mode, r["B"], r["T"]), {})[r["variant"]] = r
    rows = []
    for (preset, mode, b, t), p in pairs.items():
        if {"QKV", "Q-K=V"} <= p.keys():
            q, kv = p["QKV"], p["Q-K=V"]
            rows.append(
                [
                    f"{preset} ({q['params'] / 1e6:.1f}M)",
                    f"{mode}, B={b} x {t}",
                    f"{_n(q['tokens_per_s'])} ({q['mfu']:.1%})",
                    f"{_n(kv['tokens_per_s'])} ({kv['mfu']:.1%})",
                    f"{kv['tokens_per_s'] / q['tokens_per_s']:.3f}x",
                ]
            )
    return _table(["model", "step", "QKV tokens/s (MFU)", "Q-K=V tokens/s (MFU)", "Q-K=V / QKV"], rows)


TABLES: dict[str, Callable[..., str]] = {
    "cpu": cpu_table,
    "decode": decode_table,
    "decode_full": decode_full_table,
    "generate": generate_table,
    "budget": budget_table,
    "train": train_table,
}
MARKER = re.compile(r"^<!-- table: (\w+) ([^>]+?) -->\n((?:\|.*\n)*)", re.M)


def regenerate(text: str) -> str:
    """``text`` with every marked table replaced by the one its JSON makes."""
    return MARKER.sub(lambda m: f"<!-- table: {m[1]} {m[2]} -->\n{TABLES[m[1]](*m[2].split())}\n", text)


def test_benchmark_tables_match_their_json():
    text = BENCH_DOC.read_text()
    marked = MARKER.findall(text)
    assert len(marked) >= 8, "docs/benchmarks.md lost its generated tables"
    for kind, files, table in marked:
        assert table.strip() == TABLES[kind](*files.split()), (
            f"the {kind} table from {files} differs from its JSON: run `python tests/test_readme.py --write`"
        )


if __name__ == "__main__":
    if sys.argv[1:] != ["--write"]:
        sys.exit("usage: python tests/test_readme.py --write   (regenerates the tables of docs/benchmarks.md)")
    BENCH_DOC.write_text(regenerate(BENCH_DOC.read_text()))
    print(f"rewrote the tables of {BENCH_DOC.relative_to(ROOT)}")
