"""Sparse int8 weights with 32-bit accumulation: the outlier part of an outlier-aware split.

The quantization passes split an acc16 layer's weights W = W_small + W_outlier (contract item
7): W_small fits 16-bit accumulation, W_outlier holds the few large weights and is stored
sparse (a Constant node's sparse_value, or a sparse initializer in files from elsewhere). Its
product is a gather: for every nonzero w (output o, reduction index k), w * (x[k] - x_zp) is
added into output o, in int32 (exact, as acc32 kernels are).

Vectorized over the nonzeros, never a Python loop over them: the nonzeros are sorted by output
channel; a chunk of them gathers its activation rows in one fancy-indexing copy (matmul: columns
of a; conv: (channel, kernel tap) rows of a strided window view of the padded input, which is
the im2col of just those rows), multiplies by the values, and np.add.reduceat sums each output's
run. Chunks keep the gathered block near a few MB.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import numpy_helper

from graphopt.runtime.kernels.gemm import pad_spatial, window_view

#: Elements of one gathered block (int32): about 4 MB.
CHUNK_ELEMENTS = 1 << 20


def coo_of_proto(sparse: onnx.SparseTensorProto) -> tuple[np.ndarray, np.ndarray, tuple[int, ...]]:
    """(flat indices int64, values, dense shape) of a SparseTensorProto (indices linearized
    [NNZ] or coordinates [NNZ, rank]), without building the dense tensor."""
    values = numpy_helper.to_array(sparse.values).reshape(-1)
    shape = tuple(int(d) for d in sparse.dims)
    if not values.size:
        return np.zeros(0, np.int64), values, shape
    indices = numpy_helper.to_array(sparse.indices).astype(np.int64)
    flat = indices.reshape(-1) if indices.ndim == 1 \
        else np.ravel_multi_index(tuple(indices.T), shape)
    return flat, values, shape


def dense_of_proto(sparse: onnx.SparseTensorProto) -> np.ndarray:
    """The dense tensor of a SparseTensorProto (built for the caller, not cached on the IR's
    Value: a graph whose sparse initializer was read keeps saving it sparse)."""
    flat, values, shape = coo_of_proto(sparse)
    dense = np.zeros(shape, values.dtype)
    dense.reshape(-1)[flat] = values
    return dense


class SparseInt8:
    """Nonzeros of an 8-bit weight tensor as (output index, reduction index, value), sorted by
    output. The reduction index k addresses the weight with its output axis removed, in the
    order of the remaining axes (a Conv weight (C_out, C_in/g, *kernel): k = (c, taps...))."""

    def __init__(self, out_index: np.ndarray, k_index: np.ndarray, values: np.ndarray,
                 shape: tuple[int, ...], out_axis: int) -> None:
        order = np.argsort(out_index, kind="stable")
        self.out_index = out_index[order]
        self.k_index = k_index[order]
        self.values = values[order].astype(np.int32)
        self.shape = tuple(shape)
        self.out_axis = out_axis
        self.n_out = shape[out_axis]
        # int32 sums are exact while every output's |sum| stays below 2**31 for 8-bit inputs.
        per_output = np.bincount(self.out_index, minlength=1).max() if self.nnz else 0
        peak = int(np.abs(self.values).max()) if self.nnz else 0
        self.acc_dtype = np.int32 if per_output * peak * 256 < 2 ** 31 else np.int64

    @classmethod
    def from_flat(cls, flat: np.ndarray, values: np.ndarray, shape: tuple[int, ...],
                  out_axis: int) -> SparseInt8:
        coords = np.unravel_index(flat, shape)
        rest = [c for axis, c in enumerate(coords) if axis != out_axis]
        rest_shape = [d for axis, d in enumerate(shape) if axis != out_axis]
        k = np.ravel_multi_index(tuple(rest), tuple(rest_shape)) if rest else np.zeros_like(flat)
        keep = values != 0
        return cls(coords[out_axis][keep].astype(np.int64), k[keep].astype(np.int64),
                   values[keep], shape, out_axis)

    @classmethod
    def from_dense(cls, w: np.ndarray, out_axis: int) -> SparseInt8:
        flat = np.flatnonzero(w)
        return cls.from_flat(flat, np.asarray(w).reshape(-1)[flat], w.shape, out_axis)

    @classmethod
    def from_proto(cls, sparse: onnx.SparseTensorProto, out_axis: int) -> SparseInt8:
        flat, values, shape = coo_of_proto(sparse)
        return cls.from_flat(flat, values, shape, out_axis)

    @property
    def nnz(self) -> int:
        return int(self.values.size)

    @property
    def density(self) -> float:
        size = math.prod(self.shape)
        return self.nnz / size if size else 0.0

    def _chunks(self, rows: int):
        """(slice of nonzeros, reduceat starts within it, outputs it touches) per chunk of at
        most CHUNK_ELEMENTS / rows nonzeros."""
        step = max(1, CHUNK_ELEMENTS // max(rows, 1))
        for s0 in range(0, self.nnz, step):
            part = slice(s0, min(self.nnz, s0 + step))
            outs = self.out_index[part]
            starts = np.flatnonzero(np.r_[True, outs[1:] != outs[:-1]])
            yield part, starts, outs[starts]

    def add_matmul(self, acc: np.ndarray, a: np.ndarray, a_zp: int) -> None:
        """acc (M, n_out) += (a (M, K) - a_zp) @ W_outlier, exactly (out_axis picks W's
        layout: (K, N) with out_axis 1, (N, K) with out_axis 0, as Gemm's transB)."""
        for part, starts, outs in self._chunks(a.shape[0]):
            g = a[:, self.k_index[part]].astype(self.acc_dtype)
            if a_zp:
                g -= a_zp
            g *= self.values[part]
            acc[:, outs] += np.add.reduceat(g, starts, axis=1).astype(acc.dtype, copy=False)

    def add_conv(self, acc: np.ndarray, x: np.ndarray, x_zp: int, geom, groups: int) -> None:
        """acc (N, C_out, *out) += the convolution of (x - x_zp) with W_outlier (C_out, C_in/g,
        *kernel) for the conv geometry `geom` (conv.ConvGeometry): padding holds x_zp, which
        shifts to 0."""
        n = x.shape[0]
        cig = self.shape[1]
        cog = self.n_out // groups
        kernel = tuple(self.shape[2:])
        taps = math.prod(kernel)
        xp = pad_spatial(x, geom.begin, geom.end, x_zp)
        win = window_view(xp, geom.kernel, geom.strides, geom.dilations, geom.out_spatial)
        pixels = math.prod(geom.out_spatial)
        channel = (self.out_index // cog) * cig + self.k_index // taps
        tap = np.unravel_index(self.k_index % taps, kernel)
        flat_acc = acc.reshape(n, self.n_out, pixels)
        for part, starts, outs in self._chunks(n * pixels):
            index = (slice(None), channel[part]) + tuple(t[part] for t in tap)
            g = win[index].reshape(n, -1, pixels).astype(self.acc_dtype)
            if x_zp:
                g -= x_zp
            g *= self.values[part][:, None]
            flat_acc[:, outs] += np.add.reduceat(g, starts, axis=1).astype(acc.dtype, copy=False)
