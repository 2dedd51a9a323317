"""load -> save keeps every model's meaning: the onnx wheel's models and node tests.

For each model: the saved model passes `check_model(full_check=True)` whenever the original
does, and onnxruntime gives identical outputs for both wherever it can run the original.
"""

from __future__ import annotations

import glob
import os
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import graphopt

DATA = os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data")
COLLECTIONS = ("light", "pytorch-converted", "pytorch-operator", "simple")


def _file_models() -> list[tuple[str, str]]:
    found = []
    for collection in COLLECTIONS:
        pattern_a = os.path.join(DATA, collection, "*.onnx")
        pattern_b = os.path.join(DATA, collection, "*", "model.onnx")
        for path in sorted(glob.glob(pattern_a)) + sorted(glob.glob(pattern_b)):
            found.append((os.path.relpath(path, DATA), path))
    return found


def _node_tests():
    from onnx.backend.test.loader import load_model_tests

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_model_tests(kind="node")


FILE_MODELS = _file_models()
NODE_TESTS = _node_tests()


def _inputs_for_file_model(path: str, sess: ort.InferenceSession) -> dict[str, np.ndarray]:
    data_dir = os.path.join(os.path.dirname(path), "test_data_set_0")
    feeds = {}
    if os.path.basename(path) == "model.onnx" and os.path.isdir(data_dir):
        for meta, pb in zip(sess.get_inputs(), sorted(glob.glob(os.path.join(data_dir, "input_*.pb")))):
            tensor = onnx.TensorProto()
            with open(pb, "rb") as f:
                tensor.ParseFromString(f.read())
            feeds[meta.name] = onnx.numpy_helper.to_array(tensor)
        if len(feeds) == len(sess.get_inputs()):
            return feeds
    rng = np.random.default_rng(0)
    for meta in sess.get_inputs():
        shape = [d if isinstance(d, int) else 1 for d in meta.shape]
        feeds[meta.name] = rng.standard_normal(shape).astype(np.float32)
    return feeds


def _session(model: onnx.ModelProto) -> ort.InferenceSession | None:
    try:
        return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    except Exception:
        return None


def _passes_checker(model: onnx.ModelProto) -> bool:
    try:
        onnx.checker.check_model(model, full_check=True)
        return True
    except Exception:
        return False


def _same_outputs(a, b) -> bool:
    if isinstance(a, list) or isinstance(b, list):  # sequence outputs
        return isinstance(a, list) and isinstance(b, list) and len(a) == len(b) and all(
            _same_outputs(x, y) for x, y in zip(a, b))
    if a is None or b is None:
        return a is None and b is None
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.dtype == object:
        return bool((a == b).all())
    return np.array_equal(a, b, equal_nan=a.dtype.kind in "fc")


def check_roundtrip(model: onnx.ModelProto, feeds_for) -> None:
    saved = graphopt.to_model(graphopt.load(model))
    if _passes_checker(model):
        onnx.checker.check_model(saved, full_check=True)
    original = _session(model)
    if original is None:
        return
    feeds = feeds_for(original)
    if feeds is None:
        return
    try:
        expected = original.run(None, feeds)
    except Exception:
        return  # onnxruntime cannot run the original on these inputs
    again = _session(saved)
    assert again is not None, "onnxruntime rejects the saved model but runs the original"
    actual = again.run(None, feeds)
    assert len(actual) == len(expected)
    for e, a in zip(expected, actual):
        assert _same_outputs(e, a)


@pytest.mark.parametrize("rel,path", FILE_MODELS, ids=[r for r, _ in FILE_MODELS])
def test_roundtrip_shipped_model(rel: str, path: str) -> None:
    check_roundtrip(onnx.load(path), lambda sess: _inputs_for_file_model(path, sess))


@pytest.mark.parametrize("case", NODE_TESTS, ids=[t.name for t in NODE_TESTS])
def test_roundtrip_node_model(case) -> None:
    def feeds_for(sess):
        if not case.data_sets:
            return None
        inputs = case.data_sets[0][0]
        names = [i.name for i in case.model.graph.input
                 if i.name not in {t.name for t in case.model.graph.initializer}]
        if len(inputs) != len(names):
            return None
        return dict(zip(names, inputs))

    check_roundtrip(case.model, feeds_for)


def test_collections_are_not_empty() -> None:
    assert len(FILE_MODELS) > 100 and len(NODE_TESTS) > 1500
