"""Fusion passes (O2): BatchNorm and per-channel arithmetic folded into Conv/ConvTranspose/Gemm/
MatMul weights, MatMul + Add to Gemm, and epilogue marking. Differential against onnxruntime
(relative L2 error <= 1e-5), with node counts and pass stats proving each rewrite fired.

Pattern recognition (HardSwish, GELU, LayerNorm, Softmax) is in test_fusion_patterns.py; the real
models in test_fusion_models.py.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

import graphopt
from graphopt.passes.fusion_epilogue import EPILOGUE_META, FUSE_META
from oracle import make_model, op_types, random_feeds, run_ort

RNG = np.random.default_rng(1234)


def rel_l2(after: np.ndarray, before: np.ndarray) -> float:
    before, after = before.astype(np.float64), after.astype(np.float64)
    return float(np.linalg.norm(after - before) / max(np.linalg.norm(before), 1e-30))


def fuse(model: onnx.ModelProto, feeds=None, level: str = "O2", disable=()):
    """Optimize a copy of `model`; check it with onnx's checker and that onnxruntime's outputs
    agree within 1e-5 relative L2. Returns (graph, stats summed over every pass)."""
    feeds = feeds if feeds is not None else random_feeds(model)
    before = run_ort(model, feeds)
    graph = graphopt.load(model)
    report = graphopt.optimize(graph, level, verify="structural", disable=disable)
    out = graphopt.to_model(graph)
    onnx.checker.check_model(out, full_check=True)
    after = run_ort(out, feeds)
    for b, a in zip(before, after):
        assert a.shape == b.shape
        assert rel_l2(a, b) <= 1e-5, rel_l2(a, b)
    stats: dict[str, int] = {}
    for entry in report.stats_by_pass().values():
        for key, n in entry["stats"].items():
            stats[key] = stats.get(key, 0) + n
    return graph, stats


def w(*shape: int, scale: float = 0.5) -> np.ndarray:
    return (RNG.standard_normal(shape) * scale).astype(np.float32)


def bn_params(prefix: str, c: int) -> list[tuple[str, np.ndarray]]:
    return [(f"{prefix}_g", RNG.uniform(0.5, 1.5, c).astype(np.float32)),
            (f"{prefix}_b", w(c)),
            (f"{prefix}_m", w(c)),
            (f"{prefix}_v", RNG.uniform(0.2, 2.0, c).astype(np.float32))]


def bn_node(x: str, y: str, prefix: str, **attrs) -> onnx.NodeProto:
    return helper.make_node("BatchNormalization",
                            [x, f"{prefix}_g", f"{prefix}_b", f"{prefix}_m", f"{prefix}_v"], [y],
                            **attrs)


# ---------------------------------------------------------------------------------------------
# BatchNormalization folding
# ---------------------------------------------------------------------------------------------
def test_conv_batchnorm_with_epsilon_folds_into_weights_and_bias():
    nodes = [helper.make_node("Conv", ["x", "W", "B"], ["c"], pads=[1, 1, 1, 1]),
             bn_node("c", "y", "bn", epsilon=1e-2)]
    model = make_model(nodes, [("x", [1, 3, 8, 8])], [("y", [1, 4, 8, 8])],
                       [("W", w(4, 3, 3, 3)), ("B", w(4))] + bn_params("bn", 4))
    graph, stats = fuse(model)
    assert op_types(graph) == ["Conv"]
    assert stats["batchnorms_folded"] == 1
    assert graph.outputs == ["y"]


def test_conv_without_bias_gets_one():
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"]), bn_node("c", "y", "bn")]
    model = make_model(nodes, [("x", [2, 3, 6, 6])], [("y", [2, 5, 4, 4])],
                       [("W", w(5, 3, 3, 3))] + bn_params("bn", 5))
    graph, stats = fuse(model)
    (conv,) = graph.ops.values()
    assert conv.op_type == "Conv" and len(conv.inputs) == 3 and conv.inputs[2]
    assert stats["batchnorms_folded"] == 1


def test_grouped_and_depthwise_conv_batchnorm_then_channel_scale_and_shift():
    nodes = [helper.make_node("Conv", ["x", "W1", "B1"], ["c1"], group=2, pads=[1, 1, 1, 1]),
             bn_node("c1", "n1", "bn1"),
             helper.make_node("Mul", ["n1", "s"], ["m1"]),
             helper.make_node("Add", ["t", "m1"], ["a1"]),
             helper.make_node("Relu", ["a1"], ["r1"]),
             helper.make_node("Conv", ["r1", "W2"], ["c2"], group=6, pads=[1, 1, 1, 1]),
             bn_node("c2", "y", "bn2", epsilon=1e-3)]
    model = make_model(nodes, [("x", [1, 4, 7, 7])], [("y", [1, 6, 7, 7])],
                       [("W1", w(6, 2, 3, 3)), ("B1", w(6)), ("s", w(6, 1, 1)),
                        ("t", w(1, 6, 1, 1)), ("W2", w(6, 1, 3, 3))]
                       + bn_params("bn1", 6) + bn_params("bn2", 6))
    graph, stats = fuse(model)
    assert op_types(graph) == ["Conv", "Conv", "Relu"]
    assert stats["batchnorms_folded"] == 2
    assert stats["scales_folded"] == 1 and stats["shifts_folded"] == 1


def test_grouped_conv_transpose_batchnorm():
    # ConvTranspose weights are (C_in, C_out / group, kH, kW).
    nodes = [helper.make_node("ConvTranspose", ["x", "W", "B"], ["c"], group=2, strides=[2, 2]),
             bn_node("c", "y", "bn")]
    model = make_model(nodes, [("x", [1, 4, 5, 5])], [("y", [1, 6, 11, 11])],
                       [("W", w(4, 3, 3, 3)), ("B", w(6))] + bn_params("bn", 6))
    graph, stats = fuse(model)
    assert op_types(graph) == ["ConvTranspose"]
    assert stats["batchnorms_folded"] == 1


def test_gemm_trans_b_batchnorm_and_broadcasting_biases():
    nodes = [helper.make_node("Gemm", ["x", "B", "C"], ["g"], transB=1, alpha=0.7, beta=1.3),
             bn_node("g", "n", "bn"),
             helper.make_node("Add", ["n", "row"], ["a"]),        # (1, N)
             helper.make_node("Mul", ["a", "vec"], ["m"]),        # (N,)
             helper.make_node("Sub", ["m", "one"], ["y"])]        # scalar
    model = make_model(nodes, [("x", [3, 5])], [("y", [3, 4])],
                       [("B", w(4, 5)), ("C", w(4)), ("row", w(1, 4)), ("vec", w(4)),
                        ("one", np.array(0.25, np.float32))] + bn_params("bn", 4))
    graph, stats = fuse(model)
    assert op_types(graph) == ["Gemm"]
    (gemm,) = graph.ops.values()
    assert gemm.attrs["beta"] == 1.0 and gemm.attrs["transB"] == 1
    assert stats["batchnorms_folded"] == 1 and stats["scales_folded"] == 1
    assert stats["shifts_folded"] == 2


def test_gemm_with_full_c_matrix_keeps_its_shape():
    nodes = [helper.make_node("Gemm", ["x", "B", "C"], ["g"]),
             helper.make_node("Mul", ["g", "s"], ["y"])]
    model = make_model(nodes, [("x", [3, 5])], [("y", [3, 4])],
                       [("B", w(5, 4)), ("C", w(3, 4)), ("s", w(4))])
    graph, stats = fuse(model)
    assert op_types(graph) == ["Gemm"]
    assert stats["scales_folded"] == 1


def test_matmul_2d_batchnorm_becomes_gemm():
    nodes = [helper.make_node("MatMul", ["x", "W"], ["mm"]), bn_node("mm", "y", "bn")]
    model = make_model(nodes, [("x", [3, 5])], [("y", [3, 4])],
                       [("W", w(5, 4))] + bn_params("bn", 4))
    graph, stats = fuse(model)
    assert op_types(graph) == ["Gemm"]
    assert stats["batchnorms_folded"] == 1 and stats["matmuls_to_gemm"] == 1


def test_matmul_3d_scale_folds_and_one_bias_add_remains():
    nodes = [helper.make_node("MatMul", ["x", "W"], ["mm"]),
             helper.make_node("Add", ["mm", "b"], ["a"]),
             helper.make_node("Div", ["a", "d"], ["y"])]
    model = make_model(nodes, [("x", [2, 3, 5])], [("y", [2, 3, 4])],
                       [("W", w(5, 4)), ("b", w(4)),
                        ("d", RNG.uniform(1, 2, 4).astype(np.float32))])
    graph, stats = fuse(model)
    assert op_types(graph) == ["Add", "MatMul"]
    assert stats["scales_folded"] == 1


def test_matmul_3d_bias_alone_is_left_as_it_is():
    nodes = [helper.make_node("MatMul", ["x", "W"], ["mm"]),
             helper.make_node("Add", ["mm", "b"], ["y"])]
    model = make_model(nodes, [("x", [2, 3, 5])], [("y", [2, 3, 4])], [("W", w(5, 4)), ("b", w(4))])
    graph, stats = fuse(model)
    assert op_types(graph) == ["Add", "MatMul"]
    assert "shifts_folded" not in stats and "matmuls_to_gemm" not in stats


def test_matmul_add_becomes_gemm_only_for_2d_activations():
    nodes = [helper.make_node("Relu", ["x"], ["r"]),    # an activation of unknown shape
             helper.make_node("MatMul", ["r", "W"], ["mm"]),
             helper.make_node("Add", ["mm", "b"], ["y"]),
             helper.make_node("MatMul", ["x3", "W"], ["mm3"]),
             helper.make_node("Add", ["mm3", "b"], ["y3"])]
    model = make_model(nodes, [("x", [3, 5]), ("x3", [2, 3, 5])],
                       [("y", [3, 4]), ("y3", [2, 3, 4])],
                       [("W", w(5, 4)), ("b", w(1, 4))])
    graph, stats = fuse(model)
    assert op_types(graph) == ["Add", "Gemm", "MatMul", "Relu"]
    assert stats["matmuls_to_gemm"] == 1


def test_conv_add_constant_into_bias_and_sub_from_constant():
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"]),
             helper.make_node("Add", ["c", "b"], ["a"]),
             helper.make_node("Sub", ["k", "a"], ["y"])]   # k - a: scale -1, shift k
    model = make_model(nodes, [("x", [1, 2, 5, 5])], [("y", [1, 3, 5, 5])],
                       [("W", w(3, 2, 1, 1)), ("b", w(3, 1, 1)), ("k", w(3, 1, 1))])
    graph, stats = fuse(model)
    assert op_types(graph) == ["Conv"]
    assert stats["shifts_folded"] == 2


def test_per_pixel_or_rank_growing_constants_do_not_fold():
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"]),
             helper.make_node("Add", ["c", "spatial"], ["a"]),     # varies over H, W
             helper.make_node("Conv", ["x", "W"], ["c2"]),
             helper.make_node("Mul", ["c2", "rank5"], ["m"])]      # grows the rank
    model = make_model(nodes, [("x", [1, 2, 4, 4])], [("a", [1, 3, 4, 4]), ("m", [1, 1, 3, 4, 4])],
                       [("W", w(3, 2, 1, 1)), ("spatial", w(1, 1, 4, 4)),
                        ("rank5", w(1, 1, 3, 1, 1))])
    graph, stats = fuse(model)
    assert op_types(graph) == ["Add", "Conv", "Mul"]  # CSE merged the twin convs
    assert "shifts_folded" not in stats and "scales_folded" not in stats


def test_batchnorm_with_no_head_absorbs_the_arithmetic_after_it():
    nodes = [helper.make_node("Relu", ["x"], ["r"]),
             bn_node("r", "n", "bn", epsilon=1e-3),
             helper.make_node("Mul", ["n", "s"], ["m"]),
             helper.make_node("Add", ["m", "t"], ["y"])]
    model = make_model(nodes, [("x", [2, 3, 4, 4])], [("y", [2, 3, 4, 4])],
                       [("s", w(3, 1, 1)), ("t", w(1, 3, 1, 1))] + bn_params("bn", 3))
    graph, stats = fuse(model)
    assert op_types(graph) == ["BatchNormalization", "Relu"]
    assert stats["into_batchnorm_scales_folded"] == 1 and stats["into_batchnorm_shifts_folded"] == 1


def test_head_output_read_twice_does_not_fold():
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"], pads=[1, 1, 1, 1]),
             bn_node("c", "n", "bn"),
             helper.make_node("Add", ["n", "c"], ["y"])]
    model = make_model(nodes, [("x", [1, 2, 4, 4])], [("y", [1, 3, 4, 4])],
                       [("W", w(3, 2, 3, 3))] + bn_params("bn", 3))
    graph, stats = fuse(model)
    assert "BatchNormalization" in op_types(graph)
    assert "batchnorms_folded" not in stats


def test_division_by_zero_channel_does_not_fold():
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"]),
             helper.make_node("Div", ["c", "d"], ["y"])]
    d = np.array([1.0, 0.0, 2.0], np.float32).reshape(3, 1, 1)
    model = make_model(nodes, [("x", [1, 2, 4, 4])], [("y", [1, 3, 4, 4])],
                       [("W", w(3, 2, 1, 1)), ("d", d)])
    feeds = random_feeds(model)
    graph = graphopt.load(model)
    graphopt.optimize(graph, "O2")
    assert op_types(graph) == ["Conv", "Div"]
    np.testing.assert_array_equal(run_ort(graph, feeds)[0], run_ort(model, feeds)[0])


# ---------------------------------------------------------------------------------------------
# folding before the head
# ---------------------------------------------------------------------------------------------
def test_scale_before_padded_grouped_conv_folds_but_shift_does_not():
    nodes = [helper.make_node("Mul", ["x", "s"], ["m"]),
             helper.make_node("Conv", ["m", "W"], ["y"], group=2, pads=[1, 1, 1, 1]),
             helper.make_node("Add", ["x", "t"], ["a"]),
             helper.make_node("Conv", ["a", "W"], ["y2"], group=2, pads=[1, 1, 1, 1])]
    model = make_model(nodes, [("x", [1, 4, 5, 5])], [("y", [1, 6, 5, 5]), ("y2", [1, 6, 5, 5])],
                       [("s", w(4, 1, 1)), ("t", w(1, 4, 1, 1) + 1.0), ("W", w(6, 2, 3, 3))])
    graph, stats = fuse(model)
    assert op_types(graph) == ["Add", "Conv", "Conv"]
    assert stats["input_scales_folded"] == 1
    assert "input_shifts_folded" not in stats


def test_scale_then_shift_before_padded_conv_keeps_only_a_shift():
    # x * s + c = (x + c / s) * s: the scale folds, the shift must stay (padding zeros).
    nodes = [helper.make_node("Mul", ["x", "s"], ["m"]),
             helper.make_node("Sub", ["m", "t"], ["a"]),
             helper.make_node("Conv", ["a", "W", "B"], ["y"], group=4, pads=[1, 1, 1, 1])]
    model = make_model(nodes, [("x", [1, 4, 6, 6])], [("y", [1, 4, 6, 6])],
                       [("s", np.array([0.5, -2.0, 3.0, 0.1], np.float32).reshape(4, 1, 1)),
                        ("t", w(4, 1, 1)), ("W", w(4, 1, 3, 3)), ("B", w(4))])
    graph, stats = fuse(model)
    assert op_types(graph) == ["Add", "Conv"]
    assert stats["input_scales_folded"] == 1 and "input_shifts_folded" not in stats


def test_scale_and_shift_before_unpadded_conv_fold():
    nodes = [helper.make_node("Mul", ["s", "x"], ["m"]),
             helper.make_node("Sub", ["m", "t"], ["a"]),
             helper.make_node("Conv", ["a", "W", "B"], ["y"], strides=[2, 2], group=2)]
    model = make_model(nodes, [("x", [1, 4, 7, 7])], [("y", [1, 6, 3, 3])],
                       [("s", w(4, 1, 1)), ("t", w(4, 1, 1)), ("W", w(6, 2, 3, 3)), ("B", w(6))])
    graph, stats = fuse(model)
    assert op_types(graph) == ["Conv"]
    assert stats["input_scales_folded"] == 1 and stats["input_shifts_folded"] == 1


def test_scale_and_shift_before_gemm_and_matmul():
    nodes = [helper.make_node("Add", ["x", "t"], ["a"]),
             helper.make_node("Mul", ["a", "s"], ["m"]),
             helper.make_node("Gemm", ["m", "B", "C"], ["y"], transB=1, alpha=0.5),
             helper.make_node("Div", ["x3", "d"], ["q"]),
             helper.make_node("MatMul", ["q", "W"], ["y3"])]
    model = make_model(nodes, [("x", [3, 5]), ("x3", [2, 3, 5])],
                       [("y", [3, 4]), ("y3", [2, 3, 4])],
                       [("t", w(5)), ("s", w(1, 5)), ("B", w(4, 5)), ("C", w(4)),
                        ("d", RNG.uniform(1, 2, 5).astype(np.float32)), ("W", w(5, 4))])
    graph, stats = fuse(model)
    assert op_types(graph) == ["Gemm", "MatMul"]
    assert stats["input_scales_folded"] == 2 and stats["input_shifts_folded"] == 1


def test_layernorm_affine_before_a_3d_linear_folds_into_its_weights_and_bias():
    # n * gamma + beta, then MatMul + Add(bias) on 3-D activations (a LayerNorm's tail at an
    # opset without LayerNormalization): gamma joins W, beta @ W joins the bias.
    nodes = [helper.make_node("Mul", ["x", "gamma"], ["g"]),
             helper.make_node("Add", ["g", "beta"], ["a"]),
             helper.make_node("MatMul", ["a", "W"], ["mm"]),
             helper.make_node("Add", ["mm", "b"], ["y"])]
    model = make_model(nodes, [("x", [2, 3, 5])], [("y", [2, 3, 4])],
                       [("gamma", w(5) + 1.0), ("beta", w(5)), ("W", w(5, 4)), ("b", w(4))],
                       opset=13)
    graph, stats = fuse(model)
    assert op_types(graph) == ["Add", "MatMul"]
    assert stats["input_scales_folded"] == 1 and stats["input_shifts_folded"] == 1


def test_scale_that_broadcasts_its_input_up_to_the_channels_stays():
    nodes = [helper.make_node("Mul", ["x", "s"], ["m"]),     # (1, 1, 4, 4) * (3, 1, 1)
             helper.make_node("Conv", ["m", "W"], ["y"]),
             helper.make_node("Add", ["v", "t"], ["a"]),     # (2, 1) + (1, 5) -> (2, 5)
             helper.make_node("Gemm", ["a", "B"], ["z"])]
    model = make_model(nodes, [("x", [1, 1, 4, 4]), ("v", [2, 1])],
                       [("y", [1, 2, 4, 4]), ("z", [2, 3])],
                       [("s", w(3, 1, 1)), ("W", w(2, 3, 1, 1)), ("t", w(1, 5)), ("B", w(5, 3))])
    graph, stats = fuse(model)
    assert op_types(graph) == ["Add", "Conv", "Gemm", "Mul"]
    assert "input_scales_folded" not in stats and "input_shifts_folded" not in stats


def test_scale_whose_input_is_read_elsewhere_stays():
    nodes = [helper.make_node("Mul", ["x", "s"], ["m"]),
             helper.make_node("Conv", ["m", "W"], ["y"]),
             helper.make_node("Relu", ["m"], ["z"])]
    model = make_model(nodes, [("x", [1, 2, 4, 4])], [("y", [1, 3, 4, 4]), ("z", [1, 2, 4, 4])],
                       [("s", w(2, 1, 1)), ("W", w(3, 2, 1, 1))])
    graph, stats = fuse(model)
    assert op_types(graph) == ["Conv", "Mul", "Relu"]
    assert "input_scales_folded" not in stats


# ---------------------------------------------------------------------------------------------
# epilogues
# ---------------------------------------------------------------------------------------------
def _meta(graph: graphopt.Graph) -> dict[str, tuple[str | None, str | None]]:
    return {op.op_type + ":" + op.outputs[0]: (op.meta.get(FUSE_META), op.meta.get(EPILOGUE_META))
            for op in graph.ops.values()}


def test_conv_residual_add_relu_is_one_epilogue_chain():
    nodes = [helper.make_node("Conv", ["x", "W", "B"], ["c"], pads=[1, 1, 1, 1], name="conv"),
             helper.make_node("Add", ["c", "x"], ["a"]),
             helper.make_node("Relu", ["a"], ["y"])]
    model = make_model(nodes, [("x", [1, 3, 6, 6])], [("y", [1, 3, 6, 6])],
                       [("W", w(3, 3, 3, 3)), ("B", w(3))])
    graph, stats = fuse(model)
    meta = _meta(graph)
    assert meta["Conv:c"] == (None, "Add+Relu")
    assert meta["Add:a"] == ("conv", None) and meta["Relu:y"] == ("conv", None)
    assert stats["epilogues_fused"] == 2
    saved = graphopt.to_model(graph)
    relu = next(n for n in saved.graph.node if n.op_type == "Relu")
    assert {p.key: p.value for p in relu.metadata_props}[FUSE_META] == "conv"


def test_relu_whose_input_has_a_second_reader_does_not_fuse():
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"], name="conv"),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("Add", ["r", "c"], ["y"])]
    model = make_model(nodes, [("x", [1, 3, 4, 4])], [("y", [1, 3, 4, 4])], [("W", w(3, 3, 1, 1))])
    graph, stats = fuse(model)
    assert all(fuse_into is None for fuse_into, _ in _meta(graph).values())
    assert "epilogues_fused" not in stats


def test_graph_output_in_the_middle_stops_the_chain():
    nodes = [helper.make_node("Gemm", ["x", "B"], ["g"], transB=1, name="fc"),
             helper.make_node("Sigmoid", ["g"], ["y"])]
    model = make_model(nodes, [("x", [2, 5])], [("g", [2, 4]), ("y", [2, 4])], [("B", w(4, 5))])
    graph, _ = fuse(model)
    assert all(fuse_into is None for fuse_into, _ in _meta(graph).values())


def test_each_activation_fuses_after_its_head():
    clip_min, clip_max = np.array(0, np.float32), np.array(6, np.float32)
    nodes = [helper.make_node("Conv", ["x", "W"], ["c1"], name="c1"),
             helper.make_node("Clip", ["c1", "lo", "hi"], ["y1"]),
             helper.make_node("Conv", ["x", "W2"], ["c2"], name="c2"),
             helper.make_node("LeakyRelu", ["c2"], ["y2"], alpha=0.1),
             helper.make_node("MatMul", ["v", "M"], ["mm"], name="mm"),
             helper.make_node("Tanh", ["mm"], ["y3"]),
             helper.make_node("ConvTranspose", ["x", "T"], ["t"], name="ct"),
             helper.make_node("HardSigmoid", ["t"], ["y4"])]
    model = make_model(nodes, [("x", [1, 2, 4, 4]), ("v", [2, 3, 5])],
                       [("y1", [1, 3, 4, 4]), ("y2", [1, 3, 4, 4]), ("y3", [2, 3, 4]),
                        ("y4", [1, 3, 6, 6])],
                       [("W", w(3, 2, 1, 1)), ("W2", w(3, 2, 1, 1)), ("lo", clip_min),
                        ("hi", clip_max), ("M", w(5, 4)), ("T", w(2, 3, 3, 3))], opset=17)
    graph, stats = fuse(model)
    meta = _meta(graph)
    assert meta["Clip:y1"][0] == "c1" and meta["LeakyRelu:y2"][0] == "c2"
    assert meta["Tanh:y3"][0] == "mm" and meta["HardSigmoid:y4"][0] == "ct"
    assert stats["epilogues_fused"] == 4


def test_fused_epilogues_run_in_the_graphopt_runtime():
    from graphopt.runtime import Session

    nodes = [helper.make_node("Conv", ["x", "W", "B"], ["c"], pads=[1, 1, 1, 1]),
             bn_node("c", "n", "bn"),
             helper.make_node("Add", ["n", "x"], ["a"]),
             helper.make_node("Relu", ["a"], ["y"])]
    model = make_model(nodes, [("x", [1, 3, 6, 6])], [("y", [1, 3, 6, 6])],
                       [("W", w(3, 3, 3, 3)), ("B", w(3))] + bn_params("bn", 3))
    feeds = random_feeds(model)
    graph, _ = fuse(model, feeds)
    session = Session(graph)
    assert len(session.fused) == 1 and len(session.fused[0][1]) == 2
    got = session.run(feeds)["y"]
    assert rel_l2(got, run_ort(model, feeds)[0]) <= 1e-5


def test_batchnorm_in_an_if_branch_folds_with_the_outer_weights():
    from onnx import TensorProto

    def branch(name, nodes, out):
        out_info = helper.make_tensor_value_info(out, TensorProto.FLOAT, [1, 3, 4, 4])
        return helper.make_graph(nodes, name, [], [out_info])
    then_g = branch("then", [helper.make_node("Conv", ["x", "W"], ["c"], pads=[1, 1, 1, 1]),
                             bn_node("c", "t_out", "bn")], "t_out")
    else_g = branch("else", [helper.make_node("Relu", ["x"], ["e_out"])], "e_out")
    nodes = [helper.make_node("If", ["cond"], ["y"], then_branch=then_g, else_branch=else_g)]
    model = make_model(nodes, [("x", [1, 3, 4, 4]), ("cond", [], TensorProto.BOOL)],
                       [("y", [1, 3, 4, 4])], [("W", w(3, 3, 3, 3))] + bn_params("bn", 3))
    feeds = {"x": RNG.standard_normal((1, 3, 4, 4)).astype(np.float32), "cond": np.array(True)}
    graph, stats = fuse(model, feeds)
    (if_op,) = graph.ops.values()
    assert if_op.attrs["then_branch"].op_type_counts() == {"Conv": 1}
    assert stats["batchnorms_folded"] == 1
    assert sorted(graph.values) == ["cond", "x", "y"]   # the outer weights went unused


# ---------------------------------------------------------------------------------------------
# Conv of a nearest-upsampled map -> ConvTranspose (fusion_upsample)
# ---------------------------------------------------------------------------------------------
def resize(x: str, y: str, factors: tuple[int, int], coordinate: str = "asymmetric",
           rounding: str = "floor") -> list:
    scales = f"{y}_scales"
    node = helper.make_node("Resize", [x, "", scales], [y], mode="nearest",
                            coordinate_transformation_mode=coordinate, nearest_mode=rounding)
    return [node, (scales, np.array([1, 1, *factors], np.float32))]


def upsample_conv_model(factors=(2, 2), coordinate="asymmetric", rounding="floor", k=3,
                        pads=(1, 1, 1, 1), c=3, size=(5, 6), opset=17):
    node, scales = resize("x", "u", factors, coordinate, rounding)
    conv = helper.make_node("Conv", ["u", "W", "B"], ["y"], pads=list(pads))
    return make_model([node, conv], [("x", [1, c, *size])], [("y", None)],
                      [scales, ("W", w(4, c, k, k)), ("B", w(4))], opset=opset)


def check_in_graphopt_runtime(graph, model, feeds) -> None:
    from graphopt.runtime import Session
    got = Session(graph).run(feeds)
    assert rel_l2(next(iter(got.values())), run_ort(model, feeds)[0]) <= 1e-5


@pytest.mark.parametrize("factors,coordinate,rounding", [
    ((2, 2), "asymmetric", "floor"),                  # PP-OCR det, Paddle and TF exports
    ((4, 4), "half_pixel", "round_prefer_floor"),     # the Resize defaults
    ((8, 8), "pytorch_half_pixel", "round_prefer_ceil"),
    ((2, 3), "tf_half_pixel_for_nn", "floor"),
    ((1, 2), "asymmetric", "round_prefer_floor"),
])
def test_conv_of_an_upsampled_map_becomes_a_conv_transpose(factors, coordinate, rounding):
    model = upsample_conv_model(factors, coordinate, rounding)
    feeds = random_feeds(model)
    graph, stats = fuse(model, feeds)
    assert op_types(graph) == ["ConvTranspose"] and stats["upsampled_convs_transposed"] == 1
    (op,) = graph.ops.values()
    assert op.attrs["strides"] == list(factors)
    check_in_graphopt_runtime(graph, model, feeds)


@pytest.mark.parametrize("coordinate,rounding", [
    ("half_pixel", "floor"),          # y = 0 reads row -1, clamped: not a plain repetition
    ("asymmetric", "ceil"),
    ("align_corners", "round_prefer_floor"),
])
def test_upsamplings_that_do_not_repeat_each_row_s_times_stay(coordinate, rounding):
    model = upsample_conv_model((2, 2), coordinate, rounding)
    graph, stats = fuse(model)
    assert op_types(graph) == ["Conv", "Resize"] and "upsampled_convs_transposed" not in stats


@pytest.mark.parametrize("k,pads", [(5, (2, 1, 0, 3)), (2, (0, 0, 1, 1)), (1, (0, 0, 0, 0))])
def test_upsample_conv_kernel_sizes_and_uneven_pads(k, pads):
    model = upsample_conv_model((2, 2), k=k, pads=pads)
    feeds = random_feeds(model)
    graph, stats = fuse(model, feeds)
    if k == 1:   # a 1x1 conv does as many multiply-adds either way: left alone
        assert op_types(graph) == ["Conv", "Resize"]
    else:
        assert op_types(graph) == ["ConvTranspose"]
        check_in_graphopt_runtime(graph, model, feeds)


def test_upsample_opset9_and_resize_by_sizes():
    up = helper.make_node("Upsample", ["x", "s"], ["u"], mode="nearest")
    conv = helper.make_node("Conv", ["u", "W"], ["y"], pads=[1, 1, 1, 1])
    model = make_model([up, conv], [("x", [1, 3, 4, 5])], [("y", None)],
                       [("s", np.array([1, 1, 2, 2], np.float32)), ("W", w(2, 3, 3, 3))], opset=9)
    graph, _ = fuse(model)
    assert op_types(graph) == ["ConvTranspose"]
    sized = helper.make_node("Resize", ["x", "", "", "sizes"], ["u"], mode="nearest",
                             coordinate_transformation_mode="asymmetric", nearest_mode="floor")
    model = make_model([sized, conv], [("x", [1, 3, 4, 5])], [("y", None)],
                       [("sizes", np.array([1, 3, 12, 15], np.int64)), ("W", w(2, 3, 3, 3))])
    graph, _ = fuse(model)
    assert op_types(graph) == ["ConvTranspose"]
    assert graph.ops[next(iter(graph.ops))].attrs["strides"] == [3, 3]


def test_conv_of_a_concat_of_upsampled_maps_splits_into_summed_terms():
    """An FPN head: Conv(Concat(p2, up2(p3), up4(p4))) -> BN -> Relu becomes
    Conv(p2) + ConvT(p3) + ConvT(p4), the Adds and the Relu fused as epilogues."""
    nodes, inits = [], []
    for name, factor in (("p3", 2), ("p4", 4)):
        node, scales = resize(name, f"{name}_up", (factor, factor))
        nodes.append(node)
        inits.append(scales)
    nodes += [helper.make_node("Concat", ["p2", "p3_up", "p4_up"], ["cat"], axis=1),
              helper.make_node("Conv", ["cat", "W"], ["c"], pads=[1, 1, 1, 1]),
              bn_node("c", "n", "bn"), helper.make_node("Relu", ["n"], ["y"])]
    model = make_model(nodes, [("p2", [1, 2, 8, 8]), ("p3", [1, 3, 4, 4]), ("p4", [1, 4, 2, 2])],
                       [("y", None)], inits + [("W", w(5, 9, 3, 3))] + bn_params("bn", 5))
    feeds = random_feeds(model)
    graph, stats = fuse(model, feeds)
    assert op_types(graph) == ["Add", "Add", "Conv", "ConvTranspose", "ConvTranspose", "Relu"]
    assert stats["upsampled_convs_transposed"] == 2 and stats["concat_convs_split"] == 1
    assert all(FUSE_META in op.meta for op in graph.ops.values()     # both Adds run in place
               if op.op_type in ("Add", "Relu"))
    check_in_graphopt_runtime(graph, model, feeds)


def test_concat_read_elsewhere_or_without_upsampled_parts_stays():
    node, scales = resize("b", "b_up", (2, 2))
    base = [node, helper.make_node("Concat", ["a", "b_up"], ["cat"], axis=1),
            helper.make_node("Conv", ["cat", "W"], ["y"], pads=[1, 1, 1, 1])]
    inputs = [("a", [1, 2, 6, 6]), ("b", [1, 2, 3, 3])]
    shared = make_model(base + [helper.make_node("Relu", ["cat"], ["z"])], inputs,
                        [("y", None), ("z", None)], [scales, ("W", w(3, 4, 3, 3))])
    graph, _ = fuse(shared)
    assert "ConvTranspose" not in op_types(graph)
    plain = make_model([helper.make_node("Concat", ["a", "b2"], ["cat"], axis=1),
                        helper.make_node("Conv", ["cat", "W"], ["y"], pads=[1, 1, 1, 1])],
                       [("a", [1, 2, 6, 6]), ("b2", [1, 2, 6, 6])], [("y", None)],
                       [("W", w(3, 4, 3, 3))])
    graph, _ = fuse(plain)
    assert op_types(graph) == ["Concat", "Conv"]
