"""Concat views (runtime/concat_views.py): a Concat's producers write straight into their slices
of its output buffer.

Every test checks the outputs against onnxruntime (or against the same session with the feature
off, bit for bit), and which inputs were written in place (`Session.written_in_place`).
"""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import graphopt
from graphopt.runtime import Session
from graphopt.runtime.concat_views import slice_layout
from oracle import make_model, run_ort

LIGHT = os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data", "light")


def _fuse(node: onnx.NodeProto, head: str) -> onnx.NodeProto:
    entry = node.metadata_props.add()
    entry.key, entry.value = "graphopt.fuse_into", head
    return node


def _conv_relu(name: str, x: str, w: str, pads=(0, 0, 0, 0), fuse: bool = True, **attrs):
    conv = helper.make_node("Conv", [x, w], [f"{name}_c"], name=name, pads=list(pads), **attrs)
    relu = helper.make_node("Relu", [f"{name}_c"], [name], name=f"{name}_relu")
    return [conv, _fuse(relu, name) if fuse else relu]


def _inception_block(batch: int | str = 1, fuse: bool = True) -> onnx.ModelProto:
    """Four branches of an inception block: 1x1; 1x1 -> 3x3; 3x3 max pool -> 1x1; and a plain
    Sigmoid (an elementwise producer), concatenated on the channel axis."""
    rng = np.random.default_rng(0)

    def weights(c_out, c_in, k):
        return (rng.standard_normal((c_out, c_in, k, k)) * 0.3).astype(np.float32)
    inits = [("w1", weights(6, 4, 1)), ("w2a", weights(5, 4, 1)), ("w2b", weights(7, 5, 3)),
             ("w3", weights(3, 4, 1))]
    nodes = (_conv_relu("b1", "x", "w1", fuse=fuse)
             + _conv_relu("b2a", "x", "w2a", fuse=fuse)
             + _conv_relu("b2", "b2a", "w2b", pads=(1, 1, 1, 1), fuse=fuse)
             + [helper.make_node("MaxPool", ["x"], ["pool"], kernel_shape=[3, 3],
                                 pads=[1, 1, 1, 1])]
             + _conv_relu("b3", "pool", "w3", fuse=fuse)
             + [helper.make_node("Sigmoid", ["x"], ["b4"]),
                helper.make_node("Concat", ["b1", "b2", "b3", "b4"], ["y"], axis=1, name="cat")])
    return make_model(nodes, [("x", [batch, 4, 10, 10])], [("y", [batch, 20, 10, 10])], inits)


def _feeds(shape, seed: int = 1) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).standard_normal(shape).astype(np.float32)}


def _check(model: onnx.ModelProto | graphopt.Graph, feeds: dict, **kwargs
           ) -> tuple[Session, Session]:
    """Run with and without views: both equal onnxruntime, and equal to each other bit for bit
    (the same kernels compute the same values, only where they land differs)."""
    on = Session(model, concat_views=True, **kwargs)
    off = Session(model, concat_views=False, **kwargs)
    ours = on.run(feeds)
    plain = off.run(feeds)
    for name, expected in zip(on.outputs, run_ort(model, feeds)):
        np.testing.assert_allclose(ours[name], expected, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(ours[name], plain[name])
    assert off.concat_views == [] and off.written_in_place == []
    return on, off


# ---------------------------------------------------------------------------------------------
# the blocks
# ---------------------------------------------------------------------------------------------
def test_inception_block_writes_every_branch_in_place_and_lowers_the_peak():
    on, off = _check(_inception_block(), _feeds((1, 4, 10, 10)))
    assert on.fused == [("b1", ("b1_relu",)), ("b2a", ("b2a_relu",)), ("b2", ("b2_relu",)),
                        ("b3", ("b3_relu",))]
    assert on.concat_views == [("cat", ("b1", "b2", "b3", "b4"))]
    assert on.written_in_place == on.concat_views
    assert on.peak_bytes < off.peak_bytes


def test_unfused_producers_write_in_place_too():
    """Without epilogue fusion the Relus are the producers (elementwise, out= the slice)."""
    on, off = _check(_inception_block(fuse=False), _feeds((1, 4, 10, 10)), fuse=False)
    assert on.written_in_place == [("cat", ("b1", "b2", "b3", "b4"))]
    assert on.peak_bytes < off.peak_bytes


def test_batch_2_writes_into_non_contiguous_views():
    """At batch 2 each slice is strided (one contiguous run per image): Conv fills it image by
    image ("items" layout), MaxPool and the elementwise ops write it directly."""
    on, off = _check(_inception_block(batch=2), _feeds((2, 4, 10, 10)))
    assert on.written_in_place == [("cat", ("b1", "b2", "b3", "b4"))]
    assert on.peak_bytes < off.peak_bytes


def test_densenet_layer_reuses_only_the_input_read_once():
    """x_next = Concat(x, Conv(Relu(x))): x is also read by the Relu, so it must not be written
    into the view (it is copied); the conv output is written in place."""
    rng = np.random.default_rng(2)
    w = (rng.standard_normal((8, 4, 3, 3)) * 0.3).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w0"], ["x0"], name="stem"),
             helper.make_node("Relu", ["x0"], ["r"]),
             helper.make_node("Conv", ["r", "w"], ["new"], name="grow", pads=[1, 1, 1, 1]),
             helper.make_node("Concat", ["x0", "new"], ["y"], axis=1, name="cat")]
    w0 = (rng.standard_normal((4, 4, 1, 1)) * 0.3).astype(np.float32)
    model = make_model(nodes, [("x", [1, 4, 9, 9])], [("y", [1, 12, 9, 9])], [("w", w), ("w0", w0)])
    on, _ = _check(model, _feeds((1, 4, 9, 9)))
    assert on.written_in_place == [("cat", ("new",))]


def test_a_branch_read_elsewhere_or_twice_is_copied():
    """b1 is also a graph output, b2 is read twice by the Concat: neither may be written into
    the buffer; only b3 is."""
    nodes = [helper.make_node("Relu", ["x"], ["b1"]),
             helper.make_node("Sigmoid", ["x"], ["b2"]),
             helper.make_node("Tanh", ["x"], ["b3"]),
             helper.make_node("Concat", ["b1", "b2", "b3", "b2"], ["y"], axis=1, name="cat")]
    model = make_model(nodes, [("x", [1, 2, 5, 5])], [("y", [1, 8, 5, 5]), ("b1", [1, 2, 5, 5])])
    on, _ = _check(model, _feeds((1, 2, 5, 5)))
    assert on.written_in_place == [("cat", ("b3",))]


def test_a_requested_intermediate_is_not_written_into_the_buffer():
    model = _inception_block()
    session = Session(model)
    feeds = _feeds((1, 4, 10, 10))
    got = session.run(feeds, ["y", "b2"])
    np.testing.assert_array_equal(got["b2"], got["y"][:, 6:13])
    assert session.written_in_place == [("cat", ("b1", "b3", "b4"))]
    np.testing.assert_allclose(got["y"], run_ort(model, feeds)[0], rtol=1e-5, atol=1e-5)


def test_dynamic_shapes_fall_back_to_copying():
    model = _inception_block(batch="N")
    session = Session(model)
    assert session.concat_views == []
    for batch in (1, 3):
        feeds = _feeds((batch, 4, 10, 10), seed=batch)
        np.testing.assert_allclose(session.run(feeds)["y"], run_ort(model, feeds)[0],
                                   rtol=1e-5, atol=1e-5)
        assert session.written_in_place == []


def test_stale_static_shapes_never_give_wrong_results():
    """Static shapes that disagree with the run (a stale value_info, here set by hand behind a
    symbolic input): the producers' inputs do not have the planned shapes, so nothing is
    written into a view."""
    model = _inception_block(batch="N")
    model.graph.node.insert(0, helper.make_node("Identity", ["x_in"], ["x"]))
    model.graph.input[0].name = "x_in"
    graph = graphopt.load(model)
    from graphopt.shapes import infer_shapes
    infer_shapes(graph)
    for name, value in graph.values.items():
        if name != "x_in" and value.shape is not None and value.shape[:1] == ("N",):
            value.shape = (1,) + value.shape[1:]
    session = Session(graph)
    assert session.concat_views == [("cat", ("b1", "b2", "b3", "b4"))]
    feeds = {"x_in": _feeds((2, 4, 10, 10))["x"]}
    np.testing.assert_allclose(session.run(feeds)["y"], run_ort(model, feeds)[0],
                               rtol=1e-5, atol=1e-5)
    assert session.written_in_place == []
    feeds = {"x_in": _feeds((1, 4, 10, 10))["x"]}   # the planned shapes: views are used
    np.testing.assert_allclose(session.run(feeds)["y"], run_ort(model, feeds)[0],
                               rtol=1e-5, atol=1e-5)
    assert session.written_in_place == session.concat_views


def test_a_producer_that_declines_the_view_is_copied():
    """A float16 Conv computes in float32 and casts: it declines the float16 slice, and the
    Concat copies its output; the Relu beside it writes in place."""
    rng = np.random.default_rng(3)
    w = (rng.standard_normal((3, 2, 1, 1)) * 0.3).astype(np.float16)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"]),
             helper.make_node("Relu", ["x"], ["r"]),
             helper.make_node("Concat", ["c", "r"], ["y"], axis=1, name="cat")]
    model = make_model(nodes, [("x", [1, 2, 4, 4], TensorProto.FLOAT16)],
                       [("y", [1, 5, 4, 4], TensorProto.FLOAT16)], [("w", w)])
    x = rng.standard_normal((1, 2, 4, 4)).astype(np.float16)
    on = Session(model)
    assert on.concat_views == [("cat", ("c", "r"))]
    got = on.run({"x": x})["y"]
    assert on.written_in_place == [("cat", ("r",))]
    np.testing.assert_array_equal(got, Session(model, concat_views=False).run({"x": x})["y"])
    (expected,) = run_ort(model, {"x": x})
    np.testing.assert_allclose(got.astype(np.float32), expected.astype(np.float32),
                               rtol=2e-3, atol=2e-3)


def test_fused_residual_epilogue_runs_in_place_on_the_slice():
    """Conv -> Add(residual) -> Relu fused, writing into its slice: the epilogues run on it."""
    rng = np.random.default_rng(4)
    w = (rng.standard_normal((4, 4, 3, 3)) * 0.2).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             _fuse(helper.make_node("Add", ["c", "x"], ["s"], name="add"), "conv"),
             _fuse(helper.make_node("Relu", ["s"], ["r"], name="relu"), "conv"),
             helper.make_node("Neg", ["x"], ["n"]),
             helper.make_node("Concat", ["n", "r"], ["y"], axis=1, name="cat")]
    model = make_model(nodes, [("x", [2, 4, 6, 6])], [("y", [2, 8, 6, 6])], [("w", w)])
    on, off = _check(model, _feeds((2, 4, 6, 6)))
    assert on.fused == [("conv", ("add", "relu"))]
    assert on.written_in_place == [("cat", ("n", "r"))]
    assert on.peak_bytes < off.peak_bytes


@pytest.mark.parametrize("axis", [2, 3])
def test_inner_axis_views_go_to_strided_kernels_only(axis):
    """On an inner axis the slices are strided: elementwise ops and MaxPool write them, Conv
    (which asks for per-image contiguous slices) gets its own buffer and is copied."""
    rng = np.random.default_rng(5)
    w = (rng.standard_normal((3, 3, 1, 1)) * 0.3).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"]),
             helper.make_node("MaxPool", ["x"], ["m"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             helper.make_node("Add", ["x", "x"], ["a"]),
             helper.make_node("Concat", ["c", "m", "a"], ["y"], axis=axis, name="cat")]
    out_shape = [2, 3, 6, 6]
    out_shape[axis] *= 3
    model = make_model(nodes, [("x", [2, 3, 6, 6])], [("y", out_shape)], [("w", w)])
    on, _ = _check(model, _feeds((2, 3, 6, 6)))
    assert on.written_in_place == [("cat", ("m", "a"))]


def test_single_column_slices_are_never_views():
    """A 1-wide slice of the last axis is a strided column, where numpy 2.4's in-place
    np.negative reads the wrong elements (tests/test_regressions_fuzz.py): not used."""
    nodes = [helper.make_node("Neg", ["x"], ["n"]), helper.make_node("Sigmoid", ["x"], ["s"]),
             helper.make_node("Concat", ["n", "s"], ["y"], axis=2, name="cat")]
    model = make_model(nodes, [("x", [4, 4, 1])], [("y", [4, 4, 2])])
    on, _ = _check(model, _feeds((4, 4, 1)))
    assert on.concat_views == []
    assert slice_layout((4, 4, 2), 2, 1) is None
    assert slice_layout((1, 4, 2), 2, 1) is None     # still a column of 4
    assert slice_layout((2, 1, 5), 2, 2) == "items"
    assert slice_layout((1, 8, 5, 5), 1, 3) == "contiguous"
    assert slice_layout((2, 8, 5, 5), 1, 3) == "items"
    assert slice_layout((2, 8, 5, 5), 2, 3) == "strided"


def test_peak_bytes_count_the_buffer_once():
    """Relu(x) and Sigmoid(x), 1 KiB each, into a 2 KiB Concat. Off: both inputs and the output
    are live at the Concat (4 KiB). On: the buffer alone, from the Relu on (2 KiB)."""
    nodes = [helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Sigmoid", ["x"], ["b"]),
             helper.make_node("Concat", ["a", "b"], ["y"], axis=1, name="cat")]
    model = make_model(nodes, [("x", [1, 4, 8, 8])], [("y", [1, 8, 8, 8])])
    on, off = _check(model, _feeds((1, 4, 8, 8)))
    assert on.written_in_place == [("cat", ("a", "b"))]
    assert on.peak_bytes == 2048
    assert off.peak_bytes == 4096


def test_a_buffer_allocated_early_must_not_raise_the_peak():
    """The only producer placeable (the 1x1 conv shrinking 16 channels to 1) runs while its
    16-channel input is live; allocating the whole 17-channel Concat there would raise the
    peak, so the Concat copies instead."""
    rng = np.random.default_rng(6)
    w_up = (rng.standard_normal((16, 16, 1, 1)) * 0.3).astype(np.float32)
    w_down = (rng.standard_normal((1, 16, 1, 1)) * 0.3).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w_up"], ["x1"]),
             helper.make_node("Conv", ["x1", "w_up"], ["wide"]),
             helper.make_node("Conv", ["wide", "w_down"], ["narrow"]),
             helper.make_node("Concat", ["x1", "narrow"], ["y"], axis=1, name="cat")]
    model = make_model(nodes, [("x", [1, 16, 8, 8])], [("y", [1, 17, 8, 8])],
                       [("w_up", w_up), ("w_down", w_down)])
    on, off = _check(model, _feeds((1, 16, 8, 8)))
    assert on.concat_views == []
    assert on.peak_bytes == off.peak_bytes


# ---------------------------------------------------------------------------------------------
# real models
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, placed", [("light_squeezenet", 16), ("light_inception_v2", 36),
                                          ("light_densenet121", 57)])
def test_light_models_after_o2_match_their_shipped_outputs(name, placed):
    graph = graphopt.load(os.path.join(LIGHT, f"{name}.onnx"))
    graphopt.optimize(graph, "O2")
    on = Session(graph)
    off = Session(graph, concat_views=False)
    (spec,) = on.inputs
    n = int(np.prod(spec.shape))
    feeds = {spec.name: (np.arange(n).reshape(spec.shape) / n).astype(np.float32)}  # onnx's
    got = on.run(feeds)[on.outputs[0]]
    np.testing.assert_array_equal(got, off.run(feeds)[off.outputs[0]])
    expected = onnx.numpy_helper.to_array(
        onnx.load_tensor(os.path.join(LIGHT, f"{name}_output_0.pb")))
    np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-7)
    assert on.written_in_place == on.concat_views
    assert sum(len(names) for _, names in on.written_in_place) == placed
    assert on.peak_bytes <= off.peak_bytes
