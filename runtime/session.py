"""Session: build a graph into a plan once, run it many times.

    session = Session("model.onnx", profile=True)
    outputs = session.run({"x": x})           # {output name: array}
    session.peak_bytes                         # live intermediate bytes at the peak of that run
    print(session.profile.table())             # where the time went, by op type

Build (once, in the constructor):
- Weights become read-only arrays. Ops computing constants (Constant, and any op whose inputs
  are all weights, such as the ConstantOfShape weights of onnx's light models) are evaluated
  once here and join them.
- One kernel per op, from the registry by (domain, op_type) and the model's opset for that
  domain; the factory gets the op's attributes and constant inputs (`KernelNode`). Every op
  without a kernel is named in one UnsupportedOpError, raised here rather than mid-run.
- Subgraphs (If branches, Loop/Scan bodies) are built the same way by the control kernels,
  through `KernelNode.services`.

Plan (per set of requested outputs, cached): the ops those outputs need in topological order,
fused epilogue groups, and a release list per step: every intermediate is dropped from the
environment right after its last consumer (runtime/memory.py), so its buffer is freed as soon as
nothing else points into it.

In place: a kernel that accepts `out=` lists the input slots whose buffer may take its output
(`fn.inplace_slots`, see registry.py). The plan keeps, per step, the slots whose value dies at
that step and was produced inside this graph (never a weight, graph input or outer-scope value);
at run time the buffer is reused only if it is writeable, contiguous (C or Fortran order; numpy
computes some ufuncs wrongly in place on strided views) and no other live tensor points into its
memory (a view of it, or the array it is a view of: `LiveBuffers.references`). Weights, Constant
outputs, feeds and the inputs a control-flow op hands its subgraph (loop-carried values, scan
slices) are read-only views, so neither they nor anything viewing them can be overwritten.

Fused epilogues: an op whose meta has `graphopt.fuse_into=<name of an earlier op>` is an
elementwise epilogue (Relu, Clip, LeakyRelu, Sigmoid, HardSigmoid, HardSwish, Tanh, or Add/Sum of a
residual) of that head op (Conv, Gemm, MatMul, ConvTranspose). The plan merges the head and its
epilogue chain into one step: the head runs, then each epilogue runs with `out=` the head's
output buffer, so the chain allocates no further full-size tensor and the intermediates never
enter the environment. The step sits where the last epilogue was in topological order, so every
other input (the residual) is ready. Fusion happens only when the meta is present and it is safe:
the epilogue is one of the ops above and its kernel accepts `out=` on the slot reading the chain,
the chained value has exactly that one reader and is neither a graph output nor a requested
output, and the head has a single output; otherwise the ops run unfused. At run time an epilogue
whose output would not fit the buffer (broadcast to a larger shape, another dtype) allocates
instead. When the chain starts with an activation and the head's kernel offers
`absorb_activation` (Conv does, kernels/fused_activation.py), the head applies it itself: it
folds the activation's affine prefix into its weights and bias at build time (HardSwish then
costs 3 passes instead of 4, HardSigmoid 1 instead of 3), and the activation leaves the
epilogue list (its time shows under the head in profiles).

QDQ groups (runtime/qdq.py, runtime/kernels/qdq.py): in a quantized model, DequantizeLinear ->
Conv/Gemm/MatMul [-> Add of the outlier op] [-> Relu/Clip] -> QuantizeLinear runs as one int8
step reading the quantized input and writing the quantized output: the integer product with the
accumulation the compute op's meta names (`graphopt.kernel`: int8_acc16 runs the 16-bit model,
else exact 32-bit), the int32 bias, the outlier's sparse product, the clamps and the
requantization. The groups are recognized and their kernels built once, here; a plan fuses a
group unless it requests one of the float values the step skips (`fuse=False` runs every group
op by op: fake quantization in float). The step carries the compute op's name and type, so
profiles show the int8 work under Conv/Gemm/MatMul; `Session.int8_steps` lists the groups a plan
runs. Weight DequantizeLinear ops whose only readers are compute ops are not folded at build:
a fused step reads the int8 weights, and the float copy is made only for a plan that runs such
a compute op in float (sparse initializers read only by DequantizeLinear stay undecoded too).

Concat views (`concat_views=True`, runtime/concat_views.py): a default-domain Concat with static
shapes gets its output buffer before its inputs exist, and the steps producing its inputs write
straight into their slices of it (kernels declaring `view_layout`, registry.py: Conv, MaxPool,
AveragePool, BatchNormalization and the ufunc-based elementwise ops; a fused group through its
head, its epilogues then running in place on the slice). Only an input nothing else reads
qualifies, and only where allocating the buffer that early does not raise the estimated peak
of live bytes. The buffer is allocated when the first such producer runs, counted once, and
becomes the Concat's output; the Concat step copies only the inputs not already in place.
Static shapes come from the graph's values, or from shape inference run at plan time (the
graph's values are left as they were). `Session.concat_views` lists the plan's placements,
`Session.written_in_place` those the last run made (a producer whose inputs do not have the
planned shapes, or whose kernel declines the slice, is copied as before).

Allocator: the first Session of a process raises glibc malloc's mmap and trim thresholds
(memory.tune_allocator; GRAPHOPT_MALLOC_TUNING=0 turns it off), so that a run's large
activations are reused from the heap instead of being page-faulted in again on every run.

Profiling (`profile=True`): each kernel call is timed with time.perf_counter and accumulated per
op across runs in `session.profile` (runtime/profile.py); a control-flow op's time includes its
subgraphs.
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from graphopt.errors import GraphoptError, UnsupportedOpError, UsageError
from graphopt.feeds import name_list
from graphopt.ir import IMPLICIT, Graph, Op, onnx_to_np_dtype
from graphopt.runtime import concat_views, memory, qdq
from graphopt.runtime.concat_views import ConcatBuffers, ConcatTarget, Placement, StepInfo
from graphopt.runtime.kernels import registry
from graphopt.runtime.kernels.qdq import Constants, build_group_kernel
from graphopt.runtime.kernels.registry import KernelFn, KernelNode
from graphopt.runtime.kernels.sparse_int8 import dense_of_proto
from graphopt.runtime.profile import Profile
from graphopt.runtime.qdq import Int8Step, QdqGroup

#: Op meta key naming the head op an elementwise epilogue is fused into.
FUSE_META = "graphopt.fuse_into"
#: Ops that may run as a fused epilogue on their head's output buffer.
EPILOGUE_OPS = frozenset({"Relu", "Clip", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish",
                          "Tanh", "Add", "Sum"})


#: Serializes `GraphProgram._infer_types`, which changes a graph's value types for a moment.
_INFER_LOCK = threading.Lock()

#: Ops never evaluated at build time even when their inputs are constant.
_NEVER_FOLD = frozenset({"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike",
                         "Bernoulli", "Multinomial"})


class KernelFailure(GraphoptError):
    """A kernel raised while running (names the op); exit code 1."""


def readonly(array: Any) -> Any:
    """A read-only view of an array (other values are returned as they are)."""
    if isinstance(array, np.ndarray) and array.flags.writeable:
        array = array.view()
        array.flags.writeable = False
    return array


# ---------------------------------------------------------------------------------------------
# plan data
# ---------------------------------------------------------------------------------------------
@dataclass
class _Kernel:
    """An op with its built kernel."""

    op: Op
    label: str                      # unique display name (profile key)
    fn: KernelFn
    inplace_slots: tuple[int, ...]
    needs_scope: bool
    node: KernelNode | None = None  # what the factory saw (for absorbing fused activations)


@dataclass
class _Epilogue:
    kernel: _Kernel
    slot: int                       # input slot that reads the chain's buffer
    inputs: tuple[str, ...]         # input names; inputs[slot] is the chained value


@dataclass
class _Step:
    kernel: _Kernel
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]        # for a fused group: the last epilogue's output
    release: tuple[str, ...] = ()
    inplace: tuple[int, ...] = ()   # slots whose (dying) buffer may take the output
    epilogues: tuple[_Epilogue, ...] = ()
    place: Placement | None = None          # writes its output into a Concat's buffer
    concat: ConcatTarget | None = None      # a Concat whose buffer its producers fill


@dataclass
class _Plan:
    steps: list[_Step]
    outputs: tuple[str, ...]
    fused: list[tuple[str, tuple[str, ...]]] = field(default_factory=list)
    #: (Concat label, inputs its producers write in place), as planned.
    concat_views: list[tuple[str, tuple[str, ...]]] = field(default_factory=list)
    #: QDQ groups the plan runs as one int8 step.
    int8: list[Int8Step] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# a built graph (the model's, or a subgraph's)
# ---------------------------------------------------------------------------------------------
class GraphProgram:
    """A graph with its kernels built; runs it for any set of requested outputs."""

    def __init__(self, graph: Graph, services: _Services) -> None:
        self.graph = graph
        self.services = services
        #: Weights and folded Constant outputs, read-only. Initializers that are also graph
        #: inputs are defaults a feed may override.
        self.consts: dict[str, Any] = {}
        self.defaults: dict[str, Any] = {}
        #: Names this graph reads from enclosing graphs.
        self.outer_names = [v.name for v in graph.values.values() if v.outer]
        # Before IR version 4 every initializer had to be listed as a graph input too; such
        # inputs are weights, not defaults a feed may override (onnxruntime reads them so too).
        info = graph.root.model
        listed_weights_are_inputs = info is not None and info.ir_version < 4
        #: Sparse weights read only by DequantizeLinear ops, kept undecoded (QDQ outlier
        #: weights: the int8 step reads their nonzeros; a plan that runs the DQ densifies).
        self._sparse: dict[str, onnx.SparseTensorProto] = {}
        for value in graph.values.values():
            if value.outer or not value.is_const:
                continue
            is_input = graph.is_input(value.name) and not listed_weights_are_inputs
            if value.sparse_proto is not None:
                if not is_input and self._only_dequantized(value.name):
                    self._sparse[value.name] = value.sparse_proto
                    continue
                array = readonly(dense_of_proto(value.sparse_proto))
            else:
                array = readonly(value.const)
            if is_input:
                self.defaults[value.name] = array
            else:
                self.consts[value.name] = array
        self.order: list[Op] = []
        self.kernels: dict[int, _Kernel] = {}
        #: Constant weight DequantizeLinear ops not folded at build (see _deferrable).
        self._deferred: dict[int, _Kernel] = {}
        self._build_kernels()
        #: QDQ groups by the id of their output QuantizeLinear: (group, its int8 step kernel).
        self.qdq: dict[int, tuple[QdqGroup, _Kernel]] = {}
        self._build_qdq_groups()
        self._const_owner_ids = {id(memory.owner_of(a)) for a in self.consts.values()
                                 if isinstance(a, np.ndarray)}
        self._plans: dict[tuple[str, ...], _Plan] = {}
        self._plan_lock = threading.Lock()
        self._inferred: dict[str, tuple[int, Any]] | None = None   # see _static_type

    # -- build -------------------------------------------------------------------------------
    def _build_kernels(self) -> None:
        graph = self.graph
        missing: dict[str, int] = {}
        labels: set[str] = set()
        for op in graph.topological_ops():
            try:
                factory = registry.lookup(op.op_type, op.domain, graph.opset(op.domain))
            except UnsupportedOpError:
                key = f"{op.domain}.{op.op_type}" if op.domain else op.op_type
                missing[key] = missing.get(key, 0) + 1
                continue
            if missing:
                continue  # keep collecting the missing ones; nothing will run anyway
            node = KernelNode(op=op, graph=graph, opset=graph.opset(op.domain),
                              consts=[self.consts.get(n) if n else None for n in op.inputs],
                              services=self.services)
            try:
                fn = factory(node)
            except GraphoptError:
                raise
            except Exception as exc:
                first = (str(exc).strip().splitlines() or [""])[0]
                raise GraphoptError(f"cannot build the kernel of {op.op_type} op "
                                    f"{op.name!r}: {type(exc).__name__}: {first}") from exc
            label = op.name if op.name and op.name not in labels else f"{op.op_type}#{op.id}"
            labels.add(label)
            kernel = _Kernel(op, label, fn, tuple(getattr(fn, "inplace_slots", ())),
                             bool(getattr(fn, "needs_scope", False)), node)
            if self._foldable(op):
                if self._deferrable(op):
                    self._deferred[op.id] = kernel
                    continue
                if self._fold(kernel, node.consts):
                    continue
            self.order.append(op)
            self.kernels[op.id] = kernel
        if missing:
            names = ", ".join(f"{k} ({n} ops)" if n > 1 else k for k, n in sorted(missing.items()))
            where = "" if graph.parent is None else f" (in subgraph {graph.name!r})"
            raise UnsupportedOpError(f"the graphopt runtime has no kernel for: {names}{where}")

    def _foldable(self, op: Op) -> bool:
        """Whether an op computes a constant: every input is a weight (or omitted), it has no
        subgraph and no randomness. ConstantOfShape weights of the light models are such ops."""
        if op.domain or op.op_type in _NEVER_FOLD or any(True for _ in op.subgraphs()):
            return False
        return all(not n or n in self.consts or n in self._sparse for n in op.inputs)

    def _fold(self, kernel: _Kernel, consts: list[Any]) -> bool:
        """Evaluate a constant op once at build; its outputs become weights. False when it
        fails (it then runs, and fails, at run time with a proper message)."""
        try:
            with np.errstate(all="ignore"):
                values = kernel.fn(*consts)
        except Exception:
            return False
        for name, value in zip(kernel.op.outputs, values):
            if name:
                self.consts[name] = readonly(value)
        return True

    # -- QDQ groups (qdq.py, kernels/qdq.py) ---------------------------------------------------
    def _only_dequantized(self, name: str) -> bool:
        """Whether a weight's only readers are DequantizeLinear ops (at their data slot)."""
        readers = self.graph.consumers(name, implicit=True)
        return bool(readers) and not self.graph.is_output(name) \
            and all(op.op_type == "DequantizeLinear" and slot == 0 for op, slot in readers)

    def _deferrable(self, op: Op) -> bool:
        """A DequantizeLinear of a constant 8-bit weight or int32 bias whose output only
        compute ops read, as weight or bias: a QDQ group's step reads the raw weight, so its
        float copy is made only if a plan runs the compute op in float (`_materialize`)."""
        if op.op_type != "DequantizeLinear" or op.domain not in ("", "ai.onnx") \
                or len(op.outputs) != 1 or not op.inputs:
            return False
        value = self.graph.values.get(op.inputs[0])
        if value is None or value.dtype not in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8,
                                                onnx.TensorProto.INT32):
            return False
        out = op.outputs[0]
        readers = self.graph.consumers(out, implicit=True)
        return bool(readers) and not self.graph.is_output(out) and all(
            reader.op_type in qdq.COMPUTE_OPS and slot != IMPLICIT and slot >= 1
            for reader, slot in readers)

    def _build_qdq_groups(self) -> None:
        """Recognize the QDQ groups and build their int8 steps; fold the deferred weight
        dequantizations no group took."""
        taken: set[int] = set()
        if self.services.fuse:
            groups = qdq.find_groups(self.graph, self.consts.get,
                                     lambda n: n in self.consts or n in self._sparse)
            constants = Constants(self.consts.get, self._sparse.get)
            for group in groups:
                if any(m.id not in self.kernels for m in group.members):
                    continue    # folded to a constant, or not built
                try:
                    fn = build_group_kernel(group, self.graph, constants)
                except GraphoptError:
                    continue
                label = self.kernels[group.op.id].label
                self.qdq[group.q.id] = (group, _Kernel(group.op, label, fn, (), False, None))
                taken.update(dq.id for dq in group.weight_dqs)
        self._materialize([op_id for op_id in self._deferred if op_id not in taken])

    def _materialize(self, op_ids: Sequence[int]) -> None:
        """Fold deferred DequantizeLinear ops now (a plan runs a reader in float), and rebuild
        their readers' kernels so that those see the float weights as constants."""
        readers: dict[int, Op] = {}
        failed = False
        for op_id in op_ids:
            kernel = self._deferred.pop(op_id, None)
            if kernel is None:
                continue
            op = kernel.op
            args = [self._dense_const(n) if n else None for n in op.inputs]
            if self._fold(kernel, args):
                for name in op.outputs:
                    if name:
                        self._const_owner_ids_add(self.consts.get(name))
                        readers.update((r.id, r) for r, _ in self.graph.consumers(name))
            else:   # it runs (and fails) at run time, with a proper message
                self.kernels[op.id] = kernel
                failed = True
        if failed:
            position = {op.id: i for i, op in enumerate(self.graph.topological_ops())}
            self.order = sorted((self.kernels[i].op for i in self.kernels),
                                key=lambda o: position[o.id])
        for op in readers.values():
            if op.id in self.kernels:
                self._rebuild(op)

    def _dense_const(self, name: str) -> Any:
        if name in self.consts:
            return self.consts[name]
        return readonly(dense_of_proto(self._sparse[name]))

    def _const_owner_ids_add(self, array: Any) -> None:
        ids = getattr(self, "_const_owner_ids", None)
        if ids is not None and isinstance(array, np.ndarray):
            ids.add(id(memory.owner_of(array)))

    def _rebuild(self, op: Op) -> None:
        """Build an op's kernel again with the constants known now (keeps its label)."""
        old = self.kernels[op.id]
        node = KernelNode(op=op, graph=self.graph, opset=self.graph.opset(op.domain),
                          consts=[self.consts.get(n) if n else None for n in op.inputs],
                          services=self.services)
        try:
            fn = registry.lookup(op.op_type, op.domain, self.graph.opset(op.domain))(node)
        except Exception:   # the kernel built before stays (it reads the weights at run time)
            return
        self.kernels[op.id] = _Kernel(op, old.label, fn, tuple(getattr(fn, "inplace_slots", ())),
                                      bool(getattr(fn, "needs_scope", False)), node)

    # -- plan --------------------------------------------------------------------------------
    def plan(self, outputs: Sequence[str]) -> _Plan:
        key = tuple(outputs)
        plan = self._plans.get(key)
        if plan is None:
            with self._plan_lock:   # planning may fold deferred weights (_materialize)
                plan = self._plans.get(key)
                if plan is None:
                    plan = self._plans[key] = self._make_plan(key)
        return plan

    def _reads(self, op: Op) -> list[str]:
        """Every name an op reads: explicit inputs, then outer values its subgraphs use."""
        reads = [n for n in op.inputs if n]
        reads += [u.name for u, _, k in self.graph.nx.in_edges(op, keys=True) if k == IMPLICIT]
        return reads

    def _needed_ops(self, outputs: tuple[str, ...],
                    int8: Mapping[int, tuple[QdqGroup, _Kernel]] | None = None) -> list[Op]:
        """The ops computing `outputs`, in order. With `int8` (QDQ groups fused in this plan,
        by output Q id), a group's Q stands for the group and reads only its quantized input;
        the group's other members are then needed by nothing."""
        wanted = set(outputs)
        needed: set[int] = set()
        for op in reversed(self.order):
            if any(n in wanted for n in op.outputs if n):
                needed.add(op.id)
                if int8 and op.id in int8:
                    wanted.add(int8[op.id][0].input)
                else:
                    wanted.update(self._reads(op))
        return [op for op in self.order if op.id in needed]

    def _plan_int8(self, ops: list[Op], keep: set[str]) -> dict[int, tuple[QdqGroup, _Kernel]]:
        """The QDQ groups this plan runs fused: their Q is needed and none of the float values
        the step skips is requested."""
        needed = {op.id for op in ops}
        return {q_id: entry for q_id, entry in self.qdq.items()
                if q_id in needed and not any(n in keep for n in entry[0].internal)}

    def _materialize_reads(self, ops: list[Op]) -> bool:
        """Fold the deferred weight dequantizations the planned ops read; True when one could
        not be folded (it joined the ops to run)."""
        if not self._deferred:
            return False
        reads = {n for op in ops for n in self._reads(op)}
        ids = [op_id for op_id, k in self._deferred.items()
               if any(n in reads for n in k.op.outputs)]
        before = len(self.order)
        self._materialize(ids)
        return len(self.order) != before

    def _make_plan(self, outputs: tuple[str, ...]) -> _Plan:
        graph = self.graph
        for name in outputs:
            if name not in graph.values:
                shown = ", ".join(graph.outputs)
                raise UsageError(f"no value named {name!r} in the model (its outputs: {shown})")
        ops = self._needed_ops(outputs)
        int8 = self._plan_int8(ops, set(outputs)) if self.services.fuse else {}
        if int8:
            ops = self._needed_ops(outputs, int8)
        if self._materialize_reads(ops):
            ops = self._needed_ops(outputs, int8)
        if self.services.fuse:
            groups = self._fusion_groups(ops, set(outputs))
        else:
            groups = {}
        members = {ep.id for chain in groups.values() for ep in chain}
        position = {op.id: i for i, op in enumerate(ops)}
        # A fused group runs where its last epilogue was: all of the group's inputs exist there.
        slots: list[tuple[int, Op]] = []
        for op in ops:
            if op.id in members:
                continue
            chain = groups.get(op.id, [])
            slots.append((position[chain[-1].id] if chain else position[op.id], op))
        slots.sort(key=lambda item: item[0])

        steps: list[_Step] = []
        reads: list[list[str]] = []
        writes: list[list[str]] = []
        fused: list[tuple[str, tuple[str, ...]]] = []
        int8_steps: list[Int8Step] = []
        for _, op in slots:
            if op.id in int8:
                group, kernel = int8[op.id]
                steps.append(_Step(kernel, (group.input,), (group.output,)))
                reads.append([group.input])
                writes.append([group.output])
                int8_steps.append(self._int8_step(group, kernel))
                continue
            kernel = self.kernels[op.id]
            chain = groups.get(op.id, [])
            kernel, absorbed = self._absorb_activation(kernel, chain)
            step_reads = self._reads(op)
            epilogues = []
            carried = op.outputs[0] if chain else None
            for ep in chain:
                if ep is not absorbed:
                    slot = ep.inputs.index(carried)
                    epilogues.append(_Epilogue(self.kernels[ep.id], slot, ep.inputs))
                step_reads += [n for n in self._reads(ep) if n != carried]
                carried = ep.outputs[0]
            step_outputs = (carried,) if chain else op.outputs
            steps.append(_Step(kernel, op.inputs, step_outputs, epilogues=tuple(epilogues)))
            reads.append(step_reads)
            writes.append([n for n in step_outputs if n])
            if chain:
                fused.append((kernel.label, tuple(self.kernels[e.id].label for e in chain)))
        releases = memory.release_plan(reads, writes, outputs)
        owned = {n for names in writes for n in names}
        for step, release in zip(steps, releases):
            step.release = release
            if self.services.inplace and not step.epilogues and step.kernel.inplace_slots:
                step.inplace = memory.inplace_candidates(step.inputs, release, owned,
                                                         step.kernel.inplace_slots)
        placed = self._place_concat_inputs(steps, reads, writes, releases, set(outputs)) \
            if self.services.concat_views else []
        return _Plan(steps, outputs, fused, placed, int8_steps)

    def _int8_step(self, group: QdqGroup, kernel: _Kernel) -> Int8Step:
        def label(op: Op) -> str:
            built = self.kernels.get(op.id)
            return built.label if built is not None else (op.name or f"{op.op_type}#{op.id}")
        fn = kernel.fn
        return Int8Step(kernel.label, group.op.op_type, group.accumulation,
                        tuple(label(m) for m in group.members[1:]), group.outlier_mode,
                        getattr(fn, "acc16_emulated", 0))

    # -- Concat views (concat_views.py) --------------------------------------------------------
    def _place_concat_inputs(self, steps: list[_Step], reads: list[list[str]],
                             writes: list[list[str]], releases: list[tuple[str, ...]],
                             keep: set[str]) -> list[tuple[str, tuple[str, ...]]]:
        """Mark the steps that write into a Concat's buffer and the Concats they fill; returns
        (Concat label, placed input names) per Concat."""
        infos = []
        for step, step_reads in zip(steps, reads):
            fn = step.kernel.fn
            layout = None if step.kernel.needs_scope else getattr(fn, "view_layout", None)
            head = step.kernel.op.outputs[0] if step.outputs != step.kernel.op.outputs else None
            infos.append(StepInfo(step.kernel.op, step.outputs, step_reads, layout, head))
        labels = {step.kernel.op.id: step.kernel.label for step in steps}

        def plan_views() -> concat_views.ConcatPlan:
            live = memory.static_live_bytes(writes, releases, self._static_nbytes,
                                            [self._reused_input(step) for step in steps])
            return concat_views.plan_concat_views(self.graph, infos, keep, self._static_type,
                                                  self.consts, labels, live)
        views = plan_views()
        if views.missing_shapes and self._inferred is None and self.graph.parent is None:
            self._inferred = self._infer_types()
            views = plan_views()
        for index, placement in views.producers.items():
            steps[index].place = placement
        placed: list[tuple[str, tuple[str, ...]]] = []
        for index, target in views.concats.items():
            steps[index].concat = target
            names = [steps[i].outputs[0] for i, p in views.producers.items() if p.target is target]
            order = steps[index].inputs
            placed.append((target.label, tuple(sorted(names, key=order.index))))
        return placed

    def _static_type(self, name: str) -> tuple[tuple[int, ...], np.dtype] | None:
        """(shape, dtype) of a value whose shape is fully static: a weight's, the graph's, or
        from shape inference (`_infer_types`), else None."""
        array = self.consts.get(name)
        if isinstance(array, np.ndarray):
            return array.shape, array.dtype
        value = self.graph.values.get(name)
        if value is None:
            return None
        dtype, shape = value.dtype, value.shape
        if not _static(shape) and self._inferred is not None and name in self._inferred:
            dtype, shape = self._inferred[name]
        if not _static(shape) or not dtype:
            return None
        try:
            return tuple(shape), np.dtype(onnx_to_np_dtype(dtype))
        except (KeyError, TypeError, ValueError):
            return None

    def _reused_input(self, step: _Step) -> str | None:
        """The dying input whose buffer the step's output will likely take in place: the
        first in-place candidate that passes `_reusable`'s shape test on static shapes."""
        if not step.inplace or len(step.outputs) != 1:
            return None
        shapes = []
        for name in step.inputs:
            found = self._static_type(name) if name else None
            if name and found is None:
                return None
            shapes.append(found[0] if found else None)
        for slot in step.inplace:
            shape = shapes[slot]
            if all(other is None or i == slot or other == shape
                   or _broadcasts_into(other, shape) for i, other in enumerate(shapes)):
                return step.inputs[slot]
        return None

    def _static_nbytes(self, name: str) -> int:
        found = self._static_type(name)
        return 0 if found is None else math.prod(found[0]) * found[1].itemsize

    def _infer_types(self) -> dict[str, tuple[int, Any]]:
        """name -> (onnx dtype, shape) from graphopt.shapes.infer_shapes, without changing the
        graph: the values' types are put back as they were (the graph may be the caller's)."""
        from graphopt.shapes import infer_shapes
        values = self.graph.values
        with _INFER_LOCK:   # plans made in two threads must not save each other's inference
            saved = {name: (v.dtype, v.shape) for name, v in values.items()}
            try:
                infer_shapes(self.graph)
                return {name: (v.dtype, v.shape) for name, v in values.items()}
            except Exception:   # inference is an optimization here; without it, Concats copy
                return {}
            finally:
                for name, (dtype, shape) in saved.items():
                    value = values.get(name)
                    if value is not None:
                        value.dtype, value.shape = dtype, shape

    def _absorb_activation(self, kernel: _Kernel, chain: list[Op]) -> tuple[_Kernel, Op | None]:
        """(kernel, absorbed op): when a fused chain starts with an activation and the head's
        kernel can apply it itself (`fn.absorb_activation(node)` returns a kernel, e.g. Conv
        folding the activation's affine prefix into its weights: kernels/fused_activation.py),
        the step runs that kernel and the activation leaves the epilogue list. Its time then
        shows under the head in profiles."""
        absorb = getattr(kernel.fn, "absorb_activation", None)
        if not chain or absorb is None or len(chain[0].inputs) < 1 \
                or chain[0].inputs[0] != kernel.op.outputs[0]:
            return kernel, None
        ep_kernel = self.kernels[chain[0].id]
        if ep_kernel.node is None:
            return kernel, None
        fn = absorb(ep_kernel.node)
        if fn is None:
            return kernel, None
        return _Kernel(kernel.op, kernel.label, fn, tuple(getattr(fn, "inplace_slots", ())),
                       kernel.needs_scope, kernel.node), chain[0]

    def _fusion_groups(self, ops: list[Op], keep: set[str]) -> dict[int, list[Op]]:
        """head op id -> its epilogue chain, for the epilogues safe to fuse (see module doc)."""
        graph = self.graph
        by_name = {op.name: op for op in ops if op.name}
        in_plan = {op.id for op in ops}
        groups: dict[int, list[Op]] = {}
        head_of: dict[int, int] = {}   # epilogue id -> head id
        for op in ops:
            target = op.meta.get(FUSE_META)
            if not target or op.op_type not in EPILOGUE_OPS or op.domain:
                continue
            named = by_name.get(target)
            if named is None:
                continue
            head_id = head_of.get(named.id, named.id)
            head = graph.ops[head_id]
            if head_id in head_of or head_id not in in_plan or len(head.outputs) != 1 \
                    or not head.outputs[0]:
                continue
            chain = groups.get(head_id, [])
            carried = (chain[-1] if chain else head).outputs[0]
            kernel = self.kernels[op.id]
            if len(op.outputs) != 1 or op.inputs.count(carried) != 1:
                continue
            slot = op.inputs.index(carried)
            consumers = graph.consumers(carried, implicit=True)
            if slot not in kernel.inplace_slots or len(consumers) != 1 \
                    or consumers[0][0] is not op or carried in keep or graph.is_output(carried) \
                    or op.id not in in_plan:
                continue
            groups.setdefault(head_id, []).append(op)
            head_of[op.id] = head_id
        return groups

    # -- run ---------------------------------------------------------------------------------
    def start_env(self) -> dict[str, Any]:
        env = dict(self.defaults)
        env.update(self.consts)
        return env

    def external_ids(self) -> set[int]:
        return self._const_owner_ids

    def execute(self, plan: _Plan, env: dict[str, Any], live: memory.LiveBuffers,
                profile: Profile | None, record: list | None = None) -> None:
        """Run the plan's steps over `env` (inputs, weights and outer values already in it).
        `record` collects (Concat label, inputs found in place) per Concat with views."""
        step = None
        add, remove = live.add, live.remove
        buffers = ConcatBuffers(live, record) if plan.concat_views else None
        try:
            for step in plan.steps:
                kernel = step.kernel
                fn = kernel.fn
                args = [env[n] if n else None for n in step.inputs]
                view = buffers.view_for(step.place, env) \
                    if step.place is not None and buffers is not None else None
                if view is not None:
                    out = view
                else:
                    out = _reusable(args, step.inplace, live) if step.inplace else None
                if profile is not None:
                    start = time.perf_counter()
                if step.concat is not None and buffers is not None:
                    value, taken = buffers.finish(step.concat, step.inputs, args, fn)
                    if profile is not None:
                        profile.add(kernel.label, kernel.op.op_type, time.perf_counter() - start)
                    env[step.outputs[0]] = value
                    if not taken:   # else the buffer was counted when it was allocated
                        add(value)
                    for name in step.release:
                        remove(env.pop(name, None))
                    continue
                if kernel.needs_scope:
                    results = fn(*args, scope=env)
                elif out is not None:
                    results = fn(*args, out=out)
                else:
                    results = fn(*args)
                if profile is not None:
                    profile.add(kernel.label, kernel.op.op_type, time.perf_counter() - start)
                if step.epilogues:
                    env[step.outputs[0]] = self._run_epilogues(step, results[0], env, live,
                                                               profile, view)
                else:
                    for name, value in zip(step.outputs, results):
                        if name:
                            env[name] = value
                            add(value)
                for name in step.release:
                    remove(env.pop(name, None))
        except GraphoptError:
            raise
        except Exception as exc:
            if step is None:
                raise
            op = step.kernel.op
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise KernelFailure(f"{op.op_type} op {step.kernel.label!r} failed: "
                                f"{type(exc).__name__}: {message}") from exc

    def _run_epilogues(self, step: _Step, buffer: Any, env: dict[str, Any],
                       live: memory.LiveBuffers, profile: Profile | None,
                       view: np.ndarray | None = None) -> Any:
        """Apply a fused epilogue chain in place on the head's output buffer. When the head
        wrote into its Concat slice (`view`), the chain stays there: the plan checked that the
        group's values all have the slice's shape, and the slice is this step's alone."""
        live.add(buffer)
        for ep in step.epilogues:
            args = [buffer if i == ep.slot else (env[n] if n else None)
                    for i, n in enumerate(ep.inputs)]
            fits = buffer is view or _reusable(args, (ep.slot,), live) is not None
            start = time.perf_counter() if profile is not None else 0.0
            result = (ep.kernel.fn(*args, out=buffer) if fits else ep.kernel.fn(*args))[0]
            if profile is not None:
                profile.add(ep.kernel.label, ep.kernel.op.op_type, time.perf_counter() - start)
            if result is not buffer:
                live.add(result)
                live.remove(buffer)
                buffer = result
        return buffer


def _static(shape: Any) -> bool:
    return shape is not None and all(type(d) is int and d >= 0 for d in shape)


def _reusable(args: list[Any], slots: tuple[int, ...], live: memory.LiveBuffers) -> np.ndarray | None:
    """The first candidate input whose buffer can take the output (see module doc)."""
    for slot in slots:
        cand = args[slot]
        if type(cand) is not np.ndarray:
            continue
        flags = cand.flags
        # Contiguous only: numpy 2.4 computes some ufuncs wrongly in place on strided views
        # (np.negative(v, out=v) of a column reads the wrong elements).
        if not flags.writeable or not (flags.c_contiguous or flags.f_contiguous) \
                or live.references(cand) != 1:
            continue
        shape = cand.shape
        fits = True
        for other in args:
            if other is cand or other is None:
                continue
            other_shape = other.shape if type(other) is np.ndarray else np.shape(other)
            if other_shape != shape and not _broadcasts_into(other_shape, shape):
                fits = False
                break
        if fits:
            return cand
    return None


def _broadcasts_into(small: tuple[int, ...], shape: tuple[int, ...]) -> bool:
    """Whether `small` broadcasts to exactly `shape` (numpy's rules). Plain tuple arithmetic:
    np.broadcast_shapes builds arrays and costs ~5 us, on every in-place decision."""
    if len(small) > len(shape):
        return False
    for a, b in zip(reversed(small), reversed(shape)):
        if a != b and a != 1:
            return False
    return True


# ---------------------------------------------------------------------------------------------
# services for control-flow kernels
# ---------------------------------------------------------------------------------------------
class _Services:
    """What kernels may ask of the session at build time: building and running subgraphs."""

    def __init__(self, inplace: bool, fuse: bool, concat_views: bool = True) -> None:
        self.inplace = inplace
        self.fuse = fuse
        self.concat_views = concat_views
        # The buffer accounting of the run in progress, per thread: runs of one session in
        # several threads each keep their own (in-place decisions depend on it).
        self._local = threading.local()

    @property
    def live(self) -> memory.LiveBuffers:
        live = getattr(self._local, "live", None)
        if live is None:
            live = self._local.live = memory.LiveBuffers()
        return live

    def compile(self, graph: Graph) -> SubgraphRunner:
        return SubgraphRunner(GraphProgram(graph, self))


class SubgraphRunner:
    """Runs a subgraph (If branch, Loop/Scan body) with outer-scope values visible."""

    def __init__(self, program: GraphProgram) -> None:
        self.program = program
        self.graph = program.graph
        self.input_names = list(program.graph.inputs)
        self.output_names = list(program.graph.outputs)
        self._plan = program.plan(tuple(self.output_names))
        produced = {n for step in self._plan.steps for n in step.outputs if n}
        self._produced_outputs = [n for n in dict.fromkeys(self.output_names) if n in produced]

    def run(self, scope: Mapping[str, Any], inputs: Sequence[Any] = ()) -> list[Any]:
        """Outputs of the subgraph for `inputs` (in its input order); outer names from `scope`."""
        program = self.program
        env = program.start_env()
        for name in program.outer_names:
            env[name] = scope[name]
        for name, value in zip(self.input_names, inputs):
            # Read-only, like feeds: a body op must never write into a carried value or a scan
            # slice (nor into a view of one), which the control op may still hold.
            env[name] = readonly(value)
        live = program.services.live
        program.execute(self._plan, env, live, None)
        outputs = [env[name] for name in self.output_names]
        for name in self._produced_outputs:   # the caller takes over the outputs' buffers
            live.remove(env[name])
        return outputs


# ---------------------------------------------------------------------------------------------
# the session
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class InputSpec:
    """A graph input as the session checks it: name, numpy dtype (None = any), shape (None =
    unknown rank; dims are ints, symbols or None)."""

    name: str
    dtype: np.dtype | None
    shape: tuple[int | str | None, ...] | None
    has_default: bool = False
    is_tensor: bool = True

    def describe(self) -> str:
        dtype = self.dtype.name if self.dtype is not None else "?"
        if self.shape is None:
            return f"{dtype}[...]"
        dims = ",".join("?" if d is None else str(d) for d in self.shape)
        return f"{dtype}[{dims}]"


class Session:
    """Runs a model with graphopt's numpy kernels. See the module docstring."""

    def __init__(self, model: Graph | str | os.PathLike | onnx.ModelProto | bytes,
                 profile: bool = False, *, inplace: bool = True, fuse: bool = True,
                 concat_views: bool = True) -> None:
        import graphopt.runtime.kernels  # noqa: F401  (registers every kernel)
        if isinstance(model, Graph):
            graph = model
        else:
            from graphopt.onnx_io import load
            graph = load(model)
        self.graph = graph
        memory.tune_allocator()   # once per process: no page faults on every run (memory.py)
        self._services = _Services(inplace=inplace, fuse=fuse, concat_views=concat_views)
        self._program = GraphProgram(graph, self._services)
        self.inputs = [self._spec(name) for name in graph.inputs
                       if name not in self._program.consts]
        self.outputs = list(graph.outputs)
        self.profile: Profile | None = Profile() if profile else None
        #: Peak bytes of live intermediate tensors during the last run (weights and graph inputs
        #: excluded; a buffer shared by views counted once).
        self.peak_bytes = 0
        #: (Concat, inputs whose producers wrote them in place) for each Concat of the last run
        #: that had views (`concat_views` for the plan).
        self.written_in_place: list[tuple[str, tuple[str, ...]]] = []
        self._program.plan(tuple(self.outputs))   # plan errors surface at build time

    def _spec(self, name: str) -> InputSpec:
        value = self.graph.values[name]
        is_tensor = value.type_proto is None or value.type_proto.HasField("tensor_type")
        dtype = None
        if is_tensor and value.dtype:
            try:
                dtype = onnx_to_np_dtype(value.dtype)
            except (KeyError, TypeError, ValueError):
                dtype = None
        return InputSpec(name, dtype, value.shape if is_tensor else None,
                         name in self._program.defaults, is_tensor)

    @property
    def fused(self) -> list[tuple[str, tuple[str, ...]]]:
        """(head op, epilogue ops) of each fused group in the plan for the graph's outputs."""
        return list(self._program.plan(tuple(self.outputs)).fused)

    @property
    def int8_steps(self) -> list[Int8Step]:
        """The QDQ groups the plan for the graph's outputs runs as one int8 step each: compute
        op, accumulation ("int8_acc32" / "int8_acc16"), the ops it absorbed, the outlier
        product's mode, and how many acc16 channels the 16-bit model emulates."""
        return list(self._program.plan(tuple(self.outputs)).int8)

    @property
    def concat_views(self) -> list[tuple[str, tuple[str, ...]]]:
        """(Concat op, inputs its producers write straight into its output) in the plan for the
        graph's outputs; `written_in_place` says which did in the last run."""
        return list(self._program.plan(tuple(self.outputs)).concat_views)

    def run(self, feeds: Mapping[str, Any], output_names: Sequence[str] | None = None
            ) -> dict[str, Any]:
        """Run the model; returns {output name: array}. `output_names` may name any value of
        the graph (intermediates too), default: the graph's outputs."""
        names = tuple(self.outputs if output_names is None else output_names)
        plan = self._program.plan(names)
        checked = self.check_feeds(feeds)
        env = self._program.start_env()
        env.update(checked)
        live = self._services.live   # this thread's
        live.reset(external=checked.values())
        live.add_external_ids(self._program.external_ids())
        record: list[tuple[str, tuple[str, ...]]] = []
        with np.errstate(all="ignore"):   # inf/nan are values in ONNX, not warnings
            self._program.execute(plan, env, live, self.profile, record)
        if self.profile is not None:
            self.profile.runs += 1
        self.peak_bytes = live.peak
        self.written_in_place = record
        return {name: env[name] for name in names}

    def check_feeds(self, feeds: Mapping[str, Any]) -> dict[str, Any]:
        """Feeds checked against the input specs, as read-only arrays; UsageError (one line)
        for an unknown or missing name, a wrong dtype, a wrong rank or a fixed dim mismatch."""
        if not isinstance(feeds, Mapping):
            raise UsageError("feeds must be a dict of input name -> numpy array")
        specs = {spec.name: spec for spec in self.inputs}
        checked: dict[str, Any] = {}
        for name, value in feeds.items():
            spec = specs.get(name)
            if spec is None:
                expected = name_list(s.name for s in self.inputs if not s.has_default) or "none"
                raise UsageError(f"unknown input {name!r}; the model's inputs are: {expected}")
            checked[name] = readonly(self._check_one(spec, value))
        for spec in self.inputs:
            if spec.name not in checked and not spec.has_default:
                raise UsageError(f"missing input {spec.name!r} ({spec.describe()})")
        return checked

    @staticmethod
    def _check_one(spec: InputSpec, value: Any) -> Any:
        if not spec.is_tensor:
            return value
        if not isinstance(value, np.ndarray):
            try:
                value = np.asarray(value, dtype=spec.dtype)
            except (TypeError, ValueError) as exc:
                raise UsageError(f"input {spec.name!r} is not convertible to an array of "
                                 f"{spec.describe()}: {exc}") from None
        if spec.dtype is not None and value.dtype != spec.dtype:
            raise UsageError(f"input {spec.name!r} has dtype {value.dtype}, the model expects "
                             f"{spec.dtype} ({spec.describe()})")
        if spec.shape is not None:
            if value.ndim != len(spec.shape):
                raise UsageError(f"input {spec.name!r} has shape {tuple(value.shape)} (rank "
                                 f"{value.ndim}), the model expects rank {len(spec.shape)}: "
                                 f"{spec.describe()}")
            for axis, (dim, want) in enumerate(zip(value.shape, spec.shape)):
                if isinstance(want, int) and want >= 0 and dim != want:   # -1: unknown
                    raise UsageError(f"input {spec.name!r} has {dim} at dim {axis}, the model "
                                     f"expects {want} ({spec.describe()}, got "
                                     f"{tuple(value.shape)})")
        return value
