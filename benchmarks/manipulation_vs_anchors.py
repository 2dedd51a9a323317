"""Tensor-manipulation ops left by graphopt O2 and by three anchors, per model.

For each model, counts Transpose, Concat, Split, Slice and Reshape nodes
- in the original model,
- after `graphopt.optimize(graph, "O2")`,
- after onnxoptimizer's default passes (`onnxoptimizer.optimize(model)`),
- after onnxsim (`onnxsim.simplify(model)`),
- in the model onnxruntime saves at ORT_ENABLE_EXTENDED (`optimized_model_filepath`; it may
  contain com.microsoft contrib ops, only the five op types are counted),
and checks that every result computes what the original does (onnxruntime, same inputs).
graphopt's O2 time per model is printed too (target: under 5 s for the largest).

    python benchmarks/manipulation_vs_anchors.py
    python benchmarks/manipulation_vs_anchors.py --models transformer dlrm --size small

Models: light-shufflenet, light-inception_v2, light-densenet121 (onnx wheel), ppocr-det/rec/cls
(rapidocr-onnxruntime), transformer and dlrm (graphopt.models builders, `--size`, default
"default"). The anchors are benchmark-only dependencies (`pip install "graphopt[bench]"`).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import onnx

KINDS = ("Transpose", "Concat", "Split", "Slice", "Reshape")
SHORT = {"Transpose": "T", "Concat": "C", "Split": "Sp", "Slice": "Sl", "Reshape": "R"}
MODELS = ("light-shufflenet", "light-inception_v2", "light-densenet121", "ppocr-det",
          "ppocr-rec", "ppocr-cls", "transformer", "dlrm")
GRAPHOPT = ("graphopt O2", "O2 + opt-in")  # opt-in: passes off by default, e.g. head_split
ANCHORS = ("onnxoptimizer", "onnxsim", "ort extended")
COLUMNS = GRAPHOPT + ANCHORS


@dataclass
class Result:
    counts: dict[str, int] | None = None
    seconds: float = 0.0
    agrees: bool | None = None
    max_diff: float = 0.0
    note: str = ""

    @property
    def total(self) -> int | None:
        return None if self.counts is None else sum(self.counts.values())


@dataclass
class Row:
    model: str
    original: dict[str, int]
    results: dict[str, Result] = field(default_factory=dict)


def count_kinds(model: onnx.ModelProto) -> dict[str, int]:
    """Nodes of each counted op type, subgraphs included (any domain: only the names count)."""
    counts: Counter = Counter()

    def walk(graph: onnx.GraphProto) -> None:
        for node in graph.node:
            counts[node.op_type] += 1
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    walk(attr.g)
                for sub in attr.graphs:
                    walk(sub)
    walk(model.graph)
    return {k: counts[k] for k in KINDS}


def _ort_session(model: onnx.ModelProto, level=None, save_to: str | None = None):
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if level is not None:
        options.graph_optimization_level = level
    if save_to:
        options.optimized_model_filepath = save_to
    return ort.InferenceSession(model.SerializeToString(), options,
                                providers=["CPUExecutionProvider"])


def run(model: onnx.ModelProto, feeds: dict[str, np.ndarray],
        original: onnx.ModelProto | None = None) -> list[np.ndarray]:
    """Outputs on onnxruntime. An input the model requires beyond `feeds` is an initializer of
    the original model (onnxruntime saves IR 3 models with deduplicated initializers still
    listed as inputs): it gets that initializer's value."""
    import onnxruntime as ort
    session = _ort_session(model, ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    names = {i.name for i in session.get_inputs()}
    given = {k: v for k, v in feeds.items() if k in names}
    if original is not None and names - set(given):
        inits = {t.name: t for t in original.graph.initializer}
        for name in names - set(given):
            if name in inits:
                given[name] = onnx.numpy_helper.to_array(inits[name])
    return session.run(None, given)


def compare(reference: list[np.ndarray], outputs: list[np.ndarray]) -> tuple[bool, float]:
    """(agree within rtol 1e-3 / atol 1e-4, max abs difference)."""
    worst, ok = 0.0, len(reference) == len(outputs)
    for ref, out in zip(reference, outputs):
        if ref.shape != out.shape:
            return False, float("inf")
        if ref.size:
            diff = np.abs(ref.astype(np.float64) - out.astype(np.float64))
            worst = max(worst, float(np.max(diff)))
        ok &= bool(np.allclose(out, ref, rtol=1e-3, atol=1e-4))
    return ok, worst


def load(name: str, size: str) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    from graphopt import models
    model = models.build(name, size=size)
    return model, models.example_inputs(name, model)


def with_graphopt(model: onnx.ModelProto, opt_in: bool = False) -> tuple[onnx.ModelProto, float]:
    import graphopt
    from graphopt.pipeline import opt_in_passes
    graph = graphopt.load(model)
    start = time.perf_counter()
    graphopt.optimize(graph, "O2", enable=opt_in_passes("O2") if opt_in else ())
    seconds = time.perf_counter() - start
    return graphopt.to_model(graph), seconds


def with_onnxoptimizer(model: onnx.ModelProto) -> tuple[onnx.ModelProto, float]:
    import onnxoptimizer
    start = time.perf_counter()
    out = onnxoptimizer.optimize(model)
    return out, time.perf_counter() - start


def with_onnxsim(model: onnx.ModelProto) -> tuple[onnx.ModelProto, float]:
    import onnxsim
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        out, ok = onnxsim.simplify(model)
    if not ok:
        raise RuntimeError("onnxsim could not validate its result")
    return out, time.perf_counter() - start


def with_ort_extended(model: onnx.ModelProto) -> tuple[onnx.ModelProto, float]:
    import onnxruntime as ort
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "optimized.onnx")
        start = time.perf_counter()
        _ort_session(model, ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED, save_to=path)
        seconds = time.perf_counter() - start
        return onnx.load(path), seconds


OPTIMIZERS = {"graphopt O2": with_graphopt,
              "O2 + opt-in": lambda model: with_graphopt(model, opt_in=True),
              "onnxoptimizer": with_onnxoptimizer,
              "onnxsim": with_onnxsim, "ort extended": with_ort_extended}


def measure(name: str, size: str) -> Row:
    model, feeds = load(name, size)
    reference = run(model, feeds)
    row = Row(name, count_kinds(model))
    for anchor, optimize in OPTIMIZERS.items():
        result = Result()
        try:
            optimized, result.seconds = optimize(model)
            result.counts = count_kinds(optimized)
            result.agrees, result.max_diff = compare(reference, run(optimized, feeds, model))
        except Exception as exc:  # an anchor that fails on a model is reported, not fatal
            result.note = f"{type(exc).__name__}: {str(exc).splitlines()[0][:80]}"
        row.results[anchor] = result
        print(f"  {name:<20} {anchor:<14} {_cell(result):<24} {result.seconds:7.2f} s "
              f"agree={result.agrees} max|diff|={result.max_diff:.2g} {result.note}",
              file=sys.stderr, flush=True)
    return row


def _cell(result: Result | dict) -> str:
    counts = result if isinstance(result, dict) else result.counts
    if counts is None:
        return "failed"
    parts = "/".join(str(counts[k]) for k in KINDS)
    return f"{sum(counts.values()):>3} ({parts})"


def print_table(rows: list[Row]) -> None:
    legend = "/".join(SHORT[k] for k in KINDS)
    print(f"\nTranspose+Concat+Split+Slice+Reshape nodes left (total ({legend})); "
          "* = fewest, ! = outputs differ from the original")
    header = f"{'model':<20} {'original':<22}" + "".join(f" {a:<22}" for a in COLUMNS)
    print(header)
    print("-" * len(header))
    for row in rows:
        totals = [r.total for r in row.results.values() if r.total is not None]
        best = min(totals) if totals else None
        cells = []
        for anchor in COLUMNS:
            result = row.results[anchor]
            mark = ("*" if result.total == best else " ") + ("!" if result.agrees is False else " ")
            cells.append(f" {_cell(result) + mark:<22}")
        print(f"{row.model:<20} {_cell(row.original):<22}" + "".join(cells))
    print("\ngraphopt O2 optimize time per model:")
    for row in rows:
        print(f"  {row.model:<20} {row.results['graphopt O2'].seconds:6.2f} s")
    slowest = max(rows, key=lambda r: r.results["graphopt O2"].seconds)
    print(f"  slowest: {slowest.model} {slowest.results['graphopt O2'].seconds:.2f} s "
          "(target: under 5 s)")
    verdicts = []
    for row in rows:
        mine = row.results["graphopt O2"].total
        others = [row.results[a].total for a in ANCHORS if row.results[a].total is not None]
        if mine is None:
            verdicts.append(f"  {row.model:<20} graphopt failed")
            continue
        status = "fewer than every anchor" if all(mine < o for o in others) else \
            "ties the best anchor" if all(mine <= o for o in others) else "more than an anchor"
        verdicts.append(f"  {row.model:<20} {status}")
    print("\nverdict:")
    print("\n".join(verdicts))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--size", default="default", choices=("small", "default"),
                        help="size of the builder models (transformer, dlrm)")
    args = parser.parse_args(argv)
    rows = [measure(name, args.size) for name in args.models]
    print_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
