"""transformers / GGUF interop and conversion: import, export, the native K=V class, convert.

Every model is a tiny random one built here; nothing comes from a hub.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from qkvlab import GPT, ConfigError, GPTConfig, load_model, save_model  # noqa: E402
from qkvlab.cli import app  # noqa: E402
from qkvlab.data import get_tokenizer  # noqa: E402
from qkvlab.data.tokenizers import EOT_TEXT, train_bpe  # noqa: E402
from qkvlab.interop.convert import attention_input_moments, convert_model, target_config  # noqa: E402
from qkvlab.interop.gguf_import import permute_rope_rows  # noqa: E402
from qkvlab.interop.hf_export import export_hf  # noqa: E402
from qkvlab.interop.hf_import import import_model  # noqa: E402
from qkvlab.interop.layout import proj  # noqa: E402
from qkvlab.interop.tokenizer import bpe_from_files  # noqa: E402

VOCAB = 300
TEXT = "The capital of France is Paris. Numbers 12345 and 'quotes' don't break; naïve café!\n\tdef f(x): return x"
SHAPE = dict(n_layers=2, d_model=32, n_heads=4, max_seq_len=64)


def randomise(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random values everywhere (biases and norms too), large enough that logits differ by token."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return model.eval()


def tokens(n: int = 2, t: int = 24, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, t), generator=torch.Generator().manual_seed(seed))


def assert_close(a: torch.Tensor, b: torch.Tensor) -> None:
    a, b = a.detach(), b.detach()
    assert (a - b).abs().max() <= 1e-5 * max(1.0, float(b.abs().max())), float((a - b).abs().max())


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    """A small trained byte-level BPE, as a run keeps it in tokenizer/ (vocab.json + merges.txt)."""
    root = tmp_path_factory.mktemp("bpe")
    docs = [TEXT * 3, "def main():\n    print('hello world')\n" * 20, "Paris is the capital of France. " * 30]
    tok = train_bpe(docs, VOCAB, cache_dir=root)
    folder = root / "tokenizer"
    folder.mkdir()
    for f in tok.files:
        (folder / f.name).write_bytes(f.read_bytes())
    return folder


def make_run(root, model: GPT, bpe_folder=None, tokenizer: str | None = None):
    """A run folder: model.safetensors (+ the run's tokenizer/ or a recorded tokenizer name)."""
    root.mkdir(parents=True)
    meta = {"train_config": json.dumps({"data": {"tokenizer": tokenizer}})} if tokenizer else None
    save_model(model, root / "model.safetensors", metadata=meta)
    if bpe_folder is not None:
        (root / "tokenizer").mkdir()
        for f in bpe_folder.iterdir():
            (root / "tokenizer" / f.name).write_bytes(f.read_bytes())
    return root


def tiny_gpt(recipe: str, variant: str, seed: int = 0, **kw) -> GPT:
    return randomise(GPT(GPTConfig(recipe=recipe, variant=variant, vocab_size=VOCAB, **{**SHAPE, **kw})), seed)


# --------------------------------------------------------------------------- export
@pytest.mark.parametrize(
    "recipe, variant, arch, cls",
    [
        ("llama", "QKV", "auto", "LlamaForCausalLM"),
        ("llama", "GQA-2", "auto", "LlamaForCausalLM"),
        ("llama", "MQA", "stock", "LlamaForCausalLM"),
        ("gpt2", "QKV", "auto", "GPT2LMHeadModel"),
        ("llama", "Q-K=V", "stock", "LlamaForCausalLM"),  # expanded: k_proj = v_proj = W_kv
        ("gpt2", "Q-GQA-2", "stock", "GPT2LMHeadModel"),  # expanded and heads repeated
        ("llama", "Q-GQA-2", "auto", "QkvlabForCausalLM"),
        ("gpt2", "Q=K-V", "auto", "GPT2LMHeadModel"),
    ],
)
def test_export_loads_in_transformers_with_the_same_logits(tmp_path, bpe, recipe, variant, arch, cls):
    model = tiny_gpt(recipe, variant, tie_embeddings=recipe == "gpt2")
    run = make_run(tmp_path / "run", model, bpe)
    report = export_hf(run, tmp_path / "out", arch=arch)
    if cls == "QkvlabForCausalLM":
        import qkvlab.hf  # noqa: F401  (registers model_type "qkvlab" with the Auto classes)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(hf).__name__ == cls == report["class"]
    idx = tokens()
    with torch.no_grad():
        assert_close(hf(idx).logits, model(idx))
    expanded = cls != "QkvlabForCausalLM" and model.config.variant.kv_shared
    assert report["cached_tensors_per_layer"] == (2 if cls != "QkvlabForCausalLM" else 1)
    assert any("expanded" in n for n in report["notes"]) == (expanded or variant == "Q=K-V")


def test_export_tokenizer_round_trips(tmp_path, bpe):
    run = make_run(tmp_path / "run", tiny_gpt("llama", "QKV"), bpe)
    export_hf(run, tmp_path / "out")
    hf_tok = AutoTokenizer.from_pretrained(tmp_path / "out")
    ours = get_tokenizer(f"bpe:{run / 'tokenizer'}")
    ids = hf_tok(TEXT)["input_ids"]
    assert ids == ours.encode(TEXT)
    assert hf_tok.decode(ids) == TEXT
    assert hf_tok.eos_token == EOT_TEXT and hf_tok.eos_token_id == ours.eot_id
    gen = json.loads((tmp_path / "out" / "generation_config.json").read_text())
    assert gen["eos_token_id"] == ours.eot_id


@pytest.mark.parametrize("name", ["byte", "gpt2"])
def test_export_writes_a_named_tokenizer(tmp_path, name):
    if name == "gpt2":
        from qkvlab.data.tokenizers import find_gpt2_files

        try:
            find_gpt2_files()
        except ConfigError:
            pytest.skip("GPT-2 BPE files not staged")
    vocab = 257 if name == "byte" else 50257
    model = GPT(GPTConfig(recipe="llama", vocab_size=vocab, **SHAPE)).eval()
    run = make_run(tmp_path / "run", model, tokenizer=name)
    export_hf(run, tmp_path / "out")
    hf_tok = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert hf_tok(TEXT)["input_ids"] == get_tokenizer(name).encode(TEXT)


def test_export_refuses_what_no_stock_class_computes(tmp_path, bpe):
    run = make_run(tmp_path / "run", tiny_gpt("llama", "q_kv+qknorm"), bpe)
    with pytest.raises(ConfigError, match=r"QK-norm.*--arch native"):
        export_hf(run, tmp_path / "out", arch="stock")
    export_hf(run, tmp_path / "out")  # auto: native holds it
    with pytest.raises(ConfigError, match="already exists; pass --force"):
        export_hf(run, tmp_path / "out")
    export_hf(run, tmp_path / "out", force=True)


# --------------------------------------------------------------------------- native K=V class
def test_native_kv_class_generates_like_qkvlab_with_half_the_cache(tmp_path, bpe):
    import qkvlab.hf as qhf

    model = tiny_gpt("llama", "Q-GQA-2")
    run = make_run(tmp_path / "run", model, bpe)
    export_hf(run, tmp_path / "native", arch="native")
    export_hf(run, tmp_path / "stock", arch="stock")
    native = AutoModelForCausalLM.from_pretrained(tmp_path / "native").eval()
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "stock").eval()
    assert isinstance(native, qhf.QkvlabForCausalLM)
    prompt, new = tokens(2, 8), 16
    ours = model.generate(prompt, new, cuda_graph=False)
    kw = dict(max_new_tokens=new, do_sample=False, return_dict_in_generate=True, attention_mask=torch.ones_like(prompt))
    out_native = native.generate(prompt, **kw)
    out_stock = stock.generate(prompt, **kw)
    assert torch.equal(out_native.sequences, ours)
    assert torch.equal(out_stock.sequences, ours)
    cache_n, cache_s = out_native.cache, out_stock.cache
    L, B, T, H, D = 2, 2, 8 + new - 1, 2, 8  # the last token is never fed back, so T = prompt + new - 1
    assert all(isinstance(layer, qhf.SharedKVLayer) for layer in cache_n.layers)
    assert qhf.cache_tensor_count(cache_n) == L and qhf.cache_tensor_count(cache_s) == 2 * L
    assert qhf.cache_nbytes(cache_n) == L * B * H * T * D * 4
    assert qhf.cache_nbytes(cache_s) == 2 * qhf.cache_nbytes(cache_n)


@pytest.mark.parametrize(
    "recipe, variant", [("gpt2", "QKV"), ("llama", "Q-K=V"), ("llama", "q_kv+qknorm+gqa2"), ("gpt2", "Q=K-V")]
)
def test_native_class_caches_what_qkvlab_caches(recipe, variant):
    import qkvlab.hf as qhf

    model = tiny_gpt(recipe, variant)
    hf = qhf.QkvlabForCausalLM(qhf.QkvlabConfig(qkvlab=model.config.to_dict())).eval()
    hf.model.load_state_dict(model.state_dict())
    prompt = tokens(1, 6)
    with torch.no_grad():
        assert_close(hf(prompt).logits, model(prompt))
        step = hf(prompt[:, :4], use_cache=True)  # prefill, then two cached steps
        more = hf(prompt[:, 4:], cache=step.cache)
        ours = model.new_cache(1, 6)
        model(prompt, cache=ours)
    assert_close(more.logits, model(prompt)[:, 4:])
    # The same tensors as qkvlab's own cache: for K=V the raw shared projection (before RoPE), once.
    for theirs, own in zip(more.cache.layers, ours.layers, strict=True):
        assert theirs.get_seq_length() == 6
        assert torch.allclose(theirs.keys, own.k, atol=1e-6) and torch.allclose(theirs.values, own.v, atol=1e-6)
        assert (theirs.keys is theirs.values) == model.config.variant.kv_shared
    assert qhf.cache_tensor_count(more.cache) == ours.n_tensors
    assert qhf.cache_nbytes(more.cache) == ours.nbytes


# --------------------------------------------------------------------------- import
def hf_tokenizer_folder(folder, bpe_folder) -> None:
    tok = bpe_from_files(bpe_folder / "vocab.json", bpe_folder / "merges.txt")
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOT_TEXT, bos_token=EOT_TEXT).save_pretrained(folder)


HF_MODELS = {
    "llama-gqa-tied": lambda: LlamaForCausalLM(
        LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True,
                    rope_parameters={"rope_type": "default", "rope_theta": 500.0})
    ),
    "llama-bias": lambda: LlamaForCausalLM(
        LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                    max_position_embeddings=64, attention_bias=True, rms_norm_eps=1e-5)
    ),
    "qwen2": lambda: Qwen2ForCausalLM(
        Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=1, max_position_embeddings=64)
    ),
    "qwen3": lambda: Qwen3ForCausalLM(
        Qwen3Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=16, max_position_embeddings=64, rms_norm_eps=1e-6)
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", list(HF_MODELS))
def test_import_transformers_folder_gives_the_same_logits(tmp_path, bpe, name):
    hf = randomise(HF_MODELS[name]())
    hf.save_pretrained(tmp_path / "src")
    hf_tokenizer_folder(tmp_path / "src", bpe)
    report = import_model(tmp_path / "src", tmp_path / "out")
    model = load_model(tmp_path / "out" / "model.safetensors")
    idx = tokens()
    with torch.no_grad():
        assert_close(model(idx), hf(idx).logits)
    assert report["family"] == name.split("-")[0]
    assert model.config.variant.qk_norm == (name == "qwen3")
    tok = get_tokenizer(f"bpe:{tmp_path / 'out' / 'tokenizer'}")
    assert tok.encode(TEXT) == AutoTokenizer.from_pretrained(tmp_path / "src")(TEXT)["input_ids"]


def test_import_export_round_trip(tmp_path, bpe):
    hf = randomise(HF_MODELS["llama-gqa-tied"]())
    hf.save_pretrained(tmp_path / "src")
    hf_tokenizer_folder(tmp_path / "src", bpe)
    import_model(tmp_path / "src", tmp_path / "run")
    export_hf(tmp_path / "run", tmp_path / "back")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
    for k, v in hf.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k


def test_import_and_export_commands(tmp_path, bpe):
    hf = randomise(HF_MODELS["llama-gqa-tied"]())
    hf.save_pretrained(tmp_path / "src")
    hf_tokenizer_folder(tmp_path / "src", bpe)
    runner = CliRunner()
    result = runner.invoke(app, ["import", str(tmp_path / "src"), str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    assert "LlamaForCausalLM (transformers) -> GQA-2 (q_k_v+gqa2+rope)" in result.output
    result = runner.invoke(app, ["export", str(tmp_path / "run"), str(tmp_path / "out"), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["class"] == "LlamaForCausalLM"
    result = runner.invoke(app, ["export", str(tmp_path / "run"), str(tmp_path / "out2"), "--format", "onnx"])
    assert isinstance(result.exception, ConfigError) and "--format" in str(result.exception)
    # The imported run records no training data; its own tokenizer folder is what generate and
    # eval use, without a --tokenizer flag.
    result = runner.invoke(app, ["generate", str(tmp_path / "run"), "--prompt", "the", "--max-new-tokens", "3"])
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize(
    "change, match",
    [
        ({"architectures": ["GPTNeoXForCausalLM"]}, "architecture 'GPTNeoXForCausalLM' is not supported"),
        ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}}, "rope_parameters.*llama3"),
        ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
        ({"quantization_config": {"quant_method": "gptq"}}, "quantization_config"),
        ({"num_key_value_heads": 0}, "num_key_value_heads=0 .*positive integer"),
        ({"hidden_size": None}, "no 'hidden_size'"),
        ({"rms_norm_eps": "x"}, "rms_norm_eps='x' .*finite number"),
        ({"num_hidden_layers": 2.5}, "num_hidden_layers=2.5 .*positive integer"),
        ({"architectures": "LlamaForCausalLM"}, "architectures=.*list of class names"),
    ],
)
def test_import_refuses_what_it_cannot_map(tmp_path, change, match):
    HF_MODELS["llama-bias"]().save_pretrained(tmp_path / "src")
    path = tmp_path / "src" / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **change}))
    with pytest.raises(ConfigError, match=match):
        import_model(tmp_path / "src", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_import_refuses_a_damaged_folder_in_one_line(tmp_path):
    HF_MODELS["llama-bias"]().save_pretrained(tmp_path / "src")
    (tmp_path / "src" / "config.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match=r"config\.json holds a list, not a JSON object"):
        import_model(tmp_path / "src", tmp_path / "out")
    with pytest.raises(ConfigError, match="--max-seq-len must be at least 1, got 0"):
        import_model(tmp_path / "src", tmp_path / "out", max_seq_len=0)
    HF_MODELS["llama-bias"]().save_pretrained(tmp_path / "src2")
    (tmp_path / "src2" / "tokenizer.json").write_text("garbage{")
    with pytest.raises(ConfigError) as err:
        import_model(tmp_path / "src2", tmp_path / "out")
    assert "tokenizer.json cannot be read" in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- GGUF
def write_gguf(path, model: GPT, bpe_folder, *, quantize: str | None = None, bad: str | None = None) -> None:
    """``model`` as llama.cpp writes a Llama GGUF: Q/K rows permuted, tensor names, metadata, vocab."""
    cfg = model.config
    w = gguf.GGUFWriter(str(path), arch="llama")
    w.add_block_count(cfg.n_layers)
    w.add_context_length(cfg.max_seq_len)
    w.add_embedding_length(cfg.d_model)
    w.add_feed_forward_length(cfg.d_ff)
    w.add_head_count(cfg.n_heads)
    w.add_head_count_kv(cfg.n_kv_heads)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_rope_dimension_count(cfg.head_dim)
    vocab = json.loads((bpe_folder / "vocab.json").read_text())
    toks = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    merges = [m for m in (bpe_folder / "merges.txt").read_text().splitlines() if m and not m.startswith("#")]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt2")
    w.add_token_list(toks)
    w.add_token_types([3 if t == EOT_TEXT else 1 for t in toks])
    w.add_token_merges(merges)
    w.add_eos_token_id(vocab[EOT_TEXT])
    sd = model.state_dict()

    def put(name, t, *, heads=None):
        t = t.detach().float()
        if heads is not None:
            t = permute_rope_rows(t, heads)
        arr = t.numpy()
        if name == quantize:
            w.add_tensor(name, gguf.quants.quantize(arr, gguf.GGMLQuantizationType.Q8_0),
                         raw_dtype=gguf.GGMLQuantizationType.Q8_0)  # fmt: skip
        elif name == bad:
            w.add_tensor(name, (arr * 100).astype(np.int32))
        else:
            w.add_tensor(name, arr)

    put("token_embd.weight", sd["wte.weight"])
    put("output_norm.weight", sd["backbone.norm.weight"])
    if not cfg.tie_embeddings:
        put("output.weight", sd["lm_head.weight"])
    for i in range(cfg.n_layers):
        b, g = f"backbone.blocks.{i}.", f"blk.{i}."
        put(g + "attn_norm.weight", sd[b + "norm1.weight"])
        put(g + "ffn_norm.weight", sd[b + "norm2.weight"])
        put(g + "attn_q.weight", sd[proj(i, "q") + "weight"], heads=cfg.n_heads)
        put(g + "attn_k.weight", sd[proj(i, "k") + "weight"], heads=cfg.n_kv_heads)
        put(g + "attn_v.weight", sd[proj(i, "v") + "weight"])
        put(g + "attn_output.weight", sd[b + "attn.o_proj.weight"])
        put(g + "ffn_gate.weight", sd[b + "mlp.gate.weight"])
        put(g + "ffn_up.weight", sd[b + "mlp.up.weight"])
        put(g + "ffn_down.weight", sd[b + "mlp.down.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("tie", [True, False])
def test_gguf_round_trip(tmp_path, bpe, tie):
    model = tiny_gpt("llama", "GQA-2", tie_embeddings=tie, d_ff=64)
    write_gguf(tmp_path / "m.gguf", model, bpe, quantize="blk.1.ffn_up.weight")
    report = import_model(tmp_path / "m.gguf", tmp_path / "out")
    got = load_model(tmp_path / "out" / "model.safetensors")
    assert got.config.variant == model.config.variant and got.config.tie_embeddings == tie
    own, back = model.state_dict(), got.state_dict()
    q8 = "backbone.blocks.1.mlp.up.weight"
    for k in own:
        if k != q8:
            assert torch.equal(back[k], own[k]), k  # F32 tensors, Q/K permutation undone: bit for bit
    w = own[q8].numpy()
    expect = gguf.quants.dequantize(
        gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0
    )
    assert torch.equal(back[q8], torch.from_numpy(expect))
    assert report["tensor_types"] == ["F32", "Q8_0"]
    tok = get_tokenizer(f"bpe:{tmp_path / 'out' / 'tokenizer'}")
    assert tok.encode(TEXT) == get_tokenizer(f"bpe:{bpe}").encode(TEXT)
    assert tok.decode(tok.encode(TEXT)) == TEXT and tok.eot_id == get_tokenizer(f"bpe:{bpe}").eot_id


def test_gguf_split_rules():
    from qkvlab.interop.tokenizer import byte_level_bpe, bytes_to_unicode

    chars = sorted(bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab["12"] = len(vocab)
    gpt2 = byte_level_bpe(vocab, [("1", "2")], pre="gpt2")
    smollm = byte_level_bpe(vocab, [("1", "2")], pre="smollm")  # SmolLM / StarCoder: one digit per piece
    assert gpt2.encode("x 12").ids == [vocab["x"], vocab["Ġ"], vocab["12"]]
    assert smollm.encode("x 12").ids == [vocab["x"], vocab["Ġ"], vocab["1"], vocab["2"]]
    with pytest.raises(ConfigError, match="'sentencepiece' is not one qkvlab can rebuild"):
        byte_level_bpe(vocab, [], pre="sentencepiece")


def test_gguf_refuses_a_type_it_cannot_dequantise(tmp_path, bpe):
    write_gguf(tmp_path / "m.gguf", tiny_gpt("llama", "QKV"), bpe, bad="blk.0.ffn_up.weight")
    with pytest.raises(ConfigError, match=r"blk\.0\.ffn_up\.weight.*I32"):
        import_model(tmp_path / "m.gguf", tmp_path / "out")


# --------------------------------------------------------------------------- convert
def qkv_source(recipe="llama", variant="QKV", **kw) -> GPT:
    return tiny_gpt(recipe, variant, n_heads=8, **kw)


@torch.no_grad()
def roles(model: GPT, x: torch.Tensor, layer: int = 0, offset: int = 0):
    """(key role, value) of one layer for block input ``x``: as the attention computes them."""
    attn = model.backbone.blocks[layer].attn
    _, k_raw, v_raw = attn.qkv(x)
    k_src = attn._heads(k_raw, attn.n_kv_heads)
    v = k_src if attn.kv_shared else attn._heads(v_raw, attn.n_kv_heads)
    return attn.key_role(k_src, offset), v


@pytest.mark.parametrize("init", ["key", "value", "mean"])
@pytest.mark.parametrize("variant", ["QKV", "q_k_v+qknorm", "GQA-4"])
def test_convert_inits_give_the_stated_tensor(variant, init):
    src = qkv_source(variant=variant, bias=True)
    new, _ = convert_model(src, target_config(src.config, "Q-K=V", None), init=init)
    sd, out = src.state_dict(), new.state_dict()
    wk, wv = sd[proj(0, "k") + "weight"], sd[proj(0, "v") + "weight"]
    want = {"key": wk, "value": wv, "mean": (wk.double() + wv.double()) / 2}[init]
    assert torch.equal(out[proj(0, "kv") + "weight"], want.float())
    x = torch.randn(2, 10, 32)
    k_src, v_src = roles(src, x, offset=3)
    k_new, v_new = roles(new, x, offset=3)
    if init == "key":  # the key path, RoPE and QK-norm included, is the source's exactly
        assert torch.equal(k_new, k_src)
    if init == "value":
        assert torch.equal(v_new, v_src)
    assert not torch.equal(k_new, v_new)  # the key role is rotated, the value is not
    assert new.config.variant.qk_norm == src.config.variant.qk_norm


def test_convert_pools_adjacent_kv_heads():
    src = qkv_source()
    new, _ = convert_model(src, target_config(src.config, "GQA-2", None))
    wk = src.state_dict()[proj(1, "k") + "weight"].view(2, 4, 4, 32)  # 8 heads of 4 rows -> 2 groups of 4
    assert torch.allclose(new.state_dict()[proj(1, "k") + "weight"], wk.mean(1).reshape(8, 32))
    assert new.config.variant.id == "q_k_v+gqa2+rope"
    # Heads that were copies of one another pool without loss: the model is unchanged.
    with torch.no_grad():
        for blk in src.backbone.blocks:
            for name in ("k", "v"):
                w = blk.attn.qkv.proj[name].weight.view(8, 4, 32)
                w.copy_(w[::4].repeat_interleave(4, dim=0))
    new, _ = convert_model(src, target_config(src.config, None, 2))
    idx = tokens()
    with torch.no_grad():
        assert_close(new(idx), src(idx))


@pytest.mark.parametrize("recipe, relation", [("llama", "v=Bk"), ("llama", "k=Rv"), ("gpt2", "v=Bk"), ("gpt2", "k=Rv")])
def test_convert_fit_is_exact_when_one_role_is_a_map_of_the_other(recipe, relation):
    src = qkv_source(recipe, "GQA-4", bias=True)
    D, n_kv = 4, 4
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for blk in src.backbone.blocks:
            p = blk.attn.qkv.proj
            if relation == "v=Bk":  # any map B: folded into o_proj
                M, a, b = torch.randn(D, D, generator=gen), "k", "v"
            else:  # a map that commutes with RoPE (scaled rotation per pair), folded into q_proj
                c, s = torch.randn(D // 2, generator=gen), torch.randn(D // 2, generator=gen)
                M = torch.zeros(D, D)
                i, j = torch.arange(D // 2), torch.arange(D // 2) + D // 2
                M[i, i], M[j, j], M[i, j], M[j, i] = c, c, -s, s
                if recipe == "gpt2":  # learned positions: any map
                    M = torch.randn(D, D, generator=gen)
                a, b = "v", "k"
            p[b].weight.copy_(torch.einsum("ab,hbd->had", M, p[a].weight.view(n_kv, D, -1)).reshape(-1, 32))
            p[b].bias.copy_(torch.einsum("ab,hb->ha", M, p[a].bias.view(n_kv, D)).reshape(-1))
    calib = tokens(8, 32, seed=5)
    moments = attention_input_moments(src, calib)
    new, layers = convert_model(src, target_config(src.config, "Q-GQA-4", None), init="fit", moments=moments)
    idx = tokens()
    with torch.no_grad():
        assert (new(idx) - src(idx)).abs().max() < 1e-4
    for layer in layers:
        assert layer["key_error"] < 1e-9 and layer["value_error"] < 1e-9
        assert all(h["key_error"] + h["value_error"] <= h["mean_init_key_error"] + h["mean_init_value_error"]
                   for h in layer["heads"])  # fmt: skip


def test_convert_fit_never_worse_than_the_simple_inits():
    src = qkv_source()
    moments = attention_input_moments(src, tokens(8, 32, seed=5))
    target = target_config(src.config, "Q-K=V", None)
    totals = {}
    for init in ("key", "value", "mean", "fit"):
        _, layers = convert_model(src, target, init=init, moments=moments)
        totals[init] = sum(lay["key_error"] + lay["value_error"] for lay in layers)
    assert totals["fit"] <= min(totals["key"], totals["value"], totals["mean"]) + 1e-9
    assert totals["fit"] < totals["mean"]


def related_roles(src: GPT, seed: int = 3) -> GPT:
    """Make every layer's values a linear map of its keys (v = B k per head): K=V is then exact."""
    D, n_kv = src.config.head_dim, src.config.n_kv_heads
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for blk in src.backbone.blocks:
            p = blk.attn.qkv.proj
            M = torch.randn(D, D, generator=gen)
            p["v"].weight.copy_(torch.einsum("ab,hbd->had", M, p["k"].weight.view(n_kv, D, -1)).reshape(-1, 32))
            if p["v"].bias is not None:
                p["v"].bias.copy_(torch.einsum("ab,hb->ha", M, p["k"].bias.view(n_kv, D)).reshape(-1))
    return src


@pytest.mark.parametrize("recipe", ["llama", "gpt2"])
def test_convert_refit_keeps_an_exact_conversion_exact(recipe):
    # gpt2: learned positions join the stream before the first block, o_proj has a bias to refit.
    src = related_roles(qkv_source(recipe, "GQA-4", bias=True))
    target = target_config(src.config, "Q-GQA-4", None)
    new, layers = convert_model(src, target, init="fit", tokens=tokens(8, 32, seed=5), refit_output=True)
    idx = tokens()
    with torch.no_grad():
        assert (new(idx) - src(idx)).abs().max() < 1e-4
    for layer in layers:
        assert layer["key_error"] < 1e-9 and layer["value_error"] < 1e-9
        assert layer["output_error_before"] < 1e-9 and layer["output_error"] < 1e-9
        assert layer["stream_error"] < 1e-9


def logit_error(new: GPT, src: GPT, idx: torch.Tensor) -> float:
    with torch.no_grad():
        ref = src(idx)
        return float((new(idx) - ref).pow(2).sum() / ref.pow(2).sum())


@pytest.mark.parametrize("to, init", [("Q-K=V", "mean"), ("Q-K=V", "fit"), ("Q-MQA", "fit"), ("MQA", "mean")])
def test_convert_refit_fits_each_layer_to_the_sources_outputs(to, init):
    src = qkv_source(n_layers=3)
    target = target_config(src.config, to, None)
    calib, held_out = tokens(16, 48, seed=5), tokens(8, 48, seed=9)
    moments = attention_input_moments(src, calib) if init == "fit" else None
    plain, _ = convert_model(src, target, init=init, moments=moments)
    refit, layers = convert_model(src, target, init=init, tokens=calib, refit_output=True)
    for layer in layers:  # least squares on the calibration tokens: never worse than the o_proj it starts from
        assert layer["output_error"] <= layer["output_error_before"] + 1e-12
    assert layers[-1]["output_error"] < layers[-1]["output_error_before"]
    assert all(np.isfinite(layer["stream_error"]) for layer in layers)
    # and on tokens it never saw, the converted model is closer to the source than without the refit
    assert logit_error(refit, src, held_out) < logit_error(plain, src, held_out)
    # only o_proj (and, for K=V, the fitted projections) changed: norms, MLPs and embeddings are the source's
    sd, out = src.state_dict(), refit.state_dict()
    for name in ("backbone.blocks.1.mlp.down.weight", "backbone.blocks.2.norm1.weight", "wte.weight"):
        assert torch.equal(out[name], sd[name])
    assert not torch.equal(out["backbone.blocks.2.attn.o_proj.weight"], sd["backbone.blocks.2.attn.o_proj.weight"])


def rope_map(D: int, gen: torch.Generator) -> torch.Tensor:
    """A random map that commutes with RoPE: a scaled rotation per rotated pair (i, i + D/2)."""
    c, s = torch.randn(D // 2, generator=gen), torch.randn(D // 2, generator=gen)
    M = torch.zeros(D, D)
    i, j = torch.arange(D // 2), torch.arange(D // 2) + D // 2
    M[i, i], M[j, j], M[i, j], M[j, i] = c, c, -s, s
    return M


def grouped_by_maps(src: GPT, m: int, kv_too: bool, seed: int = 4) -> GPT:
    """Within each group of ``m`` adjacent KV heads, make every head's key a RoPE-commuting map of
    the group's first key and its value any map of the first value (and, with ``kv_too``, that
    value itself a map of that key): pooling by fitting is then exact, averaging is not."""
    D, n_kv = src.config.head_dim, src.config.n_kv_heads
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for blk in src.backbone.blocks:
            p = blk.attn.qkv.proj
            wk, wv = p["k"].weight.view(n_kv, D, -1), p["v"].weight.view(n_kv, D, -1)
            for g in range(0, n_kv, m):
                if kv_too:
                    wv[g] = torch.randn(D, D, generator=gen) @ wk[g]
                for j in range(g + 1, g + m):
                    wk[j] = rope_map(D, gen) @ wk[g]
                    wv[j] = torch.randn(D, D, generator=gen) @ wv[g]
    return src


@pytest.mark.parametrize("to", ["GQA-2", "Q-GQA-2", "MQA"])
def test_convert_pool_fit_is_exact_when_a_groups_heads_are_maps_of_one_another(to):
    src = qkv_source()  # 8 query heads, 8 KV heads of 4
    target = target_config(src.config, to, None)
    m = src.config.n_kv_heads // target.n_kv_heads
    grouped_by_maps(src, m, kv_too=target.variant.kv_shared)
    moments = attention_input_moments(src, tokens(8, 32, seed=5))
    init = "fit" if target.variant.kv_shared else "mean"
    fitted, layers = convert_model(src, target, init=init, moments=moments, pool="fit")
    averaged, _ = convert_model(src, target, init=init, moments=moments)
    idx = tokens()
    with torch.no_grad():
        ref = src(idx)
        assert (fitted(idx) - ref).abs().max() < 1e-4
        assert (averaged(idx) - ref).abs().max() > 1e-2
    for layer in layers:
        assert layer["key_error"] < 1e-9 and layer["value_error"] < 1e-9
        assert all(h["mean_init_key_error"] > 1e-3 for h in layer["heads"])


def test_convert_pool_fit_is_never_worse_than_averaging_on_the_calibration_data():
    src = qkv_source()
    moments = attention_input_moments(src, tokens(8, 32, seed=5))
    for to, init in (("MQA", "mean"), ("Q-GQA-2", "fit")):
        _, layers = convert_model(src, target_config(src.config, to, None), init=init, moments=moments, pool="fit")
        for layer in layers:
            for h in layer["heads"]:
                assert h["key_error"] + h["value_error"] <= h["mean_init_key_error"] + h["mean_init_value_error"] + 1e-9


@pytest.mark.parametrize(
    "to, init, pool, match",
    [
        ("Q-K=V", "fit", "fit", "keeps the source's 8 KV heads"),
        ("Q-MQA", "mean", "fit", "use --init fit"),
        ("MQA", "mean", "median", "--pool must be one of mean, fit"),
        ("MQA", "mean", "fit", "--calib"),
    ],
)
def test_convert_pool_refusals(to, init, pool, match):
    src = qkv_source()
    with pytest.raises(ConfigError, match=match):
        convert_model(src, target_config(src.config, to, None), init=init, pool=pool)


def test_convert_refit_needs_calibration_tokens():
    src = qkv_source()
    with pytest.raises(ConfigError, match="--calib"):
        convert_model(src, target_config(src.config, "Q-K=V", None), init="mean", refit_output=True)


@pytest.mark.parametrize(
    "variant, to, kv_heads, match",
    [
        ("Q-K=V", "Q-K=V", None, "starts from separate Q, K and V"),
        ("QKV", "Q=K-V", None, "tie the query"),
        ("QKV", "Q-K=V", 3, r"reaches \[1, 2, 4, 8\]"),
        ("QKV", "q_kv+qknorm", None, "adds QK-norm"),
        ("QKV", "q_kv+learned", None, "changes the positional scheme"),
        ("QKV", "QKV", None, "nothing to convert"),
    ],
)
def test_convert_refuses_lossy_or_unsupported_targets(variant, to, kv_heads, match):
    src = qkv_source(variant=variant)
    with pytest.raises(ConfigError, match=match):
        target_config(src.config, to, kv_heads)


def test_convert_cli_writes_a_loadable_run(tmp_path, bpe):
    run = make_run(tmp_path / "run", qkv_source(), bpe)
    corpus = tmp_path / "calib.txt"
    corpus.write_text(TEXT * 40)
    runner = CliRunner()
    args = ["convert", str(run), str(tmp_path / "out"), "--to", "Q-GQA-2", "--init", "fit", "--calib", str(corpus),
            "--calib-tokens", "512", "--calib-seq-len", "32", "--device", "cpu"]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "QKV -> Q-GQA-2 (q_kv+gqa2+rope, init fit)" in result.output
    model = load_model(tmp_path / "out" / "model.safetensors")
    assert model.config.variant.id == "q_kv+gqa2+rope"
    assert (tmp_path / "out" / "tokenizer" / "vocab.json").is_file()
    report = json.loads((tmp_path / "out" / "interop.json").read_text())
    assert report["kv_cache_bytes_per_token_bf16"] == {"source": 2 * 2 * 8 * 4 * 2, "target": 2 * 1 * 2 * 4 * 2}
    again = runner.invoke(app, args)  # main() prints a ConfigError as one line and exits with 2
    assert isinstance(again.exception, ConfigError) and "--force" in str(again.exception)
    assert "\n" not in str(again.exception)
    bad = runner.invoke(app, ["convert", str(run), str(tmp_path / "o2"), "--init", "fit"])
    assert isinstance(bad.exception, ConfigError) and "--calib" in str(bad.exception)
    bad = runner.invoke(app, ["convert", str(run), str(tmp_path / "o3"), "--refit-output"])
    assert isinstance(bad.exception, ConfigError) and "--calib" in str(bad.exception)
    refit = runner.invoke(app, [*args[:2], str(tmp_path / "o4"), *args[3:], "--refit-output"])
    assert refit.exit_code == 0, refit.output
    assert "o_proj refitted" in refit.output
    report = json.loads((tmp_path / "o4" / "interop.json").read_text())
    assert report["refit_output"] is True and report["calibration"]["mode"] == "sequential"
    assert report["pool"] == "mean"
    pooled = runner.invoke(app, [*args[:2], str(tmp_path / "o5"), *args[3:], "--pool", "fit", "--refit-output"])
    assert pooled.exit_code == 0, pooled.output
    assert "fitted as one on the calibration activations" in pooled.output
    assert json.loads((tmp_path / "o5" / "interop.json").read_text())["pool"] == "fit"
    assert all(lay["output_error"] <= lay["output_error_before"] for lay in report["layers"])
