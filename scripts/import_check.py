"""Check an imported model: a greedy continuation and perplexity on books of a zip, as JSON.

For SmolLM2-135M-Instruct imported from its GGUF (docs/interop.md)::

    python scripts/import_check.py runs/smollm2 --book 0001_ --book 0002_ \\
        --out results/interop/smollm2-import.json

Each book (a zip member whose name starts with the prefix) is tokenised whole with the run's
tokenizer (``bpe:RUN/tokenizer``) and scored by qkvlab's ``evaluate_lm`` over fixed,
non-overlapping windows of ``--seq-len`` (what ``qkvlab eval ppl`` does); the prompt is
continued greedily by qkvlab's own ``generate``. The JSON records the hardware and versions too.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import torch

from qkvlab.checkpoint import load_model
from qkvlab.data import get_tokenizer
from qkvlab.train.trainer import RunContext, evaluate_lm


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", type=Path, help="an imported run folder (model.safetensors + tokenizer/)")
    p.add_argument("--prompt", default="The capital of France is")
    p.add_argument("--new-tokens", type=int, default=8)
    p.add_argument("--zip", type=Path, default=Path("../shared/data/gutenberg/gutenberg-val.zip"))
    p.add_argument("--book", action="append", default=None, help="member name prefix (repeatable; default: all)")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    device = torch.device(
        "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device.replace("auto", "cpu")
    )
    model = load_model(args.run / "model.safetensors", device=device).eval()
    tok = get_tokenizer(f"bpe:{args.run / 'tokenizer'}")
    prompt = torch.tensor([tok.encode(args.prompt)], device=device)
    out = model.generate(prompt, args.new_tokens, cuda_graph=False)
    continuation = tok.decode(out[0, prompt.shape[1] :].tolist())
    ctx = RunContext(device=device)
    books = []
    with zipfile.ZipFile(args.zip) as z:
        names = [n for n in z.namelist() if not args.book or any(n.startswith(b) for b in args.book)]
        for name in names:
            ids = np.asarray(tok.encode(z.read(name).decode("utf-8")), dtype=np.int64)
            t0 = time.perf_counter()
            res = evaluate_lm(model, ids, seq_len=args.seq_len, batch_size=args.batch_size, ctx=ctx, prefix="")
            books.append(
                {"book": name, "book_tokens": int(ids.size), **res, "seconds": round(time.perf_counter() - t0, 1)}
            )
            print(f"{name}: perplexity {res['ppl']:.2f} over {res['tokens']:,} tokens", flush=True)
    interop = json.loads((args.run / "interop.json").read_text()) if (args.run / "interop.json").is_file() else {}
    result = {
        "run": str(args.run),
        "source": interop.get("source"),
        "variant": interop.get("variant") or model.config.variant.id,
        "prompt": args.prompt,
        "greedy_continuation": continuation,
        "zip": str(args.zip),
        "seq_len": args.seq_len,
        "books": books,
        "dtype": str(next(model.parameters()).dtype),
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu ({platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads)",
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
    }
    print(f"{args.prompt!r} -> {continuation!r}")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
