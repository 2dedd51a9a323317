"""A small helper for writing ONNX graphs by hand the way PyTorch's exporter lays them out.

The builders in this package describe a network as a sequence of `GraphBuilder.op` calls inside
named scopes. Node and value names follow the exporter's convention (`/encoder/layer.0/MatMul`,
`/encoder/layer.0/MatMul_output_0`), small constants become `Constant` nodes and weights become
initializers, so graph passes meet the same shapes of graph they meet in exported models.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

OPSET = 17
IR_VERSION = 8  # onnxruntime accepts IR 8 with opset 17 everywhere we target
PRODUCER = "graphopt.models"

Dim = int | str | None


class GraphBuilder:
    """Collects nodes, initializers and graph inputs/outputs and turns them into a ModelProto."""

    def __init__(self, graph_name: str) -> None:
        self.graph_name = graph_name
        self.nodes: list[onnx.NodeProto] = []
        # Weights go straight into the final ModelProto: building a graph and then handing it to
        # make_model would copy every tensor twice, seconds for a few hundred MB.
        self._model = onnx.ModelProto()
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self._scopes: list[str] = []
        self._used_names: set[str] = set()

    # ----------------------------------------------------------------- naming
    @contextlib.contextmanager
    def scope(self, name: str) -> Iterator[None]:
        """Prefix node names created inside the block with `/name` (nested scopes join)."""
        self._scopes.append(name)
        try:
            yield
        finally:
            self._scopes.pop()

    def _unique(self, base: str) -> str:
        name, suffix = base, 0
        while name in self._used_names:
            suffix += 1
            name = f"{base}_{suffix}"
        self._used_names.add(name)
        return name

    def _node_name(self, op_type: str) -> str:
        prefix = "/" + "/".join(self._scopes) if self._scopes else ""
        return self._unique(f"{prefix}/{op_type}")

    # ----------------------------------------------------------------- graph I/O
    def input(self, name: str, elem_type: int, shape: Sequence[Dim]) -> str:
        self._used_names.add(name)
        self.inputs.append(helper.make_tensor_value_info(name, elem_type, list(shape)))
        return name

    def output(self, value: str, name: str, elem_type: int, shape: Sequence[Dim]) -> str:
        """Expose `value` as graph output `name`.

        Like an exporter, the producing node's output is renamed to `name` (an Identity is added
        only when that cannot be done: a graph input or a value already exposed).
        """
        producer = next((n for n in self.nodes if value in n.output), None)
        exposed = {o.name for o in self.outputs}
        if value != name and (producer is None or value in exposed):
            self._used_names.add(name)
            self.nodes.append(
                helper.make_node("Identity", [value], [name], name=self._node_name("Identity"))
            )
        elif value != name:
            self._used_names.add(name)
            _rename_value(self.nodes, value, name)
        self.outputs.append(helper.make_tensor_value_info(name, elem_type, list(shape)))
        return name

    # ----------------------------------------------------------------- tensors
    def weight(self, name: str, array: np.ndarray) -> str:
        """Add an initializer (a trained parameter), named like the framework's state dict."""
        name = self._unique(name)
        little_endian = array.astype(array.dtype.newbyteorder("<"), copy=False)
        tensor = self._model.graph.initializer.add()
        tensor.name = name
        tensor.data_type = helper.np_dtype_to_tensor_dtype(array.dtype)
        tensor.dims.extend(array.shape)
        tensor.raw_data = np.ascontiguousarray(little_endian).tobytes()
        return name

    def const(self, value: np.ndarray | float | int | Sequence[int]) -> str:
        """Emit a `Constant` node, as the exporter does for scalars and shape pieces."""
        array = np.asarray(value)
        if array.dtype == np.float64:
            array = array.astype(np.float32)
        node_name = self._node_name("Constant")
        out = self._unique(f"{node_name}_output_0")
        self.nodes.append(
            helper.make_node(
                "Constant", [], [out], name=node_name, value=numpy_helper.from_array(array)
            )
        )
        return out

    # ----------------------------------------------------------------- ops
    def op(self, op_type: str, inputs: Sequence[str], **attrs: object) -> str:
        """Add a single-output node and return its output name."""
        return self.op_multi(op_type, inputs, 1, **attrs)[0]

    def op_multi(
        self, op_type: str, inputs: Sequence[str], num_outputs: int, **attrs: object
    ) -> list[str]:
        """Add a node with several outputs (Split, ...) and return their names."""
        node_name = self._node_name(op_type)
        outs = [self._unique(f"{node_name}_output_{i}") for i in range(num_outputs)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=node_name, **attrs))
        return outs

    # ----------------------------------------------------------------- result
    def model(self, doc: str, metadata: dict[str, str] | None = None) -> onnx.ModelProto:
        """Finish the model (opset 17, IR 8). The builder must not be used afterwards."""
        model, self._model = self._model, onnx.ModelProto()
        model.ir_version = IR_VERSION
        model.opset_import.append(helper.make_opsetid("", OPSET))
        model.producer_name = PRODUCER
        model.producer_version = "0.1.0"
        model.doc_string = doc
        graph = model.graph
        graph.name = self.graph_name
        graph.doc_string = doc
        graph.node.extend(self.nodes)
        graph.input.extend(self.inputs)
        graph.output.extend(self.outputs)
        if metadata:
            helper.set_model_props(model, metadata)
        return model


def _rename_value(nodes: list[onnx.NodeProto], old: str, new: str) -> None:
    for node in nodes:
        for slots in (node.input, node.output):
            for i, name in enumerate(slots):
                if name == old:
                    slots[i] = new


# --------------------------------------------------------------------- reusable snippets
def linear(b: GraphBuilder, x: str, weight: str, bias: str | None) -> str:
    """`nn.Linear` on a tensor of rank > 2: MatMul with the transposed weight, then Add."""
    y = b.op("MatMul", [x, weight])
    return b.op("Add", [y, bias]) if bias else y


def gemm(b: GraphBuilder, x: str, weight: str, bias: str) -> str:
    """`nn.Linear` on a 2-D tensor: the exporter emits Gemm with transB=1 and [out, in] weights."""
    return b.op("Gemm", [x, weight, bias], alpha=1.0, beta=1.0, transB=1)


def model_metadata(model: onnx.ModelProto) -> dict[str, str]:
    return {p.key: p.value for p in model.metadata_props}


def weight_bytes(model: onnx.ModelProto) -> int:
    """Bytes of stored parameters: initializers (in memory or external) plus Constant-node
    tensors (paddle2onnx, for one, stores every weight as a Constant node)."""
    tensors = list(model.graph.initializer)
    tensors += [
        attr.t
        for node in model.graph.node
        if node.op_type == "Constant"
        for attr in node.attribute
        if attr.name == "value"
    ]
    total = 0
    for tensor in tensors:
        if tensor.raw_data:
            total += len(tensor.raw_data)
        else:  # typed fields or external data: the declared shape tells the size
            count = int(np.prod(tensor.dims)) if tensor.dims else 1
            total += count * np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize
    return total
