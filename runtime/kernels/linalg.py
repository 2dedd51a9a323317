"""Linear algebra kernels: MatMul, Gemm, Einsum.

All float products go to BLAS through np.matmul, shaped so that BLAS calls stay big: an N-D
activation times a 2-D weight is one (batch * M, K) @ (K, N) GEMM, not a loop of small ones.
Integer MatMul (int32/int64/uint inputs, allowed by ONNX) is exact: through float BLAS when
the operands' magnitudes prove it (gemm.matmul_exact_f32), numpy's integer matmul otherwise.
"""

from __future__ import annotations

import numpy as np

from graphopt.runtime.kernels.gemm import F64_EXACT, matmul_exact_f32
from graphopt.runtime.kernels.registry import KernelNode, kernel


def _absmax(x: np.ndarray) -> int:
    return int(np.abs(x).max()) if x.size else 0


def float_matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """np.matmul semantics; a 2-D right operand makes one big GEMM over all leading dims."""
    if b.ndim == 2 and a.ndim > 2:
        k = a.shape[-1]
        a2 = a.reshape(-1, k)       # a view when a is contiguous; one copy otherwise
        return np.matmul(a2, b).reshape(a.shape[:-1] + (b.shape[1],))
    return np.matmul(a, b)


def integer_matmul(a: np.ndarray, b: np.ndarray, out_dtype: np.dtype) -> np.ndarray:
    """Exact integer matmul (wrapping into out_dtype like C arithmetic)."""
    k = a.shape[-1] if a.ndim else 1
    bound = _absmax(a) * _absmax(b)
    if bound * max(k, 1) <= F64_EXACT and bound < 2 ** 62:
        acc = matmul_exact_f32(a.astype(np.float32) if bound <= 2 ** 24 else a.astype(np.float64),
                               b.astype(np.float32) if bound <= 2 ** 24 else b.astype(np.float64),
                               bound)
        return acc.astype(np.int64).astype(out_dtype)
    return np.matmul(a.astype(np.int64), b.astype(np.int64)).astype(out_dtype)


@kernel("MatMul")
def _matmul(node: KernelNode):
    def run(a, b):
        if a.dtype.kind in "iu":
            return (integer_matmul(a, b, np.result_type(a.dtype, b.dtype)),)
        if a.dtype == np.float16 or a.dtype != b.dtype:
            dtype = np.result_type(a.dtype, b.dtype)
            return (float_matmul(a.astype(np.float32), b.astype(np.float32)).astype(dtype),)
        return (float_matmul(a, b),)
    return run


@kernel("Gemm")
def _gemm(node: KernelNode):
    """Y = alpha * A' @ B' + beta * C. Constant B is stored pre-transposed and pre-scaled
    (alpha folded in), constant C pre-scaled by beta."""
    alpha = float(node.attr("alpha", 1.0))
    beta = float(node.attr("beta", 1.0))
    trans_a = bool(node.attr("transA", 0))
    trans_b = bool(node.attr("transB", 0))
    b_const = node.consts[1] if node.n_inputs > 1 else None
    c_const = node.consts[2] if node.n_inputs > 2 else None

    def prep_b(b):
        b = b.T if trans_b else b
        if alpha != 1.0:
            b = b * np.asarray(alpha, dtype=b.dtype)
        return b

    b_ready = prep_b(b_const) if b_const is not None else None
    c_ready = None
    if c_const is not None:
        c_ready = c_const * np.asarray(beta, dtype=c_const.dtype) if beta != 1.0 else c_const

    def run(a, b, c=None):
        dtype = a.dtype
        if a.dtype.kind in "iu":
            a_ = a.T if trans_a else a
            b_ = (b.T if trans_b else b)
            y = integer_matmul(a_, b_, dtype)
            if alpha != 1.0:
                y = (y * alpha).astype(dtype)
        else:
            a_ = a.T if trans_a else a
            b_ = b_ready if b_ready is not None else prep_b(b)
            if dtype == np.float16:
                y = np.matmul(a_.astype(np.float32), b_.astype(np.float32))
            else:
                y = np.matmul(a_, b_)
        if c is not None and beta != 0.0:
            cc = c_ready
            if cc is None:
                cc = c * np.asarray(beta, dtype=c.dtype) if beta != 1.0 else c
            if cc.shape == y.shape or np.broadcast_shapes(cc.shape, y.shape) == y.shape:
                y += cc
            else:
                y = y + cc
        return (y.astype(dtype, copy=False),)
    return run


@kernel("Einsum", since=12)
def _einsum(node: KernelNode):
    equation = node.attr("equation")
    if isinstance(equation, bytes):
        equation = equation.decode()
    equation = equation.replace(" ", "")

    def run(*xs):
        y = np.einsum(equation, *xs, optimize=True)
        return (np.asarray(y, dtype=xs[0].dtype),)
    return run
