"""Control flow: If, Loop, Scan, SequenceMap.

Subgraphs are built once, when the session builds the op (`node.services.compile`), and run
through the session's own executor, so their ops get the same kernels, release plan and in-place
rules. The kernel receives the calling graph's environment as `scope` (registry:
`needs_scope`), from which a body reads the outer-scope values it references; the session keeps
those values alive until the control op has run. The loops below iterate over trip counts and
sequence steps, never over tensor elements.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from graphopt.errors import GraphoptError
from graphopt.ir import onnx_to_np_dtype
from graphopt.runtime.kernels.registry import KernelNode, kernel


def _scoped(fn):
    fn.needs_scope = True
    return fn


def _truth(value: Any) -> bool:
    return bool(np.asarray(value).reshape(-1)[0])


@kernel("If")
def _if(node: KernelNode):
    then_branch = node.services.compile(node.attr("then_branch"))
    else_branch = node.services.compile(node.attr("else_branch"))

    @_scoped
    def run(cond, scope):
        branch = then_branch if _truth(cond) else else_branch
        return tuple(branch.run(scope))
    return run


def _empty_like_output(graph, name: str) -> np.ndarray:
    """A zero-length stack for a scan output of a loop that ran no iteration."""
    value = graph.values[name]
    try:
        dtype = onnx_to_np_dtype(value.dtype) if value.dtype else np.float32
    except (KeyError, TypeError, ValueError):
        dtype = np.float32
    dims = [d if isinstance(d, int) else 0 for d in (value.shape or ())]
    return np.zeros([0] + dims, dtype=dtype)


def _stack(items: list, graph, name: str) -> Any:
    if not items:
        return _empty_like_output(graph, name)
    if isinstance(items[0], list):   # a sequence scan output: the list of sequences
        return items
    return np.stack(items)


@kernel("Loop")
def _loop(node: KernelNode):
    body = node.services.compile(node.attr("body"))
    n_carried = node.n_inputs - 2
    n_scan = len(body.output_names) - 1 - n_carried
    if n_scan < 0:
        raise GraphoptError(f"Loop op {node.op.name!r}: its body has fewer outputs than carried values")

    @_scoped
    def run(trip_count=None, cond=None, *initial, scope):
        limit = int(np.asarray(trip_count).reshape(-1)[0]) if trip_count is not None else None
        go_on = _truth(cond) if cond is not None else True
        carried = list(initial)
        scans: list[list] = [[] for _ in range(n_scan)]
        i = 0
        while go_on and (limit is None or i < limit):
            outs = body.run(scope, [np.array(i, dtype=np.int64), np.array(go_on), *carried])
            go_on = _truth(outs[0])
            carried = list(outs[1:1 + n_carried])
            for j, item in enumerate(outs[1 + n_carried:]):
                scans[j].append(item)
            i += 1
        scan_names = body.output_names[1 + n_carried:]
        return (*carried, *(_stack(s, body.graph, n) for s, n in zip(scans, scan_names)))
    return run


def _scan_loop(body, scope, states: list, scan_inputs: list, in_axes, in_dirs, out_axes,
               out_dirs, n_scan_out: int) -> tuple:
    """One Scan (opset 9 semantics) over the given states and scan inputs."""
    steps = scan_inputs[0].shape[in_axes[0]] if scan_inputs else 0
    collected: list[list] = [[] for _ in range(n_scan_out)]
    for t in range(steps):
        slices = [np.take(x, t if d == 0 else steps - 1 - t, axis=a)
                  for x, a, d in zip(scan_inputs, in_axes, in_dirs)]
        outs = body.run(scope, [*states, *slices])
        states = list(outs[:len(states)])
        for j, item in enumerate(outs[len(states):]):
            collected[j].append(item)
    results = []
    names = body.output_names[len(states):]
    for items, axis, direction, name in zip(collected, out_axes, out_dirs, names):
        if direction:
            items = items[::-1]
        if not items:
            results.append(_empty_like_output(body.graph, name))
            continue
        rank = items[0].ndim + 1
        results.append(np.stack(items, axis=axis + rank if axis < 0 else axis))
    return (*states, *results)


@kernel("Scan", since=9)
def _scan(node: KernelNode):
    body = node.services.compile(node.attr("body"))
    n_scan_in = int(node.attr("num_scan_inputs"))
    n_state = node.n_inputs - n_scan_in
    n_scan_out = len(body.output_names) - n_state
    in_axes = list(node.attr("scan_input_axes") or [0] * n_scan_in)
    in_dirs = list(node.attr("scan_input_directions") or [0] * n_scan_in)
    out_axes = list(node.attr("scan_output_axes") or [0] * n_scan_out)
    out_dirs = list(node.attr("scan_output_directions") or [0] * n_scan_out)

    @_scoped
    def run(*inputs, scope):
        states = list(inputs[:n_state])
        scans = list(inputs[n_state:])
        axes = [a + x.ndim if a < 0 else a for a, x in zip(in_axes, scans)]
        return _scan_loop(body, scope, states, scans, axes, in_dirs, out_axes, out_dirs, n_scan_out)
    return run


@kernel("Scan", since=8)
def _scan_8(node: KernelNode):
    """Opset 8: a leading batch axis on every input, and optional sequence lengths."""
    body = node.services.compile(node.attr("body"))
    n_scan_in = int(node.attr("num_scan_inputs"))
    n_state = node.n_inputs - 1 - n_scan_in
    n_scan_out = len(body.output_names) - n_state
    dirs = list(node.attr("directions") or [0] * n_scan_in)

    @_scoped
    def run(sequence_lens, *inputs, scope):
        batch = inputs[0].shape[0]
        per_batch = []
        for b in range(batch):
            states = [x[b] for x in inputs[:n_state]]
            scans = [x[b] for x in inputs[n_state:]]
            if sequence_lens is not None:
                length = int(sequence_lens[b])
                scans = [x[:length] for x in scans]
            per_batch.append(_scan_loop(body, scope, states, scans, [0] * n_scan_in, dirs,
                                        [0] * n_scan_out, [0] * n_scan_out, n_scan_out))
        return tuple(np.stack([r[k] for r in per_batch]) for k in range(n_state + n_scan_out))
    return run


@kernel("SequenceMap")
def _sequence_map(node: KernelNode):
    body = node.services.compile(node.attr("body"))
    n_out = len(body.output_names)

    @_scoped
    def run(sequence, *extra, scope):
        results: list[list] = [[] for _ in range(n_out)]
        for i in range(len(sequence)):
            args = [sequence[i]] + [x[i] if isinstance(x, list) else x for x in extra]
            for j, item in enumerate(body.run(scope, args)):
                results[j].append(item)
        return tuple(results)
    return run
