"""The graph IR: a bipartite networkx MultiDiGraph of values and ops.

Why bipartite: a value (tensor) has at most one producer but many consumers, and most rewrites ask
"who produces this / who reads this"; with values as nodes both questions are one edge lookup, and
an op with the same value on two input slots is two parallel edges keyed by slot.

Invariants (checked by `Graph.check`):
- every networkx node is a `Value` or an `Op`; edges go value -> op (key = input slot, or
  `IMPLICIT` when a subgraph of the op reads the value from the outer scope) and op -> value
  (key = output slot);
- a value has at most one producer; graph inputs, constants and outer-scope references have none;
- `op.inputs` / `op.outputs` and the edges agree; the ops form a DAG;
- names are unique in the whole model (subgraphs included), as ONNX requires.

Mutate only through `Graph` methods; `op.inputs` and `op.outputs` are tuples so that a stray
assignment cannot bypass the edge bookkeeping.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import networkx as nx
import numpy as np
import onnx

from graphopt.errors import IRError

#: Edge key of an implicit use: a subgraph of the op reads the value from the outer scope.
IMPLICIT = "implicit"

Dim = int | str | None
Shape = tuple[Dim, ...]


def np_dtype_to_onnx(dtype: np.dtype) -> int:
    """ONNX element type of a numpy dtype (0 when there is none)."""
    try:
        return int(onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype)))
    except (KeyError, TypeError, ValueError):
        return 0


def onnx_to_np_dtype(elem_type: int) -> np.dtype:
    """numpy dtype that holds an ONNX element type."""
    return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type))


class Value:
    """A tensor: name, element type, shape, and for constants (initializers) the data.

    The data of a loaded initializer stays in its TensorProto (or a memory map of its external
    file) until a pass asks for `const`, so a load/save round trip neither decodes nor alters it.
    """

    __slots__ = (
        "name", "dtype", "shape", "doc_string", "meta", "qparams", "outer", "graph",
        "_array", "_proto", "_loader", "type_proto", "_declared", "sparse_proto",
        "sparse_node", "value_info_proto",
    )

    def __init__(self, name: str, dtype: int = 0, shape: Shape | None = None) -> None:
        self.name = name
        self.dtype = dtype              # onnx.TensorProto.DataType, 0 = unknown
        self.shape = shape              # None = unknown rank; dims are int, symbol or None
        self.doc_string = ""
        self.meta: dict[str, str] = {}  # ValueInfoProto.metadata_props
        self.qparams: dict[str, Any] | None = None
        self.outer = False              # a reference to a value of an enclosing graph
        self.graph: Graph | None = None
        self._array: np.ndarray | None = None
        self._proto: onnx.TensorProto | None = None
        self._loader = None             # callable returning the array of an external tensor
        # The type as loaded (kept verbatim for non-tensor types and for a lossless round trip
        # while dtype and shape are unchanged) and the (dtype, shape) it was decoded to.
        self.type_proto: onnx.TypeProto | None = None
        self._declared: tuple[int, Shape | None] | None = None
        self.sparse_proto: onnx.SparseTensorProto | None = None
        # Where sparse data is stored in the file: None for a sparse_initializer, else the
        # Constant node (sparse_value attribute) that holds it. Standard ops accept only dense
        # tensors, so onnx's strict type check rejects a sparse initializer read by one, and
        # accepts a Constant's output, which is dense.
        self.sparse_node: onnx.NodeProto | None = None
        self.value_info_proto: onnx.ValueInfoProto | None = None

    def __repr__(self) -> str:
        kind = "const " if self.is_const else ""
        return f"<Value {kind}{self.name!r} {onnx.TensorProto.DataType.Name(self.dtype) if self.dtype else '?'} {self.shape}>"

    # -- constant data -----------------------------------------------------------------------
    @property
    def is_const(self) -> bool:
        return self._array is not None or self._proto is not None or self.sparse_proto is not None

    @property
    def const(self) -> np.ndarray | None:
        """The value's data if it is a constant (decoded on first use), else None."""
        if self._array is None:
            if self._loader is not None:
                self._array = self._loader()
            elif self._proto is not None:
                self._array = onnx.numpy_helper.to_array(self._proto)
            elif self.sparse_proto is not None:
                self._array = _densify(self.sparse_proto)
        return self._array

    @const.setter
    def const(self, array: np.ndarray | None) -> None:
        self._array = None if array is None else np.asarray(array)
        self._proto = None
        self._loader = None
        self.sparse_proto = None
        self.sparse_node = None
        if self._array is not None:
            self.dtype = np_dtype_to_onnx(self._array.dtype) or self.dtype
            self.shape = tuple(int(d) for d in self._array.shape)

    def set_const_proto(self, proto: onnx.TensorProto, loader=None) -> None:
        """Attach an initializer without decoding it (used by the loader)."""
        self._array = None
        self._proto = proto
        self._loader = loader
        self.dtype = proto.data_type
        self.shape = tuple(int(d) for d in proto.dims)

    @property
    def const_proto(self) -> onnx.TensorProto | None:
        """The untouched TensorProto of a loaded initializer, or None once it was replaced."""
        return self._proto

    @property
    def nbytes(self) -> int:
        """Bytes of the tensor if its shape and type are known (0 otherwise)."""
        if self.shape is None or not self.dtype or any(not isinstance(d, int) for d in self.shape):
            return 0
        try:
            itemsize = onnx_to_np_dtype(self.dtype).itemsize
        except (KeyError, TypeError, ValueError):
            return 0
        return int(np.prod(self.shape, dtype=np.int64)) * itemsize

    @property
    def rank(self) -> int | None:
        return None if self.shape is None else len(self.shape)

    @property
    def static_shape(self) -> tuple[int, ...] | None:
        """The shape if every dim is a known int, else None."""
        if self.shape is None or any(not isinstance(d, int) for d in self.shape):
            return None
        return tuple(self.shape)  # type: ignore[return-value]


def _densify(sparse: onnx.SparseTensorProto) -> np.ndarray:
    """Dense array of a SparseTensorProto (indices linearized [NNZ] or coordinates [NNZ, rank])."""
    values = onnx.numpy_helper.to_array(sparse.values)
    shape = tuple(sparse.dims)
    dense = np.zeros(shape, dtype=values.dtype)
    if values.size:
        indices = onnx.numpy_helper.to_array(sparse.indices).astype(np.int64)
        flat = indices if indices.ndim == 1 else np.ravel_multi_index(tuple(indices.T), shape)
        dense.reshape(-1)[flat] = values.reshape(-1)
    return dense


class Op:
    """An operator node. Attributes are plain Python values; a subgraph attribute is a `Graph`."""

    __slots__ = (
        "id", "op_type", "domain", "name", "attrs", "attr_types", "attr_protos", "meta",
        "doc_string", "overload", "_inputs", "_outputs", "graph",
    )

    def __init__(self, op_id: int, op_type: str, domain: str = "") -> None:
        self.id = op_id
        self.op_type = op_type
        self.domain = domain
        self.name = ""
        self.attrs: dict[str, Any] = {}
        # ONNX attribute type per name where the Python value alone is ambiguous (an empty list,
        # an int given for a float attribute); filled by the loader, used by the saver.
        self.attr_types: dict[str, int] = {}
        # Attributes kept verbatim (with ref_attr_name or a doc_string); the saver emits them as is.
        self.attr_protos: dict[str, onnx.AttributeProto] = {}
        self.meta: dict[str, str] = {}
        self.doc_string = ""
        self.overload = ""
        self._inputs: tuple[str, ...] = ()
        self._outputs: tuple[str, ...] = ()
        self.graph: Graph | None = None

    @property
    def inputs(self) -> tuple[str, ...]:
        """Input value names in slot order; "" marks an omitted optional input."""
        return self._inputs

    @property
    def outputs(self) -> tuple[str, ...]:
        return self._outputs

    def attr(self, name: str, default: Any = None) -> Any:
        return self.attrs.get(name, default)

    def subgraphs(self) -> Iterator[Graph]:
        """Nested graphs held by attributes (If branches, Loop/Scan bodies)."""
        for value in self.attrs.values():
            if isinstance(value, Graph):
                yield value
            elif isinstance(value, list) and value and isinstance(value[0], Graph):
                yield from value

    def __repr__(self) -> str:
        dom = f"{self.domain}." if self.domain else ""
        return f"<Op #{self.id} {dom}{self.op_type} {self.name!r} {list(self._inputs)} -> {list(self._outputs)}>"


@dataclass
class ModelInfo:
    """Model-level fields of the root graph. `template` is the loaded ModelProto without its
    graph, so that fields graphopt does not model (functions, training info, configuration,
    metadata) are written back unchanged."""

    ir_version: int = 8
    opset_imports: dict[str, int] = field(default_factory=lambda: {"": 17})
    template: onnx.ModelProto | None = None
    external_data_dir: str | None = None


class Graph:
    """A model graph (the root, with `model` info) or a subgraph (with `parent`)."""

    def __init__(self, name: str = "graph", parent: Graph | None = None) -> None:
        self.nx = nx.MultiDiGraph()
        self.name = name
        self.doc_string = ""
        self.parent = parent
        self.owner: Op | None = None
        self.values: dict[str, Value] = {}
        self.ops: dict[int, Op] = {}
        # Ops holding subgraphs (If/Loop/Scan), so that walking nested graphs does not scan
        # every op; kept by add_op/refresh_implicit/remove_op.
        self._nesting: dict[int, Op] = {}
        self.inputs: list[str] = []
        self.outputs: list[str] = []
        self.model: ModelInfo | None = ModelInfo() if parent is None else None
        # Graph-level proto fields graphopt does not model (metadata_props, quantization
        # annotations); written back as they were.
        self.template: onnx.GraphProto | None = None
        self._op_ids = itertools.count() if parent is None else parent._op_ids
        self._names: set[str] = set() if parent is None else parent._names
        self._name_counter = itertools.count() if parent is None else parent._name_counter

    # -- scope -------------------------------------------------------------------------------
    @property
    def root(self) -> Graph:
        graph = self
        while graph.parent is not None:
            graph = graph.parent
        return graph

    def opset(self, domain: str = "") -> int:
        """Opset version the model imports for `domain` (0 when it does not import it)."""
        info = self.root.model
        assert info is not None
        if domain == "ai.onnx":
            domain = ""
        return info.opset_imports.get(domain, 0)

    def fresh_name(self, hint: str) -> str:
        """A name unused anywhere in the model, derived from `hint`."""
        base = hint or "t"
        if base not in self._names:
            self._names.add(base)
            return base
        while True:
            candidate = f"{base}__{next(self._name_counter)}"
            if candidate not in self._names:
                self._names.add(candidate)
                return candidate

    # -- values ------------------------------------------------------------------------------
    def add_value(self, name: str, dtype: int = 0, shape: Shape | None = None) -> Value:
        if name in self.values:
            raise IRError(f"value {name!r} already exists in graph {self.name!r}")
        if not name:
            raise IRError("a value needs a non-empty name")
        value = Value(name, dtype, shape)
        value.graph = self
        self.values[name] = value
        self._names.add(name)
        self.nx.add_node(value)
        return value

    def add_const(self, array: np.ndarray, hint: str = "const") -> Value:
        """A new constant (initializer) with a fresh name."""
        value = self.add_value(self.fresh_name(hint))
        value.const = np.asarray(array)
        return value

    def add_input(self, name: str, dtype: int, shape: Shape | None) -> Value:
        value = self.add_value(name, dtype, shape)
        self.inputs.append(name)
        return value

    def remove_value(self, value: Value) -> None:
        """Remove a value that nothing produces or reads any longer."""
        if not self.is_isolated(value):
            raise IRError(f"cannot remove value {value.name!r}: it still has a producer or users")
        if value.name in self.outputs or value.name in self.inputs:
            raise IRError(f"cannot remove value {value.name!r}: it is a graph input or output")
        self.nx.remove_node(value)
        del self.values[value.name]

    def is_isolated(self, value: Value) -> bool:
        """No producer and no readers (constant time, unlike networkx's degree, which counts
        every reader: a constant shared by thousands of ops would make removals quadratic)."""
        return not self.nx._succ[value] and not self.nx._pred[value]

    def value(self, name: str) -> Value:
        try:
            return self.values[name]
        except KeyError:
            raise IRError(f"no value named {name!r} in graph {self.name!r}") from None

    def is_output(self, value: Value | str) -> bool:
        name = value if isinstance(value, str) else value.name
        return name in self.outputs

    def is_input(self, value: Value | str) -> bool:
        name = value if isinstance(value, str) else value.name
        return name in self.inputs

    def rename_value(self, value: Value, new_name: str) -> None:
        """Rename a value everywhere: producer, consumers, graph inputs/outputs, subgraphs."""
        old = value.name
        if new_name == old:
            return
        if new_name in self.values:
            raise IRError(f"cannot rename {old!r} to {new_name!r}: the name is taken")
        for op, slot in self.consumers(value, implicit=True):
            if slot == IMPLICIT:
                for sub in op.subgraphs():
                    if old in sub.values:
                        sub.rename_value(sub.values[old], new_name)
            else:
                op._inputs = tuple(new_name if n == old else n for n in op._inputs)
        producer = self.producer(value)
        if producer is not None:
            op = producer[0]
            op._outputs = tuple(new_name if n == old else n for n in op._outputs)
        self.inputs = [new_name if n == old else n for n in self.inputs]
        self.outputs = [new_name if n == old else n for n in self.outputs]
        del self.values[old]
        value.name = new_name
        self.values[new_name] = value
        self._names.add(new_name)

    # -- ops ---------------------------------------------------------------------------------
    def add_op(
        self,
        op_type: str,
        inputs: Sequence[str | Value],
        outputs: Sequence[str | Value] | int = 1,
        attrs: dict[str, Any] | None = None,
        *,
        domain: str = "",
        name: str | None = None,
        meta: dict[str, str] | None = None,
    ) -> Op:
        """Add an op. Inputs must exist ("" for omitted ones); outputs that do not exist are
        created; `outputs` may be a count, in which case fresh names are made."""
        op = Op(next(self._op_ids), op_type, domain)
        op.graph = self
        op.name = self.fresh_name(name or op_type)
        op.attrs = dict(attrs or {})
        op.meta = dict(meta or {})
        in_names = tuple(v.name if isinstance(v, Value) else v for v in inputs)
        if isinstance(outputs, int):
            out_names = tuple(self.fresh_name(f"{op.name}_out{i}" if outputs > 1 else f"{op.name}_out")
                              for i in range(outputs))
        else:
            out_names = tuple(v.name if isinstance(v, Value) else v for v in outputs)
        for n in in_names:
            if n and n not in self.values:
                self._resolve_outer(n)
        for n in out_names:
            if not n:
                continue
            existing = self.values.get(n)
            if existing is not None and (self.producer(existing) is not None or existing.is_const
                                         or existing.outer or self.is_input(n)):
                raise IRError(f"value {n!r} already has a producer; cannot add {op_type} writing it")
        op._inputs = in_names
        op._outputs = out_names
        self.ops[op.id] = op
        self.nx.add_node(op)
        for slot, n in enumerate(in_names):
            if n:
                self.nx.add_edge(self.values[n], op, key=slot)
        for slot, n in enumerate(out_names):
            if n:
                value = self.values.get(n) or self.add_value(n)
                self.nx.add_edge(op, value, key=slot)
        self._link_implicit(op)
        return op

    def _resolve_outer(self, name: str) -> Value:
        """Make `name`, defined in an enclosing graph, visible here as an outer reference."""
        if name in self.values:
            return self.values[name]
        scope = self.parent
        while scope is not None and name not in scope.values:
            scope = scope.parent
        if scope is None:
            raise IRError(f"input {name!r} is produced by nothing in graph {self.name!r}")
        value = self.add_value(name)
        value.outer = True
        source = scope.values[name]
        value.dtype, value.shape = source.dtype, source.shape
        return value

    def _link_implicit(self, op: Op) -> None:
        """Add edges for values that the op's subgraphs read from this graph's scope (and note
        whether the op holds subgraphs at all)."""
        if any(True for _ in op.subgraphs()):
            self._nesting[op.id] = op
        else:
            self._nesting.pop(op.id, None)
        for name in _free_names(op):
            if name not in self.values:
                self._resolve_outer(name)
            value = self.values[name]
            if not self.nx.has_edge(value, op, key=IMPLICIT):
                self.nx.add_edge(value, op, key=IMPLICIT)
        for sub in op.subgraphs():
            sub.parent = self
            sub.owner = op
            sub._adopt_names()

    def refresh_implicit(self, op: Op) -> None:
        """Recompute the implicit edges of `op` after its subgraphs changed."""
        stale = [u for u, _, k in self.nx.in_edges(op, keys=True) if k == IMPLICIT]
        for u in stale:
            self.nx.remove_edge(u, op, key=IMPLICIT)
        self._link_implicit(op)

    def _adopt_names(self) -> None:
        """Share the root's name registry and id counter (a subgraph built on its own)."""
        root = self.root
        if self._names is not root._names:
            root._names |= self._names
            self._names = root._names
            self._name_counter = root._name_counter
            self._op_ids = root._op_ids
            for op in self.ops.values():
                for sub in op.subgraphs():
                    sub._adopt_names()

    def remove_op(self, op: Op, *, prune: bool = True) -> None:
        """Remove an op. With `prune`, its outputs that nobody uses any longer go too, and so do
        its inputs that become unused constants or outer references."""
        ins = {self.values[n] for n in op._inputs if n}
        ins.update(u for u, _, k in self.nx.in_edges(op, keys=True) if k == IMPLICIT)
        outs = [self.values[n] for n in op._outputs if n]
        self.nx.remove_node(op)
        del self.ops[op.id]
        self._nesting.pop(op.id, None)
        op.graph = None
        if prune:
            for value in outs:
                if self.is_isolated(value) and not self.is_output(value):
                    self.remove_value(value)
            for value in ins:
                if (value.is_const or value.outer) and self.is_isolated(value) \
                        and not self.is_output(value) and not self.is_input(value):
                    self.remove_value(value)

    def set_input(self, op: Op, slot: int, new: str | Value) -> None:
        """Point input `slot` of `op` at another value ("" to omit it)."""
        new_name = new.name if isinstance(new, Value) else new
        old_name = op._inputs[slot]
        if old_name:
            self.nx.remove_edge(self.values[old_name], op, key=slot)
        if new_name:
            if new_name not in self.values:
                self._resolve_outer(new_name)
            self.nx.add_edge(self.values[new_name], op, key=slot)
        inputs = list(op._inputs)
        inputs[slot] = new_name
        op._inputs = tuple(inputs)

    def set_inputs(self, op: Op, new_inputs: Sequence[str | Value]) -> None:
        """Replace all inputs of `op` (the count may change)."""
        for slot, name in enumerate(op._inputs):
            if name:
                self.nx.remove_edge(self.values[name], op, key=slot)
        op._inputs = ()
        names = tuple(v.name if isinstance(v, Value) else v for v in new_inputs)
        op._inputs = tuple("" for _ in names)
        for slot, name in enumerate(names):
            self.set_input(op, slot, name)

    def replace_all_uses(self, old: Value, new: Value, *, outputs: bool = False) -> None:
        """Make every reader of `old` read `new` (subgraphs included). Graph outputs move only
        with `outputs=True`, since that renames the model's interface."""
        if old is new:
            return
        for op, slot in list(self.consumers(old, implicit=True)):
            if slot == IMPLICIT:
                self.nx.remove_edge(old, op, key=IMPLICIT)
                for sub in op.subgraphs():
                    if old.name in sub.values:
                        inner_old = sub.values[old.name]
                        inner_new = sub._resolve_outer(new.name)
                        sub.replace_all_uses(inner_old, inner_new)
                        if sub.is_isolated(inner_old) and not sub.is_output(inner_old):
                            sub.remove_value(inner_old)
                        elif sub.is_output(inner_old):
                            sub.outputs = [new.name if n == old.name else n for n in sub.outputs]
                            sub.remove_value(inner_old)
                self._link_implicit(op)
            else:
                self.set_input(op, slot, new)
        if outputs and self.is_output(old):
            self.outputs = [new.name if n == old.name else n for n in self.outputs]

    def replace_value(self, old: Value, new: Value) -> bool:
        """Substitute `new` for `old` everywhere, keeping the model's output names.

        If `old` is a graph output, `new` takes over its name when that is safe (`new` is made by
        an op here and is neither a graph input nor another output); otherwise the output stays
        and False is returned, so the caller can keep a copy op (Identity) instead.
        """
        self.replace_all_uses(old, new)
        if not self.is_output(old):
            if self.is_isolated(old) and not self.is_input(old):
                self.remove_value(old)
            return True
        movable = (self.producer(new) is not None and not self.is_input(new)
                   and not self.is_output(new) and self.producer(old) is None)
        if not movable:
            return False
        name = old.name
        self.outputs = [f"\0{name}" if n == name else n for n in self.outputs]
        self.remove_value_force(old)
        self.rename_value(new, name)
        # The output's declaration is the model's interface: it moves with the name.
        for attr in ("dtype", "shape", "type_proto", "_declared", "value_info_proto", "doc_string"):
            setattr(new, attr, getattr(old, attr))
        self.outputs = [name if n == f"\0{name}" else n for n in self.outputs]
        return True

    def remove_value_force(self, value: Value) -> None:
        """Drop a value node that has no edges, even if a (renamed-away) output list names it."""
        if not self.is_isolated(value):
            raise IRError(f"cannot remove value {value.name!r}: it still has a producer or users")
        self.nx.remove_node(value)
        del self.values[value.name]

    # -- queries -----------------------------------------------------------------------------
    def producer(self, value: Value | str) -> tuple[Op, int] | None:
        """(op, output slot) that writes `value`, or None."""
        if isinstance(value, str):
            value = self.values[value]
        for op, _, slot in self.nx.in_edges(value, keys=True):
            return op, slot
        return None

    def producer_op(self, value: Value | str) -> Op | None:
        found = self.producer(value)
        return None if found is None else found[0]

    def consumers(self, value: Value | str, *, implicit: bool = False) -> list[tuple[Op, int | str]]:
        """(op, input slot) pairs that read `value`; implicit subgraph reads with `implicit`."""
        if isinstance(value, str):
            value = self.values[value]
        return [(op, slot) for _, op, slot in self.nx.out_edges(value, keys=True)
                if implicit or slot != IMPLICIT]

    def consumer_ops(self, value: Value | str) -> list[Op]:
        """Distinct ops reading `value` (explicitly), in id order."""
        seen = {op.id: op for op, _ in self.consumers(value)}
        return [seen[k] for k in sorted(seen)]

    def has_users(self, value: Value | str) -> bool:
        """Whether anything reads the value: an op, a subgraph, or the graph's outputs."""
        if isinstance(value, str):
            value = self.values[value]
        return self.nx.out_degree(value) > 0 or self.is_output(value)

    def input_values(self, op: Op) -> list[Value | None]:
        return [self.values[n] if n else None for n in op._inputs]

    def output_values(self, op: Op) -> list[Value | None]:
        return [self.values[n] if n else None for n in op._outputs]

    def const_value(self, value: Value | str) -> np.ndarray | None:
        """The data of a value a pass may treat as constant: an initializer that is not also a
        graph input (an input with an initializer is only a default the user may override).
        Before IR version 4 every initializer had to be listed as an input too, so there the
        listing means nothing and the initializer is a constant (as onnxruntime treats it)."""
        if isinstance(value, str):
            if not value:
                return None
            value = self.values[value]
        if not value.is_const or value.outer:
            return None
        if self.is_input(value) and (self.root.model is None or self.root.model.ir_version >= 4):
            return None
        return value.const

    def const_inputs(self, op: Op) -> list[np.ndarray | None]:
        """`const_value` of each input slot (None where the input is not constant)."""
        return [self.const_value(n) if n else None for n in op._inputs]

    def topological_ops(self) -> list[Op]:
        """Ops in dependency order; ties keep creation (= original file) order."""
        # networkx's adjacency dicts directly ({neighbor: {key: data}}): its edge views cost
        # about ten times more per edge, and every pass orders the graph.
        pred, succ = self.nx._pred, self.nx._succ
        indegree: dict[Op, int] = {}
        for op in self.ops.values():
            deps = 0
            for value, keys in pred[op].items():
                if pred[value]:
                    deps += len(keys)
            indegree[op] = deps
        ready = [(op.id, op) for op, d in indegree.items() if d == 0]
        heapq.heapify(ready)
        order: list[Op] = []
        while ready:
            _, op = heapq.heappop(ready)
            order.append(op)
            for value in succ[op]:
                for consumer, keys in succ[value].items():
                    indegree[consumer] -= len(keys)
                    if indegree[consumer] == 0:
                        heapq.heappush(ready, (consumer.id, consumer))
        if len(order) != len(self.ops):
            stuck = sorted((op for op, d in indegree.items() if d > 0), key=lambda o: o.id)
            raise IRError(f"graph {self.name!r} has a cycle through op {stuck[0].name!r} "
                          f"({stuck[0].op_type})")
        return order

    def iter_graphs(self) -> Iterator[Graph]:
        """This graph and every nested subgraph, depth first (subgraphs before their owner's graph)."""
        for op in sorted(self._nesting.values(), key=lambda o: o.id):
            for sub in op.subgraphs():
                yield from sub.iter_graphs()
        yield self

    def count_ops(self, op_type: str | None = None, *, recursive: bool = False) -> int:
        if op_type is None and (not recursive or not self._nesting):
            return len(self.ops)
        graphs = self.iter_graphs() if recursive else [self]
        return sum(1 for g in graphs for op in g.ops.values()
                   if op_type is None or op.op_type == op_type)

    def op_type_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for op in self.ops.values():
            counts[op.op_type] = counts.get(op.op_type, 0) + 1
        return dict(sorted(counts.items()))

    def adopt(self, other: Graph) -> None:
        """Take over the whole content of `other` (a root graph), e.g. after a conversion that
        had to go through a ModelProto; callers keep holding this object."""
        if self.parent is not None or other.parent is not None:
            raise IRError("adopt works on root graphs only")
        self.__dict__.update(other.__dict__)
        for value in self.values.values():
            value.graph = self
        for op in self.ops.values():
            op.graph = self
            for sub in op.subgraphs():
                sub.parent = self

    # -- invariants --------------------------------------------------------------------------
    def check(self) -> None:
        """Verify the IR invariants (see the module docstring); raise IRError on the first
        violation."""
        g = self.nx
        for node in g.nodes:
            if isinstance(node, Value):
                if self.values.get(node.name) is not node:
                    raise IRError(f"value node {node.name!r} is not registered under its name")
            elif isinstance(node, Op):
                if self.ops.get(node.id) is not node:
                    raise IRError(f"op node {node.name!r} is not registered")
            else:
                raise IRError(f"foreign networkx node {node!r}")
        if len(g) != len(self.values) + len(self.ops):
            raise IRError("registered values/ops and networkx nodes disagree")
        for u, v, k in g.edges(keys=True):
            if isinstance(u, Value) == isinstance(v, Value):
                raise IRError(f"edge {u!r} -> {v!r} is not value->op or op->value")
        for op in self.ops.values():
            missing = [n for n in op._inputs + op._outputs if n and n not in self.values]
            if missing:
                raise IRError(f"op {op.name!r} names value {missing[0]!r}, which does not exist")
            expected_in = {(self.values[n], s) for s, n in enumerate(op._inputs) if n}
            actual_in = {(u, k) for u, _, k in g.in_edges(op, keys=True) if k != IMPLICIT}
            if expected_in != actual_in:
                raise IRError(f"input edges of op {op.name!r} disagree with its input list")
            actual_out = {(v, k) for _, v, k in g.out_edges(op, keys=True)}
            expected_out = {(self.values[n], s) for s, n in enumerate(op._outputs) if n}
            if expected_out != actual_out:
                raise IRError(f"output edges of op {op.name!r} disagree with its output list")
            free = set(_free_names(op))
            implicit = {u.name for u, _, k in g.in_edges(op, keys=True) if k == IMPLICIT}
            if free != implicit:
                raise IRError(f"implicit inputs of op {op.name!r} ({sorted(implicit)}) do not "
                              f"match what its subgraphs read ({sorted(free)})")
            for sub in op.subgraphs():
                if sub.parent is not self or sub.owner is not op:
                    raise IRError(f"subgraph {sub.name!r} of op {op.name!r} has a wrong parent link")
                sub.check()
        for value in self.values.values():
            n_producers = g.in_degree(value)
            if n_producers > 1:
                raise IRError(f"value {value.name!r} has {n_producers} producers")
            sourced = value.is_const or value.outer or self.is_input(value)
            if n_producers and (value.is_const or value.outer or self.is_input(value)):
                raise IRError(f"value {value.name!r} is produced by an op but is also an input, "
                              "constant or outer reference")
            if not n_producers and not sourced and self.has_users(value):
                raise IRError(f"value {value.name!r} is used but produced by nothing")
            if value.outer:
                scope = self.parent
                while scope is not None and value.name not in scope.values:
                    scope = scope.parent
                if scope is None:
                    raise IRError(f"outer reference {value.name!r} resolves to nothing")
        for name in itertools.chain(self.inputs, self.outputs):
            if name not in self.values:
                raise IRError(f"graph input/output {name!r} has no value")
        if not nx.is_directed_acyclic_graph(g):
            self.topological_ops()  # raises with the op on the cycle
            raise IRError(f"graph {self.name!r} has a cycle")

    def __repr__(self) -> str:
        return f"<Graph {self.name!r}: {len(self.ops)} ops, {len(self.values)} values>"


def _free_names(op: Op) -> list[str]:
    """Names the op's subgraphs read from enclosing scopes (outer references)."""
    names: dict[str, None] = {}
    for sub in op.subgraphs():
        for value in sub.values.values():
            if value.outer:
                names[value.name] = None
    return list(names)


def iter_ops_recursive(graph: Graph) -> Iterable[tuple[Graph, Op]]:
    """(graph, op) for every op of the model, subgraphs included."""
    for g in graph.iter_graphs():
        for op in g.ops.values():
            yield g, op
