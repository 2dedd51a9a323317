"""Before/after comparison: latency on both backends, accuracy, size, memory, op-type breakdown.

Runs of BEFORE and AFTER are interleaved (and their order alternates every round), so slow
drift on a noisy machine hits both alike; both get the same inputs and the same thread count.
The speedup is reported two ways: the ratio of the medians, and the median of the per-round
ratios (robust when the machine's speed wanders during the run).

Accuracy is measured on every backend that ran: a quantized AFTER runs onnxruntime's int8
kernels on one and graphopt's on the other, and the two need not agree. `accuracy` is the
onnxruntime one (when it ran), kept as the headline.

The JSON written by `BenchResult.to_dict()` is a stable contract, documented in the README:

    {"backends": {"<backend>": {"before": {"median_ms", "min_ms", "max_ms", "runs"},
                                "after": {...}, "speedup": float, "speedup_pairwise": float}},
     "accuracy": {"<output>": {"max_abs", "rel_l2", "cosine", "top1_agreement" or null}},
     "accuracy_backend": str,
     "accuracy_by_backend": {"<backend>": {"<output>": {...}}},
     "size_bytes": {"before": int, "after": int},
     "peak_bytes": {"before": int, "after": int} or null,
     "profile": {"<backend>": {"before": {op_type: ms per run}, "after": {...}}} or null,
     "inputs": {name: shape}, "threads": int}
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from graphopt.errors import GraphoptError
from graphopt.ir import Graph
from graphopt.onnx_io import weight_bytes

BACKENDS = ("graphopt", "onnxruntime")


@contextmanager
def blas_threads(threads: int) -> Iterator[None]:
    """Limit BLAS/OpenMP threads of this process (the graphopt runtime's GEMMs) for a block."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # threadpoolctl is a dependency; tolerate its absence in odd installs
        yield
        return
    with threadpool_limits(limits=threads):
        yield


@dataclass
class Timing:
    """Wall times in seconds of repeated runs."""

    seconds: list[float] = field(default_factory=list)

    def summary(self) -> dict[str, float]:
        ms = [s * 1000 for s in self.seconds]
        return {"median_ms": statistics.median(ms), "min_ms": min(ms), "max_ms": max(ms),
                "runs": len(ms)}


@dataclass
class BenchResult:
    """Everything a comparison measured; see the module docstring for the JSON form."""

    timings: dict[str, dict[str, Timing]]
    accuracy: dict[str, dict[str, Any]]
    accuracy_backend: str
    size_bytes: dict[str, int]
    peak_bytes: dict[str, int] | None
    profile: dict[str, dict[str, dict[str, float]]] | None
    inputs: dict[str, list[int]]
    threads: int
    #: backend -> output -> accuracy metrics (every backend that ran)
    accuracy_by_backend: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)

    def speedup(self, backend: str) -> tuple[float, float]:
        """(ratio of medians, median of per-round ratios): before / after, > 1 is faster."""
        before, after = self.timings[backend]["before"], self.timings[backend]["after"]
        ratio = statistics.median(before.seconds) / statistics.median(after.seconds)
        pairwise = statistics.median(b / a for b, a in zip(before.seconds, after.seconds))
        return ratio, pairwise

    def to_dict(self) -> dict[str, Any]:
        backends = {}
        for name, pair in self.timings.items():
            ratio, pairwise = self.speedup(name)
            backends[name] = {"before": pair["before"].summary(), "after": pair["after"].summary(),
                              "speedup": ratio, "speedup_pairwise": pairwise}
        return {"backends": backends, "accuracy": self.accuracy,
                "accuracy_backend": self.accuracy_backend,
                "accuracy_by_backend": self.accuracy_by_backend, "size_bytes": self.size_bytes,
                "peak_bytes": self.peak_bytes, "profile": self.profile, "inputs": self.inputs,
                "threads": self.threads}

    def format(self) -> str:
        """The human-readable tables."""
        lines = [f"{'backend':<12}{'model':<8}{'min ms':>10}{'median ms':>11}{'max ms':>10}"
                 f"{'speedup':>9}"]
        for name, pair in self.timings.items():
            ratio, pairwise = self.speedup(name)
            for which in ("before", "after"):
                s = pair[which].summary()
                extra = f"{ratio:>8.2f}x" if which == "after" else ""
                lines.append(f"{name:<12}{which:<8}{s['min_ms']:>10.2f}{s['median_ms']:>11.2f}"
                             f"{s['max_ms']:>10.2f}{extra}")
            lines.append(f"{'':<20}median of per-round ratios: {pairwise:.2f}x")
        tables = self.accuracy_by_backend or {self.accuracy_backend: self.accuracy}
        ordered = [self.accuracy_backend] + [b for b in tables if b != self.accuracy_backend]
        for backend in ordered:
            lines.append("")
            lines.append(f"accuracy of AFTER vs BEFORE (on {backend}):")
            lines.append(f"{'output':<28}{'max abs':>11}{'rel L2':>11}{'cosine':>10}{'top-1':>8}")
            for name, acc in tables.get(backend, self.accuracy).items():
                top1 = "-" if acc["top1_agreement"] is None else f"{acc['top1_agreement'] * 100:.1f}%"
                lines.append(f"{name[:27]:<28}{acc['max_abs']:>11.3g}{acc['rel_l2']:>11.3g}"
                             f"{acc['cosine']:>10.6f}{top1:>8}")
        lines.append("")
        lines.append(f"weights: {self.size_bytes['before'] / 1e6:.2f} MB -> "
                     f"{self.size_bytes['after'] / 1e6:.2f} MB")
        if self.peak_bytes:
            lines.append(f"peak intermediate memory (graphopt runtime): "
                         f"{self.peak_bytes['before'] / 1e6:.2f} MB -> "
                         f"{self.peak_bytes['after'] / 1e6:.2f} MB")
        for backend, prof in (self.profile or {}).items():
            lines.append("")
            lines.append(f"time per op type, ms per run ({backend}):")
            lines.append(f"{'op type':<28}{'before':>10}{'after':>10}")
            types = sorted(set(prof["before"]) | set(prof["after"]),
                           key=lambda t: -max(prof["before"].get(t, 0), prof["after"].get(t, 0)))
            for t in types:
                lines.append(f"{t[:27]:<28}{prof['before'].get(t, 0):>10.3f}"
                             f"{prof['after'].get(t, 0):>10.3f}")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# accuracy
# ---------------------------------------------------------------------------------------------
def compare_accuracy(before: np.ndarray, after: np.ndarray) -> dict[str, Any]:
    """max abs diff, relative L2, cosine similarity and (for class scores) top-1 agreement."""
    b = np.asarray(before, dtype=np.float64)
    a = np.asarray(after, dtype=np.float64)
    if b.shape != a.shape:
        raise GraphoptError(f"output shapes differ: {b.shape} before, {a.shape} after")
    diff = a - b
    norm_b = float(np.linalg.norm(b))
    norm_a = float(np.linalg.norm(a))
    if b.size == 0:
        return {"max_abs": 0.0, "rel_l2": 0.0, "cosine": 1.0, "top1_agreement": None}
    rel_l2 = float(np.linalg.norm(diff)) / norm_b if norm_b else float(np.linalg.norm(diff))
    if norm_a and norm_b:
        cosine = float(np.dot(a.ravel(), b.ravel()) / (norm_a * norm_b))
    else:
        cosine = 1.0 if norm_a == norm_b else 0.0
    top1 = None
    scores_b, scores_a = class_score_view(b), class_score_view(a)
    if scores_b is not None and scores_a is not None:
        top1 = float(np.mean(np.argmax(scores_a, axis=-1) == np.argmax(scores_b, axis=-1)))
    return {"max_abs": float(np.max(np.abs(diff))), "rel_l2": rel_l2, "cosine": cosine,
            "top1_agreement": top1}


def class_score_view(x: np.ndarray) -> np.ndarray | None:
    """The output as [batch, classes] or [batch, steps, classes] if it looks like class scores
    (logits or probabilities; [1, 1000, 1, 1] counts, an image-shaped map does not), else None."""
    if x.dtype.kind != "f" or x.ndim < 2:
        return None
    if x.ndim == 3 and x.shape[-1] >= 2:
        return x
    squeezed = x.reshape((x.shape[0],) + tuple(d for d in x.shape[1:] if d != 1))
    if squeezed.ndim == 2 and squeezed.shape[-1] >= 2:
        return squeezed
    return None


# ---------------------------------------------------------------------------------------------
# runners
# ---------------------------------------------------------------------------------------------
Runner = Callable[[], list[np.ndarray]]


def _graphopt_runner(graph: Graph, feeds: dict[str, np.ndarray]) -> tuple[Runner, Any]:
    from graphopt.runtime import Session

    session = Session(graph)
    names = list(graph.outputs)

    def run() -> list[np.ndarray]:
        out = session.run(feeds)
        return [out[n] for n in names]
    return run, session


def _ort_runner(graph: Graph, feeds: dict[str, np.ndarray], threads: int,
                profile: bool = False) -> tuple[Runner, Any]:
    from graphopt.execution import onnxruntime_session

    session = onnxruntime_session(graph, threads=threads, profile=profile)
    names = [o.name for o in session.get_outputs()]

    def run() -> list[np.ndarray]:
        return session.run(names, feeds)
    return run, session


def _ort_profile(graph: Graph, feeds: dict[str, np.ndarray], threads: int, runs: int) -> dict[str, float]:
    """onnxruntime's own per-op-type kernel time (ms per run) from its profiler."""
    import json
    import os

    run, session = _ort_runner(graph, feeds, threads, profile=True)
    for _ in range(runs):
        run()
    path = session.end_profiling()
    try:
        with open(path) as f:
            events = json.load(f)
    finally:
        os.unlink(path)
    totals: dict[str, float] = {}
    for event in events:
        if event.get("cat") == "Node" and event.get("name", "").endswith("_kernel_time"):
            op_type = event.get("args", {}).get("op_name", "?")
            totals[op_type] = totals.get(op_type, 0.0) + event.get("dur", 0) / 1000.0
    return {k: v / runs for k, v in totals.items()}


def _progress(total: int, enabled: bool):
    """A progress bar on stderr (tqdm) when enabled and stderr is a terminal."""
    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None
    if tqdm is None or not enabled:
        class _Null:
            def update(self, n: int = 1) -> None: ...
            def close(self) -> None: ...
        return _Null()
    return tqdm(total=total, desc="bench", unit="round", leave=False, disable=None)


def compare(before: Graph, after: Graph, feeds: dict[str, np.ndarray], *,
            backends: tuple[str, ...] = BACKENDS, runs: int = 20, warmup: int = 2,
            threads: int = 1, profile: bool = False, progress: bool = True) -> BenchResult:
    """Measure BEFORE and AFTER on each backend with interleaved runs; see the module docstring."""
    if runs < 1:
        raise GraphoptError("--runs must be at least 1", 2)
    runners: dict[str, dict[str, Runner]] = {}
    sessions: dict[str, dict[str, Any]] = {}
    with blas_threads(threads):
        for backend in backends:
            runners[backend], sessions[backend] = {}, {}
            for which, graph in (("before", before), ("after", after)):
                try:
                    if backend == "graphopt":
                        run, sess = _graphopt_runner(graph, feeds)
                    else:
                        run, sess = _ort_runner(graph, feeds, threads)
                except GraphoptError:
                    raise
                except Exception as exc:
                    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                    raise GraphoptError(f"{backend} cannot run the {which} model: {first[:300]}") from None
                runners[backend][which], sessions[backend][which] = run, sess
        outputs: dict[str, dict[str, list[np.ndarray]]] = {}
        for backend in backends:
            outputs[backend] = {which: runners[backend][which]() for which in ("before", "after")}
            for _ in range(max(warmup - 1, 0)):
                for which in ("before", "after"):
                    runners[backend][which]()
        timings = {b: {"before": Timing(), "after": Timing()} for b in backends}
        bar = _progress(runs, progress)
        for i in range(runs):
            order = ("before", "after") if i % 2 == 0 else ("after", "before")
            for backend in backends:
                for which in order:
                    t0 = time.perf_counter()
                    runners[backend][which]()
                    timings[backend][which].seconds.append(time.perf_counter() - t0)
            bar.update(1)
        bar.close()
        profiles = _profiles(before, after, feeds, backends, threads, runs) if profile else None
    accuracy_backend = "onnxruntime" if "onnxruntime" in backends else backends[0]
    by_backend = {backend: {name: compare_accuracy(b, a) for name, b, a in
                            zip(before.outputs, pair["before"], pair["after"])}
                  for backend, pair in outputs.items()}
    accuracy = by_backend[accuracy_backend]
    peak = None
    if "graphopt" in backends:
        peak = {which: int(sessions["graphopt"][which].peak_bytes) for which in ("before", "after")}
    return BenchResult(timings=timings, accuracy=accuracy, accuracy_backend=accuracy_backend,
                       size_bytes={"before": weight_bytes(before), "after": weight_bytes(after)},
                       peak_bytes=peak, profile=profiles,
                       inputs={k: list(v.shape) for k, v in feeds.items()}, threads=threads,
                       accuracy_by_backend=by_backend)


def _profiles(before: Graph, after: Graph, feeds: dict[str, np.ndarray], backends, threads: int,
              runs: int) -> dict[str, dict[str, dict[str, float]]]:
    """Per-op-type ms per run, measured in separate profiled runs (profiling has overhead)."""
    from graphopt.runtime import Session

    n = max(3, min(runs, 10))
    result: dict[str, dict[str, dict[str, float]]] = {}
    if "graphopt" in backends:
        result["graphopt"] = {}
        for which, graph in (("before", before), ("after", after)):
            session = Session(graph, profile=True)
            session.run(feeds)
            session.profile.reset()
            for _ in range(n):
                session.run(feeds)
            result["graphopt"][which] = {k: v * 1000 / session.profile.runs
                                         for k, v in session.profile.by_op_type().items()}
    if "onnxruntime" in backends:
        result["onnxruntime"] = {which: _ort_profile(graph, feeds, threads, n)
                                 for which, graph in (("before", before), ("after", after))}
    return result


def plot(result: BenchResult, path: str) -> None:
    """Latency bars per backend and op-type breakdown bars (matplotlib, an optional extra)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise GraphoptError("--plot needs matplotlib: pip install 'graphopt[plot]'", 2) from None
    data = result.to_dict()
    panels = 1 + len(result.profile or {})
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 4), squeeze=False)
    ax = axes[0][0]
    names = list(data["backends"])
    x = np.arange(len(names))
    for offset, which in ((-0.2, "before"), (0.2, "after")):
        ax.bar(x + offset, [data["backends"][n][which]["median_ms"] for n in names], 0.4, label=which)
    ax.set_xticks(x, names)
    ax.set_ylabel("median latency (ms)")
    ax.legend()
    for i, (backend, prof) in enumerate((result.profile or {}).items(), start=1):
        ax = axes[0][i]
        types = sorted(set(prof["before"]) | set(prof["after"]),
                       key=lambda t: -(prof["before"].get(t, 0) + prof["after"].get(t, 0)))[:12]
        y = np.arange(len(types))
        ax.barh(y - 0.2, [prof["before"].get(t, 0) for t in types], 0.4, label="before")
        ax.barh(y + 0.2, [prof["after"].get(t, 0) for t in types], 0.4, label="after")
        ax.set_yticks(y, types)
        ax.invert_yaxis()
        ax.set_xlabel("ms per run")
        ax.set_title(f"op types ({backend})")
        ax.legend()
    fig.tight_layout()
    from graphopt.fsutil import save_figure_atomic
    save_figure_atomic(fig, path)
