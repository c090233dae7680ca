"""Write the ladder's blocks 2-7 into its sweep file once block 1 has chosen each size's learning rate.

Block 1 of ``configs/studies/ladder-gutenberg.yaml`` trains QKV at three learning rates per model
size. This script reads the finished rows, picks each size's rate exactly as the ladder report
does (:func:`qkvlab.study.ladder.choose_lrs`: the lowest mean validation loss of QKV), and
replaces the sweep file's placeholder comment with the blocks that train every variant at that
rate, in the order that finishes useful wholes first:

2. every variant of the paper's Table 4 at the quarter budget, seed 0, each GPT-2 size;
3. seed 1 of the same at the two smallest sizes (the paired tests' second seed);
4. the llama subset (QKV, Q-K=V, GQA-4, Q-GQA-4) at the quarter budget;
5. the full budget: every variant at each GPT-2 size (seed 0; seed 1 at the two smallest);
6. the llama subset at the full budget;
7. a third seed at the quarter budget at the two smallest sizes: a paired t-interval from two
   seeds has one degree of freedom (its 95% critical value is 12.7), from three it has two (4.3).

A size whose best rate is the lowest or highest one tried gets no blocks yet: instead a block
with the next rate beyond that edge (a factor of two) is added, and the next run of this script
decides. Sizes block 1 has not finished are left for later too. Run ids hash each run's whole
config, so a run that block 1 already made (QKV at the chosen rate) is not trained again.

    python scripts/ladder_blocks.py configs/studies/ladder-gutenberg.yaml studies/ladder-gutenberg/results.jsonl
        [--write]   # without it, prints the new file

It is idempotent: the generated part is rebuilt from the rows each time.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

MARK = "  # ---- blocks 2-7: written by scripts/ladder_blocks.py from block 1's rows; do not edit by hand ----"
MARK_PREFIX = "  # ---- blocks 2-"  # earlier files say 2-6
PLACEHOLDER = "  # 2.-4. (added once block 1"
VARIANTS = ["QKV", "Q-K=V", "Q=K-V", "Q=K=V", "GQA-4", "MQA", "Q-GQA-4", "Q-MQA"]
LLAMA_VARIANTS = ["QKV", "Q-K=V", "GQA-4", "Q-GQA-4"]
GPT2_SIZES = ["gpt2-3m", "gpt2-10m", "gpt2-30m", "gpt2-85m"]
LLAMA_SIZES = ["llama-3m", "llama-30m"]
SEEDED = {"gpt2-3m", "gpt2-10m"}  # sizes with more than one seed
QUARTER, FULL = "9.85M", "39.4M"


def _fmt_lr(lr: float) -> str:
    return f"{lr:.1e}".replace("e-0", "e-")


def _block(comment: str, **axes: list) -> list[str]:
    lines = [f"  # {comment}"]
    first = True
    for key, values in axes.items():
        items = ", ".join(_fmt_lr(v) if isinstance(v, float) else str(v) for v in values)
        lines.append(f"  {'- ' if first else '  '}{key}: [{items}]")
        first = False
    return lines


def plan(rows: list[dict]) -> tuple[dict[str, float], dict[str, list[float]], list[str]]:
    """(chosen lr per size, rates of the extended sweep per size, notes).

    A size whose sweep went beyond block 1's three rates, or must, keeps a block listing every
    rate it tried: its rows stay points of the study's grid (the report leaves out rows of
    other configs), and the rate to try next is among them.
    """
    from qkvlab.study.ladder import choose_lrs

    done = [r for r in rows if r.get("status") == "ok" and r.get("val_loss") is not None]
    chosen, extended, notes = {}, {}, []
    for (_, model), choice in sorted(choose_lrs(done).items()):
        rates = sorted(choice.losses)
        losses = ", ".join(f"{_fmt_lr(lr)}: {loss:.4f}" for lr, (loss, _) in choice.losses.items())
        if choice.chosen == rates[0]:
            extended[model] = [rates[0] / 2, *rates]
            notes.append(f"{model}: best rate {_fmt_lr(choice.chosen)} is the lowest tried ({losses}); trying lower")
        elif choice.chosen == rates[-1]:
            extended[model] = [*rates, rates[-1] * 2]
            notes.append(f"{model}: best rate {_fmt_lr(choice.chosen)} is the highest tried ({losses}); trying higher")
        else:
            chosen[model] = choice.chosen
            if len(rates) > 3:
                extended[model] = rates
            notes.append(f"{model}: chosen {_fmt_lr(choice.chosen)} ({losses})")
    return chosen, extended, notes


def generated(chosen: dict[str, float], extended: dict[str, list[float]], notes: list[str]) -> list[str]:
    lines = [MARK, *(f"  #   {n}" for n in notes)]
    for model, rates in extended.items():
        lines += _block(f"1b. {model}: the learning-rate sweep beyond block 1's rates", variant=["QKV"],
                        model=[model], tokens=[QUARTER], **{"optim.lr": rates})  # fmt: skip
    gpt2 = [m for m in GPT2_SIZES if m in chosen]
    llama = [m for m in LLAMA_SIZES if m in chosen]

    def each(models, variants, tokens, seeds, tag):
        out = []
        for m in models:
            s = [x for x in seeds if x == 0 or m in SEEDED]
            if s:
                out += _block(f"{tag} {m}, lr {_fmt_lr(chosen[m])}", variant=variants, model=[m], tokens=[tokens],
                              seed=s, **{"optim.lr": [chosen[m]]})  # fmt: skip
        return out

    lines += each(gpt2, VARIANTS, QUARTER, [0], "2. every variant, quarter budget, seed 0:")
    lines += each([m for m in gpt2 if m in SEEDED], VARIANTS, QUARTER, [1], "3. seed 1:")
    lines += each(llama, LLAMA_VARIANTS, QUARTER, [0], "4. llama subset, quarter budget:")
    lines += each(gpt2, VARIANTS, FULL, [0, 1], "5. full budget:")
    lines += each(llama, LLAMA_VARIANTS, FULL, [0], "6. llama subset, full budget:")
    lines += each([m for m in gpt2 if m in SEEDED], VARIANTS, QUARTER, [2], "7. third seed, quarter budget:")
    return lines


def rewrite(text: str, rows: list[dict]) -> str:
    """The sweep file with its generated part rebuilt from ``rows``."""
    lines = text.rstrip("\n").split("\n")
    for marker in (MARK_PREFIX, PLACEHOLDER):
        idx = next((i for i, line in enumerate(lines) if line.startswith(marker)), None)
        if idx is not None:
            break
    else:
        raise SystemExit(f"No {MARK!r} or {PLACEHOLDER!r} line in the sweep file: nothing to replace.")
    return "\n".join(lines[:idx] + generated(*plan(rows))) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("config", type=Path, help="the ladder's sweep file")
    ap.add_argument("results", type=Path, help="results.jsonl with block 1's rows")
    ap.add_argument("--write", action="store_true", help="rewrite the sweep file (atomically) instead of printing")
    args = ap.parse_args(argv)

    from qkvlab.checkpoint import atomic_write
    from qkvlab.study import load_sweep, read_jsonl

    rows = read_jsonl(args.results) if args.results.is_file() else []
    text = rewrite(args.config.read_text(), rows)
    if not args.write:
        print(text, end="")
        return 0
    atomic_write(args.config, lambda tmp: Path(tmp).write_text(text))
    load_sweep(args.config)  # the written file must still be a valid sweep
    print(f"wrote {args.config}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
