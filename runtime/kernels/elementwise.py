"""Elementwise kernels: unary math and activations, binary arithmetic with broadcasting,
comparisons and logic, variadic Sum/Max/Min/Mean, Where, Clip, Cast/CastLike.

Kernels that can write their output into a dying input (`writes_into`, see registry.py) do so
with numpy's `out=`, which is where most of the runtime's in-place savings come from. The
ufunc-based ones also write into any strided `out=` (`writes_views`), such as their slice of a
Concat's output; Where, PRelu and Sum/Max/Min/Mean do not (they expect `out` to be an input). Every
kernel returns ndarrays (numpy ufuncs turn 0-d inputs into scalars; `_arr` turns them back).

Speed: an elementwise kernel costs about one pass over its tensor per ufunc call, so the
activations (Relu, Clip, HardSigmoid, HardSwish, Sigmoid) use as few calls as their math
allows, and the clip ufunc wherever a bound is involved (`clamp`): in numpy 2.x np.maximum /
np.minimum against a scalar run 2-3x slower than the clip ufunc (measured: 97 us against 38 us
for 200k float32), and np.clip's Python wrapper adds a few microseconds per call.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx

from graphopt.errors import GraphoptError
from graphopt.ir import onnx_to_np_dtype
from graphopt.runtime.kernels.registry import KernelNode, kernel, writes_into, writes_views


try:   # the ufunc itself, without np.clip's argument handling (numpy >= 2: numpy._core)
    from numpy._core.umath import clip as _clip_ufunc
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core.umath import clip as _clip_ufunc

_INF = float("inf")


def clamp(x: np.ndarray, low, high, out: np.ndarray | None = None) -> np.ndarray:
    """min(max(x, low), high) elementwise for float arrays (NaN stays NaN, as in np.maximum);
    `low`/`high` are Python floats (±inf for no bound) or arrays of x's dtype. The clip ufunc is
    2-3x faster than np.maximum/np.minimum with a scalar (see the module docstring)."""
    return _clip_ufunc(x, low, high, out=out)


def _arr(x) -> np.ndarray:
    """An ndarray for a ufunc result (a 0-d computation returns a numpy scalar)."""
    return x if type(x) is np.ndarray else np.asarray(x)


def _float_compute_dtype(dtype: np.dtype) -> np.dtype:
    """float32 for narrow floats numpy cannot compute in natively (bfloat16, float8)."""
    return dtype if dtype in (np.float16, np.float32, np.float64) else np.dtype(np.float32)


# ---------------------------------------------------------------------------------------------
# unary
# ---------------------------------------------------------------------------------------------
def _register_ufunc(op_type: str, ufunc: Callable) -> None:
    @kernel(op_type)
    def factory(node: KernelNode):
        @writes_views("strided")
        @writes_into(0)
        def run(x, out=None):
            return (_arr(ufunc(x, out=out)),)
        return run


for _op, _ufunc in {
    "Abs": np.abs, "Neg": np.negative, "Exp": np.exp, "Log": np.log, "Sqrt": np.sqrt,
    "Reciprocal": np.reciprocal, "Floor": np.floor, "Ceil": np.ceil, "Round": np.rint,
    "Sin": np.sin, "Cos": np.cos, "Tan": np.tan, "Asin": np.arcsin, "Acos": np.arccos,
    "Atan": np.arctan, "Sinh": np.sinh, "Cosh": np.cosh, "Tanh": np.tanh, "Asinh": np.arcsinh,
    "Acosh": np.arccosh, "Atanh": np.arctanh, "Sign": np.sign, "Not": np.logical_not,
    "BitwiseNot": np.invert,
}.items():
    _register_ufunc(_op, _ufunc)


def _unary(op_type: str, *, inplace: bool = True):
    """Register `build(node) -> f(x, out)` as a one-input kernel."""
    def register(build: Callable[[KernelNode], Callable]):
        @kernel(op_type)
        def factory(node: KernelNode):
            f = build(node)
            if inplace:
                @writes_views("strided")
                @writes_into(0)
                def run(x, out=None):
                    return (_arr(f(x, out)),)
            else:
                def run(x):
                    return (_arr(f(x, None)),)
            return run
        return build
    return register


@_unary("Relu")
def _relu(node):
    def f(x, out):
        if x.dtype.kind == "f":
            return clamp(x, 0.0, _INF, out)     # one fast pass (module docstring)
        return np.maximum(x, 0, out=out)
    return f


@_unary("LeakyRelu")
def _leaky_relu(node):
    alpha = float(node.attr("alpha", 0.01))
    if 0.0 <= alpha <= 1.0:   # max(x, alpha x) is leaky relu for alpha in [0, 1]
        return lambda x, out: np.maximum(x, np.multiply(x, alpha, dtype=x.dtype), out=out)
    return lambda x, out: _into(np.where(x < 0, x * alpha, x).astype(x.dtype, copy=False), out)


def _into(result: np.ndarray, out: np.ndarray | None) -> np.ndarray:
    """Write a computed result into `out` when one was given."""
    if out is None:
        return result
    np.copyto(out, result, casting="unsafe")
    return out


def _buffer(x: np.ndarray, out: np.ndarray | None) -> np.ndarray:
    """The array a multi-step kernel computes into: `out`, or a new one shaped like x (never a
    numpy scalar, which a 0-d input would give and a later `out=` step would reject)."""
    return np.empty_like(x) if out is None else out


def sigmoid(x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """1 / (1 + exp(-x)); exp overflows to inf for very negative x, which gives exactly 0."""
    out = np.negative(x, out=_buffer(x, out))
    np.exp(out, out=out)
    np.add(out, 1, out=out)
    return np.reciprocal(out, out=out)


@_unary("Sigmoid")
def _sigmoid(node):
    return lambda x, out: sigmoid(x, out)


def hard_sigmoid(x: np.ndarray, alpha: float, beta: float,
                 out: np.ndarray | None = None) -> np.ndarray:
    """max(0, min(1, alpha * x + beta)): three passes (multiply, add, clamp)."""
    if x.dtype.kind != "f":
        y = np.clip(x.astype(np.float32) * alpha + beta, 0, 1).astype(x.dtype)
        return y if out is None else _into(y, out)
    out = np.multiply(x, alpha, out=_buffer(x, out))
    np.add(out, beta, out=out)
    return clamp(out, 0.0, 1.0, out)


def hard_swish(x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """x * HardSigmoid(x; 1/6, 1/2): the gate in a temporary (three passes), one multiply."""
    gate = hard_sigmoid(x, 1.0 / 6.0, 0.5)
    return np.multiply(x, gate, out=out)


@_unary("HardSigmoid")
def _hard_sigmoid(node):
    alpha = float(node.attr("alpha", 0.2))
    beta = float(node.attr("beta", 0.5))
    return lambda x, out: hard_sigmoid(x, alpha, beta, out)


@_unary("HardSwish")
def _hard_swish(node):
    return lambda x, out: hard_swish(x, out)


@_unary("Swish")
def _swish(node):
    alpha = float(node.attr("alpha", 1.0))

    def f(x, out):
        gate = sigmoid(np.multiply(x, alpha, dtype=x.dtype))
        return np.multiply(x, gate, out=out)
    return f


@_unary("Elu", inplace=False)
def _elu(node):
    alpha = float(node.attr("alpha", 1.0))
    return lambda x, out: np.where(x > 0, x, alpha * np.expm1(x)).astype(x.dtype, copy=False)


@_unary("Celu", inplace=False)
def _celu(node):
    alpha = float(node.attr("alpha", 1.0))
    return lambda x, out: (np.maximum(x, 0) + np.minimum(0, alpha * np.expm1(x / alpha))
                           ).astype(x.dtype, copy=False)


@_unary("Selu", inplace=False)
def _selu(node):
    alpha = float(node.attr("alpha", 1.6732632423543772848170429916717))
    gamma = float(node.attr("gamma", 1.0507009873554804934193349852946))
    return lambda x, out: (gamma * np.where(x > 0, x, alpha * np.expm1(x))).astype(x.dtype, copy=False)


@_unary("Softplus", inplace=False)
def _softplus(node):
    return lambda x, out: np.logaddexp(np.zeros((), x.dtype), x)


@_unary("Softsign")
def _softsign(node):
    def f(x, out):
        denom = np.abs(x, out=np.empty_like(x))
        np.add(denom, 1, out=denom)
        return np.divide(x, denom, out=out)
    return f


@_unary("ThresholdedRelu", inplace=False)
def _thresholded_relu(node):
    alpha = float(node.attr("alpha", 1.0))
    return lambda x, out: np.where(x > alpha, x, np.zeros((), x.dtype))


@_unary("Shrink", inplace=False)
def _shrink(node):
    bias = float(node.attr("bias", 0.0))
    lambd = float(node.attr("lambd", 0.5))

    def f(x, out):
        zero = np.zeros((), x.dtype)
        return np.where(x < -lambd, x + bias, np.where(x > lambd, x - bias, zero)).astype(x.dtype, copy=False)
    return f


@_unary("Mish", inplace=False)
def _mish(node):
    return lambda x, out: (x * np.tanh(np.logaddexp(np.zeros((), x.dtype), x))).astype(x.dtype, copy=False)


def erf(x: np.ndarray) -> np.ndarray:
    """Error function, vectorized; relative error below 4e-7 in float32, 6e-8 in float64.

    |x| < 0.5: Maclaurin series 2/sqrt(pi) * sum (-1)^n x^(2n+1) / (n! (2n+1)) (7 terms in
    float32, 12 in float64: the next term is below the type's precision). |x| >= 0.5:
    erf = 1 - erfc, with erfc from the Chebyshev fit t * exp(-z^2 + P(t)), t = 1 / (1 + z/2),
    fractional error < 1.2e-7 (Numerical Recipes, 2nd ed., 6.2); erf >= 0.52 there, so the
    error stays relative. Computed in float64 for float64 input, else float32, in place.
    """
    dtype = np.float64 if x.dtype == np.float64 else np.float32
    xc = np.asarray(x, dtype=dtype).reshape(-1)   # 1-D: no numpy scalars for a 0-d input
    z = np.abs(xc)
    t = np.multiply(z, 0.5)
    t += 1.0
    np.reciprocal(t, out=t)
    poly = np.full_like(t, 0.17087277)
    for c in (-0.82215223, 1.48851587, -1.13520398, 0.27886807, -0.18628806, 0.09678418,
              0.37409196, 1.00002368, -1.26551223):
        poly *= t
        poly += c
    z *= z
    poly -= z                      # -z^2 + P(t)
    np.exp(poly, out=poly)
    poly *= t                      # erfc(|x|)
    np.subtract(1.0, poly, out=poly)
    result = np.copysign(poly, xc, out=poly)
    small = np.abs(xc) < 0.5
    if small.any():
        xs = xc[small]
        x2 = xs * xs
        term = xs.copy()
        total = xs.copy()
        for n in range(1, 12 if dtype == np.float64 else 7):
            term *= x2
            term *= -1.0 / n
            total += term * (1.0 / (2 * n + 1))
        result[small] = total * (2.0 / np.sqrt(np.pi))
    return result.reshape(np.shape(x))


@_unary("Erf", inplace=False)
def _erf(node):
    return lambda x, out: erf(x).astype(x.dtype, copy=False)


@kernel("IsNaN")
def _isnan(node: KernelNode):
    return lambda x: (_arr(np.isnan(x)),)


@kernel("IsInf")
def _isinf(node: KernelNode):
    neg = bool(node.attr("detect_negative", 1))
    pos = bool(node.attr("detect_positive", 1))

    def run(x):
        if neg and pos:
            return (_arr(np.isinf(x)),)
        if pos:
            return (_arr(np.isposinf(x)),)
        if neg:
            return (_arr(np.isneginf(x)),)
        return (np.zeros(x.shape, dtype=bool),)
    return run


@kernel("PRelu")
def _prelu(node: KernelNode):
    @writes_into(0)
    def run(x, slope, out=None):
        negative = np.multiply(x, slope, dtype=x.dtype)
        return (_arr(np.where(x < 0, negative, x) if out is None
                     else np.copyto(out, negative, where=x < 0) or out),)
    return run


# ---------------------------------------------------------------------------------------------
# binary, with numpy broadcasting (and the legacy broadcast/axis attributes before opset 7)
# ---------------------------------------------------------------------------------------------
def _legacy_broadcast(node: KernelNode) -> Callable[[np.ndarray, np.ndarray], np.ndarray] | None:
    """Opset < 7 Add/Sub/Mul/Div/Pow/And/... align B to A at `axis` when broadcast=1."""
    if node.opset >= 7 or not node.attr("broadcast", 0):
        return None
    axis = node.attr("axis")
    if axis is None:
        return None   # numpy's trailing alignment is the default

    def align(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        start = axis if axis >= 0 else axis + a.ndim
        return b.reshape((1,) * start + b.shape + (1,) * (a.ndim - start - b.ndim))
    return align


def _binary(op_type: str, func: Callable, *, inplace: tuple[int, ...] = (0, 1)):
    @kernel(op_type)
    def factory(node: KernelNode):
        align = _legacy_broadcast(node)
        if inplace:
            @writes_views("strided")
            @writes_into(*inplace)
            def run(a, b, out=None):
                if align is not None:
                    b = align(a, b)
                return (_arr(func(a, b, out=out)),)
        else:
            def run(a, b):
                if align is not None:
                    b = align(a, b)
                return (_arr(func(a, b)),)
        return run


_binary("Add", np.add)
_binary("Sub", np.subtract)
_binary("Mul", np.multiply)
_binary("And", np.logical_and, inplace=())
_binary("Or", np.logical_or, inplace=())
_binary("Xor", np.logical_xor, inplace=())
_binary("BitwiseAnd", np.bitwise_and)
_binary("BitwiseOr", np.bitwise_or)
_binary("BitwiseXor", np.bitwise_xor)
_binary("Greater", np.greater, inplace=())
_binary("Less", np.less, inplace=())
_binary("GreaterOrEqual", np.greater_equal, inplace=())
_binary("LessOrEqual", np.less_equal, inplace=())


def _equal(a, b):
    result = np.equal(a, b)
    return result if result.dtype == bool else result.astype(bool)


_binary("Equal", _equal, inplace=())


def _divide(a, b, out=None):
    if a.dtype.kind in "iu":
        # ONNX integer division truncates toward zero (C semantics); numpy floors.
        quotient = np.floor_divide(a, b)
        remainder = np.remainder(a, b)
        adjust = (remainder != 0) & ((a < 0) ^ (b < 0))
        return np.add(quotient, adjust.astype(quotient.dtype), out=out, casting="unsafe")
    return np.divide(a, b, out=out)


_binary("Div", _divide)


@kernel("Pow")
def _pow(node: KernelNode):
    exponent = node.consts[1] if len(node.consts) > 1 else None
    special = None
    if exponent is not None and exponent.size == 1 and exponent.ndim == 0:
        special = {2.0: np.square, 0.5: np.sqrt}.get(float(exponent))

    @writes_views("strided")
    @writes_into(0)
    def run(a, b, out=None):
        if special is not None and a.dtype.kind == "f":
            return (_arr(special(a, out=out)),)
        if a.dtype.kind == "f" and b.dtype.kind in "iu":
            b = b.astype(a.dtype)   # keep float32 ** int in float32, as a float exponent would
        result = np.power(a, b)
        if result.dtype != a.dtype:
            result = result.astype(a.dtype)
        return (_arr(_into(result, out)),)
    return run


@kernel("Mod")
def _mod(node: KernelNode):
    fmod = bool(node.attr("fmod", 0))
    func = np.fmod if fmod else np.mod

    @writes_views("strided")
    @writes_into(0, 1)
    def run(a, b, out=None):
        return (_arr(func(a, b, out=out)),)
    return run


@kernel("BitShift")
def _bitshift(node: KernelNode):
    direction = node.attr("direction", "")
    func = np.left_shift if direction == "LEFT" else np.right_shift
    if direction not in ("LEFT", "RIGHT"):
        raise GraphoptError(f"BitShift direction must be LEFT or RIGHT, got {direction!r}")

    @writes_views("strided")
    @writes_into(0)
    def run(a, b, out=None):
        return (_arr(func(a, b.astype(a.dtype, copy=False), out=out)),)
    return run


# ---------------------------------------------------------------------------------------------
# variadic
# ---------------------------------------------------------------------------------------------
def _variadic(op_type: str, ufunc: Callable, *, mean: bool = False):
    @kernel(op_type)
    def factory(node: KernelNode):
        @writes_into(*range(max(node.n_inputs, 1)))
        def run(*xs, out=None):
            operands = list(xs)
            if out is not None:   # start from the array written into, so no operand is lost
                index = next(i for i, x in enumerate(xs) if x is out)
                operands.insert(0, operands.pop(index))
            acc = operands[0]
            for i, x in enumerate(operands[1:]):
                if i == 0 and out is None:
                    acc = _arr(ufunc(acc, x))   # a fresh buffer, accumulated into from here on
                elif np.broadcast_shapes(acc.shape, x.shape) == acc.shape:
                    ufunc(acc, x, out=acc)
                else:
                    acc = _arr(ufunc(acc, x))
            if mean and len(operands) > 1:
                acc = np.divide(acc, len(operands), out=acc, casting="unsafe")
            return (acc,)
        return run


_variadic("Sum", np.add)
_variadic("Max", np.maximum)
_variadic("Min", np.minimum)
_variadic("Mean", np.add, mean=True)


# ---------------------------------------------------------------------------------------------
# selection, clipping
# ---------------------------------------------------------------------------------------------
@kernel("Where")
def _where(node: KernelNode):
    @writes_into(1, 2)
    def run(cond, x, y, out=None):
        if out is x:
            np.copyto(out, y, where=np.logical_not(cond))
            return (out,)
        if out is y:
            np.copyto(out, x, where=cond)
            return (out,)
        return (_arr(np.where(cond, x, y)),)
    return run


@kernel("Clip")
def _clip_6(node: KernelNode):
    low = node.attr("min", None)
    high = node.attr("max", None)

    @writes_views("strided")
    @writes_into(0)
    def run(x, out=None):
        return (_clip(x, low, high, out),)
    return run


@kernel("Clip", since=11)
def _clip_11(node: KernelNode):
    @writes_views("strided")
    @writes_into(0)
    def run(x, low=None, high=None, out=None):
        return (_clip(x, low, high, out),)
    return run


def _clip(x: np.ndarray, low, high, out: np.ndarray | None) -> np.ndarray:
    if x.dtype.kind == "f" and _bound_ok(low, x.dtype) and _bound_ok(high, x.dtype):
        # One clip-ufunc pass instead of maximum then minimum (module docstring).
        lo = -_INF if low is None else (low.reshape(()) if isinstance(low, np.ndarray) else low)
        hi = _INF if high is None else (high.reshape(()) if isinstance(high, np.ndarray) else high)
        return _arr(clamp(x, lo, hi, out))
    result = x
    if low is not None:
        result = _arr(np.maximum(result, low, out=out))
    if high is not None:
        reuse = out if out is not None else (result if result is not x else None)
        result = _arr(np.minimum(result, high, out=reuse))
    return result if result.dtype == x.dtype else result.astype(x.dtype)


def _bound_ok(bound, dtype: np.dtype) -> bool:
    """Whether a Clip bound can go to the clip ufunc as is: absent, a Python number, or a
    one-element array of the input's dtype (another dtype would change the result's)."""
    if bound is None or isinstance(bound, (int, float)):
        return True
    return isinstance(bound, np.ndarray) and bound.dtype == dtype and bound.size == 1


# ---------------------------------------------------------------------------------------------
# casts
# ---------------------------------------------------------------------------------------------
_FLOAT8 = {onnx.TensorProto.FLOAT8E4M3FN, onnx.TensorProto.FLOAT8E4M3FNUZ,
           onnx.TensorProto.FLOAT8E5M2, onnx.TensorProto.FLOAT8E5M2FNUZ}


def to_float8e8m0(x: np.ndarray, saturate: bool, round_mode: str) -> np.ndarray:
    """FLOAT8E8M0 (a bare power of two, 2^(e-127), e = 255 is NaN) from a float array.

    The exponent of the float32 value is kept; `up` adds one when any fraction bit is set,
    `nearest` when the fraction is at least one half, `down` never. Saturation holds the largest
    finite code (254) for overflow and infinity; without it, those and 0 become NaN.
    """
    import ml_dtypes
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    exponent = ((bits >> 23) & 0xFF).astype(np.uint16)
    fraction = bits & 0x7FFFFF
    special = exponent == 0xFF
    if round_mode == "up":
        bump = fraction > 0
    elif round_mode == "nearest":
        bump = fraction >= 0x400000
    else:
        bump = np.zeros(bits.shape, dtype=bool)
    bump &= ~special
    if saturate:
        bump &= exponent < 0xFE
        exponent[special & ~np.isnan(x)] = 0xFE
    else:
        exponent[np.asarray(x) == 0] = 0xFF
    exponent = np.minimum(exponent + bump, 0xFF)
    exponent[np.isnan(x)] = 0xFF
    return exponent.astype(np.uint8).view(ml_dtypes.float8_e8m0fnu)


def cast(x: np.ndarray, to: int, saturate: bool = True, round_mode: str = "up") -> np.ndarray:
    """ONNX Cast of an array to element type `to` (see the Cast spec)."""
    if to == onnx.TensorProto.STRING:
        if x.dtype.kind in "OUS":
            return x.astype(object)
        return x.astype(np.str_).astype(object)
    dtype = onnx_to_np_dtype(to)
    if x.dtype == dtype:
        return x
    if x.dtype.kind in "OUS":
        return _cast_strings(x, dtype)
    if to == onnx.TensorProto.FLOAT8E8M0:
        return to_float8e8m0(x.astype(np.float32), saturate, round_mode)
    if to in _FLOAT8 and saturate and x.dtype.kind == "f":
        import ml_dtypes
        limit = float(ml_dtypes.finfo(dtype).max)
        wide = x.astype(np.float32) if x.dtype.itemsize < 4 else x
        return np.clip(wide, -limit, limit).astype(dtype)
    if x.dtype.kind == "V" or x.dtype not in (np.float16, np.float32, np.float64) and x.dtype.kind == "f":
        # bfloat16 / float8 / float4 sources: go through float32
        return x.astype(np.float32).astype(dtype)
    return x.astype(dtype)


def _cast_strings(x: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Strings to numbers: plain, scientific, and case-insensitive INF / -INF / +INF / NaN."""
    text = np.char.upper(np.asarray(x, dtype=np.str_))
    if dtype.kind == "f" or dtype.kind == "V":
        return text.astype(np.float64).astype(dtype)
    if dtype == np.bool_:
        return text.astype(np.float64).astype(bool)
    return text.astype(np.float64).astype(dtype) if np.char.count(text, ".").any() \
        else text.astype(dtype)


@kernel("Cast")
def _cast(node: KernelNode):
    to = int(node.attr("to"))
    saturate = bool(node.attr("saturate", 1))
    round_mode = node.attr("round_mode", "up")
    return lambda x: (_arr(cast(x, to, saturate, round_mode)),)


@kernel("CastLike")
def _cast_like(node: KernelNode):
    saturate = bool(node.attr("saturate", 1))
    round_mode = node.attr("round_mode", "up")

    def run(x, like):
        if like.dtype.kind in "OUS":
            return (cast(x, onnx.TensorProto.STRING),)
        from graphopt.ir import np_dtype_to_onnx
        return (_arr(cast(x, np_dtype_to_onnx(like.dtype), saturate, round_mode)),)
    return run

