"""Checkpoints: exact round trips, tied weights stored once, atomic writes, plain safetensors."""

from __future__ import annotations

import json
import struct

import pytest
import safetensors.torch
import torch
from safetensors import safe_open
from torch import nn

import qkvlab.checkpoint
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
    load_into,
    load_model,
    save_model,
)

SMALL = dict(n_layers=2, d_model=32, n_heads=4)
TINY = dict(vocab_size=64, max_seq_len=32, **SMALL)
GPT_VARIANTS = ["QKV", "Q-K=V", "Q=K-V", "Q=K=V", "q_kv+gqa2", "q_k_v+mqa", "k_v", "qv_k+qknorm"]


def randomise(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every parameter random values, so that biases, norms and the 2D fix are not at their init."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return model.eval()


def tiny_gpt(recipe: str, variant: str, seed: int = 0, **kw) -> GPT:
    return randomise(GPT(GPTConfig(recipe=recipe, variant=variant, **{**TINY, **kw})), seed)


def assert_same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


# ------------------------------------------------------------------- round trips


@pytest.mark.parametrize("variant", GPT_VARIANTS)
@pytest.mark.parametrize("recipe", ["gpt2", "llama"])
def test_gpt_round_trip_is_exact(tmp_path, recipe, variant):
    model = tiny_gpt(recipe, variant)
    path = save_model(model, tmp_path / "m.safetensors")
    loaded = load_model(path)
    assert type(loaded) is GPT
    assert loaded.config == model.config
    assert_same_state(model, loaded)
    idx = torch.randint(0, 64, (2, 12))
    assert torch.equal(loaded.eval()(idx), model(idx))
    # cached generation agrees too (greedy, so any weight difference would show)
    assert torch.equal(loaded.generate(idx[:, :4], 8), model.generate(idx[:, :4], 8))


@pytest.mark.parametrize("recipe, tied", [("gpt2", True), ("llama", False)])
def test_tied_embeddings_are_stored_once(tmp_path, recipe, tied):
    model = tiny_gpt(recipe, "Q-K=V")
    assert model.config.tie_embeddings is tied
    assert (model.lm_head.weight is model.wte.weight) is tied
    path = save_model(model, tmp_path / "m.safetensors")
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
        aliases = json.loads(f.metadata()["aliases"])
    assert "wte.weight" in keys
    if tied:
        assert "lm_head.weight" not in keys
        assert aliases == {"lm_head.weight": "wte.weight"}
        assert keys == set(model.state_dict()) - {"lm_head.weight"}
    else:
        assert "lm_head.weight" in keys
        assert aliases == {}
        assert keys == set(model.state_dict())
    # the (vocab, d_model) matrix is in the file once when tied, twice (distinct values) when not
    with safe_open(str(path), framework="pt") as f:
        big = [f.get_tensor(k) for k in sorted(keys) if f.get_slice(k).get_shape() == [64, 32]]
    assert len(big) == (1 if tied else 2)
    if not tied:
        assert not torch.equal(big[0], big[1])
    loaded = load_model(path)
    assert (loaded.lm_head.weight is loaded.wte.weight) is tied
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)
    assert torch.equal(loaded.wte.weight, model.wte.weight)


def test_tied_file_is_smaller_by_one_embedding(tmp_path):
    tied = save_model(tiny_gpt("gpt2", "QKV"), tmp_path / "tied.safetensors")
    untied = save_model(tiny_gpt("gpt2", "QKV", tie_embeddings=False), tmp_path / "untied.safetensors")
    emb_bytes = 64 * 32 * 4
    # the payloads differ by exactly one matrix, the headers a little (one more key vs the alias map)
    assert abs(untied.stat().st_size - tied.stat().st_size - emb_bytes) < 200


ENCODER_VARIANTS = ["QKV", "Q-K=V", "q_kv+gqa2", "qkv+none", "(Q=K-V)+", "(Q=K=V)+"]
FAMILIES = {
    "sequence": (
        lambda v: SequenceEncoder(EncoderConfig(vocab_size=10, n_labels=5, max_seq_len=16, variant=v, **SMALL)),
        lambda: torch.randint(0, 10, (2, 12)),
    ),
    "vit": (
        lambda v: ViT(ViTConfig(image_size=8, patch_size=4, channels=3, n_classes=7, variant=v, **SMALL)),
        lambda: torch.randn(2, 3, 8, 8),
    ),
    "set": (lambda v: SetEncoder(SetConfig(in_features=6, variant=v, **SMALL)), lambda: torch.randn(2, 9, 6)),
}
ENCODER_CASES = [
    (family, variant)
    for family in FAMILIES
    for variant in ENCODER_VARIANTS
    if not (family == "set" and variant.startswith("("))  # a set encoder takes no 2D positions
]


@pytest.mark.parametrize("family, variant", ENCODER_CASES)
def test_encoder_round_trip_is_exact(tmp_path, family, variant):
    build, inputs = FAMILIES[family]
    model = build(variant)
    randomise(model)
    path = save_model(model, tmp_path / "m.safetensors")
    loaded = load_model(path)
    assert type(loaded) is type(model)
    assert loaded.config == model.config
    assert_same_state(model, loaded)
    x = inputs()
    assert torch.equal(loaded.eval()(x), model(x))


# ------------------------------------------------------------------ load_into


@pytest.mark.parametrize("recipe", ["gpt2", "llama"])
def test_load_into_a_model_of_the_same_variant(tmp_path, recipe):
    source = tiny_gpt(recipe, "q_kv+gqa2", seed=1)
    target = tiny_gpt(recipe, "q_kv+gqa2", seed=2)
    idx = torch.randint(0, 64, (1, 10))
    assert not torch.equal(target(idx), source(idx))
    path = save_model(source, tmp_path / "m.safetensors")
    assert load_into(target, path) is target
    assert torch.equal(target(idx), source(idx))
    assert_same_state(source, target)
    if recipe == "gpt2":
        assert target.lm_head.weight is target.wte.weight


def test_load_into_accepts_the_paper_name_of_the_same_variant(tmp_path):
    path = save_model(tiny_gpt("gpt2", "Q-K=V"), tmp_path / "m.safetensors")
    load_into(tiny_gpt("gpt2", "kv_q", seed=3), path)  # same variant, another spelling


def test_load_into_refuses_untied_weights_for_a_tied_model(tmp_path):
    path = save_model(tiny_gpt("gpt2", "QKV", seed=1, tie_embeddings=False), tmp_path / "untied.safetensors")
    tied = tiny_gpt("gpt2", "QKV", seed=2)
    with pytest.raises(ConfigError, match="tie"):
        load_into(tied, path)


# ------------------------------------------------------------- file format


def test_file_is_plain_safetensors(tmp_path):
    model = tiny_gpt("llama", "Q-GQA-4", n_heads=8)
    extra = {"step": "123"}
    path = save_model(model, tmp_path / "m.safetensors", metadata=extra)
    data = path.read_bytes()
    # the safetensors layout: 8-byte little-endian header size, a JSON header, raw tensor bytes
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    meta = header.pop("__metadata__")
    assert meta["format"] == "qkvlab/1"
    assert meta["family"] == "gpt"
    assert meta["step"] == "123"
    assert json.loads(meta["config"])["variant"] == model.config.variant.to_dict()
    end = max(v["data_offsets"][1] for v in header.values())
    assert len(data) == 8 + n + end
    # every tensor reads back with the plain safetensors API, no qkvlab and no pickle involved
    state = model.state_dict()
    with safe_open(str(path), framework="pt") as f:
        assert set(f.keys()) == set(state)
        for k in sorted(state):
            assert torch.equal(f.get_tensor(k), state[k]), k
    plain = safetensors.torch.load_file(str(path))
    assert set(plain) == set(state)


def test_config_in_the_file_rebuilds_the_model(tmp_path):
    model = tiny_gpt("gpt2", "q_kv+mqa+rope", d_ff=48, dropout=0.1)
    path = save_model(model, tmp_path / "m.safetensors")
    cfg = qkvlab.checkpoint.checkpoint_config(path)
    assert cfg == model.config
    assert cfg.variant.id == "q_kv+mqa+rope"


@pytest.mark.parametrize("key", ["format", "config"])
def test_user_metadata_cannot_break_the_checkpoint(tmp_path, key):
    model = tiny_gpt("gpt2", "Q-K=V")
    path = tmp_path / "m.safetensors"
    try:
        save_model(model, path, metadata={key: "{}"})
    except ConfigError:
        return  # refusing the reserved key is a fix too
    idx = torch.randint(0, 64, (1, 8))
    assert torch.equal(load_model(path)(idx), model(idx))


def test_save_needs_a_qkvlab_model(tmp_path):
    with pytest.raises(ConfigError, match="Linear"):
        save_model(nn.Linear(2, 2), tmp_path / "m.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_save_creates_the_folder(tmp_path):
    path = save_model(tiny_gpt("gpt2", "QKV"), tmp_path / "a" / "b" / "m.safetensors")
    assert path.is_file()
    load_model(path)


# ----------------------------------------------------------------- atomicity


class Crash(Exception):
    pass


def _crashing_writer(calls: list[str], exc: type[BaseException]):
    real = safetensors.torch.save_file

    def writer(tensors, filename, metadata=None):
        calls.append(str(filename))
        real(tensors, filename, metadata=metadata)  # write the whole file ...
        with open(filename, "r+b") as f:  # ... then die halfway through, leaving half of it
            f.truncate(f.seek(0, 2) // 2)
        raise exc("killed while writing")

    return writer


@pytest.mark.parametrize("exc", [Crash, OSError, KeyboardInterrupt])
def test_failed_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch, exc):
    path = tmp_path / "m.safetensors"
    old = tiny_gpt("gpt2", "Q-K=V", seed=1)
    save_model(old, path)
    before = path.read_bytes()

    calls: list[str] = []
    writer = _crashing_writer(calls, exc)
    monkeypatch.setattr(safetensors.torch, "save_file", writer)
    monkeypatch.setattr(qkvlab.checkpoint, "save_file", writer, raising=False)
    with pytest.raises(exc, match="killed while writing"):
        save_model(tiny_gpt("gpt2", "Q-K=V", seed=2), path)

    assert len(calls) == 1 and calls[0] != str(path)  # it wrote to a temporary file, not the target
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]  # no temp file left behind
    monkeypatch.undo()
    idx = torch.randint(0, 64, (1, 8))
    assert torch.equal(load_model(path)(idx), old(idx))


def test_failed_first_write_leaves_nothing(tmp_path, monkeypatch):
    calls: list[str] = []
    writer = _crashing_writer(calls, Crash)
    monkeypatch.setattr(safetensors.torch, "save_file", writer)
    monkeypatch.setattr(qkvlab.checkpoint, "save_file", writer, raising=False)
    with pytest.raises(Crash):
        save_model(tiny_gpt("gpt2", "QKV"), tmp_path / "m.safetensors")
    assert len(calls) == 1
    assert list(tmp_path.iterdir()) == []


def test_overwrite_replaces_the_file(tmp_path):
    path = tmp_path / "m.safetensors"
    a, b = tiny_gpt("gpt2", "QKV", seed=1), tiny_gpt("gpt2", "QKV", seed=2)
    save_model(a, path)
    save_model(b, path)
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]
    assert_same_state(load_model(path), b)


@pytest.mark.parametrize(
    ("damage", "fragment"),
    [
        (lambda t: t.index_fill_(0, torch.tensor([0]), float("nan")), "NaN or infinite value"),
        (lambda t: t.index_fill_(0, torch.tensor([1]), float("inf")), "NaN or infinite value"),
        (lambda t: t.to(torch.int32), "not as floating-point weights"),
    ],
    ids=["nan", "inf", "int32"],
)
def test_weights_that_are_not_finite_floats_are_refused(tmp_path, damage, fragment):
    path = save_model(GPT(GPTConfig(n_layers=1, d_model=16, n_heads=2, vocab_size=32, max_seq_len=8)), tmp_path / "m")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
    name = next(k for k in tensors if k.endswith("wte.weight"))
    tensors[name] = damage(tensors[name].clone())
    safetensors.torch.save_file(tensors, str(path), metadata=meta)
    with pytest.raises(ConfigError) as err:
        load_model(path)
    assert fragment in str(err.value) and name in str(err.value) and "\n" not in str(err.value)
