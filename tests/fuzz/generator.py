"""A seeded generator of random valid ONNX graphs, rich in the patterns the passes rewrite.

    case = generate(seed)          # FuzzCase: model, feeds, motifs used
    case.model, case.feeds, case.motifs

Random noise alone rarely triggers a rewrite: a pass that folds BatchNormalization into Conv needs
a Conv followed by a BatchNormalization. So a graph is grown from *motifs*: single ops with random
attributes (Conv grouped/depthwise, Gemm with transA/transB, Slice with negative steps, ...) and
the patterns the passes look for (channel shuffles, inverse Transpose pairs, Concat->Split,
decomposed LayerNorm/GELU/HardSwish, Conv->BN, residual Conv+Add+Relu, Shape-chain Reshapes...),
together with look-alikes that must *not* be rewritten (a Transpose pair that does not cancel, an
Add of zeros that broadcasts to a larger shape, Split->Concat in another order).

Every motif reads tensors from a pool of float tensors with known static shapes and adds its
outputs to the pool, so motifs chain, tensors get several consumers, and some results are left
unread (dead code). The graph outputs are some of the unread tensors plus, sometimes, intermediates
that are also read further on. The opset is drawn too, since several ops change form across opsets
(Split/Squeeze/ReduceMean attributes becoming inputs).

Values stay well conditioned (weights scaled by 1/sqrt(fan-in), divisors bounded away from zero,
BatchNorm variances near 1), so a correct rewrite that only reassociates float arithmetic stays
within rtol 1e-4 / atol 1e-5.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

#: Opsets a case is drawn from (op forms differ: Split/Squeeze attrs vs inputs at 13, ReduceMean
#: axes input at 18, Split num_outputs at 18, ...).
OPSETS = (11, 12, 13, 14, 15, 17, 18, 19, 21)
#: No generated tensor has more elements than this (keeps onnxruntime and the runtime fast).
MAX_ELEMENTS = 3072

Shape = tuple[int, ...]


@dataclass
class Tensor:
    """A value the generator may read: its name, static shape and element type."""

    name: str
    shape: Shape
    dtype: int = TensorProto.FLOAT

    @property
    def rank(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))


@dataclass
class FuzzCase:
    """One generated model with its feeds and the motifs it was grown from."""

    seed: int
    model: onnx.ModelProto
    feeds: dict[str, np.ndarray]
    motifs: list[str] = field(default_factory=list)

    @property
    def op_types(self) -> list[str]:
        return sorted({n.op_type for n in self.model.graph.node})


def broadcast(a: Shape, b: Shape) -> Shape | None:
    """Numpy broadcast of two shapes, or None if they do not broadcast."""
    try:
        return tuple(int(d) for d in np.broadcast_shapes(a, b))
    except ValueError:
        return None


class GraphGen:
    """Grows one random graph: nodes, initializers, inputs and the pool of readable tensors."""

    def __init__(self, rng: np.random.Generator, opset: int,
                 parent: GraphGen | None = None) -> None:
        self.rng = rng
        self.opset = opset
        #: The enclosing graph's generator when this one grows an If branch (names stay unique
        #: model-wide through the root's counter).
        self.parent = parent
        self.depth = 0 if parent is None else parent.depth + 1
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.feeds: dict[str, np.ndarray] = {}
        self.pool: list[Tensor] = []
        self.reads: dict[str, int] = {}
        self.motifs: list[str] = []
        #: Non-pool tensors that must be graph outputs (a Dropout mask).
        self.extra_outputs: list[Tensor] = []
        self._counter = 0

    # -- names, constants, inputs ----------------------------------------------------------------
    def fresh(self, hint: str) -> str:
        root = self
        while root.parent is not None:
            root = root.parent
        root._counter += 1
        return f"{hint}_{root._counter}"

    def const(self, array: np.ndarray, hint: str = "c", *, as_node: bool | None = None) -> str:
        """A constant: an initializer, or (sometimes) a Constant node, which folding must handle."""
        array = np.asarray(array)
        if as_node is None:
            as_node = self.rng.random() < 0.15
        name = self.fresh(hint)
        tensor = numpy_helper.from_array(array, name)
        if as_node:
            self.nodes.append(helper.make_node("Constant", [], [name], value=tensor,
                                               name=self.fresh("Constant")))
        else:
            self.initializers.append(tensor)
        return name

    def ints(self, values: Sequence[int], hint: str = "i") -> str:
        return self.const(np.asarray(list(values), dtype=np.int64), hint)

    def weight(self, shape: Shape, fan_in: int, hint: str = "w") -> str:
        scale = 1.0 / math.sqrt(max(fan_in, 1))
        return self.const((self.rng.standard_normal(shape) * scale).astype(np.float32), hint,
                          as_node=False)

    def small_const(self, shape: Shape, hint: str = "k", *, low: float = 0.5,
                    high: float = 2.0) -> str:
        """A constant with magnitudes in [low, high] and random signs (safe as a divisor)."""
        mag = self.rng.uniform(low, high, size=shape)
        sign = np.where(self.rng.random(shape) < 0.5, -1.0, 1.0)
        return self.const((mag * sign).astype(np.float32), hint)

    def add_input(self, shape: Shape, *, overridable_default: bool = False) -> Tensor:
        """A graph input fed with standard-normal data. An `overridable_default` input also has an
        initializer (a default the feed overrides), which passes must not treat as constant."""
        name = self.fresh("in")
        self.inputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, list(shape)))
        self.feeds[name] = self.rng.standard_normal(shape).astype(np.float32)
        if overridable_default:
            default = self.rng.standard_normal(shape).astype(np.float32)
            self.initializers.append(numpy_helper.from_array(default, name))
        tensor = Tensor(name, tuple(shape))
        self.pool.append(tensor)
        return tensor

    # -- nodes -----------------------------------------------------------------------------------
    def node(self, op_type: str, inputs: Sequence[str], shapes: Sequence[Shape], *,
             dtypes: Sequence[int] | None = None, pool: bool = True, **attrs) -> list[Tensor]:
        """Append a node with outputs of the given shapes; float outputs join the pool."""
        dtypes = list(dtypes) if dtypes is not None else [TensorProto.FLOAT] * len(shapes)
        outs = [Tensor(self.fresh(op_type.lower()), tuple(int(d) for d in s), t)
                for s, t in zip(shapes, dtypes)]
        self.nodes.append(helper.make_node(op_type, list(inputs), [o.name for o in outs],
                                           name=self.fresh(op_type), **attrs))
        for name in inputs:
            if name:
                self.reads[name] = self.reads.get(name, 0) + 1
        if pool:
            self.pool.extend(o for o in outs if o.dtype == TensorProto.FLOAT)
        return outs

    def one(self, op_type: str, inputs: Sequence[str], shape: Shape, **attrs) -> Tensor:
        return self.node(op_type, inputs, [shape], **attrs)[0]

    def pick(self, ok: Callable[[Tensor], bool] = lambda t: True) -> Tensor | None:
        """A pool tensor satisfying `ok`: usually the newest (so motifs chain), else any."""
        candidates = [t for t in self.pool if ok(t) and t.size <= MAX_ELEMENTS]
        if not candidates:
            return None
        if self.rng.random() < 0.6:
            return candidates[-1]
        return candidates[int(self.rng.integers(len(candidates)))]

    def choice(self, options: Sequence):
        return options[int(self.rng.integers(len(options)))]

    # -- opset-dependent forms ---------------------------------------------------------------------
    def squeeze(self, x: Tensor, axes: Sequence[int]) -> Tensor:
        shape = tuple(d for i, d in enumerate(x.shape) if i not in {a % x.rank for a in axes})
        if self.opset >= 13:
            return self.one("Squeeze", [x.name, self.ints(axes, "axes")], shape)
        return self.one("Squeeze", [x.name], shape, axes=list(axes))

    def unsqueeze(self, x: Tensor, axes: Sequence[int]) -> Tensor:
        rank = x.rank + len(axes)
        positions = sorted(a % rank for a in axes)
        dims = list(x.shape)
        for p in positions:
            dims.insert(p, 1)
        if self.opset >= 13:
            return self.one("Unsqueeze", [x.name, self.ints(axes, "axes")], tuple(dims))
        return self.one("Unsqueeze", [x.name], tuple(dims), axes=list(axes))

    def split(self, x: Tensor, axis: int, sizes: Sequence[int]) -> list[Tensor]:
        shapes = []
        for s in sizes:
            dims = list(x.shape)
            dims[axis] = s
            shapes.append(tuple(dims))
        equal = len(set(sizes)) == 1
        if self.opset >= 18 and equal and self.rng.random() < 0.5:
            return self.node("Split", [x.name], shapes, axis=axis, num_outputs=len(sizes))
        if self.opset >= 13:
            if equal and self.rng.random() < 0.3 and self.opset < 18:
                return self.node("Split", [x.name], shapes, axis=axis)
            return self.node("Split", [x.name, self.ints(sizes, "split")], shapes, axis=axis)
        if equal and self.rng.random() < 0.3:
            return self.node("Split", [x.name], shapes, axis=axis)
        return self.node("Split", [x.name], shapes, axis=axis, split=list(sizes))

    def reduce(self, op_type: str, x: Tensor, axes: Sequence[int], keepdims: int) -> Tensor:
        """ReduceMean/Max/Sum over `axes`, with axes as an attribute or an input as the opset
        wants (ReduceSum from 13, the others from 18)."""
        norm = {a % x.rank for a in axes}
        shape = tuple(1 if i in norm else d for i, d in enumerate(x.shape)) if keepdims \
            else tuple(d for i, d in enumerate(x.shape) if i not in norm)
        if self.opset >= (13 if op_type == "ReduceSum" else 18):
            return self.one(op_type, [x.name, self.ints(axes, "axes")], shape, keepdims=keepdims)
        return self.one(op_type, [x.name], shape, axes=list(axes), keepdims=keepdims)

    def reduce_mean(self, x: Tensor, axes: Sequence[int], keepdims: int) -> Tensor:
        return self.reduce("ReduceMean", x, axes, keepdims)

    def slice(self, x: Tensor, axis: int, start: int, end: int, step: int = 1) -> Tensor:
        index = [slice(None)] * x.rank
        index[axis] = slice(start, end, step)
        shape = np.empty(x.shape, dtype=np.uint8)[tuple(index)].shape
        inputs = [x.name, self.ints([start], "starts"), self.ints([end], "ends"),
                  self.ints([axis], "axes")]
        if step != 1 or self.rng.random() < 0.3:
            inputs.append(self.ints([step], "steps"))
        return self.one("Slice", inputs, shape)

    def reshape(self, x: Tensor, target: Sequence[int], shape: Shape) -> Tensor:
        return self.one("Reshape", [x.name, self.ints(target, "shape")], shape)

    def transpose(self, x: Tensor, perm: Sequence[int] | None) -> Tensor:
        if perm is None:
            return self.one("Transpose", [x.name], tuple(reversed(x.shape)))
        return self.one("Transpose", [x.name], tuple(x.shape[p] for p in perm), perm=list(perm))

    def clip(self, x: Tensor, low: float | None, high: float | None) -> Tensor:
        inputs = [x.name]
        if low is not None or high is not None:
            inputs.append("" if low is None else self.const(np.array(low, np.float32), "min"))
        if high is not None:
            inputs.append(self.const(np.array(high, np.float32), "max"))
        return self.one("Clip", inputs, x.shape)


# ---------------------------------------------------------------------------------------------
# shape helpers
# ---------------------------------------------------------------------------------------------
def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def random_factorization(rng: np.random.Generator, n: int, rank: int) -> Shape:
    """A random shape of `rank` dims whose product is n."""
    dims = []
    rest = n
    for _ in range(rank - 1):
        d = int(rng.choice(divisors(rest)))
        dims.append(d)
        rest //= d
    dims.append(rest)
    rng.shuffle(dims)
    return tuple(dims)


def inverse_perm(perm: Sequence[int]) -> list[int]:
    inv = [0] * len(perm)
    for i, p in enumerate(perm):
        inv[p] = i
    return inv


def broadcastable_const_shape(rng: np.random.Generator, shape: Shape) -> Shape:
    """A shape that broadcasts to `shape` without enlarging it: scalar, per-channel, trailing,
    or the full shape with some dims set to 1."""
    kind = rng.integers(5)
    if kind == 0 or not shape:
        return ()
    if kind == 1 and len(shape) >= 2:  # per-channel, NCHW style
        return (shape[1],) + (1,) * (len(shape) - 2)
    if kind == 2:  # trailing dims
        k = int(rng.integers(1, len(shape) + 1))
        return tuple(shape[-k:])
    if kind == 3:
        return tuple(d if rng.random() < 0.5 else 1 for d in shape)
    return tuple(shape)


# ---------------------------------------------------------------------------------------------
# motifs: each reads pool tensors, appends nodes, returns False when it does not apply
# ---------------------------------------------------------------------------------------------
Motif = Callable[[GraphGen], bool]
MOTIFS: dict[str, tuple[float, Motif]] = {}


def motif(name: str, weight: float = 1.0) -> Callable[[Motif], Motif]:
    def register(fn: Motif) -> Motif:
        MOTIFS[name] = (weight, fn)
        return fn
    return register


def _image(t: Tensor) -> bool:
    return t.rank == 4


@motif("activation", 2.0)
def _activation(g: GraphGen) -> bool:
    x = g.pick()
    if x is None:
        return False
    kind = g.choice(["Relu", "Sigmoid", "Tanh", "LeakyRelu", "HardSigmoid", "Clip", "Identity",
                     "Dropout", "Softmax", "Neg", "Abs"])
    if kind == "LeakyRelu":
        g.one(kind, [x.name], x.shape, alpha=float(g.rng.uniform(0.01, 0.3)))
    elif kind == "HardSigmoid":
        g.one(kind, [x.name], x.shape, alpha=float(g.rng.uniform(0.1, 0.5)),
              beta=float(g.rng.uniform(0.2, 0.8)))
    elif kind == "Clip":
        form = g.rng.integers(4)
        low = None if form == 1 else float(g.rng.uniform(-1, 0))
        high = None if form == 2 else float(g.rng.uniform(0.2, 2))
        if form == 3:
            low, high = 0.0, 6.0
        g.clip(x, low, high)
    elif kind == "Dropout":
        _dropout(g, x)
    elif kind == "Softmax":
        if x.rank == 0:
            g.one("Sigmoid", [x.name], x.shape)  # Softmax needs rank >= 1
        elif g.opset < 13 and x.rank > 1:
            # Softmax before 13 flattens from `axis` on: only the last axis keeps its meaning.
            g.one(kind, [x.name], x.shape, axis=x.rank - 1)
        else:
            g.one(kind, [x.name], x.shape, axis=int(g.rng.integers(-x.rank, x.rank)))
    else:
        g.one(kind, [x.name], x.shape)
    return True


def _dropout(g: GraphGen, x: Tensor) -> None:
    """Inference Dropout; sometimes its mask is produced (and maybe read, as a graph output)."""
    inputs = [x.name]
    attrs = {}
    if g.opset < 12:
        if g.rng.random() < 0.4:
            attrs["ratio"] = float(g.rng.uniform(0.1, 0.5))
    elif g.rng.random() < 0.4:
        inputs.append(g.const(np.array(g.rng.uniform(0.1, 0.5), np.float32), "ratio"))
        if g.rng.random() < 0.4:
            inputs.append(g.const(np.array(False), "training_mode"))
    if g.rng.random() < 0.3:
        outs = g.node("Dropout", inputs, [x.shape, x.shape],
                      dtypes=[TensorProto.FLOAT, TensorProto.BOOL], **attrs)
        # onnxruntime returns an all-False mask for Dropout-10 in inference where the onnx
        # reference (and the graphopt runtime) give all-True: an oracle disagreement, so the
        # mask is a graph output only from opset 12 on.
        if g.opset >= 12 and g.rng.random() < 0.5:
            g.extra_outputs.append(outs[1])
    else:
        g.one("Dropout", inputs, x.shape, **attrs)


@motif("binary_const", 2.0)
def _binary_const(g: GraphGen) -> bool:
    x = g.pick()
    if x is None:
        return False
    op = g.choice(["Add", "Sub", "Mul", "Div"])
    cshape = broadcastable_const_shape(g.rng, x.shape)
    c = g.small_const(cshape) if op == "Div" else g.const(
        g.rng.standard_normal(cshape).astype(np.float32), "k")
    inputs = [x.name, c] if op == "Div" or g.rng.random() < 0.6 else [c, x.name]
    g.one(op, inputs, x.shape)
    return True


@motif("binary_tensors", 1.5)
def _binary_tensors(g: GraphGen) -> bool:
    x = g.pick()
    if x is None:
        return False
    y = g.pick(lambda t: t.name != x.name and broadcast(t.shape, x.shape) is not None
               and int(np.prod(broadcast(t.shape, x.shape))) <= MAX_ELEMENTS)
    if y is None:
        y = x  # x op x: two slots reading one value
    op = g.choice(["Add", "Sub", "Mul", "Add", "Mul"])
    out = broadcast(x.shape, y.shape)
    assert out is not None
    g.one(op, [x.name, y.name], out)
    return True


@motif("safe_div", 0.5)
def _safe_div(g: GraphGen) -> bool:
    """x / (Sigmoid(y) + 0.5): a divisor computed from a tensor, bounded away from zero."""
    x = g.pick()
    if x is None:
        return False
    y = g.pick(lambda t: broadcast(t.shape, x.shape) == x.shape)
    if y is None:
        return False
    s = g.one("Sigmoid", [y.name], y.shape)
    d = g.one("Add", [s.name, g.const(np.array(0.5, np.float32), "half")], y.shape)
    g.one("Div", [x.name, d.name], x.shape)
    return True


@motif("conv", 2.0)
def _conv(g: GraphGen) -> bool:
    x = g.pick(_image)
    if x is None:
        return False
    _make_conv(g, x)
    return True


def _make_conv(g: GraphGen, x: Tensor, *, out_channels: int | None = None,
               kernel: int | None = None, same: bool = False, bias: bool | None = None, group: int | None = None) -> Tensor:
    n, c, h, w = x.shape
    if group is None:
        kind = g.rng.integers(3)
        group = 1 if kind == 0 else c if kind == 1 else int(g.choice(divisors(c)))
    if out_channels is None:
        mult = int(g.rng.integers(1, 3)) if group == c else None
        per_group = mult or int(g.rng.integers(1, max(2, 16 // group) + 1))
        out_channels = group * per_group
    k = kernel if kernel is not None else int(g.choice([1, 1, 3, 3, 2]))
    kh, kw = k, k if g.rng.random() < 0.8 or same else int(g.choice([1, 3]))
    attrs: dict = {}
    if same:
        pads = [kh // 2, kw // 2, kh // 2, kw // 2]
        strides = [1, 1]
        dil = [1, 1]
    else:
        pads = [int(g.rng.integers(0, 2)) for _ in range(4)]
        strides = [int(g.choice([1, 1, 2])) for _ in range(2)]
        dil = [1, 1] if g.rng.random() < 0.85 else [2, 2]
    oh = (h + pads[0] + pads[2] - dil[0] * (kh - 1) - 1) // strides[0] + 1
    ow = (w + pads[1] + pads[3] - dil[1] * (kw - 1) - 1) // strides[1] + 1
    if oh < 1 or ow < 1:
        pads, strides, dil, kh, kw = [0, 0, 0, 0], [1, 1], [1, 1], 1, 1
        oh, ow = h, w
    if not same and g.rng.random() < 0.1 and strides == [1, 1] and dil == [1, 1]:
        attrs["auto_pad"] = "SAME_UPPER"
        oh, ow = h, w
    else:
        attrs["pads"] = pads
    attrs.update(kernel_shape=[kh, kw], strides=strides, group=group)
    if dil != [1, 1]:
        attrs["dilations"] = dil
    wname = g.weight((out_channels, c // group, kh, kw), c // group * kh * kw, "conv_w")
    inputs = [x.name, wname]
    if bias if bias is not None else g.rng.random() < 0.6:
        inputs.append(g.const((g.rng.standard_normal(out_channels) * 0.1).astype(np.float32),
                              "conv_b", as_node=False))
    return g.one("Conv", inputs, (n, out_channels, oh, ow), **attrs)


def _batchnorm(g: GraphGen, x: Tensor) -> Tensor:
    c = x.shape[1]
    scale = g.rng.uniform(0.5, 1.5, c).astype(np.float32)
    bias = (g.rng.standard_normal(c) * 0.1).astype(np.float32)
    mean = (g.rng.standard_normal(c) * 0.1).astype(np.float32)
    var = g.rng.uniform(0.5, 2.0, c).astype(np.float32)
    names = [g.const(a, h, as_node=False) for a, h in
             ((scale, "bn_scale"), (bias, "bn_bias"), (mean, "bn_mean"), (var, "bn_var"))]
    return g.one("BatchNormalization", [x.name, *names], x.shape,
                 epsilon=float(g.choice([1e-5, 1e-3])))


#: Nearest Resize modes: the first four repeat each row s times (fuse_upsample_conv rewrites
#: the Conv after them), the others do not and must be left alone.
NEAREST_MODES = [("asymmetric", "floor"), ("half_pixel", "round_prefer_floor"),
                 ("pytorch_half_pixel", "round_prefer_ceil"), ("tf_half_pixel_for_nn", "floor"),
                 ("half_pixel", "floor"), ("asymmetric", "ceil"), ("align_corners", "floor")]


def _nearest_upsample(g: GraphGen, x: Tensor) -> Tensor | None:
    n, c, h, w = x.shape
    factors = [int(g.choice([1, 2, 2, 3])), int(g.choice([2, 2, 3]))]
    shape = (n, c, h * factors[0], w * factors[1])
    if int(np.prod(shape)) > MAX_ELEMENTS // 2:
        return None
    coordinate, rounding = NEAREST_MODES[int(g.rng.integers(len(NEAREST_MODES)))]
    roi = "" if g.opset >= 13 else g.const(np.zeros(0, np.float32), "roi")
    scales = g.const(np.array([1, 1, *factors], np.float32), "scales")
    return g.one("Resize", [x.name, roi, scales], shape, mode="nearest",
                 coordinate_transformation_mode=coordinate, nearest_mode=rounding)


@motif("upsample_conv", 1.0)
def _upsample_conv(g: GraphGen) -> bool:
    """An FPN head: nearest Resize -> [Concat with a map of the upsampled size] -> Conv
    (-> BN -> Relu)."""
    x = g.pick(lambda t: _image(t) and t.shape[2] * t.shape[3] <= 16)
    if x is None:
        return False
    up = _nearest_upsample(g, x)
    if up is None:
        return False
    if g.rng.random() < 0.5:
        shape = (up.shape[0], int(g.rng.integers(1, 4)), *up.shape[2:])
        if g.parent is None:            # an If branch cannot take graph inputs: a constant there
            other = g.add_input(shape)
        else:
            other = Tensor(g.const(g.rng.standard_normal(shape).astype(np.float32), "piece"), shape)
        parts = [other, up] if g.rng.random() < 0.5 else [up, other]
        up = g.one("Concat", [p.name for p in parts],
                   (up.shape[0], sum(p.shape[1] for p in parts), *up.shape[2:]), axis=1)
    y = _make_conv(g, up, kernel=int(g.choice([3, 3, 2, 5])), same=True, group=1)
    if g.rng.random() < 0.5:
        g.one("Relu", [_batchnorm(g, y).name], y.shape)
    return True


@motif("batchnorm", 1.0)
def _batchnorm_motif(g: GraphGen) -> bool:
    x = g.pick(lambda t: 2 <= t.rank <= 4)
    if x is None:
        return False
    _batchnorm(g, x)
    return True


@motif("conv_bn", 1.5)
def _conv_bn(g: GraphGen) -> bool:
    """Conv -> BatchNormalization (-> Relu); sometimes the Conv output has another reader, so the
    BN cannot be folded without keeping the unfolded Conv."""
    x = g.pick(_image)
    if x is None:
        return False
    y = _make_conv(g, x)
    if g.rng.random() < 0.2:
        g.one("Relu", [y.name], y.shape)  # a second reader of the conv output
    z = _batchnorm(g, y)
    if g.rng.random() < 0.5:
        g.one(g.choice(["Relu", "Relu", "Sigmoid"]), [z.name], z.shape)
    return True


@motif("residual", 1.2)
def _residual(g: GraphGen) -> bool:
    """x -> Conv3x3 -> BN -> Relu -> Conv3x3 (-> BN) -> Add x -> Relu (a ResNet basic block)."""
    x = g.pick(lambda t: _image(t) and t.shape[2] >= 2 and t.shape[3] >= 2)
    if x is None:
        return False
    c = x.shape[1]
    y = _make_conv(g, x, out_channels=c, kernel=3, same=True, group=1)
    y = _batchnorm(g, y)
    y = g.one("Relu", [y.name], y.shape)
    y = _make_conv(g, y, out_channels=c, kernel=3, same=True, group=1)
    if g.rng.random() < 0.5:
        y = _batchnorm(g, y)
    inputs = [y.name, x.name] if g.rng.random() < 0.5 else [x.name, y.name]
    s = g.one("Add", inputs, x.shape)
    g.one("Relu", [s.name], s.shape)
    return True


@motif("conv_activation", 1.0)
def _conv_activation(g: GraphGen) -> bool:
    """Conv followed by an epilogue the fusion pass may merge: Relu, Clip(0,6), LeakyRelu,
    Sigmoid, or an Add of a per-channel constant."""
    x = g.pick(_image)
    if x is None:
        return False
    y = _make_conv(g, x)
    kind = g.choice(["Relu", "Clip", "LeakyRelu", "Sigmoid", "AddBias", "HardSigmoid"])
    if kind == "Clip":
        g.clip(y, 0.0, 6.0)
    elif kind == "LeakyRelu":
        g.one(kind, [y.name], y.shape, alpha=0.1)
    elif kind == "AddBias":
        b = g.const((g.rng.standard_normal((y.shape[1], 1, 1)) * 0.1).astype(np.float32), "bias")
        g.one("Add", [y.name, b], y.shape)
    else:
        g.one(kind, [y.name], y.shape)
    return True


@motif("gemm", 1.5)
def _gemm(g: GraphGen) -> bool:
    x = g.pick(lambda t: t.rank == 2)
    if x is None:
        return False
    trans_a = int(g.rng.random() < 0.3)
    m, k = (x.shape[1], x.shape[0]) if trans_a else x.shape
    n = int(g.rng.integers(1, 17))
    trans_b = int(g.rng.random() < 0.5)
    b = g.weight((n, k) if trans_b else (k, n), k, "gemm_w")
    inputs = [x.name, b]
    attrs: dict = {}
    if trans_a:
        attrs["transA"] = 1
    if trans_b:
        attrs["transB"] = 1
    if g.rng.random() < 0.3:
        attrs["alpha"] = float(g.rng.uniform(0.5, 2))
    form = g.rng.integers(5)
    if form > 0:
        cshape = [(n,), (1, n), (m, n), ()][form - 1]
        inputs.append(g.const((g.rng.standard_normal(cshape) * 0.1).astype(np.float32), "gemm_c"))
        if g.rng.random() < 0.3:
            attrs["beta"] = float(g.rng.uniform(0.5, 2))
    y = g.one("Gemm", inputs, (m, n), **attrs)
    if g.rng.random() < 0.4:
        g.one(g.choice(["Relu", "Sigmoid", "Tanh"]), [y.name], y.shape)
    return True


@motif("matmul", 1.5)
def _matmul(g: GraphGen) -> bool:
    """MatMul of a tensor by a weight (2-D or batched, weight on either side), often + bias."""
    x = g.pick(lambda t: t.rank >= 2)
    if x is None:
        return False
    k = x.shape[-1]
    n = int(g.rng.integers(1, 17))
    if g.rng.random() < 0.25 and x.rank >= 3:
        wshape: Shape = x.shape[:-2] + (k, n)  # batched weight
    else:
        wshape = (k, n)
    if g.rng.random() < 0.2:  # weight on the left: W[m2, rows] @ x[..., rows, k]
        m2 = int(g.rng.integers(1, 9))
        w = g.weight((m2, x.shape[-2]), x.shape[-2], "mm_w")
        g.one("MatMul", [w, x.name], x.shape[:-2] + (m2, k))
        return True
    w = g.weight(wshape, k, "mm_w")
    out = x.shape[:-1] + (n,)
    if int(np.prod(out)) > MAX_ELEMENTS:
        return False
    y = g.one("MatMul", [x.name, w], out)
    if g.rng.random() < 0.6:
        bias = g.const((g.rng.standard_normal((n,)) * 0.1).astype(np.float32), "mm_b")
        inputs = [y.name, bias] if g.rng.random() < 0.7 else [bias, y.name]
        y = g.one("Add", inputs, out)
        if g.rng.random() < 0.4:
            g.one("Relu", [y.name], out)
    return True


@motif("attention", 0.8)
def _attention(g: GraphGen) -> bool:
    """Scores = Softmax(Q @ Transpose(K) * scale); out = Scores @ V (tensor x tensor MatMuls)."""
    x = g.pick(lambda t: t.rank in (2, 3) and t.shape[-2] <= 16)
    if x is None:
        return False
    d = x.shape[-1]
    q = g.one("MatMul", [x.name, g.weight((d, d), d, "wq")], x.shape)
    kk = g.one("MatMul", [x.name, g.weight((d, d), d, "wk")], x.shape)
    v = g.one("MatMul", [x.name, g.weight((d, d), d, "wv")], x.shape)
    perm = list(range(x.rank))
    perm[-1], perm[-2] = perm[-2], perm[-1]
    kt = g.transpose(kk, perm)
    seq = x.shape[-2]
    scores = g.one("MatMul", [q.name, kt.name], x.shape[:-1] + (seq,))
    scores = g.one("Mul", [scores.name, g.const(np.array(1 / math.sqrt(d), np.float32), "scale")],
                   scores.shape)
    probs = g.one("Softmax", [scores.name], scores.shape, axis=-1 if g.opset >= 13 else x.rank - 1)
    g.one("MatMul", [probs.name, v.name], x.shape)
    return True


@motif("multihead_attention", 0.8)
def _multihead_attention(g: GraphGen) -> bool:
    """Multi-head attention as exporters write it: per projection MatMul (+ bias) -> Reshape
    [B, S, H, Dh] -> Transpose to heads first ([0,2,1,3]; K sometimes straight to [0,2,3,1]),
    scores, Softmax, weighted sum, Transpose back and Reshape to [B, S, D]."""
    x = g.pick(lambda t: t.rank == 3 and t.shape[-1] >= 2 and t.shape[1] <= 16)
    if x is None:
        return False
    b, seq, d = x.shape
    heads = int(g.choice([h for h in divisors(d) if h < d] or [1]))
    dh = d // heads
    split_shape = [0 if g.rng.random() < 0.3 else b, seq if g.rng.random() < 0.7 else -1,
                   heads, dh]

    def project(hint: str, perm: list[int]) -> Tensor:
        y = g.one("MatMul", [x.name, g.weight((d, d), d, hint)], (b, seq, d))
        if g.rng.random() < 0.7:
            bias = g.const((g.rng.standard_normal(d) * 0.1).astype(np.float32), hint + "_b")
            y = g.one("Add", [y.name, bias], (b, seq, d))
        y = g.reshape(y, split_shape, (b, seq, heads, dh))
        return g.transpose(y, perm)

    q = project("wq", [0, 2, 1, 3])
    if g.rng.random() < 0.5:
        kt = project("wk", [0, 2, 3, 1])
    else:
        kt = g.transpose(project("wk", [0, 2, 1, 3]), [0, 1, 3, 2])
    v = project("wv", [0, 2, 1, 3])
    scores = g.one("MatMul", [q.name, kt.name], (b, heads, seq, seq))
    scores = g.one("Div", [scores.name, g.const(np.array(math.sqrt(dh), np.float32), "sqrt_dh")],
                   scores.shape)
    probs = g.one("Softmax", [scores.name], scores.shape, axis=3)  # the last axis: any opset
    ctx = g.one("MatMul", [probs.name, v.name], (b, heads, seq, dh))
    ctx = g.transpose(ctx, [0, 2, 1, 3])
    g.reshape(ctx, [b, seq, d] if g.rng.random() < 0.5 else [0, 0, -1], (b, seq, d))
    return True


@motif("transpose", 1.0)
def _transpose(g: GraphGen) -> bool:
    x = g.pick(lambda t: t.rank >= 2)
    if x is None:
        return False
    perm = None if g.rng.random() < 0.1 else [int(p) for p in g.rng.permutation(x.rank)]
    g.transpose(x, perm)
    return True


@motif("transpose_pair", 1.5)
def _transpose_pair(g: GraphGen) -> bool:
    """Transpose p then its inverse (cancels), or then another permutation (composes); sometimes
    an elementwise op in between, or a second reader of the middle tensor."""
    x = g.pick(lambda t: t.rank >= 2)
    if x is None:
        return False
    perm = [int(p) for p in g.rng.permutation(x.rank)]
    mid = g.transpose(x, perm)
    if g.rng.random() < 0.4:
        kind = g.choice(["Relu", "Sigmoid", "AddConst", "MulConst"])
        if kind in ("Relu", "Sigmoid"):
            mid = g.one(kind, [mid.name], mid.shape)
        else:
            cshape = broadcastable_const_shape(g.rng, mid.shape)
            c = g.const(g.rng.standard_normal(cshape).astype(np.float32), "k")
            mid = g.one("Add" if kind == "AddConst" else "Mul", [mid.name, c], mid.shape)
    if g.rng.random() < 0.2:
        g.one("Tanh", [mid.name], mid.shape)  # a second reader of the middle
    if g.rng.random() < 0.7:
        second = inverse_perm(perm)
    else:
        second = [int(p) for p in g.rng.permutation(x.rank)]
    g.transpose(mid, second)
    return True


@motif("channel_shuffle", 1.0)
def _channel_shuffle(g: GraphGen) -> bool:
    """Reshape [N,C,H,W] -> [N,g,C/g,H,W], Transpose(0,2,1,3,4), Reshape back (ShuffleNet)."""
    x = g.pick(lambda t: _image(t) and len(divisors(t.shape[1])) > 2)
    if x is None:
        return False
    n, c, h, w = x.shape
    groups = int(g.choice([d for d in divisors(c) if 1 < d < c]))
    target = [n, groups, c // groups, h, w]
    if g.rng.random() < 0.3:
        target[0] = 0 if g.rng.random() < 0.5 else -1
    r = g.reshape(x, target, (n, groups, c // groups, h, w))
    t = g.transpose(r, [0, 2, 1, 3, 4])
    back = [n, c, h, w] if g.rng.random() < 0.6 else [n, -1, h, w]
    shuffled = g.reshape(t, back, (n, c, h, w))
    if g.rng.random() < 0.4:      # a dense conv reading the shuffle: channel_shuffle absorbs it
        _make_conv(g, shuffled, group=1)
    return True


@motif("reshape", 1.0)
def _reshape(g: GraphGen) -> bool:
    x = g.pick()
    if x is None or x.rank == 0:
        return False
    rank = int(g.rng.integers(1, 5))
    shape = random_factorization(g.rng, x.size, rank)
    target = list(shape)
    if g.rng.random() < 0.4:
        target[int(g.rng.integers(rank))] = -1
    for i in range(min(rank, x.rank)):
        if target[i] == x.shape[i] and g.rng.random() < 0.3:
            target[i] = 0  # copy the input's dim
    g.reshape(x, target, shape)
    return True


@motif("reshape_chain", 1.0)
def _reshape_chain(g: GraphGen) -> bool:
    """Reshape -> Reshape, Flatten -> Reshape, or Unsqueeze -> Squeeze (an identity pair), or a
    Reshape to the same shape."""
    x = g.pick(lambda t: t.rank >= 1)
    if x is None:
        return False
    kind = g.rng.integers(4)
    if kind == 0:
        shape = random_factorization(g.rng, x.size, int(g.rng.integers(1, 5)))
        mid = g.reshape(x, list(shape), shape)
        final = random_factorization(g.rng, x.size, int(g.rng.integers(1, 5)))
        g.reshape(mid, list(final), final)
    elif kind == 1:
        axis = int(g.rng.integers(0, x.rank + 1))
        lead = int(np.prod(x.shape[:axis], dtype=np.int64))
        flat = g.one("Flatten", [x.name], (lead, x.size // lead), axis=axis)
        g.reshape(flat, list(x.shape), x.shape)
    elif kind == 2:
        axes = _new_axes(g, x.rank, int(g.rng.integers(1, 3)))
        u = g.unsqueeze(x, axes)
        g.squeeze(u, axes)
    else:
        g.reshape(x, list(x.shape), x.shape)
    return True


def _new_axes(g: GraphGen, rank: int, k: int) -> list[int]:
    """k distinct Unsqueeze axes for a rank-`rank` input (positions in the rank+k output),
    some written negative, in random order."""
    positions = [int(p) for p in g.rng.permutation(rank + k)[:k]]
    return [p - (rank + k) if g.rng.random() < 0.3 else p for p in positions]


@motif("flatten", 0.6)
def _flatten(g: GraphGen) -> bool:
    x = g.pick(lambda t: t.rank >= 1)
    if x is None:
        return False
    axis = int(g.rng.integers(-x.rank, x.rank + 1))
    a = axis + x.rank if axis < 0 else axis
    lead = int(np.prod(x.shape[:a], dtype=np.int64))
    g.one("Flatten", [x.name], (lead, x.size // lead), axis=axis)
    return True


@motif("squeeze_unsqueeze", 0.8)
def _squeeze_unsqueeze(g: GraphGen) -> bool:
    x = g.pick(lambda t: t.rank <= 4)
    if x is None:
        return False
    ones = [i for i, d in enumerate(x.shape) if d == 1]
    if ones and g.rng.random() < 0.6:
        chosen = [i - x.rank if g.rng.random() < 0.3 else i for i in ones
                  if g.rng.random() < 0.7] or [ones[0]]
        g.squeeze(x, chosen)
    else:
        g.unsqueeze(x, _new_axes(g, x.rank, int(g.rng.integers(1, 3))))
    return True


@motif("concat", 1.0)
def _concat(g: GraphGen) -> bool:
    x = g.pick(lambda t: t.rank >= 1)
    if x is None:
        return False
    axis = int(g.rng.integers(x.rank))
    parts = [x]
    for _ in range(int(g.rng.integers(1, 4))):
        if g.rng.random() < 0.3:
            parts.append(x)  # the same tensor twice
            continue
        y = g.pick(lambda t: t.rank == x.rank and all(
            a == b for i, (a, b) in enumerate(zip(t.shape, x.shape)) if i != axis))
        if y is not None and g.rng.random() < 0.7:
            parts.append(y)
        else:  # a constant piece
            dims = list(x.shape)
            dims[axis] = int(g.rng.integers(1, 4))
            c = g.const(g.rng.standard_normal(dims).astype(np.float32), "piece")
            parts.append(Tensor(c, tuple(dims)))
    if len(parts) == 1 or g.rng.random() < 0.05:
        parts = parts[:1]  # Concat of a single input
    dims = list(x.shape)
    dims[axis] = sum(p.shape[axis] for p in parts)
    if int(np.prod(dims)) > MAX_ELEMENTS:
        return False
    stored_axis = axis - x.rank if g.rng.random() < 0.3 else axis
    g.one("Concat", [p.name for p in parts], tuple(dims), axis=stored_axis)
    return True


@motif("split", 1.0)
def _split(g: GraphGen) -> bool:
    x = g.pick(lambda t: t.rank >= 1 and max(t.shape) >= 2)
    if x is None:
        return False
    axes = [i for i, d in enumerate(x.shape) if d >= 2]
    axis = int(g.choice(axes))
    d = x.shape[axis]
    n = int(g.rng.integers(1, min(d, 4) + 1))
    sizes = _random_sizes(g.rng, d, n)
    outs = g.split(x, axis, sizes)
    # some outputs are left unread (dead), others get a reader
    for o in outs:
        if g.rng.random() < 0.5:
            g.one(g.choice(["Relu", "Sigmoid", "Neg"]), [o.name], o.shape)
    return True


def _random_sizes(rng: np.random.Generator, total: int, n: int) -> list[int]:
    if n == 1:
        return [total]
    if total % n == 0 and rng.random() < 0.5:
        return [total // n] * n
    cuts = sorted(int(c) for c in rng.choice(np.arange(1, total), size=n - 1, replace=False))
    return [b - a for a, b in zip([0] + cuts, cuts + [total])]


@motif("concat_split", 1.2)
def _concat_split(g: GraphGen) -> bool:
    """Concat pieces then Split: at the same sizes (the Split returns the pieces) or at others."""
    x = g.pick(lambda t: t.rank >= 1)
    if x is None:
        return False
    axis = int(g.rng.integers(x.rank))
    parts = [x]
    for _ in range(int(g.rng.integers(1, 3))):
        y = g.pick(lambda t: t.rank == x.rank and t.name not in {p.name for p in parts} and all(
            a == b for i, (a, b) in enumerate(zip(t.shape, x.shape)) if i != axis))
        parts.append(y if y is not None else x)
    dims = list(x.shape)
    dims[axis] = sum(p.shape[axis] for p in parts)
    if int(np.prod(dims)) > MAX_ELEMENTS:
        return False
    cat = g.one("Concat", [p.name for p in parts], tuple(dims), axis=axis)
    if g.rng.random() < 0.7:
        sizes = [p.shape[axis] for p in parts]
    else:
        sizes = _random_sizes(g.rng, dims[axis], min(len(parts), dims[axis]))
    if g.rng.random() < 0.2:
        g.one("Relu", [cat.name], cat.shape)  # the Concat has another reader
    outs = g.split(cat, axis, sizes)
    for o in outs:
        if g.rng.random() < 0.7:
            g.one(g.choice(["Relu", "Sigmoid", "Tanh"]), [o.name], o.shape)
    return True


@motif("split_concat", 1.0)
def _split_concat(g: GraphGen) -> bool:
    """Split then Concat of the pieces: in order on the same axis (the identity), or reordered,
    or on another axis (not the identity)."""
    x = g.pick(lambda t: t.rank >= 1 and max(t.shape) >= 2)
    if x is None:
        return False
    axis = int(g.choice([i for i, d in enumerate(x.shape) if d >= 2]))
    n = int(g.rng.integers(2, min(x.shape[axis], 4) + 1))
    outs = g.split(x, axis, _random_sizes(g.rng, x.shape[axis], n))
    kind = g.rng.integers(3)
    if kind == 1:
        order = [int(i) for i in g.rng.permutation(len(outs))]
        outs = [outs[i] for i in order]
    dims = list(x.shape)
    if kind == 2 and x.rank >= 2:
        other = int(g.choice([i for i in range(x.rank) if i != axis]))
        same = [o for o in outs if o.shape == outs[0].shape]
        dims = list(same[0].shape)
        dims[other] *= len(same)
        g.one("Concat", [o.name for o in same], tuple(dims), axis=other)
        return True
    g.one("Concat", [o.name for o in outs], tuple(dims), axis=axis)
    return True


@motif("slice", 1.0)
def _slice(g: GraphGen) -> bool:
    x = g.pick(lambda t: t.rank >= 1)
    if x is None:
        return False
    naxes = int(g.rng.integers(1, x.rank + 1))
    axes = [int(a) for a in g.rng.permutation(x.rank)[:naxes]]
    starts, ends, steps = [], [], []
    probe = np.empty(x.shape, dtype=np.uint8)
    index: list[slice] = [slice(None)] * x.rank
    for a in axes:
        d = x.shape[a]
        step = int(g.choice([1, 1, 1, 2, -1, -2]))
        start = int(g.rng.integers(-d, d)) if d > 0 else 0
        end = int(g.choice([int(g.rng.integers(-d - 1, d + 2)), 2**62, -(2**62)]))
        if step > 0 and end == -(2**62):
            end = 2**62
        if step < 0 and end == 2**62:
            end = -(2**62)
        starts.append(start)
        ends.append(end)
        steps.append(step)
        index[a] = slice(start, end if abs(end) < 2**61 else (None), step)
    shape = probe[tuple(index)].shape
    if 0 in shape:
        return False  # zero-sized tensors belong to the bad-input corpus, not here
    inputs = [x.name, g.ints(starts, "starts"), g.ints(ends, "ends")]
    if g.rng.random() < 0.8 or any(s != 1 for s in steps):
        stored = [a - x.rank if g.rng.random() < 0.3 else a for a in axes]
        inputs.append(g.ints(stored, "axes"))
        if any(s != 1 for s in steps) or g.rng.random() < 0.5:
            inputs.append(g.ints(steps, "steps"))
    elif axes != list(range(naxes)):
        return False
    g.one("Slice", inputs, shape)
    return True


@motif("reduce_mean", 0.8)
def _reduce_mean(g: GraphGen) -> bool:
    x = g.pick(lambda t: t.rank >= 1)
    if x is None:
        return False
    k = int(g.rng.integers(1, x.rank + 1))
    axes = [int(a) - (x.rank if g.rng.random() < 0.3 else 0) for a in g.rng.permutation(x.rank)[:k]]
    g.reduce_mean(x, axes, int(g.rng.random() < 0.6))
    return True


@motif("layernorm", 1.0)
def _layernorm(g: GraphGen) -> bool:
    """Decomposed LayerNorm over the last axis: ReduceMean, Sub, Pow 2 (or Mul by itself),
    ReduceMean, Add eps, Sqrt, Div (or Mul by Reciprocal), then optional gamma and beta."""
    x = g.pick(lambda t: t.rank >= 2 and t.shape[-1] >= 4)
    if x is None:
        return False
    # A row of equal values (a saturated Clip/HardSigmoid) normalizes to 0, but the decomposed
    # float32 form returns rounding noise times 1/sqrt(eps) (~1e-5) where a fused op returns 0:
    # an oracle artefact, not a bug. An offset that varies along the row rules it out.
    offset = np.linspace(-0.5, 0.5, x.shape[-1], dtype=np.float32)
    x = g.one("Add", [x.name, g.const(offset, "ln_offset")], x.shape)
    mean = g.reduce_mean(x, [-1], 1)
    centered = g.one("Sub", [x.name, mean.name], x.shape)
    if g.rng.random() < 0.6:
        sq = g.one("Pow", [centered.name, g.const(np.array(2.0, np.float32), "two")], x.shape)
    else:
        sq = g.one("Mul", [centered.name, centered.name], x.shape)
    var = g.reduce_mean(sq, [-1], 1)
    eps = g.one("Add", [var.name, g.const(np.array(1e-5, np.float32), "eps")], var.shape)
    std = g.one("Sqrt", [eps.name], var.shape)
    if g.rng.random() < 0.7:
        y = g.one("Div", [centered.name, std.name], x.shape)
    else:
        r = g.one("Reciprocal", [std.name], var.shape)
        y = g.one("Mul", [centered.name, r.name], x.shape)
    d = x.shape[-1]
    if g.rng.random() < 0.8:
        y = g.one("Mul", [y.name, g.const(g.rng.uniform(0.5, 1.5, d).astype(np.float32), "gamma")],
                  x.shape)
        if g.rng.random() < 0.8:
            y = g.one("Add", [y.name, g.const((g.rng.standard_normal(d) * 0.1).astype(np.float32),
                                              "beta")], x.shape)
    return True


@motif("gelu", 1.0)
def _gelu(g: GraphGen) -> bool:
    """GELU written out: erf form x*0.5*(1+erf(x/sqrt2)) in its usual orderings, or the tanh
    approximation 0.5*x*(1+tanh(sqrt(2/pi)*(x+0.044715*x^3)))."""
    x = g.pick()
    if x is None:
        return False
    s = x.shape
    if g.rng.random() < 0.75:
        if g.rng.random() < 0.5:
            scaled = g.one("Div", [x.name, g.const(np.array(math.sqrt(2), np.float32), "sqrt2")], s)
        else:
            isqrt2 = g.const(np.array(1 / math.sqrt(2), np.float32), "isqrt2")
            scaled = g.one("Mul", [x.name, isqrt2], s)
        e = g.one("Erf", [scaled.name], s)
        one = g.one("Add", [e.name, g.const(np.array(1.0, np.float32), "one")], s)
        if g.rng.random() < 0.5:
            m = g.one("Mul", [x.name, one.name], s)
            g.one("Mul", [m.name, g.const(np.array(0.5, np.float32), "half")], s)
        else:
            h = g.one("Mul", [x.name, g.const(np.array(0.5, np.float32), "half")], s)
            g.one("Mul", [h.name, one.name], s)
        return True
    cube = g.one("Pow", [x.name, g.const(np.array(3.0, np.float32), "three")], s)
    c = g.one("Mul", [cube.name, g.const(np.array(0.044715, np.float32), "c")], s)
    inner = g.one("Add", [x.name, c.name], s)
    k = g.one("Mul", [inner.name, g.const(np.array(math.sqrt(2 / math.pi), np.float32), "k")], s)
    t = g.one("Tanh", [k.name], s)
    one = g.one("Add", [t.name, g.const(np.array(1.0, np.float32), "one")], s)
    h = g.one("Mul", [x.name, g.const(np.array(0.5, np.float32), "half")], s)
    g.one("Mul", [h.name, one.name], s)
    return True


@motif("hardswish", 0.8)
def _hardswish(g: GraphGen) -> bool:
    """x * HardSigmoid(x, 1/6, 0.5), x * Clip(x + 3, 0, 6) / 6, or Swish x * Sigmoid(x)."""
    x = g.pick()
    if x is None:
        return False
    s = x.shape
    kind = g.rng.integers(3)
    if kind == 0:
        hs = g.one("HardSigmoid", [x.name], s, alpha=1 / 6, beta=0.5)
        inputs = [x.name, hs.name] if g.rng.random() < 0.5 else [hs.name, x.name]
        g.one("Mul", inputs, s)
    elif kind == 1:
        p = g.one("Add", [x.name, g.const(np.array(3.0, np.float32), "three")], s)
        c = g.clip(p, 0.0, 6.0)
        m = g.one("Mul", [x.name, c.name], s)
        if g.rng.random() < 0.5:
            g.one("Div", [m.name, g.const(np.array(6.0, np.float32), "six")], s)
        else:
            g.one("Mul", [m.name, g.const(np.array(1 / 6, np.float32), "sixth")], s)
    else:
        sg = g.one("Sigmoid", [x.name], s)
        g.one("Mul", [x.name, sg.name], s)
    return True


@motif("duplicate", 1.0)
def _duplicate(g: GraphGen) -> bool:
    """The same computation twice (CSE merges it), sometimes with equal constants under two
    names, sometimes with attributes that differ (must not merge)."""
    x = g.pick()
    if x is None:
        return False
    kind = g.rng.integers(3)
    if kind == 0:
        a = g.one("Relu", [x.name], x.shape)
        b = g.one("Relu", [x.name], x.shape)
    elif kind == 1:
        value = g.rng.standard_normal(broadcastable_const_shape(g.rng, x.shape)).astype(np.float32)
        a = g.one("Mul", [x.name, g.const(value, "dup")], x.shape)
        b = g.one("Mul", [x.name, g.const(value.copy(), "dup")], x.shape)
    else:
        a = g.one("LeakyRelu", [x.name], x.shape, alpha=0.1)
        b = g.one("LeakyRelu", [x.name], x.shape, alpha=0.2)
    g.one("Add", [a.name, b.name], x.shape)
    return True


@motif("shape_chain", 0.8)
def _shape_chain(g: GraphGen) -> bool:
    """Reshape whose target is computed from Shape: Shape -> Gather -> Unsqueeze -> Concat with
    constants -> Reshape (how exporters write x.view(x.size(0), -1)); folds to a constant."""
    x = g.pick(lambda t: t.rank >= 2)
    if x is None:
        return False
    shape = g.node("Shape", [x.name], [(x.rank,)], dtypes=[TensorProto.INT64], pool=False)[0]
    idx = g.const(np.array(0, np.int64), "idx")
    first = g.node("Gather", [shape.name, idx], [()], dtypes=[TensorProto.INT64], pool=False,
                   axis=0)[0]
    if g.opset >= 13:
        lead = g.node("Unsqueeze", [first.name, g.ints([0], "axes")], [(1,)],
                      dtypes=[TensorProto.INT64], pool=False)[0]
    else:
        lead = g.node("Unsqueeze", [first.name], [(1,)], dtypes=[TensorProto.INT64], pool=False,
                      axes=[0])[0]
    target = g.node("Concat", [lead.name, g.ints([-1], "minus1")], [(2,)],
                    dtypes=[TensorProto.INT64], pool=False, axis=0)[0]
    g.one("Reshape", [x.name, target.name], (x.shape[0], x.size // x.shape[0]))
    return True


@motif("const_subgraph", 0.6)
def _const_subgraph(g: GraphGen) -> bool:
    """A weight computed from constants (Transpose / Reshape / Mul / Add of initializers) before
    use; constant folding evaluates it once."""
    x = g.pick(lambda t: t.rank >= 1)
    if x is None:
        return False
    shape = broadcastable_const_shape(g.rng, x.shape) or (1,)
    if len(shape) > x.rank:
        shape = shape[-x.rank:]
    base = g.const(g.rng.standard_normal(shape[::-1]).astype(np.float32), "base")
    t = g.node("Transpose", [base], [shape], pool=False,
               perm=list(range(len(shape)))[::-1])[0]
    scaled = g.node("Mul", [t.name, g.const(np.array(0.5, np.float32), "half")], [shape],
                    pool=False)[0]
    g.one(g.choice(["Add", "Mul", "Sub"]), [x.name, scaled.name], x.shape)
    return True


@motif("identity_traps", 1.0)
def _identity_traps(g: GraphGen) -> bool:
    """Ops that look like no-ops: Add 0 / Mul 1 / Div 1 (a no-op only if they do not broadcast the
    input to a larger shape), 0 - x (not a no-op: it negates), Transpose with the identity perm,
    Split into one piece, Slice of the full range, Identity chains."""
    x = g.pick()
    if x is None:
        return False
    kind = g.rng.integers(7)
    s = x.shape
    if kind == 0:
        op, fill = g.choice([("Add", 0.0), ("Mul", 1.0), ("Div", 1.0), ("Sub", 0.0)])
        bigger = g.rng.random() < 0.3 and x.size * 2 <= MAX_ELEMENTS
        cshape = (2,) + tuple(s) if bigger else broadcastable_const_shape(g.rng, s)
        c = g.const(np.full(cshape, fill, np.float32), "neutral")
        out = broadcast(s, cshape)
        assert out is not None
        inputs = [c, x.name] if op in ("Add", "Mul") and g.rng.random() < 0.5 else [x.name, c]
        g.one(op, inputs, out)
    elif kind == 1:
        c = g.const(np.zeros((), np.float32), "zero")
        g.one("Sub", [c, x.name], s)
    elif kind == 2 and x.rank >= 1:
        g.transpose(x, list(range(x.rank)))
    elif kind == 3 and x.rank >= 1:
        axis = int(g.rng.integers(x.rank))
        g.split(x, axis, [x.shape[axis]])
    elif kind == 4 and x.rank >= 1:
        a = int(g.rng.integers(x.rank))
        g.one("Slice", [x.name, g.ints([0], "starts"), g.ints([2**62], "ends"),
                        g.ints([a], "axes")], s)
    else:
        y = g.one("Identity", [x.name], s)
        g.one("Identity", [y.name], s)
    return True


@motif("softmax_decomposed", 0.8)
def _softmax_decomposed(g: GraphGen) -> bool:
    """Exp(x - ReduceMax(x)) / ReduceSum(...) over one axis (the max subtraction sometimes left
    out), or over an axis that is not the last one (a Softmax only from opset 13 on)."""
    x = g.pick(lambda t: t.rank >= 1)
    if x is None:
        return False
    axis = -1 if g.rng.random() < 0.6 else int(g.rng.integers(x.rank))
    src = x
    if g.rng.random() < 0.7:
        peak = g.reduce("ReduceMax", x, [axis], 1)
        src = g.one("Sub", [x.name, peak.name], x.shape)
    e = g.one("Exp", [src.name], x.shape)
    total = g.reduce("ReduceSum", e, [axis], 1)
    g.one("Div", [e.name, total.name], x.shape)
    return True


@motif("slices_concat", 1.0)
def _slices_concat(g: GraphGen) -> bool:
    """Adjacent Slices (or Split outputs) of one tensor concatenated back along their axis: all of
    it in order (the tensor itself), part of it (one Slice), or out of order (neither)."""
    x = g.pick(lambda t: t.rank >= 1 and max(t.shape) >= 2)
    if x is None:
        return False
    axis = int(g.choice([i for i, d in enumerate(x.shape) if d >= 2]))
    d = x.shape[axis]
    sizes = _random_sizes(g.rng, d, int(g.rng.integers(2, min(d, 4) + 1)))
    bounds = np.cumsum([0] + sizes)
    if g.rng.random() < 0.5:
        pieces = [g.slice(x, axis, int(a), int(b) if b < d or g.rng.random() < 0.5 else 2**62)
                  for a, b in zip(bounds[:-1], bounds[1:])]
    else:
        pieces = g.split(x, axis, sizes)
    kind = g.rng.integers(4)
    if kind == 1 and len(pieces) > 2:
        pieces = pieces[1:]  # a partial cover
    elif kind == 2:
        pieces = pieces[::-1]
    elif kind == 3:
        pieces[0] = g.one("Relu", [pieces[0].name], pieces[0].shape)  # not a plain piece
    dims = list(x.shape)
    dims[axis] = sum(p.shape[axis] for p in pieces)
    g.one("Concat", [p.name for p in pieces], tuple(dims), axis=axis)
    return True


@motif("slice_chain", 0.7)
def _slice_chain(g: GraphGen) -> bool:
    """Slice of a Slice (same axis or another), or sibling Slices tiling an axis (one Split)."""
    x = g.pick(lambda t: t.rank >= 1 and max(t.shape) >= 3)
    if x is None:
        return False
    axis = int(g.choice([i for i, d in enumerate(x.shape) if d >= 3]))
    d = x.shape[axis]
    if g.rng.random() < 0.5:
        a = g.slice(x, axis, int(g.rng.integers(0, d - 1)), d)
        axis2 = axis if g.rng.random() < 0.6 else int(g.rng.integers(x.rank))
        d2 = a.shape[axis2]
        if d2 < 1:
            return False
        step = int(g.choice([1, 1, 2, -1]))
        if step > 0:
            start, end = int(g.rng.integers(0, d2)), int(g.rng.integers(1, d2 + 1))
            if end <= start:
                start, end = 0, d2
        else:
            start, end = d2 - 1, -(2**62)
        g.slice(a, axis2, start, end, step)
    else:
        cut = int(g.rng.integers(1, d))
        for start, end in ((0, cut), (cut, d)):
            piece = g.slice(x, axis, start, end)
            g.one(g.choice(["Relu", "Sigmoid", "Neg"]), [piece.name], piece.shape)
    return True


@motif("concat_concat", 0.6)
def _concat_concat(g: GraphGen) -> bool:
    """Concat of a Concat along the same axis (flattens into one) or another (does not)."""
    x = g.pick(lambda t: 1 <= t.rank and t.size * 3 <= MAX_ELEMENTS)
    if x is None:
        return False
    axis = int(g.rng.integers(x.rank))
    dims = list(x.shape)
    dims[axis] *= 2
    inner = g.one("Concat", [x.name, x.name], tuple(dims), axis=axis)
    other = axis if g.rng.random() < 0.7 else int(g.rng.integers(x.rank))
    c = list(inner.shape)
    c[other] = 1
    piece = g.const(g.rng.standard_normal(c).astype(np.float32), "piece")
    out = list(inner.shape)
    out[other] += 1
    inputs = [inner.name, piece] if g.rng.random() < 0.5 else [piece, inner.name]
    g.one("Concat", inputs, tuple(out), axis=other)
    return True


@motif("if_block", 0.8)
def _if_block(g: GraphGen) -> bool:
    """An If whose branches grow 1-3 motifs each from a tensor of the enclosing graph (an
    outer-scope reference), on a data-dependent condition (mean of the tensor > 0). Both branches
    are grown from the same random state, so they end in the same shape (their names and, for
    motifs that read other tensors, their structure may still differ); nested Ifs up to depth 2.
    The passes run inside the branches and must respect the outer references."""
    if g.depth >= 2:
        return False
    x = g.pick(lambda t: t.rank >= 1)
    if x is None:
        return False
    state = g.rng.bit_generator.state
    branches = []
    for _ in range(2):
        rng = np.random.Generator(type(g.rng.bit_generator)())
        rng.bit_generator.state = state
        branches.append(_grow_branch(g, x, rng))
    g.rng.integers(2)  # move the parent's stream past the branch draws
    (then_graph, then_out), (else_graph, else_out) = branches
    if then_out.shape != else_out.shape:
        return False
    mean = g.reduce_mean(x, list(range(x.rank)), 0)
    cond = g.node("Greater", [mean.name, g.const(np.array(0.0, np.float32), "zero")], [()],
                  dtypes=[TensorProto.BOOL], pool=False)[0]
    g.node("If", [cond.name], [then_out.shape], then_branch=then_graph, else_branch=else_graph)
    g.reads[x.name] = g.reads.get(x.name, 0) + 1
    return True


def _grow_branch(g: GraphGen, x: Tensor, rng: np.random.Generator
                 ) -> tuple[onnx.GraphProto, Tensor]:
    """A branch graph grown by a child generator whose pool starts with the outer tensor x."""
    child = GraphGen(rng, g.opset, parent=g)
    child.pool = [x]
    names = list(MOTIFS)
    weights = np.array([MOTIFS[n][0] for n in names])
    for _ in range(int(rng.integers(1, 4))):
        name = names[int(rng.choice(len(names), p=weights / weights.sum()))]
        mark = (len(child.nodes), len(child.initializers), len(child.pool))
        if MOTIFS[name][1](child):
            child.motifs.append(name)
        else:
            del child.nodes[mark[0]:], child.initializers[mark[1]:], child.pool[mark[2]:]
    produced = [t for t in child.pool if t.name != x.name]
    out = produced[-1] if produced else child.one("Relu", [x.name], x.shape)
    g.motifs.extend(f"if:{m}" for m in child.motifs)
    graph = helper.make_graph(child.nodes, g.fresh("branch"), [],
                              [helper.make_tensor_value_info(out.name, out.dtype, list(out.shape))],
                              child.initializers)
    return graph, out


@motif("dead_branch", 0.4)
def _dead_branch(g: GraphGen) -> bool:
    """Ops nobody reads (kept out of the pool so they stay dead)."""
    x = g.pick()
    if x is None:
        return False
    y = g.node("Exp", [x.name], [x.shape], pool=False)[0]
    g.node("Neg", [y.name], [x.shape], pool=False)
    return True


# ---------------------------------------------------------------------------------------------
# whole graphs
# ---------------------------------------------------------------------------------------------
def _random_input_shape(rng: np.random.Generator) -> Shape:
    kind = rng.integers(4)
    if kind <= 1:  # image NCHW
        return (int(rng.integers(1, 3)), int(rng.choice([1, 2, 3, 4, 6, 8, 12, 16])),
                int(rng.integers(1, 9)), int(rng.integers(1, 9)))
    if kind == 2:  # sequence [B, S, D]
        return (int(rng.integers(1, 3)), int(rng.integers(1, 9)), int(rng.choice([4, 6, 8, 16])))
    return (int(rng.integers(1, 9)), int(rng.integers(1, 33)))  # matrix


def _ir_version(opset: int) -> int:
    return 7 if opset <= 14 else 8 if opset <= 18 else 10


def generate(seed: int, *, max_motifs: int = 10) -> FuzzCase:
    """The model of `seed`: 1-3 inputs, 2..max_motifs motifs, outputs among the unread tensors and
    some intermediates. Deterministic in `seed`."""
    rng = np.random.default_rng(seed)
    g = GraphGen(rng, int(rng.choice(OPSETS)))
    for i in range(int(rng.integers(1, 4))):
        g.add_input(_random_input_shape(rng), overridable_default=i > 0 and rng.random() < 0.1)
    names = list(MOTIFS)
    weights = np.array([MOTIFS[n][0] for n in names])
    target = int(rng.integers(2, max_motifs + 1))
    attempts = 0
    while len(g.motifs) < target and attempts < target * 6:
        attempts += 1
        name = names[int(rng.choice(len(names), p=weights / weights.sum()))]
        mark = (len(g.nodes), len(g.initializers), len(g.pool))
        if MOTIFS[name][1](g):
            g.motifs.append(name)
        else:  # a motif that gives up mid-way leaves nothing behind
            del g.nodes[mark[0]:], g.initializers[mark[1]:], g.pool[mark[2]:]
    model = _assemble(g, rng)
    # A separate stream, so that the graphs of all seeds stay what they were before this option.
    side = np.random.default_rng([seed, 1])
    if side.random() < SYMBOLIC_FRACTION:
        _declare_symbolic(model, side)
    return FuzzCase(seed, model, g.feeds, g.motifs)


#: Share of cases whose inputs declare symbolic dims (the feeds keep the generated sizes).
SYMBOLIC_FRACTION = 0.25


def _declare_symbolic(model: onnx.ModelProto, rng: np.random.Generator) -> None:
    """Declare some input dims symbolic and the output dims unknown, so passes cannot lean on
    declared static shapes. Equal symbols always stand for equal sizes (`n<size>`), which is
    all a pass may assume about them."""
    initializers = {t.name for t in model.graph.initializer}
    for vi in model.graph.input:
        if vi.name in initializers:
            continue
        for i, dim in enumerate(vi.type.tensor_type.shape.dim):
            if i == 0 or rng.random() < 0.3:
                size = dim.dim_value
                dim.Clear()
                dim.dim_param = f"n{size}"
    for vi in model.graph.output:
        for dim in vi.type.tensor_type.shape.dim:
            dim.Clear()  # rank only


def _assemble(g: GraphGen, rng: np.random.Generator) -> onnx.ModelProto:
    """Pick the graph outputs and build the model."""
    input_names = {vi.name for vi in g.inputs}
    produced = [t for t in g.pool if t.name not in input_names]
    leaves = [t for t in produced if g.reads.get(t.name, 0) == 0]
    if not produced:  # nothing grew: one op so the graph is not empty
        x = g.pool[0]
        produced = leaves = [g.one("Relu", [x.name], x.shape)]
    rng.shuffle(leaves)
    outputs = leaves[: int(rng.integers(1, 5))] or [produced[-1]]
    inner = [t for t in produced if g.reads.get(t.name, 0) > 0 and t not in outputs]
    if inner and rng.random() < 0.4:
        outputs.append(inner[int(rng.integers(len(inner)))])
    outputs.extend(g.extra_outputs)
    seen: set[str] = set()
    unique = [t for t in outputs if not (t.name in seen or seen.add(t.name))]
    graph = helper.make_graph(
        g.nodes, "fuzz", g.inputs,
        [helper.make_tensor_value_info(t.name, t.dtype, list(t.shape)) for t in unique],
        g.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", g.opset)],
                              ir_version=_ir_version(g.opset), producer_name="graphopt-fuzz")
    return model
