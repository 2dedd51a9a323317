"""Writing models to disk, with external data once the weights no longer fit in one protobuf.

A serialized protobuf cannot exceed 2 GB, so a model whose weights pass ~1.8 GB (leaving room for
the graph itself) is written as `NAME.onnx` plus `NAME.onnx.data` holding every tensor. Both files
are first written into a temporary folder beside the target and then moved into place, so an
interrupted save never leaves a half-written model under the final name.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from collections.abc import Iterator

import onnx
from onnx.external_data_helper import load_external_data_for_tensor, uses_external_data

from .graph_builder import weight_bytes

EXTERNAL_DATA_THRESHOLD_BYTES = 1_800_000_000


def needs_external_data(model: onnx.ModelProto) -> bool:
    return weight_bytes(model) > EXTERNAL_DATA_THRESHOLD_BYTES


def external_data_location(path: str | os.PathLike[str]) -> str:
    """Name of the weights file written next to `path` (relative, as stored in the model)."""
    return Path(path).name + ".data"


def save(model: onnx.ModelProto, path: str | os.PathLike[str]) -> Path:
    """Save `model` to `path`, using external data when the weights exceed ~1.8 GB.

    The caller's `model` is left holding its weights in memory afterwards.
    Returns the path of the .onnx file.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".graphopt-save-", dir=target.parent))
    try:
        staged_model = staging / target.name
        if needs_external_data(model):
            tensors = list(_all_tensors(model.graph))
            had_location = [t.HasField("data_location") for t in tensors]
            location = external_data_location(target)
            onnx.save_model(
                model,
                staged_model,
                save_as_external_data=True,
                all_tensors_to_one_file=True,
                location=location,
                size_threshold=1024,
            )
            os.replace(staging / location, target.parent / location)
            os.replace(staged_model, target)
            # onnx moved the tensors' bytes out of `model` while writing; read them back and
            # drop the field onnx set on the way, so the model serializes as before.
            for tensor, had in zip(tensors, had_location):
                if uses_external_data(tensor):
                    load_external_data_for_tensor(tensor, str(target.parent))
                    if not had:
                        tensor.ClearField("data_location")
        else:
            onnx.save_model(model, staged_model)
            os.replace(staged_model, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _all_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """Initializers and attribute tensors, subgraphs included: what external data can hold."""
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from _all_tensors(attr.g)
            for subgraph in attr.graphs:
                yield from _all_tensors(subgraph)
