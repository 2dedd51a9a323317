"""Concat, Split and Slice elimination.

Concat copies every input into a new buffer; Split and Slice copy pieces out of one. The passes
remove the ones that undo each other or do nothing:

- `ConcatSimplification`: a single-input Concat is its input; empty inputs go; a Concat reading
  another Concat on the same axis (that nothing else reads) takes its inputs; adjacent pieces of
  one tensor (Split outputs or Slices, in order, along the Concat axis) merge into one Slice, and
  into the tensor itself when they cover it.
- `SplitSliceSimplification`: a one-output Split and a Slice that keeps everything go; Slice
  chains merge into one Slice; a Split or Slice of a Concat along its axis reads the Concat's
  inputs directly (the Concat often dies); sibling Slices that tile an axis become one Split.

Concats, Splits and Slices of constants fold in constant folding.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from graphopt.ir import Graph, Op, Value
from graphopt.pass_manager import Pass, PassContext, PassResult
from graphopt.passes.cleanup import add_simple_op, bypass, substitute
from graphopt.passes.transpose import new_const, normalize_axis, remove_if_unused

#: Slice bounds at or beyond this are "to the end" (ONNX exporters write INT64_MAX or INT32_MAX).
_TO_END = 2**31 - 1


def _is(op: Op | None, op_type: str) -> bool:
    return op is not None and op.op_type == op_type and op.domain in ("", "ai.onnx")


@dataclass(frozen=True)
class Piece:
    """A contiguous range [start, stop) along `axis` of `source` (stop None: to the end)."""

    source: str
    axis: int
    start: int
    stop: int | None


def slice_piece(graph: Graph, op: Op) -> Piece | None:
    """The range a single-axis, step-1 Slice with constant non-negative bounds reads."""
    if not _is(op, "Slice"):
        return None
    source = graph.values[op.inputs[0]]
    rank = source.rank
    if rank is None:
        return None
    if graph.opset() < 10:
        starts, ends = op.attrs.get("starts", []), op.attrs.get("ends", [])
        axes = op.attrs.get("axes", list(range(len(starts))))
        steps = [1] * len(starts)
    else:
        consts = graph.const_inputs(op)
        if consts[1] is None or consts[2] is None:
            return None
        starts, ends = consts[1].reshape(-1).tolist(), consts[2].reshape(-1).tolist()
        axes = consts[3].reshape(-1).tolist() if len(consts) > 3 and op.inputs[3] else \
            list(range(len(starts)))
        if len(op.inputs) > 3 and op.inputs[3] and consts[3] is None:
            return None
        steps = consts[4].reshape(-1).tolist() if len(consts) > 4 and op.inputs[4] else \
            [1] * len(starts)
        if len(consts) > 4 and op.inputs[4] and consts[4] is None:
            return None
    # drop axes that keep everything
    kept = [(normalize_axis(int(a), rank), int(s), int(e)) for a, s, e, st in
            zip(axes, starts, ends, steps) if not (int(s) == 0 and int(e) >= _TO_END and st == 1)]
    if any(st != 1 for st in steps) or len(kept) != 1:
        return None
    axis, start, stop = kept[0]
    dim = source.shape[axis] if source.shape is not None else None
    if isinstance(dim, int):
        start = min(start + dim if start < 0 else start, dim)
        stop = min(stop + dim if stop < 0 else stop, dim)
        start, stop = max(start, 0), max(stop, 0)
        return Piece(source.name, axis, start, None if stop >= dim else stop)
    if start < 0 or stop < 0:
        return None
    return Piece(source.name, axis, start, None if stop >= _TO_END else stop)


def split_pieces(graph: Graph, op: Op) -> list[Piece] | None:
    """The range of each output of a Split with known sizes."""
    if not _is(op, "Split"):
        return None
    source = graph.values[op.inputs[0]]
    if source.rank is None:
        return None
    axis = normalize_axis(int(op.attrs.get("axis", 0)), source.rank)
    sizes = _split_sizes(graph, op, source, axis)
    if sizes is None:
        return None
    pieces, start = [], 0
    for i, size in enumerate(sizes):
        stop = start + size
        pieces.append(Piece(source.name, axis, start, None if i == len(sizes) - 1 else stop))
        start = stop
    return pieces


def _split_sizes(graph: Graph, op: Op, source: Value, axis: int) -> list[int] | None:
    if graph.opset() < 13:
        split = op.attrs.get("split")
    elif len(op.inputs) > 1 and op.inputs[1]:
        const = graph.const_value(op.inputs[1])
        split = None if const is None else const.reshape(-1).tolist()
        if split is None:
            return None
    else:
        split = None
    if split is not None:
        return [int(s) for s in split]
    dim = source.shape[axis] if source.shape is not None else None
    if not isinstance(dim, int):
        return None
    n = len(op.outputs)
    if graph.opset() >= 18 and "num_outputs" in op.attrs:
        chunk = -(-dim // n)
        return [min(chunk, dim - chunk * i) for i in range(n)]
    if dim % n:
        return None
    return [dim // n] * n


def piece_of(graph: Graph, value_name: str) -> Piece | None:
    """The range a value is of its source, if a Slice or a Split output made it."""
    found = graph.producer(value_name)
    if found is None:
        return None
    op, slot = found
    if _is(op, "Slice"):
        return slice_piece(graph, op)
    pieces = split_pieces(graph, op)
    return None if pieces is None else pieces[slot]


def add_slice(graph: Graph, source: Value, axis: int, start: int, stop: int | None,
              hint: str) -> Value:
    """Slice(source, start:stop) along one axis (stop None: to the end)."""
    shape = None
    if source.shape is not None:
        dims = list(source.shape)
        if stop is not None:
            dims[axis] = max(stop - start, 0)
        elif isinstance(dims[axis], int):
            dims[axis] = dims[axis] - start
        else:
            dims[axis] = None
        shape = tuple(dims)
    end = _TO_END if stop is None else stop
    if graph.opset() < 10:
        return add_simple_op(graph, "Slice", [source], source.dtype, shape,
                             {"starts": [start], "ends": [end], "axes": [axis]}, hint)
    params = [new_const(graph, np.array([v], dtype=np.int64), f"{hint}_{what}").name
              for what, v in (("start", start), ("end", end), ("axis", axis))]
    return add_simple_op(graph, "Slice", [source.name, *params], source.dtype, shape, hint=hint)


# ---------------------------------------------------------------------------------------------
# Concat
# ---------------------------------------------------------------------------------------------
class ConcatSimplification(Pass):
    """Single-input and nested Concats, and Concats of adjacent pieces of one tensor."""

    name = "concat_simplify"

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        result = PassResult()
        for op in graph.topological_ops():
            if op.graph is graph and _is(op, "Concat"):
                _simplify_concat(graph, op, result)
        return result


def _simplify_concat(graph: Graph, op: Op, result: PassResult) -> None:
    out = graph.values[op.outputs[0]]
    rank = out.rank if out.rank is not None else graph.values[op.inputs[0]].rank
    if rank is None:
        return
    axis = normalize_axis(int(op.attrs["axis"]), rank)
    inputs = list(op.inputs)
    # drop empty inputs (a zero-size range along the axis)
    non_empty = [n for n in inputs if not _empty_along(graph.values[n], axis)]
    if non_empty and len(non_empty) < len(inputs):
        result.count("empty_concat_inputs_dropped", len(inputs) - len(non_empty))
        inputs = non_empty
    # flatten nested Concats on the same axis that only this Concat reads
    flat: list[str] = []
    for name in inputs:
        inner = graph.producer_op(name)
        if _is(inner, "Concat") and normalize_axis(int(inner.attrs["axis"]), rank) == axis \
                and all(c is op for c, _ in graph.consumers(name)) and not graph.is_output(name):
            flat.extend(inner.inputs)
            result.count("nested_concats_flattened")
        else:
            flat.append(name)
    # merge adjacent pieces of one source
    merged: list[str] = []
    i = 0
    while i < len(flat):
        piece = piece_of(graph, flat[i])
        j = i + 1
        if piece is not None and piece.axis == axis:
            stop = piece.stop
            while j < len(flat) and stop is not None:
                nxt = piece_of(graph, flat[j])
                if nxt is None or (nxt.source, nxt.axis, nxt.start) != (piece.source, axis, stop):
                    break
                stop = nxt.stop
                j += 1
        if j - i > 1:
            source = graph.values[piece.source]
            if piece.start == 0 and stop is None:
                merged.append(source.name)
                result.count("concats_of_whole_tensor_removed")
            else:
                merged.append(add_slice(graph, source, axis, piece.start, stop,
                                        f"{op.name}_merged_slice").name)
                result.count("adjacent_slices_merged", j - i - 1)
        else:
            merged.extend(flat[i:j])
        i = j
    if merged != list(op.inputs):
        producers = [graph.producer_op(n) for n in op.inputs]
        graph.set_inputs(op, merged)
        for p in producers:
            remove_if_unused(graph, p)
    if len(op.inputs) == 1:
        if bypass(graph, op):
            result.count("single_input_concats_removed")


def _empty_along(value: Value, axis: int) -> bool:
    return value.shape is not None and len(value.shape) > axis and value.shape[axis] == 0


# ---------------------------------------------------------------------------------------------
# Split and Slice
# ---------------------------------------------------------------------------------------------
class SplitSliceSimplification(Pass):
    """No-op Splits and Slices, Slice chains, Split/Slice of a Concat, sibling Slices."""

    name = "split_slice_simplify"

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        result = PassResult()
        sources: dict[str, None] = {}
        for op in graph.topological_ops():
            if op.graph is not graph:
                continue
            if _is(op, "Split"):
                _simplify_split(graph, op, result)
            elif _is(op, "Slice"):
                if _simplify_slice(graph, op, result) and op.graph is graph:
                    sources[op.inputs[0]] = None
        for name in sources:
            if name in graph.values:
                _siblings_to_split(graph, graph.values[name], result)
        return result


def _simplify_split(graph: Graph, op: Op, result: PassResult) -> None:
    pieces = split_pieces(graph, op)
    if len(op.outputs) == 1 and (pieces is None or pieces[0].stop is None):
        if bypass(graph, op):
            result.count("single_output_splits_removed")
        return
    if pieces is None:
        return
    concat = graph.producer_op(op.inputs[0])
    if _is(concat, "Concat"):
        ranges = _concat_ranges(graph, concat, pieces[0].axis)
        if ranges is not None:
            _read_pieces_from_concat(graph, op, pieces, concat, ranges, result)


def _simplify_slice(graph: Graph, op: Op, result: PassResult) -> bool:
    """Returns True when the slice stays (a candidate for the sibling rewrite)."""
    piece = slice_piece(graph, op)
    if piece is None:
        if _is_full_slice(graph, op):
            if bypass(graph, op):
                result.count("noop_slices_removed")
                return False
        return False
    if piece.start == 0 and piece.stop is None:
        if bypass(graph, op):
            result.count("noop_slices_removed")
            return False
        return True
    inner = graph.producer_op(op.inputs[0])
    inner_piece = slice_piece(graph, inner) if _is(inner, "Slice") else None
    if inner_piece is not None and inner_piece.axis == piece.axis:
        start = inner_piece.start + piece.start
        stop = None if piece.stop is None else inner_piece.start + piece.stop
        if inner_piece.stop is not None:
            stop = inner_piece.stop if stop is None else min(stop, inner_piece.stop)
        source = graph.values[inner_piece.source]
        merged = add_slice(graph, source, piece.axis, start, stop, f"{op.name}_merged")
        out = graph.values[op.outputs[0]]
        merged.shape = out.shape if out.shape is not None else merged.shape
        graph.remove_op(op, prune=False)
        substitute(graph, out, merged)
        remove_if_unused(graph, inner)
        result.count("slice_chains_merged")
        return False
    if _is(inner, "Concat"):
        ranges = _concat_ranges(graph, inner, piece.axis)
        if ranges is not None:
            _read_pieces_from_concat(graph, op, [piece], inner, ranges, result)
            return op.graph is graph
    return True


def _is_full_slice(graph: Graph, op: Op) -> bool:
    """A Slice whose every axis keeps everything (starts 0, ends to the end, steps 1)."""
    if graph.opset() < 10:
        return all(int(s) == 0 and int(e) >= _TO_END for s, e in
                   zip(op.attrs.get("starts", []), op.attrs.get("ends", [])))
    consts = graph.const_inputs(op)
    if consts[1] is None or consts[2] is None:
        return False
    if len(op.inputs) > 4 and op.inputs[4] and (consts[4] is None or np.any(consts[4] != 1)):
        return False
    source = graph.values[op.inputs[0]]
    axes = consts[3].reshape(-1).tolist() if len(consts) > 3 and op.inputs[3] else \
        list(range(consts[1].size))
    if len(consts) > 3 and op.inputs[3] and consts[3] is None:
        return False
    for a, s, e in zip(axes, consts[1].reshape(-1), consts[2].reshape(-1)):
        dim = None
        if source.shape is not None and -len(source.shape) <= a < len(source.shape):
            dim = source.shape[a]
        if int(s) != 0 and not (isinstance(dim, int) and int(s) <= -dim):
            return False
        if int(e) < _TO_END and not (isinstance(dim, int) and int(e) >= dim):
            return False
    return True


def _concat_ranges(graph: Graph, concat: Op, axis: int) -> list[tuple[int, int]] | None:
    """[start, stop) of each Concat input along `axis`, if the Concat is on that axis and every
    input's extent is static."""
    out = graph.values[concat.outputs[0]]
    rank = out.rank if out.rank is not None else graph.values[concat.inputs[0]].rank
    if rank is None or normalize_axis(int(concat.attrs["axis"]), rank) != axis:
        return None
    ranges, start = [], 0
    for name in concat.inputs:
        shape = graph.values[name].shape
        if shape is None or not isinstance(shape[axis], int):
            return None
        ranges.append((start, start + shape[axis]))
        start += shape[axis]
    return ranges


def _read_pieces_from_concat(graph: Graph, op: Op, pieces: list[Piece], concat: Op,
                             ranges: list[tuple[int, int]], result: PassResult) -> None:
    """Each output of a Split/Slice of a Concat that falls within the Concat's inputs reads them
    directly: the whole input, a Slice of one input, or a smaller Concat of several."""
    total = ranges[-1][1]
    for piece in pieces:
        stop = total if piece.stop is None else piece.stop
        first = next((i for i, (a, b) in enumerate(ranges) if a <= piece.start < b), None)
        last = next((i for i, (a, b) in enumerate(ranges) if a < stop <= b), None)
        if first is None or last is None:
            return
        if first != last and (piece.start != ranges[first][0] or stop != ranges[last][1]):
            return  # parts of several inputs: not worth a Slice per input
    new_values: list[Value] = []
    for piece in pieces:
        stop = total if piece.stop is None else piece.stop
        first = next(i for i, (a, b) in enumerate(ranges) if a <= piece.start < b)
        last = next(i for i, (a, b) in enumerate(ranges) if a < stop <= b)
        if first == last:
            source = graph.values[concat.inputs[first]]
            a, b = ranges[first]
            if piece.start == a and stop == b:
                new_values.append(source)
            else:
                new_values.append(add_slice(graph, source, piece.axis, piece.start - a,
                                            None if stop == b else stop - a, f"{op.name}_part"))
        else:
            parts = [graph.values[n] for n in concat.inputs[first:last + 1]]
            shape = None
            out_shape = graph.values[concat.outputs[0]].shape
            if out_shape is not None:
                dims = list(out_shape)
                dims[piece.axis] = stop - piece.start
                shape = tuple(dims)
            new_values.append(add_simple_op(graph, "Concat", parts, parts[0].dtype, shape,
                                            {"axis": piece.axis}, f"{op.name}_parts"))
    outs = [graph.values[n] for n in op.outputs]
    graph.remove_op(op, prune=False)
    for old, new in zip(outs, new_values):
        if graph.has_users(old):
            substitute(graph, old, new)
        elif old.name in graph.values and graph.is_isolated(old):
            graph.remove_value(old)
    remove_if_unused(graph, concat)
    result.count("concat_split_pairs_removed")


def _siblings_to_split(graph: Graph, source: Value, result: PassResult) -> None:
    """Slices of one tensor that tile an axis exactly (each range once) become one Split."""
    by_axis: dict[int, list[tuple[Piece, Op]]] = {}
    for op in graph.consumer_ops(source):
        if _is(op, "Slice") and op.inputs[0] == source.name:
            piece = slice_piece(graph, op)
            if piece is not None:
                by_axis.setdefault(piece.axis, []).append((piece, op))
    for axis, items in by_axis.items():
        if len(items) < 2 or source.shape is None or not isinstance(source.shape[axis], int):
            continue
        items.sort(key=lambda item: item[0].start)
        dim = source.shape[axis]
        position, sizes = 0, []
        for piece, _ in items:
            stop = dim if piece.stop is None else piece.stop
            if piece.start != position or stop <= position:
                break
            sizes.append(stop - position)
            position = stop
        if position != dim or len(sizes) != len(items):
            continue
        outs = [graph.values[op.outputs[0]] for _, op in items]
        fresh = [graph.add_value(graph.fresh_name(f"{o.name}_split"), o.dtype, o.shape)
                 for o in outs]
        attrs = {"axis": axis}
        inputs = [source.name]
        if graph.opset() >= 13:
            sizes_const = new_const(graph, np.array(sizes, dtype=np.int64), f"{source.name}_split")
            inputs.append(sizes_const.name)
        else:
            attrs["split"] = sizes
        params = []
        for _, op in items:
            params.extend(graph.values[n] for n in op.inputs[1:] if n)
            graph.remove_op(op, prune=False)
        graph.add_op("Split", inputs, fresh, attrs)
        for old, new in zip(outs, fresh):
            substitute(graph, old, new)
        for value in params:
            if value.name in graph.values and value.is_const and graph.is_isolated(value) \
                    and not graph.is_input(value) and not graph.is_output(value):
                graph.remove_value(value)
        result.count("slices_to_split", len(items))


#: The family's passes, in the order the O2 pipeline runs them.
PASSES: list[type[Pass]] = [ConcatSimplification, SplitSliceSimplification]
