"""One test per failure the differential fuzzer found (tests/fuzz, benchmarks/fuzz.py), each the
shrunk reproducer written out by hand. (Seed numbers name the generator as it was when the bug
was found; the generator has grown motifs since, which changes the graph of every seed.)

A bug that is not fixed yet is `xfail(strict=True)` with the owning file in its reason: CI stays
green, and the test turns into an unexpected pass (a failure, by strictness) the moment the fix
lands, so whoever fixes it drops the marker.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

from fuzz.differential import check_case
from oracle import make_model


def _assert_clean(model: onnx.ModelProto, feeds: dict[str, np.ndarray], stages) -> None:
    failures = check_case(model, feeds, stages).failures
    assert not failures, "\n".join(map(str, failures))


# ---------------------------------------------------------------------------------------------
# optimizer
# ---------------------------------------------------------------------------------------------
def _unsqueeze_squeeze(opset: int, axes: list[int], shape: list[int]) -> onnx.ModelProto:
    """x -> Unsqueeze(axes) -> Squeeze(axes): the identity."""
    if opset >= 13:
        nodes = [helper.make_node("Unsqueeze", ["x", "ax1"], ["u"]),
                 helper.make_node("Squeeze", ["u", "ax2"], ["y"])]
        inits = [("ax1", np.array(axes, np.int64)), ("ax2", np.array(axes, np.int64))]
    else:
        nodes = [helper.make_node("Unsqueeze", ["x"], ["u"], axes=axes),
                 helper.make_node("Squeeze", ["u"], ["y"], axes=axes)]
        inits = []
    return make_model(nodes, [("x", shape)], [("y", shape)], inits, opset=opset,
                      ir_version=7 if opset < 13 else 8)


@pytest.mark.parametrize("opset, axes, shape", [
    (18, [1], [1, 13]),        # fuzz seed 432: Squeeze axis 1 of the un-unsqueezed [1, 13]
    (17, [3], [2, 5, 6]),      # seed 675: axis 3 out of range for rank 3
    (18, [2, 3], [1, 6, 4]),   # seed 822
    (12, [4], [2, 2, 5, 1]),   # seed 971: axes as attribute (opset < 13)
    (17, [0], [1, 12, 1, 8]),  # seed 1015: squeezes the wrong dim, output rank 3 instead of 4
])
def test_unsqueeze_then_squeeze_of_the_same_axes_is_the_identity(opset, axes, shape):
    """reshape_simplify ("view_chains_merged") rewired the Squeeze to read the Unsqueeze's input
    but kept the Squeeze's axes: an invalid model (checker/onnxruntime reject it) or, when the
    axes happen to name size-1 dims, a wrong output shape. Fixed in b0ca6a0 (passes/reshape.py:
    an identity view chain becomes an Identity)."""
    model = _unsqueeze_squeeze(opset, axes, shape)
    feeds = {"x": np.random.default_rng(0).standard_normal(shape).astype(np.float32)}
    _assert_clean(model, feeds, ("O2", "runtime-O2"))


@pytest.mark.parametrize("concat_axis, pieces", [(3, 2), (0, 3)])
def test_channel_shuffle_whose_output_died_in_the_same_round(concat_axis, pieces):
    """Fuzz seeds 3430, 3542: a channel shuffle read only by a Concat that a Split undoes. In the
    manipulation fixpoint, split_slice_simplify points the Split at the Concat's inputs first;
    the shuffle's output then has no reader when channel_shuffle absorbs it, and O2 crashed."""
    shape = [1, 12, 1, 6]
    nodes = [helper.make_node("Reshape", ["x", "grouped_shape"], ["grouped"]),
             helper.make_node("Transpose", ["grouped"], ["swapped"], perm=[0, 2, 1, 3, 4]),
             helper.make_node("Constant", [], ["back_shape"], value=onnx.numpy_helper.from_array(
                 np.array(shape, np.int64))),
             helper.make_node("Reshape", ["swapped", "back_shape"], ["shuffled"]),
             helper.make_node("Concat", ["shuffled"] + ["other"] * (pieces - 1), ["cat"],
                              axis=concat_axis),
             helper.make_node("Split", ["cat"], [f"piece{i}" for i in range(pieces)],
                              axis=concat_axis, num_outputs=pieces)]
    model = make_model(nodes, [("x", shape), ("other", shape)], [(f"piece{pieces - 1}", shape)],
                       [("grouped_shape", np.array([1, 2, 6, 1, 6], np.int64))], opset=18)
    rng = np.random.default_rng(0)
    feeds = {n: rng.standard_normal(shape).astype(np.float32) for n in ("x", "other")}
    _assert_clean(model, feeds, ("O2",))


def test_zero_d_constant_node_stays_zero_d_when_materialized():
    """Fuzz seed 1394 (fixed in fe20184): a 0-d Constant node index turned into an initializer
    was saved 1-d (np.ascontiguousarray), so Gather's output rank changed and the checker failed."""
    nodes = [helper.make_node("Constant", [], ["idx"],
                              value=onnx.numpy_helper.from_array(np.array(1, np.int64))),
             helper.make_node("Gather", ["x", "idx"], ["y"], axis=0)]
    model = make_model(nodes, [("x", [3, 4])], [("y", [4])])
    feeds = {"x": np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)}
    _assert_clean(model, feeds, ("O1", "O2"))


# ---------------------------------------------------------------------------------------------
# runtime
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("op_type", ["Relu", "Tanh", "Neg", "Sigmoid", "HardSigmoid", "HardSwish",
                                     "Erf"])
def test_runtime_unary_on_a_0d_tensor(op_type):
    """Fuzz seeds 582, 645: ReduceMean over all axes with keepdims=0 gives a 0-d tensor, and
    Sigmoid/HardSigmoid of it crashed ("return arrays must be of ArrayType"). Fixed in
    runtime/kernels/elementwise.py: multi-step kernels compute into an array, never a scalar."""
    model = make_model([helper.make_node(op_type, ["x"], ["y"])], [("x", [])], [("y", [])],
                       opset=17)
    _assert_clean(model, {"x": np.array(0.3, np.float32)}, ("runtime",))


def test_runtime_tanh_gelu_on_a_0d_tensor():
    """Fuzz seed 33307: a tanh-form GELU written out over a 0-d mean; O2 fuses it into
    Gelu(approximate="tanh") (raising the opset to 20) and the runtime crashed on it. Fixed in
    runtime/kernels/nn.py: the tanh form computes into an array, never a numpy scalar."""
    model = make_model([helper.make_node("Gelu", ["x"], ["y"], approximate="tanh")],
                       [("x", [])], [("y", [])], opset=20, ir_version=9)
    _assert_clean(model, {"x": np.array(0.3, np.float32)}, ("runtime",))


@pytest.mark.parametrize("op_type", ["Relu", "Tanh", "Neg", "Sigmoid"])
def test_runtime_unary_in_place_on_a_column_slice(op_type):
    """Fuzz seed 802 (LeakyRelu -> Slice of the last column -> Sigmoid, 0.36 off): the Slice is
    a strided view of a buffer that dies there, so the unary op wrote into it in place. Fixed in
    runtime/session.py: only contiguous buffers are reused in place."""
    nodes = [helper.make_node("Relu", ["x"], ["r"]),
             helper.make_node("Slice", ["r", "starts", "ends", "axes"], ["col"]),
             helper.make_node(op_type, ["col"], ["y"])]
    inits = [("starts", np.array([3], np.int64)), ("ends", np.array([4], np.int64)),
             ("axes", np.array([2], np.int64))]
    model = make_model(nodes, [("x", [1, 4, 4])], [("y", [1, 4, 1])], inits)
    feeds = {"x": np.random.default_rng(0).standard_normal((1, 4, 4)).astype(np.float32)}
    _assert_clean(model, feeds, ("runtime",))


def test_numpy_negative_in_place_on_strided_view_is_the_root_cause():
    """Documents the numpy behaviour behind the Neg/Sigmoid failures above (not a graphopt bug,
    but one the runtime must work around): in place on a strided float32 view, np.negative
    reads the wrong elements. Out of place, or through np.multiply, it is right."""
    x = np.arange(16, dtype=np.float32).reshape(4, 4)
    column = x[:, 3]
    expected = -column.copy()
    np.multiply(column, -1, out=column)
    assert np.array_equal(column, expected)
    y = np.arange(16, dtype=np.float32).reshape(4, 4)
    np.negative(y[:, 3], out=y[:, 3])
    if np.array_equal(y[:, 3], expected):
        pytest.skip(f"numpy {np.__version__} negates strided views in place correctly")
    assert not np.array_equal(y[:, 3], expected)
