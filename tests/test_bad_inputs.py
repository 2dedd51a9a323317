"""The bad-input corpus: every broken model gives one clear line and exit 2; every valid but
unusual model comes out valid and equivalent. Nothing prints a traceback or leaves a partial
output file."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from graphopt.cli import main
from oracle import make_model

LEVELS = ("O1", "O2", "O3")


def optimize_cli(capsys, tmp_path, model_or_bytes, level="O2") -> tuple[int, str, str, object]:
    src = tmp_path / "in.onnx"
    out = tmp_path / "out.onnx"
    data = model_or_bytes if isinstance(model_or_bytes, bytes) else model_or_bytes.SerializeToString()
    src.write_bytes(data)
    code = main(["optimize", str(src), "-o", str(out), "--level", level, "--quiet"])
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert not leftovers, f"temporary files left behind: {leftovers}"
    if code != 0:
        assert not out.exists()
        lines = captured.err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("graphopt: error:"), captured.err
    return code, captured.out, captured.err, out


def conv_model(opset: int = 17) -> onnx.ModelProto:
    w = np.random.default_rng(0).standard_normal((4, 3, 3, 3)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("Transpose", ["r"], ["t"], perm=[0, 2, 3, 1]),
             helper.make_node("Transpose", ["t"], ["t2"], perm=[0, 3, 1, 2]),
             helper.make_node("Reshape", ["t2", "shape"], ["y"])]
    model = make_model(nodes, [("x", [1, 3, 8, 8])], [("y", [1, 256])],
                       [("w", w), ("shape", np.array([1, 256], np.int64))], opset=opset)
    model.ir_version = helper.find_min_ir_version_for([helper.make_opsetid("", opset)])
    if model.ir_version < 4:  # IR 3 requires every initializer to be listed as an input
        for init in model.graph.initializer:
            model.graph.input.append(helper.make_tensor_value_info(init.name, init.data_type, init.dims))
    return model


# -- broken models: exit 2 ---------------------------------------------------------------------
def test_cycle(capsys, tmp_path):
    nodes = [helper.make_node("Add", ["x", "b"], ["a"]), helper.make_node("Relu", ["a"], ["b"])]
    code, _, err, _ = optimize_cli(capsys, tmp_path, make_model(nodes, [("x", [2])], [("b", [2])]))
    assert code == 2 and "cycle" in err


def test_input_produced_by_nothing(capsys, tmp_path):
    nodes = [helper.make_node("Add", ["x", "ghost"], ["y"])]
    code, _, err, _ = optimize_cli(capsys, tmp_path, make_model(nodes, [("x", [2])], [("y", [2])]))
    assert code == 2 and "ghost" in err


def test_duplicate_output_names(capsys, tmp_path):
    nodes = [helper.make_node("Relu", ["x"], ["y"]), helper.make_node("Neg", ["x"], ["y"])]
    code, _, err, _ = optimize_cli(capsys, tmp_path, make_model(nodes, [("x", [2])], [("y", [2])]))
    assert code == 2 and "produced twice" in err


def test_graph_output_that_nothing_produces(capsys, tmp_path):
    nodes = [helper.make_node("Relu", ["x"], ["y"])]
    code, _, err, _ = optimize_cli(capsys, tmp_path,
                                   make_model(nodes, [("x", [2])], [("y", [2]), ("nowhere", [2])]))
    assert code == 2 and "nowhere" in err


def test_duplicate_graph_inputs(capsys, tmp_path):
    nodes = [helper.make_node("Relu", ["x"], ["y"])]
    code, _, err, _ = optimize_cli(capsys, tmp_path,
                                   make_model(nodes, [("x", [2]), ("x", [2])], [("y", [2])]))
    assert code == 2 and "twice" in err


def test_wrong_initializer_size(capsys, tmp_path):
    model = conv_model()
    model.graph.initializer[0].raw_data = model.graph.initializer[0].raw_data[:-12]
    code, _, err, _ = optimize_cli(capsys, tmp_path, model)
    assert code == 2 and "'w'" in err


@pytest.mark.parametrize("seed", range(12))
def test_corrupted_bytes(capsys, tmp_path, seed):
    """Random byte flips: either a clear refusal (2) or, when the flip only touched data, a valid
    optimized model (0). Never a crash."""
    data = bytearray(conv_model().SerializeToString())
    rng = np.random.default_rng(seed)
    for pos in rng.integers(0, len(data), size=3):
        data[pos] = (data[pos] + int(rng.integers(1, 256))) % 256
    code, _, err, out = optimize_cli(capsys, tmp_path, bytes(data))
    assert code in (0, 2), err
    if code == 0:
        onnx.checker.check_model(onnx.load(str(out)))


def test_empty_file(capsys, tmp_path):
    code, _, err, _ = optimize_cli(capsys, tmp_path, b"")
    assert code == 2 and "not an ONNX model" in err


# -- valid but unusual: exit 0, equivalent model -----------------------------------------------
def _outputs(model: onnx.ModelProto, feeds):
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def test_unknown_op_in_default_domain_passes_through(capsys, tmp_path):
    unknown = helper.make_node("FancyNewOp", ["r"], ["y"], alpha=0.5)
    nodes = [helper.make_node("Identity", ["x"], ["i"]), helper.make_node("Relu", ["i"], ["r"]),
             unknown]
    model = make_model(nodes, [("x", [2])], [("y", [2])])
    code, _, err, out = optimize_cli(capsys, tmp_path, model)
    assert code == 0, err
    saved = onnx.load(str(out))
    assert [n.op_type for n in saved.graph.node] == ["Relu", "FancyNewOp"]
    assert saved.graph.node[1].SerializeToString() == unknown.SerializeToString()


@pytest.mark.parametrize("level", LEVELS)
def test_custom_domain_ops_pass_through_untouched(capsys, tmp_path, level):
    custom = [helper.make_node("Scramble", ["x"], ["s"], domain="com.example", key=7),
              helper.make_node("Scramble", ["x"], ["s2"], domain="com.example", key=7)]
    nodes = custom + [helper.make_node("Add", ["s", "s2"], ["y"]),
                      helper.make_node("Unused", ["x"], ["dead"], domain="com.example")]
    model = make_model(nodes, [("x", [2])], [("y", [2])], domains={"com.example": 1})
    code, _, err, out = optimize_cli(capsys, tmp_path, model, level)
    assert code == 0, err
    saved = onnx.load(str(out))
    kept = [n for n in saved.graph.node if n.domain == "com.example"]
    assert len(kept) == 3  # not merged by CSE, not removed as dead code
    assert [n.SerializeToString() for n in kept] == [n.SerializeToString() for n in custom + [nodes[3]]]


@pytest.mark.parametrize("opset", range(7, onnx.defs.onnx_opset_version() + 1))
def test_every_opset_from_7(capsys, tmp_path, opset):
    model = conv_model(opset)
    onnx.checker.check_model(model)
    code, _, err, out = optimize_cli(capsys, tmp_path, model)
    assert code == 0, err
    saved = onnx.load(str(out))
    onnx.checker.check_model(saved, full_check=True)
    assert saved.opset_import[0].version == opset
    feeds = {"x": np.random.default_rng(1).standard_normal((1, 3, 8, 8)).astype(np.float32)}
    try:
        expected = _outputs(model, feeds)
    except Exception:
        return  # this onnxruntime cannot run the opset; the checker result above stands
    np.testing.assert_allclose(_outputs(saved, feeds)[0], expected[0], rtol=1e-5, atol=1e-6)


def test_empty_graph(capsys, tmp_path):
    model = make_model([], [("x", [2, 2])], [("x", [2, 2])])
    code, _, err, out = optimize_cli(capsys, tmp_path, model)
    assert code == 0, err
    saved = onnx.load(str(out))
    assert len(saved.graph.node) == 0 and saved.graph.output[0].name == "x"


def test_graph_output_that_is_also_an_input(capsys, tmp_path):
    nodes = [helper.make_node("Identity", ["x"], ["i"]), helper.make_node("Relu", ["i"], ["y"])]
    model = make_model(nodes, [("x", [3])], [("y", [3]), ("x", [3])])
    code, _, err, out = optimize_cli(capsys, tmp_path, model)
    assert code == 0, err
    saved = onnx.load(str(out))
    assert [o.name for o in saved.graph.output] == ["y", "x"]
    x = np.array([-1, 0, 1], np.float32)
    got = _outputs(saved, {"x": x})
    np.testing.assert_array_equal(got[0], [0, 0, 1])
    np.testing.assert_array_equal(got[1], x)


def test_zero_sized_tensors(capsys, tmp_path):
    nodes = [helper.make_node("Transpose", ["x"], ["t"], perm=[1, 0]),
             helper.make_node("Transpose", ["t"], ["t2"], perm=[1, 0]),
             helper.make_node("Relu", ["t2"], ["r"]),
             helper.make_node("Concat", ["r", "x"], ["y"], axis=0)]
    model = make_model(nodes, [("x", [0, 3])], [("y", [0, 3])])
    code, _, err, out = optimize_cli(capsys, tmp_path, model)
    assert code == 0, err
    saved = onnx.load(str(out))
    onnx.checker.check_model(saved, full_check=True)
    got = _outputs(saved, {"x": np.zeros((0, 3), np.float32)})
    assert got[0].shape == (0, 3)


def test_initializer_with_input_default_is_not_folded(capsys, tmp_path):
    """An initializer that is also a graph input is a default the user may override."""
    nodes = [helper.make_node("Add", ["x", "bias"], ["y"])]
    model = make_model(nodes, [("x", [2]), ("bias", [2])], [("y", [2])],
                       [("bias", np.ones(2, np.float32))])
    code, _, err, out = optimize_cli(capsys, tmp_path, model)
    assert code == 0, err
    got = _outputs(onnx.load(str(out)), {"x": np.zeros(2, np.float32),
                                          "bias": np.full(2, 5, np.float32)})
    np.testing.assert_array_equal(got[0], [5, 5])
