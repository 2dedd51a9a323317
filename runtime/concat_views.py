"""Concat views: a Concat's producers write straight into their slices of its output buffer.

Why: a Concat otherwise copies every input into a new buffer while all of them are still live.
In an inception or fire block every branch's output is written once by its producer and once
more by the Concat, and the block's peak holds the branches and the concatenation together.
Written in place, each branch costs no copy and no buffer of its own.

Plan (`plan_concat_views`, once per session plan, from static shapes):
- a Concat qualifies when it is a default-domain Concat whose output and inputs have static
  shapes and a known dtype;
- one of its inputs is placed in the Concat's buffer when it is produced in this graph by a
  step whose whole output is that input and nothing else reads it (not a graph output, not a
  requested output, not read twice by the Concat, not read by a subgraph), and whose kernel
  declares `view_layout` (registry.py) covering the layout of its slice: C-contiguous when
  every axis before the Concat axis has size 1 (batch 1 on the channel axis), "items" when only
  the batch axis is larger, "strided" otherwise. A fused epilogue group qualifies through its
  head (the epilogues then run in place on the slice) when the head's output has the group's
  shape. A slice that is a single strided column is never used: numpy 2.4 computes np.negative
  in place on such views wrongly (tests/test_regressions_fuzz.py).
- the buffer then lives from the first placed producer on instead of from the Concat on, which
  can cost memory: in a DenseNet layer the only producer is the 3x3 conv, and allocating the
  whole concatenation while the conv's (wider) input is still live raised light_densenet121's
  peak by 5%. So, of the qualifying producers in run order, only the longest suffix is placed
  whose early buffer does not raise the estimated live bytes (memory.static_live_bytes) above
  their maximum over the span from that producer to the Concat without it; often that is all.

Run (`ConcatBuffers`, per run of the plan):
- the buffer is allocated when the first placed producer runs, and counted in the live bytes
  then, once: each slice view is charged to it (memory.LiveBuffers), and the Concat's output
  takes over the allocation's reference, so peak_bytes stays right;
- a placed producer gets `out=` its slice only when every input it reads has the static shape
  and dtype the plan saw (the capability promises the output shape follows from those), so a
  wrong static shape can cost a copy but never a wrong result; a kernel may also decline
  `out=` (it returns another array), and that input is then copied as usual;
- the Concat step copies only the inputs that are not already in place; if an input's shape
  does not fit its slice after all, it concatenates the plain way.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from graphopt.ir import Graph, Op
from graphopt.runtime import memory
from graphopt.runtime.kernels.registry import VIEW_LAYOUTS

#: (shape, numpy dtype) of a value whose shape is fully static.
StaticType = tuple[tuple[int, ...], np.dtype]
_RANK = {layout: rank for rank, layout in enumerate(VIEW_LAYOUTS)}


@dataclass(frozen=True)
class ConcatTarget:
    """The buffer of one Concat: its static shape and dtype and each input's slice of it."""

    key: int                                  # the Concat op's id
    label: str
    shape: tuple[int, ...]
    dtype: np.dtype
    axis: int
    regions: tuple[tuple[slice, ...], ...]    # per Concat input, its index into the buffer


@dataclass(frozen=True)
class Placement:
    """A step that writes its output into slice `slot` of `target`, when `checks` hold: every
    non-constant value the step reads has this (shape, dtype) at run time."""

    target: ConcatTarget
    slot: int
    checks: tuple[tuple[str, tuple[int, ...], np.dtype], ...]
    nbytes: int                  # of the slice


class StepInfo(NamedTuple):
    """What the planner needs to know about one plan step."""

    op: Op                       # the step's (head) op
    outputs: tuple[str, ...]     # what the step leaves in the environment
    reads: Sequence[str]         # every name it reads (fused epilogues' inputs too)
    layout: str | None           # the `out=` layout it accepts (None: no views)
    head_output: str | None      # for a fused group: the head's own output, else None


@dataclass
class ConcatPlan:
    """Placements by producer step index, targets by Concat step index."""

    producers: dict[int, Placement] = field(default_factory=dict)
    concats: dict[int, ConcatTarget] = field(default_factory=dict)
    #: Whether some candidate was skipped only because a shape was not static.
    missing_shapes: bool = False


def slice_layout(shape: Sequence[int], axis: int, length: int) -> str | None:
    """The narrowest layout class of a Concat slice of `length` along `axis` (None: a column,
    never used, see the module doc)."""
    outer = math.prod(shape[:axis])
    if outer == 1 or length == shape[axis]:
        return "contiguous"
    if length == 1 and math.prod(shape[axis + 1:]) == 1:
        return None
    if math.prod(shape[1:axis]) == 1:
        return "items"
    return "strided"


def plan_concat_views(graph: Graph, steps: Sequence[StepInfo], keep: set[str],
                      static_type: Callable[[str], StaticType | None],
                      consts: Mapping[str, Any], labels: Mapping[int, str],
                      live_bytes: Sequence[int]) -> ConcatPlan:
    """Which steps write into which Concat's buffer (see the module doc). `live_bytes`: the
    estimated live bytes per step without any views (memory.static_live_bytes)."""
    plan = ConcatPlan()
    profile = list(live_bytes)
    peak = max(profile, default=0)
    producer_of = {name: index for index, step in enumerate(steps) for name in step.outputs
                   if name}
    for index, step in enumerate(steps):
        op = step.op
        if op.op_type != "Concat" or op.domain not in ("", "ai.onnx") or len(op.outputs) != 1:
            continue
        candidates = [(slot, producer_of[name]) for slot, name in enumerate(op.inputs)
                      if name in producer_of and steps[producer_of[name]].layout is not None]
        if not candidates:
            continue
        target = _target(op, labels.get(op.id, op.op_type), static_type)
        if target is None:
            plan.missing_shapes = True
            continue
        placements = []
        for slot, producer in candidates:
            placement = _placement(graph, op, slot, steps[producer], target, keep, static_type,
                                   consts)
            if placement == "missing":
                plan.missing_shapes = True
            elif placement is not None:
                placements.append((producer, placement))
        placements.sort(key=lambda item: item[0])
        for producer, placement in _within_peak(placements, index, target, profile, peak):
            plan.producers[producer] = placement
            plan.concats[index] = target
    return plan


def _within_peak(placements: list[tuple[int, Placement]], concat: int, target: ConcatTarget,
                 profile: list[int], peak: int) -> list[tuple[int, Placement]]:
    """The longest suffix (in run order) of the placements whose buffer, allocated at its
    first producer, keeps the estimated live bytes from there to the Concat at or below
    `peak`, the estimated peak of the run without views. `profile` is updated with the chosen
    placements' effect."""
    buffer_bytes = math.prod(target.shape) * target.dtype.itemsize
    for j in range(len(placements)):
        chosen = placements[j:]
        first = chosen[0][0]
        window = profile[first:concat + 1]
        changed = []
        placed = 0
        k = 0
        for t in range(first, concat):
            while k < len(chosen) and chosen[k][0] == t:
                placed += chosen[k][1].nbytes
                k += 1
            changed.append(profile[t] + buffer_bytes - placed)   # the buffer, not the slices
        changed.append(profile[concat] - placed)                  # the slices are the output
        if max(changed) <= max(peak, max(window)):
            profile[first:concat + 1] = changed
            return chosen
    return []


def _target(op: Op, label: str, static_type: Callable[[str], StaticType | None]
            ) -> ConcatTarget | None:
    out = static_type(op.outputs[0])
    if out is None or any(not name for name in op.inputs):
        return None
    shape, dtype = out
    axis = int(op.attrs.get("axis", 1))
    axis = axis + len(shape) if axis < 0 else axis
    if not 0 <= axis < len(shape):
        return None
    regions = []
    start = 0
    for name in op.inputs:
        found = static_type(name)
        if found is None:
            return None
        in_shape, in_dtype = found
        if len(in_shape) != len(shape) or in_dtype != dtype:
            return None
        length = in_shape[axis]
        region = (slice(None),) * axis + (slice(start, start + length),)
        if in_shape[:axis] != shape[:axis] or in_shape[axis + 1:] != shape[axis + 1:]:
            return None
        regions.append(region)
        start += length
    if start != shape[axis]:
        return None
    return ConcatTarget(op.id, label, tuple(shape), dtype, axis, tuple(regions))


def _placement(graph: Graph, concat: Op, slot: int, step: StepInfo, target: ConcatTarget,
               keep: set[str], static_type: Callable[[str], StaticType | None],
               consts: Mapping[str, Any]) -> Placement | str | None:
    """The placement of the step producing Concat input `slot`, None when it does not qualify,
    "missing" when only a static shape is lacking."""
    name = concat.inputs[slot]
    if step.outputs != (name,) or name in keep or graph.is_output(name):
        return None
    readers = graph.consumers(name, implicit=True)
    if len(readers) != 1 or readers[0][0] is not concat:
        return None
    region = target.regions[slot][target.axis]
    length = region.stop - region.start
    if length == 0:
        return None
    layout = slice_layout(target.shape, target.axis, length)
    if layout is None or _RANK[layout] > _RANK[step.layout]:
        return None
    if step.head_output is not None and static_type(step.head_output) != static_type(name):
        return None   # the head's output is not the group's shape (a broadcasting epilogue)
    checks = []
    for read in dict.fromkeys(step.reads):
        if not read or read in consts:
            continue
        found = static_type(read)
        if found is None:
            return "missing"
        checks.append((read, found[0], found[1]))
    nbytes = math.prod(target.shape) // max(target.shape[target.axis], 1) * length \
        * target.dtype.itemsize
    return Placement(target, slot, tuple(checks), nbytes)


# ---------------------------------------------------------------------------------------------
# run time
# ---------------------------------------------------------------------------------------------
class ConcatBuffers:
    """The Concat buffers of one run: allocated at their first placed producer, handed to
    their Concat step."""

    __slots__ = ("_open", "_live", "record")

    def __init__(self, live: memory.LiveBuffers, record: list | None) -> None:
        self._open: dict[int, tuple[np.ndarray, list[np.ndarray]]] = {}
        self._live = live
        #: (Concat label, names of the inputs found in place), per Concat step run; or None.
        self.record = record

    def view_for(self, placement: Placement, env: Mapping[str, Any]) -> np.ndarray | None:
        """The slice the producer writes into, or None when an input does not have the shape
        and dtype the plan saw (the producer then runs as usual)."""
        for name, shape, dtype in placement.checks:
            value = env[name]
            if type(value) is not np.ndarray or value.shape != shape or value.dtype != dtype:
                return None
        target = placement.target
        entry = self._open.get(target.key)
        if entry is None:
            buffer = np.empty(target.shape, dtype=target.dtype)
            entry = self._open[target.key] = (buffer, [buffer[r] for r in target.regions])
            self._live.add(buffer)   # counted once, from now on
        return entry[1][placement.slot]

    def finish(self, target: ConcatTarget, names: Sequence[str], args: list[Any],
               concat: Callable[..., Sequence[Any]]) -> tuple[Any, bool]:
        """(the Concat's output, whether it is the planned buffer, whose live reference it then
        takes over). Copies into the buffer only the inputs not already in place."""
        entry = self._open.pop(target.key, None)
        if entry is None:                 # no producer wrote into it: a plain Concat
            return concat(*args)[0], False
        buffer, views = entry
        missing = []
        for arg, view in zip(args, views):
            if arg is view:
                continue
            if type(arg) is not np.ndarray or arg.shape != view.shape or arg.dtype != view.dtype:
                self._live.remove(buffer)    # the inputs still hold the views they need
                return concat(*args)[0], False
            missing.append((view, arg))
        for view, arg in missing:
            np.copyto(view, arg)
        if self.record is not None:
            self.record.append((target.label, tuple(n for n, a, v in zip(names, args, views)
                                                    if a is v)))
        return buffer, True
