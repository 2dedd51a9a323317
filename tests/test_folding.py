"""Constant folding: differential against onnxruntime, with the folding counted."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

import graphopt
from graphopt import models
from graphopt.models import light
from oracle import make_model, op_types, optimize_and_compare, run_ort


def _stats(report, name="constant_folding"):
    return report.stats_by_pass().get(name, {}).get("stats", {})


def _const_node(name, array):
    return helper.make_node("Constant", [], [name], value=onnx.numpy_helper.from_array(array))


def test_constant_nodes_become_initializers():
    nodes = [_const_node("c", np.arange(6, dtype=np.float32).reshape(2, 3)),
             helper.make_node("Constant", [], ["s"], value_float=2.0),
             helper.make_node("Add", ["x", "c"], ["a"]),
             helper.make_node("Mul", ["a", "s"], ["y"])]
    model = make_model(nodes, [("x", [2, 3])], [("y", [2, 3])])
    graph, report = optimize_and_compare(model, "O1")
    assert op_types(graph) == ["Add", "Mul"]
    assert _stats(report)["constants_materialized"] == 2
    assert graph.values["s"].const.shape == ()  # a scalar stays a scalar


def test_all_constant_subgraph_folds_to_one_initializer():
    w = np.arange(12, dtype=np.float32).reshape(3, 4)
    nodes = [helper.make_node("Transpose", ["w"], ["wt"], perm=[1, 0]),
             helper.make_node("Reshape", ["wt", "shape"], ["wr"]),
             helper.make_node("Mul", ["wr", "two"], ["w2"]),
             helper.make_node("Add", ["x", "w2"], ["y"])]
    model = make_model(nodes, [("x", [2, 6])], [("y", [2, 6])],
                       [("w", w), ("shape", np.array([2, 6], np.int64)),
                        ("two", np.array(2, np.float32))])
    graph, report = optimize_and_compare(model, "O1")
    assert op_types(graph) == ["Add"]
    assert _stats(report)["ops_folded"] == 3
    np.testing.assert_array_equal(graph.const_value(graph.ops[max(graph.ops)].inputs[1]),
                                  (w.T.reshape(2, 6) * 2))


def test_shape_chain_of_a_static_shape_folds_into_a_constant_reshape_target():
    # Shape -> Gather -> Unsqueeze -> Concat -> Reshape, as exporters write a flatten
    nodes = [helper.make_node("Relu", ["x"], ["r"]),
             helper.make_node("Shape", ["r"], ["shape"]),
             helper.make_node("Gather", ["shape", "zero"], ["batch"], axis=0),
             helper.make_node("Unsqueeze", ["batch", "axes0"], ["batch1"]),
             helper.make_node("Concat", ["batch1", "minus_one"], ["target"], axis=0),
             helper.make_node("Reshape", ["r", "target"], ["y"])]
    model = make_model(nodes, [("x", [2, 3, 4])], [("y", [2, 12])],
                       [("zero", np.array(0, np.int64)), ("axes0", np.array([0], np.int64)),
                        ("minus_one", np.array([-1], np.int64))])
    graph, report = optimize_and_compare(model, "O1")
    assert op_types(graph) == ["Relu", "Reshape"]
    stats = _stats(report)
    assert stats["shapes_folded"] == 1 and stats["ops_folded"] == 3
    reshape = next(op for op in graph.ops.values() if op.op_type == "Reshape")
    assert graph.const_value(reshape.inputs[1]).tolist() == [2, -1]


def test_shape_of_a_symbolic_value_is_not_folded():
    nodes = [helper.make_node("Shape", ["x"], ["s"]),
             helper.make_node("Cast", ["s"], ["y"], to=TensorProto.FLOAT)]
    model = make_model(nodes, [("x", ["n", 3])], [("y", [2])])
    feeds = {"x": np.zeros((5, 3), np.float32)}
    graph, _ = optimize_and_compare(model, "O1", feeds=feeds)
    assert op_types(graph) == ["Cast", "Shape"]


def _constant_of_shape(name, shape_name, value=0.5):
    return helper.make_node("ConstantOfShape", [shape_name], [name],
                            value=helper.make_tensor("v", TensorProto.FLOAT, [1], [value]))


def test_large_expanding_ops_stay_unless_options_or_a_weight_need_them():
    big = np.array([512, 1024], np.int64)  # 2 MiB of float32
    nodes = [_constant_of_shape("fill", "big"),
             helper.make_node("Add", ["x", "fill"], ["y"]),
             _constant_of_shape("small_fill", "small"),
             helper.make_node("Mul", ["y", "small_fill"], ["z"])]
    model = make_model(nodes, [("x", [512, 1024])], [("z", [512, 1024])],
                       [("big", big), ("small", np.array([1024], np.int64))])
    graph, _ = optimize_and_compare(model, "O1")
    assert op_types(graph) == ["Add", "ConstantOfShape", "Mul"]  # the small one folded
    graph, _ = optimize_and_compare(model, "O1", options={"fold_size_limit": 4 << 20})
    assert op_types(graph) == ["Add", "Mul"]


def test_a_large_conv_weight_made_by_constant_of_shape_folds():
    nodes = [_constant_of_shape("w", "wshape", 0.01),
             helper.make_node("Conv", ["x", "w"], ["y"], kernel_shape=[3, 3], pads=[1, 1, 1, 1])]
    model = make_model(nodes, [("x", [1, 256, 4, 4])], [("y", [1, 256, 4, 4])],
                       [("wshape", np.array([256, 256, 3, 3], np.int64))])  # 2.25 MiB
    graph, report = optimize_and_compare(model, "O1", rtol=1e-4, atol=1e-4)
    assert op_types(graph) == ["Conv"]
    assert _stats(report)["ops_folded"] == 1


def test_light_model_weights_fold_and_the_shipped_output_is_reproduced():
    name = "light-shufflenet"
    model = models.build(name)
    feeds = light.light_input(model)
    graph, report = optimize_and_compare(model, "O1", feeds=feeds, rtol=1e-5, atol=1e-6)
    assert "ConstantOfShape" not in op_types(graph)
    assert _stats(report)["ops_folded"] == 243
    # IR 3 lists initializers as inputs: the saved model still does, and nothing unused is left
    saved = graphopt.to_model(graph)
    assert saved.ir_version == 3
    assert {t.name for t in saved.graph.initializer} <= {i.name for i in saved.graph.input}
    used = {n for node in saved.graph.node for n in node.input}
    assert all(t.name in used for t in saved.graph.initializer)
    np.testing.assert_allclose(run_ort(saved, feeds)[0], light.light_expected_output(name),
                               rtol=1e-3, atol=1e-6)


def test_unknown_domains_and_random_ops_are_not_folded():
    nodes = [helper.make_node("Mystery", ["c"], ["m"], domain="com.example"),
             helper.make_node("RandomUniform", [], ["r"], shape=[2], seed=3.0),
             helper.make_node("Add", ["r", "c"], ["y"])]
    model = make_model(nodes, [], [("y", [2]), ("m", [2])], [("c", np.ones(2, np.float32))],
                       domains={"com.example": 1})
    graph = graphopt.load(model)
    graphopt.optimize(graph, "O2")
    assert op_types(graph) == ["Add", "Mystery", "RandomUniform"]


def test_a_folded_graph_output_keeps_its_name_and_value():
    nodes = [_const_node("c", np.arange(3, dtype=np.float32)),
             helper.make_node("Neg", ["c"], ["y"]),
             helper.make_node("Relu", ["x"], ["z"])]
    model = make_model(nodes, [("x", [3])], [("y", [3]), ("z", [3])])
    graph, _ = optimize_and_compare(model, "O1")
    assert graph.outputs == ["y", "z"]
    assert op_types(graph) == ["Relu"]
    np.testing.assert_array_equal(graph.values["y"].const, -np.arange(3, dtype=np.float32))


def test_folding_inside_a_subgraph():
    then_g = helper.make_graph(
        [_const_node("tc", np.full(3, 2.0, np.float32)),
         helper.make_node("Mul", ["tc", "tc"], ["t4"]),
         helper.make_node("Add", ["x", "t4"], ["tout"])], "then", [],
        [helper.make_tensor_value_info("tout", TensorProto.FLOAT, [3])])
    else_g = helper.make_graph([helper.make_node("Neg", ["x"], ["eout"])], "else", [],
                               [helper.make_tensor_value_info("eout", TensorProto.FLOAT, [3])])
    nodes = [helper.make_node("If", ["cond"], ["y"], then_branch=then_g, else_branch=else_g)]
    model = make_model(nodes, [("x", [3]), ("cond", [], TensorProto.BOOL)], [("y", [3])])
    feeds = {"x": np.arange(3, dtype=np.float32), "cond": np.array(True)}
    graph, _ = optimize_and_compare(model, "O1", feeds=feeds)
    branch = next(iter(graph.ops.values())).attrs["then_branch"]
    assert op_types(branch) == ["Add"]
