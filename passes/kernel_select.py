"""acc16 / acc32 kernel choice for the int8 ops of a quantized model (contract items 6-8 in
passes/quantize.py).

16-bit accumulation (vpmaddubsw + vpaddsw) does twice fp32's MACs per instruction on pre-VNNI
CPUs against acc32's 1.33x, but it saturates. So an op gets `int8_acc16` only when all of:

1. the target has no VNNI (on avx512-vnni and amx, vpdpbusd / tdpbusd make acc32 at least as
   fast, and it is exact);
2. the op is compute-bound with acc32: its intensity (FLOPs per int8 weight byte) is at least
   the machine's ridge point and its roofline (graphopt.machine) is compute-bound; a
   memory-bound op (an FC with a small M, an embedding-like lookup) gains nothing from faster
   arithmetic;
3. the weights above T = 64 are a small part (at most MAX_OUTLIER_FRACTION), since they run
   apart as a sparse 32-bit product (passes/outliers.py), and acc16's predicted time plus that
   product's beats acc32's by ACC16_MIN_SPEEDUP;
4. on the calibration sample of the op's input, the runtime's exact model of 16-bit
   accumulation (runtime/kernels/gemm.py int_gemm_acc16, through int8.IntConv / IntMatMul)
   stays within ACC16_MAX_ERROR of the exact int32 accumulators: the running 16-bit sum's
   saturation is data-dependent (a weight bound alone cannot clear dense layers).

`choose_kernel` is that decision; OutlierSplit (which runs first and splits only the ops it
would turn acc16) and KernelSelect share it, so the two cannot disagree.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from graphopt.cost import GEMM, CostContext, OpCost, op_cost
from graphopt.errors import UsageError
from graphopt.ir import Graph, Op
from graphopt.machine import Machine, detect_machine, modeled_machine, roofline
from graphopt.pass_manager import Pass, PassContext, PassResult, squared_error_terms
from graphopt.passes.qparams import NARROW_QMAX, QParams
from graphopt.passes.quantize import (MAX_OUTLIER_FRACTION, META_INTENSITY, META_KERNEL,
                                      META_OUTLIER_OF, META_QUANT, META_REASON, QuantizationPass,
                                      quantization_state)

ACC16 = "int8_acc16"
ACC32 = "int8_acc32"
#: Weights with |w_q| above this go to the outlier part (contract item 7: 2 * 255 * 64 = 32640
#: keeps every vpmaddubsw pair sum inside int16).
OUTLIER_THRESHOLD = NARROW_QMAX
#: acc16 must be predicted at least this much faster than acc32 to be worth its risk.
ACC16_MIN_SPEEDUP = 1.1
#: Relative L2 error of the int32 accumulators acc16 may show on the calibration sample: an
#: order below int8's own rounding error (about 1e-2 per layer), so saturation costs nothing a
#: model output sees.
ACC16_MAX_ERROR = 1e-3
#: MAC rate of the sparse outlier product relative to the fp32 GEMM rate. Per nonzero it is a
#: scaled add of one activation column into one output column (vpmulld + vpaddd over int32 lanes,
#: half fp32 FMA's MACs per instruction) with an indexed load per nonzero: a quarter is assumed.
OUTLIER_RELATIVE_RATE = 0.25
#: Pixels per spatial axis of the input window on which acc16_error runs a conv.
ACC16_SAMPLE_SIDE = 16
#: ISAs on which acc32 is at least as fast as acc16 (and exact).
VNNI_ISAS = ("avx512-vnni", "amx")
#: Op types with an int8 QDQ step in the runtime (ConvTranspose stays on the float path).
KERNEL_OPS = ("Conv", "Gemm", "MatMul")
#: ctx.options key of the resolved Machine (both passes use the same one).
MACHINE_OPTION = "machine"


@dataclass
class KernelDecision:
    """The kernel an int8 op gets, the numbers behind it and one sentence saying why."""

    kernel: str
    reason: str
    intensity: float | None = None
    speedup: float | None = None          # acc32 time / (acc16 + outlier) time, predicted
    acc16_error: float | None = None      # relative L2 of the accumulators on the sample

    def mark(self, op: Op) -> None:
        """Record the decision in the op's meta (contract item 6)."""
        op.meta[META_KERNEL] = self.kernel
        if self.intensity is not None:
            op.meta[META_INTENSITY] = format_intensity(self.intensity)
        op.meta[META_REASON] = self.reason


# ---------------------------------------------------------------------------------------------
# inputs of the decision
# ---------------------------------------------------------------------------------------------
def resolve_machine(ctx: PassContext) -> Machine:
    """ctx option `machine` (a Machine), else `target` ("auto": the detected host); resolved
    once and kept in the options so every O3 pass sees the same machine."""
    given = ctx.option(MACHINE_OPTION)
    if given is not None:
        if not isinstance(given, Machine):
            raise UsageError(f"option 'machine' must be a graphopt.machine.Machine, not "
                             f"{type(given).__name__}")
        return given
    target = str(ctx.option("target", "auto") or "auto")
    machine = detect_machine() if target == "auto" else modeled_machine(target)
    ctx.options[MACHINE_OPTION] = machine
    return machine


def cost_context(graph: Graph, ctx: PassContext, ops: Sequence[Op] = ()) -> CostContext:
    """Shapes for op costs: graph inputs pinned to the first calibration batch (or ctx option
    `shapes`), every other value's shape from onnx inference on those, without writing the
    inferred shapes into the graph (the saved model keeps its symbolic dims). Where inference
    leaves an activation of `ops` unknown (a data-dependent Range, say), one run of the graphopt
    runtime on synthetic feeds of those shapes measures it."""
    from graphopt.shapes import inferred_types

    pins: dict[str, tuple] = {}
    for name, shape in (quantization_state(ctx).input_shapes or {}).items():
        pins[name] = tuple(shape)
    for name, shape in (ctx.option("shapes") or {}).items():
        pins[name] = tuple(shape)
    pins = {k: v for k, v in pins.items() if k in graph.inputs}
    costs = CostContext(graph, pins)
    for name, type_proto in inferred_types(graph, pins).items():   # empty if inference fails
        if name in pins or not type_proto.HasField("tensor_type") \
                or not type_proto.tensor_type.HasField("shape"):
            continue
        dims = tuple(int(d.dim_value) if d.HasField("dim_value") else None
                     for d in type_proto.tensor_type.shape.dim)
        if all(d is not None for d in dims):
            costs.pinned[name] = dims
    unknown = [name for op in ops for name in (op.inputs[0], op.outputs[0])
               if costs.static_shape(name) is None]
    if unknown:
        costs.pinned.update(_measured_shapes(graph, pins, unknown))
    return costs


def _measured_shapes(graph: Graph, pins: Mapping[str, tuple], names: Sequence[str]
                     ) -> dict[str, tuple[int, ...]]:
    """Shapes of `names` in one graphopt runtime run on synthetic feeds (empty on failure)."""
    from graphopt.feeds import synthetic_feeds
    from graphopt.runtime import Session

    try:
        outputs = Session(graph).run(synthetic_feeds(graph, dict(pins)), list(dict.fromkeys(names)))
    except Exception:  # a model the runtime cannot run on synthetic feeds: shapes stay unknown
        return {}
    return {name: tuple(int(d) for d in np.shape(array)) for name, array in outputs.items()}


def int8_weight(graph: Graph, op: Op) -> np.ndarray | None:
    """The int8 weight W_q an int8 op reads through its weight DequantizeLinear."""
    if len(op.inputs) < 2 or not op.inputs[1]:
        return None
    dq = graph.producer_op(op.inputs[1])
    if dq is None or dq.op_type != "DequantizeLinear":
        return None
    w = graph.const_value(dq.inputs[0])
    return w if w is not None and w.dtype == np.int8 else None


def outlier_ops(graph: Graph) -> dict[str, Op]:
    """Main op name -> the outlier op split off it (meta graphopt.outlier_of)."""
    return {op.meta[META_OUTLIER_OF]: op for op in graph.ops.values()
            if op.meta.get(META_OUTLIER_OF)}


# ---------------------------------------------------------------------------------------------
# the decision
# ---------------------------------------------------------------------------------------------
def split_weights(w_q: np.ndarray, threshold: int = OUTLIER_THRESHOLD
                  ) -> tuple[np.ndarray, np.ndarray]:
    """(W_small, W_outlier) with W_small + W_outlier == w_q, |W_small| <= threshold, and
    W_outlier nonzero exactly where |w_q| > threshold."""
    big = np.abs(w_q.astype(np.int16)) > threshold
    return np.where(big, 0, w_q).astype(np.int8), np.where(big, w_q, 0).astype(np.int8)


def outlier_time(cost: OpCost, outliers: int, machine: Machine) -> float:
    """Predicted seconds of the sparse outlier product: each nonzero weight is M MACs."""
    if not outliers or cost.gemm is None:
        return 0.0
    return 2.0 * cost.gemm.M * outliers / (machine.compute_rate("fp32") * OUTLIER_RELATIVE_RATE)


def choose_kernel(graph: Graph, op: Op, machine: Machine, costs: CostContext,
                  w_small: np.ndarray, outliers: int,
                  sample: tuple[np.ndarray, QParams] | None) -> KernelDecision:
    """acc16 or acc32 for an int8 op whose dense part is `w_small` (int8, the op's weight
    layout, every |w| <= T when it came from a split) and `outliers` weights beyond T run as a
    sparse 32-bit product (module docstring, steps 1-4)."""
    isa = machine.isa
    cost = op_cost(graph, op, costs)
    intensity = cost.intensity_weights
    shown = "unknown" if intensity is None else f"{intensity:.0f}"
    if op.op_type not in KERNEL_OPS:
        return KernelDecision(ACC32, f"{op.op_type} has no acc16 kernel: acc32", intensity)
    if isa in VNNI_ISAS:
        return KernelDecision(ACC32, f"intensity {shown} FLOP/B on {isa}: acc32, as fast as acc16 "
                              f"({machine.isa_info.int8_acc32:g}x vs "
                              f"{machine.isa_info.int8_acc16:g}x fp32) and exact", intensity)
    if not cost.known:
        return KernelDecision(ACC32, "shapes unknown, no roofline: acc32")
    if cost.kind != GEMM or cost.gemm is None:
        return KernelDecision(ACC32, f"intensity {shown} FLOP/B, a {cost.kind} kernel (no GEMM "
                              "whose sums 16-bit accumulation would speed up): acc32", intensity)
    r32 = roofline(cost, machine, ACC32)
    ridge = machine.ridge_point(ACC32)
    if intensity is None or intensity < ridge or r32.bound != "compute":
        return KernelDecision(ACC32, f"intensity {shown} FLOP/B, memory-bound on {isa} (ridge "
                              f"point {ridge:.0f} FLOP/B for acc32): acc32, acc16 would not be "
                              "faster", intensity)
    fraction = outliers / max(w_small.size, 1)
    if fraction > MAX_OUTLIER_FRACTION:
        return KernelDecision(ACC32, f"intensity {shown} FLOP/B, compute-bound on {isa}, but "
                              f"{fraction:.1%} of weights exceed |{OUTLIER_THRESHOLD}| (over "
                              f"{MAX_OUTLIER_FRACTION:.0%}): acc32", intensity)
    t16 = roofline(cost, machine, ACC16).time + outlier_time(cost, outliers, machine)
    speedup = r32.time / t16
    outlier_text = f"outlier part {fraction:.1%} of weights"
    if speedup < ACC16_MIN_SPEEDUP:
        return KernelDecision(ACC32, f"intensity {shown} FLOP/B on {isa}: acc16 predicted only "
                              f"{speedup:.2f}x faster than acc32 ({outlier_text}), under the "
                              f"{ACC16_MIN_SPEEDUP}x margin: acc32", intensity, speedup)
    if sample is None:
        return KernelDecision(ACC32, f"intensity {shown} FLOP/B, compute-bound on {isa}, acc16 "
                              f"predicted {speedup:.2f}x faster, but no calibration sample to "
                              "check 16-bit saturation: acc32", intensity, speedup)
    error = acc16_error(op, w_small, *sample)
    if error > ACC16_MAX_ERROR:
        return KernelDecision(ACC32, f"intensity {shown} FLOP/B, compute-bound on {isa}, acc16 "
                              f"predicted {speedup:.2f}x faster, but it saturates on the "
                              f"calibration sample (accumulator error {error:.1e} > "
                              f"{ACC16_MAX_ERROR:.0e}): acc32", intensity, speedup, error)
    return KernelDecision(ACC16, f"intensity {shown} FLOP/B, compute-bound on {isa}: acc16 "
                          f"predicted {speedup:.2f}x faster than acc32 ({outlier_text}; "
                          f"accumulator error {error:.1e} on the calibration sample)",
                          intensity, speedup, error)


def central_crop(x: np.ndarray, side: int) -> np.ndarray:
    """The central window of at most `side` pixels per spatial axis of an (N, C, *spatial)
    array (a view)."""
    index = [slice(None), slice(None)]
    for size in x.shape[2:]:
        keep = min(size, side)
        start = (size - keep) // 2
        index.append(slice(start, start + keep))
    return x[tuple(index)]


def acc16_error(op: Op, w_q: np.ndarray, x: np.ndarray, qparams: QParams) -> float:
    """Relative L2 error of the int32 accumulators under the runtime's acc16 model against the
    exact ones, for the float input sample `x` quantized with `qparams` and weights `w_q`. A
    conv sees the central ACC16_SAMPLE_SIDE^2 pixels of its input only: the model emulates
    every output it cannot clear, one k-pair at a time, and a few hundred positions show a
    layer's saturation rate as well as the whole map does."""
    from graphopt.runtime.kernels.conv import ConvAttrs
    from graphopt.runtime.kernels.int8 import IntConv, IntMatMul
    from graphopt.runtime.kernels.quant import quantize

    x = np.asarray(x, np.float32)
    if op.op_type == "Conv":
        x = central_crop(x, ACC16_SAMPLE_SIDE)
    x_q = quantize(x, np.float32(qparams.scale), np.uint8(qparams.zero_point), np.dtype(np.uint8))
    if op.op_type == "Conv":
        attrs = ConvAttrs.from_op(op.attrs.get)
        exact = IntConv(attrs, w_q)(x_q, qparams.zero_point)
        approx = IntConv(attrs, w_q, acc16=True)(x_q, qparams.zero_point)
    else:
        b = np.ascontiguousarray(w_q.T) if op.op_type == "Gemm" and op.attrs.get("transB", 0) \
            else w_q
        rows = x_q.reshape(-1, x_q.shape[-1])
        exact = IntMatMul(b)(rows, qparams.zero_point)
        approx = IntMatMul(b, acc16=True)(rows, qparams.zero_point)
    squared_error, squared_norm = squared_error_terms(exact, approx)   # integers: all finite
    if not squared_norm:
        return 0.0 if squared_error == 0 else math.inf
    return math.sqrt(squared_error / squared_norm)


def format_intensity(intensity: float) -> str:
    """graphopt.op_intensity as the contract has it: a plain decimal string."""
    return f"{intensity:.1f}"


# ---------------------------------------------------------------------------------------------
# the pass
# ---------------------------------------------------------------------------------------------
def int8_ops(graph: Graph) -> list[Op]:
    """The quantized compute ops (meta graphopt.quant=int8), outlier ops excluded."""
    return [op for op in graph.topological_ops()
            if op.meta.get(META_QUANT) == "int8" and META_OUTLIER_OF not in op.meta
            and op.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul")]


class KernelSelect(QuantizationPass):
    """Sets graphopt.kernel, graphopt.op_intensity and graphopt.reason on every int8 op
    (module docstring). Options (ctx): `machine` or `target`, `shapes`."""

    # acc16 changes the graphopt runtime's results where it saturates (bounded on calibration).
    name = "kernel_select"

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        result = PassResult()
        ops = int8_ops(graph) if graph.parent is None else []
        if not ops:
            return result
        machine = resolve_machine(ctx)
        costs = cost_context(graph, ctx, ops)
        samples = quantization_state(ctx).samples
        split = outlier_ops(graph)
        for op in ops:
            decision = decide(graph, op, machine, costs, samples, split.get(op.name))
            if decision is None:
                continue
            before = (op.meta.get(META_KERNEL), op.meta.get(META_REASON))
            decision.mark(op)
            result.count("acc16" if decision.kernel == ACC16 else "acc32")
            result.changed |= before != (decision.kernel, decision.reason)
        return result


def decide(graph: Graph, op: Op, machine: Machine, costs: CostContext,
           samples: Mapping[str, tuple[np.ndarray, QParams]],
           outlier: Op | None = None) -> KernelDecision | None:
    """choose_kernel for an int8 op as the graph holds it: split, its dense part and the outlier
    op's nonzeros; whole, the parts a split would make (the decision OutlierSplit took), and
    acc32 when acc16 would need a split that did not happen. `outlier`: the op's outlier op."""
    w = int8_weight(graph, op)
    if w is None:
        return None
    if outlier is not None:
        w_out = int8_weight(graph, outlier)
        return choose_kernel(graph, op, machine, costs, w,
                             int(np.count_nonzero(w_out)) if w_out is not None else 0,
                             samples.get(op.name))
    w_small, w_out = split_weights(w)
    outliers = int(np.count_nonzero(w_out))
    decision = choose_kernel(graph, op, machine, costs, w_small, outliers, samples.get(op.name))
    if decision.kernel == ACC16 and outliers:
        decision.kernel = ACC32
        decision.reason = (f"intensity {decision.intensity:.0f} FLOP/B, compute-bound on "
                           f"{machine.isa}, acc16 predicted {decision.speedup:.2f}x faster, but "
                           f"its {outliers} weights above |{OUTLIER_THRESHOLD}| were not split "
                           "off (outlier_split did not run): acc32")
    return decision


PASSES: list[type[Pass]] = [KernelSelect]
