"""Synthetic long chains for optimizer scaling (benchmarks/scale.py, tests/test_scale.py).

    model = chain_model(10_000)     # about 10,000 nodes

A block repeats the patterns the O2 passes rewrite, so every pass has work proportional to the
length: Conv -> BatchNormalization -> Relu (folding, epilogue fusion), an inverse Transpose pair
(cancels), Identity and Dropout (removed), Add of a constant computed from constants (folding),
Reshape -> Reshape (merges), Split -> Concat in order (the identity), a duplicated Mul (CSE), and
a dead side branch (dead code). Tensors are tiny ([1, 4, 4, 4]): the point is the node count.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

C, H, W = 4, 4, 4
#: Nodes one block adds.
BLOCK_NODES = 17


def chain_model(n_nodes: int, *, seed: int = 0, opset: int = 17) -> onnx.ModelProto:
    """A chain of about `n_nodes` nodes (whole blocks; at least one)."""
    rng = np.random.default_rng(seed)
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []

    def const(name: str, array: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(array, name))
        return name

    def node(op: str, inputs: list[str], outputs: list[str], **attrs) -> None:
        nodes.append(helper.make_node(op, inputs, outputs, name=f"{outputs[0]}_op", **attrs))

    x = "x"
    for b in range(max(1, n_nodes // BLOCK_NODES)):
        p = f"b{b}_"
        w = const(p + "w", (rng.standard_normal((C, C, 1, 1)) * 0.5).astype(np.float32))
        node("Conv", [x, w], [p + "conv"], kernel_shape=[1, 1])
        bn = [const(p + k, np.asarray(v, np.float32)) for k, v in (
            ("scale", rng.uniform(0.5, 1.5, C)), ("bias", rng.standard_normal(C) * 0.1),
            ("mean", rng.standard_normal(C) * 0.1), ("var", rng.uniform(0.5, 2, C)))]
        node("BatchNormalization", [p + "conv", *bn], [p + "bn"])
        node("Relu", [p + "bn"], [p + "relu"])
        node("Transpose", [p + "relu"], [p + "nhwc"], perm=[0, 2, 3, 1])
        node("Transpose", [p + "nhwc"], [p + "nchw"], perm=[0, 3, 1, 2])
        node("Identity", [p + "nchw"], [p + "id"])
        node("Dropout", [p + "id"], [p + "drop"])
        # a bias computed from constants: folded to one initializer
        k1 = const(p + "k1", rng.standard_normal((1, C, 1, 1)).astype(np.float32) * 0.1)
        k2 = const(p + "k2", np.full((1, C, 1, 1), 0.5, np.float32))
        node("Mul", [k1, k2], [p + "shift"])
        node("Add", [p + "drop", p + "shift"], [p + "add"])
        node("Reshape", [p + "add", const(p + "s1", np.array([1, C, H * W], np.int64))],
             [p + "flat"])
        node("Reshape", [p + "flat", const(p + "s2", np.array([1, C, H, W], np.int64))],
             [p + "back"])
        node("Split", [p + "back", const(p + "split", np.array([C // 2, C // 2], np.int64))],
             [p + "lo", p + "hi"], axis=1)
        node("Concat", [p + "lo", p + "hi"], [p + "cat"], axis=1)
        half = const(p + "half", np.array(0.5, np.float32))
        node("Mul", [p + "cat", half], [p + "m1"])
        node("Mul", [p + "cat", half], [p + "m2"])
        node("Add", [p + "m1", p + "m2"], [p + "sum"])
        node("Exp", [p + "sum"], [p + "dead"])  # nobody reads it
        x = p + "sum"
    graph = helper.make_graph(
        nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, C, H, W])],
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, C, H, W])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)
