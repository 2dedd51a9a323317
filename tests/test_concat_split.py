"""Concat, Split and Slice elimination at O2: differential against onnxruntime, counted."""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper

from oracle import make_model, op_types, optimize_and_compare


def _stats(report, name):
    return report.stats_by_pass().get(name, {}).get("stats", {})


def _ints(*values):
    return np.array(values, dtype=np.int64)


def _slice(src, dst, start, end, axis, prefix):
    return (helper.make_node("Slice", [src, f"{prefix}_s", f"{prefix}_e", f"{prefix}_a"], [dst]),
            [(f"{prefix}_s", _ints(start)), (f"{prefix}_e", _ints(end)),
             (f"{prefix}_a", _ints(axis))])


def test_single_input_concat_and_one_output_split_disappear():
    nodes = [helper.make_node("Concat", ["x"], ["c"], axis=0),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("Split", ["r"], ["s"], axis=1),
             helper.make_node("Neg", ["s"], ["y"])]
    model = make_model(nodes, [("x", [2, 3])], [("y", [2, 3])])
    graph, report = optimize_and_compare(model, "O2")
    assert op_types(graph) == ["Neg", "Relu"]
    assert _stats(report, "concat_simplify")["single_input_concats_removed"] == 1
    assert _stats(report, "split_slice_simplify")["single_output_splits_removed"] == 1


def test_nested_concats_on_one_axis_flatten():
    nodes = [helper.make_node("Concat", ["a", "b"], ["ab"], axis=1),
             helper.make_node("Concat", ["ab", "c"], ["abc"], axis=1),
             helper.make_node("Concat", ["a", "c"], ["ac"], axis=0),   # other axis: stays
             helper.make_node("Concat", ["ac", "e"], ["y2"], axis=1)]
    model = make_model(nodes, [("a", [2, 2]), ("b", [2, 3]), ("c", [2, 2]), ("e", [4, 1])],
                       [("abc", [2, 7]), ("y2", [4, 3])])
    graph, report = optimize_and_compare(model, "O2")
    assert op_types(graph).count("Concat") == 3
    assert _stats(report, "concat_simplify")["nested_concats_flattened"] == 1


def test_split_then_concat_in_order_is_the_input():
    nodes = [helper.make_node("Split", ["x", "sizes"], ["p", "q", "r"], axis=1),
             helper.make_node("Concat", ["p", "q", "r"], ["c"], axis=1),
             helper.make_node("Relu", ["c"], ["y"]),
             helper.make_node("Concat", ["q", "r"], ["tail"], axis=1)]   # a contiguous part
    model = make_model(nodes, [("x", [2, 6])], [("y", [2, 6]), ("tail", [2, 5])],
                       [("sizes", _ints(1, 2, 3))])
    graph, report = optimize_and_compare(model, "O2")
    assert op_types(graph) == ["Relu", "Slice"]
    stats = _stats(report, "concat_simplify")
    assert stats["concats_of_whole_tensor_removed"] == 1 and stats["adjacent_slices_merged"] == 1


def test_concat_of_in_order_slices_is_the_tensor():
    s1, i1 = _slice("x", "a", 0, 2, 0, "s1")
    s2, i2 = _slice("x", "b", 2, 2**62, 0, "s2")
    nodes = [s1, s2, helper.make_node("Concat", ["a", "b"], ["c"], axis=0),
             helper.make_node("Sigmoid", ["c"], ["y"])]
    model = make_model(nodes, [("x", [5, 3])], [("y", [5, 3])], i1 + i2)
    graph, _ = optimize_and_compare(model, "O2")
    assert op_types(graph) == ["Sigmoid"]


def test_split_of_a_concat_reads_the_pieces():
    nodes = [helper.make_node("Concat", ["a", "b"], ["c"], axis=1),
             helper.make_node("Split", ["c", "sizes"], ["p", "q"], axis=1),
             helper.make_node("Add", ["p", "p"], ["y"]),
             helper.make_node("Mul", ["q", "q"], ["z"])]
    model = make_model(nodes, [("a", [2, 3]), ("b", [2, 4])], [("y", [2, 3]), ("z", [2, 4])],
                       [("sizes", _ints(3, 4))])
    graph, report = optimize_and_compare(model, "O2")
    assert op_types(graph) == ["Add", "Mul"]
    assert _stats(report, "split_slice_simplify")["concat_split_pairs_removed"] == 1


def test_slice_of_a_concat_reads_one_input_and_the_concat_stays_for_others():
    sl, inits = _slice("c", "part", 3, 5, 1, "s")
    nodes = [helper.make_node("Concat", ["a", "b"], ["c"], axis=1), sl,
             helper.make_node("Relu", ["part"], ["y"])]
    model = make_model(nodes, [("a", [2, 3]), ("b", [2, 4])], [("y", [2, 2]), ("c", [2, 7])], inits)
    graph, _ = optimize_and_compare(model, "O2")
    assert op_types(graph) == ["Concat", "Relu", "Slice"]
    sl_op = next(op for op in graph.ops.values() if op.op_type == "Slice")
    assert sl_op.inputs[0] == "b"


def test_full_range_slice_goes_and_slice_chains_merge():
    full, i0 = _slice("x", "f", 0, 2**62, 1, "f")
    first, i1 = _slice("f", "a", 1, 7, 1, "a")
    second, i2 = _slice("a", "b", 2, 4, 1, "b")
    nodes = [full, first, second, helper.make_node("Neg", ["b"], ["y"])]
    model = make_model(nodes, [("x", [2, 8])], [("y", [2, 2])], i0 + i1 + i2)
    graph, report = optimize_and_compare(model, "O2")
    assert op_types(graph) == ["Neg", "Slice"]
    stats = _stats(report, "split_slice_simplify")
    assert stats["noop_slices_removed"] == 1 and stats["slice_chains_merged"] == 1


def test_slices_that_tile_an_axis_become_one_split():
    parts = [_slice("x", f"p{i}", 2 * i, 2 * i + 2, 2, f"s{i}") for i in range(3)]
    nodes = [p[0] for p in parts] + [helper.make_node("Sum", ["p0", "p1", "p2"], ["y"])]
    model = make_model(nodes, [("x", [2, 3, 6])], [("y", [2, 3, 2])],
                       [i for p in parts for i in p[1]])
    graph, report = optimize_and_compare(model, "O2")
    assert op_types(graph) == ["Split", "Sum"]
    assert _stats(report, "split_slice_simplify")["slices_to_split"] == 3


def test_concat_and_split_of_constants_fold():
    nodes = [helper.make_node("Concat", ["c1", "c2"], ["c"], axis=0),
             helper.make_node("Split", ["c", "sizes"], ["s1", "s2"], axis=0),
             helper.make_node("Add", ["x", "s2"], ["y"])]
    model = make_model(nodes, [("x", [3])], [("y", [3])],
                       [("c1", np.ones(2, np.float32)), ("c2", np.arange(3, dtype=np.float32)),
                        ("sizes", _ints(2, 3))])
    graph, _ = optimize_and_compare(model, "O2")
    assert op_types(graph) == ["Add"]


def test_split_with_a_shared_concat_and_dynamic_shapes_is_left_correct():
    nodes = [helper.make_node("Concat", ["a", "b"], ["c"], axis=0),
             helper.make_node("Split", ["c"], ["p", "q"], axis=0),
             helper.make_node("Sub", ["p", "q"], ["y"])]
    a = helper.make_tensor_value_info("a", TensorProto.FLOAT, ["n", 2])
    b = helper.make_tensor_value_info("b", TensorProto.FLOAT, ["n", 2])
    model = make_model(nodes, [a, b], [("y", ["n", 2]), ("c", ["m", 2])])
    feeds = {"a": np.ones((3, 2), np.float32), "b": np.full((3, 2), 2, np.float32)}
    graph, _ = optimize_and_compare(model, "O2", feeds=feeds)
    assert "Concat" in op_types(graph)
