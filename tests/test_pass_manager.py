"""The pass manager: ordering, fixpoints, disabling, timing, and verification modes."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper

import graphopt
from graphopt.errors import GraphoptError
from graphopt.pass_manager import (Fixpoint, Pass, PassContext, PassManager, PassResult,
                                   VerificationError)
from graphopt.passes.cleanup import DeadCodeElimination, RemoveIdentity
from oracle import make_model, op_types


def relu_chain(n: int = 3):
    nodes = [helper.make_node("Relu", ["x" if i == 0 else f"r{i - 1}"], [f"r{i}"]) for i in range(n)]
    nodes.append(helper.make_node("Identity", [f"r{n - 1}"], ["y"]))
    return make_model(nodes, [("x", [2, 3])], [("y", [2, 3])])


class NegateReluPass(Pass):
    """Deliberately wrong: turns the first Relu into a Neg."""

    name = "wrong_negate"

    def run(self, graph, ctx):
        result = PassResult()
        for op in graph.ops.values():
            if op.op_type == "Relu":
                op.op_type = "Neg"
                result.count("relus_broken")
                break
        return result


class CollapseOneRelu(Pass):
    """Correct: Relu(Relu(x)) == Relu(x); removes one Relu per run, to exercise fixpoints."""

    name = "collapse_relu"

    def run(self, graph, ctx):
        from graphopt.passes.cleanup import bypass
        result = PassResult()
        for op in graph.topological_ops():
            src = graph.producer_op(op.inputs[0]) if op.inputs and op.inputs[0] else None
            if op.op_type == "Relu" and src is not None and src.op_type == "Relu":
                if bypass(graph, op):
                    result.count("relus_collapsed")
                    return result
        return result


class BreakInvariants(Pass):
    name = "break_ir"

    def run(self, graph, ctx):
        op = next(iter(graph.ops.values()))
        op._inputs = ("nonexistent",)
        return PassResult(changed=True)


def test_numeric_verification_names_the_wrong_pass():
    graph = graphopt.load(relu_chain())
    manager = PassManager([RemoveIdentity(), CollapseOneRelu(), NegateReluPass(),
                           DeadCodeElimination()], verify="numeric")
    with pytest.raises(VerificationError, match="wrong_negate"):
        manager.run(graph)


def test_numeric_verification_passes_correct_pipeline():
    graph = graphopt.load(relu_chain(4))
    report = PassManager([Fixpoint("g", [CollapseOneRelu(), RemoveIdentity()])],
                         verify="numeric").run(graph)
    assert report.verified is True and report.verify_backend == "onnxruntime"
    assert report.max_abs_diff == 0.0
    assert op_types(graph) == ["Relu"]


def test_fixpoint_repeats_until_nothing_changes():
    graph = graphopt.load(relu_chain(5))
    report = PassManager([Fixpoint("collapse", [CollapseOneRelu()], max_iterations=10)]).run(graph)
    runs = [r for r in report.records if r.name == "collapse_relu"]
    assert [r.changed for r in runs] == [True] * 4 + [False]
    assert [r.iteration for r in runs] == list(range(5))
    assert report.stats_by_pass()["collapse_relu"]["stats"] == {"relus_collapsed": 4}
    assert all(r.seconds >= 0 for r in runs)


def test_fixpoint_respects_max_iterations():
    graph = graphopt.load(relu_chain(6))
    PassManager([Fixpoint("collapse", [CollapseOneRelu()], max_iterations=2)]).run(graph)
    assert op_types(graph).count("Relu") == 4


def test_disable_by_name():
    graph = graphopt.load(relu_chain())
    report = graphopt.optimize(graph, "O1", disable=["remove_identity"])
    assert "Identity" in op_types(graph)
    assert "remove_identity" not in report.stats_by_pass()


def test_disable_unknown_pass_is_a_usage_error():
    with pytest.raises(GraphoptError, match="unknown pass"):
        graphopt.optimize(graphopt.load(relu_chain()), "O1", disable=["no_such_pass"])


def test_structural_verification_catches_broken_invariants():
    graph = graphopt.load(relu_chain())
    with pytest.raises(VerificationError, match="break_ir"):
        PassManager([BreakInvariants()], verify="structural").run(graph)


def test_report_dict_counts_ops():
    graph = graphopt.load(relu_chain())
    report = graphopt.optimize(graph, "O1")
    data = report.to_dict()
    assert data["ops_before"] == 4 and data["ops_after"] == 3
    assert data["op_types_after"] == {"Relu": 3}
    assert any(p["name"] == "remove_identity" and p["stats"] == {"identities_removed": 1}
               for p in data["passes"])


def test_context_options_reach_passes():
    seen = {}

    class Probe(Pass):
        name = "probe"

        def run(self, graph, ctx: PassContext):
            seen["limit"] = ctx.option("limit")
            return PassResult()

    PassManager([Probe()], context=PassContext({"limit": 7})).run(graphopt.load(relu_chain()))
    assert seen == {"limit": 7}


def test_numeric_verification_with_given_feeds():
    graph = graphopt.load(relu_chain())
    feeds = {"x": np.full((2, 3), -1.0, np.float32)}
    # Negating a Relu of all-negative inputs... still changes outputs (0 vs 1): caught.
    with pytest.raises(VerificationError, match="wrong_negate"):
        PassManager([NegateReluPass()], verify="numeric", verify_feeds=feeds).run(graph)


def test_opt_in_pass_runs_only_when_enabled():
    class OptInCollapse(CollapseOneRelu):
        name = "opt_in_collapse"
        default_enabled = False

    graph = graphopt.load(relu_chain(3))
    report = PassManager([Fixpoint("g", [OptInCollapse()])]).run(graph)
    assert op_types(graph).count("Relu") == 3 and not report.records
    report = PassManager([Fixpoint("g", [OptInCollapse()])], enable=["opt_in_collapse"]).run(graph)
    assert op_types(graph).count("Relu") == 1
    with pytest.raises(GraphoptError, match="cannot enable unknown"):
        PassManager([OptInCollapse()], enable=["nope"])


def test_head_split_is_opt_in_at_o2():
    from graphopt.pipeline import opt_in_passes
    assert opt_in_passes("O2") == ["head_split"]
