"""The int8 step of a QDQ group (runtime/qdq.py): x_q in, y_q out, as onnxruntime's QLinearConv /
QLinearMatMul / QGemm compute it, with the accumulation the compute op's meta names.

    acc = IntConv / IntMatMul (x_q - x_zp, W_q - w_zp)      int32, exact or the acc16 model
        + outlier product (sparse, int32)                    when the group has an outlier op
        + bias                                               int32, scale x_scale * w_scale
    y_q = Requantizer(acc)                                   float32(acc) * x_s w_s / y_s,
                                                             rint, + y_zp, clamped

Activations between the op and the output QuantizeLinear are clamps in the quantized domain:
Q is monotone, so Q(clamp(y, lo, hi)) = clamp(Q(y), Q(lo), Q(hi)) exactly; a chain of
Relu/Clip composes into one [lo, hi].

The cores are int8.py's, shared with the QLinear* kernels (one implementation). The outlier
product runs sparse (sparse_int8.py) when its weights are sparse enough for a gather to beat a
GEMM, else as a dense exact product; both accumulate in 32 bits.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import onnx

from graphopt.errors import GraphoptError
from graphopt.ir import Graph, Op, onnx_to_np_dtype
from graphopt.runtime.kernels.conv import ConvAttrs
from graphopt.runtime.kernels.int8 import IntConv, IntMatMul, Requantizer, multiplier, scalar_zp
from graphopt.runtime.kernels.quant import quantize
from graphopt.runtime.kernels.sparse_int8 import SparseInt8, dense_of_proto

if TYPE_CHECKING:
    from graphopt.runtime.qdq import QdqGroup

#: Above this share of nonzeros, the outlier product runs as a dense exact GEMM: a gathered
#: multiply-add costs about 50x a BLAS one per element, so sparse pays below a few percent.
SPARSE_MAX_DENSITY = 0.02


class Constants:
    """What the builder reads: dense constants by name, and sparse initializers by name."""

    def __init__(self, array: Callable[[str], np.ndarray | None],
                 sparse: Callable[[str], onnx.SparseTensorProto | None]) -> None:
        self.array = array
        self.sparse = sparse

    def weight(self, name: str) -> np.ndarray:
        """A weight as a dense array (a sparse initializer is densified here, not cached)."""
        proto = self.sparse(name)
        if proto is not None:
            return dense_of_proto(proto)
        array = self.array(name)
        if array is None:
            raise GraphoptError(f"QDQ group: {name!r} is not a constant")
        return array


class QdqKernel:
    """x_q -> (y_q,) for one group; `accumulation`, `outlier_mode` and `acc16_emulated` say
    how it computes (Session.int8_steps)."""

    def __init__(self, group: QdqGroup, graph: Graph, consts: Constants) -> None:
        op = group.op
        self.op_type = op.op_type
        self.accumulation = group.accumulation
        acc16 = group.accumulation == "int8_acc16"
        param = consts.array
        x_scale = param(group.x_dq.inputs[1])
        self.x_zp = int(scalar_zp(_optional(param, group.x_dq, 2)))
        w_name = group.w_dq.inputs[0]
        w_q = consts.weight(w_name)
        w_scale = param(group.w_dq.inputs[1]).reshape(-1)
        w_zp = _optional(param, group.w_dq, 2)
        w_zp = None if w_zp is None else w_zp.reshape(-1)
        bias = None
        if group.b_dq is not None:
            bias = param(group.b_dq.inputs[0]).reshape(-1).astype(np.int32)
        y_scale = param(group.q.inputs[1])
        y_zp = _optional(param, group.q, 2)
        out_dtype = _output_dtype(group.q, y_zp)
        lo, hi = _clamp(group.activations, graph, param, y_scale, y_zp, out_dtype)
        mult = multiplier(x_scale.reshape(()), w_scale, y_scale.reshape(()))
        x_dtype = _input_dtype(graph, group, param)
        self.outlier_mode: str | None = None
        self._outlier: Any = None
        self._outlier_core: Any = None
        if op.op_type == "Conv":
            attrs = ConvAttrs.from_op(op.attrs.get)
            self._conv = IntConv(attrs, w_q, w_zp, bias, acc16=acc16)
            self._groups = attrs.groups
            channel_shape = (-1,) + (1,) * (w_q.ndim - 2)
            self._run = self._run_conv
            emulated = self._conv.unsafe_channels(x_dtype)
            out_axis = 0
        else:
            trans_b = op.op_type == "Gemm" and bool(op.attrs.get("transB", 0))
            b = np.ascontiguousarray(w_q.T) if trans_b else w_q
            self._matmul = IntMatMul(b, w_zp, acc16=acc16)
            self._bias = bias
            channel_shape = (-1,)
            self._run = self._run_matmul
            emulated = self._matmul.unsafe_columns(x_dtype)
            out_axis = 0 if trans_b else 1
        self.acc16_emulated = int(emulated.size) if acc16 and emulated is not None else 0
        if group.outlier_w_dq is not None:
            self._prepare_outlier(group, graph, consts, out_axis)
        if mult.size > 1:
            mult = mult.reshape(channel_shape)
        self._requantize = Requantizer(mult, y_zp, out_dtype, lo, hi)

    def _prepare_outlier(self, group: QdqGroup, graph: Graph, consts: Constants,
                         out_axis: int) -> None:
        name = group.outlier_w_dq.inputs[0]
        proto = consts.sparse(name)
        sparse = SparseInt8.from_proto(proto, out_axis) if proto is not None \
            else SparseInt8.from_dense(consts.weight(name), out_axis)
        if sparse.density <= SPARSE_MAX_DENSITY:
            self._outlier = sparse
            self.outlier_mode = "sparse"
            return
        w = consts.weight(name)
        self.outlier_mode = "dense"
        if self.op_type == "Conv":
            self._outlier_core = IntConv(self._conv.attrs, w)
        else:
            b = np.ascontiguousarray(w.T) if out_axis == 0 else w
            self._outlier_core = IntMatMul(b)

    def __call__(self, x_q: np.ndarray) -> tuple[np.ndarray]:
        return (self._requantize(self._run(x_q)),)

    def _run_conv(self, x_q: np.ndarray) -> np.ndarray:
        plain = self._outlier is None and self._outlier_core is None
        acc = self._conv(x_q, self.x_zp, exact_float=plain)
        if plain:
            return acc
        if self._outlier is not None:
            geom = self._conv.geometry(x_q.shape, self._conv.prepared().raw.shape)
            self._outlier.add_conv(acc, x_q, self.x_zp, geom, self._groups)
        elif self._outlier_core is not None:
            acc += self._outlier_core(x_q, self.x_zp)
        return acc

    def _run_matmul(self, x_q: np.ndarray) -> np.ndarray:
        acc = self._matmul(x_q, self.x_zp)
        if self._outlier is not None:
            k = x_q.shape[-1]
            flat = acc.reshape(-1, acc.shape[-1])
            self._outlier.add_matmul(flat, x_q.reshape(-1, k), self.x_zp)
        elif self._outlier_core is not None:
            acc += self._outlier_core(x_q, self.x_zp)
        if self._bias is not None:
            acc += self._bias
        return acc


def build_group_kernel(group: QdqGroup, graph: Graph, consts: Constants) -> QdqKernel:
    """The step's kernel; records the outlier mode on the group."""
    kernel = QdqKernel(group, graph, consts)
    group.outlier_mode = kernel.outlier_mode
    return kernel


def _optional(param, op: Op, slot: int) -> np.ndarray | None:
    name = op.inputs[slot] if slot < len(op.inputs) else ""
    return param(name) if name else None


def _output_dtype(q: Op, y_zp: np.ndarray | None) -> np.dtype:
    if y_zp is not None:
        return y_zp.dtype
    out_type = int(q.attrs.get("output_dtype", 0) or 0)
    return onnx_to_np_dtype(out_type) if out_type else np.dtype(np.uint8)


def _input_dtype(graph: Graph, group: QdqGroup, param) -> np.dtype:
    """The quantized input's type (acc16's activation bound depends on it)."""
    zp = _optional(param, group.x_dq, 2)
    if zp is not None:
        return zp.dtype
    return onnx_to_np_dtype(graph.values[group.input].dtype)


def _clamp(activations: tuple[Op, ...], graph: Graph, param, y_scale: np.ndarray,
           y_zp: np.ndarray | None, out_dtype) -> tuple[int | None, int | None]:
    """The activations' composed clamp [lo, hi] (float), quantized like QuantizeLinear."""
    lo, hi = -math.inf, math.inf
    for act in activations:
        if act.op_type == "Relu":
            a, b = 0.0, math.inf
        else:   # Clip: inputs since opset 11, attributes before
            if graph.opset(act.domain) >= 11:
                low, high = _optional(param, act, 1), _optional(param, act, 2)
                a = -math.inf if low is None else float(low.reshape(()))
                b = math.inf if high is None else float(high.reshape(()))
            else:
                a = float(act.attrs.get("min", -3.4028234663852886e38))
                b = float(act.attrs.get("max", 3.4028234663852886e38))
        # clamp(clamp(y, lo, hi), a, b) == clamp(y, clamp(lo, a, b), clamp(hi, a, b))
        lo, hi = min(max(lo, a), b), min(max(hi, a), b)

    def q(v: float) -> int | None:
        if math.isinf(v):
            return None
        return int(quantize(np.array([v], np.float32), y_scale.reshape(()), y_zp, out_dtype)[0])
    return q(lo), q(hi)
