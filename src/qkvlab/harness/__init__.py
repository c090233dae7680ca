"""Downstream evaluation through EleutherAI's lm-evaluation-harness, offline.

Three parts:

* :mod:`qkvlab.harness.model`: the lm-eval model ``qkvlab`` (any qkvlab GPT checkpoint with
  its own tokenizer, batched and KV-cached);
* ``tasks/*.yaml`` and :mod:`qkvlab.harness.data`: HellaSwag, PIQA, ARC-Easy,
  ARC-Challenge, WinoGrande and LAMBADA (OpenAI) read from the staged files in
  ``shared/data`` with lm-eval's own prompts, preprocessing and metrics (names
  ``qkvlab_<task>``, tag ``qkvlab_downstream``);
* :mod:`qkvlab.harness.runner`: what ``qkvlab eval harness`` runs; it writes
  ``harness.json`` into each run folder and, with a study, rows into its results store.

lm-eval 0.4 finds a model only in its registry, which is filled when a module that defines
one is imported; it reads no entry points. Importing this package registers ``qkvlab`` (when
lm-eval is installed), so from Python::

    import lm_eval
    import qkvlab.harness

    tm = lm_eval.tasks.TaskManager(include_path=qkvlab.harness.TASK_DIR, include_defaults=False)
    lm_eval.simple_evaluate(model="qkvlab", model_args="path=runs/x", tasks=["qkvlab_piqa"], task_manager=tm)

and from the shell ``python -m qkvlab.harness`` (or ``qkvlab-lm-eval``) is lm-eval's own
command line with the model registered and the task folder included::

    python -m qkvlab.harness run --model qkvlab --model_args path=runs/x --tasks qkvlab_piqa --device cpu

lm-eval is an optional extra (``pip install 'qkvlab[eval]'``); without it only
:func:`require_lm_eval` and :mod:`qkvlab.harness.data`'s file handling work.
"""

from __future__ import annotations

from qkvlab.errors import ConfigError
from qkvlab.harness.data import PAPER_TASKS, TASK_DIR, TASKS, TaskSpec, find_data_file, resolve_tasks

INSTALL_HINT = (
    "lm-eval is not installed; install it with: pip install 'qkvlab[eval]' (or pip install 'lm-eval>=0.4.13,<0.5')"
)


def require_lm_eval() -> str:
    """lm-eval's version; a :class:`ConfigError` saying how to install it when it is missing."""
    try:
        import lm_eval
    except ImportError:
        raise ConfigError(INSTALL_HINT) from None
    return str(lm_eval.__version__)


def register() -> type:
    """Register the ``qkvlab`` model with lm-eval (idempotent) and return its class."""
    require_lm_eval()
    from qkvlab.harness.model import QkvlabLM

    return QkvlabLM


try:  # so that ``import qkvlab.harness`` is all lm-eval needs to find the model
    import lm_eval as _lm_eval  # noqa: F401
except ImportError:
    pass
else:
    register()

__all__ = [
    "INSTALL_HINT",
    "PAPER_TASKS",
    "TASKS",
    "TASK_DIR",
    "TaskSpec",
    "find_data_file",
    "register",
    "require_lm_eval",
    "resolve_tasks",
]
