"""nn kernels (Conv, ConvTranspose, pooling, normalizations, softmax, Gelu, Resize) against
onnxruntime on seeded random inputs, one node at a time, through the kernel registry.

Every case runs with the weights as initializers (the kernel prepares them once, at build time)
and, for Conv/ConvTranspose, also fed at run time. The engine's tiled and blocked paths are
forced on small tensors by shrinking their block sizes (monkeypatch), so the tests stay fast.
"""

from __future__ import annotations

import numpy as np
import pytest

from kernel_harness import one_node, rel_l2, run_kernel, run_ort
from graphopt.runtime.kernels import conv as conv_engine

RNG_SEED = 1234


def _rand(rng, *shape, dtype=np.float32):
    return rng.standard_normal(shape).astype(dtype)


def check(op, inputs, attrs=None, *, consts=(), opset=17, n_outputs=1, tol=1e-5, outputs=None):
    model = one_node(op, inputs, attrs or {}, consts=consts, opset=opset, n_outputs=n_outputs,
                     output_names=outputs)
    feeds = {k: v for k, v in inputs.items() if v is not None and k not in consts}
    got = run_kernel(model, feeds)
    want = run_ort(model, feeds)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == w.dtype, (g.shape, w.shape, g.dtype, w.dtype)
        if g.dtype.kind in "iub":
            np.testing.assert_array_equal(g, w)
        else:
            assert rel_l2(g, w) <= tol, rel_l2(g, w)
    return got


# ---------------------------------------------------------------------------------------------
# Conv
# ---------------------------------------------------------------------------------------------
CONV_CASES = [
    # (attrs, x shape, w shape)
    ({}, (1, 3, 9, 9), (4, 3, 3, 3)),
    ({"pads": [1, 1, 1, 1]}, (2, 4, 8, 7), (6, 4, 3, 3)),
    ({"strides": [2, 2], "pads": [1, 0, 2, 1]}, (1, 3, 11, 10), (5, 3, 3, 3)),
    ({"group": 2, "dilations": [2, 1]}, (1, 4, 9, 9), (6, 2, 3, 3)),
    ({"auto_pad": "SAME_UPPER", "strides": [2, 2]}, (1, 3, 9, 8), (2, 3, 3, 3)),
    ({"auto_pad": "SAME_LOWER", "strides": [2, 2]}, (1, 3, 9, 8), (2, 3, 4, 4)),
    ({"auto_pad": "VALID"}, (1, 3, 9, 8), (2, 3, 2, 2)),
    ({"kernel_shape": [3, 3], "pads": [1, 1, 1, 1]}, (1, 2, 6, 6), (3, 2, 3, 3)),
    # 1x1: plain GEMM, strided, grouped, batched
    ({}, (1, 8, 5, 5), (4, 8, 1, 1)),
    ({"strides": [2, 2]}, (1, 8, 9, 9), (4, 8, 1, 1)),
    ({"group": 4}, (2, 8, 5, 5), (12, 2, 1, 1)),
    # grouped 3x3 with many groups (ResNeXt style): one batched matmul over groups
    ({"group": 32, "pads": [1, 1, 1, 1]}, (1, 64, 6, 6), (64, 2, 3, 3)),
    # depthwise: multiplier 1 and 2, strides, dilations, asymmetric pads, batch
    ({"group": 4, "pads": [1, 1, 1, 1]}, (2, 4, 9, 9), (4, 1, 3, 3)),
    ({"group": 4, "pads": [1, 1, 1, 1]}, (1, 4, 9, 9), (8, 1, 3, 3)),
    ({"group": 4, "pads": [1, 1, 1, 1], "strides": [2, 2]}, (1, 4, 9, 10), (4, 1, 3, 3)),
    ({"group": 4, "pads": [2, 2, 2, 2], "dilations": [2, 2], "strides": [2, 1]}, (1, 4, 12, 11), (4, 1, 5, 5)),
    ({"group": 3, "pads": [0, 1, 2, 1], "strides": [3, 2]}, (2, 3, 13, 11), (6, 1, 3, 2)),
    ({"group": 8, "auto_pad": "SAME_UPPER", "strides": [2, 2]}, (1, 8, 9, 8), (8, 1, 4, 4)),
    # 1-D and 3-D
    ({"pads": [1, 2], "strides": [2]}, (2, 3, 11), (4, 3, 3)),
    ({"group": 3, "pads": [1, 1]}, (1, 3, 10), (3, 1, 3)),
    ({"pads": [1, 1, 1, 1, 1, 1]}, (1, 2, 5, 6, 7), (3, 2, 3, 3, 3)),
    ({"strides": [1, 2, 2], "dilations": [2, 1, 1]}, (1, 2, 6, 6, 7), (2, 2, 2, 3, 3)),
]


@pytest.mark.parametrize("attrs,xs,ws", CONV_CASES)
@pytest.mark.parametrize("weights", ["const", "fed"])
def test_conv(attrs, xs, ws, weights):
    rng = np.random.default_rng(RNG_SEED)
    x, w, b = _rand(rng, *xs), _rand(rng, *ws), _rand(rng, ws[0])
    consts = ("w", "b") if weights == "const" else ()
    check("Conv", {"x": x, "w": w, "b": b}, attrs, consts=consts)
    check("Conv", {"x": x, "w": w}, attrs, consts=consts[:1])


@pytest.mark.parametrize("attrs,xs,ws", [
    ({"pads": [1, 1, 1, 1]}, (1, 8, 23, 21), (5, 8, 3, 3)),                          # im2col tiles
    ({"pads": [1, 1, 1, 1], "strides": [2, 2], "group": 2}, (2, 8, 23, 21), (6, 4, 3, 3)),
    ({"group": 6, "pads": [2, 2, 2, 2]}, (1, 6, 30, 17), (6, 1, 5, 5)),               # row blocks
    ({"group": 6, "pads": [1, 1, 1, 1], "strides": [2, 2]}, (2, 6, 19, 17), (12, 1, 3, 3)),
    ({"group": 16, "pads": [1, 1, 1, 1]}, (1, 16, 6, 6), (16, 1, 3, 3)),              # channel blocks
    ({"pads": [1, 2, 0, 1]}, (2, 5, 9, 20), (4, 5, 3, 3)),                            # shifted GEMM
    ({"pads": [2, 2, 2, 2], "dilations": [2, 1]}, (1, 3, 8, 17), (6, 3, 3, 4)),
])
def test_conv_blocked_paths(monkeypatch, attrs, xs, ws):
    """Tiny block budgets force the im2col row tiles and the depthwise channel/row blocks."""
    monkeypatch.setattr(conv_engine, "IM2COL_TILE_BYTES", 2048)
    monkeypatch.setattr(conv_engine, "DEPTHWISE_BLOCK", 200)
    monkeypatch.setattr(conv_engine, "SHIFTED_GEMM_TILE", 150)
    rng = np.random.default_rng(RNG_SEED)
    x, w, b = _rand(rng, *xs), _rand(rng, *ws), _rand(rng, ws[0])
    check("Conv", {"x": x, "w": w, "b": b}, attrs, consts=("w", "b"))


def test_conv_float64():
    """onnxruntime has no double Conv: compare with a direct float64 sum over kernel taps."""
    rng = np.random.default_rng(RNG_SEED)
    x = _rand(rng, 1, 3, 7, 7, dtype=np.float64)
    w = _rand(rng, 4, 3, 3, 3, dtype=np.float64)
    model = one_node("Conv", {"x": x, "w": w}, {"pads": [1, 1, 1, 1]}, consts=("w",))
    got = run_kernel(model, {"x": x})[0]
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    want = sum(np.einsum("nchw,oc->nohw", xp[:, :, i:i + 7, j:j + 7], w[:, :, i, j])
               for i in range(3) for j in range(3))
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# ConvTranspose
# ---------------------------------------------------------------------------------------------
CONV_T_CASES = [
    ({}, (1, 3, 4, 4), (3, 2, 3, 3)),
    ({"strides": [2, 2]}, (1, 3, 4, 4), (3, 2, 2, 2)),                    # PP-OCR det upsampling
    ({"strides": [2, 2]}, (2, 24, 5, 5), (24, 1, 2, 2)),
    ({"strides": [3, 3]}, (1, 3, 4, 4), (3, 2, 2, 2)),                    # gaps between taps
    ({"strides": [2, 2], "output_padding": [1, 1]}, (1, 3, 4, 4), (3, 2, 2, 2)),
    ({"strides": [2, 2], "pads": [1, 0, 0, 1]}, (1, 3, 4, 4), (3, 2, 2, 2)),
    ({"strides": [3, 2], "pads": [1, 1, 1, 1], "output_padding": [1, 1]}, (1, 3, 4, 5), (3, 2, 3, 3)),
    ({"group": 3}, (1, 6, 4, 4), (6, 2, 3, 3)),
    ({"output_shape": [10, 8], "strides": [3, 2]}, (1, 1, 3, 3), (1, 2, 3, 3)),
    ({"auto_pad": "SAME_UPPER", "strides": [2, 2]}, (1, 1, 3, 3), (1, 2, 3, 3)),
    ({"dilations": [2, 2]}, (1, 1, 3, 3), (1, 1, 2, 2)),
    ({}, (1, 2, 5), (2, 3, 3)),
    ({"strides": [2, 1, 2]}, (1, 2, 3, 4, 3), (2, 2, 2, 3, 2)),
    # overlapping taps summed per output phase (_phase_conv_transpose)
    ({"strides": [2, 2], "pads": [1, 1, 1, 1]}, (2, 5, 6, 7), (5, 4, 4, 4)),   # Conv(Resize x2)
    ({"strides": [8, 8], "pads": [1, 1, 1, 1]}, (1, 3, 3, 4), (3, 2, 10, 10)),
    ({"strides": [4, 3], "pads": [0, 2, 3, 1]}, (1, 2, 4, 5), (2, 3, 6, 5)),
    ({"strides": [2, 3], "pads": [1, 0, 0, 2], "output_padding": [1, 2]}, (2, 3, 3, 4), (3, 2, 5, 4)),
    ({"strides": [2, 2], "output_shape": [9, 12]}, (1, 2, 4, 5), (2, 3, 3, 4)),
]


@pytest.mark.parametrize("attrs,xs,ws", CONV_T_CASES)
@pytest.mark.parametrize("weights", ["const", "fed"])
def test_conv_transpose(attrs, xs, ws, weights):
    rng = np.random.default_rng(RNG_SEED)
    x, w = _rand(rng, *xs), _rand(rng, *ws)
    b = _rand(rng, ws[1] * attrs.get("group", 1))
    consts = ("w", "b") if weights == "const" else ()
    check("ConvTranspose", {"x": x, "w": w, "b": b}, attrs, consts=consts)


def test_conv_transpose_overlapping_taps_run_as_one_subpixel_gemm(monkeypatch):
    """Overlapping 2-D taps take the sub-pixel path (and still match onnxruntime)."""
    from graphopt.runtime.kernels import nn
    calls = []
    real = nn._SubPixel.__call__
    monkeypatch.setattr(nn._SubPixel, "__call__",
                        lambda self, *a: calls.append(self.window) or real(self, *a))
    rng = np.random.default_rng(RNG_SEED)
    x, w = _rand(rng, 1, 3, 3, 4), _rand(rng, 3, 2, 10, 10)
    check("ConvTranspose", {"x": x, "w": w}, {"strides": [8, 8], "pads": [1, 1, 1, 1]},
          consts=("w",))
    assert calls == [(2, 2)]      # kernel 10 at stride 8: every phase within a 2x2 window


# ---------------------------------------------------------------------------------------------
# pooling
# ---------------------------------------------------------------------------------------------
POOL_CASES = [
    {"kernel_shape": [3, 3]},
    {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]},
    {"kernel_shape": [3, 3], "strides": [2, 2], "ceil_mode": 1},
    {"kernel_shape": [2, 2], "strides": [2, 2], "ceil_mode": 1, "pads": [1, 1, 0, 0]},
    {"kernel_shape": [3, 3], "dilations": [2, 2]},
    {"kernel_shape": [3, 3], "auto_pad": "SAME_UPPER", "strides": [2, 2]},
    {"kernel_shape": [4, 4], "auto_pad": "SAME_LOWER", "strides": [2, 2]},
    {"kernel_shape": [3, 2], "strides": [3, 2]},
    {"kernel_shape": [9, 10]},                                  # one window: a global pool
]


@pytest.mark.parametrize("attrs", POOL_CASES)
def test_max_pool(attrs):
    x = _rand(np.random.default_rng(RNG_SEED), 2, 3, 9, 10)
    check("MaxPool", {"x": x}, attrs)
    check("MaxPool", {"x": x}, attrs, n_outputs=2)                   # with indices
    check("MaxPool", {"x": x}, {**attrs, "storage_order": 1}, n_outputs=2)


@pytest.mark.parametrize("attrs", POOL_CASES)
@pytest.mark.parametrize("include_pad", [0, 1])
def test_average_pool(attrs, include_pad):
    x = _rand(np.random.default_rng(RNG_SEED), 2, 3, 9, 10)
    check("AveragePool", {"x": x}, {**attrs, "count_include_pad": include_pad}, opset=19)


def test_pool_1d_3d_int8():
    rng = np.random.default_rng(RNG_SEED)
    check("MaxPool", {"x": _rand(rng, 1, 2, 11)}, {"kernel_shape": [3], "strides": [2]}, n_outputs=2)
    x3 = _rand(rng, 1, 2, 5, 6, 7)
    attrs = {"kernel_shape": [3, 2, 2], "pads": [1, 1, 0, 1, 1, 0]}
    check("MaxPool", {"x": x3}, attrs, n_outputs=2)
    check("AveragePool", {"x": x3}, attrs)
    xi = rng.integers(-128, 127, (1, 2, 6, 6)).astype(np.int8)
    check("MaxPool", {"x": xi}, {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1]}, opset=12)


def test_global_and_lp_pools():
    rng = np.random.default_rng(RNG_SEED)
    x = _rand(rng, 2, 3, 5, 6)
    check("GlobalAveragePool", {"x": x})
    check("GlobalMaxPool", {"x": x})
    check("LpPool", {"x": x}, {"kernel_shape": [2, 2], "p": 2}, opset=18)


# ---------------------------------------------------------------------------------------------
# normalizations
# ---------------------------------------------------------------------------------------------
def _bn_params(rng, c):
    return {"s": _rand(rng, c), "b": _rand(rng, c), "m": _rand(rng, c),
            "v": np.abs(_rand(rng, c)) + 0.1}


@pytest.mark.parametrize("opset", [9, 15])
@pytest.mark.parametrize("shape", [(2, 3, 5, 6), (4, 3), (1, 3, 4, 2, 2)])
def test_batch_norm_inference(opset, shape):
    rng = np.random.default_rng(RNG_SEED)
    params = _bn_params(rng, shape[1])
    inputs = {"x": _rand(rng, *shape), **params}
    check("BatchNormalization", inputs, {"epsilon": 1e-3}, consts=tuple(params), opset=opset)
    check("BatchNormalization", inputs, {}, opset=opset)


def test_batch_norm_training_mode():
    rng = np.random.default_rng(RNG_SEED)
    inputs = {"x": _rand(rng, 2, 3, 5, 6), **_bn_params(rng, 3)}
    check("BatchNormalization", inputs, {"training_mode": 1, "momentum": 0.8}, opset=15,
          n_outputs=3)


def test_batch_norm_in_place():
    """With out= (the session's in-place hook) the result lands in the given buffer."""
    from kernel_harness import build_kernel
    rng = np.random.default_rng(RNG_SEED)
    params = _bn_params(rng, 3)
    x = _rand(rng, 2, 3, 4, 4)
    model = one_node("BatchNormalization", {"x": x, **params}, {}, consts=tuple(params), opset=15)
    fn, op, graph = build_kernel(model)
    assert 0 in fn.inplace_slots
    want = run_ort(model, {"x": x})[0]
    buf = x.copy()
    (got,) = fn(buf, *(graph.const_value(n) for n in op.inputs[1:]), out=buf)
    assert got is buf and rel_l2(buf, want) < 1e-6


def test_instance_norm_lrn_layer_norm():
    rng = np.random.default_rng(RNG_SEED)
    x = _rand(rng, 2, 3, 5, 6)
    check("InstanceNormalization", {"x": x, "s": _rand(rng, 3), "b": _rand(rng, 3)}, {"epsilon": 1e-4})
    check("LRN", {"x": x}, {"size": 3, "alpha": 1e-3, "beta": 0.75, "bias": 2.0})
    check("LRN", {"x": _rand(rng, 1, 7, 3, 3)}, {"size": 5})
    check("LayerNormalization", {"x": x, "s": _rand(rng, 6), "b": _rand(rng, 6)}, {}, n_outputs=3)
    check("LayerNormalization", {"x": x, "s": _rand(rng, 5, 6)}, {"axis": 2, "epsilon": 1e-3}, n_outputs=3)
    check("LayerNormalization", {"x": x, "s": _rand(rng, 3, 5, 6), "b": _rand(rng, 3, 5, 6)}, {"axis": -3})


# ---------------------------------------------------------------------------------------------
# softmax family and Gelu
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("op", ["Softmax", "LogSoftmax", "Hardmax"])
@pytest.mark.parametrize("opset", [11, 13])
@pytest.mark.parametrize("axis", [None, 0, 1, 2, -1])
def test_softmax_family(op, opset, axis):
    """opset < 13 flattens to 2-D at `axis` (default 1); opset >= 13 works along `axis`."""
    x = _rand(np.random.default_rng(RNG_SEED), 2, 3, 4) * 3
    check(op, {"x": x}, {} if axis is None else {"axis": axis}, opset=opset)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu(approximate):
    x = _rand(np.random.default_rng(RNG_SEED), 3, 50) * 3
    check("Gelu", {"x": x}, {"approximate": approximate}, opset=20, tol=1e-6)


# ---------------------------------------------------------------------------------------------
# Resize / Upsample
# ---------------------------------------------------------------------------------------------
COORD_MODES = ["half_pixel", "asymmetric", "align_corners", "pytorch_half_pixel", "tf_crop_and_resize"]
NEAREST_MODES = ["round_prefer_floor", "round_prefer_ceil", "floor", "ceil"]
SCALES = [[1, 1, 2, 3], [1, 1, 0.6, 0.8], [1, 1, 1.7, 0.5]]


def _resize_inputs(coord, scales):
    x = _rand(np.random.default_rng(RNG_SEED), 1, 2, 5, 7)
    roi = np.array([0, 0, 0.1, 0.2, 1, 1, 0.9, 0.7], np.float32) if coord == "tf_crop_and_resize" else None
    return {"x": x, "roi": roi, "scales": np.array(scales, np.float32)}


@pytest.mark.parametrize("coord", COORD_MODES)
@pytest.mark.parametrize("nearest_mode", NEAREST_MODES)
@pytest.mark.parametrize("scales", SCALES)
def test_resize_nearest(coord, nearest_mode, scales):
    attrs = {"mode": "nearest", "coordinate_transformation_mode": coord, "nearest_mode": nearest_mode}
    check("Resize", _resize_inputs(coord, scales), attrs, consts=("roi", "scales"), opset=19)


@pytest.mark.parametrize("nearest_mode", NEAREST_MODES)
@pytest.mark.parametrize("scales", SCALES)
def test_resize_nearest_tf_half_pixel_for_nn_opset11(nearest_mode, scales):
    attrs = {"mode": "nearest", "coordinate_transformation_mode": "tf_half_pixel_for_nn",
             "nearest_mode": nearest_mode}
    inputs = _resize_inputs("tf_half_pixel_for_nn", scales)
    inputs["roi"] = np.zeros(0, np.float32)          # roi is a required input before opset 13
    check("Resize", inputs, attrs, consts=("roi", "scales"), opset=11)


@pytest.mark.parametrize("mode", ["linear", "cubic"])
@pytest.mark.parametrize("coord", COORD_MODES + ["half_pixel_symmetric"])
@pytest.mark.parametrize("scales", SCALES)
def test_resize_linear_cubic(mode, coord, scales):
    attrs = {"mode": mode, "coordinate_transformation_mode": coord}
    check("Resize", _resize_inputs(coord, scales), attrs, consts=("roi", "scales"), opset=19)


def test_resize_half_pixel_symmetric_nearest_integer_scales():
    # (with fractional scales onnxruntime rounds some nearest ties of this mode differently)
    attrs = {"mode": "nearest", "coordinate_transformation_mode": "half_pixel_symmetric"}
    check("Resize", _resize_inputs("half_pixel", [1, 1, 2, 3]), attrs, consts=("roi", "scales"), opset=19)


@pytest.mark.parametrize("mode", ["nearest", "linear", "cubic"])
@pytest.mark.parametrize("coord", ["half_pixel", "asymmetric", "align_corners"])
def test_resize_sizes(mode, coord):
    x = _rand(np.random.default_rng(RNG_SEED), 1, 2, 5, 7)
    inputs = {"x": x, "roi": None, "scales": None, "sizes": np.array([1, 2, 9, 4], np.int64)}
    check("Resize", inputs, {"mode": mode, "coordinate_transformation_mode": coord},
          consts=("sizes",), opset=13)


@pytest.mark.parametrize("mode", ["linear", "cubic"])
def test_resize_antialias_and_exclude_outside(mode):
    x = _rand(np.random.default_rng(RNG_SEED), 1, 2, 9, 11)
    inputs = {"x": x, "roi": None, "scales": np.array([1, 1, 0.6, 0.5], np.float32)}
    check("Resize", inputs, {"mode": mode, "antialias": 1}, consts=("scales",), opset=18)
    if mode == "cubic":   # onnxruntime accepts exclude_outside with cubic (or antialiased linear)
        check("Resize", inputs, {"mode": mode, "exclude_outside": 1, "cubic_coeff_a": -0.5},
              consts=("scales",), opset=18)


@pytest.mark.parametrize("policy", ["not_larger", "not_smaller"])
def test_resize_axes_keep_aspect_ratio(policy):
    x = _rand(np.random.default_rng(RNG_SEED), 1, 2, 5, 7)
    inputs = {"x": x, "roi": None, "scales": None, "sizes": np.array([3, 3], np.int64)}
    check("Resize", inputs, {"axes": [2, 3], "keep_aspect_ratio_policy": policy},
          consts=("sizes",), opset=18)
    check("Resize", inputs, {"axes": [3, 2], "keep_aspect_ratio_policy": policy},
          consts=("sizes",), opset=18)


def test_resize_integer_factor_nearest_det_model():
    """The PP-OCR det upsampling: nearest, asymmetric, factors 2/4/8 (the repeat fast path)."""
    x = _rand(np.random.default_rng(RNG_SEED), 1, 3, 5, 4)
    for f in (2, 4, 8):
        inputs = {"x": x, "roi": np.zeros(0, np.float32), "scales": np.array([1, 1, f, f], np.float32)}
        attrs = {"mode": "nearest", "coordinate_transformation_mode": "asymmetric", "nearest_mode": "floor"}
        check("Resize", inputs, attrs, consts=("roi", "scales"), opset=11)


def test_resize_opset10_and_upsample():
    x = _rand(np.random.default_rng(RNG_SEED), 1, 2, 5, 7)
    for scales in ([1, 1, 2, 3], [1, 1, 0.5, 0.6]):
        check("Resize", {"x": x, "scales": np.array(scales, np.float32)}, {"mode": "nearest"},
              consts=("scales",), opset=10)
    check("Resize", {"x": x, "scales": np.array([1, 1, 2, 3], np.float32)}, {"mode": "linear"},
          consts=("scales",), opset=10)
    check("Upsample", {"x": x, "scales": np.array([1, 1, 2, 3], np.float32)}, {"mode": "nearest"},
          consts=("scales",), opset=9)
    check("Upsample", {"x": x, "scales": np.array([1, 1, 2, 1.5], np.float32)}, {"mode": "linear"},
          consts=("scales",), opset=9)


def test_resize_uint8_truncates_like_onnxruntime():
    rng = np.random.default_rng(RNG_SEED)
    x = rng.integers(0, 255, (1, 2, 5, 7)).astype(np.uint8)
    inputs = {"x": x, "roi": None, "scales": np.array([1, 1, 1.5, 2.5], np.float32)}
    model = one_node("Resize", inputs, {"mode": "linear"}, consts=("scales",), opset=13)
    got = run_kernel(model, {"x": x})[0]
    want = run_ort(model, {"x": x})[0]
    assert got.dtype == np.uint8 and got.shape == want.shape
    # float rounding can put an exact .0 on either side of the truncation
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 1
    assert (got == want).mean() > 0.95
