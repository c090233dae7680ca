"""The qkvlab command line.

Commands: variants (cost table of a preset's variants), presets (list the named shapes),
demo (the main job), train (a YAML config plus KEY=VALUE overrides), eval ppl (perplexity of
a checkpoint), eval harness (downstream tasks through lm-evaluation-harness), generate
(KV-cached sampling), sweep and report (studies), analyze (projection similarity, effective
rank, attention symmetry and maps of checkpoints), maps (a task study's attention maps, tasks
x variants), export / import (transformers folders and GGUF files) and convert (QKV -> Q-K=V,
KV-head grouping). A user's mistake prints one line and exits with 2; Ctrl-C during a run
prints the command that resumes it and exits with 130.

Help text is plain text, no reST or Markdown: typer prints it as written.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shlex
import signal
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Annotated

import torch
import typer
from rich.console import Console
from rich.table import Table

from qkvlab.errors import ConfigError

HELP = (
    "Train, evaluate and compare transformers whose attention shares its query, key and value "
    "projections (Q-K=V, Q=K-V, ...) or its KV heads (GQA, MQA). Start with 'qkvlab demo'; "
    "'qkvlab COMMAND -h' explains a command."
)
#: -h works everywhere, as --help does (subcommands inherit it from the group's context).
CONTEXT = {"help_option_names": ["-h", "--help"]}

app = typer.Typer(add_completion=False, no_args_is_help=True, help=HELP, context_settings=CONTEXT)
console = Console() if sys.stdout.isatty() else Console(width=170)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
#: Figure files matplotlib writes without extra software (its PGF output needs LaTeX).
IMAGE_SUFFIXES = {".png", ".pdf", ".svg", ".jpg", ".jpeg", ".eps", ".ps", ".tif", ".tiff", ".webp"}


def _dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ConfigError(f"Unknown dtype {name!r}; use one of {', '.join(DTYPES)}.")
    return DTYPES[name]


def _at_least(option: str, value: int | None, low: int = 1) -> None:
    """A numeric option below ``low`` is refused here, never turned into a default or passed to torch."""
    if value is not None and value < low:
        raise ConfigError(f"{option} must be at least {low}, got {value}.")


def _utf8(option: str, text: str) -> str:
    """Command-line text that is not UTF-8 reaches Python as lone surrogates, which no tokenizer
    encodes: refused here with where the bad byte is."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        code = ord(text[e.start])
        byte = f"byte 0x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"character U+{code:04X}"
        raise ConfigError(
            f"{option} is not UTF-8 text ({byte} at character {e.start}); set the terminal to UTF-8 "
            "(e.g. LANG=C.UTF-8) or convert the text first (iconv -f latin1 -t utf-8)."
        ) from None
    return text


def _language_model(model, path: Path, command: str) -> None:
    if model.config.family != "gpt":
        raise ConfigError(
            f"{str(path)!r} holds a model of the {model.config.family!r} family; {command} needs a GPT language model "
            "(qkvlab analyze and the task reports read the others)."
        )


def _device(name: str) -> str:
    """``--device``: 'auto' resolved; anything but cpu / cuda / cuda:N on a visible GPU refused."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if re.fullmatch(r"cpu|cuda(:[0-9]+)?", name) is None:
        raise ConfigError(f"--device {name!r} is not a device; use 'auto', 'cpu', 'cuda' or 'cuda:N'.")
    if name.startswith("cuda"):
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if int(name.partition(":")[2] or 0) >= count:
            raise ConfigError(f"--device {name!r}, but {count} CUDA device(s) are visible; use --device cpu or auto.")
    return name


def _split_variants(values: list[str] | None) -> list[str] | None:
    if not values:
        return None
    out: list[str] = []
    for v in values:
        out.extend(p.strip() for p in v.split(",") if p.strip())
    return out


def _launcher() -> list[str]:
    """The start of a command that runs qkvlab again the way this process was started."""
    world = os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("WORLD_SIZE")
    if os.environ.get("TORCHELASTIC_RUN_ID") and world:
        return ["torchrun", "--standalone", "--nproc_per_node", world, "-m", "qkvlab.cli"]
    return ["qkvlab"]


def _stopped(message: str, command: list[str]) -> typer.Exit:
    """Ctrl-C: one line on stderr that ends with the command that continues the work, and exit
    status 130 (128 + SIGINT, as a shell reports it). Under torchrun only process 0 says it."""
    if os.environ.get("RANK", "0") == "0":
        start = "\r" if sys.stderr.isatty() else ""  # over the ^C the terminal echoed
        print(f"{start}{message}; resume with: {shlex.join(command)}", file=sys.stderr, flush=True)
    return typer.Exit(130)


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.2f} {unit}"
        n /= 1024
    raise AssertionError


def variants_table(rows: list[dict], title: str) -> Table:
    ctx = rows[0]["context"] if rows else 0
    seq = rows[0]["seq_len"] if rows else 0
    table = Table(title=title, title_justify="left")
    for col, just in [
        ("variant", "left"),
        ("id", "left"),
        ("params", "right"),
        ("attn params", "right"),
        (f"GMACs @{seq}", "right"),
        ("cached/layer", "right"),
        ("KV B/token", "right"),
        ("measured", "right"),
        (f"KV @{ctx // 1024}k", "right"),
        ("cache vs QKV", "right"),
    ]:
        table.add_column(col, justify=just)
    for r in rows:
        table.add_row(
            r["variant"],
            r["id"],
            f"{r['params_total']:,}",
            f"{r['params_attention']:,}",
            f"{r['macs'] / 1e9:,.2f}",
            f"{r['cached_tensors_per_layer']}",
            f"{r['kv_cache_bytes_per_token']:,}",
            f"{r['kv_cache_bytes_per_token_measured']:,.0f}",
            human_bytes(r["kv_cache_bytes_at_context"]),
            f"-{100 * r['cache_reduction']:.4g}%" if r["cache_reduction"] else "0%",
        )
    return table


@app.command()
def variants(
    preset: Annotated[str, typer.Option(help="Model shape: a preset name (see 'qkvlab presets').")] = "paper-300m",
    variant: Annotated[
        list[str] | None,
        typer.Option("--variant", "-v", help="Variant(s), repeatable or comma-separated; default: the paper's."),
    ] = None,
    seq_len: Annotated[int | None, typer.Option(help="Sequence length for MACs (default: the preset's).")] = None,
    context: Annotated[int, typer.Option(help="Context length for the cache-size column.")] = 32768,
    dtype: Annotated[str, typer.Option(help="Cache dtype: bf16, fp16 or fp32.")] = "bf16",
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON list instead of a table.")] = False,
) -> None:
    """Parameters, MACs and KV-cache bytes (analytic and measured) per variant of a preset."""
    from qkvlab.costs import variant_costs
    from qkvlab.models import get_preset, paper_variants

    _at_least("--seq-len", seq_len)
    _at_least("--context", context)
    if variant is not None and not _split_variants(variant):  # never the default list in its place
        raise ConfigError(f"--variant {' '.join(variant)!r} names no variant; write e.g. -v Q-K=V or -v 'QKV,GQA-4'.")
    names = _split_variants(variant) or paper_variants(preset)
    base = get_preset(preset)
    rows = variant_costs(base, names, seq_len=seq_len, context=context, dtype=_dtype(dtype))
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    console.print(variants_table(rows, f"{preset}: costs per variant ({dtype} cache, measured from allocated tensors)"))


@app.command()
def presets() -> None:
    """List the named model shapes."""
    from qkvlab.costs import build_on_meta, count_params
    from qkvlab.models import PRESETS, get_preset

    table = Table(title="presets (parameters of the QKV variant; ladder names give non-embedding size)")
    for col in ("name", "recipe", "layers", "d_model", "heads", "d_ff", "vocab", "max len", "params", "non-emb"):
        table.add_column(col, justify="left" if col in ("name", "recipe") else "right")
    for name in PRESETS:
        cfg = get_preset(name)
        p = count_params(build_on_meta(cfg))
        non_emb = p["total"] - p["embedding"] - (0 if cfg.tie_embeddings else cfg.vocab_size * cfg.d_model)
        table.add_row(
            name, cfg.recipe, str(cfg.n_layers), str(cfg.d_model), str(cfg.n_heads), str(cfg.d_ff),
            f"{cfg.vocab_size:,}", str(cfg.max_seq_len), f"{p['total'] / 1e6:,.1f}M", f"{non_emb / 1e6:,.2f}M",
        )  # fmt: skip
    console.print(table)


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Study folder for the runs, results and report.")] = Path("runs/demo"),
    tokens: Annotated[str, typer.Option(help="Training tokens per variant (e.g. 1.5M).")] = "1.5M",
    seeds: Annotated[str, typer.Option(help="Comma-separated seeds; each variant trains once per seed.")] = "0",
) -> None:
    """The main job: train the paper's eight LM variants on the stdlib corpus and compare them.

    First the paper-300m cost table; then each variant trains the tiny GPT on the Python
    standard library's source (byte-level, nothing downloaded) for the same token budget;
    then a table of validation perplexity, change vs QKV, KV-cache bytes, parameters and
    training / decoding speed, and a markdown report with plots. A killed demo resumes.
    """
    from qkvlab.study import read_jsonl, run_sweep, summarize_group, write_report
    from qkvlab.study.demo import demo_run_fn, demo_spec
    from qkvlab.study.sweep import parse_tokens
    from qkvlab.train.config import MAX_SEED

    t0 = time.perf_counter()
    # every option is checked before the cost table: a mistake is one line, not a table and then a failure
    parts = [x.strip() for x in seeds.split(",") if x.strip()]
    if not parts or not all(x.isdigit() for x in parts) or any(int(x) > MAX_SEED for x in parts):
        raise ConfigError(
            f"--seeds must list integers in [0, {MAX_SEED}] separated by commas, e.g. 0,1,2; got {seeds!r}."
        )
    seed_list = [int(x) for x in parts]
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {str(out)!r} is a file; name a folder for the demo's study.")
    spec = demo_spec(parse_tokens(tokens), seed_list, out)
    variants(preset="paper-300m", variant=None, seq_len=None, context=32768, dtype="bf16", as_json=False)
    try:
        summary = run_sweep(spec, out, run_fn=demo_run_fn())
    except KeyboardInterrupt:
        given = {"--out": (str(out), "runs/demo"), "--tokens": (tokens, "1.5M"), "--seeds": (seeds, "0")}
        options = [x for name, (value, default) in given.items() if value != default for x in (name, value)]
        raise _stopped(
            f"Demo stopped; finished runs stay in {out / 'results.jsonl'} and the interrupted one continues from "
            "its last checkpoint",
            [*_launcher(), "demo", *options],
        ) from None
    rows = [r for r in read_jsonl(out / "results.jsonl") if r.get("status") == "ok"]
    stats = summarize_group(rows)
    table = Table(title=f"demo: tiny GPT on the stdlib corpus, {tokens} tokens per run, seeds {seeds} (CPU)")
    cols = ("variant", "val PPL", "vs QKV", "KV B/token (bf16)", "KV @32k", "params", "train tok/s", "decode tok/s")
    for col in cols:
        table.add_column(col, justify="left" if col == "variant" else "right")
    for st in stats:
        ppl, sd, n = st.val_ppl
        kv = st.first("kv_cache_bytes_per_token") or 0
        table.add_row(
            st.label,
            f"{ppl:.3f}" + (f" ± {sd:.3f}" if n > 1 and sd is not None else ""),
            "-" if st.baseline or st.ppl_change is None else f"{100 * st.ppl_change:+.2f}%",
            f"{kv:,}",
            human_bytes(kv * 32768),
            f"{st.first('params_total'):,}",
            f"{st.mean('train_tokens_per_s') or 0:,.0f}",
            f"{st.mean('decode_tokens_per_s') or 0:,.0f}",
        )
    console.print(table)
    report = write_report(out)
    console.print(f"{summary}\nreport: {report}\nwall time: {time.perf_counter() - t0:,.0f} s")
    if summary.failed:
        raise typer.Exit(1)


@app.command()
def sweep(
    config: Annotated[
        Path, typer.Argument(metavar="CONFIG", help="Sweep YAML (base config + grid).", show_default=False)
    ],
    out: Annotated[Path | None, typer.Option(help="Study folder (default: the sweep's study_dir).")] = None,
    devices: Annotated[
        str | None,
        typer.Option(
            help="'cpu', 'all' or GPU ids like '0,1': one run per entry at a time ('0,0,0': three at once on GPU 0)."
        ),
    ] = None,
    time_limit: Annotated[
        float | None,
        typer.Option(help="Seconds: start only runs expected to finish inside them; the rest wait for the next call."),
    ] = None,
    stop_at_limit: Annotated[
        bool,
        typer.Option(
            "--stop-at-limit",
            help="With --time-limit: also start runs that will not finish, and at the limit stop each with a "
            "checkpoint; the next call resumes them (for a machine kept between calls).",
        ),
    ] = False,
    force: Annotated[
        bool,
        typer.Option("--force", help="Run into a study folder that holds another study (another name or base config)."),
    ] = False,
    only: Annotated[
        list[str] | None,
        typer.Option(help="KEY=V1,V2 (repeatable): run only the grid points with these values, e.g. model=gpt2-3m."),
    ] = None,
) -> None:
    """Run a grid of training runs (variants x models x token budgets x seeds); resumes if killed.

    A rerun of the same study (same name and base config; the grid may have grown) continues
    it; a folder that holds another study is refused unless --force; two sweeps at once on
    one folder are refused.
    """
    from qkvlab.study import load_sweep, run_sweep

    selected: dict[str, list[str]] = {}
    for item in only or []:
        key, sep, values = item.partition("=")
        if not sep or not key.strip() or not values.strip():
            raise ConfigError(f"--only {item!r} is not KEY=V1,V2; write e.g. --only model=gpt2-3m,gpt2-10m.")
        selected.setdefault(key.strip(), []).extend(v.strip() for v in values.split(",") if v.strip())
    spec = load_sweep(config)
    try:
        summary = run_sweep(
            spec,
            out,
            devices=devices,
            time_limit=time_limit,
            force=force,
            only=selected or None,
            stop_at_limit=stop_at_limit,
        )
    except KeyboardInterrupt:
        study = Path(out if out is not None else spec.study_dir or Path("studies") / spec.name)
        command = [*_launcher(), "sweep", str(config)]
        command += ["--out", str(out)] if out is not None else []
        command += ["--devices", devices] if devices is not None else []
        command += ["--time-limit", f"{time_limit:g}"] if time_limit is not None else []
        command += ["--stop-at-limit"] if stop_at_limit else []
        command += ["--force"] if force else []
        command += [x for item in only or [] for x in ("--only", item)]
        raise _stopped(
            f"Sweep stopped; finished runs stay in {study / 'results.jsonl'} and the interrupted ones continue "
            "from their last checkpoint",
            command,
        ) from None
    console.print(str(summary))
    if summary.failed:
        raise typer.Exit(1)


@app.command()
def report(
    study_dir: Annotated[
        Path, typer.Argument(metavar="STUDY", help="A study folder with results.jsonl.", show_default=False)
    ],
    plots: Annotated[bool, typer.Option(help="Write PNG plots (needs matplotlib).")] = True,
    paper_table: Annotated[
        str | None, typer.Option(help="The paper's table to set beside ours: table2 (synthetic) or table4 (LM).")
    ] = None,
) -> None:
    """Write report.md (paper-style tables) and plots for a study folder from its results.

    A study whose sweep.yaml says 'report: ladder' gets the scaling-ladder analysis instead.
    """
    from qkvlab.study import write_report

    console.print(str(write_report(study_dir, plots=plots, paper_table=paper_table)))


@app.command()
def maps(
    study_dir: Annotated[
        Path, typer.Argument(metavar="STUDY", help="A task study folder (results.jsonl).", show_default=False)
    ],
    where: Annotated[
        list[str] | None, typer.Option(help="KEY=VALUE setting to draw, e.g. model.d_model=64 (repeatable).")
    ] = None,
    seed: Annotated[int, typer.Option(help="Which seed's runs.")] = 0,
    layer: Annotated[int, typer.Option(help="Which attention layer.")] = 0,
    out: Annotated[Path | None, typer.Option(help="PNG path (default: STUDY/report/attention-maps.png).")] = None,
) -> None:
    """Attention maps of a synthetic-task study: rows tasks, columns variants (the paper's appendix figure)."""
    from qkvlab.analysis.runner import study_task_maps
    from qkvlab.checkpoint import atomic_write
    from qkvlab.train.config import parse_override

    settings = {}
    for item in where or []:
        try:
            key, value = parse_override(item)
        except ConfigError:
            raise ConfigError(f"--where {item!r}: write KEY=VALUE, e.g. --where model.d_model=64.") from None
        settings[key] = value
    if out is not None and out.is_dir():
        raise ConfigError(f"--out {str(out)!r} is a folder; name an image file, e.g. {str(out / 'maps.png')!r}.")
    if out is not None and out.suffix.lower() not in IMAGE_SUFFIXES:
        raise ConfigError(
            f"--out {str(out)!r}: the figure is written as an image; end the name in one of "
            f"{', '.join(sorted(IMAGE_SUFFIXES))}."
        )
    path = out or Path(study_dir) / "report" / "attention-maps.png"
    fig, drawn = study_task_maps(study_dir, path, where=settings, seed=seed, layer=layer)
    text = json.dumps({"where": settings, "seed": seed, "layer": layer, "runs": drawn}, indent=1)
    atomic_write(Path(fig).with_suffix(".json"), lambda tmp: Path(tmp).write_text(text))
    console.print(f"{fig} ({len(drawn)} runs)")


@app.command()
def train(
    config: Annotated[
        Path,
        typer.Argument(metavar="CONFIG", help="YAML config, e.g. configs/lm/tiny-stdlib.yaml.", show_default=False),
    ],
    overrides: Annotated[
        list[str] | None,
        typer.Argument(
            metavar="KEY=VALUE",
            help="KEY=VALUE overrides with dotted keys, values read as YAML: optim.lr=3e-4 model.variant=Q-K=V.",
            show_default=False,
        ),
    ] = None,
    resume: Annotated[
        bool,
        typer.Option(
            "--resume", help="Continue from the latest checkpoint in out_dir (same config; optim.lr may change)."
        ),
    ] = False,
    force: Annotated[
        bool,
        typer.Option(
            "--force", help="Start a new run in an out_dir that holds another run, deleting that run's files."
        ),
    ] = False,
) -> None:
    """Train a model from a config; under torchrun, on every process (DDP or FSDP2).

    An out_dir that already holds a run is refused unless --resume (the same run) or --force.
    """
    from qkvlab.train import RunStopped, load_config
    from qkvlab.train import train as run_training

    cfg = load_config(config, overrides or [])
    try:
        with _ctrl_c_stops_the_run():
            run_training(cfg, resume=resume, force=force)
    except (KeyboardInterrupt, RunStopped):
        raise _train_stopped(cfg, [*_launcher(), "train", str(config), *(overrides or [])]) from None


@contextlib.contextmanager
def _ctrl_c_stops_the_run():
    """The first Ctrl-C asks the run to stop after its current step with a checkpoint (the
    trainer's own stop request, answered by RunStopped); a second one interrupts at once.

    A KeyboardInterrupt raised wherever the main thread happens to be can land in a finaliser or a
    library's cleanup, where Python only prints it and the run trains on; a flag the loop reads
    cannot be lost that way. Under torchrun each process gets the signal, and a distributed run
    does not answer stop requests, so there the plain KeyboardInterrupt stays."""
    from qkvlab.train import request_stop

    distributed = os.environ.get("WORLD_SIZE", "1").strip() not in ("", "1")  # torchrun sets it
    if distributed or threading.current_thread() is not threading.main_thread():
        yield
        return

    def first(signum, frame):
        request_stop()
        signal.signal(signal.SIGINT, signal.default_int_handler)

    previous = signal.signal(signal.SIGINT, first)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        request_stop(False)  # a request the run ended before answering must not stop the next one


def _train_stopped(cfg, command: list[str]) -> typer.Exit:
    """Ctrl-C during training: where the run stands and the --resume command that continues it."""
    from qkvlab.train import latest_checkpoint

    out = Path(cfg.out_dir)
    try:
        latest = latest_checkpoint(out)
    except ConfigError:  # a hand-edited checkpoints folder: --resume says what is wrong with it
        latest = None
    if latest is not None:
        where = f"its last checkpoint is step {int(latest.name.partition('-')[2])} in {out}"
    else:
        where = f"no checkpoint in {out} yet (ckpt_every sets how often), so this starts it again from step 0"
    return _stopped(f"Training stopped; {where}", [*command, "--resume"])


eval_app = typer.Typer(no_args_is_help=True, help="Evaluate a trained checkpoint.", context_settings=CONTEXT)
app.add_typer(eval_app, name="eval")


def _checkpoint_file(path: Path) -> Path:
    """A weights file from a .safetensors path, a checkpoint folder or a run folder."""
    if path.is_file():
        return path
    if (path / "model.safetensors").is_file():
        return path / "model.safetensors"
    from qkvlab.train import latest_checkpoint

    latest = latest_checkpoint(path) if path.is_dir() else None
    if latest is None:
        raise ConfigError(
            f"No checkpoint at {str(path)!r}; pass a .safetensors file, a ckpt-* folder or a run folder "
            "(with model.safetensors or checkpoints/latest)."
        )
    return latest / "model.safetensors"


@eval_app.command("ppl")
def eval_ppl(
    checkpoint: Annotated[
        Path, typer.Argument(metavar="CHECKPOINT", help="Weights file, checkpoint folder or run folder.")
    ],
    data: Annotated[
        str | None, typer.Option(help="Corpus (as data.source); default: the one the checkpoint was trained on.")
    ] = None,
    tokenizer: Annotated[str | None, typer.Option(help="Tokenizer; default: the training run's.")] = None,
    split: Annotated[str, typer.Option(help="'val' or 'train' split of the corpus.")] = "val",
    seq_len: Annotated[int | None, typer.Option(help="Window length; default: the training run's.")] = None,
    batch_size: Annotated[int, typer.Option(help="Windows per forward pass.")] = 8,
    max_batches: Annotated[int | None, typer.Option(help="Score at most this many batches.")] = None,
    device: Annotated[str, typer.Option(help="'auto', 'cpu' or 'cuda'.")] = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Perplexity of a checkpoint on fixed, non-overlapping windows of a corpus split."""
    from qkvlab.checkpoint import load_model, read_metadata, train_config
    from qkvlab.train import load_splits
    from qkvlab.train.config import data_config
    from qkvlab.train.trainer import RunContext, evaluate_lm

    _at_least("--batch-size", batch_size)
    _at_least("--max-batches", max_batches)
    _at_least("--seq-len", seq_len)
    path = _checkpoint_file(checkpoint)
    meta = read_metadata(path)
    trained = train_config(meta, path)
    data_cfg = dict(trained["data"]) if isinstance(trained.get("data"), dict) else {}
    if data is not None:
        data_cfg["source"] = data
    elif "source" not in data_cfg:
        raise ConfigError(f"{str(path)!r} does not record its training data; pass --data SOURCE.")
    if tokenizer is not None:
        data_cfg["tokenizer"] = tokenizer
    elif data is not None and str(data_cfg.get("tokenizer", "")).startswith("bpe"):
        # The run's BPE was trained on its own corpus: another corpus must be read with that
        # vocabulary, never with a BPE trained afresh on it (same size, other ids).
        from qkvlab.interop.common import tokenizer_folder

        saved = tokenizer_folder(path)
        if saved is None:
            raise ConfigError(
                f"{str(path)!r} was trained with a BPE learnt on its corpus and its run folder keeps no tokenizer/; "
                "pass --tokenizer bpe:<folder> with that run's tokenizer."
            )
        data_cfg["tokenizer"] = f"bpe:{saved}"
    if split not in ("val", "train"):
        raise ConfigError(f"--split must be 'val' or 'train', got {split!r}.")
    dev = torch.device(_device(device))
    model = load_model(path, device=dev)
    _language_model(model, path, "eval ppl")
    seq_len = seq_len or trained.get("seq_len") or model.config.max_seq_len
    if seq_len > model.config.max_seq_len:
        raise ConfigError(
            f"--seq-len {seq_len} is longer than the model's context (max_seq_len={model.config.max_seq_len}); "
            f"pass --seq-len {model.config.max_seq_len} or less."
        )
    splits = load_splits(data_config(data_cfg))
    if splits.vocab_size > model.config.vocab_size:
        raise ConfigError(
            f"The tokenizer's vocabulary ({splits.vocab_size}) is larger than the model's "
            f"({model.config.vocab_size}); evaluate with the tokenizer the model was trained with."
        )
    tokens = splits.val if split == "val" else splits.train
    ctx = RunContext(device=dev, amp_dtype=torch.bfloat16 if dev.type == "cuda" else None)
    max_windows = None if max_batches is None else max_batches * batch_size
    result = evaluate_lm(
        model, tokens, seq_len=seq_len, batch_size=batch_size, max_windows=max_windows, ctx=ctx, prefix=""
    )
    result = {"checkpoint": str(path), "data": data_cfg["source"], "split": split, "seq_len": seq_len, **result}
    if as_json:
        print(json.dumps(result))
    else:
        loss, ppl, n = result["loss"], result["ppl"], result["tokens"]
        print(f"{path}: {split} loss {loss:.4f}, perplexity {ppl:.3f} over {n:,} tokens")


@eval_app.command("harness")
def eval_harness(
    runs: Annotated[
        list[Path],
        typer.Argument(
            metavar="RUNS", help="Run folder(s), checkpoint folder(s) or .safetensors file(s).", show_default=False
        ),
    ],
    tasks: Annotated[
        str,
        typer.Option(
            help="Comma-separated: arc_easy, arc_challenge, hellaswag, piqa, winogrande, lambada_openai; "
            "'paper' (the paper's five) or 'all'."
        ),
    ] = "all",
    num_fewshot: Annotated[int, typer.Option(help="Few-shot examples per prompt (the paper's Table 11: 5).")] = 0,
    limit: Annotated[int | None, typer.Option(help="Score only the first N items of each task (quick checks).")] = None,
    batch_size: Annotated[int, typer.Option(help="Requests per forward pass.")] = 8,
    device: Annotated[str, typer.Option(help="'auto', 'cpu', 'cuda' or 'cuda:N'.")] = "auto",
    dtype: Annotated[
        str, typer.Option(help="Compute dtype: auto (bf16 on GPU, else fp32), fp32, bf16 or fp16.")
    ] = "auto",
    data_root: Annotated[
        Path | None,
        typer.Option(help="Folder with hellaswag/, piqa/, arc/, ...; default $QKVLAB_DATA, then ../shared/data."),
    ] = None,
    tokenizer: Annotated[str | None, typer.Option(help="Tokenizer; default: the run's own.")] = None,
    truncate: Annotated[
        str,
        typer.Option(
            help="A request longer than the model: 'error', or 'left' to drop its oldest context tokens (as "
            "lm-eval's hf model does)."
        ),
    ] = "error",
    max_length: Annotated[
        int | None, typer.Option(help="Longest input in tokens; default the run's training seq_len.")
    ] = None,
    bootstrap_iters: Annotated[
        int, typer.Option(help="Bootstrap draws for LAMBADA perplexity's standard error (lm-eval's default: 100000).")
    ] = 1000,
    study: Annotated[Path | None, typer.Option(help="Also append the rows to this study's results.jsonl.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result rows as JSON.")] = False,
) -> None:
    """Downstream accuracy through lm-evaluation-harness, offline (HellaSwag, PIQA, ARC, WinoGrande, LAMBADA).

    Reads the staged task files (see docs/harness.md) with lm-eval's own prompts and metrics,
    writes harness.json (task, metric, value, stderr, n, shots, versions) into each run folder
    and, with --study, rows into that study's results store. Needs lm-eval, qkvlab's eval
    extra.
    """
    from qkvlab.harness import require_lm_eval

    require_lm_eval()
    from qkvlab.harness.runner import RESULTS_NAME, evaluate_runs, run_folder

    rows = evaluate_runs(
        runs, tasks, num_fewshot=num_fewshot, limit=limit, batch_size=batch_size, device=device, dtype=dtype,
        data_root=data_root, tokenizer=tokenizer, truncate=truncate, max_length=max_length,
        bootstrap_iters=bootstrap_iters, study=study, progress=not as_json,
    )  # fmt: skip
    if as_json:
        print(json.dumps(rows, indent=1))
        return
    shots = f"{num_fewshot}-shot" + (f", first {limit} items" if limit else "")
    table = Table(title=f"lm-evaluation-harness, {shots}", title_justify="left")
    for col in ("checkpoint", "task", "metric", "value", "stderr", "n"):
        table.add_column(col, justify="left" if col in ("checkpoint", "task", "metric") else "right")
    for r in rows:
        value, stderr = (
            ("-" if v is None else f"{v:.4f}" if abs(v) < 1e4 else f"{v:.4g}") for v in (r["value"], r["stderr"])
        )
        table.add_row(str(r["checkpoint"]), r["task"], r["metric"], value, stderr, str(r["n"]))
    console.print(table)
    console.print("results: " + ", ".join(str(run_folder(Path(r)) / RESULTS_NAME) for r in runs))


def _analysis_label(path: Path, taken: set[str]) -> str:
    label = path.parent.name if path.name == "model.safetensors" else path.stem
    if label.startswith("ckpt-") and path.parent.parent.name == "checkpoints":
        label = f"{path.parent.parent.parent.name}-{label}"
    base, i = label or "model", 1
    while label in taken:
        i += 1
        label = f"{base}-{i}"
    taken.add(label)
    return label


@app.command()
def analyze(
    checkpoints: Annotated[
        list[Path],
        typer.Argument(metavar="CHECKPOINTS", help="Weights file(s), checkpoint or run folder(s).", show_default=False),
    ],
    data: Annotated[
        str | None,
        typer.Option(
            help="GPT: corpus (as data.source), default the training run's; other families: a .npy file of "
            "inputs; 'random' for random inputs."
        ),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(
            help="Output folder (default: 'analysis' in a single checkpoint's run folder); one subfolder each."
        ),
    ] = None,
    seq_len: Annotated[int | None, typer.Option(help="Map length; default: the training run's.")] = None,
    batch_size: Annotated[int, typer.Option(help="Sequences in the analysed batch.")] = 8,
    split: Annotated[str, typer.Option(help="'val' or 'train' split of the corpus.")] = "val",
    pairs: Annotated[str, typer.Option(help="Projection pairs, e.g. 'K-V,Q-K', or 'all'.")] = "all",
    plots: Annotated[bool, typer.Option(help="Write PNG figures (needs matplotlib).")] = True,
    device: Annotated[str, typer.Option(help="'auto', 'cpu' or 'cuda'.")] = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="Print the results as JSON.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace an earlier analysis in the output folder.")] = False,
) -> None:
    """Projection similarity (cosine, subspace, CKA), effective ranks and attention symmetry of checkpoints.

    Writes analysis.json and PNG figures (attention maps per layer and head, similarity per
    layer, singular-value spectra) per checkpoint, and variants.png with the maps side by side
    when several are given. Methods are stated in analysis.json and in qkvlab.analysis.
    """
    from qkvlab.analysis.runner import analyze_checkpoint, compare_maps, summary_rows
    from qkvlab.train.state import results_folder

    if not checkpoints:
        raise ConfigError("Name at least one checkpoint to analyse.")
    if len(checkpoints) > 1 and out is None:
        raise ConfigError("Several checkpoints need --out DIR (each gets a subfolder there).")
    _at_least("--batch-size", batch_size)
    _at_least("--seq-len", seq_len)
    device = _device(device)
    paths = [_checkpoint_file(c) for c in checkpoints]
    taken: set[str] = set()
    dests = []
    for path in paths:
        label = _analysis_label(path, taken)
        if out is None:  # a checkpoint in checkpoints/ is pruned whole: its analysis goes to the run folder
            home = results_folder(path)
            dest = home / "analysis" if home == path.parent else home / "analysis" / path.parent.name
        else:
            dest = out if len(paths) == 1 else out / label
        if dest.exists() and not dest.is_dir():
            raise ConfigError(f"--out {str(dest)!r} is a file; name a folder for the analysis.")
        if (dest / "analysis.json").exists() and not force:
            raise ConfigError(
                f"{str(dest)!r} already holds an analysis; pass --force to replace it, or --out another folder."
            )
        dests.append((path, label, dest))
    results, captures = {}, {}
    for path, label, dest in dests:
        result, extras = analyze_checkpoint(
            path, out=dest, data=data, seq_len=seq_len, batch_size=batch_size, split=split, pairs=pairs,
            plots=plots, device=device,
        )  # fmt: skip
        results[label] = result
        name, i = result["model"]["paper_name"], 1
        while name in captures:
            i += 1
            name = f"{result['model']['paper_name']} #{i}"
        captures[name] = extras["capture"]
        if not as_json:
            info = result["model"]
            table = Table(title=f"{info['paper_name']} ({info['variant']}), {label}", title_justify="left")
            table.add_column("measure")
            table.add_column("value (mean over layers)")
            for row in summary_rows(result):
                table.add_row(*row)
            console.print(table)
            console.print(f"checkpoint {path}\ninputs: {result['inputs']['source']} {result['inputs']['shape']}")
            console.print(f"wrote {dest}")
    if len(paths) > 1 and plots and any(c is not None for c in captures.values()):
        figure = compare_maps(captures, out / "variants.png")
        if not as_json:
            console.print(f"maps side by side: {figure}")
    if as_json:
        print(json.dumps(next(iter(results.values())) if len(results) == 1 else results, indent=2))


def _tokenizer_for(path: Path, meta: dict[str, str], override: str | None):
    """The training run's tokenizer (or ``override``); a trained BPE is found through its corpus."""
    from qkvlab.data import get_tokenizer
    from qkvlab.train import load_splits
    from qkvlab.train.config import data_config

    kind, _, arg = (override or "").partition(":")
    trains_here = kind == "bpe" and (arg.isdigit() or not arg)  # "bpe" / "bpe:4096": trained on the corpus
    if override is not None and not trains_here:
        return get_tokenizer(override)  # byte, gpt2[:folder], bpe:<folder>
    from qkvlab.checkpoint import train_config

    recorded = train_config(meta, path).get("data")
    data = dict(recorded) if isinstance(recorded, dict) else {}
    name = override or data.get("tokenizer")
    from qkvlab.interop.common import tokenizer_folder

    saved = tokenizer_folder(path)  # the run's own, or the one `qkvlab import` wrote
    if saved is not None and (name is None or name.startswith("bpe")):
        return get_tokenizer(f"bpe:{saved}")
    if name is None or str(data.get("source", "")).endswith(".npy"):
        raise ConfigError(
            f"{str(path)!r} does not record a tokenizer (trained on pre-tokenised ids?); pass --tokenizer "
            "byte, gpt2 or bpe:<folder>."
        )
    if not name.startswith("bpe"):
        return get_tokenizer(name)
    # A BPE trained on the corpus: the training run's data settings find it in the cache.
    return get_tokenizer(load_splits(data_config({**data, "tokenizer": name})).meta["tokenizer_spec"])


@app.command()
def generate(
    checkpoint: Annotated[
        Path, typer.Argument(metavar="CHECKPOINT", help="Weights file, checkpoint folder or run folder.")
    ],
    prompt: Annotated[str, typer.Option(help="Text to continue.")] = "def ",
    max_new_tokens: Annotated[int, typer.Option(help="Tokens to generate.")] = 64,
    temperature: Annotated[float, typer.Option(help="0 is greedy.")] = 0.8,
    top_k: Annotated[int | None, typer.Option(help="Sample among the k most likely tokens.")] = 50,
    top_p: Annotated[
        float | None,
        typer.Option(help="Sample among the fewest most likely tokens whose probability reaches p, in (0, 1]."),
    ] = None,
    repetition_penalty: Annotated[
        float, typer.Option(help="Divide the logits of tokens already seen (prompt included); 1 is off, > 1 avoids.")
    ] = 1.0,
    stop: Annotated[
        list[str] | None,
        typer.Option(help="Stop after this text (repeatable); \\n and \\t are read as newline and tab."),
    ] = None,
    stop_id: Annotated[list[int] | None, typer.Option(help="Stop after this token id (repeatable).")] = None,
    stop_eot: Annotated[
        bool, typer.Option("--stop-eot/--no-stop-eot", help="Stop at the tokenizer's end-of-text token.")
    ] = False,
    stream: Annotated[bool, typer.Option("--stream/--no-stream", help="Print tokens as they are generated.")] = False,
    seed: Annotated[int, typer.Option(help="Sampling seed.")] = 0,
    tokenizer: Annotated[str | None, typer.Option(help="Tokenizer; default: the training run's.")] = None,
    device: Annotated[str, typer.Option(help="'auto', 'cpu' or 'cuda'.")] = "auto",
    cuda_graph: Annotated[
        bool | None,
        typer.Option(
            "--cuda-graph/--no-cuda-graph",
            help="Replay each decode step as a CUDA graph (static decode step). Default: on for CUDA.",
        ),
    ] = None,
    compile: Annotated[
        bool,
        typer.Option(
            "--compile/--no-compile",
            help="torch.compile the static decode step (fuses its small kernels; the first step compiles).",
        ),
    ] = False,
    fuse: Annotated[
        bool,
        typer.Option(
            "--fuse/--no-fuse",
            help="One matrix product for each layer's projections and for the MLP's gate and up (faster at "
            "small batches; holds a second copy of those weights).",
        ),
    ] = False,
    gemv: Annotated[
        str,
        typer.Option(
            "--gemv",
            help="How the batch-1 step computes its matrix-vector products on a GPU: auto (the kernel where "
            "Triton is installed), none (cuBLAS), kernel (qkvlab's one-row kernel) or inductor (generated by "
            "torch.compile; needs --compile).",
        ),
    ] = "auto",
) -> None:
    """Continue a prompt with KV-cached decoding; prints the text, tokens/s and the cache's bytes."""
    from qkvlab.checkpoint import load_model, read_metadata

    _at_least("--max-new-tokens", max_new_tokens)
    _at_least("--top-k", top_k)
    if not (math.isfinite(temperature) and temperature >= 0):
        raise ConfigError(f"--temperature must be a finite number >= 0 (0 is greedy), got {temperature}.")
    if top_p is not None and not 0 < top_p <= 1:
        raise ConfigError(f"--top-p must lie in (0, 1] (1 keeps every token), got {top_p}.")
    if not (math.isfinite(repetition_penalty) and repetition_penalty > 0):
        raise ConfigError(f"--repetition-penalty must be a finite number > 0 (1 is off), got {repetition_penalty}.")
    if gemv not in ("auto", "none", "kernel", "inductor"):
        raise ConfigError(f"--gemv must be auto, none, kernel or inductor, got {gemv!r}.")
    if gemv == "inductor" and not compile:
        raise ConfigError(
            "--gemv inductor has torch.compile generate the products; add --compile (or use --gemv kernel)."
        )
    from qkvlab.train.config import MAX_SEED

    if not 0 <= seed <= MAX_SEED:
        raise ConfigError(f"--seed must be in [0, {MAX_SEED}], got {seed}.")
    _utf8("--prompt", prompt)
    stops = [_utf8("--stop", s).replace("\\n", "\n").replace("\\t", "\t") for s in stop or []]
    if any(not s for s in stops):
        raise ConfigError("--stop needs a non-empty text.")
    path = _checkpoint_file(checkpoint)
    meta = read_metadata(path)
    device = _device(device)
    if cuda_graph is None:
        cuda_graph = "auto"
    elif cuda_graph and not device.startswith("cuda"):
        raise ConfigError(f"--cuda-graph needs a CUDA device, but the model runs on {device!r}; drop the flag.")
    model = load_model(path, device=device).eval()
    _language_model(model, path, "generate")
    tok = _tokenizer_for(path, meta, tokenizer)
    ids = tok.encode(prompt)
    if not ids:
        raise ConfigError("The prompt is empty after tokenisation; pass a non-empty --prompt.")
    if max(ids) >= model.config.vocab_size:
        raise ConfigError(
            f"The tokenizer's vocabulary ({tok.vocab_size}) is larger than the model's ({model.config.vocab_size}); "
            "generate with the tokenizer the model was trained with (--tokenizer)."
        )
    vocab = model.config.vocab_size
    for i in stop_id or []:
        if not 0 <= i < vocab:
            raise ConfigError(
                f"--stop-id {i} is outside the model's vocabulary [0, {vocab}); pass a token id below {vocab} "
                "(or --stop with the text to stop at)."
            )
    context = model.config.max_seq_len
    if len(ids) + max_new_tokens > context:
        fixes = [f"lower --max-new-tokens to {context - len(ids)}"] if len(ids) < context else []
        if max_new_tokens < context:
            fixes.append(f"shorten the prompt to at most {context - max_new_tokens} tokens")
        fix = " or ".join(fixes)
        raise ConfigError(
            f"The prompt is {len(ids)} tokens and --max-new-tokens {max_new_tokens} more, {len(ids) + max_new_tokens} "
            f"in all, but the model's context is {context} tokens (max_seq_len); {fix}."
        )
    idx = torch.tensor([ids], device=device)
    cache = model.new_cache(1, len(ids) + max_new_tokens)
    # the default generators, seeded: a static step samples inside its graph only from those
    torch.manual_seed(seed)
    stop_ids = [*(stop_id or []), *([tok.eot_id] if stop_eot else [])]
    t0 = time.perf_counter()
    steps = model.stream(
        idx,
        max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        repetition_penalty=repetition_penalty,
        stop_token_ids=stop_ids,
        stop_strings=stops,
        tokenizer=tok if stream or stops else None,  # text on the host each step only when needed
        cache=cache,
        cuda_graph=cuda_graph,
        compile=compile,
        fuse=fuse,
        gemv=False if gemv == "none" else gemv,
    )
    if stream:
        sys.stdout.write(tok.decode(ids))
        sys.stdout.flush()
    for step in steps:
        if stream and step.text[0]:
            sys.stdout.write(step.text[0])
            sys.stdout.flush()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    out = steps.result
    if stream:
        sys.stdout.write("\n")
    else:
        new = out.tokens[0][:-1] if out.finish_reasons[0] == "stop_token" else out.tokens[0]
        text = out.texts[0] if out.texts is not None else tok.decode(new)
        console.print(tok.decode(ids) + text, highlight=False, markup=False)
    spec = model.config.variant
    n = out.lengths[0]
    ended = {"stop_token": "; ended at a stop token", "stop_string": "; ended at a stop text"}
    console.print(
        f"[dim]{spec.paper_name} ({spec.id}): {n} tokens in {dt:.2f} s = "
        f"{n / dt:,.1f} tokens/s (prefill {len(ids)} + decode, batch 1, {device}); KV cache "
        f"{cache.n_tensors} tensors, {cache.bytes_per_token:,} B/token, {human_bytes(cache.nbytes)} allocated"
        f"{ended.get(out.finish_reasons[0], '')}[/]"
    )


def _print_notes(report: dict) -> None:
    for note in report.get("notes") or []:
        console.print(f"note: {note}", highlight=False, markup=False)


@app.command()
def export(
    run: Annotated[
        Path, typer.Argument(metavar="RUN", help="Run folder, checkpoint folder or weights file.", show_default=False)
    ],
    out: Annotated[
        Path,
        typer.Argument(metavar="OUT", help="Output folder; refused if it exists, unless --force.", show_default=False),
    ],
    format: Annotated[str, typer.Option("--format", help="Target format: 'hf' (transformers).")] = "hf",
    arch: Annotated[
        str,
        typer.Option(
            help="'stock' (LlamaForCausalLM / GPT2LMHeadModel; shared projections written into each role, two cached "
            "tensors), 'native' (qkvlab.hf: one cached tensor for K=V) or 'auto' (native for K=V, else stock)."
        ),
    ] = "auto",
    dtype: Annotated[str, typer.Option(help="Weights dtype: fp32, bf16 or fp16.")] = "fp32",
    force: Annotated[bool, typer.Option("--force", help="Replace OUT if it exists.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Write a folder transformers loads with AutoModelForCausalLM.from_pretrained(OUT), tokenizer included."""
    from qkvlab.interop.hf_export import FORMATS, export_hf

    if format not in FORMATS:
        raise ConfigError(f"--format must be one of {', '.join(FORMATS)}, got {format!r}.")
    report = export_hf(run, out, arch=arch, dtype=dtype, force=force)
    if as_json:
        print(json.dumps(report, indent=2))
        return
    console.print(
        f"{out}: {report['class']} ({report['paper_name']}, {report['dtype']}); cache "
        f"{report['cached_tensors_per_layer']} tensor(s)/layer, {report['kv_cache_bytes_per_token']:,} B/token; "
        "logits vs qkvlab: max relative difference "
        f"{report['max_relative_logit_difference_fp32']:.1e} (fp32)",
        highlight=False,
    )
    _print_notes(report)


@app.command("import")
def import_(
    src: Annotated[
        Path,
        typer.Argument(metavar="SRC", help="A transformers model folder (config.json + safetensors) or a .gguf file."),
    ],
    out: Annotated[
        Path, typer.Argument(metavar="OUT", help="Output run folder; refused if it exists, unless --force.")
    ],
    dtype: Annotated[str, typer.Option(help="Stored dtype: fp32 (reproduces the source), bf16 or fp16.")] = "fp32",
    max_seq_len: Annotated[int | None, typer.Option(help="Cap the context length (default: the source's).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace OUT if it exists.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Import a Llama / Mistral / Qwen2 / Qwen3 checkpoint or a GGUF file into a qkvlab run folder."""
    from qkvlab.interop.hf_import import import_model

    report = import_model(src, out, dtype=dtype, max_seq_len=max_seq_len, force=force)
    if as_json:
        print(json.dumps(report, indent=2))
        return
    console.print(
        f"{out}: {report['architecture']} ({report['format']}) -> {report['paper_name']} ({report['variant']}), "
        f"{report['params']:,} parameters, {report['dtype']}; tokenizer: "
        f"{'bpe:' + str(out / 'tokenizer') if report['tokenizer'] else 'none'}",
        highlight=False,
    )
    _print_notes(report)


@app.command()
def convert(
    checkpoint: Annotated[
        Path, typer.Argument(metavar="CHECKPOINT", help="Run folder, checkpoint folder or weights file (a QKV model).")
    ],
    out: Annotated[
        Path, typer.Argument(metavar="OUT", help="Output run folder; refused if it exists, unless --force.")
    ],
    to: Annotated[str, typer.Option(help="Target variant, e.g. Q-K=V, Q-GQA-4, Q-MQA, GQA-4, MQA.")] = "Q-K=V",
    init: Annotated[
        str, typer.Option(help="Shared K=V projection: key, value, mean or fit (calibrated; needs --calib).")
    ] = "mean",
    kv_heads: Annotated[
        int | None, typer.Option(help="KV heads after mean-pooling adjacent heads (overrides the target's).")
    ] = None,
    calib: Annotated[
        str | None, typer.Option(help="Calibration text for --init fit and the error report (a corpus source).")
    ] = None,
    calib_tokens: Annotated[int, typer.Option(help="Calibration tokens.")] = 32768,
    calib_seq_len: Annotated[int, typer.Option(help="Calibration window length.")] = 512,
    device: Annotated[str, typer.Option(help="Device of the calibration pass: 'auto', 'cpu' or 'cuda'.")] = "auto",
    dtype: Annotated[str, typer.Option(help="Stored dtype: fp32, bf16 or fp16.")] = "fp32",
    force: Annotated[bool, typer.Option("--force", help="Replace OUT if it exists.")] = False,
    pool: Annotated[
        str,
        typer.Option(
            help="How pooled KV heads are made: mean (the GQA paper's) or fit (fitted to every source head of the "
            "group, each through a map folded into q_proj/o_proj; needs --calib, and --init fit for a K=V target).",
        ),
    ] = "mean",
    refit_output: Annotated[
        bool,
        typer.Option(
            "--refit-output",
            help="Calibrate layer by layer on the converted model's own activations and refit each o_proj by least "
            "squares to the source's attention outputs (needs --calib).",
        ),
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Convert a trained QKV model to Q-K=V (choice of init) and/or fewer KV heads (mean-pooled)."""
    from qkvlab.interop.convert import convert_checkpoint

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    report = convert_checkpoint(
        checkpoint, out, to=to, init=init, kv_heads=kv_heads, calib=calib, calib_tokens=calib_tokens,
        calib_seq_len=calib_seq_len, device=device, dtype=dtype, force=force, refit_output=refit_output, pool=pool,
    )  # fmt: skip
    if as_json:
        print(json.dumps(report, indent=2))
        return
    kv = report["kv_cache_bytes_per_token_bf16"]
    errors = ""
    if "mean_key_error" in report:
        errors = (
            f"; calibration errors (relative, mean over layers): key {report['mean_key_error']:.3g}, "
            f"value {report['mean_value_error']:.3g}"
        )
    init_text = f", init {report['init']}" if report["init"] else ""
    console.print(
        f"{out}: {report['source_paper_name']} -> {report['paper_name']} ({report['variant']}{init_text}); KV cache "
        f"{kv['source']:,} -> {kv['target']:,} B/token (bf16){errors}",
        highlight=False,
    )
    _print_notes(report)


_PYTHON_WARNING_FORMAT = warnings.formatwarning
_PACKAGE = Path(__file__).resolve().parent


def _warning_line(message, category, filename, lineno, line=None) -> str:
    """qkvlab's own warnings as one line, like its errors; other libraries' as Python prints them."""
    if Path(filename).resolve().is_relative_to(_PACKAGE):
        return f"warning: {message}\n"
    return _PYTHON_WARNING_FORMAT(message, category, filename, lineno, line)


def main() -> None:
    warnings.formatwarning = _warning_line
    try:
        app()
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
