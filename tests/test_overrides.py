"""Command-line overrides: ``KEY=VALUE`` with a dotted key, the value read as YAML like a config file's,
coerced to the config dataclasses' field types; every mistake is one line naming the key, the value
and what to write instead."""

from __future__ import annotations

import math

import pytest

from qkvlab.errors import ConfigError
from qkvlab.study.spec import SweepSpec
from qkvlab.train.config import TrainConfig, apply_overrides, load_config, load_yaml, parse_override, parse_value

SYNTHETIC = ["task.name=synthetic", "task.kind=reverse", "task.seq_len=6", "task.n_train=16", "task.n_test=8"]
SYNTHETIC_MODEL = ["model.preset=null", "model.d_model=16", "model.n_layers=1", "model.n_heads=2"]


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("3e-4", 3e-4),  # YAML 1.1 reads an exponent without a point as text; a config means a number
        ("1E5", 1e5),
        ("-1e-3", -1e-3),
        ("1.e5", 1e5),
        ("1e-3", 1e-3),
        ("3", 3),
        ("3.0", 3.0),
        ("null", None),
        ("~", None),
        ("", None),
        ("true", True),
        ("false", False),
        ("yes", True),
        ("[1,2]", [1, 2]),
        ("[1e-3, 2e-3]", [1e-3, 2e-3]),  # inside a list too
        ("{a: 1e-3}", {"a": 1e-3}),
        ("Q-K=V", "Q-K=V"),
        ("Q=K=V", "Q=K=V"),
        ("9.85M", "9.85M"),  # a token count with a suffix stays text (the sweep's parse_tokens reads it)
        ("'3'", "3"),  # quoted: a string, as in a config file
        ("abc", "abc"),
    ],
)
def test_values_are_read_as_yaml_like_a_config_file(text, value):
    assert parse_value(text) == value and type(parse_value(text)) is type(value)
    assert load_yaml(f"key: {text}")["key"] == value  # the same value a config file gives


def test_the_key_ends_at_the_first_equals_sign():
    assert parse_override("model.variant=Q-K=V") == ("model.variant", "Q-K=V")
    assert parse_override(" optim.lr = 3e-4") == ("optim.lr", 3e-4)
    assert parse_override("data.max_docs=") == ("data.max_docs", None)
    assert parse_override("data.source=[1,2") == ("data.source", "[1,2")  # not YAML: the text itself


def test_overrides_reach_nested_sections_and_keep_the_rest():
    base = {"optim": {"lr": 1.0, "eps": 1e-7}, "data": {"eval_sources": {"a": "a.txt"}}}
    d = apply_overrides(base, ["optim.lr=3e-4", "data.eval_sources.b=b.txt", "model.variant=Q-K=V", "log.progress=no"])
    assert d == {
        "optim": {"lr": 3e-4, "eps": 1e-7},
        "data": {"eval_sources": {"a": "a.txt", "b": "b.txt"}},
        "model": {"variant": "Q-K=V"},
        "log": {"progress": False},
    }
    assert base["optim"]["lr"] == 1.0 and "b" not in base["data"]["eval_sources"]  # the input is not changed
    assert apply_overrides({"optim": None}, ["optim.lr=1"]) == {"optim": {"lr": 1}}  # `optim: null` is a section


def test_values_get_the_field_types():
    cfg = load_config(
        None,
        [
            "optim.lr=1",  # an int where a float is meant: a float, so the resolved config (and run id) is the same
            "max_tokens=1e6",  # a whole float where an int is meant: an int
            "eval_every=1e2",
            "optim.betas=[8e-1,0.99]",  # a list where a tuple is meant
            "schedule.milestones=[3e-1,6e-1]",
            "data.max_docs=null",
            "data.eval_sources={dickens: d.txt}",
            "final_eval_batches=null",
            "log.tensorboard=false",
            "model.variant=Q-K=V",
        ],
    )
    assert cfg.optim.lr == 1.0 and type(cfg.optim.lr) is float
    assert cfg.max_tokens == 1_000_000 and type(cfg.max_tokens) is int
    assert cfg.eval_every == 100 and type(cfg.eval_every) is int
    assert cfg.optim.betas == (0.8, 0.99) and cfg.schedule.milestones == [0.3, 0.6]
    assert (
        cfg.data.max_docs is None and cfg.data.eval_sources == {"dickens": "d.txt"} and cfg.final_eval_batches is None
    )
    assert cfg.log.tensorboard is False and cfg.model == {"preset": "tiny", "variant": "Q-K=V"}
    assert cfg == TrainConfig.from_dict(cfg.to_dict())


def test_model_and_task_keys_go_over_their_defaults():
    assert TrainConfig.from_dict({"model": {"variant": "Q-K=V"}}).model == {"preset": "tiny", "variant": "Q-K=V"}
    assert TrainConfig.from_dict({"model": None, "task": None}) == TrainConfig()
    assert TrainConfig.from_dict({"model": {"preset": None}}).model == {"preset": None}  # GPTConfig's defaults
    assert TrainConfig.from_dict({"task": {}}).task == {"name": "lm"}


def test_task_epochs_null_trains_for_max_steps():
    epochs = load_config(None, [*SYNTHETIC, *SYNTHETIC_MODEL, "task.epochs=2"])
    steps = load_config(None, [*SYNTHETIC, *SYNTHETIC_MODEL, "task.epochs=null", "max_steps=7"])
    assert epochs.task["epochs"] == 2 and steps.task["epochs"] is None and steps.total_steps == 7


def test_sweep_overrides_read_values_as_the_command_line_does():
    base = {"model": {"preset": "tiny"}}
    items = ["optim.lr=3e-4", "model.variant=Q-K=V", "optim.betas=[8e-1,0.99]", "data.max_docs=null"]
    listed = SweepSpec.from_dict({"base": base, "grid": {"seed": [0]}, "overrides": items}).overrides
    assert listed == dict(parse_override(item) for item in items)
    assert listed == {"optim.lr": 3e-4, "model.variant": "Q-K=V", "optim.betas": [0.8, 0.99], "data.max_docs": None}


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["optim.lr"], "Override 'optim.lr' is not KEY=VALUE; write a dotted key and a value, e.g. optim.lr=3e-4."),
        (["=3"], "Override '=3' is not KEY=VALUE; write a dotted key and a value, e.g. optim.lr=3e-4."),
        (["seq_len=3", "seq_len.x=1"], "Cannot set 'seq_len.x': 'seq_len' is a value, not a section."),
        (["optim.lr=abc"], "optim.lr must be a number, got 'abc' (str)."),
        (["optim.lr=true"], "optim.lr must be a number, got True (bool)."),
        (["optim.lr=null"], "optim.lr must be a number, got None (NoneType)."),
        (["max_tokens=1.5"], "max_tokens must be an integer, got 1.5 (float)."),
        (["max_tokens=9.85M"], "max_tokens must be an integer, got '9.85M' (str)."),
        (["max_tokens=.inf"], "max_tokens must be an integer, got inf (float)."),
        (["batch_size=true"], "batch_size must be an integer, got True (bool)."),
        (["data.max_docs=abc"], "data.max_docs must be an integer, got 'abc' (str)."),
        (["log.progress=maybe"], "log.progress must be true or false, got 'maybe' (str)."),
        (["compile=0"], "compile must be true or false, got 0 (int)."),
        (["out_dir=123"], "out_dir must be a string, got 123 (int)."),
        (["optim.betas=[0.9]"], "optim.betas must be a list of 2 numbers, got [0.9] (list)."),
        (["optim.betas=[a,b]"], "optim.betas[0] must be a number, got 'a' (str)."),
        (["schedule.milestones=0.5"], "schedule.milestones must be a list, got 0.5 (float)."),
        (
            ["data.eval_sources=[a, b]"],
            "data.eval_sources must be a mapping of names to values, got ['a', 'b'] (list).",
        ),
        (["data.eval_sources={d: 3}"], "data.eval_sources.d must be a string, got 3 (int)."),
        (["data.eval_sources={3: a}"], "data.eval_sources.<key> must be a string, got 3 (int)."),
        (["optim=3"], "optim must be a mapping of keys to values, got 3."),
        (["model=3"], "model must be a mapping such as {preset: tiny, variant: Q-K=V}, got 3."),
        (["task=3"], "task must be a mapping such as {name: synthetic, kind: reverse}, got 3."),
        (["optim.lrr=1"], "Unknown config key 'optim.lrr'. Did you mean 'optim.lr'? Valid keys under 'optim': lr, "),
        (["batch_sise=4"], "Unknown config key 'batch_sise'. Did you mean 'batch_size'? Valid keys at the top level: "),
        (["model.varaint=QKV"], "Unknown config key 'model.varaint'. Did you mean 'model.variant'? Valid keys under "),
        (["task.epochs=null"], "Unknown config key 'task.epochs'. Valid keys under 'task': name."),
    ],
)
def test_each_mistake_is_one_line_naming_the_key_and_value(overrides, message):
    with pytest.raises(ConfigError) as caught:
        load_config(None, overrides)
    text = str(caught.value)
    assert text.startswith(message) and "\n" not in text, text


def test_sweep_override_mistakes_are_the_same_line():
    for items, message in (
        (["optim.lr"], "Override 'optim.lr' is not KEY=VALUE"),
        ([3], "Override 3 is not KEY=VALUE"),
    ):
        with pytest.raises(ConfigError, match=message):
            SweepSpec.from_dict({"base": {}, "grid": {"seed": [0]}, "overrides": items})


def test_dict_configs_are_checked_like_overrides():
    with pytest.raises(ConfigError, match=r"^max_steps must be an integer, got '5' \(str\)\.$"):
        TrainConfig.from_dict({"max_steps": "5"})
    with pytest.raises(ConfigError, match=r"^optim must be a mapping of keys to values, got \[1\]\.$"):
        TrainConfig.from_dict({"optim": [1]})
    with pytest.raises(ConfigError, match=r"^Unknown config key 'model\.1'\. Valid keys under 'model': preset, "):
        TrainConfig.from_dict({"model": {1: 2}})
    assert TrainConfig.from_dict({"max_steps": 5.0}).max_steps == 5
    assert TrainConfig.from_dict({"optim": {"betas": (0.8, 0.9)}}).optim.betas == (0.8, 0.9)
    assert math.isclose(TrainConfig.from_dict({"optim": {"lr": 3e-4}}).optim.lr, 3e-4)
