"""Exact clean-ups of quantized (QDQ) graphs.

A Relu whose output only feeds QuantizeLinear ops with zero point = the type's minimum (uint8 0,
int8 -128) does nothing: QuantizeLinear computes saturate(round(x / s) + zp), and for x < 0 that
is at most zp, which saturates to zp, the same as for Relu's 0. O3 gives post-Relu tensors such
zero points (their calibrated range starts at 0). Dropping the Relu is bit-exact, and it matters
to onnxruntime: its QDQ fusions want DequantizeLinear -> op -> QuantizeLinear with nothing in
between, so a residual Add followed by Relu then runs as one QLinearAdd instead of
DequantizeLinear x2, a float Add, a float Relu and QuantizeLinear.
"""

from __future__ import annotations

import numpy as np

from graphopt.ir import Graph, Op
from graphopt.pass_manager import Pass, PassContext, PassResult
from graphopt.passes.fusion_common import constant, is_onnx

#: Lowest value of each integer type QuantizeLinear may produce (onnx element type -> minimum).
_QMIN = {2: 0, 3: -128, 4: 0, 5: -32768}    # uint8, int8, uint16, int16


def _clamps_at_zero(graph: Graph, quantize: Op) -> bool:
    """Whether this QuantizeLinear maps every x <= 0 to the same code as 0 (zero point =
    the output type's minimum)."""
    if len(quantize.inputs) < 3 or not quantize.inputs[2]:
        return "output_dtype" not in quantize.attrs    # default: uint8 with zero point 0
    zero_point = constant(graph, quantize.inputs[2])
    dtype = graph.values[quantize.inputs[2]].dtype
    if zero_point is None or dtype not in _QMIN:
        return False
    return bool(np.all(np.asarray(zero_point) == _QMIN[dtype]))


class DropReluBeforeQuantize(Pass):
    """Relu -> QuantizeLinear(zero point = minimum) becomes QuantizeLinear (module docstring)."""

    name = "drop_relu_before_quantize"

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        result = PassResult()
        for op in list(graph.ops.values()):
            if not is_onnx(op, "Relu") or op.graph is not graph or len(op.outputs) != 1:
                continue
            y = op.outputs[0]
            readers = graph.consumers(y, implicit=True)
            if not readers or graph.is_output(y) or not all(
                    slot == 0 and is_onnx(reader, "QuantizeLinear")
                    and _clamps_at_zero(graph, reader) for reader, slot in readers):
                continue
            for reader, _ in readers:
                graph.set_input(reader, 0, op.inputs[0])
            graph.remove_op(op)
            result.count("relus_dropped")
        return result
