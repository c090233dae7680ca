"""Compile the decode split kernel for a GPU architecture on any machine, and report what a launch
would get: registers, spills and shared memory (from the cubin), programs per multiprocessor, and
the instruction mix of the tile loop (from the SASS).

No GPU is used: Triton compiles for ``--arch`` (90: H100 / H200) with the specialisation a launch
gets (16-byte aligned pointers; strides and lengths that are multiples of 16, as for any cache of
width 16 or more and splits of whole tiles), and its bundled ``cuobjdump`` reads the cubin. The
constants are the launch's own (``kv_decode.split_kernel_constants``), so a row here is the kernel a
launch with that config compiles, on this machine's Triton: run it with the Triton version the GPU
has (the register count differs between versions) to predict that GPU's residency.

It is the step before a device call when changing the kernel's structure: registers decide how
many programs an SM holds (``kv_decode.resident_programs``), and the loop's barriers and
shared-memory round trips are what a latency-bound tile loop waits on. Speed is measured on the GPU
(``gpu_decode.py``; Nsight Compute through ``profile_decode.py``), never inferred from this::

    PYTHONPATH=src:benchmarks python3 benchmarks/compile_decode.py --head-dim 64 --groups 4 \\
        --configs '[{}, {"block_n": 64}]' --out compile_decode.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter

import torch

from benchutil import env_info, write_json
from qkvlab.kernels import DecodeConfig, kv_decode

NAME = "compile_decode.json"
WHICH = {  # (shared K=V cache, RoPE on the key role, QK-norm on the key role)
    "rope_kv": (True, True, False),
    "kv": (True, False, False),
    "rope_qkn_kv": (True, True, True),
    "sep_kv": (False, False, False),
    "rope_sep_kv": (False, True, False),
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
POINTERS = {"Q", "K", "V", "Cos", "Sin", "W", "Out", "Knew", "Vnew"}  # of the cache's dtype but the tables
FLOAT32_POINTERS = {"Cos", "Sin", "Opart", "LSEpart"}
# integer arguments a launch does not see as multiples of 16 (head counts, the split count, a
# lengths stride of 0 or 1, the table's row count)
NOT_DIVISIBLE = {"n_kv_heads", "num_splits", "stride_l", "cos_rows"}
# SASS opcodes the loop's report counts, under short names: barriers, shared-memory loads and
# stores, asynchronous global-to-shared copies, plain global loads, tensor-core instructions,
# special functions (exp2, rsqrt) and warp shuffles: what a latency-bound tile loop waits on
KINDS = {
    "bar": ("BAR",),
    "lds": ("LDS", "LDSM"),
    "sts": ("STS", "STSM"),
    "cp.async": ("LDGSTS", "UBLKCP", "UTMALDG"),
    "ldg": ("LDG",),
    "mma": ("HMMA", "HGMMA"),
    "mufu": ("MUFU",),
    "shfl": ("SHFL",),
}


def bin_tool(name: str) -> str:
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    if not os.path.exists(path):
        raise SystemExit(f"this Triton has no bundled {name} ({path}); install Triton's NVIDIA backend")
    return path


def compile_split(consts: dict, dtype: torch.dtype, arch: int):
    """The split kernel compiled for ``arch`` with ``consts`` (``split_kernel_constants``'s)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = kv_decode._kernels(False)[0]
    consts = dict(consts)
    options = {"num_warps": consts.pop("num_warps"), "num_stages": consts.pop("num_stages")}
    if consts["PDL"]:
        options["launch_pdl"] = True
    consts["ONE_SPLIT"] = False
    elem = {torch.bfloat16: "*bf16", torch.float16: "*fp16"}[dtype]
    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in consts:
            signature[name] = "constexpr"
            continue
        if name in FLOAT32_POINTERS:
            signature[name] = "*fp32"
        elif name in POINTERS:
            signature[name] = elem
        elif name == "Lens":
            signature[name] = "*i32"
        else:
            signature[name] = "fp32" if name in ("qk_scale", "eps") else "i32"
        if signature[name].startswith("*") or (signature[name] == "i32" and name not in NOT_DIVISIBLE):
            attrs[(i,)] = [["tt.divisibility", 16]]
    constexprs = {(fn.arg_names.index(k),): v for k, v in consts.items()}
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)


def sass_report(cubin: bytes) -> dict:
    """Registers, spills and the tile loop's instruction mix from a cubin."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        usage = subprocess.run([bin_tool("cuobjdump"), "-res-usage", path], capture_output=True, text=True).stdout
        sass = subprocess.run([bin_tool("cuobjdump"), "-sass", path], capture_output=True, text=True).stdout
    regs = re.search(r"REG:(\d+)", usage)
    local = re.search(r"LOCAL:(\d+)", usage)
    instrs = []  # (address, opcode, branch target or None)
    for line in sass.splitlines():
        m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*)(?:\.\S*)?\s*(\S*)", line)
        if m:
            target = int(m.group(3).rstrip(";"), 16) if m.group(2) == "BRA" and m.group(3).startswith("0x") else None
            instrs.append((int(m.group(1), 16), m.group(2), target))
    # the widest backward branch is the tile loop (the kernel has no other loop that long)
    loops = [(t, a) for a, _, t in instrs if t is not None and t < a]
    first, last = max(loops, key=lambda span: span[1] - span[0]) if loops else (1, 0)
    body = [op for a, op, _ in instrs if first <= a <= last]
    ops = Counter(body)
    return {
        "registers": int(regs.group(1)) if regs else None,
        "spill_bytes": int(local.group(1)) if local else None,
        "loop_instructions": len(body),
        "loop": {kind: sum(ops[o] for o in names) for kind, names in KINDS.items()},
        "loop_sequence": sequence(body),
    }


def sequence(body: list[str]) -> str:
    """The loop's counted instructions (and ``DEPBAR``, the wait for asynchronous copies) in
    order, runs merged (``LDSMx8``): where its barriers fall between shared-memory traffic and
    the tensor-core products shows which layout change or reduction each one serves."""
    counted = {o for names in KINDS.values() for o in names} | {"DEPBAR"}
    runs: list[list] = []
    for op in body:
        if op in counted:
            if runs and runs[-1][0] == op:
                runs[-1][1] += 1
            else:
                runs.append([op, 1])
    return " ".join(op if n == 1 else f"{op}x{n}" for op, n in runs)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--head-dim", type=int, default=128, help="head width D")
    ap.add_argument("--groups", type=int, default=4, help="query heads per KV head (G)")
    ap.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    ap.add_argument("--which", default="rope_kv", choices=list(WHICH))
    ap.add_argument("--step", action="store_true", help="the whole-step kernel (positions, new entry, query rotation)")
    ap.add_argument("--configs", default="[{}]", help="JSON list of DecodeConfig fields ({} is the default launch)")
    ap.add_argument("--arch", type=int, default=90, help="compute capability x10 (90: H100 / H200)")
    ap.add_argument("--sequence", action="store_true", help="also print each tile loop's instruction sequence")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    try:
        configs = [DecodeConfig(**c) for c in json.loads(args.configs)]
    except (ValueError, TypeError) as e:
        ap.error(f"--configs must be a JSON list of DecodeConfig fields: {e}")
    if not kv_decode.HAS_TRITON:
        print("compile_decode.py needs Triton", file=sys.stderr)
        return 2
    shared, rope, norm = WHICH[args.which]
    dtype = DTYPES[args.dtype]
    rows = []
    header = f"{'config':<44} {'regs':>4} {'spill':>5} {'smem':>6} {'/SM':>3} {'loop':>5} " + " ".join(
        f"{k:>8}" for k in KINDS
    )
    print(f"split kernel, sm_{args.arch}, D={args.head_dim}, G={args.groups}, {args.dtype}, {args.which}"
          f"{', whole step' if args.step else ''}\n{header}")  # fmt: skip
    for cfg in configs:
        consts = kv_decode.split_kernel_constants(
            dtype, args.groups, args.head_dim, cfg, shared=shared, has_rope=rope, has_norm=norm,
            pdl=args.arch >= 90, positions=args.step, write_new=args.step, rope_q=args.step and rope,
            rope_new=args.step and rope and not shared,
        )  # fmt: skip
        kernel = compile_split(consts, dtype, args.arch)
        report = sass_report(kernel.asm["cubin"])
        shared_bytes = kernel.metadata.shared
        per_sm = kv_decode.resident_programs(report["registers"] or 255, shared_bytes, consts["num_warps"])
        row = {
            "config": {k: v for k, v in vars(cfg).items() if v is not None},
            "block_n": consts["BLOCK_N"],
            "num_warps": consts["num_warps"],
            "num_stages": consts["num_stages"],
            "shared_bytes": shared_bytes,
            "programs_per_sm": per_sm,
            **report,
        }
        rows.append(row)
        name = json.dumps(row["config"]) + f" n{row['block_n']} w{row['num_warps']} s{row['num_stages']}"
        print(f"{name:<44} {row['registers']!s:>4} {row['spill_bytes']!s:>5} {shared_bytes:>6} {per_sm:>3} "
              f"{row['loop_instructions']:>5} " + " ".join(f"{row['loop'][k]:>8}" for k in KINDS))  # fmt: skip
        if args.sequence:
            print(f"  loop: {row['loop_sequence']}")
    doc = {
        "benchmark": "compile_decode",
        "env": {**env_info(torch.device("cpu")), "gpu": f"none: compiled for sm_{args.arch}, not run"},
        "arch": args.arch,
        "shape": {"head_dim": args.head_dim, "groups": args.groups, "dtype": args.dtype, "which": args.which},
        "step": args.step,
        "argv": sys.argv[1:] if argv is None else list(argv),
        "rows": rows,
    }
    for path in write_json(doc, NAME, args.out):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
