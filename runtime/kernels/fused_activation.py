"""Activations a GEMM-based head kernel (Conv) applies to its own output when the session hands
it a fused epilogue (op meta `graphopt.fuse_into`, see runtime/session.py).

Why a head applies them itself rather than running the activation's kernel afterwards: an
elementwise pass in numpy costs about the same whether it is fused or not (measured: applying
it per cache-sized tile is no faster than over the whole tensor), so fusion pays only where it
removes passes. Knowing its activation at build time, a head can fold an affine prefix of the
activation into its weights and bias, which its GEMM then computes for free:

    activation   weights/bias scaled by   then, in place on the GEMM output y      passes
    Relu         1                        clamp(y, 0, inf)                            1
    Clip         1                        clamp(y, lo, hi)                            1
    HardSigmoid  alpha (bias: alpha*b+beta) clamp(y, 0, 1)                           1 (was 3)
    HardSwish    1/sqrt(6)                y * clamp(y + 3/sqrt(6), 0, sqrt(6))        3 (was 4)
    Sigmoid      -1                       1 / (1 + exp(y))                            3 (was 4)
    Tanh         1                        tanh(y)                                     1

HardSwish: x * clip(x + 3, 0, 6) / 6 = (x / sqrt(6)) * clip((x + 3) / sqrt(6), 0, sqrt(6)), and
the GEMM computes y = x / sqrt(6) directly. Results differ from the unfused op by rounding only
(a few ulps).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from graphopt.runtime.kernels.elementwise import clamp
from graphopt.runtime.kernels.registry import KernelNode

_INF = float("inf")
_SQRT6 = math.sqrt(6.0)


@dataclass(frozen=True)
class FusedActivation:
    """y_true = (y_gemm - shift) / scale before the activation; `apply` finishes it in place.

    The head computes its GEMM with weights * scale and bias * scale + shift (per output
    channel), then calls `apply(y)` on the result.
    """

    op_type: str
    scale: float = 1.0
    shift: float = 0.0
    low: float = -_INF           # Clip bounds
    high: float = _INF

    def apply(self, y: np.ndarray) -> np.ndarray:
        """Finish the activation on the head's (scaled) GEMM output, in place; returns y."""
        kind = self.op_type
        if kind in ("Relu", "Clip", "HardSigmoid"):
            return clamp(y, self.low, self.high, y)
        if kind == "HardSwish":
            gate = np.add(y, 3.0 / _SQRT6)
            clamp(gate, 0.0, _SQRT6, gate)
            return np.multiply(y, gate, out=y)
        if kind == "Sigmoid":
            np.exp(y, out=y)              # y = -x: exp(-x), inf for very negative x -> 0
            np.add(y, 1.0, out=y)
            return np.reciprocal(y, out=y)
        if kind == "Tanh":
            return np.tanh(y, out=y)
        raise AssertionError(kind)


def _bound(node: KernelNode, slot: int, default: float) -> float | None:
    """A Clip bound input as a float: `default` when omitted, None when not a constant."""
    if slot >= node.n_inputs or not node.op.inputs[slot]:
        return default
    value = node.consts[slot]
    if value is None:
        return None
    array = np.asarray(value)
    return float(array.reshape(())) if array.size == 1 else None


def fused_activation(node: KernelNode) -> FusedActivation | None:
    """The FusedActivation for an epilogue op, or None when a head cannot apply it itself (an
    op not in the table above, or Clip bounds that are not constants)."""
    op_type = node.op_type
    if node.op.domain or node.n_outputs != 1:
        return None
    if op_type == "Relu":
        return FusedActivation("Relu", low=0.0)
    if op_type == "Clip":
        if node.opset < 11:
            low = float(node.attr("min", -_INF))
            high = float(node.attr("max", _INF))
        else:
            low, high = _bound(node, 1, -_INF), _bound(node, 2, _INF)
            if low is None or high is None:
                return None
        return FusedActivation("Clip", low=low, high=high)
    if op_type == "HardSigmoid":
        alpha = float(node.attr("alpha", 0.2))
        beta = float(node.attr("beta", 0.5))
        return FusedActivation("HardSigmoid", scale=alpha, shift=beta, low=0.0, high=1.0)
    if op_type == "HardSwish":
        return FusedActivation("HardSwish", scale=1.0 / _SQRT6)
    if op_type == "Sigmoid":
        return FusedActivation("Sigmoid", scale=-1.0)
    if op_type == "Tanh":
        return FusedActivation("Tanh")
    return None
