"""Transpose elimination at O2: differential against onnxruntime, with the rewrites counted."""

from __future__ import annotations

import numpy as np
from onnx import helper

from oracle import make_model, op_types, optimize_and_compare

NO_FUSION = ["fuse_epilogues", "matmul_add_to_gemm", "fold_affine_after", "fold_affine_before"]


def _stats(report, name):
    return report.stats_by_pass().get(name, {}).get("stats", {})


def _t(src, dst, perm):
    return helper.make_node("Transpose", [src], [dst], perm=perm)


def test_identity_merge_and_cancel():
    nodes = [_t("x", "a", [0, 1, 2]),                 # identity
             _t("a", "b", [1, 0, 2]), _t("b", "c", [2, 1, 0]),  # merge into one
             helper.make_node("Relu", ["c"], ["r"]),
             _t("r", "d", [0, 2, 1]), _t("d", "y", [0, 2, 1])]  # inverse pair
    model = make_model(nodes, [("x", [2, 3, 4])], [("y", [4, 2, 3])])
    graph, report = optimize_and_compare(model, "O2")
    assert op_types(graph).count("Transpose") == 1
    stats = _stats(report, "transpose_chains")
    assert stats["identity_transposes_removed"] == 1 and stats["transposes_cancelled"] == 2


def test_transpose_moving_only_unit_axes_becomes_reshape():
    nodes = [_t("x", "t", [1, 0, 2]), helper.make_node("Relu", ["t"], ["y"])]
    model = make_model(nodes, [("x", [1, 5, 4])], [("y", [5, 1, 4])])
    graph, report = optimize_and_compare(model, "O2")
    assert "Transpose" not in op_types(graph)
    assert _stats(report, "transpose_chains")["transposes_to_reshape"] == 1


def test_transposes_fold_into_gemm_flags_and_matmul_becomes_gemm():
    w = np.random.default_rng(0).standard_normal((4, 5)).astype(np.float32)
    nodes = [_t("a", "at", [1, 0]), _t("w", "wt", [1, 0]),
             helper.make_node("Gemm", ["at", "wt"], ["g"], transB=1),
             _t("b", "bt", [1, 0]),
             helper.make_node("MatMul", ["g", "bt"], ["y"])]
    model = make_model(nodes, [("a", [4, 3]), ("b", [2, 5])], [("y", [3, 2])], [("w", w)])
    graph, report = optimize_and_compare(model, "O2", disable=NO_FUSION)
    assert op_types(graph) == ["Gemm", "Gemm"]
    assert _stats(report, "transpose_absorb")["transposes_absorbed_into_gemm"] == 1
    assert _stats(report, "transpose_absorb")["matmuls_to_gemm"] == 1
    first = next(op for op in graph.ops.values() if op.inputs[0] == "a")
    assert first.attrs["transA"] == 1 and first.attrs.get("transB", 0) == 1


def test_nhwc_sandwich_cancels_through_elementwise_ops():
    """Transpose to NHWC, elementwise work with per-channel constants, transpose back."""
    rng = np.random.default_rng(1)
    bias = rng.standard_normal(8).astype(np.float32)         # broadcasts over NHWC's last axis
    scale = rng.standard_normal((1, 1, 1, 8)).astype(np.float32)
    nodes = [_t("x", "nhwc", [0, 2, 3, 1]),
             helper.make_node("Add", ["nhwc", "bias"], ["a"]),
             helper.make_node("Relu", ["a"], ["r"]),
             helper.make_node("Mul", ["r", "scale"], ["m"]),
             helper.make_node("Clip", ["m", "lo", "hi"], ["c"]),
             _t("c", "y", [0, 3, 1, 2])]
    model = make_model(nodes, [("x", [2, 8, 5, 6])], [("y", [2, 8, 5, 6])],
                       [("bias", bias), ("scale", scale), ("lo", np.array(-1, np.float32)),
                        ("hi", np.array(1, np.float32))])
    graph, report = optimize_and_compare(model, "O2", disable=NO_FUSION)
    assert "Transpose" not in op_types(graph)
    assert _stats(report, "transpose_push")["transposes_sunk"] == 4


def test_two_transposed_operands_meet_below_a_binary_op():
    nodes = [_t("a", "at", [1, 0, 2]), _t("b", "bt", [1, 0, 2]),
             helper.make_node("Mul", ["at", "bt"], ["m"]),
             _t("m", "y", [1, 0, 2])]
    model = make_model(nodes, [("a", [2, 3, 4]), ("b", [2, 3, 4])], [("y", [2, 3, 4])])
    graph, _ = optimize_and_compare(model, "O2")
    assert op_types(graph) == ["Mul"]


def test_sinking_through_axis_ops_permutes_their_axes():
    """Concat, Split, Slice, Pad, ReduceSum and Softmax read the untransposed tensors."""
    nodes = [_t("a", "at", [0, 2, 1]), _t("b", "bt", [0, 2, 1]),
             helper.make_node("Concat", ["at", "bt"], ["cat"], axis=1),          # [2, 8, 3]
             helper.make_node("Softmax", ["cat"], ["sm"], axis=1),
             helper.make_node("Split", ["sm", "sizes"], ["s0", "s1"], axis=2),    # 3 -> 1 + 2
             helper.make_node("Slice", ["s1", "st", "en", "ax"], ["sl"]),         # [2, 5, 2]
             helper.make_node("Pad", ["sl", "pads"], ["pd"]),                     # [2, 6, 2]
             helper.make_node("ReduceSum", ["s0", "rax"], ["rs"], keepdims=0),    # [2, 1]
             _t("pd", "y", [0, 2, 1]),
             helper.make_node("Identity", ["rs"], ["z"])]
    model = make_model(
        nodes, [("a", [2, 3, 4]), ("b", [2, 3, 4])], [("y", [2, 2, 6]), ("z", [2, 1])],
        [("sizes", np.array([1, 2], np.int64)), ("st", np.array([1], np.int64)),
         ("en", np.array([6], np.int64)), ("ax", np.array([1], np.int64)),
         ("pads", np.array([0, 1, 0, 0, 0, 0], np.int64)), ("rax", np.array([1], np.int64))])
    graph, report = optimize_and_compare(model, "O2")
    # the two input transposes became one per output at most: y's cancels, z is reduced
    assert op_types(graph).count("Transpose") == 0
    assert _stats(report, "transpose_push")["transposes_sunk"] >= 5


def test_model_outputs_keep_their_layout_and_shared_transposes_stay_correct():
    nodes = [_t("x", "t", [1, 0]),
             helper.make_node("Relu", ["t"], ["r"]),          # sinks: nothing to meet, stays
             helper.make_node("Sigmoid", ["t"], ["s"]),
             _t("s", "back", [1, 0]),                          # cancels with the shared one
             helper.make_node("Add", ["back", "x"], ["z"])]
    model = make_model(nodes, [("x", [3, 4])], [("r", [4, 3]), ("z", [3, 4]), ("t", [4, 3])])
    graph, _ = optimize_and_compare(model, "O2")
    assert graph.outputs == ["r", "z", "t"]
    assert op_types(graph).count("Transpose") == 1  # t is an output itself


def test_transpose_is_not_pushed_when_it_would_add_transposes():
    nodes = [_t("a", "at", [1, 0]),
             helper.make_node("Add", ["at", "b"], ["y"])]   # b is not transposed
    model = make_model(nodes, [("a", [3, 4]), ("b", [4, 3])], [("y", [4, 3])])
    graph, report = optimize_and_compare(model, "O2")
    assert op_types(graph) == ["Add", "Transpose"]
    assert "transposes_sunk" not in _stats(report, "transpose_push")


def test_transpose_through_matmul_with_constant_weight():
    w = np.random.default_rng(2).standard_normal((4, 6)).astype(np.float32)
    nodes = [_t("x", "t", [1, 0, 2]),
             helper.make_node("MatMul", ["t", "w"], ["m"]),
             _t("m", "y", [1, 0, 2])]
    model = make_model(nodes, [("x", [2, 3, 4])], [("y", [2, 3, 6])], [("w", w)])
    graph, _ = optimize_and_compare(model, "O2", rtol=1e-5, atol=1e-5, disable=NO_FUSION)
    assert op_types(graph) == ["MatMul"]


def test_transpose_of_a_constant_folds():
    w = np.arange(6, dtype=np.float32).reshape(2, 3)
    nodes = [_t("w", "wt", [1, 0]), helper.make_node("Add", ["x", "wt"], ["y"])]
    model = make_model(nodes, [("x", [3, 2])], [("y", [3, 2])], [("w", w)])
    graph, _ = optimize_and_compare(model, "O2")
    assert op_types(graph) == ["Add"]


def test_transposes_cancel_inside_if_and_loop_bodies():
    from onnx import TensorProto
    then_g = helper.make_graph(
        [_t("x", "t1", [1, 0]), helper.make_node("Relu", ["t1"], ["r"]), _t("r", "tout", [1, 0])],
        "then", [], [helper.make_tensor_value_info("tout", TensorProto.FLOAT, [2, 3])])
    else_g = helper.make_graph([helper.make_node("Neg", ["x"], ["eout"])], "else", [],
                               [helper.make_tensor_value_info("eout", TensorProto.FLOAT, [2, 3])])
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]),
         _t("carry", "ct", [1, 0]), _t("ct", "ct2", [1, 0]),
         helper.make_node("Add", ["ct2", "x"], ["carry_out"])], "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("carry", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("carry_out", TensorProto.FLOAT, [2, 3])])
    nodes = [helper.make_node("If", ["c"], ["y"], then_branch=then_g, else_branch=else_g),
             helper.make_node("Loop", ["n", "", "y"], ["z"], body=body)]
    model = make_model(nodes, [("x", [2, 3]), ("c", [], TensorProto.BOOL),
                               ("n", [], TensorProto.INT64)], [("z", [2, 3])])
    for cond in (True, False):
        feeds = {"x": np.arange(6, dtype=np.float32).reshape(2, 3) - 2, "c": np.array(cond),
                 "n": np.array(3)}
        graph, _ = optimize_and_compare(model, "O2", feeds=feeds)
        bodies = [op_types(sub) for op in graph.ops.values() for sub in op.subgraphs()]
        assert all("Transpose" not in kinds for kinds in bodies)
