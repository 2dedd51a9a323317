"""onnx.backend adapter over the graphopt Session, so onnx's own backend test suite runs:

    import onnx.backend.test
    import graphopt.runtime.backend as backend
    globals().update(onnx.backend.test.BackendTest(backend, __name__).test_cases)

Inputs given as a list are matched in order to the graph inputs that need a feed (those without
an initializer default), or to all graph inputs when the list is that long.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnx
from onnx.backend.base import Backend, BackendRep

from graphopt.runtime.session import Session

#: The op set of issue 3 whose node tests the default (non-slow) conformance run must cover and
#: whose pass count is compared with onnxruntime's (tests/test_runtime_conformance.py,
#: benchmarks/conformance_counts.py).
CORE_OPS = frozenset("""
Abs Add And ArgMax AveragePool BatchNormalization Cast Clip Concat Constant ConstantOfShape Conv
ConvInteger ConvTranspose DequantizeLinear Div Dropout DynamicQuantizeLinear Einsum Equal Erf Exp
Expand Flatten Gather Gelu Gemm GlobalAveragePool Greater HardSigmoid HardSwish Identity If
LayerNormalization LeakyRelu Less Log MatMul MatMulInteger Max MaxPool Min Mul Neg Not Pad Pow
QLinearConv QLinearMatMul QuantizeLinear Range Reciprocal ReduceMax ReduceMean ReduceSum Relu
Reshape Resize Shape Sigmoid Slice Softmax Split Sqrt Squeeze Sub Sum Tanh Tile Transpose Unsqueeze
Where""".split())


class GraphoptRep(BackendRep):
    """A prepared model: runs a Session and returns outputs in graph output order."""

    def __init__(self, session: Session) -> None:
        self.session = session

    def run(self, inputs: Any, **kwargs: Any) -> list[Any]:
        session = self.session
        if isinstance(inputs, Mapping):
            feeds = dict(inputs)
        else:
            values = list(inputs) if isinstance(inputs, (list, tuple)) else [inputs]
            names = [spec.name for spec in session.inputs if not spec.has_default]
            if len(values) == len(session.inputs) and len(values) != len(names):
                names = [spec.name for spec in session.inputs]
            feeds = dict(zip(names, values))
        outputs = session.run(feeds)
        return [outputs[name] for name in session.outputs]


class GraphoptBackend(Backend):
    """onnx.backend.base.Backend over graphopt's runtime (CPU only)."""

    @classmethod
    def prepare(cls, model: onnx.ModelProto, device: str = "CPU", **kwargs: Any) -> GraphoptRep:
        return GraphoptRep(Session(model))

    @classmethod
    def run_model(cls, model: onnx.ModelProto, inputs: Any, device: str = "CPU",
                  **kwargs: Any) -> list[Any]:
        return cls.prepare(model, device, **kwargs).run(inputs)

    @classmethod
    def run_node(cls, node: onnx.NodeProto, inputs: Any, device: str = "CPU",
                 outputs_info: Sequence[tuple[np.dtype, tuple[int, ...]]] | None = None,
                 **kwargs: Any) -> list[Any]:
        """Run one node on the given inputs (a list in node input order, or a dict)."""
        if isinstance(inputs, Mapping):
            feeds = dict(inputs)
        else:
            feeds = {name: value for name, value in zip([n for n in node.input if n], inputs)}
        graph_inputs = [onnx.helper.make_tensor_value_info(
            name, onnx.helper.np_dtype_to_tensor_dtype(np.asarray(value).dtype), np.shape(value))
            for name, value in feeds.items()]
        graph_outputs = [onnx.helper.make_empty_tensor_value_info(name) for name in node.output if name]
        graph = onnx.helper.make_graph([node], "run_node", graph_inputs, graph_outputs)
        opset = kwargs.get("opset_version", onnx.defs.onnx_opset_version())
        model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid(node.domain, opset)])
        return cls.prepare(model, device).run({k: np.asarray(v) for k, v in feeds.items()})

    @classmethod
    def supports_device(cls, device: str) -> bool:
        return device.upper().split(":")[0] == "CPU"


is_compatible = GraphoptBackend.is_compatible
prepare = GraphoptBackend.prepare
run_model = GraphoptBackend.run_model
run_node = GraphoptBackend.run_node
supports_device = GraphoptBackend.supports_device
