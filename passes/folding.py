"""Constant folding: ops whose inputs are all constants become initializers.

Values are computed with the graphopt runtime's own kernels (never onnxruntime or onnx's
reference evaluator), so folding means exactly what the runtime would compute. An op the runtime
has no kernel for is simply left in place.

Shape inference runs first, so that `Shape` (and `Size`) of a value whose shape is static folds
even though the value itself is not constant; the Shape -> Gather -> Unsqueeze -> Concat ->
Reshape chains exporters emit then fold one op after the other in the same sweep.

Ops that make a large tensor out of a small one (ConstantOfShape, Expand, Tile, Range, ...) fold
only while the result stays under `fold_size_limit` bytes (option, default 1 MiB): a 4-byte fill
value should not become a 100 MB initializer. The exception is a result some rewrite needs as
data: a Conv/Gemm/MatMul weight or a BatchNormalization parameter (the light models in the onnx
wheel make all their weights with ConstantOfShape).
"""

from __future__ import annotations

import weakref

import numpy as np
import onnx

from graphopt.ir import Graph, Op, Value, _densify, np_dtype_to_onnx
from graphopt.pass_manager import Pass, PassContext, PassResult
from graphopt.passes.cleanup import NONDETERMINISTIC, is_pure

#: Default of the `fold_size_limit` option (bytes).
DEFAULT_FOLD_SIZE_LIMIT = 1 << 20
#: Ops whose output can be far larger than their inputs; their folding obeys the size limit.
EXPANDING_OPS = frozenset({"ConstantOfShape", "Expand", "Tile", "Range", "EyeLike", "OneHot",
                           "Resize", "Upsample", "Pad"})
#: (op_type, input slot) whose data a later rewrite folds into the op (weights, BN parameters).
VALUE_CONSUMERS: dict[str, frozenset[int]] = {
    "Conv": frozenset({1, 2}), "ConvTranspose": frozenset({1, 2}), "Gemm": frozenset({0, 1, 2}),
    "MatMul": frozenset({0, 1}), "BatchNormalization": frozenset({1, 2, 3, 4}),
    "InstanceNormalization": frozenset({1, 2}), "LayerNormalization": frozenset({1, 2}),
    "PRelu": frozenset({1}), "Gather": frozenset({0}),
}
#: Ops that pass data through unchanged in value (a weight may reach its consumer through them).
_VALUE_PRESERVING = frozenset({"Identity", "Cast", "Reshape", "Transpose", "Squeeze", "Unsqueeze",
                               "Flatten", "Concat", "Slice", "Split"})

# Per graph: its fingerprint when shape inference last ran on it, so inference is not repeated
# while the graph has not changed.
_inferred_at: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class ConstantFolding(Pass):
    """Constant nodes become initializers; ops with all-constant inputs are evaluated once."""

    name = "constant_folding"

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        result = PassResult()
        limit = int(ctx.option("fold_size_limit", DEFAULT_FOLD_SIZE_LIMIT))
        if graph.parent is None:
            _infer_shapes_if_useful(graph)
        import graphopt.runtime.kernels  # noqa: F401  (importing registers every kernel)
        for op in graph.topological_ops():
            if op.graph is not graph or not _foldable(op):
                continue
            if op.op_type == "Constant":
                array = _constant_attr(op)
                if array is None:
                    continue
                arrays: list[np.ndarray] | None = [array]
            elif op.op_type in ("Shape", "Size") and graph.const_value(op.inputs[0]) is None:
                arrays = _shape_only(graph, op)
            else:
                arrays = _evaluate(graph, op, limit)
            if arrays is None:
                continue
            _replace_with_constants(graph, op, arrays)
            result.count("constants_materialized" if op.op_type == "Constant" else
                         "shapes_folded" if op.op_type in ("Shape", "Size") else "ops_folded")
        result.count("constants_removed", _drop_orphaned_constants(graph))
        return result


def _foldable(op: Op) -> bool:
    return (is_pure(op) and op.op_type not in NONDETERMINISTIC
            and not any(True for _ in op.subgraphs()))


def _infer_shapes_if_useful(graph: Graph) -> None:
    """Run shape inference when some value has no known shape, unless the graph has not changed
    since it last ran (it could not learn more)."""
    from graphopt.shapes import infer_shapes

    unknown = any(not v.is_const and (v.shape is None or not v.dtype)
                  for v in graph.values.values())
    if not unknown or _inferred_at.get(graph) == _fingerprint(graph):
        return
    infer_shapes(graph)
    _inferred_at[graph] = _fingerprint(graph)


def _fingerprint(graph: Graph) -> tuple[int, int, int]:
    """Changes whenever ops or values are added or removed (op ids only grow)."""
    return len(graph.ops), len(graph.values), max(graph.ops, default=-1)


def _constant_attr(op: Op) -> np.ndarray | None:
    """The value of a Constant node from whichever attribute holds it."""
    attrs = op.attrs
    if "value" in attrs:
        return onnx.numpy_helper.to_array(attrs["value"])
    if "sparse_value" in attrs:
        return _densify(attrs["sparse_value"])
    for key, dtype in (("value_float", np.float32), ("value_floats", np.float32),
                       ("value_int", np.int64), ("value_ints", np.int64)):
        if key in attrs:
            return np.array(attrs[key], dtype=dtype)
    for key in ("value_string", "value_strings"):
        if key in attrs:
            return np.array(attrs[key], dtype=object)
    return None


def _shape_only(graph: Graph, op: Op) -> list[np.ndarray] | None:
    """Shape/Size of a value whose shape is static (its data need not be constant)."""
    shape = graph.values[op.inputs[0]].static_shape
    if shape is None:
        return None
    if op.op_type == "Size":
        return [np.array(int(np.prod(shape, dtype=np.int64)), dtype=np.int64)]
    start, end = op.attrs.get("start", 0), op.attrs.get("end", None)
    return [np.array(shape[start:end], dtype=np.int64)]


def _evaluate(graph: Graph, op: Op, limit: int) -> list[np.ndarray] | None:
    """The op's outputs computed by the runtime kernel, or None when it should not fold."""
    from graphopt.errors import UnsupportedOpError
    from graphopt.runtime.kernels.registry import KernelNode, lookup

    if not all(_is_constant(graph, graph.values[n]) for n in op.inputs if n):
        return None  # decided before decoding any (possibly large) initializer
    consts = graph.const_inputs(op)
    if any(c is None for n, c in zip(op.inputs, consts) if n):
        return None
    if any(c.dtype == object for c in consts if c is not None):
        return None
    if _too_large(graph, op, consts, limit):
        return None
    try:
        factory = lookup(op.op_type, op.domain, graph.opset(op.domain))
        node = KernelNode(op=op, graph=graph, opset=graph.opset(op.domain),
                          consts=_read_only(consts))
        outputs = factory(node)(*_read_only(consts))
    except UnsupportedOpError:
        return None
    except Exception:  # a kernel that rejects these inputs: leave the op for runtime errors
        return None
    arrays = []
    for name, out in zip(op.outputs, outputs):
        if not isinstance(out, (np.ndarray, np.generic)):
            return None  # a sequence or map: not an initializer
        array = _owned(out, consts)
        if name and not _matches_declaration(graph.values[name], array):
            return None
        arrays.append(array)
    if len(arrays) != len(op.outputs) or any(a.dtype == object for a in arrays):
        return None
    return arrays


def _owned(out: np.ndarray | np.generic, consts: list[np.ndarray | None]) -> np.ndarray:
    """The result as an array of its own: a fresh kernel result as is (copying a 400 MB weight
    costs seconds), a view of an input (or of anything else) copied."""
    if isinstance(out, np.ndarray) and out.flags.owndata and out.flags.c_contiguous \
            and out.flags.writeable \
            and not any(c is not None and np.may_share_memory(out, c) for c in consts):
        return out
    return np.array(out, copy=True, order="C")


def _is_constant(graph: Graph, value: Value) -> bool:
    """`graph.const_value(value) is not None`, without decoding the data."""
    if not value.is_const or value.outer:
        return False
    info = graph.root.model
    return not graph.is_input(value) or (info is not None and info.ir_version < 4)


def _read_only(consts: list[np.ndarray | None]) -> list[np.ndarray | None]:
    views = []
    for c in consts:
        if c is not None:
            c = c.view()
            c.flags.writeable = False
        views.append(c)
    return views


def _matches_declaration(value: Value, array: np.ndarray) -> bool:
    """A folded result must have the type (and static shape) the graph says the value has."""
    if value.dtype and np_dtype_to_onnx(array.dtype) != value.dtype:
        return False
    static = value.static_shape
    return static is None or static == tuple(array.shape)


def _too_large(graph: Graph, op: Op, consts: list[np.ndarray | None], limit: int) -> bool:
    """Whether the op would make a constant over the limit and larger than its inputs (an
    expanding op, or any op whose declared output is that large) that no rewrite needs."""
    if op.op_type in EXPANDING_OPS:
        nbytes = _predicted_nbytes(graph, op, consts)
        if nbytes is not None and nbytes <= limit:
            return False
    else:
        nbytes = graph.values[op.outputs[0]].nbytes if op.outputs and op.outputs[0] else 0
        if nbytes <= max(limit, sum(c.nbytes for c in consts if c is not None)):
            return False
    return not any(_values_needed(graph, graph.values[n]) for n in op.outputs if n)


def _predicted_nbytes(graph: Graph, op: Op, consts: list[np.ndarray | None]) -> int | None:
    """Bytes of the op's first output, from its declared shape or from its inputs."""
    out = graph.values[op.outputs[0]]
    if out.nbytes:
        return out.nbytes
    itemsize = 4
    if out.dtype:
        try:
            itemsize = onnx.helper.tensor_dtype_to_np_dtype(out.dtype).itemsize
        except (KeyError, TypeError, ValueError):
            pass
    try:
        if op.op_type == "ConstantOfShape":
            return int(np.prod(consts[0].astype(np.int64), dtype=np.int64)) * itemsize
        if op.op_type == "Expand":
            shape = np.broadcast_shapes(consts[0].shape, tuple(int(d) for d in consts[1]))
            return int(np.prod(shape, dtype=np.int64)) * consts[0].itemsize
        if op.op_type == "Tile":
            return consts[0].nbytes * int(np.prod(consts[1].astype(np.int64), dtype=np.int64))
        if op.op_type == "Range":
            start, stop, delta = (float(c.reshape(-1)[0]) for c in consts[:3])
            return max(int(np.ceil((stop - start) / delta)), 0) * consts[0].itemsize
    except Exception:
        return None
    return None


def _values_needed(graph: Graph, value: Value, depth: int = 0) -> bool:
    """Whether the data of `value` reaches a slot whose rewrite folds it (a Conv weight, ...),
    directly or through value-preserving ops."""
    if depth > 4:
        return False
    for op, slot in graph.consumers(value):
        if slot in VALUE_CONSUMERS.get(op.op_type, ()):
            return True
        if op.op_type in _VALUE_PRESERVING and all(o for o in op.outputs):
            if any(_values_needed(graph, graph.values[o], depth + 1) for o in op.outputs):
                return True
    return False


def _replace_with_constants(graph: Graph, op: Op, arrays: list[np.ndarray]) -> None:
    """Remove `op`; its outputs become initializers under the same names."""
    graph.remove_op(op)  # prune: unused outputs and constants only this op read go too
    for name, array in zip(op.outputs, arrays):
        if name and name in graph.values:
            graph.values[name].const = array


def _drop_orphaned_constants(graph: Graph) -> int:
    """Before IR 4 initializers are listed as graph inputs, so `remove_op` and dead-code
    elimination keep them; drop the ones nothing reads any longer (the listing means nothing
    there: onnxruntime does not even accept a feed for them)."""
    info = graph.root.model
    if graph.parent is not None or info is None or info.ir_version >= 4:
        return 0
    unused = [name for name in graph.inputs
              if graph.values[name].is_const and graph.is_isolated(graph.values[name])
              and not graph.is_output(name)]
    for name in unused:
        graph.inputs.remove(name)
        graph.remove_value(graph.values[name])
    return len(unused)


#: The family's passes, in the order the pipelines run them.
PASSES: list[type[Pass]] = [ConstantFolding]
