"""Tensor-manipulation kernels: shape changes, slicing and gathering, padding, constants.

Reshape, Flatten, Squeeze, Unsqueeze, Transpose, Slice, Split and Expand return numpy views (no
copy): a consumer that needs contiguous memory makes it. Attributes that became inputs over the
opsets (Reshape's shape at 5, Slice's at 10, Pad's at 11, Split/Squeeze/Unsqueeze at 13, TopK's k
at 10, Clip's in elementwise.py) are read from wherever the op's opset puts them.
"""

from __future__ import annotations

import numpy as np
import onnx

from graphopt.errors import GraphoptError
from graphopt.ir import _densify, onnx_to_np_dtype
from graphopt.runtime.kernels.registry import KernelNode, kernel

INT64 = np.int64


def _ints(value) -> list[int]:
    """A list of Python ints from an attribute or a 0-d/1-d integer tensor."""
    return [int(v) for v in np.asarray(value).reshape(-1)]


def _axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


def tensor_attr(value) -> np.ndarray:
    """A TensorProto / SparseTensorProto attribute as an array."""
    if isinstance(value, onnx.SparseTensorProto):
        return _densify(value)
    if isinstance(value, onnx.TensorProto):
        return onnx.numpy_helper.to_array(value)
    return np.asarray(value)


# ---------------------------------------------------------------------------------------------
# constants and shapes
# ---------------------------------------------------------------------------------------------
@kernel("Constant")
def _constant(node: KernelNode):
    attrs = node.op.attrs
    if "value" in attrs:
        array = tensor_attr(attrs["value"])
    elif "sparse_value" in attrs:
        array = tensor_attr(attrs["sparse_value"])
    elif "value_float" in attrs:
        array = np.array(attrs["value_float"], dtype=np.float32)
    elif "value_floats" in attrs:
        array = np.array(attrs["value_floats"], dtype=np.float32)
    elif "value_int" in attrs:
        array = np.array(attrs["value_int"], dtype=INT64)
    elif "value_ints" in attrs:
        array = np.array(attrs["value_ints"], dtype=INT64)
    elif "value_string" in attrs:
        array = np.array(attrs["value_string"], dtype=object)
    elif "value_strings" in attrs:
        array = np.array(attrs["value_strings"], dtype=object)
    else:
        raise GraphoptError(f"Constant op {node.op.name!r} has no value attribute")
    array = np.asarray(array)
    array.flags.writeable = False   # handed out on every run: must never be written
    return lambda: (array,)


@kernel("ConstantOfShape")
def _constant_of_shape(node: KernelNode):
    value = node.attr("value")
    fill = tensor_attr(value).reshape(-1) if value is not None else np.zeros(1, np.float32)
    dtype, scalar = fill.dtype, fill[0]

    def run(shape):
        return (np.full(_ints(shape), scalar, dtype=dtype),)
    return run


@kernel("Shape")
def _shape(node: KernelNode):
    start = node.attr("start", 0)
    end = node.attr("end", None)

    def run(x):
        return (np.array(x.shape[start:end], dtype=INT64),)
    return run


@kernel("Size")
def _size(node: KernelNode):
    return lambda x: (np.array(x.size, dtype=INT64),)


@kernel("Identity")
def _identity(node: KernelNode):
    return lambda x: (x,)


@kernel("Range")
def _range(node: KernelNode):
    def run(start, limit, delta):
        s, l, d = start.item(), limit.item(), delta.item()
        count = max(int(np.ceil((l - s) / d)), 0)
        return ((start + np.arange(count, dtype=start.dtype) * delta).astype(start.dtype, copy=False),)
    return run


@kernel("EyeLike")
def _eye_like(node: KernelNode):
    k = int(node.attr("k", 0))
    to = node.attr("dtype")

    def run(x):
        dtype = onnx_to_np_dtype(to) if to is not None else x.dtype
        return (np.eye(x.shape[0], x.shape[1], k=k, dtype=dtype),)
    return run


# ---------------------------------------------------------------------------------------------
# reshaping (views)
# ---------------------------------------------------------------------------------------------
def _reshape(x: np.ndarray, shape, allowzero: bool) -> np.ndarray:
    dims = _ints(shape)
    if not allowzero:
        dims = [x.shape[i] if d == 0 else d for i, d in enumerate(dims)]
    return x.reshape(dims)


@kernel("Reshape")
def _reshape_1(node: KernelNode):
    dims = node.attr("shape", [])
    return lambda x: (_reshape(x, dims, False),)


@kernel("Reshape", since=5)
def _reshape_5(node: KernelNode):
    allowzero = bool(node.attr("allowzero", 0))
    return lambda x, shape: (_reshape(x, shape, allowzero),)


@kernel("Flatten")
def _flatten(node: KernelNode):
    axis = int(node.attr("axis", 1))

    def run(x):
        a = _axis(axis, x.ndim)
        outer = int(np.prod(x.shape[:a], dtype=INT64))
        inner = int(np.prod(x.shape[a:], dtype=INT64))
        return (x.reshape(outer, inner),)
    return run


def _squeeze(x: np.ndarray, axes) -> np.ndarray:
    if axes is None:
        return np.squeeze(x)
    return np.squeeze(x, axis=tuple(_axis(a, x.ndim) for a in _ints(axes)))


@kernel("Squeeze")
def _squeeze_1(node: KernelNode):
    axes = node.attr("axes")
    return lambda x: (_squeeze(x, axes),)


@kernel("Squeeze", since=13)
def _squeeze_13(node: KernelNode):
    return lambda x, axes=None: (_squeeze(x, axes),)


def _unsqueeze(x: np.ndarray, axes) -> np.ndarray:
    return np.expand_dims(x, tuple(_ints(axes)))


@kernel("Unsqueeze")
def _unsqueeze_1(node: KernelNode):
    axes = node.attr("axes")
    return lambda x: (_unsqueeze(x, axes),)


@kernel("Unsqueeze", since=13)
def _unsqueeze_13(node: KernelNode):
    return lambda x, axes: (_unsqueeze(x, axes),)


@kernel("Transpose")
def _transpose(node: KernelNode):
    perm = node.attr("perm")
    return lambda x: (np.transpose(x, perm),)


@kernel("DepthToSpace")
def _depth_to_space(node: KernelNode):
    block = int(node.attr("blocksize"))
    mode = node.attr("mode", "DCR")

    def run(x):
        n, c, h, w = x.shape
        if mode == "DCR":
            y = x.reshape(n, block, block, c // block ** 2, h, w).transpose(0, 3, 4, 1, 5, 2)
        else:
            y = x.reshape(n, c // block ** 2, block, block, h, w).transpose(0, 1, 4, 2, 5, 3)
        return (y.reshape(n, c // block ** 2, h * block, w * block),)
    return run


@kernel("SpaceToDepth")
def _space_to_depth(node: KernelNode):
    block = int(node.attr("blocksize"))
    # DCR: output channel = (by * block + bx) * C + c;  CRD: c * block^2 + by * block + bx
    order = (0, 3, 5, 1, 2, 4) if node.attr("mode", "DCR") == "DCR" else (0, 1, 3, 5, 2, 4)

    def run(x):
        n, c, h, w = x.shape
        y = x.reshape(n, c, h // block, block, w // block, block).transpose(order)
        return (y.reshape(n, c * block * block, h // block, w // block),)
    return run


# ---------------------------------------------------------------------------------------------
# joining and splitting
# ---------------------------------------------------------------------------------------------
@kernel("Concat")
def _concat(node: KernelNode):
    axis = int(node.attr("axis", 1))

    def run(*xs):
        return (np.concatenate(xs, axis=_axis(axis, xs[0].ndim)),)
    return run


def split_sizes(length: int, parts: int) -> list[int]:
    """Split sizes for `parts` outputs without explicit sizes: equal, the last one smaller."""
    chunk = -(-length // parts)
    sizes = [chunk] * (parts - 1)
    sizes.append(length - chunk * (parts - 1))
    return sizes


def _split(x: np.ndarray, axis: int, sizes, n_outputs: int) -> tuple[np.ndarray, ...]:
    axis = _axis(axis, x.ndim)
    sizes = _ints(sizes) if sizes is not None else split_sizes(x.shape[axis], n_outputs)
    bounds = np.cumsum(sizes)[:-1]
    return tuple(np.split(x, bounds, axis=axis))


@kernel("Split")
def _split_1(node: KernelNode):
    axis = int(node.attr("axis", 0))
    sizes = node.attr("split")
    n = node.n_outputs

    def run(x, split=None):
        return _split(x, axis, split if split is not None else sizes, n)
    return run


@kernel("Split", since=13)
def _split_13(node: KernelNode):
    axis = int(node.attr("axis", 0))
    n = int(node.attr("num_outputs", node.n_outputs))
    return lambda x, split=None: _split(x, axis, split, n)


# ---------------------------------------------------------------------------------------------
# slicing and gathering
# ---------------------------------------------------------------------------------------------
def slice_index(shape: tuple[int, ...], starts, ends, axes, steps) -> tuple[slice, ...]:
    """Python slices for ONNX Slice parameters (clamping as the spec says)."""
    starts, ends = _ints(starts), _ints(ends)
    axes = _ints(axes) if axes is not None else list(range(len(starts)))
    steps = _ints(steps) if steps is not None else [1] * len(starts)
    index = [slice(None)] * len(shape)
    for start, end, axis, step in zip(starts, ends, axes, steps):
        axis = _axis(axis, len(shape))
        dim = shape[axis]
        if start < 0:
            start += dim
        if end < 0:
            end += dim
        if step > 0:
            start = min(max(start, 0), dim)
            end = min(max(end, 0), dim)
            index[axis] = slice(start, end, step)
        else:
            start = min(max(start, 0), dim - 1)
            end = min(max(end, -1), dim - 1)
            index[axis] = slice(start, end if end >= 0 else None, step)
    return tuple(index)


@kernel("Slice")
def _slice_1(node: KernelNode):
    starts, ends, axes = node.attr("starts"), node.attr("ends"), node.attr("axes")
    return lambda x: (x[slice_index(x.shape, starts, ends, axes, None)],)


@kernel("Slice", since=10)
def _slice_10(node: KernelNode):
    def run(x, starts, ends, axes=None, steps=None):
        return (x[slice_index(x.shape, starts, ends, axes, steps)],)
    return run


@kernel("Gather")
def _gather(node: KernelNode):
    axis = int(node.attr("axis", 0))

    def run(x, indices):
        return (np.take(x, indices.astype(INT64, copy=False), axis=_axis(axis, x.ndim)),)
    return run


@kernel("GatherElements")
def _gather_elements(node: KernelNode):
    axis = int(node.attr("axis", 0))

    def run(x, indices):
        a = _axis(axis, x.ndim)
        idx = np.where(indices < 0, indices + x.shape[a], indices)
        return (np.take_along_axis(x, idx, axis=a),)
    return run


def _nd_index(data_shape, indices: np.ndarray, batch_dims: int):
    """(batch positions, per-axis index arrays) addressing data for GatherND/ScatterND."""
    k = indices.shape[-1]
    dims = np.array(data_shape[batch_dims:batch_dims + k], dtype=INT64)
    idx = np.where(indices < 0, indices + dims, indices).astype(INT64, copy=False)
    return idx, k


@kernel("GatherND")
def _gather_nd(node: KernelNode):
    batch_dims = int(node.attr("batch_dims", 0))

    def run(data, indices):
        idx, k = _nd_index(data.shape, indices, batch_dims)
        batch_shape = data.shape[:batch_dims]
        batch = int(np.prod(batch_shape, dtype=INT64))
        flat = data.reshape((batch,) + data.shape[batch_dims:])
        picks = idx.reshape(batch, -1, k)
        rows = np.arange(batch)[:, None]
        gathered = flat[(rows,) + tuple(picks[..., j] for j in range(k))]
        return (gathered.reshape(indices.shape[:-1] + data.shape[batch_dims + k:]),)
    return run


_SCATTER_UFUNC = {"add": np.add, "mul": np.multiply, "max": np.maximum, "min": np.minimum}


@kernel("ScatterND")
def _scatter_nd(node: KernelNode):
    reduction = node.attr("reduction", "none")

    def run(data, indices, updates):
        out = data.copy()
        idx, k = _nd_index(data.shape, indices, 0)
        where = tuple(idx[..., j] for j in range(k))
        if reduction == "none":
            out[where] = updates
        else:
            _SCATTER_UFUNC[reduction].at(out, where, updates)
        return (out,)
    return run


def _scatter_elements(data, indices, updates, axis: int, reduction: str) -> np.ndarray:
    out = data.copy()
    a = _axis(axis, data.ndim)
    idx = np.where(indices < 0, indices + data.shape[a], indices)
    grid = list(np.indices(indices.shape, sparse=True))
    grid[a] = idx
    where = tuple(grid)
    if reduction == "none":
        out[where] = updates
    else:
        _SCATTER_UFUNC[reduction].at(out, where, updates)
    return out


@kernel("ScatterElements")
def _scatter_elements_kernel(node: KernelNode):
    axis = int(node.attr("axis", 0))
    reduction = node.attr("reduction", "none")
    return lambda data, indices, updates: (_scatter_elements(data, indices, updates, axis, reduction),)


@kernel("Scatter")
def _scatter(node: KernelNode):
    axis = int(node.attr("axis", 0))
    return lambda data, indices, updates: (_scatter_elements(data, indices, updates, axis, "none"),)


@kernel("Compress")
def _compress(node: KernelNode):
    axis = node.attr("axis")

    def run(x, condition):
        cond = condition.astype(bool, copy=False)
        if axis is None:
            return (np.compress(cond, x.reshape(-1)),)
        return (np.compress(cond, x, axis=_axis(axis, x.ndim)),)
    return run


@kernel("NonZero")
def _nonzero(node: KernelNode):
    def run(x):
        if x.ndim == 0:
            return (np.zeros((0, int(bool(x))), dtype=INT64),)
        return (np.array(np.nonzero(x), dtype=INT64).reshape(x.ndim, -1),)
    return run


# ---------------------------------------------------------------------------------------------
# expanding, tiling, padding
# ---------------------------------------------------------------------------------------------
@kernel("Expand")
def _expand(node: KernelNode):
    def run(x, shape):
        target = np.broadcast_shapes(x.shape, tuple(_ints(shape)))
        return (np.broadcast_to(x, target),)
    return run


@kernel("Tile")
def _tile(node: KernelNode):
    return lambda x, repeats: (np.tile(x, _ints(repeats)),)


_PAD_MODES = {"constant": "constant", "reflect": "reflect", "edge": "edge", "wrap": "wrap"}


def pad(x: np.ndarray, pads, mode: str, value, axes=None) -> np.ndarray:
    """ONNX Pad: pads = [begin per axis..., end per axis...]; negative pads crop."""
    pads = _ints(pads)
    rank = x.ndim
    axes = [_axis(a, rank) for a in _ints(axes)] if axes is not None else list(range(rank))
    n = len(axes)
    begin = [0] * rank
    end = [0] * rank
    for i, a in enumerate(axes):
        begin[a], end[a] = pads[i], pads[i + n]
    crop = tuple(slice(max(-b, 0), x.shape[i] - max(-e, 0)) for i, (b, e) in enumerate(zip(begin, end)))
    if any(b < 0 or e < 0 for b, e in zip(begin, end)):
        x = x[crop]
    width = [(max(b, 0), max(e, 0)) for b, e in zip(begin, end)]
    if not any(b or e for b, e in width):
        return x.copy()
    if mode not in _PAD_MODES:
        raise GraphoptError(f"Pad mode {mode!r} is not supported")
    if mode == "constant":
        fill = 0 if value is None else (value.reshape(-1)[0] if isinstance(value, np.ndarray) else value)
        if isinstance(value, np.ndarray) and value.size == 0:
            fill = 0
        out = np.empty([d + b + e for d, (b, e) in zip(x.shape, width)], dtype=x.dtype)
        out.fill(fill)
        out[tuple(slice(b, b + d) for d, (b, _) in zip(x.shape, width))] = x
        return out
    return np.pad(x, width, mode=_PAD_MODES[mode])


@kernel("Pad")
def _pad_2(node: KernelNode):
    pads = node.attr("pads", node.attr("paddings"))
    mode = node.attr("mode", "constant")
    value = float(node.attr("value", 0.0))
    return lambda x: (pad(x, pads, mode, value),)


@kernel("Pad", since=11)
def _pad_11(node: KernelNode):
    mode = node.attr("mode", "constant")

    def run(x, pads, constant_value=None, axes=None):
        return (pad(x, pads, mode, constant_value, axes),)
    return run


@kernel("CenterCropPad")
def _center_crop_pad(node: KernelNode):
    axes_attr = node.attr("axes")

    def run(x, shape):
        target = _ints(shape)
        axes = [_axis(a, x.ndim) for a in axes_attr] if axes_attr is not None else list(range(x.ndim))
        crop = [slice(None)] * x.ndim
        out_shape = list(x.shape)
        place = [slice(None)] * x.ndim
        for a, want in zip(axes, target):
            have = x.shape[a]
            out_shape[a] = want
            if have >= want:
                start = (have - want) // 2
                crop[a] = slice(start, start + want)
            else:
                start = (want - have) // 2
                place[a] = slice(start, start + have)
        cropped = x[tuple(crop)]
        out = np.zeros(out_shape, dtype=x.dtype)
        out[tuple(place)] = cropped
        return (out,)
    return run


# ---------------------------------------------------------------------------------------------
# misc
# ---------------------------------------------------------------------------------------------
@kernel("Dropout")
def _dropout(node: KernelNode):
    """Inference mode: identity (and an all-true mask). Training mode (opset 12's input) with a
    ratio above 0: keep each element where a uniform draw is >= ratio and scale the kept ones by
    1 / (1 - ratio); the draws come from numpy's RandomState(seed) when the op has a `seed`, so a
    seeded Dropout is reproducible."""
    n_out = node.n_outputs
    legacy_mask_same_type = node.opset < 10
    seed = node.attr("seed")

    def run(x, ratio=None, training_mode=None):
        p = float(ratio) if ratio is not None else 0.5
        if training_mode is None or not bool(training_mode) or p == 0:
            if n_out == 1:
                return (x,)
            return (x, np.ones(x.shape, dtype=x.dtype if legacy_mask_same_type else bool))
        draws = np.random.RandomState(seed).uniform(0, 1.0, x.shape) if seed is not None \
            else np.random.default_rng().uniform(0, 1.0, x.shape)
        mask = draws >= p
        y = (mask * x * (1.0 / (1.0 - p))).astype(x.dtype)
        return (y,) if n_out == 1 else (y, mask)
    return run


@kernel("Trilu")
def _trilu(node: KernelNode):
    upper = bool(node.attr("upper", 1))

    def run(x, k=None):
        offset = int(k) if k is not None else 0
        return ((np.triu if upper else np.tril)(x, offset),)
    return run


@kernel("OneHot")
def _one_hot(node: KernelNode):
    axis = int(node.attr("axis", -1))

    def run(indices, depth, values):
        d = int(np.asarray(depth).reshape(-1)[0])
        idx = np.asarray(indices)
        idx = np.where(idx < 0, idx + d, idx).astype(INT64)
        hot = idx[..., None] == np.arange(d)
        a = _axis(axis, idx.ndim + 1)
        hot = np.moveaxis(hot, -1, a)
        off, on = values.reshape(-1)[0], values.reshape(-1)[1]
        return (np.where(hot, on, off).astype(values.dtype, copy=False),)
    return run


def _stable_order(x: np.ndarray, axis: int, largest: bool) -> np.ndarray:
    """argsort along `axis`, ties broken by the lower index, largest first if asked."""
    if not largest:
        return np.argsort(x, axis=axis, kind="stable")
    if x.dtype.kind == "u" or x.dtype == np.bool_:
        key = -x.astype(INT64)
    elif x.dtype.kind == "i":
        key = -(x.astype(INT64)).astype(np.float64)  # avoid overflow at the minimum
    else:
        key = -x
    return np.argsort(key, axis=axis, kind="stable")


@kernel("TopK")
def _topk(node: KernelNode):
    axis = int(node.attr("axis", -1))
    largest = bool(node.attr("largest", 1))
    k_attr = node.attr("k")

    def run(x, k=None):
        a = _axis(axis, x.ndim)
        count = int(np.asarray(k).reshape(-1)[0]) if k is not None else int(k_attr)
        order = _stable_order(x, a, largest)
        top = np.take(order, np.arange(count), axis=a)
        return (np.take_along_axis(x, top, axis=a), top.astype(INT64, copy=False))
    return run


@kernel("CumSum")
def _cumsum(node: KernelNode):
    exclusive = bool(node.attr("exclusive", 0))
    reverse = bool(node.attr("reverse", 0))

    def run(x, axis):
        a = _axis(int(np.asarray(axis).reshape(-1)[0]), x.ndim)
        y = np.flip(x, a) if reverse else x
        out = np.cumsum(y, axis=a, dtype=x.dtype)
        if exclusive:
            shifted = np.zeros_like(out)
            src = [slice(None)] * x.ndim
            dst = [slice(None)] * x.ndim
            src[a], dst[a] = slice(0, -1), slice(1, None)
            shifted[tuple(dst)] = out[tuple(src)]
            out = shifted
        return (np.flip(out, a) if reverse else out,)
    return run


@kernel("ReverseSequence")
def _reverse_sequence(node: KernelNode):
    batch_axis = int(node.attr("batch_axis", 1))
    time_axis = int(node.attr("time_axis", 0))

    def run(x, sequence_lens):
        steps = x.shape[time_axis]
        t_shape = [1] * x.ndim
        t_shape[time_axis] = steps
        b_shape = [1] * x.ndim
        b_shape[batch_axis] = x.shape[batch_axis]
        t = np.arange(steps).reshape(t_shape)
        lens = sequence_lens.astype(INT64).reshape(b_shape)
        source = np.where(t < lens, lens - 1 - t, t)
        source = np.broadcast_to(source, x.shape)
        return (np.take_along_axis(x, source, axis=time_axis),)
    return run
