"""O1 cleanup passes, differential against onnxruntime, with the rewrite counted."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

import graphopt
from oracle import make_model, op_types, optimize_and_compare, run_ort


def test_dead_code_is_removed_but_outputs_and_custom_ops_stay():
    nodes = [helper.make_node("Relu", ["x"], ["a"]),
             helper.make_node("Exp", ["x"], ["dead1"]),
             helper.make_node("Neg", ["dead1"], ["dead2"]),
             helper.make_node("Mystery", ["x"], ["side"], domain="com.example"),
             helper.make_node("Sigmoid", ["a"], ["y"])]
    model = make_model(nodes, [("x", [2, 3])], [("y", [2, 3])],
                       [("unused_w", np.ones((4, 4), np.float32))],
                       domains={"com.example": 1})
    graph = graphopt.load(model)
    report = graphopt.optimize(graph, "O1", verify="structural")
    assert op_types(graph) == ["Mystery", "Relu", "Sigmoid"]
    assert "unused_w" not in graph.values
    stats = report.stats_by_pass()["dead_code"]["stats"]
    assert stats["ops_removed"] == 2 and stats["constants_removed"] == 1
    # the custom op is written back untouched
    saved = graphopt.to_model(graph)
    custom = [n for n in saved.graph.node if n.domain == "com.example"][0]
    assert custom.SerializeToString() == nodes[3].SerializeToString()


def test_identity_chains_disappear():
    nodes = [helper.make_node("Identity", ["x"], ["i1"]),
             helper.make_node("Relu", ["i1"], ["r"]),
             helper.make_node("Identity", ["r"], ["i2"]),
             helper.make_node("Identity", ["i2"], ["y"])]
    model = make_model(nodes, [("x", [3, 4])], [("y", [3, 4])])
    graph, report = optimize_and_compare(model)
    assert op_types(graph) == ["Relu"]
    assert graph.outputs == ["y"]
    assert report.stats_by_pass()["remove_identity"]["stats"]["identities_removed"] == 3


def test_identity_from_input_to_output_is_kept():
    model = make_model([helper.make_node("Identity", ["x"], ["y"])], [("x", [2])], [("y", [2])])
    graph, _ = optimize_and_compare(model)
    assert op_types(graph) == ["Identity"]


def test_identity_of_a_constant_feeding_two_ops():
    w = np.arange(6, dtype=np.float32).reshape(2, 3)
    nodes = [helper.make_node("Identity", ["w"], ["wi"]),
             helper.make_node("Add", ["x", "wi"], ["a"]),
             helper.make_node("Mul", ["a", "wi"], ["y"])]
    model = make_model(nodes, [("x", [2, 3])], [("y", [2, 3])], [("w", w)])
    graph, _ = optimize_and_compare(model)
    assert op_types(graph) == ["Add", "Mul"]


def test_inference_dropout_is_removed_and_training_dropout_kept():
    nodes = [helper.make_node("Dropout", ["x", "ratio"], ["d1", "mask"]),
             helper.make_node("Relu", ["d1"], ["y"]),
             helper.make_node("Dropout", ["x", "ratio", "train"], ["z"])]
    model = make_model(nodes, [("x", [4, 5]), ("train", [], TensorProto.BOOL)],
                       [("y", [4, 5]), ("z", [4, 5])],
                       [("ratio", np.array(0.5, np.float32))])
    feeds = {"x": np.random.default_rng(0).standard_normal((4, 5)).astype(np.float32),
             "train": np.array(False)}
    graph, report = optimize_and_compare(model, feeds=feeds)
    assert op_types(graph) == ["Dropout", "Relu"]  # the one with a runtime training flag stays
    assert report.stats_by_pass()["remove_dropout"]["stats"]["dropouts_removed"] == 1


def test_dropout_whose_mask_is_used_stays():
    nodes = [helper.make_node("Dropout", ["x"], ["d", "mask"]),
             helper.make_node("Cast", ["mask"], ["y"], to=TensorProto.FLOAT),
             helper.make_node("Add", ["d", "y"], ["z"])]
    model = make_model(nodes, [("x", [3])], [("z", [3])])
    graph, _ = optimize_and_compare(model)
    assert "Dropout" in op_types(graph)


def test_cse_merges_twins_and_keeps_both_graph_outputs():
    nodes = [helper.make_node("Transpose", ["x"], ["t1"], perm=[1, 0]),
             helper.make_node("Transpose", ["x"], ["t2"], perm=[1, 0]),
             helper.make_node("Transpose", ["x"], ["t3"], perm=[0, 1]),
             helper.make_node("Add", ["t1", "t2"], ["y"]),
             helper.make_node("Relu", ["t1"], ["r1"]),
             helper.make_node("Relu", ["t2"], ["r2"]),
             helper.make_node("Add", ["r1", "r2"], ["z"])]
    model = make_model(nodes, [("x", [2, 3])], [("y", [3, 2]), ("z", [3, 2]), ("t3", [2, 3])])
    graph, report = optimize_and_compare(model)
    assert op_types(graph).count("Transpose") == 2  # perm differs: not merged
    assert op_types(graph).count("Relu") == 1
    assert report.stats_by_pass()["cse"]["stats"]["ops_merged"] == 2


def test_cse_merges_duplicate_constants_and_their_reshapes():
    shape1 = np.array([3, 2], np.int64)
    nodes = [helper.make_node("Reshape", ["x", "s1"], ["a"]),
             helper.make_node("Reshape", ["x", "s2"], ["b"]),
             helper.make_node("Add", ["a", "b"], ["y"])]
    model = make_model(nodes, [("x", [2, 3])], [("y", [3, 2])],
                       [("s1", shape1), ("s2", shape1.copy())])
    graph, report = optimize_and_compare(model)
    assert op_types(graph) == ["Add", "Reshape"]
    stats = report.stats_by_pass()["cse"]["stats"]
    assert stats["constants_merged"] == 1 and stats["ops_merged"] == 1


def test_random_ops_are_not_merged():
    nodes = [helper.make_node("RandomUniformLike", ["x"], ["r1"], seed=1.0),
             helper.make_node("RandomUniformLike", ["x"], ["r2"], seed=1.0),
             helper.make_node("Sub", ["r1", "r2"], ["y"])]
    model = make_model(nodes, [("x", [2, 2])], [("y", [2, 2])])
    graph = graphopt.load(model)
    graphopt.optimize(graph, "O1")
    assert op_types(graph).count("RandomUniformLike") == 2


def test_cleanup_inside_if_branches():
    then_g = helper.make_graph([helper.make_node("Identity", ["x"], ["ti"]),
                                helper.make_node("Relu", ["ti"], ["tout"]),
                                helper.make_node("Exp", ["x"], ["unused"])], "then", [],
                               [helper.make_tensor_value_info("tout", TensorProto.FLOAT, [3])])
    else_g = helper.make_graph([helper.make_node("Neg", ["x"], ["eout"])], "else", [],
                               [helper.make_tensor_value_info("eout", TensorProto.FLOAT, [3])])
    nodes = [helper.make_node("If", ["c"], ["y"], then_branch=then_g, else_branch=else_g)]
    model = make_model(nodes, [("x", [3]), ("c", [], TensorProto.BOOL)], [("y", [3])])
    x = np.array([-1, 0, 2], np.float32)
    for cond in (True, False):
        feeds = {"x": x, "c": np.array(cond)}
        graph, _ = optimize_and_compare(model, feeds=feeds)
        branch = next(iter(graph.ops.values())).attrs["then_branch"]
        assert op_types(branch) == ["Relu"]


def test_light_resnet50_is_unchanged_in_meaning_at_o1():
    import os
    path = os.path.join(os.path.dirname(onnx.__file__), "backend/test/data/light/light_resnet50.onnx")
    model = onnx.load(path)
    feeds = {"gpu_0/data_0": np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)}
    graph, _ = optimize_and_compare(model, feeds=feeds, rtol=1e-6, atol=1e-6)
    expected = run_ort(model, feeds)[0]
    np.testing.assert_array_equal(run_ort(graph, feeds)[0], expected)
