"""The main job: the paper's eight LM variants trained on the standard library, side by side.

Nothing is downloaded: the corpus is the Python standard library's own ``.py`` files, read
byte-level. Every variant trains the ``tiny`` GPT (2 layers, d_model 64, 8 heads, the
paper's gpt2 recipe) for the same token budget and seed; after training, cached decoding
speed is measured on the trained model. The runs go through the ordinary sweep runner (so a
killed demo resumes) and the report is the ordinary study report.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from qkvlab.attention.variant import PAPER_LM_VARIANTS
from qkvlab.study.spec import SweepSpec

DEMO_BASE: dict[str, Any] = {
    "model": {"preset": "tiny"},
    "data": {"source": "stdlib", "tokenizer": "byte", "val_fraction": 0.05},
    "optim": {"lr": 3.0e-3, "betas": [0.9, 0.95], "weight_decay": 0.1, "grad_clip": 1.0},
    "schedule": {"warmup_steps": 40, "min_lr": 3.0e-4},
    "log": {"every": 20, "tensorboard": False},
    "batch_size": 16,
    "seq_len": 128,
    "eval_every": 100,
    "eval_batches": 20,
    "ckpt_every": 100,
    "seed": 0,
}


def demo_spec(tokens: int, seeds: list[int], study_dir: str | Path) -> SweepSpec:
    return SweepSpec(
        base=DEMO_BASE,
        grid={"variant": list(PAPER_LM_VARIANTS), "tokens": [tokens], "seed": seeds},
        name="demo",
        study_dir=str(study_dir),
        description="qkvlab demo: the paper's eight LM variants, tiny GPT, stdlib corpus, byte-level.",
    )


def decode_speed(run_dir: Path, *, prompt_len: int = 16, new_tokens: int = 112, batch: int = 1) -> float:
    """Cached decoding tokens/s of the trained model in ``run_dir`` (CPU, fp32, greedy)."""
    from qkvlab.checkpoint import load_model

    model = load_model(run_dir / "model.safetensors").eval()
    new_tokens = min(new_tokens, model.config.max_seq_len - prompt_len)
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, model.config.vocab_size, (batch, prompt_len), generator=gen)
    total = prompt_len + new_tokens
    cache = model.new_cache(batch, total)
    model.generate(prompt, 8, cache=cache)  # warm-up
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        model.generate(prompt, new_tokens, cache=cache)
        best = min(best, time.perf_counter() - t0)
    return batch * new_tokens / best


def demo_run_fn():
    """The sweep's trainer, plus decoding speed measured on the trained model."""
    from qkvlab.study.sweep import default_run_fn

    train = default_run_fn()

    def run(config: dict[str, Any], *, resume: bool = False) -> dict[str, Any]:
        summary = dict(train(config, resume=resume))
        summary["decode_tokens_per_s"] = decode_speed(Path(config["out_dir"]))
        return summary

    return run
