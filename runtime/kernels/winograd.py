"""Winograd F(2x2, 3x3): stride-1 3x3 convolutions with 2.25x fewer multiplications.

Each 2x2 block of outputs ("tile") is computed from the 4x4 input patch d under it as

    Y = A^T [ (G g G^T) * (B^T d B) ] A        (* elementwise over the 4x4 transform domain)

with the standard matrices (Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks"):

    B^T = [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]]
    G   = [[1, 0, 0], [1/2, 1/2, 1/2], [1/2, -1/2, 1/2], [0, 0, 1]]
    A^T = [[1, 1, 1, 0], [0, 1, -1, -1]]

Summed over input channels, the elementwise product becomes 16 GEMMs, one per transform-domain
position (a, b): M_ab (C_out x tiles) = U_ab (C_out x C_in) @ V_ab (C_in x tiles). That is
16 * C_out * C_in per tile against 36 for the direct conv. B and A hold only 0 and +-1, so
the transforms are additions; G's halves are exact in binary. Accuracy stays at a few ulps of
the direct sum (relative L2 ~3e-7 measured on resnet shapes).

Layout, so that every transform step is one numpy call over one long contiguous run (numpy
pays ~0.2 us per row of a 2-D operand; with short rows the first version was slower than the
direct conv): the zero-padded input is split once into its four row/column parity planes
P_rs[c, u, v] = x_pad[c, 2u + r, 2v + s] (one strided pass), of (tile rows + 1) x (tile columns
+ 1). Patch rows 0..3 of tile row u are P_0s[u], P_1s[u], P_0s[u + 1], P_1s[u + 1]: the flat
planes shifted by one plane row; patch columns likewise by one element. The last plane row and
column are scratch (their runs cross a row or channel end) and are never written out.

The bias rides in the GEMM: a constant b added to every output of a tile is b at transform
position (1, 1) (A^T e_1 e_1^T A is the 2x2 block of ones), so U gets one more column holding
b at (1, 1) and zero elsewhere, and V a row of ones.
"""

from __future__ import annotations

import math

import numpy as np

from graphopt.runtime.kernels.gemm import scratch

_G = np.array([[1.0, 0.0, 0.0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0.0, 0.0, 1.0]])
#: Largest transformed input (V, 16 values per tile and channel) worth the memory traffic.
WINOGRAD_MAX_BYTES = 1 << 24


def winograd_weights(w: np.ndarray, bias: np.ndarray | None, dtype) -> np.ndarray:
    """U (16, C_out, C_in [+1]) from 3x3 weights (C_out, C_in, 3, 3): G g G^T per filter, in
    float64, position (a, b) at index 4a + b; with a bias, one more column (see module doc)."""
    c_out, c_in = w.shape[:2]
    u = np.einsum("ak,oikl,bl->aboi", _G, np.asarray(w, np.float64), _G).reshape(16, c_out, c_in)
    if bias is not None:
        extra = np.zeros((16, c_out, 1))
        extra[5, :, 0] = np.asarray(bias, np.float64).reshape(-1)
        u = np.concatenate([u, extra], axis=2)
    return np.ascontiguousarray(u, dtype=dtype)


def winograd_3x3(x: np.ndarray, u: np.ndarray, begin: tuple[int, int], end: tuple[int, int],
                 out: np.ndarray) -> None:
    """out (N, C_out, OH, OW) <- the stride-1 3x3 convolution of x (N, C_in, H, W) with pads
    begin/end, from U = winograd_weights(...) (a bias column when U has C_in + 1 columns)."""
    n, c, h, w = x.shape
    c_out = u.shape[1]
    biased = u.shape[2] == c + 1
    k = u.shape[2]
    oh, ow = out.shape[2:]
    th, tw = -(-oh // 2), -(-ow // 2)                # tile rows / columns
    rows, width = th + 1, tw + 1                      # parity plane size
    plane = rows * width
    dtype = out.dtype
    planes = scratch("winograd.planes", 4 * c * plane, dtype).reshape(2, 2, c, rows, width)
    t = scratch("winograd.t", 8 * c * plane, dtype).reshape(4, 2, c * plane)
    v = scratch("winograd.v", 16 * k * plane, dtype).reshape(4, 4, k, plane)
    m = scratch("winograd.m", 16 * c_out * plane, dtype).reshape(16, c_out, plane)
    z = scratch("winograd.z", 9 * c_out * plane, dtype)
    if biased:
        v[:, :, c] = 1.0
    for b in range(n):
        _split_parities(x[b], begin, planes)
        _input_transform(planes.reshape(2, 2, c * plane), width, t, v[:, :, :c])
        np.matmul(u, v.reshape(16, k, plane), out=m)
        _output_transform(m.reshape(4, 4, c_out * plane), z, out[b], th, width, oh, ow)


def _split_parities(x: np.ndarray, begin: tuple[int, int], planes: np.ndarray) -> None:
    """planes[r, s, c, u, v] = x padded with zeros at (2u + r, 2v + s)."""
    pt, pl = begin
    h, w = x.shape[1:]
    rows, width = planes.shape[3:]
    for r in range(2):
        i0 = (r - pt) % 2                       # first input row of padded parity r
        u0 = (i0 + pt) // 2
        n_rows = max(0, min(-(-(h - i0) // 2), rows - u0))
        for s in range(2):
            j0 = (s - pl) % 2
            v0 = (j0 + pl) // 2
            n_cols = max(0, min(-(-(w - j0) // 2), width - v0))
            dst = planes[r, s]
            dst[:, u0:u0 + n_rows, v0:v0 + n_cols] = \
                x[:, i0:i0 + 2 * n_rows:2, j0:j0 + 2 * n_cols:2]
            dst[:, :u0] = 0                       # padding: only what the copy left
            dst[:, u0 + n_rows:] = 0
            dst[:, u0:u0 + n_rows, :v0] = 0
            dst[:, u0:u0 + n_rows, v0 + n_cols:] = 0


def _input_transform(flat: np.ndarray, width: int, t: np.ndarray, v: np.ndarray) -> None:
    """v[a, b, c, q] = (B^T d B)[a, b] of the patch at plane position q of channel c.

    Every operand is one flat run over all channels (numpy pays ~0.2 us per row of a 2-D
    operand, which made short rows cost more than the arithmetic): patch rows come from the
    parity planes shifted by one plane row, patch columns from t shifted by one element. Runs
    that cross a plane row or channel end land in the scratch last row / column.
    """
    sub, add = np.subtract, np.add
    total = flat.shape[2]
    n = total - width
    for s in range(2):
        d0, d2 = flat[0, s, :n], flat[0, s, width:]
        d1, d3 = flat[1, s, :n], flat[1, s, width:]
        sub(d0, d2, out=t[0, s, :n])
        add(d1, d2, out=t[1, s, :n])
        sub(d2, d1, out=t[2, s, :n])
        sub(d1, d3, out=t[3, s, :n])
        t[:, s, n:] = 0.0
    last = total - 1
    e0, e1 = t[:, 0, :last], t[:, 1, :last]
    e2, e3 = t[:, 0, 1:], t[:, 1, 1:]
    c = v.shape[2]
    vf = v.reshape(4, 4, c * v.shape[3])            # (a, b, channels * plane)
    sub(e0, e2, out=vf[:, 0, :last])
    add(e1, e2, out=vf[:, 1, :last])
    sub(e2, e1, out=vf[:, 2, :last])
    sub(e1, e3, out=vf[:, 3, :last])
    vf[:, :, last] = 0.0


def _output_transform(m: np.ndarray, work: np.ndarray, out: np.ndarray, th: int, width: int,
                      oh: int, ow: int) -> None:
    """out <- A^T M A per tile: over the rows of A^T first (flat runs), then over its columns,
    the last step writing straight into the output's even/odd rows and columns."""
    add, sub = np.add, np.subtract
    c_out = out.shape[0]
    size = m.shape[2]                                   # c_out * plane
    z0 = work[:4 * size].reshape(4, size)
    z1 = work[4 * size:8 * size].reshape(4, size)
    tmp = work[8 * size:].reshape(c_out, th + 1, width)
    add(m[0], m[1], out=z0)
    z0 += m[2]                            # row 0 of A^T: M0 + M1 + M2 (for each column b)
    sub(m[1], m[2], out=z1)
    z1 -= m[3]                            # row 1: M1 - M2 - M3
    for r, zr in ((0, z0), (1, z1)):
        zr = zr.reshape(4, c_out, th + 1, width)
        r_rows = (oh - r + 1) // 2                         # output rows 2u + r < oh
        for s in range(2):
            cols = (ow - s + 1) // 2                       # output cols 2v + s < ow
            target = out[:, r:r + 2 * r_rows:2, s:s + 2 * cols:2]
            # First step into a contiguous temporary, the second writes the strided output
            # (no in-place ufunc on a strided view: see tests/test_regressions_fuzz.py).
            if s == 0:
                add(zr[0], zr[1], out=tmp)
                add(tmp[:, :r_rows, :cols], zr[2, :, :r_rows, :cols], out=target)
            else:
                sub(zr[1], zr[2], out=tmp)
                sub(tmp[:, :r_rows, :cols], zr[3, :, :r_rows, :cols], out=target)


def use_winograd(c_in: int, c_out: int, out_spatial: tuple[int, int]) -> bool:
    """Where Winograd beats im2col + GEMM or the shifted GEMM (measured on the resnet50 and
    PP-OCR det shapes, one thread: 0.76-0.81x the time at 64-256 channels and 14x14-56x56;
    1.3-1.5x at 7x7 or 16 channels): enough tiles for the 16 GEMMs to run well, enough channels
    for them to outweigh the transforms, a transformed input of at most 16 MB (at 40 MB, det's
    160x160 map, the traffic ate the gain)."""
    oh, ow = out_spatial
    tiles = math.ceil(oh / 2) * math.ceil(ow / 2)
    v_bytes = 16 * (c_in + 1) * (math.ceil(oh / 2) + 1) * (math.ceil(ow / 2) + 1) * 4
    return tiles >= 49 and min(c_in, c_out) >= 24 and v_bytes <= WINOGRAD_MAX_BYTES
