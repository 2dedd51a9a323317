"""Quantization kernels and the exact integer GEMM machinery.

- gemm.int_gemm_exact / matmul_exact_f32: bitwise equal to int64 numpy on sizes that force
  K-chunking, the float64 route and the integer fallback;
- gemm.int_gemm_acc16: bitwise equal to a slow, obviously correct Python model of 16-bit
  accumulation (pairs saturated to int16, running int16 sum saturated, spilled to int32 per
  K-block), including cases that saturate;
- the ONNX ops against int64 references (bitwise) and against onnxruntime. onnxruntime's
  uint8 x int8 GEMMs on AVX2 without VNNI saturate pairs of products to int16 (vpmaddubsw), so
  for u8 x s8 the comparison with onnxruntime uses weights small enough that no pair can
  saturate; one test checks that where onnxruntime deviates, it matches the pair-saturation model.
"""

from __future__ import annotations

import numpy as np
import pytest
from numpy.lib.stride_tricks import sliding_window_view

from kernel_harness import one_node, run_kernel, run_ort
from graphopt.runtime.kernels import gemm
from graphopt.runtime.kernels.gemm import (
    Acc16Weights, acc16_safe_columns, int_gemm_acc16, int_gemm_exact, matmul_exact_f32,
)

RNG_SEED = 7
INT16_MIN, INT16_MAX = -32768, 32767


def u8(rng, *shape, high=256):
    return rng.integers(0, high, shape).astype(np.uint8)


def i8(rng, *shape, bound=128):
    return rng.integers(-bound, bound, shape).astype(np.int8)


# ---------------------------------------------------------------------------------------------
# exact integer GEMM
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("a_dtype,b_dtype,k", [
    (np.uint8, np.int8, 3000),      # chunks of 514
    (np.int8, np.int8, 2500),       # chunks of 1024
    (np.uint8, np.uint8, 700),
    (np.int16, np.int8, 2000),      # chunk < 128: one float64 GEMM
    (np.int32, np.int32, 50),       # small values in int32 containers
])
def test_int_gemm_exact_matches_int64(a_dtype, b_dtype, k):
    rng = np.random.default_rng(RNG_SEED)
    info_a, info_b = np.iinfo(a_dtype), np.iinfo(b_dtype)
    lo_a, hi_a = max(info_a.min, -40000), min(info_a.max, 40000)
    lo_b, hi_b = max(info_b.min, -300), min(info_b.max, 300)
    a = rng.integers(lo_a, hi_a, (13, k), endpoint=True).astype(a_dtype)
    b = rng.integers(lo_b, hi_b, (k, 9), endpoint=True).astype(b_dtype)
    want = (a.astype(np.int64) @ b.astype(np.int64)).astype(np.int32)
    got = int_gemm_exact(a, b)
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, want)
    # extreme values: every product at its maximum magnitude
    a_ext = np.full((2, k), hi_a if hi_a >= -lo_a else lo_a, a_dtype)
    b_ext = np.full((k, 3), lo_b, b_dtype)
    np.testing.assert_array_equal(int_gemm_exact(a_ext, b_ext),
                                  (a_ext.astype(np.int64) @ b_ext.astype(np.int64)).astype(np.int32))


def test_int_gemm_exact_with_bounds_and_batches():
    rng = np.random.default_rng(RNG_SEED)
    a = u8(rng, 2, 3, 1500)
    b = i8(rng, 1500, 4)
    want = (a.astype(np.int64) @ b.astype(np.int64)).astype(np.int32)
    np.testing.assert_array_equal(int_gemm_exact(a, b, a_absmax=255, b_absmax=128), want)
    # a smaller (still valid) bound lets bigger chunks through; the result stays exact
    np.testing.assert_array_equal(int_gemm_exact(a, b), want)


def test_matmul_exact_f32_beyond_float64_falls_back_to_integers():
    a = np.full((2, 4), 2.0 ** 20, np.float32)
    b = np.full((4, 2), 2.0 ** 20, np.float32)
    got = matmul_exact_f32(a, b, bound=2 ** 60)      # claims |a*b| up to 2**60: K * bound > 2**53
    np.testing.assert_array_equal(got, np.full((2, 2), 4 * 2.0 ** 40))


# ---------------------------------------------------------------------------------------------
# acc16
# ---------------------------------------------------------------------------------------------
def acc16_reference(a, b, k_block, saturate_sum=True):
    """The model, written out: one output element at a time, in plain Python integers."""
    def sat(v):
        return max(INT16_MIN, min(INT16_MAX, v))
    m, k = a.shape
    n = b.shape[1]
    out = np.zeros((m, n), np.int64)
    for i in range(m):
        for j in range(n):
            total = 0
            for k0 in range(0, k, k_block):
                acc = 0
                for p in range(k0, min(k, k0 + k_block), 2):
                    pair = int(a[i, p]) * int(b[p, j])
                    if p + 1 < k:
                        pair += int(a[i, p + 1]) * int(b[p + 1, j])
                    acc = acc + sat(pair)
                    if saturate_sum:
                        acc = sat(acc)
                total += acc
            out[i, j] = total
    return out


@pytest.mark.parametrize("trial", range(24))
def test_acc16_matches_reference(trial):
    rng = np.random.default_rng(RNG_SEED + trial)
    m, k, n = (int(v) for v in rng.integers(1, 8, 3))
    k = int(rng.integers(1, 80))
    k_block = int(rng.choice([2, 4, 8, 16, 256]))
    a = u8(rng, m, k) if trial % 2 else i8(rng, m, k)
    b = i8(rng, k, n, bound=int(rng.choice([3, 20, 128])))
    for saturate_sum in (True, False):
        got = int_gemm_acc16(a, b, k_block=k_block, saturate_sum=saturate_sum)
        assert got.dtype == np.int32
        np.testing.assert_array_equal(got, acc16_reference(a, b, k_block, saturate_sum))


@pytest.mark.parametrize("trial", range(6))
def test_acc16_scattered_saturation_matches_reference(trial):
    """Small mixed-sign products everywhere (the signed partial-sum range clears them) and a
    few outputs whose row and column are both large and same-signed: those alone are emulated,
    one output at a time."""
    rng = np.random.default_rng(RNG_SEED + 100 + trial)
    m, k, n = 24, 64, 20
    a = rng.integers(0, 40, (m, k)).astype(np.uint8)
    b = rng.integers(-20, 21, (k, n)).astype(np.int8)
    hot_rows = rng.choice(m, 2, replace=False)
    hot_cols = rng.choice(n, 2, replace=False)
    a[hot_rows] = rng.integers(200, 256, (2, k))
    b[:, hot_cols] = rng.integers(60, 128, (k, 2))
    for saturate_sum in (True, False):
        got = int_gemm_acc16(a, b, k_block=32, saturate_sum=saturate_sum)
        expected = acc16_reference(a, b, 32, saturate_sum)
        np.testing.assert_array_equal(got, expected)
    exact = int_gemm_exact(a, b)
    saturated = got != exact
    assert saturated.any() and saturated.sum() <= 4


def exact_plus_excess(weights: Acc16Weights, a, b, saturate_sum):
    """The int8 steps' acc16: the exact product plus Acc16Weights' excess."""
    got = np.stack([int_gemm_exact(a_g, b_g) for a_g, b_g in zip(a, b)])
    for g, m, n, delta in weights.excess(a, saturate_sum):
        got[g, m, n] += delta
    return got


@pytest.mark.parametrize("direct_scan", [0, None])
@pytest.mark.parametrize("trial", range(16))
def test_acc16_weights_excess_matches_reference(trial, direct_scan, monkeypatch):
    """Exact product + excess == the acc16 model, for one group (range, sub-block filter,
    direct scan and its many-candidate path) and for several groups; K odd, several blocks,
    signed and unsigned activations, hot rows and columns that saturate."""
    rng = np.random.default_rng(RNG_SEED + 200 + trial)
    groups = 1 if trial % 4 else 3
    m, n = int(rng.integers(1, 60)), int(rng.integers(1, 30))
    k = int(rng.choice([1, 7, 24, 31, 58, 116, 300]))
    a = rng.integers(0, 256, (groups, m, k)).astype(np.uint8) if trial % 2 \
        else rng.integers(-128, 128, (groups, m, k)).astype(np.int8)
    b = rng.integers(-int(rng.choice([20, 60, 128])), 128, (groups, k, n)).astype(np.int8)
    b[..., : n // 3] = np.abs(b[..., : n // 3])            # same-signed columns saturate
    a[:, : m // 4] = 127
    if direct_scan is not None:     # every block through the sub-block filter
        monkeypatch.setattr(gemm, "_DIRECT_SCAN", direct_scan)
    weights = Acc16Weights(b)
    for saturate_sum in (True, False):
        expected = np.stack([acc16_reference(a_g, b_g, 256, saturate_sum)
                             for a_g, b_g in zip(a, b)])
        np.testing.assert_array_equal(exact_plus_excess(weights, a, b, saturate_sum), expected)


def test_acc16_saturates_where_the_exact_result_does_not():
    a = np.full((1, 8), 255, np.uint8)
    b = np.full((8, 2), 127, np.int8)
    b[:, 1] = -128
    got = int_gemm_acc16(a, b, k_block=8)
    # each pair 2*255*127 = 64770 -> 32767; the running sum stays at 32767
    np.testing.assert_array_equal(got, [[INT16_MAX, INT16_MIN]])
    # per-pair saturation only (MLAS-style): four saturated pairs summed in int32
    np.testing.assert_array_equal(int_gemm_acc16(a, b, k_block=8, saturate_sum=False),
                                  [[4 * INT16_MAX, 4 * INT16_MIN]])
    # spilled into int32 every 2 products: no running-sum saturation
    np.testing.assert_array_equal(int_gemm_acc16(a, b, k_block=2), [[4 * INT16_MAX, 4 * INT16_MIN]])


def test_acc16_fast_path_when_provably_safe():
    rng = np.random.default_rng(RNG_SEED)
    a = u8(rng, 64, 512)
    b = i8(rng, 512, 32, bound=1)            # |w| <= 1: 255 * sum|w| over a block may exceed 32767
    safe = acc16_safe_columns(b, a_absmax=255)
    b_small = np.where(np.arange(512)[:, None] % 4 == 0, b, 0).astype(np.int8)
    safe_small = acc16_safe_columns(b_small, a_absmax=255)
    assert safe_small.all() and not safe.all()
    exact = (a.astype(np.int64) @ b_small.astype(np.int64)).astype(np.int32)
    np.testing.assert_array_equal(int_gemm_acc16(a, b_small), exact)


def test_acc16_safe_columns_is_sound():
    """Columns declared safe give the exact product for any activations within the bound."""
    rng = np.random.default_rng(RNG_SEED)
    b = i8(rng, 300, 40, bound=3)
    b[:, :10] = i8(rng, 300, 10, bound=1)
    safe = acc16_safe_columns(b, a_absmax=255, k_block=64)
    assert safe.any()
    a = u8(rng, 16, 300)
    a[:4] = 255
    got = int_gemm_acc16(a, b, k_block=64)
    exact = (a.astype(np.int64) @ b.astype(np.int64)).astype(np.int32)
    np.testing.assert_array_equal(got[:, safe], exact[:, safe])


# ---------------------------------------------------------------------------------------------
# QuantizeLinear / DequantizeLinear / DynamicQuantizeLinear
# ---------------------------------------------------------------------------------------------
def check_exact(op, inputs, attrs=None, *, consts=(), opset=13, n_outputs=1, max_diff=0):
    model = one_node(op, inputs, attrs or {}, consts=consts, opset=opset, n_outputs=n_outputs)
    feeds = {k: v for k, v in inputs.items() if v is not None and k not in consts}
    got = run_kernel(model, feeds)
    want = run_ort(model, feeds)
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == w.dtype
        if g.dtype.kind in "iu":
            assert np.abs(g.astype(np.int64) - w.astype(np.int64)).max(initial=0) <= max_diff
        else:
            np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-7)
    return got


@pytest.mark.parametrize("zp_dtype", [np.uint8, np.int8])
def test_quantize_linear(zp_dtype):
    rng = np.random.default_rng(RNG_SEED)
    x = rng.standard_normal((2, 3, 4)).astype(np.float32) * 3
    check_exact("QuantizeLinear", {"x": x, "s": np.float32(0.02), "z": np.array(3, zp_dtype)})
    check_exact("QuantizeLinear", {"x": x, "s": np.abs(rng.standard_normal(3)).astype(np.float32) + 0.01,
                                   "z": np.array([1, 2, 3], zp_dtype)}, {"axis": 1})
    check_exact("QuantizeLinear", {"x": x, "s": np.abs(rng.standard_normal(4)).astype(np.float32) + 0.01,
                                   "z": np.array([1, 2, 3, 4], zp_dtype)}, {"axis": -1})
    check_exact("QuantizeLinear", {"x": x, "s": np.abs(rng.standard_normal((2, 3, 2))).astype(np.float32) + 0.01,
                                   "z": np.ones((2, 3, 2), zp_dtype)}, {"axis": 2, "block_size": 2}, opset=21)


def test_quantize_linear_rounds_half_to_even_and_saturates():
    x = np.array([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 1000, -1000, 127.5, 128.5], np.float32)
    (q,) = check_exact("QuantizeLinear", {"x": x, "s": np.float32(1), "z": np.array(0, np.int8)})
    np.testing.assert_array_equal(q, [0, 2, 2, 0, -2, -2, 127, -128, 127, 127])
    (q,) = check_exact("QuantizeLinear", {"x": x, "s": np.float32(1)})           # default uint8
    np.testing.assert_array_equal(q, [0, 2, 2, 0, 0, 0, 255, 0, 128, 128])
    check_exact("QuantizeLinear", {"x": x * 100, "s": np.float32(1), "z": np.array(0, np.int16)}, opset=21)
    check_exact("QuantizeLinear", {"x": x * 100, "s": np.float32(1), "z": np.array(7, np.uint16)}, opset=21)
    check_exact("QuantizeLinear", {"x": x, "s": np.float32(0.5)}, {"output_dtype": 3}, opset=21)


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int32])
def test_dequantize_linear(dtype):
    rng = np.random.default_rng(RNG_SEED)
    x = rng.integers(0, 100, (2, 3, 4)).astype(dtype)
    if dtype != np.int32:
        check_exact("DequantizeLinear", {"x": x, "s": np.abs(rng.standard_normal(3)).astype(np.float32),
                                         "z": np.array([1, 2, 3], dtype)}, {"axis": 1})
        check_exact("DequantizeLinear", {"x": x, "s": np.float32(0.1), "z": np.array(5, dtype)})
        check_exact("DequantizeLinear", {"x": x, "s": np.abs(rng.standard_normal((2, 3, 2))).astype(np.float32),
                                         "z": np.ones((2, 3, 2), dtype)}, {"axis": 2, "block_size": 2}, opset=21)
    else:
        check_exact("DequantizeLinear", {"x": x, "s": np.float32(0.1)})


@pytest.mark.parametrize("case", ["random", "zeros", "positive", "negative"])
def test_dynamic_quantize_linear(case):
    rng = np.random.default_rng(RNG_SEED)
    x = {"random": rng.standard_normal((3, 4)), "zeros": np.zeros((3, 4)),
         "positive": np.abs(rng.standard_normal((3, 4))),
         "negative": -np.abs(rng.standard_normal((3, 4)))}[case].astype(np.float32)
    check_exact("DynamicQuantizeLinear", {"x": x}, opset=11, n_outputs=3)


# ---------------------------------------------------------------------------------------------
# MatMulInteger / QLinearMatMul
# ---------------------------------------------------------------------------------------------
def _mm_ref(a, b, az=0, bz=0):
    az = np.asarray(az, np.int64)
    if az.ndim == 1:
        az = az.reshape(-1, 1)
    return ((a.astype(np.int64) - az) @ (b.astype(np.int64) - np.asarray(bz, np.int64))).astype(np.int32)


def _run(op, inputs, attrs=None, *, consts=(), opset=10, meta=None):
    model = one_node(op, inputs, attrs or {}, consts=consts, opset=opset, meta=meta)
    feeds = {k: v for k, v in inputs.items() if v is not None and k not in consts}
    return model, feeds, run_kernel(model, feeds)[0]


@pytest.mark.parametrize("a_kind,b_kind", [("u8", "i8"), ("u8", "u8"), ("i8", "i8"), ("i8", "u8")])
def test_matmul_integer_exact(a_kind, b_kind):
    rng = np.random.default_rng(RNG_SEED)
    gen = {"u8": u8, "i8": i8}
    a, b = gen[a_kind](rng, 5, 1300), gen[b_kind](rng, 1300, 7)
    az, bz = np.array(3, a.dtype), np.array(5, b.dtype)
    _, _, got = _run("MatMulInteger", {"a": a, "b": b, "az": az, "bz": bz})
    np.testing.assert_array_equal(got, _mm_ref(a, b, az, bz))
    _, _, got = _run("MatMulInteger", {"a": a, "b": b}, consts=("b",))
    np.testing.assert_array_equal(got, _mm_ref(a, b))
    a3 = gen[a_kind](rng, 2, 3, 700)
    _, _, got = _run("MatMulInteger", {"a": a3, "b": b[:700], "az": az})
    np.testing.assert_array_equal(got, _mm_ref(a3, b[:700], az))
    # per-row / per-column zero points
    a2, b2 = gen[a_kind](rng, 5, 30), gen[b_kind](rng, 30, 7)
    azv, bzv = np.arange(5).astype(a.dtype), np.arange(7).astype(b.dtype)
    _, _, got = _run("MatMulInteger", {"a": a2, "b": b2, "az": azv, "bz": bzv})
    np.testing.assert_array_equal(got, _mm_ref(a2, b2, azv, bzv))


def test_matmul_integer_against_onnxruntime():
    rng = np.random.default_rng(RNG_SEED)
    a, b = u8(rng, 6, 300), i8(rng, 300, 5, bound=64)   # |w| < 64: no vpmaddubsw saturation
    model, feeds, got = _run("MatMulInteger", {"a": a, "b": b, "az": np.array(9, np.uint8)})
    np.testing.assert_array_equal(got, run_ort(model, feeds)[0])
    a, b = i8(rng, 6, 300), i8(rng, 300, 5)
    model, feeds, got = _run("MatMulInteger", {"a": a, "b": b, "az": np.array(-2, np.int8), "bz": np.array(1, np.int8)})
    np.testing.assert_array_equal(got, run_ort(model, feeds)[0])


def test_onnxruntime_u8s8_deviations_are_pair_saturation():
    """Where onnxruntime's u8 x s8 MatMulInteger differs from the exact product (AVX2 without
    VNNI), it equals the vpmaddubsw pair-saturation model; with VNNI it is simply exact."""
    rng = np.random.default_rng(RNG_SEED)
    a, b = u8(rng, 5, 300), i8(rng, 300, 7)
    model, feeds, got = _run("MatMulInteger", {"a": a, "b": b})
    theirs = run_ort(model, feeds)[0]
    np.testing.assert_array_equal(got, _mm_ref(a, b))
    if not np.array_equal(theirs, got):
        np.testing.assert_array_equal(theirs, int_gemm_acc16(a, b, saturate_sum=False))


def _requant(acc, a_scale, b_scale, y_scale, y_zp, dtype):
    """onnxruntime's requantization formula, used as the reference on exact accumulators."""
    mult = (np.float32(a_scale) * np.asarray(b_scale, np.float32)) / np.float32(y_scale)
    y = np.rint(acc.astype(np.float32) * mult) + np.float32(y_zp)
    info = np.iinfo(dtype)
    return np.clip(y, info.min, info.max).astype(dtype)


def test_qlinear_matmul():
    rng = np.random.default_rng(RNG_SEED)
    a, b = u8(rng, 4, 50), i8(rng, 50, 6, bound=64)
    inputs = {"a": a, "as": np.float32(0.02), "az": np.array(128, np.uint8), "b": b,
              "bs": np.float32(0.01), "bz": np.array(0, np.int8), "ys": np.float32(0.05),
              "yz": np.array(100, np.uint8)}
    model, feeds, got = _run("QLinearMatMul", inputs, consts=("b", "bs", "bz"))
    acc = _mm_ref(a, b, 128, 0)
    np.testing.assert_array_equal(got, _requant(acc, 0.02, 0.01, 0.05, 100, np.uint8))
    assert np.abs(got.astype(int) - run_ort(model, feeds)[0].astype(int)).max() <= 1
    a3 = i8(rng, 2, 4, 50)
    inputs = {"a": a3, "as": np.float32(0.02), "az": np.array(1, np.int8), "b": b,
              "bs": np.float32(0.01), "bz": np.array(0, np.int8), "ys": np.float32(0.05),
              "yz": np.array(-3, np.int8)}
    model, feeds, got = _run("QLinearMatMul", inputs)
    np.testing.assert_array_equal(got, _requant(_mm_ref(a3, b, 1, 0), 0.02, 0.01, 0.05, -3, np.int8))
    assert np.abs(got.astype(int) - run_ort(model, feeds)[0].astype(int)).max() <= 1


def test_matmul_integer_acc16_meta():
    """`graphopt.kernel=int8_acc16` runs the 16-bit accumulation model on the raw operands,
    then subtracts the zero-point terms in int32."""
    rng = np.random.default_rng(RNG_SEED)
    a, b = u8(rng, 6, 520), i8(rng, 520, 5)
    az, bz = np.array(10, np.uint8), np.array(0, np.int8)
    _, _, got = _run("MatMulInteger", {"a": a, "b": b, "az": az, "bz": bz},
                     meta={"graphopt.kernel": "int8_acc16"})
    raw = int_gemm_acc16(a, b).astype(np.int64)
    want = raw - 10 * b.astype(np.int64).sum(axis=0)
    np.testing.assert_array_equal(got, want.astype(np.int32))
    assert not np.array_equal(got, _mm_ref(a, b, az, bz))      # these operands do saturate


# ---------------------------------------------------------------------------------------------
# ConvInteger / QLinearConv
# ---------------------------------------------------------------------------------------------
def _conv_ref(x, w, x_zp, w_zp, pads, strides, group):
    """int64 convolution by sliding windows (small sizes only)."""
    x = x.astype(np.int64) - np.asarray(x_zp, np.int64)
    w_zp = np.asarray(w_zp, np.int64)
    w = w.astype(np.int64) - (w_zp.reshape(-1, 1, 1, 1) if w_zp.ndim else w_zp)
    x = np.pad(x, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    kh, kw = w.shape[2:]
    win = sliding_window_view(x, (kh, kw), axis=(2, 3))[:, :, ::strides[0], ::strides[1]]
    cog, cig = w.shape[0] // group, w.shape[1]
    outs = [np.einsum("nchwij,ocij->nohw", win[:, g * cig:(g + 1) * cig], w[g * cog:(g + 1) * cog])
            for g in range(group)]
    return np.concatenate(outs, axis=1)


CONV_INT_CASES = [
    ({}, (1, 3, 9, 9), (4, 3, 3, 3)),
    ({"pads": [1, 1, 1, 1], "strides": [2, 2]}, (2, 4, 8, 7), (6, 4, 3, 3)),
    ({"group": 4, "pads": [1, 1, 1, 1]}, (1, 4, 9, 9), (8, 1, 3, 3)),
    ({}, (1, 64, 6, 6), (8, 64, 1, 1)),
    ({"pads": [1, 1, 1, 1]}, (1, 300, 5, 5), (4, 300, 3, 3)),    # K = 2700: chunked GEMM
]


@pytest.mark.parametrize("attrs,xs,ws", CONV_INT_CASES)
def test_conv_integer_exact(attrs, xs, ws):
    rng = np.random.default_rng(RNG_SEED)
    pads, strides, group = attrs.get("pads", [0] * 4), attrs.get("strides", [1, 1]), attrs.get("group", 1)
    x, w = u8(rng, *xs), i8(rng, *ws)
    _, _, got = _run("ConvInteger", {"x": x, "w": w, "xz": np.array(7, np.uint8)}, attrs, consts=("w",))
    np.testing.assert_array_equal(got, _conv_ref(x, w, 7, 0, pads, strides, group))
    wu = u8(rng, *ws)
    model, feeds, got = _run("ConvInteger", {"x": x, "w": wu, "xz": np.array(200, np.uint8),
                                             "wz": np.array(130, np.uint8)}, attrs)
    np.testing.assert_array_equal(got, _conv_ref(x, wu, 200, 130, pads, strides, group))
    np.testing.assert_array_equal(got, run_ort(model, feeds)[0])      # u8 x u8: exact there too


@pytest.mark.parametrize("attrs,xs,ws", CONV_INT_CASES)
def test_qlinear_conv(attrs, xs, ws):
    rng = np.random.default_rng(RNG_SEED)
    pads, strides, group = attrs.get("pads", [0] * 4), attrs.get("strides", [1, 1]), attrs.get("group", 1)
    x, w = u8(rng, *xs), i8(rng, *ws, bound=64)
    bias = rng.integers(-1000, 1000, ws[0]).astype(np.int32)
    w_scale = (np.abs(rng.standard_normal(ws[0])) * 0.01 + 0.001).astype(np.float32)
    inputs = {"x": x, "xs": np.float32(0.02), "xz": np.array(128, np.uint8), "w": w, "ws": w_scale,
              "wz": np.zeros(ws[0], np.int8), "ys": np.float32(0.5), "yz": np.array(100, np.uint8), "b": bias}
    model, feeds, got = _run("QLinearConv", inputs, attrs, consts=("w", "ws", "wz", "b"))
    acc = _conv_ref(x, w, 128, 0, pads, strides, group) + bias.reshape(-1, 1, 1)
    want = _requant(acc, 0.02, w_scale.reshape(-1, 1, 1), 0.5, 100, np.uint8)
    np.testing.assert_array_equal(got, want)
    assert np.abs(got.astype(int) - run_ort(model, feeds)[0].astype(int)).max() <= 1
    xi = i8(rng, *xs)
    inputs = {"x": xi, "xs": np.float32(0.02), "xz": np.array(-3, np.int8), "w": w, "ws": np.float32(0.01),
              "wz": np.array(0, np.int8), "ys": np.float32(0.3), "yz": np.array(5, np.int8)}
    model, feeds, got = _run("QLinearConv", inputs, attrs)
    want = _requant(_conv_ref(xi, w, -3, 0, pads, strides, group), 0.02, 0.01, 0.3, 5, np.int8)
    np.testing.assert_array_equal(got, want)
    assert np.abs(got.astype(int) - run_ort(model, feeds)[0].astype(int)).max() <= 1


def test_conv_integer_acc16_meta():
    """acc16 convs order K as (kernel offset, channel), FBGEMM's NHWC im2col; zero-point
    padding and corrections as the int32 epilogue computes them."""
    rng = np.random.default_rng(RNG_SEED)
    x, w = u8(rng, 1, 40, 5, 5), i8(rng, 6, 40, 3, 3)
    inputs = {"x": x, "w": w, "xz": np.array(3, np.uint8)}
    _, _, got = _run("ConvInteger", inputs, {"pads": [1, 1, 1, 1]}, consts=("w",),
                     meta={"graphopt.kernel": "int8_acc16"})
    xp = np.pad(x.astype(np.int64), ((0, 0), (0, 0), (1, 1), (1, 1)), constant_values=3)
    cols = sliding_window_view(xp, (3, 3), axis=(2, 3))[0]          # (c, h, w, i, j)
    a = cols.transpose(1, 2, 3, 4, 0).reshape(25, 9 * 40)          # pixels x (i, j, c)
    b = w.astype(np.int64).transpose(2, 3, 1, 0).reshape(9 * 40, 6)
    raw = int_gemm_acc16(a.astype(np.uint8), b.astype(np.int8)).astype(np.int64)
    want = raw - 3 * b.sum(axis=0)
    np.testing.assert_array_equal(got[0].reshape(6, 25), want.T.astype(np.int32))
    exact = _conv_ref(x, w, 3, 0, [1, 1, 1, 1], [1, 1], 1)
    assert not np.array_equal(got, exact)                            # full-range operands saturate


@pytest.mark.parametrize("groups", [1, 2])
def test_int_conv_acc16_float_accumulator(groups):
    """IntConv's acc16 (exact product + the model's excess), grouped or not, returned as int32
    or as the float32 accumulator the int8 steps requantize: both equal the full model."""
    from graphopt.runtime.kernels.conv import ConvAttrs
    from graphopt.runtime.kernels.int8 import IntConv
    rng = np.random.default_rng(RNG_SEED + groups)
    cig, cog = 20, 4
    x, w = u8(rng, 2, groups * cig, 4, 4), i8(rng, groups * cog, cig, 3, 3)
    bias = rng.integers(-1000, 1000, groups * cog).astype(np.int32)
    attrs = ConvAttrs.from_op({"pads": [1, 1, 1, 1], "group": groups}.get)
    core = IntConv(attrs, w, None, bias, acc16=True)
    as_int = core(x, np.uint8(5))
    as_float = core(x, np.uint8(5), exact_float=True)
    xp = np.pad(x.astype(np.int64), ((0, 0), (0, 0), (1, 1), (1, 1)), constant_values=5)
    want = np.empty((2, groups * cog, 16), np.int64)
    for image in range(2):
        for g in range(groups):
            cols = sliding_window_view(xp[image, g * cig:(g + 1) * cig], (3, 3), axis=(1, 2))
            a = cols.transpose(1, 2, 3, 4, 0).reshape(16, 9 * cig)
            b = w[g * cog:(g + 1) * cog].astype(np.int64).transpose(2, 3, 1, 0) \
                .reshape(9 * cig, cog)
            raw = int_gemm_acc16(a.astype(np.uint8), b.astype(np.int8)).astype(np.int64)
            want[image, g * cog:(g + 1) * cog] = (raw - 5 * b.sum(axis=0)).T \
                + bias[g * cog:(g + 1) * cog, None]
    assert as_int.dtype == np.int32
    np.testing.assert_array_equal(as_int.reshape(want.shape), want)
    np.testing.assert_array_equal(as_float.reshape(want.shape), want)
    assert not np.array_equal(as_int.reshape(want.shape),
                              _conv_ref(x, w, 5, 0, [1, 1, 1, 1], [1, 1], groups)
                              .reshape(want.shape) + bias[:, None])
