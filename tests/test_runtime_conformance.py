"""onnx's backend node tests (onnx.backend.test, shipped in the onnx wheel) on graphopt's runtime.

Included: every node test whose ops (subgraphs included) all have a graphopt kernel; excluded:
the tests listed with a reason in conformance_exclusions.py. The default run holds the core set
of issue 3 (tests whose first op is in `CORE_OPS`) and every other runnable test that is quick;
tests of ops in `SLOW_OPS` carry the `slow` marker. Counts against onnxruntime:
benchmarks/conformance_counts.py.
"""

from __future__ import annotations

import re
import warnings

import onnx
import onnx.backend.test
import pytest
from onnx.backend.test.loader import load_model_tests

import graphopt.runtime.backend as backend
from conformance_exclusions import EXCLUDED
from graphopt.runtime.backend import CORE_OPS
from graphopt.runtime.kernels.registry import registered_ops

#: First ops whose node tests take long enough to leave the default run (none so far: the whole
#: selection runs in well under a minute).
SLOW_OPS: frozenset[str] = frozenset()


def _ops(graph: onnx.GraphProto) -> set[tuple[str, str]]:
    """(domain, op_type) of every node, subgraphs included."""
    found = set()
    for node in graph.node:
        found.add((node.domain if node.domain != "ai.onnx" else "", node.op_type))
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                found |= _ops(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    found |= _ops(sub)
    return found


def _selection() -> tuple[list[str], list[str]]:
    """(all runnable node test names, the slow ones among them)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cases = load_model_tests(kind="node")
    have = set(registered_ops())
    runnable, slow = [], []
    for case in cases:
        graph = case.model.graph
        if not graph.node or not _ops(graph) <= have:
            continue
        runnable.append(case.name)
        first = graph.node[0].op_type
        if first in SLOW_OPS and first not in CORE_OPS:
            slow.append(case.name)
    return runnable, slow


RUNNABLE, SLOW = _selection()

_backend_test = onnx.backend.test.BackendTest(backend, __name__)
_backend_test.include(r"^(%s)_cpu$" % "|".join(re.escape(name) for name in RUNNABLE))
for _pattern in EXCLUDED:
    _backend_test.exclude(_pattern)

_cases = _backend_test.test_cases
for _name in SLOW:
    for _suffix in ("_cpu", "_cuda"):
        _method = getattr(_cases["OnnxBackendNodeModelTest"], _name + _suffix)
        setattr(_cases["OnnxBackendNodeModelTest"], _name + _suffix, pytest.mark.slow(_method))
globals().update(_cases)


def test_core_set_is_covered():
    """Every op of the issue's core set has a kernel, so its node tests are in the default run."""
    have = {op for domain, op in registered_ops() if domain == ""}
    assert CORE_OPS <= have, sorted(CORE_OPS - have)


def test_every_exclusion_names_some_test_and_gives_a_reason():
    names = [f"{name}_cpu" for name in RUNNABLE]
    for pattern, reason in EXCLUDED.items():
        assert any(re.search(pattern, name) for name in names), f"{pattern!r} matches no test"
        assert len(reason) > 20, pattern
