"""QDQ groups run as one int8 step (runtime/qdq.py, runtime/kernels/qdq.py).

Models are built by hand as the quantization contract writes them (x -> Q -> DQ, int8 weights
per output channel, int32 bias, [outlier op + Add], [Relu/Clip], output Q -> DQ). Each test
checks that the group ran fused (`Session.int8_steps`, with its accumulation) and that the
quantized output is bitwise:
- the exact int64 reference (integer conv/GEMM of the quantized values, int32 bias, onnxruntime's
  requantization: float32(acc) * float32(x_s * w_s / y_s), rint, + zp, saturate, clamps) for
  int8_acc32;
- the acc16 model (gemm.int_gemm_acc16 on the raw operands, K in FBGEMM's order, zero-point
  corrections in int32) for int8_acc16;
- onnxruntime's own fused QLinearConv / QLinearMatMul / QGemm where its accumulation is exact
  (uint8 x int8 on AVX2 without VNNI saturates pairs of products to int16, so those comparisons
  use |w| <= 64: no pair can exceed 2 * 255 * 64 = 32640).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from numpy.lib.stride_tricks import sliding_window_view
from onnx import TensorProto, helper, numpy_helper

import graphopt
from graphopt.runtime.kernels.gemm import acc16_safe_columns, int_gemm_acc16
from graphopt.runtime.session import Session
from oracle import run_ort

SEED = 11
INT16_MAX = 32767


# ---------------------------------------------------------------------------------------------
# model builder (the contract's QDQ format)
# ---------------------------------------------------------------------------------------------
def _init(name, array):
    return numpy_helper.from_array(np.asarray(array), name)


def _meta(node, **items):
    for key, value in items.items():
        entry = node.metadata_props.add()
        entry.key, entry.value = key, value
    return node


def qdq_model(op_type, x_shape, w_q, w_scale, *, bias_q=None, attrs=None, act=None,
              outlier_w=None, kernel="int8_acc32", x_params=(0.02, 128), y_params=(0.05, 100),
              x_dtype=np.uint8, sparse_outlier=True, opset=13, extra_outputs=()):
    """x (float) -> Q -> DQ -> op(DQ(W), DQ(bias)) [+ op(DQ(W_outlier))] [act] -> Q -> DQ -> y.
    Outputs: y_q (the quantized result) and y."""
    attrs = dict(attrs or {})
    c_out_axis = {"Conv": 0, "Gemm": 0 if attrs.get("transB") else 1, "MatMul": 1}[op_type]
    xs, xz = np.float32(x_params[0]), np.array(x_params[1], x_dtype)
    ys, yz = np.float32(y_params[0]), np.array(y_params[1], np.uint8)
    inits = [_init("xs", xs), _init("xz", xz), _init("ys", ys), _init("yz", yz),
             _init("w_q", w_q), _init("ws", w_scale),
             _init("wz", np.zeros(w_scale.shape, np.int8))]
    nodes = [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["x_q"], name="x_quant"),
             helper.make_node("DequantizeLinear", ["x_q", "xs", "xz"], ["x_dq"], name="x_dequant"),
             helper.make_node("DequantizeLinear", ["w_q", "ws", "wz"], ["w_dq"], axis=c_out_axis,
                              name="w_dequant")]
    inputs = ["x_dq", "w_dq"]
    if bias_q is not None:
        inits += [_init("b_q", bias_q), _init("bs", (xs * w_scale).astype(np.float32))]
        nodes.append(helper.make_node("DequantizeLinear", ["b_q", "bs"], ["b_dq"], axis=0,
                                      name="b_dequant"))
        inputs.append("b_dq")
    nodes.append(_meta(helper.make_node(op_type, inputs, ["y_f"], name="main", **attrs),
                       **{"graphopt.quant": "int8", "graphopt.kernel": kernel}))
    last = "y_f"
    sparse = []
    if outlier_w is not None:
        if sparse_outlier:
            flat = np.flatnonzero(outlier_w)
            values = numpy_helper.from_array(outlier_w.reshape(-1)[flat], "wo_q")
            indices = numpy_helper.from_array(flat.astype(np.int64), "wo_q_idx")
            sparse.append(helper.make_sparse_tensor(values, indices, list(outlier_w.shape)))
        else:
            inits.append(_init("wo_q", outlier_w))
        nodes.append(helper.make_node("DequantizeLinear", ["wo_q", "ws", "wz"], ["wo_dq"],
                                      axis=c_out_axis, name="wo_dequant"))
        nodes.append(_meta(helper.make_node(op_type, ["x_dq", "wo_dq"], ["y_o"], name="outlier",
                                            **attrs),
                           **{"graphopt.quant": "int8", "graphopt.kernel": "int8_acc32",
                              "graphopt.outlier_of": "main"}))
        nodes.append(helper.make_node("Add", ["y_f", "y_o"], ["y_sum"], name="outlier_add"))
        last = "y_sum"
    if act == "relu":
        nodes.append(helper.make_node("Relu", [last], ["y_act"], name="relu"))
        last = "y_act"
    elif act is not None:
        _, lo, hi = act
        inits += [_init("clip_lo", np.float32(lo)), _init("clip_hi", np.float32(hi))]
        nodes.append(helper.make_node("Clip", [last, "clip_lo", "clip_hi"], ["y_act"],
                                      name="clip"))
        last = "y_act"
    nodes.append(helper.make_node("QuantizeLinear", [last, "ys", "yz"], ["y_q"], name="y_quant"))
    nodes.append(helper.make_node("DequantizeLinear", ["y_q", "ys", "yz"], ["y"],
                                  name="y_dequant"))
    outputs = [helper.make_tensor_value_info("y_q", TensorProto.UINT8, None),
               helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]
    outputs += [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in extra_outputs]
    graph = helper.make_graph(nodes, "qdq", [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, list(x_shape))], outputs, inits, sparse_initializer=sparse)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def quantize_input(x, x_params, dtype=np.uint8):
    info = np.iinfo(dtype)
    q = np.rint(x / np.float32(x_params[0])) + x_params[1]
    return np.clip(q, info.min, info.max).astype(dtype)


def requant(acc, x_scale, w_scale, y_params, shape, lo=0, hi=255):
    """onnxruntime's requantization on an exact accumulator."""
    mult = (np.float32(x_scale) * np.asarray(w_scale, np.float32)) / np.float32(y_params[0])
    y = np.rint(acc.astype(np.float32) * mult.reshape(shape)) + np.float32(y_params[1])
    return np.clip(y, lo, hi).astype(np.uint8)


def conv_ref(x_q, x_zp, w, pads, strides, group):
    """int64 convolution of the shifted input by sliding windows (small sizes only)."""
    x = x_q.astype(np.int64) - x_zp
    x = np.pad(x, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    w = w.astype(np.int64)
    kh, kw = w.shape[2:]
    win = sliding_window_view(x, (kh, kw), axis=(2, 3))[:, :, ::strides[0], ::strides[1]]
    cog, cig = w.shape[0] // group, w.shape[1]
    return np.concatenate([np.einsum("nchwij,ocij->nohw", win[:, g * cig:(g + 1) * cig],
                                     w[g * cog:(g + 1) * cog]) for g in range(group)], axis=1)


def conv_acc16_ref(x_q, x_zp, w, pads, strides, group):
    """The acc16 model of a conv: raw operands, K ordered (kernel offset, channel) as FBGEMM's
    NHWC im2col, padding holding the zero point, correction -x_zp * sum_k w in int64."""
    x = np.pad(x_q.astype(np.int64), ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])),
               constant_values=x_zp)
    kh, kw = w.shape[2:]
    win = sliding_window_view(x, (kh, kw), axis=(2, 3))[:, :, ::strides[0], ::strides[1]]
    n, _, oh, ow = win.shape[:4]
    cog, cig = w.shape[0] // group, w.shape[1]
    out = np.zeros((n, w.shape[0], oh * ow), np.int64)
    for g in range(group):
        for b in range(n):
            a = win[b, g * cig:(g + 1) * cig].transpose(1, 2, 3, 4, 0).reshape(oh * ow, -1)
            wg = w[g * cog:(g + 1) * cog].astype(np.int64).transpose(2, 3, 1, 0).reshape(-1, cog)
            raw = int_gemm_acc16(a.astype(np.uint8), wg.astype(np.int8)).astype(np.int64)
            out[b, g * cog:(g + 1) * cog] = (raw - x_zp * wg.sum(axis=0)).T
    return out.reshape(n, w.shape[0], oh, ow)


def only_step(session, accumulation="int8_acc32"):
    (step,) = session.int8_steps
    assert step.op == "main" and step.accumulation == accumulation
    return step


def w_scales(rng, n):
    return (rng.random(n) * 0.01 + 0.002).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# acc32: exact, and equal to onnxruntime's fused kernels
# ---------------------------------------------------------------------------------------------
CONV_CASES = {
    "3x3_bias": ({"pads": [1, 1, 1, 1]}, (2, 16, 9, 9), (8, 16, 3, 3), True),
    "3x3_no_bias_stride2": ({"pads": [1, 1, 1, 1], "strides": [2, 2]}, (1, 12, 10, 10),
                            (6, 12, 3, 3), False),
    "grouped": ({"pads": [1, 1, 1, 1], "group": 4}, (1, 16, 8, 8), (8, 4, 3, 3), True),
    "depthwise": ({"pads": [1, 1, 1, 1], "group": 16}, (1, 16, 8, 8), (16, 1, 3, 3), True),
    "pointwise": ({}, (1, 64, 6, 6), (24, 64, 1, 1), True),
    "winograd_shape": ({"pads": [1, 1, 1, 1]}, (1, 48, 16, 16), (32, 48, 3, 3), True),
    "long_k": ({"pads": [1, 1, 1, 1]}, (1, 300, 5, 5), (4, 300, 3, 3), True),
}


@pytest.mark.parametrize("case", sorted(CONV_CASES))
def test_conv_acc32_exact_and_equal_to_onnxruntime(case):
    attrs, x_shape, w_shape, with_bias = CONV_CASES[case]
    rng = np.random.default_rng(SEED)
    w = rng.integers(-64, 65, w_shape).astype(np.int8)
    ws = w_scales(rng, w_shape[0])
    bias = rng.integers(-3000, 3000, w_shape[0]).astype(np.int32) if with_bias else None
    model = qdq_model("Conv", x_shape, w, ws, bias_q=bias, attrs=attrs)
    x = (rng.standard_normal(x_shape) * 1.5).astype(np.float32)
    session = Session(model)
    only_step(session)
    got = session.run({"x": x})["y_q"]
    x_q = quantize_input(x, (0.02, 128))
    acc = conv_ref(x_q, 128, w, attrs.get("pads", [0] * 4), attrs.get("strides", [1, 1]),
                   attrs.get("group", 1))
    if bias is not None:
        acc = acc + bias.reshape(-1, 1, 1)
    want = requant(acc, 0.02, ws, (0.05, 100), (-1, 1, 1))
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(got, run_ort(model, {"x": x})[0])


def test_conv_full_range_weights_exact_where_onnxruntime_saturates_pairs():
    """Full-range int8 weights: the int8 step stays exact (int64 reference); onnxruntime's
    u8 x s8 kernel without VNNI may deviate, never the other way round."""
    rng = np.random.default_rng(SEED)
    w = rng.integers(-128, 128, (8, 32, 3, 3)).astype(np.int8)
    ws = w_scales(rng, 8)
    model = qdq_model("Conv", (1, 32, 8, 8), w, ws, attrs={"pads": [1, 1, 1, 1]},
                      x_params=(0.02, 0), y_params=(0.5, 128))
    x = (np.abs(rng.standard_normal((1, 32, 8, 8))) * 3).astype(np.float32)
    got = Session(model).run({"x": x})["y_q"]
    acc = conv_ref(quantize_input(x, (0.02, 0)), 0, w, [1, 1, 1, 1], [1, 1], 1)
    np.testing.assert_array_equal(got, requant(acc, 0.02, ws, (0.5, 128), (-1, 1, 1)))


def test_conv_relu_and_clip_clamp_in_the_quantized_domain():
    rng = np.random.default_rng(SEED)
    w = rng.integers(-64, 65, (8, 16, 3, 3)).astype(np.int8)
    ws = w_scales(rng, 8)
    bias = rng.integers(-3000, 3000, 8).astype(np.int32)
    x = (rng.standard_normal((1, 16, 7, 7)) * 2).astype(np.float32)
    acc = conv_ref(quantize_input(x, (0.02, 128)), 128, w, [1, 1, 1, 1], [1, 1], 1) \
        + bias.reshape(-1, 1, 1)
    # Relu with y_zp = 0: onnxruntime folds the Relu into the Q (its range starts at 0)
    model = qdq_model("Conv", x.shape, w, ws, bias_q=bias, attrs={"pads": [1, 1, 1, 1]},
                      act="relu", y_params=(0.03, 0))
    session = Session(model)
    step = only_step(session)
    assert step.absorbed == ("relu", "y_quant")
    got = session.run({"x": x})["y_q"]
    np.testing.assert_array_equal(got, requant(acc, 0.02, ws, (0.03, 0), (-1, 1, 1)))
    np.testing.assert_array_equal(got, run_ort(model, {"x": x})[0])
    # Relu with y_zp = 100: the clamp at the zero point does the Relu
    model = qdq_model("Conv", x.shape, w, ws, bias_q=bias, attrs={"pads": [1, 1, 1, 1]},
                      act="relu", y_params=(0.03, 100))
    got = Session(model).run({"x": x})["y_q"]
    np.testing.assert_array_equal(got, requant(acc, 0.02, ws, (0.03, 100), (-1, 1, 1), lo=100))
    # Clip(-0.6, 1.5): clamps at Q(-0.6) = 100 - 20 and Q(1.5) = 100 + 50
    model = qdq_model("Conv", x.shape, w, ws, bias_q=bias, attrs={"pads": [1, 1, 1, 1]},
                      act=("clip", -0.6, 1.5), y_params=(0.03, 100))
    session = Session(model)
    assert only_step(session).absorbed == ("clip", "y_quant")
    got = session.run({"x": x})["y_q"]
    want = requant(acc, 0.02, ws, (0.03, 100), (-1, 1, 1), lo=80, hi=150)
    np.testing.assert_array_equal(got, want)
    assert got.min() == 80 and got.max() == 150
    # the op-by-op float path (fake quantization) agrees up to rounding of the float product
    fake = Session(model, fuse=False).run({"x": x})["y_q"]
    assert np.abs(fake.astype(int) - got).max() <= 1


@pytest.mark.parametrize("trans_b", [0, 1])
def test_gemm_exact_and_equal_to_onnxruntime(trans_b):
    rng = np.random.default_rng(SEED)
    k, n = 200, 24
    w = rng.integers(-64, 65, (n, k) if trans_b else (k, n)).astype(np.int8)
    ws = w_scales(rng, n)
    bias = rng.integers(-5000, 5000, n).astype(np.int32)
    model = qdq_model("Gemm", (6, k), w, ws, bias_q=bias, attrs={"transB": trans_b})
    x = rng.standard_normal((6, k)).astype(np.float32)
    session = Session(model)
    only_step(session)
    got = session.run({"x": x})["y_q"]
    b = w.T if trans_b else w
    acc = (quantize_input(x, (0.02, 128)).astype(np.int64) - 128) @ b.astype(np.int64) + bias
    np.testing.assert_array_equal(got, requant(acc, 0.02, ws, (0.05, 100), (1, -1)))
    np.testing.assert_array_equal(got, run_ort(model, {"x": x})[0])


def test_matmul_batched_activations_exact():
    rng = np.random.default_rng(SEED)
    k, n = 96, 40
    w = rng.integers(-64, 65, (k, n)).astype(np.int8)
    ws = w_scales(rng, n)
    model = qdq_model("MatMul", (2, 5, k), w, ws)
    x = rng.standard_normal((2, 5, k)).astype(np.float32)
    session = Session(model)
    only_step(session)
    got = session.run({"x": x})["y_q"]
    acc = (quantize_input(x, (0.02, 128)).astype(np.int64) - 128) @ w.astype(np.int64)
    np.testing.assert_array_equal(got, requant(acc, 0.02, ws, (0.05, 100), (1, 1, -1)))
    np.testing.assert_array_equal(got, run_ort(model, {"x": x})[0])   # its QLinearMatMul


def test_per_tensor_weight_scale_and_int8_activations():
    rng = np.random.default_rng(SEED)
    w = rng.integers(-128, 128, (8, 8, 3, 3)).astype(np.int8)
    ws = np.array([0.004], np.float32)
    model = qdq_model("Conv", (1, 8, 6, 6), w, ws, attrs={"pads": [1, 1, 1, 1]},
                      x_params=(0.03, -5), x_dtype=np.int8)
    x = rng.standard_normal((1, 8, 6, 6)).astype(np.float32)
    session = Session(model)
    only_step(session)
    got = session.run({"x": x})["y_q"]
    acc = conv_ref(quantize_input(x, (0.03, -5), np.int8), -5, w, [1, 1, 1, 1], [1, 1], 1)
    np.testing.assert_array_equal(got, requant(acc, 0.03, ws, (0.05, 100), ()))


# ---------------------------------------------------------------------------------------------
# acc16
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("group", [1, 4])
def test_conv_acc16_saturating_equals_the_model(group):
    rng = np.random.default_rng(SEED)
    c_in = 32
    w = rng.integers(-128, 128, (8, c_in // group, 3, 3)).astype(np.int8)
    w[0] = 0
    w[0, :, 1, 1] = 1                          # one channel that provably cannot saturate
    ws = w_scales(rng, 8)
    attrs = {"pads": [1, 1, 1, 1], "group": group}
    model = qdq_model("Conv", (1, c_in, 6, 6), w, ws, attrs=attrs, kernel="int8_acc16",
                      x_params=(0.01, 10), y_params=(2.0, 128))
    x = (np.abs(rng.standard_normal((1, c_in, 6, 6))) * 2.5).astype(np.float32)
    session = Session(model)
    step = only_step(session, "int8_acc16")
    assert step.acc16_emulated == 7
    got = session.run({"x": x})["y_q"]
    x_q = quantize_input(x, (0.01, 10))
    model_acc = conv_acc16_ref(x_q, 10, w, [1, 1, 1, 1], [1, 1], group)
    exact = conv_ref(x_q, 10, w, [1, 1, 1, 1], [1, 1], group)
    assert not np.array_equal(model_acc, exact)                 # it does saturate
    np.testing.assert_array_equal(got, requant(model_acc, 0.01, ws, (2.0, 128), (-1, 1, 1)))


def test_conv_acc16_depthwise_saturating_equals_the_model():
    rng = np.random.default_rng(SEED)
    w = rng.integers(-128, 128, (16, 1, 3, 3)).astype(np.int8)
    ws = w_scales(rng, 16)
    attrs = {"pads": [1, 1, 1, 1], "group": 16}
    model = qdq_model("Conv", (2, 16, 7, 7), w, ws, attrs=attrs, kernel="int8_acc16",
                      x_params=(0.01, 0), y_params=(1.0, 128))
    x = (np.abs(rng.standard_normal((2, 16, 7, 7))) * 2.5).astype(np.float32)
    session = Session(model)
    assert only_step(session, "int8_acc16").acc16_emulated > 0
    got = session.run({"x": x})["y_q"]
    x_q = quantize_input(x, (0.01, 0))
    model_acc = conv_acc16_ref(x_q, 0, w, [1, 1, 1, 1], [1, 1], 16)
    assert not np.array_equal(model_acc, conv_ref(x_q, 0, w, [1, 1, 1, 1], [1, 1], 16))
    np.testing.assert_array_equal(got, requant(model_acc, 0.01, ws, (1.0, 128), (-1, 1, 1)))


def test_conv_acc16_provably_safe_takes_the_exact_path():
    rng = np.random.default_rng(SEED)
    w = rng.integers(-1, 2, (8, 16, 3, 3)).astype(np.int8)          # 255 * 144 > 32767 ...
    w[np.abs(rng.standard_normal(w.shape)) < 0.6] = 0               # ... so sparsify to fit
    b = w.transpose(2, 3, 1, 0).reshape(-1, 8)
    assert acc16_safe_columns(b, 255).all()
    ws = w_scales(rng, 8)
    model = qdq_model("Conv", (1, 16, 6, 6), w, ws, attrs={"pads": [1, 1, 1, 1]},
                      kernel="int8_acc16", x_params=(0.01, 0), y_params=(0.02, 128))
    x = (np.abs(rng.standard_normal((1, 16, 6, 6))) * 2.5).astype(np.float32)
    session = Session(model)
    assert only_step(session, "int8_acc16").acc16_emulated == 0
    got = session.run({"x": x})["y_q"]
    acc = conv_ref(quantize_input(x, (0.01, 0)), 0, w, [1, 1, 1, 1], [1, 1], 1)
    np.testing.assert_array_equal(got, requant(acc, 0.01, ws, (0.02, 128), (-1, 1, 1)))


@pytest.mark.parametrize("trans_b", [0, 1])
def test_gemm_acc16_saturating_equals_the_model(trans_b):
    rng = np.random.default_rng(SEED)
    k, n = 300, 12
    w = rng.integers(-128, 128, (n, k) if trans_b else (k, n)).astype(np.int8)
    b = w.T if trans_b else w
    ws = w_scales(rng, n)
    bias = rng.integers(-5000, 5000, n).astype(np.int32)
    model = qdq_model("Gemm", (5, k), w, ws, bias_q=bias, attrs={"transB": trans_b},
                      kernel="int8_acc16", x_params=(0.01, 7), y_params=(8.0, 128))
    x = (np.abs(rng.standard_normal((5, k))) * 2.5).astype(np.float32)
    session = Session(model)
    assert only_step(session, "int8_acc16").acc16_emulated == n
    got = session.run({"x": x})["y_q"]
    x_q = quantize_input(x, (0.01, 7))
    raw = int_gemm_acc16(x_q, b).astype(np.int64)
    model_acc = raw - 7 * b.astype(np.int64).sum(axis=0) + bias
    exact = (x_q.astype(np.int64) - 7) @ b.astype(np.int64) + bias
    assert not np.array_equal(model_acc, exact)
    np.testing.assert_array_equal(got, requant(model_acc, 0.01, ws, (8.0, 128), (1, -1)))


def test_matmul_acc16_batched_activations_use_the_model():
    rng = np.random.default_rng(SEED)
    k, n = 260, 6
    w = rng.integers(-128, 128, (k, n)).astype(np.int8)
    ws = w_scales(rng, n)
    model = qdq_model("MatMul", (2, 3, k), w, ws, kernel="int8_acc16", x_params=(0.01, 0),
                      y_params=(8.0, 128))
    x = (np.abs(rng.standard_normal((2, 3, k))) * 2.5).astype(np.float32)
    got = Session(model).run({"x": x})["y_q"]
    x_q = quantize_input(x, (0.01, 0))
    model_acc = int_gemm_acc16(x_q.reshape(6, k), w).reshape(2, 3, n)
    np.testing.assert_array_equal(got, requant(model_acc, 0.01, ws, (8.0, 128), (1, 1, -1)))


# ---------------------------------------------------------------------------------------------
# outlier split
# ---------------------------------------------------------------------------------------------
def split_weights(rng, shape, out_axis, outliers=0.02):
    """W = W_small (|w| <= 1, half zeros: acc16 cannot saturate) + W_outlier (a few large)."""
    small = rng.integers(-1, 2, shape).astype(np.int8)
    small[rng.random(shape) < 0.5] = 0
    big = np.zeros(shape, np.int8)
    mask = rng.random(shape) < outliers
    big[mask] = (rng.integers(40, 128, mask.sum()) * rng.choice([-1, 1], mask.sum())).astype(np.int8)
    small[mask] = 0
    return small, big


@pytest.mark.parametrize("sparse", [True, False])
def test_conv_outlier_split_equals_the_unsplit_acc32_result(sparse):
    rng = np.random.default_rng(SEED)
    w_small, w_big = split_weights(rng, (8, 16, 3, 3), 0)
    assert acc16_safe_columns(w_small.transpose(2, 3, 1, 0).reshape(-1, 8), 255).all()
    ws = w_scales(rng, 8)
    bias = rng.integers(-3000, 3000, 8).astype(np.int32)
    model = qdq_model("Conv", (2, 16, 7, 7), w_small, ws, bias_q=bias, outlier_w=w_big,
                      attrs={"pads": [1, 1, 1, 1], "strides": [2, 1]}, kernel="int8_acc16",
                      act="relu", y_params=(0.1, 0), sparse_outlier=sparse)
    session = Session(model)
    step = only_step(session, "int8_acc16")
    assert step.outlier == "sparse" and step.acc16_emulated == 0
    assert step.absorbed == ("outlier", "outlier_add", "relu", "y_quant")
    x = (rng.standard_normal((2, 16, 7, 7)) * 2).astype(np.float32)
    got = session.run({"x": x})["y_q"]
    acc = conv_ref(quantize_input(x, (0.02, 128)), 128, w_small + w_big, [1, 1, 1, 1], [2, 1],
                   1) + bias.reshape(-1, 1, 1)
    np.testing.assert_array_equal(got, requant(acc, 0.02, ws, (0.1, 0), (-1, 1, 1)))
    # the graph keeps the sparse initializer sparse after a session read it
    graph = graphopt.load(model)
    Session(graph).run({"x": x})
    if sparse:
        assert len(graphopt.to_model(graph).graph.sparse_initializer) == 1


@pytest.mark.parametrize("op_type,trans_b", [("Gemm", 1), ("Gemm", 0), ("MatMul", 0)])
def test_fc_outlier_split_equals_the_unsplit_acc32_result(op_type, trans_b):
    rng = np.random.default_rng(SEED)
    k, n = 512, 16
    shape = (n, k) if trans_b else (k, n)
    w_small, w_big = split_weights(rng, shape, 0 if trans_b else 1, outliers=0.01)
    ws = w_scales(rng, n)
    bias = rng.integers(-3000, 3000, n).astype(np.int32) if op_type == "Gemm" else None
    attrs = {"transB": trans_b} if op_type == "Gemm" else {}
    model = qdq_model(op_type, (7, k), w_small, ws, bias_q=bias, outlier_w=w_big, attrs=attrs,
                      kernel="int8_acc16", y_params=(0.2, 128))
    session = Session(model)
    step = only_step(session, "int8_acc16")
    assert step.outlier == "sparse"
    x = (rng.standard_normal((7, k)) * 2).astype(np.float32)
    got = session.run({"x": x})["y_q"]
    full = (w_small + w_big).astype(np.int64)
    acc = (quantize_input(x, (0.02, 128)).astype(np.int64) - 128) @ (full.T if trans_b else full)
    if bias is not None:
        acc = acc + bias
    np.testing.assert_array_equal(got, requant(acc, 0.02, ws, (0.2, 128), (1, -1)))


def test_dense_outlier_weights_run_as_a_dense_product():
    rng = np.random.default_rng(SEED)
    w_small, w_big = split_weights(rng, (8, 16, 3, 3), 0, outliers=0.3)
    ws = w_scales(rng, 8)
    model = qdq_model("Conv", (1, 16, 5, 5), w_small, ws, outlier_w=w_big,
                      attrs={"pads": [1, 1, 1, 1]}, kernel="int8_acc16")
    session = Session(model)
    assert only_step(session, "int8_acc16").outlier == "dense"
    x = rng.standard_normal((1, 16, 5, 5)).astype(np.float32)
    got = session.run({"x": x})["y_q"]
    acc = conv_ref(quantize_input(x, (0.02, 128)), 128, w_small + w_big, [1, 1, 1, 1], [1, 1], 1)
    np.testing.assert_array_equal(got, requant(acc, 0.02, ws, (0.05, 100), (-1, 1, 1)))


# ---------------------------------------------------------------------------------------------
# when the group must not fuse, and what the plan shows
# ---------------------------------------------------------------------------------------------
def test_requested_intermediate_runs_op_by_op():
    rng = np.random.default_rng(SEED)
    w = rng.integers(-64, 65, (8, 16, 3, 3)).astype(np.int8)
    ws = w_scales(rng, 8)
    model = qdq_model("Conv", (1, 16, 6, 6), w, ws, attrs={"pads": [1, 1, 1, 1]}, act="relu")
    x = rng.standard_normal((1, 16, 6, 6)).astype(np.float32)
    session = Session(model)
    fused = session.run({"x": x})["y_q"]
    out = session.run({"x": x}, ["y_q", "y_f"])                   # the float conv output
    assert session._program.plan(("y_q", "y_f")).int8 == []
    x_q = quantize_input(x, (0.02, 128))
    xf = (x_q.astype(np.float32) - 128) * np.float32(0.02)
    wf = w.astype(np.float32) * ws.reshape(-1, 1, 1, 1)
    ref = run_ort(onnx.helper.make_model(onnx.helper.make_graph(
        [onnx.helper.make_node("Conv", ["a", "b"], ["c"], pads=[1, 1, 1, 1])], "g",
        [onnx.helper.make_tensor_value_info("a", TensorProto.FLOAT, xf.shape),
         onnx.helper.make_tensor_value_info("b", TensorProto.FLOAT, wf.shape)],
        [onnx.helper.make_tensor_value_info("c", TensorProto.FLOAT, None)]),
        opset_imports=[onnx.helper.make_opsetid("", 13)]), {"a": xf, "b": wf})[0]
    np.testing.assert_allclose(out["y_f"], ref, rtol=1e-5, atol=1e-5)
    assert np.abs(out["y_q"].astype(int) - fused).max() <= 1


def test_graph_output_intermediate_is_not_fused():
    rng = np.random.default_rng(SEED)
    w = rng.integers(-64, 65, (8, 16, 3, 3)).astype(np.int8)
    model = qdq_model("Conv", (1, 16, 6, 6), w, w_scales(rng, 8), attrs={"pads": [1, 1, 1, 1]},
                      extra_outputs=("y_f",))
    session = Session(model)
    assert session.int8_steps == []
    x = rng.standard_normal((1, 16, 6, 6)).astype(np.float32)
    out = session.run({"x": x})
    assert out["y_f"].shape == (1, 8, 6, 6)


def test_shared_input_dequantize_keeps_running_for_a_float_reader():
    """x's DQ also feeds a float op: the group reads x_q, the DQ still runs for the other."""
    rng = np.random.default_rng(SEED)
    w = rng.integers(-64, 65, (8, 16, 3, 3)).astype(np.int8)
    ws = w_scales(rng, 8)
    model = qdq_model("Conv", (1, 16, 6, 6), w, ws, attrs={"pads": [1, 1, 1, 1]})
    model.graph.node.append(helper.make_node("Sigmoid", ["x_dq"], ["side"], name="side"))
    model.graph.output.append(helper.make_tensor_value_info("side", TensorProto.FLOAT, None))
    session = Session(model)
    only_step(session)
    x = rng.standard_normal((1, 16, 6, 6)).astype(np.float32)
    out = session.run({"x": x})
    x_q = quantize_input(x, (0.02, 128))
    side = 1 / (1 + np.exp(-(x_q.astype(np.float32) - 128) * np.float32(0.02)))
    np.testing.assert_allclose(out["side"], side, rtol=1e-6)
    acc = conv_ref(x_q, 128, w, [1, 1, 1, 1], [1, 1], 1)
    np.testing.assert_array_equal(out["y_q"], requant(acc, 0.02, ws, (0.05, 100), (-1, 1, 1)))


def test_fuse_off_runs_fake_quantization_and_float_weights_appear_lazily():
    rng = np.random.default_rng(SEED)
    w = rng.integers(-64, 65, (8, 16, 3, 3)).astype(np.int8)
    ws = w_scales(rng, 8)
    model = qdq_model("Conv", (1, 16, 6, 6), w, ws, attrs={"pads": [1, 1, 1, 1]})
    fused = Session(model)
    assert "w_dq" not in fused._program.consts           # no float copy of the weights
    unfused = Session(model, fuse=False)
    assert unfused.int8_steps == [] and "w_dq" in unfused._program.consts
    x = rng.standard_normal((1, 16, 6, 6)).astype(np.float32)
    a = fused.run({"x": x})["y_q"]
    b = unfused.run({"x": x})["y_q"]
    assert np.abs(a.astype(int) - b).max() <= 1
    fused.run({"x": x}, ["y_f"])                          # a plan that needs the float weights
    assert "w_dq" in fused._program.consts


def test_profile_reports_the_int8_step_under_the_compute_op_type():
    rng = np.random.default_rng(SEED)
    w = rng.integers(-64, 65, (8, 16, 3, 3)).astype(np.int8)
    model = qdq_model("Conv", (1, 16, 6, 6), w, w_scales(rng, 8), attrs={"pads": [1, 1, 1, 1]})
    session = Session(model, profile=True)
    session.run({"x": rng.standard_normal((1, 16, 6, 6)).astype(np.float32)})
    by_type = session.profile.by_op_type()
    assert "Conv" in by_type and session.profile.op_types["main"] == "Conv"
    # x's Q and y's DQ run; x's DQ and y's Q are inside the step
    assert session.profile.op_type_counts() == {"Conv": 1, "QuantizeLinear": 1,
                                                "DequantizeLinear": 1}


def test_non_constant_scale_is_not_fused():
    rng = np.random.default_rng(SEED)
    w = rng.integers(-64, 65, (8, 16, 3, 3)).astype(np.int8)
    model = qdq_model("Conv", (1, 16, 6, 6), w, w_scales(rng, 8), attrs={"pads": [1, 1, 1, 1]})
    # y's scale becomes a graph input: the requantization cannot be prepared
    model.graph.initializer.remove(next(t for t in model.graph.initializer if t.name == "ys"))
    model.graph.input.append(helper.make_tensor_value_info("ys", TensorProto.FLOAT, []))
    session = Session(model)
    assert session.int8_steps == []
    x = rng.standard_normal((1, 16, 6, 6)).astype(np.float32)
    out = session.run({"x": x, "ys": np.float32(0.05)})
    assert out["y_q"].shape == (1, 8, 6, 6)


# ---------------------------------------------------------------------------------------------
# row-wise int8 embeddings (contract item 5)
# ---------------------------------------------------------------------------------------------
def embedding_model(table_q, scales):
    nodes = [
        _meta(helper.make_node("Gather", ["table_q", "ids"], ["rows_q"], name="emb"),
              **{"graphopt.quant": "int8_rowwise"}),
        helper.make_node("Cast", ["rows_q"], ["rows"], to=TensorProto.FLOAT),
        helper.make_node("Gather", ["scales", "ids"], ["row_scales"]),
        helper.make_node("Unsqueeze", ["row_scales", "axis"], ["row_scales_2d"]),
        helper.make_node("Mul", ["rows", "row_scales_2d"], ["emb_out"]),
        helper.make_node("ReduceSum", ["emb_out", "reduce_axes"], ["pooled"], keepdims=0),
    ]
    inits = [_init("table_q", table_q), _init("scales", scales),
             _init("axis", np.array([-1], np.int64)), _init("reduce_axes", np.array([1], np.int64))]
    graph = helper.make_graph(nodes, "emb", [helper.make_tensor_value_info(
        "ids", TensorProto.INT64, [2, 5])], [helper.make_tensor_value_info(
            "pooled", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


def test_rowwise_int8_embedding_gathers_rows_from_a_mapped_table(tmp_path):
    rng = np.random.default_rng(SEED)
    rows, dim = 4096, 32
    table_q = rng.integers(-127, 128, (rows, dim)).astype(np.int8)
    scales = (rng.random(rows) * 0.01 + 0.001).astype(np.float32)
    model = embedding_model(table_q, scales)
    path = tmp_path / "emb.onnx"
    onnx.save_model(embedding_model(table_q, scales), str(path), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="emb.data", size_threshold=1024)
    session = Session(str(path))
    table = session._program.consts["table_q"]
    assert isinstance(table, np.memmap) or isinstance(np.asarray(table).base, np.memmap)
    ids = rng.integers(0, rows, (2, 5))
    got = session.run({"ids": ids})["pooled"]
    want = (table_q[ids].astype(np.float32) * scales[ids][..., None]).sum(axis=1)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    np.testing.assert_allclose(got, run_ort(model, {"ids": ids})[0], rtol=1e-6)
    table = session._program.consts["table_q"]            # still the mapped int8 table
    assert table.dtype == np.int8 and not table.flags.owndata
