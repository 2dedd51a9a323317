"""Shared test helpers: tiny models from nodes, onnxruntime as the oracle, and the CLI in-process."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

import graphopt

ort.set_default_logger_severity(3)


def make_model(nodes, inputs, outputs, initializers=(), opset: int = 17, value_info=(),
               ir_version: int = 8, domains: dict[str, int] | None = None) -> onnx.ModelProto:
    """A model from nodes; inputs/outputs are (name, shape) for float32 or ValueInfoProtos."""
    def vi(item):
        if isinstance(item, onnx.ValueInfoProto):
            return item
        name, shape = item[0], item[1]
        dtype = item[2] if len(item) > 2 else TensorProto.FLOAT
        return helper.make_tensor_value_info(name, dtype, shape)
    inits = [i if isinstance(i, onnx.TensorProto) else onnx.numpy_helper.from_array(i[1], i[0])
             for i in initializers]
    graph = helper.make_graph(list(nodes), "test", [vi(i) for i in inputs],
                              [vi(o) for o in outputs], inits, value_info=list(value_info))
    opsets = [helper.make_opsetid("", opset)] + [helper.make_opsetid(d, v)
                                                 for d, v in (domains or {}).items()]
    return helper.make_model(graph, opset_imports=opsets, ir_version=ir_version)


def run_ort(model: onnx.ModelProto | graphopt.Graph, feeds: dict[str, np.ndarray],
            optimized: bool = True) -> list[np.ndarray]:
    """onnxruntime's outputs; optimized=False turns its graph optimizations off, so QDQ groups
    run as written (DequantizeLinear, float op, QuantizeLinear) instead of its int8 kernels."""
    if isinstance(model, graphopt.Graph):
        model = graphopt.to_model(model)
    options = ort.SessionOptions()
    if not optimized:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), options,
                                providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def rel_l2(actual: np.ndarray, expected: np.ndarray) -> float:
    """||actual - expected|| / ||expected||, in float64."""
    a, e = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(np.linalg.norm(a - e) / np.linalg.norm(e))


def random_feeds(model: onnx.ModelProto, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    init = {t.name for t in model.graph.initializer}
    feeds = {}
    for i in model.graph.input:
        if i.name in init:
            continue
        shape = [d.dim_value if d.dim_value > 0 else 2 for d in i.type.tensor_type.shape.dim]
        dtype = helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type)
        feeds[i.name] = rng.standard_normal(shape).astype(dtype)
    return feeds


def optimize_and_compare(model: onnx.ModelProto, level: str = "O1", feeds=None, rtol=1e-5,
                         atol=1e-6, **kwargs):
    """Optimize a copy of `model`, check the result with onnx's checker and that onnxruntime
    gives the same outputs before and after. Returns (optimized graph, report)."""
    feeds = feeds if feeds is not None else random_feeds(model)
    before = run_ort(model, feeds)
    graph = graphopt.load(model)
    report = graphopt.optimize(graph, level, verify="structural", **kwargs)
    out = graphopt.to_model(graph)
    onnx.checker.check_model(out, full_check=True)
    after = run_ort(out, feeds)
    assert len(before) == len(after)
    for b, a in zip(before, after):
        assert b.shape == a.shape
        np.testing.assert_allclose(a, b, rtol=rtol, atol=atol)
    return graph, report


def op_types(graph: graphopt.Graph) -> list[str]:
    return sorted(op.op_type for op in graph.ops.values())


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    """`graphopt ARGV...` in-process: (exit code, stdout, stderr)."""
    from graphopt.cli import main
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err
