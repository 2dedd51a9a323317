"""O1 cleanup passes: dead code, Identity and inference Dropout, common subexpressions.

None of these change numerics. Ops from domains graphopt does not know are never removed or
merged: their semantics (and side effects) are unknown, so they pass through untouched.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx

from graphopt.ir import Graph, Op, Shape, Value
from graphopt.pass_manager import Pass, PassContext, PassResult

#: Domains whose ops are pure functions of their inputs (ONNX semantics).
KNOWN_DOMAINS = frozenset({"", "ai.onnx", "ai.onnx.ml"})
#: Ops whose outputs differ from call to call; never merged by CSE.
NONDETERMINISTIC = frozenset({"RandomNormal", "RandomUniform", "RandomNormalLike",
                              "RandomUniformLike", "Multinomial", "Bernoulli", "Dropout"})
#: Constants up to this size are deduplicated by content.
DEDUP_CONST_MAX_BYTES = 1 << 20


def is_pure(op: Op) -> bool:
    """Whether graphopt may delete or merge the op (a known-domain op)."""
    return op.domain in KNOWN_DOMAINS


class DeadCodeElimination(Pass):
    """Remove ops whose outputs nobody reads, unused constants, and unused optional trailing
    outputs (such as Dropout's mask)."""

    name = "dead_code"

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        result = PassResult()
        for op in reversed(graph.topological_ops()):
            if not is_pure(op):
                continue
            outs = graph.output_values(op)
            if all(v is None or not graph.has_users(v) for v in outs):
                graph.remove_op(op)
                result.count("ops_removed")
            else:
                result.count("optional_outputs_dropped", _drop_unused_optional_outputs(graph, op))
        for value in list(graph.values.values()):
            if value.is_const and graph.is_isolated(value) and not graph.is_output(value) \
                    and not graph.is_input(value):
                graph.remove_value(value)
                result.count("constants_removed")
            elif value.outer and graph.is_isolated(value) and not graph.is_output(value):
                graph.remove_value(value)  # the owner's implicit inputs shrink: a change
                result.count("outer_references_removed")
        return result


def _drop_unused_optional_outputs(graph: Graph, op: Op) -> int:
    """Blank trailing outputs that the schema marks optional and nobody reads."""
    schema = op_schema(graph, op)
    if schema is None or not schema.outputs:
        return 0
    last_formal = schema.outputs[-1]
    if last_formal.option == onnx.defs.OpSchema.FormalParameterOption.Variadic:
        return 0
    dropped = 0
    outputs = list(op.outputs)
    for slot in range(len(outputs) - 1, 0, -1):
        name = outputs[slot]
        if slot >= len(schema.outputs):
            break
        if schema.outputs[slot].option != onnx.defs.OpSchema.FormalParameterOption.Optional:
            break
        if name and graph.has_users(name):
            break
        if name:
            graph.nx.remove_edge(op, graph.values[name], key=slot)
            graph.remove_value(graph.values[name])
            dropped += 1
        outputs.pop()
    if dropped:
        op._outputs = tuple(outputs)
    return dropped


def op_schema(graph: Graph, op: Op) -> onnx.defs.OpSchema | None:
    """The op's schema at the model's opset, or None for unknown ops."""
    try:
        return onnx.defs.get_schema(op.op_type, graph.opset(op.domain), op.domain)
    except Exception:  # SchemaError for unknown ops/domains
        return None


def bypass(graph: Graph, op: Op, keep: int = 0) -> bool:
    """Remove a single-output op whose output equals its input `keep`; readers of the output read
    the input. Returns False (and leaves the op) when the output is a graph output that cannot
    take over the input's name."""
    src = graph.values[op.inputs[keep]]
    out = graph.values[op.outputs[0]]
    if graph.is_output(out):
        movable = (graph.producer(src) is not None and not graph.is_input(src)
                   and not graph.is_output(src))
        if not movable:
            return False
    graph.remove_op(op, prune=False)  # keep `src` even if this op was its only reader
    for name in op.outputs[1:]:
        if name and not graph.has_users(name):
            graph.remove_value(graph.values[name])
    replaced = graph.replace_value(out, src)
    assert replaced, "bypass checked that the output can move"
    return True


def substitute(graph: Graph, old: Value, new: Value) -> None:
    """Make every reader of `old` read `new`, for a rewrite that computes `old` another way.
    `old` must have lost its producer already. A graph output keeps its name: `new` takes it
    over, or, where it cannot (a graph input, a constant, another output), an Identity copies
    `new` into it."""
    if not graph.replace_value(old, new):
        graph.add_op("Identity", [new], [old])


def add_simple_op(graph: Graph, op_type: str, inputs: Sequence[str | Value], dtype: int,
                  shape: Shape | None, attrs: dict[str, Any] | None = None,
                  hint: str | None = None) -> Value:
    """Add a single-output op with a fresh output of known type and shape; return the output."""
    out = graph.add_value(graph.fresh_name(hint or op_type.lower()), dtype, shape)
    graph.add_op(op_type, inputs, [out], attrs)
    return out


class RemoveIdentity(Pass):
    """Identity ops become their input (kept only where a graph output must keep its name)."""

    name = "remove_identity"

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        result = PassResult()
        for op in list(graph.ops.values()):
            if op.op_type == "Identity" and op.domain in ("", "ai.onnx") and bypass(graph, op):
                result.count("identities_removed")
        return result


class RemoveDropout(Pass):
    """Inference-mode Dropout is the identity on its data output."""

    name = "remove_dropout"

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        result = PassResult()
        for op in list(graph.ops.values()):
            if op.op_type != "Dropout" or op.domain not in ("", "ai.onnx"):
                continue
            if len(op.outputs) > 1 and op.outputs[1] and graph.has_users(op.outputs[1]):
                continue  # the mask is used
            if not _dropout_is_inference(graph, op):
                continue
            if bypass(graph, op):
                result.count("dropouts_removed")
        return result


def _dropout_is_inference(graph: Graph, op: Op) -> bool:
    if graph.opset() < 7 and op.attrs.get("is_test", 0) == 0:
        # Before opset 7, is_test=0 means training mode; inference engines still run it as
        # identity, but the model asked for training: leave it.
        return False
    if len(op.inputs) >= 3 and op.inputs[2]:
        mode = graph.const_value(op.inputs[2])
        return mode is not None and not bool(np.asarray(mode).reshape(-1)[0])
    return True


class CommonSubexpressionElimination(Pass):
    """Merge ops that compute the same thing from the same inputs, and identical constants."""

    name = "cse"

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        result = PassResult()
        result.count("constants_merged", _merge_duplicate_constants(graph))
        seen: dict[tuple, Op] = {}
        for op in graph.topological_ops():
            if op.graph is not graph or not is_pure(op) or op.op_type in NONDETERMINISTIC \
                    or any(True for _ in op.subgraphs()):
                continue
            key = (op.domain, op.op_type, op.inputs, len(op.outputs), _attrs_key(op))
            twin = seen.get(key)
            if twin is None:
                seen[key] = op
                continue
            if _merge_into(graph, op, twin):
                result.count("ops_merged")
        return result


def _merge_into(graph: Graph, dup: Op, keep: Op) -> bool:
    """Redirect readers of `dup`'s outputs to `keep`'s; remove `dup` if nothing needs it."""
    for dup_name, keep_name in zip(dup.outputs, keep.outputs):
        if not dup_name:
            continue
        if not keep_name:
            return False  # keep dropped an output that dup still provides
    blocked = False
    for dup_name, keep_name in zip(dup.outputs, keep.outputs):
        if not dup_name:
            continue
        dup_value, keep_value = graph.values[dup_name], graph.values[keep_name]
        graph.replace_all_uses(dup_value, keep_value)
        if graph.is_output(dup_value):
            blocked = True
    if blocked:
        return False
    graph.remove_op(dup)
    return True


def _merge_duplicate_constants(graph: Graph) -> int:
    """Point readers of equal small constants at one of them."""
    by_content: dict[tuple, Any] = {}
    merged = 0
    for value in list(graph.values.values()):
        if not value.is_const or value.outer or graph.is_input(value) or graph.is_output(value):
            continue
        if value.nbytes > DEDUP_CONST_MAX_BYTES or value.nbytes == 0 and value.static_shape is None:
            continue
        array = value.const
        if array is None or array.dtype == object:
            continue
        key = (value.dtype, array.shape, array.tobytes())
        first = by_content.get(key)
        if first is None:
            by_content[key] = value
            continue
        graph.replace_all_uses(value, first)
        if graph.is_isolated(value):
            graph.remove_value(value)
        merged += 1
    return merged


def _attrs_key(op: Op) -> tuple:
    return tuple(sorted((name, _hashable(v)) for name, v in op.attrs.items()))


def _hashable(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return tuple(_hashable(v) for v in value)
    if isinstance(value, np.ndarray):
        return (value.dtype.str, value.shape, value.tobytes())
    if hasattr(value, "SerializeToString"):
        return value.SerializeToString()
    if isinstance(value, float) and value != value:
        return ("nan",)
    return value
