"""QDQ groups: the patterns of a quantized model the session runs as one int8 step.

The quantization passes write standard QDQ ONNX (the contract, README "Quantization"):

    x_q -> DequantizeLinear(x_scale, x_zp)  ---------------+
    W_q -> DequantizeLinear(w_scale[C], axis) -------------+-> Conv / Gemm / MatMul
    b_q -> DequantizeLinear(x_scale * w_scale) (optional) -+        |
                                  [Add(outlier op) ] [Relu / Clip ...]
                                                            -> QuantizeLinear(y_scale, y_zp) -> y_q

onnxruntime fuses that into QLinearConv / QLinearMatMul / QGemm; the session, likewise, runs it
as one step (runtime/kernels/qdq.py): the integer product of x_q and W_q with the accumulation
the compute op's meta names (`graphopt.kernel`), the int32 bias, the activation clamps in the
quantized domain, and the requantization to y_q. The float tensors in between never exist.

The outlier split (contract item 7) is part of the pattern: `Add(main op, outlier op)` before
the activations, where the outlier op has meta `graphopt.outlier_of=<main op name>`, the same
attributes, the same quantized input and weights with the same per-channel scales (typically a
sparse constant); its int32 product is added to the main op's accumulator.

`find_groups` only recognizes what is exact and safe to fuse:
- every parameter (scales, zero points, weights, bias) is a constant; activations and outputs
  are per-tensor, 8-bit; weights 8-bit, per-tensor or per output channel on the output axis
  (Conv: 0; Gemm: 0 with transB, else 1; MatMul with 2-D weights: 1); the bias int32 with
  scale x_scale * w_scale and zero point 0; Gemm without transA, alpha = beta = 1;
- every float intermediate the step skips (the compute op's output, the outlier's and the Add's,
  each activation's) has exactly one reader, the next op of the pattern, and is not a graph
  output. The session further leaves a group unfused in a plan that requests one of them.
The DequantizeLinear ops are inputs of the pattern, not part of it: one shared by other readers
keeps running for them (the contract shares one Q/DQ pair among a tensor's quantized readers).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx

from graphopt.ir import Graph, Op, onnx_to_np_dtype

KERNEL_META = "graphopt.kernel"
OUTLIER_META = "graphopt.outlier_of"
ACC16 = "int8_acc16"
ACC32 = "int8_acc32"

COMPUTE_OPS = frozenset({"Conv", "Gemm", "MatMul"})
ACTIVATION_OPS = frozenset({"Relu", "Clip"})
_EIGHT_BIT = (onnx.TensorProto.UINT8, onnx.TensorProto.INT8)


@dataclass
class QdqGroup:
    """One recognized pattern; `op` is the compute op, whose name and type the step carries."""

    op: Op
    x_dq: Op
    w_dq: Op
    b_dq: Op | None
    q: Op
    activations: tuple[Op, ...] = ()
    add: Op | None = None
    outlier: Op | None = None
    outlier_w_dq: Op | None = None
    accumulation: str = ACC32
    #: Filled by the kernel builder: how the outlier product runs ("sparse" or "dense").
    outlier_mode: str | None = None

    @property
    def members(self) -> tuple[Op, ...]:
        """The ops the step replaces (their outputs, but the last, are never computed)."""
        ops = [self.op]
        if self.outlier is not None:
            ops += [self.outlier, self.add]
        return tuple(ops) + self.activations + (self.q,)

    @property
    def internal(self) -> tuple[str, ...]:
        """Float values the fused step skips."""
        return tuple(op.outputs[0] for op in self.members[:-1])

    @property
    def input(self) -> str:
        return self.x_dq.inputs[0]

    @property
    def output(self) -> str:
        return self.q.outputs[0]

    @property
    def weight_dqs(self) -> tuple[Op, ...]:
        """The DequantizeLinear ops of constants (weights, bias) the step reads raw."""
        return tuple(op for op in (self.w_dq, self.b_dq, self.outlier_w_dq) if op is not None)


@dataclass(frozen=True)
class Int8Step:
    """A QDQ group as a plan ran it (`Session.int8_steps`): the compute op's label and type,
    the accumulation of its product, the labels of the other ops it absorbed (outlier op, Add,
    activations, QuantizeLinear), how the outlier product ran, and for acc16 the number of
    output channels the 16-bit model emulates (0: the weights prove it cannot saturate, so
    the exact product is the result)."""

    op: str
    op_type: str
    accumulation: str
    absorbed: tuple[str, ...] = ()
    outlier: str | None = None
    acc16_emulated: int = 0
    extra: dict = field(default_factory=dict, compare=False)


ConstFn = Callable[[str], "np.ndarray | None"]


class _NoMatch(Exception):
    pass


def find_groups(graph: Graph, const: ConstFn, is_const: Callable[[str], bool]) -> list[QdqGroup]:
    """Every QDQ group of the graph (see the module doc). `const(name)` returns a constant's
    array (None if it is not constant); `is_const(name)` says whether a weight is constant
    without decoding it (sparse or memory-mapped initializers)."""
    matcher = _Matcher(graph, const, is_const)
    groups = []
    claimed: set[int] = set()
    for op in graph.topological_ops():
        if op.op_type != "QuantizeLinear" or op.domain not in ("", "ai.onnx"):
            continue
        try:
            group = matcher.match(op)
        except _NoMatch:
            continue
        ids = {m.id for m in group.members}
        if ids & claimed:
            continue
        claimed |= ids
        groups.append(group)
    return groups


class _Matcher:
    def __init__(self, graph: Graph, const: ConstFn, is_const: Callable[[str], bool]) -> None:
        self.graph = graph
        self.const = const
        self.is_const = is_const

    # -- helpers ---------------------------------------------------------------------------------
    def _require(self, ok: bool) -> None:
        if not ok:
            raise _NoMatch

    def _producer(self, name: str, types: frozenset[str] | set[str]) -> Op:
        self._require(bool(name) and name in self.graph.values)
        op = self.graph.producer_op(name)
        self._require(op is not None and op.op_type in types and op.domain in ("", "ai.onnx"))
        return op

    def _sole_reader(self, name: str, reader: Op) -> None:
        """`name` is read once, by `reader`, and is no graph output."""
        readers = self.graph.consumers(name, implicit=True)
        self._require(len(readers) == 1 and readers[0][0] is reader
                      and not self.graph.is_output(name) and reader.inputs.count(name) == 1)

    def _param(self, op: Op, slot: int) -> np.ndarray | None:
        """A constant input (None when omitted); no match when present but not constant."""
        name = op.inputs[slot] if slot < len(op.inputs) else ""
        if not name:
            return None
        array = self.const(name)
        self._require(array is not None)
        return array

    def _dtype(self, name: str) -> int:
        value = self.graph.values.get(name)
        return value.dtype if value is not None else 0

    # -- Q / DQ --------------------------------------------------------------------------------
    def _output_q(self, q: Op) -> None:
        scale = self._param(q, 1)
        zp = self._param(q, 2)
        self._require(scale is not None and scale.size == 1 and scale.dtype == np.float32)
        self._require(not q.attrs.get("block_size"))
        out_type = int(q.attrs.get("output_dtype", 0) or 0)
        if zp is not None:
            self._require(zp.size == 1 and zp.dtype in (np.uint8, np.int8))
            self._require(not out_type or onnx_to_np_dtype(out_type) == zp.dtype)
        else:
            self._require(not out_type or out_type in _EIGHT_BIT)

    def _activation_dq(self, dq: Op) -> tuple[np.ndarray, np.ndarray | None]:
        scale = self._param(dq, 1)
        zp = self._param(dq, 2)
        self._require(scale is not None and scale.size == 1 and scale.dtype == np.float32)
        self._require(not dq.attrs.get("block_size"))
        if zp is not None:
            self._require(zp.size == 1 and zp.dtype in (np.uint8, np.int8))
        else:
            self._require(self._dtype(dq.inputs[0]) in _EIGHT_BIT)
        return scale, zp

    def _weight_dq(self, dq: Op, out_axis: int, n_out: int, rank: int) -> np.ndarray:
        """Checks a weight DequantizeLinear; returns its scale."""
        self._require(self.is_const(dq.inputs[0]) and self._dtype(dq.inputs[0]) in _EIGHT_BIT)
        self._require(not dq.attrs.get("block_size"))
        scale = self._param(dq, 1)
        zp = self._param(dq, 2)
        self._require(scale is not None and scale.dtype == np.float32)
        if scale.size != 1:
            axis = int(dq.attrs.get("axis", 1))
            axis = axis + rank if axis < 0 else axis
            self._require(scale.ndim == 1 and scale.size == n_out and axis == out_axis)
        if zp is not None:
            self._require(zp.size == scale.size and zp.dtype in (np.uint8, np.int8))
        return scale

    # -- compute ops ---------------------------------------------------------------------------
    def _compute(self, op: Op) -> tuple[Op, Op, Op | None, np.ndarray]:
        """(x DQ, w DQ, bias DQ, w_scale) of a compute op reading quantized operands."""
        graph = self.graph
        self._require(len(op.outputs) == 1 and bool(op.outputs[0]))
        x_dq = self._producer(op.inputs[0], {"DequantizeLinear"})
        w_dq = self._producer(op.inputs[1] if len(op.inputs) > 1 else "", {"DequantizeLinear"})
        w_value = graph.values[w_dq.inputs[0]]
        w_shape = w_value.shape
        self._require(w_shape is not None and all(isinstance(d, int) for d in w_shape))
        rank = len(w_shape)
        if op.op_type == "Conv":
            self._require(rank >= 3)
            out_axis = 0
        elif op.op_type == "Gemm":
            self._require(rank == 2 and not op.attrs.get("transA", 0)
                          and float(op.attrs.get("alpha", 1.0)) == 1.0)
            out_axis = 0 if op.attrs.get("transB", 0) else 1
        else:   # MatMul
            self._require(rank == 2)
            out_axis = 1
        n_out = int(w_shape[out_axis])
        x_scale, _ = self._activation_dq(x_dq)
        w_scale = self._weight_dq(w_dq, out_axis, n_out, rank)
        b_dq = None
        bias_name = op.inputs[2] if op.op_type != "MatMul" and len(op.inputs) > 2 else ""
        if bias_name:
            if op.op_type == "Gemm":
                self._require(float(op.attrs.get("beta", 1.0)) == 1.0)
            b_dq = self._producer(bias_name, {"DequantizeLinear"})
            self._bias_dq(b_dq, x_scale, w_scale, n_out)
        return x_dq, w_dq, b_dq, w_scale

    def _bias_dq(self, b_dq: Op, x_scale: np.ndarray, w_scale: np.ndarray, n_out: int) -> None:
        b_q = self.const(b_dq.inputs[0])
        scale = self._param(b_dq, 1)
        zp = self._param(b_dq, 2)
        self._require(b_q is not None and b_q.dtype == np.int32 and b_q.size == n_out)
        self._require(b_q.ndim == 1 or (b_q.ndim == 2 and b_q.shape[0] == 1))
        self._require(scale is not None and scale.dtype == np.float32
                      and scale.size in (1, n_out) and (zp is None or not np.any(zp)))
        expected = np.float32(x_scale.reshape(())) * w_scale.reshape(-1)
        self._require(bool(np.allclose(scale.reshape(-1), expected, rtol=1e-5, atol=0)))

    # -- the pattern ---------------------------------------------------------------------------
    def match(self, q: Op) -> QdqGroup:
        self._output_q(q)
        name = q.inputs[0]
        reader = q
        activations: list[Op] = []
        while True:
            self._sole_reader(name, reader)
            producer = self._producer(name, COMPUTE_OPS | ACTIVATION_OPS | {"Add"})
            if producer.op_type not in ACTIVATION_OPS:
                break
            self._activation(producer)
            activations.insert(0, producer)
            reader, name = producer, producer.inputs[0]
        if producer.op_type == "Add":
            return self._outlier_group(producer, q, tuple(activations))
        x_dq, w_dq, b_dq, _ = self._compute(producer)
        return QdqGroup(producer, x_dq, w_dq, b_dq, q, tuple(activations),
                        accumulation=_accumulation(producer))

    def _activation(self, op: Op) -> None:
        self._require(len(op.outputs) == 1)
        if op.op_type == "Clip":
            for slot in (1, 2):
                bound = self._param(op, slot)
                self._require(bound is None or bound.size == 1)

    def _outlier_group(self, add: Op, q: Op, activations: tuple[Op, ...]) -> QdqGroup:
        self._require(len(add.inputs) == 2 and add.inputs[0] != add.inputs[1])
        first, second = (self._producer(n, COMPUTE_OPS) for n in add.inputs)
        if second.meta.get(OUTLIER_META) == first.name and first.name:
            main, outlier = first, second
        elif first.meta.get(OUTLIER_META) == second.name and second.name:
            main, outlier = second, first
        else:
            raise _NoMatch
        self._require(OUTLIER_META not in main.meta)
        self._require(outlier.meta.get(KERNEL_META, ACC32) == ACC32)
        self._require(main.op_type == outlier.op_type and main.attrs == outlier.attrs)
        self._sole_reader(main.outputs[0], add)
        self._sole_reader(outlier.outputs[0], add)
        x_dq, w_dq, b_dq, w_scale = self._compute(main)
        o_x_dq, o_w_dq, o_b_dq, o_scale = self._compute(outlier)
        self._require(o_b_dq is None and o_x_dq.inputs[0] == x_dq.inputs[0])
        if o_x_dq is not x_dq:
            self._require(_same(self._param(o_x_dq, 1), self._param(x_dq, 1))
                          and _same(self._param(o_x_dq, 2), self._param(x_dq, 2)))
        self._require(_same(o_scale, w_scale))
        o_zp = self._param(o_w_dq, 2)
        self._require(o_zp is None or not np.any(o_zp))
        self._require(self.graph.values[o_w_dq.inputs[0]].shape
                      == self.graph.values[w_dq.inputs[0]].shape)
        return QdqGroup(main, x_dq, w_dq, b_dq, q, activations, add=add, outlier=outlier,
                        outlier_w_dq=o_w_dq, accumulation=_accumulation(main))


def _accumulation(op: Op) -> str:
    return ACC16 if op.meta.get(KERNEL_META) == ACC16 else ACC32


def _same(a: np.ndarray | None, b: np.ndarray | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return a.dtype == b.dtype and a.size == b.size \
        and bool(np.array_equal(a.reshape(-1), b.reshape(-1)))
