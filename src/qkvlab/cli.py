"""The ``qkvlab`` command line.

Commands: ``variants`` (cost table of a preset's variants), ``presets`` (list the named
shapes), ``demo`` (the main job), ``train`` (a YAML config plus ``KEY=VALUE`` overrides),
``eval ppl`` (perplexity of a checkpoint), ``generate`` (KV-cached sampling), ``sweep`` and
``report`` (studies), ``analyze`` (projection similarity, effective rank, attention symmetry and
maps of checkpoints), ``maps`` (a task study's attention maps, tasks x variants). A user's
mistake prints one line and exits with 2.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Annotated

import torch
import typer
from rich.console import Console
from rich.table import Table

from qkvlab.errors import ConfigError

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__.split("\n\n")[0])
console = Console() if sys.stdout.isatty() else Console(width=170)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ConfigError(f"Unknown dtype {name!r}; use one of {', '.join(DTYPES)}.")
    return DTYPES[name]


def _split_variants(values: list[str] | None) -> list[str] | None:
    if not values:
        return None
    out: list[str] = []
    for v in values:
        out.extend(p.strip() for p in v.split(",") if p.strip())
    return out


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
    preset: Annotated[str, typer.Option(help="Model shape: a preset name (see `qkvlab presets`).")] = "paper-300m",
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

    t0 = time.perf_counter()
    variants(preset="paper-300m", variant=None, seq_len=None, context=32768, dtype="bf16", as_json=False)
    seed_list = [int(x) for x in seeds.split(",") if x.strip()]
    if not seed_list:
        raise ConfigError(f"--seeds must list at least one integer, got {seeds!r}.")
    spec = demo_spec(parse_tokens(tokens), seed_list, out)
    summary = run_sweep(spec, out, run_fn=demo_run_fn())
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
    config: Annotated[Path, typer.Argument(help="Sweep YAML (base config + grid).", show_default=False)],
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
) -> None:
    """Run a grid of training runs (variants x models x token budgets x seeds); resumes if killed."""
    from qkvlab.study import load_sweep, run_sweep

    summary = run_sweep(load_sweep(config), out, devices=devices, time_limit=time_limit)
    console.print(str(summary))
    if summary.failed:
        raise typer.Exit(1)


@app.command()
def report(
    study_dir: Annotated[Path, typer.Argument(help="A study folder with results.jsonl.", show_default=False)],
    plots: Annotated[bool, typer.Option(help="Write PNG plots (needs matplotlib).")] = True,
    paper_table: Annotated[
        str | None, typer.Option(help="The paper's table to set beside ours: table2 (synthetic) or table4 (LM).")
    ] = None,
) -> None:
    """Write report.md (paper-style tables) and plots for a study folder from its results.

    A study whose sweep.yaml says ``report: ladder`` gets the scaling-ladder analysis instead.
    """
    import yaml

    from qkvlab.study import write_report

    sweep_file = Path(study_dir) / "sweep.yaml"
    try:
        sweep = yaml.safe_load(sweep_file.read_text()) if sweep_file.is_file() else None
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"Cannot read {str(sweep_file)!r}: {str(e).splitlines()[0]}") from None
    if isinstance(sweep, dict) and sweep.get("report") == "ladder":
        from qkvlab.study.ladder import write_ladder_report

        console.print(str(write_ladder_report(study_dir, plots=plots)))
        return
    console.print(str(write_report(study_dir, plots=plots, paper_table=paper_table)))


@app.command()
def maps(
    study_dir: Annotated[Path, typer.Argument(help="A task study folder (results.jsonl).", show_default=False)],
    where: Annotated[
        list[str] | None, typer.Option(help="KEY=VALUE setting to draw, e.g. model.d_model=64 (repeatable).")
    ] = None,
    seed: Annotated[int, typer.Option(help="Which seed's runs.")] = 0,
    layer: Annotated[int, typer.Option(help="Which attention layer.")] = 0,
    out: Annotated[Path | None, typer.Option(help="PNG path (default: STUDY/report/attention-maps.png).")] = None,
) -> None:
    """Attention maps of a synthetic-task study: rows tasks, columns variants (the paper's appendix figure)."""
    from qkvlab.analysis.runner import study_task_maps
    from qkvlab.train.config import parse_value

    settings = {}
    for item in where or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--where {item!r}: write KEY=VALUE, e.g. --where model.d_model=64.")
        settings[key] = parse_value(value)
    path = out or Path(study_dir) / "report" / "attention-maps.png"
    fig, drawn = study_task_maps(study_dir, path, where=settings, seed=seed, layer=layer)
    (Path(fig).with_suffix(".json")).write_text(
        json.dumps({"where": settings, "seed": seed, "layer": layer, "runs": drawn}, indent=1)
    )
    console.print(f"{fig} ({len(drawn)} runs)")


@app.command()
def train(
    config: Annotated[Path, typer.Argument(help="YAML config, e.g. configs/lm/tiny-stdlib.yaml.", show_default=False)],
    overrides: Annotated[
        list[str] | None,
        typer.Argument(
            help="KEY=VALUE overrides with dotted keys, values read as YAML: optim.lr=3e-4 model.variant=Q-K=V.",
            show_default=False,
        ),
    ] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue from the latest checkpoint in out_dir (same config).")
    ] = False,
) -> None:
    """Train a model from a config; under torchrun, on every process (DDP or FSDP2)."""
    from qkvlab.train import load_config
    from qkvlab.train import train as run_training

    run_training(load_config(config, overrides or []), resume=resume)


eval_app = typer.Typer(no_args_is_help=True, help="Evaluate a trained checkpoint.")
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
    checkpoint: Annotated[Path, typer.Argument(help="Weights file, checkpoint folder or run folder.")],
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
    from qkvlab.checkpoint import load_model, read_metadata
    from qkvlab.train import DataConfig, load_splits
    from qkvlab.train.trainer import RunContext, evaluate_lm

    path = _checkpoint_file(checkpoint)
    meta = read_metadata(path)
    trained = json.loads(meta["train_config"]) if "train_config" in meta else {}
    data_cfg = dict(trained.get("data") or {})
    if data is not None:
        data_cfg["source"] = data
    elif "source" not in data_cfg:
        raise ConfigError(f"{str(path)!r} does not record its training data; pass --data SOURCE.")
    if tokenizer is not None:
        data_cfg["tokenizer"] = tokenizer
    if split not in ("val", "train"):
        raise ConfigError(f"--split must be 'val' or 'train', got {split!r}.")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    model = load_model(path, device=dev)
    seq_len = seq_len or trained.get("seq_len") or model.config.max_seq_len
    splits = load_splits(DataConfig(**data_cfg))
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
        list[Path], typer.Argument(help="Weights file(s), checkpoint or run folder(s).", show_default=False)
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
        typer.Option(help="Output folder (default: 'analysis' beside a single checkpoint); one subfolder each."),
    ] = None,
    seq_len: Annotated[int | None, typer.Option(help="Map length; default: the training run's.")] = None,
    batch_size: Annotated[int, typer.Option(help="Sequences in the analysed batch.")] = 8,
    split: Annotated[str, typer.Option(help="'val' or 'train' split of the corpus.")] = "val",
    pairs: Annotated[str, typer.Option(help="Projection pairs, e.g. 'K-V,Q-K', or 'all'.")] = "all",
    plots: Annotated[bool, typer.Option(help="Write PNG figures (needs matplotlib).")] = True,
    device: Annotated[str, typer.Option(help="'auto', 'cpu' or 'cuda'.")] = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="Print the results as JSON.")] = False,
) -> None:
    """Projection similarity (cosine, subspace, CKA), effective ranks and attention symmetry of checkpoints.

    Writes analysis.json and PNG figures (attention maps per layer and head, similarity per
    layer, singular-value spectra) per checkpoint, and variants.png with the maps side by side
    when several are given. Methods are stated in analysis.json and in qkvlab.analysis.
    """
    from qkvlab.analysis.runner import analyze_checkpoint, compare_maps, summary_rows

    if not checkpoints:
        raise ConfigError("Name at least one checkpoint to analyse.")
    if len(checkpoints) > 1 and out is None:
        raise ConfigError("Several checkpoints need --out DIR (each gets a subfolder there).")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    paths = [_checkpoint_file(c) for c in checkpoints]
    taken: set[str] = set()
    results, captures = {}, {}
    for path in paths:
        label = _analysis_label(path, taken)
        if out is None:
            dest = path.parent / "analysis"
        else:
            dest = out if len(paths) == 1 else out / label
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
    from qkvlab.train import DataConfig, load_splits

    kind, _, arg = (override or "").partition(":")
    trains_here = kind == "bpe" and (arg.isdigit() or not arg)  # "bpe" / "bpe:4096": trained on the corpus
    if override is not None and not trains_here:
        return get_tokenizer(override)  # byte, gpt2[:folder], bpe:<folder>
    data = dict((json.loads(meta["train_config"]) if "train_config" in meta else {}).get("data") or {})
    name = override or data.get("tokenizer")
    if name is None or str(data.get("source", "")).endswith(".npy"):
        raise ConfigError(
            f"{str(path)!r} does not record a tokenizer (trained on pre-tokenised ids?); pass --tokenizer "
            "byte, gpt2 or bpe:<folder>."
        )
    if not name.startswith("bpe"):
        return get_tokenizer(name)
    for folder in (path, path.parent, path.parent.parent):  # the copy the trainer saves in its run folder
        if (folder / "tokenizer" / "vocab.json").is_file():
            return get_tokenizer(f"bpe:{folder / 'tokenizer'}")
    # A BPE trained on the corpus: the training run's data settings find it in the cache.
    return get_tokenizer(load_splits(DataConfig(**{**data, "tokenizer": name})).meta["tokenizer_spec"])


@app.command()
def generate(
    checkpoint: Annotated[Path, typer.Argument(help="Weights file, checkpoint folder or run folder.")],
    prompt: Annotated[str, typer.Option(help="Text to continue.")] = "def ",
    max_new_tokens: Annotated[int, typer.Option(help="Tokens to generate.")] = 64,
    temperature: Annotated[float, typer.Option(help="0 is greedy.")] = 0.8,
    top_k: Annotated[int | None, typer.Option(help="Sample among the k most likely tokens.")] = 50,
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
) -> None:
    """Continue a prompt with KV-cached decoding; prints the text, tokens/s and the cache's bytes."""
    from qkvlab.checkpoint import load_model, read_metadata

    path = _checkpoint_file(checkpoint)
    meta = read_metadata(path)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if cuda_graph is None:
        cuda_graph = "auto"
    elif cuda_graph and not device.startswith("cuda"):
        raise ConfigError(f"--cuda-graph needs a CUDA device, but the model runs on {device!r}; drop the flag.")
    model = load_model(path, device=device).eval()
    tok = _tokenizer_for(path, meta, tokenizer)
    ids = tok.encode(prompt)
    if not ids:
        raise ConfigError("The prompt is empty after tokenisation; pass a non-empty --prompt.")
    idx = torch.tensor([ids], device=device)
    cache = model.new_cache(1, len(ids) + max_new_tokens)
    gen = torch.Generator(device=device).manual_seed(seed)
    t0 = time.perf_counter()
    out = model.generate(
        idx,
        max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        generator=gen,
        cache=cache,
        cuda_graph=cuda_graph,
        compile=compile,
    )
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    console.print(tok.decode(out[0].tolist()), highlight=False, markup=False)
    spec = model.config.variant
    console.print(
        f"[dim]{spec.paper_name} ({spec.id}): {max_new_tokens} tokens in {dt:.2f} s = "
        f"{max_new_tokens / dt:,.1f} tokens/s (prefill {len(ids)} + decode, batch 1, {device}); KV cache "
        f"{cache.n_tensors} tensors, {cache.bytes_per_token:,} B/token, {human_bytes(cache.nbytes)} allocated[/]"
    )


def main() -> None:
    try:
        app()
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
