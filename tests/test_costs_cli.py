"""Costs against the paper's published numbers, MACs against torch's FLOP counter, and the CLI."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from rich.console import Console
from torch.utils.flop_counter import FlopCounterMode
from typer.testing import CliRunner

from qkvlab import (
    GPT,
    ConfigError,
    EncoderConfig,
    GPTConfig,
    SequenceEncoder,
    SetConfig,
    SetEncoder,
    ViT,
    ViTConfig,
    cli,
)
from qkvlab.attention import PAPER_LM_VARIANTS
from qkvlab.cli import app
from qkvlab.costs import macs, variant_costs
from qkvlab.models import PRESETS, get_preset, paper_variants

# ------------------------------------------------------------ the paper's numbers

# PAPER.md 2.5.2 (Tables 5-6) and 2.5.3 (Table 7): 300M preset, bf16 cache.
# variant: (params total, attention params or None if the paper gives none, KV bytes/token, reduction vs QKV)
PAPER_300M = {
    "QKV": (305_534_976, 83_968_000, 81_920, 0.0),
    "Q-K=V": (284_542_976, 62_976_000, 40_960, 0.5),
    "Q=K-V": (284_542_976, 62_976_000, 81_920, 0.0),
    "Q=K=V": (263_550_976, 41_984_000, 40_960, 0.5),
    "GQA-4": (None, None, 20_480, 0.75),
    "MQA": (None, None, 5_120, 0.9375),
    "Q-GQA-4": (None, None, 10_240, 0.875),
    "Q-MQA": (None, None, 2_560, 0.96875),
}

# GMACs per forward pass, batch 1 (Q=K-V has the same count as Q-K=V).
PAPER_GMACS = {
    "QKV": {128: 39.48, 512: 165.96, 1024: 353.40, 2048: 792.69},
    "Q-K=V": {128: 36.79, 512: 155.22, 1024: 331.92, 2048: 749.74},
    "Q=K-V": {128: 36.79, 512: 155.22, 1024: 331.92, 2048: 749.74},
    "Q=K=V": {128: 34.11, 512: 144.49, 1024: 310.45, 2048: 706.79},
}


@pytest.fixture(scope="module")
def rows_300m() -> dict[str, dict]:
    rows = variant_costs(get_preset("paper-300m"), list(PAPER_LM_VARIANTS))
    assert [r["variant"] for r in rows] == list(PAPER_LM_VARIANTS)
    return {r["variant"]: r for r in rows}


def attention_params(cfg: GPTConfig) -> int:
    """Attention parameters written out by hand: one Linear per projection group, plus W_o."""
    d, D, Hq, Hkv = cfg.d_model, cfg.head_dim, cfg.n_heads, cfg.n_kv_heads
    per_layer = 0
    for group in cfg.variant.groups:
        width = (Hq if "q" in group else Hkv) * D
        per_layer += d * width + (width if cfg.bias else 0)
    per_layer += Hq * D * d + (d if cfg.bias else 0)
    return cfg.n_layers * per_layer


def gpt2_params(cfg: GPTConfig) -> int:
    """Total parameters of a gpt2-recipe GPT written out by hand (LayerNorm with bias, GELU MLP)."""
    d = cfg.d_model
    mlp = 2 * d * cfg.d_ff + cfg.d_ff + d
    norms = 2 * (2 * d)
    emb = cfg.vocab_size * d + cfg.max_seq_len * d + (0 if cfg.tie_embeddings else cfg.vocab_size * d)
    return emb + attention_params(cfg) + cfg.n_layers * (mlp + norms) + 2 * d


@pytest.mark.parametrize("variant", list(PAPER_300M))
def test_paper_300m_params(rows_300m, variant):
    total, attention, _, _ = PAPER_300M[variant]
    row = rows_300m[variant]
    cfg = get_preset("paper-300m", variant=variant)
    assert row["params_attention"] == attention_params(cfg)
    assert row["params_total"] == gpt2_params(cfg)
    if total is not None:
        assert row["params_total"] == total
        assert row["params_attention"] == attention


@pytest.mark.parametrize("variant", list(PAPER_300M))
def test_paper_300m_cache_bytes(rows_300m, variant):
    _, _, per_token, reduction = PAPER_300M[variant]
    row = rows_300m[variant]
    assert row["kv_cache_bytes_per_token"] == per_token  # analytic
    assert row["kv_cache_bytes_per_token_measured"] == per_token  # from allocated tensors
    assert row["kv_cache_bytes_at_context"] == per_token * 32768
    assert row["cache_reduction"] == reduction
    shared = variant in ("Q-K=V", "Q=K=V", "Q-GQA-4", "Q-MQA")
    assert row["cached_tensors_per_layer"] == (1 if shared else 2)
    assert row["cache_tensors_allocated"] == 20 * (1 if shared else 2)
    assert row["dtype"] == "bfloat16"


@pytest.mark.parametrize("seq_len", [128, 512, 1024, 2048])
@pytest.mark.parametrize("variant", list(PAPER_GMACS))
def test_paper_300m_macs(variant, seq_len):
    cfg = get_preset("paper-300m", variant=variant)
    m = macs(cfg, seq_len)
    assert round(m["total"] / 1e9, 2) == PAPER_GMACS[variant][seq_len]
    assert m["total"] == m["attention"] + m["mlp"] + m["head"]


def test_variant_costs_macs_match_macs(rows_300m):
    for name, row in rows_300m.items():
        cfg = get_preset("paper-300m", variant=name)
        assert row["seq_len"] == 2048
        assert row["macs"] == macs(cfg, 2048)["total"], name
        assert row["macs_attention"] == macs(cfg, 2048)["attention"], name


def test_attention_share_of_macs():
    # PAPER.md 2.5.2: attention is 28.9% of the QKV total at L = 128 and 43.3% at L = 2048.
    cfg = get_preset("paper-300m")
    for seq_len, share in [(128, 0.289), (2048, 0.433)]:
        m = macs(cfg, seq_len)
        assert round(m["attention"] / m["total"], 3) == share


def test_cache_costs_in_other_dtypes():
    base = get_preset("paper-300m")
    (fp32,) = variant_costs(base, ["QKV"], dtype=torch.float32)
    (fp16,) = variant_costs(base, ["Q-K=V"], dtype=torch.float16)
    assert fp32["kv_cache_bytes_per_token"] == fp32["kv_cache_bytes_per_token_measured"] == 2 * 81_920
    assert fp16["kv_cache_bytes_per_token"] == fp16["kv_cache_bytes_per_token_measured"] == 40_960
    assert fp16["cache_reduction"] == 0.5  # relative to QKV in the same dtype


# ---------------------------------------------------------- MACs vs FlopCounterMode


def counted_flops(model: torch.nn.Module, x: torch.Tensor) -> dict[str, int]:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    return {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}


FLOP_VARIANTS = ["QKV", "Q-K=V", "Q=K-V", "Q=K=V", "q_kv+gqa2", "q_k_v+mqa", "k_v", "qv_k+qknorm"]


@pytest.mark.parametrize("T", [12, 32])
@pytest.mark.parametrize("variant", FLOP_VARIANTS)
@pytest.mark.parametrize("recipe", ["gpt2", "llama"])
def test_macs_match_torch_flop_counter_reference_backend(recipe, variant, T):
    """With the reference backend every matmul is a plain aten op, so the counter sees all of them.

    FlopCounterMode counts 2 FLOPs per multiply-accumulate of mm / addmm / bmm and nothing for
    norms, RoPE, softmax, biases or embedding lookups; that is the paper's counting rule.
    The attention scores (q k^T and A v, full L x L, no causal halving) are the bmm ops.
    """
    cfg = GPTConfig(
        n_layers=2, d_model=32, n_heads=4, vocab_size=64, max_seq_len=32, recipe=recipe, variant=variant,
        backend="reference",
    )  # fmt: skip
    m = macs(cfg, T)
    counts = counted_flops(GPT(cfg).eval(), torch.randint(0, 64, (1, T)))
    assert sum(counts.values()) == 2 * m["total"]
    assert counts.pop("aten.bmm") == 2 * m["scores"]
    assert set(counts) <= {"aten.mm", "aten.addmm"}
    assert sum(counts.values()) == 2 * (m["total"] - m["scores"])


@pytest.mark.parametrize("variant", FLOP_VARIANTS)
@pytest.mark.parametrize("recipe", ["gpt2", "llama"])
def test_macs_match_torch_flop_counter_sdpa_backend(recipe, variant):
    """With SDPA the linear layers are counted as with the reference backend.

    The attention itself runs in one fused kernel. On CPU that is
    ``aten._scaled_dot_product_flash_attention_for_cpu``, for which FlopCounterMode (torch 2.13)
    has no formula, so it counts zero for the scores; if a formula exists for the kernel SDPA
    picked, its count must be the full L x L score MACs (the counter does not halve causal
    attention either, and with ``enable_gqa`` each query head still does all its work).
    """
    T = 16
    cfg = GPTConfig(
        n_layers=2, d_model=32, n_heads=4, vocab_size=64, max_seq_len=32, recipe=recipe, variant=variant, backend="sdpa"
    )
    m = macs(cfg, T)
    counts = counted_flops(GPT(cfg).eval(), torch.randint(0, 64, (1, T)))
    linear = counts.pop("aten.mm", 0) + counts.pop("aten.addmm", 0)
    assert linear == 2 * (m["total"] - m["scores"])
    assert all("scaled_dot_product" in op for op in counts), counts
    if counts:
        assert sum(counts.values()) == 2 * m["scores"]


@pytest.mark.parametrize("family", ["sequence", "vit", "set"])
def test_macs_match_torch_flop_counter_for_encoders(family):
    small = dict(n_layers=2, d_model=32, n_heads=4, backend="reference")
    if family == "sequence":
        cfg = EncoderConfig(vocab_size=16, n_labels=3, **small)
        model, x, T = SequenceEncoder(cfg), torch.randint(0, 16, (1, 12)), 12
    elif family == "vit":
        cfg = ViTConfig(image_size=8, patch_size=4, channels=3, n_classes=7, **small)
        model, x, T = ViT(cfg), torch.randn(1, 3, 8, 8), 5
    else:
        cfg = SetConfig(in_features=6, **small)
        model, x, T = SetEncoder(cfg), torch.randn(1, 9, 6), 9
    assert sum(counted_flops(model.eval(), x).values()) == 2 * macs(cfg, T)["total"]


# ------------------------------------------------------------------------ CLI

runner = CliRunner()
ANSI = re.compile(r"\x1b\[[0-9;]*m")


@pytest.fixture(autouse=True)
def _plain_console(monkeypatch):
    # The CLI picks its console at import: terminal width under `pytest -s`, 170 columns otherwise.
    # Fix it to the latter so that table rows are never wrapped.
    monkeypatch.setattr(cli, "console", Console(width=170, color_system=None))


def invoke(*args: str):
    result = runner.invoke(app, list(args))
    return result, ANSI.sub("", result.output)


def table_rows(text: str, n_cells: int) -> list[list[str]]:
    """Body rows of the rich tables in ``text`` that have ``n_cells`` cells."""
    rows = []
    for line in text.splitlines():
        if line.startswith("│"):
            cells = [c.strip() for c in line.strip().strip("│").split("│")]
            if len(cells) == n_cells:
                rows.append(cells)
    return rows


JSON_KEYS = {
    "variant",
    "params_total",
    "params_attention",
    "kv_cache_bytes_per_token",
    "kv_cache_bytes_per_token_measured",
    "cache_reduction",
}


@pytest.fixture(scope="module")
def variants_json() -> list[dict]:
    result, _ = invoke("variants", "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_cli_variants_json(variants_json):
    assert isinstance(variants_json, list)
    assert [r["variant"] for r in variants_json] == list(PAPER_LM_VARIANTS)
    for row in variants_json:
        assert row.keys() >= JSON_KEYS
        total, attention, per_token, reduction = PAPER_300M[row["variant"]]
        if total is not None:
            assert row["params_total"] == total
            assert row["params_attention"] == attention
        assert row["kv_cache_bytes_per_token"] == per_token
        assert row["kv_cache_bytes_per_token_measured"] == per_token
        assert row["cache_reduction"] == reduction
        if row["variant"] in PAPER_GMACS:
            assert round(row["macs"] / 1e9, 2) == PAPER_GMACS[row["variant"]][2048]


def test_cli_variants_json_1_2b():
    result, _ = invoke("variants", "--preset", "paper-1.2b", "--json")
    assert result.exit_code == 0, result.output
    rows = {r["variant"]: r for r in json.loads(result.stdout)}
    assert list(rows) == paper_variants("paper-1.2b") == ["QKV", "Q-K=V", "GQA-8", "MQA", "Q-GQA-8", "Q-MQA"]
    assert rows["QKV"]["params_total"] == 1_215_102_976
    qkv = 22 * 2 * 32 * 64 * 2  # layers * (K and V) * heads * head_dim * bf16 bytes
    for name, fraction in [("QKV", 1), ("Q-K=V", 1 / 2), ("GQA-8", 1 / 4), ("MQA", 1 / 32), ("Q-GQA-8", 1 / 8)]:
        assert rows[name]["kv_cache_bytes_per_token"] == qkv * fraction
        assert rows[name]["kv_cache_bytes_per_token_measured"] == qkv * fraction
        assert rows[name]["cache_reduction"] == 1 - fraction
    assert rows["Q-MQA"]["cache_reduction"] == 1 - 1 / 64


def test_cli_variants_options():
    result, _ = invoke(
        "variants", "-v", "Q-K=V, GQA-4", "-v", "kv_q+mqa", "--seq-len", "128", "--dtype", "fp32", "--json"
    )
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [r["variant"] for r in rows] == ["Q-K=V", "GQA-4", "Q-MQA"]
    assert [r["kv_cache_bytes_per_token"] for r in rows] == [81_920, 40_960, 5_120]  # fp32: twice bf16
    assert [r["dtype"] for r in rows] == ["float32"] * 3
    assert round(rows[0]["macs"] / 1e9, 2) == PAPER_GMACS["Q-K=V"][128]
    assert rows[0]["seq_len"] == 128


def test_cli_variants_table(variants_json):
    result, out = invoke("variants")
    assert result.exit_code == 0, result.output
    rows = table_rows(out, 10)
    assert [r[0] for r in rows] == list(PAPER_LM_VARIANTS)
    assert rows[0][2] == "305,534,976"
    assert rows[1][6] == "40,960"


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["variants", "-v", "bogus"], "'bogus'"),
        (["variants", "--preset", "nope"], "'nope'"),
        (["variants", "--dtype", "fp64"], "'fp64'"),
        (["variants", "--preset", "tiny", "-v", "Q=K=V+GQA-4"], "ties the query"),
    ],
)
def test_cli_user_errors_raise_config_error(args, fragment):
    result, _ = invoke(*args)
    assert result.exit_code != 0
    assert isinstance(result.exception, ConfigError)
    assert fragment in str(result.exception)


@pytest.fixture(scope="module")
def bogus_run() -> subprocess.CompletedProcess:
    # qkvlab has no __main__ (`python -m qkvlab` does not run); the cli module runs main().
    return subprocess.run(
        [sys.executable, "-m", "qkvlab.cli", "variants", "-v", "bogus"],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_main_prints_the_error_and_exits_2(bogus_run):
    out = bogus_run.stdout + bogus_run.stderr
    assert bogus_run.returncode == 2
    assert out.startswith("error: Cannot parse variant 'bogus'")
    assert "Traceback" not in out
    assert "ConfigError" not in out


def test_main_prints_one_error_line(bogus_run):
    lines = [line for line in (bogus_run.stdout + bogus_run.stderr).splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert "'bogus'" in lines[0] and "modifiers:" in lines[0]


def test_main_prints_the_error_on_stderr(bogus_run):
    assert bogus_run.stdout == ""
    assert "error:" in bogus_run.stderr


def test_console_script_exits_2_on_a_user_error():
    script = Path(sys.executable).with_name("qkvlab")
    if not script.exists():
        pytest.skip("the qkvlab console script is not installed next to this Python")
    proc = subprocess.run([str(script), "variants", "--preset", "nope"], capture_output=True, text=True, timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2
    assert "error:" in out and "'nope'" in out and "paper-300m" in out
    assert "Traceback" not in out


def test_cli_presets():
    result, out = invoke("presets")
    assert result.exit_code == 0, result.output
    rows = {r[0]: r for r in table_rows(out, 10)}
    assert list(rows) == list(PRESETS)
    assert rows["paper-300m"][1:6] == ["gpt2", "20", "1024", "16", "4096"]
    assert rows["paper-300m"][8] == "305.5M"
    assert rows["paper-1.2b"][8] == "1,215.1M"
