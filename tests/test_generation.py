"""The generate API: ragged batches, stop ids and strings, streaming, top-p, repetition penalty, bad values.

A ragged batch (prompts of different lengths, any padding side) must give every row what that
row gives alone: the same logits at the prefill and at every decode step (float64, so up to
rounding), and the same tokens, for both recipes, K=V and not, learned positions and RoPE,
linear attention, cached and recomputed, and through the Triton decode kernel under the
interpreter (per-row lengths).
"""

from __future__ import annotations

import shutil
import sys

import pytest
import torch

import qkvlab.kernels
from conftest import needs_interpreter, spy_decoders
from qkvlab import GPT, GPTConfig
from qkvlab.attention import Attention
from qkvlab.data.tokenizers import ByteTokenizer
from qkvlab.errors import ConfigError
from qkvlab.models.decoding import StaticDecoder
from qkvlab.models.generation import _RowText
from qkvlab.models.sampling import apply_repetition_penalty, sample, top_p_filter

V = 41
ROWS = [[3, 4, 5, 6, 7, 8, 9], [10, 11], [12, 13, 14, 15, 16]]


def small_gpt(variant: str, recipe: str = "llama", dtype=torch.float64, **kw) -> GPT:
    torch.manual_seed(0)
    shape = dict(n_layers=2, d_model=32, n_heads=4, vocab_size=V, max_seq_len=48)
    return GPT(GPTConfig(recipe=recipe, variant=variant, **{**shape, **kw})).to(dtype).eval()


def padded(rows, side: str = "left"):
    T = max(map(len, rows))
    idx = torch.full((len(rows), T), 40, dtype=torch.long)  # padding with a real id: it must not matter
    mask = torch.zeros(len(rows), T, dtype=torch.bool)
    for b, r in enumerate(rows):
        span = slice(T - len(r), T) if side == "left" else slice(0, len(r))
        idx[b, span], mask[b, span] = torch.tensor(r), True
    return idx, mask


def step_logits(model: GPT, idx, mask, forced: torch.Tensor) -> torch.Tensor:
    """Prefill logits, then those of each teacher-forced decode step: ``(B, 1 + steps, V)``."""
    cache = model.new_cache(idx.shape[0], 20)
    out = [model.prefill(idx, cache, attention_mask=mask)]
    for t in range(forced.shape[1]):
        out.append(model.decode_one(forced[:, t], cache))
    return torch.stack(out, 1)


def set_decode_backend(model: GPT, choice: str) -> None:
    """How every attention layer's one-token steps attend: ``"triton"``, ``"torch"`` or ``"auto"``."""
    for m in model.modules():
        if isinstance(m, Attention):
            m.decode_backend = choice


VARIANTS = ["q_k_v", "q_kv", "qkv", "q_kv+gqa2", "q_k_v+rope", "q_kv+rope+qknorm", "q_kv+learned+linear"]


@pytest.mark.parametrize("recipe", ["gpt2", "llama"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_ragged_batch_equals_each_row_alone(variant, recipe):
    model = small_gpt(variant, recipe)
    forced = torch.randint(0, V, (3, 4), generator=torch.Generator().manual_seed(1))
    idx, mask = padded(ROWS, "left")
    batch = step_logits(model, idx, mask, forced)
    for b, row in enumerate(ROWS):
        alone = step_logits(model, torch.tensor([row]), None, forced[b : b + 1])
        torch.testing.assert_close(batch[b : b + 1], alone, rtol=1e-9, atol=1e-9)
    # generated tokens: the ragged batch (a list, a left- or right-padded tensor), cached or not
    alone = [model.generate(torch.tensor([r]), 6, return_dict=True).tokens[0] for r in ROWS]
    for use_cache in (True, False):
        assert model.generate(ROWS, 6, use_cache=use_cache, return_dict=True).tokens == alone
    idx, mask = padded(ROWS, "right")
    out = model.generate(idx, 6, attention_mask=mask, return_dict=True)
    assert out.tokens == alone and out.lengths == [6, 6, 6] and out.finish_reasons == ["length"] * 3
    assert torch.equal(out.sequences[:, : idx.shape[1]], idx)  # the prompt as given, then the new tokens
    assert out.sequences[:, idx.shape[1] :].tolist() == alone


def test_ragged_static_decoder_equals_the_dynamic_step():
    model = small_gpt("q_kv+learned")
    idx, mask = padded(ROWS)
    forced = torch.randint(0, V, (3, 3), generator=torch.Generator().manual_seed(2))
    ref = step_logits(model, idx, mask, forced)
    cache = model.new_cache(3, 20)
    got = [model.prefill(idx, cache, attention_mask=mask)]
    dec = StaticDecoder(model, cache, cuda_graph=False)
    got += [dec.step(forced[:, t]) for t in range(3)]
    torch.testing.assert_close(torch.stack(got, 1), ref, rtol=1e-12, atol=1e-12)
    assert cache.row_lengths.tolist() == [10, 5, 8] and cache.length == 10
    with pytest.raises(ConfigError, match="one token per row"):
        model(torch.zeros(3, 2, dtype=torch.long), cache=cache)
    cache.reset()
    model.prefill(torch.zeros(3, 4, dtype=torch.long), cache)  # uniform now: the ragged decoder refuses
    with pytest.raises(ConfigError, match="new StaticDecoder"):
        dec.step(forced[:, 0])


@needs_interpreter
@pytest.mark.parametrize("variant", ["q_kv", "q_k_v", "q_kv+rope+qknorm", "q_k_v+mqa+learned"])
def test_ragged_batch_through_the_decode_kernel(variant, monkeypatch):
    """Under the interpreter the decode kernel takes each row's own length; rows equal their runs alone."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    lengths = []
    real = qkvlab.kernels.decode_attention
    real_step = qkvlab.kernels.kv_decode.decode_attention_step

    def spy(*args, **kwargs):
        lengths.append(args[3].tolist())
        return real(*args, **kwargs)

    def spy_step(*args, **kwargs):  # the step writing its cache entry at args[5], the positions
        lengths.append((args[5].reshape(-1) + 1).tolist())
        return real_step(*args, **kwargs)

    monkeypatch.setattr(qkvlab.kernels, "decode_attention", spy)
    monkeypatch.setattr(qkvlab.kernels.kv_decode, "decode_attention_step", spy_step)
    model = small_gpt(variant, dtype=torch.float32, n_heads=2)  # head dim 16: the kernel's minimum
    idx, mask = padded(ROWS)
    forced = torch.randint(0, V, (3, 2), generator=torch.Generator().manual_seed(3))
    set_decode_backend(model, "triton")
    batch = step_logits(model, idx, mask, forced)
    assert lengths[0] == [8, 3, 6] and lengths[-1] == [9, 4, 7]  # each row's own length
    set_decode_backend(model, "torch")
    for b, row in enumerate(ROWS):
        alone = step_logits(model, torch.tensor([row]), None, forced[b : b + 1])
        torch.testing.assert_close(batch[b : b + 1], alone, rtol=2e-4, atol=2e-4)


def test_stop_token_ids_end_the_row():
    model = small_gpt("q_kv")
    free = model.generate(ROWS, 8, return_dict=True)
    stop = free.tokens[0][2]
    out = model.generate(ROWS, 8, stop_token_ids=[stop], pad_token_id=0, return_dict=True)
    T = max(map(len, ROWS))
    for b, toks in enumerate(free.tokens):
        end = toks.index(stop) + 1 if stop in toks else len(toks)
        assert out.tokens[b] == toks[:end] and out.lengths[b] == end
        assert out.finish_reasons[b] == ("stop_token" if stop in toks else "length")
        assert out.sequences[b, T + end :].eq(0).all()  # nothing after the stop
    assert out.finish_reasons[0] == "stop_token" and out.lengths[0] == 3


class CharTokenizer:
    """Id i decodes to two letters, so a stop string can end inside a token."""

    def decode(self, ids):
        return "".join(chr(97 + i % 26) + chr(65 + i % 26) for i in ids)


def test_stop_strings_end_the_row_and_cut_the_text():
    model = small_gpt("q_k_v")
    tok = CharTokenizer()
    free = model.generate(ROWS, 8, tokenizer=tok, return_dict=True)
    assert free.texts == [tok.decode(t) for t in free.tokens]
    stop = free.texts[0][3:5]  # the end of token 1's text and the start of token 2's
    out = model.generate(ROWS, 8, stop_strings=["not there", stop], tokenizer=tok, return_dict=True)
    for b, text in enumerate(free.texts):
        at = text.find(stop)
        if at < 0:
            assert out.tokens[b] == free.tokens[b] and out.finish_reasons[b] == "length"
            continue
        end = at + len(stop)
        assert out.texts[b] == text[:end]  # cut right after the stop, inside the last token's text
        assert out.tokens[b] == free.tokens[b][: (end + 1) // 2]  # the token completing it is the last
        assert out.finish_reasons[b] == "stop_string"
    assert out.finish_reasons[0] == "stop_string" and len(out.tokens[0]) <= 3


def test_row_text_holds_back_an_unfinished_character_and_finds_stops_across_tokens():
    tok = ByteTokenizer()
    row = _RowText(tok, ["\n\n"])
    deltas, stopped = [], False
    for b in "héllo\n\nworld".encode():
        stopped = row.add(b)
        deltas.append(row.delta(stopped))
        if stopped:
            break
    assert stopped and row.text == "héllo\n\n" and "".join(deltas) == "héllo\n\n"
    assert deltas[1] == "" and deltas[2] == "é"  # the first byte of é waits for the second


@pytest.mark.parametrize("use_cache", [True, False])
def test_stream_yields_the_tokens_of_one_call(use_cache):
    model = small_gpt("q_kv+gqa2+learned")
    tok = CharTokenizer()
    kw = dict(temperature=0.9, top_k=20, top_p=0.9, repetition_penalty=1.3, tokenizer=tok, use_cache=use_cache)
    free = model.generate(ROWS, 10, generator=torch.Generator().manual_seed(4), return_dict=True, **kw)
    # stops taken from the free run, so that rows do end early: a token id of row 0, a text of row 1
    kw.update(stop_token_ids=[free.tokens[0][3]], stop_strings=[free.texts[1][13:15]])
    one = model.generate(ROWS, 10, generator=torch.Generator().manual_seed(4), return_dict=True, **kw)
    assert one.lengths[0] <= 4 and one.lengths[1] <= 8
    stream = model.stream(ROWS, 10, generator=torch.Generator().manual_seed(4), **kw)
    tokens, texts, reasons = [[] for _ in ROWS], [""] * 3, [None] * 3
    for step in stream:
        for b in range(3):
            if step.emitted[b]:
                tokens[b].append(int(step.tokens[b]))
                texts[b] += step.text[b]
            reasons[b] = step.finished[b] or reasons[b]
    assert tokens == one.tokens and texts == one.texts and reasons == one.finish_reasons
    assert torch.equal(stream.result.sequences, one.sequences)


@pytest.mark.parametrize("text", [True, False], ids=["text", "tokens"])
def test_the_next_step_is_launched_before_the_host_reads_a_token(monkeypatch, text):
    """Where the host reads every token (streaming, with or without text; stop strings), the
    next step is launched first: it runs while the host decodes the text and the caller takes
    the token, which it reads on the host (no wait for the step launched)."""
    import qkvlab.models.generation as generation

    model = small_gpt("q_kv")
    events = []
    to_host_later, decode_one = generation.to_host_later, model.decode_one

    def read_later(t):
        read = to_host_later(t)
        return lambda: events.append("read") or read()

    monkeypatch.setattr(generation, "to_host_later", read_later)
    monkeypatch.setattr(model, "decode_one", lambda *a, **k: events.append("step") or decode_one(*a, **k))
    steps = list(model.stream(ROWS, 5, tokenizer=CharTokenizer() if text else None))
    assert len(steps) == 5 and events == ["step", "read"] * 4 + ["read"]
    assert all(s.tokens.device.type == s.emitted.device.type == "cpu" for s in steps)


def test_a_stream_left_half_read_at_exit_prints_nothing(tmp_path):
    """A stream the caller stops reading and keeps until the interpreter exits is closed during
    its teardown: that must print nothing (no "Exception ignored" traceback from a grad mode
    restored while torch is half torn down) and exit cleanly. Out of process: it is the exit."""
    import subprocess

    script = tmp_path / "half_read.py"
    script.write_text(
        "import torch\n"
        "from qkvlab import GPT, GPTConfig\n"
        "m = GPT(GPTConfig(recipe='llama', variant='q_kv', n_layers=1, d_model=16, n_heads=2, vocab_size=32,"
        " max_seq_len=16)).eval()\n"
        "it = iter(m.stream(torch.tensor([[1, 2, 3]]), 5))\n"
        "next(it)\n"
        "assert torch.is_grad_enabled()  # the stream's grad mode stays inside its steps\n"
        "print('read one step')\n"
    )
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "read one step", done.stderr
    assert done.stderr == "", done.stderr


@pytest.mark.parametrize("use_cache", [True, False])
def test_a_stream_keeps_the_books_the_device_keeps_without_one(use_cache):
    """A stream reads every token, so the host keeps the rows' bookkeeping; a call without a
    stream or text keeps it on the device. With the same stops both give the same tokens,
    lengths, finish reasons and sequences, and the stream's steps say the same."""
    model = small_gpt("q_kv+gqa2+learned")
    kw = dict(temperature=0.9, top_k=20, repetition_penalty=1.3, use_cache=use_cache)
    free = model.generate(ROWS, 10, generator=torch.Generator().manual_seed(4), return_dict=True, **kw)
    kw["stop_token_ids"] = [free.tokens[0][3], free.tokens[2][6]]
    device = model.generate(ROWS, 10, generator=torch.Generator().manual_seed(4), return_dict=True, **kw)
    assert device.lengths[0] <= 4 and device.lengths[2] <= 7 and "length" in device.finish_reasons
    stream = model.stream(ROWS, 10, generator=torch.Generator().manual_seed(4), **kw)
    tokens, reasons = [[] for _ in ROWS], [None] * 3
    for step in stream:
        for b in range(3):
            if step.emitted[b]:
                tokens[b].append(int(step.tokens[b]))
            reasons[b] = step.finished[b] or reasons[b]
    host = stream.result
    assert tokens == host.tokens == device.tokens and reasons == host.finish_reasons == device.finish_reasons
    assert host.lengths == device.lengths and torch.equal(host.sequences, device.sequences)


def test_between_two_streamed_steps_the_device_only_samples(monkeypatch):
    """The host keeps a stream's bookkeeping: between two steps nothing runs on the device but
    the sampling (greedy: one argmax), not which rows emit, ended or how many tokens each has."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names, self.counting = [], False

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if self.counting:
                self.names.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    model = small_gpt("q_kv")
    ops, decode_one = Ops(), model.decode_one

    def uncounted_step(*a, **k):
        ops.counting = False
        try:
            return decode_one(*a, **k)
        finally:
            ops.counting = True

    monkeypatch.setattr(model, "decode_one", uncounted_step)
    rows = torch.tensor([[3, 4, 5], [6, 7, 8]])
    free = model.generate(rows, 6).tolist()
    never = next(t for t in range(V) if all(t not in r for r in free))  # a stop that never comes
    between = []
    with ops:
        steps = iter(model.stream(rows, 6, stop_token_ids=[never], tokenizer=CharTokenizer()))
        next(steps)  # the prefill and the first step
        for _ in range(4):
            ops.names, ops.counting = [], True
            next(steps)
            ops.counting = False
            between.append(ops.names)
    # lift_fresh wraps the host's list of tokens as the step's tensor: no device work
    assert [[n for n in names if n != "lift_fresh"] for names in between] == [["argmax"]] * 4, between


def eager_compile(monkeypatch) -> list[bool]:
    """``compile=True`` without compiling (the static step eager, on this CPU), and a list of
    the ``greedy`` of every StaticDecoder generate builds: what generate does around the step,
    the compiled step itself being tested in test_decoding.py."""
    import qkvlab.models.decoding as decoding

    built = []
    init = StaticDecoder.__init__

    def spy(self, *a, greedy=False, **kw):
        built.append(greedy)
        init(self, *a, greedy=greedy, **kw)

    monkeypatch.setattr(decoding.torch, "compile", lambda fn, **kw: fn)
    monkeypatch.setattr(StaticDecoder, "__init__", spy)
    return built


def test_greedy_generate_lets_the_step_pick_and_gives_what_recomputing_gives(monkeypatch):
    """Greedy with a static step: the step picks each next token itself. Every way of calling
    gives the tokens of the uncached reference: plain, streamed (with the tokens each step
    handed out still right once the stream has run on), with stop ids on the device, with text
    on the host, with a repetition penalty (which the step applies, and marks its picks for);
    sampling from a caller's generator keeps the pick outside the step."""
    built = eager_compile(monkeypatch)
    model = small_gpt("q_kv+gqa2+rope")
    ref = model.generate(ROWS, 8, use_cache=False, return_dict=True)
    plain = model.generate(ROWS, 8, compile=True, return_dict=True)
    assert torch.equal(plain.sequences, ref.sequences) and built == [True]
    stream = model.stream(ROWS, 8, compile=True)
    handed = [step.tokens for step in stream]
    assert torch.equal(torch.stack(handed, 1), torch.stack([torch.tensor(r) for r in ref.tokens]))
    never = next(t for t in range(V) if all(t not in r for r in ref.tokens))
    stops = model.generate(ROWS, 8, compile=True, stop_token_ids=[never], return_dict=True)
    text = model.generate(ROWS, 8, compile=True, tokenizer=CharTokenizer(), return_dict=True)
    assert stops.tokens == text.tokens == ref.tokens and built == [True] * 4
    pen_ref = model.generate(ROWS, 8, use_cache=False, repetition_penalty=1.5, return_dict=True)
    pen = model.generate(ROWS, 8, compile=True, repetition_penalty=1.5, return_dict=True)
    pen_stream = [step.tokens for step in model.stream(ROWS, 8, compile=True, repetition_penalty=1.5)]
    assert pen.tokens == pen_ref.tokens != ref.tokens and torch.stack(pen_stream, 1).tolist() == pen_ref.tokens
    model.generate(ROWS, 3, compile=True, temperature=0.7, generator=torch.Generator().manual_seed(0))
    assert built[4:] == [True, True, False]


def test_a_call_without_stops_copies_each_pick_once_into_its_output(monkeypatch):
    """Greedy generate without stops or text takes each of the step's picks straight into its
    column of the output: one copy out of the step's input a token, no clone of it."""
    from torch.utils._python_dispatch import TorchDispatchMode

    eager_compile(monkeypatch)
    decoders = spy_decoders(monkeypatch)  # (decoder, its arguments), once generate has built it
    model = small_gpt("q_kv+gqa2+rope")

    reads = []

    class Reads(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if decoders and func in (torch.ops.aten.clone.default, torch.ops.aten.copy_.default):
                src = args[0] if func is torch.ops.aten.clone.default else args[1]
                if isinstance(src, torch.Tensor) and src.data_ptr() == decoders[0][0].token.data_ptr():
                    reads.append(func)
            return func(*args, **(kwargs or {}))

    with Reads():
        out = model.generate(ROWS, 8, compile=True, return_dict=True)
    assert out.tokens == model.generate(ROWS, 8, use_cache=False, return_dict=True).tokens
    assert reads == [torch.ops.aten.copy_.default] * 7  # the 7 picks the steps made


def test_calls_over_one_cache_reuse_its_decoder(monkeypatch):
    """A generate over the cache of an earlier call, with the same options and form, takes that
    call's decoder (its step compiled, its graph captured) and gives what a new one gives; other
    options, another cache or another form (ragged or not) build a new one. A stream closed
    early leaves its decoder too; a call whose step raised does not."""
    built = eager_compile(monkeypatch)
    model = small_gpt("q_kv+gqa2+rope")
    cache = model.new_cache(3, 24)
    ref = model.generate(ROWS, 6, use_cache=False)
    assert torch.equal(model.generate(ROWS, 6, cache=cache, compile=True), ref) and len(built) == 1
    assert torch.equal(model.generate(ROWS, 6, cache=cache, compile=True), ref) and len(built) == 1
    uniform = [r[:2] for r in ROWS]  # rows of one length: not ragged, another decoder
    assert torch.equal(model.generate(uniform, 6, cache=cache, compile=True), model.generate(uniform, 6))
    assert len(built) == 2
    model.generate(ROWS, 6, cache=model.new_cache(3, 24), compile=True)  # another cache
    model.generate(ROWS, 6, cache=cache, compile=True, repetition_penalty=1.3)  # other options
    assert len(built) == 4
    model.generate(ROWS, 6, cache=cache, compile=True, repetition_penalty=1.3)
    stream = iter(model.stream(ROWS, 6, cache=cache, compile=True, repetition_penalty=1.3))
    next(stream)
    stream.close()
    model.generate(ROWS, 6, cache=cache, compile=True, repetition_penalty=1.3)
    assert len(built) == 4
    from qkvlab.models.decoding import StaticDecoder as Decoder

    def broken(self, *a, **k):
        raise RuntimeError("a failing step")

    with monkeypatch.context() as m:
        m.setattr(Decoder, "step", broken)
        with pytest.raises(RuntimeError, match="a failing step"):
            model.generate(ROWS, 6, cache=cache, compile=True, repetition_penalty=1.3)
    model.generate(ROWS, 6, cache=cache, compile=True, repetition_penalty=1.3)
    assert len(built) == 5


def test_a_decoder_is_not_reused_where_what_its_graph_reads_moved(monkeypatch):
    """A recorded step reads weights and caches by address: weights loaded anew (``assign=True``
    puts new tensors in place), another mode, autocast or decode backend build a new decoder, and
    every call gives what the uncached reference gives."""
    built = eager_compile(monkeypatch)
    model = small_gpt("q_kv+gqa2+rope")
    cache = model.new_cache(3, 24)

    def call_and_check():
        got = model.generate(ROWS, 5, cache=cache, compile=True)
        assert torch.equal(got, model.generate(ROWS, 5, use_cache=False))

    call_and_check()
    call_and_check()
    assert len(built) == 1
    model.load_state_dict({k: v.clone() for k, v in model.state_dict().items()}, assign=True)
    call_and_check()
    assert len(built) == 2
    set_decode_backend(model, "torch")
    call_and_check()
    assert len(built) == 3
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model.generate(ROWS, 5, cache=cache, compile=True)
    assert len(built) == 4
    call_and_check()
    assert len(built) == 5


def test_an_idle_decoder_keeps_neither_its_model_nor_its_cache(monkeypatch):
    """What a call leaves for the next holds the model and the cache weakly: each, dropped, is
    freed at once (no garbage collection), and the idle decoder with the model."""
    import gc
    import weakref

    from qkvlab.models import generation

    eager_compile(monkeypatch)
    model = small_gpt("q_kv")
    was = gc.isenabled()
    gc.disable()
    try:
        cache = model.new_cache(1, 12)
        model.generate([[1, 2, 3]], 4, cache=cache, compile=True)
        gone = weakref.ref(cache)
        del cache
        assert gone() is None
        model.generate([[1, 2, 3]], 4, cache=model.new_cache(1, 12), compile=True)
        decoder = weakref.ref(generation._IDLE_DECODERS[model][2])
        gone = weakref.ref(model)
        del model
        assert gone() is None and decoder() is None
    finally:
        if was:
            gc.enable()


@pytest.mark.parametrize("use_cache", [True, False])
def test_without_stops_every_row_takes_every_token_as_with_a_stop_never_met(use_cache):
    """With no stop, generate skips the per-step bookkeeping of which rows ended; the result
    must be what the bookkeeping loop gives when its stop id is never sampled."""
    model = small_gpt("q_kv+gqa2+learned")
    kw = dict(temperature=0.9, top_k=20, repetition_penalty=1.3, use_cache=use_cache)
    free = model.generate(ROWS, 9, generator=torch.Generator().manual_seed(2), return_dict=True, **kw)
    unused = next(t for t in range(V) if all(t not in row for row in free.tokens))
    seed = torch.Generator().manual_seed(2)
    watched = model.generate(ROWS, 9, generator=seed, stop_token_ids=[unused], return_dict=True, **kw)
    assert torch.equal(free.sequences, watched.sequences)
    assert free.tokens == watched.tokens and free.lengths == watched.lengths == [9, 9, 9]
    assert free.finish_reasons == watched.finish_reasons == ["length"] * 3
    steps = list(model.stream(ROWS, 9, generator=torch.Generator().manual_seed(2), **kw))
    assert all(bool(s.emitted.all()) for s in steps)
    assert [s.finished for s in steps] == [[None] * 3] * 8 + [["length"] * 3]
    assert torch.stack([s.tokens for s in steps], 1).tolist() == free.tokens


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.tensor([[0.15, 0.5, 0.05, 0.3]]).log()
    kept = {p: (top_p_filter(logits, p) > float("-inf")).nonzero()[:, 1].tolist() for p in (0.3, 0.5, 0.75, 0.81, 1.0)}
    assert kept == {0.3: [1], 0.5: [1], 0.75: [1, 3], 0.81: [0, 1, 3], 1.0: [0, 1, 2, 3]}
    g = torch.Generator().manual_seed(0)
    draws = [int(sample(logits, temperature=1.0, top_p=0.75, generator=g)) for _ in range(200)]
    assert set(draws) == {1, 3}  # both kept tokens drawn, nothing else


def test_repetition_penalty_known_case():
    logits = torch.tensor([[2.0, -1.0, 0.5, 1.0]])
    seen = torch.tensor([[True, True, False, False]])
    assert apply_repetition_penalty(logits, seen, 2.0).tolist() == [[1.0, -2.0, 0.5, 1.0]]
    # in generate: the first greedy token is the argmax of the penalised prefill logits
    model = small_gpt("q_kv")
    prompt = torch.tensor([[3, 4, 5, 3]])
    logits = model.prefill(prompt, model.new_cache(1, 8))
    seen = torch.zeros(1, V, dtype=torch.bool)
    seen[0, [3, 4, 5]] = True
    big = apply_repetition_penalty(logits, seen, 1e6).argmax(-1)
    assert int(big) not in (3, 4, 5)
    assert model.generate(prompt, 1, repetition_penalty=1e6)[0, -1] == big
    out = model.generate(prompt, 20, repetition_penalty=1e6, return_dict=True).tokens[0]
    assert len(set(out)) == 20 and not set(out) & {3, 4, 5}  # with so strong a penalty nothing repeats


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(top_p=0.0), "top_p must lie in (0, 1]"),
        (dict(top_p=1.5), "top_p must lie in (0, 1]"),
        (dict(top_p=float("nan")), "top_p must lie in (0, 1]"),
        (dict(repetition_penalty=-1.0), "repetition_penalty must be a finite number > 0"),
        (dict(repetition_penalty=0.0), "repetition_penalty must be a finite number > 0"),
        (dict(temperature=float("nan")), "temperature must be >= 0 and finite"),
        (dict(temperature=float("inf")), "temperature must be >= 0 and finite"),
        (dict(stop_token_ids=[V]), f"token id {V}, outside the model's vocabulary [0, {V})"),
        (dict(stop_strings=["x"]), "pass tokenizer="),
        (dict(idx=torch.tensor([[1, V]])), f"token id {V}, outside"),
        (dict(idx=torch.tensor([[1, -1]])), "token id -1, outside"),
        (dict(idx=torch.zeros(1, 0, dtype=torch.long)), "The prompt is empty"),
        (dict(idx=torch.zeros(0, 3, dtype=torch.long)), "The prompt is empty"),
        (dict(idx=[[1, 2], []]), "has an empty row"),
        (dict(idx=torch.tensor([1, 2, 3])), "(a single sequence: idx[None])"),
        (dict(idx=torch.ones(1, 3)), "integer token ids of shape (batch, seq)"),
        (dict(attention_mask=torch.tensor([[True, True, True], [False, False, False]])), "Row 1 of the prompt"),
        (dict(attention_mask=torch.ones(2, 2, dtype=torch.bool)), "attention_mask has shape (2, 2)"),
        (dict(generator=5), "generator must be a torch.Generator"),
        (dict(stop_token_ids=torch.tensor([[1]])), "a 2-D torch.int64 tensor"),
        (dict(stop_token_ids=torch.tensor([1.0])), "a 1-D torch.float32 tensor"),
        (dict(stop_token_ids=torch.tensor([V])), f"token id {V}, outside the model's vocabulary"),
    ],
)
def test_bad_values_get_one_clear_error(kwargs, message):
    model = small_gpt("q_kv")
    idx = kwargs.pop("idx", torch.tensor([[1, 2, 3], [4, 5, 6]]))
    with pytest.raises(ConfigError) as err:
        model.generate(idx, 3, **kwargs)
    assert message in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ConfigError):  # the stream refuses at the call, before any iteration
        model.stream(idx, 3, **kwargs)


def test_stop_ids_as_a_tensor_are_the_same_stop_ids():
    """Token ids come as tensors: a 1-D (or 0-D) integer tensor of stop ids stops as the list does."""
    model = small_gpt("q_kv")
    free = model.generate(ROWS, 8, return_dict=True)
    stop = free.tokens[1][4]
    want = model.generate(ROWS, 8, stop_token_ids=[stop], return_dict=True)
    assert want.finish_reasons[1] == "stop_token"
    for ids in (torch.tensor([stop]), torch.tensor(stop), torch.tensor([stop], dtype=torch.int32)):
        got = model.generate(ROWS, 8, stop_token_ids=ids, return_dict=True)
        assert got.tokens == want.tokens and got.finish_reasons == want.finish_reasons


def test_ragged_linear_state_prefill_and_finish_at_zero_tokens():
    model = small_gpt("q_kv+learned+linear", "gpt2", linear_decay=0.9)
    out = model.generate(ROWS, 0, return_dict=True)
    assert out.tokens == [[], [], []] and out.sequences.shape == (3, 7)
    alone = [model.generate(torch.tensor([r]), 5).tolist()[0][len(r) :] for r in ROWS]
    assert model.generate(ROWS, 5, return_dict=True).tokens == alone


@pytest.mark.skipif(
    sys.platform == "win32" or not any(map(shutil.which, ("cc", "gcc", "clang"))),
    reason="torch.compile on CPU needs a C compiler",
)
def test_ragged_compiled_static_step_equals_the_eager_one():
    """The per-row positions trace into one graph (fullgraph) too: RoPE rows, cache scatter, key mask."""
    torch._dynamo.reset()
    model = small_gpt("q_kv+rope+qknorm", dtype=torch.float32, n_layers=1)
    idx, mask = padded(ROWS)
    forced = torch.randint(0, V, (3, 3), generator=torch.Generator().manual_seed(5))
    ref = step_logits(model, idx, mask, forced)[:, 1:]
    cache = model.new_cache(3, 20)
    model.prefill(idx, cache, attention_mask=mask)
    dec = StaticDecoder(model, cache, cuda_graph=False, compile=True)
    got = torch.stack([dec.step(forced[:, t]) for t in range(3)], 1)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
