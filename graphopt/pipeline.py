"""Optimization levels as data, and `optimize()`, the Python entry point.

O1: cleanup (dead code, Identity/Dropout, CSE), iterated to a fixpoint.
O2: O1 plus tensor-manipulation elimination and fusion (added as those passes land).
O3: O2 plus quantization and acc16/acc32 kernel choice.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np

from graphopt.errors import UsageError
from graphopt.ir import Graph
from graphopt.pass_manager import Fixpoint, PassContext, PassManager, PipelineItem, RunReport

LEVELS = ("O0", "O1", "O2", "O3")


def _cleanup_passes() -> list[PipelineItem]:
    from graphopt.passes.cleanup import (CommonSubexpressionElimination, DeadCodeElimination,
                                         RemoveDropout, RemoveIdentity)
    return [RemoveIdentity(), RemoveDropout(), CommonSubexpressionElimination(),
            DeadCodeElimination()]


def _folding_passes() -> list[PipelineItem]:
    from graphopt.passes import folding
    return [cls() for cls in folding.PASSES]


def o1_pipeline() -> list[PipelineItem]:
    return [Fixpoint("cleanup", _folding_passes() + _cleanup_passes())]


def o2_pipeline() -> list[PipelineItem]:
    """Cleanup, an opset upgrade where a newer opset has a standard op for a pattern in the
    model, tensor-manipulation elimination to a fixpoint, then fusion."""
    from graphopt.passes import concat_split, fusion, opset, reshape, transpose
    manipulation = [cls() for family in (transpose, concat_split, reshape) for cls in family.PASSES]
    return [
        Fixpoint("cleanup", _folding_passes() + _cleanup_passes()),
        *[cls() for cls in opset.PASSES],
        Fixpoint("manipulation", _folding_passes() + manipulation + _cleanup_passes(),
                 max_iterations=16),
        Fixpoint("fusion", [cls() for cls in fusion.PASSES] + _cleanup_passes()),
    ]


_BUILDERS: dict[str, Callable[[], list[PipelineItem]]] = {
    "O0": lambda: [],
    "O1": o1_pipeline,
    "O2": o2_pipeline,
}


def build_pipeline(level: str) -> list[PipelineItem]:
    """The pipeline of an optimization level; levels not yet built fall back to the highest one
    below them that is."""
    if level not in LEVELS:
        raise UsageError(f"unknown level {level!r}; choose one of {', '.join(LEVELS)}")
    for candidate in reversed(LEVELS[: LEVELS.index(level) + 1]):
        if candidate in _BUILDERS:
            return _BUILDERS[candidate]()
    return []


def opt_in_passes(level: str) -> list[str]:
    """Names of the level's passes that run only when enabled by name."""
    manager = PassManager(build_pipeline(level))
    found: dict[str, None] = {}

    def walk(items) -> None:
        for item in items:
            if isinstance(item, Fixpoint):
                walk(item.passes)
            elif not item.default_enabled:
                found[item.name] = None
    walk(manager.pipeline)
    return list(found)


def available_level(level: str) -> str:
    """The level that `build_pipeline(level)` actually runs."""
    for candidate in reversed(LEVELS[: LEVELS.index(level) + 1]):
        if candidate in _BUILDERS:
            return candidate
    return "O0"


def optimize(graph: Graph, level: str = "O2", *, disable: Iterable[str] = (),
             enable: Iterable[str] = (), verify: str = "off",
             verify_feeds: dict[str, np.ndarray] | None = None,
             options: dict | None = None) -> RunReport:
    """Optimize `graph` in place at `level`; return what every pass did. `disable` skips passes
    by name; `enable` turns on opt-in passes of the level (such as `head_split`)."""
    manager = PassManager(build_pipeline(level), disable=disable, enable=enable, verify=verify,
                          verify_feeds=verify_feeds, context=PassContext(dict(options or {})))
    return manager.run(graph)
