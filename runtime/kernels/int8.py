"""Integer GEMM and convolution cores: exact 32-bit accumulation, the acc16 model, requantization.

One implementation serves every quantized op of the runtime: MatMulInteger / QLinearMatMul and
ConvInteger / QLinearConv (quant.py), and the QDQ groups the session runs as one int8 step
(qdq.py: DequantizeLinear -> Conv/Gemm/MatMul -> QuantizeLinear).

- `IntMatMul` / `IntConv` compute (a - a_zp) @ (b - b_zp) (or the convolution) exactly as int32:
  the zero-point-shifted 8-bit values go through float32 BLAS (gemm.matmul_exact_f32, the conv
  engine of conv.py with Winograd off), never numpy's integer matmul. Constant weights are laid
  out once.
- acc16 (op meta `graphopt.kernel=int8_acc16`): FBGEMM-style 16-bit accumulation on the raw
  8-bit operands (gemm.int_gemm_acc16), then the zero-point corrections in int32, as those
  kernels do. Output channels whose weights provably cannot saturate for any activation of the
  input's type (gemm.acc16_safe_columns: max|a| * sum_k |w| <= 32767 in every K-block) are
  exactly the 32-bit result, so they take the fast exact path; only the other channels run the
  model (for convs, the K order is FBGEMM's NHWC im2col: kernel offset, then channel). With
  constant weights, the model is the exact product plus its excess where it saturates
  (gemm.Acc16Weights: the zero-point corrections are the same on both sides, so they cancel);
  without, gemm.int_gemm_acc16 runs it in full (`acc16_corrected`).
- `Requantizer`: onnxruntime's requantization (float32(acc) * float32 multiplier, round half to
  even, + zero point, saturate), with the clamp narrowed by a fused Relu/Clip.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

from graphopt.errors import GraphoptError
from graphopt.runtime.kernels.conv import ConvAttrs, ConvPlan, ConvWeights, conv, exact_matmul
from graphopt.runtime.kernels.gemm import (
    F32_EXACT, Acc16Weights, acc16_safe_columns, im2col, int_gemm_acc16, matmul_exact_f32,
    pad_spatial, to_int32,
)

_INT_RANGES = {
    np.dtype(np.uint8): (0, 255),
    np.dtype(np.int8): (-128, 127),
    np.dtype(np.uint16): (0, 65535),
    np.dtype(np.int16): (-32768, 32767),
    np.dtype(np.int32): (-(2 ** 31), 2 ** 31 - 1),
}


def int_range(dtype) -> tuple[int, int]:
    """(min, max) of a quantized integer type; GraphoptError for types the runtime lacks."""
    try:
        return _INT_RANGES[np.dtype(dtype)]
    except KeyError:
        raise GraphoptError(f"quantized type {np.dtype(dtype)} is not supported by the "
                            "graphopt runtime") from None


def zp_value(zp) -> np.ndarray:
    """A zero point as int64 (0 when omitted)."""
    return np.zeros((), np.int64) if zp is None else np.asarray(zp).astype(np.int64)


def scalar_zp(zp) -> np.ndarray:
    """A per-tensor zero point as a 0-d int64 array (a 1-element array too); else as is."""
    value = zp_value(zp)
    return value.reshape(()) if value.size == 1 else value


def shifted_bound(dtype, zp: np.ndarray) -> int:
    """max |v - zp| over the values of an 8/16-bit type (no pass over the data)."""
    lo, hi = int_range(dtype)
    zmin, zmax = (int(zp.min()), int(zp.max())) if zp.size else (0, 0)
    return max(abs(hi - zmin), abs(lo - zmax), abs(hi - zmax), abs(lo - zmin))


@lru_cache(maxsize=None)
def _scalar_shifted_bound(dtype: np.dtype, zp: int) -> int:
    return shifted_bound(dtype, np.asarray(zp))


def _shifted_float(x: np.ndarray, zp: int) -> np.ndarray:
    """x - zp as float32 in one pass (exact: 8/16-bit values)."""
    if zp:
        return np.subtract(x, np.float32(zp), dtype=np.float32)
    return np.asarray(x, np.float32)


def raw_absmax(dtype) -> int:
    """max |v| over a type's values: the activation bound of the acc16 safety test."""
    lo, hi = int_range(dtype)
    return max(abs(lo), abs(hi))


def acc16_corrected(a: np.ndarray, b: np.ndarray, a_zp: np.ndarray, b_zp: np.ndarray
                    ) -> np.ndarray:
    """acc16 model on the raw operands a (..., M, K) and b (..., K, N), then the int32
    zero-point corrections: sum (a - za)(b - zb) = sum ab - za sum_k b - zb sum_k a + K za zb.
    a_zp: scalar or (M, 1); b_zp: scalar or (N,)."""
    raw = int_gemm_acc16(a, b).astype(np.int64)
    k = a.shape[-1]
    za = np.asarray(a_zp, np.int64)
    zb = np.asarray(b_zp, np.int64)
    if za.any():
        raw -= za * b.astype(np.int64).sum(axis=-2)[..., None, :]
    if zb.any():
        raw -= zb * a.astype(np.int64).sum(axis=-1)[..., :, None]
        raw += k * za * zb
    return raw.astype(np.int32)


# ---------------------------------------------------------------------------------------------
# matmul
# ---------------------------------------------------------------------------------------------
def matmul_integer(a: np.ndarray, b: np.ndarray, a_zp, b_zp, *, acc16: bool = False) -> np.ndarray:
    """(a - a_zp) @ (b - b_zp) as int32, exactly (matmul broadcasting), or under the acc16
    model. a_zp: scalar or per row of a (1-D, M entries); b_zp: scalar or per column (1-D, N).
    For a constant 2-D b, `IntMatMul` lays it out once instead."""
    a_zp = zp_value(a_zp)
    b_zp = zp_value(b_zp)
    if a_zp.ndim == 1 and a.ndim >= 2:
        a_zp = a_zp.reshape(-1, 1)
    if acc16:
        if b.ndim == 2 and a.ndim > 2 and a_zp.ndim == 0:   # one GEMM over all leading dims
            k = a.shape[-1]
            acc = acc16_corrected(a.reshape(-1, k), b, a_zp, b_zp)
            return acc.reshape(a.shape[:-1] + (b.shape[1],))
        return acc16_corrected(a, b, a_zp, b_zp)
    a_f = np.asarray(a, np.float32)
    if np.any(a_zp):
        a_f = a_f - a_zp.astype(np.float32)
    b_f = np.asarray(b, np.float32)
    if np.any(b_zp):
        b_f = b_f - b_zp.astype(np.float32)
    bound = shifted_bound(a.dtype, a_zp) * shifted_bound(b.dtype, b_zp)
    return to_int32(_exact_product(a_f, b_f, bound))


def _exact_product(a_f: np.ndarray, b_f: np.ndarray, bound: int) -> np.ndarray:
    """Exact a_f @ b_f of integer-valued floats; a 2-D b makes one GEMM over a's leading dims."""
    if b_f.ndim == 2 and a_f.ndim > 2:
        k = a_f.shape[-1]
        acc = matmul_exact_f32(a_f.reshape(-1, k), b_f, bound)
        return acc.reshape(a_f.shape[:-1] + (b_f.shape[1],))
    return matmul_exact_f32(a_f, b_f, bound)


@dataclass
class _MatWeights:
    raw: np.ndarray             # (K, N) as stored (8-bit)
    shifted: np.ndarray         # (K, N) float32: raw - zp
    zp: np.ndarray              # int64, scalar or (N,)
    bound: int                  # max |raw - zp|
    #: acc16: output columns that may saturate, per activation dtype (computed on first use).
    unsafe: dict[np.dtype, np.ndarray] = field(default_factory=dict)
    #: acc16: the model's weights (the unsafe columns), per activation dtype.
    models: dict[np.dtype, Acc16Weights] = field(default_factory=dict)

    @classmethod
    def prepare(cls, b: np.ndarray, b_zp) -> _MatWeights:
        zp = zp_value(b_zp)
        shifted = np.asarray(b, np.float32)
        if np.any(zp):
            shifted = shifted - zp.astype(np.float32)
        bound = int(np.abs(shifted).max()) if shifted.size else 0
        return cls(np.asarray(b), np.ascontiguousarray(shifted), zp, bound)

    def unsafe_columns(self, a_dtype) -> np.ndarray:
        key = np.dtype(a_dtype)
        cols = self.unsafe.get(key)
        if cols is None:
            safe = acc16_safe_columns(self.raw, raw_absmax(key))
            cols = self.unsafe[key] = np.flatnonzero(~safe)
        return cols

    def acc16_model(self, a_dtype) -> Acc16Weights:
        key = np.dtype(a_dtype)
        model = self.models.get(key)
        if model is None:
            model = self.models[key] = Acc16Weights(self.raw[:, self.unsafe_columns(key)])
        return model


class IntMatMul:
    """(a - a_zp) @ (b - b_zp) -> int32 for a 2-D right operand b (K, N), laid out once when it
    is constant. acc16: exact for every column the weight bound proves safe, the acc16 model
    (with zero-point corrections) for the others."""

    def __init__(self, b: np.ndarray | None = None, b_zp=None, *, acc16: bool = False) -> None:
        self.acc16 = acc16
        self._prepared = _MatWeights.prepare(b, b_zp) if b is not None else None

    def __call__(self, a: np.ndarray, a_zp, b: np.ndarray | None = None, b_zp=None) -> np.ndarray:
        prep = self._prepared or _MatWeights.prepare(b, b_zp)
        za = scalar_zp(a_zp)
        if za.ndim:
            raise GraphoptError("IntMatMul: the activation zero point must be a scalar")
        a_f = np.asarray(a, np.float32)
        if za:
            a_f = a_f - np.float32(za)
        acc = to_int32(_exact_product(a_f, prep.shifted, shifted_bound(a.dtype, za) * prep.bound))
        if self.acc16:
            cols = prep.unsafe_columns(a.dtype)
            if cols.size:
                # model - exact on the raw operands = model - exact after the zero-point
                # corrections (they are the same on both sides)
                flat = acc.reshape(-1, acc.shape[-1])
                for _, rows, columns, delta in prep.acc16_model(a.dtype).excess(
                        a.reshape(-1, a.shape[-1])):
                    flat[rows, cols[columns]] += delta
        return acc

    def unsafe_columns(self, a_dtype) -> np.ndarray | None:
        """acc16: the output columns the model emulates for activations of `a_dtype` (None
        when the weights are not constant)."""
        return None if self._prepared is None else self._prepared.unsafe_columns(a_dtype)


# ---------------------------------------------------------------------------------------------
# convolution
# ---------------------------------------------------------------------------------------------
@dataclass
class _ConvWeights:
    raw: np.ndarray             # (C_out, C_in/g, *k) as stored (8-bit)
    zp: np.ndarray              # int64, scalar or (C_out,)
    plain: ConvWeights          # raw - zp, float32, no bias
    biased: ConvWeights | None  # the same with the int32 bias riding along (float32 path)
    bound: int                  # max |raw - zp|
    bias: np.ndarray | None     # int64 (C_out,)
    groups: int
    unsafe: dict[np.dtype, np.ndarray] = field(default_factory=dict)
    #: acc16 per input dtype: (the model's weights, the groups they cover, output channel of
    #: each (group, column) of the model).
    models: dict[np.dtype, tuple[Acc16Weights, np.ndarray, np.ndarray]] = \
        field(default_factory=dict)
    _acc16_b: np.ndarray | None = None
    bias_max: int = 0           # max |bias|

    @classmethod
    def prepare(cls, w: np.ndarray, w_zp, bias: np.ndarray | None, groups: int) -> _ConvWeights:
        zp = zp_value(w_zp)
        wf = np.asarray(w, np.float32)
        if np.any(zp):
            zp_shape = (-1,) + (1,) * (w.ndim - 1) if zp.ndim == 1 else ()
            wf = wf - zp.astype(np.float32).reshape(zp_shape)
        plain = ConvWeights.prepare(wf, groups)
        b64 = None if bias is None else np.asarray(bias).astype(np.int64).reshape(-1)
        biased = None
        if b64 is not None and b64.size and np.abs(b64).max() < F32_EXACT:
            biased = ConvWeights.prepare(wf, groups, bias=b64.astype(np.float32))
        bound = int(np.abs(wf).max()) if wf.size else 0
        bias_max = int(np.abs(b64).max()) if b64 is not None and b64.size else 0
        return cls(np.asarray(w), zp, plain, biased, bound, b64, groups, bias_max=bias_max)

    @property
    def acc16_b(self) -> np.ndarray:
        """(groups, K, C_out/g) raw weights with K ordered (kernel offset, channel)."""
        if self._acc16_b is None:
            c_out, cig = self.raw.shape[:2]
            g = self.groups
            kk = math.prod(self.raw.shape[2:])
            self._acc16_b = np.ascontiguousarray(
                self.raw.reshape(g, c_out // g, cig, kk).transpose(0, 3, 2, 1)
                .reshape(g, kk * cig, c_out // g))
        return self._acc16_b

    def unsafe_channels(self, x_dtype) -> np.ndarray:
        key = np.dtype(x_dtype)
        found = self.unsafe.get(key)
        if found is None:
            b = self.acc16_b
            g, k, cog = b.shape
            safe = acc16_safe_columns(b.transpose(1, 0, 2).reshape(k, g * cog), raw_absmax(key))
            found = self.unsafe[key] = np.flatnonzero(~safe)
        return found

    def acc16_model(self, x_dtype) -> tuple[Acc16Weights, np.ndarray, np.ndarray]:
        """For a dense conv, the unsafe channels alone; for a grouped one, the whole groups
        holding one (a channel the weights prove safe gives the exact result either way)."""
        key = np.dtype(x_dtype)
        model = self.models.get(key)
        if model is None:
            channels = self.unsafe_channels(key)
            cog = self.raw.shape[0] // self.groups
            if self.groups == 1:
                gsel = np.zeros(1, np.int64)
                b = self.acc16_b[:, :, channels]
                out_channels = channels[None]
            else:
                gsel = np.unique(channels // cog)
                b = self.acc16_b[gsel]
                out_channels = gsel[:, None] * cog + np.arange(cog)
            model = self.models[key] = (Acc16Weights(b), gsel, out_channels)
        return model


class IntConv:
    """The integer convolution of (x - x_zp) and (w - w_zp) as int32, plus an int32 bias: the
    float conv engine (conv.py) on zero-point-shifted values, exact. Weights (and a constant
    bias) are laid out once when given at construction. acc16: see the module doc."""

    def __init__(self, attrs: ConvAttrs, w: np.ndarray | None = None, w_zp=None,
                 bias: np.ndarray | None = None, *, acc16: bool = False) -> None:
        self.attrs = attrs
        self.acc16 = acc16
        self.plan = ConvPlan(attrs, None)
        self._prepared = _ConvWeights.prepare(w, w_zp, bias, attrs.groups) \
            if w is not None else None

    def prepared(self, w=None, w_zp=None, bias=None) -> _ConvWeights:
        return self._prepared or _ConvWeights.prepare(w, w_zp, bias, self.attrs.groups)

    def geometry(self, x_shape, w_shape):
        return self.plan.geometry(tuple(x_shape), tuple(w_shape))

    def __call__(self, x: np.ndarray, x_zp, w=None, w_zp=None, bias=None, *,
                 exact_float: bool = False) -> np.ndarray:
        """int32 accumulator (N, C_out, *out) of the convolution, bias included.

        exact_float: the caller takes a float32 array instead when it holds the accumulator
        exactly (every value below 2**24, so it is float32(acc), which is what requantization
        computes from the int32 anyway); saves the two conversion passes."""
        prep = self.prepared(w, w_zp, bias)
        if isinstance(x_zp, int):       # the int8 steps keep theirs as an int
            za = za_int = x_zp
        else:
            za = scalar_zp(x_zp)
            if za.size > 1:
                raise GraphoptError("ConvInteger: x_zero_point must be a scalar")
            za_int = int(za)
        geom = self.geometry(x.shape, prep.raw.shape)
        xf = _shifted_float(x, za_int)
        bound = _scalar_shifted_bound(np.dtype(x.dtype), za_int) * max(prep.bound, 1)
        k_total = prep.plain.mat.shape[2]
        if prep.biased is not None and k_total * bound + prep.bias_max <= F32_EXACT:
            acc = conv(xf, prep.biased, geom, integer=True)
        elif k_total * bound <= F32_EXACT:
            acc = conv(xf, prep.plain, geom, integer=True)
            if prep.bias is not None:
                acc = acc.astype(np.int32)
                acc += prep.bias.astype(np.int32).reshape((-1,) + (1,) * (acc.ndim - 2))
        else:
            acc64 = conv(xf, prep.plain, geom, mm=exact_matmul(bound), out_dtype=np.float64,
                         taps_exact=False, integer=True)
            if prep.bias is not None:
                acc64 += prep.bias.astype(np.float64).reshape((-1,) + (1,) * (acc64.ndim - 2))
            acc = to_int32(acc64)
        if self.acc16:
            channels = prep.unsafe_channels(x.dtype)
            if channels.size:
                acc = self._acc16_channels(acc, x, za, prep, geom)
        if acc.dtype != np.int32 and not exact_float:
            acc = acc.astype(np.int32)
        return acc

    def unsafe_channels(self, x_dtype) -> np.ndarray | None:
        """acc16: the output channels the model emulates for inputs of `x_dtype` (None when the
        weights are not constant)."""
        return None if self._prepared is None else self._prepared.unsafe_channels(x_dtype)

    def _acc16_channels(self, acc: np.ndarray, x: np.ndarray, za,
                        prep: _ConvWeights, geom) -> np.ndarray:
        """Add the acc16 model's excess over the exact product to acc's `channels`: raw 8-bit
        operands (padding holds the zero point, as the quantized input would), K ordered
        (kernel offset, channel); the zero-point corrections and the bias are the same on
        both sides, so the exact accumulator plus the excess is the corrected model. Returns
        the accumulator: a float32 one stays float32 while every sum is below 2**24 (exact), else
        it turns int32."""
        model, gsel, out_channels = prep.acc16_model(x.dtype)
        c_out, cig = prep.raw.shape[:2]
        n = x.shape[0]
        xs = np.asarray(x) if prep.groups == 1 else \
            np.asarray(x)[:, (gsel[:, None] * cig + np.arange(cig)).reshape(-1)]
        gs = len(gsel)
        xp = pad_spatial(xs, geom.begin, geom.end, int(za))
        cols = im2col(xp, geom.kernel, geom.strides, geom.dilations, geom.out_spatial, gs)
        kk = math.prod(geom.kernel)
        pixels = cols.shape[-1]
        a = cols.reshape(n, gs, cig, kk, pixels).transpose(0, 1, 4, 3, 2) \
            .reshape(n, gs, pixels, kk * cig)
        for image in range(n):
            for group, rows, columns, delta in model.excess(a[image]):
                at = (image, out_channels[group, columns], rows)
                if acc.dtype != np.int32:
                    # a float32 accumulator takes the sums as long as they stay exact in it
                    sums = acc.reshape(n, c_out, pixels)[at].astype(np.float64) + delta
                    if not sums.size or np.abs(sums).max() < F32_EXACT:
                        acc.reshape(n, c_out, pixels)[at] = sums
                        continue
                    acc = acc.astype(np.int32)
                acc.reshape(n, c_out, pixels)[at] += delta
        return acc


# ---------------------------------------------------------------------------------------------
# requantization
# ---------------------------------------------------------------------------------------------
def multiplier(a_scale, b_scale, y_scale) -> np.ndarray:
    """float32 (a_scale * b_scale) / y_scale, onnxruntime's order of operations."""
    a = np.asarray(a_scale, np.float32)
    b = np.asarray(b_scale, np.float32)
    return (a * b) / np.asarray(y_scale, np.float32)


class Requantizer:
    """int32 accumulator -> quantized output, as onnxruntime's QLinear kernels requantize:
    float32(acc) * float32 multiplier, round half to even, + zero point, saturate to [lo, hi]
    (the output type's range, or narrower: a fused Relu/Clip clamps in the quantized domain,
    which is exact since quantization is monotone)."""

    def __init__(self, mult: np.ndarray, y_zp, out_dtype, lo: int | None = None,
                 hi: int | None = None) -> None:
        type_lo, type_hi = int_range(out_dtype)
        self.lo = type_lo if lo is None else max(type_lo, int(lo))
        self.hi = type_hi if hi is None else min(type_hi, int(hi))
        self.zp = int(scalar_zp(y_zp)) if y_zp is not None and np.size(y_zp) == 1 else None
        self.zp_array = None if y_zp is None or self.zp is not None \
            else np.asarray(y_zp, np.float32)
        self.mult = np.asarray(mult, np.float32)
        self.out_dtype = np.dtype(out_dtype)

    def __call__(self, acc: np.ndarray) -> np.ndarray:
        """acc: int32, or a float32 array holding it exactly (IntConv's exact_float), which is
        consumed (scaled in place)."""
        if acc.dtype == np.float32 and acc.ndim >= self.mult.ndim:
            y = np.multiply(acc, self.mult, out=acc)
        else:
            y = np.multiply(acc, self.mult, dtype=np.float32)
        np.rint(y, out=y)
        if self.zp_array is not None:
            y += self.zp_array
            np.clip(y, self.lo, self.hi, out=y)
            return y.astype(self.out_dtype)
        out = np.empty(y.shape, self.out_dtype)
        zp = self.zp or 0
        if not zp:      # saturate and cast in one pass
            return np.clip(y, self.lo, self.hi, out=out, casting="unsafe")
        np.clip(y, self.lo - zp, self.hi - zp, out=y)
        np.add(y, np.float32(zp), out=out, casting="unsafe")
        return out
