"""The one exception type for mistakes a user can make.

Every configuration, input-shape or file error that a person can cause raises
:class:`ConfigError` with a message naming the offending value and the fix. It
subclasses :class:`ValueError` so callers that already catch ``ValueError`` keep
working; the command line prints its message without a stack trace.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from typing import Any


class ConfigError(ValueError):
    """A user-caused error: bad variant string, wrong shapes, bad file, and so on."""


def check_keys(prefix: str, d: Mapping[str, Any], valid: Sequence[str], *, noun: str = "config") -> None:
    """ConfigError for the first key of ``d`` not in ``valid``, naming the nearest valid one.

    ``prefix`` is the dotted section the keys sit under (``""`` for the top level).
    Example: ``check_keys("optim", {"lrr": 1}, ["lr", "betas"])`` raises
    ``Unknown config key 'optim.lrr'. Did you mean 'optim.lr'? ...``.
    ``noun`` names the kind of file: another (``"sweep"``) is a flat mapping, so its message
    lists the valid keys without a place: ``Unknown sweep key 'gird'. ... Valid keys: ...``.
    """
    for key in d:
        if key not in valid:
            full = f"{prefix}.{key}" if prefix else str(key)
            near = difflib.get_close_matches(str(key), valid, n=1)
            hint = f" Did you mean {(prefix + '.' if prefix else '') + near[0]!r}?" if near else ""
            where = f" under {prefix!r}" if prefix else " at the top level" if noun == "config" else ""
            raise ConfigError(f"Unknown {noun} key {full!r}.{hint} Valid keys{where}: {', '.join(valid)}.")
