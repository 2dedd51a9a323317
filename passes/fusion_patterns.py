"""Recognize decomposed activations and normalizations and put the standard op in their place:
HardSwish, GELU (Erf form and tanh approximation), LayerNormalization and Softmax.

Each pass replaces a pattern only when the model's opset has the op (HardSwish >= 14, Gelu >= 20,
LayerNormalization >= 17, Softmax always, with the pre-13 flattening semantics checked). The
opset is never raised: that would change the meaning of other ops. Below opset 14, HardSwish's
four-op Add/Clip/Div/Mul form becomes the two-op x * HardSigmoid(x, 1/6, 1/2).

A pattern matches only if its intermediate values are read by nothing outside it (and are no
graph outputs), so deleting it loses nothing.
"""

from __future__ import annotations

import math

import numpy as np

from graphopt.ir import Graph, Op
from graphopt.pass_manager import Pass, PassContext, PassResult
from graphopt.passes.fusion_common import (Shapes, constant, copy_type, is_float_array, is_onnx,
                                           new_const, other_input, replace_ops, scalar,
                                           sole_reader, used_only_by)


def near(value: float | None, target: float, rel: float = 1e-4) -> bool:
    return value is not None and math.isclose(value, target, rel_tol=rel, abs_tol=1e-7)


def scalar_operand(graph: Graph, op: Op, name: str) -> float | None:
    """The single-element constant on the other input of a binary op that reads `name`."""
    other = other_input(op, name)
    return scalar(graph, other) if other else None


def clip_bounds(graph: Graph, op: Op) -> tuple[float | None, float | None] | None:
    """(min, max) of a Clip (attributes before opset 11, inputs after); None where unbounded,
    None overall when a bound is not constant."""
    if graph.opset() < 11:
        return op.attrs.get("min"), op.attrs.get("max")
    bounds = []
    for slot in (1, 2):
        name = op.inputs[slot] if len(op.inputs) > slot else ""
        if not name:
            bounds.append(None)
            continue
        value = scalar(graph, name)
        if value is None:
            return None
        bounds.append(value)
    return bounds[0], bounds[1]


def reduce_axes(graph: Graph, op: Op) -> list[int] | None:
    """Constant axes of a Reduce* op (attribute, or input 1 in newer opsets); None if absent or
    not constant (reducing over all axes is not what the patterns here want)."""
    if "axes" in op.attrs:
        return [int(a) for a in op.attrs["axes"]]
    if len(op.inputs) > 1 and op.inputs[1]:
        axes = constant(graph, op.inputs[1])
        return None if axes is None else [int(a) for a in np.asarray(axes).reshape(-1)]
    return None


def keeps_dims(op: Op) -> bool:
    return int(op.attrs.get("keepdims", 1)) == 1


# ---------------------------------------------------------------------------------------------
# HardSwish
# ---------------------------------------------------------------------------------------------
def _is_sixth(graph: Graph, op: Op, carried: str) -> bool:
    """Whether `op` divides `carried` by 6 or multiplies it by 1/6."""
    if is_onnx(op, "Div"):
        return op.inputs[0] == carried and near(scalar(graph, op.inputs[1]), 6.0)
    return is_onnx(op, "Mul") and near(scalar_operand(graph, op, carried), 1.0 / 6.0)


def _times_x(op: Op | None, carried: str, x: str) -> bool:
    return op is not None and is_onnx(op, "Mul") and other_input(op, carried) == x


def match_hardswish(graph: Graph, clip: Op) -> tuple[str, list[Op], str] | None:
    """x * Clip(x + 3, 0, 6) / 6 in any association ((x * r) / 6, x * (r / 6), * 1/6), as
    (x, ops, output)."""
    if not is_onnx(clip, "Clip") or not clip.inputs[0]:
        return None
    bounds = clip_bounds(graph, clip)
    if bounds is None or not near(bounds[0], 0.0) or not near(bounds[1], 6.0):
        return None
    add = graph.producer_op(clip.inputs[0])
    if add is None or not is_onnx(add, "Add") or sole_reader(graph, clip.inputs[0]) is not clip:
        return None
    x = next((n for n in add.inputs if near(scalar_operand(graph, add, n), 3.0)), None)
    if x is None:
        return None
    first = sole_reader(graph, clip.outputs[0])
    if first is None:
        return None
    second = sole_reader(graph, first.outputs[0])
    if _times_x(first, clip.outputs[0], x) and second is not None \
            and _is_sixth(graph, second, first.outputs[0]):
        return x, [add, clip, first, second], second.outputs[0]
    if _is_sixth(graph, first, clip.outputs[0]) and _times_x(second, first.outputs[0], x):
        return x, [add, clip, first, second], second.outputs[0]
    return None


def match_hardsigmoid_times_x(graph: Graph, hsig: Op) -> tuple[str, list[Op], str] | None:
    """x * HardSigmoid(x, alpha=1/6, beta=1/2), as (x, ops, output)."""
    if not is_onnx(hsig, "HardSigmoid"):
        return None
    if not near(float(hsig.attrs.get("alpha", 0.2)), 1.0 / 6.0) \
            or not near(float(hsig.attrs.get("beta", 0.5)), 0.5):
        return None
    x = hsig.inputs[0]
    mul = sole_reader(graph, hsig.outputs[0])
    if not _times_x(mul, hsig.outputs[0], x):
        return None
    return x, [hsig, mul], mul.outputs[0]


class FuseHardSwish(Pass):
    """Decomposed HardSwish becomes HardSwish (opset >= 14), else x * HardSigmoid(x)."""

    name = "fuse_hardswish"

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        result = PassResult()
        has_op = graph.opset() >= 14
        for op in list(graph.ops.values()):
            if op.graph is not graph:
                continue
            found = match_hardswish(graph, op)
            if found is None and has_op:
                found = match_hardsigmoid_times_x(graph, op)
            if found is None:
                continue
            x, ops, out = found
            if has_op:
                new = graph.add_op("HardSwish", [x], 1, name=ops[-1].name or "HardSwish")
                result.count("hardswish_fused")
            else:
                hsig = graph.add_op("HardSigmoid", [x], 1, {"alpha": 1.0 / 6.0, "beta": 0.5},
                                    name=ops[1].name or "HardSigmoid")
                copy_type(graph, out, hsig.outputs[0])
                new = graph.add_op("Mul", [x, hsig.outputs[0]], 1, name=ops[-1].name or "Mul")
                result.count("hardswish_to_hardsigmoid_mul")
            replace_ops(graph, ops, out, new.outputs[0])
        return result


# ---------------------------------------------------------------------------------------------
# GELU
# ---------------------------------------------------------------------------------------------
def _half_x_times(graph: Graph, start: str, x: str) -> tuple[list[Op], str] | None:
    """Follow at most two Mul/Div readers of `start` that multiply it by x and 0.5 (in either
    order, or by a Mul(x, 0.5) computed beforehand): (ops, output) of start * x * 0.5."""
    ops: list[Op] = []
    have_x, factor, carried = False, 1.0, start
    for _ in range(2):
        op = sole_reader(graph, carried)
        if op is None:
            return None
        if is_onnx(op, "Div") and op.inputs[0] == carried:
            value = scalar(graph, op.inputs[1])
            if not value:
                return None
            factor /= value
        elif is_onnx(op, "Mul"):
            other = other_input(op, carried)
            if other is None:
                return None
            if other == x and not have_x:
                have_x = True
            elif scalar(graph, other) is not None:
                factor *= scalar(graph, other)  # type: ignore[operator]
            else:
                half = graph.producer_op(other)
                if have_x or half is None or not is_onnx(half, "Mul") \
                        or sole_reader(graph, other) is not op or x not in half.inputs:
                    return None
                k = scalar_operand(graph, half, x)
                if k is None:
                    return None
                have_x, factor = True, factor * k
                ops.append(half)
        else:
            return None
        ops.append(op)
        carried = op.outputs[0]
        if have_x and near(factor, 0.5):
            return ops, carried
    return None


def _one_plus(graph: Graph, name: str) -> Op | None:
    add = sole_reader(graph, name)
    return add if add is not None and is_onnx(add, "Add") \
        and near(scalar_operand(graph, add, name), 1.0) else None


def match_gelu_erf(graph: Graph, erf: Op) -> tuple[str, list[Op], str] | None:
    """x * 0.5 * (1 + Erf(x / sqrt(2))) in the usual associations, as (x, ops, output)."""
    if not is_onnx(erf, "Erf"):
        return None
    scale = graph.producer_op(erf.inputs[0])
    if scale is None or sole_reader(graph, erf.inputs[0]) is not erf:
        return None
    if is_onnx(scale, "Div") and near(scalar(graph, scale.inputs[1]), math.sqrt(2.0)):
        x = scale.inputs[0]
    elif is_onnx(scale, "Mul"):
        x = next((n for n in scale.inputs
                  if near(scalar_operand(graph, scale, n), 1.0 / math.sqrt(2.0))), None)
    else:
        return None
    add = _one_plus(graph, erf.outputs[0])
    if x is None or add is None:
        return None
    tail = _half_x_times(graph, add.outputs[0], x)
    if tail is None:
        return None
    return x, [scale, erf, add] + tail[0], tail[1]


def _cube_of(graph: Graph, name: str) -> tuple[str, list[Op]] | None:
    """(x, ops) if `name` is x ** 3 as Pow(x, 3) or x * (x * x)."""
    op = graph.producer_op(name)
    if op is None:
        return None
    if is_onnx(op, "Pow") and near(scalar(graph, op.inputs[1]), 3.0):
        return op.inputs[0], [op]
    if is_onnx(op, "Mul"):
        for x, sq_name in (op.inputs, op.inputs[::-1]):
            sq = graph.producer_op(sq_name)
            if sq is not None and is_onnx(sq, "Mul") and sq.inputs == (x, x) \
                    and sole_reader(graph, sq_name) is op:
                return x, [sq, op]
    return None


def match_gelu_tanh(graph: Graph, tanh: Op) -> tuple[str, list[Op], str] | None:
    """0.5 * x * (1 + Tanh(sqrt(2/pi) * (x + 0.044715 * x^3))), as (x, ops, output)."""
    if not is_onnx(tanh, "Tanh"):
        return None
    outer = graph.producer_op(tanh.inputs[0])
    if outer is None or not is_onnx(outer, "Mul") or sole_reader(graph, tanh.inputs[0]) is not tanh:
        return None
    inner_name = next((n for n in outer.inputs
                       if near(scalar_operand(graph, outer, n), math.sqrt(2.0 / math.pi))), None)
    inner = graph.producer_op(inner_name) if inner_name else None
    if inner is None or not is_onnx(inner, "Add") or sole_reader(graph, inner_name) is not outer:
        return None
    for x, term_name in (inner.inputs, inner.inputs[::-1]):
        term = graph.producer_op(term_name)
        if term is None or not is_onnx(term, "Mul") or sole_reader(graph, term_name) is not inner:
            continue
        cube_name = next((n for n in term.inputs
                          if near(scalar_operand(graph, term, n), 0.044715)), None)
        cube = _cube_of(graph, cube_name) if cube_name else None
        if cube is None or cube[0] != x or sole_reader(graph, cube_name) is not term:
            continue
        add = _one_plus(graph, tanh.outputs[0])
        tail = _half_x_times(graph, add.outputs[0], x) if add is not None else None
        if tail is None:
            return None
        return x, cube[1] + [term, inner, outer, tanh, add] + tail[0], tail[1]
    return None


class FuseGelu(Pass):
    """Decomposed GELU (exact Erf form, tanh approximation) becomes Gelu (opset >= 20)."""

    name = "fuse_gelu"

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        result = PassResult()
        if graph.opset() < 20:
            return result
        for op in list(graph.ops.values()):
            if op.graph is not graph:
                continue
            found, approximate = match_gelu_erf(graph, op), "none"
            if found is None:
                found, approximate = match_gelu_tanh(graph, op), "tanh"
            if found is None:
                continue
            x, ops, out = found
            attrs = {} if approximate == "none" else {"approximate": "tanh"}
            gelu = graph.add_op("Gelu", [x], 1, attrs, name=ops[-1].name or "Gelu")
            replace_ops(graph, ops, out, gelu.outputs[0])
            result.count("gelu_fused" if approximate == "none" else "gelu_tanh_fused")
        return result


# ---------------------------------------------------------------------------------------------
# LayerNormalization
# ---------------------------------------------------------------------------------------------
def _trailing_axes(axes: list[int], rank: int | None) -> int | None:
    """k if `axes` are exactly the last k axes (negative, or positive with a known rank)."""
    if rank is not None:
        axes = [a + rank if a < 0 else a for a in axes]
        k = len(axes)
        return k if sorted(axes) == list(range(rank - k, rank)) else None
    k = len(axes)
    return k if sorted(axes) == list(range(-k, 0)) else None


def _affine_param(graph: Graph, name: str, x: str, k: int, dtype: np.dtype,
                  shapes: Shapes) -> np.ndarray | None:
    """A LayerNorm scale or bias constant as an array of the normalized shape (the last k dims
    of x), if it broadcasts only over those dims."""
    array = constant(graph, name)
    if array is None or array.dtype != dtype:
        return None
    rank = shapes.rank(x)
    if rank is not None and array.ndim > rank or rank is None and array.ndim > k:
        return None
    lead = array.shape[:max(array.ndim - k, 0)]
    if any(d != 1 for d in lead):
        return None
    core = array.reshape(array.shape[len(lead):])
    x_shape = graph.values[x].shape
    normalized = tuple(x_shape[-k:]) if x_shape is not None and len(x_shape) >= k else None
    if normalized is not None and all(isinstance(d, int) for d in normalized):
        try:
            return np.ascontiguousarray(np.broadcast_to(core, normalized))
        except ValueError:
            return None
    return core if core.ndim == k and 1 not in core.shape else None


def match_layernorm(graph: Graph, mean: Op, shapes: Shapes):
    """(x, ops, output, k, eps, scale name|None, bias name|None) of a decomposed LayerNorm
    starting at its first ReduceMean."""
    if not is_onnx(mean, "ReduceMean") or not keeps_dims(mean):
        return None
    x = mean.inputs[0]
    axes = reduce_axes(graph, mean)
    sub = sole_reader(graph, mean.outputs[0])
    if axes is None or sub is None or not is_onnx(sub, "Sub") or sub.inputs != (x, mean.outputs[0]):
        return None
    d = sub.outputs[0]
    readers = {op.id: op for op, _ in graph.consumers(d)}
    if len(readers) != 2 or graph.is_output(d):
        return None
    square = next((op for op in readers.values()
                   if is_onnx(op, "Pow") and op.inputs[0] == d
                   and near(scalar(graph, op.inputs[1]), 2.0)
                   or is_onnx(op, "Mul") and op.inputs == (d, d)), None)
    div = next((op for op in readers.values() if is_onnx(op, "Div") and op.inputs[0] == d), None)
    if square is None or div is None:
        return None
    var = sole_reader(graph, square.outputs[0])
    if var is None or not is_onnx(var, "ReduceMean") or not keeps_dims(var) \
            or reduce_axes(graph, var) != axes:
        return None
    add_eps = sole_reader(graph, var.outputs[0])
    eps = scalar_operand(graph, add_eps, var.outputs[0]) \
        if add_eps is not None and is_onnx(add_eps, "Add") else None
    sqrt = sole_reader(graph, add_eps.outputs[0]) if eps is not None else None
    if sqrt is None or not is_onnx(sqrt, "Sqrt") or sole_reader(graph, sqrt.outputs[0]) is not div \
            or div.inputs[1] != sqrt.outputs[0]:
        return None
    k = _trailing_axes(axes, shapes.rank(x))
    if k is None:
        return None
    ops = [mean, sub, square, var, add_eps, sqrt, div]
    out, scale_name, bias_name = div.outputs[0], None, None
    mul = sole_reader(graph, out)
    if mul is not None and is_onnx(mul, "Mul") and other_input(mul, out) \
            and constant(graph, other_input(mul, out)) is not None:
        scale_name, out = other_input(mul, out), mul.outputs[0]
        ops.append(mul)
    add = sole_reader(graph, out)
    if add is not None and is_onnx(add, "Add") and other_input(add, out) \
            and constant(graph, other_input(add, out)) is not None:
        bias_name, out = other_input(add, out), add.outputs[0]
        ops.append(add)
    return x, ops, out, k, eps, scale_name, bias_name


class FuseLayerNorm(Pass):
    """Decomposed LayerNorm (ReduceMean, Sub, Pow, ReduceMean, Add, Sqrt, Div, [Mul], [Add])
    becomes LayerNormalization (opset >= 17)."""

    name = "fuse_layernorm"

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        result = PassResult()
        if graph.opset() < 17:
            return result
        shapes = Shapes(graph)
        for op in list(graph.ops.values()):
            if op.graph is not graph or not is_onnx(op, "ReduceMean"):
                continue
            found = match_layernorm(graph, op, shapes)
            if found is None:
                continue
            x, ops, out, k, eps, scale_name, bias_name = found
            dtype = _float_dtype(graph, x, scale_name)
            if dtype is None:
                continue
            scale = _affine_param(graph, scale_name, x, k, dtype, shapes) if scale_name else None
            bias = _affine_param(graph, bias_name, x, k, dtype, shapes) if bias_name else None
            if scale_name and scale is None or bias_name and bias is None:
                continue
            if scale is None:
                shape = graph.values[x].shape
                tail = tuple(shape[-k:]) if shape is not None and len(shape) >= k else ()
                if len(tail) != k or not all(isinstance(d, int) for d in tail):
                    continue
                scale = np.ones(tail, dtype)
            if bias is not None and bias.shape != scale.shape:
                if np.broadcast_shapes(bias.shape, scale.shape) != scale.shape:
                    continue
                bias = np.ascontiguousarray(np.broadcast_to(bias, scale.shape))
            inputs = [x, new_const(graph, scale, "ln_scale").name]
            if bias is not None:
                inputs.append(new_const(graph, bias, "ln_bias").name)
            ln = graph.add_op("LayerNormalization", inputs, 1, {"axis": -k, "epsilon": float(eps)},
                              name=ops[-1].name or "LayerNormalization")
            replace_ops(graph, ops, out, ln.outputs[0])
            result.count("layernorms_fused")
        return result


def _float_dtype(graph: Graph, x: str, scale_name: str | None) -> np.dtype | None:
    """The float dtype of the normalized tensor (from x, or from the scale constant)."""
    value = graph.values[x]
    if value.dtype:
        from graphopt.ir import onnx_to_np_dtype
        dtype = onnx_to_np_dtype(value.dtype)
        return dtype if dtype in (np.float16, np.float32, np.float64) else None
    array = constant(graph, scale_name) if scale_name else None
    return array.dtype if is_float_array(array) else None


# ---------------------------------------------------------------------------------------------
# Softmax
# ---------------------------------------------------------------------------------------------
def match_softmax(graph: Graph, div: Op) -> tuple[str, list[Op], str, int] | None:
    """Exp(x - ReduceMax(x)) / ReduceSum(Exp(...)) over one axis (the ReduceMax part optional),
    as (x, ops, output, axis)."""
    if not is_onnx(div, "Div"):
        return None
    exp_name, sum_name = div.inputs
    exp = graph.producer_op(exp_name)
    total = graph.producer_op(sum_name)
    if exp is None or total is None or not is_onnx(exp, "Exp") or not is_onnx(total, "ReduceSum"):
        return None
    if total.inputs[0] != exp_name or not keeps_dims(total) \
            or sole_reader(graph, sum_name) is not div:
        return None
    if not used_only_by(graph, exp_name, [div, total]):
        return None
    axes = reduce_axes(graph, total)
    if axes is None or len(axes) != 1:
        return None
    ops = [exp, total, div]
    x = exp.inputs[0]
    sub = graph.producer_op(x)
    if sub is not None and is_onnx(sub, "Sub") and sole_reader(graph, x) is exp:
        peak = graph.producer_op(sub.inputs[1])
        if peak is not None and is_onnx(peak, "ReduceMax") and peak.inputs[0] == sub.inputs[0] \
                and keeps_dims(peak) and reduce_axes(graph, peak) == axes \
                and sole_reader(graph, sub.inputs[1]) is sub:
            x = sub.inputs[0]
            ops = [peak, sub] + ops
    return x, ops, div.outputs[0], axes[0]


class FuseSoftmax(Pass):
    """Exp / ReduceSum(Exp) (with or without the max subtraction) becomes Softmax. Before opset
    13 Softmax normalizes over the flattened trailing dims, so only the last axis qualifies."""

    name = "fuse_softmax"

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        result = PassResult()
        shapes = Shapes(graph)
        for op in list(graph.ops.values()):
            if op.graph is not graph:
                continue
            found = match_softmax(graph, op)
            if found is None:
                continue
            x, ops, out, axis = found
            if graph.opset() < 13:
                rank = shapes.rank(x)
                if axis != -1 and (rank is None or axis != rank - 1):
                    continue
            softmax = graph.add_op("Softmax", [x], 1, {"axis": axis},
                                   name=ops[-1].name or "Softmax")
            replace_ops(graph, ops, out, softmax.outputs[0])
            result.count("softmaxes_fused")
        return result
