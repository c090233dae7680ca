"""Training configs: plain dataclasses that validate themselves and round-trip through YAML.

A config file is YAML with these sections (every key is optional; see the dataclasses for
defaults)::

    model:                      # a preset plus any GPTConfig field
      preset: tiny
      variant: Q-K=V
    data:   {source: stdlib, tokenizer: byte, max_docs: 2000}
    optim:  {lr: 1.0e-3, betas: [0.9, 0.95], weight_decay: 0.1, grad_clip: 1.0}
    schedule: {warmup_steps: 20, min_lr: 1.0e-4}
    log:    {every: 10, tensorboard: true, progress: true}
    task:   {name: lm}          # what is trained; see below
    batch_size: 16              # global: sequences per micro-step over all processes
    grad_accum: 1
    seq_len: 128
    max_steps: 200              # or max_tokens: 400000 (wins when set)
    out_dir: runs/tiny

Command-line overrides are ``KEY=VALUE`` with a dotted key, the value read as YAML:
``optim.lr=3e-4 model.variant=Q-K=V optim.betas=[0.9,0.99] data.max_docs=null``.
An unknown key is an error that names the nearest valid key and lists the valid ones.

``task`` is a free-form mapping like ``model``: ``name`` picks the task class from the
registry in :mod:`qkvlab.tasks` (``lm``, ``synthetic``, ``vision``, ``anomaly``) and the other
keys are that task's settings, which the task validates; for a task other than ``lm`` the
``model`` keys are validated by the task too, against its own model config (e.g.
:class:`~qkvlab.models.EncoderConfig` for ``synthetic``)::

    task: {name: synthetic, kind: reverse, seq_len: 16, n_train: 10000, n_test: 2000, epochs: 2}

The step budget is ``max_steps``, or ``max_tokens`` when set. A task that counts in passes
over its training set (``task.epochs``) takes its budget from those instead: ``max_tokens`` is
then an error and ``max_steps`` is not used, which a warning says when it is set to anything
but its default. To train such a task for a number of steps, set ``task.epochs=null``.
"""

from __future__ import annotations

import codecs
import copy
import dataclasses
import math
import re
import types
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from qkvlab import tasks
from qkvlab.errors import ConfigError, check_keys
from qkvlab.models.config import GPTConfig
from qkvlab.models.presets import PRESETS

DTYPE_CHOICES = ("auto", "fp32", "bf16")
#: Model keys a run started from a checkpoint (``init_from``) may set: they change how it trains,
#: not what the weights mean.
INIT_FROM_CHANGES = ("dropout", "attn_dropout", "emb_dropout", "backend")
#: Seeds reach numpy, which takes 0 .. 2**32 - 1.
MAX_SEED = 2**32 - 1
DECAY_CHOICES = ("auto", "matrices", "all")
#: Optimizer steps when neither max_steps, max_tokens nor a task's epochs say otherwise.
DEFAULT_MAX_STEPS = 1000
DISTRIBUTED_CHOICES = ("ddp", "fsdp")


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _finite(value: float) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, plus YAML 1.2 floats: ``1e-3`` and ``4E5`` are numbers, and no
    duplicate keys.

    YAML 1.1 (PyYAML) reads an exponent without a decimal point as text, which no user means
    in a config. Quoted scalars stay strings. PyYAML keeps the last of two equal keys in a
    mapping, so a section written twice would silently lose the first one's settings.
    """

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, Any] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # '<<: *base': keys after it may override
                    continue
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                if isinstance(key, typing.Hashable) and key in seen:
                    raise yaml.YAMLError(
                        f"the key {key!r} is written twice (lines {seen[key]} and {line}), and only the second "
                        "would count; write it once, with all its settings"
                    )
                if isinstance(key, typing.Hashable):
                    seen[key] = line
        return super().construct_mapping(node, deep=deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def load_yaml(text: str) -> Any:
    """``yaml.safe_load`` that reads ``1e-3`` as the number it means (see :class:`_Loader`)."""
    return yaml.load(text, Loader=_Loader)  # a SafeLoader subclass: no objects are built


@dataclass
class DataConfig:
    """Where the tokens come from.

    Args:
        source: anything :func:`qkvlab.data.lm.load_lm_data` reads (``"stdlib"``, a text file,
            folder or glob, a local ``datasets`` path), or a ``.npy`` file of token ids that is
            already tokenised (then ``tokenizer`` is unused, the vocabulary is ``max id + 1``
            and the last ``val_fraction`` of the ids is the validation split).
        tokenizer: ``"byte"``, ``"gpt2"`` or ``"bpe"`` (trained on the corpus).
        max_docs: read at most this many documents (None: all).
        val_fraction: share of documents held out for validation.
        vocab_size: vocabulary of a trained BPE tokenizer.
        seed: seed of the train/validation split (kept apart from the training seed, so
            runs with different seeds are scored on the same validation set).
        encoding: text encoding of the corpus files (a Python codec name such as ``latin-1``;
            a UTF-16 or UTF-32 file with a byte-order mark is read as such whatever this says).
        cache_dir: token cache folder (None: the data package's default).
        val_source: a separate validation corpus; ``source`` then trains whole and
            ``val_fraction`` / ``seed`` are unused (a corpus that comes split by book).
        eval_sources: name -> corpus of further evaluation sets (an out-of-domain test set),
            tokenised with the same tokenizer and scored at the end of training as
            ``<name>_loss`` / ``<name>_ppl``.
    """

    source: str = "stdlib"
    tokenizer: str = "byte"
    max_docs: int | None = None
    val_fraction: float = 0.05
    vocab_size: int = 4096
    seed: int = 0
    cache_dir: str | None = None
    encoding: str = "utf-8"
    val_source: str | None = None
    eval_sources: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check(bool(self.source), "data.source must name a corpus, e.g. 'stdlib' or a text file.")
        _check(
            0.0 < self.val_fraction < 1.0,
            f"data.val_fraction must be in (0, 1) (training needs a validation split), got {self.val_fraction}; "
            "the usual is 0.05, or name a separate validation corpus with data.val_source.",
        )
        _check(0 <= self.seed <= MAX_SEED, f"data.seed must be in [0, {MAX_SEED}], got {self.seed}.")
        try:
            # rot13, base64, zlib ... are codecs too, but of bytes to bytes or text to text
            if not codecs.lookup(self.encoding)._is_text_encoding:
                raise LookupError(self.encoding)
        except LookupError:
            raise ConfigError(
                f"data.encoding {self.encoding!r} is not a text encoding; use a Python codec name such as "
                "utf-8, latin-1, cp1252 or utf-16."
            ) from None
        _check(self.max_docs is None or self.max_docs >= 1, f"data.max_docs must be >= 1, got {self.max_docs}.")
        _check(self.vocab_size >= 2, f"data.vocab_size must be >= 2, got {self.vocab_size}.")
        _check(self.val_source is None or bool(self.val_source), "data.val_source must name a corpus, or be null.")
        for name, src in self.eval_sources.items():
            _check(
                re.fullmatch(r"[a-z][a-z0-9_]{0,31}", name) is not None and name not in ("train", "val"),
                f"data.eval_sources key {name!r} must be a lower-case name such as 'dickens' (it names the metrics).",
            )
            _check(bool(src), f"data.eval_sources.{name} must name a corpus, e.g. a text file or .zip.")


@dataclass
class OptimConfig:
    """AdamW. ``grad_clip`` is the max global gradient norm (0 turns clipping off).

    ``decay`` says which parameters get ``weight_decay``: ``"matrices"`` (weights with two or
    more dimensions; biases, norm gains and other 1-D parameters get none), ``"all"`` (every
    parameter, as the paper's training code does), or ``"auto"`` (default): ``"all"`` for a
    model built with the paper's initialisation (``model.init: paper``, the ``paper-*``
    presets), else ``"matrices"``, so a paper preset reproduces the paper's recipe as a whole.
    """

    lr: float = 6e-4
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    decay: str = "auto"

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)
        _check(math.isfinite(self.lr) and self.lr > 0, f"optim.lr must be a positive number, got {self.lr}.")
        _check(all(0.0 <= b < 1.0 for b in self.betas), f"optim.betas must be in [0, 1), got {list(self.betas)}.")
        _check(_finite(self.eps) and self.eps > 0, f"optim.eps must be a positive number, got {self.eps}.")
        _check(
            _finite(self.weight_decay) and self.weight_decay >= 0,
            f"optim.weight_decay must be a number >= 0, got {self.weight_decay}.",
        )
        _check(self.grad_clip >= 0, f"optim.grad_clip must be >= 0 (0 = off), got {self.grad_clip}.")
        _check(
            self.decay in DECAY_CHOICES,
            f"optim.decay must be one of {', '.join(DECAY_CHOICES)}, got {self.decay!r}.",
        )


@dataclass
class ScheduleConfig:
    """Linear warmup over ``warmup_steps``, then by ``kind``:

    - ``"cosine"`` (default): cosine decay to ``min_lr`` at the last step; ``min_lr`` defaults
      to a tenth of ``optim.lr``;
    - ``"multistep"``: PyTorch's MultiStepLR on fractions of the run: the rate is multiplied by
      ``gamma`` at each of ``milestones`` (default 0.5 and 0.75 of the steps, gamma 0.1, as the
      paper's vision code steps it per epoch);
    - ``"constant"``: the peak rate to the end.
    """

    warmup_steps: int = 100
    min_lr: float | None = None
    kind: str = "cosine"
    milestones: list[float] = field(default_factory=lambda: [0.5, 0.75])
    gamma: float = 0.1

    def __post_init__(self) -> None:
        _check(self.warmup_steps >= 0, f"schedule.warmup_steps must be >= 0, got {self.warmup_steps}.")
        _check(
            self.min_lr is None or (_finite(self.min_lr) and self.min_lr >= 0),
            f"schedule.min_lr must be a number >= 0, got {self.min_lr}.",
        )
        _check(
            self.kind in SCHEDULE_KINDS,
            f"schedule.kind must be one of {', '.join(SCHEDULE_KINDS)}, got {self.kind!r}.",
        )
        ms = list(self.milestones)
        _check(
            all(isinstance(m, (int, float)) and 0 < m < 1 for m in ms) and ms == sorted(ms),
            f"schedule.milestones must be increasing fractions of the run in (0, 1), got {self.milestones!r}.",
        )
        _check(0 < self.gamma <= 1, f"schedule.gamma must be in (0, 1], got {self.gamma}.")


SCHEDULE_KINDS = ("cosine", "multistep", "constant")


@dataclass
class LogConfig:
    """``metrics.jsonl`` is always written; TensorBoard event files too when ``tensorboard``
    is on and ``torch.utils.tensorboard`` imports. ``every``: optimizer steps between rows."""

    every: int = 10
    tensorboard: bool = True
    progress: bool = True

    def __post_init__(self) -> None:
        _check(self.every >= 1, f"log.every must be >= 1, got {self.every}.")


SECTIONS: dict[str, type] = {"data": DataConfig, "optim": OptimConfig, "schedule": ScheduleConfig, "log": LogConfig}
MODEL_KEYS = ("preset", *(f.name for f in dataclasses.fields(GPTConfig)))
# Keys that may change when a run resumes: they do not change what is computed, except
# optim.lr, which may be lowered to continue a diverged run from its last good checkpoint (the
# trainer says so and records the change in config.yaml).
RESUMABLE_CHANGES = (
    "optim.lr",
    "out_dir",
    "device",
    "compile",
    "distributed",
    "eval_every",
    "eval_batches",
    "final_eval_batches",
    "ckpt_every",
    "keep_checkpoints",
    "log.every",
    "log.tensorboard",
    "log.progress",
    "data.cache_dir",
)


@dataclass
class TrainConfig:
    """Everything one training run needs.

    Args:
        model: ``preset`` (a name from :data:`qkvlab.models.PRESETS`, or None for GPTConfig's
            defaults) plus any :class:`~qkvlab.models.GPTConfig` field, e.g. ``variant``.
            ``vocab_size`` defaults to the tokenizer's, ``max_seq_len`` to ``seq_len``.
        batch_size: sequences per micro-step over *all* processes (the global micro-batch);
            each of W processes takes ``batch_size / W``, so results do not depend on W.
        grad_accum: micro-steps per optimizer step. Tokens per step:
            ``batch_size * grad_accum * seq_len``.
        max_steps: optimizer steps; ``max_tokens``, when set, replaces it (rounded up to
            whole steps). Not used by a task that sets ``task.epochs`` (a warning says so).
        eval_every: steps between validation passes (0: only at the end), each over
            ``eval_batches`` batches of fixed windows of the validation split.
        final_eval_batches: batches of the last validation pass and of each
            ``data.eval_sources`` set (None: ``eval_batches``); a large value scores the whole set.
        ckpt_every: steps between checkpoints (0: only at the end); the newest
            ``keep_checkpoints`` are kept.
        device: ``"auto"`` (CUDA if present, else CPU), ``"cpu"``, ``"cuda"``.
        dtype: ``"auto"`` (bf16 autocast on GPU, fp32 on CPU), ``"fp32"`` or ``"bf16"``.
        compile: ``torch.compile`` the training loss (model + loss in one graph; the model
            alone under DDP / FSDP) and the model for evaluation.
        distributed: under torchrun, ``"ddp"`` (replicated) or ``"fsdp"`` (FSDP2, sharded).
        task: ``name`` (default ``"lm"``: next-token prediction on ``data``) plus the task's own
            settings; see :mod:`qkvlab.tasks`. A task may set its own step budget (the
            synthetic task's ``epochs``); :attr:`total_steps` is the language model's.
        init_from: a qkvlab weights file (or a run folder holding ``model.safetensors``) that a
            new run starts from instead of a random initialisation: uptraining a converted or
            imported model. The model is the checkpoint's (``model.preset`` is not used); other
            ``model`` keys must agree with it, except the dropout rates and the backend.
    """

    model: dict[str, Any] = field(default_factory=lambda: {"preset": "tiny"})
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    log: LogConfig = field(default_factory=LogConfig)
    task: dict[str, Any] = field(default_factory=lambda: {"name": "lm"})
    batch_size: int = 32
    grad_accum: int = 1
    seq_len: int = 128
    max_steps: int = DEFAULT_MAX_STEPS
    max_tokens: int | None = None
    eval_every: int = 100
    eval_batches: int = 20
    final_eval_batches: int | None = None
    ckpt_every: int = 0
    keep_checkpoints: int = 2
    out_dir: str = "runs/train"
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"
    compile: bool = False
    distributed: str = "ddp"
    init_from: str | None = None

    def __post_init__(self) -> None:
        for name, cls in SECTIONS.items():
            if not isinstance(getattr(self, name), cls):
                raise ConfigError(f"{name} must be a {cls.__name__}; build configs with TrainConfig.from_dict.")
        for name in ("batch_size", "grad_accum", "seq_len", "max_steps", "eval_batches", "keep_checkpoints"):
            _check(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}.")
        for name in ("eval_every", "ckpt_every"):
            _check(getattr(self, name) >= 0, f"{name} must be >= 0 (0 = only at the end), got {getattr(self, name)}.")
        _check(
            self.final_eval_batches is None or self.final_eval_batches >= 1,
            f"final_eval_batches must be >= 1 (or null: eval_batches), got {self.final_eval_batches}.",
        )
        _check(self.max_tokens is None or self.max_tokens >= 1, f"max_tokens must be >= 1, got {self.max_tokens}.")
        _check(self.dtype in DTYPE_CHOICES, f"dtype must be one of {', '.join(DTYPE_CHOICES)}; got {self.dtype!r}.")
        _check(
            self.distributed in DISTRIBUTED_CHOICES,
            f"distributed must be one of {', '.join(DISTRIBUTED_CHOICES)}; got {self.distributed!r}.",
        )
        _check(
            re.fullmatch(r"auto|cpu|cuda(:[0-9]+)?", self.device) is not None,
            f"device must be 'auto', 'cpu' or 'cuda[:N]', got {self.device!r}.",
        )
        _check(0 <= self.seed <= MAX_SEED, f"seed must be in [0, {MAX_SEED}], got {self.seed}.")
        _check(isinstance(self.task, dict), f"task must be a mapping such as {{name: lm}}, got {self.task!r}.")
        name = tasks.task_name(self.task)
        preset = self.model.get("preset")
        if preset is not None and (not isinstance(preset, str) or preset not in PRESETS):
            raise ConfigError(f"Unknown model.preset {preset!r}; available: {', '.join(PRESETS)}.")
        if name != "lm":
            _check(self.init_from is None, f"init_from is for the language model; the {name!r} task cannot use it.")
            tasks.check_config(self)  # the task validates its settings and its model section
            self._check_epoch_budget()
            return
        _check(self.init_from is None or bool(self.init_from), "init_from must name a weights file, or be null.")
        check_keys("task", self.task, ["name"])
        check_keys("model", self.model, MODEL_KEYS)
        self.model_config()  # a bad variant or shape fails here, before any data is read

    def _check_epoch_budget(self) -> None:
        """A task's ``epochs`` set its step budget: say so when ``max_steps`` asks for another.

        A warning, not an error: a config saved by a run holds every key, so a default
        ``max_steps`` cannot be told from one written by hand (the tasks refuse ``max_tokens``).
        """
        epochs = self.task.get("epochs")
        if epochs is not None and self.max_steps != DEFAULT_MAX_STEPS:
            warnings.warn(
                f"max_steps={self.max_steps} is not used: task.epochs={epochs!r} sets the step budget of the "
                f"{self.task_name!r} task; drop max_steps, or set task.epochs=null to train for max_steps.",
                UserWarning,
                stacklevel=1,
            )

    # ------------------------------------------------------------- derived
    @property
    def task_name(self) -> str:
        return self.task.get("name", "lm")

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.grad_accum * self.seq_len

    @property
    def total_steps(self) -> int:
        if self.max_tokens is not None:
            return math.ceil(self.max_tokens / self.tokens_per_step)
        return self.max_steps

    @property
    def min_lr(self) -> float:
        return self.optim.lr / 10 if self.schedule.min_lr is None else self.schedule.min_lr

    def model_config(self, vocab_size: int | None = None) -> GPTConfig:
        """The resolved model config; ``vocab_size`` is the tokenizer's (None: not known yet).

        An explicit ``model.vocab_size`` wins but must hold the tokenizer's vocabulary;
        otherwise the model gets exactly the tokenizer's. ``max_seq_len`` defaults to ``seq_len``.
        """
        if self.init_from is not None:
            return self._checkpoint_model_config(vocab_size)
        fields = {k: v for k, v in self.model.items() if k != "preset"}
        base = dict(PRESETS[self.model["preset"]]) if self.model.get("preset") else {}
        explicit_vocab = fields.get("vocab_size")
        if explicit_vocab is not None and vocab_size is not None and explicit_vocab < vocab_size:
            raise ConfigError(
                f"model.vocab_size={explicit_vocab} is smaller than the tokenizer's vocabulary ({vocab_size}); "
                "remove model.vocab_size (it defaults to the tokenizer's) or raise it."
            )
        if explicit_vocab is None and vocab_size is not None:
            fields["vocab_size"] = vocab_size
        fields.setdefault("max_seq_len", self.seq_len)
        if fields["max_seq_len"] < self.seq_len:
            raise ConfigError(
                f"model.max_seq_len={fields['max_seq_len']} is shorter than seq_len={self.seq_len}; "
                "raise model.max_seq_len or lower seq_len."
            )
        return GPTConfig(**{**base, **fields})

    def init_weights_file(self) -> Path:
        """The weights file ``init_from`` names (a run folder means its ``model.safetensors``)."""
        path = Path(str(self.init_from)).expanduser()
        if path.is_dir():
            path = path / "model.safetensors"
        if not path.is_file():
            raise ConfigError(
                f"init_from={self.init_from!r}: no weights file there; name a model.safetensors or a run folder "
                "holding one (qkvlab import / convert write such folders)."
            )
        return path

    def _checkpoint_model_config(self, vocab_size: int | None) -> GPTConfig:
        from qkvlab.checkpoint import checkpoint_config

        path = self.init_weights_file()
        stored = checkpoint_config(path)
        if not isinstance(stored, GPTConfig):
            raise ConfigError(f"init_from={self.init_from!r} holds a {stored.family!r} model, not a language model.")
        merged = stored.to_dict()
        for key, value in self.model.items():
            if key == "preset":
                continue
            if key in INIT_FROM_CHANGES:
                merged[key] = value
                continue
            asked = GPTConfig.from_dict({**stored.to_dict(), key: value}).to_dict()[key]
            if asked != merged[key]:
                raise ConfigError(
                    f"model.{key}={value!r} differs from the checkpoint init_from={self.init_from!r} "
                    f"({merged[key]!r}); remove model.{key} (the model is the checkpoint's), or convert the "
                    "checkpoint first (qkvlab convert)."
                )
        cfg = GPTConfig.from_dict(merged)
        if vocab_size is not None and vocab_size > cfg.vocab_size:
            raise ConfigError(
                f"The tokenizer's vocabulary ({vocab_size}) is larger than the checkpoint's ({cfg.vocab_size}); "
                f"train with the checkpoint's own tokenizer (data.tokenizer: bpe:<its run folder>/tokenizer)."
            )
        if cfg.max_seq_len < self.seq_len:
            raise ConfigError(
                f"seq_len={self.seq_len} is longer than the checkpoint's max_seq_len ({cfg.max_seq_len}); "
                "lower seq_len."
            )
        return cfg

    # ------------------------------------------------------------- dict / YAML
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["optim"]["betas"] = list(self.optim.betas)
        return d

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> TrainConfig:
        """Build and validate a config; unknown keys and wrong types raise :class:`ConfigError`."""
        d = dict(d or {})
        for name, example in (
            ("model", "{preset: tiny, variant: Q-K=V}"),
            ("task", "{name: synthetic, kind: reverse}"),
        ):
            if name in d:  # free-form sections: given keys go over the defaults (`preset: null`: GPTConfig's)
                value = d[name]
                _check(
                    value is None or isinstance(value, dict),
                    f"{name} must be a mapping such as {example}, got {value!r}.",
                )
                d[name] = {**cls.__dataclass_fields__[name].default_factory(), **(value or {})}
        return _section("", cls, d)

    def diff(self, other: TrainConfig) -> list[str]:
        """Dotted keys whose values differ between two configs."""
        return sorted(_flat_diff(self.to_dict(), other.to_dict()))


def data_config(value: Any) -> DataConfig:
    """A :class:`DataConfig` from a mapping read from a file (a checkpoint's record, say), checked
    like a config file's ``data`` section: unknown keys and wrong types raise :class:`ConfigError`."""
    return _section("data", DataConfig, value)


def _section(name: str, cls: type, value: Any) -> Any:
    """The dataclass ``cls`` from the mapping ``value`` found at dotted key ``name`` ("": the top level)."""
    if value is None:
        return cls()
    _check(isinstance(value, dict), f"{name} must be a mapping of keys to values, got {value!r}.")
    check_keys(name, value, [f.name for f in dataclasses.fields(cls)])
    hints = typing.get_type_hints(cls)
    return cls(**{k: _coerce(f"{name}.{k}" if name else k, v, hints[k]) for k, v in value.items()})


_EXPECTED = {
    int: "an integer",
    float: "a number",
    bool: "true or false",
    str: "a string",
    list: "a list",
    dict: "a mapping of names to values",
}


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """``value`` checked against the annotation ``tp``: int, float, bool, str, ``X | None``, lists,
    tuples, dicts and config sections (dataclasses). A whole float is an int (``max_tokens=1e6``)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (types.UnionType, typing.Union):  # `X | None`
        if value is None and type(None) in args:
            return None
        return _coerce(key, value, next(a for a in args if a is not type(None)))
    if dataclasses.is_dataclass(tp):
        return _section(key, tp, value)
    if tp is Any or args == (str, Any):  # free-form (model, task): their owners check the keys
        return value
    number = isinstance(value, int | float) and not isinstance(value, bool)
    if tp is float and number:
        return float(value)
    if tp is int and number and (isinstance(value, int) or value.is_integer()):
        return int(value)
    if tp in (bool, str) and isinstance(value, tp):
        return value
    if origin is dict and isinstance(value, dict):
        return {_coerce(f"{key}.<key>", k, args[0]): _coerce(f"{key}.{k}", v, args[1]) for k, v in value.items()}
    if origin in (list, tuple) and isinstance(value, list | tuple):
        item_types = args * len(value) if origin is list else args
        if len(value) == len(item_types):
            return origin(_coerce(f"{key}[{i}]", v, t) for i, (v, t) in enumerate(zip(value, item_types, strict=True)))
    expected = f"a list of {len(args)} numbers" if origin is tuple else _EXPECTED.get(origin or tp, str(tp))
    raise ConfigError(f"{key} must be {expected}, got {value!r} ({type(value).__name__}).")


def _flat_diff(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> set[str]:
    out: set[str] = set()
    for key in set(a) | set(b):
        full = f"{prefix}{key}"
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            out |= _flat_diff(va, vb, full + ".")
        elif va != vb:
            out.add(full)
    return out


# ------------------------------------------------------------------ overrides
def parse_value(text: str) -> Any:
    """A command-line value read as YAML like a config file's (``3e-4`` a number, ``null`` None,
    ``[1,2]`` a list, ``'3'`` a string); text that is not YAML (``[1,2``) stays text."""
    try:
        return load_yaml(text)
    except yaml.YAMLError:
        return text


def parse_override(item: str) -> tuple[str, Any]:
    """``"optim.lr=3e-4"`` -> ``("optim.lr", 0.0003)``: the key up to the first ``=``, the rest a YAML value."""
    key, sep, text = str(item).partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"Override {item!r} is not KEY=VALUE; write a dotted key and a value, e.g. optim.lr=3e-4.")
    return key.strip(), parse_value(text)


def get_dotted(config: dict[str, Any], key: str) -> Any:
    """``config["a"]["b"]`` for ``key="a.b"``; None when a section or the key is missing."""
    node: Any = config
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def set_dotted(config: dict[str, Any], key: str, value: Any) -> None:
    """Set ``config["a"]["b"] = value`` for ``key="a.b"``, creating sections as needed."""
    parts = key.split(".")
    node = config
    for i, part in enumerate(parts[:-1]):
        if node.get(part) is None:
            node[part] = {}
        if not isinstance(node[part], dict):
            raise ConfigError(f"Cannot set {key!r}: {'.'.join(parts[: i + 1])!r} is a value, not a section.")
        node = node[part]
    node[parts[-1]] = value


def apply_overrides(d: dict[str, Any], overrides: typing.Iterable[str]) -> dict[str, Any]:
    """A copy of the config dict ``d`` with each ``dotted.key=value`` override set."""
    out = copy.deepcopy(d)
    for item in overrides:
        set_dotted(out, *parse_override(item))
    return out


def load_config(path: str | Path | None = None, overrides: typing.Iterable[str] = ()) -> TrainConfig:
    """Read a YAML config (None: all defaults), apply ``KEY=VALUE`` overrides, validate."""
    d: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"No config file at {str(path)!r}; pass a YAML file such as configs/lm/tiny-stdlib.yaml.")
        try:
            loaded = load_yaml(path.read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise ConfigError(f"Cannot parse config {str(path)!r}: {e}".replace("\n", " ")) from None
        except OSError as e:
            raise ConfigError(f"Cannot read config {str(path)!r}: {e.strerror or e}.") from None
        if loaded is None:  # an empty file is a mistake, never "all defaults" (a 1000-step run)
            raise ConfigError(
                f"Config {str(path)!r} is empty; give at least the keys you mean, e.g. start from "
                "configs/lm/tiny-stdlib.yaml (write {} for all defaults)."
            )
        if not isinstance(loaded, dict):
            raise ConfigError(f"Config {str(path)!r} must be a YAML mapping of keys to values.")
        d = loaded
    return TrainConfig.from_dict(apply_overrides(d, overrides))
