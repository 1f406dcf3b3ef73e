"""The one exception type users see.

Every problem caused by user input raises :class:`InfscopeError` with a single line that names
the problem and the fix. The CLI prints it and exits with code 2, without a traceback.
"""

from __future__ import annotations


class InfscopeError(Exception):
    """A user-facing error: one line saying what is wrong and how to fix it."""

    exit_code = 2

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))
