"""qkvlab.analysis: each measure on cases with known answers, capture on every family, the CLI."""

from __future__ import annotations

import json
import math
import sys

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from qkvlab.analysis import (
    analyze_model,
    attention_symmetry,
    collect_attention,
    energy_rank,
    entropy_rank,
    flat_cosine,
    linear_cka,
    logit_asymmetry,
    plot_attention_grid,
    plot_variants,
    projection_similarity,
    rank_summary,
    subspace_overlap,
    uniform_diagonal,
)
from qkvlab.checkpoint import save_model
from qkvlab.cli import app
from qkvlab.errors import ConfigError
from qkvlab.models import GPT, EncoderConfig, GPTConfig, SequenceEncoder, SetConfig, SetEncoder, ViT, ViTConfig

PNG = b"\x89PNG\r\n\x1a\n"


def tiny_gpt(variant: str = "q_k_v", **kw) -> GPT:
    cfg = dict(n_layers=2, d_model=32, n_heads=4, vocab_size=64, max_seq_len=32)
    return GPT(GPTConfig(variant=variant, **{**cfg, **kw})).eval()


def with_singular_values(s: list[float], rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(rows, rows, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(cols, cols, generator=g, dtype=torch.float64))
    d = torch.zeros(rows, cols, dtype=torch.float64)
    d[range(len(s)), range(len(s))] = torch.tensor(s, dtype=torch.float64)
    return u @ d @ v.T


def attn_layers(model):
    return [b.attn for b in model.backbone.blocks]


# ------------------------------------------------------------------ rank
def test_effective_rank_of_known_singular_values():
    equal = rank_summary(with_singular_values([3.0] * 4, 12, 10))
    assert equal["entropy"] == pytest.approx(4.0, rel=1e-9)
    assert (equal["energy90"], equal["energy99"], equal["full"]) == (4, 4, 10)
    # p = (1/2, 1/4, 1/8, 1/8): entropy 1.75 ln 2; energy 16, 4, 1, 1 of 22 -> 2 reach 90%, 4 reach 99%.
    skew = rank_summary(with_singular_values([4.0, 2.0, 1.0, 1.0], 8, 8, seed=1))
    assert skew["entropy"] == pytest.approx(2**1.75, rel=1e-9)
    assert (skew["energy90"], skew["energy99"]) == (2, 4)
    s = torch.tensor([1.0] * 10)
    assert int(energy_rank(s, 0.9)) == 9 and int(energy_rank(s, 0.99)) == 10
    assert float(entropy_rank(torch.zeros(3))) == 0.0
    with pytest.raises(ConfigError, match="fraction"):
        energy_rank(s, 1.5)
    with pytest.raises(ConfigError, match="matrix"):
        rank_summary(torch.ones(5))


# ------------------------------------------------------------ similarity
def test_cosine_known_cases_and_random_pairs_within_their_spread():
    a = torch.randn(16, 32)
    assert flat_cosine(a, a) == pytest.approx(1.0)
    assert flat_cosine(a, -2 * a) == pytest.approx(-1.0)
    n = 256
    cos = torch.tensor([flat_cosine(torch.randn(n), torch.randn(n)) for _ in range(400)])
    assert abs(cos.mean()) < 4 / math.sqrt(n * 400)  # mean 0
    assert cos.std() == pytest.approx(1 / math.sqrt(n), rel=0.15)  # ~ N(0, 1/n)
    with pytest.raises(ConfigError, match="same-shaped"):
        flat_cosine(torch.ones(2, 3), torch.ones(3, 2))


def test_subspace_overlap_identical_orthogonal_and_random():
    a = torch.randn(8, 64, dtype=torch.float64)
    assert subspace_overlap(a, a) == pytest.approx(1.0)
    rot = torch.linalg.qr(torch.randn(8, 8, dtype=torch.float64))[0]
    assert subspace_overlap(a, 3 * rot @ a) == pytest.approx(1.0)  # same row space, other basis
    eye = torch.eye(64)
    assert subspace_overlap(eye[:8], eye[8:16]) == pytest.approx(0.0, abs=1e-12)
    # Two random D-dim subspaces of R^d: E[mean cos^2] = D / d.
    vals = [subspace_overlap(torch.randn(8, 64), torch.randn(8, 64)) for _ in range(60)]
    assert np.mean(vals) == pytest.approx(8 / 64, abs=0.02)


def test_linear_cka_invariances_and_independence():
    x = torch.randn(2000, 16, dtype=torch.float64)
    q = torch.linalg.qr(torch.randn(16, 16, dtype=torch.float64))[0]
    assert linear_cka(x, x) == pytest.approx(1.0)
    assert linear_cka(x, 5 * x @ q + 3) == pytest.approx(1.0)  # rotation, scale, shift
    y = torch.randn(2000, 24, dtype=torch.float64)
    assert linear_cka(x, y) < 5 * math.sqrt(16 * 24) / 2000  # about sqrt(pq)/n
    with pytest.raises(ConfigError, match="same samples"):
        linear_cka(x, y[:10])


def test_model_similarity_identical_k_v_random_q():
    model = tiny_gpt("q_k_v")
    for attn in attn_layers(model):
        attn.qkv.proj["v"].weight.data.copy_(attn.qkv.proj["k"].weight)
    cap = collect_attention(model, torch.randint(0, 64, (2, 16)))
    sim = projection_similarity(model, cap.inputs)
    kv = sim["K-V"]
    assert not kv["tied"] and kv["groups"] == ["k", "v"]
    for m in ("cosine", "subspace", "cka"):
        assert kv[m]["layers"] == pytest.approx([1.0, 1.0])
    n = 32 * 32  # entries of one projection: random pairs ~ N(0, 1/n)
    assert all(abs(c) < 5 / math.sqrt(n) for c in sim["Q-K"]["cosine"]["layers"])
    assert len(sim["Q-K"]["cosine"]["per_head"][0]) == 4
    base = sim["Q-K"]["subspace"]["random_baseline"]
    assert base == 8 / 32
    assert sim["Q-K"]["subspace"]["mean"] == pytest.approx(base, abs=0.12)


def test_grouped_heads_align_each_query_head_with_its_kv_head():
    model = tiny_gpt("q_k_v+gqa2")
    for attn in attn_layers(model):
        k = attn.qkv.proj["k"].weight.data.view(2, 8, 32)  # 2 KV heads of width 8
        attn.qkv.proj["q"].weight.data.copy_(k.repeat_interleave(2, dim=0).reshape(32, 32))
    sim = projection_similarity(model)
    qk = sim["Q-K"]
    assert qk["cosine"]["layers"] == pytest.approx([1.0, 1.0])
    assert qk["subspace"]["layers"] == pytest.approx([1.0, 1.0])
    assert len(qk["cosine"]["per_head"][0]) == 4  # one per query head
    assert "cka" not in qk  # no inputs: CKA skipped
    assert sim["K-V"]["cosine"]["mean"] < 0.5


def test_shared_projection_is_tied_in_all_and_refused_by_name():
    model = tiny_gpt("q_kv")
    sim = projection_similarity(model, pairs="all")
    assert sim["K-V"]["tied"] and sim["K-V"]["groups"] == ["kv", "kv"]
    assert sim["K-V"]["cosine"]["mean"] == 1.0
    assert not sim["Q-K"]["tied"] and sim["Q-K"]["cosine"]["layers"] == sim["Q-V"]["cosine"]["layers"]
    with pytest.raises(ConfigError, match=r"'q_kv\+learned' \(Q-K=V\) has projection groups q \(Q\), kv \(K=V\)"):
        projection_similarity(model, pairs=["K-V"])
    assert list(projection_similarity(model, pairs="q-k, Q/V")) == ["Q-K", "Q-V"]
    with pytest.raises(ConfigError, match="Bad projection pair 'K-X'"):
        projection_similarity(model, pairs=["K-X"])


def test_identity_role_is_compared_as_the_identity():
    model = tiny_gpt("k_v")
    sim = projection_similarity(model)
    assert sim["Q-K"]["identity"] == ["q"] and sim["Q-K"]["groups"] == ["x", "k"]
    w = attn_layers(model)[0].qkv.proj["k"].weight
    assert sim["Q-K"]["cosine"]["layers"][0] == pytest.approx(flat_cosine(torch.eye(32), w))


# --------------------------------------------------------------- symmetry
@pytest.mark.parametrize("variant", ["qk_v", "qk_v+rope", "qkv", "qk_v+qknorm+rope"])
def test_q_equals_k_gives_symmetric_logits_without_the_mask(variant):
    model = tiny_gpt(variant)  # causal, yet the unmasked logits stay symmetric
    cap = collect_attention(model, torch.randint(0, 64, (2, 16)))
    sym = attention_symmetry(cap.logits, cap.weights, causal=True)
    assert sym["logit_asymmetry"]["mean"] < 1e-6
    assert len(sym["logit_asymmetry"]["per_head"]) == 2 and len(sym["logit_asymmetry"]["per_head"][0]) == 4


def test_separate_q_and_k_or_the_2d_fix_break_symmetry():
    cap = collect_attention(tiny_gpt("q_k_v"), torch.randint(0, 64, (2, 16)))
    assert attention_symmetry(cap.logits, cap.weights, causal=True)["logit_asymmetry"]["mean"] > 0.3
    enc = SequenceEncoder(EncoderConfig(n_layers=1, d_model=32, n_heads=4, vocab_size=16, variant="(Q=K-V)+"))
    x = torch.randint(0, 16, (2, 12))
    # At init the fix mixes its channels equally (1/m each), which is still symmetric; a learned,
    # unequal mix of row and column features is not.
    assert attention_symmetry(*_maps(enc, x), causal=False)["logit_asymmetry"]["mean"] < 1e-6
    enc.backbone.blocks[0].attn.pos2d.weight.data.copy_(torch.linspace(-1, 1, 10))
    assert attention_symmetry(*_maps(enc, x), causal=False)["logit_asymmetry"]["mean"] > 1e-2


def _maps(model, x):
    cap = collect_attention(model, x)
    return cap.logits, cap.weights


def test_logit_asymmetry_scale():
    s = torch.randn(4, 50, 50, dtype=torch.float64)
    assert logit_asymmetry(s + s.transpose(-1, -2)).max() < 1e-12
    assert logit_asymmetry(s - s.transpose(-1, -2)).min() == pytest.approx(2.0)
    assert logit_asymmetry(s).mean() == pytest.approx(math.sqrt(2), abs=0.1)
    with pytest.raises(ConfigError, match="square"):
        logit_asymmetry(torch.randn(2, 3, 5))


@pytest.mark.parametrize("causal", [True, False])
def test_uniform_attention_diagonal_and_rank(causal):
    if causal:
        model = tiny_gpt("q_k_v")
        x = torch.randint(0, 64, (2, 10))
    else:
        model = SequenceEncoder(EncoderConfig(n_layers=2, d_model=32, n_heads=4, vocab_size=16, variant="q_k_v"))
        x = torch.randint(0, 16, (2, 10))
    for attn in attn_layers(model):  # zero Q and K: every logit 0, attention uniform over visible keys
        for g in ("q", "k"):
            attn.qkv.proj[g].weight.data.zero_()
            attn.qkv.proj[g].bias.data.zero_()
    result, _ = analyze_model(model, x)
    diag = result["symmetry"]["diagonal_attention"]
    assert diag["uniform_baseline"] == pytest.approx(sum(1 / (i + 1) for i in range(10)) / 10 if causal else 0.1)
    assert diag["mean"] == pytest.approx(diag["uniform_baseline"])
    assert result["symmetry"]["logit_asymmetry"]["mean"] == 0.0
    maps = result["rank"]["attention_maps"]
    if not causal:  # every row equal: rank one
        assert maps["entropy"]["mean"] == pytest.approx(1.0) and maps["energy99"]["mean"] == 1.0
    else:  # lower-triangular, full rank, but not flat
        assert 1.0 < maps["entropy"]["mean"] < 10.0 and maps["energy99"]["mean"] <= 10
    assert uniform_diagonal(4, causal=False) == 0.25


# ------------------------------------------------------------ capture
def _families():
    yield "gpt", tiny_gpt("q_kv+gqa2"), torch.randint(0, 64, (2, 9)), 9
    enc = EncoderConfig(n_layers=2, d_model=32, n_heads=4, vocab_size=16, variant="qkv+rope")
    yield "encoder", SequenceEncoder(enc), torch.randint(0, 16, (2, 7)), 7
    vit = ViTConfig(n_layers=2, d_model=32, n_heads=4, image_size=8, patch_size=4, variant="Q-K=V")
    yield "vit", ViT(vit), torch.randn(2, 1, 8, 8), 5
    st = SetConfig(n_layers=2, d_model=32, n_heads=4, in_features=6, variant="qk_v")
    yield "set", SetEncoder(st), torch.randn(2, 5, 6), 5


@pytest.mark.parametrize("family", ["gpt", "encoder", "vit", "set"])
def test_collect_attention_on_every_family_matches_need_weights(family):
    _, model, x, n = next(f for f in _families() if f[0] == family)
    model.train()
    plain = model.eval()(x)
    model.train()
    cap = collect_attention(model, x)
    assert model.training  # mode restored
    assert all(not a._forward_hooks and not a._forward_pre_hooks for a in attn_layers(model))  # hooks removed
    assert torch.allclose(cap.output, plain, atol=1e-5)  # the model's own output is unchanged
    assert len(cap.layers) == 2 and cap.layers[0].name == "backbone.blocks.0.attn"
    assert cap.weights[0].shape == (2, 4, n, n) and cap.inputs[0].shape == (2, n, 32)
    assert torch.allclose(cap.weights[1].sum(-1), torch.ones(2, 4, n), atol=1e-5)
    model.eval()
    _, infos = model(x, need_weights=True)
    for layer, info in zip(cap.layers, infos, strict=True):
        assert torch.allclose(layer.weights, info.weights, atol=1e-6)
        assert torch.allclose(layer.logits, info.logits, atol=1e-5)


def test_capture_keeps_need_weights_callers_working_and_refuses_a_cache():
    model = tiny_gpt()
    x = torch.randint(0, 64, (1, 6))
    from qkvlab.analysis import capture_attention

    with torch.no_grad(), capture_attention(model) as cap:
        logits, infos = model(x, need_weights=True)
    assert len(infos) == 2 and len(cap.layers) == 2 and logits.shape == (1, 6, 64)
    with pytest.raises(ConfigError, match="KV cache"):
        collect_attention(model, x, cache=model.new_cache(1, 8))
    with pytest.raises(ConfigError, match="no qkvlab Attention"):
        collect_attention(torch.nn.Linear(3, 3), torch.randn(1, 3))


def test_figures_write_pngs_and_need_matplotlib(tmp_path, monkeypatch):
    caps = {v: collect_attention(tiny_gpt(v), torch.randint(0, 64, (1, 8))) for v in ("q_k_v", "qk_v")}
    grid = plot_attention_grid(caps["q_k_v"], tmp_path / "grid.png", title="QKV")
    side = plot_variants(caps, tmp_path / "side.png")
    assert grid.read_bytes()[:8] == PNG and side.read_bytes()[:8] == PNG
    with pytest.raises(ConfigError, match="sample=3"):
        plot_attention_grid(caps["qk_v"], tmp_path / "x.png", sample=3)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ConfigError, match="pip install matplotlib"):
        plot_attention_grid(caps["qk_v"], tmp_path / "y.png")


# ----------------------------------------------------------------- CLI
@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("analyze")
    tokens = root / "tokens.npy"
    np.save(tokens, np.random.default_rng(0).integers(0, 64, 4000).astype(np.int64))  # val: last 200 ids
    meta = {"train_config": json.dumps({"data": {"source": str(tokens)}, "seq_len": 16}), "train_step": "0"}
    paths = {}
    for v in ("q_k_v", "q_kv"):
        paths[v] = save_model(tiny_gpt(v), root / v / "model.safetensors", metadata=meta)
    enc = SequenceEncoder(EncoderConfig(n_layers=1, d_model=32, n_heads=4, vocab_size=16, variant="qkv"))
    paths["encoder"] = save_model(enc, root / "enc.safetensors")
    return root, paths


def test_cli_analyze_writes_json_and_pngs(ckpts):
    root, paths = ckpts
    out = root / "out"
    res = CliRunner().invoke(app, ["analyze", str(paths["q_k_v"]), "--out", str(out), "--batch-size", "3"])
    assert res.exit_code == 0, res.output
    assert "K-V" in res.output and "logit asymmetry" in res.output
    result = json.loads((out / "analysis.json").read_text())
    assert result["inputs"]["shape"] == [3, 16] and result["inputs"]["kind"] == "corpus"
    assert set(result["similarity"]) == {"Q-K", "Q-V", "K-V"}
    for pair in result["similarity"].values():
        assert -1 <= pair["cosine"]["mean"] <= 1 and 0 <= pair["cka"]["mean"] <= 1
    assert result["rank"]["projections"]["k"]["full"] == 32
    assert result["rank"]["attention_maps"]["size"] == 16
    for name in ("attention_maps.png", "similarity.png", "spectra.png"):
        assert (out / name).read_bytes()[:8] == PNG


def test_cli_analyze_never_replaces_an_analysis_unasked(ckpts):
    root, paths = ckpts
    out = root / "again"
    first = CliRunner().invoke(app, ["analyze", str(paths["q_kv"]), "--out", str(out), "--no-plots"])
    assert first.exit_code == 0, first.output
    before = (out / "analysis.json").read_text()
    other = ["analyze", str(paths["q_kv"]), "--out", str(out), "--no-plots", "--seq-len", "8"]
    res = CliRunner().invoke(app, other)
    assert isinstance(res.exception, ConfigError) and "--force" in str(res.exception)
    assert (out / "analysis.json").read_text() == before
    res = CliRunner().invoke(app, [*other, "--force"])
    assert res.exit_code == 0, res.output
    assert json.loads((out / "analysis.json").read_text())["inputs"]["shape"][1] == 8


def test_cli_analyze_of_a_kept_checkpoint_writes_outside_what_pruning_deletes(tmp_path):
    from qkvlab.train import load_config, train

    tokens = tmp_path / "tokens.npy"
    np.save(tokens, np.random.default_rng(0).integers(0, 64, 4000).astype(np.uint16))
    overrides = [
        f"data.source={tokens}", f"out_dir={tmp_path / 'run'}", "model.n_layers=1", "model.d_model=32",
        "model.n_heads=4", "batch_size=4", "seq_len=16", "max_steps=4", "ckpt_every=2", "eval_every=0",
        "eval_batches=1", "log.progress=false", "log.tensorboard=false", "schedule.warmup_steps=1",
    ]  # fmt: skip
    train(load_config(None, overrides), verbose=False)
    ckpt = tmp_path / "run" / "checkpoints" / "ckpt-0000002"
    res = CliRunner().invoke(app, ["analyze", str(ckpt), "--no-plots"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "run" / "analysis" / "ckpt-0000002" / "analysis.json").is_file()
    assert not (ckpt / "analysis").exists()


def test_cli_analyze_several_checkpoints_side_by_side_and_json(ckpts):
    root, paths = ckpts
    out = root / "cmp"
    args = ["analyze", str(paths["q_k_v"]), str(paths["q_kv"]), "--out", str(out), "--seq-len", "8", "--json"]
    res = CliRunner().invoke(app, [*args, "--pairs", "Q-K,Q-V"])
    assert res.exit_code == 0, res.output
    both = json.loads(res.output)
    assert set(both) == {"q_k_v", "q_kv"} and set(both["q_kv"]["similarity"]) == {"Q-K", "Q-V"}
    assert (out / "variants.png").read_bytes()[:8] == PNG
    assert (out / "q_kv" / "analysis.json").is_file()


def test_cli_analyze_encoder_with_random_inputs(ckpts):
    root, paths = ckpts
    res = CliRunner().invoke(app, ["analyze", str(paths["encoder"]), "--out", str(root / "enc"), "--no-plots"])
    assert res.exit_code == 0, res.output
    result = json.loads((root / "enc" / "analysis.json").read_text())
    assert result["inputs"]["kind"] == "random" and result["similarity"]["K-V"]["tied"]
    assert result["symmetry"]["logit_asymmetry"]["mean"] < 1e-6  # Q=K=V: symmetric
    assert not list((root / "enc").glob("*.png"))


@pytest.mark.parametrize(
    "args, message",
    [
        (["--seq-len", "400"], "between 2 and the model's max_seq_len=32"),
        (["--data", "SHORT"], "need at least 30 tokens"),
        (["--pairs", "K-V"], "Q-K=V"),
        (["--pairs", "Q-Z"], "Bad projection pair"),
        (["--split", "test"], "--split must be 'val' or 'train'"),
    ],
)
def test_cli_analyze_bad_input(ckpts, args, message):
    root, paths = ckpts
    short = root / "short.npy"
    np.save(short, np.arange(40, dtype=np.int64) % 64)  # val split: 2 tokens
    args = [str(short) if a == "SHORT" else a for a in args]
    extra = ["--seq-len", "30"] if str(short) in args else []
    res = CliRunner().invoke(app, ["analyze", str(paths["q_kv"]), "--out", str(root / "bad"), *args, *extra])
    assert res.exit_code != 0
    assert isinstance(res.exception, ConfigError) and message in str(res.exception), res.exception


def test_cli_analyze_missing_checkpoint(tmp_path):
    res = CliRunner().invoke(app, ["analyze", str(tmp_path / "nope")])
    assert isinstance(res.exception, ConfigError) and "No checkpoint" in str(res.exception)


def test_analyze_a_synthetic_run_uses_its_own_test_lists(tmp_path):
    from qkvlab.analysis.runner import _train_config, analyze_checkpoint, synthetic_batch
    from qkvlab.checkpoint import read_metadata
    from qkvlab.data.synthetic import make_dataset
    from qkvlab.train import TrainConfig, train

    cfg = TrainConfig.from_dict(
        {
            "task": {"name": "synthetic", "kind": "swap", "seq_len": 6, "n_train": 64, "n_test": 16, "seed": 3},
            "model": {"n_layers": 1, "d_model": 16, "n_heads": 2, "variant": "Q=K-V"},
            "log": {"progress": False},
            "batch_size": 8,
            "max_steps": 2,
            "eval_every": 0,
            "out_dir": str(tmp_path / "run"),
        }
    )
    train(cfg, verbose=False)
    weights = tmp_path / "run" / "model.safetensors"
    trained = _train_config(read_metadata(weights))
    x, src = synthetic_batch(trained, batch_size=5, seq_len=None)
    assert "swap" in src["source"]
    assert np.array_equal(x.numpy(), make_dataset("swap", 6, 64, 16, 3).test_x[:5])  # the run's own test lists
    result, _ = analyze_checkpoint(weights, batch_size=5, plots=False)
    assert result["inputs"]["kind"] == "task" and result["inputs"]["shape"] == [5, 6]
    with pytest.raises(ConfigError, match="trained on lists of 6"):
        analyze_checkpoint(weights, seq_len=8, plots=False)


def test_cli_maps_draws_tasks_by_variants_from_a_study(tmp_path):
    from qkvlab.study import SweepSpec, run_sweep

    spec = SweepSpec.from_dict(
        {
            "name": "maps",
            "base": {
                "task": {"name": "synthetic", "kind": "copy", "seq_len": 6, "n_train": 32, "n_test": 8},
                "model": {"n_layers": 2, "d_model": 16, "n_heads": 2},
                "log": {"progress": False},
                "batch_size": 8,
                "max_steps": 1,
                "eval_every": 0,
            },
            "metric": "val_acc",
            "grid": {"variant": ["QKV", "Q=K-V"], "task.kind": ["reverse", "swap"], "seed": [0]},
        }
    )
    study = tmp_path / "study"
    summary = run_sweep(spec, study, verbose=False)
    assert len(summary.ran) == 4
    result = CliRunner().invoke(app, ["maps", str(study), "--layer", "1"])
    assert result.exit_code == 0, result.output
    png = study / "report" / "attention-maps.png"
    assert png.read_bytes().startswith(b"\x89PNG") and "(4 runs)" in result.output
    drawn = json.loads(png.with_suffix(".json").read_text())
    assert {(r["task"], r["variant"]) for r in drawn["runs"]} == {
        (t, v) for t in ("reverse", "swap") for v in ("QKV", "Q=K-V")
    }
    bad = CliRunner().invoke(app, ["maps", str(study), "--where", "model.d_model=99"])
    assert bad.exit_code != 0 and "No finished task runs" in (bad.output + str(bad.exception))
    bad = CliRunner().invoke(app, ["maps", str(study), "--layer", "5"])
    assert bad.exit_code != 0 and "out of range" in (bad.output + str(bad.exception))
    (tmp_path / "figs").mkdir()
    for out, fragment in ((tmp_path / "figs", "is a folder"), (tmp_path / "maps.txt", "end the name in one of")):
        bad = CliRunner().invoke(app, ["maps", str(study), "--out", str(out)])
        assert isinstance(bad.exception, ConfigError) and fragment in str(bad.exception), bad.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["figs", "study"]  # nothing written beside them


def test_cli_maps_on_a_language_model_study_says_what_it_draws(tmp_path):
    from qkvlab.study import ResultsStore

    ResultsStore(tmp_path / "lm").append({"run_id": "a", "status": "ok", "seed": 0, "config": {"model": {}}})
    bad = CliRunner().invoke(app, ["maps", str(tmp_path / "lm")])
    assert isinstance(bad.exception, ConfigError) and "holds no synthetic-task runs" in str(bad.exception)
    assert "qkvlab analyze" in str(bad.exception)
