"""Checks that a model keeps its meaning: load/save round trips and before/after outputs.

Used by the round-trip tests and benchmarks/roundtrip_counts.py, so both count the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx

import graphopt


@dataclass
class RoundTrip:
    """Outcome of load -> save for one model."""

    checker_original: bool          # the original passes check_model(full_check=True)
    checker_saved: bool | None      # the saved one does (None when the original does not)
    ort_ran: bool                   # onnxruntime ran the original on the inputs
    ort_identical: bool | None      # and gave bit-identical outputs for the saved one
    problem: str = ""

    @property
    def ok(self) -> bool:
        return self.checker_saved is not False and self.ort_identical is not False


def passes_checker(model: onnx.ModelProto) -> tuple[bool, str]:
    try:
        onnx.checker.check_model(model, full_check=True)
        return True, ""
    except Exception as exc:  # the checker raises several error types
        return False, str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def same_outputs(a, b) -> bool:
    """Bit-identical outputs (NaNs equal), sequences compared element by element."""
    if isinstance(a, list) or isinstance(b, list):
        return isinstance(a, list) and isinstance(b, list) and len(a) == len(b) and all(
            same_outputs(x, y) for x, y in zip(a, b))
    if a is None or b is None:
        return a is None and b is None
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.dtype == object:
        return bool((a == b).all())
    return bool(np.array_equal(a, b, equal_nan=a.dtype.kind in "fc"))


def roundtrip(model: onnx.ModelProto,
              feeds_for: Callable[[object], dict[str, np.ndarray] | None]) -> RoundTrip:
    """Load and save `model`; compare checker verdicts and onnxruntime outputs.

    `feeds_for(session)` makes inputs from an onnxruntime session of the original (None: skip)."""
    import onnxruntime as ort

    saved = graphopt.to_model(graphopt.load(model))
    ok_original, _ = passes_checker(model)
    result = RoundTrip(ok_original, None, False, None)
    if ok_original:
        result.checker_saved, result.problem = passes_checker(saved)
    try:
        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        feeds = feeds_for(session)
        if feeds is None:
            return result
        expected = session.run(None, feeds)
    except Exception:
        return result  # onnxruntime cannot run the original (on these inputs)
    result.ort_ran = True
    try:
        again = ort.InferenceSession(saved.SerializeToString(), providers=["CPUExecutionProvider"])
        actual = again.run(None, feeds)
    except Exception as exc:
        result.ort_identical = False
        result.problem = f"onnxruntime fails on the saved model: {str(exc).splitlines()[0]}"
        return result
    result.ort_identical = len(actual) == len(expected) and all(
        same_outputs(e, a) for e, a in zip(expected, actual))
    if not result.ort_identical:
        result.problem = "outputs differ"
    return result


# ---------------------------------------------------------------------------------------------
# the onnx wheel's models: the round-trip corpus
# ---------------------------------------------------------------------------------------------
WHEEL_COLLECTIONS = ("light", "pytorch-converted", "pytorch-operator", "simple")


@dataclass
class CorpusModel:
    """A model from the onnx wheel and how to make inputs for it."""

    name: str
    load: Callable[[], onnx.ModelProto]
    feeds_for: Callable[[object], dict[str, np.ndarray] | None]


def wheel_data_dir() -> str:
    import os
    return os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data")


def wheel_file_models() -> list[CorpusModel]:
    """Models shipped as files: light, pytorch-converted, pytorch-operator, simple."""
    import glob
    import os

    data = wheel_data_dir()
    found = []
    for collection in WHEEL_COLLECTIONS:
        paths = sorted(glob.glob(os.path.join(data, collection, "*.onnx"))) + \
            sorted(glob.glob(os.path.join(data, collection, "*", "model.onnx")))
        for path in paths:
            found.append(CorpusModel(os.path.relpath(path, data),
                                     lambda p=path: onnx.load(p),
                                     lambda sess, p=path: _file_model_feeds(p, sess)))
    return found


def _file_model_feeds(path: str, session) -> dict[str, np.ndarray]:
    """The model's test_data_set_0 inputs where it has them, else seeded normal floats."""
    import glob
    import os

    data_dir = os.path.join(os.path.dirname(path), "test_data_set_0")
    metas = session.get_inputs()
    pbs = sorted(glob.glob(os.path.join(data_dir, "input_*.pb")))
    if os.path.basename(path) == "model.onnx" and len(pbs) == len(metas):
        feeds = {}
        for meta, pb in zip(metas, pbs):
            tensor = onnx.TensorProto()
            with open(pb, "rb") as f:
                tensor.ParseFromString(f.read())
            feeds[meta.name] = onnx.numpy_helper.to_array(tensor)
        return feeds
    rng = np.random.default_rng(0)
    return {meta.name: rng.standard_normal([d if isinstance(d, int) else 1 for d in meta.shape])
            .astype(np.float32) for meta in metas}


def wheel_node_models() -> list[CorpusModel]:
    """Every node test model of `onnx.backend.test.loader.load_model_tests(kind="node")`."""
    import warnings

    from onnx.backend.test.loader import load_model_tests

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cases = load_model_tests(kind="node")
    return [CorpusModel(case.name, lambda c=case: c.model, lambda sess, c=case: _node_feeds(c))
            for case in cases]


def _node_feeds(case) -> dict[str, np.ndarray] | None:
    if not case.data_sets:
        return None
    inputs = case.data_sets[0][0]
    initialized = {t.name for t in case.model.graph.initializer}
    names = [i.name for i in case.model.graph.input if i.name not in initialized]
    return dict(zip(names, inputs)) if len(inputs) == len(names) else None
