"""Transpose elimination: identity, merge and cancel; absorb into Gemm; sink through ops.

A Transpose copies its whole input and computes nothing. Three passes remove them:

- `TransposeChains`: an identity permutation goes; consecutive transposes merge into one (and
  vanish when the merged permutation is the identity); a transpose that only moves size-1 axes
  becomes a Reshape (a view, no copy). Transposes of constants fold in constant folding.
- `TransposeAbsorption`: a 2-D transpose feeding Gemm flips transA/transB; a 2-D MatMul with a
  transposed operand becomes a Gemm with transA/transB.
- `TransposeSinking`: a transpose moves below the op that reads it (elementwise and unary ops,
  activations, broadcast binary ops whose other operand is a constant or transposed the same way,
  Concat/Split/Slice/Pad/Reduce*/Softmax/ArgMax/Squeeze with their axes permuted, MatMul with a
  constant 2-D operand, BatchNormalization when the channel axis stays), so that transposes meet
  and cancel. A move is made only when it does not add transposes (counting the ones it removes,
  the ones it must insert on other inputs, and the ones it puts after the op, which cost nothing
  when every reader of that output is itself a transpose that will merge).

The model's outputs keep their names and layout: a transpose sunk to a graph output stays there.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx

from graphopt.ir import Graph, Op, Shape, Value
from graphopt.pass_manager import Pass, PassContext, PassResult
from graphopt.passes.cleanup import add_simple_op, bypass, is_pure

Perm = list[int]


# ---------------------------------------------------------------------------------------------
# permutation helpers (shared by the reshape and concat/split passes)
# ---------------------------------------------------------------------------------------------
def invert(perm: Sequence[int]) -> Perm:
    """The permutation that undoes `perm`."""
    inverse = [0] * len(perm)
    for i, p in enumerate(perm):
        inverse[p] = i
    return inverse


def compose(first: Sequence[int], second: Sequence[int]) -> Perm:
    """Transpose(Transpose(x, first), second) == Transpose(x, compose(first, second))."""
    return [first[k] for k in second]


def is_identity(perm: Sequence[int]) -> bool:
    return all(i == p for i, p in enumerate(perm))


def permute_shape(shape: Shape | None, perm: Sequence[int]) -> Shape | None:
    """Shape of Transpose(x, perm) for x of `shape`."""
    if shape is None or len(shape) != len(perm):
        return None
    return tuple(shape[p] for p in perm)


def perm_of(graph: Graph, op: Op) -> Perm | None:
    """A Transpose's permutation (the default reverses the axes: needs a known rank)."""
    perm = op.attrs.get("perm")
    if perm is not None:
        return [int(p) for p in perm]
    rank = graph.values[op.inputs[0]].rank
    return None if rank is None else list(reversed(range(rank)))


def is_transpose(op: Op | None) -> bool:
    return op is not None and op.op_type == "Transpose" and op.domain in ("", "ai.onnx")


def normalize_axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


def add_transpose(graph: Graph, source: Value, perm: Sequence[int],
                  output: str | None = None) -> Value:
    """Transpose(source, perm); writes `output` (an existing value without producer) if given."""
    if output is None:
        return add_simple_op(graph, "Transpose", [source], source.dtype,
                             permute_shape(source.shape, perm), {"perm": list(perm)},
                             hint=f"{source.name}_T")
    graph.add_op("Transpose", [source], [output], {"perm": list(perm)})
    return graph.values[output]


def new_const(graph: Graph, array: np.ndarray, hint: str) -> Value:
    """A fresh initializer; IR < 4 lists it as a graph input too (done by the saver)."""
    return graph.add_const(np.asarray(array, order="C"), hint)


def remove_if_unused(graph: Graph, op: Op | None) -> bool:
    """Remove a known-domain op nobody reads any longer."""
    if op is None or op.graph is not graph or not is_pure(op):
        return False
    if any(n and graph.has_users(n) for n in op.outputs):
        return False
    graph.remove_op(op)
    return True


# ---------------------------------------------------------------------------------------------
# identity / merge / cancel / to-reshape
# ---------------------------------------------------------------------------------------------
class TransposeChains(Pass):
    """Identity transposes go, consecutive ones merge (or cancel), and a transpose that moves
    only size-1 axes becomes a Reshape."""

    name = "transpose_chains"

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        result = PassResult()
        for op in graph.topological_ops():
            if op.graph is graph and is_transpose(op):
                simplify_transpose(graph, op, result)
        return result


def simplify_transpose(graph: Graph, op: Op, result: PassResult) -> Op | None:
    """Merge `op` into its producing transpose, drop it if it is the identity, or turn it into a
    Reshape. Returns the op if it is still a Transpose afterwards."""
    perm = perm_of(graph, op)
    if perm is None:
        return op
    producer = graph.producer_op(op.inputs[0])
    if is_transpose(producer):
        inner = perm_of(graph, producer)
        if inner is not None and len(inner) == len(perm):
            perm = compose(inner, perm)
            graph.set_input(op, 0, producer.inputs[0])
            op.attrs["perm"] = perm
            producer_gone = remove_if_unused(graph, producer)
            if is_identity(perm) and bypass(graph, op):
                result.count("transposes_cancelled", 1 + producer_gone)
                return None
            result.count("transposes_merged")
    if is_identity(perm):
        if bypass(graph, op):
            result.count("identity_transposes_removed")
            return None
        return op
    target = _reshape_target_for(graph.values[op.inputs[0]], perm) if graph.opset() >= 5 else None
    if target is not None:
        shape_const = new_const(graph, np.array(target, dtype=np.int64), f"{op.outputs[0]}_shape")
        source, out = op.inputs[0], op.outputs[0]
        graph.remove_op(op, prune=False)
        graph.add_op("Reshape", [source, shape_const.name], [out])
        result.count("transposes_to_reshape")
        return None
    return op


def _reshape_target_for(value: Value, perm: Perm) -> list[int] | None:
    """A Reshape target equal to Transpose(value, perm), when the transpose moves only axes of
    size 1 (the others keep their order); a symbolic dim must stay at its index (target 0)."""
    shape = value.shape
    if shape is None or len(shape) != len(perm):
        return None
    moved = [p for p in perm if shape[p] != 1]
    if moved != sorted(moved) or 0 in shape:
        return None
    target = []
    for k, p in enumerate(perm):
        d = shape[p]
        if isinstance(d, int):
            target.append(d)
        elif p == k:
            target.append(0)  # copy the input's dim at the same index
        else:
            target.append(-1)
    return target if target.count(-1) <= 1 else None


# ---------------------------------------------------------------------------------------------
# absorb into Gemm / MatMul
# ---------------------------------------------------------------------------------------------
_GEMM_DTYPES = frozenset({onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16,
                          onnx.TensorProto.BFLOAT16})


class TransposeAbsorption(Pass):
    """A 2-D transpose read by Gemm flips transA/transB; a 2-D MatMul with a transposed operand
    (a constant other operand, or both 2-D) becomes Gemm with the flag set."""

    name = "transpose_absorb"

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        result = PassResult()
        for op in list(graph.ops.values()):
            if op.graph is not graph or op.domain not in ("", "ai.onnx"):
                continue
            if op.op_type == "Gemm":
                result.count("transposes_absorbed_into_gemm", _absorb_into_gemm(graph, op))
            elif op.op_type == "MatMul" and graph.opset() >= 11:
                result.count("matmuls_to_gemm", _matmul_to_gemm(graph, op))
        return result


def _transposed_2d(graph: Graph, name: str) -> Op | None:
    producer = graph.producer_op(name)
    if is_transpose(producer) and perm_of(graph, producer) == [1, 0]:
        return producer
    return None


def _absorb_into_gemm(graph: Graph, op: Op) -> int:
    absorbed = 0
    for slot, flag in ((0, "transA"), (1, "transB")):
        t = _transposed_2d(graph, op.inputs[slot])
        if t is None:
            continue
        graph.set_input(op, slot, t.inputs[0])
        op.attrs[flag] = 1 - int(op.attrs.get(flag, 0))
        remove_if_unused(graph, t)
        absorbed += 1
    return absorbed


def _matmul_to_gemm(graph: Graph, op: Op) -> int:
    a, b = (graph.values[n] for n in op.inputs)
    out = graph.values[op.outputs[0]]
    if a.rank != 2 or b.rank != 2 or out.dtype not in _GEMM_DTYPES:
        return 0
    ta, tb = _transposed_2d(graph, a.name), _transposed_2d(graph, b.name)
    if ta is None and tb is None:
        return 0
    inputs = [ta.inputs[0] if ta else a.name, tb.inputs[0] if tb else b.name]
    attrs = {"transA": int(ta is not None), "transB": int(tb is not None)}
    graph.remove_op(op, prune=False)
    graph.add_op("Gemm", inputs, [out.name], attrs, name=op.name)
    for t in (ta, tb):
        remove_if_unused(graph, t)
    return 1


# ---------------------------------------------------------------------------------------------
# sinking
# ---------------------------------------------------------------------------------------------
UNARY = frozenset({
    "Abs", "Acos", "Acosh", "Asin", "Asinh", "Atan", "Atanh", "Cast", "Ceil", "Celu", "Cos",
    "Cosh", "Elu", "Erf", "Exp", "Floor", "Gelu", "HardSigmoid", "HardSwish", "Identity", "IsInf",
    "IsNaN", "LeakyRelu", "Log", "Mish", "Neg", "Not", "Reciprocal", "Relu", "Round", "Selu",
    "Shrink", "Sigmoid", "Sign", "Sin", "Sinh", "Softplus", "Softsign", "Sqrt", "Tan", "Tanh",
    "ThresholdedRelu", "Swish", "BitwiseNot",
})
BROADCAST = frozenset({
    "Add", "Sub", "Mul", "Div", "Pow", "Mod", "Max", "Min", "Sum", "Mean", "Equal", "Less",
    "Greater", "LessOrEqual", "GreaterOrEqual", "And", "Or", "Xor", "Where", "PRelu", "Clip",
    "BitShift", "BitwiseAnd", "BitwiseOr", "BitwiseXor", "CastLike",
})
REDUCE = frozenset({"ReduceSum", "ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1",
                    "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare"})


@dataclass
class _Move:
    """How an op reads untransposed data: its data slots, new attributes and parameter inputs
    (constant arrays by slot), and per output the permutation that restores the original layout
    (None: none needed)."""

    data_slots: list[int]
    attrs: dict = field(default_factory=dict)
    params: dict[int, np.ndarray] = field(default_factory=dict)
    out_perms: list[Perm | None] = field(default_factory=list)


@dataclass
class _Inputs:
    """What sinking a permutation through an op does to its data inputs."""

    sources: dict[int, str]            # slot -> untransposed value (input of a matching Transpose)
    transposes: dict[int, Op]          # matching input transposes (by op id)
    virtual: list[int]                 # slots reading the value assumed untransposed (cost model)
    consts: dict[int, np.ndarray]      # slot -> constant rewritten into the untransposed layout
    inserts: list[int]                 # slots that need an inverse transpose inserted


#: How many ops below a transpose the sinking cost model looks.
LOOKAHEAD = 12


class TransposeSinking(Pass):
    """Move transposes below the ops that read them where that removes transposes (looking a
    few ops ahead), so that they meet other transposes and cancel or vanish in reductions."""

    name = "transpose_push"

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        result = PassResult()
        work = deque(op for op in graph.topological_ops() if is_transpose(op))
        while work:
            t = work.popleft()
            if t.graph is not graph:
                continue
            t = simplify_transpose(graph, t, result)
            if t is None:
                continue
            perm = perm_of(graph, t)
            if perm is None:
                continue
            for consumer in graph.consumer_ops(t.outputs[0]):
                if is_transpose(consumer) and consumer.graph is graph:
                    merged = simplify_transpose(graph, consumer, result)
                    if merged is not None:
                        work.append(merged)
            if t.graph is not graph or _readers_cost(graph, t.outputs[0], perm, LOOKAHEAD, {}) >= 1:
                continue
            for consumer in graph.consumer_ops(t.outputs[0]):
                if t.graph is not graph:
                    break
                cost = _reader_cost(graph, consumer, t.outputs[0], perm, LOOKAHEAD, {})
                if consumer.graph is graph and cost is not None and cost <= 0:
                    work.extend(_sink(graph, consumer, perm, result))
        return result


def _readers_cost(graph: Graph, name: str, perm: Perm, depth: int, memo: dict) -> int:
    """Transposes it takes (net) to serve every reader of `name` if it were made untransposed
    (it now holds Transpose(untransposed, perm)): readers that cannot take the untransposed
    tensor share one transpose; the others cost what sinking through them costs."""
    key = (name, tuple(perm))
    if key in memo:
        return memo[key]
    memo[key] = 1
    materialize = graph.is_output(name)
    total = 0
    for op in graph.consumer_ops(name):
        cost = _reader_cost(graph, op, name, perm, depth, memo)
        if cost is None or cost >= 1:
            materialize = True
        else:
            total += cost
    memo[key] = total + int(materialize)
    return memo[key]


def _reader_cost(graph: Graph, op: Op, via: str, perm: Perm, depth: int, memo: dict) -> int | None:
    """Net transposes of moving the permutation of `via` (which `op` reads) below `op`
    (None: it cannot move there)."""
    if is_transpose(op):
        inner = perm_of(graph, op)
        if inner is None or len(inner) != len(perm):
            return None
        return -1 if is_identity(compose(perm, inner)) else 0
    if depth <= 0 or not is_pure(op) or any(True for _ in op.subgraphs()):
        return None
    move = _plan(graph, op, perm)
    inputs = None if move is None else _classify_inputs(graph, op, perm, move, via)
    if inputs is None:
        return None
    cost = len(inputs.inserts)
    cost -= sum(1 for t in inputs.transposes.values()
                if t.outputs[0] != via and all(c is op for c, _ in graph.consumers(t.outputs[0]))
                and not graph.is_output(t.outputs[0]))
    for name, out_perm in zip(op.outputs, move.out_perms):
        if name and out_perm is not None and not is_identity(out_perm):
            cost += _readers_cost(graph, name, out_perm, depth - 1, memo)
    return cost


def _classify_inputs(graph: Graph, op: Op, perm: Perm, move: _Move,
                     via: str | None = None) -> _Inputs | None:
    rank = len(perm)
    inverse = invert(perm)
    found = _Inputs({}, {}, [], {}, [])
    for slot in move.data_slots:
        name = op.inputs[slot] if slot < len(op.inputs) else ""
        if not name:
            continue
        if name == via:
            found.virtual.append(slot)
            continue
        value = graph.values[name]
        producer = graph.producer_op(name)
        if is_transpose(producer) and perm_of(graph, producer) == perm:
            found.sources[slot] = producer.inputs[0]
            found.transposes[producer.id] = producer
            continue
        if value.shape is not None and len(value.shape) <= rank \
                and all(d == 1 for d in value.shape):
            continue  # all-ones (a scalar): the same in any layout
        const = graph.const_value(value)
        if const is not None and const.ndim <= rank:
            expanded = const.reshape((1,) * (rank - const.ndim) + const.shape)
            found.consts[slot] = np.transpose(expanded, inverse)
            continue
        if value.rank == rank:
            found.inserts.append(slot)
            continue
        return None
    if not found.transposes and not found.virtual:
        return None
    return found


def _sink(graph: Graph, op: Op, perm: Perm, result: PassResult) -> list[Op]:
    """Rewrite `op` to read its transposed inputs untransposed; a transpose restores each output.
    Returns the new output transposes."""
    move = _plan(graph, op, perm)
    inputs = None if move is None else _classify_inputs(graph, op, perm, move)
    if inputs is None:
        return []
    inverse = invert(perm)
    new_inputs = list(op.inputs)
    for slot, source in inputs.sources.items():
        new_inputs[slot] = source
    for slot in inputs.inserts:
        new_inputs[slot] = add_transpose(graph, graph.values[op.inputs[slot]], inverse).name
    for slot, array in inputs.consts.items():
        new_inputs[slot] = new_const(graph, array, f"{op.inputs[slot]}_T").name
    for slot, array in move.params.items():
        while len(new_inputs) <= slot:
            new_inputs.append("")
        new_inputs[slot] = new_const(graph, array, f"{op.name}_param{slot}").name
    attrs = dict(op.attrs)
    attrs.update(move.attrs)
    outputs = []
    restores: list[tuple[Value, Perm, str]] = []
    for name, out_perm in zip(op.outputs, move.out_perms):
        if not name or out_perm is None or is_identity(out_perm):
            outputs.append(name)
            continue
        old = graph.values[name]
        shape = None if old.shape is None else tuple(old.shape[k] for k in invert(out_perm))
        fresh = graph.add_value(graph.fresh_name(f"{name}_untransposed"), old.dtype, shape)
        outputs.append(fresh.name)
        restores.append((fresh, out_perm, name))
    old_inputs = [graph.values[n] for n in op.inputs if n]
    graph.remove_op(op, prune=False)
    graph.add_op(op.op_type, new_inputs, outputs, attrs, domain=op.domain, name=op.name,
                 meta=op.meta)
    created = [graph.producer_op(add_transpose(graph, fresh, out_perm, name))
               for fresh, out_perm, name in restores]
    for t in inputs.transposes.values():
        remove_if_unused(graph, t)
    for value in old_inputs:
        if value.name in graph.values and value.is_const and graph.is_isolated(value) \
                and not graph.is_input(value) and not graph.is_output(value):
            graph.remove_value(value)
    result.count("transposes_sunk")
    return [c for c in created if c is not None]


def _plan(graph: Graph, op: Op, perm: Perm) -> _Move | None:
    """How `op` reads Transpose^-1 of its data inputs, or None if it cannot."""
    rank = len(perm)
    kind = op.op_type
    n_out = len(op.outputs)
    if kind in UNARY:
        return _Move([0], out_perms=[perm] * n_out)
    if kind in BROADCAST:
        if any(v is not None and v.rank is not None and v.rank > rank
               for v in graph.input_values(op)):
            return None
        return _Move(list(range(len(op.inputs))), out_perms=[perm])
    if kind in ("Softmax", "LogSoftmax", "Hardmax"):
        axis = normalize_axis(int(op.attrs.get("axis", -1 if graph.opset() >= 13 else 1)), rank)
        if graph.opset() >= 13:
            return _Move([0], {"axis": perm[axis]}, out_perms=[perm])
        if all(perm[k] == k for k in range(axis, rank)):
            return _Move([0], out_perms=[perm])
        return None
    if kind == "Concat":
        axis = normalize_axis(int(op.attrs["axis"]), rank)
        return _Move(list(range(len(op.inputs))), {"axis": perm[axis]}, out_perms=[perm])
    if kind == "Split":
        axis = normalize_axis(int(op.attrs.get("axis", 0)), rank)
        return _Move([0], {"axis": perm[axis]}, out_perms=[perm] * n_out)
    if kind == "Slice":
        return _plan_slice(graph, op, perm)
    if kind == "Pad":
        return _plan_pad(graph, op, perm)
    if kind in REDUCE or kind in ("ArgMax", "ArgMin"):
        return _plan_reduce(graph, op, perm)
    if kind == "Squeeze":
        axes = _axes(graph, op, "axes", 1, 13)
        if not axes:  # not constant, or absent (squeeze every 1: left alone)
            return None
        axes = [normalize_axis(a, rank) for a in axes]
        new_axes = sorted(perm[a] for a in axes)
        move = _Move([0], out_perms=[_perm_after_removing(perm, axes)])
        _set_axes(graph, op, move, "axes", 1, 13, new_axes)
        return move
    if kind == "MatMul":
        return _plan_matmul(graph, op, perm)
    if kind in ("BatchNormalization", "InstanceNormalization", "LpNormalization"):
        if kind == "LpNormalization":
            axis = normalize_axis(int(op.attrs.get("axis", -1)), rank)
            return _Move([0], {"axis": perm[axis]}, out_perms=[perm])
        fixed = {0, 1} if kind == "InstanceNormalization" else {1}
        if rank >= 2 and all(perm[k] == k for k in fixed):
            return _Move([0], out_perms=[perm] + [None] * (n_out - 1))
        return None
    if kind in ("QuantizeLinear", "DequantizeLinear"):
        if int(op.attrs.get("block_size", 0)):
            return None
        scale = graph.values[op.inputs[1]]
        if scale.static_shape in ((1,), ()):
            return _Move([0], out_perms=[perm])
        if scale.rank != 1:
            return None
        axis = normalize_axis(int(op.attrs.get("axis", 1)), rank)
        return _Move([0], {"axis": perm[axis]}, out_perms=[perm])
    return None


def _perm_after_removing(perm: Perm, removed: Sequence[int]) -> Perm:
    """Output permutation of an op dropping axes `removed` (in transposed coordinates) when it
    reads the untransposed input instead."""
    gone = {perm[a] for a in removed}
    kept_source = sorted(p for p in range(len(perm)) if p not in gone)
    index = {p: i for i, p in enumerate(kept_source)}
    return [index[perm[k]] for k in range(len(perm)) if k not in set(removed)]


def _axes(graph: Graph, op: Op, attr: str, slot: int, input_since: int) -> list[int] | None:
    """Axes from the attribute (old opsets) or the constant input (new ones); [] when absent;
    None when the input is not constant."""
    if graph.opset() < input_since:
        return [int(a) for a in op.attrs.get(attr, [])]
    if len(op.inputs) <= slot or not op.inputs[slot]:
        return []
    const = graph.const_value(op.inputs[slot])
    return None if const is None else [int(a) for a in const.reshape(-1)]


def _set_axes(graph: Graph, op: Op, move: _Move, attr: str, slot: int, input_since: int,
              axes: list[int]) -> None:
    if graph.opset() < input_since:
        move.attrs[attr] = axes
    else:
        move.params[slot] = np.array(axes, dtype=np.int64)


def _plan_reduce(graph: Graph, op: Op, perm: Perm) -> _Move | None:
    rank = len(perm)
    keepdims = int(op.attrs.get("keepdims", 1))
    if op.op_type in ("ArgMax", "ArgMin"):
        axis = normalize_axis(int(op.attrs.get("axis", 0)), rank)
        out = perm if keepdims else _perm_after_removing(perm, [axis])
        return _Move([0], {"axis": perm[axis]}, out_perms=[out])
    since = 13 if op.op_type == "ReduceSum" else 18
    axes = _axes(graph, op, "axes", 1, since)
    if axes is None:
        return None
    if not axes:
        if int(op.attrs.get("noop_with_empty_axes", 0)):
            return _Move([0], out_perms=[perm])
        return _Move([0], out_perms=[None])  # reduces everything: all-ones or a scalar
    axes = [normalize_axis(a, rank) for a in axes]
    move = _Move([0], out_perms=[perm if keepdims else _perm_after_removing(perm, axes)])
    _set_axes(graph, op, move, "axes", 1, since, sorted(perm[a] for a in axes))
    return move


def _plan_slice(graph: Graph, op: Op, perm: Perm) -> _Move | None:
    rank = len(perm)
    if graph.opset() < 10:
        starts = op.attrs.get("starts", [])
        axes = [normalize_axis(int(a), rank) for a in op.attrs.get("axes", range(len(starts)))]
        return _Move([0], {"axes": [perm[a] for a in axes]}, out_perms=[perm])
    starts = graph.const_value(op.inputs[1])
    if starts is None:
        return None
    if len(op.inputs) > 3 and op.inputs[3]:
        axes_c = graph.const_value(op.inputs[3])
        if axes_c is None:
            return None
        axes = [normalize_axis(int(a), rank) for a in axes_c.reshape(-1)]
    else:
        axes = list(range(starts.size))
    move = _Move([0], out_perms=[perm])
    move.params[3] = np.array([perm[a] for a in axes], dtype=np.int64)
    return move


def _plan_pad(graph: Graph, op: Op, perm: Perm) -> _Move | None:
    rank = len(perm)
    if graph.opset() < 11:
        pads = [int(p) for p in op.attrs.get("pads", [])]
        if len(pads) != 2 * rank:
            return None
        new = [0] * (2 * rank)
        for k, p in enumerate(perm):
            new[p], new[rank + p] = pads[k], pads[rank + k]
        return _Move([0], {"pads": new}, out_perms=[perm])
    pads_c = graph.const_value(op.inputs[1])
    if pads_c is None:
        return None
    pads = [int(p) for p in pads_c.reshape(-1)]
    move = _Move([0], out_perms=[perm])
    if len(op.inputs) > 3 and op.inputs[3]:
        axes_c = graph.const_value(op.inputs[3])
        if axes_c is None:
            return None
        axes = [normalize_axis(int(a), rank) for a in axes_c.reshape(-1)]
        move.params[3] = np.array([perm[a] for a in axes], dtype=np.int64)
        return move
    if len(pads) != 2 * rank:
        return None
    new = [0] * (2 * rank)
    for k, p in enumerate(perm):
        new[p], new[rank + p] = pads[k], pads[rank + k]
    move.params[1] = np.array(new, dtype=np.int64)
    return move


def _plan_matmul(graph: Graph, op: Op, perm: Perm) -> _Move | None:
    """MatMul acting on the last axes only: the transpose must keep the contracted axis."""
    rank = len(perm)
    if rank < 2:
        return None
    a, b = (graph.values[n] for n in op.inputs)
    a_t, b_t = (is_transpose(graph.producer_op(v.name))
                and perm_of(graph, graph.producer_op(v.name)) == perm for v in (a, b))
    if a_t and b_t:
        if perm[-1] == rank - 1 and perm[-2] == rank - 2:
            return _Move([0, 1], out_perms=[perm])
        return None
    if a_t and b.rank == 2 and graph.const_value(b) is not None and perm[-1] == rank - 1:
        return _Move([0], out_perms=[perm])
    if b_t and a.rank == 2 and graph.const_value(a) is not None and perm[-2] == rank - 2:
        return _Move([1], out_perms=[perm])
    return None


#: The family's passes, in the order the O2 pipeline runs them.
PASSES: list[type[Pass]] = [TransposeChains, TransposeAbsorption, TransposeSinking]
