"""The conv engine's speed paths, against onnxruntime:

- a fused activation epilogue absorbed into its Conv (runtime/kernels/fused_activation.py): each
  model is Conv(+bias) -> activation with the activation marked `graphopt.fuse_into` the Conv
  (what passes/fusion_epilogue.py writes); the Session must absorb it (no epilogue left in the
  step) and agree with onnxruntime on the same model;
- the bias riding along in every conv path (runtime/kernels/conv.py);
- Winograd F(2x2, 3x3) (runtime/kernels/winograd.py) on odd sizes, pads, batches;
- uniform filters give bitwise-equal channels.
"""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper

from graphopt.runtime import Session
from graphopt.runtime.kernels import conv as conv_engine
from oracle import make_model, run_ort

RNG_SEED = 7
FUSE_META = "graphopt.fuse_into"

#: (attrs, x shape, w shape): one case per conv path.
CONV_PATHS = {
    "pointwise_ones_row": ({}, (1, 8, 5, 7), (16, 8, 1, 1)),           # K + 1 <= 2.2 * C_out
    "pointwise_bias_add": ({}, (1, 32, 5, 7), (4, 32, 1, 1)),          # K large: add after
    "pointwise_strided": ({"strides": [2, 2]}, (2, 6, 7, 9), (5, 6, 1, 1)),
    "pointwise_grouped": ({"group": 4}, (2, 8, 6, 6), (12, 2, 1, 1)),
    "im2col": ({"pads": [1, 1, 1, 1]}, (2, 4, 7, 6), (6, 4, 3, 3)),
    "im2col_grouped_strided": ({"pads": [1, 1, 1, 1], "group": 2, "strides": [2, 2]},
                               (1, 6, 9, 8), (4, 3, 3, 3)),
    "depthwise": ({"pads": [2, 2, 2, 2], "group": 6}, (2, 6, 9, 8), (6, 1, 5, 5)),
    "depthwise_rows": ({"pads": [1, 1, 1, 1], "group": 6}, (2, 6, 9, 8), (12, 1, 3, 3)),
    "depthwise_rows_top_pads": ({"pads": [2, 0, 0, 2], "group": 5}, (1, 5, 7, 6), (5, 1, 3, 3)),
    "depthwise_strided_multiplier": ({"pads": [1, 1, 1, 1], "group": 4, "strides": [2, 2]},
                                     (1, 4, 11, 9), (8, 1, 3, 3)),
    "shifted_gemm": ({"pads": [1, 1, 1, 1]}, (2, 5, 6, 20), (3, 5, 3, 3)),
    "winograd": ({"pads": [1, 1, 1, 1]}, (2, 24, 15, 17), (32, 24, 3, 3)),
    "conv1d": ({"pads": [1, 1]}, (1, 3, 10), (4, 3, 3)),
}

ACTIVATIONS = {
    "Relu": ({}, ()),
    "Clip": ({}, ("lo", "hi")),
    "HardSigmoid": ({"alpha": 0.3, "beta": 0.4}, ()),
    "HardSwish": ({}, ()),
    "Sigmoid": ({}, ()),
    "Tanh": ({}, ()),
    "LeakyRelu": ({"alpha": 0.1}, ()),       # not absorbed: runs as an in-place epilogue
}


def _model(attrs, xs, ws, act: str, *, bias: bool = True, weights_fed: bool = False,
           marked: bool = True):
    rng = np.random.default_rng(RNG_SEED)
    w = (rng.standard_normal(ws) * 0.5).astype(np.float32)
    b = rng.standard_normal(ws[0]).astype(np.float32)
    conv_inputs = ["x", "W"] + (["B"] if bias else [])
    act_attrs, extra = ACTIVATIONS[act]
    nodes = [helper.make_node("Conv", conv_inputs, ["c"], name="conv", **attrs),
             helper.make_node(act, ["c"] + list(extra), ["y"], name="act", **act_attrs)]
    if marked:
        entry = nodes[1].metadata_props.add()
        entry.key, entry.value = FUSE_META, "conv"
    inits = [("lo", np.array(-0.5, np.float32)), ("hi", np.array(1.5, np.float32))] if extra else []
    inputs = [("x", list(xs))]
    if weights_fed:
        inputs.append(("W", list(ws)))
    else:
        inits.append(("W", w))
    if bias:
        inits.append(("B", b))
    model = make_model(nodes, inputs, [("y", None)], inits, opset=17)
    feeds = {"x": rng.standard_normal(xs).astype(np.float32)}
    if weights_fed:
        feeds["W"] = w
    return model, feeds


def _rel_l2(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _check(model, feeds, *, absorbed: bool) -> None:
    session = Session(model)
    got = session.run(feeds)["y"]
    want = run_ort(model, feeds)[0]
    assert got.shape == want.shape
    assert _rel_l2(got, want) <= 1e-5, _rel_l2(got, want)
    steps = session._program.plan(tuple(session.outputs)).steps
    assert len(steps) == 1                                   # Conv and activation: one step
    assert (not steps[0].epilogues) == absorbed


@pytest.mark.parametrize("path", sorted(CONV_PATHS))
@pytest.mark.parametrize("act", sorted(ACTIVATIONS))
def test_conv_with_absorbed_activation_matches_onnxruntime(path, act):
    attrs, xs, ws = CONV_PATHS[path]
    model, feeds = _model(attrs, xs, ws, act)
    _check(model, feeds, absorbed=act != "LeakyRelu")


@pytest.mark.parametrize("path", ["pointwise_ones_row", "im2col", "depthwise", "shifted_gemm"])
def test_without_bias_and_with_fed_weights(path):
    attrs, xs, ws = CONV_PATHS[path]
    for act in ("HardSwish", "HardSigmoid"):      # their shift needs a bias the conv lacks
        _check(*_model(attrs, xs, ws, act, bias=False), absorbed=True)
        _check(*_model(attrs, xs, ws, act, weights_fed=True), absorbed=True)


def test_clip_with_a_fed_bound_runs_as_an_epilogue():
    nodes = [helper.make_node("Conv", ["x", "W", "B"], ["c"], name="conv"),
             helper.make_node("Clip", ["c", "", "hi"], ["y"], name="act")]
    entry = nodes[1].metadata_props.add()
    entry.key, entry.value = FUSE_META, "conv"
    rng = np.random.default_rng(RNG_SEED)
    inits = [("W", rng.standard_normal((3, 2, 1, 1)).astype(np.float32)),
             ("B", rng.standard_normal(3).astype(np.float32))]
    model = make_model(nodes, [("x", [1, 2, 4, 4]), ("hi", [])], [("y", None)], inits, opset=17)
    feeds = {"x": rng.standard_normal((1, 2, 4, 4)).astype(np.float32),
             "hi": np.array(0.25, np.float32)}
    _check(model, feeds, absorbed=False)


def test_clip_opset_6_attributes_are_absorbed():
    nodes = [helper.make_node("Conv", ["x", "W", "B"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Clip", ["c"], ["y"], name="act", min=0.0, max=6.0)]
    entry = nodes[1].metadata_props.add()
    entry.key, entry.value = FUSE_META, "conv"
    rng = np.random.default_rng(RNG_SEED)
    inits = [("W", rng.standard_normal((4, 3, 3, 3)).astype(np.float32) * 2),
             ("B", rng.standard_normal(4).astype(np.float32))]
    model = make_model(nodes, [("x", [1, 3, 6, 6])], [("y", None)], inits, opset=6,
                       ir_version=3)
    feeds = {"x": rng.standard_normal((1, 3, 6, 6)).astype(np.float32)}
    _check(model, feeds, absorbed=True)


@pytest.mark.parametrize("path", ["im2col", "im2col_grouped_strided", "depthwise",
                                  "depthwise_rows", "shifted_gemm"])
def test_bias_in_blocked_paths(monkeypatch, path):
    """Tiny block budgets: the bias column / crop-and-bias in every tile."""
    monkeypatch.setattr(conv_engine, "IM2COL_TILE_BYTES", 512)
    monkeypatch.setattr(conv_engine, "DEPTHWISE_BLOCK", 100)
    monkeypatch.setattr(conv_engine, "SHIFTED_GEMM_TILE", 60)
    attrs, xs, ws = CONV_PATHS[path]
    _check(*_model(attrs, xs, ws, "HardSwish"), absorbed=True)


def test_unmarked_conv_is_not_absorbed():
    attrs, xs, ws = CONV_PATHS["im2col"]
    model, feeds = _model(attrs, xs, ws, "Relu", marked=False)
    session = Session(model)
    assert len(session._program.plan(tuple(session.outputs)).steps) == 2
    assert _rel_l2(session.run(feeds)["y"], run_ort(model, feeds)[0]) <= 1e-5


@pytest.mark.parametrize("attrs,xs,ws", [
    ({"pads": [1, 1, 1, 1]}, (1, 32, 14, 14), (24, 32, 3, 3)),          # even, square
    ({"pads": [0, 0, 0, 0]}, (1, 24, 17, 16), (30, 24, 3, 3)),          # no pads, odd output
    ({"pads": [2, 1, 0, 3]}, (2, 25, 13, 19), (24, 25, 3, 3)),          # asymmetric pads
    ({"auto_pad": "SAME_UPPER"}, (1, 24, 16, 15), (28, 24, 3, 3)),
])
@pytest.mark.parametrize("bias", [True, False])
def test_winograd_matches_onnxruntime(attrs, xs, ws, bias):
    from graphopt.runtime.kernels.winograd import use_winograd
    model, feeds = _model(attrs, xs, ws, "Relu", bias=bias)
    session = Session(model)
    out_spatial = session.run(feeds)["y"].shape[2:]
    assert use_winograd(xs[1], ws[0], out_spatial)                     # the path under test
    _check(model, feeds, absorbed=True)


def test_uniform_filters_give_equal_channels():
    """Equal filters (constant-filled weights) must give bitwise-equal channels (plus each
    channel's bias), whatever rows the GEMM rounds differently."""
    rng = np.random.default_rng(RNG_SEED)
    x = (rng.standard_normal((1, 64, 9, 9)) * 1e4).astype(np.float32)
    for ws, attrs in (((1000, 64, 1, 1), {}), ((40, 64, 3, 3), {"pads": [1, 1, 1, 1]})):
        w = np.full(ws, 0.02, np.float32)
        b = np.full(ws[0], 0.5, np.float32)
        nodes = [helper.make_node("Conv", ["x", "W", "B"], ["y"], **attrs)]
        model = make_model(nodes, [("x", list(x.shape))], [("y", None)], [("W", w), ("B", b)])
        y = Session(model).run({"x": x})["y"]
        assert np.array_equal(y, np.broadcast_to(y[:, :1], y.shape))
        assert _rel_l2(y, run_ort(model, {"x": x})[0]) <= 1e-5
