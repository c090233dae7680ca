"""The training loop: one code path from a laptop CPU to ``torchrun`` on many GPUs.

:func:`train` runs a :class:`TrainConfig`. What is trained is a :class:`Task`: it builds the
model, hands out batches, computes the loss and evaluates. :class:`~qkvlab.tasks.lm.LMTask`
(packed token windows, next-token cross-entropy, validation loss and perplexity) is the one
every GPT variant uses; the config's ``task`` section picks another from :mod:`qkvlab.tasks`
(synthetic, vision, anomaly), or a :class:`Task` object is passed in. Where the process runs
(device, dtype, rank) is a :class:`~qkvlab.train.context.RunContext`.

Each optimizer step runs ``grad_accum`` micro-batches (gradients synchronised on the last
only), clips the global gradient norm, sets the warmup + cosine learning rate and steps
AdamW. Under torchrun the model is wrapped in DDP or FSDP2 (``distributed``); every process
takes its share of each global batch, so the numbers do not depend on the process count.
Process 0 writes ``config.yaml`` and ``run.json`` at the start, a ``metrics.jsonl`` row per
log or eval step, checkpoints, and at the end ``model.safetensors`` and ``summary.json``: the
run's :class:`RunResult` (metrics, the trained model's resolved config, family and costs, the
code version), complete enough that a results row is that and the grid point's labels. The
run folder's files are :mod:`qkvlab.train.state`'s; devices, DDP and FSDP are
:mod:`qkvlab.train.context`'s.

Example::

    from qkvlab.train import load_config, train
    summary = train(load_config("configs/lm/tiny-stdlib.yaml", ["model.variant=Q-K=V"]))
"""

from __future__ import annotations

import contextlib
import inspect
import json
import math
import os
import platform
import random
import statistics
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist
from safetensors import SafetensorError
from torch import nn
from tqdm.auto import tqdm

from qkvlab import tasks
from qkvlab.errors import ConfigError
from qkvlab.provenance import code_version, environment, now
from qkvlab.tasks.lm import LMSplits as LMSplits  # the LM task's names, importable from here too
from qkvlab.tasks.lm import LMTask as LMTask
from qkvlab.tasks.lm import evaluate_lm as evaluate_lm
from qkvlab.tasks.lm import load_splits as load_splits
from qkvlab.train import state as ckpt
from qkvlab.train.config import RESUMABLE_CHANGES, TrainConfig
from qkvlab.train.context import RunContext, gradient_sync, setup_context, wrap_model
from qkvlab.train.state import RUN_FILES, MetricsLog, clear_run, save_tokenizer

Batch = Any


# ================================================================== tasks
class BatchSource(Protocol):
    """An endless, resumable stream of this process's batches.

    Process 0's ``state_dict`` is saved for every process, so it must describe the position
    in the *global* stream (as :class:`PackedBatches` does: it counts global batches).
    """

    def next(self) -> Batch: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class Task(Protocol):
    """What the trainer trains: a model, its batches, its loss and its evaluation.

    ``loss`` returns the mean loss of one batch (already on the device); ``evaluate``
    returns metrics whose names start with ``val_`` and must be the same on every process
    (sum partial results with ``ctx.sum``); ``count`` is the batch's size in the units of
    throughput and of ``max_tokens`` (tokens for language models, scored positions for
    labelling tasks). ``info`` goes into ``run.json``.

    Optional: ``metric_keys`` (the ``val_`` names that get a column of their own in
    ``metrics.jsonl``), ``total_steps(config)`` (the step budget, when the task sets it, e.g.
    by epochs) and ``count_per_step(config)`` (counted units per optimizer step).
    """

    def build_model(self) -> nn.Module: ...
    def batches(self, batch_size: int, *, seed: int, ctx: RunContext) -> BatchSource: ...
    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor: ...
    def count(self, batch: Batch) -> int: ...
    def evaluate(self, model: nn.Module, *, batch_size: int, max_batches: int, ctx: RunContext) -> dict[str, float]: ...
    def info(self) -> dict[str, Any]: ...


# ================================================================== pieces of the loop
class RunStopped(Exception):
    """A run stopped on request (:func:`request_stop`) after saving a checkpoint of the step it
    reached: resuming it (``resume=True``, ``qkvlab train --resume``) continues from there."""

    def __init__(self, out_dir: str | os.PathLike, step: int, total: int):
        self.out_dir, self.step, self.total = str(out_dir), step, total
        super().__init__(f"stopped at step {step} of {total} with a checkpoint in {self.out_dir!r}; resume to continue")


_stop = threading.Event()


def request_stop(stop: bool = True) -> None:
    """Ask the run training in this process to save a checkpoint after its current step and raise
    :class:`RunStopped` (``stop=False`` withdraws a request no run has answered yet). Safe from a
    signal handler or another thread (a sweep's time limit uses both); a run not yet in its
    training loop stops before its first step. Honoured by a single-process run only: the
    processes of a distributed run would each stop at a step of their own."""
    if stop:
        _stop.set()
    else:
        _stop.clear()


def lr_at(
    step: int,
    *,
    lr: float,
    min_lr: float,
    warmup: int,
    total: int,
    kind: str = "cosine",
    milestones: Sequence[float] = (0.5, 0.75),
    gamma: float = 0.1,
) -> float:
    """Learning rate of optimizer step ``step`` (0-based) of ``total``: linear warmup to ``lr``
    over ``warmup`` steps, then (``kind``) cosine decay that reaches ``min_lr`` at the last step,
    a step decay by ``gamma`` at each of ``milestones`` (fractions of ``total``, rounded to
    steps: PyTorch's MultiStepLR), or the constant ``lr``."""
    if step < warmup:
        return lr * (step + 1) / warmup
    if kind == "constant":
        return lr
    if kind == "multistep":
        return lr * gamma ** sum(step >= round(m * total) for m in milestones)
    progress = min(1.0, (step - warmup) / max(1, total - 1 - warmup))
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def decay_rule(model: nn.Module, config: TrainConfig) -> str:
    """``optim.decay`` resolved: ``"auto"`` follows the model's initialisation (see OptimConfig)."""
    if config.optim.decay != "auto":
        return config.optim.decay
    return "all" if getattr(getattr(model, "config", None), "init", None) == "paper" else "matrices"


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW; weight decay on every parameter or on weight matrices only (:func:`decay_rule`)."""
    decay_all = decay_rule(model, config) == "all"
    decay, no_decay = [], []
    for p in model.parameters():  # tied parameters appear once
        if p.requires_grad:
            (decay if decay_all or p.dim() >= 2 else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": config.optim.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    o = config.optim
    return torch.optim.AdamW(groups, lr=o.lr, betas=o.betas, eps=o.eps, foreach=True)


def _to_device(batch: Batch, device: torch.device) -> Batch:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, tuple | list):
        return type(batch)(_to_device(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    return batch


def _get(d: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        d = d.get(part) if isinstance(d, dict) else None
    return d


def _first_line(e: BaseException) -> str:
    return (str(e).splitlines() or [type(e).__name__])[0]


def reads_every_step(device: torch.device) -> bool:
    """Whether the loop reads each step's loss at once (see :meth:`Trainer.check_steps`): on a
    CPU reading costs nothing; on a GPU it would make the host wait for every step."""
    return device.type != "cuda"


def total_steps(config: TrainConfig, task: Task) -> int:
    """Optimizer steps of the run: the task's own budget when it sets one, else the config's."""
    fn = getattr(task, "total_steps", None)
    return int(fn(config)) if fn is not None else config.total_steps


def count_per_step(config: TrainConfig, task: Task) -> int:
    """Counted units (tokens, scored positions) per optimizer step."""
    fn = getattr(task, "count_per_step", None)
    return int(fn(config)) if fn is not None else config.tokens_per_step


def run_info(config: TrainConfig, ctx: RunContext, task: Task, n_params: int) -> dict[str, Any]:
    """Code version, library versions and hardware, saved as ``run.json`` next to the config."""
    commit, dirty = code_version()
    env = environment()
    return {
        "started": now(),
        "argv": sys.argv,
        "git": {"commit": commit, "dirty": dirty},
        "versions": env["versions"],
        "hardware": {**env["hardware"], "device": str(ctx.device), "world_size": ctx.world_size},
        "params": n_params,
        "total_steps": total_steps(config, task),
        "tokens_per_step": count_per_step(config, task),
        "amp_dtype": str(ctx.amp_dtype).removeprefix("torch.") if ctx.amp_dtype else "fp32",
        **task.info(),
    }


# ================================================================== the result
def is_metric(key: str) -> bool:
    """An evaluation metric of a summary: ``val_*`` and any ``*_loss``, ``*_ppl``, ``*_tokens``."""
    return key.startswith("val_") or key.endswith(("_loss", "_ppl", "_tokens"))


#: Hardware measurements of a run (:meth:`Trainer._throughput`).
THROUGHPUT_KEYS = ("device_name", "peak_memory_gib", "flops_per_token", "mfu", "steady_tokens_per_s", "steady_mfu")
#: Measurements a results row carries when the run reports them (the demo adds decoding speed).
ROW_EXTRAS = ("decode_tokens_per_s", "world_size", "device_name", "peak_memory_gib", "flops_per_token", "mfu",
              "steady_tokens_per_s", "steady_mfu")  # fmt: skip
#: The cost fields of a row whose model qkvlab cannot count (a task's own model).
NO_COSTS = ("params_total", "params_attention", "kv_cache_bytes_per_token", "cache_reduction", "kv_cache_dtype")


@dataclass
class RunResult:
    """What a finished run reports, typed: what it measured, the model it trained (resolved
    config, family and costs, from :func:`qkvlab.costs.model_costs`) and the code it ran.

    :meth:`summary` is the flat dict :func:`train` returns and ``summary.json`` holds;
    :meth:`from_summary` reads one back (from a worker process, or from a ``run_fn`` that
    reports less; keys it does not know stay in ``extra``); :meth:`row` is the run's part of a
    results row (:mod:`qkvlab.study.results`), which the sweep completes with the grid point's
    labels, the train config and the timing, and never recomputes.

    Example::

        result = RunResult.from_summary(train(config))
        result.costs["kv_cache_bytes_per_token"], result.model_family, result.git_commit
    """

    out_dir: str | None = None
    steps: int | None = None
    tokens: int | None = None
    params: int | None = None
    train_loss: float | None = None
    metrics: dict[str, Any] = field(default_factory=dict)  # the last evaluation (val_loss, val_ppl, <set>_ppl, ...)
    train_tokens_per_s: float | None = None
    train_time_s: float | None = None
    world_size: int | None = None
    throughput: dict[str, Any] = field(default_factory=dict)  # THROUGHPUT_KEYS
    model_config: dict[str, Any] | None = None  # the model's resolved config (to_dict)
    model_family: str | None = None  # gpt, encoder, vit, set
    costs: dict[str, Any] = field(default_factory=dict)
    git_commit: str | None = None
    git_dirty: bool | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    _FIELDS = (  # the scalar fields, in the summary's order around the metrics and throughput
        ("out_dir", "steps", "tokens", "params", "train_loss"),
        ("train_tokens_per_s", "train_time_s", "world_size"),
        ("model_family", "model_config", "costs", "git_commit", "git_dirty"),
    )

    def summary(self) -> dict[str, Any]:
        """The flat summary: the run's fields with the metrics and throughput at the top level."""
        head, middle, tail = (({k: getattr(self, k) for k in keys}) for keys in self._FIELDS)
        return {**head, **self.metrics, **middle, **self.throughput, **tail, **self.extra}

    @classmethod
    def from_summary(cls, summary: dict[str, Any]) -> RunResult:
        """A result from a flat summary (missing fields None)."""
        scalar = {k for keys in cls._FIELDS for k in keys}
        out = cls(**{k: summary[k] for k in scalar if k in summary})
        for key, value in summary.items():
            if key in scalar:
                continue
            if key in THROUGHPUT_KEYS:
                out.throughput[key] = value
            elif is_metric(key):
                out.metrics[key] = value
            else:
                out.extra[key] = value
        out.costs = dict(out.costs or {})
        return out

    def row(self) -> dict[str, Any]:
        """The run's fields of a results row, in the row's order (optional measurements only
        where reported; every metric of the last evaluation)."""
        row: dict[str, Any] = {
            "tokens": self.tokens,
            "steps": self.steps,
            "val_loss": self.metrics.get("val_loss"),
            "val_ppl": self.metrics.get("val_ppl"),
            "train_loss": self.train_loss,
            "train_tokens_per_s": self.train_tokens_per_s,
            "train_time_s": self.train_time_s,
            **(self.costs or dict.fromkeys((*NO_COSTS, "decode_state_bytes"))),
            "params_trained": self.params,
            "git_commit": self.git_commit,
            "git_dirty": self.git_dirty,
        }
        found = {**self.extra, "world_size": self.world_size, **self.throughput}
        row.update({k: found[k] for k in ROW_EXTRAS if found.get(k) is not None})
        row.update({k: v for k, v in self.metrics.items() if k not in row})
        return row


# ================================================================== the trainer
#: Names only a run writes; ``config.yaml``, ``model.safetensors`` or ``tokenizer/`` alone may be a
#: project's own files, which --force must not delete.
RUN_MARKS = ("run.json", "metrics.jsonl", "summary.json", ckpt.CHECKPOINTS)


def _marks_a_run(out: Path) -> bool:
    return any((out / name).exists() for name in RUN_MARKS)


def _not_a_run(out: Path, found: list[str]) -> str:
    return (
        f"{str(out)!r} holds {', '.join(found)} but none of {', '.join(RUN_MARKS)}: they may not be a run's, so "
        "neither --resume nor --force will use them; choose another out_dir, or move them away."
    )


class Trainer:
    """Runs one :class:`TrainConfig` on a :class:`Task` (default: the one ``config.task`` names).

    Args:
        config: the run.
        task: what to train; None builds the task of ``config.task`` with
            :func:`qkvlab.tasks.build_task` (:class:`LMTask` on ``config.data`` by default).
        on_checkpoint: called on process 0 after each checkpoint as ``(step, folder)``.
        verbose: print the start line, one line per checkpoint and the summary (process 0).
    """

    def __init__(
        self,
        config: TrainConfig,
        task: Task | None = None,
        *,
        on_checkpoint: Callable[[int, Path], None] | None = None,
        verbose: bool = True,
    ):
        self.config = config
        self.task = task
        self.on_checkpoint = on_checkpoint
        self.verbose = verbose

    def say(self, message: str) -> None:
        if self.verbose and self.ctx.is_main:
            tqdm.write(message, file=sys.stdout)
            sys.stdout.flush()

    # ------------------------------------------------------------- set-up
    def _compare(self, out: Path, before: TrainConfig, where: str) -> list[str]:
        """Refuse to resume with a config that differs from ``before`` in what it computes;
        the resumable keys that changed."""
        diff = self.config.diff(before)
        changed = [k for k in diff if k not in RESUMABLE_CHANGES]
        if changed:
            old, new = before.to_dict(), self.config.to_dict()
            detail = ", ".join(f"{k}: saved {_get(old, k)!r}, now {_get(new, k)!r}" for k in changed)
            raise ConfigError(
                f"Cannot resume {str(out)!r} with a changed config ({detail}, per {where}). Resume with the "
                "settings it was saved with, or start a new run in another out_dir (or with --force)."
            )
        return [k for k in diff if k in RESUMABLE_CHANGES]

    @staticmethod
    def _check_replaceable(out: Path) -> None:
        """Refuse ``--force`` where the files it would delete may not be a run's (a project folder
        with its own ``config.yaml`` or ``tokenizer/``)."""
        found = [name for name in RUN_FILES if (out / name).exists()]
        if found and not _marks_a_run(out):
            raise ConfigError(_not_a_run(out, found))

    def _check_resume(self, out: Path, resume: bool) -> Path | None:
        """The checkpoint to resume from. A new run refuses a folder that holds another run's files;
        a resume refuses a config that differs from the run's config.yaml or from the config stored
        in the checkpoint itself (config.yaml may be gone or edited)."""
        from qkvlab.checkpoint import read_metadata, train_config
        from qkvlab.train.config import load_config

        found = [name for name in RUN_FILES if (out / name).exists()]
        latest = ckpt.latest_checkpoint(out)
        if found and not _marks_a_run(out):
            raise ConfigError(_not_a_run(out, found))
        if not resume:
            if found:
                what = f"checkpoint {latest.name}" if latest is not None else ", ".join(found)
                raise ConfigError(
                    f"{str(out)!r} already holds a run ({what}); pass --resume to continue it, --force to replace "
                    "it, or choose another out_dir."
                )
            return None
        saved = out / "config.yaml"
        self.resumed_changes: list[str] = []
        finished = [name for name in ("model.safetensors", "summary.json") if name in found]
        if latest is None and finished:  # a resume would train it again from step 0 over its weights
            raise ConfigError(
                f"{str(out)!r} holds a finished run ({', '.join(finished)}) but no checkpoint to resume from; pass "
                "--force to train it again from the start, or choose another out_dir."
            )
        if saved.is_file():
            try:
                before = load_config(saved)
            except ConfigError as e:
                raise ConfigError(
                    f"Cannot resume {str(out)!r}: its config.yaml is not a config this run can compare with ({e}); "
                    "pass --force to replace the run there, or choose another out_dir."
                ) from None
            self.resumed_changes = self._compare(out, before, str(saved))
        elif found and latest is None:
            raise ConfigError(
                f"{str(out)!r} holds run files ({', '.join(found)}) but no checkpoint and no config.yaml that would "
                "show they are this run's; pass --force to replace them, or choose another out_dir."
            )
        if latest is not None:
            weights = latest / ckpt.WEIGHTS
            stored = train_config(read_metadata(weights, qkvlab_only=False), weights)
            if stored:
                try:
                    before = TrainConfig.from_dict(stored)
                except ConfigError as e:
                    raise ConfigError(
                        f"Checkpoint {str(weights)!r} records a training config this run cannot read ({e}); resume "
                        "it with the qkvlab version that wrote it, or start a new run in another out_dir."
                    ) from None
                changes = self._compare(out, before, f"checkpoint {latest.name}")
                self.resumed_changes = sorted(set(self.resumed_changes) | set(changes))
        return latest

    def _setup(self, resume: bool, force: bool = False) -> None:
        config, ctx = self.config, self.ctx
        self.out = Path(config.out_dir)
        if ctx.is_main:
            try:
                self.out.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise ConfigError(
                    f"Cannot create out_dir {str(self.out)!r}: {e.strerror or e}; choose a writable folder."
                ) from None
        ctx.barrier()
        # --force deletes the previous run only once this one has its data, model and initial
        # weights: a mistake in any of them must not cost the old run.
        self.resume_from = None if force else self._check_resume(self.out, resume)
        if force:
            self._check_replaceable(self.out)
        if self.task is None:
            self.task = tasks.build_task(config, ctx)
        self.total_steps = total_steps(config, self.task)
        random.seed(config.seed)
        np.random.seed(config.seed)
        torch.manual_seed(config.seed)  # the same initial weights on every process
        self.raw = self.task.build_model().to(ctx.device)
        if config.init_from is not None and self.resume_from is None:  # a resumed run has its own weights
            from qkvlab.checkpoint import load_into

            load_into(self.raw, config.init_weights_file())
        if force:
            if ctx.is_main:
                gone = clear_run(self.out)
                if gone:
                    self.say(f"--force: removed the previous run's {', '.join(gone)} from {self.out}")
            ctx.barrier()
        self.n_params = sum(p.numel() for p in self.raw.parameters())
        self.wrapped = wrap_model(self.raw, config, ctx)  # DDP / FSDP: owns the gradient sync
        self.optimizer = build_optimizer(self.raw, config)  # after FSDP: its parameters are the shards
        self.model = torch.compile(self.wrapped) if config.compile else self.wrapped
        # The training loss as one compiled graph (model + fp32 cross-entropy), so the logits'
        # upcast fuses into the loss instead of materialising (B, T, V) in fp32. Under DDP /
        # FSDP the wrapped module stays the compile boundary (their gradient hooks).
        self._loss_model, self._loss_fn = self.model, self.task.loss
        if config.compile and not ctx.distributed:
            self._loss_model, self._loss_fn = self.wrapped, torch.compile(self.task.loss)
        # Each process draws its own dropout masks from here on.
        torch.manual_seed(config.seed + 1_000_003 * ctx.rank)
        self.batches = self.task.batches(config.batch_size // ctx.world_size, seed=config.seed, ctx=ctx)
        self.step, self.tokens = 0, 0
        # (seconds of training, tokens they trained) before this process: a run resumed from a
        # checkpoint that records them reports its whole time and rate, not its last part's
        self._timed: tuple[float, int] = (0.0, 0)
        self.last_loss: float | None = None  # training loss of the latest step
        self._pending: list[tuple[int, torch.Tensor, torch.Tensor]] = []  # steps not yet checked
        self.last_eval: dict[str, float] = {}
        self.git: dict[str, Any] | None = None  # the code version the run started with (run.json)
        if self.resume_from is not None:
            self._load(self.resume_from)
            if ctx.is_main and ("optim.lr" in self.resumed_changes or not (self.out / "config.yaml").is_file()):
                # config.yaml keeps the settings the run now continues with (a lowered rate, say)
                ckpt.atomic_write(self.out / "config.yaml", lambda p: Path(p).write_text(config.to_yaml()))
            if "optim.lr" in self.resumed_changes:
                self.say(f"note: optim.lr is {config.optim.lr} from step {self.step} on (config.yaml updated)")
        elif ctx.is_main:
            ckpt.atomic_write(self.out / "config.yaml", lambda p: Path(p).write_text(config.to_yaml()))
            info = run_info(config, ctx, self.task, self.n_params)
            ckpt.atomic_write(self.out / "run.json", lambda p: Path(p).write_text(json.dumps(info, indent=2)))
            save_tokenizer(self.task, self.out)
            self.git = info["git"]
        self.log = (
            MetricsLog(
                self.out,
                resume_step=self.step if self.resume_from is not None else None,
                tensorboard=config.log.tensorboard,
                metric_keys=tuple(getattr(self.task, "metric_keys", ("val_loss",))),
            )
            if ctx.is_main
            else None
        )

    # ------------------------------------------------------------- checkpoints
    @property
    def _fsdp(self) -> bool:
        return self.ctx.distributed and self.config.distributed == "fsdp"

    def _whole_model(self) -> nn.Module | None:
        """An unsharded model to save on process 0: the model itself, or under FSDP a CPU copy
        gathered from the shards (a collective: every process calls this; the others get None)."""
        if not self._fsdp:
            return self.raw if self.ctx.is_main else None
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(self.raw, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not self.ctx.is_main:
            return None
        copy = self.task.build_model()
        copy.load_state_dict(state)
        return copy

    def _optimizer_state(self) -> dict[str, Any]:
        """The full optimizer state keyed by parameter name (a collective under FSDP)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_optimizer_state_dict(self.raw, self.optimizer, options=options)

    def _last_saved(self) -> str:
        return f"step {self.saved_step}" if self.saved_step else "none yet"

    def _weights_metadata(self) -> dict[str, str]:
        return {"train_step": str(self.step), "train_config": json.dumps(self.config.to_dict())}

    def save_checkpoint(self) -> None:
        ctx = self.ctx
        model, optim_state = self._whole_model(), self._optimizer_state()
        rng = [None] * ctx.world_size
        if ctx.distributed:
            dist.all_gather_object(rng, ckpt.rng_state())
        else:
            rng = [ckpt.rng_state()]
        if model is not None:
            state = {
                "step": self.step,
                "tokens": self.tokens,
                "train_time_s": self._timed[0],
                "train_time_tokens": self._timed[1],
                "optimizer": optim_state,
                "data": self.batches.state_dict(),
                "rng": rng,
                "last_eval": self.last_eval,
                "last_loss": self.last_loss,
                "config": json.dumps(self.config.to_dict()),
            }
            try:
                path = ckpt.save_checkpoint(
                    self.out,
                    self.step,
                    model=model,
                    state=state,
                    metadata=self._weights_metadata(),
                    keep=self.config.keep_checkpoints,
                )
            except (OSError, RuntimeError, SafetensorError) as e:  # a full disk: torch and safetensors raise their own
                raise ConfigError(
                    f"Could not write the checkpoint of step {self.step} in {str(self.out)!r}: {_first_line(e)}. The "
                    f"previous checkpoint ({self._last_saved()}) is intact; free disk space or fix permissions, then "
                    "rerun with --resume."
                ) from None
            self.saved_step = self.step
            self.say(f"checkpoint saved step={self.step} path={path}")
            if self.on_checkpoint is not None:
                self.on_checkpoint(self.step, path)
        ctx.barrier()

    def _load(self, path: Path) -> None:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        from qkvlab.checkpoint import check_fits

        options = StateDictOptions(full_state_dict=True)
        model_config = getattr(self.raw, "config", None)
        if hasattr(model_config, "family"):  # a qkvlab model: its config against the checkpoint's own record
            check_fits(model_config, path / ckpt.WEIGHTS)
        try:
            weights = ckpt.load_weights(path / ckpt.WEIGHTS)
        except ConfigError as e:
            hint = ckpt.fallback_hint(path)
            raise ConfigError(f"{e} {hint[0].upper()}{hint[1:]}.") from None
        own = {k: tuple(v.shape) for k, v in self.raw.state_dict().items()}
        bad_shape = sorted(k for k in set(own) & set(weights) if tuple(weights[k].shape) != own[k])
        if set(weights) != set(own) or bad_shape:
            raise ConfigError(
                f"Checkpoint {str(path)!r} does not fit the model (missing {sorted(set(own) - set(weights))[:5]}, "
                f"unexpected {sorted(set(weights) - set(own))[:5]}, other shape {bad_shape[:5]}); resume with the "
                "config it was saved with."
            )
        set_model_state_dict(self.raw, weights, options=options)
        state = ckpt.load_state(path)
        try:
            set_optimizer_state_dict(self.raw, self.optimizer, state["optimizer"], options=options)
            self.batches.load_state_dict(state["data"])
            self.step, self.tokens = int(state["step"]), int(state["tokens"])
            if state.get("train_time_s") is not None:  # older checkpoints: this process's part only
                self._timed = (float(state["train_time_s"]), int(state["train_time_tokens"]))
            self.last_eval = dict(state.get("last_eval") or {})
            self.last_loss = state.get("last_loss")
            rng = state["rng"]
            if len(rng) == self.ctx.world_size:
                ckpt.set_rng_state(rng[self.ctx.rank])
            else:
                self.say(f"note: checkpoint from {len(rng)} process(es), resuming on {self.ctx.world_size}: fresh RNG")
        except ConfigError:
            raise  # a state that does not match this run says so itself
        except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as e:
            raise ConfigError(
                f"Training state {str(path / ckpt.STATE)!r} is corrupt ({_first_line(e)}); {ckpt.fallback_hint(path)}."
            ) from None
        self.saved_step = self.step
        self.say(f"resumed from {path} at step {self.step}")

    # ------------------------------------------------------------- one step
    def train_step(self) -> tuple[float, float, int]:
        """One optimizer step; returns (mean loss over micro-batches and processes, grad norm, tokens)."""
        config, ctx = self.config, self.ctx
        sched = config.schedule
        lr = lr_at(
            self.step,
            lr=config.optim.lr,
            min_lr=config.min_lr,
            warmup=sched.warmup_steps,
            total=self.total_steps,
            kind=sched.kind,
            milestones=sched.milestones,
            gamma=sched.gamma,
        )
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.model.train()
        loss_sum = torch.zeros((), device=ctx.device)
        count = 0
        for micro in range(config.grad_accum):
            batch = self.batches.next()
            count += self.task.count(batch)
            batch = _to_device(batch, ctx.device)
            with gradient_sync(self.wrapped, micro == config.grad_accum - 1), ctx.autocast():
                loss = self._loss_fn(self._loss_model, batch)
                (loss / config.grad_accum).backward()
            loss_sum += loss.detach().float()
        loss = ctx.sum(loss_sum / config.grad_accum) / ctx.world_size
        clip = config.optim.grad_clip if config.optim.grad_clip > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.raw.parameters(), clip)
        if hasattr(grad_norm, "full_tensor"):  # FSDP2: the norm is a sharded DTensor
            grad_norm = grad_norm.full_tensor()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self._pending.append((self.step, loss.detach(), grad_norm.detach()))
        return loss, grad_norm, count * ctx.world_size

    def check_steps(self) -> tuple[float, float]:
        """The loss and grad norm of the latest step, after checking every step since the last check.

        Reading a value from the GPU waits for it, so the loop reads the steps' losses only when
        it logs, evaluates or saves (and after every step on a CPU, where reading costs nothing):
        in between, the host queues the next steps while the GPU runs, which is most of the step
        time of a small model. A non-finite step stops the run before anything is saved, so the
        last checkpoint is always good; the steps after it in the window have already run.
        """
        config = self.config
        pending, self._pending = self._pending, []
        if not pending:
            return self.last_loss if self.last_loss is not None else math.nan, math.nan
        values = torch.stack([torch.stack([l.float(), g.float()]) for _, l, g in pending]).tolist()
        for (step, _, _), (loss, grad_norm) in zip(pending, values, strict=True):
            if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                self.optimizer.zero_grad(set_to_none=True)
                self.step = step - 1  # the failed step, for the message
                raise ConfigError(
                    f"Training diverged at step {self.step + 1}: loss={loss}, grad norm={grad_norm}. The last good "
                    f"checkpoint is {self._last_saved()} in {str(self.out)!r}; continue from it at a lower rate with "
                    f"--resume optim.lr={config.optim.lr / 2:g} (now {config.optim.lr:g}), or start again with more "
                    "schedule.warmup_steps (--force)."
                )
        self.last_loss = values[-1][0]
        return values[-1][0], values[-1][1]

    def evaluate(self, final: bool = False) -> dict[str, float]:
        """A validation pass; the ``final`` one takes ``final_eval_batches`` and, for tasks that
        have them, scores the extra evaluation sets too."""
        config = self.config
        self.model.eval()
        kwargs: dict[str, Any] = {}
        max_batches = config.eval_batches
        if final:
            max_batches = config.final_eval_batches or config.eval_batches
            if "final" in inspect.signature(self.task.evaluate).parameters:
                kwargs["final"] = True
        metrics = self.task.evaluate(
            self.model, batch_size=config.batch_size, max_batches=max_batches, ctx=self.ctx, **kwargs
        )
        self.last_eval = dict(metrics)
        return metrics

    def _throughput(self, tokens_per_s: float | None, steady: float | None = None) -> dict[str, Any]:
        """The GPU's name, training FLOPs per token and model FLOPs utilisation (per device):
        over the whole run (``mfu``, compilation and warm-up included) and at the median log
        window after the first (``steady_mfu``, the rate the run settles at)."""
        from qkvlab.costs import bf16_peak

        ctx = self.ctx
        name = torch.cuda.get_device_name(ctx.device) if ctx.device.type == "cuda" else None
        out: dict[str, Any] = {"device_name": name or platform.processor() or platform.machine()}
        if name:
            out["peak_memory_gib"] = torch.cuda.max_memory_allocated(ctx.device) / 2**30
        fn = getattr(self.task, "flops_per_token", None)
        if fn is None:
            return out
        out["flops_per_token"] = fpt = int(fn(self.raw))
        peak = bf16_peak(name) if name and ctx.amp_dtype is not None else None
        if steady:
            out["steady_tokens_per_s"] = steady
        if peak and tokens_per_s:
            out["mfu"] = fpt * tokens_per_s / ctx.world_size / peak
        if peak and steady:
            out["steady_mfu"] = fpt * steady / ctx.world_size / peak
        return out

    def _model_record(self) -> dict[str, Any]:
        """The trained model's resolved config, family and costs (none for a model that is not
        qkvlab's, which a custom task may build)."""
        from qkvlab.costs import model_costs

        cfg = getattr(self.raw, "config", None)
        if not (hasattr(cfg, "family") and hasattr(cfg, "to_dict")):
            return {}
        return {"model_config": cfg.to_dict(), "model_family": cfg.family, "costs": model_costs(cfg)}

    def _code_version(self) -> tuple[str | None, bool | None]:
        """(commit, dirty) the run started with: run.json's (a resumed run may continue under
        other code), else this process's."""
        git = self.git
        if git is None and (self.out / "run.json").is_file():
            with contextlib.suppress(OSError, ValueError, AttributeError):
                git = json.loads((self.out / "run.json").read_text()).get("git")
        if isinstance(git, dict) and git.get("commit"):
            return git["commit"], git.get("dirty")
        return code_version()

    # ------------------------------------------------------------- the loop
    def fit(self, resume: bool = False, force: bool = False) -> dict[str, Any]:
        """Train to the run's total steps (continuing the latest checkpoint if ``resume``); the summary.

        ``force`` starts a new run in an out_dir that holds another one, deleting what that run
        wrote (:data:`RUN_FILES`); without it such a folder is refused.
        """
        if resume and force:
            raise ConfigError("--resume continues the run in out_dir and --force replaces it; pass only one of them.")
        self.ctx = setup_context(self.config)
        try:
            return self._fit(resume, force)
        finally:
            if getattr(self, "_bar", None) is not None:
                self._bar.close()
            if getattr(self, "log", None) is not None:
                self.log.close()
            if self.ctx.owns_process_group and dist.is_initialized():
                dist.destroy_process_group()

    def _fit(self, resume: bool, force: bool = False) -> dict[str, Any]:
        config, ctx = self.config, self.ctx
        self.saved_step = 0
        self._setup(resume, force)
        total = self.total_steps
        self.say(
            f"training {self.n_params:,} parameters for {total} steps of {count_per_step(config, self.task):,} tokens "
            f"on {ctx.world_size} x {ctx.device.type} ({'fp32' if ctx.amp_dtype is None else 'bf16 autocast'}); "
            f"run folder {self.out}"
        )
        bar = self._bar = tqdm(  # closed in fit() too: its line ends however the loop ends
            total=total,
            initial=self.step,
            desc="train",
            unit="step",
            dynamic_ncols=True,
            disable=not (ctx.is_main and config.log.progress),
        )
        (train_time, run_tokens), window_tokens, window_time = self._timed, 0, 0.0
        rates: list[float] = []  # tokens/s of each log window; the first holds compilation
        every_step = reads_every_step(ctx.device)
        window_start = time.perf_counter()
        while self.step < total:
            if _stop.is_set() and not ctx.distributed:
                bar.close()
                if self.saved_step != self.step:
                    self.check_steps()  # never save a step that diverged
                    self._timed = (train_time + time.perf_counter() - window_start, run_tokens)
                    self.save_checkpoint()
                _stop.clear()  # answered: the next run in this process starts afresh
                raise RunStopped(self.out, self.step, total)
            _, _, n = self.train_step()
            self.tokens += n
            run_tokens, window_tokens = run_tokens + n, window_tokens + n
            bar.update(1)
            log_now = self.step % config.log.every == 0 or self.step == total
            eval_now = bool(config.eval_every and self.step % config.eval_every == 0) or self.step == total
            ckpt_now = bool(config.ckpt_every and self.step % config.ckpt_every == 0) or self.step == total
            if not (log_now or eval_now or ckpt_now or every_step):
                continue
            loss, grad_norm = self.check_steps()  # waits for the GPU: the window's time is now known
            elapsed = time.perf_counter() - window_start
            train_time, window_time = train_time + elapsed, window_time + elapsed
            row: dict[str, Any] = {}
            if log_now:
                row = {
                    "step": self.step,
                    "tokens": self.tokens,
                    "loss": loss,
                    "lr": self.optimizer.param_groups[0]["lr"],
                    "grad_norm": grad_norm,
                    "tokens_per_s": window_tokens / window_time,
                }
                rates.append(window_tokens / window_time)
                bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{window_tokens / window_time:,.0f}", refresh=False)
                window_tokens, window_time = 0, 0.0
            if eval_now:
                row = {"step": self.step, "tokens": self.tokens, **row, **self.evaluate(final=self.step == total)}
                bar.set_postfix(loss=f"{loss:.4f}", val=f"{self.last_eval['val_loss']:.4f}", refresh=False)
            if row and self.log is not None:
                self.log.write(row)
            if ckpt_now:
                self._timed = (train_time, run_tokens)
                self.save_checkpoint()
            window_start = time.perf_counter()  # evaluation and checkpoints are not training time
        bar.close()
        if not self.last_eval:  # resumed a finished run whose summary is missing
            self.evaluate(final=True)
        tokens_per_s = run_tokens / train_time if train_time else None
        commit, dirty = self._code_version()
        result = RunResult(
            out_dir=str(self.out),
            steps=self.step,
            tokens=self.tokens,
            params=self.n_params,
            train_loss=self.last_loss,
            metrics=dict(self.last_eval),
            train_tokens_per_s=tokens_per_s,
            train_time_s=train_time,
            world_size=ctx.world_size,
            throughput=self._throughput(tokens_per_s, statistics.median(rates[1:]) if len(rates) >= 3 else None),
            **self._model_record(),
            git_commit=commit,
            git_dirty=dirty,
        )
        summary = result.summary()
        model = self._whole_model()
        if model is not None:
            try:
                ckpt.save_weights(model, self.out / "model.safetensors", self._weights_metadata())
                ckpt.atomic_write(
                    self.out / "summary.json", lambda p: Path(p).write_text(json.dumps(summary, indent=2))
                )
            except (OSError, RuntimeError, SafetensorError) as e:
                raise ConfigError(
                    f"Could not write the final weights or summary.json in {str(self.out)!r}: {_first_line(e)}. The "
                    f"checkpoint of step {self.saved_step} is intact; free disk space, then rerun with --resume."
                ) from None
            scores = [f"val loss {summary.get('val_loss', float('nan')):.4f}"]
            if "val_ppl" in summary:
                scores.append(f"ppl {summary['val_ppl']:.2f}")
            if "val_acc" in summary:
                scores.append(f"acc {summary['val_acc']:.4f}")
            self.say(f"done: step {self.step}, {', '.join(scores)}; weights in {self.out / 'model.safetensors'}")
        return summary


def train(
    config: TrainConfig,
    *,
    resume: bool = False,
    force: bool = False,
    task: Task | None = None,
    on_checkpoint: Callable[[int, Path], None] | None = None,
    verbose: bool = True,
) -> dict[str, Any]:
    """Run ``config`` to the end and return its summary (see :class:`Trainer` and :meth:`Trainer.fit`)."""
    return Trainer(config, task, on_checkpoint=on_checkpoint, verbose=verbose).fit(resume=resume, force=force)
