"""Every mistake a user can make raises one ConfigError that names the value and the fix."""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest
import torch
from safetensors.torch import save_file

from qkvlab import (
    GPT,
    ConfigError,
    EncoderConfig,
    GPTConfig,
    KVCache,
    SequenceEncoder,
    SetConfig,
    SetEncoder,
    ViT,
    ViTConfig,
    get_preset,
    load_into,
    load_model,
    parse_variant,
    save_model,
)
from qkvlab.attention import get_backend

SMALL = dict(n_layers=1, d_model=32, n_heads=4)


def expect_error(fn: Callable[[], object], *fragments: str) -> str:
    """Run ``fn``; it must raise ConfigError (a ValueError) whose one-line message holds every fragment."""
    with pytest.raises(ConfigError) as err:
        fn()
    assert isinstance(err.value, ValueError)
    message = str(err.value)
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return message


def tiny_gpt(variant: str = "q_k_v", **kw) -> GPT:
    return GPT(GPTConfig(vocab_size=64, max_seq_len=16, variant=variant, **{**SMALL, **kw})).eval()


def ids(B: int, T: int) -> torch.Tensor:
    return torch.randint(0, 64, (B, T))


# ---------------------------------------------------------------- variant strings


@pytest.mark.parametrize(
    "text, fragments",
    [
        ("bogus", ["'bogus'", "Write a variant as", "'Q-K=V'", "q_kv"]),
        ("q_kq", ["'q_kq'", "at most once"]),
        ("QKX", ["'QKX'", "Write a variant as"]),
        ("q_kv+gqa", ["'gqa'", "'q_kv+gqa'", "gqaN"]),
        ("q_kv+gqa0", ["'q_kv+gqa0'", "at least 1"]),
        ("q_kv+mqa+gqa4", ["'q_kv+mqa+gqa4'", "head sharing twice"]),
        ("q_kv+rope+learned", ["'q_kv+rope+learned'", "positional scheme twice"]),
        ("", ["''", "Write a variant as"]),
        ("   ", ["'   '", "Write a variant as"]),
        ("q_kv+foo", ["'foo'", "'q_kv+foo'", "modifiers: gqaN"]),
        ("q__kv", ["'q__kv'", "letters from q, k, v"]),
        ("Q=K=X", ["'Q=K=X'", "Write a variant as"]),
    ],
)
def test_bad_variant_strings(text, fragments):
    expect_error(lambda: parse_variant(text), *fragments)
    # The same message reaches a user who puts the string in a config.
    expect_error(lambda: GPTConfig(variant=text), *fragments)


def test_bad_variant_values():
    expect_error(lambda: parse_variant(None), "None", "Write a variant as")
    expect_error(lambda: parse_variant({"sharing": "q_kv", "heads": 2}), "['heads']")
    expect_error(
        lambda: parse_variant({"sharing": "q_kv", "pos": "alibi"}), "'alibi'", "use one of none, learned, rope"
    )
    expect_error(lambda: parse_variant({"sharing": "q_kv", "n_kv_heads": 0}), "got 0", "positive integer")


# ------------------------------------------------------------------ model shapes


def test_kv_heads_must_divide_heads():
    expect_error(
        lambda: GPTConfig(n_heads=8, variant="q_kv+gqa3"), "n_kv_heads=3", "n_heads=8", "choose one of [1, 2, 4, 8]"
    )


@pytest.mark.parametrize("variant, tied", [("qk_v+gqa4", "K"), ("qkv+mqa", "K/V"), ("qv_k+gqa2", "V")])
def test_query_sharing_cannot_group_heads(variant, tied):
    expect_error(
        lambda: GPTConfig(n_heads=8, variant=variant),
        f"'{variant}",
        f"ties the query with {tied}",
        "Use MHA (drop gqa/mqa)",
        "'q_kv'",
    )


def test_identity_role_needs_full_width_heads():
    expect_error(
        lambda: GPTConfig(d_model=64, n_heads=4, head_dim=8, variant="k_v"),
        "'k_v",
        "4 * 8 != 64",
        "Set head_dim=16",
    )


@pytest.mark.parametrize("variant", ["(Q=K-V)+", "(Q=K=V)+", "qk_v+2d"])
def test_2d_fix_needs_a_non_causal_model(variant):
    name = parse_variant(variant).paper_name
    expect_error(lambda: GPTConfig(variant=variant), f"'{name}'", "non-causal", "Drop '+2d'")


def test_other_config_values():
    expect_error(lambda: GPTConfig(recipe="gpt3"), "'gpt3'", "use one of gpt2, llama")
    expect_error(lambda: GPTConfig(n_heads=0), "n_heads", "got 0", "positive integer")
    expect_error(lambda: GPTConfig(d_model=30, n_heads=4), "d_model=30", "n_heads=4", "set head_dim")
    expect_error(lambda: GPTConfig(d_model=12, n_heads=4, variant="q_kv+rope"), "got 3", "use pos 'learned'")
    expect_error(lambda: GPTConfig.from_dict({"n_layer": 2}), "['n_layer']", "Known:")


# --------------------------------------------------------------- sequence lengths


def test_sequence_longer_than_the_model():
    model = tiny_gpt()
    expect_error(lambda: model(ids(1, 17)), "17 positions", "max_seq_len=16", "truncate the input")
    enc = SequenceEncoder(EncoderConfig(vocab_size=10, max_seq_len=8, **SMALL))
    expect_error(lambda: enc(torch.zeros(1, 9, dtype=torch.long)), "9 positions", "max_seq_len=8")


def test_sequence_longer_than_the_cache():
    model = tiny_gpt()
    cache = model.new_cache(1, 8)
    expect_error(lambda: model(ids(1, 10), cache=cache), "10 new", "max_len=8", "Allocate a longer cache")
    assert cache.length == 0  # nothing was consumed


def test_decode_past_the_end_of_the_cache():
    model = tiny_gpt()
    cache = model.new_cache(1, 8)
    model.prefill(ids(1, 6), cache)
    model.decode_one(torch.tensor([3]), cache)
    model.decode_one(torch.tensor([4]), cache)
    assert cache.length == 8
    expect_error(lambda: model.decode_one(torch.tensor([5]), cache), "8 positions used + 1 new", "max_len=8")


def test_cache_longer_than_the_model():
    model = tiny_gpt()
    expect_error(lambda: model.new_cache(1, 32), "max_len=32", "max_seq_len=16", "Use max_len <= max_seq_len")


def test_cache_of_another_dtype():
    model = tiny_gpt()
    cache = KVCache.for_model(model, 1, 8, dtype=torch.float64)
    expect_error(
        lambda: model(ids(1, 3), cache=cache),
        "torch.float64",
        "torch.float32",
        "allocate the cache with dtype=torch.float32",
    )


def test_cache_of_another_layout():
    qkv, shared = tiny_gpt("QKV"), tiny_gpt("Q-K=V")
    cache = shared.new_cache(1, 8)
    expect_error(lambda: qkv(ids(1, 3), cache=cache), "kv_shared=True", "kv_shared=False", "KVCache.for_model(model")
    gqa = tiny_gpt("q_kv+gqa2")
    expect_error(lambda: gqa(ids(1, 3), cache=cache), "n_kv_heads=4", "n_kv_heads=2")


def test_cache_of_another_batch_size():
    model = tiny_gpt()
    expect_error(lambda: model(ids(2, 3), cache=model.new_cache(1, 8)), "Batch of 2 rows", "allocated for 1")


def test_generate_past_max_seq_len():
    model = tiny_gpt()
    expect_error(
        lambda: model.generate(ids(1, 10), 7), "10 tokens + 7 new = 17", "max_seq_len=16", "generate fewer tokens"
    )
    model.generate(ids(1, 10), 6)  # exactly max_seq_len is fine


def test_generate_arguments():
    model = tiny_gpt()
    expect_error(lambda: model.generate(ids(1, 3), -1), "got -1", "max_new_tokens must be >= 0")
    expect_error(lambda: model.generate(ids(1, 3), 2, top_k=0), "top_k must be >= 1", "got 0")
    expect_error(lambda: model.generate(ids(1, 3), 2, temperature=-1.0), "temperature must be >= 0", "got -1")
    cache = model.new_cache(1, 8)
    model(ids(1, 2), cache=cache)
    expect_error(lambda: model.prefill(ids(1, 2), cache), "empty cache", "cache.reset()")


# ------------------------------------------------------------------- checkpoints


@pytest.fixture
def qkv_model():
    return tiny_gpt("QKV")


@pytest.fixture
def shared_checkpoint(tmp_path):
    path = tmp_path / "q_kv.safetensors"
    save_model(tiny_gpt("Q-K=V"), path)
    return path


def test_checkpoint_of_another_variant(qkv_model, shared_checkpoint):
    expect_error(
        lambda: load_into(qkv_model, shared_checkpoint),
        str(shared_checkpoint),
        "'q_kv+learned' (Q-K=V)",
        "'q_k_v+learned' (QKV)",
        "qkvlab.load_model(path)",
    )


def test_checkpoint_of_another_shape(tmp_path):
    path = tmp_path / "wide.safetensors"
    save_model(tiny_gpt(d_model=64), path)
    expect_error(
        lambda: load_into(tiny_gpt(), path), str(path), "d_model: checkpoint 64 vs model 32", "qkvlab.load_model(path)"
    )


def test_checkpoint_of_another_family(tmp_path):
    path = tmp_path / "enc.safetensors"
    save_model(SequenceEncoder(EncoderConfig(vocab_size=10, **SMALL)), path)
    expect_error(lambda: load_into(tiny_gpt(), path), str(path), "'encoder'", "'gpt'")


def test_missing_checkpoint(tmp_path, qkv_model):
    path = tmp_path / "nope.safetensors"
    expect_error(lambda: load_model(path), str(path), "No checkpoint file", "check the path")
    expect_error(lambda: load_into(qkv_model, path), str(path), "No checkpoint file")
    expect_error(lambda: load_model(tmp_path), str(tmp_path), "No checkpoint file")  # a folder


@pytest.mark.parametrize("size", [0, 5, 64, 4096])
def test_checkpoint_of_random_bytes(tmp_path, size):
    path = tmp_path / "random.safetensors"
    path.write_bytes(random.Random(size).randbytes(size))
    expect_error(lambda: load_model(path), str(path), "corrupt", "Re-save it with qkvlab.save_model")


@pytest.mark.parametrize("keep", [0.001, 0.01, 0.5, 0.999])
def test_truncated_checkpoint(tmp_path, shared_checkpoint, keep):
    data = shared_checkpoint.read_bytes()
    path = tmp_path / "truncated.safetensors"
    path.write_bytes(data[: max(1, int(len(data) * keep))])
    expect_error(lambda: load_model(path), str(path), "corrupt")
    expect_error(lambda: load_into(tiny_gpt("Q-K=V"), path), str(path), "corrupt")


def test_safetensors_file_without_qkvlab_metadata(tmp_path):
    path = tmp_path / "foreign.safetensors"
    save_file({"wte.weight": torch.zeros(64, 32)}, str(path))
    expect_error(lambda: load_model(path), str(path), "not a qkvlab checkpoint", "convert it")
    path2 = tmp_path / "other_meta.safetensors"
    save_file({"w": torch.zeros(2)}, str(path2), metadata={"format": "pt"})
    expect_error(lambda: load_into(tiny_gpt(), path2), str(path2), "not a qkvlab checkpoint")


# ------------------------------------------------------------- presets, backends


def test_unknown_preset():
    expect_error(lambda: get_preset("paper-3b"), "'paper-3b'", "available:", "paper-300m", "tiny")


def test_unknown_backend():
    expect_error(lambda: get_backend("flash"), "'flash'", "registered backends: reference, sdpa")
    expect_error(lambda: tiny_gpt(backend="flash"), "'flash'", "registered backends")


def test_unknown_backend_is_a_config_error():
    expect_error(lambda: GPTConfig(backend="flash"), "'flash'", "registered backends")


# ------------------------------------------------------------------ input shapes


@pytest.fixture
def vit():
    return ViT(ViTConfig(image_size=16, patch_size=4, channels=3, n_classes=7, **SMALL)).eval()


@pytest.mark.parametrize("shape", [(2, 1, 16, 16), (3, 16, 16), (2, 3, 32, 32), (2, 16, 16, 3)])
def test_vit_wrong_image_shape(vit, shape):
    expect_error(lambda: vit(torch.randn(shape)), str(shape), "(batch, 3, 16, 16)", "resize the images")


def test_vit_image_size_not_divisible_by_patch_size():
    expect_error(lambda: ViTConfig(image_size=30, patch_size=4), "image_size=30", "patch_size=4", "pick a patch size")


@pytest.mark.parametrize("shape", [(2, 3, 4), (5,)])
def test_sequence_encoder_wrong_shape(shape):
    enc = SequenceEncoder(EncoderConfig(vocab_size=10, max_seq_len=16, **SMALL))
    expect_error(lambda: enc(torch.zeros(shape, dtype=torch.long)), str(shape), "(batch, seq)")


def test_sequence_encoder_float_ids():
    enc = SequenceEncoder(EncoderConfig(vocab_size=10, max_seq_len=16, **SMALL))
    expect_error(lambda: enc(torch.zeros(2, 5)), "torch.float32", "integer")


@pytest.mark.parametrize("shape", [(1, 3, 1), (3,)])
def test_gpt_wrong_shape_or_dtype(shape):
    model = tiny_gpt()
    expect_error(lambda: model(torch.zeros(shape, dtype=torch.long)), str(shape), "(batch, seq)")
    expect_error(lambda: model(torch.zeros(1, 3)), "torch.float32", "integer dtype")


@pytest.mark.parametrize("shape", [(2, 10, 5), (10, 12), (2, 10, 12, 1)])
def test_set_encoder_wrong_shape(shape):
    enc = SetEncoder(SetConfig(in_features=12, **SMALL))
    expect_error(lambda: enc(torch.randn(shape)), str(shape), "(batch, set size, 12)")


def test_wrong_padding_mask():
    enc = SequenceEncoder(EncoderConfig(vocab_size=10, max_seq_len=16, **SMALL))
    x = torch.zeros(2, 5, dtype=torch.long)
    expect_error(lambda: enc(x, padding_mask=torch.ones(2, 4, dtype=torch.bool)), "(2, 4)", "(2, 5)", "True for real")
    expect_error(lambda: enc(x, padding_mask=torch.ones(5, dtype=torch.bool)), "(5,)", "(2, 5)")
    sets = SetEncoder(SetConfig(in_features=12, **SMALL))
    expect_error(lambda: sets(torch.randn(2, 10, 12), padding_mask=torch.ones(10, 2, dtype=torch.bool)), "(10, 2)")
    # with a cache the mask covers cached + new keys
    model = tiny_gpt()
    cache = model.new_cache(1, 8)
    model(ids(1, 3), cache=cache)
    expect_error(lambda: model(ids(1, 2), cache=cache, padding_mask=torch.ones(1, 2, dtype=torch.bool)), "(1, 5)")


@pytest.mark.parametrize(
    "variant, resolved",
    [
        ("q_kv+rope", "q_kv+rope"),
        ("q_kv+learned", "q_kv+learned"),
        ("(Q=K-V)+", "qk_v+none+2d"),
        ("qkv+2d", "qkv+none+2d"),
    ],
)
def test_set_encoder_with_positions(variant, resolved):
    expect_error(
        lambda: SetConfig(in_features=12, variant=variant, **SMALL),
        f"'{resolved}'",
        "permutation-equivariant",
        "Drop the positional scheme" if "2d" not in resolved else "allow_pos2d=true",
    )
    if "2d" not in resolved:  # the opt-in covers the 2D fix only
        expect_error(
            lambda: SetConfig(in_features=12, variant=variant, allow_pos2d=True, **SMALL), "Drop the positional"
        )
