"""One-node models for kernel tests: build with onnx.helper, run a graphopt kernel straight from
the registry (no Session in between), and run onnxruntime as the oracle.

    model = one_node("Conv", {"x": x, "w": w}, {"kernel_shape": [3, 3]}, consts={"w"})
    got = run_kernel(model, {"x": x})
    want = run_ort(model, {"x": x})

Inputs named in `consts` become initializers (the kernel sees them at build time, as weights);
the others are graph inputs fed at run time. An input given as None is an omitted optional slot.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

import graphopt
import graphopt.runtime.kernels  # noqa: F401  (registers every kernel)
from graphopt.runtime.kernels import registry
from graphopt.runtime.kernels.registry import KernelNode


def one_node(op_type: str, inputs: Mapping[str, np.ndarray | None], attrs: Mapping | None = None,
             *, consts: Sequence[str] = (), n_outputs: int = 1, opset: int = 21,
             domain: str = "", output_names: Sequence[str] | None = None,
             meta: Mapping[str, str] | None = None) -> onnx.ModelProto:
    """A model with one node; output types are left to onnx shape inference (or onnxruntime)."""
    inputs = {k: (None if v is None else np.asarray(v)) for k, v in inputs.items()}
    names = [name if value is not None else "" for name, value in inputs.items()]
    outs = list(output_names) if output_names is not None else [f"y{i}" for i in range(n_outputs)]
    node = helper.make_node(op_type, names, outs, domain=domain or None, **dict(attrs or {}))
    for key, value in (meta or {}).items():
        entry = node.metadata_props.add()
        entry.key, entry.value = key, value
    graph_inputs, initializers = [], []
    for name, value in inputs.items():
        if value is None:
            continue
        if name in consts:
            initializers.append(numpy_helper.from_array(np.asarray(value), name))
        else:
            elem = helper.np_dtype_to_tensor_dtype(np.asarray(value).dtype)
            graph_inputs.append(helper.make_tensor_value_info(name, elem, np.shape(value)))
    graph_outputs = [helper.make_tensor_value_info(o, onnx.TensorProto.UNDEFINED, None)
                     for o in outs if o]
    graph = helper.make_graph([node], "one_node", graph_inputs, graph_outputs, initializers)
    opsets = [helper.make_opsetid("", opset)]
    if domain:
        opsets.append(helper.make_opsetid(domain, 1))
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = min(model.ir_version, 10)
    try:
        model = onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - inference is a convenience for onnxruntime here
        pass
    return _fill_output_types(model)


def _fill_output_types(model: onnx.ModelProto) -> onnx.ModelProto:
    """onnxruntime refuses UNDEFINED output types: take them from inferred value_info."""
    inferred = {vi.name: vi for vi in model.graph.value_info}
    for out in model.graph.output:
        if out.type.tensor_type.elem_type == onnx.TensorProto.UNDEFINED and out.name in inferred:
            out.CopyFrom(inferred[out.name])
    return model


def build_kernel(model: onnx.ModelProto):
    """(kernel closure, op, graph) of the model's single node, built as a Session would."""
    graph = graphopt.load(model)
    (op,) = graph.ops.values()
    opset = graph.opset(op.domain)
    factory = registry.lookup(op.op_type, op.domain, opset)
    consts = [_readonly(graph.const_value(n)) if n else None for n in op.inputs]
    fn = factory(KernelNode(op=op, graph=graph, opset=opset, consts=consts))
    return fn, op, graph


def _readonly(array):
    if isinstance(array, np.ndarray):
        array = array.view()
        array.flags.writeable = False
    return array


def run_kernel(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    """Outputs of the graphopt kernel for the model's single node."""
    fn, op, graph = build_kernel(model)
    args = []
    for name in op.inputs:
        if not name:
            args.append(None)
        elif name in feeds:
            args.append(_readonly(np.asarray(feeds[name])))
        else:
            args.append(_readonly(graph.const_value(name)))
    while args and args[-1] is None:
        args.pop()
    with np.errstate(all="ignore"):
        return [np.asarray(v) for v in fn(*args)]


def run_ort(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, {k: np.asarray(v) for k, v in feeds.items()})


def rel_l2(got: np.ndarray, want: np.ndarray) -> float:
    got = np.asarray(got, np.float64)
    want = np.asarray(want, np.float64)
    denom = np.linalg.norm(want)
    return float(np.linalg.norm(got - want) / (denom if denom else 1.0))
