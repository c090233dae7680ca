"""The variant spec: our ids, the paper's notation, canonical forms, properties, validation."""

from __future__ import annotations

import pytest

from qkvlab import ConfigError, GPTConfig, VariantSpec, parse_variant
from qkvlab.attention import PAPER_LM_VARIANTS

# --------------------------------------------------------------------- our ids


@pytest.mark.parametrize(
    "text, sharing, n_kv_heads, pos, pos2d, qk_norm",
    [
        ("q_k_v", "q_k_v", None, None, False, False),
        ("q_kv", "q_kv", None, None, False, False),
        ("qk_v", "qk_v", None, None, False, False),
        ("qkv", "qkv", None, None, False, False),
        ("qv_k", "qv_k", None, None, False, False),
        ("k_v", "k_v", None, None, False, False),
        ("q_kv+gqa4", "q_kv", 4, None, False, False),
        ("q_kv+gqa-4", "q_kv", 4, None, False, False),
        ("q_kv+kv2", "q_kv", 2, None, False, False),
        ("q_k_v+mqa", "q_k_v", 1, None, False, False),
        ("q_kv+gqa1", "q_kv", 1, None, False, False),
        ("q_kv+mha", "q_kv", None, None, False, False),
        ("q_kv+none", "q_kv", None, "none", False, False),
        ("q_kv+learned", "q_kv", None, "learned", False, False),
        ("q_kv+rope", "q_kv", None, "rope", False, False),
        ("qk_v+2d", "qk_v", None, None, True, False),
        ("qk_v+pos2d", "qk_v", None, None, True, False),
        ("q_kv+qknorm", "q_kv", None, None, False, True),
        ("q_kv+qk-norm", "q_kv", None, None, False, True),
        ("q_kv+gqa4+rope+qknorm", "q_kv", 4, "rope", False, True),
        # modifiers in any order and any case, blanks ignored
        ("q_kv+QKNORM+Rope+GQA4", "q_kv", 4, "rope", False, True),
        (" q_kv + mqa ", "q_kv", 1, None, False, False),
        ("qkv+none+2d+qknorm", "qkv", None, "none", True, True),
        # roles in any order inside a group, groups in any order
        ("kv_q", "q_kv", None, None, False, False),
        ("vk_q", "q_kv", None, None, False, False),
        ("v_kq", "qk_v", None, None, False, False),
        ("vkq", "qkv", None, None, False, False),
        ("k_vq", "qv_k", None, None, False, False),
        ("v_k_q", "q_k_v", None, None, False, False),
        ("v_k", "k_v", None, None, False, False),
    ],
)
def test_parse_our_ids(text, sharing, n_kv_heads, pos, pos2d, qk_norm):
    spec = parse_variant(text)
    assert (spec.sharing, spec.n_kv_heads, spec.pos, spec.pos2d, spec.qk_norm) == (
        sharing,
        n_kv_heads,
        pos,
        pos2d,
        qk_norm,
    )
    assert spec == VariantSpec(sharing, n_kv_heads, pos, pos2d, qk_norm)


@pytest.mark.parametrize(
    "a, b",
    [
        ("kv_q", "q_kv"),
        ("q_vk", "q_kv"),
        ("kq_v", "qk_v"),
        ("k_v_q", "q_k_v"),
        ("q_kv+rope+gqa2", "q_kv+gqa2+rope"),
        ("q_kv+mha", "q_kv"),
    ],
)
def test_canonical_forms_are_equal(a, b):
    sa, sb = parse_variant(a), parse_variant(b)
    assert sa == sb
    assert hash(sa) == hash(sb)
    assert sa.id == sb.id == b


def test_constructor_canonicalises_sharing():
    assert VariantSpec("kv_q") == VariantSpec("q_kv")
    assert VariantSpec("kv_q").sharing == "q_kv"
    assert VariantSpec("KQ_V").sharing == "qk_v"
    assert {VariantSpec("kv_q"), VariantSpec("q_kv"), VariantSpec("q_vk")} == {VariantSpec("q_kv")}


def test_parse_accepts_spec_and_dict():
    spec = VariantSpec("q_kv", 2, "rope", False, True)
    assert parse_variant(spec) is spec
    assert parse_variant(spec.to_dict()) == spec
    assert parse_variant({"sharing": "kv_q", "n_kv_heads": 2}) == VariantSpec("q_kv", 2)
    assert VariantSpec.parse("q_kv+mqa") == parse_variant("q_kv+mqa")


def test_upper_case_qkv_is_the_baseline_but_our_lower_case_qkv_is_one_projection():
    # The paper's "QKV" is three projections; our id "qkv" is one group (Q=K=V).
    assert parse_variant("QKV").sharing == "q_k_v"
    assert parse_variant("qkv").sharing == "qkv"
    assert parse_variant("Q=K=V") == parse_variant("qkv")


# -------------------------------------------------------------- paper notation

PAPER = [
    # (paper notation, sharing, n_kv_heads, pos2d)
    ("QKV", "q_k_v", None, False),
    ("Q-K=V", "q_kv", None, False),
    ("Q=K-V", "qk_v", None, False),
    ("Q=K=V", "qkv", None, False),
    ("Q=V-K", "qv_k", None, False),
    ("K-V", "k_v", None, False),
    ("GQA-4", "q_k_v", 4, False),
    ("GQA-8", "q_k_v", 8, False),
    ("MQA", "q_k_v", 1, False),
    ("Q-GQA-4", "q_kv", 4, False),
    ("Q-GQA-8", "q_kv", 8, False),
    ("Q-MQA", "q_kv", 1, False),
    ("(Q=K-V)+", "qk_v", None, True),
    ("(Q=K=V)+", "qkv", None, True),
]


@pytest.mark.parametrize("text, sharing, n_kv_heads, pos2d", PAPER)
def test_parse_paper_notation(text, sharing, n_kv_heads, pos2d):
    spec = parse_variant(text)
    assert spec == VariantSpec(sharing, n_kv_heads, None, pos2d, False)
    assert spec.paper_name == text  # prints back exactly


def test_paper_lm_variants_are_the_papers_table_4():
    assert [parse_variant(v).paper_name for v in PAPER_LM_VARIANTS] == [
        "QKV",
        "Q-K=V",
        "Q=K-V",
        "Q=K=V",
        "GQA-4",
        "MQA",
        "Q-GQA-4",
        "Q-MQA",
    ]
    assert [parse_variant(v).id for v in PAPER_LM_VARIANTS] == [
        "q_k_v",
        "q_kv",
        "qk_v",
        "qkv",
        "q_k_v+gqa4",
        "q_k_v+mqa",
        "q_kv+gqa4",
        "q_kv+mqa",
    ]


@pytest.mark.parametrize(
    "text, canonical",
    [
        # unicode forms the paper uses
        ("(Q=K-V)⁺", "(Q=K-V)+"),
        ("(Q=K=V)⁺", "(Q=K=V)+"),
        ("Q≠K=V", "Q-K=V"),
        ("Q=K≠V", "Q=K-V"),
        ("(Q=K≠V)⁺", "(Q=K-V)+"),
        ("Q≠K≠V", "QKV"),
        # spelling variants
        ("Q-K-V", "QKV"),
        ("Q - K = V", "Q-K=V"),
        ("K=V-Q", "Q-K=V"),
        ("V-K=Q", "Q=K-V"),
        ("gqa-4", "GQA-4"),
        ("GQA4", "GQA-4"),
        ("mqa", "MQA"),
        ("MHA", "QKV"),
        ("Q-GQA4", "Q-GQA-4"),
        ("q-mqa", "Q-MQA"),
        ("Q-K=V+MQA", "Q-MQA"),
        ("Q-K=V+GQA-4", "Q-GQA-4"),
        ("QKV+GQA-4", "GQA-4"),
        ("Q=K-V+2d", "(Q=K-V)+"),
        ("qk_v+2d", "(Q=K-V)+"),
    ],
)
def test_paper_notation_spellings(text, canonical):
    assert parse_variant(text) == parse_variant(canonical)
    assert parse_variant(text).paper_name == canonical


def test_paper_notation_with_our_modifiers():
    assert parse_variant("Q-K=V+rope+qknorm") == VariantSpec("q_kv", None, "rope", False, True)
    assert parse_variant("Q-GQA-4+learned") == VariantSpec("q_kv", 4, "learned")
    assert parse_variant("(Q=K-V)+rope") == VariantSpec("qk_v", None, "rope", True)
    assert parse_variant("(Q=K-V)++rope") == VariantSpec("qk_v", None, "rope", True)
    assert parse_variant("(Q=K=V)⁺+none") == VariantSpec("qkv", None, "none", True)


def test_paper_name_of_head_sharing_on_other_sharings():
    assert VariantSpec("k_v", 2).paper_name == "K-V+GQA-2"
    assert VariantSpec("q_kv", 4, pos2d=True).paper_name == "(Q-GQA-4)+"
    assert VariantSpec("q_k_v", 1, pos2d=True).paper_name == "(MQA)+"
    # pos and qk_norm are not part of the paper's notation
    assert VariantSpec("q_kv", 4, "rope", False, True).paper_name == "Q-GQA-4"


# ------------------------------------------------------------------ round trips

ROUND_TRIP = [
    VariantSpec(sharing, heads, pos, pos2d, qk_norm, linear)
    for sharing in ("q_k_v", "q_kv", "qk_v", "qkv", "qv_k", "k_v")
    for heads in (None, 1, 2, 4)
    for pos in (None, "none", "learned", "rope")
    for pos2d in (False, True)
    for qk_norm in (False, True)
    for linear in (False, True)
    # valid head sharing only (checked by validate below); 2d with GQA is covered separately
    if heads is None or sharing in ("q_k_v", "q_kv", "k_v")
    if not (pos2d and heads is not None and sharing == "k_v")
    # linear attention takes neither RoPE nor the 2D fix
    if not (linear and (pos == "rope" or pos2d))
]


@pytest.mark.parametrize("spec", ROUND_TRIP, ids=str)
def test_id_round_trip(spec):
    spec.validate(n_heads=8, head_dim=8, d_model=64, causal=False)
    assert parse_variant(spec.id) == spec
    assert parse_variant(spec.id).id == spec.id
    assert parse_variant(str(spec)) == spec


@pytest.mark.parametrize("spec", ROUND_TRIP, ids=str)
def test_paper_name_round_trip(spec):
    # The paper's notation carries sharing, head sharing and the 2D fix, not pos / QK-norm.
    back = parse_variant(spec.paper_name)
    assert back == spec.replace(pos=None, qk_norm=False)
    assert back.paper_name == spec.paper_name


@pytest.mark.parametrize("spec", [VariantSpec("k_v", 2, pos2d=True), VariantSpec("kv", 1, pos2d=True)], ids=str)
def test_paper_name_round_trip_with_head_sharing_inside_the_2d_fix(spec):
    spec.validate(n_heads=8, head_dim=8, d_model=64, causal=False)  # a valid encoder variant
    assert parse_variant(spec.paper_name) == spec


# ------------------------------------------------------------------ properties

PROPERTIES = [
    # sharing, kv_shared, qk_shared, cached_tensors, identity_roles, groups
    ("q_k_v", False, False, 2, (), ("q", "k", "v")),
    ("q_kv", True, False, 1, (), ("q", "kv")),
    ("qk_v", False, True, 2, (), ("qk", "v")),
    ("qkv", True, True, 1, (), ("qkv",)),
    ("qv_k", False, False, 2, (), ("qv", "k")),
    ("k_v", False, False, 2, ("q",), ("k", "v")),
    ("kv", True, False, 1, ("q",), ("kv",)),  # Q = x, one K=V projection
    ("q", True, False, 1, ("k", "v"), ("q",)),  # K = V = x: the input is cached once
    ("v", False, True, 2, ("q", "k"), ("v",)),  # Q = K = x: symmetric scores
]


@pytest.mark.parametrize("sharing, kv_shared, qk_shared, cached, identity, groups", PROPERTIES)
def test_properties(sharing, kv_shared, qk_shared, cached, identity, groups):
    spec = VariantSpec(sharing)
    assert spec.kv_shared is kv_shared
    assert spec.qk_shared is qk_shared
    assert spec.cached_tensors == cached
    assert spec.identity_roles == identity
    assert spec.groups == groups
    for role in "qkv":
        src = spec.source(role)
        if role in identity:
            assert src == "x"
        else:
            assert role in src and src in groups


@pytest.mark.parametrize("heads, expected", [(None, 8), (8, 8), (4, 4), (1, 1)])
def test_kv_heads(heads, expected):
    assert VariantSpec("q_kv", heads).kv_heads(8) == expected


def test_properties_do_not_depend_on_head_sharing_or_positions():
    base = VariantSpec("q_kv")
    other = VariantSpec("q_kv", 2, "rope", False, True)
    assert (base.kv_shared, base.qk_shared, base.cached_tensors, base.identity_roles) == (
        other.kv_shared,
        other.qk_shared,
        other.cached_tensors,
        other.identity_roles,
    )


def test_spec_is_immutable_and_replace_returns_a_new_spec():
    spec = VariantSpec("q_kv")
    with pytest.raises(AttributeError):
        spec.n_kv_heads = 2  # type: ignore[misc]
    other = spec.replace(n_kv_heads=2, sharing="kv_q")
    assert other == VariantSpec("q_kv", 2)
    assert spec.n_kv_heads is None


def test_to_dict():
    assert VariantSpec("kv_q", 2, "rope", True, True).to_dict() == {
        "sharing": "q_kv",
        "n_kv_heads": 2,
        "pos": "rope",
        "pos2d": True,
        "qk_norm": True,
        "linear": False,
    }
    assert VariantSpec.parse(VariantSpec("qkv", linear=True).to_dict()) == VariantSpec("qkv", linear=True)
    # A dict written before linear attention existed still parses (as softmax).
    old = {"sharing": "q_kv", "n_kv_heads": None, "pos": "learned", "pos2d": False, "qk_norm": False}
    assert VariantSpec.parse(old) == VariantSpec("q_kv", pos="learned")


# ------------------------------------------------------------------- validate

SHAPE = dict(n_heads=8, head_dim=8, d_model=64)


@pytest.mark.parametrize(
    "spec, causal",
    [
        (VariantSpec("q_k_v"), True),
        (VariantSpec("q_kv", 4), True),
        (VariantSpec("q_kv", 1), True),
        (VariantSpec("q_k_v", 2), True),
        (VariantSpec("qk_v", 8), True),  # n_kv_heads == n_heads is MHA, allowed for Q=K
        (VariantSpec("qkv"), True),
        (VariantSpec("k_v", 2), True),  # identity query, grouped K and V
        (VariantSpec("kv", 1), True),
        (VariantSpec("qk_v", pos2d=True), False),
        (VariantSpec("qkv", pos2d=True), False),
        (VariantSpec("q_kv", 2, pos2d=True), False),
    ],
    ids=lambda x: str(x) if isinstance(x, VariantSpec) else ("causal" if x else "bidirectional"),
)
def test_validate_accepts(spec, causal):
    spec.validate(causal=causal, **SHAPE)  # does not raise


@pytest.mark.parametrize(
    "spec, shape, causal, fragments",
    [
        (VariantSpec("q_kv", 3), SHAPE, True, ["n_kv_heads=3", "n_heads=8", "[1, 2, 4, 8]"]),
        (VariantSpec("q_kv", 16), SHAPE, True, ["n_kv_heads=16", "n_heads=8"]),
        (VariantSpec("qk_v", 4), SHAPE, True, ["'qk_v+gqa4'", "n_kv_heads=4", "Use MHA"]),
        (VariantSpec("qkv", 1), SHAPE, True, ["'qkv+mqa'", "K/V", "Use MHA"]),
        (VariantSpec("qv_k", 2), SHAPE, True, ["'qv_k+gqa2'", "with V", "Use MHA"]),
        (VariantSpec("q", 2), SHAPE, True, ["'q+gqa2'", "identity", "Use MHA"]),
        (VariantSpec("k_v"), dict(n_heads=4, head_dim=8, d_model=64), True, ["4 * 8 != 64", "head_dim=16"]),
        (VariantSpec("qk_v", pos2d=True), SHAPE, True, ["(Q=K-V)+", "non-causal", "Drop"]),
        (VariantSpec("qkv", pos2d=True), SHAPE, True, ["(Q=K=V)+", "non-causal"]),
    ],
    ids=lambda x: str(x) if isinstance(x, VariantSpec) else "-",
)
def test_validate_rejects(spec, shape, causal, fragments):
    with pytest.raises(ConfigError) as err:
        spec.validate(causal=causal, **shape)
    for fragment in fragments:
        assert fragment in str(err.value)


def test_config_resolves_the_variant():
    with pytest.warns(UserWarning, match="MHA"):
        cfg = GPTConfig(n_heads=4, variant="Q-GQA-4")  # 4 KV heads of 4 query heads is MHA
    assert cfg.variant == VariantSpec("q_kv", None, "learned")
    assert GPTConfig(n_heads=4, variant="kv_q+mqa", recipe="llama").variant == VariantSpec("q_kv", 1, "rope")
    # a positional scheme named in the variant wins over the recipe's
    assert GPTConfig(variant="q_kv+none", recipe="llama").variant.pos == "none"
    assert GPTConfig(variant=VariantSpec("qkv")).variant == VariantSpec("qkv", pos="learned")
    from_dict = GPTConfig(variant={"sharing": "qk_v", "qk_norm": True}).variant
    assert from_dict == VariantSpec("qk_v", None, "learned", False, True)


# ------------------------------------------------------------- linear attention


@pytest.mark.parametrize(
    "text, expected, paper_name",
    [
        ("qkv+linear", VariantSpec("qkv", linear=True), "Q=K=V (linear)"),
        ("Q=K=V+linear", VariantSpec("qkv", linear=True), "Q=K=V (linear)"),
        ("Q=K=V (linear)", VariantSpec("qkv", linear=True), "Q=K=V (linear)"),
        ("Q=K=V(LINEAR)", VariantSpec("qkv", linear=True), "Q=K=V (linear)"),
        ("QKV+linear", VariantSpec("q_k_v", linear=True), "QKV (linear)"),
        ("QKV (linear)", VariantSpec("q_k_v", linear=True), "QKV (linear)"),
        ("Q-GQA-4 (linear)", VariantSpec("q_kv", 4, linear=True), "Q-GQA-4 (linear)"),
        ("q_kv+linear+gqa4+learned", VariantSpec("q_kv", 4, "learned", linear=True), "Q-GQA-4 (linear)"),
        ("Q=K-V+none+qknorm+linear", VariantSpec("qk_v", None, "none", False, True, True), "Q=K-V (linear)"),
        ("q_kv+softmax", VariantSpec("q_kv"), "Q-K=V"),
        ("Q-K=V (softmax)", VariantSpec("q_kv"), "Q-K=V"),
    ],
)
def test_parse_linear_attention(text, expected, paper_name):
    spec = parse_variant(text)
    assert spec == expected
    assert spec.paper_name == paper_name
    assert parse_variant(spec.id) == spec
    assert parse_variant(paper_name) == spec.replace(pos=None, qk_norm=False)


def test_linear_id_is_a_suffix_and_softmax_ids_are_unchanged():
    assert VariantSpec("qkv", linear=True).id == "qkv+linear"
    assert VariantSpec("q_kv", 2, "none", False, True, True).id == "q_kv+gqa2+none+qknorm+linear"
    assert [parse_variant(v).id for v in PAPER_LM_VARIANTS][:2] == ["q_k_v", "q_kv"]  # no '+softmax' added
    assert parse_variant("qkv+linear") != parse_variant("qkv")
    assert not parse_variant("Q=K=V").linear


@pytest.mark.parametrize(
    "text, fragments",
    [
        ("qkv+rope+linear", ["RoPE", "'+learned'", "'+none'"]),
        ("(Q=K=V)+linear", ["2D positional fix", "Drop '+2d'"]),
        ("qk_v+2d+linear", ["2D positional fix"]),
        ("qkv+linear+linear", ["twice"]),
        ("qkv+softmax+linear", ["twice"]),
        ("qkv+lineer", ["'lineer'", "linear"]),
    ],
)
def test_linear_attention_rejects(text, fragments):
    with pytest.raises(ConfigError) as err:
        parse_variant(text)
    for fragment in fragments:
        assert fragment in str(err.value)


def test_config_with_linear_attention_and_the_llama_recipe():
    with pytest.raises(ConfigError, match="RoPE"):
        GPTConfig(variant="Q=K=V+linear", recipe="llama")  # llama's default positions are RoPE
    assert GPTConfig(variant="Q=K=V+linear+none", recipe="llama").variant == VariantSpec(
        "qkv", None, "none", linear=True
    )
    cfg = GPTConfig(variant="QKV+linear", linear_feature="relu", linear_decay=0.9)
    assert cfg.variant == VariantSpec("q_k_v", None, "learned", linear=True)
    assert GPTConfig.from_dict(cfg.to_dict()) == cfg  # plain data, round trip
