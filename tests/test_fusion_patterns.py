"""Decomposed HardSwish, GELU, LayerNorm and Softmax become the standard op where the model's
opset has one (differential against onnxruntime, relative L2 <= 1e-5, op types prove it)."""

from __future__ import annotations

import math

import numpy as np
from onnx import helper

from oracle import make_model, op_types
from test_fusion import fuse, w


def scalar(name: str, value: float) -> tuple[str, np.ndarray]:
    return name, np.array(value, np.float32)


# ---------------------------------------------------------------------------------------------
# HardSwish
# ---------------------------------------------------------------------------------------------
def paddle_hardswish(x: str, y: str, opset: int) -> list:
    clip = (helper.make_node("Clip", ["p3", "zero", "six"], ["r6"]) if opset >= 11
            else helper.make_node("Clip", ["p3"], ["r6"], min=0.0, max=6.0))
    return [helper.make_node("Add", [x, "three"], ["p3"]), clip,
            helper.make_node("Mul", [x, "r6"], ["xr"]),
            helper.make_node("Div", ["xr", "six"], [y])]


HS_CONSTS = [scalar("three", 3.0), scalar("zero", 0.0), scalar("six", 6.0)]


def test_paddle_hardswish_becomes_hardswish_at_opset_14():
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"])] + paddle_hardswish("c", "y", 14)
    model = make_model(nodes, [("x", [1, 2, 5, 5])], [("y", [1, 3, 5, 5])],
                       [("W", w(3, 2, 1, 1, scale=3.0))] + HS_CONSTS, opset=14)
    graph, stats = fuse(model)
    assert op_types(graph) == ["Conv", "HardSwish"]
    assert stats["hardswish_fused"] == 1
    assert stats["epilogues_fused"] == 1   # and it runs as the Conv's epilogue


def test_hardswish_below_opset_14_becomes_x_times_hardsigmoid():
    """With the opset upgrade disabled, the model keeps its opset and gets the two-op form."""
    for opset in (10, 12):
        model = make_model(paddle_hardswish("x", "y", opset), [("x", [4, 6])], [("y", [4, 6])],
                           HS_CONSTS, opset=opset)
        feeds = {"x": np.linspace(-5, 5, 24, dtype=np.float32).reshape(4, 6)}
        graph, stats = fuse(model, feeds, disable=["upgrade_opset"])
        assert op_types(graph) == ["HardSigmoid", "Mul"] and graph.opset() == opset
        assert stats["hardswish_to_hardsigmoid_mul"] == 1


def test_hardswish_below_opset_14_upgrades_the_opset_at_o2():
    for opset in (10, 12):
        model = make_model(paddle_hardswish("x", "y", opset), [("x", [4, 6])], [("y", [4, 6])],
                           HS_CONSTS, opset=opset)
        feeds = {"x": np.linspace(-5, 5, 24, dtype=np.float32).reshape(4, 6)}
        graph, stats = fuse(model, feeds)
        assert op_types(graph) == ["HardSwish"] and graph.opset() == 14
        assert stats == {**stats, f"opset_{opset}_to_14": 1, "hardswish_fused": 1}


def test_opset_upgrade_keeps_softmax_meaning():
    """Softmax changed meaning at opset 13 (no longer flattens): the converter must keep it."""
    nodes = paddle_hardswish("x", "h", 12) + [helper.make_node("Softmax", ["h"], ["y"], axis=1)]
    model = make_model(nodes, [("x", [2, 3, 4])], [("y", [2, 3, 4])], HS_CONSTS, opset=12)
    feeds = {"x": np.random.default_rng(3).standard_normal((2, 3, 4)).astype(np.float32)}
    graph, stats = fuse(model, feeds)
    assert graph.opset() == 14 and "HardSwish" in op_types(graph)


def test_hardswish_associations_and_hardsigmoid_form():
    nodes = [  # x * (Clip(x + 3, 0, 6) / 6)
        helper.make_node("Add", ["three", "a"], ["a3"]),
        helper.make_node("Clip", ["a3", "zero", "six"], ["ar"]),
        helper.make_node("Div", ["ar", "six"], ["ad"]),
        helper.make_node("Mul", ["ad", "a"], ["ya"]),
        # (x * Clip(x + 3, 0, 6)) * (1/6)
        helper.make_node("Add", ["b", "three"], ["b3"]),
        helper.make_node("Clip", ["b3", "zero", "six"], ["br"]),
        helper.make_node("Mul", ["br", "b"], ["bm"]),
        helper.make_node("Mul", ["bm", "sixth"], ["yb"]),
        # x * HardSigmoid(x, 1/6, 1/2)
        helper.make_node("HardSigmoid", ["c"], ["ch"], alpha=1.0 / 6.0, beta=0.5),
        helper.make_node("Mul", ["c", "ch"], ["yc"]),
        # x * HardSigmoid(x) with the default alpha 0.2 is not HardSwish
        helper.make_node("HardSigmoid", ["d"], ["dh"]),
        helper.make_node("Mul", ["d", "dh"], ["yd"])]
    io = [(n, [3, 8]) for n in "abcd"]
    model = make_model(nodes, io, [("y" + n, [3, 8]) for n in "abcd"],
                       HS_CONSTS + [scalar("sixth", 1.0 / 6.0)], opset=14)
    feeds = {n: np.linspace(-5, 5, 24, dtype=np.float32).reshape(3, 8) for n in "abcd"}
    graph, stats = fuse(model, feeds)
    assert op_types(graph) == ["HardSigmoid", "HardSwish", "HardSwish", "HardSwish", "Mul"]
    assert stats["hardswish_fused"] == 3


def test_hardswish_with_wrong_constants_or_extra_reader_stays():
    nodes = paddle_hardswish("x", "y", 14) + [helper.make_node("Neg", ["r6"], ["z"])]
    model = make_model(nodes, [("x", [2, 3])], [("y", [2, 3]), ("z", [2, 3])], HS_CONSTS, opset=14)
    graph, stats = fuse(model)
    assert "HardSwish" not in op_types(graph) and "hardswish_fused" not in stats


# ---------------------------------------------------------------------------------------------
# GELU
# ---------------------------------------------------------------------------------------------
def gelu_erf_nodes(x: str, y: str) -> list:
    return [helper.make_node("Div", [x, "sqrt2"], [f"{x}_s"]),
            helper.make_node("Erf", [f"{x}_s"], [f"{x}_e"]),
            helper.make_node("Add", [f"{x}_e", "one"], [f"{x}_p"]),
            helper.make_node("Mul", [x, f"{x}_p"], [f"{x}_m"]),
            helper.make_node("Mul", [f"{x}_m", "half"], [y])]


GELU_CONSTS = [scalar("sqrt2", math.sqrt(2.0)), scalar("one", 1.0), scalar("half", 0.5)]


def gelu_tanh_nodes(x: str, y: str) -> list:
    return [helper.make_node("Pow", [x, "three"], [f"{x}_c"]),
            helper.make_node("Mul", ["k", f"{x}_c"], [f"{x}_k"]),
            helper.make_node("Add", [x, f"{x}_k"], [f"{x}_i"]),
            helper.make_node("Mul", [f"{x}_i", "sqrt2pi"], [f"{x}_u"]),
            helper.make_node("Tanh", [f"{x}_u"], [f"{x}_t"]),
            helper.make_node("Add", ["one", f"{x}_t"], [f"{x}_p"]),
            helper.make_node("Mul", [x, "half"], [f"{x}_h"]),
            helper.make_node("Mul", [f"{x}_h", f"{x}_p"], [y])]


TANH_CONSTS = [scalar("three", 3.0), scalar("k", 0.044715),
               scalar("sqrt2pi", math.sqrt(2.0 / math.pi))]


def test_gelu_erf_and_tanh_forms_become_gelu_at_opset_20():
    nodes = gelu_erf_nodes("a", "ya") + gelu_tanh_nodes("b", "yb")
    model = make_model(nodes, [("a", [2, 7]), ("b", [2, 7])], [("ya", [2, 7]), ("yb", [2, 7])],
                       GELU_CONSTS + TANH_CONSTS, opset=20, ir_version=9)
    graph, stats = fuse(model)
    assert op_types(graph) == ["Gelu", "Gelu"]
    approx = sorted(op.attrs.get("approximate", "none") for op in graph.ops.values())
    assert approx == ["none", "tanh"]
    assert stats["gelu_fused"] == 1 and stats["gelu_tanh_fused"] == 1


def test_gelu_below_opset_20_is_left_decomposed():
    model = make_model(gelu_erf_nodes("a", "ya"), [("a", [2, 7])], [("ya", [2, 7])], GELU_CONSTS,
                       opset=17)
    graph, stats = fuse(model, disable=["upgrade_opset"])
    assert "Erf" in op_types(graph) and "gelu_fused" not in stats


def test_gelu_below_opset_20_upgrades_the_opset_at_o2():
    model = make_model(gelu_erf_nodes("a", "ya"), [("a", [2, 7])], [("ya", [2, 7])], GELU_CONSTS,
                       opset=17)
    graph, stats = fuse(model)
    assert op_types(graph) == ["Gelu"] and graph.opset() == 20 and stats["gelu_fused"] == 1


# ---------------------------------------------------------------------------------------------
# LayerNorm
# ---------------------------------------------------------------------------------------------
def layernorm_nodes(x: str, y: str, opset: int, affine: bool = True) -> list:
    axes = {"axes": [-1]} if opset < 18 else {}
    axes_in = [] if opset < 18 else ["axes"]
    nodes = [helper.make_node("ReduceMean", [x] + axes_in, [f"{x}_mu"], **axes),
             helper.make_node("Sub", [x, f"{x}_mu"], [f"{x}_d"]),
             helper.make_node("Pow", [f"{x}_d", "two"], [f"{x}_sq"]),
             helper.make_node("ReduceMean", [f"{x}_sq"] + axes_in, [f"{x}_var"], **axes),
             helper.make_node("Add", [f"{x}_var", "eps"], [f"{x}_ve"]),
             helper.make_node("Sqrt", [f"{x}_ve"], [f"{x}_sd"]),
             helper.make_node("Div", [f"{x}_d", f"{x}_sd"], [f"{x}_n" if affine else y])]
    if affine:
        nodes += [helper.make_node("Mul", [f"{x}_n", "gamma"], [f"{x}_g"]),
                  helper.make_node("Add", [f"{x}_g", "beta"], [y])]
    return nodes


LN_CONSTS = [scalar("two", 2.0), scalar("eps", 1e-5), ("gamma", w(16) + 1.0), ("beta", w(16)),
             ("axes", np.array([-1], np.int64))]


def test_layernorm_becomes_layernormalization_at_opset_17_and_18():
    for opset in (17, 18):
        nodes = layernorm_nodes("x", "y", opset) + layernorm_nodes("y", "z", opset, affine=False)
        model = make_model(nodes, [("x", [2, 5, 16])], [("z", [2, 5, 16])], LN_CONSTS, opset=opset)
        graph, stats = fuse(model)
        assert op_types(graph) == ["LayerNormalization", "LayerNormalization"]
        assert stats["layernorms_fused"] == 2
        assert all(op.attrs["axis"] == -1 for op in graph.ops.values())


def test_layernorm_below_opset_17_or_over_a_middle_axis_stays():
    model = make_model(layernorm_nodes("x", "y", 13), [("x", [2, 5, 16])], [("y", [2, 5, 16])],
                       LN_CONSTS, opset=13)
    graph, stats = fuse(model)
    assert "LayerNormalization" not in op_types(graph)
    nodes = layernorm_nodes("x", "y", 17, affine=False)
    for node in nodes:
        if node.op_type == "ReduceMean":
            node.attribute[0].ints[:] = [1]
    model = make_model(nodes, [("x", [2, 5, 16])], [("y", [2, 5, 16])], LN_CONSTS, opset=17)
    graph, stats = fuse(model)
    assert "LayerNormalization" not in op_types(graph) and "layernorms_fused" not in stats


# ---------------------------------------------------------------------------------------------
# Softmax
# ---------------------------------------------------------------------------------------------
def softmax_nodes(x: str, y: str, axis: int, opset: int, stable: bool = True) -> list:
    def reduce(op_type, inp, out):
        if op_type == "ReduceSum" and opset >= 13 or op_type == "ReduceMax" and opset >= 18:
            return helper.make_node(op_type, [inp, f"ax{axis}"], [out])
        return helper.make_node(op_type, [inp], [out], axes=[axis])
    nodes = []
    src = x
    if stable:
        nodes += [reduce("ReduceMax", x, f"{x}_max"),
                  helper.make_node("Sub", [x, f"{x}_max"], [f"{x}_d"])]
        src = f"{x}_d"
    return nodes + [helper.make_node("Exp", [src], [f"{x}_e"]),
                    reduce("ReduceSum", f"{x}_e", f"{x}_s"),
                    helper.make_node("Div", [f"{x}_e", f"{x}_s"], [y])]


AXES = [(f"ax{a}", np.array([a], np.int64)) for a in (-1, 1, 2)]


def test_softmax_decompositions_become_softmax():
    nodes = softmax_nodes("a", "ya", -1, 13) + softmax_nodes("b", "yb", 1, 13, stable=False)
    model = make_model(nodes, [("a", [2, 3, 5]), ("b", [2, 3, 5])],
                       [("ya", [2, 3, 5]), ("yb", [2, 3, 5])],
                       AXES, opset=13)
    graph, stats = fuse(model)
    assert op_types(graph) == ["Softmax", "Softmax"]
    assert sorted(op.attrs["axis"] for op in graph.ops.values()) == [-1, 1]
    assert stats["softmaxes_fused"] == 2


def test_softmax_before_opset_13_only_over_the_last_axis():
    nodes = softmax_nodes("a", "ya", 2, 11) + softmax_nodes("b", "yb", 1, 11)
    model = make_model(nodes, [("a", [2, 3, 5]), ("b", [2, 3, 5])],
                       [("ya", [2, 3, 5]), ("yb", [2, 3, 5])],
                       opset=11)
    graph, stats = fuse(model)
    assert op_types(graph).count("Softmax") == 1 and "Exp" in op_types(graph)
    assert stats["softmaxes_fused"] == 1
