"""Quantization kernels: (De)QuantizeLinear, DynamicQuantizeLinear, and the integer GEMM ops
MatMulInteger, ConvInteger, QLinearMatMul, QLinearConv.

Integer results are exact: products of zero-point-shifted 8-bit values are accumulated through
float BLAS in chunks that keep every partial sum exactly representable (gemm.py), never by
numpy's integer matmul. An op whose meta says `graphopt.kernel=int8_acc16` accumulates as
FBGEMM's 16-bit kernels do (saturation included, gemm.int_gemm_acc16) on the raw 8-bit
operands, with the zero-point corrections added in int32 afterwards, as those kernels do.

Requantization (QLinear*) follows onnxruntime: the multiplier x_scale * w_scale / y_scale is a
float32, the int32 accumulator is converted to float32, multiplied, rounded half to even, then
the zero point is added and the result saturated.
"""

from __future__ import annotations

import numpy as np

from graphopt.errors import GraphoptError
from graphopt.runtime.kernels.conv import ConvAttrs, ConvPlan, ConvWeights, conv, exact_matmul
from graphopt.runtime.kernels.gemm import (
    F32_EXACT, im2col, int_gemm_acc16, matmul_exact_f32, pad_spatial, to_int32,
)
from graphopt.runtime.kernels.registry import KernelNode, kernel

ACC16 = "int8_acc16"
KERNEL_META = "graphopt.kernel"

_INT_RANGES = {
    np.dtype(np.uint8): (0, 255),
    np.dtype(np.int8): (-128, 127),
    np.dtype(np.uint16): (0, 65535),
    np.dtype(np.int16): (-32768, 32767),
    np.dtype(np.int32): (-(2 ** 31), 2 ** 31 - 1),
}


def _range(dtype: np.dtype) -> tuple[int, int]:
    try:
        return _INT_RANGES[np.dtype(dtype)]
    except KeyError:
        raise GraphoptError(f"quantized type {np.dtype(dtype)} is not supported by the "
                            "graphopt runtime") from None


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
    lo, hi = _range(out_dtype)
    compute = np.float64 if x.dtype == np.float64 else np.float32
    q = np.divide(np.asarray(x, compute), np.asarray(scale, compute))
    np.rint(q, out=q)
    if zero_point is not None:
        q += np.asarray(zero_point, compute)
    np.clip(q, lo, hi, out=q)
    return q.astype(out_dtype)


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
        y = np.asarray(x, dtype=compute)
        if zero_point is not None:
            zp = _param_shape(zero_point, x.shape, axis, block_size)
            if np.any(zp):
                y = y - zp.astype(compute)
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
# integer GEMM plumbing
# ---------------------------------------------------------------------------------------------
def _zp_value(zp) -> np.ndarray:
    return np.zeros((), np.int64) if zp is None else np.asarray(zp).astype(np.int64)


def _shifted_bound(dtype: np.dtype, zp: np.ndarray) -> int:
    """max |v - zp| over the values of an 8/16-bit type (no pass over the data)."""
    lo, hi = _range(dtype)
    zmin, zmax = (int(zp.min()), int(zp.max())) if zp.size else (0, 0)
    return max(abs(hi - zmin), abs(lo - zmax), abs(hi - zmax), abs(lo - zmin))


def _requantize(acc: np.ndarray, multiplier: np.ndarray, y_zp: np.ndarray | None, out_dtype) -> np.ndarray:
    """onnxruntime's requantization: float32(acc) * float32 multiplier, rint, + zp, saturate."""
    lo, hi = _range(out_dtype)
    y = acc.astype(np.float32)
    y *= multiplier
    np.rint(y, out=y)
    if y_zp is not None:
        y += np.asarray(y_zp, np.float32)
    np.clip(y, lo, hi, out=y)
    return y.astype(out_dtype)


def _multiplier(a_scale, b_scale, y_scale) -> np.ndarray:
    a = np.asarray(a_scale, np.float32)
    b = np.asarray(b_scale, np.float32)
    return (a * b) / np.asarray(y_scale, np.float32)


def matmul_integer(a: np.ndarray, b: np.ndarray, a_zp, b_zp, *, acc16: bool = False) -> np.ndarray:
    """(a - a_zp) @ (b - b_zp) as int32, exactly (matmul broadcasting).

    a_zp: scalar or per row of a (1-D, M entries); b_zp: scalar or per column (1-D, N).
    """
    a_zp = _zp_value(a_zp)
    b_zp = _zp_value(b_zp)
    if a_zp.ndim == 1 and a.ndim >= 2:
        a_zp = a_zp.reshape(-1, 1)
    if acc16 and a.ndim == 2 and b.ndim == 2:
        return _acc16_with_zero_points(a, b, a_zp, b_zp)
    a_f = np.asarray(a, np.float32)
    if np.any(a_zp):
        a_f = a_f - a_zp.astype(np.float32)
    b_f = np.asarray(b, np.float32)
    if np.any(b_zp):
        b_f = b_f - b_zp.astype(np.float32)
    bound = _shifted_bound(a.dtype, a_zp) * _shifted_bound(b.dtype, b_zp)
    if b.ndim == 2 and a.ndim > 2:
        k = a.shape[-1]
        acc = matmul_exact_f32(a_f.reshape(-1, k), b_f, bound)
        acc = acc.reshape(a.shape[:-1] + (b.shape[1],))
    else:
        acc = matmul_exact_f32(a_f, b_f, bound)
    return to_int32(acc)


def _acc16_with_zero_points(a, b, a_zp, b_zp) -> np.ndarray:
    """acc16 on the raw operands, then the int32 zero-point corrections:
    sum (a - za)(b - zb) = sum ab - za sum_k b - zb sum_k a + K za zb."""
    raw = int_gemm_acc16(a, b).astype(np.int64)
    k = a.shape[1]
    col = b.astype(np.int64).sum(axis=0)[None, :]
    row = a.astype(np.int64).sum(axis=1)[:, None]
    za = np.broadcast_to(a_zp, (a.shape[0], 1)) if a_zp.ndim else a_zp
    zb = b_zp.reshape(1, -1) if b_zp.ndim else b_zp
    acc = raw - za * col - zb * row + k * za * zb
    return acc.astype(np.int32)


@kernel("MatMulInteger", since=10)
def _matmul_integer(node: KernelNode):
    acc16 = node.op.meta.get(KERNEL_META) == ACC16

    def run(a, b, a_zp=None, b_zp=None):
        return (matmul_integer(a, b, a_zp, b_zp, acc16=acc16),)
    return run


@kernel("QLinearMatMul", since=10)
def _qlinear_matmul(node: KernelNode):
    acc16 = node.op.meta.get(KERNEL_META) == ACC16

    def run(a, a_scale, a_zp, b, b_scale, b_zp, y_scale, y_zp=None):
        acc = matmul_integer(a, b, a_zp, b_zp, acc16=acc16)
        out_dtype = y_zp.dtype if y_zp is not None else a.dtype
        mult = _multiplier(a_scale, b_scale, y_scale)
        if mult.ndim == 1:
            mult = mult.reshape(1, -1)
        return (_requantize(acc, mult, y_zp, out_dtype),)
    return run


# ---------------------------------------------------------------------------------------------
# integer convolutions
# ---------------------------------------------------------------------------------------------
class _IntConv:
    """ConvInteger / QLinearConv core: the float conv engine on zero-point-shifted values."""

    def __init__(self, node: KernelNode, w_slot: int, w_zp_slot: int | None) -> None:
        self.attrs = ConvAttrs.from_op(node.attr)
        self.acc16 = node.op.meta.get(KERNEL_META) == ACC16
        self.plan = ConvPlan(self.attrs, None)
        w = node.consts[w_slot] if node.n_inputs > w_slot else None
        w_zp = node.consts[w_zp_slot] if w_zp_slot is not None and node.n_inputs > w_zp_slot else None
        zp_known = w_zp_slot is None or node.n_inputs <= w_zp_slot or not node.op.inputs[w_zp_slot] \
            or w_zp is not None
        self._prepared = self._prepare(w, w_zp) if w is not None and zp_known else None

    def _prepare(self, w: np.ndarray, w_zp) -> tuple[ConvWeights, int]:
        wf = np.asarray(w, np.float32)
        zp = _zp_value(w_zp)
        if np.any(zp):
            zp_shape = (-1,) + (1,) * (w.ndim - 1) if zp.ndim == 1 else ()
            wf = wf - zp.astype(np.float32).reshape(zp_shape)
        weights = ConvWeights.prepare(wf, self.attrs.groups)
        w_bound = int(np.abs(wf).max()) if wf.size else 0
        return weights, w_bound

    def __call__(self, x, x_zp, w, w_zp) -> np.ndarray:
        """int32 accumulator of the convolution of (x - x_zp) and (w - w_zp)."""
        if self.acc16:
            return self._acc16(x, x_zp, w, w_zp)
        weights, w_bound = self._prepared or self._prepare(w, w_zp)
        x_zp_v = _zp_value(x_zp)
        xf = np.asarray(x, np.float32)
        if np.any(x_zp_v):
            xf = xf - x_zp_v.astype(np.float32)
        bound = _shifted_bound(x.dtype, x_zp_v) * max(w_bound, 1)
        geom = self.plan.geometry(x.shape, weights.w.shape)
        k_total = weights.mat.shape[2]
        if k_total * bound <= F32_EXACT:
            acc = conv(xf, weights, geom)                       # every sum exact in float32
        else:
            acc = conv(xf, weights, geom, mm=exact_matmul(bound), out_dtype=np.float64,
                       taps_exact=False)
        return to_int32(acc)

    def _acc16(self, x, x_zp, w, w_zp) -> np.ndarray:
        """acc16 model on raw 8-bit values, K ordered (kernel offsets, channel) as FBGEMM's
        NHWC im2col; zero-point corrections in int32. Activations: the M x K operand."""
        geom = self.plan.geometry(x.shape, w.shape)
        groups = self.attrs.groups
        x_zp_v = _zp_value(x_zp)
        w_zp_v = _zp_value(w_zp)
        if x_zp_v.size > 1:
            raise GraphoptError("ConvInteger: x_zero_point must be a scalar")
        xp = pad_spatial(np.asarray(x), geom.begin, geom.end, int(x_zp_v))
        cols = im2col(xp, geom.kernel, geom.strides, geom.dilations, geom.out_spatial, groups)
        n, _, k, pixels = cols.shape
        c_out = w.shape[0]
        cog = c_out // groups
        cig = w.shape[1]
        kk = k // cig
        out = np.empty((n, c_out, pixels), np.int32)
        for b in range(n):
            for g in range(groups):
                # rows (c, taps) -> (taps, c)
                a = cols[b, g].reshape(cig, kk, pixels).transpose(2, 1, 0).reshape(pixels, k)
                wg = np.asarray(w[g * cog:(g + 1) * cog]).reshape(cog, cig, kk)
                bmat = wg.transpose(2, 1, 0).reshape(k, cog)
                zb = w_zp_v[g * cog:(g + 1) * cog] if w_zp_v.ndim == 1 else w_zp_v
                acc = _acc16_with_zero_points(a, bmat, x_zp_v, zb)
                out[b, g * cog:(g + 1) * cog] = acc.T
        return out.reshape((n, c_out) + tuple(geom.out_spatial))


@kernel("ConvInteger", since=10)
def _conv_integer(node: KernelNode):
    core = _IntConv(node, w_slot=1, w_zp_slot=3)

    def run(x, w, x_zp=None, w_zp=None):
        return (core(x, x_zp, w, w_zp),)
    return run


@kernel("QLinearConv", since=10)
def _qlinear_conv(node: KernelNode):
    core = _IntConv(node, w_slot=3, w_zp_slot=5)

    def run(x, x_scale, x_zp, w, w_scale, w_zp, y_scale, y_zp=None, bias=None):
        acc = core(x, x_zp, w, w_zp)
        if bias is not None:
            acc = acc + np.asarray(bias, np.int32).reshape((-1,) + (1,) * (acc.ndim - 2))
        mult = _multiplier(x_scale, w_scale, y_scale)
        if mult.ndim == 1 and mult.size > 1:
            mult = mult.reshape((-1,) + (1,) * (acc.ndim - 2))
        out_dtype = y_zp.dtype if y_zp is not None else x.dtype
        return (_requantize(acc, mult, y_zp, out_dtype),)
    return run

