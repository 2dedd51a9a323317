"""Helpers shared by the fusion passes: reading constants, checking single use, swapping a matched
group of ops for its replacement.

Why a module of its own: every fusion asks the same three questions ("is this input a constant?",
"does only this op read that value?", "replace these ops by that one, keeping the model's output
names") and each answer has a trap (Constant ops as well as initializers, graph outputs, implicit
reads from subgraphs) that is easier to get right once.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import onnx

from graphopt.ir import Graph, Op, Shape, Value
from graphopt.shapes import infer_shapes

#: The default ONNX domain as the IR spells it.
ONNX_DOMAINS = ("", "ai.onnx")
#: Float element types the folding passes compute with (others are left alone).
FLOAT_TYPES = (np.float16, np.float32, np.float64)


def is_onnx(op: Op, *op_types: str) -> bool:
    """Whether `op` is a standard-domain op of one of `op_types`."""
    return op.domain in ONNX_DOMAINS and op.op_type in op_types


def constant(graph: Graph, name: str) -> np.ndarray | None:
    """The data of `name` if a pass may treat it as constant: an initializer (not overridable
    as a graph input) or the output of a Constant op, of this graph or, for a subgraph's outer
    reference, of the enclosing graph that defines it. None otherwise."""
    if not name or name not in graph.values:
        return None
    if graph.values[name].outer:   # a subgraph reading a constant of an enclosing graph
        scope = graph.parent
        while scope is not None and name not in scope.values:
            scope = scope.parent
        return None if scope is None else constant(scope, name)
    array = graph.const_value(name)
    if array is not None:
        return array
    producer = graph.producer_op(name)
    if producer is None or not is_onnx(producer, "Constant"):
        return None
    return _constant_op_value(producer)


def _constant_op_value(op: Op) -> np.ndarray | None:
    attrs = op.attrs
    if "value" in attrs:
        value = attrs["value"]
        if isinstance(value, onnx.TensorProto):
            if value.data_location == onnx.TensorProto.EXTERNAL:
                return None
            return onnx.numpy_helper.to_array(value)
        return np.asarray(value) if isinstance(value, np.ndarray) else None
    if "value_float" in attrs:
        return np.array(attrs["value_float"], dtype=np.float32)
    if "value_floats" in attrs:
        return np.array(attrs["value_floats"], dtype=np.float32)
    if "value_int" in attrs:
        return np.array(attrs["value_int"], dtype=np.int64)
    if "value_ints" in attrs:
        return np.array(attrs["value_ints"], dtype=np.int64)
    return None


def scalar(graph: Graph, name: str) -> float | None:
    """The value of a constant with exactly one element, else None."""
    array = constant(graph, name)
    if array is None or array.size != 1 or array.dtype.kind not in "fiu":
        return None
    return float(array.reshape(-1)[0])


def is_float_array(array: np.ndarray | None) -> bool:
    return array is not None and array.dtype in FLOAT_TYPES


def sole_reader(graph: Graph, name: str) -> Op | None:
    """The one op reading `name` (through one input slot), if the value has no other use: no
    second reader, no subgraph read, not a graph output."""
    if not name or graph.is_output(name):
        return None
    uses = graph.consumers(name, implicit=True)
    if len(uses) != 1 or uses[0][1] == "implicit":
        return None
    return uses[0][0]


def used_only_by(graph: Graph, name: str, ops: Iterable[Op]) -> bool:
    """Whether every use of `name` is an explicit input of one of `ops` (and it is no graph
    output): the value may disappear together with them."""
    if graph.is_output(name):
        return False
    allowed = {op.id for op in ops}
    return all(slot != "implicit" and op.id in allowed
               for op, slot in graph.consumers(name, implicit=True))


def other_input(op: Op, name: str) -> str | None:
    """The other input of a two-input op one of whose inputs is `name` (None if both are)."""
    if len(op.inputs) != 2:
        return None
    a, b = op.inputs
    if a == name and b != name:
        return b
    if b == name and a != name:
        return a
    return None


def new_const(graph: Graph, array: np.ndarray, hint: str) -> Value:
    """A fresh initializer holding `array`."""
    return graph.add_const(np.asarray(array, order="C"), hint)  # keeps 0-d arrays 0-d


def set_input(graph: Graph, op: Op, slot: int, new: str | Value) -> None:
    """Point an input of `op` at another value; the old one goes if it was a constant or an
    outer-scope reference that nothing reads any longer (so a subgraph stops importing it)."""
    old = op.inputs[slot]
    graph.set_input(op, slot, new)
    _drop_if_orphaned(graph, old)


def set_inputs(graph: Graph, op: Op, inputs: list[str]) -> None:
    """`set_input` for every slot at once (the count may change)."""
    old = list(op.inputs)
    graph.set_inputs(op, inputs)
    for name in old:
        _drop_if_orphaned(graph, name)


def _drop_if_orphaned(graph: Graph, name: str) -> None:
    value = graph.values.get(name) if name else None
    if value is not None and (value.is_const or value.outer) and graph.is_isolated(value) \
            and not graph.is_output(value) and not graph.is_input(value):
        graph.remove_value(value)


def replace_ops(graph: Graph, old_ops: list[Op], old_out: str, new_out: str) -> None:
    """Remove `old_ops` (a matched group whose only value used outside is `old_out`) and let
    every reader of `old_out` read `new_out` instead. If `old_out` is a graph output, `new_out`
    takes over its name, so the model's interface does not change."""
    pending = {op.id: op for op in old_ops}
    while pending:  # readers first, so each removal leaves its inputs unread and prunable
        for op in list(pending.values()):
            read_by_pending = any(reader.id in pending and reader is not op
                                  for name in op.outputs if name
                                  for reader, _ in graph.consumers(name))
            if not read_by_pending:
                graph.remove_op(op)
                del pending[op.id]
    old_value = graph.values[old_out]
    new_value = graph.values[new_out]
    if not new_value.dtype:
        new_value.dtype = old_value.dtype
    if new_value.shape is None:
        new_value.shape = old_value.shape
    moved = graph.replace_value(old_value, new_value)
    assert moved, "the new output is made by an op and is no graph input or output"


def unique_op_names(graph: Graph, ops: list[Op]) -> dict[int, str]:
    """Make each op's name non-empty and unique among the graph's ops (so that meta that points
    at an op by name, such as graphopt.fuse_into, is unambiguous); {op id: name}. One scan of the
    graph for the whole batch, so marking n heads stays linear."""
    counts: dict[str, int] = {}
    for other in graph.ops.values():
        counts[other.name] = counts.get(other.name, 0) + 1
    names: dict[int, str] = {}
    for op in ops:
        if not op.name or counts.get(op.name, 0) > 1:
            counts[op.name] = counts.get(op.name, 1) - 1
            name = graph.fresh_name(op.name or op.op_type)
            while name in counts:
                name = graph.fresh_name(op.op_type)
            op.name = name
            counts[name] = 1
        names[op.id] = op.name
    return names


def copy_type(graph: Graph, src: str, dst: str) -> None:
    """Give value `dst` the dtype and shape of `src` (a new value that computes the same)."""
    source, target = graph.values[src], graph.values[dst]
    target.dtype = source.dtype
    target.shape = source.shape


class Shapes:
    """Shapes of values, running onnx shape inference at most once per pass run and only when
    a shape is missing (passes create values whose shapes they set themselves)."""

    def __init__(self, graph: Graph) -> None:
        self.graph = graph
        self.inferred = False

    def shape(self, name: str) -> Shape | None:
        value = self.graph.values[name]
        if value.shape is None and not self.inferred and self.graph.parent is None:
            self.inferred = True
            infer_shapes(self.graph)
        return value.shape

    def rank(self, name: str) -> int | None:
        shape = self.shape(name)
        return None if shape is None else len(shape)
