"""One fuzz case through every check: the optimizer at each level against onnxruntime, the
checker, and the graphopt runtime against onnxruntime.

    outcome = check_case(model, feeds)           # Outcome: failures, pass stats, runtime note
    outcome.failures                             # [] when everything agrees

onnxruntime runs with its own graph optimizations off, so the oracle is the model as written,
not onnxruntime's rewrite of it. A failure has a `key` ("O2:mismatch", "O1:crash:IRError", ...)
that the shrinker holds fixed while it deletes ops.
"""

from __future__ import annotations

import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnxruntime as ort

import graphopt
from graphopt.errors import UnsupportedOpError
from graphopt.ir import Graph
from graphopt.pass_manager import RunReport
from graphopt.pipeline import available_level, opt_in_passes

ort.set_default_logger_severity(4)

RTOL, ATOL = 1e-4, 1e-5
#: O3 may change numerics (quantization): bound on ||after - before|| / ||before|| per output.
O3_RELATIVE_L2_BOUND = 0.1
#: Stages a case can go through; "runtime" runs the original in the graphopt runtime and
#: "runtime-O2" the O2 result (fused epilogues, kernel metadata).
ALL_STAGES = ("O1", "O2", "O3", "runtime", "runtime-O2")


@dataclass
class Failure:
    stage: str      # "O1", "O2", "O3", "runtime", "runtime-O2"
    kind: str       # "crash:<Exception>", "checker", "onnxruntime", "interface", "mismatch"
    detail: str

    @property
    def key(self) -> str:
        return f"{self.stage}:{self.kind}"

    def __str__(self) -> str:
        return f"[{self.key}] {self.detail}"


@dataclass
class Outcome:
    failures: list[Failure] = field(default_factory=list)
    #: level -> pass name -> summed stats (only passes that changed something)
    fired: dict[str, dict[str, dict[str, int]]] = field(default_factory=dict)
    #: why runtime stages were skipped ("" when they ran)
    runtime_skipped: str = ""
    #: ops the runtime lacks kernels for (skipped stages)
    missing_kernels: set[str] = field(default_factory=set)
    levels_run: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# running
# ---------------------------------------------------------------------------------------------
def ort_session(model: onnx.ModelProto) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 4
    return ort.InferenceSession(model.SerializeToString(), opts,
                                providers=["CPUExecutionProvider"])


def run_ort(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Outputs in the model's output order."""
    return ort_session(model).run(None, feeds)


def missing_kernels(graph: Graph) -> set[str]:
    """Op types (with domain) of the model that the graphopt runtime has no kernel for."""
    from graphopt.runtime.kernels import registry

    missing = set()
    for g in graph.iter_graphs():
        for op in g.ops.values():
            try:
                registry.lookup(op.op_type, op.domain, g.opset(op.domain))
            except UnsupportedOpError:
                missing.add(f"{op.domain}.{op.op_type}" if op.domain else op.op_type)
    return missing


def run_runtime(graph: Graph, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    from graphopt.runtime import Session

    result = Session(graph).run(feeds)
    return [result[name] for name in graph.outputs]


def compare(expected: Sequence[np.ndarray], actual: Sequence[np.ndarray], names: Sequence[str],
            rtol: float = RTOL, atol: float = ATOL) -> str:
    """"" when every output matches, else a one-line description of the first mismatch."""
    if len(expected) != len(actual):
        return f"{len(expected)} outputs became {len(actual)}"
    for name, e, a in zip(names, expected, actual):
        e, a = np.asarray(e), np.asarray(a)
        if e.shape != a.shape:
            return f"output {name!r}: shape {e.shape} became {a.shape}"
        if e.dtype != a.dtype:
            return f"output {name!r}: dtype {e.dtype} became {a.dtype}"
        if e.dtype.kind in "fc":
            if not np.allclose(a, e, rtol=rtol, atol=atol, equal_nan=True):
                diff = np.abs(a.astype(np.float64) - e.astype(np.float64))
                where = np.unravel_index(int(np.nanargmax(diff)), diff.shape)
                return (f"output {name!r}: max abs diff {np.nanmax(diff):.3g} at {where} "
                        f"(expected {e[where]:.6g}, got {a[where]:.6g})")
        elif not np.array_equal(a, e):
            return f"output {name!r}: {int(np.sum(a != e))} of {e.size} elements differ"
    return ""


def relative_l2(expected: Sequence[np.ndarray], actual: Sequence[np.ndarray]) -> float:
    """Largest ||a - e|| / ||e|| over float outputs (exact mismatch of others counts as inf)."""
    worst = 0.0
    for e, a in zip(expected, actual):
        e, a = np.asarray(e), np.asarray(a)
        if e.shape != a.shape:
            return float("inf")
        if e.dtype.kind not in "fc":
            if not np.array_equal(e, a):
                return float("inf")
            continue
        denom = float(np.linalg.norm(e.astype(np.float64))) or 1.0
        worst = max(worst, float(np.linalg.norm((a - e).astype(np.float64))) / denom)
    return worst


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    line = text.splitlines()[0] if text else type(exc).__name__
    frame = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
    where = f" ({frame.filename.rsplit('/', 2)[-2:][-1]}:{frame.lineno})" if frame else ""
    return f"{type(exc).__name__}: {line[:300]}{where}"


# ---------------------------------------------------------------------------------------------
# stages
# ---------------------------------------------------------------------------------------------
def optimize_model(model: onnx.ModelProto, level: str,
                   calibration: dict[str, np.ndarray] | None = None) -> tuple[Graph, RunReport]:
    """O3 calibrates on `calibration` (the case's own feeds: the error bound is about the
    quantizer, not about synthetic calibration data that misses the inputs' range)."""
    graph = graphopt.load(model)
    # opt-in passes too: the fuzzer's job is to break every rewrite graphopt can make
    options = {"calibration": [calibration]} if calibration is not None else None
    report = graphopt.optimize(graph, level, verify="structural", enable=opt_in_passes(level),
                               options=options)
    return graph, report


def check_level(model: onnx.ModelProto, feeds: dict[str, np.ndarray], level: str,
                reference: list[np.ndarray], outcome: Outcome) -> Graph | None:
    """Optimize at `level`, check the saved model and compare it with the reference outputs.
    Returns the optimized graph (None if optimizing crashed)."""
    try:
        graph, report = optimize_model(model, level, feeds if level == "O3" else None)
        optimized = graphopt.to_model(graph)
    except Exception as exc:  # any crash of the optimizer is a finding
        outcome.failures.append(Failure(level, f"crash:{type(exc).__name__}", _first_line(exc)))
        return None
    outcome.levels_run.append(level)
    outcome.fired[level] = {name: entry["stats"] for name, entry in report.stats_by_pass().items()
                            if entry["stats"]}
    before_in = [i.name for i in model.graph.input]
    before_out = [o.name for o in model.graph.output]
    after_in = [i.name for i in optimized.graph.input]
    after_out = [o.name for o in optimized.graph.output]
    if before_out != after_out or before_in != after_in:
        outcome.failures.append(Failure(level, "interface",
                                        f"inputs {before_in} -> {after_in}, "
                                        f"outputs {before_out} -> {after_out}"))
        return graph
    try:
        onnx.checker.check_model(optimized, full_check=True)
    except Exception as exc:
        outcome.failures.append(Failure(level, "checker", _first_line(exc)))
        return graph
    try:
        after = run_ort(optimized, feeds)
    except Exception as exc:
        outcome.failures.append(Failure(level, "onnxruntime", _first_line(exc)))
        return graph
    if level == "O3":
        error = relative_l2(reference, after)
        if not error <= O3_RELATIVE_L2_BOUND:
            outcome.failures.append(Failure(level, "mismatch", f"relative L2 error {error:.3g} "
                                            f"beyond {O3_RELATIVE_L2_BOUND}"))
        return graph
    problem = compare(reference, after, before_out)
    if problem:
        outcome.failures.append(Failure(level, "mismatch", problem))
    return graph


def check_runtime(graph: Graph, feeds: dict[str, np.ndarray], reference: list[np.ndarray],
                  stage: str, outcome: Outcome) -> None:
    missing = missing_kernels(graph)
    if missing:
        outcome.missing_kernels |= missing
        outcome.runtime_skipped = f"runtime lacks kernels for {', '.join(sorted(missing))}"
        return
    try:
        actual = run_runtime(graph, feeds)
    except Exception as exc:
        outcome.failures.append(Failure(stage, f"crash:{type(exc).__name__}", _first_line(exc)))
        return
    problem = compare(reference, actual, graph.outputs)
    if problem:
        outcome.failures.append(Failure(stage, "mismatch", problem))


def check_case(model: onnx.ModelProto, feeds: dict[str, np.ndarray],
               stages: Sequence[str] = ("O1", "O2", "O3", "runtime", "runtime-O2")) -> Outcome:
    """Run the requested stages; O3 runs only once the O3 level exists (until then
    `optimize(g, "O3")` is O2 again and is skipped)."""
    outcome = Outcome()
    reference = run_ort(model, feeds)
    optimized: dict[str, Graph | None] = {}
    for level in ("O1", "O2", "O3"):
        wanted = level in stages or (level == "O2" and "runtime-O2" in stages)
        if not wanted or available_level(level) != level:
            continue
        optimized[level] = check_level(model, feeds, level, reference, outcome)
    if "runtime" in stages:
        check_runtime(graphopt.load(model), feeds, reference, "runtime", outcome)
    if "runtime-O2" in stages and optimized.get("O2") is not None:
        check_runtime(optimized["O2"], feeds, reference, "runtime-O2", outcome)
    return outcome
