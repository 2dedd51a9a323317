"""Errors a user can act on.

Every failure that comes from the user's input (a file, an option, a model we cannot handle) is a
`GraphoptError` with a one-line message; the CLI prints the message and exits with `exit_code`
instead of dumping a traceback.
"""

from __future__ import annotations


class GraphoptError(Exception):
    """A failure with a message meant for the user. `exit_code` 2 = bad input, 1 = failure."""

    exit_code = 1

    def __init__(self, message: str, exit_code: int | None = None) -> None:
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class InvalidModelError(GraphoptError):
    """The input is not a model we can read: corrupt, truncated, ill-formed, or too new."""

    exit_code = 2


class UsageError(GraphoptError):
    """Bad command-line usage or arguments (paths, options, input feeds)."""

    exit_code = 2


class IRError(GraphoptError):
    """An IR invariant was broken; raised by `Graph.check()` and by mutation helpers."""

    exit_code = 1


class UnsupportedOpError(GraphoptError):
    """The runtime has no kernel for an op (the optimizer itself passes unknown ops through)."""

    exit_code = 2
