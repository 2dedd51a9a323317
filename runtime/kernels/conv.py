"""The convolution engine shared by Conv, ConvInteger and QLinearConv.

One `ConvPlan` per op: attributes are parsed once, weights are laid out once (when they are
constant), and each call picks the cheapest exact formulation for the input's shape:

- pointwise (1x1, no padding): a plain GEMM (C_out, C_in) @ (C_in, H*W) on the input itself,
  no im2col; strides subsample the input first;
- depthwise (one input channel per group, 2-D): per cache-sized block of channels x output
  rows, an im2col of the block and one batched GEMV (taps -> pixels per channel), on the
  "flat" layout (`FlatLayout`: each channel's padded plane one contiguous row, so every tap
  is a contiguous slice; strides handled by splitting the input into its stride phases); at
  stride 1 with "same" width, on unpadded rows written straight into the output
  (`_depthwise_rows`);
- dense stride-1 3x3 2-D convs with enough channels and pixels: Winograd F(2x2, 3x3)
  (winograd.py), 16 GEMMs on transformed tiles with 2.25x fewer multiply-adds than im2col;
- other stride-1 2-D convs with few output channels on wide maps: one GEMM per kernel tap on
  the flat layout read in place (shifted GEMM), accumulated; no im2col;
- everything else: im2col (one strided copy per call, `gemm.im2col`) and one BLAS GEMM per
  (batch, group) via np.matmul's batching, tiled over output rows when the column matrix would
  not fit in cache.

Integer convolutions run the same code on float32 arrays holding integers with an exact
matmul (`gemm.matmul_exact_f32`); the depthwise path is used for them only when the sum over
the taps provably stays below 2**24.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from graphopt.errors import GraphoptError
from graphopt.runtime.kernels.gemm import (
    conv_out_spatial, conv_pads, im2col, matmul_exact_f32, pad_spatial, scratch, strided_view,
)
from graphopt.runtime.kernels.winograd import use_winograd, winograd_3x3, winograd_weights

#: im2col matrices above this many bytes are built and multiplied in tiles of output rows.
IM2COL_TILE_BYTES = 1 << 21
#: Elements of the im2col block of the depthwise path (2 MB of float32). Larger than L2, but
#: measured ~9% faster than 1 MB blocks: per-block numpy call overhead outweighs locality.
DEPTHWISE_BLOCK = 1 << 19
#: Shifted-GEMM path: at most this many output channels, accumulator tiles of this many elements.
SHIFTED_GEMM_MAX_COUT = 48
SHIFTED_GEMM_TILE = 1 << 16

#: A matmul into a preallocated output: mm(a, b, out).
MatMul = Callable[[np.ndarray, np.ndarray, np.ndarray], None]


def float_matmul(a: np.ndarray, b: np.ndarray, out: np.ndarray) -> None:
    np.matmul(a, b, out=out)


def exact_matmul(bound: int) -> MatMul:
    """An exact integer matmul on float32 arrays holding integers with |a*b| <= bound."""
    def mm(a: np.ndarray, b: np.ndarray, out: np.ndarray) -> None:
        out[...] = matmul_exact_f32(a, b, bound)
    return mm


@dataclass(frozen=True)
class ConvAttrs:
    """Conv attributes as parsed from the op (kernel_shape may come from the weights)."""

    kernel: tuple[int, ...] | None
    strides: tuple[int, ...] | None
    dilations: tuple[int, ...] | None
    pads: tuple[int, ...] | None
    auto_pad: str
    groups: int

    @classmethod
    def from_op(cls, attr: Callable) -> ConvAttrs:
        def ints(name):
            value = attr(name)
            return tuple(int(v) for v in value) if value is not None else None
        auto_pad = attr("auto_pad", "NOTSET")
        if isinstance(auto_pad, bytes):
            auto_pad = auto_pad.decode()
        return cls(ints("kernel_shape"), ints("strides"), ints("dilations"), ints("pads"),
                   auto_pad, int(attr("group", 1)))


@dataclass(frozen=True)
class ConvGeometry:
    """Everything shape-dependent about one call, computed once per input shape."""

    batch: int
    in_channels: int
    in_spatial: tuple[int, ...]
    kernel: tuple[int, ...]
    strides: tuple[int, ...]
    dilations: tuple[int, ...]
    begin: tuple[int, ...]
    end: tuple[int, ...]
    out_spatial: tuple[int, ...]

    @property
    def pointwise(self) -> bool:
        return all(k == 1 for k in self.kernel) and not any(self.begin) and not any(self.end)


def geometry(attrs: ConvAttrs, x_shape: tuple[int, ...], w_shape: tuple[int, ...]) -> ConvGeometry:
    spatial = tuple(x_shape[2:])
    d = len(spatial)
    kernel = attrs.kernel or tuple(w_shape[2:])
    strides = attrs.strides or (1,) * d
    dilations = attrs.dilations or (1,) * d
    if len(kernel) != d or len(w_shape) != d + 2:
        raise GraphoptError(f"Conv: input rank {len(x_shape)} does not match weights {w_shape}")
    begin, end = conv_pads(spatial, kernel, strides, dilations, attrs.pads, attrs.auto_pad)
    out = conv_out_spatial(spatial, kernel, strides, dilations, begin, end)
    return ConvGeometry(x_shape[0], x_shape[1], spatial, tuple(kernel), tuple(strides),
                        tuple(dilations), tuple(begin), tuple(end), tuple(out))


@dataclass
class ConvWeights:
    """Weights (C_out, C_in/groups, *kernel) laid out for the GEMM: (groups, C_out/g, K), and
    the bias (C_out,) the convolution adds, if any (float convolutions only)."""

    w: np.ndarray
    mat: np.ndarray
    groups: int
    bias: np.ndarray | None = None
    _per_tap: np.ndarray | None = None
    _mat_biased: np.ndarray | None = None
    _winograd: np.ndarray | None = None
    _unbiased: ConvWeights | None = None
    #: Every output channel has the same filter (groups == 1), see `conv`.
    uniform: bool = False

    @property
    def winograd(self) -> np.ndarray:
        """Winograd F(2x2, 3x3) transform of 3x3 weights (with the bias column), computed once."""
        if self._winograd is None:
            self._winograd = winograd_weights(self.w, self.bias, self.w.dtype)
        return self._winograd

    @property
    def mat_biased(self) -> np.ndarray:
        """(groups, C_out/g, K + 1): the GEMM operand with the bias as one more column, for
        column matrices that carry a row of ones (the bias then costs no pass of its own)."""
        if self._mat_biased is None:
            g, m, _ = self.mat.shape
            self._mat_biased = np.concatenate(
                [self.mat, self.bias.reshape(g, m, 1).astype(self.mat.dtype)], axis=2)
        return self._mat_biased

    @property
    def per_tap(self) -> np.ndarray:
        """(taps, C_out, C_in) for groups == 1: one GEMM operand per kernel offset."""
        if self._per_tap is None:
            c_out, c_in = self.w.shape[:2]
            self._per_tap = np.ascontiguousarray(
                self.w.reshape(c_out, c_in, -1).transpose(2, 0, 1))
        return self._per_tap

    @classmethod
    def prepare(cls, w: np.ndarray, groups: int, dtype=np.float32,
                bias: np.ndarray | None = None) -> ConvWeights:
        w = np.ascontiguousarray(w, dtype=dtype)
        c_out = w.shape[0]
        if c_out % groups:
            raise GraphoptError(f"Conv: {c_out} output channels are not divisible by "
                                f"group={groups}")
        if bias is not None:
            bias = np.ascontiguousarray(bias, dtype=dtype).reshape(-1)
            if bias.size != c_out:
                raise GraphoptError(f"Conv: bias has {bias.size} values for {c_out} output "
                                    "channels")
        rows = w.reshape(c_out, -1)
        uniform = groups == 1 and c_out > 1 and bool((rows == rows[:1]).all())
        return cls(w, w.reshape(groups, c_out // groups, -1), groups, bias, uniform=uniform)

    @property
    def without_bias(self) -> ConvWeights:
        """The same weights without the bias (shares the arrays)."""
        if self.bias is None:
            return self
        if self._unbiased is None:
            self._unbiased = ConvWeights(self.w, self.mat, self.groups, None,
                                         _per_tap=self._per_tap, uniform=self.uniform)
        return self._unbiased

    @property
    def out_channels(self) -> int:
        return self.w.shape[0]

    @property
    def depthwise(self) -> bool:
        return self.w.shape[1] == 1 and self.groups > 1


def conv(x: np.ndarray, weights: ConvWeights, geom: ConvGeometry, *, mm: MatMul = float_matmul,
         out_dtype=np.float32, taps_exact: bool = True, out: np.ndarray | None = None,
         integer: bool = False) -> np.ndarray:
    """Convolution of x (N, C, *S) float32, plus `weights.bias` if it has one; returns
    (N, C_out, *O) of out_dtype, written into `out` when it is given with that shape and dtype
    (any layout; the paths below see C-contiguous arrays only: a non-contiguous `out` is filled
    one batch item at a time when each item is contiguous, else through a copy).

    taps_exact: whether summing kernel taps in float32 is exact (always true for float data;
    integer callers pass whether taps * max|x*w| < 2**24).

    integer: x and the weights hold integers and the result must be exact: Winograd is off (its
    transforms carry halves and quarters, and float32 rounds their sums once they pass 2**22).

    The bias never costs a pass of its own where it can ride along (adding a (C, 1) column
    with numpy broadcasting runs at ~4.6 elements/ns, a third of a plain add): the im2col
    GEMM takes it as one more column of the weights against a row of ones in the column
    matrix; the depthwise and shifted-GEMM paths add it while they copy their tiles into the
    output; the pointwise GEMM gets the row of ones in a copy of its input when that copy is
    cheaper than the broadcast add (see `_pointwise`).
    """
    n = geom.batch
    groups = weights.groups
    c_in = geom.in_channels
    if c_in != weights.w.shape[1] * groups:
        raise GraphoptError(f"Conv: input has {c_in} channels, weights expect "
                            f"{weights.w.shape[1] * groups} (group={groups})")
    shape = (n, weights.out_channels) + geom.out_spatial
    if out is None or out.shape != shape or out.dtype != out_dtype:
        out = np.empty(shape, dtype=out_dtype)
    elif not out.flags.c_contiguous:
        return _conv_into_view(x, weights, geom, mm, out_dtype, taps_exact, out, integer)
    if out.size == 0:
        return out
    if weights.bias is not None and mm is not float_matmul:
        raise GraphoptError("Conv: a bias is only added by the float convolution")
    if weights.uniform and mm is float_matmul:
        # All filters equal (constant-filled test weights, e.g. onnx's light models): compute
        # the full convolution as usual (no shortcut: the work and its cost stay those of the
        # model), then give every channel channel 0's value plus its own bias. A GEMM's rows
        # may round differently (edge micro-kernels, thread splits), and light_squeezenet ends
        # in exact ties between 1e10-sized logits that any such ulp turns into another softmax.
        _dispatch(x, weights.without_bias, geom, mm, taps_exact, out, integer)
        bias = 0.0 if weights.bias is None else _channel_bias(weights, out.ndim - 1)
        np.add(out[:, :1].copy(), bias, out=out)      # a copy: no overlap for numpy to buffer
        return out
    _dispatch(x, weights, geom, mm, taps_exact, out, integer)
    return out


def _conv_into_view(x, weights: ConvWeights, geom: ConvGeometry, mm: MatMul, out_dtype,
                    taps_exact: bool, out: np.ndarray, integer: bool) -> np.ndarray:
    """`conv` into a non-contiguous `out` (a Concat slice at batch > 1): per batch item when
    each `out[b]` is contiguous (the paths reshape `out`, which must stay a view), else into a
    fresh array that is then copied."""
    n = geom.batch
    if n > 1 and out[0].flags.c_contiguous:
        item = dataclasses.replace(geom, batch=1)
        for b in range(n):
            conv(x[b:b + 1], weights, item, mm=mm, out_dtype=out_dtype, taps_exact=taps_exact,
                 out=out[b:b + 1], integer=integer)
        return out
    np.copyto(out, conv(x, weights, geom, mm=mm, out_dtype=out_dtype, taps_exact=taps_exact,
                        integer=integer))
    return out


def _dispatch(x, weights: ConvWeights, geom: ConvGeometry, mm: MatMul, taps_exact: bool,
              out: np.ndarray, integer: bool = False) -> None:
    """out <- the convolution by the cheapest formulation for this shape (module doc)."""
    if geom.pointwise:
        _pointwise(x, weights, geom, mm, out)
    elif weights.depthwise and len(geom.kernel) == 2 and taps_exact:
        if _same_width(geom):
            _depthwise_rows(x, weights, geom, out)
        else:
            _depthwise_2d(x, weights, geom, out)
    elif mm is float_matmul and not integer and _use_winograd(weights, geom):
        winograd_3x3(x, weights.winograd, geom.begin, geom.end, out)
    elif mm is float_matmul and _use_shifted_gemm(weights, geom):
        _shifted_gemm_2d(x, weights, geom, out)
    else:
        _im2col_gemm(x, weights, geom, mm, out)


def _channel_bias(weights: ConvWeights, ndim: int) -> np.ndarray:
    """The bias shaped to broadcast against (..., C_out, *spatial) with `ndim` axes from C on."""
    return weights.bias.reshape((-1,) + (1,) * (ndim - 1))


def _use_winograd(weights: ConvWeights, geom: ConvGeometry) -> bool:
    """Dense stride-1 3x3 2-D convs of enough channels and pixels (winograd.py)."""
    return (weights.groups == 1 and geom.kernel == (3, 3) and geom.strides == (1, 1)
            and geom.dilations == (1, 1)
            and use_winograd(geom.in_channels, weights.out_channels, geom.out_spatial))


def _use_shifted_gemm(weights: ConvWeights, geom: ConvGeometry) -> bool:
    """Few output channels on a wide map, stride 1: the im2col copy (K x pixels) would cost
    more than the GEMM it feeds, so multiply the input in place once per kernel tap."""
    return (weights.groups == 1 and len(geom.kernel) == 2 and geom.strides == (1, 1)
            and weights.out_channels <= SHIFTED_GEMM_MAX_COUT and geom.out_spatial[1] >= 16)


#: Pointwise bias: copy the input with a row of ones when K + 1 <= this * C_out per group (a
#: contiguous copy runs ~2.2x faster per element than a broadcast add of the bias).
POINTWISE_ONES_ROW_RATIO = 2.2


def _pointwise(x, weights: ConvWeights, geom: ConvGeometry, mm: MatMul, out: np.ndarray) -> None:
    """1x1 convolution as one GEMM (per batch and group) on the input itself.

    With a bias: either the input is copied into a scratch matrix with one more row of ones
    (the bias is then one more weight column, free in the GEMM) or the bias is added to the
    output afterwards, whichever moves fewer elements: the copy costs K elements per pixel,
    the broadcast add C_out at ~2.2x the cost each. A strided 1x1 conv copies its subsampled
    input anyway, so it always takes the row of ones.
    """
    strided = any(s != 1 for s in geom.strides)
    if strided:
        x = x[(slice(None), slice(None)) + tuple(slice(None, None, s) for s in geom.strides)]
    n, groups = geom.batch, weights.groups
    pixels = math.prod(geom.out_spatial)
    target = out.reshape(n, groups, -1, pixels)
    k = weights.mat.shape[2]
    bias = weights.bias
    if bias is not None and (strided or k + 1 <= POINTWISE_ONES_ROW_RATIO * weights.mat.shape[1]):
        xa = scratch("pointwise.ones_row", n * groups * (k + 1) * pixels, x.dtype)
        xa = xa.reshape(n, groups, k + 1, pixels)
        split = (n, groups, k) + geom.out_spatial      # axis splits only: views, never copies
        np.copyto(xa[:, :, :k].reshape(split), x.reshape(split))
        xa[:, :, k] = 1.0
        if n == 1 and groups == 1:
            mm(weights.mat_biased[0], xa[0, 0], target[0, 0])
        else:
            mm(weights.mat_biased, xa, target)
        return
    x = np.ascontiguousarray(x).reshape(n, groups, -1, pixels)
    if n == 1 and groups == 1:
        mm(weights.mat[0], x[0, 0], target[0, 0])
    else:
        mm(weights.mat, x, target)
    if bias is not None:
        out += _channel_bias(weights, out.ndim - 1)


def _im2col_gemm(x, weights: ConvWeights, geom: ConvGeometry, mm: MatMul, out: np.ndarray) -> None:
    """im2col + one GEMM per (batch, group); a bias rides along as one more weight column
    against a row of ones under the column matrix (`ConvWeights.mat_biased`)."""
    n, groups = geom.batch, weights.groups
    xp = pad_spatial(x, geom.begin, geom.end, work="im2col.padded")
    k = weights.mat.shape[2]
    biased = weights.bias is not None
    mat = weights.mat_biased if biased else weights.mat
    kb = k + 1 if biased else k                  # rows of the column matrix
    pixels = math.prod(geom.out_spatial)
    row_pixels = pixels // geom.out_spatial[0]
    col_bytes = kb * groups * pixels * xp.itemsize
    if col_bytes * n <= IM2COL_TILE_BYTES or geom.out_spatial[0] == 1:
        cols = scratch("im2col.cols", n * groups * kb * pixels, xp.dtype)
        cols = cols.reshape(n, groups, kb, pixels)
        im2col(xp, geom.kernel, geom.strides, geom.dilations, geom.out_spatial, groups,
               out=cols[:, :, :k])
        if biased:
            cols[:, :, k] = 1.0
        mm(mat, cols, out.reshape(n, groups, -1, pixels))
        return
    # Tiles of output rows: the column matrix of a tile stays in cache and the GEMM writes
    # straight into the rows of the output.
    rows = max(1, IM2COL_TILE_BYTES // (kb * groups * row_pixels * xp.itemsize))
    buf = scratch("im2col.cols", groups * kb * rows * row_pixels, xp.dtype)
    stride0 = geom.strides[0]
    for b in range(n):
        out_b = out[b].reshape((groups, -1) + geom.out_spatial)
        for r0 in range(0, geom.out_spatial[0], rows):
            r1 = min(geom.out_spatial[0], r0 + rows)
            span = (r1 - r0 - 1) * stride0 + (geom.kernel[0] - 1) * geom.dilations[0] + 1
            xs = xp[b:b + 1, :, r0 * stride0:r0 * stride0 + span]
            tile_out = (r1 - r0,) + geom.out_spatial[1:]
            cols = buf[:groups * kb * (r1 - r0) * row_pixels].reshape(
                1, groups, kb, (r1 - r0) * row_pixels)
            im2col(xs, geom.kernel, geom.strides, geom.dilations, tile_out, groups,
                   out=cols[:, :, :k])
            if biased:
                cols[:, :, k] = 1.0
            target = out_b[:, :, r0:r1].reshape(groups, -1, (r1 - r0) * row_pixels)
            mm(mat, cols[0], target)


@dataclass
class FlatLayout:
    """A 2-D conv input laid out "flat": each (image, channel) padded plane is one contiguous
    row of a phase image, so every kernel tap reads a contiguous slice.

    Strides become stride 1 by splitting the padded input into its s_h x s_w phase images
    (polyphase): tap (i, j) reads phase (i*d_h % s_h) * s_w + (j*d_w % s_w) starting at flat
    offset (i*d_h // s_h) * Wq + (j*d_w // s_w). Output pixel (oh, ow) sits at oh * Wq + ow in
    every tap's slice; columns ow >= OW are scratch and get cropped.
    """

    phases: np.ndarray                 # (s_h * s_w, N * C, plane), a scratch buffer
    taps: list[tuple[int, int]]        # (phase, offset) per kernel tap, row-major (i, j)
    wq: int                            # width of a phase image row
    kernel: tuple[int, int]
    dilations: tuple[int, int]

    @classmethod
    def build(cls, x: np.ndarray, geom: ConvGeometry, dtype) -> FlatLayout:
        n, c = geom.batch, geom.in_channels
        kh, kw = geom.kernel
        sh, sw = geom.strides
        dh, dw = geom.dilations
        (pt, pl), (pb, pr) = geom.begin, geom.end
        h, w = geom.in_spatial
        hp, wp = h + pt + pb, w + pl + pr
        hq, wq = -(-hp // sh), -(-wp // sw)
        # Slack after the last phase row: the scratch columns of the last output row read it.
        slack = wq * ((kh - 1) * dh // sh + 1) + (kw - 1) * dw // sw + 1
        rows = n * c
        plane = hq * wq + slack
        phases = scratch("flat.phases", sh * sw * rows * plane, dtype)
        phases = phases.reshape(sh * sw, rows, plane)
        xr = x.reshape(rows, h, w)
        for a in range(sh):
            h0 = (a - pt) % sh              # first input row landing in phase row a
            u0 = (h0 + pt) // sh
            for b in range(sw):
                w0 = (b - pl) % sw
                v0 = (w0 + pl) // sw
                src = xr[:, h0::sh, w0::sw]
                phase = phases[a * sw + b]
                dst = phase[:, :hq * wq].reshape(rows, hq, wq)
                u1, v1 = u0 + src.shape[1], v0 + src.shape[2]
                dst[:, u0:u1, v0:v1] = src
                # Zero only what the copy left (padding rows and columns, the slack): a fill
                # of the whole buffer first would cost one more pass over the input.
                dst[:, :u0] = 0
                dst[:, u1:] = 0
                dst[:, u0:u1, :v0] = 0
                dst[:, u0:u1, v1:] = 0
                phase[:, hq * wq:] = 0
        taps = [((i * dh % sh) * sw + j * dw % sw, (i * dh // sh) * wq + j * dw // sw)
                for i in range(kh) for j in range(kw)]
        return cls(phases, taps, wq, (kh, kw), (dh, dw))

    def windows(self) -> np.ndarray | None:
        """For a single phase (stride 1): a read-only view (rows, kh, kw, positions) of every
        tap's slice, so one copy gathers a whole im2col block. None for several phases."""
        if self.phases.shape[0] != 1:
            return None
        base = self.phases[0]
        item = base.itemsize
        kh, kw = self.kernel
        dh, dw = self.dilations
        last = self.taps[-1][1]
        return strided_view(base, (base.shape[0], kh, kw, base.shape[1] - last),
                            (base.strides[0], dh * self.wq * item, dw * item, item))

    def gather(self, cols: np.ndarray, c0: int, c1: int, q0: int, span: int,
               windows: np.ndarray | None) -> None:
        """cols (c1-c0, taps, span) <- every tap's slice [q0, q0+span) of rows c0..c1."""
        if windows is not None:
            np.copyto(cols.reshape(c1 - c0, windows.shape[1], windows.shape[2], span),
                      windows[c0:c1, :, :, q0:q0 + span])
        else:
            for t, (phase, off) in enumerate(self.taps):
                cols[:, t, :] = self.phases[phase, c0:c1, q0 + off:q0 + off + span]


def _shifted_gemm_2d(x, weights: ConvWeights, geom: ConvGeometry, out: np.ndarray) -> None:
    """Stride-1 conv as a sum over kernel taps of W_tap (C_out x C_in) @ X shifted.

    On the flat layout (`FlatLayout`: each channel's padded image one contiguous row), the
    input seen by tap (i, j) is a contiguous slice of every row: a strided matrix that BLAS
    reads in place, so there is no im2col at all. Tiles of output rows keep the accumulator
    in cache.
    """
    n, c = geom.batch, geom.in_channels
    oh, ow = geom.out_spatial
    c_out = weights.out_channels
    dtype = out.dtype
    flat = FlatLayout.build(x, geom, dtype)
    wq = flat.wq
    planes = flat.phases[0].reshape(n, c, -1)
    per_tap = weights.per_tap
    bias = None if weights.bias is None else _channel_bias(weights, 3)
    rows = max(1, min(oh, SHIFTED_GEMM_TILE // (c_out * wq)))
    acc_buf = scratch("shifted_gemm.acc", c_out * rows * wq, dtype)
    tmp_buf = scratch("shifted_gemm.tmp", c_out * rows * wq, dtype)
    for b in range(n):
        src = planes[b]
        for r0 in range(0, oh, rows):
            r1 = min(oh, r0 + rows)
            span = (r1 - r0) * wq
            q0 = r0 * wq
            acc = acc_buf[:c_out * span].reshape(c_out, span)
            tmp = tmp_buf[:c_out * span].reshape(c_out, span)
            for t, (_, off) in enumerate(flat.taps):
                target = acc if t == 0 else tmp
                np.matmul(per_tap[t], src[:, q0 + off:q0 + off + span], out=target)
                if t:
                    acc += tmp
            tile = acc.reshape(c_out, r1 - r0, wq)[:, :, :ow]
            if bias is None:
                out[b, :, r0:r1] = tile
            else:                   # crop and bias in one pass
                np.add(tile, bias, out=out[b, :, r0:r1])


def _depthwise_2d(x, weights: ConvWeights, geom: ConvGeometry, out: np.ndarray) -> None:
    """Depthwise 2-D conv: per cache-sized block of channels x output rows of the flat layout,
    an im2col of the block (kernel taps x positions per channel) and one batched GEMV
    (channel multiplier x taps) @ (taps x positions) for all the block's channels."""
    n, c = geom.batch, geom.in_channels
    kh, kw = geom.kernel
    oh, ow = geom.out_spatial
    kk = kh * kw
    rows_in = n * c
    dtype = out.dtype
    flat = FlatLayout.build(x, geom, dtype)
    wq = flat.wq
    mult = weights.w.shape[0] // c
    wt = weights.w.reshape(c, mult, kk)
    if n > 1:
        wt = np.broadcast_to(wt[None], (n, c, mult, kk)).reshape(rows_in, mult, kk)
    out_r = out.reshape(rows_in, mult, oh, ow)
    bias = None
    if weights.bias is not None:
        bias = weights.bias.reshape(c, mult, 1, 1)
        if n > 1:
            bias = np.broadcast_to(bias[None], (n, c, mult, 1, 1)).reshape(rows_in, mult, 1, 1)

    # Blocks of channels x output rows whose im2col holds about DEPTHWISE_BLOCK elements.
    per_channel = kk * oh * wq
    if per_channel <= DEPTHWISE_BLOCK:
        rows_per, ch_per = oh, min(rows_in, DEPTHWISE_BLOCK // per_channel)
    else:
        rows_per, ch_per = max(1, DEPTHWISE_BLOCK // (kk * wq)), 1
    length = rows_per * wq
    cols_buf = scratch("depthwise.cols", ch_per * kk * length, dtype)
    res_buf = scratch("depthwise.res", ch_per * mult * length, dtype)
    windows = flat.windows()
    for c0 in range(0, rows_in, ch_per):
        c1 = min(rows_in, c0 + ch_per)
        nc = c1 - c0
        w_blk = wt[c0:c1]
        for r0 in range(0, oh, rows_per):
            r1 = min(oh, r0 + rows_per)
            span = (r1 - r0) * wq
            cols = cols_buf[:nc * kk * span].reshape(nc, kk, span)
            flat.gather(cols, c0, c1, r0 * wq, span, windows)
            res = res_buf[:nc * mult * span].reshape(nc, mult, span)
            np.matmul(w_blk, cols, out=res)
            tile = res.reshape(nc, mult, r1 - r0, wq)[..., :ow]
            if bias is None:
                out_r[c0:c1, :, r0:r1] = tile
            else:                   # crop and bias in one pass
                np.add(tile, bias[c0:c1], out=out_r[c0:c1, :, r0:r1])


def _same_width(geom: ConvGeometry) -> bool:
    """Stride 1, no dilation, kernel at most 3 wide and output rows as wide as the input (pads
    left + right = kernel width - 1): the depthwise conv then runs on unpadded rows
    (`_depthwise_rows`), measured 0.78-0.94x the flat layout's time on the shufflenet, rec and
    det 3x3 shapes. Wider kernels need more zeroed columns (short strided writes) and gained
    nothing (0.97-1.09x on the 5x5 shapes)."""
    return (geom.strides == (1, 1) and geom.dilations == (1, 1) and geom.kernel[1] <= 3
            and geom.begin[1] + geom.end[1] == geom.kernel[1] - 1)


def _depthwise_rows(x, weights: ConvWeights, geom: ConvGeometry, out: np.ndarray) -> None:
    """Depthwise 2-D conv, stride 1, output as wide as the input: the im2col + batched GEMV of
    `_depthwise_2d`, on planes without padding columns.

    Each (image, channel) plane is its input rows, unpadded, between zero rows for the
    vertical padding (plus pad_left zeros in front and pad_right behind): building it is one
    long copy per channel, not one short copy per row. Kernel tap (i, j) of output position
    q = oh * W + ow then reads plane element q + i * W + j, so every tap's slice is contiguous
    and the output comes out in its final layout: the GEMV writes straight into `out` (no
    cropped copy). The horizontal padding is restored in the column matrix: a tap j reading
    left of column 0 or right of column W - 1 got a neighbouring row's element, and those
    entries (a few columns per tap) are set to zero. The bias is one more weight column
    against a row of ones.
    """
    n, c = geom.batch, geom.in_channels
    kh, kw = geom.kernel
    oh, ow = geom.out_spatial                      # ow == W
    h, w = geom.in_spatial
    (pt, pl), (pb, pr) = geom.begin, geom.end
    kk = kh * kw
    rows_in = n * c
    dtype = out.dtype
    hp = h + pt + pb
    plane = pl + hp * w + pr
    planes = scratch("depthwise.rows", rows_in * plane, dtype).reshape(rows_in, plane)
    planes[:, :pl + pt * w] = 0
    planes[:, pl + (pt + h) * w:] = 0
    np.copyto(planes[:, pl + pt * w:pl + (pt + h) * w], x.reshape(rows_in, h * w))
    mult = weights.w.shape[0] // c
    biased = weights.bias is not None
    kb = kk + 1 if biased else kk
    wt = weights.w.reshape(c, mult, kk)
    if biased:
        wt = np.concatenate([wt, weights.bias.reshape(c, mult, 1).astype(dtype)], axis=2)
    if n > 1:
        wt = np.broadcast_to(wt[None], (n, c, mult, kb)).reshape(rows_in, mult, kb)
    out_r = out.reshape(rows_in, mult, oh * ow)
    item = planes.itemsize
    span_all = oh * ow
    windows = strided_view(planes, (rows_in, kh, kw, span_all),
                           (planes.strides[0], w * item, item, item))
    # Output columns whose tap j falls outside the row: [0, pl - j) and [w + pl - j, w).
    fixes = [(j, max(0, pl - j), min(w, w + pl - j)) for j in range(kw)]
    fixes = [(j, a, b) for j, a, b in fixes if a > 0 or b < w]

    per_channel = kb * span_all
    if per_channel <= DEPTHWISE_BLOCK:
        rows_per, ch_per = oh, min(rows_in, DEPTHWISE_BLOCK // per_channel)
    else:
        rows_per, ch_per = max(1, DEPTHWISE_BLOCK // (kb * ow)), 1
    cols_buf = scratch("depthwise.cols", ch_per * kb * rows_per * ow, dtype)
    for c0 in range(0, rows_in, ch_per):
        c1 = min(rows_in, c0 + ch_per)
        nc = c1 - c0
        for r0 in range(0, oh, rows_per):
            r1 = min(oh, r0 + rows_per)
            span = (r1 - r0) * ow
            cols = cols_buf[:nc * kb * span].reshape(nc, kb, span)
            taps = cols[:, :kk].reshape(nc, kh, kw, span)
            np.copyto(taps, windows[c0:c1, :, :, r0 * ow:r0 * ow + span])
            grid = taps.reshape(nc, kh, kw, r1 - r0, ow)
            for j, a, b in fixes:
                if a > 0:
                    grid[:, :, j, :, :a] = 0
                if b < w:
                    grid[:, :, j, :, b:] = 0
            if biased:
                cols[:, kk] = 1.0
            np.matmul(wt[c0:c1], cols, out=out_r[c0:c1, :, r0 * ow:r1 * ow])


class ConvPlan:
    """Conv prepared once per op: attributes, weights and bias (when constant), geometry per
    input shape.

    scale / shift fold the affine prefix of a fused activation into the weights and bias
    (runtime/kernels/fused_activation.py): the convolution then computes
    scale * (w * x + b) + shift, in one GEMM, and the activation finishes on that.
    """

    def __init__(self, attrs: ConvAttrs, w_const: np.ndarray | None, dtype=np.float32,
                 b_const: np.ndarray | None = None, *, has_bias: bool = False,
                 scale: float = 1.0, shift: float = 0.0) -> None:
        self.attrs = attrs
        self.dtype = dtype
        self.scale = scale
        self.shift = shift
        bias_known = not has_bias or b_const is not None
        self.weights = self._prepare(w_const, b_const) \
            if w_const is not None and bias_known else None
        self._geoms: dict[tuple, ConvGeometry] = {}

    def _prepare(self, w: np.ndarray, b: np.ndarray | None) -> ConvWeights:
        if self.scale != 1.0:
            w = np.asarray(w, np.float64) * self.scale
        bias = None
        if b is not None or self.shift != 0.0:
            bias = np.zeros(w.shape[0]) if b is None else np.asarray(b, np.float64).reshape(-1)
            if self.scale != 1.0 or self.shift != 0.0:
                bias = bias * self.scale + self.shift
        return ConvWeights.prepare(w, self.attrs.groups, self.dtype, bias)

    def weights_for(self, w: np.ndarray, b: np.ndarray | None = None) -> ConvWeights:
        """Prepared weights (with the bias and any folded scale/shift): the constant ones, or
        prepared from this call's inputs."""
        if self.weights is not None:
            return self.weights
        return self._prepare(w, b)

    def geometry(self, x_shape: tuple[int, ...], w_shape: tuple[int, ...]) -> ConvGeometry:
        key = (x_shape, w_shape)
        geom = self._geoms.get(key)
        if geom is None:
            geom = self._geoms[key] = geometry(self.attrs, x_shape, w_shape)
        return geom
