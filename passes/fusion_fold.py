"""Fold linear per-channel arithmetic into the weights and bias of Conv, ConvTranspose, Gemm and
MatMul, and turn MatMul + Add(bias) into Gemm.

After a "head" op with constant weights, a chain of inference BatchNormalization and Mul/Div/
Add/Sub by per-output-channel constants is an affine map y = head(x) * s + t per output channel:
s multiplies the weights' output channels, t joins the bias. Before a head, a per-input-channel
scale x * s folds into the weights' input channels (padding zeros stay zeros, so it holds for
padded convs too), and a per-input-channel shift x + c folds into the bias as W @ c only where
every output sees a full window of shifted inputs: a Conv without padding, or a Gemm. Before a
padded Conv the shift does not fold (the padding zeros would have to become -c), nor before a
ConvTranspose (border outputs get fewer contributions).

Scales and shifts are combined in float64; weights are multiplied in their own dtype (at least
float32): the product of two floats rounds once either way, and a ResNet-50's weights are not
copied to float64.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from graphopt.ir import Graph, Op
from graphopt.pass_manager import Pass, PassContext, PassResult
from graphopt.passes.fusion_common import (Shapes, constant, is_float_array, is_onnx,
                                           new_const, other_input, replace_ops, set_input,
                                           set_inputs, sole_reader)

#: Ops whose weights can absorb per-channel scales and shifts.
HEAD_TYPES = ("Conv", "ConvTranspose", "Gemm", "MatMul")


# ---------------------------------------------------------------------------------------------
# what a head looks like
# ---------------------------------------------------------------------------------------------
@dataclass
class Head:
    """A Conv/ConvTranspose/Gemm/MatMul whose weights are constant, with the layout facts the
    folds need: output rank and channel axis, channel counts, the bias (None if it has none)."""

    op: Op
    weight: np.ndarray
    weight_slot: int
    out_rank: int | None      # None: unknown (a MatMul whose activation rank is unknown)
    out_axis: int             # output channel axis (non-negative when out_rank is known, else -1)
    out_channels: int
    in_channels: int
    bias: np.ndarray | None

    @property
    def dtype(self) -> np.dtype:
        return self.weight.dtype


def as_head(graph: Graph, op: Op) -> Head | None:
    """The op as a foldable head, or None (unsupported op, non-constant or non-float weights)."""
    if not is_onnx(op, *HEAD_TYPES) or len(op.outputs) != 1 or len(op.inputs) < 2:
        return None
    if op.op_type == "Gemm":
        return _gemm_head(graph, op)
    weight = constant(graph, op.inputs[1])
    if not is_float_array(weight):
        return None
    bias = constant(graph, op.inputs[2]) if len(op.inputs) > 2 and op.inputs[2] else None
    if len(op.inputs) > 2 and op.inputs[2] and bias is None:
        return None
    if op.op_type == "MatMul":
        if weight.ndim < 2:
            return None
        rank_a = graph.values[op.inputs[0]].rank
        if rank_a is not None and rank_a < 2:
            return None
        out_rank = None if rank_a is None else max(rank_a, weight.ndim)
        return Head(op, weight, 1, out_rank, -1 if out_rank is None else out_rank - 1,
                    weight.shape[-1], weight.shape[-2], None)
    if weight.ndim < 3:
        return None
    group = int(op.attrs.get("group", 1))
    if op.op_type == "Conv":
        out_channels, in_channels = weight.shape[0], weight.shape[1] * group
    else:  # ConvTranspose: (C_in, C_out / group, k...)
        out_channels, in_channels = weight.shape[1] * group, weight.shape[0]
    if bias is not None and bias.shape != (out_channels,):
        return None
    return Head(op, weight, 1, weight.ndim, 1, out_channels, in_channels, bias)


def _gemm_head(graph: Graph, op: Op) -> Head | None:
    weight = constant(graph, op.inputs[1])
    if not is_float_array(weight) or weight.ndim != 2:
        return None
    c_name = op.inputs[2] if len(op.inputs) > 2 else ""
    bias = constant(graph, c_name) if c_name else None
    if c_name and bias is None:
        return None
    trans_b = int(op.attrs.get("transB", 0))
    k, n = weight.shape[::-1] if trans_b else weight.shape
    return Head(op, weight, 1, 2, 1, n, k, bias)


def per_channel(array: np.ndarray, rank: int | None, axis: int, channels: int) -> np.ndarray | None:
    """`array` as a float64 vector over `channels` along `axis` of a rank-`rank` tensor, if
    broadcasting it against such a tensor varies only along that axis and does not grow the
    tensor; else None. With an unknown rank, only a scalar or a vector on the last axis is safe."""
    if rank is None:
        if axis != -1 or array.ndim > 1:
            return None
        rank, axis = max(array.ndim, 1), max(array.ndim, 1) - 1
    if array.ndim > rank:
        return None
    shape = (1,) * (rank - array.ndim) + array.shape
    if any(d != 1 for i, d in enumerate(shape) if i != axis) or shape[axis] not in (1, channels):
        return None
    return np.broadcast_to(array.reshape(-1).astype(np.float64), (channels,)) \
        if shape[axis] == channels else np.full(channels, float(array.reshape(-1)[0]))


# ---------------------------------------------------------------------------------------------
# weight arithmetic
# ---------------------------------------------------------------------------------------------
def _compute(head: Head, scale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Weights and scale in the dtype the multiplication runs in (at least float32)."""
    dtype = np.promote_types(head.weight.dtype, np.float32)
    return head.weight.astype(dtype, copy=False), scale.astype(dtype)


def scale_output_channels(head: Head, scale: np.ndarray) -> np.ndarray:
    """The head's weights with output channel j multiplied by scale[j]."""
    w, scale = _compute(head, scale)
    op = head.op
    if op.op_type == "Conv":
        return w * scale.reshape((-1,) + (1,) * (w.ndim - 1))
    if op.op_type == "ConvTranspose":
        group = int(op.attrs.get("group", 1))
        grouped = w.reshape((group, w.shape[0] // group) + w.shape[1:])
        s = scale.reshape((group, 1, w.shape[1]) + (1,) * (w.ndim - 2))
        return (grouped * s).reshape(w.shape)
    if op.op_type == "Gemm" and int(op.attrs.get("transB", 0)):
        return w * scale[:, None]
    return w * scale  # Gemm (K, N) and MatMul (..., K, N): the last axis


def scale_input_channels(head: Head, scale: np.ndarray) -> np.ndarray:
    """The head's weights with input channel k multiplied by scale[k]."""
    w, scale = _compute(head, scale)
    op = head.op
    if op.op_type == "Conv":
        group = int(op.attrs.get("group", 1))
        per_group = w.shape[1]
        grouped = w.reshape((group, w.shape[0] // group) + w.shape[1:])
        s = scale.reshape((group, 1, per_group) + (1,) * (w.ndim - 2))
        return (grouped * s).reshape(w.shape)
    if op.op_type == "ConvTranspose":
        return w * scale.reshape((-1,) + (1,) * (w.ndim - 1))
    if op.op_type == "Gemm" and int(op.attrs.get("transB", 0)):
        return w * scale  # (N, K)
    return w * scale[:, None]  # Gemm (K, N) and MatMul (..., K, N)


def weights_times_input(head: Head, shift: np.ndarray) -> np.ndarray:
    """Per output channel, what a constant per-input-channel `shift` adds to the output (Conv
    without padding: the sum of each filter times the shift; Gemm: shift @ B)."""
    w = head.weight.astype(np.float64)
    op = head.op
    if op.op_type == "Conv":
        group = int(op.attrs.get("group", 1))
        grouped = w.reshape(group, w.shape[0] // group, w.shape[1], -1)
        per_out = np.einsum("gokx,gk->go", grouped, shift.reshape(group, w.shape[1]))
        return per_out.reshape(-1)
    b = w.T if int(op.attrs.get("transB", 0)) else w
    return shift @ b * float(op.attrs.get("alpha", 1.0))


def _set_weight(graph: Graph, head: Head, weight: np.ndarray) -> None:
    hint = f"{head.op.name or head.op.op_type}_w"
    value = new_const(graph, weight.astype(head.dtype, copy=False), hint)
    set_input(graph, head.op, head.weight_slot, value)


def _set_bias(graph: Graph, head: Head, bias: np.ndarray) -> None:
    """Give the head's bias slot (Conv B, Gemm C) a new constant; for Gemm, C is now taken
    with beta = 1."""
    op = head.op
    value = new_const(graph, bias.astype(head.dtype), f"{op.name or op.op_type}_b")
    inputs = list(op.inputs) + [""] * (3 - len(op.inputs))
    inputs[2] = value.name
    set_inputs(graph, op, inputs)
    if op.op_type == "Gemm":
        op.attrs["beta"] = 1.0


def _gemm_bias(head: Head) -> np.ndarray:
    """Gemm's effective bias beta * C (0 when absent), at least 1-D."""
    if head.bias is None:
        return np.zeros(1)
    return np.atleast_1d(head.bias.astype(np.float64) * float(head.op.attrs.get("beta", 1.0)))


# ---------------------------------------------------------------------------------------------
# after the head
# ---------------------------------------------------------------------------------------------
def _batchnorm_affine(graph: Graph, bn: Op, head: Head) -> tuple[np.ndarray, np.ndarray] | None:
    """(scale, shift) of an inference BatchNormalization over the head's output channels."""
    if head.out_rank is None or head.out_axis != 1 or len(bn.inputs) < 5:
        return None
    if int(bn.attrs.get("training_mode", 0)) or int(bn.attrs.get("spatial", 1)) != 1:
        return None
    if any(name and graph.has_users(name) for name in bn.outputs[1:]):
        return None
    params = [constant(graph, name) for name in bn.inputs[1:5]]
    if any(p is None or not is_float_array(p) or p.shape != (head.out_channels,) for p in params):
        return None
    gamma, beta, mean, var = (p.astype(np.float64) for p in params)
    denom = var + float(bn.attrs.get("epsilon", 1e-5))
    if np.any(denom <= 0):
        return None
    scale = gamma / np.sqrt(denom)
    return scale, beta - mean * scale


def _affine_step(graph: Graph, op: Op, carried: str, head: Head
                 ) -> tuple[np.ndarray, np.ndarray] | None:
    """The op reading `carried` as a per-channel affine map x -> x * a + b, returned as (a, b);
    None if it is not one (or not foldable)."""
    if is_onnx(op, "BatchNormalization"):
        return _batchnorm_affine(graph, op, head) if op.inputs[0] == carried else None
    if not is_onnx(op, "Mul", "Add", "Sub", "Div"):
        return None
    other = other_input(op, carried)
    array = constant(graph, other) if other else None
    if array is None or array.dtype != head.dtype:
        return None
    vec = per_channel(array, head.out_rank, head.out_axis, head.out_channels)
    if vec is None:
        return None
    ones, zeros = np.ones(head.out_channels), np.zeros(head.out_channels)
    carried_first = op.inputs[0] == carried
    if op.op_type == "Mul":
        return vec, zeros
    if op.op_type == "Add":
        return ones, vec
    if op.op_type == "Sub":
        return (ones, -vec) if carried_first else (-ones, vec)
    if not carried_first or np.any(vec == 0):  # c / x is not affine; x / 0 stays as it is
        return None
    return 1.0 / vec, zeros


def _affine_chain(graph: Graph, head: Head) -> tuple[list[Op], np.ndarray, np.ndarray, str]:
    """The foldable ops after `head` as (ops, scale, shift, value the chain ends in)."""
    scale = np.ones(head.out_channels)
    shift = np.zeros(head.out_channels)
    chain: list[Op] = []
    carried = head.op.outputs[0]
    while True:
        reader = sole_reader(graph, carried)
        step = None if reader is None else _affine_step(graph, reader, carried, head)
        if step is None:
            return chain, scale, shift, carried
        a, b = step
        scale, shift = scale * a, shift * a + b
        chain.append(reader)
        carried = reader.outputs[0]


def as_batchnorm_head(graph: Graph, op: Op) -> Head | None:
    """A BatchNormalization that stayed on its own (nothing to fold into) as a head whose scale
    and bias can absorb the per-channel arithmetic after it."""
    if not is_onnx(op, "BatchNormalization") or len(op.inputs) < 5:
        return None
    if int(op.attrs.get("training_mode", 0)) or int(op.attrs.get("spatial", 1)) != 1 \
            or any(name and graph.has_users(name) for name in op.outputs[1:]):
        return None
    gamma, beta = constant(graph, op.inputs[1]), constant(graph, op.inputs[2])
    rank = graph.values[op.inputs[0]].rank
    if not is_float_array(gamma) or beta is None or gamma.ndim != 1 or beta.shape != gamma.shape \
            or beta.dtype != gamma.dtype or rank is None or rank < 2:
        return None
    return Head(op, gamma, 1, rank, 1, gamma.shape[0], gamma.shape[0], beta)


def _stat(op: Op) -> str:
    return {"BatchNormalization": "batchnorms_folded", "Mul": "scales_folded",
            "Div": "scales_folded"}.get(op.op_type, "shifts_folded")


class FoldAffineAfter(Pass):
    """BatchNormalization (inference) and Mul/Div/Add/Sub by per-output-channel constants after
    a Conv/ConvTranspose/Gemm/MatMul with constant weights fold into its weights and bias; after a
    BatchNormalization that has nothing to fold into, into its scale and bias."""

    name = "fold_affine_after"

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        result = PassResult()
        for op in graph.topological_ops():   # producers first: a BN is a head only if it stayed
            if op.graph is not graph:
                continue
            head = as_head(graph, op)
            if head is not None:
                self._fold(graph, head, result)
                continue
            bn_head = as_batchnorm_head(graph, op)
            if bn_head is not None:
                self._fold_into_batchnorm(graph, bn_head, result)
        return result

    def _fold(self, graph: Graph, head: Head, result: PassResult) -> None:
        chain, scale, shift, carried = _affine_chain(graph, head)
        if not chain:
            return
        has_shift = any(not is_onnx(o, "Mul", "Div") for o in chain)
        op = head.op
        if op.op_type == "MatMul" and len(chain) == 1 and is_onnx(chain[0], "Add", "Sub"):
            return  # a lone bias Add after MatMul is already as folded as it gets
        _set_weight(graph, head, scale_output_channels(head, scale))
        new_out = op.outputs[0]
        if op.op_type in ("Conv", "ConvTranspose"):
            bias = np.zeros(head.out_channels) if head.bias is None \
                else head.bias.astype(np.float64)
            if head.bias is not None or has_shift:
                _set_bias(graph, head, bias * scale + shift)
        elif op.op_type == "Gemm":
            if head.bias is not None or has_shift:
                _set_bias(graph, head, _gemm_bias(head) * scale + shift)
        elif has_shift:  # MatMul has no bias input: one Add of the combined shift remains
            bias_value = new_const(graph, shift.astype(head.dtype), f"{op.name or 'MatMul'}_b")
            add = graph.add_op("Add", [op.outputs[0], bias_value.name], 1,
                               name=f"{op.name or 'MatMul'}_bias")
            new_out = add.outputs[0]
        replace_ops(graph, chain, carried, new_out)
        for folded in chain:
            result.count(_stat(folded))

    def _fold_into_batchnorm(self, graph: Graph, head: Head, result: PassResult) -> None:
        chain, scale, shift, carried = _affine_chain(graph, head)
        if not chain:
            return
        op = head.op
        assert head.bias is not None
        name = op.name or "bn"
        gamma = new_const(graph, (head.weight * scale).astype(head.dtype), f"{name}_scale")
        beta = new_const(graph, (head.bias * scale + shift).astype(head.dtype), f"{name}_B")
        set_input(graph, op, 1, gamma)
        set_input(graph, op, 2, beta)
        replace_ops(graph, chain, carried, op.outputs[0])
        for folded in chain:
            result.count("into_batchnorm_" + _stat(folded))


# ---------------------------------------------------------------------------------------------
# before the head
# ---------------------------------------------------------------------------------------------
def _input_channel_axis(head: Head, rank: int) -> int | None:
    """The input-channel axis of the head's data input of rank `rank` (None if that rank
    cannot be the head's input)."""
    op = head.op
    if op.op_type in ("Conv", "ConvTranspose"):
        return 1 if rank == head.weight.ndim else None
    if op.op_type == "Gemm":
        return (0 if int(op.attrs.get("transA", 0)) else 1) if rank == 2 else None
    return rank - 1 if rank >= 1 else None


def _conv_has_padding(op: Op) -> bool:
    if op.attrs.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID", b"NOTSET", b"VALID"):
        return True
    return any(int(p) != 0 for p in op.attrs.get("pads", []))


class FoldAffineBefore(Pass):
    """Mul/Div by a per-input-channel constant before a Conv/ConvTranspose/Gemm/MatMul folds into
    its weights; Add/Sub of one folds into the bias of a Gemm or of a Conv without padding."""

    name = "fold_affine_before"

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        result = PassResult()
        shapes = Shapes(graph)
        for op in graph.topological_ops():
            if op.graph is not graph:
                continue
            while True:
                head = as_head(graph, op)
                if head is None or not self._fold_one(graph, head, shapes, result):
                    break
        return result

    def _fold_one(self, graph: Graph, head: Head, shapes: Shapes, result: PassResult) -> bool:
        op = head.op
        x = op.inputs[0]
        prev = graph.producer_op(x)
        if prev is None or sole_reader(graph, x) is not op:
            return False
        found = _channel_operand(graph, prev, head, shapes)
        if found is None:
            return False
        source, vec, source_first, _, _ = found
        if prev.op_type in ("Mul", "Div"):
            if prev.op_type == "Div" and (not source_first or np.any(vec == 0)):
                return False
            _set_weight(graph, head, scale_input_channels(head, vec if prev.op_type == "Mul"
                                                          else 1.0 / vec))
            stat = "input_scales_folded"
        else:
            if not source_first and prev.op_type == "Sub":
                return False  # c - x would also flip the weights' sign; rare, left alone
            shift = vec if prev.op_type == "Add" else -vec
            if op.op_type == "MatMul" and self._shift_into_bias_add(graph, head, shift):
                graph.set_input(op, 0, source)
                if not graph.has_users(prev.outputs[0]):
                    graph.remove_op(prev)
                result.count("input_shifts_folded")
                return True
            if op.op_type == "MatMul" or op.op_type == "ConvTranspose" \
                    or op.op_type == "Conv" and _conv_has_padding(op):
                if self._scale_through_shift(graph, head, prev, source, shift, shapes):
                    result.count("input_scales_folded")
                    return True
                return False
            added = weights_times_input(head, shift)
            base = _gemm_bias(head) if op.op_type == "Gemm" else (
                np.zeros(head.out_channels) if head.bias is None else head.bias.astype(np.float64))
            _set_bias(graph, head, base + added)
            stat = "input_shifts_folded"
        graph.set_input(op, 0, source)
        if not graph.has_users(prev.outputs[0]):
            graph.remove_op(prev)
        result.count(stat)
        return True

    @staticmethod
    def _shift_into_bias_add(graph: Graph, head: Head, shift: np.ndarray) -> bool:
        """(x + c) @ W + b = x @ W + (b + c @ W): a shift before a MatMul whose only reader adds
        a per-column constant bias joins that bias."""
        add = sole_reader(graph, head.op.outputs[0])
        if head.weight.ndim != 2 or add is None or not is_onnx(add, "Add"):
            return False
        bias_name = other_input(add, head.op.outputs[0])
        bias = constant(graph, bias_name) if bias_name else None
        if bias is None or bias.dtype != head.dtype:
            return False
        vec = per_channel(bias, head.out_rank, head.out_axis, head.out_channels)
        if vec is None:
            return False
        new_bias = vec + shift @ head.weight.astype(np.float64)
        value = new_const(graph, new_bias.astype(head.dtype), f"{add.name or 'Add'}_b")
        set_input(graph, add, add.inputs.index(bias_name), value)
        return True

    @staticmethod
    def _scale_through_shift(graph: Graph, head: Head, shift_op: Op, source: str,
                             shift: np.ndarray, shapes: Shapes) -> bool:
        """x * s + c before a head that cannot take the shift (a padded Conv): rewrite it as
        (x + c / s) * s and fold s into the weights, so one op (the Add) remains of two. The
        rounding error stays relative to |x * s + c|, as before."""
        scale_op = graph.producer_op(source)
        if scale_op is None or sole_reader(graph, source) is not shift_op:
            return False
        found = _channel_operand(graph, scale_op, head, shapes)
        if found is None or not is_onnx(scale_op, "Mul", "Div"):
            return False
        x, vec, x_first, rank, axis = found
        if np.any(vec == 0) or scale_op.op_type == "Div" and not x_first:
            return False
        scale = vec if scale_op.op_type == "Mul" else 1.0 / vec
        shape = [1] * rank
        shape[axis] = head.in_channels
        moved = new_const(graph, (shift / scale).reshape(shape).astype(head.dtype),
                          f"{shift_op.name or 'Add'}_c")
        set_inputs(graph, shift_op, [x, moved.name])
        shift_op.op_type = "Add"
        graph.remove_op(scale_op)
        _set_weight(graph, head, scale_input_channels(head, scale))
        return True


def _channel_operand(graph: Graph, op: Op, head: Head, shapes: Shapes
                     ) -> tuple[str, np.ndarray, bool, int, int] | None:
    """For a Mul/Div/Add/Sub of a tensor by a constant that varies only over the head's input
    channels and does not broadcast the tensor to a larger shape: (the tensor, the constant as a
    vector over the channels, whether the tensor is the first operand, the tensor's rank and
    channel axis). None otherwise."""
    if len(op.outputs) != 1 or not is_onnx(op, "Mul", "Div", "Add", "Sub"):
        return None
    source = next((n for n in op.inputs if constant(graph, n) is None), None)
    const_name = other_input(op, source) if source else None
    array = constant(graph, const_name) if const_name else None
    if array is None or array.dtype != head.dtype:
        return None
    source_shape = shapes.shape(source)
    if source_shape is None:
        return None
    rank = len(source_shape)
    axis = _input_channel_axis(head, rank)
    if axis is None:
        return None
    vec = per_channel(array, rank, axis, head.in_channels)
    if vec is None:
        return None
    extent = ((1,) * (rank - array.ndim) + array.shape)[axis]
    if extent != 1 and source_shape[axis] != head.in_channels:
        return None  # the constant would broadcast the tensor's channels up
    return source, vec, op.inputs[0] == source, rank, axis


# ---------------------------------------------------------------------------------------------
# MatMul + Add -> Gemm
# ---------------------------------------------------------------------------------------------
class MatMulAddToGemm(Pass):
    """MatMul of a 2-D activation by a 2-D matrix followed by Add of a constant bias that
    broadcasts over the rows becomes one Gemm (the bias as C)."""

    name = "matmul_add_to_gemm"

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        result = PassResult()
        if graph.opset() < 7:
            return result  # older Gemm broadcast C only with its `broadcast` attribute
        shapes = Shapes(graph)
        for op in list(graph.ops.values()):
            if op.graph is not graph or not is_onnx(op, "MatMul"):
                continue
            a, b = (graph.values[n] for n in op.inputs)
            b_const = constant(graph, b.name)
            b_rank = b_const.ndim if b_const is not None else shapes.rank(b.name)
            if shapes.rank(a.name) != 2 or b_rank != 2:
                continue
            add = sole_reader(graph, op.outputs[0])
            if add is None or not is_onnx(add, "Add"):
                continue
            bias_name = other_input(add, op.outputs[0])
            bias = constant(graph, bias_name) if bias_name else None
            if bias is None or not is_float_array(bias) or bias.ndim > 2:
                continue
            n = b_const.shape[1] if b_const is not None else b.shape[1]
            m = a.shape[0]
            rows = bias.shape[0] if bias.ndim == 2 else 1
            cols = bias.shape[-1] if bias.ndim >= 1 else 1
            if cols not in (1, n) or rows != 1 and rows != m:
                continue
            gemm = graph.add_op("Gemm", [a.name, b.name, bias_name], 1,
                                name=op.name or "Gemm")
            replace_ops(graph, [op, add], add.outputs[0], gemm.outputs[0])
            result.count("matmuls_to_gemm")
        return result
