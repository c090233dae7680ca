"""The one exception type for mistakes a user can make.

Every configuration, input-shape or file error that a person can cause raises
:class:`ConfigError` with a message naming the offending value and the fix. It
subclasses :class:`ValueError` so callers that already catch ``ValueError`` keep
working; the command line prints its message without a stack trace.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A user-caused error: bad variant string, wrong shapes, bad file, and so on."""
