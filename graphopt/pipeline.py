"""Optimization levels as data, and `optimize()`, the Python entry point.

O1: cleanup (dead code, Identity/Dropout, CSE), iterated to a fixpoint.
O2: O1 plus tensor-manipulation elimination and fusion (added as those passes land).
O3: O2, then calibration-driven int8 quantization with selective fallback, the outlier-aware
weight split, acc16/acc32 kernel choice by op intensity, and cleanup (passes/quantize.py,
outliers.py, kernel_select.py). O3 options (`options=` / CLI): `calibration` (an .npz path or
folder, a list of feed dicts, a dict of arrays; default: the model's example inputs or synthetic
feeds), `target` ("auto", "avx2", "avx512", "avx512-vnni", "amx") or `machine` (a
graphopt.machine.Machine), `quant_error_budget` (relative L2 on the outputs, default 2e-2),
`calibration_method`, `quant_sensitivity` ("auto" or "always"), `shapes` (pins symbolic input
dims for op intensity).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

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


def o3_pipeline() -> list[PipelineItem]:
    """O2, then quantization, the outlier split and kernel choice (once each: they are driven by
    calibration, not by patterns), then cleanup (with the exact removal of Relus that their
    QuantizeLinear makes redundant). Constant folding does not run after quantization: it would
    fold DequantizeLinear of the int8 weights back into floats.
    Epilogue marking runs again because the output Q/DQ pairs moved group boundaries."""
    from graphopt.passes.fusion_epilogue import FuseEpilogues
    from graphopt.passes.kernel_select import KernelSelect
    from graphopt.passes.outliers import OutlierSplit
    from graphopt.passes.qdq_cleanup import DropReluBeforeQuantize
    from graphopt.passes.quantize import Quantize
    return [
        *o2_pipeline(),
        Quantize(),
        OutlierSplit(),
        KernelSelect(),
        Fixpoint("cleanup", [DropReluBeforeQuantize()] + _cleanup_passes() + [FuseEpilogues()]),
    ]


_BUILDERS: dict[str, Callable[[], list[PipelineItem]]] = {
    "O0": lambda: [],
    "O1": o1_pipeline,
    "O2": o2_pipeline,
    "O3": o3_pipeline,
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


@dataclass
class OptimizeReport(RunReport):
    """The pass manager's report plus what quantization measured (O3; None below it):
    `quantization` = {"error_rel_l2", "budget", "ops_int8", "ops_fp16", "ops_fp32",
    "embeddings_int8", ...} or {"skipped": reason}; `calibration` = {"source", "samples"}."""

    quantization: dict[str, Any] | None = None
    calibration: dict[str, Any] | None = None


def optimize(graph: Graph, level: str = "O2", *, disable: Iterable[str] = (),
             enable: Iterable[str] = (), verify: str = "off",
             verify_feeds: dict[str, np.ndarray] | None = None,
             options: dict | None = None) -> OptimizeReport:
    """Optimize `graph` in place at `level`; return what every pass did. `disable` skips passes
    by name; `enable` turns on opt-in passes of the level (such as `head_split`); `options` are
    read by passes (O3's are listed in the module docstring)."""
    from graphopt.passes.quantize import STATE_OPTION, QuantizationState

    context = PassContext(dict(options or {}))
    state = context.options.setdefault(STATE_OPTION, QuantizationState())
    manager = PassManager(build_pipeline(level), disable=disable, enable=enable, verify=verify,
                          verify_feeds=verify_feeds, context=context)
    report = manager.run(graph)
    quantization = calibration = None
    if available_level(level) == "O3" and "quantize" not in set(disable):
        calibration = state.calibration
        quantization = state.summary or {"skipped": state.skipped or "quantize did not run"}
    return OptimizeReport(**vars(report), quantization=quantization, calibration=calibration)
