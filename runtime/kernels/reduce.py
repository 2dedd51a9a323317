"""Reductions: Reduce* (axes as an attribute, or as an input from opset 13 for ReduceSum and 18
for the others), ArgMax/ArgMin, and NegativeLogLikelihoodLoss (a gather plus a reduction).

Empty reductions follow the spec's identities: 0 for sums and norms, 1 for products, -inf/+inf
(or the integer extremes) for max/min, -inf for the log-sums.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from graphopt.runtime.kernels.registry import KernelNode, kernel


def _reduce_axes(x: np.ndarray, axes, noop_with_empty_axes: bool):
    """A tuple of axes, or None for all axes, or () for 'no reduction'."""
    if axes is None or (isinstance(axes, np.ndarray) and axes.size == 0) or \
            (isinstance(axes, (list, tuple)) and len(axes) == 0):
        return () if noop_with_empty_axes else None
    return tuple(int(a) + x.ndim if int(a) < 0 else int(a) for a in np.asarray(axes).reshape(-1))


def _lowest(dtype: np.dtype):
    if dtype.kind == "f":
        return -np.inf
    if dtype == np.bool_:
        return False
    return np.iinfo(dtype).min


def _highest(dtype: np.dtype):
    if dtype.kind == "f":
        return np.inf
    if dtype == np.bool_:
        return True
    return np.iinfo(dtype).max


def _sum(x, axes, keep):
    return np.sum(x, axis=axes, keepdims=keep, dtype=x.dtype if x.dtype.kind != "b" else None)


def _mean(x, axes, keep):
    if x.dtype.kind in "iu":
        return (np.sum(x, axis=axes, keepdims=keep, dtype=np.int64) //
                max(int(np.prod([x.shape[a] for a in (axes or range(x.ndim))])), 1)).astype(x.dtype)
    return np.mean(x, axis=axes, keepdims=keep, dtype=np.float32 if x.dtype == np.float16 else None
                   ).astype(x.dtype, copy=False)


def _max(x, axes, keep):
    return np.max(x, axis=axes, keepdims=keep, initial=_lowest(x.dtype)) if x.size == 0 \
        else np.max(x, axis=axes, keepdims=keep)


def _min(x, axes, keep):
    return np.min(x, axis=axes, keepdims=keep, initial=_highest(x.dtype)) if x.size == 0 \
        else np.min(x, axis=axes, keepdims=keep)


def _prod(x, axes, keep):
    return np.prod(x, axis=axes, keepdims=keep, dtype=x.dtype)


def _l1(x, axes, keep):
    return np.sum(np.abs(x), axis=axes, keepdims=keep, dtype=x.dtype)


def _l2(x, axes, keep):
    wide = x.astype(np.float64) if x.dtype.kind != "f" else x
    return np.sqrt(np.sum(np.square(wide), axis=axes, keepdims=keep)).astype(x.dtype)


def _sum_square(x, axes, keep):
    return np.sum(np.square(x), axis=axes, keepdims=keep, dtype=x.dtype)


def _log_sum(x, axes, keep):
    return np.log(np.sum(x, axis=axes, keepdims=keep, dtype=x.dtype))


def _log_sum_exp(x, axes, keep):
    if x.size == 0:
        return np.log(np.sum(np.exp(x), axis=axes, keepdims=keep))
    peak = np.max(x, axis=axes, keepdims=True)
    peak = np.where(np.isfinite(peak), peak, 0).astype(x.dtype)
    total = np.sum(np.exp(x - peak), axis=axes, keepdims=True)
    out = np.log(total) + peak
    if not keep:
        out = np.squeeze(out, axis=axes if axes is not None else tuple(range(x.ndim)))
    return out.astype(x.dtype, copy=False)


_REDUCTIONS: dict[str, tuple[Callable, int]] = {
    # op: (function, opset where axes became an input)
    "ReduceSum": (_sum, 13),
    "ReduceMean": (_mean, 18),
    "ReduceMax": (_max, 18),
    "ReduceMin": (_min, 18),
    "ReduceProd": (_prod, 18),
    "ReduceL1": (_l1, 18),
    "ReduceL2": (_l2, 18),
    "ReduceSumSquare": (_sum_square, 18),
    "ReduceLogSum": (_log_sum, 18),
    "ReduceLogSumExp": (_log_sum_exp, 18),
}


def _register(op_type: str, func: Callable, axes_input_since: int) -> None:
    def finish(x: np.ndarray, axes, keep: bool) -> np.ndarray:
        if axes == ():
            return x.copy()   # noop_with_empty_axes and no axes: identity
        return np.asarray(func(x, axes, keep))

    @kernel(op_type)
    def with_attribute(node: KernelNode):
        keep = bool(node.attr("keepdims", 1))
        axes_attr = node.attr("axes")
        return lambda x: (finish(x, _reduce_axes(x, axes_attr, False), keep),)

    @kernel(op_type, since=axes_input_since)
    def with_input(node: KernelNode):
        keep = bool(node.attr("keepdims", 1))
        noop = bool(node.attr("noop_with_empty_axes", 0))
        return lambda x, axes=None: (finish(x, _reduce_axes(x, axes, noop), keep),)


for _name, (_func, _since) in _REDUCTIONS.items():
    _register(_name, _func, _since)


def _arg(op_type: str, func: Callable) -> None:
    @kernel(op_type)
    def factory(node: KernelNode):
        axis = int(node.attr("axis", 0))
        keep = bool(node.attr("keepdims", 1))
        last = bool(node.attr("select_last_index", 0))

        def run(x):
            a = axis + x.ndim if axis < 0 else axis
            if last:
                flipped = np.flip(x, a)
                index = x.shape[a] - 1 - func(flipped, axis=a)
            else:
                index = func(x, axis=a)
            index = np.asarray(index, dtype=np.int64)
            return (np.expand_dims(index, a) if keep else index,)
        return run


_arg("ArgMax", np.argmax)
_arg("ArgMin", np.argmin)


@kernel("NegativeLogLikelihoodLoss")
def _nll_loss(node: KernelNode):
    reduction = node.attr("reduction", "mean")
    ignore_index = node.attr("ignore_index")

    def run(x, target, weight=None):
        n, c = x.shape[:2]
        flat_x = x.reshape(n, c, -1)
        flat_t = target.reshape(n, -1).astype(np.int64)
        valid = np.ones(flat_t.shape, dtype=bool) if ignore_index is None \
            else flat_t != ignore_index
        safe_t = np.where(valid, flat_t, 0)
        picked = -np.take_along_axis(flat_x, safe_t[:, None, :], axis=1)[:, 0, :]
        w = np.take(weight, safe_t) if weight is not None else np.ones(flat_t.shape, x.dtype)
        w = np.where(valid, w, 0).astype(x.dtype)
        loss = (picked * w).astype(x.dtype)
        if reduction == "none":
            return (loss.reshape(target.shape),)
        if reduction == "sum":
            return (np.asarray(loss.sum(dtype=x.dtype)),)
        return (np.asarray(loss.sum(dtype=x.dtype) / w.sum(dtype=x.dtype)).astype(x.dtype),)
    return run
