"""Count onnx backend node tests passed by graphopt's runtime and by onnxruntime.

The set: node tests from `onnx.backend.test.loader.load_model_tests(kind="node")` whose FIRST
node's op_type is in the core set of issue 3 (`--ops core`, about 1,050 tests) or is any op
graphopt registers a kernel for (`--ops registered`). Each test runs its in-memory model on each
data set and compares with the test's own rtol/atol, exactly as onnx's BackendTest does. Tests
listed in tests/conformance_exclusions.py are not skipped here: the counts are raw.

    python benchmarks/conformance_counts.py                 # core set, both backends
    python benchmarks/conformance_counts.py --ops registered --failures

A test that fails on a backend is one whose prepare or run raised or whose outputs differ.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import time
import warnings

import numpy as np

from graphopt.runtime.backend import CORE_OPS


def load_cases(ops: str):
    """Node test cases whose first node's op_type is selected."""
    from onnx.backend.test.loader import load_model_tests
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cases = load_model_tests(kind="node")
    if ops == "core":
        wanted = CORE_OPS
    else:
        import graphopt.runtime.kernels  # noqa: F401  (registers every kernel)
        from graphopt.runtime.kernels.registry import registered_ops
        wanted = frozenset(op for domain, op in registered_ops() if domain == "")
    return [c for c in cases if c.model.graph.node and c.model.graph.node[0].op_type in wanted]


def _normalize(item):
    import onnx
    if isinstance(item, onnx.TensorProto):
        return onnx.numpy_helper.to_array(item)
    return item


def passes(backend, case) -> tuple[bool, str]:
    """(passed, one-line reason when not)."""
    from onnx.backend.test.runner import Runner
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            with np.errstate(all="ignore"):
                rep = backend.prepare(case.model, "CPU")
                for inputs, expected in case.data_sets:
                    outputs = rep.run([_normalize(x) for x in inputs])
                    Runner.assert_similar_outputs([_normalize(x) for x in expected], outputs,
                                                  rtol=case.rtol, atol=case.atol)
    except Exception as exc:  # every failure mode counts as a failure here
        first = (str(exc).strip().splitlines() or [""])[0]
        return False, f"{type(exc).__name__}: {first[:160]}"
    return True, ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ops", choices=("core", "registered"), default="core")
    parser.add_argument("--backend", choices=("graphopt", "onnxruntime", "both"), default="both")
    parser.add_argument("--failures", action="store_true", help="list each failing test")
    parser.add_argument("-k", default="", help="only tests whose name contains this")
    args = parser.parse_args(argv)

    cases = [c for c in load_cases(args.ops) if args.k in c.name]
    backends = []
    if args.backend in ("graphopt", "both"):
        import graphopt.runtime.backend as graphopt_backend
        backends.append(("graphopt", graphopt_backend))
    if args.backend in ("onnxruntime", "both"):
        import onnxruntime
        import onnxruntime.backend as ort_backend
        onnxruntime.set_default_logger_severity(4)   # its own logs would drown the counts
        backends.append(("onnxruntime", ort_backend))

    print(f"{len(cases)} node tests whose first op is in the {args.ops} set")
    results: dict[str, dict[str, tuple[bool, str]]] = {}
    for name, backend in backends:
        start = time.perf_counter()
        results[name] = {case.name: passes(backend, case) for case in cases}
        n_pass = sum(ok for ok, _ in results[name].values())
        print(f"{name:12s} passes {n_pass:5d} / {len(cases)}   ({time.perf_counter() - start:.0f} s)")
    if args.failures:
        for name in results:
            print(f"\nfailing on {name}:")
            for test, (ok, why) in sorted(results[name].items()):
                if not ok:
                    print(f"  {test}: {why}")
    if len(results) == 2:
        g, o = results["graphopt"], results["onnxruntime"]
        only_ort = sorted(t for t in g if o[t][0] and not g[t][0])
        print(f"\npassed by onnxruntime but not graphopt: {len(only_ort)}")
        for t in only_ort:
            print(f"  {t}: {g[t][1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
