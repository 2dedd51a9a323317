"""graphopt.runtime.Session: feed checks, dynamic dims, memory release and peak, in-place
safety, fused epilogues, control flow, profiling, and the `graphopt run` command.

Differential tests compare against onnxruntime; memory tests assert exact byte counts worked out
by hand from the release plan.
"""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import graphopt
from graphopt.errors import GraphoptError, UnsupportedOpError, UsageError
from graphopt.runtime import Session
from graphopt.runtime.profile import Profile
from oracle import make_model, run_ort

LIGHT = os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data", "light")
F = TensorProto.FLOAT


def _run_both(model: onnx.ModelProto, feeds: dict, **session_kwargs):
    session = Session(model, **session_kwargs)
    ours = session.run(feeds)
    theirs = run_ort(model, feeds)
    for name, expected in zip(session.outputs, theirs):
        np.testing.assert_allclose(ours[name], expected, rtol=1e-5, atol=1e-6)
    return session, ours


# ---------------------------------------------------------------------------------------------
# feeds
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def conv_session() -> Session:
    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    model = make_model([helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])],
                       [("x", ["N", 3, 8, 8])], [("y", ["N", 4, 8, 8])], [("w", w)])
    return Session(model)


@pytest.mark.parametrize("feeds, message", [
    ({"X": np.zeros((1, 3, 8, 8), np.float32)}, "unknown input 'X'; the model's inputs are: x"),
    ({}, "missing input 'x' (float32[N,3,8,8])"),
    ({"x": np.zeros((1, 3, 8, 8), np.float64)}, "input 'x' has dtype float64, the model expects float32"),
    ({"x": np.zeros((3, 8, 8), np.float32)}, "input 'x' has shape (3, 8, 8) (rank 3), the model expects rank 4"),
    ({"x": np.zeros((1, 2, 8, 8), np.float32)}, "input 'x' has 2 at dim 1, the model expects 3"),
])
def test_feed_errors_are_one_line_usage_errors(conv_session, feeds, message):
    with pytest.raises(UsageError) as info:
        conv_session.run(feeds)
    assert message in str(info.value)
    assert "\n" not in str(info.value)
    assert info.value.exit_code == 2


def test_symbolic_batch_resolves_at_run_time(conv_session):
    model = graphopt.to_model(conv_session.graph)
    rng = np.random.default_rng(1)
    for batch in (1, 3, 5):
        x = rng.standard_normal((batch, 3, 8, 8)).astype(np.float32)
        (expected,) = run_ort(model, {"x": x})
        got = conv_session.run({"x": x})["y"]
        assert got.shape == (batch, 4, 8, 8)
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_dynamic_shape_arithmetic_differential():
    """Shape -> Gather -> Unsqueeze -> Concat -> Reshape (BERT-style), at several sizes."""
    nodes = [
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("Gather", ["s", "zero"], ["batch"], axis=0),
        helper.make_node("Unsqueeze", ["batch", "axes0"], ["batch1"]),
        helper.make_node("Concat", ["batch1", "minus1"], ["target"], axis=0),
        helper.make_node("Reshape", ["x", "target"], ["flat"]),
        helper.make_node("ReduceSum", ["flat", "axes1"], ["y"], keepdims=0),
    ]
    inits = [("zero", np.array(0, np.int64)), ("axes0", np.array([0], np.int64)),
             ("minus1", np.array([-1], np.int64)), ("axes1", np.array([1], np.int64))]
    model = make_model(nodes, [("x", ["B", "T", 4])], [("y", ["B"])], inits)
    session = Session(model)
    rng = np.random.default_rng(2)
    for b, t in [(1, 1), (2, 7), (5, 3)]:
        x = rng.standard_normal((b, t, 4)).astype(np.float32)
        np.testing.assert_allclose(session.run({"x": x})["y"], run_ort(model, {"x": x})[0], rtol=1e-5)


def test_unsupported_op_named_at_build():
    model = make_model([helper.make_node("Relu", ["x"], ["a"]),
                        helper.make_node("FancyOp", ["a"], ["y"], domain="com.example")],
                       [("x", [2])], [("y", [2])], domains={"com.example": 1})
    with pytest.raises(UnsupportedOpError, match=r"no kernel for: com\.example\.FancyOp"):
        Session(model)


def test_kernel_failure_names_the_op():
    model = make_model([helper.make_node("Reshape", ["x", "shape"], ["y"], name="bad_reshape")],
                       [("x", [6]), ("shape", [2], TensorProto.INT64)], [("y", None)])
    session = Session(model)
    with pytest.raises(GraphoptError, match="Reshape op 'bad_reshape' failed"):
        session.run({"x": np.zeros(6, np.float32), "shape": np.array([4, 4], np.int64)})


def test_intermediate_values_can_be_requested():
    model = make_model([helper.make_node("Exp", ["x"], ["a"]), helper.make_node("Neg", ["a"], ["y"])],
                       [("x", [3])], [("y", [3])])
    session = Session(model)
    x = np.array([0.0, 1.0, 2.0], np.float32)
    out = session.run({"x": x}, ["a", "y"])
    np.testing.assert_allclose(out["a"], np.exp(x), rtol=1e-6)
    np.testing.assert_allclose(out["y"], -np.exp(x), rtol=1e-6)
    assert list(session.run({"x": x}, ["a"])) == ["a"]
    with pytest.raises(UsageError, match="no value named 'zzz'"):
        session.run({"x": x}, ["zzz"])


# ---------------------------------------------------------------------------------------------
# memory: release after last use, peak, in place
# ---------------------------------------------------------------------------------------------
def _concat_chain() -> onnx.ModelProto:
    # a = Exp(x) 4000 B; b = Concat(a, a) 8000 B; c = Concat(b, b) 16000 B; y = ReduceSum(c) 4 B
    nodes = [helper.make_node("Exp", ["x"], ["a"]),
             helper.make_node("Concat", ["a", "a"], ["b"], axis=0),
             helper.make_node("Concat", ["b", "b"], ["c"], axis=0),
             helper.make_node("ReduceSum", ["c"], ["y"], keepdims=0)]
    return make_model(nodes, [("x", [1000])], [("y", [])])


def test_buffers_are_released_after_their_last_use():
    session = Session(_concat_chain())
    x = np.linspace(-1, 1, 1000).astype(np.float32)
    y = session.run({"x": x})["y"]
    np.testing.assert_allclose(y, 4 * np.exp(x).sum(), rtol=1e-5)
    # Live at once at worst: b and c (a was dropped after the first Concat). Without releases it
    # would be a + b + c + y = 28004.
    assert session.peak_bytes == 8000 + 16000


def test_views_count_once_and_inputs_are_not_counted():
    # a = Exp(x) 4000 B; v = Reshape(a) is a view of a; y = Add(v, v) 4000 B (no in-place: a
    # view of a buffer still referenced... a dies at Reshape, v owns it alone, so Add reuses it).
    nodes = [helper.make_node("Exp", ["x"], ["a"]),
             helper.make_node("Reshape", ["a", "shape"], ["v"]),
             helper.make_node("Add", ["v", "v"], ["y"])]
    model = make_model(nodes, [("x", [1000])], [("y", [10, 100])],
                       [("shape", np.array([10, 100], np.int64))])
    session = Session(model)
    x = np.linspace(-1, 1, 1000).astype(np.float32)
    y = session.run({"x": x})["y"]
    np.testing.assert_allclose(y, 2 * np.exp(x).reshape(10, 100), rtol=1e-6)
    assert session.peak_bytes == 4000   # a and its view: one buffer; Add wrote into it
    no_inplace = Session(model, inplace=False)
    no_inplace.run({"x": x})
    assert no_inplace.peak_bytes == 8000


def test_in_place_chain_reuses_one_buffer():
    nodes = [helper.make_node("Exp", ["x"], ["a"]), helper.make_node("Relu", ["a"], ["b"]),
             helper.make_node("Sigmoid", ["b"], ["c"]), helper.make_node("Neg", ["c"], ["y"])]
    model = make_model(nodes, [("x", [256, 256])], [("y", [256, 256])])
    x = np.random.default_rng(3).standard_normal((256, 256)).astype(np.float32)
    session, out = _run_both(model, {"x": x})
    assert session.peak_bytes == 256 * 256 * 4
    plain = Session(model, inplace=False)
    np.testing.assert_array_equal(plain.run({"x": x})["y"], out["y"])
    assert plain.peak_bytes == 2 * 256 * 256 * 4


def test_in_place_never_clobbers_a_live_view():
    # a dies at Neg, but its transpose v is still live (an output): Neg must not write into a.
    nodes = [helper.make_node("Exp", ["x"], ["a"]),
             helper.make_node("Transpose", ["a"], ["v"], perm=[1, 0]),
             helper.make_node("Neg", ["a"], ["n"]),
             helper.make_node("Identity", ["v"], ["vt"])]
    model = make_model(nodes, [("x", [2, 3])], [("n", [2, 3]), ("vt", [3, 2])])
    x = np.arange(6, dtype=np.float32).reshape(2, 3) / 6
    _, out = _run_both(model, {"x": x})
    np.testing.assert_allclose(out["vt"], np.exp(x).T, rtol=1e-6)


def test_concurrent_runs_of_one_session_keep_views_intact():
    """Buffer accounting is per thread, so in-place decisions of one run never see another's."""
    import threading
    nodes = [helper.make_node("Exp", ["x"], ["a"]),
             helper.make_node("Transpose", ["a"], ["v"], perm=[1, 0]),
             helper.make_node("Neg", ["a"], ["n"]),
             helper.make_node("Identity", ["v"], ["vt"])]
    session = Session(make_model(nodes, [("x", [32, 32])], [("n", [32, 32]), ("vt", [32, 32])]))
    wrong = []

    def work(seed: int) -> None:
        x = np.random.default_rng(seed).standard_normal((32, 32)).astype(np.float32)
        for _ in range(100):
            out = session.run({"x": x})
            if not (np.allclose(out["vt"], np.exp(x).T) and np.allclose(out["n"], -np.exp(x))):
                wrong.append(seed)
    threads = [threading.Thread(target=work, args=(seed,)) for seed in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not wrong


def test_in_place_never_writes_feeds_or_constants():
    nodes = [helper.make_node("Reshape", ["x", "shape"], ["r"]),   # a view of the feed
             helper.make_node("Relu", ["r"], ["y"]),
             helper.make_node("Add", ["c", "y"], ["z"])]
    model = make_model(nodes, [("x", [4])], [("z", [2, 2])],
                       [("shape", np.array([2, 2], np.int64)),
                        ("c", np.full((2, 2), 10.0, np.float32))])
    session = Session(model)
    x = np.array([-1.0, 2.0, -3.0, 4.0], np.float32)
    kept = x.copy()
    for _ in range(2):   # a second run sees unchanged constants
        z = session.run({"x": x})["z"]
        np.testing.assert_array_equal(z, 10 + np.maximum(kept, 0).reshape(2, 2))
    np.testing.assert_array_equal(x, kept)


# ---------------------------------------------------------------------------------------------
# fused epilogues
# ---------------------------------------------------------------------------------------------
def _conv_residual_relu(meta: bool, residual_is_output: bool = False) -> onnx.ModelProto:
    rng = np.random.default_rng(4)
    w = rng.standard_normal((8, 8, 3, 3)).astype(np.float32) * 0.2
    nodes = [helper.make_node("Conv", ["x", "w"], ["conv_out"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Add", ["conv_out", "x"], ["sum_out"], name="add"),
             helper.make_node("Relu", ["sum_out"], ["y"], name="relu")]
    if meta:
        for node in nodes[1:]:
            entry = node.metadata_props.add()
            entry.key, entry.value = "graphopt.fuse_into", "conv"
    outputs = [("y", [1, 8, 16, 16])] + ([("sum_out", [1, 8, 16, 16])] if residual_is_output else [])
    return make_model(nodes, [("x", [1, 8, 16, 16])], outputs, [("w", w)])


def test_fused_conv_add_relu_matches_unfused_and_uses_less_memory():
    x = np.random.default_rng(5).standard_normal((1, 8, 16, 16)).astype(np.float32)
    fused = Session(_conv_residual_relu(meta=True))
    assert fused.fused == [("conv", ("add", "relu"))]
    y_fused = fused.run({"x": x})["y"]
    unfused = Session(_conv_residual_relu(meta=False), inplace=False)
    assert unfused.fused == []
    y_unfused = unfused.run({"x": x})["y"]
    np.testing.assert_array_equal(y_fused, y_unfused)
    np.testing.assert_allclose(y_fused, run_ort(_conv_residual_relu(meta=False), {"x": x})[0],
                               rtol=1e-4, atol=1e-5)
    tensor = 8 * 16 * 16 * 4
    assert fused.peak_bytes == tensor          # one buffer: conv_out, then sum_out, then y
    assert unfused.peak_bytes == 2 * tensor    # each op allocates its output
    assert fused.peak_bytes < unfused.peak_bytes


def test_fusion_is_skipped_when_the_intermediate_is_needed_elsewhere():
    session = Session(_conv_residual_relu(meta=True, residual_is_output=True))
    # sum_out is a graph output: Relu cannot overwrite it; Add can still write conv_out's buffer.
    assert session.fused == [("conv", ("add",))]
    x = np.random.default_rng(6).standard_normal((1, 8, 16, 16)).astype(np.float32)
    out = session.run({"x": x})
    expected = run_ort(_conv_residual_relu(meta=False, residual_is_output=True), {"x": x})
    np.testing.assert_allclose(out["y"], expected[0], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(out["sum_out"], expected[1], rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# control flow
# ---------------------------------------------------------------------------------------------
def test_if_runs_the_chosen_branch_with_outer_values():
    then_graph = helper.make_graph([helper.make_node("Add", ["x", "bias"], ["t"])], "then", [],
                                   [helper.make_tensor_value_info("t", F, [3])])
    else_graph = helper.make_graph([helper.make_node("Mul", ["x", "x"], ["e"])], "else", [],
                                   [helper.make_tensor_value_info("e", F, [3])])
    nodes = [helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0),
             helper.make_node("Greater", ["s", "zero"], ["cond"]),
             helper.make_node("If", ["cond"], ["y"], then_branch=then_graph, else_branch=else_graph)]
    model = make_model(nodes, [("x", [3])], [("y", [3])],
                       [("bias", np.array([1, 2, 3], np.float32)), ("zero", np.array(0, np.float32))])
    for x in (np.array([1, 2, 3], np.float32), np.array([-1, -2, 0.5], np.float32)):
        _run_both(model, {"x": x})


def test_loop_with_carried_value_scan_output_and_outer_scope():
    body = helper.make_graph(
        [helper.make_node("Add", ["acc_in", "step"], ["acc_out"]),          # step: outer scope
         helper.make_node("Identity", ["cond_in"], ["cond_out"]),
         helper.make_node("Cast", ["i"], ["i_f"], to=F),
         helper.make_node("Mul", ["acc_out", "i_f"], ["scan"])],
        "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("acc_in", F, [2])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("acc_out", F, [2]),
         helper.make_tensor_value_info("scan", F, [2])])
    nodes = [helper.make_node("Relu", ["x"], ["step"]),
             helper.make_node("Loop", ["trips", "", "init"], ["final", "scans"], body=body)]
    model = make_model(nodes, [("x", [2]), ("trips", [], TensorProto.INT64)],
                       [("final", [2]), ("scans", [None, 2])],
                       [("init", np.array([0.5, -1.0], np.float32))])
    for trips in (0, 1, 4):
        session = Session(model)
        out = session.run({"x": np.array([1.0, 2.0], np.float32), "trips": np.array(trips)})
        expected = run_ort(model, {"x": np.array([1.0, 2.0], np.float32), "trips": np.array(trips)})
        np.testing.assert_allclose(out["final"], expected[0], rtol=1e-6)
        assert out["scans"].shape == expected[1].shape
        np.testing.assert_allclose(out["scans"], expected[1], rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# profile
# ---------------------------------------------------------------------------------------------
def test_profile_accumulates_per_op_and_per_type():
    nodes = [helper.make_node("Exp", ["x"], ["a"], name="exp1"),
             helper.make_node("Exp", ["a"], ["b"], name="exp2"),
             helper.make_node("Neg", ["b"], ["y"], name="neg")]
    session = Session(make_model(nodes, [("x", [64])], [("y", [64])]), profile=True)
    x = np.zeros(64, np.float32)
    for _ in range(3):
        session.run({"x": x})
    profile = session.profile
    assert isinstance(profile, Profile)
    assert profile.runs == 3
    assert set(profile.by_op) == {"exp1", "exp2", "neg"}
    assert profile.op_types == {"exp1": "Exp", "exp2": "Exp", "neg": "Neg"}
    by_type = profile.by_op_type()
    assert set(by_type) == {"Exp", "Neg"}
    assert by_type["Exp"] == pytest.approx(profile.by_op["exp1"] + profile.by_op["exp2"])
    assert all(seconds > 0 for seconds in profile.by_op.values())
    table = profile.table()
    lines = table.splitlines()
    assert lines[0].split() == ["op", "type", "count", "total", "ms", "ms/run", "share"]
    assert {lines[1].split()[0], lines[2].split()[0]} == {"Exp", "Neg"}
    assert "over 3 run(s)" in lines[-1]
    data = profile.to_dict()
    assert data["runs"] == 3 and set(data["by_op_type"]) == {"Exp", "Neg"}
    assert Session(make_model(nodes, [("x", [64])], [("y", [64])])).profile is None


# ---------------------------------------------------------------------------------------------
# real models
# ---------------------------------------------------------------------------------------------
def test_light_resnet50_matches_shipped_output_under_30mb():
    session = Session(os.path.join(LIGHT, "light_resnet50.onnx"))
    (spec,) = session.inputs
    n = int(np.prod(spec.shape))
    x = (np.arange(n).reshape(spec.shape) / n).astype(np.float32)   # onnx's dummy input
    y = session.run({spec.name: x})[session.outputs[0]]
    expected = onnx.numpy_helper.to_array(
        onnx.load_tensor(os.path.join(LIGHT, "light_resnet50_output_0.pb")))
    np.testing.assert_allclose(y, expected, rtol=1e-3, atol=1e-7)
    assert 0 < session.peak_bytes < 30_000_000


# ---------------------------------------------------------------------------------------------
# graphopt run
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def cli(capsys):
    """Run `graphopt run ARGS` in process; returns (exit code, stdout, stderr)."""
    from graphopt.cli import main

    def call(*args: str):
        code = main(["run", *args])
        captured = capsys.readouterr()
        return code, captured.out, captured.err
    return call


@pytest.fixture(scope="module")
def small_model(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("run") / "small.onnx"
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"),
             helper.make_node("ReduceSum", ["r"], ["y"], keepdims=0, name="sum")]
    onnx.save(make_model(nodes, [("x", ["N", 4])], [("y", [])]), path)
    return str(path)


def test_run_prints_outputs_and_profile(cli, small_model, tmp_path):
    x = np.array([[1, -2, 3, -4]], np.float32)
    np.save(tmp_path / "x.npy", x)
    code, out, err = cli(small_model, "--input", f"x={tmp_path / 'x.npy'}", "--profile", "--runs", "2")
    assert code == 0, err
    assert "y: shape () float32  4.0" in out
    assert "ReduceSum" in out and "Relu" in out and "over 2 run(s)" in out


def test_run_synthetic_inputs_need_shapes_for_symbolic_dims(cli, small_model):
    code, out, err = cli(small_model)
    assert code == 2
    assert "--shape x=1,4" in err and len(err.strip().splitlines()) == 1
    code, out, err = cli(small_model, "--shape", "x=2,4")
    assert code == 0, err
    assert "note: input 'x' not given: synthetic float32[2, 4] (seed 0)" in out


@pytest.mark.parametrize("make_args, message", [
    (lambda m, d: ["/no/such/model.onnx"], "no such file"),
    (lambda m, d: [m, "--input", f"x={d / 'garbage.npy'}"], "cannot read"),
    (lambda m, d: [m, "--input", f"z={d / 'good.npy'}"], "has no input 'z'"),
    (lambda m, d: [m, "--input", f"x={d / 'wrong_shape.npy'}"], "has 5 at dim 1, the model expects 4"),
    (lambda m, d: [m, "--input", f"x={d / 'wrong_dtype.npy'}"], "dtype float64"),
])
def test_run_bad_inputs_exit_2_with_one_line(cli, small_model, tmp_path, make_args, message):
    (tmp_path / "garbage.npy").write_text("not numpy")
    np.save(tmp_path / "good.npy", np.zeros((1, 4), np.float32))
    np.save(tmp_path / "wrong_shape.npy", np.zeros((1, 5), np.float32))
    np.save(tmp_path / "wrong_dtype.npy", np.zeros((1, 4), np.float64))
    code, out, err = cli(*make_args(small_model, tmp_path))
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], err


def test_memory_mapped_values_are_accounted_without_recursion(tmp_path):
    """np.memmap is an ndarray subclass: releasing one (an external weight gathered through a
    view, as the >2 GB DLRM does) must not recurse."""
    import numpy as np
    from graphopt.runtime.memory import LiveBuffers

    path = tmp_path / "w.bin"
    np.arange(12, dtype=np.float32).tofile(path)
    mapped = np.memmap(path, dtype=np.float32, mode="r", shape=(3, 4))
    live = LiveBuffers()
    live.reset()
    live.add(mapped)
    live.add(mapped[1])
    assert live.current == 48
    live.remove(mapped[1])
    live.remove(mapped)
    assert live.current == 0 and live.peak == 48
