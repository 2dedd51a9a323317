"""Calibration-driven int8 quantization with selective fallback (pipeline O3).

## The quantized-model contract (shared by the quantization passes and the runtime)

This is the authoritative spec; the runtime (runtime/*) executes exactly this.

out.onnx stays standard ONNX that onnxruntime runs with its own int8 kernels (QDQ format); the
graphopt runtime executes the same file with the kernels the node metadata names.

1. Activations feeding a quantized op: per-tensor uint8, asymmetric: `QuantizeLinear(x, x_scale:
   float32 scalar, x_zp: uint8 scalar) -> DequantizeLinear(q, x_scale, x_zp)`; one Q/DQ pair per
   tensor, shared by all its quantized readers.
2. Weights: int8 initializer, symmetric (zero point 0, int8), per output channel:
   `DequantizeLinear(W_q, w_scale[C_out] float32, w_zp[C_out] int8 zeros, axis=...)` with axis 0
   for Conv weights [C_out, C_in/g, kH, kW] (and ConvTranspose: axis 1, layout
   [C_in, C_out/g, ...]), Gemm B: axis 0 if transB=1 else 1, MatMul B [K, N]: axis 1.
   Values in [-127, 127]; on targets without VNNI in [-64, 64] (7 bits, meta
   `graphopt.weight_bits=7`) unless at most 5% of the 8-bit values exceed 64, which then go to
   the outlier part (item 7): pre-VNNI int8 kernels, acc32 ones included, sum u8*s8 pairs in 16
   bits (vpmaddubsw), and 2 * 255 * 64 = 32640 is the most that cannot saturate. (onnxruntime's
   AVX2 kernels with full-range weights were 4x the error budget off the QDQ math; with 7-bit
   weights they agree with it.)
3. Bias (Conv, Gemm): int32 initializer with scale x_scale * w_scale[c] and zero point 0:
   `DequantizeLinear(b_q, x_scale*w_scale, axis=0)`.
4. Output of a quantized op: `op -> QuantizeLinear(y, y_scale, y_zp uint8) -> DequantizeLinear`
   (so onnxruntime fuses DQ->Conv->Q into QLinearConv, and the graphopt runtime runs the group
   as one int8 kernel with requantization). Fused activations (Relu/Clip) may sit between the op
   and its output Q (ORT's QDQ fusion handles Conv->Relu->Q); y's range then starts at 0.
5. Embeddings (Gather from a constant float table, as in DLRM's Gather+ReduceSum and transformer
   token/position tables): row-wise symmetric int8: `Gather(table_q int8 [rows, dim], idx) ->
   Cast(to float) -> Mul(Unsqueeze(Gather(row_scales float32 [rows], idx), -1))`; the table's
   Gather carries meta `graphopt.quant=int8_rowwise`.
6. Node metadata on the quantized compute op (Conv/ConvTranspose/Gemm/MatMul): `graphopt.quant`
   = "int8"; `graphopt.kernel` = "int8_acc16" or "int8_acc32"; `graphopt.op_intensity` = FLOPs
   per byte of weights (a decimal string); `graphopt.reason` = one short human sentence with the
   numbers behind the choice (e.g. "intensity 1568 FLOP/B >= 256 on avx2: acc16 1.5x faster
   than acc32 (predicted)"). Ops kept in float carry `graphopt.quant` = "fp32" or "fp16" and
   `graphopt.reason` (e.g. "sensitivity 3.1e-2, the highest: kept fp32 within the 1e-2 error
   budget"). fp16 fallback: the weight initializer is stored float16 and a Cast to float32
   feeds the op.
7. Outlier-aware split (for acc16): W = W_small + W_outlier, both int8 with the same per-channel
   scales; W_small holds the weights with |w_q| <= T, W_outlier the rest (sparse). T = 64: with
   uint8 activations (<= 255) no pair sum a1*w1 + a2*w2 of the 16-bit multiply-add step
   (vpmaddubsw) can leave int16 (2*255*64 = 32640 <= 32767). Saturation of the running 16-bit
   sum over a K-block stays data-dependent (runtime/kernels/gemm.py acc16_bound /
   acc16_safe_columns bound it from the weights alone, and for dense weights that bound is far
   above int16), so kernel selection runs the acc16 model on calibration activations and keeps
   acc32 where saturation would cost accuracy. Graph: `Y = Op(DQ(x), DQ(W_small), DQ(bias)) +
   Op(DQ(x), DQ(W_outlier))` (an Add before the output Q); the main op has
   `graphopt.kernel=int8_acc16`, the outlier op `graphopt.kernel=int8_acc32` and
   `graphopt.outlier_of=<main op name>`, and W_outlier is stored sparse, as the sparse_value of
   a Constant node (the IR keeps `Value.sparse_proto`; onnxruntime densifies it at load) - the
   graphopt runtime runs it as a sparse int8 product with 32-bit accumulation.
8. Kernel choice knows the machine (graphopt/machine.py: `detect_machine()`,
   `modeled_machine(target, host)`, INT8_THROUGHPUT per ISA): on pre-VNNI targets (avx2,
   avx512) acc16 for high op intensity (compute-bound) GEMMs where the roofline predicts it
   pays after the outlier part's cost, acc32 for low intensity (memory-bound: FCs,
   embeddings-like); on avx512-vnni and amx acc32 everywhere (as fast as acc16, and exact).
   `--target auto|avx2|avx512|avx512-vnni|amx` on `graphopt optimize` selects the modeled CPU.
9. Residual Adds: an Add (opset domain, two inputs) both of whose inputs have a Q/DQ pair
   (the output of a quantized group, or a tensor quantized for another reader) reads the
   dequantized versions, when its own result, directly or through one Relu, is quantized as
   well. onnxruntime then runs DQ, DQ -> Add -> Q as one QLinearAdd (a Relu before a Q whose
   zero point is 0 is exact to drop: passes/qdq_cleanup.py). The shortcut then carries its
   rounding error, which the error budget measures like any other.

## How this pass decides

1. Candidates: Conv, ConvTranspose (group 1), Gemm (transA 0, alpha 1, beta 1, bias of N) and
   MatMul with a constant 2-D float32 weight; Gather along axis 0 from a constant 2-D float32
   table of at least `quant_embedding_min_bytes` (64 KiB) bytes.
2. Calibration (graphopt/calibrate.py) runs the float graph on the calibration batches and keeps
   a histogram of every activation the QDQ groups quantize; qparams come from them
   (passes/qparams.py: L2-optimal range by default, net-aware bounds, shared scales across
   Concat/MaxPool/Reshape/...).
3. Sensitivity: each candidate is quantized alone (weights, input, output, bias as in the
   contract) and the model runs on the first RANKING_SAMPLES (4) calibration samples; its
   sensitivity is the relative L2 error of the model outputs against float (||y - y_float|| /
   ||y_float||, the worst output). It only ranks the ops, so a few samples serve; the model
   errors that decide (step 4) are measured on the evaluation batches (the first calibration
   batches, up to 16 samples).
4. Selection: all candidates in int8; while the model error exceeds `quant_error_budget`, the
   most sensitive remaining op goes back to float: fp16 weights (the error fp16 adds is three to
   four orders below int8's) where they fit float16, else fp32. One op at a time for the first
   three, then the number kept in float doubles until the budget holds and a bisection finds the
   smallest such number (sensitivities rank the ops, so the error falls as more are kept float).
5. The chosen plan is applied to the graph; every candidate's decision and the numbers behind it
   are op meta (`graphopt.quant`, `graphopt.reason`, `graphopt.sensitivity`).

The default budget, 2e-2 relative L2 on the outputs of the evaluation batches, is where int8
cost no task metric measured in benchmarks/quantization_accuracy.py anything that its sample
size can show (digits-mlp accuracy and PP-OCR rec character accuracy unchanged, MiniLM sentence
cosine >= 0.9996, DLRM click probability within 5.5e-3). It holds on the evaluation batches;
other inputs land near it, not always under it (PP-OCR cls: 3.0e-2 on held-out lines), so
calibrate on data like the traffic. It is tight enough that a layer whose int8 error is an order
of magnitude above the others' (a first conv on raw pixels, a final FC into a softmax) goes back
to float.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Sequence
from copy import copy as shallow_copy
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from graphopt.calibrate import CalibrationData, TensorStats, batch_samples, calibration_data, \
    collect_statistics
from graphopt.ir import Graph, Op
from graphopt.pass_manager import Pass, PassContext, PassResult, squared_error_terms
from graphopt.passes.fusion_common import is_onnx, scalar, set_input, sole_reader, \
    unique_op_names
from graphopt.passes.qparams import NARROW_QMAX, ActivationBounds, QParams, affine_qparams, \
    choose_range, quantize_weights, rowwise_int8, shared_groups, weight_scales

T = onnx.TensorProto

# Node metadata keys (contract item 6).
META_QUANT = "graphopt.quant"
META_KERNEL = "graphopt.kernel"
META_INTENSITY = "graphopt.op_intensity"
META_REASON = "graphopt.reason"
META_OUTLIER_OF = "graphopt.outlier_of"
META_SENSITIVITY = "graphopt.sensitivity"
META_WEIGHT_BITS = "graphopt.weight_bits"

#: Default relative L2 error the quantized model may show on its outputs (see the docstring).
DEFAULT_ERROR_BUDGET = 2e-2
#: Numeric verification lets a quantization pass move the outputs this many budgets: the budget
#: holds on the evaluation batches, other inputs (and onnxruntime's own int8 kernels) differ.
VERIFY_SLACK = 3.0
#: On targets without VNNI, 8-bit weights keep 8 bits only while at most this share of them lies
#: beyond NARROW_QMAX (they then run as a sparse outlier product); the rest get 7 bits.
MAX_OUTLIER_FRACTION = 0.05
#: Tables smaller than this stay float: row-wise int8 saves little on them.
EMBEDDING_MIN_BYTES = 64 << 10
#: The evaluation set: the first calibration batches up to this many samples (at most
#: EVAL_MAX_BATCHES batches).
EVAL_SAMPLES = 16
EVAL_MAX_BATCHES = 4
#: Samples the sensitivity ranking runs on: it only orders the ops (the budget decisions run on
#: the evaluation set), and it costs one model run per candidate.
RANKING_SAMPLES = 4
#: Opset from which DequantizeLinear takes `axis` (per-channel weights).
MIN_OPSET = 13
#: ctx.options key of the QuantizationState that the O3 passes share with the report.
STATE_OPTION = "quantization_state"

_INT32_MAX = 2 ** 31 - 1
_FP16_MAX = 65504.0


# ---------------------------------------------------------------------------------------------
# shared state
# ---------------------------------------------------------------------------------------------
@dataclass
class QuantizationState:
    """What the quantization pass measured, for the later O3 passes and the report."""

    calibration: dict[str, Any] | None = None
    summary: dict[str, Any] | None = None
    #: op name -> (first calibration sample of its input, the input's qparams): kernel selection
    #: checks 16-bit accumulation on it.
    samples: dict[str, tuple[np.ndarray, QParams]] = field(default_factory=dict)
    #: Shapes of the first calibration batch (pins symbolic dims for op intensity).
    input_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    skipped: str = ""


def quantization_state(ctx: PassContext) -> QuantizationState:
    """The O3 passes' shared state in the context (created on first use)."""
    state = ctx.options.get(STATE_OPTION)
    if not isinstance(state, QuantizationState):
        state = QuantizationState()
        ctx.options[STATE_OPTION] = state
    return state


# ---------------------------------------------------------------------------------------------
# candidates
# ---------------------------------------------------------------------------------------------
@dataclass
class Candidate:
    """An op the pass may quantize and the values it would touch."""

    op_name: str
    kind: str            # "conv", "conv_transpose", "gemm", "matmul" or "embedding"
    op_type: str
    x: str               # the activation input (the indices of an embedding)
    weight: str          # the weight (the table of an embedding)
    axis: int            # output-channel axis of the weight
    bias: str            # "" when none
    output: str          # the op's output
    post: str            # where the group's output Q goes: after a fused Relu/Clip, else output

    @property
    def is_embedding(self) -> bool:
        return self.kind == "embedding"


def find_candidates(graph: Graph, embedding_min_bytes: int = EMBEDDING_MIN_BYTES
                    ) -> list[Candidate]:
    """Quantizable ops of the graph in topological order (see the module docstring)."""
    found = []
    for op in graph.topological_ops():
        if op.domain not in ("", "ai.onnx") or len(op.outputs) != 1 or not op.outputs[0] \
                or not op.inputs or not op.inputs[0] or op.meta.get(META_QUANT):
            continue
        candidate = _candidate(graph, op, embedding_min_bytes)
        if candidate is not None:
            found.append(candidate)
    return found


def _float32_const(graph: Graph, name: str) -> np.ndarray | None:
    if not name:
        return None
    array = graph.const_value(name)
    if array is None or array.dtype != np.float32:
        return None
    return array


def _float_activation(graph: Graph, name: str) -> bool:
    value = graph.values[name]
    return value.dtype == T.FLOAT and not value.is_const


def _candidate(graph: Graph, op: Op, embedding_min_bytes: int) -> Candidate | None:
    x, y = op.inputs[0], op.outputs[0]
    if op.op_type == "Gather":
        table = _float32_const(graph, x)
        indices = op.inputs[1] if len(op.inputs) > 1 else ""
        if table is None or table.ndim != 2 or int(op.attrs.get("axis", 0)) != 0 or not indices \
                or graph.const_value(indices) is not None or graph.values[x].nbytes < embedding_min_bytes:
            return None
        return Candidate(op.name, "embedding", "Gather", indices, x, 0, "", y, y)
    if not _float_activation(graph, x) or len(op.inputs) < 2:
        return None
    weight = _float32_const(graph, op.inputs[1])
    if weight is None or not np.isfinite(weight).all():
        return None
    bias_name = op.inputs[2] if len(op.inputs) > 2 else ""
    bias = _float32_const(graph, bias_name)
    if bias_name and bias is None:
        return None
    if op.op_type == "Conv":
        if weight.ndim < 3 or (bias is not None and bias.shape != (weight.shape[0],)):
            return None
        kind, axis = "conv", 0
    elif op.op_type == "ConvTranspose":
        if weight.ndim < 3 or int(op.attrs.get("group", 1)) != 1 \
                or (bias is not None and bias.shape != (weight.shape[1],)):
            return None
        kind, axis = "conv_transpose", 1
    elif op.op_type == "Gemm":
        if weight.ndim != 2 or op.attrs.get("transA", 0) or float(op.attrs.get("alpha", 1.0)) != 1.0:
            return None
        axis = 0 if op.attrs.get("transB", 0) else 1
        if bias is not None and (float(op.attrs.get("beta", 1.0)) != 1.0
                                 or bias.size != weight.shape[axis] or bias.ndim > 2
                                 or (bias.ndim == 2 and bias.shape[0] != 1)):
            return None
        kind = "gemm"
    elif op.op_type == "MatMul":
        rank = graph.values[x].rank
        if weight.ndim != 2 or len(op.inputs) != 2 or (rank is not None and rank < 2):
            return None
        kind, axis = "matmul", 1
    else:
        return None
    if bias is not None and not np.isfinite(bias).all():
        return None
    return Candidate(op.name, kind, op.op_type, x, op.inputs[1], axis, bias_name, y,
                     _fused_activation_output(graph, y))


def _fused_activation_output(graph: Graph, y: str) -> str:
    """The output of a Relu/Clip that alone reads `y` (the group's Q then follows it), else y."""
    reader = sole_reader(graph, y)
    if reader is None or not is_onnx(reader, "Relu", "Clip") or reader.inputs[0] != y \
            or y in reader.inputs[1:] or len(reader.outputs) != 1:
        return y
    if reader.op_type == "Clip" and graph.opset() >= 11:
        for bound in reader.inputs[1:]:
            if bound and scalar(graph, bound) is None:
                return y
    return reader.outputs[0]


# ---------------------------------------------------------------------------------------------
# qparams of the activations the groups quantize
# ---------------------------------------------------------------------------------------------
def quantized_tensors(candidates: Iterable[Candidate]) -> list[str]:
    """Activations that get Q/DQ: the inputs and group outputs of the compute candidates."""
    names: dict[str, None] = {}
    for c in candidates:
        if not c.is_embedding:
            names[c.x] = None
            names[c.post] = None
    return list(names)


def activation_qparams(graph: Graph, stats: dict[str, TensorStats], names: Iterable[str],
                       method: str = "l2") -> dict[str, QParams]:
    """qparams of each tensor in `names` that calibration saw, shared within pass-through groups
    and within the tensors' net-aware bounds."""
    groups, members = _shared_members(graph)
    bounds = ActivationBounds(graph)
    result: dict[str, QParams] = {}
    by_root: dict[str, QParams | None] = {}
    for name in names:
        root = groups.get(name, name)
        if root not in by_root:
            group = [m for m in members.get(root, [name]) if m in stats]
            if not group:
                by_root[root] = None
            else:
                pooled = stats[group[0]].merged_with(stats[m] for m in group[1:])
                known = [bounds(m) for m in group]
                floor, ceil = -math.inf, math.inf
                if known and all(b is not None for b in known):
                    floor = min(b[0] for b in known)  # type: ignore[index]
                    ceil = max(b[1] for b in known)  # type: ignore[index]
                lo, hi = choose_range(pooled, method, floor=floor, ceil=ceil)
                by_root[root] = affine_qparams(lo, hi)
        if by_root[root] is not None:
            result[name] = by_root[root]  # type: ignore[assignment]
    return result


def _shared_members(graph: Graph) -> tuple[dict[str, str], dict[str, list[str]]]:
    """(tensor -> root of its shared-qparams group, root -> the group's tensors)."""
    groups = shared_groups(graph)
    members: dict[str, list[str]] = {}
    for name, root in groups.items():
        members.setdefault(root, []).append(name)
    return groups, members


def tensors_to_calibrate(graph: Graph, names: Iterable[str]) -> list[str]:
    """`names` and every tensor sharing a qparams group with one of them."""
    groups, members = _shared_members(graph)
    wanted: dict[str, None] = {}
    for name in names:
        wanted[name] = None
        for member in members.get(groups.get(name, name), []):
            wanted[member] = None
    return list(wanted)


# ---------------------------------------------------------------------------------------------
# quantized weights (computed once, shared by every evaluation)
# ---------------------------------------------------------------------------------------------
class WeightCache:
    """Per-channel int8 weights and row-wise int8 tables of the candidates, computed once.

    `narrow` (a target without VNNI): weights whose 8-bit values have more than
    MAX_OUTLIER_FRACTION beyond NARROW_QMAX are quantized to 7 bits instead ([-64, 64]), so no
    u8*s8 pair sum of a 16-bit multiply-add step can saturate (onnxruntime's AVX2 kernels showed
    4x the budget's error from it); the others keep 8 bits and OutlierSplit moves their few
    large values to a sparse 32-bit product (contract item 7)."""

    def __init__(self, graph: Graph, method: str = "l2", narrow: bool = False) -> None:
        self.graph = graph
        self.method = method
        self.narrow = narrow
        self._int8: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._rows: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        #: op name -> share of 8-bit weights beyond NARROW_QMAX, for ops quantized to 7 bits.
        self.seven_bit: dict[str, float] = {}

    def int8(self, c: Candidate) -> tuple[np.ndarray, np.ndarray]:
        """(int8 weights in the op's layout, float32 scales per output channel)."""
        if c.op_name not in self._int8:
            w = self.graph.values[c.weight].const
            method = "l2" if self.method == "l2" else "minmax"
            scales = weight_scales(w, c.axis, method)
            q = quantize_weights(w, scales, c.axis)
            if self.narrow:
                beyond = float(np.count_nonzero(np.abs(q.astype(np.int16)) > NARROW_QMAX)) \
                    / max(q.size, 1)
                if beyond > MAX_OUTLIER_FRACTION:
                    scales = weight_scales(w, c.axis, method, NARROW_QMAX)
                    q = quantize_weights(w, scales, c.axis, NARROW_QMAX)
                    self.seven_bit[c.op_name] = beyond
            self._int8[c.op_name] = (q, scales)
        return self._int8[c.op_name]

    def rowwise(self, c: Candidate) -> tuple[np.ndarray, np.ndarray]:
        if c.weight not in self._rows:
            self._rows[c.weight] = rowwise_int8(self.graph.values[c.weight].const)
        return self._rows[c.weight]


# ---------------------------------------------------------------------------------------------
# applying a plan
# ---------------------------------------------------------------------------------------------
@dataclass
class Plan:
    """What to do with each candidate: "int8", "fp16" or "fp32" (absent = untouched)."""

    decisions: dict[str, str]
    reasons: dict[str, str] = field(default_factory=dict)
    sensitivity: dict[str, float] = field(default_factory=dict)


def apply_plan(graph: Graph, candidates: Sequence[Candidate], plan: Plan,
               qparams: dict[str, QParams], weights: WeightCache) -> dict[str, int]:
    """Rewrite `graph` per the plan (contract items 1-6); counts of what was done."""
    ops = {op.name: op for op in graph.ops.values()}
    editor = _Editor(graph, qparams)
    counts = {"ops_int8": 0, "ops_int8_7bit": 0, "ops_fp16": 0, "ops_fp32": 0,
              "embeddings_int8": 0, "embeddings_fp32": 0}
    for c in candidates:
        decision = plan.decisions.get(c.op_name)
        op = ops.get(c.op_name)
        if decision is None or op is None:
            continue
        if c.is_embedding:
            if decision == "int8":
                editor.embedding(op, c, *weights.rowwise(c))
                counts["embeddings_int8"] += 1
            else:
                counts["embeddings_fp32"] += 1
        elif decision == "int8":
            editor.int8(op, c, *weights.int8(c))
            counts["ops_int8"] += 1
            seven = c.op_name in weights.seven_bit
            counts["ops_int8_7bit"] += seven
            op.meta[META_WEIGHT_BITS] = "7" if seven else "8"
        elif decision == "fp16" and editor.fp16(op, c):
            counts["ops_fp16"] += 1
        else:
            decision = "fp32"
            counts["ops_fp32"] += 1
        op.meta[META_QUANT] = "int8_rowwise" if c.is_embedding and decision == "int8" else decision
        if c.op_name in plan.reasons:
            op.meta[META_REASON] = plan.reasons[c.op_name]
        if c.op_name in plan.sensitivity:
            op.meta[META_SENSITIVITY] = f"{plan.sensitivity[c.op_name]:.2e}"
    counts["residual_adds_quantized"] = editor.residual_adds()
    counts["qdq_pairs"] = editor.pairs_added
    return counts


class _Editor:
    """The graph edits of the contract, with one Q/DQ pair per activation tensor."""

    def __init__(self, graph: Graph, qparams: dict[str, QParams]) -> None:
        self.graph = graph
        self.qparams = qparams
        self.pairs: dict[str, str] = {}
        self.pairs_added = 0

    # -- building blocks ------------------------------------------------------------------------
    def const(self, array: np.ndarray, hint: str) -> str:
        return self.graph.add_const(np.asarray(array, order="C"), hint).name  # keeps 0-d

    def add(self, op_type: str, inputs: Sequence[str], hint: str, dtype: int, shape,
            attrs: dict | None = None, output: str | None = None) -> str:
        out = output or self.graph.add_value(self.graph.fresh_name(hint), dtype, shape).name
        self.graph.add_op(op_type, list(inputs), [out], attrs, name=hint)
        return out

    def scale_zp(self, name: str) -> tuple[str, str, QParams]:
        qp = self.qparams[name]
        scale = self.const(np.array(qp.scale, dtype=np.float32), f"{name}_scale")
        zp = self.const(np.array(qp.zero_point, dtype=np.uint8), f"{name}_zero_point")
        return scale, zp, qp

    def input_pair(self, name: str) -> str:
        """The dequantized version of activation `name` (contract item 1), made once."""
        if name in self.pairs:
            return self.pairs[name]
        if self._already_dequantized(name):
            return name               # already the output of a quantized group
        value = self.graph.values[name]
        scale, zp, _ = self.scale_zp(name)
        q = self.add("QuantizeLinear", [name, scale, zp], f"{name}_quantized", T.UINT8,
                     value.shape)
        dq = self.add("DequantizeLinear", [q, scale, zp], f"{name}_dequantized", T.FLOAT,
                      value.shape)
        self.pairs[name] = dq
        self.pairs_added += 1
        return dq

    def inline_pair(self, name: str) -> None:
        """Q/DQ right after the producer of `name`: every reader sees the dequantized value
        (contract item 4: the group's output)."""
        if name in self.pairs or self._already_dequantized(name):
            return
        scale, zp, _ = self.scale_zp(name)
        raw = detach_producer(self.graph, name, f"{name}_float")
        shape = self.graph.values[raw].shape
        q = self.add("QuantizeLinear", [raw, scale, zp], f"{name}_quantized", T.UINT8, shape)
        self.add("DequantizeLinear", [q, scale, zp], f"{name}_dequantize", T.FLOAT, shape,
                 output=name)
        self.pairs[name] = name
        self.pairs_added += 1

    def _already_dequantized(self, name: str) -> bool:
        producer = self.graph.producer_op(name)
        return producer is not None and producer.op_type == "DequantizeLinear"

    def dequantized(self, name: str) -> str | None:
        """The dequantized version of `name` if the plan made one (or it is one), else None."""
        if self._already_dequantized(name):
            return name
        return self.pairs.get(name)

    # -- the rewrites ----------------------------------------------------------------------------
    def residual_adds(self) -> int:
        """Contract item 9: an Add whose two inputs both have dequantized versions reads those,
        when its result (directly or through a Relu) is quantized too."""
        g = self.graph
        done = 0
        for op in list(g.ops.values()):
            if not is_onnx(op, "Add") or op.graph is not g or len(op.inputs) != 2 \
                    or op.inputs[0] == op.inputs[1]:
                continue
            sources = [self.dequantized(name) for name in op.inputs]
            if any(s is None for s in sources) or sources == list(op.inputs):
                continue
            out = op.outputs[0]
            readers = [r for r, _ in g.consumers(out, implicit=True)]
            if len(readers) == 1 and readers[0].op_type == "Relu":
                out = readers[0].outputs[0]
            if self.dequantized(out) is None:
                continue
            for slot, source in enumerate(sources):
                if source != op.inputs[slot]:
                    g.set_input(op, slot, source)
            done += 1
        return done

    def int8(self, op: Op, c: Candidate, w_q: np.ndarray, w_scale: np.ndarray) -> None:
        g = self.graph
        x_dq = self.input_pair(c.x)
        x_scale = self.qparams[c.x].scale
        bias = g.values[c.bias].const.reshape(-1) if c.bias else None
        if bias is not None:
            # The int32 bias must hold b / (x_scale * w_scale): raise the scale of a channel whose
            # weights are tiny next to its bias (rare: a dead channel of a folded BatchNorm).
            need = np.abs(bias.astype(np.float64)) / (x_scale * (_INT32_MAX - 1))
            low = w_scale < need
            if low.any():
                w_scale = np.where(low, need * 1.01, w_scale).astype(np.float32)
                w_q = quantize_weights(g.values[c.weight].const, w_scale, c.axis)
        channels = w_scale.size
        w_value = g.values[c.weight]
        w_q_name = self.const(w_q, f"{c.weight}_quantized")
        w_scale_name = self.const(w_scale, f"{c.weight}_scale")
        w_zp_name = self.const(np.zeros(channels, dtype=np.int8), f"{c.weight}_zero_point")
        w_dq = self.add("DequantizeLinear", [w_q_name, w_scale_name, w_zp_name],
                        f"{c.weight}_dequantized", T.FLOAT, w_value.shape, {"axis": c.axis})
        g.set_input(op, 0, x_dq)
        set_input(g, op, 1, w_dq)            # the float weight goes with its last reader
        if bias is not None:
            b_scale = (np.float32(x_scale) * w_scale).astype(np.float32)
            b_q = np.clip(np.rint(bias / b_scale), -_INT32_MAX, _INT32_MAX).astype(np.int32)
            b_q_name = self.const(b_q, f"{c.bias}_quantized")
            b_scale_name = self.const(b_scale, f"{c.bias}_scale")
            b_dq = self.add("DequantizeLinear", [b_q_name, b_scale_name],
                            f"{c.bias}_dequantized", T.FLOAT, (channels,), {"axis": 0})
            set_input(g, op, 2, b_dq)
        self.inline_pair(c.post)

    def fp16(self, op: Op, c: Candidate) -> bool:
        """fp16 weights + Cast (contract item 6); False when they do not fit float16."""
        g = self.graph
        w = g.values[c.weight].const
        if np.abs(w).max(initial=0.0) > _FP16_MAX:
            return False
        w16 = self.const(w.astype(np.float16), f"{c.weight}_fp16")
        cast = self.add("Cast", [w16], f"{c.weight}_fp32", T.FLOAT, g.values[c.weight].shape,
                        {"to": T.FLOAT})
        set_input(g, op, 1, cast)
        return True

    def embedding(self, op: Op, c: Candidate, q: np.ndarray, scales: np.ndarray) -> None:
        """Row-wise int8 table (contract item 5): Gather(int8) -> Cast -> Mul(row scale)."""
        g = self.graph
        out = g.values[c.output]
        idx_shape = g.values[c.x].shape
        table_q = self.const(q, f"{c.weight}_quantized")
        row_scales = self.const(scales, f"{c.weight}_row_scales")
        raw = detach_producer(g, c.output, f"{c.output}_int8")
        g.values[raw].dtype = T.INT8
        set_input(g, op, 0, table_q)
        as_float = self.add("Cast", [raw], f"{c.output}_cast", T.FLOAT, out.shape, {"to": T.FLOAT})
        picked = self.add("Gather", [row_scales, c.x], f"{c.output}_row_scale", T.FLOAT,
                          idx_shape, {"axis": 0})
        axes = self.const(np.array([-1], dtype=np.int64), f"{c.output}_axes")
        column = self.add("Unsqueeze", [picked, axes], f"{c.output}_row_scale_column", T.FLOAT,
                          None if idx_shape is None else tuple(idx_shape) + (1,))
        self.add("Mul", [as_float, column], f"{c.output}_dequantize", T.FLOAT, out.shape,
                 output=c.output)


def detach_producer(graph: Graph, name: str, hint: str) -> str:
    """Let the producer of `name` write a fresh value instead and return its name; `name` keeps
    its explicit readers and its place among the graph outputs (with its declared type), and
    waits for a new producer. Subgraphs that read `name` read the fresh value."""
    value = graph.values[name]
    readers = graph.consumers(value)
    positions = [i for i, n in enumerate(graph.outputs) if n == name]
    raw = graph.fresh_name(hint)
    graph.rename_value(value, raw)
    new = graph.add_value(name, value.dtype, value.shape)
    for attr in ("type_proto", "_declared", "value_info_proto"):
        setattr(new, attr, getattr(value, attr))
        setattr(value, attr, None)
    new.doc_string, value.doc_string = value.doc_string, ""
    for op, slot in readers:
        graph.set_input(op, slot, name)
    for i in positions:
        graph.outputs[i] = name
    return raw


# ---------------------------------------------------------------------------------------------
# measuring a plan
# ---------------------------------------------------------------------------------------------
def relative_l2(reference: Sequence[Sequence[np.ndarray]],
                actual: Sequence[Sequence[np.ndarray]]) -> float:
    """Worst ||actual - reference|| / ||reference|| over the float outputs, all batches pooled.
    Elements that are not finite in the reference are ignored; a non-finite result where the
    reference is finite is an infinite error."""
    worst = 0.0
    for index in range(len(reference[0]) if reference else 0):
        num = den = 0.0
        for ref_batch, act_batch in zip(reference, actual):
            e = np.asarray(ref_batch[index])
            a = np.asarray(act_batch[index])
            if e.dtype.kind != "f" or e.shape != a.shape:
                if e.shape != a.shape:
                    return math.inf
                continue
            terms = squared_error_terms(e, a)
            if terms is None:
                return math.inf
            num += terms[0]
            den += terms[1]
        if num:
            worst = max(worst, math.sqrt(num / den) if den else math.inf)
    return worst


class Evaluator:
    """Applies a plan to a cheap copy of the float graph and measures the model error on the
    evaluation batches with the graphopt runtime. The copy shares every large constant with the
    original (it is rebuilt from the graph's structure, weights attached by reference)."""

    def __init__(self, graph: Graph, candidates: Sequence[Candidate],
                 qparams: dict[str, QParams], weights: WeightCache,
                 batches: Sequence[dict[str, np.ndarray]],
                 reference: Sequence[Sequence[np.ndarray]]) -> None:
        from graphopt.onnx_io import to_model_without_large_constants

        self.graph = graph
        self.candidates = candidates
        self.qparams = qparams
        self.weights = weights
        self.batches = list(batches)
        self.reference = reference
        self.skeleton, self.swapped = to_model_without_large_constants(graph, max_bytes=4096)
        self.runs = 0

    def on(self, batches: Sequence[dict[str, np.ndarray]],
           reference: Sequence[Sequence[np.ndarray]]) -> Evaluator:
        """The same evaluator on other batches (sharing the graph's skeleton)."""
        other = shallow_copy(self)
        other.batches, other.reference, other.runs = list(batches), reference, 0
        return other

    def copy(self) -> Graph:
        from graphopt.onnx_io import load_with_constants_of
        return load_with_constants_of(self.skeleton, self.graph, self.swapped)

    def outputs(self, plan: Plan) -> list[list[np.ndarray]]:
        from graphopt.runtime import Session

        copy = self.copy()
        apply_plan(copy, self.candidates, plan, self.qparams, self.weights)
        session = Session(copy, concat_views=False)   # plan faster; same results
        self.runs += 1
        return [[np.asarray(session.run(b)[n]) for n in copy.outputs] for b in self.batches]

    def error(self, plan: Plan) -> float:
        return relative_l2(self.reference, self.outputs(plan))


# ---------------------------------------------------------------------------------------------
# selective quantization
# ---------------------------------------------------------------------------------------------
@dataclass
class Selection:
    plan: Plan
    error: float
    error_all_int8: float
    evaluations: int


def select(candidates: Sequence[Candidate], error_of, budget: float, *,
           sensitivity: dict[str, float] | None = None, fp16_ok=lambda c: True,
           sensitivity_of=None) -> Selection:
    """The plan with the most int8 ops whose model error is within `budget` (module docstring,
    steps 3-4). `error_of(plan) -> float` measures a plan; `sensitivity` (op -> error of that op
    alone) is measured here when not given, with `sensitivity_of` (default `error_of`: a
    cheaper measure on fewer samples serves, since it only ranks the ops)."""
    evaluations = 0

    def measure(decisions: dict[str, str], measure_with=error_of) -> float:
        nonlocal evaluations
        evaluations += 1
        return measure_with(Plan(decisions))

    names = [c.op_name for c in candidates]
    by_name = {c.op_name: c for c in candidates}
    if sensitivity is None:
        sensitivity = {name: measure({name: "int8"}, sensitivity_of or error_of)
                       for name in names}
    order = sorted(names, key=lambda n: (-sensitivity[n], names.index(n)))
    all_int8 = {name: "int8" for name in names}
    error_all = measure(all_int8)

    def fallback(name: str, precision: str) -> str:
        if precision == "fp16" and (by_name[name].is_embedding or not fp16_ok(by_name[name])):
            return "fp32"
        return precision

    def plan_with(k: int, precision: str) -> dict[str, str]:
        decisions = dict(all_int8)
        for name in order[:k]:
            decisions[name] = fallback(name, precision)
        return decisions

    errors: dict[tuple[int, str], float] = {(0, "fp16"): error_all, (0, "fp32"): error_all}

    def error_at(k: int, precision: str) -> float:
        if (k, precision) not in errors:
            errors[(k, precision)] = measure(plan_with(k, precision))
        return errors[(k, precision)]

    def smallest_k(precision: str) -> int | None:
        n = len(order)
        if error_at(0, precision) <= budget:
            return 0
        k = 1
        while k <= min(3, n):                      # one op at a time first
            if error_at(k, precision) <= budget:
                return k
            k += 1
        low = k - 1                                # known over budget
        while k < n and error_at(k, precision) > budget:
            low, k = k, min(2 * k, n)              # then doubling
        if error_at(k, precision) > budget:
            return None
        while k - low > 1:                         # and bisection
            mid = (low + k) // 2
            if error_at(mid, precision) <= budget:
                k = mid
            else:
                low = mid
        return k

    precision = "fp16"
    k = smallest_k("fp16")
    if k is None:
        precision = "fp32"
        k = smallest_k("fp32")
        if k is None:   # even all-float misses it (budget 0, or noise): keep everything float
            k = len(order)
    decisions = plan_with(k, precision)
    final = error_at(k, precision)
    plan = Plan(decisions, sensitivity=dict(sensitivity))
    total = len(order)
    for rank, name in enumerate(order, start=1):
        s = sensitivity[name]
        if decisions[name] == "int8":
            if by_name[name].is_embedding:
                plan.reasons[name] = (f"row-wise int8: sensitivity {s:.1e} (rank {rank} of "
                                      f"{total}); model error {final:.1e} within budget "
                                      f"{budget:.0e}")
            continue
        kept = "kept fp16" if decisions[name] == "fp16" else "kept fp32"
        rank_text = "the highest" if rank == 1 else f"rank {rank} of {total}"
        plan.reasons[name] = (f"sensitivity {s:.1e}, {rank_text}: {kept}; all-int8 error "
                              f"{error_all:.1e}, with the {k} most sensitive in float "
                              f"{final:.1e} (budget {budget:.0e})")
    return Selection(plan, final, error_all, evaluations)


def select_lazily(candidates: Sequence[Candidate], error_of, budget: float, **kwargs) -> Selection:
    """`select`, but sensitivities are measured only when the all-int8 model misses the budget."""
    all_int8 = Plan({c.op_name: "int8" for c in candidates})
    error_all = error_of(all_int8)
    if error_all <= budget:
        plan = Plan(dict(all_int8.decisions))
        for c in candidates:
            if c.is_embedding:
                plan.reasons[c.op_name] = (f"row-wise int8: model error {error_all:.1e} with "
                                           f"every op int8, within budget {budget:.0e}")
        return Selection(plan, error_all, error_all, 1)
    chosen = select(candidates, error_of, budget, **kwargs)
    chosen.evaluations += 1
    return chosen


# ---------------------------------------------------------------------------------------------
# the pass
# ---------------------------------------------------------------------------------------------
class QuantizationPass(Pass):
    """An O3 pass: it changes numerics within the error budget (numeric verification allows
    VERIFY_SLACK budgets) and works on the main graph only."""

    recurse_subgraphs = False
    changes_numerics = True

    def numeric_tolerance(self, ctx: PassContext) -> float | None:
        return VERIFY_SLACK * float(ctx.option("quant_error_budget", DEFAULT_ERROR_BUDGET))


class Quantize(QuantizationPass):
    """Calibrate, measure per-op sensitivity and quantize to int8 within the error budget
    (module docstring). Options (ctx): `calibration` (path, feeds, CalibrationData or None),
    `calibration_method` ("l2", "minmax", "percentile", "kl"), `calibration_batch_size`,
    `quant_error_budget` (relative L2, default 2e-2), `quant_sensitivity` ("auto", the
    default: measured only when the all-int8 model misses the budget; "always"),
    `quant_embedding_min_bytes`."""

    name = "quantize"

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        result = PassResult()
        state = quantization_state(ctx)
        if graph.parent is not None or graph.model is None:
            return result
        start = time.perf_counter()
        budget = float(ctx.option("quant_error_budget", DEFAULT_ERROR_BUDGET))
        method = str(ctx.option("calibration_method", "l2"))
        min_bytes = int(ctx.option("quant_embedding_min_bytes", EMBEDDING_MIN_BYTES))
        candidates = find_candidates(graph, min_bytes)
        if not candidates:
            state.skipped = "no op to quantize"
            return result
        if graph.opset() < MIN_OPSET:
            from graphopt.passes.opset import convert_opset
            current = graph.opset()
            if not convert_opset(graph, MIN_OPSET):
                state.skipped = f"opset {current} cannot be converted to {MIN_OPSET} (per-channel " \
                                "DequantizeLinear)"
                return result
            result.count(f"opset_{current}_to_{MIN_OPSET}")
        names = {c.op_name for c in candidates}   # the converter keeps op names
        unique_op_names(graph, [op for op in graph.ops.values() if op.name in names or not op.name])
        candidates = find_candidates(graph, min_bytes)

        data = calibration_data(graph, ctx.option("calibration"),
                                batch_size=ctx.option("calibration_batch_size"),
                                shapes=ctx.option("shapes"))
        state.calibration = data.summary()
        state.input_shapes = {k: tuple(v.shape) for k, v in data.batches[0].items()}
        tensors = quantized_tensors(candidates)
        try:
            run = collect_statistics(graph, data, tensors_to_calibrate(graph, tensors),
                                     keep_sample=[c.x for c in candidates if not c.is_embedding])
        except Exception as exc:  # the runtime cannot run the float model: no calibration
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            state.skipped = f"calibration failed in the graphopt runtime: {first[:200]}"
            return result
        qparams = activation_qparams(graph, run.stats, tensors, method)
        candidates = [c for c in candidates
                      if c.is_embedding or (c.x in qparams and c.post in qparams)]
        if not candidates:
            state.skipped = "calibration saw none of the tensors to quantize"
            return result

        eval_count = _eval_batches(data)
        narrow = _narrow_weights(ctx)
        weights = WeightCache(graph, method, narrow)
        evaluator = Evaluator(graph, candidates, qparams, weights, data.batches[:eval_count],
                              run.outputs[:eval_count])
        fits_fp16 = {c.op_name for c in candidates if not c.is_embedding
                     and float(np.abs(graph.values[c.weight].const).max(initial=0.0)) <= _FP16_MAX}
        fp16_ok = lambda c: c.op_name in fits_fp16
        chooser = select_lazily if ctx.option("quant_sensitivity", "auto") == "auto" else select
        ranking = _ranking_evaluator(graph, evaluator, data, run.outputs, eval_count)
        selection = chooser(candidates, evaluator.error, budget, fp16_ok=fp16_ok,
                            sensitivity_of=ranking.error)

        counts = apply_plan(graph, candidates, selection.plan, qparams, weights)
        for c in candidates:
            if selection.plan.decisions.get(c.op_name) == "int8" and not c.is_embedding:
                sample = run.stats[c.x].sample if c.x in run.stats else None
                if sample is not None:
                    state.samples[c.op_name] = (sample, qparams[c.x])
        for key, n in counts.items():
            result.count(key, n)
        result.count("evaluations", selection.evaluations)
        result.count("error_rel_l2_ppm", max(1, round(selection.error * 1e6))
                     if selection.error > 0 else 0)
        result.changed = True
        state.summary = {
            "error_rel_l2": float(f"{selection.error:.4g}"), "budget": budget,
            "error_all_int8": float(f"{selection.error_all_int8:.4g}"),
            "ops_int8": counts["ops_int8"], "ops_int8_7bit": counts["ops_int8_7bit"],
            "narrow_weights": narrow, "ops_fp16": counts["ops_fp16"],
            "ops_fp32": counts["ops_fp32"], "embeddings_int8": counts["embeddings_int8"],
            "embeddings_fp32": counts["embeddings_fp32"],
            "evaluations": selection.evaluations, "eval_samples": _samples(data, eval_count),
            "method": method, "seconds": round(time.perf_counter() - start, 3),
        }
        return result


def _narrow_weights(ctx: PassContext) -> bool:
    """Whether the target's int8 kernels need |w_q| <= NARROW_QMAX for exact pair sums: every
    ISA without VNNI (vpmaddubsw saturates a1*w1 + a2*w2 at int16)."""
    from graphopt.passes.kernel_select import VNNI_ISAS, resolve_machine
    return resolve_machine(ctx).isa not in VNNI_ISAS


def _ranking_evaluator(graph: Graph, evaluator: Evaluator, data: CalibrationData,
                       reference: Sequence[Sequence[np.ndarray]], eval_count: int) -> Evaluator:
    """The evaluator the sensitivity ranking uses: the first RANKING_SAMPLES samples of the first
    batch (with their float outputs), or the first batch when it cannot be cut (a fixed batch
    dimension), or the evaluation set itself when that is one batch no larger."""
    from graphopt.runtime import Session

    first = data.batches[0]
    if batch_samples(first) > RANKING_SAMPLES:
        cut = {name: array[:RANKING_SAMPLES] for name, array in first.items()}
        try:
            outputs = Session(graph, concat_views=False).run(cut)
            return evaluator.on([cut], [[np.asarray(outputs[n]) for n in graph.outputs]])
        except Exception:   # noqa: BLE001 - the model wants its full batch: rank on that
            pass
    return evaluator.on(data.batches[:1], reference[:1]) if eval_count > 1 else evaluator


def _eval_batches(data: CalibrationData) -> int:
    count = samples = 0
    for batch in data.batches[:EVAL_MAX_BATCHES]:
        count += 1
        samples += batch_samples(batch)
        if samples >= EVAL_SAMPLES:
            break
    return max(count, 1)


def _samples(data: CalibrationData, batches: int) -> int:
    return sum(batch_samples(b) for b in data.batches[:batches])


PASSES: list[type[Pass]] = [Quantize]

