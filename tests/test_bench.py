"""`graphopt bench`: the JSON contract and internal consistency of its numbers."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import helper

import graphopt
from graphopt.bench import class_score_view, compare, compare_accuracy
from graphopt.cli import main
from oracle import make_model

N = 256


def fast_model() -> onnx.ModelProto:
    nodes = [helper.make_node("Add", ["x", "b"], ["a"]), helper.make_node("Relu", ["a"], ["y"])]
    return make_model(nodes, [("x", [N, N])], [("y", [N, N])],
                      [("b", np.full((N,), 0.5, np.float32))])


def slow_model(extra: int = 40) -> onnx.ModelProto:
    """Same outputs as fast_model, plus a long chain of work whose result is multiplied by 0."""
    nodes = [helper.make_node("Add", ["x", "b"], ["a"])]
    prev = "x"
    for i in range(extra):
        nodes.append(helper.make_node("Tanh", [prev], [f"t{i}"]))
        prev = f"t{i}"
    nodes += [helper.make_node("Mul", [prev, "zero"], ["z"]),
              helper.make_node("Add", ["a", "z"], ["a2"]),
              helper.make_node("Relu", ["a2"], ["y"])]
    return make_model(nodes, [("x", [N, N])], [("y", [N, N])],
                      [("b", np.full((N,), 0.5, np.float32)), ("zero", np.zeros((1,), np.float32))])


def feeds():
    return {"x": np.random.default_rng(0).standard_normal((N, N)).astype(np.float32)}


@pytest.mark.parametrize("backend", ["graphopt", "onnxruntime"])
def test_slowed_model_is_reported_slower(backend):
    result = compare(graphopt.load(fast_model()), graphopt.load(slow_model()), feeds(),
                     backends=(backend,), runs=7, progress=False)
    ratio, pairwise = result.speedup(backend)
    assert ratio < 1 and pairwise < 1
    acc = result.accuracy["y"]
    assert acc["max_abs"] == 0 and acc["cosine"] == pytest.approx(1.0)


def test_self_comparison_is_exact_and_speedup_is_ratio_of_medians():
    g = graphopt.load(fast_model())
    result = compare(g, graphopt.load(fast_model()), feeds(), runs=5, progress=False)
    data = result.to_dict()
    assert set(data["backends"]) == {"graphopt", "onnxruntime"}
    for entry in data["backends"].values():
        assert set(entry["before"]) == {"median_ms", "min_ms", "max_ms", "runs"}
        assert entry["before"]["min_ms"] <= entry["before"]["median_ms"] <= entry["before"]["max_ms"]
        assert entry["speedup"] == pytest.approx(entry["before"]["median_ms"] / entry["after"]["median_ms"])
        assert entry["before"]["runs"] == 5
    assert data["accuracy"] == {"y": {"max_abs": 0.0, "rel_l2": 0.0, "cosine": pytest.approx(1.0),
                                      "top1_agreement": 1.0}}
    assert data["size_bytes"] == {"before": N * 4, "after": N * 4}
    assert data["peak_bytes"]["before"] > 0


def test_accuracy_metrics_on_known_values():
    before = np.array([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]], np.float32)
    after = np.array([[1.0, 2.0, 3.5], [3.0, 4.0, 1.0]], np.float32)
    acc = compare_accuracy(before, after)
    assert acc["max_abs"] == 2.0
    assert acc["rel_l2"] == pytest.approx(np.sqrt(0.25 + 4) / np.sqrt(28))
    assert acc["top1_agreement"] == 0.5
    expected_cos = float(before.ravel() @ after.ravel() / np.linalg.norm(before) / np.linalg.norm(after))
    assert acc["cosine"] == pytest.approx(expected_cos)


def test_class_scores_are_recognised_only_for_score_shapes():
    assert class_score_view(np.zeros((1, 1000, 1, 1), np.float32)).shape == (1, 1000)
    assert class_score_view(np.zeros((1, 40, 6625), np.float32)) is not None
    assert class_score_view(np.zeros((1, 1, 64, 64), np.float32)) is None
    assert class_score_view(np.zeros((4, 1), np.float32)) is None


def test_bench_cli_json_and_profile(tmp_path, capsys):
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    onnx.save(fast_model(), str(a))
    onnx.save(slow_model(), str(b))
    x = tmp_path / "x.npy"
    np.save(x, feeds()["x"])
    out = tmp_path / "bench.json"
    code = main(["bench", str(a), str(b), "--runs", "3", "--input", f"x={x}", "--json", str(out),
                 "--profile", "--no-progress"])
    text = capsys.readouterr().out
    assert code == 0
    assert "Tanh" in text and "speedup" in text
    data = json.loads(out.read_text())
    assert data["profile"]["graphopt"]["after"]["Tanh"] > 0
    assert "Tanh" not in data["profile"]["graphopt"]["before"]
    assert data["inputs"] == {"x": [N, N]} and data["threads"] == 1


@pytest.mark.parametrize("argv,message", [
    (["--input", "nope=missing.npy"], "no such file"),
    (["--runs", "0"], "at least 1"),
    (["--input", "q=@X"], "unknown input"),
])
def test_bench_bad_inputs(tmp_path, capsys, argv, message):
    a = tmp_path / "a.onnx"
    onnx.save(fast_model(), str(a))
    if "q=@X" in argv:
        np.save(tmp_path / "q.npy", np.zeros(3, np.float32))
        argv = ["--input", f"q={tmp_path / 'q.npy'}"]
    code = main(["bench", str(a), str(a), "--no-progress", *argv])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_bench_refuses_models_with_different_inputs(tmp_path, capsys):
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    onnx.save(fast_model(), str(a))
    other = make_model([helper.make_node("Relu", ["z"], ["y"])], [("z", [N, N])], [("y", [N, N])])
    onnx.save(other, str(b))
    assert main(["bench", str(a), str(b)]) == 2
    assert "different inputs" in capsys.readouterr().err


def test_bench_compares_ir3_model_with_its_optimized_version(tmp_path, capsys):
    """IR 3 lists every weight as an input; those are not inputs a user feeds, so the optimized
    model (with new weights listed the same way) is comparable."""
    import os
    src = os.path.join(os.path.dirname(onnx.__file__), "backend/test/data/light/light_squeezenet.onnx")
    out = tmp_path / "o2.onnx"
    assert main(["optimize", src, "-o", str(out), "--quiet"]) == 0
    code = main(["bench", src, str(out), "--runs", "1", "--warmup", "0", "--backend",
                 "onnxruntime", "--no-progress"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "softmaxout_1" in captured.out


def test_bench_plot_writes_png(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    a = tmp_path / "a.onnx"
    onnx.save(fast_model(), str(a))
    png = tmp_path / "bench.png"
    code = main(["bench", str(a), str(a), "--runs", "2", "--profile", "--plot", str(png),
                 "--no-progress"])
    assert code == 0, capsys.readouterr().err
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.onnx", "bench.png"]
