"""Lossless load/save: every model-level feature graphopt must carry through unchanged."""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import graphopt
from graphopt import onnx_io
from graphopt.errors import InvalidModelError
from oracle import make_model, run_ort


def rich_model() -> onnx.ModelProto:
    """A model with a custom-domain op, a model-local function, metadata everywhere, doc strings,
    value_info, a sparse initializer and symbolic dims."""
    fn = helper.make_function("local.fn", "AddTwice", ["a", "b"], ["c"],
                              [helper.make_node("Add", ["a", "b"], ["t"]),
                               helper.make_node("Add", ["t", "b"], ["c"])],
                              [helper.make_opsetid("", 17)])
    relu = helper.make_node("Relu", ["x"], ["r"], name="relu0", doc_string="the relu")
    relu.metadata_props.append(onnx.StringStringEntryProto(key="origin", value="layer1"))
    nodes = [relu,
             helper.make_node("AddTwice", ["r", "s"], ["f"], domain="local.fn", name="fn0"),
             helper.make_node("Mystery", ["f"], ["y"], domain="com.example", name="custom0",
                              color="blue", gain=2.5, taps=[1, 2, 3])]
    sparse = helper.make_sparse_tensor(
        helper.make_tensor("s", TensorProto.FLOAT, [2], [5.0, 7.0]),
        helper.make_tensor("s_idx", TensorProto.INT64, [2], [1, 4]), [6])
    graph = helper.make_graph(
        nodes, "rich",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 6])],
        sparse_initializer=[sparse],
        value_info=[helper.make_tensor_value_info("r", TensorProto.FLOAT, ["batch", 6])],
        doc_string="graph doc")
    model = helper.make_model(graph, functions=[fn], doc_string="model doc",
                              opset_imports=[helper.make_opsetid("", 17),
                                             helper.make_opsetid("local.fn", 1),
                                             helper.make_opsetid("com.example", 3)],
                              producer_name="test-producer", ir_version=8)
    helper.set_model_props(model, {"author": "graphopt tests", "license": "MIT"})
    return model


def test_rich_model_round_trips_field_by_field():
    model = rich_model()
    saved = graphopt.to_model(graphopt.load(model))
    assert [(o.domain, o.version) for o in saved.opset_import] == \
        [(o.domain, o.version) for o in model.opset_import]
    assert saved.functions[0].SerializeToString() == model.functions[0].SerializeToString()
    assert {p.key: p.value for p in saved.metadata_props} == {"author": "graphopt tests",
                                                              "license": "MIT"}
    assert saved.doc_string == "model doc" and saved.graph.doc_string == "graph doc"
    assert saved.producer_name == "test-producer"
    nodes = {n.name: n for n in saved.graph.node}
    assert nodes["relu0"].doc_string == "the relu"
    assert {p.key: p.value for p in nodes["relu0"].metadata_props} == {"origin": "layer1"}
    assert nodes["custom0"].SerializeToString() == model.graph.node[2].SerializeToString()
    assert saved.graph.sparse_initializer[0].SerializeToString() == \
        model.graph.sparse_initializer[0].SerializeToString()
    assert saved.graph.value_info[0].SerializeToString() == model.graph.value_info[0].SerializeToString()
    assert saved.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"


def test_sparse_initializer_densifies_on_demand():
    g = graphopt.load(rich_model())
    np.testing.assert_array_equal(g.values["s"].const, [0, 5, 0, 0, 7, 0])


def test_weight_bytes_counts_a_sparse_initializer_as_stored():
    from graphopt.onnx_io import weight_bytes
    g = graphopt.load(rich_model())
    assert weight_bytes(g) == 2 * 4 + 2 * 8          # two float32 values, two int64 indices
    assert g.values["s"].const.nbytes == 6 * 4       # decoding it does not change what is stored
    assert weight_bytes(g) == 2 * 4 + 2 * 8


def test_sparse_constant_node_loads_as_sparse_data_and_saves_back_unchanged():
    """A Constant holding only a sparse_value is loaded as a sparse constant (not an op, not
    densified) and written back as that same node, so the file stays strictly valid."""
    holder = helper.make_node("Constant", [], ["s"], name="holder", doc_string="sparse weights",
                              sparse_value=helper.make_sparse_tensor(
                                  helper.make_tensor("s", TensorProto.FLOAT, [2], [5.0, 7.0]),
                                  helper.make_tensor("s_idx", TensorProto.INT64, [2], [1, 4]), [6]))
    graph = helper.make_graph([holder, helper.make_node("Add", ["x", "s"], ["y"], name="add")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [6])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    g = graphopt.load(model)
    assert g.count_ops() == 1 and g.values["s"].sparse_proto is not None
    assert onnx_io.weight_bytes(g) == 2 * 4 + 2 * 8
    saved = graphopt.to_model(g)
    assert saved.graph.node[0].SerializeToString() == holder.SerializeToString()
    assert not saved.graph.sparse_initializer
    onnx.checker.check_model(saved, full_check=True)
    feeds = {"x": np.ones(6, np.float32)}
    np.testing.assert_array_equal(run_ort(saved, feeds)[0], [1, 6, 1, 1, 8, 1])
    np.testing.assert_array_equal(g.values["s"].const, [0, 5, 0, 0, 7, 0])


def test_function_model_runs_the_same_in_onnxruntime():
    fn = helper.make_function("local.fn", "AddTwice", ["a", "b"], ["c"],
                              [helper.make_node("Add", ["a", "b"], ["t"]),
                               helper.make_node("Add", ["t", "b"], ["c"])],
                              [helper.make_opsetid("", 17)])
    graph = helper.make_graph([helper.make_node("AddTwice", ["x", "w"], ["y"], domain="local.fn")],
                              "f", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3])],
                              [onnx.numpy_helper.from_array(np.arange(3, dtype=np.float32), "w")])
    model = helper.make_model(graph, functions=[fn], ir_version=8,
                              opset_imports=[helper.make_opsetid("", 17),
                                             helper.make_opsetid("local.fn", 1)])
    saved = graphopt.to_model(graphopt.load(model))
    onnx.checker.check_model(saved, full_check=True)
    feeds = {"x": np.ones(3, np.float32)}
    np.testing.assert_array_equal(run_ort(saved, feeds)[0], [1, 3, 5])


def _weights_model(n: int = 4096) -> onnx.ModelProto:
    w = np.arange(n, dtype=np.float32).reshape(64, n // 64)
    return make_model([helper.make_node("MatMul", ["x", "w"], ["y"])], [("x", [1, 64])],
                      [("y", [1, n // 64])], [("w", w)])


def test_external_data_is_memory_mapped_and_saved_again(tmp_path):
    model = _weights_model()
    expected_w = onnx.numpy_helper.to_array(model.graph.initializer[0])
    feeds = {"x": np.ones((1, 64), np.float32)}
    expected_y = run_ort(model, feeds)[0]
    src = tmp_path / "ext.onnx"
    onnx.save_model(onnx.ModelProto.FromString(model.SerializeToString()), str(src), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="ext.bin", size_threshold=0)
    g = graphopt.load(src)
    w = g.values["w"].const
    assert isinstance(w, np.memmap)
    np.testing.assert_array_equal(w, expected_w)
    out = tmp_path / "copy.onnx"
    graphopt.save(g, out, external_data=True)
    assert (tmp_path / "copy.onnx.data").stat().st_size >= w.nbytes
    reloaded = onnx.load(str(out), load_external_data=False)
    assert reloaded.graph.initializer[0].data_location == TensorProto.EXTERNAL
    onnx.checker.check_model(str(out), full_check=True)
    np.testing.assert_array_equal(run_ort(onnx.load(str(out)), feeds)[0], expected_y)


def test_large_models_switch_to_external_data(tmp_path, monkeypatch):
    monkeypatch.setattr(onnx_io, "EXTERNAL_DATA_THRESHOLD", 1000)
    g = graphopt.load(_weights_model())
    graphopt.save(g, tmp_path / "big.onnx")
    assert (tmp_path / "big.onnx.data").exists()
    assert onnx.load(str(tmp_path / "big.onnx"), load_external_data=False) \
        .graph.initializer[0].data_location == TensorProto.EXTERNAL


def test_missing_external_file_is_a_clear_error(tmp_path):
    src = tmp_path / "ext.onnx"
    onnx.save_model(_weights_model(), str(src), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="gone.bin", size_threshold=0)
    os.unlink(tmp_path / "gone.bin")
    g = graphopt.load(src)
    with pytest.raises(InvalidModelError, match="missing"):
        g.values["w"].const


@pytest.mark.parametrize("mutate,message", [
    (lambda m: setattr(m, "ir_version", onnx.IR_VERSION + 1), "IR version"),
    (lambda m: m.opset_import[0].__setattr__("version", onnx.defs.onnx_opset_version() + 1), "opset"),
])
def test_too_new_models_are_refused(mutate, message):
    model = _weights_model(128)
    mutate(model)
    with pytest.raises(InvalidModelError, match=message):
        graphopt.load(model)


@pytest.mark.parametrize("cut", [0.3, 0.6, 0.97])
def test_truncated_protobuf_is_refused(tmp_path, cut):
    data = _weights_model().SerializeToString()
    path = tmp_path / "cut.onnx"
    path.write_bytes(data[: int(len(data) * cut)])
    with pytest.raises(InvalidModelError):
        graphopt.load(path)


def test_text_file_is_refused(tmp_path):
    path = tmp_path / "notes.onnx"
    path.write_text("this is not a model\n" * 10)
    with pytest.raises(InvalidModelError):
        graphopt.load(path)


def test_wrong_initializer_size_is_refused():
    model = _weights_model(128)
    model.graph.initializer[0].raw_data = model.graph.initializer[0].raw_data[:-8]
    with pytest.raises(InvalidModelError, match="bytes"):
        graphopt.load(model)


def test_save_is_atomic_when_serialization_fails(tmp_path, monkeypatch):
    g = graphopt.load(_weights_model(128))
    out = tmp_path / "out.onnx"

    def boom(graph):
        raise RuntimeError("disk on fire")
    monkeypatch.setattr(onnx_io, "to_model", boom)
    with pytest.raises(RuntimeError):
        graphopt.save(g, out)
    assert list(tmp_path.iterdir()) == []
