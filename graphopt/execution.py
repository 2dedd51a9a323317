"""Run a graph on a reference backend for verification and comparison.

onnxruntime is the oracle; where it cannot run a model (an op it lacks), the graphopt runtime is
tried. Used by numeric verification in the pass manager and by tests.
"""

from __future__ import annotations

import os
import tempfile

import numpy as np

from graphopt.ir import Graph
from graphopt.onnx_io import EXTERNAL_DATA_THRESHOLD, save, to_model, weight_bytes


def onnxruntime_session(graph: Graph, threads: int = 1, level: str = "all",
                        profile: bool = False):
    """An onnxruntime InferenceSession for the graph (through a temporary file for >2 GB)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if profile:
        opts.enable_profiling = True
        opts.profile_file_prefix = os.path.join(tempfile.gettempdir(), "graphopt_ort_profile")
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    opts.graph_optimization_level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[level]
    providers = ["CPUExecutionProvider"]
    if weight_bytes(graph) > EXTERNAL_DATA_THRESHOLD:
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "model.onnx")
            save(graph, path, external_data=True)
            return ort.InferenceSession(path, opts, providers=providers)
    return ort.InferenceSession(to_model(graph).SerializeToString(), opts, providers=providers)


def run_onnxruntime(graph: Graph, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    sess = onnxruntime_session(graph)
    names = [o.name for o in sess.get_outputs()]
    return sess.run(names, feeds)


def run_graphopt(graph: Graph, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    from graphopt.runtime import Session

    result = Session(graph).run(feeds)
    return [result[name] for name in graph.outputs]


def run_graph(graph: Graph, feeds: dict[str, np.ndarray], prefer: str | None = None
              ) -> tuple[list[np.ndarray] | None, str | None, str]:
    """(outputs in graph.outputs order, backend used, note). Tries `prefer` first, then
    onnxruntime, then the graphopt runtime; outputs is None if none could run the graph."""
    runners = {"onnxruntime": run_onnxruntime, "graphopt": run_graphopt}
    order = [prefer] if prefer in runners else []
    order += [name for name in ("onnxruntime", "graphopt") if name not in order]
    notes = []
    for name in order:
        try:
            return runners[name](graph, feeds), name, ""
        except Exception as exc:  # any backend failure: note it and try the next
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            notes.append(f"{name}: {first[:200]}")
    return None, None, "; ".join(notes)
