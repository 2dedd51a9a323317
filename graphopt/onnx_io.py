"""Load ONNX models into the IR and save the IR back, losslessly.

What is kept: opset imports, custom domains and their ops (untouched), model-local functions,
metadata_props of model, graph and nodes, doc strings, value_info, sparse initializers, symbolic
dims, If/Loop/Scan subgraphs (as nested `Graph`s) and external data. Fields graphopt does not
model are carried in proto templates and written back as they were.

External data is memory-mapped on load (not copied), and written on save when the weights pass
the 2 GB protobuf limit or when asked.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from google.protobuf.message import DecodeError

from graphopt.errors import InvalidModelError, IRError, UsageError
from graphopt.ir import Graph, ModelInfo, Op, Shape, Value, onnx_to_np_dtype

#: Protobuf cannot serialize a message over 2 GiB; above this many bytes of weights we write
#: external data.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000
#: Tensors smaller than this stay inline when writing external data.
EXTERNAL_TENSOR_MIN_BYTES = 1024

_GRAPH_FIELDS_MODELED = ("node", "initializer", "sparse_initializer", "input", "output",
                         "value_info", "name", "doc_string")


# ---------------------------------------------------------------------------------------------
# load
# ---------------------------------------------------------------------------------------------
def load(model: str | os.PathLike | onnx.ModelProto | bytes) -> Graph:
    """Read a model (path, bytes or ModelProto) into a `Graph`. Raise InvalidModelError with a
    one-line reason when it is not a model we can read."""
    base_dir: str | None = None
    if isinstance(model, onnx.ModelProto):
        proto = model
    elif isinstance(model, (bytes, bytearray)):
        proto = _parse(bytes(model), "<bytes>")
    else:
        path = Path(model)
        if not path.exists():
            raise UsageError(f"{path}: no such file")
        if path.is_dir():
            raise UsageError(f"{path}: is a directory, not an ONNX model")
        proto = _parse(path.read_bytes(), str(path))
        base_dir = str(path.resolve().parent)
    _check_readable(proto)
    try:
        graph = _load_graph(proto.graph, parent=None, base_dir=base_dir)
    except IRError as exc:
        raise InvalidModelError(f"invalid model: {exc}") from None
    info = graph.model
    assert info is not None
    info.ir_version = proto.ir_version
    info.opset_imports = {imp.domain if imp.domain != "ai.onnx" else "": imp.version
                          for imp in proto.opset_import}
    template = onnx.ModelProto()
    template.CopyFrom(proto)
    template.ClearField("graph")
    info.template = template
    info.external_data_dir = base_dir
    try:
        graph.check()
    except IRError as exc:
        raise InvalidModelError(f"invalid model: {exc}") from None
    return graph


def _parse(data: bytes, where: str) -> onnx.ModelProto:
    proto = onnx.ModelProto()
    try:
        proto.ParseFromString(data)
    except (DecodeError, RuntimeError, ValueError) as exc:
        raise InvalidModelError(f"{where}: not a valid ONNX model (protobuf parse failed: "
                                f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
    if not data or proto.ir_version == 0 or not proto.HasField("graph"):
        raise InvalidModelError(f"{where}: not an ONNX model (no ir_version or graph; "
                                "the file may be truncated or of another format)")
    return proto


def _check_readable(proto: onnx.ModelProto) -> None:
    """Refuse IR versions and opsets newer than the installed onnx understands."""
    if proto.ir_version > onnx.IR_VERSION:
        raise InvalidModelError(f"model IR version {proto.ir_version} is newer than the installed "
                                f"onnx {onnx.__version__} supports (IR {onnx.IR_VERSION}); "
                                "upgrade onnx")
    newest = onnx.defs.onnx_opset_version()
    for imp in proto.opset_import:
        if imp.domain in ("", "ai.onnx") and imp.version > newest:
            raise InvalidModelError(f"model uses opset {imp.version} of the default domain; the "
                                    f"installed onnx {onnx.__version__} knows up to {newest}")
    if not any(imp.domain in ("", "ai.onnx") for imp in proto.opset_import) and proto.ir_version >= 3:
        used_default = any(n.domain in ("", "ai.onnx") for n in proto.graph.node)
        if used_default:
            raise InvalidModelError("model uses default-domain ops but imports no default opset")


def _decode_type(value: Value, type_proto: onnx.TypeProto) -> None:
    """Set dtype/shape from a TypeProto and keep the proto for a lossless save."""
    value.type_proto = type_proto
    if type_proto.HasField("tensor_type"):
        tt = type_proto.tensor_type
        value.dtype = tt.elem_type
        if tt.HasField("shape"):
            dims: list[int | str | None] = []
            for d in tt.shape.dim:
                if d.HasField("dim_value"):
                    dims.append(int(d.dim_value))
                elif d.HasField("dim_param"):
                    dims.append(d.dim_param)
                else:
                    dims.append(None)
            value.shape = tuple(dims)
        else:
            value.shape = None
    value._declared = (value.dtype, value.shape)


def _external_loader(tensor: onnx.TensorProto, base_dir: str | None) -> Callable[[], np.ndarray]:
    """A loader that memory-maps an external tensor (falls back to reading it)."""
    info = {e.key: e.value for e in tensor.external_data}
    location = info.get("location", "")
    offset = int(info.get("offset", 0))
    length = int(info["length"]) if "length" in info else None
    shape = tuple(int(d) for d in tensor.dims)

    def load_array() -> np.ndarray:
        if base_dir is None:
            raise InvalidModelError(f"tensor {tensor.name!r} has external data ({location}) but "
                                    "the model was not loaded from a file; load it by path")
        path = os.path.join(base_dir, location)
        if not os.path.exists(path):
            raise InvalidModelError(f"external data file {location!r} of tensor {tensor.name!r} "
                                    "is missing")
        try:
            dtype = onnx_to_np_dtype(tensor.data_type)
        except (KeyError, TypeError, ValueError):
            dtype = None
        simple = dtype is not None and dtype.kind in "biuf" and tensor.data_type not in (
            onnx.TensorProto.BFLOAT16, onnx.TensorProto.FLOAT16) or tensor.data_type == onnx.TensorProto.FLOAT16
        count = int(np.prod(shape, dtype=np.int64))
        if simple and dtype is not None:
            nbytes = count * dtype.itemsize
            if length is not None and length != nbytes:
                raise InvalidModelError(f"external tensor {tensor.name!r}: {length} bytes on disk, "
                                        f"{nbytes} expected from its shape and type")
            if os.path.getsize(path) < offset + nbytes:
                raise InvalidModelError(f"external data file {location!r} is too short for "
                                        f"tensor {tensor.name!r}")
            if count == 0:
                return np.zeros(shape, dtype=dtype)
            return np.memmap(path, dtype=dtype.newbyteorder("<"), mode="r", offset=offset, shape=shape)
        copy = onnx.TensorProto()
        copy.CopyFrom(tensor)
        onnx.external_data_helper.load_external_data_for_tensor(copy, base_dir)
        copy.data_location = onnx.TensorProto.DEFAULT
        del copy.external_data[:]
        return onnx.numpy_helper.to_array(copy)

    return load_array


def _attach_initializer(value: Value, tensor: onnx.TensorProto, base_dir: str | None) -> None:
    external = tensor.data_location == onnx.TensorProto.EXTERNAL
    value.set_const_proto(tensor, _external_loader(tensor, base_dir) if external else None)
    if not external:
        _check_tensor_size(tensor)


def _check_tensor_size(tensor: onnx.TensorProto) -> None:
    """Catch initializers whose data does not match their dims (a corrupt file)."""
    if tensor.HasField("raw_data") or tensor.raw_data:
        try:
            itemsize = onnx_to_np_dtype(tensor.data_type).itemsize
        except (KeyError, TypeError, ValueError):
            return
        if tensor.data_type in (onnx.TensorProto.STRING,):
            return
        bits = {onnx.TensorProto.INT4: 4, onnx.TensorProto.UINT4: 4}.get(tensor.data_type)
        count = int(np.prod(tensor.dims, dtype=np.int64))
        expected = (count * bits + 7) // 8 if bits else count * itemsize
        if getattr(onnx.TensorProto, "FLOAT4E2M1", None) == tensor.data_type:
            expected = (count * 4 + 7) // 8
        if len(tensor.raw_data) != expected:
            raise InvalidModelError(f"initializer {tensor.name!r} holds {len(tensor.raw_data)} "
                                    f"bytes but its dims {list(tensor.dims)} need {expected}")


def _load_graph(gproto: onnx.GraphProto, parent: Graph | None, base_dir: str | None) -> Graph:
    graph = Graph(gproto.name or "graph", parent=parent)
    graph.doc_string = gproto.doc_string
    template = onnx.GraphProto()
    template.CopyFrom(gproto)
    for name in _GRAPH_FIELDS_MODELED:
        template.ClearField(name)
    graph.template = template

    def declare(name: str) -> Value:
        if not isinstance(name, str):
            raise IRError(f"value name {name!r} is not valid UTF-8")
        if name in graph.values:
            return graph.values[name]
        return graph.add_value(name)

    for vi in gproto.input:
        if vi.name in graph.values:
            raise IRError(f"graph input {vi.name!r} is listed twice")
        value = declare(vi.name)
        _decode_type(value, vi.type)
        value.doc_string = vi.doc_string
        value.value_info_proto = vi
        graph.inputs.append(vi.name)
    for tensor in gproto.initializer:
        if tensor.name in graph.values and not graph.is_input(tensor.name):
            raise IRError(f"initializer {tensor.name!r} is defined twice")
        if graph.values.get(tensor.name) is not None and graph.values[tensor.name].is_const:
            raise IRError(f"initializer {tensor.name!r} is defined twice")
        value = declare(tensor.name)
        declared = value._declared
        _attach_initializer(value, tensor, base_dir)
        if declared is not None:  # an initializer that is also a graph input: a default value
            value.dtype, value.shape = declared
            value._declared = declared
    for sparse in gproto.sparse_initializer:
        _attach_sparse(declare(sparse.values.name), sparse)
    producers: dict[str, str] = {}
    for node in gproto.node:
        for out in node.output:
            if not out:
                continue
            if out in producers or (out in graph.values and (graph.values[out].is_const
                                                             or graph.is_input(out))):
                raise IRError(f"value {out!r} is produced twice (by {producers.get(out, 'an input')!r} "
                              f"and {node.name or node.op_type!r})")
            producers[out] = node.name or node.op_type
            declare(out)
    for vi in gproto.value_info:
        if vi.name not in graph.values:
            continue  # annotation of a value that no longer exists; harmless, dropped
        value = graph.values[vi.name]
        if value.value_info_proto is None:
            _decode_type(value, vi.type)
            value.doc_string = vi.doc_string
            value.value_info_proto = vi
    for node in gproto.node:
        sparse = _sparse_constant(node)
        if sparse is not None:      # kept as sparse data, written back as this Constant node
            _attach_sparse(graph.values[node.output[0]], sparse, node)
            continue
        _load_node(graph, node, base_dir)
    for vi in gproto.output:
        if vi.name not in graph.values:
            if parent is None:
                raise IRError(f"graph output {vi.name!r} is produced by nothing")
            graph._resolve_outer(vi.name)
        value = graph.values[vi.name]
        if value.value_info_proto is None:
            declared_const = value.is_const
            if not declared_const:
                _decode_type(value, vi.type)
            value.value_info_proto = vi
        graph.outputs.append(vi.name)
    return graph


def _attach_sparse(value: Value, sparse: onnx.SparseTensorProto,
                   node: onnx.NodeProto | None = None) -> None:
    """Make `value` the sparse constant `sparse`, stored as a sparse_initializer, or in `node`."""
    value.sparse_proto, value.sparse_node = sparse, node
    value.dtype = sparse.values.data_type
    value.shape = tuple(int(d) for d in sparse.dims)


def _sparse_constant(node: onnx.NodeProto) -> onnx.SparseTensorProto | None:
    """The sparse tensor of a Constant node that holds only a sparse_value, else None."""
    if node.op_type != "Constant" or node.domain not in ("", "ai.onnx") \
            or len(node.attribute) != 1 or node.attribute[0].name != "sparse_value" \
            or len(node.output) != 1 or not node.output[0]:
        return None
    return node.attribute[0].sparse_tensor


def sparse_constant_node(name: str) -> onnx.NodeProto:
    """A Constant node to store sparse value `name` in (see Value.sparse_node)."""
    return onnx.helper.make_node("Constant", [], [name], name=f"{name}_constant")


def _load_node(graph: Graph, node: onnx.NodeProto, base_dir: str | None) -> Op:
    for text in (node.op_type, node.domain, node.name, *node.input, *node.output):
        if not isinstance(text, str):  # protobuf hands back bytes for invalid UTF-8
            raise IRError(f"node {node.name!r} has a name or type that is not valid UTF-8: {text!r}")
    attrs: dict[str, Any] = {}
    attr_types: dict[str, int] = {}
    attr_protos: dict[str, onnx.AttributeProto] = {}
    subgraph_protos: dict[str, Any] = {}
    for a in node.attribute:
        if a.ref_attr_name:
            attr_protos[a.name] = a
            continue
        attr_types[a.name] = a.type
        if a.type == onnx.AttributeProto.GRAPH:
            subgraph_protos[a.name] = a.g
        elif a.type == onnx.AttributeProto.GRAPHS:
            subgraph_protos[a.name] = list(a.graphs)
        else:
            attrs[a.name] = _decode_attr(a)
        if a.doc_string:
            attr_protos[a.name] = a
    for n in node.input:
        if n and n not in graph.values:
            graph._resolve_outer(n)
    # The op is created with its plain attributes first so that subgraphs can point at it.
    op = graph.add_op(node.op_type, list(node.input), list(node.output), attrs,
                      domain=node.domain if node.domain != "ai.onnx" else "", name="\0tmp")
    graph._names.discard(op.name)
    op.name = node.name
    op.doc_string = node.doc_string
    op.attr_types = attr_types
    op.attr_protos = {k: v for k, v in attr_protos.items() if v.ref_attr_name}
    op.meta = {p.key: p.value for p in node.metadata_props}
    op.overload = getattr(node, "overload", "")
    if subgraph_protos:
        for name, sub in subgraph_protos.items():
            if isinstance(sub, list):
                op.attrs[name] = [_load_subgraph(graph, g, base_dir) for g in sub]
            else:
                op.attrs[name] = _load_subgraph(graph, sub, base_dir)
        graph.refresh_implicit(op)
    return op


def _load_subgraph(parent: Graph, gproto: onnx.GraphProto, base_dir: str | None) -> Graph:
    sub = _load_graph(gproto, parent=parent, base_dir=base_dir)
    for value in sub.values.values():
        if value.outer and value.name not in parent.values:
            parent._resolve_outer(value.name)
    return sub


def _decode_attr(a: onnx.AttributeProto) -> Any:
    value = onnx.helper.get_attribute_value(a)
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="surrogateescape")
    if isinstance(value, list) and value and isinstance(value[0], bytes):
        return [v.decode("utf-8", errors="surrogateescape") for v in value]
    return value


# ---------------------------------------------------------------------------------------------
# save
# ---------------------------------------------------------------------------------------------
def to_model(graph: Graph) -> onnx.ModelProto:
    """Build a ModelProto from the root graph (all tensors inline)."""
    if graph.parent is not None:
        raise IRError("to_model needs the root graph")
    info = graph.model or ModelInfo()
    model = onnx.ModelProto()
    if info.template is not None:
        model.CopyFrom(info.template)
    else:
        model.producer_name = "graphopt"
    model.ir_version = info.ir_version
    del model.opset_import[:]
    for domain, version in info.opset_imports.items():
        model.opset_import.append(onnx.helper.make_opsetid(domain, version))
    model.graph.CopyFrom(_graph_proto(graph))
    return model


def to_model_without_large_constants(graph: Graph, max_bytes: int = 1 << 16
                                     ) -> tuple[onnx.ModelProto, list[str]]:
    """The model with every constant over `max_bytes` turned into a typed graph input, and the
    names of those constants. For tools that need the graph's structure but not its weights
    (shape inference, the opset converter): the message stays small even for a 2 GB model."""
    swapped = {}
    for value in graph.values.values():
        if value.is_const and not value.outer and value.nbytes > max_bytes:
            swapped[value.name] = (value._array, value._proto, value._loader, value.sparse_proto)
    saved_inputs = list(graph.inputs)
    try:
        for name in swapped:
            value = graph.values[name]
            value._array = value._proto = value._loader = value.sparse_proto = None
            if name not in graph.inputs:
                graph.inputs.append(name)
        model = to_model(graph)
    finally:
        graph.inputs = saved_inputs
        for name, (array, proto, loader, sparse) in swapped.items():
            value = graph.values[name]
            value._array, value._proto, value._loader, value.sparse_proto = array, proto, loader, sparse
    return model, [name for name in swapped if name not in saved_inputs]


def input_signature(graph: Graph) -> onnx.ModelProto:
    """The model's metadata and opsets with a graph of only its fed inputs and its outputs (no
    nodes, no weights): what a feed generator reads, cheap even for a 2 GB model."""
    model = onnx.ModelProto()
    if graph.model is not None and graph.model.template is not None:
        model.CopyFrom(graph.model.template)
    model.graph.Clear()
    model.graph.name = graph.name
    for name in graph.inputs:
        if not graph.values[name].is_const:
            model.graph.input.append(_value_info(graph.values[name]))
    for name in graph.outputs:
        model.graph.output.append(_value_info(graph.values[name]))
    return model


def load_with_constants_of(model: onnx.ModelProto, source: Graph, swapped: Sequence[str]) -> Graph:
    """Load `model`, made from `source` by `to_model_without_large_constants` (and perhaps
    rewritten, e.g. by the opset converter), and hand it the `swapped` constants of `source` by
    reference (no copy). Its graph inputs are those of `source` (IR < 4 lists every initializer
    as an input too). ValueError when a swapped constant is no longer an input of `model`."""
    graph = load(model)
    lost = [name for name in swapped if name not in graph.values or not graph.is_input(name)]
    if lost:
        raise ValueError(f"constants no longer graph inputs: {', '.join(lost[:3])}")
    kept = set(source.inputs)
    graph.inputs = [name for name in graph.inputs if name in kept]
    for name in swapped:
        origin, target = source.values[name], graph.values[name]
        target._array, target._proto = origin._array, origin._proto
        target._loader, target.sparse_proto = origin._loader, origin.sparse_proto
        target.sparse_node = origin.sparse_node
        target.type_proto = target.value_info_proto = target._declared = None
    return graph


def _graph_proto(graph: Graph) -> onnx.GraphProto:
    gp = onnx.GraphProto()
    if graph.template is not None:
        gp.CopyFrom(graph.template)
    gp.name = graph.name
    if graph.doc_string:
        gp.doc_string = graph.doc_string
    for name in graph.inputs:
        gp.input.append(_value_info(graph.values[name]))
    for name in graph.outputs:
        gp.output.append(_value_info(graph.values[name]))
    # IR < 4 requires every initializer of the main graph to be listed as an input as well.
    list_initializers = graph.parent is None and graph.model is not None \
        and graph.model.ir_version < 4
    listed = set(graph.inputs)
    sparse_nodes = []
    for value in graph.values.values():
        if value.outer or not value.is_const:
            continue
        if value.sparse_node is not None and value.sparse_proto is not None:
            sparse_nodes.append(_sparse_node_proto(value))
            continue
        if list_initializers and value.name not in listed:
            gp.input.append(_value_info(value))
        if value.sparse_proto is not None:   # still sparse (assigning `const` clears it)
            gp.sparse_initializer.append(value.sparse_proto)
            continue
        gp.initializer.append(_tensor_proto(value))
    inputs_outputs = set(graph.inputs) | set(graph.outputs)
    for value in graph.values.values():
        if value.outer or value.name in inputs_outputs or value.is_const:
            continue
        if graph.is_isolated(value):
            continue
        if value.value_info_proto is not None or (value.dtype and value.shape is not None):
            gp.value_info.append(_value_info(value))
    gp.node.extend(sparse_nodes)
    for op in graph.topological_ops():
        gp.node.append(_node_proto(op))
    return gp


def _sparse_node_proto(value: Value) -> onnx.NodeProto:
    """The Constant node holding sparse `value` (its loaded node, name and all, when it has one)."""
    node = onnx.NodeProto()
    node.CopyFrom(value.sparse_node)
    node.ClearField("output")
    node.output.append(value.name)
    node.ClearField("attribute")
    node.attribute.append(onnx.helper.make_attribute("sparse_value", value.sparse_proto))
    return node


def _value_info(value: Value) -> onnx.ValueInfoProto:
    """ValueInfoProto of a value: the loaded one (doc string, metadata and all) with its type
    kept verbatim while dtype and shape are unchanged, rebuilt from them otherwise."""
    vi = onnx.ValueInfoProto()
    if value.value_info_proto is not None:
        vi.CopyFrom(value.value_info_proto)
    else:
        vi.doc_string = value.doc_string
        for k, v in value.meta.items():
            vi.metadata_props.append(onnx.StringStringEntryProto(key=k, value=v))
    vi.name = value.name
    if value.type_proto is not None and value._declared == (value.dtype, value.shape):
        vi.type.CopyFrom(value.type_proto)
        return vi
    shape = None if value.shape is None else list(value.shape)
    fresh = onnx.helper.make_tensor_type_proto(value.dtype or onnx.TensorProto.UNDEFINED, shape)
    if value.shape is not None:
        for d, dim in zip(value.shape, fresh.tensor_type.shape.dim):
            if d is None:
                dim.Clear()
    vi.type.CopyFrom(fresh)
    return vi


def _tensor_proto(value: Value) -> onnx.TensorProto:
    proto = value.const_proto
    if proto is not None and value._loader is None:
        if proto.name == value.name:
            return proto
        copy = onnx.TensorProto()
        copy.CopyFrom(proto)
        copy.name = value.name
        return copy
    array = value.const
    assert array is not None
    tensor = onnx.numpy_helper.from_array(np.asarray(array, order="C"), value.name)
    if value.dtype and tensor.data_type != value.dtype and proto is not None:
        tensor.data_type = value.dtype  # e.g. bfloat16 stored by numpy as uint16
    return tensor


def _node_proto(op: Op) -> onnx.NodeProto:
    node = onnx.NodeProto()
    node.input.extend(op.inputs)
    node.output.extend(op.outputs)
    node.op_type = op.op_type
    # proto2 fields: assign only what is set, so that untouched nodes serialize identically.
    for field_name in ("domain", "name", "doc_string"):
        if getattr(op, field_name):
            setattr(node, field_name, getattr(op, field_name))
    if op.overload:
        node.overload = op.overload
    for name, value in op.attrs.items():
        if name in op.attr_protos:
            node.attribute.append(op.attr_protos[name])
            continue
        node.attribute.append(_encode_attr(name, value, op.attr_types.get(name)))
    for name, proto in op.attr_protos.items():
        if name not in op.attrs:
            node.attribute.append(proto)
    for k, v in op.meta.items():
        node.metadata_props.append(onnx.StringStringEntryProto(key=k, value=str(v)))
    return node


def _encode_attr(name: str, value: Any, attr_type: int | None) -> onnx.AttributeProto:
    A = onnx.AttributeProto
    if isinstance(value, Graph):
        return onnx.helper.make_attribute(name, _graph_proto(value))
    if isinstance(value, list) and value and isinstance(value[0], Graph):
        return onnx.helper.make_attribute(name, [_graph_proto(g) for g in value])
    if isinstance(value, np.ndarray):
        if value.ndim == 0 or attr_type == A.TENSOR:
            return onnx.helper.make_attribute(name, onnx.numpy_helper.from_array(value))
        value = value.tolist()
    if isinstance(value, (np.integer, np.floating)):
        value = value.item()
    if isinstance(value, tuple):
        value = list(value)
    if attr_type == A.FLOAT and isinstance(value, int):
        value = float(value)
    if attr_type == A.FLOATS and isinstance(value, list):
        value = [float(v) for v in value]
    if isinstance(value, str):
        value = value.encode("utf-8", errors="surrogateescape")
    elif isinstance(value, list) and value and isinstance(value[0], str):
        value = [v.encode("utf-8", errors="surrogateescape") for v in value]
    if attr_type is not None and attr_type != A.UNDEFINED:
        return onnx.helper.make_attribute(name, value, attr_type=attr_type)
    return onnx.helper.make_attribute(name, value)


def weight_bytes(graph: Graph) -> int:
    """Bytes of all constants in the model as stored, subgraphs included: initializers (a sparse
    one as its values plus indices) and the tensors of Constant ops (exporters such as Paddle's
    store every weight that way)."""
    total = 0
    for g in graph.iter_graphs():
        total += sum(_stored_bytes(v) for v in g.values.values() if v.is_const and not v.outer)
        for op in g.ops.values():
            tensor = op.attrs.get("value") if op.op_type == "Constant" else None
            if isinstance(tensor, onnx.TensorProto):
                total += _proto_nbytes(tensor)
    return total


def _stored_bytes(value: Value) -> int:
    sparse = value.sparse_proto
    if sparse is None:
        return value.nbytes
    return sum(_proto_nbytes(t) for t in (sparse.values, sparse.indices))


def _proto_nbytes(tensor: onnx.TensorProto) -> int:
    try:
        itemsize = onnx_to_np_dtype(tensor.data_type).itemsize
    except (KeyError, TypeError, ValueError):
        return 0
    return int(np.prod(tensor.dims, dtype=np.int64)) * itemsize


def save(graph: Graph, path: str | os.PathLike, *, external_data: bool | None = None) -> None:
    """Write the model to `path` atomically (temporary file, then rename).

    Weights go to an external data file `<name>.data` beside it when `external_data` is True, or
    when it is None and the weights exceed what a protobuf can hold.
    """
    path = Path(path)
    folder = path.resolve().parent
    if not folder.is_dir():
        raise UsageError(f"{path}: folder {folder} does not exist")
    if external_data is None:
        external_data = weight_bytes(graph) > EXTERNAL_DATA_THRESHOLD
    data_name = path.name + ".data"
    fd, tmp_model = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    os.close(fd)
    tmp_data = None
    try:
        if external_data:
            fd, tmp_data = tempfile.mkstemp(prefix=f".{data_name}.", suffix=".tmp", dir=folder)
            os.close(fd)
            model = _to_model_external(graph, tmp_data, data_name)
        else:
            model = to_model(graph)
            if model.ByteSize() > 2**31 - 1:
                raise UsageError("model is over 2 GB; save it with external data")
        with open(tmp_model, "wb") as f:
            f.write(model.SerializeToString())
        if tmp_data is not None:
            os.replace(tmp_data, folder / data_name)
            tmp_data = None
        os.replace(tmp_model, path)
    finally:
        for leftover in (tmp_model, tmp_data):
            if leftover and os.path.exists(leftover):
                os.unlink(leftover)


def _to_model_external(graph: Graph, data_path: str, location: str) -> onnx.ModelProto:
    """ModelProto whose large tensors are streamed into `data_path` one at a time, so a model
    far over 2 GB is never held as one message."""
    large: dict[str, Value] = {}
    for g in graph.iter_graphs():
        for value in g.values.values():
            if value.is_const and not value.outer and value.sparse_proto is None \
                    and value.nbytes >= EXTERNAL_TENSOR_MIN_BYTES:
                large[value.name] = value
    # Build the model with tiny placeholders for large tensors, then fill in external refs.
    saved = {name: (v._array, v._proto, v._loader) for name, v in large.items()}
    try:
        for v in large.values():
            v._array, v._proto, v._loader = np.zeros(0, np.uint8), None, None
        model = to_model(graph)
    finally:
        for name, v in large.items():
            v._array, v._proto, v._loader = saved[name]
    offset = 0
    with open(data_path, "wb") as f:
        for tensor in _all_initializers(model.graph):
            value = large.get(tensor.name)
            if value is None:
                continue
            raw = _raw_bytes(value)
            pad = (-offset) % 4096
            f.write(b"\0" * pad)
            offset += pad
            f.write(raw)
            tensor.Clear()
            tensor.name = value.name
            tensor.data_type = value.dtype
            tensor.dims.extend(value.static_shape or ())
            tensor.data_location = onnx.TensorProto.EXTERNAL
            for key, val in (("location", location), ("offset", str(offset)),
                             ("length", str(len(raw)))):
                tensor.external_data.append(onnx.StringStringEntryProto(key=key, value=val))
            offset += len(raw)
    return model


def _all_initializers(gp: onnx.GraphProto):
    yield from gp.initializer
    for node in gp.node:
        for a in node.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                yield from _all_initializers(a.g)
            elif a.type == onnx.AttributeProto.GRAPHS:
                for g in a.graphs:
                    yield from _all_initializers(g)


def _raw_bytes(value: Value) -> bytes | memoryview:
    """Little-endian raw bytes of a constant, without decoding untouched inline protos."""
    proto = value.const_proto
    if proto is not None and value._loader is None and proto.HasField("raw_data"):
        return proto.raw_data
    array = value.const
    assert array is not None
    if array.dtype.byteorder == ">":
        array = array.astype(array.dtype.newbyteorder("<"))
    if value.dtype == onnx.TensorProto.BFLOAT16 and array.dtype == np.uint16:
        return memoryview(np.ascontiguousarray(array)).cast("B")
    tensor = onnx.numpy_helper.from_array(np.ascontiguousarray(array)) if array.dtype.kind not in "biuf" else None
    if tensor is not None:
        return tensor.raw_data
    return memoryview(np.ascontiguousarray(array)).cast("B")
