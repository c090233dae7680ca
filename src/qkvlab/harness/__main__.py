"""lm-eval's own command line, with the ``qkvlab`` model registered and the qkvlab tasks included.

lm-eval 0.4 loads no plugins, so its ``lm_eval`` command cannot know the ``qkvlab`` model.
This wrapper imports it first, adds ``--include_path`` for the shipped task folder (unless
one is given), and hands every argument to lm-eval unchanged::

    python -m qkvlab.harness run --model qkvlab --model_args path=runs/x,batch_size=16 \\
        --tasks qkvlab_hellaswag,qkvlab_piqa --num_fewshot 5 --device cpu
    python -m qkvlab.harness ls tasks      # qkvlab_* tasks beside lm-eval's

The ``qkvlab-lm-eval`` script is the same. Data root: ``$QKVLAB_DATA``, ``data_root`` in
``--model_args`` or ``--metadata '{"data_root": "DIR"}'``, else ``../shared/data``.
"""

from __future__ import annotations

import sys

from qkvlab.errors import ConfigError

SUBCOMMANDS = ("run", "ls", "validate")


def lm_eval_argv(args: list[str], task_dir: str) -> list[str]:
    """``args`` with ``--include_path task_dir`` added where lm-eval reads tasks."""
    takes_tasks = bool(args) and (args[0] in SUBCOMMANDS or (len(args) > 1 and not args[0].startswith("-h")))
    if takes_tasks and "--include_path" not in args:
        return [*args, "--include_path", task_dir]
    return list(args)


def main(argv: list[str] | None = None) -> None:
    try:
        from qkvlab.harness import TASK_DIR, register

        register()
        from lm_eval.__main__ import cli_evaluate

        sys.argv = ["lm-eval", *lm_eval_argv(list(sys.argv[1:] if argv is None else argv), str(TASK_DIR))]
        cli_evaluate()
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
