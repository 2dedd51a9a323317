"""The IR: invariants, mutation helpers, subgraph scoping."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import graphopt
from graphopt.errors import IRError
from graphopt.ir import IMPLICIT, Graph
from oracle import make_model, run_ort


def chain_graph() -> Graph:
    g = Graph("chain")
    g.add_input("x", TensorProto.FLOAT, (2, 3))
    w = g.add_const(np.ones((2, 3), np.float32), "w")
    a = g.add_op("Add", ["x", w], ["a"])
    g.add_op("Relu", ["a"], ["y"])
    g.outputs.append("y")
    g.check()
    assert a.inputs == ("x", "w")
    return g


def test_add_op_links_producer_and_consumers():
    g = chain_graph()
    add = g.producer_op("a")
    relu = g.producer_op("y")
    assert add.op_type == "Add" and relu.op_type == "Relu"
    assert g.consumers("a") == [(relu, 0)]
    assert [op.op_type for op in g.topological_ops()] == ["Add", "Relu"]
    assert g.const_value("w").sum() == 6


def test_same_value_on_two_slots_is_two_edges():
    g = chain_graph()
    mul = g.add_op("Mul", ["y", "y"], ["z"])
    g.outputs.append("z")
    assert sorted(slot for _, slot in g.consumers("y")) == [0, 1]
    g.set_input(mul, 1, "a")
    g.check()
    assert g.consumers("y") == [(mul, 0)]


def test_second_producer_is_refused():
    g = chain_graph()
    with pytest.raises(IRError, match="already has a producer"):
        g.add_op("Neg", ["x"], ["a"])


def test_check_catches_tampering():
    g = chain_graph()
    relu = g.producer_op("y")
    relu._inputs = ("x",)  # bypass the helpers
    with pytest.raises(IRError, match="disagree"):
        g.check()


def test_cycle_is_reported_with_an_op_name():
    g = Graph("cyc")
    g.add_input("x", TensorProto.FLOAT, (1,))
    g.add_value("b")
    g.add_op("Add", ["x", "b"], ["a"], name="first")
    g.add_op("Relu", ["a"], ["b"], name="second")
    g.outputs.append("b")
    with pytest.raises(IRError, match="cycle"):
        g.check()


def test_replace_value_keeps_output_name():
    g = chain_graph()
    relu = g.producer_op("y")
    g.remove_op(relu, prune=False)
    assert g.replace_value(g.values["y"], g.values["a"])
    g.check()
    assert g.outputs == ["y"]
    assert g.producer_op("y").op_type == "Add"


def test_replace_value_refuses_to_rename_a_graph_input():
    g = Graph()
    g.add_input("x", TensorProto.FLOAT, (1,))
    g.add_op("Identity", ["x"], ["y"])
    g.outputs.append("y")
    ident = g.producer_op("y")
    g.remove_op(ident, prune=False)
    assert not g.replace_value(g.values["y"], g.values["x"])


def test_fresh_names_are_unique_across_subgraphs():
    model = _if_model()
    g = graphopt.load(model)
    names = {g.fresh_name("then_out") for _ in range(3)}
    assert len(names) == 3 and "then_out" not in names


def _if_model() -> onnx.ModelProto:
    """If whose branches read `x` and `w` from the outer scope."""
    then_g = helper.make_graph([helper.make_node("Add", ["x", "w"], ["then_out"])], "then", [],
                               [helper.make_tensor_value_info("then_out", TensorProto.FLOAT, [3])])
    else_g = helper.make_graph([helper.make_node("Sub", ["x", "w"], ["else_out"])], "else", [],
                               [helper.make_tensor_value_info("else_out", TensorProto.FLOAT, [3])])
    nodes = [helper.make_node("Identity", ["x0"], ["x"]),
             helper.make_node("If", ["c"], ["y"], then_branch=then_g, else_branch=else_g)]
    return make_model(nodes, [("x0", [3]), ("c", [], TensorProto.BOOL)], [("y", [3])],
                      [("w", np.arange(3, dtype=np.float32))])


def test_subgraph_outer_references_are_implicit_edges():
    g = graphopt.load(_if_model())
    if_op = next(op for op in g.ops.values() if op.op_type == "If")
    implicit = sorted(v.name for v, _, k in g.nx.in_edges(if_op, keys=True) if k == IMPLICIT)
    assert implicit == ["w", "x"]
    then_g = if_op.attrs["then_branch"]
    assert then_g.values["x"].outer and then_g.parent is g and then_g.owner is if_op


def test_replace_all_uses_reaches_into_subgraphs():
    model = _if_model()
    g = graphopt.load(model)
    ident = g.producer_op("x")
    g.remove_op(ident, prune=False)
    assert g.replace_value(g.values["x"], g.values["x0"])
    g.check()
    if_op = next(op for op in g.ops.values() if op.op_type == "If")
    assert "x0" in if_op.attrs["then_branch"].values
    assert "x" not in if_op.attrs["else_branch"].values
    feeds = {"x0": np.array([1, 2, 3], np.float32), "c": np.array(False)}
    assert np.array_equal(run_ort(g, feeds)[0], run_ort(model, feeds)[0])
    feeds["c"] = np.array(True)
    assert np.array_equal(run_ort(g, feeds)[0], run_ort(model, feeds)[0])


def test_initializer_that_is_also_an_input_is_not_constant():
    model = make_model([helper.make_node("Relu", ["x"], ["y"])], [("x", [2])], [("y", [2])],
                       [("x", np.ones(2, np.float32))])
    g = graphopt.load(model)
    assert g.values["x"].is_const and g.const_value("x") is None
