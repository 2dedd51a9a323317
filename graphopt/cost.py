"""Per-op cost: FLOPs, bytes, op intensity and the GEMM view, and the per-model characterization.

What the numbers mean (they are counts of the math, not of any one kernel):

- FLOPs: a multiply-add counts 2. Conv/Gemm biases add 1 per output element. Elementwise and
  normalization ops count a small per-element number (`_ELEMENTWISE_FLOPS`), which only matters
  for the roofline of memory-bound ops. Data movement (Transpose, Concat, Gather...) is 0 FLOPs.
- Weight bytes: the bytes of inputs that are constant: initializers, Constant nodes, and anything
  computed only from constants (the light models in the onnx wheel make their weights with
  ConstantOfShape; a QDQ model reads int8 weights through DequantizeLinear, counted at their
  stored int8 size). An embedding lookup (Gather from a constant table along axis 0) counts only
  the rows it touches.
- Activation bytes: the non-constant inputs plus the outputs, each tensor once.
- Op intensity: FLOPs per byte, w.r.t. weights (FLOPs / weight bytes; None when the op has no
  weights) and w.r.t. weights + activations.
- GEMM view (Caffe2 convention): an M x K activation matrix times a K x N weight matrix, `groups`
  independent such products. Conv: M = batch*H_out*W_out, K = C_in/groups*kH*kW,
  N = C_out/groups. ConvTranspose (GEMM then col2im): M = batch*H_in*W_in, K = C_in/groups,
  N = C_out/groups*kH*kW. Gemm: from the operand shapes and transA/transB. MatMul with a 2-D
  weight flattens the activation's leading dims into M; a batched MatMul of two activations
  (attention) has groups = the broadcast batch size.

`analyze_model(graph, input_shapes)` runs shape inference and returns a `ModelCost`; `op_cost`
costs one op of a graph whose shapes are already known (passes use it for kernel choice).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx

from graphopt.errors import UsageError
from graphopt.ir import Graph, Op, Shape, Value, onnx_to_np_dtype

# Kernel classes: how an op's work is executed, which decides its roofline (see machine.py).
GEMM = "gemm"              # dense GEMM through BLAS (Conv via im2col, Gemm, MatMul)
DEPTHWISE = "depthwise"    # grouped conv with one input channel per group: no BLAS reuse
ELEMENTWISE = "elementwise"  # streams its tensors once, a few FLOPs per element
REDUCE = "reduce"          # pooling and reductions: read much, write little
COPY = "copy"              # contiguous data movement: Concat, Split, Slice, Pad...
GATHER = "gather"          # indexed or permuting data movement: Transpose, Gather, Resize...
EMBEDDING = "embedding"    # Gather rows of a constant table
VIEW = "view"              # metadata only (Reshape, Squeeze, Shape...): no bytes move
CONSTANT = "constant"      # computed only from constants: foldable, not real inference work
OTHER = "other"            # unknown op or unknown shapes: counted as bytes only

#: FLOPs per output element of elementwise-like ops (nominal; a transcendental is counted as a
#: handful of FLOPs, as a vectorized polynomial evaluates it).
_ELEMENTWISE_FLOPS: dict[str, int] = {
    "Add": 1, "Sub": 1, "Mul": 1, "Div": 1, "Neg": 1, "Abs": 1, "Relu": 1, "Max": 1, "Min": 1,
    "Sum": 1, "Mean": 1, "Pow": 1, "Sqrt": 1, "Reciprocal": 1, "Floor": 1, "Ceil": 1,
    "Round": 1, "Sign": 1, "Equal": 1, "Greater": 1, "Less": 1, "GreaterOrEqual": 1,
    "LessOrEqual": 1, "And": 1, "Or": 1, "Xor": 1, "Not": 1, "Where": 1, "Mod": 1,
    "LeakyRelu": 2, "PRelu": 2, "Clip": 2, "ThresholdedRelu": 1, "Selu": 4, "Elu": 4,
    "Celu": 4, "HardSigmoid": 3, "HardSwish": 4, "Sigmoid": 4, "Tanh": 6, "Exp": 4, "Log": 4,
    "Erf": 8, "Gelu": 10, "Softplus": 5, "Softsign": 3, "Mish": 10, "Sin": 4, "Cos": 4,
    "BatchNormalization": 2,           # inference form: x * scale' + shift'
    "InstanceNormalization": 6, "LayerNormalization": 8, "GroupNormalization": 8,
    "SimplifiedLayerNormalization": 6, "SkipLayerNormalization": 9,
    "Softmax": 5, "LogSoftmax": 5, "Hardmax": 2,
    "QuantizeLinear": 3, "DequantizeLinear": 2, "DynamicQuantizeLinear": 5,
    "IsNaN": 1, "IsInf": 1, "BiasGelu": 11, "FastGelu": 10,
}
#: Variadic ops that combine their inputs pairwise.
_VARIADIC = {"Sum", "Mean", "Max", "Min"}
_REDUCE_FLOPS: dict[str, int] = {
    "ReduceSum": 1, "ReduceMean": 1, "ReduceMax": 1, "ReduceMin": 1, "ReduceProd": 1,
    "ReduceL1": 2, "ReduceL2": 2, "ReduceSumSquare": 2, "ReduceLogSum": 1,
    "ReduceLogSumExp": 5, "ArgMax": 1, "ArgMin": 1, "GlobalAveragePool": 1, "GlobalMaxPool": 1,
    "GlobalLpPool": 2, "TopK": 2,
}
_POOL = {"MaxPool", "AveragePool", "LpPool"}
_VIEW_OPS = {"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity", "Dropout", "Shape",
             "Size", "Constant", "Optional", "OptionalGetElement"}
_COPY_OPS = {"Concat", "Split", "Slice", "Pad", "ConstantOfShape", "Range", "Trilu", "NonZero",
             "Compress", "CenterCropPad", "EyeLike", "Cast", "CastLike"}
#: Data movement whose reads (or writes) jump around: a transpose, an index lookup, a broadcast.
_GATHER_OPS = {"Transpose", "Tile", "Expand", "Gather", "GatherElements", "GatherND",
               "ScatterND", "ScatterElements", "DepthToSpace", "SpaceToDepth", "OneHot",
               "ReverseSequence", "Resize", "Upsample"}
#: Ops whose output is random: never constant even without inputs.
_NONDETERMINISTIC = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike",
                     "Multinomial", "Bernoulli"}
#: Input slots (activation, weight, bias) of the GEMM-like ops.
_CONV_SLOTS = {"Conv": (0, 1, 2), "ConvInteger": (0, 1, None), "QLinearConv": (0, 3, 8),
               "FusedConv": (0, 1, 2), "ConvTranspose": (0, 1, 2)}
_MATMUL_SLOTS = {"MatMul": (0, 1), "MatMulInteger": (0, 1), "QLinearMatMul": (0, 3),
                 "FusedMatMul": (0, 1), "MatMulIntegerToFloat": (0, 1)}
_INT8_OPS = {"ConvInteger", "QLinearConv", "MatMulInteger", "QLinearMatMul",
             "MatMulIntegerToFloat"}


@dataclass(frozen=True)
class GemmShape:
    """An M x K (activations) times K x N (weights) product, `groups` times."""

    M: int
    N: int
    K: int
    groups: int = 1

    @property
    def macs(self) -> int:
        return self.M * self.N * self.K * self.groups

    def to_dict(self) -> dict[str, int]:
        return {"M": self.M, "N": self.N, "K": self.K, "groups": self.groups}


@dataclass
class OpCost:
    """The cost of one op. `kind` names its kernel class (module constants above)."""

    name: str
    op_type: str
    op_id: int
    kind: str
    flops: int = 0
    weight_bytes: int = 0
    input_bytes: int = 0        # non-constant inputs
    output_bytes: int = 0
    gemm: GemmShape | None = None
    #: Bytes of the lowered form's scratch buffer: im2col (Conv with a kernel larger than 1x1,
    #: a stride or pads) or col2im (ConvTranspose); written once and read once by the GEMM.
    im2col_bytes: int = 0
    #: Largest conv stride: a strided im2col gathers non-contiguous input (slower per byte).
    im2col_stride: int = 1
    #: Kernel the op runs with: "fp32", "int8_acc32", "int8_acc16" (from the op's
    #: `graphopt.kernel` meta, else from its op type).
    kernel: str = "fp32"
    #: Whether every input shape needed for the count was known.
    known: bool = True
    #: Whether the weights are stored quantized (read through DequantizeLinear): weight_bytes
    #: are then already int8 bytes.
    quantized: bool = False

    @property
    def activation_bytes(self) -> int:
        return self.input_bytes + self.output_bytes

    @property
    def total_bytes(self) -> int:
        return self.weight_bytes + self.activation_bytes

    @property
    def intensity_weights(self) -> float | None:
        """FLOPs per weight byte; None when the op reads no weights."""
        return self.flops / self.weight_bytes if self.weight_bytes else None

    @property
    def intensity_total(self) -> float | None:
        """FLOPs per byte of weights plus activations; None when the op moves no bytes."""
        total = self.total_bytes
        return self.flops / total if total else None

    @property
    def gemm_like(self) -> bool:
        return self.gemm is not None

    def to_dict(self) -> dict:
        return {
            "name": self.name, "op_type": self.op_type, "kind": self.kind,
            "flops": self.flops, "weight_bytes": self.weight_bytes,
            "activation_bytes": self.activation_bytes, "input_bytes": self.input_bytes,
            "output_bytes": self.output_bytes,
            "intensity_weights": _round(self.intensity_weights),
            "intensity_total": _round(self.intensity_total),
            "gemm": self.gemm.to_dict() if self.gemm else None,
            "im2col_bytes": self.im2col_bytes, "im2col_stride": self.im2col_stride,
            "kernel": self.kernel, "known": self.known, "quantized": self.quantized,
        }


@dataclass
class Characterization:
    """The seed's per-model table: op intensity over the GEMM-like ops, FLOP-weighted average
    (sum of FLOPs_i * intensity_i / sum of FLOPs_i) and minimum."""

    gemm_ops: int
    gemm_flops_share: float
    avg_intensity_weights: float | None
    min_intensity_weights: float | None
    avg_intensity_total: float | None
    min_intensity_total: float | None

    def to_dict(self) -> dict:
        return {k: _round(v) if isinstance(v, float) else v for k, v in self.__dict__.items()}


@dataclass
class ModelCost:
    """Costs of every op (topological order) and the model totals."""

    ops: list[OpCost]
    params: int
    weight_bytes: int
    max_live_activation_bytes: int
    input_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)

    @property
    def flops(self) -> int:
        return sum(c.flops for c in self.ops)

    @property
    def compute_ops(self) -> list[OpCost]:
        """The ops that run at inference time (constant-foldable ones excluded)."""
        return [c for c in self.ops if c.kind != CONSTANT]

    def characterization(self) -> Characterization:
        return characterize(self.ops)

    def by_name(self) -> dict[str, OpCost]:
        return {c.name: c for c in self.ops}


def _round(x: float | None, digits: int = 4) -> float | None:
    return None if x is None else float(f"{x:.{digits}g}") if math.isfinite(x) else None


def op_label(op: Op) -> str:
    """A display name for an op: its name, or op_type#id when it has none (the runtime
    profiler's key; `analyze_model` also falls back to op_type#id for a repeated name)."""
    return op.name or f"{op.op_type}#{op.id}"


# ---------------------------------------------------------------------------------------------
# model
# ---------------------------------------------------------------------------------------------
def analyze_model(graph: Graph, input_shapes: Mapping[str, Shape] | None = None, *,
                  example_inputs: Mapping[str, np.ndarray] | None = None,
                  require_static: bool = True, infer: bool = True) -> ModelCost:
    """Cost every op of the (root) graph.

    Runs shape inference on `graph` (filling its values' shapes) unless `infer` is False (the
    shapes were filled otherwise, e.g. from a run). Symbolic input dims are pinned by
    `input_shapes` or by the shapes of `example_inputs`; with `require_static`, a graph input
    whose shape stays dynamic is a UsageError naming the `--shape` option that fixes it. Ops whose
    shapes stay unknown (data-dependent, such as a Range over a runtime length) get `known=False`
    and zero FLOPs.
    """
    from graphopt.shapes import infer_shapes

    pinned: dict[str, tuple] = {k: tuple(v) for k, v in (input_shapes or {}).items()}
    for name, array in (example_inputs or {}).items():
        pinned.setdefault(name, tuple(int(d) for d in np.shape(array)))
    unknown = sorted(set(pinned) - set(graph.inputs))
    if unknown:
        raise UsageError(f"no graph input named {unknown[0]!r} "
                         f"(inputs: {', '.join(_runtime_inputs(graph)) or 'none'})")
    if infer:
        infer_shapes(graph, pinned, overwrite=bool(pinned))
    ctx = CostContext(graph, pinned)
    if require_static:
        for name in _runtime_inputs(graph):
            shape = ctx.shape(name)
            if shape is None or any(not isinstance(d, int) for d in shape):
                raise UsageError(f"input {name!r} has dynamic shape {_fmt_shape(shape)}; pin it "
                                 f"with --shape {name}=" + ",".join(
                                     str(d) if isinstance(d, int) else "N"
                                     for d in (shape or ("N",))))
    costs, labels = [], set()
    for op in graph.topological_ops():
        cost = op_cost(graph, op, ctx)
        # Unique like the runtime profiler's keys: a repeated name falls back to op_type#id.
        if cost.name in labels:
            cost.name = f"{op.op_type}#{op.id}"
        labels.add(cost.name)
        costs.append(cost)
    params, weight_bytes = _count_params(graph, ctx)
    static_inputs = {n: tuple(ctx.shape(n)) for n in _runtime_inputs(graph)  # type: ignore[arg-type]
                     if ctx.static_shape(n) is not None}
    return ModelCost(ops=costs, params=params, weight_bytes=weight_bytes,
                     max_live_activation_bytes=static_peak_activation_bytes(graph, ctx),
                     input_shapes=static_inputs)


def _runtime_inputs(graph: Graph) -> list[str]:
    """Graph inputs the user feeds (inputs that are not initializer defaults)."""
    return [n for n in graph.inputs if not graph.values[n].is_const]


def _fmt_shape(shape: Shape | None) -> str:
    return "?" if shape is None else "[" + ",".join("?" if d is None else str(d) for d in shape) + "]"


def characterize(costs: Iterable[OpCost]) -> Characterization:
    """Op intensity over the GEMM-like ops, FLOP-weighted average and minimum."""
    costs = list(costs)
    gemms = [c for c in costs if c.gemm_like and c.flops > 0 and c.kind != CONSTANT]
    total_flops = sum(c.flops for c in costs if c.kind != CONSTANT)

    def stats(values: list[tuple[int, float]]) -> tuple[float | None, float | None]:
        if not values:
            return None, None
        weight = sum(f for f, _ in values)
        return sum(f * i for f, i in values) / weight, min(i for _, i in values)

    avg_w, min_w = stats([(c.flops, c.intensity_weights) for c in gemms
                          if c.intensity_weights is not None])
    avg_t, min_t = stats([(c.flops, c.intensity_total) for c in gemms
                          if c.intensity_total is not None])
    share = sum(c.flops for c in gemms) / total_flops if total_flops else 0.0
    return Characterization(len(gemms), share, avg_w, min_w, avg_t, min_t)


# ---------------------------------------------------------------------------------------------
# constants and shapes
# ---------------------------------------------------------------------------------------------
class CostContext:
    """Shape lookup (with pinned input shapes) and the set of constant-derived values."""

    def __init__(self, graph: Graph, pinned: Mapping[str, Shape] | None = None) -> None:
        self.graph = graph
        self.pinned = dict(pinned or {})
        self.constant = constant_values(graph, exclude=self.pinned)

    def value(self, name: str) -> Value | None:
        return self.graph.values.get(name) if name else None

    def shape(self, name: str) -> Shape | None:
        if name in self.pinned:
            return tuple(self.pinned[name])
        value = self.value(name)
        return None if value is None else value.shape

    def static_shape(self, name: str) -> tuple[int, ...] | None:
        shape = self.shape(name)
        if shape is None or any(not isinstance(d, int) or d < 0 for d in shape):
            return None
        return tuple(shape)  # type: ignore[return-value]

    def itemsize(self, name: str) -> int:
        value = self.value(name)
        if value is None or not value.dtype:
            return 4
        try:
            return onnx_to_np_dtype(value.dtype).itemsize
        except (KeyError, TypeError, ValueError):
            return 4

    def nbytes(self, name: str) -> int | None:
        shape = self.static_shape(name)
        if shape is None:
            return None
        return int(np.prod(shape, dtype=np.int64)) * self.itemsize(name)

    def numel(self, name: str) -> int | None:
        shape = self.static_shape(name)
        return None if shape is None else int(np.prod(shape, dtype=np.int64))

    def is_constant(self, name: str) -> bool:
        return bool(name) and name in self.constant

    def stored_bytes(self, name: str) -> int | None:
        """Bytes a constant-derived weight occupies as stored: through DequantizeLinear, the
        quantized tensor (plus scales and zero points); otherwise the value itself."""
        found = self.graph.producer(name) if name in self.graph.values else None
        if found is not None and found[0].op_type == "DequantizeLinear":
            parts = [self.nbytes(n) for n in found[0].inputs if n]
            return None if any(p is None for p in parts) else sum(parts)  # type: ignore[misc]
        return self.nbytes(name)


def constant_values(graph: Graph, exclude: Iterable[str] = ()) -> set[str]:
    """Names of values that are constant or computed only from constants.

    An initializer that is also a graph input (IR < 4 models list every weight as an input) counts
    as constant unless it is in `exclude` (the caller feeds it). Ops with subgraphs or random
    outputs never produce constants.
    """
    excluded = set(exclude)
    constant = {name for name, v in graph.values.items()
                if v.is_const and not v.outer and name not in excluded}
    for op in graph.topological_ops():
        if op.op_type in _NONDETERMINISTIC or any(True for _ in op.subgraphs()):
            continue
        if all(not n or n in constant for n in op.inputs):
            constant.update(n for n in op.outputs if n)
    return constant


def _count_params(graph: Graph, ctx: CostContext) -> tuple[int, int]:
    """(elements, stored bytes) of the weights read by inference ops, each counted once.

    Integer index and shape tensors (int64, int32 of shapes) and booleans are not parameters; int32
    biases of quantized ops are (they follow the same rule: an int32 tensor counts when a
    GEMM-like op reads it as its bias).
    """
    seen: set[str] = set()
    params = weight_bytes = 0
    for op in graph.ops.values():
        if all(not n or n in ctx.constant for n in op.inputs) and op.inputs:
            continue  # constant-foldable op: its result is the weight, counted at its reader
        if op.op_type == "Constant":
            continue
        for slot, name in enumerate(op.inputs):
            if not ctx.is_constant(name) or name in seen:
                continue
            value = ctx.value(name)
            if value is None or not _is_parameter_dtype(value.dtype, op, slot):
                continue
            seen.add(name)
            source = graph.producer(name)
            if source is not None and source[0].op_type == "DequantizeLinear":
                params += ctx.numel(source[0].inputs[0]) or 0
            else:
                params += ctx.numel(name) or 0
            weight_bytes += ctx.stored_bytes(name) or 0
    return params, weight_bytes


def _is_parameter_dtype(dtype: int, op: Op, slot: int) -> bool:
    T = onnx.TensorProto
    if dtype in (T.INT64, T.BOOL, T.STRING, 0):
        return False
    if dtype == T.INT32:
        slots = _CONV_SLOTS.get(op.op_type)
        return slots is not None and slot == slots[2]
    return True


# ---------------------------------------------------------------------------------------------
# one op
# ---------------------------------------------------------------------------------------------
def op_cost(graph: Graph, op: Op, ctx: CostContext | None = None) -> OpCost:
    """The cost of `op`, from the graph's (inferred) shapes."""
    ctx = ctx or CostContext(graph)
    cost = OpCost(name=op_label(op), op_type=op.op_type, op_id=op.id, kind=OTHER,
                  kernel=_kernel_of(graph, op))
    seen: set[str] = set()
    known = True
    for slot, name in enumerate(op.inputs):
        if not name or name in seen:
            continue
        seen.add(name)
        nbytes = ctx.stored_bytes(name) if ctx.is_constant(name) else ctx.nbytes(name)
        if nbytes is None:
            known = False
            continue
        if ctx.is_constant(name):
            cost.weight_bytes += nbytes
            cost.quantized |= _produced_by(graph, name, "DequantizeLinear")
        else:
            cost.input_bytes += nbytes
    for name in op.outputs:
        if name:
            nbytes = ctx.nbytes(name)
            known &= nbytes is not None
            cost.output_bytes += nbytes or 0
    cost.known = known

    if op.inputs and all(not n or ctx.is_constant(n) for n in op.inputs) \
            and op.op_type not in _NONDETERMINISTIC and not any(True for _ in op.subgraphs()):
        # Foldable: no inference work. Its "weights" are what it makes, counted at the reader.
        cost.kind = CONSTANT
        cost.weight_bytes, cost.input_bytes = 0, cost.weight_bytes + cost.input_bytes
        return cost
    if op.op_type == "Constant" or (not op.inputs and op.op_type == "ConstantOfShape"):
        cost.kind = CONSTANT
        return cost

    handler = _HANDLERS.get(op.op_type)
    try:
        if handler is not None:
            handler(op, ctx, cost)
        elif op.op_type in _ELEMENTWISE_FLOPS:
            _elementwise(op, ctx, cost)
        elif op.op_type in _REDUCE_FLOPS:
            _reduce(op, ctx, cost)
        elif op.op_type in _VIEW_OPS:
            cost.kind = VIEW
        elif op.op_type in _COPY_OPS:
            cost.kind = COPY
        elif op.op_type in _GATHER_OPS:
            cost.kind = GATHER
    except _UnknownShape:
        cost.known = False
        cost.flops = 0
        cost.gemm = None
    return cost


class _UnknownShape(Exception):
    """A shape the count needs is not static."""


def _static(ctx: CostContext, name: str) -> tuple[int, ...]:
    shape = ctx.static_shape(name)
    if shape is None:
        raise _UnknownShape(name)
    return shape


def _kernel_of(graph: Graph, op: Op) -> str:
    """The op's `graphopt.kernel` meta; else int8_acc32 for integer ops and for a GEMM-like op
    reading DequantizeLinear outputs (a QDQ pattern the runtime runs as one int8 kernel)."""
    chosen = op.meta.get("graphopt.kernel")
    if chosen:
        return chosen
    if op.op_type in _INT8_OPS:
        return "int8_acc32"
    slots = _CONV_SLOTS.get(op.op_type) or _MATMUL_SLOTS.get(op.op_type) \
        or ((0, 1) if op.op_type == "Gemm" else None)
    if slots and all(_produced_by(graph, _input(op, s), "DequantizeLinear") for s in slots[:2]):
        return "int8_acc32"
    return "fp32"


def _produced_by(graph: Graph, name: str, op_type: str) -> bool:
    found = graph.producer(name) if name and name in graph.values else None
    return found is not None and found[0].op_type == op_type


def _input(op: Op, slot: int | None) -> str:
    return op.inputs[slot] if slot is not None and slot < len(op.inputs) else ""


def _conv(op: Op, ctx: CostContext, cost: OpCost) -> None:
    x_slot, w_slot, b_slot = _CONV_SLOTS[op.op_type]
    x = _static(ctx, _input(op, x_slot))
    w = _static(ctx, _input(op, w_slot))
    y = _static(ctx, op.outputs[0])
    groups = int(op.attrs.get("group", 1))
    batch, c_in = x[0], x[1]
    kernel = w[2:]
    k_elems = int(np.prod(kernel, dtype=np.int64))
    out_spatial = int(np.prod(y[2:], dtype=np.int64))
    c_out = y[1]
    gemm = GemmShape(M=batch * out_spatial, N=c_out // groups, K=c_in // groups * k_elems,
                     groups=groups)
    cost.gemm = gemm
    cost.flops = 2 * gemm.macs + (batch * c_out * out_spatial if _input(op, b_slot) else 0)
    depthwise = groups > 1 and c_in == groups
    cost.kind = DEPTHWISE if depthwise else GEMM
    strides = op.attrs.get("strides") or [1] * len(kernel)
    pads = op.attrs.get("pads") or [0] * (2 * len(kernel))
    auto_pad = op.attrs.get("auto_pad", "NOTSET")
    if isinstance(auto_pad, bytes):
        auto_pad = auto_pad.decode()
    pointwise = (k_elems == 1 and all(s == 1 for s in strides) and not any(pads)
                 and auto_pad in ("NOTSET", "VALID"))
    if not pointwise and not depthwise:
        # The depthwise kernel works tap by tap on the input itself: no column matrix.
        cost.im2col_bytes = gemm.M * gemm.K * groups * ctx.itemsize(_input(op, x_slot))
        cost.im2col_stride = max(int(s) for s in strides)


def _conv_transpose(op: Op, ctx: CostContext, cost: OpCost) -> None:
    x = _static(ctx, _input(op, 0))
    w = _static(ctx, _input(op, 1))
    y = _static(ctx, op.outputs[0])
    groups = int(op.attrs.get("group", 1))
    batch, c_in = x[0], x[1]
    in_spatial = int(np.prod(x[2:], dtype=np.int64))
    k_elems = int(np.prod(w[2:], dtype=np.int64))
    c_out_per_group = w[1]
    gemm = GemmShape(M=batch * in_spatial, N=c_out_per_group * k_elems, K=c_in // groups,
                     groups=groups)
    cost.gemm = gemm
    out_elems = int(np.prod(y, dtype=np.int64))
    # col2im adds every column entry into the output: one FLOP per column element.
    cost.flops = 2 * gemm.macs + gemm.M * gemm.N * groups + (out_elems if _input(op, 2) else 0)
    cost.kind = GEMM
    cost.im2col_bytes = gemm.M * gemm.N * groups * ctx.itemsize(op.outputs[0])
    cost.im2col_stride = max([int(s) for s in op.attrs.get("strides") or [1]])


def _gemm(op: Op, ctx: CostContext, cost: OpCost) -> None:
    a = _static(ctx, _input(op, 0))
    b = _static(ctx, _input(op, 1))
    M, K = (a[1], a[0]) if op.attrs.get("transA", 0) else (a[0], a[1])
    N = b[0] if op.attrs.get("transB", 0) else b[1]
    cost.gemm = GemmShape(M=M, N=N, K=K)
    cost.flops = 2 * M * N * K + (M * N if _input(op, 2) else 0)
    cost.kind = GEMM


def _matmul(op: Op, ctx: CostContext, cost: OpCost) -> None:
    a_name, b_name = (_input(op, s) for s in _MATMUL_SLOTS[op.op_type])
    a, b = list(_static(ctx, a_name)), list(_static(ctx, b_name))
    if op.op_type == "FusedMatMul":
        if op.attrs.get("transA", 0) and len(a) >= 2:
            a[-1], a[-2] = a[-2], a[-1]
        if op.attrs.get("transB", 0) and len(b) >= 2:
            b[-1], b[-2] = b[-2], b[-1]
    if len(a) == 1:
        a = [1] + a
    if len(b) == 1:
        b = b + [1]
    M, K, N = a[-2], a[-1], b[-1]
    batch_a = int(np.prod(a[:-2], dtype=np.int64))
    batch_b = int(np.prod(b[:-2], dtype=np.int64))
    batch = int(np.prod(np.broadcast_shapes(tuple(a[:-2]), tuple(b[:-2])), dtype=np.int64))
    if batch_a == 1 and ctx.is_constant(a_name) and not ctx.is_constant(b_name):
        # Weight on the left (W @ X): the transposed product X^T W^T has the weight on the right.
        gemm = GemmShape(M=batch * N, N=M, K=K)
    elif batch_b == 1:
        # One matrix shared by every row of A: the Caffe2 view folds A's batch dims into M.
        gemm = GemmShape(M=batch * M, N=N, K=K)
    else:
        gemm = GemmShape(M=M, N=N, K=K, groups=batch)
    cost.gemm = gemm
    cost.flops = 2 * gemm.macs
    cost.kind = GEMM


def _gather(op: Op, ctx: CostContext, cost: OpCost) -> None:
    data, indices = _input(op, 0), _input(op, 1)
    axis = int(op.attrs.get("axis", 0))
    cost.kind = GATHER
    if not ctx.is_constant(data) or axis != 0:
        return
    table = _static(ctx, data)
    if len(table) < 1:
        return
    # An embedding lookup: the bytes of weights it reads are the rows it touches.
    row_bytes = int(np.prod(table[1:], dtype=np.int64)) * ctx.itemsize(data)
    const_indices = ctx.graph.const_value(indices) if indices in ctx.graph.values else None
    if const_indices is not None:
        rows = int(np.unique(np.where(const_indices < 0, const_indices + table[0],
                                      const_indices)).size)
    else:
        rows = min(ctx.numel(indices) or 0, table[0])
    cost.kind = EMBEDDING
    cost.weight_bytes = rows * row_bytes
    if ctx.is_constant(indices):
        cost.input_bytes = 0


def _elementwise(op: Op, ctx: CostContext, cost: OpCost) -> None:
    out = ctx.numel(op.outputs[0]) if op.outputs else None
    if out is None:
        raise _UnknownShape(op.outputs[0] if op.outputs else "")
    per = _ELEMENTWISE_FLOPS[op.op_type]
    if op.op_type in _VARIADIC:
        per *= max(1, sum(1 for n in op.inputs if n) - 1)
    cost.flops = per * out
    cost.kind = ELEMENTWISE


def _reduce(op: Op, ctx: CostContext, cost: OpCost) -> None:
    numel = ctx.numel(_input(op, 0))
    if numel is None:
        raise _UnknownShape(_input(op, 0))
    cost.flops = _REDUCE_FLOPS[op.op_type] * numel
    cost.kind = REDUCE


def _pool(op: Op, ctx: CostContext, cost: OpCost) -> None:
    out = ctx.numel(op.outputs[0])
    if out is None:
        raise _UnknownShape(op.outputs[0])
    window = int(np.prod(op.attrs.get("kernel_shape", [1]), dtype=np.int64))
    cost.flops = out * window
    cost.kind = REDUCE


def _resize(op: Op, ctx: CostContext, cost: OpCost) -> None:
    y = _static(ctx, op.outputs[0])
    x = _static(ctx, _input(op, 0))
    mode = op.attrs.get("mode", "nearest")
    if isinstance(mode, bytes):
        mode = mode.decode()
    resized = sum(1 for a, b in zip(x, y) if a != b)
    taps = {"nearest": 0, "linear": 2, "cubic": 4}.get(mode, 2) ** resized
    cost.flops = 2 * taps * int(np.prod(y, dtype=np.int64)) if taps > 1 else 0
    cost.kind = GATHER if cost.flops == 0 else ELEMENTWISE


def _einsum(op: Op, ctx: CostContext, cost: OpCost) -> None:
    equation = str(op.attrs.get("equation", "")).replace(" ", "")
    if isinstance(op.attrs.get("equation"), bytes):
        equation = op.attrs["equation"].decode().replace(" ", "")
    lhs, _, rhs = equation.partition("->")
    sizes: dict[str, int] = {}
    for term, name in zip(lhs.split(","), op.inputs):
        shape = _static(ctx, name)
        if "." in term:
            raise _UnknownShape(name)  # ellipsis: not worth a parser here
        for letter, dim in zip(term, shape):
            sizes[letter] = max(sizes.get(letter, 1), dim)
    contracted = set(sizes) - set(rhs)
    if contracted and len(op.inputs) > 1:
        cost.flops = 2 * int(np.prod(list(sizes.values()), dtype=np.int64))
        cost.kind = GEMM
    else:
        cost.flops = ctx.numel(op.outputs[0]) or 0
        cost.kind = REDUCE if contracted else GATHER


_HANDLERS = {
    "Conv": _conv, "ConvInteger": _conv, "QLinearConv": _conv, "FusedConv": _conv,
    "ConvTranspose": _conv_transpose, "Gemm": _gemm,
    "MatMul": _matmul, "MatMulInteger": _matmul, "QLinearMatMul": _matmul,
    "FusedMatMul": _matmul, "MatMulIntegerToFloat": _matmul,
    "Gather": _gather, "MaxPool": _pool, "AveragePool": _pool, "LpPool": _pool,
    "Resize": _resize, "Upsample": _resize, "Einsum": _einsum,
}


# ---------------------------------------------------------------------------------------------
# activations in memory
# ---------------------------------------------------------------------------------------------
def static_peak_activation_bytes(graph: Graph, ctx: CostContext | None = None) -> int:
    """Peak bytes of live intermediate tensors when ops run in topological order and each buffer
    is freed after its last reader; view ops (Reshape, Squeeze...) share their input's buffer.
    Graph inputs and weights are not counted. An estimate from the graph alone; the runtime's
    memory plan (`Session.peak_bytes`) is the measured figure.
    """
    ctx = ctx or CostContext(graph)
    order = graph.topological_ops()
    position = {op.id: i for i, op in enumerate(order)}
    storage: dict[str, str] = {}           # value -> the value whose buffer it lives in
    for op in order:
        if op.op_type in _VIEW_OPS and op.op_type not in ("Shape", "Size", "Constant") \
                and op.inputs and op.outputs and op.inputs[0] and op.outputs[0]:
            storage[op.outputs[0]] = storage.get(op.inputs[0], op.inputs[0])
    last_use: dict[str, int] = {}
    for op in order:
        for name in op.inputs:
            if name:
                base = storage.get(name, name)
                last_use[base] = max(last_use.get(base, -1), position[op.id])
    end = len(order)
    for name in graph.outputs:
        last_use[storage.get(name, name)] = end
    frees: dict[int, list[str]] = {}
    for base, pos in last_use.items():
        frees.setdefault(pos, []).append(base)
    live = peak = 0
    sizes: dict[str, int] = {}
    for i, op in enumerate(order):
        for name in op.outputs:
            if not name or name in storage or ctx.is_constant(name):
                continue
            sizes[name] = ctx.nbytes(name) or 0
            live += sizes[name]
        peak = max(peak, live)
        for base in frees.get(i, []):
            live -= sizes.pop(base, 0)
        # outputs nobody reads die at once
        for name in op.outputs:
            if name and name not in storage and name not in last_use and name in sizes:
                live -= sizes.pop(name)
    return peak
