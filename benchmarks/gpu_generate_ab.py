"""GPU benchmark: does a decode-kernel launch choice move generation speed?

Builds the ~1B llama-recipe model of ``gpu_generate.py`` for QKV and Q-K=V once, then, in
``--repeats`` rounds, for each named :class:`qkvlab.kernels.DecodeConfig` in turn (the
configuration every decode-kernel call of the model uses), times the static (CUDA-graph) decode
step of both variants at one batch x context point, with ``gpu_generate.decode_case`` (which
checks the graph step against the eager one first). Rounds interleave the configurations, so
a drift of the GPU over the run shows as spread, not as a difference between them.

Prints a table (tokens/s and the Q-K=V / QKV ratio per round, medians per configuration) and
writes JSON to ``$OUT/gpu_generate_ab.json`` and ``--out``::

    PYTHONPATH=src:benchmarks python3 benchmarks/gpu_generate_ab.py --point 1x32768 --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch

import gpu_generate
from benchutil import env_info, write_json
from qkvlab.kernels import DecodeConfig, kv_decode

CONFIGS = {
    "default": {},
    "block_n=64": {"block_n": 64},
    "num_splits=1": {"num_splits": 1},
    "num_stages=2": {"num_stages": 2},
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--point", default="1x32768", help="BATCHxCONTEXT")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--configs", default=",".join(CONFIGS), help=f"comma list from {list(CONFIGS)}")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA GPU: this benchmark times CUDA-graph decode steps")
        return 2
    names = args.configs.split(",")
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        ap.error(f"unknown configs {unknown}; choose from {list(CONFIGS)}")
    try:
        B, S = (int(v) for v in args.point.split("x"))
    except ValueError:
        ap.error(f"--point takes BATCHxCONTEXT, e.g. 1x32768; got {args.point!r}")
    device = torch.device("cuda")
    env = env_info(device)
    print(f"{env['gpu']}, torch {env['torch']}, triton {env.get('triton')}", flush=True)
    max_len = S + 2 * args.steps + args.warmup + 16
    models = {v: gpu_generate.build(v, gpu_generate.ONE_B, max_len, device, torch.bfloat16) for v in ("QKV", "Q-K=V")}
    case_args = argparse.Namespace(steps=args.steps, warmup=args.warmup, no_graph=False)
    defaults = kv_decode.decode_attention.__kwdefaults__
    saved = defaults["config"]
    rows = []
    try:
        for rep in range(args.repeats):
            for name in names:
                defaults["config"] = DecodeConfig(**CONFIGS[name])  # every call of the model uses it
                got = {}
                for variant, model in models.items():
                    row = gpu_generate.decode_case(model, variant, B, S, case_args, device)
                    if "error" in row or not row["graph_used"] or row["graph_rel_err"] > 3e-2:
                        raise SystemExit(f"{name} {variant}: unusable case {row}")
                    got[variant] = row["static_tokens_per_s"]
                rows.append(dict(round=rep, config=name, **{f"{v}_tok_s": t for v, t in got.items()}))
                rows[-1]["ratio"] = got["Q-K=V"] / got["QKV"]
                print(
                    f"round {rep} {name:<22} QKV {got['QKV']:7.1f}  Q-K=V {got['Q-K=V']:7.1f} tok/s  "
                    f"ratio {rows[-1]['ratio']:.3f}",
                    flush=True,
                )
                write_json(
                    {"benchmark": "gpu_generate_ab", "env": env, "partial": True, "rows": rows},
                    "gpu_generate_ab.json",
                    args.out,
                )
    finally:
        defaults["config"] = saved
    summary = {}
    for name in names:
        mine = [r for r in rows if r["config"] == name]
        summary[name] = {
            "median_ratio": statistics.median(r["ratio"] for r in mine),
            "median_QKV_tok_s": statistics.median(r["QKV_tok_s"] for r in mine),
            "median_QKV_eq_V_tok_s": statistics.median(r["Q-K=V_tok_s"] for r in mine),
        }
    all_ratios = [r["ratio"] for r in rows]
    doc = dict(
        benchmark="gpu_generate_ab",
        env=env,
        model=gpu_generate.ONE_B,
        B=B,
        context=S,
        steps=args.steps,
        rows=rows,
        summary=summary,
        all_ratios_median=statistics.median(all_ratios),
        all_ratios_range=[min(all_ratios), max(all_ratios)],
    )
    print(f"\nB={B} S={S}: Q-K=V / QKV static tokens/s, median over {args.repeats} rounds")
    for name, s in summary.items():
        print(
            f"  {name:<22} {s['median_ratio']:.3f}x  (QKV {s['median_QKV_tok_s']:.1f}, "
            f"Q-K=V {s['median_QKV_eq_V_tok_s']:.1f} tok/s)"
        )
    print(
        f"  all {len(rows)} pairs: median {doc['all_ratios_median']:.3f}x, range "
        f"{doc['all_ratios_range'][0]:.3f}-{doc['all_ratios_range'][1]:.3f}"
    )
    for path in write_json(doc, "gpu_generate_ab.json", args.out):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
