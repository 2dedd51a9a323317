"""Shared GEMM machinery: convolution geometry, im2col, and exact integer GEMMs through float BLAS.

Why this module exists: every heavy kernel (float Conv, ConvInteger, QLinearConv, MatMulInteger,
QLinearMatMul) comes down to "lay the input out as a matrix, multiply by the weights". Doing that
in one place keeps a single im2col for float and integer data, and a single answer to the
question "how do we multiply integers fast and exactly in numpy?":

numpy's integer matmul does not call BLAS (it runs a naive loop at well under 1 GFLOP/s), so
integer GEMMs are computed with float32 BLAS on float32 arrays that hold integers. float32
represents every integer up to 2**24 exactly, and a dot product is exact when every partial sum
stays within that range, whatever order BLAS adds in. Bounding |a| and |b| bounds each partial
sum by K * max|a| * max|b|, so splitting K into chunks of at most 2**24 // (max|a| * max|b|)
makes each chunk's GEMM exact; the chunks are then summed in float64 (exact to 2**53).

`int_gemm_acc16` models the 16-bit accumulation of FBGEMM-style int8 kernels (vpmaddubsw +
vpaddsw) exactly, saturation included; see its docstring for the model. `Acc16Weights` is the
same model for constant weights as the int8 steps use it: the weight-side operands of its
saturation filters laid out once, and only the model's excess over the exact product.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence

import numpy as np
from numpy.lib.stride_tricks import as_strided

#: float32 holds every integer of magnitude <= 2**24 exactly.
F32_EXACT = 1 << 24
#: float64 holds every integer of magnitude <= 2**53 exactly.
F64_EXACT = 1 << 53
#: Below this many K-steps per chunk, one float64 GEMM beats many thin float32 GEMMs.
_MIN_F32_CHUNK = 128

INT16_MIN, INT16_MAX = -(1 << 15), (1 << 15) - 1
#: K-block after which FBGEMM's acc16 kernels spill the int16 accumulators into int32.
ACC16_K_BLOCK = 256


# --------------------------------------------------------------------------------------------
# Scratch buffers
# --------------------------------------------------------------------------------------------

class _Scratch(threading.local):
    def __init__(self) -> None:
        self.buffers: dict[tuple[str, np.dtype], np.ndarray] = {}


_SCRATCH = _Scratch()


def scratch(name: str, size: int, dtype=np.float32) -> np.ndarray:
    """A 1-D work buffer of `size` elements, reused across calls (per thread, per name).

    For blocked kernels whose blocks are sized to stay in cache: allocating them afresh on
    every call costs more than the work on small blocks. Never return one from a kernel (the
    session may write into kernel outputs) and never hold two users of one name at once.
    """
    key = (name, np.dtype(dtype))
    buf = _SCRATCH.buffers.get(key)
    if buf is None or buf.size < size:
        buf = np.empty(max(size, 1), dtype=dtype)
        _SCRATCH.buffers[key] = buf
    return buf[:size]


# --------------------------------------------------------------------------------------------
# Convolution geometry and im2col
# --------------------------------------------------------------------------------------------

def conv_pads(in_spatial: Sequence[int], kernel: Sequence[int], strides: Sequence[int],
              dilations: Sequence[int], pads: Sequence[int] | None, auto_pad: str
              ) -> tuple[list[int], list[int]]:
    """(pads_begin, pads_end) of a Conv/pool, resolving auto_pad as ONNX defines it."""
    d = len(in_spatial)
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        begin, end = [], []
        for size, k, s, dil in zip(in_spatial, kernel, strides, dilations):
            out = -(-size // s)
            total = max(0, (out - 1) * s + (k - 1) * dil + 1 - size)
            small, large = total // 2, total - total // 2
            if auto_pad == "SAME_UPPER":
                begin.append(small); end.append(large)
            else:
                begin.append(large); end.append(small)
        return begin, end
    if auto_pad == "VALID" or not pads:
        return [0] * d, [0] * d
    return list(pads[:d]), list(pads[d:2 * d])


def conv_out_spatial(in_spatial: Sequence[int], kernel: Sequence[int], strides: Sequence[int],
                     dilations: Sequence[int], begin: Sequence[int], end: Sequence[int],
                     ceil_mode: bool = False) -> list[int]:
    """Output spatial size of a Conv/pool window sweep (floor or ceil division)."""
    out = []
    for size, k, s, dil, b, e in zip(in_spatial, kernel, strides, dilations, begin, end):
        span = size + b + e - ((k - 1) * dil + 1)
        n = (-(-span // s) if ceil_mode else span // s) + 1
        if ceil_mode and (n - 1) * s >= size + b:
            n -= 1  # the last window would start in the end padding only
        out.append(max(n, 0))
    return out


def pad_spatial(x: np.ndarray, begin: Sequence[int], end: Sequence[int], value: float = 0.0,
                work: str | None = None) -> np.ndarray:
    """x (N, C, *S) padded on the spatial axes with a constant; x itself when no pad.

    work: name of a `scratch` buffer to build the padded copy in (a temporary the caller drops
    before returning), instead of a fresh allocation.
    """
    if not any(begin) and not any(end):
        return x
    shape = x.shape[:2] + tuple(s + b + e for s, b, e in zip(x.shape[2:], begin, end))
    if work is None:
        out = np.full(shape, value, dtype=x.dtype) if value else np.zeros(shape, dtype=x.dtype)
    else:
        out = scratch(work, math.prod(shape), x.dtype).reshape(shape)
        out.fill(value)
    inner = (slice(None), slice(None)) + tuple(slice(b, b + s) for b, s in zip(begin, x.shape[2:]))
    out[inner] = x
    return out


def strided_view(base: np.ndarray, shape: Sequence[int], strides: Sequence[int]) -> np.ndarray:
    """A read-only view of `base`'s memory with the given shape and strides (in bytes).

    numpy's as_strided costs ~8 us per call in Python overhead; building the view with the
    ndarray constructor costs ~2 us, which matters for kernels called hundreds of times per
    run on small tensors. Non-contiguous bases (no plain buffer) take as_strided.
    """
    try:
        view = np.ndarray(tuple(shape), dtype=base.dtype, buffer=base, strides=tuple(strides))
    except (TypeError, ValueError, BufferError):
        return as_strided(base, shape=tuple(shape), strides=tuple(strides), writeable=False)
    view.flags.writeable = False
    return view


def window_view(xp: np.ndarray, kernel: Sequence[int], strides: Sequence[int],
                dilations: Sequence[int], out_spatial: Sequence[int]) -> np.ndarray:
    """Read-only strided view (N, C, *kernel, *out) of a padded input: no copy."""
    st = xp.strides
    spatial = st[2:]
    shape = xp.shape[:2] + tuple(kernel) + tuple(out_spatial)
    strides_ = st[:2] + tuple(s * d for s, d in zip(spatial, dilations)) \
        + tuple(s * k for s, k in zip(spatial, strides))
    return strided_view(xp, shape, strides_)


def im2col(xp: np.ndarray, kernel: Sequence[int], strides: Sequence[int],
           dilations: Sequence[int], out_spatial: Sequence[int], groups: int = 1,
           out: np.ndarray | None = None) -> np.ndarray:
    """Columns (N, groups, C/groups * prod(kernel), prod(out)) of a padded input, one copy.

    Row order inside a group is (channel, kernel offsets...), matching ONNX weights
    (C_out, C_in/groups, *kernel) reshaped to (C_out, -1).
    """
    n, c = xp.shape[:2]
    rows = c // groups * math.prod(kernel)
    cols = math.prod(out_spatial)
    if out is None:
        out = np.empty((n, groups, rows, cols), dtype=xp.dtype)
    view = window_view(xp, kernel, strides, dilations, out_spatial)
    # Both sides as (N, groups, C/groups, *kernel, *out): axis splits only, so `out` may be a
    # view with gaps between its groups (a column matrix with a row of ones under each).
    split = (n, groups, c // groups) + tuple(kernel) + tuple(out_spatial)
    np.copyto(out.reshape(split), view.reshape(split))
    return out


# --------------------------------------------------------------------------------------------
# Exact integer GEMM through float BLAS
# --------------------------------------------------------------------------------------------

def _absmax(x: np.ndarray) -> int:
    if x.size == 0:
        return 0
    return int(max(abs(int(x.max())), abs(int(x.min()))))


def exact_chunk(bound: int) -> int:
    """Largest K-chunk whose float32 dot products stay exact when |a_k * b_k| <= bound."""
    return F32_EXACT // max(bound, 1)


def matmul_exact_f32(a: np.ndarray, b: np.ndarray, bound: int) -> np.ndarray:
    """a @ b, exactly, for float32 arrays holding integers with |a_ik * b_kj| <= bound.

    Returns float32 when one GEMM is exact, else float64 (sums of exact float32 chunks, or one
    float64 GEMM when the chunks would be too thin to run BLAS well). Callers convert to ints.
    """
    k = a.shape[-1]
    chunk = exact_chunk(bound)
    if k <= chunk:
        return np.matmul(a, b)
    if k * bound > F64_EXACT:
        # Beyond float64's exact range: only integer arithmetic is exact (slow, never hit by
        # 8-bit data: it needs K > 2**53 / 2**16).
        return np.matmul(a.astype(np.int64), b.astype(np.int64)).astype(np.float64)
    if chunk < _MIN_F32_CHUNK:
        return np.matmul(a.astype(np.float64), b.astype(np.float64))
    acc = np.matmul(a[..., :chunk], b[..., :chunk, :]).astype(np.float64)
    for k0 in range(chunk, k, chunk):
        acc += np.matmul(a[..., k0:k0 + chunk], b[..., k0:k0 + chunk, :])
    return acc


def to_int32(acc: np.ndarray) -> np.ndarray:
    """Exact integer-valued float/int array -> int32, wrapping like a C int32 accumulator."""
    if acc.dtype == np.int32:
        return acc
    if acc.dtype.kind == "f" and acc.size and np.abs(acc).max() < 2 ** 31:
        return acc.astype(np.int32)
    return acc.astype(np.int64).astype(np.int32)


def int_gemm_exact(a: np.ndarray, b: np.ndarray, *, a_absmax: int | None = None,
                   b_absmax: int | None = None) -> np.ndarray:
    """Exact a @ b (int32) of integer arrays (matmul broadcasting), computed on float32 BLAS.

    a_absmax / b_absmax bound the operands' magnitudes (computed from the data when omitted);
    they choose the K-chunk so that every partial sum stays below 2**24.
    """
    a_bound = _absmax(a) if a_absmax is None else int(a_absmax)
    b_bound = _absmax(b) if b_absmax is None else int(b_absmax)
    acc = matmul_exact_f32(a.astype(np.float32), b.astype(np.float32), a_bound * b_bound)
    return to_int32(acc)


# --------------------------------------------------------------------------------------------
# 16-bit accumulation (FBGEMM acc16)
# --------------------------------------------------------------------------------------------

def _sat16(x: np.ndarray) -> np.ndarray:
    # two ufunc calls: np.clip's Python wrapper costs more than the work on small arrays
    np.minimum(x, INT16_MAX, out=x)
    return np.maximum(x, INT16_MIN, out=x)


def acc16_bound(a: np.ndarray, b: np.ndarray, k_block: int = ACC16_K_BLOCK) -> np.ndarray:
    """Per (block, m, n): sum over the block of |a_mk| * |b_kn|, an upper bound on every int16
    intermediate (pair sum and running sum) of the acc16 model. Exact (float32, small blocks)."""
    m, k = a.shape
    n = b.shape[1]
    nblocks = max(1, -(-k // k_block))
    abs_a = np.abs(a.astype(np.float32))
    abs_b = np.abs(b.astype(np.float32))
    out = np.empty((nblocks, m, n), dtype=np.float32)
    for blk in range(nblocks):
        k0, k1 = blk * k_block, min(k, (blk + 1) * k_block)
        np.matmul(abs_a[:, k0:k1], abs_b[k0:k1], out=out[blk])
    return out


def acc16_safe_columns(b: np.ndarray, a_absmax: int = 255, k_block: int = ACC16_K_BLOCK
                       ) -> np.ndarray:
    """Columns of weights b (K, N) for which acc16 provably cannot saturate with any
    activations of magnitude <= a_absmax: a_absmax * sum_k |b_kn| <= 32767 in every K-block.
    (For kernel choice: such columns give exactly the int32-accumulation result.)"""
    k, n = b.shape
    abs_b = np.abs(b.astype(np.int64))
    pad = (-k) % k_block
    if pad:
        abs_b = np.concatenate([abs_b, np.zeros((pad, n), dtype=np.int64)])
    block_l1 = abs_b.reshape(-1, k_block, n).sum(axis=1)
    return (block_l1 * int(a_absmax) <= INT16_MAX).all(axis=0)


def int_gemm_acc16(a: np.ndarray, b: np.ndarray, *, k_block: int = ACC16_K_BLOCK,
                   saturate_sum: bool = True) -> np.ndarray:
    """a (..., M, K) uint8/int8 @ b (..., K, N) int8 under FBGEMM-style 16-bit accumulation,
    exactly (leading dims broadcast as in np.matmul: a batch of groups, say).

    The model (per output element (m, n), K zero-padded to an even length):
        acc32 = 0
        for each K-block of k_block consecutive k (in ascending k order):
            acc16 = 0
            for each pair (k, k+1) in the block, ascending:           # vpmaddubsw
                pair = sat16(a[m,k] * b[k,n] + a[m,k+1] * b[k+1,n])
                acc16 = sat16(acc16 + pair)                           # vpaddsw
            acc32 += acc16                                            # vpmovsxwd + vpaddd
    where sat16 clamps to [-32768, 32767]. Without saturation this is the exact product.

    saturate_sum=False models the other common AVX2 u8s8 kernel (vpmaddubsw, then vpmaddwd
    with ones into int32, as onnxruntime's MLAS does without VNNI): pairs saturate, their sum
    does not: result = sum over pairs of sat16(a[m,k] b[k,n] + a[m,k+1] b[k+1,n]).

    Fast path: every intermediate of a block lies between the sum of its negative products and
    the sum of its positive ones (two or four float32 GEMMs of the operands' signed parts,
    `_acc16_risky`), and for 2-D operands (or one group) a finer one per 16-k sub-block
    (`_refine_by_sub_blocks`); where they fit int16 the exact GEMM is the answer. The other
    (block, m, n) triples are emulated: per block, a loop over the block's k-pairs applies the
    saturating updates to all the risky outputs at once (a loop over K, never over outputs).
    2-D operands narrow it first: to the risky outputs themselves when they are scattered (a
    quarter or less of their rows x columns), else to the risky rows x risky columns. The
    result replaces the exact block sum there.
    """
    if a.ndim < 2 or b.ndim < 2:
        raise ValueError("int_gemm_acc16 takes operands of at least 2 dims")
    if k_block % 2:
        raise ValueError("k_block must be even (products are summed in pairs)")
    if (a.ndim > 2 or b.ndim > 2) and a.size == a.shape[-2] * a.shape[-1] \
            and b.size == b.shape[-2] * b.shape[-1]:
        # leading dims all 1 (one group): the 2-D path narrows to the risky outputs
        shape = np.broadcast_shapes(a.shape[:-2], b.shape[:-2]) + (a.shape[-2], b.shape[-1])
        flat = int_gemm_acc16(a.reshape(a.shape[-2:]), b.reshape(b.shape[-2:]),
                              k_block=k_block, saturate_sum=saturate_sum)
        return flat.reshape(shape)
    exact = int_gemm_exact(a, b)
    m, k = a.shape[-2:]
    n = b.shape[-1]
    if m == 0 or n == 0 or k == 0 or exact.size == 0:
        return exact
    a32 = a.astype(np.int32)
    b32 = b.astype(np.int32)
    if k % 2:   # one zero pair partner: pairs never straddle the end
        a32 = np.concatenate([a32, np.zeros(a32.shape[:-1] + (1,), np.int32)], axis=-1)
        b32 = np.concatenate([b32, np.zeros(b32.shape[:-2] + (1, n), np.int32)], axis=-2)
    blocks = [(k0, min(k0 + k_block, a32.shape[-1])) for k0 in range(0, k, k_block)]
    risky = [_acc16_risky(a32[..., k0:k1], b32[..., k0:k1, :]) for k0, k1 in blocks]
    if a.ndim == b.ndim == 2:
        risky = [None if mask is None else
                 _refine_by_sub_blocks(a32[:, k0:k1], b32[k0:k1], mask, saturate_sum)
                 for (k0, k1), mask in zip(blocks, risky)]
    if not any(r is not None for r in risky):
        return exact
    result = exact.astype(np.int64)
    for (k0, k1), mask in zip(blocks, risky):
        if mask is None:
            continue
        a_blk = a32[..., k0:k1]
        b_blk = b32[..., k0:k1, :]
        if mask.ndim == 2:      # 2-D operands: only the risky outputs
            rows = np.flatnonzero(mask.any(axis=1))
            cols = np.flatnonzero(mask.any(axis=0))
            risky_m, risky_n = np.nonzero(mask)
            if 4 * risky_m.size < rows.size * cols.size:   # scattered: one output at a time
                for start in range(0, risky_m.size, _SCAN_OUTPUTS):
                    m_idx = risky_m[start:start + _SCAN_OUTPUTS]
                    n_idx = risky_n[start:start + _SCAN_OUTPUTS]
                    result[m_idx, n_idx] += _acc16_output_excess(
                        a_blk[m_idx], b_blk[:, n_idx].T, saturate_sum)
                continue
            acc16, exact_blk = _acc16_scan(a_blk[rows], b_blk[:, cols], saturate_sum)
            sub = np.ix_(rows, cols)
            result[sub] += np.where(mask[sub], acc16 - exact_blk, 0)
        else:
            acc16, exact_blk = _acc16_scan(a_blk, b_blk, saturate_sum)
            result += np.where(mask, acc16 - exact_blk, 0)
    return result.astype(np.int32)


def _acc16_risky(a_blk: np.ndarray, b_blk: np.ndarray) -> np.ndarray | None:
    """Mask (..., M, N) of the outputs whose 16-bit sums over the block may leave int16, or None
    when none can. A cheap bound first (per-row L1 x per-column max, and the other way round);
    then, for the outputs it could not clear, the exact range of every partial sum: each pair
    sum and running sum lies between the sum of the block's negative products and the sum of
    its positive ones, which are GEMMs of the operands' positive and negative parts (two when
    the activations are unsigned, as they are for uint8). That range is far narrower than
    sum_k |a_mk| |b_kn| when the weights mix signs."""
    abs_a = np.abs(a_blk).astype(np.int64)
    abs_b = np.abs(b_blk).astype(np.int64)
    cheap = np.minimum(abs_a.sum(axis=-1)[..., :, None] * abs_b.max(axis=-2)[..., None, :],
                       abs_a.max(axis=-1)[..., :, None] * abs_b.sum(axis=-2)[..., None, :])
    if not (cheap > INT16_MAX).any():
        return None
    highest, lowest = _partial_sum_range(a_blk, b_blk)
    mask = (highest > INT16_MAX) | (lowest < INT16_MIN)
    return mask if mask.any() else None


#: k per sub-block of the finer saturation test (even: pairs never straddle two sub-blocks).
_SUB_BLOCK = 16


def _refine_by_sub_blocks(a_blk: np.ndarray, b_blk: np.ndarray, mask: np.ndarray,
                          saturate_sum: bool) -> np.ndarray | None:
    """`mask` (M, N) narrowed by a finer bound: cut the block into sub-blocks of _SUB_BLOCK k;
    a running sum inside sub-block s lies within (exact sum of sub-blocks before s) + [sum of
    s's negative products, sum of its positive ones], and a pair sum within s's range alone.
    Sums of random-signed products drift far less than their positive parts add up, so this
    clears most outputs the whole-block range could not; the rest are emulated."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    a_sub = a_blk[rows].astype(np.float32)
    b_sub = b_blk[:, cols].astype(np.float32)
    pad = (-a_sub.shape[1]) % _SUB_BLOCK
    if pad:
        a_sub = np.pad(a_sub, ((0, 0), (0, pad)))
        b_sub = np.pad(b_sub, ((0, pad), (0, 0)))
    count = a_sub.shape[1] // _SUB_BLOCK
    a_parts = a_sub.reshape(rows.size, count, _SUB_BLOCK).transpose(1, 0, 2)  # (S, M', sub)
    b_parts = b_sub.reshape(count, _SUB_BLOCK, cols.size)                      # (S, sub, N')
    highest, lowest = _partial_sum_range(a_parts, b_parts)                     # (S, M', N')
    unsafe = ((highest > INT16_MAX) | (lowest < INT16_MIN)).any(axis=0)
    if saturate_sum:
        before = np.cumsum(highest + lowest, axis=0) - (highest + lowest)      # exact, exclusive
        unsafe |= ((before + highest > INT16_MAX) | (before + lowest < INT16_MIN)).any(axis=0)
    refined = np.zeros_like(mask)
    refined[np.ix_(rows, cols)] = unsafe & mask[np.ix_(rows, cols)]
    return refined if refined.any() else None


def _partial_sum_range(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(sum of positive products, sum of negative products) per output of a (..., M, K) @
    b (..., K, N), exactly in float32 (operands of 8-bit magnitude, K <= ACC16_K_BLOCK)."""
    af = a.astype(np.float32)
    bf = b.astype(np.float32)
    b_pos, b_neg = np.maximum(bf, 0), np.minimum(bf, 0)
    if not (af < 0).any():
        return np.matmul(af, b_pos), np.matmul(af, b_neg)
    a_pos, a_neg = np.maximum(af, 0), np.minimum(af, 0)
    return (np.matmul(a_pos, b_pos) + np.matmul(a_neg, b_neg),
            np.matmul(a_pos, b_neg) + np.matmul(a_neg, b_pos))


#: Up to this many products (candidate outputs x block length), Acc16Weights emulates every
#: candidate without the finer sub-block test (a scan that small costs less than the test).
_DIRECT_SCAN = 1 << 15

#: k per sub-block of Acc16Weights' finer test: coarser than `_refine_by_sub_blocks`' (half
#: the elementwise work; the few more candidates it keeps cost less to scan).
_EXCESS_SUB_BLOCK = 32

#: Outputs the per-output acc16 scan handles at once (its pair table is outputs x K-block/2).
_SCAN_OUTPUTS = 1 << 14


def _acc16_scan(a_blk: np.ndarray, b_blk: np.ndarray, saturate_sum: bool
                ) -> tuple[np.ndarray, np.ndarray]:
    """(acc16 model, exact sum) of one K-block (even length) of int32 operands (..., M, KB)
    and (..., KB, N): the saturating scan is sequential by definition, so the loop runs over
    k-pairs, each step vectorized over every output."""
    shape = np.broadcast_shapes(a_blk.shape[:-2], b_blk.shape[:-2]) \
        + (a_blk.shape[-2], b_blk.shape[-1])
    acc16 = np.zeros(shape, np.int32)
    exact = np.zeros(shape, np.int32)
    pair = np.empty(shape, np.int32)
    for p in range(0, a_blk.shape[-1], 2):
        np.multiply(a_blk[..., :, p, None], b_blk[..., None, p, :], out=pair)
        pair += a_blk[..., :, p + 1, None] * b_blk[..., None, p + 1, :]
        exact += pair
        _sat16(pair)
        acc16 += pair
        if saturate_sum:
            _sat16(acc16)
    return acc16, exact


class Acc16Weights:
    """Constant weights b (G, K, N) of the acc16 model, laid out once, for `excess`: where and
    by how much the model differs from the exact product of given activations.

    The int8 steps compute the exact product anyway (the output channels the weights prove
    safe need nothing else), so for the others they only need the model's excess over it at
    the outputs that saturate: no second exact GEMM, no zero-point corrections (the model's
    and the exact product's corrections are the same), no int64 temporaries. The filters are
    `int_gemm_acc16`'s (the exact [negative, positive] range of the block's partial sums, and
    for one group with many candidates a finer per-sub-block range), run on weight-side
    operands prepared here in float32; the candidates left are emulated by the same scan. A
    filter only has to be conservative: outside the outputs it keeps, model and exact product
    agree, so the result does not depend on how fine it is.

    Layout: each block's weights as [positive part | -negative part] (K, 2N), so one GEMM of
    unsigned activations gives (highest, -lowest) side by side and one comparison against
    [32767 | 32768] flags both ends of int16.
    """

    def __init__(self, b: np.ndarray, k_block: int = ACC16_K_BLOCK) -> None:
        b = np.asarray(b)
        if b.ndim == 2:
            b = b[None]
        g, k, n = b.shape
        if k_block % 2:
            raise ValueError("k_block must be even (products are summed in pairs)")
        self.shape = (g, k, n)
        k_even = k + k % 2
        b32 = np.zeros((g, k_even, n), np.int32)
        b32[:, :k] = b
        self._b_cols = np.ascontiguousarray(b32.transpose(0, 2, 1))      # (G, N, K): gathers
        self.blocks = [(k0, min(k0 + k_block, k_even)) for k0 in range(0, k, k_block)]
        bf = b32.astype(np.float32)
        pos, neg = np.maximum(bf, 0), np.minimum(bf, 0)
        self._limits = np.concatenate([np.full(n, INT16_MAX, np.float32),
                                       np.full(n, -INT16_MIN, np.float32)])
        self._pos_nneg, self._neg_npos, self._sub = [], [], []
        for k0, k1 in self.blocks:
            self._pos_nneg.append(np.concatenate([pos[:, k0:k1], -neg[:, k0:k1]], axis=-1))
            self._neg_npos.append(np.concatenate([neg[:, k0:k1], -pos[:, k0:k1]], axis=-1))
            if g == 1:      # sub-block parts of the finer test: (S, SUB, 2N) of each layout
                pad = (-(k1 - k0)) % _EXCESS_SUB_BLOCK
                self._sub.append(tuple(
                    np.pad(parts[-1][0], ((0, pad), (0, 0)))
                    .reshape(-1, _EXCESS_SUB_BLOCK, 2 * n)
                    for parts in (self._pos_nneg, self._neg_npos)))

    def excess(self, a: np.ndarray, saturate_sum: bool = True
               ) -> list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
        """For 8-bit activations a (G, M, K) (or (M, K) for one group): the outputs where the
        acc16 model of a @ b may differ from the exact product, as (group, row, column, model
        - exact) index/int32 arrays, one tuple per K-block (indices unique within a tuple)."""
        if a.ndim == 2:
            a = a[None]
        g, k, n = self.shape
        m = a.shape[-2]
        signed = a.dtype.kind == "i"
        af = a.astype(np.float32)
        found = []
        for blk, (k0, k1) in enumerate(self.blocks):
            ab = af[..., k0:min(k1, k)]
            hot = self._range(ab, self._pos_nneg[blk], self._neg_npos[blk], signed) \
                > self._limits
            flat = np.flatnonzero(hot[..., :n] | hot[..., n:])
            if not flat.size:
                continue
            group, rest = np.divmod(flat, m * n)
            rows, cols = np.divmod(rest, n)
            if g == 1 and flat.size * (k1 - k0) > _DIRECT_SCAN:
                rows, cols = self._sub_block_filter(ab[0], blk, rows, cols, saturate_sum)
                if not rows.size:
                    continue
                group = np.zeros_like(rows)
            if g == 1:      # plain row gathers (two index arrays take numpy's slow path)
                a_rows = self._a32(a[0].take(rows, axis=0), k0, k1)
                b_cols = self._b_cols[0, :, k0:k1].take(cols, axis=0)
            else:
                a_rows = self._a32(a[group, rows], k0, k1)
                b_cols = self._b_cols[group, cols, k0:k1]
            found.append((group, rows, cols, _acc16_output_excess(a_rows, b_cols, saturate_sum)))
        return found

    @staticmethod
    def _range(a_f: np.ndarray, pos_nneg: np.ndarray, neg_npos: np.ndarray, signed: bool
               ) -> np.ndarray:
        """(highest | -lowest) partial sums per output: the sum of the positive products and
        minus the sum of the negative ones, exact in float32 (one GEMM for unsigned a)."""
        kb = a_f.shape[-1]
        if not signed:
            return np.matmul(a_f, pos_nneg[..., :kb, :])
        a_pos = np.maximum(a_f, 0)
        hl = np.matmul(a_pos, pos_nneg[..., :kb, :])
        hl += np.matmul(a_f - a_pos, neg_npos[..., :kb, :])
        return hl

    def _sub_block_filter(self, ab, blk, rows, cols, saturate_sum):
        """`_refine_by_sub_blocks`' test on the candidates (rows[i], cols[i]): cut the block
        into sub-blocks of _EXCESS_SUB_BLOCK k; a running sum inside sub-block s lies within
        (exact sum of the sub-blocks before s) + [s's lowest, s's highest], a pair sum within
        s's range.
        The sub-block ranges come from GEMMs over the candidates' rows x columns, then only
        the candidates' entries are tested. Returns the candidates that may saturate."""
        m, n = ab.shape[0], self.shape[2]
        row_sel = np.flatnonzero(np.bincount(rows, minlength=m))
        col_sel = np.flatnonzero(np.bincount(cols, minlength=n))
        row_at = np.zeros(m, np.intp)
        row_at[row_sel] = np.arange(row_sel.size)
        col_at = np.zeros(n, np.intp)
        col_at[col_sel] = np.arange(col_sel.size)
        a_rows = ab[row_sel]
        pos_nneg, neg_npos = self._sub[blk]
        both = np.concatenate([col_sel, col_sel + n])
        count = pos_nneg.shape[0]
        hl = np.matmul(self._sub_parts(np.maximum(a_rows, 0), count), pos_nneg[..., both])
        if (a_rows < 0).any():
            hl += np.matmul(self._sub_parts(np.minimum(a_rows, 0), count), neg_npos[..., both])
        width = col_sel.size
        at = row_at[rows] * (2 * width) + col_at[cols]        # each candidate in (M', 2N')
        hl = hl.reshape(count, -1)
        highest = np.take(hl, at, axis=1)                     # (S, P)
        neg_lowest = np.take(hl, at + width, axis=1)
        if saturate_sum:
            # pair and running sums end within highest + max(before, 0) and
            # lowest + min(before, 0), `before` the exact sum of the sub-blocks before s
            before = np.zeros_like(highest)
            for s in range(1, count):
                before[s] = before[s - 1]
                before[s] += highest[s - 1]
                before[s] -= neg_lowest[s - 1]
            up = np.maximum(before, 0)
            up += highest
            unsafe = up > INT16_MAX
            np.minimum(before, 0, out=before)
            np.subtract(neg_lowest, before, out=before)
            unsafe |= before > -INT16_MIN
        else:
            unsafe = highest > INT16_MAX
            unsafe |= neg_lowest > -INT16_MIN
        keep = np.flatnonzero(unsafe.any(axis=0))
        return rows[keep], cols[keep]

    @staticmethod
    def _sub_parts(a_rows: np.ndarray, count: int) -> np.ndarray:
        """(M', K') -> (S, M', SUB): the rows cut into sub-blocks, zero-padded."""
        out = np.zeros((count, a_rows.shape[0], _EXCESS_SUB_BLOCK), np.float32)
        for s in range(count):
            piece = a_rows[:, s * _EXCESS_SUB_BLOCK:(s + 1) * _EXCESS_SUB_BLOCK]
            out[s, :, :piece.shape[1]] = piece
        return out

    @staticmethod
    def _a32(a_rows: np.ndarray, k0: int, k1: int) -> np.ndarray:
        """Rows of the activations over block [k0, k1) as int32, zero-padded to even length."""
        out = np.zeros(a_rows.shape[:-1] + (k1 - k0,), np.int32)
        part = a_rows[..., k0:k1]
        out[..., :part.shape[-1]] = part
        return out



def _acc16_output_excess(a_rows: np.ndarray, b_cols: np.ndarray, saturate_sum: bool
                        ) -> np.ndarray:
    """model - exact of one K-block of the acc16 model for P chosen outputs: a_rows (P, KB)
    holds each output's int32 activation row, b_cols (P, KB) its weight column (KB even). The
    pair sums come out of one vectorized product; the saturating running sum is folded in
    log steps (`_fold_saturating_sums`), only for the outputs whose sums leave int16."""
    products = a_rows * b_cols
    pairs = products[:, 0::2] + products[:, 1::2]
    if saturate_sum:
        # outputs whose pair sums and running sums all fit int16 never saturate (model ==
        # exact): only the others are folded
        prefix = np.cumsum(pairs, axis=1, dtype=np.int32)   # |sum| <= 128 * 65280
        stays = (prefix.max(axis=1) <= INT16_MAX) & (prefix.min(axis=1) >= INT16_MIN) \
            & (pairs.max(axis=1) <= INT16_MAX) & (pairs.min(axis=1) >= INT16_MIN)
        delta = np.zeros(pairs.shape[0], np.int32)
        leaves = np.flatnonzero(~stays)
        if leaves.size:
            delta[leaves] = _fold_saturating_sums(pairs[leaves])
        return delta
    exact = pairs.sum(axis=1, dtype=np.int64)
    _sat16(pairs)
    return (pairs.sum(axis=1, dtype=np.int64) - exact).astype(np.int32)


def _fold_saturating_sums(pairs: np.ndarray) -> np.ndarray:
    """model - exact of the saturating running sum over each row of pair sums (P, n).

    acc = sat16(acc + sat16(pair)) is a composition of the maps s -> clamp(s + c, lo, hi),
    and composing two such maps gives another:
        clamp(clamp(s + c1, lo1, hi1) + c2, lo2, hi2)
          = clamp(s + c1 + c2, clamp(lo1 + c2, lo2, hi2), clamp(hi1 + c2, lo2, hi2)),
    so the maps are folded pairwise, log2(n) vectorized steps instead of a loop over n
    (exact integer arithmetic)."""
    exact = pairs.sum(axis=1, dtype=np.int64)
    shift = _sat16(pairs.copy())
    lo = np.full(pairs.shape, INT16_MIN, np.int32)
    hi = np.full(pairs.shape, INT16_MAX, np.int32)
    while shift.shape[1] > 1:
        if shift.shape[1] % 2:      # the identity map pads to an even count
            shift = np.concatenate([shift, np.zeros((shift.shape[0], 1), np.int32)], 1)
            lo = np.concatenate([lo, np.full((lo.shape[0], 1), INT16_MIN, np.int32)], 1)
            hi = np.concatenate([hi, np.full((hi.shape[0], 1), INT16_MAX, np.int32)], 1)
        c2, lo2, hi2 = shift[:, 1::2], lo[:, 1::2], hi[:, 1::2]
        new_lo = lo[:, 0::2] + c2
        np.maximum(new_lo, lo2, out=new_lo)
        np.minimum(new_lo, hi2, out=new_lo)
        new_hi = hi[:, 0::2] + c2
        np.maximum(new_hi, lo2, out=new_hi)
        np.minimum(new_hi, hi2, out=new_hi)
        shift = shift[:, 0::2] + c2
        lo, hi = new_lo, new_hi
    if not shift.shape[1]:
        return np.zeros(shift.shape[0], np.int32)
    acc16 = np.minimum(np.maximum(shift[:, 0], lo[:, 0]), hi[:, 0])     # applied to 0
    return (acc16 - exact).astype(np.int32)
