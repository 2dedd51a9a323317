"""`graphopt analyze`: the text report, the JSON contract, --shape/--input/--target/--plot, and
--measure against the graphopt runtime."""

from __future__ import annotations

import importlib.util
import json
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphopt import machine as machine_module
from oracle import run_cli

F = TensorProto.FLOAT


@pytest.fixture(autouse=True)
def fixed_machine(monkeypatch, tmp_path):
    """No micro-benchmark and no writes to the user's cache: fixed peaks, cache in tmp."""
    monkeypatch.setenv("GRAPHOPT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(machine_module, "measure_peaks",
                        lambda: {"fp32_flops": 50e9, "bandwidth": 10e9, "op_overhead": 1e-6})


def conv_model(batch="N") -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32), "w")
    b = numpy_helper.from_array(np.zeros(8, np.float32), "b")
    fc = numpy_helper.from_array(rng.standard_normal((8, 4)).astype(np.float32), "fc")
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1], name="conv"),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("GlobalAveragePool", ["r"], ["p"], name="pool"),
             helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
             helper.make_node("MatMul", ["f", "fc"], ["y"], name="fc")]
    graph = helper.make_graph(nodes, "small", [helper.make_tensor_value_info("x", F, [batch, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", F, [batch, 4])], [w, b, fc])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.fixture
def model_path(tmp_path):
    path = tmp_path / "small.onnx"
    onnx.save(conv_model(), str(path))
    return path


def test_text_report_and_json_contract(tmp_path, model_path, capsys):
    out = tmp_path / "a.json"
    code, stdout, _ = run_cli(capsys, "analyze", model_path, "--shape", "x=2,3,8,8", "--json", out)
    assert code == 0
    assert "characterization" in stdout and "op intensity w.r.t. weights" in stdout
    assert "top 5 ops by predicted time" in stdout and "conv" in stdout
    data = json.loads(out.read_text())
    assert data["schema"] == 1
    model = data["model"]
    conv_flops = 2 * (2 * 64) * 8 * 27 + 2 * 8 * 64
    fc_flops = 2 * 2 * 4 * 8
    relu, pool = 2 * 8 * 64, 2 * 8 * 64
    assert model["flops"] == conv_flops + fc_flops + relu + pool
    assert model["params"] == 8 * 27 + 8 + 32
    assert model["weight_bytes"] == (8 * 27 + 8 + 32) * 4
    assert isinstance(model["max_live_activation_bytes"], int)
    assert model["max_live_activation_source"] == "static"
    assert model["input_shapes"] == {"x": [2, 3, 8, 8]}
    ch = model["characterization"]
    assert ch["gemm_ops"] == 2 and 0 < ch["min_intensity_weights"] <= ch["avg_intensity_weights"]
    assert {"cpu", "isa", "fp32_gflops", "bandwidth_gbs", "int8_relative"} <= set(data["machine"])
    ops = {o["name"]: o for o in data["ops"]}
    assert list(ops) == ["conv", "relu", "pool", "flatten", "fc"]
    conv = ops["conv"]
    assert conv["gemm"] == {"M": 128, "N": 8, "K": 27, "groups": 1}
    assert conv["flops"] == conv_flops
    assert conv["weight_bytes"] == (8 * 27 + 8) * 4
    assert conv["activation_bytes"] == (2 * 3 * 64 + 2 * 8 * 64) * 4
    assert conv["bound"] in ("compute", "memory") and conv["predicted_ms"] > 0
    assert ops["relu"]["gemm"] is None and ops["relu"]["intensity_weights"] is None
    assert ops["fc"]["gemm"] == {"M": 2, "N": 4, "K": 8, "groups": 1}
    for o in data["ops"]:
        assert {"name", "op_type", "flops", "weight_bytes", "activation_bytes",
                "intensity_weights", "intensity_total", "gemm", "bound", "predicted_ms"} <= set(o)
    assert data["measure"] is None
    assert {r["op_type"] for r in data["op_types"]} == {"Conv", "Relu", "GlobalAveragePool",
                                                         "Flatten", "MatMul"}


def test_dynamic_input_without_shape_is_a_usage_error(model_path, capsys):
    code, _, err = run_cli(capsys, "analyze", model_path)
    assert code == 2
    assert err.strip().splitlines()[-1] == ("graphopt: error: input 'x' has dynamic shape "
                                            "[N,3,8,8]; pin it with --shape x=N,3,8,8")


@pytest.mark.parametrize("option", ["x", "x=", "x=1,a", "=1,2", "x=-1,3"])
def test_bad_shape_option(model_path, capsys, option):
    code, _, err = run_cli(capsys, "analyze", model_path, "--shape", option)
    assert code == 2 and "expected NAME=D0,D1" in err


def test_unknown_input_name(model_path, capsys):
    code, _, err = run_cli(capsys, "analyze", model_path, "--shape", "y=1,3,8,8")
    assert code == 2 and "no graph input named 'y' (inputs: x)" in err


def test_example_input_fixes_the_shape(tmp_path, model_path, capsys):
    np.save(tmp_path / "x.npy", np.zeros((3, 3, 8, 8), np.float32))
    out = tmp_path / "a.json"
    code, _, _ = run_cli(capsys, "analyze", model_path, "--input", f"x={tmp_path / 'x.npy'}",
                         "--json", out, "--top", "0")
    assert code == 0
    assert json.loads(out.read_text())["model"]["input_shapes"] == {"x": [3, 3, 8, 8]}
    code, _, err = run_cli(capsys, "analyze", model_path, "--input", "x=/nonexistent.npy")
    assert code == 2 and "no such file /nonexistent.npy" in err


def test_target_models_another_cpu(tmp_path, model_path, capsys):
    out = tmp_path / "a.json"
    code, stdout, _ = run_cli(capsys, "analyze", model_path, "--shape", "x=1,3,8,8",
                              "--target", "avx512-vnni", "--json", out)
    assert code == 0 and "modeled (avx512-vnni)" in stdout
    m = json.loads(out.read_text())["machine"]
    assert m["isa"] == "avx512-vnni" and m["int8_relative"]["int8_acc32"] == 4.0
    code, _, err = run_cli(capsys, "analyze", model_path, "--target", "sparc")
    assert code == 2 and "unknown --target 'sparc'" in err


def test_missing_model_file(capsys, tmp_path):
    code, _, err = run_cli(capsys, "analyze", tmp_path / "nope.onnx")
    assert code == 2 and "no such file" in err


def test_plot_without_matplotlib_names_the_extra(model_path, capsys, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    code, _, err = run_cli(capsys, "analyze", model_path, "--shape", "x=1,3,8,8",
                           "--plot", tmp_path / "r.png")
    assert code == 2 and "pip install graphopt[plot]" in err
    assert not (tmp_path / "r.png").exists()


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None, reason="matplotlib absent")
def test_plot_writes_png(model_path, capsys, tmp_path):
    png = tmp_path / "r.png"
    code, _, _ = run_cli(capsys, "analyze", model_path, "--shape", "x=1,3,8,8", "--plot", png)
    assert code == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _runtime_runs_small_model() -> bool:
    """Whether the graphopt runtime (written concurrently) can run `conv_model` yet."""
    try:
        from graphopt.runtime import Session  # noqa: F401
        from graphopt.runtime.kernels import registry
    except ImportError:
        return False
    needed = ("Conv", "Relu", "GlobalAveragePool", "Flatten", "MatMul")
    return all(("", op) in registry.registered_ops() for op in needed)


@pytest.mark.skipif(not _runtime_runs_small_model(),
                    reason="the graphopt runtime cannot run Conv/MatMul models yet")
def test_measure_reports_per_op_times(model_path, capsys, tmp_path):
    out = tmp_path / "a.json"
    code, stdout, _ = run_cli(capsys, "analyze", model_path, "--shape", "x=1,3,8,8", "--measure",
                              "--runs", "2", "--json", out)
    assert code == 0 and "meas ms" in stdout and "Spearman" in stdout
    data = json.loads(out.read_text())
    assert data["measure"]["runs"] == 2 and data["measure"]["ops_compared"] == 5
    assert data["model"]["max_live_activation_source"] == "runtime"
    assert all(o["measured_ms"] is not None and o["measured_ms"] >= 0 for o in data["ops"])
    assert sum(r["count"] for r in data["op_types"]) == 5


def range_model() -> onnx.ModelProto:
    """y = r * r with r = Range(0, len(x)): a data-dependent shape onnx inference cannot see."""
    zero = numpy_helper.from_array(np.array(0, np.int64), "zero")
    one = numpy_helper.from_array(np.array(1, np.int64), "one")
    nodes = [helper.make_node("Shape", ["x"], ["s"], name="shape"),
             helper.make_node("Gather", ["s", "zero"], ["n"], axis=0, name="len"),
             helper.make_node("Range", ["zero", "n", "one"], ["r"], name="range"),
             helper.make_node("Cast", ["r"], ["f"], to=TensorProto.FLOAT, name="cast"),
             helper.make_node("Mul", ["f", "f"], ["y"], name="square")]
    graph = helper.make_graph(nodes, "range", [helper.make_tensor_value_info("x", F, ["N", 4])],
                              [helper.make_tensor_value_info("y", F, None)], [zero, one])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.skipif(not _runtime_runs_small_model(),
                    reason="the graphopt runtime cannot run Conv/MatMul models yet")
def test_data_dependent_shapes_come_from_a_run_on_the_example_input(tmp_path, capsys):
    path = tmp_path / "range.onnx"
    onnx.save(range_model(), str(path))
    np.save(tmp_path / "x.npy", np.zeros((7, 4), np.float32))
    out = tmp_path / "a.json"
    code, _, _ = run_cli(capsys, "analyze", path, "--shape", "x=7,4", "--json", out)
    assert code == 0
    square = {o["name"]: o for o in json.loads(out.read_text())["ops"]}["square"]
    assert not square["known"] and square["flops"] == 0     # shapes alone cannot tell
    code, _, _ = run_cli(capsys, "analyze", path, "--input", f"x={tmp_path / 'x.npy'}",
                         "--json", out)
    assert code == 0
    square = {o["name"]: o for o in json.loads(out.read_text())["ops"]}["square"]
    assert square["known"] and square["flops"] == 7 and square["output_bytes"] == 28
