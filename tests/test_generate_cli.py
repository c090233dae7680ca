"""`qkvlab generate`: KV-cached continuation of a prompt from a trained checkpoint."""

from __future__ import annotations

import re
import shutil
import sys

import pytest
import torch
from typer.testing import CliRunner

from qkvlab.cli import app
from qkvlab.train import load_config, train


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    corpus = root / "corpus"
    corpus.mkdir()
    for d in range(20):  # a folder: one document per file
        (corpus / f"m{d}.py").write_text("\n\n".join(f"def f{i}(x):\n    return x + {i}\n" for i in range(40)))
    cfg = root / "cfg.yaml"
    cfg.write_text(
        f"model: {{preset: tiny, variant: Q-GQA-4}}\n"
        f"data: {{source: {corpus}, tokenizer: byte, cache_dir: {root / 'cache'}}}\n"
        f"batch_size: 8\nseq_len: 32\nmax_steps: 6\neval_every: 3\nckpt_every: 3\nout_dir: {root / 'run'}\n"
    )
    train(load_config(cfg, []))
    return root / "run"


def test_generate_prints_text_speed_and_cache_bytes(run_dir):
    result = CliRunner().invoke(app, ["generate", str(run_dir), "--prompt", "def f", "--max-new-tokens", "12"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("def f")
    m = re.search(
        r"Q-GQA-4 \(q_kv\+gqa4\+learned\): 12 tokens in .* tokens/s .* KV cache 2 tensors, (\d+) B/token", result.output
    )
    assert m, result.output
    # tiny: 2 layers x 1 tensor x 4 KV heads x head_dim 8 x 4 bytes (fp32)
    assert int(m.group(1)) == 2 * 1 * 4 * 8 * 4


def test_generate_is_reproducible_with_a_seed(run_dir):
    args = ["generate", str(run_dir), "--prompt", "def", "--max-new-tokens", "16", "--seed", "3"]
    a, b = CliRunner().invoke(app, args), CliRunner().invoke(app, args)
    assert a.exit_code == 0 and a.output.splitlines()[0] == b.output.splitlines()[0]


def test_generate_refuses_a_missing_checkpoint(tmp_path):
    result = CliRunner().invoke(app, ["generate", str(tmp_path / "nope")])
    assert result.exit_code != 0
    assert "No checkpoint" in str(result.exception)


def test_generate_refuses_cuda_graph_off_cuda(run_dir):
    result = CliRunner().invoke(app, ["generate", str(run_dir), "--device", "cpu", "--cuda-graph"])
    assert result.exit_code != 0
    assert "--cuda-graph needs a CUDA device" in (result.output + str(result.exception))


def test_generate_no_cuda_graph_flag_gives_the_same_text(run_dir):
    """The default (graphs on CUDA only) and --no-cuda-graph decode the same tokens on a CPU."""
    args = ["generate", str(run_dir), "--device", "cpu", "--prompt", "def", "--max-new-tokens", "8", "--seed", "1"]
    a, b = CliRunner().invoke(app, args), CliRunner().invoke(app, [*args, "--no-cuda-graph"])
    assert a.exit_code == 0 and b.exit_code == 0, (a.output, b.output)
    assert a.output.splitlines()[0] == b.output.splitlines()[0]


def test_generate_fuse_flag_gives_the_same_text(run_dir):
    """--fuse runs the fused projections (one product per layer's projections and MLP gate/up)."""
    args = ["generate", str(run_dir), "--device", "cpu", "--prompt", "def", "--max-new-tokens", "8", "--seed", "1"]
    a, b = CliRunner().invoke(app, args), CliRunner().invoke(app, [*args, "--fuse"])
    assert a.exit_code == 0 and b.exit_code == 0, (a.output, b.output)
    assert a.output.splitlines()[0] == b.output.splitlines()[0]


@pytest.mark.skipif(
    sys.platform == "win32" or not any(map(shutil.which, ("cc", "gcc", "clang"))),
    reason="torch.compile on CPU needs a C compiler",
)
@pytest.mark.parametrize("extra", [[], ["--gemv", "inductor"]], ids=["compile", "compile-gemv-inductor"])
def test_generate_compile_flag_gives_the_same_greedy_text(run_dir, extra):
    """--compile decodes through the compiled static step (with --gemv inductor, its products generated
    by Inductor); greedy tokens match the dynamic step's."""
    torch._dynamo.reset()
    args = ["generate", str(run_dir), "--device", "cpu", "--prompt", "def", "--max-new-tokens", "8"]
    args += ["--temperature", "0"]
    a, b = CliRunner().invoke(app, args), CliRunner().invoke(app, [*args, "--compile", *extra])
    assert a.exit_code == 0 and b.exit_code == 0, (a.output, b.output)
    assert a.output.splitlines()[0] == b.output.splitlines()[0]


@pytest.mark.skipif(
    sys.platform == "win32" or not any(map(shutil.which, ("cc", "gcc", "clang"))),
    reason="torch.compile on CPU needs a C compiler",
)
def test_generate_compiled_samples_inside_the_step_and_repeats_with_its_seed(run_dir, monkeypatch):
    """--seed seeds the default generator, which a static step samples from inside its graph: the
    compiled step samples (top-p, no penalty) itself, the same text from one seed twice."""
    from qkvlab.models.decoding import StaticDecoder

    torch._dynamo.reset()
    built = []
    init = StaticDecoder.__init__

    def spy(self, *a, **kw):
        built.append(kw.get("sampling"))
        init(self, *a, **kw)

    monkeypatch.setattr(StaticDecoder, "__init__", spy)
    args = ["generate", str(run_dir), "--device", "cpu", "--prompt", "def", "--max-new-tokens", "12", "--compile"]
    args += ["--temperature", "0.9", "--top-p", "0.9", "--seed", "5"]
    a, b = CliRunner().invoke(app, args), CliRunner().invoke(app, args)
    assert a.exit_code == 0 and b.exit_code == 0, (a.output, b.output)
    assert _text(a.output) == _text(b.output) and _text(a.output).startswith("def")
    assert len(built) == 2 and all(s is not None and s.top_p == 0.9 for s in built), built


def _text(output: str) -> str:
    """The generated text: everything before the closing line of statistics."""
    return output[: output.rindex("Q-GQA-4 (")]


def test_generate_stream_prints_the_same_text(run_dir):
    args = ["generate", str(run_dir), "--device", "cpu", "--prompt", "def", "--max-new-tokens", "12"]
    args += ["--temperature", "0.9", "--top-p", "0.9", "--repetition-penalty", "1.2", "--seed", "2"]
    a, b = CliRunner().invoke(app, args), CliRunner().invoke(app, [*args, "--stream"])
    assert a.exit_code == 0 and b.exit_code == 0, (a.output, b.output)
    assert _text(a.output) == _text(b.output) and _text(a.output).startswith("def")


@pytest.mark.parametrize("stream", [False, True])
def test_generate_stop_text_ends_the_output(run_dir, stream):
    args = ["generate", str(run_dir), "--device", "cpu", "--prompt", "def", "--max-new-tokens", "12"]
    args += ["--temperature", "0"] + (["--stream"] if stream else [])
    free = _text(CliRunner().invoke(app, args).output)[len("def") :].rstrip("\n")
    stop = free[2:4]
    result = CliRunner().invoke(app, [*args, "--stop", stop])
    assert result.exit_code == 0, result.output
    expected = "def" + free[: free.index(stop) + len(stop)]
    assert _text(result.output) == expected + "\n"
    assert "ended at a stop text" in " ".join(result.output.split()), result.output  # rich may wrap the line


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--top-p", "0", "--top-p must lie in (0, 1]"),
        ("--top-p", "1.5", "--top-p must lie in (0, 1]"),
        ("--repetition-penalty", "-1", "--repetition-penalty must be a finite number > 0"),
        ("--temperature", "nan", "--temperature must be a finite number"),
        ("--stop-id", "100000", "--stop-id 100000 is outside the model's vocabulary"),
        ("--stop-id", "-1", "--stop-id -1 is outside the model's vocabulary"),
        ("--seed", "99999999999999999999", "--seed must be in [0, 4294967295]"),
        ("--seed", "-1", "--seed must be in [0, 4294967295]"),
        ("--prompt", "caf\udce9", "--prompt is not UTF-8 text (byte 0xe9 at character 3)"),
        ("--stop", "\udcff", "--stop is not UTF-8 text (byte 0xff at character 0)"),
    ],
)
def test_generate_refuses_bad_sampling_values(run_dir, flag, value, message):
    args = ["generate", str(run_dir), "--device", "cpu", "--max-new-tokens", "4", flag, value]
    result = CliRunner().invoke(app, args)
    assert result.exit_code != 0
    assert message in (result.output + str(result.exception))


def test_generate_gemv_values_are_checked(run_dir):
    base = ["generate", str(run_dir), "--device", "cpu", "--prompt", "def", "--max-new-tokens", "4"]
    bad = CliRunner().invoke(app, [*base, "--gemv", "fast"])
    assert bad.exit_code != 0 and "--gemv must be auto, none, kernel or inductor" in str(bad.exception)
    alone = CliRunner().invoke(app, [*base, "--gemv", "inductor"])
    assert alone.exit_code != 0 and "add --compile" in str(alone.exception)
    a, b = CliRunner().invoke(app, base), CliRunner().invoke(app, [*base, "--gemv", "kernel"])
    assert a.exit_code == 0 and b.exit_code == 0, (a.output, b.output)
    assert a.output.splitlines()[0] == b.output.splitlines()[0]  # on a CPU the products stay F.linear


def test_generate_and_perplexity_name_a_model_that_is_not_a_language_model(tmp_path):
    from qkvlab import EncoderConfig, SequenceEncoder, save_model

    path = tmp_path / "enc.safetensors"
    save_model(SequenceEncoder(EncoderConfig(n_layers=1, d_model=16, n_heads=2, vocab_size=12)), path)
    for command in (["generate"], ["eval", "ppl", "--data", "stdlib"]):
        result = CliRunner().invoke(app, [*command, str(path)])
        assert result.exit_code != 0 and "'encoder' family" in str(result.exception), result.output
        assert "needs a GPT language model" in str(result.exception)
