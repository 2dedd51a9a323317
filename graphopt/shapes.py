"""Shape and type inference for the IR, delegated to onnx's shape inference.

Why onnx's: it knows every standard op at every opset; writing our own would be a second,
divergent copy of the spec. Large constants are swapped for typed graph inputs before inference
(only small ones, such as Reshape targets, are ever needed as values), so a 2 GB model infers in
a message of a few kilobytes.
"""

from __future__ import annotations

import onnx

from graphopt.ir import Graph, Shape
from graphopt.onnx_io import to_model_without_large_constants

#: Constants larger than this are replaced by typed inputs during inference.
_INLINE_CONST_BYTES = 1 << 16


def infer_shapes(graph: Graph, input_shapes: dict[str, Shape] | None = None, *,
                 overwrite: bool = False) -> int:
    """Fill in dtype and shape of the graph's values from onnx shape inference.

    `input_shapes` pins graph inputs (e.g. a symbolic batch to 1) for this inference only: the
    model's declared inputs are not changed. Known shapes are kept unless `overwrite`; returns the
    number of values whose type or shape became known. Inference errors leave the graph as it was.
    """
    found = inferred_types(graph, input_shapes)
    updated = 0
    for name, type_proto in found.items():
        value = graph.values.get(name)
        if value is None or value.is_const or not type_proto.HasField("tensor_type"):
            continue
        tt = type_proto.tensor_type
        changed = False
        if tt.elem_type and (overwrite or not value.dtype):
            changed |= value.dtype != tt.elem_type
            value.dtype = tt.elem_type
        if tt.HasField("shape"):
            dims = tuple(int(d.dim_value) if d.HasField("dim_value")
                         else (d.dim_param if d.HasField("dim_param") else None)
                         for d in tt.shape.dim)
            if name in (input_shapes or {}) or graph.is_input(name):
                continue
            if overwrite or value.shape is None or _more_specific(dims, value.shape):
                changed |= value.shape != dims
                value.shape = dims
        updated += changed
    return updated


def inferred_types(graph: Graph, input_shapes: dict[str, Shape] | None = None
                   ) -> dict[str, onnx.TypeProto]:
    """Value name -> type from onnx shape inference (inputs pinned by `input_shapes`), without
    touching the graph; empty when inference fails."""
    model = _inference_model(graph, input_shapes or {})
    try:
        inferred = onnx.shape_inference.infer_shapes(model, check_type=False, strict_mode=False,
                                                     data_prop=True)
    except Exception:  # onnx raises a variety of errors for ops it cannot infer
        return {}
    return {vi.name: vi.type for vi in list(inferred.graph.value_info) + list(inferred.graph.output)}


def _more_specific(new: Shape, old: Shape) -> bool:
    """Whether `new` knows at least as much as `old` and more (same rank)."""
    if len(new) != len(old):
        return False
    gained = False
    for a, b in zip(new, old):
        if isinstance(b, int) and a != b:
            return False
        if isinstance(a, int) and not isinstance(b, int):
            gained = True
        elif isinstance(a, str) and b is None:
            gained = True
    return gained


def _inference_model(graph: Graph, input_shapes: dict[str, Shape]) -> onnx.ModelProto:
    """The model with large constants turned into inputs and pinned input shapes applied."""
    model, _ = to_model_without_large_constants(graph, _INLINE_CONST_BYTES)
    for vi in model.graph.input:
        if vi.name in input_shapes:
            shape = input_shapes[vi.name]
            dims = vi.type.tensor_type.shape.dim
            del dims[:]
            for d in shape:
                dim = dims.add()
                if isinstance(d, int):
                    dim.dim_value = d
                elif isinstance(d, str):
                    dim.dim_param = d
    del model.graph.value_info[:]
    if input_shapes:
        # Declared output shapes were derived from the declared inputs; with inputs pinned to
        # other shapes they would contradict inference, so outputs are re-derived.
        for vi in model.graph.output:
            if vi.type.HasField("tensor_type"):
                vi.type.tensor_type.ClearField("shape")
    return model
