"""Sequences and optionals, the cheap way: a sequence is a Python list of arrays, an empty
optional is None (as an omitted input is). Lists are never mutated: every op returns a new one.
"""

from __future__ import annotations

import numpy as np

from graphopt.errors import GraphoptError
from graphopt.runtime.kernels.registry import KernelNode, kernel
from graphopt.runtime.kernels.tensor import split_sizes


def _position(pos, length: int, *, insert: bool = False) -> int:
    p = int(np.asarray(pos).reshape(-1)[0])
    if p < 0:
        p += length
    if not 0 <= p <= (length if insert else length - 1):
        raise GraphoptError(f"sequence position {p} is out of range for length {length}")
    return p


@kernel("SequenceEmpty")
def _sequence_empty(node: KernelNode):
    return lambda: ([],)


@kernel("SequenceConstruct")
def _sequence_construct(node: KernelNode):
    return lambda *xs: (list(xs),)


@kernel("SequenceAt")
def _sequence_at(node: KernelNode):
    return lambda seq, pos: (seq[_position(pos, len(seq))],)


@kernel("SequenceInsert")
def _sequence_insert(node: KernelNode):
    def run(seq, tensor, pos=None):
        out = list(seq)
        out.insert(len(out) if pos is None else _position(pos, len(out), insert=True), tensor)
        return (out,)
    return run


@kernel("SequenceErase")
def _sequence_erase(node: KernelNode):
    def run(seq, pos=None):
        out = list(seq)
        del out[len(out) - 1 if pos is None else _position(pos, len(out))]
        return (out,)
    return run


@kernel("SequenceLength")
def _sequence_length(node: KernelNode):
    return lambda seq: (np.array(len(seq), dtype=np.int64),)


@kernel("SplitToSequence")
def _split_to_sequence(node: KernelNode):
    axis = int(node.attr("axis", 0))
    keepdims = bool(node.attr("keepdims", 1))

    def run(x, split=None):
        a = axis + x.ndim if axis < 0 else axis
        length = x.shape[a]
        if split is None:
            parts = np.split(x, length, axis=a)
            return ([p if keepdims else np.squeeze(p, axis=a) for p in parts],)
        if np.ndim(split) == 0:
            chunk = int(split)
            sizes = split_sizes(length, -(-length // chunk)) if chunk else []
        else:
            sizes = [int(s) for s in split]
        return (list(np.split(x, np.cumsum(sizes)[:-1], axis=a)),)
    return run


@kernel("ConcatFromSequence")
def _concat_from_sequence(node: KernelNode):
    axis = int(node.attr("axis"))
    new_axis = bool(node.attr("new_axis", 0))

    def run(seq):
        if new_axis:
            rank = seq[0].ndim + 1
            return (np.stack(seq, axis=axis + rank if axis < 0 else axis),)
        return (np.concatenate(seq, axis=axis + seq[0].ndim if axis < 0 else axis),)
    return run


@kernel("Optional")
def _optional(node: KernelNode):
    return lambda x=None: (x,)


@kernel("OptionalHasElement")
def _optional_has_element(node: KernelNode):
    return lambda x=None: (np.array(x is not None),)


@kernel("OptionalGetElement")
def _optional_get_element(node: KernelNode):
    def run(x=None):
        if x is None:
            raise GraphoptError("OptionalGetElement of an empty optional")
        return (x,)
    return run
