"""Passes and the pass manager.

A pass is a small class with a `name` and `run(graph, ctx) -> PassResult`; it rewrites the IR and
does no I/O. A pipeline is data: an ordered list of passes and `Fixpoint` groups (a group repeats
until no pass in it changes anything). The manager times every pass, collects its stats, can
disable passes by name (and enable opt-in ones), and verifies after each pass:

- "structural": `Graph.check()` (IR invariants);
- "numeric": the model runs before and after each pass on the same inputs (onnxruntime, the
  oracle; the graphopt runtime where onnxruntime cannot run the model) and the first pass whose
  outputs differ beyond tolerance is named in a `VerificationError`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from graphopt.errors import GraphoptError, IRError
from graphopt.ir import Graph

VERIFY_MODES = ("off", "structural", "numeric")


@dataclass
class PassResult:
    """What a pass did: whether the graph changed, and counts a person can read."""

    changed: bool = False
    stats: dict[str, int] = field(default_factory=dict)

    def count(self, key: str, n: int = 1) -> None:
        """Add `n` to a stat and mark the graph changed."""
        if n:
            self.stats[key] = self.stats.get(key, 0) + n
            self.changed = True

    def merge(self, other: PassResult) -> None:
        self.changed |= other.changed
        for key, n in other.stats.items():
            self.stats[key] = self.stats.get(key, 0) + n


@dataclass
class PassContext:
    """Options and shared services a pass may use (no I/O)."""

    options: dict[str, Any] = field(default_factory=dict)

    def option(self, name: str, default: Any = None) -> Any:
        return self.options.get(name, default)


class Pass:
    """Base class. Subclasses set `name` and implement `run`.

    `recurse_subgraphs`: the manager also runs the pass on every If/Loop/Scan body (innermost
    first), so a pass written for one graph works on nested ones. `changes_numerics`: only
    quantization passes set it; numeric verification then uses their own tolerance.
    `default_enabled`: False for opt-in passes (run only when named in `enable=`).
    """

    name: ClassVar[str] = "pass"
    recurse_subgraphs: ClassVar[bool] = True
    changes_numerics: ClassVar[bool] = False
    #: False for passes in a pipeline that run only when asked for (`enable=`), e.g. a rewrite
    #: that pays on some models and costs on others.
    default_enabled: ClassVar[bool] = True

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        raise NotImplementedError

    def numeric_tolerance(self, ctx: PassContext) -> float | None:
        """For a pass that changes numerics: the relative L2 error per output
        (||after - before|| / ||before||) numeric verification accepts; None accepts any values
        of the right shape and dtype."""
        return None

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"


@dataclass
class Fixpoint:
    """Passes repeated in order until none changes the graph (or `max_iterations` is hit)."""

    name: str
    passes: Sequence[Pass | Fixpoint]
    max_iterations: int = 8


PipelineItem = Pass | Fixpoint


@dataclass
class PassRecord:
    """One execution of one pass."""

    name: str
    group: str | None
    iteration: int
    seconds: float
    changed: bool
    stats: dict[str, int]
    ops_before: int
    ops_after: int

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "group": self.group, "iteration": self.iteration,
                "seconds": round(self.seconds, 6), "changed": self.changed, "stats": self.stats,
                "ops_before": self.ops_before, "ops_after": self.ops_after}


@dataclass
class RunReport:
    """What the pass manager did: every pass execution, totals, and verification results."""

    records: list[PassRecord] = field(default_factory=list)
    seconds: float = 0.0
    ops_before: int = 0
    ops_after: int = 0
    op_types_before: dict[str, int] = field(default_factory=dict)
    op_types_after: dict[str, int] = field(default_factory=dict)
    verify: str = "off"
    verified: bool | None = None
    verify_backend: str | None = None
    verify_note: str = ""
    max_abs_diff: float | None = None

    def stats_by_pass(self) -> dict[str, dict[str, Any]]:
        """Per pass name: total time, executions, and summed stats."""
        summary: dict[str, dict[str, Any]] = {}
        for rec in self.records:
            entry = summary.setdefault(rec.name, {"seconds": 0.0, "runs": 0, "stats": {}})
            entry["seconds"] += rec.seconds
            entry["runs"] += 1
            for key, n in rec.stats.items():
                entry["stats"][key] = entry["stats"].get(key, 0) + n
        return summary

    def to_dict(self) -> dict[str, Any]:
        return {
            "seconds": round(self.seconds, 6),
            "ops_before": self.ops_before, "ops_after": self.ops_after,
            "op_types_before": self.op_types_before, "op_types_after": self.op_types_after,
            "passes": [r.to_dict() for r in self.records],
            "verification": {"mode": self.verify, "passed": self.verified,
                             "backend": self.verify_backend, "note": self.verify_note,
                             "max_abs_diff": self.max_abs_diff},
        }

    def summary_lines(self) -> list[str]:
        """Human summary: one line per pass that changed something."""
        lines = []
        for name, entry in self.stats_by_pass().items():
            if not entry["stats"]:
                continue
            stats = ", ".join(f"{k}={v}" for k, v in sorted(entry["stats"].items()))
            lines.append(f"{name:<28} {entry['seconds'] * 1000:8.1f} ms  {stats}")
        return lines


class VerificationError(GraphoptError):
    """A pass broke the graph (structural) or changed its outputs (numeric)."""

    exit_code = 1


class PassManager:
    """Runs a pipeline over a graph; see the module docstring."""

    def __init__(self, pipeline: Sequence[PipelineItem], *, disable: Iterable[str] = (),
                 enable: Iterable[str] = (), verify: str = "off", verify_feeds: dict[str, np.ndarray] | None = None,
                 rtol: float = 1e-4, atol: float = 1e-5,
                 context: PassContext | None = None) -> None:
        if verify not in VERIFY_MODES:
            raise GraphoptError(f"verify must be one of {', '.join(VERIFY_MODES)}, not {verify!r}", 2)
        self.pipeline = list(pipeline)
        self.disabled = set(disable)
        self.enabled = set(enable)
        for verb, names in (("disable", self.disabled), ("enable", self.enabled)):
            unknown = names - set(self.pass_names())
            if unknown:
                raise GraphoptError(f"cannot {verb} unknown pass(es): {', '.join(sorted(unknown))};"
                                    f" passes are: {', '.join(self.pass_names())}", 2)
        self.verify = verify
        self.verify_feeds = verify_feeds
        self.rtol, self.atol = rtol, atol
        self.ctx = context or PassContext()

    def pass_names(self) -> list[str]:
        names: list[str] = []

        def walk(items: Sequence[PipelineItem]) -> None:
            for item in items:
                if isinstance(item, Fixpoint):
                    walk(item.passes)
                elif item.name not in names:
                    names.append(item.name)
        walk(self.pipeline)
        return names

    def run(self, graph: Graph) -> RunReport:
        report = RunReport(verify=self.verify)
        report.ops_before = graph.count_ops(recursive=True)
        report.op_types_before = graph.op_type_counts()
        oracle = _NumericOracle(graph, self.verify_feeds, self.rtol, self.atol) \
            if self.verify == "numeric" else None
        start = time.perf_counter()
        self._run_items(self.pipeline, graph, report, oracle, group=None)
        report.seconds = time.perf_counter() - start
        report.ops_after = graph.count_ops(recursive=True)
        report.op_types_after = graph.op_type_counts()
        if self.verify == "structural":
            report.verified = True
        elif oracle is not None:
            report.verified = oracle.usable
            report.verify_backend = oracle.backend
            report.verify_note = oracle.note
            report.max_abs_diff = oracle.max_abs_diff
        return report

    def _run_items(self, items: Sequence[PipelineItem], graph: Graph, report: RunReport,
                   oracle: _NumericOracle | None, group: str | None, iteration: int = 0) -> bool:
        changed_any = False
        for item in items:
            if isinstance(item, Fixpoint):
                for i in range(item.max_iterations):
                    if not self._run_items(item.passes, graph, report, oracle, item.name, i):
                        break
                    changed_any = True
                continue
            if item.name in self.disabled or (not item.default_enabled
                                               and item.name not in self.enabled):
                continue
            ops_before = graph.count_ops(recursive=True)
            t0 = time.perf_counter()
            result = self._run_pass(item, graph)
            seconds = time.perf_counter() - t0
            ops_after = graph.count_ops(recursive=True) if result.changed else ops_before
            report.records.append(PassRecord(item.name, group, iteration, seconds, result.changed,
                                             dict(result.stats), ops_before, ops_after))
            if result.changed:
                changed_any = True
                if self.verify != "off":
                    try:
                        graph.check()
                    except IRError as exc:
                        raise VerificationError(f"pass {item.name!r} broke the graph: {exc}") from None
                if oracle is not None:
                    oracle.check(graph, item, item.numeric_tolerance(self.ctx)
                                 if item.changes_numerics else None)
        return changed_any

    def _run_pass(self, p: Pass, graph: Graph) -> PassResult:
        total = PassResult()
        graphs = list(graph.iter_graphs()) if p.recurse_subgraphs else [graph]
        for g in graphs:
            result = p.run(g, self.ctx)
            total.merge(result)
            if result.changed and g.parent is not None and g.owner is not None:
                g.parent.refresh_implicit(g.owner)
        return total


class _NumericOracle:
    """Runs the model after each changing pass and compares with the outputs before it."""

    def __init__(self, graph: Graph, feeds: dict[str, np.ndarray] | None, rtol: float,
                 atol: float) -> None:
        from graphopt.feeds import synthetic_feeds

        self.rtol, self.atol = rtol, atol
        self.feeds = feeds if feeds is not None else synthetic_feeds(graph)
        self.backend: str | None = None
        self.note = ""
        self.max_abs_diff: float | None = 0.0
        self.reference = self._run(graph)
        self.usable = self.reference is not None

    def _run(self, graph: Graph) -> list[np.ndarray] | None:
        from graphopt.execution import run_graph

        outputs, backend, note = run_graph(graph, self.feeds, prefer=self.backend)
        if outputs is None:
            self.note = note
            return None
        self.backend = backend
        return outputs

    def check(self, graph: Graph, p: Pass, tolerance: float | None = None) -> None:
        if not self.usable:
            return
        outputs = self._run(graph)
        if outputs is None:
            raise VerificationError(f"pass {p.name!r} produced a model that {self.backend} cannot "
                                    f"run: {self.note}")
        assert self.reference is not None
        names = graph.outputs
        for name, before, after in zip(names, self.reference, outputs):
            problem = compare_outputs(before, after, self.rtol, self.atol, p.changes_numerics,
                                      tolerance)
            if problem:
                raise VerificationError(f"pass {p.name!r} changed output {name!r}: {problem}")
            if before.dtype.kind in "fc" and before.size and before.shape == after.shape:
                diff = float(np.max(np.abs(before.astype(np.float64) - after.astype(np.float64))))
                if np.isfinite(diff):
                    self.max_abs_diff = max(self.max_abs_diff or 0.0, diff)
        # Later passes are compared with what this one produced (a pass after quantization
        # must keep the quantized outputs, not the float ones).
        self.reference = outputs


def squared_error_terms(reference: np.ndarray, actual: np.ndarray) -> tuple[float, float] | None:
    """(||actual - reference||^2, ||reference||^2) in float64 over the elements that are finite
    in the reference (the parts of a relative L2 error, to pool over batches); None when
    `actual` is not finite where the reference is."""
    e64, a64 = np.asarray(reference, np.float64), np.asarray(actual, np.float64)
    finite = np.isfinite(e64)
    if not np.isfinite(a64[finite]).all():
        return None
    diff = a64[finite] - e64[finite]
    kept = e64[finite]
    return float(np.dot(diff, diff)), float(np.dot(kept, kept))


def compare_outputs(before: np.ndarray, after: np.ndarray, rtol: float, atol: float,
                    lenient: bool = False, rel_l2: float | None = None) -> str:
    """Empty string when `after` matches `before`, else a one-line description of the mismatch.
    `lenient` (a pass that changes numerics): float outputs may move by a relative L2 error of
    at most `rel_l2` (any amount when None); other outputs need only keep shape and dtype."""
    before, after = np.asarray(before), np.asarray(after)
    if before.shape != after.shape:
        return f"shape {before.shape} became {after.shape}"
    if before.dtype != after.dtype:
        return f"dtype {before.dtype} became {after.dtype}"
    if lenient:
        if rel_l2 is None or before.dtype.kind not in "fc" or not before.size:
            return ""
        terms = squared_error_terms(before, after)
        if terms is None:
            return "non-finite values where the reference is finite"
        error = math.sqrt(terms[0]) / (math.sqrt(terms[1]) or 1.0)
        if error > rel_l2:
            return f"relative L2 error {error:.3g} beyond the pass's tolerance {rel_l2:.3g}"
        return ""
    if before.dtype.kind in "fc":
        if not np.allclose(after, before, rtol=rtol, atol=atol, equal_nan=True):
            diff = np.abs(after.astype(np.float64) - before.astype(np.float64))
            return f"max abs diff {np.nanmax(diff):.3g} beyond rtol={rtol:g}, atol={atol:g}"
        return ""
    if not np.array_equal(before, after):
        return f"{int(np.sum(before != after))} of {before.size} elements differ"
    return ""
