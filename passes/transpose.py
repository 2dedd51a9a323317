"""Placeholder: this family's passes are being written (see the issue tracker)."""

from __future__ import annotations

from graphopt.pass_manager import Pass

#: The family's passes, in the order the O2 pipeline runs them.
PASSES: list[type[Pass]] = []
