"""The command line: optimize end to end, and every bad input gives one line and exit 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import helper

from graphopt.cli import main
from oracle import make_model, run_cli, run_ort

LIGHT = os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data", "light")


def small_model() -> onnx.ModelProto:
    nodes = [helper.make_node("Identity", ["x"], ["i"]), helper.make_node("Relu", ["i"], ["y"])]
    return make_model(nodes, [("x", [2, 3])], [("y", [2, 3])])


@pytest.fixture
def model_path(tmp_path):
    path = tmp_path / "in.onnx"
    onnx.save(small_model(), str(path))
    return path


def test_optimize_writes_model_and_report(tmp_path, model_path, capsys):
    out, report = tmp_path / "out.onnx", tmp_path / "report.json"
    code, stdout, _ = run_cli(capsys, "optimize", model_path, "-o", out, "--level", "O1",
                              "--verify", "--report", report)
    assert code == 0
    assert "identities_removed=1" in stdout and "verification (numeric): passed" in stdout
    optimized = onnx.load(str(out))
    onnx.checker.check_model(optimized, full_check=True)
    assert [n.op_type for n in optimized.graph.node] == ["Relu"]
    data = json.loads(report.read_text())
    assert data["ops_before"] == 2 and data["ops_after"] == 1
    assert data["verification"] == {"mode": "numeric", "passed": True, "backend": "onnxruntime",
                                    "note": "", "max_abs_diff": 0.0}
    x = {"x": np.linspace(-1, 1, 6, dtype=np.float32).reshape(2, 3)}
    np.testing.assert_array_equal(run_ort(optimized, x)[0], run_ort(small_model(), x)[0])


def test_optimize_light_resnet50_keeps_outputs(tmp_path, capsys):
    out = tmp_path / "r50.onnx"
    src = os.path.join(LIGHT, "light_resnet50.onnx")
    code, _, err = run_cli(capsys, "optimize", src, "-o", out)
    assert code == 0, err
    x = {"gpu_0/data_0": np.random.default_rng(1).standard_normal((1, 3, 224, 224)).astype(np.float32)}
    np.testing.assert_allclose(run_ort(onnx.load(str(out)), x)[0],
                               run_ort(onnx.load(src), x)[0], rtol=1e-5, atol=1e-6)


def _assert_clean_failure(code, stdout, stderr, out_path):
    assert code == 2
    lines = [line for line in stderr.strip().splitlines() if line]
    assert len(lines) == 1 and lines[0].startswith("graphopt: error:"), stderr
    assert "Traceback" not in stderr
    assert not out_path.exists()
    assert not [p for p in out_path.parent.iterdir() if p.name.startswith(f".{out_path.name}")]


def test_missing_input_file(tmp_path, capsys):
    out = tmp_path / "out.onnx"
    code, o, e = run_cli(capsys, "optimize", tmp_path / "nope.onnx", "-o", out)
    _assert_clean_failure(code, o, e, out)
    assert "no such file" in e


def test_not_an_onnx_file(tmp_path, capsys):
    src, out = tmp_path / "text.onnx", tmp_path / "out.onnx"
    src.write_text("hello, I am a text file\n")
    code, o, e = run_cli(capsys, "optimize", src, "-o", out)
    _assert_clean_failure(code, o, e, out)
    assert "not" in e and "ONNX" in e


@pytest.mark.parametrize("fraction", [0.1, 0.5, 0.9, 0.99])
def test_truncated_protobuf(tmp_path, capsys, fraction):
    data = onnx.load(os.path.join(LIGHT, "light_squeezenet.onnx")).SerializeToString()
    src, out = tmp_path / "cut.onnx", tmp_path / "out.onnx"
    src.write_bytes(data[: int(len(data) * fraction)])
    code, o, e = run_cli(capsys, "optimize", src, "-o", out)
    _assert_clean_failure(code, o, e, out)


@pytest.mark.parametrize("field", ["ir_version", "opset"])
def test_too_new_ir_or_opset(tmp_path, capsys, field):
    model = small_model()
    if field == "ir_version":
        model.ir_version = onnx.IR_VERSION + 5
    else:
        model.opset_import[0].version = onnx.defs.onnx_opset_version() + 3
    src, out = tmp_path / "new.onnx", tmp_path / "out.onnx"
    src.write_bytes(model.SerializeToString())
    code, o, e = run_cli(capsys, "optimize", src, "-o", out)
    _assert_clean_failure(code, o, e, out)
    assert ("IR version" in e) if field == "ir_version" else ("opset" in e)


def test_output_folder_missing(tmp_path, model_path, capsys):
    out = tmp_path / "no" / "such" / "dir" / "out.onnx"
    code, o, e = run_cli(capsys, "optimize", model_path, "-o", out)
    assert code == 2 and "does not exist" in e and len(e.strip().splitlines()) == 1
    assert not out.exists()


def test_output_equal_to_input_needs_force(model_path, capsys):
    before = model_path.read_bytes()
    code, o, e = run_cli(capsys, "optimize", model_path, "-o", model_path)
    assert code == 2 and "--force" in e and len(e.strip().splitlines()) == 1
    assert model_path.read_bytes() == before
    code, _, _ = run_cli(capsys, "optimize", model_path, "-o", model_path, "--force", "--level", "O1")
    assert code == 0
    assert [n.op_type for n in onnx.load(str(model_path)).graph.node] == ["Relu"]


def test_crash_mid_write_leaves_no_partial_output(tmp_path, model_path, capsys, monkeypatch):
    out = tmp_path / "out.onnx"
    real_write = type(onnx.ModelProto()).SerializeToString

    def explode(self, *a, **k):
        raise OSError("simulated disk failure")
    monkeypatch.setattr(type(onnx.ModelProto()), "SerializeToString", explode)
    try:
        code, o, e = run_cli(capsys, "optimize", model_path, "-o", out, "--level", "O1")
    finally:
        monkeypatch.setattr(type(onnx.ModelProto()), "SerializeToString", real_write)
    assert code == 1 and "simulated disk failure" in e
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.onnx"]


def test_unknown_level_is_usage_error(model_path, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["optimize", str(model_path), "-o", str(tmp_path / "o.onnx"), "--level", "O9"])
    assert exc.value.code == 2


def test_console_script_version_and_help():
    exe = [sys.executable, "-m", "graphopt.cli"]
    version = subprocess.run(exe + ["--version"], capture_output=True, text=True)
    assert version.returncode == 0 and version.stdout.startswith("graphopt ")
    helptext = subprocess.run(exe + ["--help"], capture_output=True, text=True)
    assert helptext.returncode == 0 and "optimize" in helptext.stdout


def test_bad_input_via_real_process(tmp_path):
    """The installed entry point, not just main(): one line on stderr and exit 2."""
    src = tmp_path / "junk.onnx"
    src.write_bytes(os.urandom(300))
    proc = subprocess.run([sys.executable, "-m", "graphopt.cli", "optimize", str(src), "-o",
                           str(tmp_path / "o.onnx")], capture_output=True, text=True)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr


def test_models_list_and_build(tmp_path, capsys):
    code, out, _ = run_cli(capsys, "models", "list")
    names = [line.split()[0] for line in out.strip().splitlines()]
    assert code == 0
    for name in ("dlrm", "resnext", "shufflenet", "transformer", "seq2seq-step", "minilm",
                 "digits-mlp", "ppocr-det", "ppocr-rec", "ppocr-cls"):
        assert name in names
    target = tmp_path / "s.onnx"
    code, out, _ = run_cli(capsys, "models", "build", "shufflenet", "--size", "small", "-o", target)
    assert code == 0
    onnx.checker.check_model(onnx.load(str(target)), full_check=True)
    code, _, err = run_cli(capsys, "models", "build", "shufflenet", "-o", target)
    assert code == 2 and "--force" in err


def test_models_build_unknown_name(tmp_path, capsys):
    code, _, err = run_cli(capsys, "models", "build", "nope", "-o", tmp_path / "x.onnx")
    assert code == 2 and "unknown model" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x.onnx").exists()


def test_demo_shows_passes_decisions_and_both_backends(tmp_path, capsys):
    code, out, err = run_cli(capsys, "demo", "--size", "small", "--runs", "2", "--keep", tmp_path)
    assert code == 0, err
    for text in ("what the passes did:", "batchnorms_folded", "per-node decisions:",
                 "graphopt    after", "onnxruntime after", "accuracy of AFTER vs BEFORE",
                 "numeric verification after every pass on onnxruntime: passed"):
        assert text in out, text
    after = onnx.load(str(tmp_path / "after.onnx"))
    assert "BatchNormalization" not in {n.op_type for n in after.graph.node}
