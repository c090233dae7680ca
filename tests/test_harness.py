"""Downstream evaluation through lm-evaluation-harness: the ``qkvlab`` model, the shipped tasks,
``qkvlab eval harness`` and its bad inputs. Tiny random models on CPU; the staged files in
shared/data for the end-to-end runs."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import lm_eval
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lm_eval.tasks import TaskManager
from lm_eval.tasks._yaml_loader import load_yaml
from typer.testing import CliRunner

from qkvlab import GPT, GPTConfig, save_model
from qkvlab.cli import app
from qkvlab.data import get_tokenizer
from qkvlab.errors import ConfigError
from qkvlab.harness import INSTALL_HINT, TASK_DIR, TASKS, find_data_file, require_lm_eval, resolve_tasks
from qkvlab.harness import data as hdata
from qkvlab.harness.__main__ import lm_eval_argv
from qkvlab.harness.model import QkvlabLM
from qkvlab.harness.runner import RESULTS_NAME, evaluate_runs
from qkvlab.study.results import ResultsStore
from qkvlab.train.trainer import evaluate_lm

BYTE = get_tokenizer("byte")
UPSTREAM = Path(lm_eval.__file__).parent / "tasks"
# (variant, recipe): every position scheme, K=V sharing, grouped heads, tied Q=K and linear attention.
CASES = [
    ("q_k_v+learned", "gpt2"),
    ("q_kv+gqa2+rope", "llama"),
    ("qkv+none", "gpt2"),
    ("qk_v+learned", "llama"),
    ("q_kv+linear+learned", "gpt2"),
]


def tiny(variant: str = "q_kv+learned", recipe: str = "gpt2", max_seq_len: int = 128) -> GPT:
    torch.manual_seed(0)
    cfg = GPTConfig(
        variant=variant, recipe=recipe, vocab_size=257, n_layers=2, d_model=32, n_heads=4, d_ff=64,
        max_seq_len=max_seq_len,
    )  # fmt: skip
    return GPT(cfg).eval()


def adapter(model: GPT, **kw) -> QkvlabLM:
    return QkvlabLM(model=model, tokenizer=BYTE, device="cpu", **kw)


def save_run(folder: Path, model: GPT, *, tokenizer: str | None = "byte", source: str = "stdlib") -> Path:
    meta = {"train_step": "5"}
    if tokenizer is not None:
        data = {"source": source, "tokenizer": tokenizer}
        meta["train_config"] = json.dumps({"data": data, "seq_len": model.config.max_seq_len})
    save_model(model, folder / "model.safetensors", metadata=meta)
    return folder


@torch.no_grad()
def direct(model: GPT, context: list[int], continuation: list[int]) -> tuple[float, bool]:
    """The log-probability of ``continuation`` after ``context`` from one unpadded forward pass."""
    whole = torch.tensor([context + continuation])
    logp = F.log_softmax(model(whole[:, :-1])[0, len(context) - 1 :].float(), dim=-1)
    target = torch.tensor(continuation)
    return float(logp.gather(-1, target[:, None]).sum()), bool((logp.argmax(-1) == target).all())


PAIRS = [
    ("The cat sat on the", " mat."),
    ("Question: what is two plus two?\nAnswer:", " four"),
    ("a", " b c d e f g h i j k l m n o p"),
    ("", "An empty context is conditioned on end-of-text."),
    ("Trailing space moves to the continuation ", "like lm-eval's other models"),
]


# ================================================================== the model
@pytest.mark.parametrize(("variant", "recipe"), CASES)
def test_loglikelihood_is_the_direct_sum_for_any_batch(variant, recipe):
    model = tiny(variant, recipe)
    requests = [SimpleNamespace(args=p) for p in PAIRS]
    got = {bs: adapter(model, batch_size=bs).loglikelihood(requests, disable_tqdm=True) for bs in (1, 2, 8)}
    for (context, continuation), (score, greedy) in zip(PAIRS, got[1], strict=True):
        ctx_text = context.rstrip(" ")
        cont_text = context[len(ctx_text) :] + continuation
        ctx = BYTE.encode(ctx_text) if ctx_text else [BYTE.eot_id]
        want, want_greedy = direct(model, ctx, BYTE.encode(cont_text))
        assert score == pytest.approx(want, rel=1e-5, abs=1e-4)
        assert greedy == want_greedy
    for bs in (2, 8):  # batched and right-padded: the same numbers
        for (a, ga), (b, gb) in zip(got[1], got[bs], strict=True):
            assert a == pytest.approx(b, rel=1e-5, abs=1e-4) and ga == gb


@pytest.mark.parametrize(("variant", "recipe"), CASES[:3])
def test_is_greedy_and_padding_with_a_long_neighbour(variant, recipe):
    model = tiny(variant, recipe)
    lm = adapter(model, batch_size=4)
    context = BYTE.encode("def f(x):")
    idx = torch.tensor([context])
    greedy = model.generate(idx, 6, temperature=0.0, use_cache=False)[0, len(context) :].tolist()
    other = [*greedy[:-1], (greedy[-1] + 1) % 256]
    long_context = BYTE.encode("x" * 50)
    reqs = [(None, context, greedy), (None, context, other), (None, long_context, greedy)]
    (s1, g1), (s2, g2), _ = lm._loglikelihood_tokens(reqs, disable_tqdm=True)
    assert g1 is True and g2 is False
    assert s1 > s2
    # Scored beside a much longer row (so padded by 40+ tokens) or alone: the same.
    (alone, _), (alone2, _) = adapter(model, batch_size=1)._loglikelihood_tokens(reqs[:2], disable_tqdm=True)
    assert s1 == pytest.approx(alone, rel=1e-5) and s2 == pytest.approx(alone2, rel=1e-5)
    assert s1 == pytest.approx(direct(model, context, greedy)[0], rel=1e-5)


@pytest.mark.parametrize(("variant", "recipe"), [CASES[0], CASES[1]])
def test_rolling_loglikelihood_is_eval_ppl_token_sum(variant, recipe):
    """lm-eval's rolling windows score a text as ``evaluate_lm`` scores EOT + text in fixed windows."""
    L = 16
    model = tiny(variant, recipe, max_seq_len=L)
    lm = adapter(model, batch_size=3)
    text = "".join(chr(ord("a") + (i * 7) % 26) for i in range(3 * L))  # 3 full windows of byte tokens
    (total,) = lm.loglikelihood_rolling([SimpleNamespace(args=(text,))], disable_tqdm=True)
    stream = np.array([BYTE.eot_id, *BYTE.encode(text)], dtype=np.int64)
    ref = evaluate_lm(model, stream, seq_len=L, batch_size=2, prefix="")
    assert ref["tokens"] == 3 * L
    assert -total == pytest.approx(ref["loss"] * ref["tokens"], rel=1e-5)
    assert math.exp(-total / ref["tokens"]) == pytest.approx(ref["ppl"], rel=1e-5)
    # A partial last window keeps a full context and scores only its new tokens.
    ids = BYTE.encode(text[: 2 * L + 5])
    (partial,) = lm.loglikelihood_rolling([SimpleNamespace(args=(text[: 2 * L + 5],))], disable_tqdm=True)
    want = direct(model, [BYTE.eot_id], ids[:L])[0]  # windows of L inputs: EOT + text[:L-1], ...
    want += direct(model, ids[L - 1 : L], ids[L : 2 * L])[0]
    want += direct(model, ids[-L - 1 : -5], ids[-5:])[0]  # ... and the full-length last one
    assert partial == pytest.approx(want, rel=1e-5)


def test_generate_until_decodes_through_the_cache_and_stops():
    model = tiny("q_kv+gqa2+rope", "llama")
    lm = adapter(model, batch_size=4)
    prompts = ["abc", "xyz", "hello"]
    reqs = [SimpleNamespace(args=(p, {"until": [], "max_gen_toks": 8})) for p in prompts]
    out = lm.generate_until(reqs, disable_tqdm=True)
    for p, text in zip(prompts, out, strict=True):
        ids = BYTE.encode(p)
        full = model.generate(torch.tensor([ids]), 8, temperature=0.0, use_cache=False)[0, len(ids) :].tolist()
        if BYTE.eot_id in full:
            full = full[: full.index(BYTE.eot_id)]
        assert text == BYTE.decode(full)
    # A stop string cuts the text; one request alone gives what it gave in a batch.
    stop = out[0][2:4] or "zz"
    (cut,) = lm.generate_until([SimpleNamespace(args=("abc", {"until": [stop], "max_gen_toks": 8}))], True)
    assert cut == out[0].split(stop)[0]
    with pytest.raises(ConfigError, match="not supported"):
        lm.generate_until([SimpleNamespace(args=("abc", {"num_beams": 4}))], disable_tqdm=True)


def test_truncation_refused_by_default_and_left_like_hf():
    model = tiny(max_seq_len=32)
    context, continuation = BYTE.encode("y" * 40), BYTE.encode(" end")
    with pytest.raises(ConfigError, match=r"longer than the model's 32-token context.*--truncate left") as e:
        adapter(model).loglikelihood([SimpleNamespace(args=("y" * 40, " end"))], disable_tqdm=True)
    assert "\n" not in str(e.value)
    lm = adapter(model, truncate="left")
    ((score, _),) = lm._loglikelihood_tokens([(None, context, continuation)], disable_tqdm=True)
    kept = (context + continuation)[-33:]  # lm-eval's hf model keeps the last max_length + 1 tokens
    assert score == pytest.approx(direct(model, kept[: -len(continuation)], continuation)[0], rel=1e-5)
    assert lm.truncated == 1
    with pytest.raises(ConfigError, match="continuation of 40 tokens"):
        lm._loglikelihood_tokens([(None, [1], context)], disable_tqdm=True)


def test_model_arguments_are_checked(tmp_path):
    run = save_run(tmp_path / "run", tiny())
    with pytest.raises(ConfigError, match=r"Unknown qkvlab model argument\(s\) \['pth'\]"):
        QkvlabLM(path=run, pth="x")
    with pytest.raises(ConfigError, match="batch_size must be an integer"):
        QkvlabLM(path=run, batch_size="many", device="cpu")
    with pytest.raises(ConfigError, match="truncate must be"):
        QkvlabLM(path=run, truncate="right", device="cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            QkvlabLM(path=run, device="cuda:0")
    lm = QkvlabLM(path=run, device="cpu", batch_size="4")
    assert (lm.batch_size, lm.max_length, lm.train_step, lm.tokenizer_name) == (4, 128, 5, "byte")


# ================================================================== registration
def test_registered_for_lm_eval_and_its_command_line():
    from lm_eval.api.registry import get_model, model_registry

    assert get_model("qkvlab") is QkvlabLM
    assert "hf" in model_registry  # lm-eval's own models are still there
    assert lm_eval_argv(["run", "--model", "qkvlab"], "T") == ["run", "--model", "qkvlab", "--include_path", "T"]
    assert lm_eval_argv(["--model", "qkvlab"], "T")[-2:] == ["--include_path", "T"]  # legacy form
    assert lm_eval_argv(["run", "--include_path", "mine"], "T") == ["run", "--include_path", "mine"]
    assert lm_eval_argv(["--help"], "T") == ["--help"]


def test_simple_evaluate_by_name(tmp_path):
    run = save_run(tmp_path / "run", tiny(max_seq_len=512))
    manager = TaskManager(include_path=str(TASK_DIR), include_defaults=False)
    try:
        find_data_file(TASKS["piqa"])
    except ConfigError as e:
        pytest.skip(str(e))
    out = lm_eval.simple_evaluate(
        model="qkvlab", model_args=f"path={run},batch_size=2", device="cpu", tasks=["qkvlab_piqa"], limit=2,
        task_manager=manager, bootstrap_iters=0, log_samples=False,
    )  # fmt: skip
    assert out["n-samples"]["qkvlab_piqa"]["effective"] == 2
    assert 0.0 <= out["results"]["qkvlab_piqa"]["acc,none"] <= 1.0


# ================================================================== tasks
def _upstream(name: str) -> Path:
    return {
        "hellaswag": UPSTREAM / "hellaswag/hellaswag.yaml",
        "piqa": UPSTREAM / "piqa/piqa.yaml",
        "arc_easy": UPSTREAM / "arc/arc_easy.yaml",
        "arc_challenge": UPSTREAM / "arc/arc_challenge.yaml",
        "winogrande": UPSTREAM / "winogrande/default.yaml",
        "lambada_openai": UPSTREAM / "lambada/lambada_openai.yaml",
    }[name]


def _same(a, b) -> bool:
    if callable(a) and callable(b):  # the same function, however lm-eval imported its module
        return (a.__code__.co_filename, a.__name__) == (b.__code__.co_filename, b.__name__)
    return a == b


@pytest.mark.parametrize("name", list(TASKS))
def test_task_prompts_and_metrics_are_lm_evals(name):
    ours = load_yaml(TASK_DIR / f"{name}.yaml")
    theirs = load_yaml(_upstream(name))
    assert ours["task"] == TASKS[name].harness_name
    keys = ("output_type", "doc_to_text", "doc_to_target", "doc_to_choice", "metric_list")
    keys += ("target_delimiter", "fewshot_delimiter", "description")
    for key in keys:
        assert _same(ours.get(key), theirs.get(key)), key
    if name == "hellaswag":  # the loader applies lm-eval's process_docs itself, once
        assert "process_docs" not in ours and theirs["process_docs"].__module__.endswith("hellaswag.utils")
    else:
        assert ours.get("process_docs") is None and theirs.get("process_docs") is None
    # Few-shot examples come from the scored split itself, so lm-eval must leave the scored item out:
    # it does so exactly when the few-shot split is the test split.
    assert ours["fewshot_split"] == ours["test_split"] == TASKS[name].split


def test_hellaswag_conversion_gives_lm_evals_query():
    from lm_eval.tasks.hellaswag.utils import process_docs

    lines = [
        "Clean and jerk: A lady walks to a barbell. She bends down and grabs the pole. the lady",
        "3",
        "swings and lands in her arms.",
        "pulls the barbell forward.",
        "pulls a rope attached to the barbell.",
        "stands and lifts the weight over her head.",
        "Home and Garden: How to grow roses. Pick a sunny spot [substeps] with good soil.",
        "0",
        "Water them often. [step] Every day.",
        "b",
        "c",
        "d",
        "",
    ]
    items = hdata.hellaswag_items(lines)
    assert [(i["ctx_a"], i["ctx_b"]) for i in items] == [
        ("A lady walks to a barbell. She bends down and grabs the pole.", "the lady"),
        ("How to grow roses. Pick a sunny spot [substeps] with good soil.", ""),
    ]
    docs = list(process_docs(__import__("datasets").Dataset.from_list(items)))
    assert docs[0]["query"] == "Clean and jerk: A lady walks to a barbell. She bends down and grabs the pole. The lady"
    assert docs[1]["query"] == "Home and Garden: How to grow roses. Pick a sunny spot with good soil."
    assert docs[1]["choices"][0] == "Water them often. Every day."
    assert (docs[0]["gold"], docs[1]["gold"]) == (3, 0)
    with pytest.raises(ConfigError, match="not a multiple of 6"):
        hdata.hellaswag_items(lines[:7])
    with pytest.raises(ConfigError, match="is not 0-3"):
        hdata.hellaswag_items(["ctx: x", "7", "a", "b", "c", "d"])


def test_jsonl_conversions_give_back_the_staged_strings():
    from lm_eval.tasks.winogrande.preprocess_winogrande import doc_to_choice, doc_to_target, doc_to_text

    wino = [
        {"context_options": ["So Sarah", "So Sam"], "continuation": "won.", "gold": 1},
        {"context_options": ["The bag held the book", "The bag held the box"], "continuation": "'s lid.", "gold": 0},
    ]
    for row, doc in zip(wino, hdata.winogrande_items(wino), strict=True):
        assert doc_to_choice(doc) == row["context_options"]
        assert doc_to_target(doc) == row["continuation"]
        assert doc_to_text(doc) == row["gold"]
    assert hdata.winogrande_items(wino)[0]["option2"] == "Sam"  # whole words, not "rah" / "m"
    piqa = hdata.piqa_items([{"query": "Question: How to boil water?\n", "choices": ["heat it", "cool it"], "gold": 0}])
    assert piqa == [{"goal": "How to boil water?", "sol1": "heat it", "sol2": "cool it", "label": 0}]
    arc = hdata.arc_items([{"query": "Question: Sky?", "choices": ["blue", "red", "green"], "gold": 2}])
    assert arc[0]["question"] == "Sky?" and arc[0]["answerKey"] == "C"
    assert arc[0]["choices"] == {"text": ["blue", "red", "green"], "label": ["A", "B", "C"]}
    lam = hdata.lambada_items(
        [{"context": "he saw the", "continuation": "dog"}, {"context": "a", "continuation": "\nb"}]
    )
    assert [d["text"] for d in lam] == ["he saw the dog", "a\nb"]
    with pytest.raises(ConfigError, match="has no 'choices' field"):
        hdata.arc_items([{"query": "Question: ?", "gold": 0}])


def test_real_files_convert_in_full():
    counts = {"arc_easy": 2376, "arc_challenge": 1172, "hellaswag": 10042, "piqa": 1838, "winogrande": 1267}
    counts["lambada_openai"] = 5153
    from lm_eval.tasks.winogrande.preprocess_winogrande import doc_to_choice, doc_to_target

    for name, n in counts.items():
        try:
            path = find_data_file(TASKS[name])
        except ConfigError:
            continue
        items = hdata.read_items(TASKS[name], path)
        assert len(items) == n, name
        if name == "hellaswag":  # the loader's docs, after lm-eval's process_docs
            doc = hdata.load_dataset("hellaswag")["validation"][0]
            assert doc["query"] == "Roof shingle removal: A man is sitting on a roof. He"
            assert (doc["gold"], doc["choices"][3]) == (3, "starts pulling up roofing on a roof.")
        if name == "winogrande":
            rows = [json.loads(line) for line in path.read_text().splitlines()]
            assert all(doc_to_choice(d) == r["context_options"] for d, r in zip(items, rows, strict=True))
            assert all(doc_to_target(d) == r["continuation"] for d, r in zip(items, rows, strict=True))


def test_task_names():
    assert [s.name for s in resolve_tasks("paper")] == ["arc_easy", "arc_challenge", "hellaswag", "piqa", "winogrande"]
    assert len(resolve_tasks(None)) == 6 and len(resolve_tasks("all,piqa")) == 6
    assert [s.name for s in resolve_tasks(["qkvlab_piqa, hellaswag"])] == ["piqa", "hellaswag"]
    with pytest.raises(ConfigError, match=r"Unknown task 'hellaswg'; use one of arc_easy, .*'all'"):
        resolve_tasks("hellaswg")
    for blank in ("", " , "):  # an empty shell variable, not a wish for every task
        with pytest.raises(ConfigError, match="names no task"):
            resolve_tasks(blank)


# ================================================================== qkvlab eval harness
@pytest.fixture(scope="module")
def every_task(tmp_path_factory):
    """One 4-item run of every shipped task whose file is staged, through the command line."""
    present = []
    for spec in TASKS.values():
        try:
            find_data_file(spec)
            present.append(spec.name)
        except ConfigError:
            pass
    run = save_run(tmp_path_factory.mktemp("harness") / "run", tiny(max_seq_len=512))
    if not present:
        return run, None
    args = ["eval", "harness", str(run), "--tasks", ",".join(present), "--limit", "4", "--device", "cpu", "--json"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, (result.output, result.exception)
    return run, json.loads(result.stdout[result.stdout.index("[") :])


@pytest.mark.parametrize("name", list(TASKS))
def test_every_shipped_task_runs_offline(every_task, name):
    run, rows = every_task
    try:
        path = find_data_file(TASKS[name])
    except ConfigError as e:
        pytest.skip(f"{name}: {e}")
    mine = {r["metric"]: r for r in rows if r["task"] == name}
    expected = {"winogrande": {"acc"}, "lambada_openai": {"acc", "perplexity"}}.get(name, {"acc", "acc_norm"})
    assert set(mine) == expected
    for metric, r in mine.items():
        assert (r["n"], r["num_fewshot"], r["limit"]) == (4, 0, 4)
        assert r["value"] is not None and (metric == "perplexity" or 0.0 <= r["value"] <= 1.0)
        assert r["lm_eval_version"] == lm_eval.__version__ and "qkvlab_commit" in r
        assert r["data_file"] == str(path) and len(r["data_sha256"]) == 64
        assert r["variant_id"] == "q_kv+learned" and r["tokenizer"] == "byte"
    stored = json.loads((run / RESULTS_NAME).read_text())
    assert stored["format"] == "qkvlab-harness/1"
    assert {(r["task"], r["metric"]) for r in stored["rows"]} >= {(name, m) for m in expected}


def test_few_shot_run_study_rows_and_rerun(tmp_path):
    try:
        find_data_file(TASKS["piqa"])
    except ConfigError as e:
        pytest.skip(str(e))
    study = tmp_path / "study"
    run = save_run(study / "runs" / "r1", tiny(max_seq_len=1024))  # byte tokens: 2-shot PIQA needs ~600
    store = ResultsStore(study)
    store.append({"run_id": "r1", "status": "ok", "variant": "Q-K=V", "model": "tiny", "seed": 0, "val_loss": 1.0})
    kw = dict(num_fewshot=2, limit=2, batch_size=4, device="cpu", study=study)
    rows = evaluate_runs([run], "piqa", **kw)
    assert {r["run_id"] for r in rows} == {"harness:r1:piqa:acc:2shot:limit2", "harness:r1:piqa:acc_norm:2shot:limit2"}
    assert all(r["status"] == "harness" and r["of_run"] == "r1" and r["variant"] == "Q-K=V" for r in rows)
    evaluate_runs([run], "piqa", **kw)  # a rerun replaces, never duplicates
    assert len(json.loads((run / RESULTS_NAME).read_text())["rows"]) == 2
    latest = store.latest()
    assert [k for k, r in latest.items() if r["status"] == "ok"] == ["r1"]  # training rows stay apart
    assert store.finished_ids() == {"r1"} and len(latest) == 3


# ================================================================== bad input
def test_bad_inputs_give_one_line(tmp_path):
    run = save_run(tmp_path / "run", tiny(max_seq_len=64))
    cases = {
        "not found; looked for": ["--tasks", "piqa", "--data-root", str(tmp_path / "nowhere")],
        "Unknown task 'hellaswg'": ["--tasks", "hellaswg"],
    }
    for message, extra in cases.items():
        result = CliRunner().invoke(app, ["eval", "harness", str(run), *extra])
        assert isinstance(result.exception, ConfigError) and message in str(result.exception), result.output
        assert "\n" not in str(result.exception)
    nowhere = ["eval", "harness", str(run), "--tasks", "piqa", "--data-root", str(tmp_path / "nowhere")]
    assert str(tmp_path / "nowhere" / "piqa" / "piqa.jsonl") in str(CliRunner().invoke(app, nowhere).exception)
    bare = save_run(tmp_path / "bare", tiny(), tokenizer=None)
    result = CliRunner().invoke(app, ["eval", "harness", str(bare), "--tasks", "piqa", "--data-root", str(tmp_path)])
    assert isinstance(result.exception, ConfigError)  # the data root is checked first
    (tmp_path / "piqa").mkdir()
    (tmp_path / "piqa" / "piqa.jsonl").write_text('{"query": "Question: q\\n", "choices": ["a", "b"], "gold": 0}\n')
    result = CliRunner().invoke(app, ["eval", "harness", str(bare), "--tasks", "piqa", "--data-root", str(tmp_path)])
    assert isinstance(result.exception, ConfigError) and "does not record a tokenizer" in str(result.exception)
    bpe = save_run(tmp_path / "bpe", tiny(), tokenizer="bpe:300", source=str(tmp_path / "gone"))
    with pytest.raises(ConfigError, match="has no saved tokenizer"):
        evaluate_runs([bpe], "piqa", data_root=tmp_path, device="cpu")
    with pytest.raises(ConfigError, match="No checkpoint"):
        evaluate_runs([tmp_path / "missing"], "piqa", data_root=tmp_path)
    long_root = tmp_path / "long"
    (long_root / "piqa").mkdir(parents=True)
    item = {"query": f"Question: {'why ' * 30}?\n", "choices": ["a", "b"], "gold": 0}
    (long_root / "piqa" / "piqa.jsonl").write_text(json.dumps(item) + "\n")
    with pytest.raises(ConfigError, match="longer than the model's 64-token context") as e:
        evaluate_runs([run], "piqa", data_root=long_root, device="cpu", write=False)
    assert "\n" not in str(e.value)
    rows = evaluate_runs([run], "piqa", data_root=long_root, device="cpu", write=False, truncate="left")
    assert {r["truncated_requests"] for r in rows} == {2}  # both choices of the one item


def test_without_lm_eval_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval now raises ImportError
    with pytest.raises(ConfigError) as e:
        require_lm_eval()
    assert str(e.value) == INSTALL_HINT and "pip install 'qkvlab[eval]'" in INSTALL_HINT
    result = CliRunner().invoke(app, ["eval", "harness", str(tmp_path)])
    assert isinstance(result.exception, ConfigError) and str(result.exception) == INSTALL_HINT


# ================================================================== the same weights through lm-eval's hf model
@pytest.mark.parametrize(
    ("variant", "recipe"),
    [("q_k_v+learned", "gpt2"), ("q_kv+gqa2+rope", "llama")],  # a stock GPT-2; qkvlab's own K=V class
)
def test_exported_model_scores_the_same_through_lm_evals_hf_model(tmp_path, variant, recipe):
    """One checkpoint, two adapters: lm-eval's ``hf`` model on the transformers export and ``qkvlab``
    on the run agree on every per-item log-likelihood, so on every accuracy and perplexity."""
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")  # lm-eval's hf model imports it
    import qkvlab.hf  # noqa: F401  (registers the native K=V class with the Auto classes)
    from qkvlab.interop.hf_export import export_hf

    names = ["piqa", "arc_easy", "lambada_openai"]
    try:
        for name in names:
            find_data_file(TASKS[name])
    except ConfigError as e:
        pytest.skip(str(e))
    run = save_run(tmp_path / "run", tiny(variant, recipe, max_seq_len=512))
    export_hf(run, tmp_path / "hf")
    manager = TaskManager(include_path=str(TASK_DIR), include_defaults=False)
    tasks = [TASKS[n].harness_name for n in names]
    common = dict(tasks=tasks, limit=6, task_manager=manager, bootstrap_iters=0, log_samples=True)
    ours = lm_eval.simple_evaluate(model="qkvlab", model_args=f"path={run},batch_size=3", device="cpu", **common)
    theirs = lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={tmp_path / 'hf'},dtype=float32,batch_size=3", device="cpu", **common
    )
    for task in tasks:
        a, b = ({k: v for k, v in r["results"][task].items() if isinstance(v, float)} for r in (ours, theirs))
        assert {"acc,none"} <= set(a) and a == pytest.approx(b, rel=1e-4), task
        lls_a = [[r[0] for r in s["filtered_resps"]] for s in ours["samples"][task]]
        lls_b = [[r[0] for r in s["filtered_resps"]] for s in theirs["samples"][task]]
        assert np.allclose(lls_a, lls_b, rtol=1e-4, atol=1e-4), task
