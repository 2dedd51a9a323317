"""Quantization kernels: (De)QuantizeLinear, DynamicQuantizeLinear, and the integer GEMM ops
MatMulInteger, ConvInteger, QLinearMatMul, QLinearConv.

The integer products run on the shared cores of int8.py (exact 32-bit accumulation through
float BLAS, never numpy's integer matmul; the acc16 model where the op's meta says
`graphopt.kernel=int8_acc16`; onnxruntime's requantization). The QDQ groups the session runs
as one int8 step (DequantizeLinear -> Conv/Gemm/MatMul -> QuantizeLinear, qdq.py) use the same
cores.
"""

from __future__ import annotations

import numpy as np

from graphopt.runtime.kernels.conv import ConvAttrs
from graphopt.runtime.kernels.int8 import (
    IntConv, IntMatMul, Requantizer, int_range, matmul_integer, multiplier,
)
from graphopt.runtime.kernels.registry import KernelNode, kernel

ACC16 = "int8_acc16"
ACC32 = "int8_acc32"
KERNEL_META = "graphopt.kernel"


def _param_shape(param: np.ndarray, x_shape: tuple[int, ...], axis: int, block_size: int) -> np.ndarray:
    """A scale / zero point broadcastable against x: scalar, per-axis (1-D) or blocked."""
    param = np.asarray(param)
    if param.ndim == 0 or param.size == 1 and block_size == 0:
        return param.reshape(())
    axis = axis % len(x_shape)
    if block_size:
        # Same rank as x, axis dim = ceil(D / block): repeat each entry block_size times.
        expanded = np.repeat(param, block_size, axis=axis)
        index = [slice(None)] * expanded.ndim
        index[axis] = slice(0, x_shape[axis])
        return expanded[tuple(index)]
    shape = [1] * len(x_shape)
    shape[axis] = -1
    return param.reshape(shape)


def quantize(x: np.ndarray, scale, zero_point, out_dtype: np.dtype) -> np.ndarray:
    """saturate(round_half_even(x / scale) + zero_point) in out_dtype."""
    lo, hi = int_range(out_dtype)
    compute = np.float64 if x.dtype == np.float64 else np.float32
    q = np.divide(np.asarray(x, compute), np.asarray(scale, compute))
    np.rint(q, out=q)
    if zero_point is not None and np.any(zero_point):
        q += np.asarray(zero_point, compute)
    # saturate and cast in one pass
    return np.clip(q, lo, hi, out=np.empty(q.shape, out_dtype), casting="unsafe")


@kernel("QuantizeLinear", since=10)
def _quantize_linear(node: KernelNode):
    axis = int(node.attr("axis", 1))
    block_size = int(node.attr("block_size", 0))
    output_dtype = int(node.attr("output_dtype", 0))
    if node.attr("saturate", 1) == 0:
        pass  # only meaningful for float8 outputs, which the runtime does not support
    default_dtype = np.dtype(np.uint8)
    if output_dtype:
        from graphopt.ir import onnx_to_np_dtype
        default_dtype = onnx_to_np_dtype(output_dtype)

    def run(x, scale, zero_point=None):
        dtype = zero_point.dtype if zero_point is not None else default_dtype
        s = _param_shape(scale, x.shape, axis, block_size)
        zp = None if zero_point is None else _param_shape(zero_point, x.shape, axis, block_size)
        return (quantize(x, s, zp, dtype),)
    return run


@kernel("DequantizeLinear", since=10)
def _dequantize_linear(node: KernelNode):
    axis = int(node.attr("axis", 1))
    block_size = int(node.attr("block_size", 0))

    def run(x, scale, zero_point=None):
        out_dtype = np.asarray(scale).dtype
        compute = np.float64 if out_dtype == np.float64 else np.float32
        s = _param_shape(scale, x.shape, axis, block_size).astype(compute, copy=False)
        zp = None if zero_point is None else _param_shape(zero_point, x.shape, axis, block_size)
        if zp is not None and np.any(zp):
            y = np.subtract(x, zp.astype(compute), dtype=compute)   # exact: integers
        else:
            y = np.array(x, dtype=compute)
        if y.shape == np.broadcast_shapes(y.shape, s.shape):
            np.multiply(y, s, out=y)
        else:
            y = y * s
        return (y.astype(out_dtype, copy=False),)
    return run


@kernel("DynamicQuantizeLinear", since=11)
def _dynamic_quantize_linear(node: KernelNode):
    def run(x):
        x32 = np.asarray(x, np.float32)
        hi = np.float32(max(0.0, float(x32.max()))) if x32.size else np.float32(0)
        lo = np.float32(min(0.0, float(x32.min()))) if x32.size else np.float32(0)
        # onnxruntime: scale = max == min ? 1 : (max - min) / 255 (onnx's reference divides
        # the 1 by 255 too; an all-zero input quantizes to zeros either way).
        scale = np.float32(1.0) if hi == lo else np.float32(hi - lo) / np.float32(255)
        zp = np.float32(np.rint(np.clip(np.float32(0) - lo / scale, 0, 255)))
        y = quantize(x32, scale, zp, np.dtype(np.uint8))
        return (y, np.array(scale, dtype=np.float32), np.array(zp, dtype=np.uint8))
    return run


# ---------------------------------------------------------------------------------------------
# integer matmuls
# ---------------------------------------------------------------------------------------------
def _acc16(node: KernelNode) -> bool:
    return node.op.meta.get(KERNEL_META) == ACC16


@kernel("MatMulInteger", since=10)
def _matmul_integer(node: KernelNode):
    acc16 = _acc16(node)

    def run(a, b, a_zp=None, b_zp=None):
        return (matmul_integer(a, b, a_zp, b_zp, acc16=acc16),)
    return run


@kernel("QLinearMatMul", since=10)
def _qlinear_matmul(node: KernelNode):
    acc16 = _acc16(node)
    b, b_zp = node.consts[3], node.consts[5]
    # A constant 2-D b with a scalar or per-column zero point is laid out once.
    core = IntMatMul(b, b_zp, acc16=acc16) if b is not None and b.ndim == 2 \
        and (b_zp is not None or not node.op.inputs[5]) else None

    def run(a, a_scale, a_zp, b, b_scale, b_zp, y_scale, y_zp=None):
        if core is not None and np.size(a_zp) == 1:
            acc = core(a, a_zp)
        else:
            acc = matmul_integer(a, b, a_zp, b_zp, acc16=acc16)
        out_dtype = y_zp.dtype if y_zp is not None else a.dtype
        mult = multiplier(a_scale, b_scale, y_scale)
        if mult.ndim == 1:
            mult = mult.reshape(1, -1)
        return (Requantizer(mult, y_zp, out_dtype)(acc),)
    return run


# ---------------------------------------------------------------------------------------------
# integer convolutions
# ---------------------------------------------------------------------------------------------
def _conv_core(node: KernelNode, w_slot: int, w_zp_slot: int, b_slot: int | None) -> IntConv:
    """IntConv with the weights (and bias) laid out now when they are constant."""
    def const(slot):
        return node.consts[slot] if slot is not None and node.n_inputs > slot else None

    def omitted(slot):
        return slot is None or node.n_inputs <= slot or not node.op.inputs[slot]
    w, w_zp, bias = const(w_slot), const(w_zp_slot), const(b_slot)
    known = w is not None and (omitted(w_zp_slot) or w_zp is not None) \
        and (omitted(b_slot) or bias is not None)
    attrs = ConvAttrs.from_op(node.attr)
    if not known:
        return IntConv(attrs, acc16=_acc16(node))
    return IntConv(attrs, w, w_zp, bias, acc16=_acc16(node))


@kernel("ConvInteger", since=10)
def _conv_integer(node: KernelNode):
    core = _conv_core(node, w_slot=1, w_zp_slot=3, b_slot=None)

    def run(x, w, x_zp=None, w_zp=None):
        return (core(x, x_zp, w, w_zp),)
    return run


@kernel("QLinearConv", since=10)
def _qlinear_conv(node: KernelNode):
    core = _conv_core(node, w_slot=3, w_zp_slot=5, b_slot=8)

    def run(x, x_scale, x_zp, w, w_scale, w_zp, y_scale, y_zp=None, bias=None):
        acc = core(x, x_zp, w, w_zp, bias)
        mult = multiplier(x_scale, w_scale, y_scale)
        if mult.ndim == 1 and mult.size > 1:
            mult = mult.reshape((-1,) + (1,) * (acc.ndim - 2))
        out_dtype = y_zp.dtype if y_zp is not None else x.dtype
        return (Requantizer(mult, y_zp, out_dtype)(acc),)
    return run
