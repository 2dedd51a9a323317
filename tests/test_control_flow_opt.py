"""If/Loop/Scan bodies: optimized recursively where safe, never broken.

Every model here runs through O1 and O2; onnxruntime runs the original and the result on the same
inputs (they must agree, and the result must pass the onnx checker), the graphopt runtime runs
both as well, and each test asserts the rewrite it is about happened (or, for the traps, that the
graph still reads what it must). The traps are outer-scope references: a value of the main graph
read inside a body must keep its producer and its name, whatever the main graph's passes do.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import graphopt
from fuzz.differential import check_case, optimize_model
from graphopt.ir import Graph
from oracle import make_model

LEVELS = ("O1", "O2")
FLOAT = TensorProto.FLOAT


def _vi(name: str, shape=None, dtype: int = FLOAT) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, dtype, shape)


def _optimized(model: onnx.ModelProto, feeds: dict[str, np.ndarray], level: str, *,
               runtime: bool = True) -> Graph:
    """Check the level against onnxruntime (and the runtime); return the optimized graph."""
    stages = (level,)
    if runtime:
        stages += ("runtime",) + (("runtime-O2",) if level == "O2" else ())
    failures = check_case(model, feeds, stages).failures
    assert not failures, "\n".join(map(str, failures))
    graph, _ = optimize_model(model, level)
    return graph


def _body_ops(graph: Graph, op_type: str) -> list[str]:
    """Op types inside the subgraphs of the first `op_type` op of the main graph."""
    owner = next(op for op in graph.ops.values() if op.op_type == op_type)
    return sorted(o.op_type for sub in owner.subgraphs() for o in sub.ops.values())


def _feeds(**shapes) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}


# ---------------------------------------------------------------------------------------------
# If
# ---------------------------------------------------------------------------------------------
def _if_model(then_nodes, then_out, else_nodes, else_out, main_nodes, outputs, inits=(),
              cond="cond") -> onnx.ModelProto:
    then_g = helper.make_graph(then_nodes, "then", [], [_vi(then_out)])
    else_g = helper.make_graph(else_nodes, "else", [], [_vi(else_out)])
    nodes = list(main_nodes) + [helper.make_node("If", [cond], ["if_out"], then_branch=then_g,
                                                 else_branch=else_g)]
    return make_model(nodes, [("x", [2, 3, 4]), ("cond", [], TensorProto.BOOL)],
                      outputs, list(inits))


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("cond", [True, False])
def test_if_branches_are_cleaned_inside(level, cond):
    """Identity chains, Dropout, duplicate ops and dead ops inside both branches go away."""
    then_nodes = [helper.make_node("Identity", ["x"], ["t1"]),
                  helper.make_node("Dropout", ["t1"], ["t2"]),
                  helper.make_node("Relu", ["t2"], ["t3"]),
                  helper.make_node("Relu", ["t2"], ["t4"]),
                  helper.make_node("Exp", ["t2"], ["t_dead"]),
                  helper.make_node("Add", ["t3", "t4"], ["t_out"])]
    else_nodes = [helper.make_node("Identity", ["x"], ["e1"]),
                  helper.make_node("Neg", ["e1"], ["e_out"])]
    model = _if_model(then_nodes, "t_out", else_nodes, "e_out", [], [("if_out", None)])
    feeds = _feeds(x=(2, 3, 4)) | {"cond": np.array(cond)}
    graph = _optimized(model, feeds, level)
    assert _body_ops(graph, "If") == ["Add", "Neg", "Relu"]


@pytest.mark.parametrize("cond", [True, False])
def test_transpose_pair_inside_a_branch_cancels(cond):
    then_nodes = [helper.make_node("Transpose", ["x"], ["t1"], perm=[0, 2, 1]),
                  helper.make_node("Sigmoid", ["t1"], ["t2"]),
                  helper.make_node("Transpose", ["t2"], ["t_out"], perm=[0, 2, 1])]
    else_nodes = [helper.make_node("Tanh", ["x"], ["e_out"])]
    model = _if_model(then_nodes, "t_out", else_nodes, "e_out", [], [("if_out", None)])
    graph = _optimized(model, _feeds(x=(2, 3, 4)) | {"cond": np.array(cond)}, "O2")
    assert "Transpose" not in _body_ops(graph, "If")


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("cond", [True, False])
def test_outer_transpose_read_by_a_body_and_by_a_cancelling_partner(level, cond):
    """Main graph: t = Transpose(x); back = Transpose(t) (inverse, cancels); a branch reads t.
    Cancelling the pair must keep t (and its producer) for the branch."""
    main = [helper.make_node("Transpose", ["x"], ["t"], perm=[0, 2, 1]),
            helper.make_node("Transpose", ["t"], ["back"], perm=[0, 2, 1]),
            helper.make_node("Relu", ["back"], ["main_out"])]
    then_nodes = [helper.make_node("Sigmoid", ["t"], ["t_out"])]
    else_nodes = [helper.make_node("Neg", ["t"], ["e_out"])]
    model = _if_model(then_nodes, "t_out", else_nodes, "e_out", main,
                      [("main_out", [2, 3, 4]), ("if_out", None)])
    graph = _optimized(model, _feeds(x=(2, 3, 4)) | {"cond": np.array(cond)}, level)
    if level == "O2":  # the main graph's pair cancelled, one Transpose stays for the branch
        assert graph.count_ops("Transpose") == 1


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("cond", [True, False])
def test_identity_read_only_inside_a_body(level, cond):
    """i = Identity(x) is read only by the branches: removing it must rename the branches'
    outer references to x."""
    main = [helper.make_node("Identity", ["x"], ["i"])]
    then_nodes = [helper.make_node("Add", ["i", "i"], ["t_out"])]
    else_nodes = [helper.make_node("Mul", ["i", "i"], ["e_out"])]
    model = _if_model(then_nodes, "t_out", else_nodes, "e_out", main, [("if_out", None)])
    graph = _optimized(model, _feeds(x=(2, 3, 4)) | {"cond": np.array(cond)}, level)
    assert graph.count_ops("Identity") == 0
    graph.check()


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("cond", [True, False])
def test_branch_output_that_is_an_outer_value_via_identity(level, cond):
    """then: out = Identity(x) with x from the main graph. The Identity may go only if the
    branch output can still name a value; the model must stay valid either way."""
    then_nodes = [helper.make_node("Identity", ["x"], ["t_out"])]
    else_nodes = [helper.make_node("Neg", ["x"], ["e_out"])]
    model = _if_model(then_nodes, "t_out", else_nodes, "e_out", [], [("if_out", None)])
    _optimized(model, _feeds(x=(2, 3, 4)) | {"cond": np.array(cond)}, level)


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("cond", [True, False])
def test_cse_does_not_merge_across_scopes_wrongly(level, cond):
    """The same Relu(x) in the main graph and in a branch, and a branch-local twin pair: the
    twins inside the branch merge; the branch keeps computing its own value (or reads the outer
    one) but never points at a value of another branch."""
    main = [helper.make_node("Relu", ["x"], ["r_main"]),
            helper.make_node("Relu", ["x"], ["r_main2"]),
            helper.make_node("Add", ["r_main", "r_main2"], ["main_out"])]
    then_nodes = [helper.make_node("Relu", ["x"], ["r1"]),
                  helper.make_node("Relu", ["x"], ["r2"]),
                  helper.make_node("Mul", ["r1", "r2"], ["t_out"])]
    else_nodes = [helper.make_node("Relu", ["x"], ["r3"]),
                  helper.make_node("Sub", ["r3", "r_main"], ["e_out"])]
    model = _if_model(then_nodes, "t_out", else_nodes, "e_out", main,
                      [("main_out", [2, 3, 4]), ("if_out", None)])
    graph = _optimized(model, _feeds(x=(2, 3, 4)) | {"cond": np.array(cond)}, level)
    assert graph.count_ops("Relu") == 1  # the main graph's twins merged
    if_op = next(op for op in graph.ops.values() if op.op_type == "If")
    then_g, else_g = if_op.attrs["then_branch"], if_op.attrs["else_branch"]
    assert sorted(o.op_type for o in then_g.ops.values()).count("Relu") <= 1
    graph.check()
    assert else_g is not then_g


@pytest.mark.parametrize("level", LEVELS)
def test_main_graph_op_read_only_by_a_body_is_not_dead(level):
    """DCE: the main graph's Sigmoid is read only inside the branches."""
    main = [helper.make_node("Sigmoid", ["x"], ["s"])]
    then_nodes = [helper.make_node("Neg", ["s"], ["t_out"])]
    else_nodes = [helper.make_node("Abs", ["s"], ["e_out"])]
    model = _if_model(then_nodes, "t_out", else_nodes, "e_out", main, [("if_out", None)])
    graph = _optimized(model, _feeds(x=(2, 3, 4)) | {"cond": np.array(False)}, level)
    assert graph.count_ops("Sigmoid") == 1


# ---------------------------------------------------------------------------------------------
# Loop
# ---------------------------------------------------------------------------------------------
def _loop_model(body_nodes, main_nodes=(), inits=(), extra_outputs=()) -> onnx.ModelProto:
    """Loop over M iterations: carried v (like x) and a scan output per iteration."""
    body = helper.make_graph(
        body_nodes, "body",
        [_vi("iter", [], TensorProto.INT64), _vi("cond_in", [], TensorProto.BOOL),
         _vi("v_in", [2, 3])],
        [_vi("cond_out", [], TensorProto.BOOL), _vi("v_out", [2, 3]), _vi("scan_out", [2, 3])])
    nodes = list(main_nodes) + [helper.make_node("Loop", ["M", "", "x"], ["v_final", "scans"],
                                                 body=body)]
    outputs = [("v_final", [2, 3]), ("scans", ["M", 2, 3])] + list(extra_outputs)
    return make_model(nodes, [("x", [2, 3]), ("M", [], TensorProto.INT64)], outputs, list(inits))


@pytest.mark.parametrize("level", LEVELS)
def test_loop_body_optimized_with_outer_constant_and_outer_value(level):
    """Body: Identity, a Transpose pair, Dropout, an Add of an outer initializer and a Mul of an
    outer computed value; the carried value and the condition pass through."""
    main = [helper.make_node("Tanh", ["x"], ["outer_t"])]
    body = [helper.make_node("Identity", ["cond_in"], ["cond_out"]),
            helper.make_node("Transpose", ["v_in"], ["tv"], perm=[1, 0]),
            helper.make_node("Transpose", ["tv"], ["v1"], perm=[1, 0]),
            helper.make_node("Dropout", ["v1"], ["v2"]),
            helper.make_node("Add", ["v2", "w"], ["v3"]),
            helper.make_node("Mul", ["v3", "outer_t"], ["v4"]),
            helper.make_node("Mul", ["v4", "half"], ["v_out"]),
            helper.make_node("Identity", ["v_out"], ["scan_out"])]
    inits = [("w", np.full((2, 3), 0.1, np.float32)), ("half", np.array(0.5, np.float32))]
    model = _loop_model(body, main, inits)
    feeds = _feeds(x=(2, 3)) | {"M": np.array(3, np.int64)}
    # runtime=False: the runtime's Loop aliasing bug (test_runtime_loop_scan_outputs_...) hits
    # this model; the optimizer's result is checked against onnxruntime.
    graph = _optimized(model, feeds, level, runtime=False)
    ops = _body_ops(graph, "Loop")
    assert "Dropout" not in ops
    if level == "O2":
        assert "Transpose" not in ops


@pytest.mark.parametrize("view", ["Identity", "Reshape"])
def test_runtime_loop_scan_outputs_keep_each_iteration(view):
    """Found by the control-flow tests: body v_out = Add(view(v_in), 1), scan_out = v_out. The
    graphopt runtime returned the last iteration's value for every scan row (3,3,3 for 1,2,3).
    Fixed in runtime/session.py: subgraph inputs are read-only, like feeds."""
    view_node = helper.make_node("Identity", ["v_in"], ["tv"]) if view == "Identity" else \
        helper.make_node("Reshape", ["v_in", "shape"], ["tv"])
    body = [helper.make_node("Identity", ["cond_in"], ["cond_out"]), view_node,
            helper.make_node("Add", ["tv", "one"], ["v_out"]),
            helper.make_node("Identity", ["v_out"], ["scan_out"])]
    model = _loop_model(body, inits=[("one", np.array(1.0, np.float32)),
                                     ("shape", np.array([2, 3], np.int64))])
    feeds = {"x": np.zeros((2, 3), np.float32), "M": np.array(3, np.int64)}
    failures = check_case(model, feeds, ("runtime",)).failures
    assert not failures, "\n".join(map(str, failures))


@pytest.mark.parametrize("level", LEVELS)
def test_loop_carried_passthrough_identity_is_kept_valid(level):
    """v_out = Identity(v_in): a body output that is a body input cannot take its name; the body
    must stay valid (the Identity stays or is replaced by something equivalent)."""
    body = [helper.make_node("Identity", ["cond_in"], ["cond_out"]),
            helper.make_node("Identity", ["v_in"], ["v_out"]),
            helper.make_node("Add", ["v_in", "x"], ["scan_out"])]  # x: outer graph input
    model = _loop_model(body)
    _optimized(model, _feeds(x=(2, 3)) | {"M": np.array(4, np.int64)}, level)


@pytest.mark.parametrize("level", LEVELS)
def test_if_nested_in_a_loop_reads_a_value_two_scopes_up(level):
    main = [helper.make_node("Sigmoid", ["x"], ["sx"]),
            helper.make_node("Identity", ["sx"], ["sx_id"])]
    inner_then = helper.make_graph([helper.make_node("Add", ["v_in", "sx_id"], ["it"])],
                                   "inner_then", [], [_vi("it")])
    inner_else = helper.make_graph([helper.make_node("Sub", ["v_in", "sx_id"], ["ie"])],
                                   "inner_else", [], [_vi("ie")])
    body = [helper.make_node("Identity", ["cond_in"], ["cond_out"]),
            helper.make_node("Cast", ["iter"], ["iter_f"], to=FLOAT),
            helper.make_node("Less", ["iter_f", "two"], ["early"]),
            helper.make_node("If", ["early"], ["v_out"], then_branch=inner_then,
                             else_branch=inner_else),
            helper.make_node("Identity", ["v_out"], ["scan_out"])]
    model = _loop_model(body, main, [("two", np.array(2.0, np.float32))])
    graph = _optimized(model, _feeds(x=(2, 3)) | {"M": np.array(4, np.int64)}, level)
    assert graph.count_ops("Identity") == 0  # sx_id went; the nested branches read sx now
    graph.check()


# ---------------------------------------------------------------------------------------------
# Scan
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("level", LEVELS)
def test_scan_body_optimized(level):
    """Scan over the rows of xs with a running sum; the body holds removable ops and reads an
    outer value."""
    main = [helper.make_node("Relu", ["bias_in"], ["bias"])]
    body = helper.make_graph(
        [helper.make_node("Identity", ["row"], ["row_id"]),
         helper.make_node("Transpose", ["row_id"], ["row_t"], perm=[0]),
         helper.make_node("Add", ["acc_in", "row_t"], ["acc_sum"]),
         helper.make_node("Add", ["acc_sum", "bias"], ["acc_out"]),
         helper.make_node("Mul", ["row_t", "row_t"], ["sq1"]),
         helper.make_node("Mul", ["row_t", "row_t"], ["sq2"]),
         helper.make_node("Add", ["sq1", "sq2"], ["y_row"])],
        "scan_body", [_vi("acc_in", [4]), _vi("row", [4])],
        [_vi("acc_out", [4]), _vi("y_row", [4])])
    nodes = main + [helper.make_node("Scan", ["acc0", "xs"], ["acc", "ys"], body=body,
                                     num_scan_inputs=1)]
    model = make_model(nodes, [("acc0", [4]), ("xs", [5, 4]), ("bias_in", [4])],
                       [("acc", [4]), ("ys", [5, 4])])
    feeds = _feeds(acc0=(4,), xs=(5, 4), bias_in=(4,))
    graph = _optimized(model, feeds, level)
    ops = _body_ops(graph, "Scan")
    assert "Identity" not in ops and ops.count("Mul") == 1
    if level == "O2":
        assert "Transpose" not in ops


def test_optimized_control_flow_model_round_trips_through_save(tmp_path):
    """The O2 result of a model with all three control-flow ops saves, reloads and still runs
    in onnxruntime."""
    then_g = helper.make_graph([helper.make_node("Identity", ["x"], ["t_out"])], "then", [],
                               [_vi("t_out")])
    else_g = helper.make_graph([helper.make_node("Neg", ["x"], ["e_out"])], "else", [],
                               [_vi("e_out")])
    model = make_model([helper.make_node("If", ["cond"], ["y"], then_branch=then_g,
                                         else_branch=else_g)],
                       [("x", [2, 3, 4]), ("cond", [], TensorProto.BOOL)], [("y", None)])
    graph = graphopt.load(model)
    graphopt.optimize(graph, "O2", verify="structural")
    graphopt.save(graph, tmp_path / "cf.onnx")
    reloaded = onnx.load(tmp_path / "cf.onnx")
    onnx.checker.check_model(reloaded, full_check=True)
    feeds = _feeds(x=(2, 3, 4)) | {"cond": np.array(False)}
    assert not check_case(reloaded, feeds, ("O1",)).failures
