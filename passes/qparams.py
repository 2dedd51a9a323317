"""Quantization parameters: scales and zero points for activations, weights and embedding rows.

Activations (per tensor, asymmetric uint8): a clipping range [lo, hi] is chosen from the
calibration histogram, widened to contain 0 (zero must be exact: padding and ReLU produce it),
then scale = (hi - lo) / 255 and zero_point = round(-lo / scale). Methods:

- "l2" (default): the range that minimizes the expected squared quantization error over the
  histogram: values inside cost the rounding noise scale^2 / 12, values outside cost their squared
  distance to the clipped end. A few outliers then no longer stretch the scale for everyone
  (the 2018 Facebook inference paper's choice). Searched by coordinate descent: the best upper
  end for the current lower end, then the other way round, over candidate ends on a geometric
  grid between 1% of the observed extreme and the extreme itself.
- "minmax": the observed min and max.
- "percentile": the 0.01th and 99.99th percentiles (`percentile=` changes it).
- "kl": TensorRT-style entropy calibration on |x|: the threshold whose quantized distribution is
  closest in KL divergence to the observed one.

Weights (per output channel, symmetric int8, zero point 0): per channel the clipping threshold
c = ratio * max|w| that minimizes the squared error of the channel's weights themselves (ratios
0.5..1), scale = c / qmax, values in [-qmax, qmax]: qmax = 127, or NARROW_QMAX = 64 (7 bits)
for targets whose int8 kernels sum pairs of u8*s8 products in 16 bits (see passes/quantize.py).
Embedding tables are quantized per row (symmetric, scale = max|row| / 127): rows are short, so
clipping buys little, and a >2 GB table is then one streaming pass.

Net-aware ranges (`ActivationBounds`): a tensor made by Relu starts at 0, Sigmoid lies in [0, 1],
Tanh in [-1, 1], Clip in its bounds; the chosen range is intersected with these and its lower end
snapped to the floor, so a ReLU output gets zero point 0 and all 256 levels on the positive side.
Ops that only move or select values (MaxPool, Reshape, Transpose, Flatten, Squeeze, Unsqueeze,
Identity, Concat) pass bounds through, and the tensors they connect share one set of qparams
(`shared_groups`): a Concat then needs no requantization of its inputs, and a MaxPool or Reshape
between two quantized ops keeps the producer's scale.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from graphopt.calibrate import Histogram, TensorStats
from graphopt.ir import Graph
from graphopt.passes.fusion_common import is_onnx, scalar

METHODS = ("l2", "minmax", "percentile", "kl")
UINT8_LEVELS = 256
INT8_MAX = 127
#: Largest |w_q| for which a pre-VNNI u8*s8 pair sum cannot leave int16: 2 * 255 * 64 = 32640.
NARROW_QMAX = 64

#: Ops whose output holds (a selection of) the input's values unchanged.
PASS_THROUGH = frozenset({"MaxPool", "Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze",
                          "Identity", "Concat"})
#: Fixed output ranges of activations (Clip's come from its bounds).
_ACTIVATION_RANGES = {"Relu": (0.0, math.inf), "Sigmoid": (0.0, 1.0), "Tanh": (-1.0, 1.0)}


@dataclass(frozen=True)
class QParams:
    """Per-tensor asymmetric uint8 parameters and the range they represent."""

    scale: float
    zero_point: int
    lo: float
    hi: float


def affine_qparams(lo: float, hi: float) -> QParams:
    """uint8 scale and zero point covering [lo, hi] (widened to contain 0)."""
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    if hi - lo < 1e-30:
        return QParams(1.0, 0, 0.0, 0.0)
    scale = float(np.float32((hi - lo) / (UINT8_LEVELS - 1)))
    zero_point = int(np.clip(round(-lo / scale), 0, UINT8_LEVELS - 1))
    return QParams(scale, zero_point, lo, hi)


# ---------------------------------------------------------------------------------------------
# activation ranges
# ---------------------------------------------------------------------------------------------
def choose_range(stats: TensorStats, method: str = "l2", *, floor: float = -math.inf,
                 ceil: float = math.inf, percentile: float = 99.99) -> tuple[float, float]:
    """Clipping range of a tensor by `method`, within the net-aware bounds [floor, ceil]."""
    if method not in METHODS:
        raise ValueError(f"unknown calibration method {method!r}; choose one of {METHODS}")
    hist = stats.histogram
    lo, hi = stats.min, stats.max
    if method == "l2":
        lo, hi = l2_range(hist, lo, hi)
    elif method == "percentile":
        lo, hi = percentile_range(hist, 100.0 - percentile, percentile)
    elif method == "kl":
        lo, hi = kl_range(hist, lo, hi)
    lo = max(lo, floor) if math.isfinite(floor) else lo
    hi = min(hi, ceil) if math.isfinite(ceil) else hi
    if floor == 0.0:
        lo = 0.0         # ReLU-like: zero point 0, every level on the positive side
    return lo, max(hi, lo)


def expected_error(hist: Histogram, lo: np.ndarray, hi: np.ndarray,
                   levels: int = UINT8_LEVELS) -> np.ndarray:
    """Expected squared quantization error per element for each candidate range (lo[i], hi[i]):
    scale^2/12 inside, squared distance to the clipped end outside (bin centers stand for their
    values)."""
    lo = np.asarray(lo, dtype=np.float64).reshape(-1, 1)
    hi = np.asarray(hi, dtype=np.float64).reshape(-1, 1)
    centers = hist.centers.reshape(1, -1)
    counts = hist.counts.reshape(1, -1)
    step = np.maximum(hi - lo, 1e-30) / (levels - 1)
    below = np.minimum(centers - lo, 0.0)
    above = np.maximum(centers - hi, 0.0)
    clipped = below * below + above * above
    inside = (clipped == 0.0) * (step * step / 12.0)
    total = max(hist.total, 1.0)
    return ((clipped + inside) * counts).sum(axis=1) / total


def l2_range(hist: Histogram, lo: float, hi: float, *, rounds: int = 3,
             candidates: int = 96) -> tuple[float, float]:
    """The [lo, hi] minimizing `expected_error` (see the module docstring); the range always
    contains 0, so one-sided data keeps its lower end at 0."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    full_lo, full_hi = lo, hi
    grid = np.geomspace(0.01, 1.0, candidates)
    for _ in range(rounds):
        moved = False
        if full_hi > 0:
            his = np.concatenate([full_hi * grid, [hi]])
            errors = expected_error(hist, np.full_like(his, lo), his)
            best = float(his[int(np.argmin(errors))])
            moved |= best != hi
            hi = best
        if full_lo < 0:
            los = np.concatenate([full_lo * grid, [lo]])
            errors = expected_error(hist, los, np.full_like(los, hi))
            best = float(los[int(np.argmin(errors))])
            moved |= best != lo
            lo = best
        if not moved:
            break
    return lo, hi


def percentile_range(hist: Histogram, low: float, high: float) -> tuple[float, float]:
    """Values at the `low` and `high` percentiles of the histogram (linear within a bin)."""
    cdf = np.cumsum(hist.counts)
    total = cdf[-1] if cdf.size and cdf[-1] > 0 else 1.0
    edges = hist.edges

    def at(p: float) -> float:
        target = p / 100.0 * total
        i = int(np.searchsorted(cdf, target))
        i = min(i, hist.bins - 1)
        before = cdf[i - 1] if i else 0.0
        inside = (target - before) / max(hist.counts[i], 1e-30)
        return float(edges[i] + min(max(inside, 0.0), 1.0) * hist.width)
    return at(low), at(high)


def kl_range(hist: Histogram, lo: float, hi: float, *, target_bins: int = 128,
             step: int = 16) -> tuple[float, float]:
    """Symmetric threshold on |x| minimizing KL(observed || quantized) (TensorRT's method);
    one-sided data uses all 256 levels on [0, T]."""
    one_sided = lo >= 0.0
    levels = UINT8_LEVELS if one_sided else target_bins
    absmax = max(abs(lo), abs(hi))
    if absmax <= 0.0:
        return lo, hi
    # fold the signed histogram onto |x| in `bins` bins over [0, absmax]
    bins = hist.bins
    centers, counts = hist.centers, hist.counts
    index = np.minimum((np.abs(centers) / absmax * bins).astype(np.int64), bins - 1)
    folded = np.bincount(index, weights=counts, minlength=bins)
    best_i, best_kl = bins, math.inf
    for i in range(levels, bins + 1, step):
        reference = folded[:i].copy()
        reference[-1] += folded[i:].sum()
        if reference.sum() <= 0:
            continue
        # merge the i bins into `levels` groups, spread each group's mass over its nonzero bins
        groups = np.minimum((np.arange(i) * levels) // i, levels - 1)
        nonzero = (folded[:i] > 0).astype(np.float64)
        mass = np.bincount(groups, weights=folded[:i], minlength=levels)
        support = np.bincount(groups, weights=nonzero, minlength=levels)
        expanded = np.where(nonzero > 0, mass[groups] / np.maximum(support[groups], 1.0), 0.0)
        p = reference / reference.sum()
        q_total = expanded.sum()
        if q_total <= 0:
            continue
        q = expanded / q_total
        mask = p > 0
        kl = float(np.sum(p[mask] * np.log(p[mask] / np.maximum(q[mask], 1e-12))))
        if kl < best_kl:
            best_kl, best_i = kl, i
    threshold = best_i / bins * absmax
    return (0.0 if one_sided else -threshold), threshold


# ---------------------------------------------------------------------------------------------
# net-aware bounds and shared qparams
# ---------------------------------------------------------------------------------------------
class ActivationBounds:
    """Known value ranges of tensors from the ops that make them (see the module docstring)."""

    def __init__(self, graph: Graph) -> None:
        self.graph = graph
        self._cache: dict[str, tuple[float, float] | None] = {}

    def __call__(self, name: str) -> tuple[float, float] | None:
        """(floor, ceil) of a tensor, or None when nothing is known."""
        if name in self._cache:
            return self._cache[name]
        self._cache[name] = None            # cycles cannot happen in a DAG, but be safe
        found = self._bounds(name)
        self._cache[name] = found
        return found

    def _bounds(self, name: str) -> tuple[float, float] | None:
        op = self.graph.producer_op(name) if name in self.graph.values else None
        if op is None or not is_onnx(op, *_ACTIVATION_RANGES, "Clip", *PASS_THROUGH):
            return None
        if op.op_type in _ACTIVATION_RANGES:
            return _ACTIVATION_RANGES[op.op_type]
        if op.op_type == "Clip":
            return _clip_bounds(self.graph, op)
        if op.op_type in PASS_THROUGH:
            sources = op.inputs if op.op_type == "Concat" else op.inputs[:1]
            found = [self(src) for src in sources if src]
            if not found or any(b is None for b in found):
                return None
            return min(b[0] for b in found), max(b[1] for b in found)  # type: ignore[index]
        return None


def _clip_bounds(graph: Graph, op) -> tuple[float, float]:
    if graph.opset() < 11:
        return float(op.attrs.get("min", -math.inf)), float(op.attrs.get("max", math.inf))
    lo = scalar(graph, op.inputs[1]) if len(op.inputs) > 1 and op.inputs[1] else None
    hi = scalar(graph, op.inputs[2]) if len(op.inputs) > 2 and op.inputs[2] else None
    return (-math.inf if lo is None else lo), (math.inf if hi is None else hi)


def shared_groups(graph: Graph) -> dict[str, str]:
    """Tensor -> representative name of the tensors that must share qparams: those connected by
    pass-through ops (Concat inputs and output, MaxPool/Reshape/Transpose/... in and out)."""
    parent: dict[str, str] = {}

    def find(name: str) -> str:
        root = name
        while parent.get(root, root) != root:
            root = parent[root]
        while parent.get(name, name) != root:
            parent[name], name = root, parent[name]
        return root

    def union(a: str, b: str) -> None:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)

    for op in graph.ops.values():
        if not is_onnx(op, *PASS_THROUGH):
            continue
        if not op.outputs or not op.outputs[0]:
            continue
        sources = op.inputs if op.op_type == "Concat" else op.inputs[:1]
        for src in sources:
            if src and not graph.values[src].is_const:
                union(src, op.outputs[0])
    return {name: find(name) for name in parent}


# ---------------------------------------------------------------------------------------------
# weights and embeddings
# ---------------------------------------------------------------------------------------------
#: Clipping ratios the per-channel weight search tries (fractions of max|w|).
_WEIGHT_RATIOS = np.linspace(0.5, 1.0, 26)


def weight_scales(w: np.ndarray, axis: int, method: str = "l2", qmax: int = INT8_MAX
                  ) -> np.ndarray:
    """Per-channel symmetric scales (float32 [C]) of weights `w` along `axis` for integer
    values in [-qmax, qmax]."""
    rows = np.moveaxis(np.asarray(w, dtype=np.float32), axis, 0).reshape(w.shape[axis], -1)
    absmax = np.abs(rows).max(axis=1) if rows.size else np.zeros(rows.shape[0], np.float32)
    if method != "l2" or rows.shape[1] < 2:
        best = absmax
    else:
        best = absmax.copy()
        best_err = np.full(rows.shape[0], np.inf)
        for ratio in _WEIGHT_RATIOS:
            clip = absmax * np.float32(ratio)
            scale = np.where(clip > 0, clip / qmax, 1.0).astype(np.float32)[:, None]
            q = np.clip(np.rint(rows / scale), -qmax, qmax)
            err = np.square(q * scale - rows).sum(axis=1)
            better = err < best_err
            best[better], best_err[better] = clip[better], err[better]
    scales = np.where(best > 0, best / qmax, 1.0).astype(np.float32)
    return scales


def quantize_weights(w: np.ndarray, scales: np.ndarray, axis: int, qmax: int = INT8_MAX
                     ) -> np.ndarray:
    """Symmetric int8 of `w` with per-channel `scales` along `axis` (values in [-qmax, qmax])."""
    shape = [1] * w.ndim
    shape[axis] = -1
    q = np.rint(np.asarray(w, dtype=np.float32) / scales.reshape(shape))
    return np.clip(q, -qmax, qmax).astype(np.int8)


def rowwise_int8(table: np.ndarray, chunk_bytes: int = 64 << 20) -> tuple[np.ndarray, np.ndarray]:
    """Row-wise symmetric int8 of a 2-D table: (int8 [rows, dim], float32 scales [rows]).
    Streams the table in chunks, so a memory-mapped >2 GB table is never held in RAM as floats."""
    rows, dim = table.shape
    q = np.empty((rows, dim), dtype=np.int8)
    scales = np.empty(rows, dtype=np.float32)
    step = max(1, chunk_bytes // max(1, dim * table.dtype.itemsize))
    for start in range(0, rows, step):
        block = np.asarray(table[start:start + step], dtype=np.float32)
        absmax = np.abs(block).max(axis=1) if dim else np.zeros(len(block), np.float32)
        scale = np.where(absmax > 0, absmax / INT8_MAX, 1.0).astype(np.float32)
        scales[start:start + step] = scale
        q[start:start + step] = np.clip(np.rint(block / scale[:, None]), -INT8_MAX, INT8_MAX)
    return q, scales
