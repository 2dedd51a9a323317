"""Convolutions of nearest-neighbour upsampled maps, computed at the low resolution:
Conv(Resize(x, nearest, integer factor s)) becomes one ConvTranspose of x.

Why: detection and segmentation decoders (FPN heads such as PP-OCR det's, UNet) upsample maps
2x, 4x or 8x and convolve them, often after concatenating them with a full-resolution map. A
k x k conv on an s-times upsampled map does k^2 s^2 multiply-adds per input pixel and channel
pair; the equivalent ConvTranspose (stride s, an (s + k - 1)^2 kernel) does (s + k - 1)^2: for
3x3, 2.25x fewer at s = 2, 4x at s = 4, 5.8x at s = 8, and the upsampled tensor is never made.

The math, per spatial axis (rows shown; columns alike). The upsampled map is U[Y] = x[Y // s].
Conv output y reads U[y + i - p] for taps i < k (p = the conv's leading pad; U is zero outside,
which is x being zero outside). Input row h therefore meets output y through every tap i with
(y + i - p) // s == h, i.e. i in [k - 1 - u, k - 1 - u + s - 1] for u = y - h * s + k - 1 - p.
So y = h * s + u - (k - 1 - p): a ConvTranspose with stride s, kernel rows u in [0, s + k - 1),
leading pad k - 1 - p (trailing likewise), and kernel K[c, o, u, v] = sum of W[o, c, i, j] over
those i and j: K = R_rows . W . R_cols^T with 0/1 matrices R. Its output size s * H + p + p' -
k + 1 is the conv's. Only integer factors whose nearest index is exactly Y // s qualify; that
depends on the coordinate transformation and rounding modes and is checked exactly here.

A Conv reading a channel Concat of parts, some of them such upsampled maps, splits over the
parts (a conv is linear in its input channels): one term per part (a ConvTranspose for an
upsampled part, a Conv with that part's weight slice otherwise; the bias on the first term),
summed by Adds whose other operand the runtime adds in place as each term's residual epilogue.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from graphopt.ir import Graph, Op
from graphopt.pass_manager import Pass, PassContext, PassResult
from graphopt.passes.fusion_common import (Shapes, constant, is_float_array, is_onnx, new_const,
                                           replace_ops, sole_reader)
from graphopt.runtime.kernels.gemm import conv_pads

#: Index offset g(r) of output phase r (0 <= r < s) from Y = y // s, per coordinate mode: the
#: source index of output y = s * Y + r is Y + round(g(r)).
_OFFSETS = {
    "asymmetric": lambda r, s: Fraction(r, s),
    "half_pixel": lambda r, s: Fraction(2 * r + 1, 2 * s) - Fraction(1, 2),
    "pytorch_half_pixel": lambda r, s: Fraction(2 * r + 1, 2 * s) - Fraction(1, 2),
    "tf_half_pixel_for_nn": lambda r, s: Fraction(2 * r + 1, 2 * s),
}
#: Whether a nearest mode rounds offset g to 0.
_ROUNDS_TO_ZERO = {
    "floor": lambda g: 0 <= g < 1,
    "ceil": lambda g: -1 < g <= 0,
    "round_prefer_floor": lambda g: Fraction(-1, 2) < g <= Fraction(1, 2),
    "round_prefer_ceil": lambda g: Fraction(-1, 2) <= g < Fraction(1, 2),
}


@dataclass
class Upsample:
    """A nearest upsampling of a 4-D map by integer factors on its two spatial axes."""

    source: str      # the low-resolution input
    s_h: int
    s_w: int


def _integer(value: float) -> int | None:
    rounded = int(round(float(value)))
    return rounded if rounded >= 1 and abs(float(value) - rounded) < 1e-9 else None


def _factors(graph: Graph, op: Op, shapes: Shapes) -> tuple[int, ...] | None:
    """The op's per-axis integer scale factors (4 of them), or None."""
    if op.op_type == "Upsample":
        scales = op.attrs.get("scales") if len(op.inputs) < 2 else constant(graph, op.inputs[1])
    else:
        scales = constant(graph, op.inputs[2]) if len(op.inputs) > 2 and op.inputs[2] else None
        if graph.opset() == 10:
            scales = constant(graph, op.inputs[1])
    if scales is not None and np.size(scales):
        factors = [_integer(v) for v in np.asarray(scales).reshape(-1)]
    else:
        sizes = constant(graph, op.inputs[3]) if len(op.inputs) > 3 and op.inputs[3] else None
        shape = shapes.shape(op.inputs[0])
        if sizes is None or shape is None or not all(isinstance(d, int) and d > 0 for d in shape) \
                or op.attrs.get("keep_aspect_ratio_policy", "stretch") != "stretch":
            return None
        sizes = [int(v) for v in np.asarray(sizes).reshape(-1)]
        if len(sizes) != len(shape) or any(o % i for o, i in zip(sizes, shape)):
            return None
        factors = [o // i for o, i in zip(sizes, shape)]
    if len(factors) != 4 or any(f is None for f in factors):
        return None
    return tuple(factors)  # type: ignore[arg-type]


def as_upsample(graph: Graph, op: Op | None, shapes: Shapes) -> Upsample | None:
    """`op` as a nearest integer upsampling of the two spatial axes of a 4-D map whose source
    index is exactly y // s, else None."""
    if op is None or not is_onnx(op, "Resize", "Upsample") or len(op.outputs) != 1:
        return None
    if op.attrs.get("mode", "nearest") != "nearest" or op.attrs.get("axes") is not None:
        return None
    opset = graph.opset()
    if op.op_type == "Upsample" or opset == 10:
        coordinate, rounding = "asymmetric", "floor"
    else:
        coordinate = op.attrs.get("coordinate_transformation_mode", "half_pixel")
        rounding = op.attrs.get("nearest_mode", "round_prefer_floor")
    offset, rounds = _OFFSETS.get(coordinate), _ROUNDS_TO_ZERO.get(rounding)
    factors = _factors(graph, op, shapes)
    if offset is None or rounds is None or factors is None or factors[:2] != (1, 1) \
            or factors[2:] == (1, 1):
        return None
    if not all(rounds(offset(r, s)) for s in factors[2:] for r in range(s)):
        return None
    return Upsample(op.inputs[0], factors[2], factors[3])


@dataclass
class ConvGeometry:
    """A 2-D, stride-1, undilated, ungrouped Conv with constant float weights."""

    weight: np.ndarray          # (C_out, C_in, k_h, k_w)
    bias: np.ndarray | None
    pads: tuple[int, int, int, int]   # top, left, bottom, right


def as_plain_conv(graph: Graph, op: Op) -> ConvGeometry | None:
    """`op` as a 2-D Conv the rewrite handles (stride 1, no dilation, group 1, constant float
    weights, pads at most k - 1 so the ConvTranspose's pads stay >= 0), else None."""
    if not is_onnx(op, "Conv") or len(op.outputs) != 1 or len(op.inputs) < 2:
        return None
    weight = constant(graph, op.inputs[1])
    if not is_float_array(weight) or weight.ndim != 4:
        return None
    bias = constant(graph, op.inputs[2]) if len(op.inputs) > 2 and op.inputs[2] else None
    if len(op.inputs) > 2 and op.inputs[2] and bias is None:
        return None
    k_h, k_w = weight.shape[2:]
    if int(op.attrs.get("group", 1)) != 1 or list(op.attrs.get("strides", [1, 1])) != [1, 1] \
            or list(op.attrs.get("dilations", [1, 1])) != [1, 1] \
            or list(op.attrs.get("kernel_shape", [k_h, k_w])) != [k_h, k_w]:
        return None
    given = op.attrs.get("pads")
    if given is not None and len(given) != 4:
        return None
    # At stride 1 "SAME" pads do not depend on the input size: any size resolves them.
    begin, end = conv_pads((k_h, k_w), (k_h, k_w), (1, 1), (1, 1), given,
                           op.attrs.get("auto_pad", "NOTSET"))
    pads = (int(begin[0]), int(begin[1]), int(end[0]), int(end[1]))
    if not all(0 <= p <= k - 1 for p, k in zip(pads, (k_h, k_w, k_h, k_w))):
        return None
    return ConvGeometry(weight, bias, pads)


def _sums(k: int, s: int) -> np.ndarray:
    """R (s + k - 1, k): R[u, i] = 1 where tap i of the conv meets kernel row u of the
    ConvTranspose (module docstring)."""
    u = np.arange(s + k - 1)[:, None]
    i = np.arange(k)[None, :]
    return ((i >= k - 1 - u) & (i <= k - 1 - u + s - 1)).astype(np.float64)


def transpose_kernel(weight: np.ndarray, s_h: int, s_w: int) -> np.ndarray:
    """ConvTranspose weights (C_in, C_out, s_h + k_h - 1, s_w + k_w - 1) equivalent to the conv
    `weight` (C_out, C_in, k_h, k_w) applied after nearest upsampling by (s_h, s_w)."""
    k_h, k_w = weight.shape[2:]
    kernel = np.einsum("ui,ocij,vj->couv", _sums(k_h, s_h), weight.astype(np.float64),
                       _sums(k_w, s_w))
    return np.ascontiguousarray(kernel, dtype=weight.dtype)


def pays_off(weight: np.ndarray, up: Upsample) -> bool:
    """Strictly fewer multiply-adds as a ConvTranspose (not so for 1x1 convs)."""
    k_h, k_w = weight.shape[2:]
    return (up.s_h + k_h - 1) * (up.s_w + k_w - 1) < k_h * k_w * up.s_h * up.s_w


class FuseUpsampleConv(Pass):
    """Conv(nearest integer Resize/Upsample) -> ConvTranspose, also through a channel Concat
    (module docstring)."""

    name = "fuse_upsample_conv"

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        result = PassResult()
        shapes = Shapes(graph)
        for op in list(graph.ops.values()):
            if op.id not in graph.ops:
                continue
            geometry = as_plain_conv(graph, op)
            if geometry is None:
                continue
            parts = self._parts(graph, op, geometry, shapes)
            if parts is None:
                continue
            self._rewrite(graph, op, geometry, parts, result)
        return result

    @staticmethod
    def _parts(graph: Graph, conv: Op, geometry: ConvGeometry, shapes: Shapes
               ) -> list[tuple[str, int, Upsample | None]] | None:
        """(value, input channels, its upsampling if it gets a ConvTranspose) per term, or None
        when nothing pays off."""
        x = conv.inputs[0]
        producer = graph.producer_op(x)
        up = as_upsample(graph, producer, shapes)
        if up is not None:
            if not pays_off(geometry.weight, up):
                return None
            return [(x, geometry.weight.shape[1], up)]
        if producer is None or not is_onnx(producer, "Concat") \
                or sole_reader(graph, x) is not conv or graph.is_output(x):
            return None
        rank = shapes.rank(x)
        axis = int(producer.attrs.get("axis", 0))
        if rank != 4 or axis not in (1, -3):
            return None
        parts = []
        for name in producer.inputs:
            shape = shapes.shape(name)
            if not name or shape is None or len(shape) != 4 or not isinstance(shape[1], int):
                return None
            part_up = as_upsample(graph, graph.producer_op(name), shapes)
            if part_up is not None and not pays_off(geometry.weight, part_up):
                part_up = None
            parts.append((name, shape[1], part_up))
        if sum(c for _, c, _ in parts) != geometry.weight.shape[1] \
                or not any(u is not None for _, _, u in parts):
            return None
        return parts

    @staticmethod
    def _rewrite(graph: Graph, conv: Op, geometry: ConvGeometry,
                 parts: list[tuple[str, int, Upsample | None]], result: PassResult) -> None:
        weight, (top, left, bottom, right) = geometry.weight, geometry.pads
        k_h, k_w = weight.shape[2:]
        out = conv.outputs[0]
        out_value = graph.values[out]
        hint = conv.name or "conv"
        terms: list[str] = []
        start = 0
        for index, (name, channels, up) in enumerate(parts):
            w_part = weight[:, start:start + channels]
            start += channels
            bias = [new_const(graph, geometry.bias, f"{hint}_bias").name] \
                if index == 0 and geometry.bias is not None else []
            if up is None:
                w_name = new_const(graph, w_part, f"{hint}_w").name
                term = graph.add_op("Conv", [name, w_name, *bias], 1, dict(conv.attrs),
                                    name=f"{hint}_part{index}")
            else:
                kernel = transpose_kernel(w_part, up.s_h, up.s_w)
                attrs = {"strides": [up.s_h, up.s_w], "kernel_shape": list(kernel.shape[2:]),
                         "pads": [k_h - 1 - top, k_w - 1 - left, k_h - 1 - bottom, k_w - 1 - right]}
                term = graph.add_op("ConvTranspose",
                                    [up.source, new_const(graph, kernel, f"{hint}_up").name,
                                     *bias], 1, attrs, name=f"{hint}_up{index}")
                result.count("upsampled_convs_transposed")
            term_value = graph.values[term.outputs[0]]
            term_value.dtype, term_value.shape = out_value.dtype, out_value.shape
            terms.append(term.outputs[0])
        if len(parts) > 1:
            result.count("concat_convs_split")
        total = terms[0]
        for term in terms[1:]:   # term first: the runtime adds the running sum in place
            add = graph.add_op("Add", [term, total], 1, name=f"{hint}_sum")
            value = graph.values[add.outputs[0]]
            value.dtype, value.shape = out_value.dtype, out_value.shape
            total = add.outputs[0]
        replace_ops(graph, [conv], out, total)
