"""Concat views on and off: time and peak memory of graphopt's runtime, one thread.

    python benchmarks/concat_views.py [--runs 30] [--models light_inception_v2,light_squeezenet]

For each model (onnx's light models, after graphopt O2) two sessions run the same graph, one
with `concat_views=True` (the producers of a Concat write into its output buffer) and one with
it off (every Concat copies its inputs). After a warm-up the runs are interleaved (on, off,
off, on, ...) so that load from other processes hits both alike; the table shows medians of wall time,
the ratio of medians of process CPU time (steadier on a shared machine), peak_bytes of both,
the Concat inputs written in place out of all, and the time the Concat ops themselves took
(from a profiled session of each kind, same runs count).
"""

from __future__ import annotations

import os

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"       # before numpy is imported: one BLAS thread

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import onnx  # noqa: E402

import graphopt  # noqa: E402
from graphopt.runtime import Session  # noqa: E402

LIGHT = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"
DEFAULT = "light_inception_v2,light_densenet121,light_squeezenet"


def _concat_ms(session: Session) -> float:
    """Mean ms per run spent in Concat ops, from a profiled session."""
    profile = session.profile
    return 1e3 * profile.by_op_type().get("Concat", 0.0) / max(profile.runs, 1)


def measure(name: str, runs: int) -> dict:
    graph = graphopt.load(LIGHT / f"{name}.onnx")
    graphopt.optimize(graph, "O2")
    sessions = {flag: Session(graph, concat_views=flag) for flag in (True, False)}
    spec = sessions[True].inputs[0]
    x = np.random.default_rng(0).standard_normal(spec.shape).astype(np.float32)
    feeds = {spec.name: x}
    outputs = {flag: s.run(feeds)[s.outputs[0]] for flag, s in sessions.items()}  # warm-up
    assert np.array_equal(outputs[True], outputs[False]), name
    wall: dict[bool, list[float]] = {True: [], False: []}
    cpu: dict[bool, list[float]] = {True: [], False: []}
    for i in range(runs):
        for flag in ((True, False) if i % 2 else (False, True)):   # neither always goes first
            session = sessions[flag]
            w0, c0 = time.perf_counter(), time.process_time()
            session.run(feeds)
            wall[flag].append(time.perf_counter() - w0)
            cpu[flag].append(time.process_time() - c0)
    profiled = {flag: Session(graph, profile=True, concat_views=flag) for flag in (True, False)}
    for _ in range(max(3, runs // 3)):
        for session in profiled.values():
            session.run(feeds)
    on = sessions[True]
    concats = [op for op in graph.ops.values() if op.op_type == "Concat"]
    return {
        "model": name,
        "placed": sum(len(names) for _, names in on.written_in_place),
        "inputs": sum(len(op.inputs) for op in concats),
        "concats": f"{len(on.written_in_place)}/{len(concats)}",
        "on_ms": 1e3 * statistics.median(wall[True]),
        "off_ms": 1e3 * statistics.median(wall[False]),
        "cpu_ratio": statistics.median(cpu[True]) / statistics.median(cpu[False]),
        "peak_on": on.peak_bytes, "peak_off": sessions[False].peak_bytes,
        "concat_on": _concat_ms(profiled[True]), "concat_off": _concat_ms(profiled[False]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--models", default=DEFAULT)
    args = parser.parse_args()
    rows = [measure(name, args.runs) for name in args.models.split(",")]
    header = (f"{'model (after O2)':22} {'Concats':>8} {'in place':>9} {'on ms':>8} {'off ms':>8} "
              f"{'wall':>6} {'cpu':>6} {'Concat ms on/off':>17} {'peak MB on/off':>15}")
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['model']:22} {r['concats']:>8} {r['placed']:>4}/{r['inputs']:<4} "
              f"{r['on_ms']:8.2f} {r['off_ms']:8.2f} {r['on_ms'] / r['off_ms']:6.3f} "
              f"{r['cpu_ratio']:6.3f} {r['concat_on']:8.2f}/{r['concat_off']:<8.2f} "
              f"{r['peak_on'] / 1e6:7.2f}/{r['peak_off'] / 1e6:<7.2f}")
    print(f"\nmedians of {args.runs} interleaved runs, one BLAS thread; wall and cpu: on / off")


if __name__ == "__main__":
    main()
