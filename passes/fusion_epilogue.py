"""Mark activation and residual-add epilogues of Conv/ConvTranspose/Gemm/MatMul for the runtime to
run fused, in place on the head's output buffer.

Representation: the graph stays standard ONNX (onnxruntime runs it unchanged); the decision is op
meta, exported as NodeProto.metadata_props:

- on each epilogue op: `graphopt.fuse_into` = name of the head op;
- on the head: `graphopt.epilogue` = the chain, e.g. "Add+Relu" (for reports and readers).

The graphopt runtime (runtime/session.py) merges a head and its marked chain into one step and
re-checks safety itself; this pass decides legality: the chain is head -> [Add/Sum of a residual
or bias that does not broadcast the head's output larger] -> [one activation], every value
inside the chain has exactly one reader and is no graph output (a Relu whose input is also read
elsewhere is not fused: the pre-activation value must survive).
"""

from __future__ import annotations

from graphopt.ir import Graph, Op
from graphopt.pass_manager import Pass, PassContext, PassResult
from graphopt.passes.fusion_common import is_onnx, other_input, sole_reader, unique_op_names

FUSE_META = "graphopt.fuse_into"
EPILOGUE_META = "graphopt.epilogue"
HEAD_TYPES = ("Conv", "ConvTranspose", "Gemm", "MatMul")
ACTIVATIONS = ("Relu", "Clip", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh")
RESIDUAL_ADDS = ("Add", "Sum")
#: Element types the runtime's fused epilogues handle (float16, float, double).
FLOAT_ELEM_TYPES = (1, 10, 11)


def _fits(graph: Graph, carried: str, other: str) -> bool:
    """Whether adding `other` keeps the carried tensor's shape (unknown shapes: assume so; the
    runtime allocates instead of writing in place if the result does not fit)."""
    a, b = graph.values[carried].shape, graph.values[other].shape
    if a is None or b is None:
        return True
    if len(b) > len(a):
        return False
    for da, db in zip(reversed(a), reversed(b)):
        if db == 1 or db == da:
            continue
        if isinstance(da, int) and isinstance(db, int):
            return False
        if not isinstance(da, int) or not isinstance(db, int):
            return False  # symbolic and different: cannot prove it fits
    return True


def epilogue_chain(graph: Graph, head: Op) -> list[Op]:
    """The longest legal epilogue chain after `head` (empty if none)."""
    if not is_onnx(head, *HEAD_TYPES) or len(head.outputs) != 1 or not head.outputs[0]:
        return []
    if graph.values[head.outputs[0]].dtype not in FLOAT_ELEM_TYPES + (0,):
        return []
    chain: list[Op] = []
    carried = head.outputs[0]
    reader = sole_reader(graph, carried)
    if reader is not None and is_onnx(reader, *RESIDUAL_ADDS) and len(reader.outputs) == 1:
        other = other_input(reader, carried)
        if other is not None and _fits(graph, carried, other):
            chain.append(reader)
            carried = reader.outputs[0]
            reader = sole_reader(graph, carried)
    if reader is not None and is_onnx(reader, *ACTIVATIONS) and reader.inputs[0] == carried \
            and carried not in reader.inputs[1:] and len(reader.outputs) == 1:
        chain.append(reader)
    return chain


class FuseEpilogues(Pass):
    """Activation and residual-add epilogues fuse into Conv/ConvTranspose/Gemm/MatMul (as op meta
    the runtime reads; see the module docstring)."""

    name = "fuse_epilogues"

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        result = PassResult()
        before = {op.id: (op.meta.get(FUSE_META), op.meta.get(EPILOGUE_META))
                  for op in graph.ops.values()}
        for op in graph.ops.values():
            op.meta.pop(FUSE_META, None)
            op.meta.pop(EPILOGUE_META, None)
        claimed: set[int] = set()
        marked: list[tuple[Op, list[Op]]] = []
        for op in graph.topological_ops():
            if op.id in claimed:
                continue
            chain = epilogue_chain(graph, op)
            if any(ep.id in claimed for ep in chain):
                chain = chain[:next(i for i, ep in enumerate(chain) if ep.id in claimed)]
            if not chain:
                continue
            claimed.update(ep.id for ep in chain)
            marked.append((op, chain))
        names = unique_op_names(graph, [head for head, _ in marked])
        for head, chain in marked:
            name = names[head.id]
            head.meta[EPILOGUE_META] = "+".join(ep.op_type for ep in chain)
            for ep in chain:
                ep.meta[FUSE_META] = name
        for op in graph.ops.values():
            was, now = before.get(op.id, (None, None))[0], op.meta.get(FUSE_META)
            if now != was:
                result.count("epilogues_fused" if now else "epilogues_unmarked")
            elif op.meta.get(EPILOGUE_META) != before.get(op.id, (None, None))[1]:
                result.changed = True  # a head's chain description changed
        return result
