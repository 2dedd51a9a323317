"""linalg kernels (MatMul, Gemm, Einsum) against onnxruntime, and integer MatMul exactness."""

from __future__ import annotations

import numpy as np
import pytest

from kernel_harness import one_node, rel_l2, run_kernel, run_ort
from graphopt.runtime.kernels.linalg import float_matmul, integer_matmul

RNG_SEED = 99


def _rand(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


def check(op, inputs, attrs=None, *, consts=(), opset=17, tol=1e-5):
    model = one_node(op, inputs, attrs or {}, consts=consts, opset=opset)
    feeds = {k: v for k, v in inputs.items() if v is not None and k not in consts}
    (got,) = run_kernel(model, feeds)
    (want,) = run_ort(model, feeds)
    assert got.shape == want.shape and got.dtype == want.dtype
    if got.dtype.kind in "iu":
        np.testing.assert_array_equal(got, want)
    else:
        assert rel_l2(got, want) <= tol


@pytest.mark.parametrize("sa,sb", [
    ((3, 4), (4, 5)), ((2, 3, 4), (4, 5)), ((2, 3, 4), (2, 4, 5)), ((4,), (4, 5)),
    ((3, 4), (4,)), ((4,), (4,)), ((2, 1, 3, 4), (5, 4, 6)), ((1, 2, 3, 4), (4,)),
    ((3, 4), (2, 4, 5)),
])
@pytest.mark.parametrize("weights", ["const", "fed"])
def test_matmul_broadcasting(sa, sb, weights):
    rng = np.random.default_rng(RNG_SEED)
    check("MatMul", {"a": _rand(rng, *sa), "b": _rand(rng, *sb)},
          consts=("b",) if weights == "const" else ())


def test_matmul_noncontiguous_activation():
    """A transposed (non-contiguous) 3-D activation still takes the one-GEMM path (via a copy)."""
    rng = np.random.default_rng(RNG_SEED)
    a = _rand(rng, 5, 3, 4).transpose(1, 0, 2)          # (3, 5, 4), not contiguous
    b = _rand(rng, 4, 6)
    np.testing.assert_allclose(float_matmul(a, b), np.matmul(a, b), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [np.int32, np.int64])
def test_integer_matmul_exact(dtype):
    rng = np.random.default_rng(RNG_SEED)
    a = rng.integers(-1000, 1000, (3, 2000)).astype(dtype)
    b = rng.integers(-1000, 1000, (2000, 4)).astype(dtype)
    check("MatMul", {"a": a, "b": b})
    want = a.astype(np.int64) @ b.astype(np.int64)
    np.testing.assert_array_equal(integer_matmul(a, b, np.dtype(np.int64)), want)
    # beyond float64's exact range: falls back to integer arithmetic, still exact (mod 2**64)
    big = np.full((2, 3), 2 ** 40, np.int64)
    np.testing.assert_array_equal(integer_matmul(big, big.T, np.dtype(np.int64)), big @ big.T)


@pytest.mark.parametrize("attrs,sa,sb,sc", [
    ({}, (3, 4), (4, 5), (5,)),
    ({"transA": 1}, (4, 3), (4, 5), (1, 5)),
    ({"transB": 1, "alpha": 0.5, "beta": 2.0}, (3, 4), (5, 4), (3, 5)),
    ({"transA": 1, "transB": 1}, (4, 3), (5, 4), (3, 1)),
    ({}, (3, 4), (4, 5), None),
    ({"beta": 0.0}, (3, 4), (4, 5), ()),
    ({"alpha": -1.5}, (1, 64), (64, 10), (10,)),
])
@pytest.mark.parametrize("weights", ["const", "fed"])
def test_gemm(attrs, sa, sb, sc, weights):
    rng = np.random.default_rng(RNG_SEED)
    inputs = {"a": _rand(rng, *sa), "b": _rand(rng, *sb), "c": None if sc is None else _rand(rng, *sc)}
    check("Gemm", inputs, attrs, consts=("b", "c") if weights == "const" else (), opset=13)


@pytest.mark.parametrize("equation,shapes", [
    ("ij,jk->ik", [(3, 4), (4, 5)]),
    ("bij,bjk->bik", [(2, 3, 4), (2, 4, 5)]),
    ("ii->i", [(4, 4)]),
    ("ij->ji", [(3, 4)]),
    ("...ij,...jk", [(2, 3, 4), (2, 4, 5)]),
    ("i,i", [(5,), (5,)]),
    ("bhqd,bhkd->bhqk", [(1, 2, 3, 4), (1, 2, 5, 4)]),
    ("ij, jk , kl -> il", [(2, 3), (3, 4), (4, 5)]),
])
def test_einsum(equation, shapes):
    rng = np.random.default_rng(RNG_SEED)
    check("Einsum", {f"x{i}": _rand(rng, *s) for i, s in enumerate(shapes)},
          {"equation": equation}, opset=12)
