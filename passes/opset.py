"""Raise the default-domain opset when a newer one has a standard op for a pattern in the model.

PP-OCR models (opset 11/12) spell HardSwish as Add/Clip/Div/Mul; HardSwish exists from opset 14,
Gelu from 20. Converting the model with onnx's version converter (which rewrites the ops whose
meaning changed between the versions, e.g. Softmax at 13, Squeeze's axes input) lets the fusion
passes put in the standard op, which every runtime then runs as one kernel. The pass only raises
the opset when such a pattern is present, never above what the installed onnx supports, and
leaves models with custom domains or functions alone. Weights never go through the converter. Disable it by name
(`upgrade_opset`) to keep a model's opset.
"""

from __future__ import annotations

import onnx
import onnx.version_converter

from graphopt.ir import Graph
from graphopt.onnx_io import load_with_constants_of, to_model_without_large_constants
from graphopt.pass_manager import Pass, PassContext, PassResult
from graphopt.passes.fusion_patterns import (match_gelu_erf, match_gelu_tanh, match_hardsigmoid_times_x,
                                             match_hardswish)

#: (opset that has the standard op, matchers of its decomposed forms)
_PATTERNS = (
    (14, (match_hardswish, match_hardsigmoid_times_x)),
    (20, (match_gelu_erf, match_gelu_tanh)),
)


def wanted_opset(graph: Graph) -> int:
    """The lowest opset that has a standard op for every pattern found (0 if none is found)."""
    wanted = 0
    for version, matchers in _PATTERNS:
        if version <= graph.opset() or version <= wanted:
            continue
        if any(m(graph, op) is not None for op in graph.ops.values() for m in matchers):
            wanted = version
    return wanted


class UpgradeOpset(Pass):
    """Convert the model to the opset that has the standard op for its decomposed patterns."""

    name = "upgrade_opset"
    recurse_subgraphs = False

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        result = PassResult()
        if graph.model is None or graph.parent is not None:
            return result
        target = min(wanted_opset(graph), onnx.defs.onnx_opset_version())
        current = graph.opset()
        if target > current and convert_opset(graph, target):
            result.count(f"opset_{current}_to_{target}")
        return result


def convert_opset(graph: Graph, target: int) -> bool:
    """Convert the (root) graph to default-domain opset `target` in place with onnx's version
    converter; False (graph unchanged) where it cannot: opset below 7, custom domains or
    functions, a converter without an adapter, or a converted graph that rewired a weight."""
    info = graph.model
    current = graph.opset()
    if info is None or graph.parent is not None or target <= current or current < 7:
        return False
    if set(info.opset_imports) - {"", "ai.onnx", "ai.onnx.ml"} or \
            (info.template is not None and len(info.template.functions)):
        return False
    # Weights do not change between opsets: convert the structure only, then put them back.
    model, weights = to_model_without_large_constants(graph)
    try:
        converted = onnx.version_converter.convert_version(model, target)
        onnx.checker.check_model(converted)
    except Exception:  # the converter lacks an adapter for some op: keep the model as is
        return False
    try:
        upgraded = load_with_constants_of(converted, graph, weights)
    except ValueError:
        return False  # the converter renamed or rewired a weight: not worth the risk
    graph.adopt(upgraded)
    return True


PASSES: list[type[Pass]] = [UpgradeOpset]
