"""Kernel registry: (domain, op_type) -> factories by opset version.

A kernel is built once per op when a Session is planned ("build once, run many"): the factory
reads attributes, constant inputs and static shapes from a `KernelNode` and returns a closure
`run(*inputs) -> tuple of outputs`. Inputs arrive as numpy arrays, None for omitted optional
inputs. Attribute parsing and shape-only work therefore happen once, not per call.

    @kernel("Relu")
    def relu(node: KernelNode) -> KernelFn:
        return lambda x: (np.maximum(x, 0, dtype=x.dtype),)

`@kernel("Foo", since=13)` registers a version that applies from opset 13 on; lookup takes the
newest registration not newer than the model's opset for that domain.

Rules every kernel keeps:
- Return fresh arrays, numpy views of the inputs, or read-only arrays. The session may later
  write into a dead output (in place), so a kernel must never hand out a writeable array it
  keeps (a cached constant, a reused workspace). `KernelNode.consts` arrays are read-only views.
- Never write into an input unless the session passed it as `out=` (below).

Optional capabilities, marked by attributes on the closure (a kernel without them works as is):
- `fn.inplace_slots = (0, 1)` (use `writes_into(0, 1)`): `fn` accepts a keyword `out=` (an array
  to write its single output into; it returns it). Each listed input slot may serve as `out`:
  the output always has that input's dtype, so the session passes `out=inputs[slot]` only when
  that array dies at this op, is writeable, shares memory with no other live tensor, and has the
  output's (broadcast) shape. Fused epilogues (op meta `graphopt.fuse_into`) use the same hook.
- `fn.view_layout = "strided"` (use `writes_views("strided")`): `fn` accepts a keyword `out=`
  that is any array of its output's shape and dtype laid out as declared (below), typically a
  view into a Concat's output buffer (session.py, "Concat views"). It writes its whole output
  there and returns `out` itself; when it cannot (another compute dtype, say), it returns a fresh
  array instead and the session copies. The output's shape must be a function of the inputs'
  shapes and the op's attributes and constants (never of input values): the session passes the
  view only when every input has the static shape the plan saw. Layouts, narrowest first
  (`VIEW_LAYOUTS`): "contiguous" (C-contiguous only), "items" (each `out[i]` along axis 0 is
  C-contiguous: a batch>1 Concat on the channel axis), "strided" (any strides whose innermost
  axis is contiguous: numpy ufuncs). Unlike `inplace_slots`, `out` is not one of the inputs.
- `fn.needs_scope = True`: `fn` takes a keyword `scope=` (name -> value of the calling graph's
  environment), for control flow running subgraphs that read outer-scope values.
- `fn.absorb_activation(node) -> KernelFn | None`: a head kernel (Conv) that can apply a fused
  activation epilogue itself; given the activation's KernelNode it returns a kernel computing
  head + activation with the head's inputs, or None when it cannot (fused_activation.py).
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from graphopt.errors import UnsupportedOpError
from graphopt.ir import Graph, Op

KernelFn = Callable[..., Sequence[Any]]
KernelFactory = Callable[["KernelNode"], KernelFn]

_REGISTRY: dict[tuple[str, str], list[tuple[int, KernelFactory]]] = {}


@dataclass
class KernelNode:
    """What a kernel factory may know about its op at plan time."""

    op: Op
    graph: Graph
    opset: int
    #: Constant data per input slot (None for non-constant or omitted inputs).
    consts: list[np.ndarray | None] = field(default_factory=list)
    #: Session services for control-flow kernels (running subgraphs); set by the session.
    services: Any = None

    def attr(self, name: str, default: Any = None) -> Any:
        return self.op.attrs.get(name, default)

    @property
    def op_type(self) -> str:
        return self.op.op_type

    @property
    def n_inputs(self) -> int:
        return len(self.op.inputs)

    @property
    def n_outputs(self) -> int:
        return len(self.op.outputs)

    def input_shape(self, slot: int):
        """Declared/inferred shape of an input (dims may be symbols or None), or None."""
        name = self.op.inputs[slot] if slot < len(self.op.inputs) else ""
        return self.graph.values[name].shape if name else None

    def input_dtype(self, slot: int) -> int:
        name = self.op.inputs[slot] if slot < len(self.op.inputs) else ""
        return self.graph.values[name].dtype if name else 0


def kernel(op_type: str, *, domain: str = "", since: int = 1) -> Callable[[KernelFactory], KernelFactory]:
    """Register a kernel factory for `op_type` from opset `since` on."""
    def register(factory: KernelFactory) -> KernelFactory:
        versions = _REGISTRY.setdefault((domain, op_type), [])
        bisect.insort(versions, (since, factory), key=lambda item: item[0])
        return factory
    return register


def lookup(op_type: str, domain: str, opset: int) -> KernelFactory:
    """The factory for an op at an opset; UnsupportedOpError when there is none."""
    versions = _REGISTRY.get((domain if domain != "ai.onnx" else "", op_type))
    if not versions:
        dom = f"{domain}." if domain else ""
        raise UnsupportedOpError(f"the graphopt runtime has no kernel for {dom}{op_type}")
    chosen = None
    for since, factory in versions:
        if since <= max(opset, 1):
            chosen = factory
    if chosen is None:
        raise UnsupportedOpError(f"the graphopt runtime has no kernel for {op_type} at opset {opset}")
    return chosen


def writes_into(*slots: int) -> Callable[[KernelFn], KernelFn]:
    """Mark a closure as accepting `out=` and name the input slots that may serve as `out`."""
    def mark(fn: KernelFn) -> KernelFn:
        fn.inplace_slots = tuple(slots)  # type: ignore[attr-defined]
        return fn
    return mark


#: `out=` layouts a view-writing kernel may declare, narrowest first (see the module doc).
VIEW_LAYOUTS = ("contiguous", "items", "strided")


def writes_views(layout: str) -> Callable[[KernelFn], KernelFn]:
    """Mark a closure as writing into any `out=` array of its output's shape and dtype with the
    given layout (one of VIEW_LAYOUTS)."""
    if layout not in VIEW_LAYOUTS:
        raise ValueError(f"unknown view layout {layout!r}; one of {VIEW_LAYOUTS}")

    def mark(fn: KernelFn) -> KernelFn:
        fn.view_layout = layout  # type: ignore[attr-defined]
        return fn
    return mark


def registered_ops() -> list[tuple[str, str]]:
    """(domain, op_type) of every registered kernel."""
    return sorted(_REGISTRY)
