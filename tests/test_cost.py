"""FLOPs, bytes, op intensity and the GEMM view, exactly against hand-computed values."""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import graphopt
from graphopt.cost import (CONSTANT, DEPTHWISE, EMBEDDING, GEMM, GemmShape, analyze_model,
                           characterize, constant_values)

F = TensorProto.FLOAT
LIGHT = os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data", "light")


def _graph(nodes, inputs, outputs, weights=(), opset=17):
    """A graph from nodes; `inputs` and `outputs` are (name, elem_type, shape)."""
    inits = [numpy_helper.from_array(np.asarray(a), name) for name, a in weights]
    g = helper.make_graph(nodes, "t", [helper.make_tensor_value_info(*i) for i in inputs],
                          [helper.make_tensor_value_info(*o) for o in outputs], inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    return graphopt.load(model)


def _w(*shape):
    return np.zeros(shape, dtype=np.float32)


def _only(graph, op_type="Conv", **kw):
    costs = [c for c in analyze_model(graph, **kw).ops if c.op_type == op_type]
    assert len(costs) == 1
    return costs[0]


def test_plain_conv_with_bias():
    # x 1x3x8x8, w 4x3x3x3 -> y 1x4x6x6: 4*36 outputs, each 27 MACs, plus a bias add.
    g = _graph([helper.make_node("Conv", ["x", "w", "b"], ["y"])],
               [("x", F, [1, 3, 8, 8])], [("y", F, None)], [("w", _w(4, 3, 3, 3)), ("b", _w(4))])
    c = _only(g)
    assert c.gemm == GemmShape(M=36, N=4, K=27, groups=1)
    assert c.flops == 2 * 36 * 4 * 27 + 4 * 36 == 7920
    assert c.weight_bytes == (4 * 27 + 4) * 4 == 448
    assert c.input_bytes == 3 * 64 * 4 and c.output_bytes == 4 * 36 * 4
    assert c.activation_bytes == 768 + 576
    assert c.intensity_weights == pytest.approx(7920 / 448)
    assert c.intensity_total == pytest.approx(7920 / (448 + 1344))
    assert c.im2col_bytes == 36 * 27 * 4
    assert c.kind == GEMM and c.kernel == "fp32"


def test_strided_padded_conv():
    # x 2x8x10x10, w 16x8x3x3, stride 2, pad 1 -> H_out = (10 + 2 - 3) // 2 + 1 = 5.
    g = _graph([helper.make_node("Conv", ["x", "w"], ["y"], strides=[2, 2], pads=[1, 1, 1, 1])],
               [("x", F, [2, 8, 10, 10])], [("y", F, None)], [("w", _w(16, 8, 3, 3))])
    c = _only(g)
    assert c.gemm == GemmShape(M=2 * 5 * 5, N=16, K=8 * 9, groups=1)
    assert c.flops == 2 * 50 * 16 * 72 == 115200
    assert c.weight_bytes == 16 * 72 * 4
    assert c.activation_bytes == (2 * 8 * 100 + 2 * 16 * 25) * 4


def test_pointwise_conv_needs_no_im2col():
    g = _graph([helper.make_node("Conv", ["x", "w"], ["y"])],
               [("x", F, [1, 8, 4, 4])], [("y", F, None)], [("w", _w(6, 8, 1, 1))])
    c = _only(g)
    assert c.gemm == GemmShape(M=16, N=6, K=8) and c.im2col_bytes == 0


def test_grouped_conv():
    # 8 channels in 4 groups of 2, 12 out (3 per group), 3x3 same padding.
    g = _graph([helper.make_node("Conv", ["x", "w"], ["y"], group=4, pads=[1, 1, 1, 1])],
               [("x", F, [1, 8, 6, 6])], [("y", F, None)], [("w", _w(12, 2, 3, 3))])
    c = _only(g)
    assert c.gemm == GemmShape(M=36, N=3, K=18, groups=4)
    assert c.flops == 2 * 36 * 3 * 18 * 4 == 15552
    assert c.weight_bytes == 12 * 18 * 4
    assert c.kind == GEMM


def test_depthwise_conv():
    # 16 channels, one per group, 5x5 kernel, stride 2, pad 2: H_out = (12 + 4 - 5) // 2 + 1 = 6.
    g = _graph([helper.make_node("Conv", ["x", "w"], ["y"], group=16, strides=[2, 2],
                                 pads=[2, 2, 2, 2])],
               [("x", F, [1, 16, 12, 12])], [("y", F, None)], [("w", _w(16, 1, 5, 5))])
    c = _only(g)
    assert c.gemm == GemmShape(M=36, N=1, K=25, groups=16)
    assert c.flops == 2 * 36 * 25 * 16 == 28800
    assert c.weight_bytes == 16 * 25 * 4
    assert c.activation_bytes == (16 * 144 + 16 * 36) * 4
    assert c.kind == DEPTHWISE


def test_conv_transpose():
    # x 1x4x5x5, w 4x2x3x3 (C_in x C_out/g x k), stride 2 -> y 1x2x11x11.
    g = _graph([helper.make_node("ConvTranspose", ["x", "w"], ["y"], strides=[2, 2])],
               [("x", F, [1, 4, 5, 5])], [("y", F, None)], [("w", _w(4, 2, 3, 3))])
    c = _only(g, "ConvTranspose")
    assert c.gemm == GemmShape(M=25, N=18, K=4, groups=1)
    # GEMM MACs, plus col2im adding each of the M*N column entries into the output.
    assert c.flops == 2 * 25 * 18 * 4 + 25 * 18
    assert c.output_bytes == 2 * 121 * 4
    assert c.im2col_bytes == 25 * 18 * 4


def test_gemm_trans_b():
    g = _graph([helper.make_node("Gemm", ["a", "b", "c"], ["y"], transB=1)],
               [("a", F, [5, 32])], [("y", F, None)], [("b", _w(10, 32)), ("c", _w(10))])
    c = _only(g, "Gemm")
    assert c.gemm == GemmShape(M=5, N=10, K=32)
    assert c.flops == 2 * 5 * 10 * 32 + 5 * 10 == 3250
    assert c.weight_bytes == (320 + 10) * 4
    assert c.activation_bytes == (5 * 32 + 5 * 10) * 4


def test_gemm_trans_a():
    g = _graph([helper.make_node("Gemm", ["a", "b"], ["y"], transA=1)],
               [("a", F, [32, 5])], [("y", F, None)], [("b", _w(32, 10))])
    assert _only(g, "Gemm").gemm == GemmShape(M=5, N=10, K=32)


def test_batched_matmul_of_activations():
    g = _graph([helper.make_node("MatMul", ["a", "b"], ["y"])],
               [("a", F, [2, 3, 4, 5]), ("b", F, [2, 3, 5, 6])], [("y", F, None)])
    c = _only(g, "MatMul")
    assert c.gemm == GemmShape(M=4, N=6, K=5, groups=6)
    assert c.flops == 2 * 6 * 4 * 6 * 5 == 1440
    assert c.weight_bytes == 0 and c.intensity_weights is None
    assert c.activation_bytes == (2 * 3 * 20 + 2 * 3 * 30 + 2 * 3 * 24) * 4


def test_batched_matmul_broadcasts_batch_dims():
    g = _graph([helper.make_node("MatMul", ["a", "b"], ["y"])],
               [("a", F, [4, 1, 3, 5]), ("b", F, [2, 5, 6])], [("y", F, None)])
    assert _only(g, "MatMul").gemm == GemmShape(M=3, N=6, K=5, groups=8)


def test_matmul_with_weight_folds_batch_into_m():
    g = _graph([helper.make_node("MatMul", ["a", "w"], ["y"])],
               [("a", F, [2, 7, 16])], [("y", F, None)], [("w", _w(16, 8))])
    c = _only(g, "MatMul")
    assert c.gemm == GemmShape(M=14, N=8, K=16)
    assert c.flops == 2 * 14 * 8 * 16
    assert c.weight_bytes == 16 * 8 * 4


def test_matmul_with_weight_on_the_left_is_transposed():
    g = _graph([helper.make_node("MatMul", ["w", "x"], ["y"])],
               [("x", F, [3, 16, 9])], [("y", F, None)], [("w", _w(8, 16))])
    # Y = W X per batch; Y^T = X^T W^T is (3*9) x 16 times 16 x 8.
    assert _only(g, "MatMul").gemm == GemmShape(M=27, N=8, K=16)


def test_embedding_gather_counts_rows_touched():
    g = _graph([helper.make_node("Gather", ["table", "ids"], ["y"], axis=0)],
               [("ids", TensorProto.INT64, [2, 8])], [("y", F, None)],
               [("table", _w(1000, 64))])
    c = _only(g, "Gather")
    assert c.kind == EMBEDDING
    assert c.flops == 0
    assert c.weight_bytes == 16 * 64 * 4          # 16 lookups, not the 256 KB table
    assert c.input_bytes == 16 * 8                # int64 indices
    assert c.output_bytes == 2 * 8 * 64 * 4
    assert c.gemm is None


def test_embedding_gather_with_constant_indices_counts_distinct_rows():
    g = _graph([helper.make_node("Gather", ["table", "ids"], ["y"], axis=0),
                helper.make_node("Relu", ["y"], ["z"])],
               [("x", F, [1])], [("z", F, None)],
               [("table", _w(100, 4)), ("ids", np.array([3, 3, 5, -1], dtype=np.int64))])
    # Gather of constants is constant-foldable; what it would read is still rows 3, 5 and 99.
    costs = {c.op_type: c for c in analyze_model(g).ops}
    assert costs["Gather"].kind == CONSTANT


def test_gather_of_activation_is_data_movement():
    g = _graph([helper.make_node("Gather", ["x", "i"], ["y"], axis=1)],
               [("x", F, [2, 10]), ("i", TensorProto.INT64, [3])], [("y", F, None)])
    c = _only(g, "Gather")
    assert c.kind == "gather" and c.weight_bytes == 0 and c.flops == 0


def test_weights_made_by_constant_of_shape_count_as_weights():
    # The light models in the onnx wheel build their weights with ConstantOfShape.
    shape = np.array([4, 3, 3, 3], dtype=np.int64)
    fill = numpy_helper.from_array(np.array([0.5], dtype=np.float32))
    g = _graph([helper.make_node("ConstantOfShape", ["wshape"], ["w"], value=fill),
                helper.make_node("Conv", ["x", "w"], ["y"])],
               [("x", F, [1, 3, 8, 8])], [("y", F, None)], [("wshape", shape)])
    cost = analyze_model(g)
    conv = [c for c in cost.ops if c.op_type == "Conv"][0]
    assert conv.weight_bytes == 4 * 27 * 4 and conv.input_bytes == 3 * 64 * 4
    assert [c.kind for c in cost.ops if c.op_type == "ConstantOfShape"] == [CONSTANT]
    assert cost.params == 4 * 27
    assert cost.flops == conv.flops


def test_dequantized_weight_counts_stored_int8_bytes():
    q = np.ones((16, 8), dtype=np.int8)
    g = _graph([helper.make_node("DequantizeLinear", ["wq", "s"], ["w"]),
                helper.make_node("MatMul", ["x", "w"], ["y"])],
               [("x", F, [4, 16])], [("y", F, None)],
               [("wq", q), ("s", np.array(0.1, dtype=np.float32))])
    cost = analyze_model(g)
    mm = [c for c in cost.ops if c.op_type == "MatMul"][0]
    assert mm.weight_bytes == 16 * 8 + 4 and mm.quantized
    assert mm.kernel == "fp32"          # the activation is float: not a QDQ int8 pattern
    assert cost.params == 16 * 8
    assert cost.weight_bytes == 16 * 8 + 4


def test_kernel_comes_from_meta():
    g = _graph([helper.make_node("MatMul", ["x", "w"], ["y"])],
               [("x", F, [4, 16])], [("y", F, None)], [("w", _w(16, 8))])
    next(iter(g.ops.values())).meta["graphopt.kernel"] = "int8_acc16"
    assert _only(g, "MatMul").kernel == "int8_acc16"


def test_elementwise_and_views():
    g = _graph([helper.make_node("Add", ["x", "x"], ["s"]),
                helper.make_node("Reshape", ["s", "shape"], ["r"]),
                helper.make_node("Sum", ["r", "r", "r"], ["y"])],
               [("x", F, [2, 6])], [("y", F, None)],
               [("shape", np.array([3, 4], dtype=np.int64))])
    costs = {c.op_type: c for c in analyze_model(g).ops}
    assert costs["Add"].flops == 12 and costs["Add"].input_bytes == 48  # x read once
    assert costs["Reshape"].kind == "view" and costs["Reshape"].flops == 0
    assert costs["Sum"].flops == 2 * 12


def test_pool_counts_window():
    g = _graph([helper.make_node("MaxPool", ["x"], ["y"], kernel_shape=[3, 3], strides=[2, 2])],
               [("x", F, [1, 2, 7, 7])], [("y", F, None)])
    assert _only(g, "MaxPool").flops == 2 * 3 * 3 * 9


def test_constant_values_follow_constant_subgraphs():
    g = _graph([helper.make_node("Transpose", ["w"], ["wt"]),
                helper.make_node("MatMul", ["x", "wt"], ["y"])],
               [("x", F, [2, 3])], [("y", F, None)], [("w", _w(4, 3))])
    assert {"w", "wt"} <= constant_values(g)
    assert "y" not in constant_values(g)
    assert _only(g, "MatMul").weight_bytes == 48


def test_characterization_is_flop_weighted():
    g = _graph([helper.make_node("MatMul", ["x", "w1"], ["h"]),
                helper.make_node("MatMul", ["h", "w2"], ["y"])],
               [("x", F, [4, 8])], [("y", F, None)], [("w1", _w(8, 16)), ("w2", _w(16, 2))])
    ops = analyze_model(g).ops
    f1, f2 = 2 * 4 * 16 * 8, 2 * 4 * 2 * 16
    i1, i2 = f1 / (8 * 16 * 4), f2 / (16 * 2 * 4)
    ch = characterize(ops)
    assert ch.gemm_ops == 2 and ch.gemm_flops_share == 1.0
    assert ch.avg_intensity_weights == pytest.approx((f1 * i1 + f2 * i2) / (f1 + f2))
    assert ch.min_intensity_weights == pytest.approx(min(i1, i2))
    t1 = f1 / (8 * 16 * 4 + (32 + 64) * 4)
    t2 = f2 / (16 * 2 * 4 + (64 + 8) * 4)
    assert ch.min_intensity_total == pytest.approx(min(t1, t2))


def test_static_peak_frees_after_last_use_and_shares_views():
    g = _graph([helper.make_node("Relu", ["x"], ["a"]),           # 400 B
                helper.make_node("Reshape", ["a", "s"], ["ar"]),  # view of a
                helper.make_node("Relu", ["ar"], ["b"]),          # 400 B, a still live
                helper.make_node("Relu", ["b"], ["c"])],          # a dead: b + c
               [("x", F, [10, 10])], [("c", F, None)],
               [("s", np.array([100], dtype=np.int64))])
    assert analyze_model(g).max_live_activation_bytes == 800


def test_dynamic_input_needs_a_shape():
    g = _graph([helper.make_node("Relu", ["x"], ["y"])], [("x", F, ["batch", 4])],
               [("y", F, None)])
    with pytest.raises(graphopt.UsageError, match="--shape x=N,4"):
        analyze_model(g)
    cost = analyze_model(g, {"x": (3, 4)})
    assert cost.ops[0].flops == 12 and cost.input_shapes == {"x": (3, 4)}
    cost = analyze_model(g, example_inputs={"x": np.zeros((5, 4), np.float32)})
    assert cost.ops[0].flops == 20
    with pytest.raises(graphopt.UsageError, match="no graph input named 'nope'"):
        analyze_model(g, {"nope": (1,)})


@pytest.mark.skipif(not os.path.exists(os.path.join(LIGHT, "light_resnet50.onnx")),
                    reason="onnx wheel without light models")
def test_resnet50_is_about_4_1_gmacs():
    cost = analyze_model(graphopt.load(os.path.join(LIGHT, "light_resnet50.onnx")))
    macs = sum(c.gemm.macs for c in cost.ops if c.gemm)
    assert macs == pytest.approx(4.1e9, rel=0.02)        # 4.09e9: convs + the classifier
    assert cost.flops == pytest.approx(8.2e9, rel=0.02)  # + BN, Relu, residual adds, pooling
    assert cost.params == pytest.approx(25.6e6, rel=0.01)
    assert all(c.known for c in cost.ops)
    assert sum(1 for c in cost.ops if c.kind == CONSTANT) == 239  # the ConstantOfShape weights
    fc = [c for c in cost.ops if c.op_type == "Gemm"][0]
    assert fc.gemm == GemmShape(M=1, N=1000, K=2048)


def test_ppocr_det_costs_every_op():
    ppocr = pytest.importorskip("rapidocr_onnxruntime")
    path = os.path.join(os.path.dirname(ppocr.__file__), "models", "ch_PP-OCRv4_det_infer.onnx")
    if not os.path.exists(path):
        pytest.skip("PP-OCR det model not shipped")
    cost = analyze_model(graphopt.load(path), {"x": (1, 3, 640, 640)})
    assert all(c.known for c in cost.ops)
    depthwise = [c for c in cost.ops if c.kind == DEPTHWISE]
    assert depthwise and all(c.gemm.N == 1 and c.gemm.groups > 1 for c in depthwise)
    assert [c.kind for c in cost.ops if c.op_type == "ConvTranspose"] == [GEMM, GEMM]


def test_qdq_pattern_runs_as_int8_kernel():
    g = _graph([helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"]),
                helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"]),
                helper.make_node("DequantizeLinear", ["wq", "s"], ["w"]),
                helper.make_node("MatMul", ["xd", "w"], ["y"])],
               [("x", F, [4, 16])], [("y", F, None)],
               [("wq", np.ones((16, 8), np.int8)), ("s", np.array(0.1, np.float32)),
                ("z", np.array(0, np.uint8))])
    mm = _only(g, "MatMul")
    assert mm.kernel == "int8_acc32" and mm.quantized and mm.weight_bytes == 16 * 8 + 4
