"""Outlier-aware weight split for 16-bit accumulation (contract item 7 in passes/quantize.py).

acc16 is safe pair by pair only while |w_q| <= T = 64 (2 * 255 * 64 = 32640 fits int16). A
layer whose few large weights break that can still run acc16 on the rest:

    W_q = W_small + W_outlier      W_small: |w| <= 64 (dense), W_outlier: the others (sparse)
    Y   = Op(DQ(x), DQ(W_small), DQ(bias)) + Op(DQ(x), DQ(W_outlier))

both int8 with the same per-channel scales, so the sum is exactly the unsplit product. The Add
sits before the group's output QuantizeLinear and before a fused Relu/Clip (the activation must
see the sum). W_outlier is sparse data (Value.sparse_proto), stored in the file as the
sparse_value of a Constant node rather than as a sparse_initializer: a Constant's output is a
dense tensor, which DequantizeLinear's type constraint accepts, so the model passes onnx's full
check. onnxruntime densifies it at load; the graphopt runtime runs it as a sparse int32 product
(runtime/kernels/sparse_int8.py). The outlier op carries `graphopt.kernel=int8_acc32` and
`graphopt.outlier_of=<main op>`; the bias stays on the main op.

Which ops are split: on a target without VNNI, every int8 op with weights beyond T. Quantize
gave such ops 8 bits only where at most 5% of their weights lie beyond T (the others got 7-bit
weights, |w_q| <= 64, and need no split), and a pre-VNNI int8 kernel, acc16 or acc32 alike,
sums u8*s8 pairs in 16 bits (vpmaddubsw): unsplit, those few large weights would saturate it
(onnxruntime's AVX2 kernels do). On VNNI targets nothing is split (vpdpbusd accumulates in 32
bits). The main op gets its kernel here from kernel_select.choose_kernel (the same decision
KernelSelect takes, on the dense part plus the sparse product's cost), so the graph is
consistent even when kernel_select is disabled.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from graphopt.ir import Graph, Op
from graphopt.onnx_io import sparse_constant_node
from graphopt.pass_manager import Pass, PassContext, PassResult
from graphopt.passes.fusion_common import set_input
from graphopt.passes.fusion_epilogue import EPILOGUE_META, FUSE_META
from graphopt.passes.kernel_select import (ACC32, KERNEL_OPS, OUTLIER_THRESHOLD, VNNI_ISAS,
                                           choose_kernel, cost_context,
                                           int8_ops, int8_weight, outlier_ops,
                                           resolve_machine, split_weights)
from graphopt.passes.quantize import (META_KERNEL, META_OUTLIER_OF, META_QUANT,
                                      META_REASON, QuantizationPass, detach_producer,
                                      quantization_state)

T = onnx.TensorProto


def sparse_tensor(name: str, dense: np.ndarray) -> onnx.SparseTensorProto:
    """COO SparseTensorProto of `dense` with linearized (sorted) int64 indices."""
    flat = np.flatnonzero(dense)
    values = numpy_helper.from_array(np.ascontiguousarray(dense.reshape(-1)[flat]), name)
    indices = numpy_helper.from_array(flat.astype(np.int64), f"{name}_indices")
    return helper.make_sparse_tensor(values, indices, list(dense.shape))


class OutlierSplit(QuantizationPass):
    """Splits the weights of int8 ops with values beyond T into a dense small part and a sparse
    outlier op on targets without VNNI (module docstring). Options (ctx): `machine` or
    `target`, `shapes`."""

    # Exact in integer math; onnxruntime runs the two float convs + Add instead of one
    # QLinearConv, which can move a rounding step.
    name = "outlier_split"

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        result = PassResult()
        if graph.parent is not None:
            return result
        candidates = []
        already = outlier_ops(graph)
        for op in int8_ops(graph):
            if op.op_type not in KERNEL_OPS or not op.name or op.name in already:
                continue
            w_q = int8_weight(graph, op)
            if w_q is None:
                continue
            w_small, w_out = split_weights(w_q)
            outliers = int(np.count_nonzero(w_out))
            if outliers:
                candidates.append((op, w_small, w_out, outliers))
        if not candidates:
            return result
        machine = resolve_machine(ctx)
        if machine.isa in VNNI_ISAS:
            return result
        costs = cost_context(graph, ctx, [c[0] for c in candidates])
        samples = quantization_state(ctx).samples
        for op, w_small, w_out, outliers in candidates:
            decision = choose_kernel(graph, op, machine, costs, w_small, outliers,
                                     samples.get(op.name))
            split_op(graph, op, w_small, w_out)
            decision.mark(op)
            result.count("ops_split")
            result.count("outlier_weights", outliers)
            result.count("weights_of_split_ops", w_small.size)
        return result


def split_op(graph: Graph, op: Op, w_small: np.ndarray, w_out: np.ndarray) -> Op:
    """Rewrite `op` (reading DQ(W_q)) into op(DQ(W_small)) + outlier op(DQ(W_outlier)) before
    its activation and output Q; returns the outlier op."""
    w_dq = graph.producer_op(op.inputs[1])
    assert w_dq is not None
    w_name = w_dq.inputs[0]
    small = graph.add_const(w_small, f"{w_name}_small").name
    if len(graph.consumers(op.inputs[1], implicit=True)) == 1:
        set_input(graph, w_dq, 0, small)          # the DQ is this op's alone: reuse it
    else:
        dq_out = graph.add_value(graph.fresh_name(f"{w_name}_small_dequantized"), T.FLOAT,
                                 graph.values[op.inputs[1]].shape).name
        graph.add_op("DequantizeLinear", [small, *w_dq.inputs[1:]], [dq_out], dict(w_dq.attrs),
                     name=f"{w_name}_small_dequantize")
        graph.set_input(op, 1, dq_out)

    out_name = graph.fresh_name(f"{w_name}_outliers")
    out_value = graph.add_value(out_name, T.INT8, tuple(int(d) for d in w_out.shape))
    out_value.sparse_proto = sparse_tensor(out_name, w_out)
    out_value.sparse_node = sparse_constant_node(out_name)   # a strictly typed, valid file
    out_dq = graph.add_value(graph.fresh_name(f"{w_name}_outliers_dequantized"), T.FLOAT,
                             graph.values[op.inputs[1]].shape).name
    graph.add_op("DequantizeLinear", [out_name, *w_dq.inputs[1:]], [out_dq], dict(w_dq.attrs),
                 name=f"{w_name}_outliers_dequantize")

    y = op.outputs[0]
    y_value = graph.values[y]
    y_main = detach_producer(graph, y, f"{y}_main")
    y_out = graph.add_value(graph.fresh_name(f"{y}_outliers"), y_value.dtype, y_value.shape).name
    outlier = graph.add_op(op.op_type, [op.inputs[0], out_dq], [y_out], dict(op.attrs),
                           name=f"{op.name}_outliers")
    outlier.attr_types = dict(op.attr_types)
    outlier.meta.update({META_QUANT: "int8", META_KERNEL: ACC32, META_OUTLIER_OF: op.name,
                         META_REASON: f"outlier part of {op.name}: {np.count_nonzero(w_out)} "
                                      f"weights with |w_q| > {OUTLIER_THRESHOLD} "
                                      f"({np.count_nonzero(w_out) / w_out.size:.2%}), sparse, "
                                      "32-bit accumulation"})
    graph.add_op("Add", [y_main, y_out], [y], name=f"{op.name}_outlier_add")
    # The chain behind the op changed (Add before the activation): FuseEpilogues re-marks it.
    op.meta.pop(EPILOGUE_META, None)
    for reader, _ in graph.consumers(y):
        reader.meta.pop(FUSE_META, None)
    return outlier


PASSES: list[type[Pass]] = [OutlierSplit]
