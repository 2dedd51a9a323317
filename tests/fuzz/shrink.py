"""Greedy reduction of a failing model to a small reproducer.

    small_model, small_feeds = shrink(model, feeds, still_fails)

`still_fails(model, feeds) -> bool` says whether a candidate shows the same failure. Candidates,
each kept only if the model stays valid (onnx checker) and still fails:

- drop one graph output (while more than one is left);
- bypass an op: its output's readers read one of its inputs of the same type and shape instead
  (not with `exact`, see `shrink`);
- cut an op: its outputs become graph inputs, fed with the values they had (so the rest of the
  graph computes exactly what it computed before, and a numeric failure does not vanish because
  random feeds replaced realistic ones);
- retarget a graph output from an op to one of the op's inputs, so the op can go;

after each, ops, initializers and inputs nothing needs any longer are pruned. Passes over the
ops repeat until a whole pass changes nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import onnx
from onnx import helper

from fuzz.differential import ort_session

Feeds = dict[str, np.ndarray]
Predicate = Callable[[onnx.ModelProto, Feeds], bool]


def shrink(model: onnx.ModelProto, feeds: Feeds, still_fails: Predicate, *,
           max_passes: int = 10, exact: bool = False) -> tuple[onnx.ModelProto, Feeds]:
    """`exact`: only steps that keep every remaining value what it was (cuts and output drops,
    no bypasses). Use it for numeric mismatches: a bypass changes what the rest computes and can
    turn a small mismatch into an ill-conditioned one (a Div by a mean near zero) that is no
    longer the bug."""
    steps = (_cut, _retarget) if exact else (_bypass, _cut, _retarget)
    current, current_feeds = _named(model), dict(feeds)
    pruned = prune(current, current_feeds)
    if _accept(pruned, still_fails):
        current, current_feeds = pruned
    for _ in range(max_passes):
        changed = False
        for candidate in _output_drops(current, current_feeds):
            if _accept(candidate, still_fails):
                current, current_feeds = candidate
                changed = True
        for name in [n.name for n in reversed(current.graph.node)]:
            if not any(n.name == name for n in current.graph.node):
                continue  # pruned by an earlier step
            for make in steps:
                candidate = make(current, current_feeds, name)
                if candidate is not None and _accept(candidate, still_fails):
                    current, current_feeds = candidate
                    changed = True
                    break
        if not changed:
            break
    return current, current_feeds


def _accept(candidate: tuple[onnx.ModelProto, Feeds], still_fails: Predicate) -> bool:
    model, feeds = candidate
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception:
        return False
    try:
        return bool(still_fails(model, feeds))
    except Exception:
        return False


# ---------------------------------------------------------------------------------------------
# candidates
# ---------------------------------------------------------------------------------------------
def _output_drops(model: onnx.ModelProto, feeds: Feeds) -> Iterator[tuple[onnx.ModelProto, Feeds]]:
    outputs = [o.name for o in model.graph.output]
    if len(outputs) < 2:
        return
    for name in outputs:
        if name not in [o.name for o in model.graph.output] or len(model.graph.output) < 2:
            continue
        copy = _copy(model)
        kept = [o for o in copy.graph.output if o.name != name]
        del copy.graph.output[:]
        copy.graph.output.extend(kept)
        yield prune(copy, feeds)


def _bypass(model: onnx.ModelProto, feeds: Feeds, node_name: str
            ) -> tuple[onnx.ModelProto, Feeds] | None:
    """Readers of the node's (single used) output read an input of the same type instead."""
    node = _node(model, node_name)
    used = [o for o in node.output if o and _is_used(model, o)]
    if len(used) != 1:
        return None
    types = value_types(model)
    out = used[0]
    graph_inputs = {i.name for i in model.graph.input}
    graph_outputs = [o.name for o in model.graph.output]
    for src in node.input:
        if not src or src not in types or types[src] != types.get(out):
            continue
        if out in graph_outputs and (src in graph_inputs or src in graph_outputs):
            continue
        copy = _copy(model)
        for n in copy.graph.node:
            for i, name in enumerate(n.input):
                if name == out:
                    n.input[i] = src
        for o in copy.graph.output:
            if o.name == out:
                o.name = src
        return prune(copy, feeds)
    return None


def _retarget(model: onnx.ModelProto, feeds: Feeds, node_name: str
              ) -> tuple[onnx.ModelProto, Feeds] | None:
    """The node makes a graph output: the output becomes one of the node's inputs instead (made
    by another node), so the node can go. Values upstream are unchanged, so this is exact."""
    node = _node(model, node_name)
    outputs = [o.name for o in model.graph.output]
    made = {o for n in model.graph.node for o in n.output if o}
    mine = [i for i, name in enumerate(outputs) if name in node.output]
    if not mine:
        return None
    types = value_types(model)
    for src in node.input:
        if src in made and src not in outputs and src in types:
            copy = _copy(model)
            copy.graph.output[mine[0]].CopyFrom(helper.make_value_info(src, types[src]))
            return prune(copy, feeds)
    return None


def _cut(model: onnx.ModelProto, feeds: Feeds, node_name: str
         ) -> tuple[onnx.ModelProto, Feeds] | None:
    """Remove the node; its used outputs become graph inputs fed with the values they had."""
    node = _node(model, node_name)
    if node.op_type == "Constant" or not any(node.input):
        return None  # a constant turned into an input would hide it from the passes
    graph_outputs = {o.name for o in model.graph.output}
    used = [o for o in node.output if o and _is_used(model, o) and o not in graph_outputs]
    if any(o in graph_outputs for o in node.output if o):
        return None  # cutting would turn a graph output into an input
    types = value_types(model)
    if any(o not in types for o in used):
        return None
    values = intermediate_values(model, feeds, used)
    if values is None:
        return None
    copy = _copy(model)
    kept = [n for n in copy.graph.node if n.name != node_name]
    del copy.graph.node[:]
    copy.graph.node.extend(kept)
    new_feeds = dict(feeds)
    for name in used:
        copy.graph.input.append(helper.make_value_info(name, types[name]))
        new_feeds[name] = values[name]
    return prune(copy, new_feeds)


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
def prune(model: onnx.ModelProto, feeds: Feeds) -> tuple[onnx.ModelProto, Feeds]:
    """Drop ops, initializers and graph inputs that no graph output depends on."""
    copy = _copy(model)
    g = copy.graph
    needed = {o.name for o in g.output}
    kept = []
    for node in reversed(g.node):
        if any(o in needed for o in node.output if o):
            kept.append(node)
            needed.update(i for i in node.input if i)
            needed.update(_subgraph_reads(node))
    kept.reverse()
    del g.node[:]
    g.node.extend(kept)
    inits = [t for t in g.initializer if t.name in needed]
    del g.initializer[:]
    g.initializer.extend(inits)
    inputs = [i for i in g.input if i.name in needed]
    del g.input[:]
    g.input.extend(inputs)
    names = {i.name for i in inputs}
    return copy, {k: v for k, v in feeds.items() if k in names}


def _subgraph_reads(node: onnx.NodeProto) -> set[str]:
    reads: set[str] = set()
    for a in node.attribute:
        for sub in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
            for n in sub.node:
                reads.update(i for i in n.input if i)
                reads.update(_subgraph_reads(n))
            reads.update(o.name for o in sub.output)
    return reads


def _named(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy whose nodes all have distinct names (the shrinker addresses nodes by name)."""
    copy = _copy(model)
    seen: set[str] = set()
    for i, node in enumerate(copy.graph.node):
        if not node.name or node.name in seen:
            node.name = f"{node.op_type}_n{i}"
        seen.add(node.name)
    return copy


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy


def _node(model: onnx.ModelProto, name: str) -> onnx.NodeProto:
    return next(n for n in model.graph.node if n.name == name)


def _is_used(model: onnx.ModelProto, name: str) -> bool:
    return any(name in n.input for n in model.graph.node) or \
        any(o.name == name for o in model.graph.output)


def value_types(model: onnx.ModelProto) -> dict[str, onnx.TypeProto]:
    """TypeProto of every value whose type shape inference knows."""
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {}
    for vi in list(inferred.graph.input) + list(inferred.graph.value_info) + \
            list(inferred.graph.output):
        types[vi.name] = vi.type
    for t in model.graph.initializer:
        types.setdefault(t.name, helper.make_tensor_type_proto(t.data_type, list(t.dims)))
    return types


def intermediate_values(model: onnx.ModelProto, feeds: Feeds, names: list[str]) -> Feeds | None:
    """The values `names` take when the model runs on `feeds` (onnxruntime), or None."""
    types = value_types(model)
    copy = _copy(model)
    existing = {o.name for o in copy.graph.output}
    for name in names:
        if name not in existing:
            copy.graph.output.append(helper.make_value_info(name, types[name]))
    try:
        session = ort_session(copy)
        results = session.run(names, feeds)
    except Exception:
        return None
    return dict(zip(names, results))
