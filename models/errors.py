"""Errors raised by the model registry and the real-weight loaders.

They are `GraphoptError`s, so the CLI prints their one-line message instead of a traceback, and
they also subclass the builtin a Python caller would expect (`KeyError` for an unknown name,
`RuntimeError` for a missing optional package, `ValueError` for a bad option).
"""

from __future__ import annotations

import importlib
from types import ModuleType

from graphopt.errors import GraphoptError

MODELS_EXTRA = 'pip install "graphopt[models]"'


class UnknownModelError(GraphoptError, KeyError):
    """No model of that name in the registry."""

    exit_code = 2

    def __str__(self) -> str:  # KeyError would print the message in quotes
        return str(self.args[0])


class ModelOptionError(GraphoptError, ValueError):
    """A size or option the named model does not offer."""

    exit_code = 2


class MissingExtraError(GraphoptError, RuntimeError):
    """An optional package a real-weight model needs is not installed."""

    exit_code = 1


def require(module: str, install: str = MODELS_EXTRA, purpose: str = "this model") -> ModuleType:
    """Import `module`, or raise MissingExtraError telling the user the command that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingExtraError(
            f"{purpose} needs the Python package '{module}', which is not installed: {install}"
        ) from exc
