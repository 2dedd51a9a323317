"""Reshape elimination, channel shuffle and head split at O2: differential against onnxruntime,
with the rewrites counted."""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper

import graphopt
from graphopt import models
from oracle import make_model, op_types, optimize_and_compare, run_ort

NO_FUSION = ["fuse_epilogues", "matmul_add_to_gemm", "fold_affine_after", "fold_affine_before"]


def _stats(report, name):
    return report.stats_by_pass().get(name, {}).get("stats", {})


def _ints(*values):
    return np.array(values, dtype=np.int64)


def test_reshape_chains_merge_and_identity_views_go():
    nodes = [helper.make_node("Relu", ["x"], ["r"]),
             helper.make_node("Reshape", ["r", "s1"], ["a"]),       # [2, 3, 4] -> [6, 4]
             helper.make_node("Reshape", ["a", "s2"], ["b"]),       # -> [2, 12]
             helper.make_node("Flatten", ["b"], ["c"], axis=1),      # joins the chain
             helper.make_node("Sigmoid", ["c"], ["sg"]),
             helper.make_node("Reshape", ["sg", "s3"], ["y"])]       # identity on [2, 12]
    model = make_model(nodes, [("x", [2, 3, 4])], [("y", [2, 12])],
                       [("s1", _ints(6, 4)), ("s2", _ints(2, -1)), ("s3", _ints(2, 12))])
    graph, report = optimize_and_compare(model, "O2")
    assert op_types(graph) == ["Relu", "Reshape", "Sigmoid"]
    stats = _stats(report, "reshape_simplify")
    assert stats["view_chains_merged"] == 2 and stats["identity_views_removed"] == 1
    assert graph.outputs == ["y"]


def test_squeeze_unsqueeze_pairs_cancel_and_unsqueezes_merge():
    nodes = [helper.make_node("Unsqueeze", ["x", "ax0"], ["u"]),        # [3, 4] -> [1, 3, 4]
             helper.make_node("Squeeze", ["u", "ax0"], ["s"]),          # back
             helper.make_node("Relu", ["s"], ["r"]),
             helper.make_node("Unsqueeze", ["r", "ax0"], ["u1"]),       # [1, 3, 4]
             helper.make_node("Unsqueeze", ["u1", "ax3"], ["y"])]       # [1, 3, 4, 1]
    model = make_model(nodes, [("x", [3, 4])], [("y", [1, 3, 4, 1])],
                       [("ax0", _ints(0)), ("ax3", _ints(3))])
    graph, _ = optimize_and_compare(model, "O2")
    assert op_types(graph) == ["Relu", "Unsqueeze"]


def test_symbolic_shape_chains_become_constant_targets():
    """Reshape(x, Concat(Shape(x)[0], Shape(x)[1], 4, 8)) with symbolic batch and sequence
    becomes Reshape(x, [0, 0, 4, 8]); the shape arithmetic dies."""
    nodes = [helper.make_node("Shape", ["x"], ["sh"]),
             helper.make_node("Gather", ["sh", "i0"], ["b"], axis=0),
             helper.make_node("Gather", ["sh", "i1"], ["s"], axis=0),
             helper.make_node("Unsqueeze", ["b", "ax0"], ["b1"]),
             helper.make_node("Unsqueeze", ["s", "ax0"], ["s1"]),
             helper.make_node("Concat", ["b1", "s1", "heads"], ["target"], axis=0),
             helper.make_node("Reshape", ["x", "target"], ["y"])]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", 32])
    model = make_model(nodes, [x], [("y", ["batch", "seq", 4, 8])],
                       [("i0", np.array(0, np.int64)), ("i1", np.array(1, np.int64)),
                        ("ax0", _ints(0)), ("heads", _ints(4, 8))])
    feeds = {"x": np.random.default_rng(0).standard_normal((2, 5, 32)).astype(np.float32)}
    graph, report = optimize_and_compare(model, "O2", feeds=feeds)
    assert op_types(graph) == ["Reshape"]
    reshape = next(iter(graph.ops.values()))
    assert graph.const_value(reshape.inputs[1]).tolist() == [0, 0, 4, 8]
    assert _stats(report, "reshape_simplify")["reshape_targets_made_constant"] == 1


def _shuffle_model(follow_group: int, channels: int = 8, groups: int = 2):
    rng = np.random.default_rng(0)
    n = channels // groups
    inits = [("s5", _ints(1, groups, n, 6, 6)), ("s4", _ints(1, channels, 6, 6)),
             ("dw", rng.standard_normal((channels, 1, 3, 3)).astype(np.float32)),
             ("dwb", rng.standard_normal(channels).astype(np.float32)),
             ("gamma", rng.uniform(0.5, 1.5, channels).astype(np.float32)),
             ("beta", rng.standard_normal(channels).astype(np.float32)),
             ("mean", rng.standard_normal(channels).astype(np.float32)),
             ("var", rng.uniform(0.5, 1.5, channels).astype(np.float32)),
             ("scale", rng.standard_normal((channels, 1, 1)).astype(np.float32)),
             ("pw", rng.standard_normal((5, channels // follow_group, 1, 1)).astype(np.float32))]
    nodes = [helper.make_node("Reshape", ["x", "s5"], ["r5"]),
             helper.make_node("Transpose", ["r5"], ["t5"], perm=[0, 2, 1, 3, 4]),
             helper.make_node("Reshape", ["t5", "s4"], ["shuffled"]),
             helper.make_node("Conv", ["shuffled", "dw", "dwb"], ["d"], group=channels,
                              kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["d", "gamma", "beta", "mean", "var"], ["bn"]),
             helper.make_node("Relu", ["bn"], ["r"]),
             helper.make_node("Mul", ["r", "scale"], ["m"]),
             helper.make_node("Conv", ["m", "pw"], ["y"], group=follow_group, kernel_shape=[1, 1])]
    if follow_group > 1:
        nodes[-1] = helper.make_node("Conv", ["m", "pw"], ["y"], group=1, kernel_shape=[1, 1])
        inits[-1] = ("pw", rng.standard_normal((6, channels, 1, 1)).astype(np.float32))
        nodes.append(helper.make_node("Conv", ["m", "gw"], ["z"], group=follow_group,
                                      kernel_shape=[1, 1]))
        gw = rng.standard_normal((4, channels // follow_group, 1, 1)).astype(np.float32)
        inits.append(("gw", gw))
        outputs = [("y", [1, 6, 6, 6]), ("z", [1, 4, 6, 6])]
    else:
        outputs = [("y", [1, 5, 6, 6])]
    return make_model(nodes, [("x", [1, channels, 6, 6])], outputs, inits)


def test_channel_shuffle_before_commuting_ops_and_a_dense_conv_disappears():
    model = _shuffle_model(follow_group=1)
    graph, report = optimize_and_compare(model, "O2", rtol=1e-4, atol=1e-5, disable=NO_FUSION)
    assert "Transpose" not in op_types(graph) and "Reshape" not in op_types(graph)
    assert _stats(report, "channel_shuffle")["channel_shuffles_absorbed"] == 1


def test_channel_shuffle_read_by_a_grouped_conv_stays():
    model = _shuffle_model(follow_group=2)  # one dense reader, one grouped reader
    graph, report = optimize_and_compare(model, "O2", rtol=1e-4, atol=1e-5)
    assert op_types(graph).count("Transpose") == 1
    assert "channel_shuffle" not in report.stats_by_pass() or \
        not _stats(report, "channel_shuffle")


def test_shufflenet_v2_shuffles_before_dense_convs_disappear():
    model = models.build("shufflenet", size="small")
    feeds = models.example_inputs("shufflenet", model)
    graph, report = optimize_and_compare(model, "O2", feeds=feeds, rtol=1e-4, atol=1e-4)
    # four shuffles; the three read by stride-2 units or the final 1x1 conv disappear, the one
    # feeding a channel Split stays
    assert _stats(report, "channel_shuffle")["channel_shuffles_absorbed"] == 3
    assert op_types(graph).count("Transpose") == 1


def test_attention_head_split_is_absorbed_into_the_projection_weights():
    rng = np.random.default_rng(3)
    wq = rng.standard_normal((16, 16)).astype(np.float32)
    wk = rng.standard_normal((16, 16)).astype(np.float32)
    bias = rng.standard_normal(16).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "wq"], ["q0"]),
             helper.make_node("Add", ["q0", "bq"], ["q1"]),
             helper.make_node("Reshape", ["q1", "heads"], ["q2"]),
             helper.make_node("Transpose", ["q2"], ["q"], perm=[0, 2, 1, 3]),      # [B, H, S, D]
             helper.make_node("MatMul", ["x", "wk"], ["k0"]),
             helper.make_node("Reshape", ["k0", "heads"], ["k2"]),
             helper.make_node("Transpose", ["k2"], ["kt"], perm=[0, 2, 3, 1]),     # [B, H, D, S]
             helper.make_node("MatMul", ["q", "kt"], ["y"])]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", 16])
    model = make_model(nodes, [x], [("y", ["batch", 4, "seq", "seq"])],
                       [("wq", wq), ("wk", wk), ("bq", bias), ("heads", _ints(0, 0, 4, 4))])
    feeds = {"x": rng.standard_normal((2, 5, 16)).astype(np.float32)}
    graph, report = optimize_and_compare(model, "O2", feeds=feeds, rtol=1e-4, atol=1e-4,
                                         disable=NO_FUSION, enable=["head_split"])
    assert "Reshape" not in op_types(graph)
    assert op_types(graph).count("Transpose") == 1   # K's [D, S] order: one transpose left
    assert _stats(report, "head_split")["head_splits_absorbed"] == 2


def test_transformer_attention_loses_its_manipulation_ops():
    model = models.build("transformer", size="small")
    feeds = models.example_inputs("transformer", model)
    before = graphopt.load(model)
    graph, report = optimize_and_compare(model, "O2", feeds=feeds, rtol=1e-4, atol=1e-4,
                                         enable=["head_split"])
    counts = {k: op_types(graph).count(k) for k in ("Transpose", "Reshape", "Concat")}
    layers = before.count_ops("Softmax")
    assert counts == {"Transpose": 2 * layers, "Reshape": layers, "Concat": 0}
    np.testing.assert_allclose(run_ort(graph, feeds)[0], run_ort(model, feeds)[0],
                               rtol=1e-4, atol=1e-4)


def test_fused_qkv_projection_becomes_one_projection_per_group():
    """ViT/SVTR style: MatMul -> Reshape [B, S, 3, H, D] -> Transpose [2, 0, 3, 1, 4] -> the
    three groups picked by Split + Squeeze (PP-OCR) or Gather (timm exports)."""
    rng = np.random.default_rng(4)
    w = rng.standard_normal((12, 36)).astype(np.float32)
    bias = rng.standard_normal(36).astype(np.float32)
    picks = {
        "split": [helper.make_node("Split", ["qkv", "ones"], ["g0", "g1", "g2"], axis=0)] + [
            helper.make_node("Squeeze", [f"g{i}", "ax0"], [name])
            for i, name in enumerate(("q", "k", "v"))],
        "gather": [helper.make_node("Gather", ["qkv", f"i{i}"], [name], axis=0)
                   for i, name in enumerate(("q", "k", "v"))],
    }
    for kind, pick in picks.items():
        nodes = [helper.make_node("MatMul", ["x", "w"], ["p"]),
                 helper.make_node("Add", ["p", "b"], ["pb"]),
                 helper.make_node("Reshape", ["pb", "shape"], ["r"]),
                 helper.make_node("Transpose", ["r"], ["qkv"], perm=[2, 0, 3, 1, 4]),
                 *pick,
                 helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2]),
                 helper.make_node("MatMul", ["q", "kt"], ["scores"]),
                 helper.make_node("MatMul", ["scores", "v"], ["y"])]
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", 12])
        model = make_model(nodes, [x], [("y", ["batch", 2, "seq", 6])],
                           [("w", w), ("b", bias), ("shape", _ints(0, 0, 3, 2, 6)),
                            ("ones", _ints(1, 1, 1)), ("ax0", _ints(0)),
                            ("i0", np.array(0, np.int64)), ("i1", np.array(1, np.int64)),
                            ("i2", np.array(2, np.int64))])
        feeds = {"x": rng.standard_normal((2, 5, 12)).astype(np.float32)}
        graph, report = optimize_and_compare(model, "O2", feeds=feeds, rtol=1e-4, atol=1e-4,
                                             disable=NO_FUSION, enable=["head_split"])
        kinds = op_types(graph)
        assert {"Reshape", "Split", "Squeeze", "Gather"}.isdisjoint(kinds), kind
        assert kinds.count("Transpose") == 1 and kinds.count("MatMul") == 5, kind
        assert _stats(report, "head_split")["head_splits_absorbed"] == 3


def test_softmax_wrapped_in_flatten_and_reshape_back_is_unwrapped():
    """onnx's version converter wraps an opset-12 Softmax as Flatten -> Softmax ->
    Reshape(Shape(x)); over the last axis that is Softmax(x) itself."""
    nodes = [helper.make_node("Shape", ["x"], ["sh"]),
             helper.make_node("Flatten", ["x"], ["f"], axis=2),
             helper.make_node("Softmax", ["f"], ["s"], axis=1),
             helper.make_node("Reshape", ["s", "sh"], ["sm"]),
             helper.make_node("Reshape", ["sm", "flat"], ["r"]),     # elementwise sandwich
             helper.make_node("Exp", ["r"], ["e"]),
             helper.make_node("Reshape", ["e", "back"], ["y"])]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4, 6])
    model = make_model(nodes, [x], [("y", ["batch", 4, 6])],
                       [("flat", _ints(-1)), ("back", _ints(-1, 4, 6))], opset=13)
    feeds = {"x": np.random.default_rng(5).standard_normal((3, 4, 6)).astype(np.float32)}
    graph, report = optimize_and_compare(model, "O2", feeds=feeds)
    assert op_types(graph) == ["Exp", "Softmax"]
    assert _stats(report, "reshape_simplify")["view_sandwiches_removed"] == 2
