"""How honest is the cost model? Spearman rank correlation between the roofline's predicted time
per op and the graphopt runtime's profiled time per op.

    python benchmarks/cost_model_accuracy.py [--runs 5] [--threads 1] [--details]

Models: light_resnet50 (1x3x224x224, from the onnx wheel) and PP-OCRv4 det (1x3x640x640, from
rapidocr-onnxruntime; skipped when absent). Both the runtime and the model use `--threads` BLAS
threads (default 1, the machine model's per-core peak). Ops folded at build time (constant
subgraphs) are not compared. As a baseline the table also shows the correlation of FLOPs alone
and of bytes alone with measured time: the roofline should beat both.
"""

from __future__ import annotations

import argparse
import os
import sys


def _set_threads(argv: list[str]) -> int:
    """BLAS reads its thread count when numpy loads: set it before any import of numpy."""
    threads = 1
    for i, arg in enumerate(argv):
        if arg == "--threads" and i + 1 < len(argv):
            threads = int(argv[i + 1])
        elif arg.startswith("--threads="):
            threads = int(arg.split("=", 1)[1])
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(threads)
    return threads


THREADS = _set_threads(sys.argv[1:])

import numpy as np  # noqa: E402

import graphopt  # noqa: E402
from graphopt.commands.analyze import make_feeds  # noqa: E402
from graphopt.cost import CONSTANT, analyze_model  # noqa: E402
from dataclasses import replace  # noqa: E402

from graphopt.machine import Machine, detect_machine, roofline, spearman  # noqa: E402
from graphopt.report import format_table  # noqa: E402


def models() -> list[tuple[str, str, dict]]:
    import onnx

    found = []
    light = os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data", "light",
                         "light_resnet50.onnx")
    if os.path.exists(light):
        found.append(("light_resnet50", light, {"gpu_0/data_0": (1, 3, 224, 224)}))
    try:
        import rapidocr_onnxruntime

        det = os.path.join(os.path.dirname(rapidocr_onnxruntime.__file__), "models",
                           "ch_PP-OCRv4_det_infer.onnx")
        if os.path.exists(det):
            found.append(("ppocr_v4_det", det, {"x": (1, 3, 640, 640)}))
    except ImportError:
        print("rapidocr-onnxruntime not installed: PP-OCR det skipped")
    return found


def variants(machine: Machine) -> list[tuple[str, Machine]]:
    """The roofline with its refinements switched on one by one (ablation): each should help on
    both models, or it is fitting noise."""
    plain = replace(machine, cache_bandwidth=machine.bandwidth, vector_rate=machine.fp32_flops,
                    gather_bandwidth=1e30, gather_bandwidth_strided=1e30)
    cached = replace(plain, cache_bandwidth=machine.cache_bandwidth)
    gathers = replace(cached, gather_bandwidth=machine.gather_bandwidth,
                      gather_bandwidth_strided=machine.gather_bandwidth_strided)
    return [("plain roofline", plain), ("+ cache-aware bw", cached),
            ("+ im2col/gather phase", gathers), ("+ numpy vector rate (full)", machine)]


def measure(path: str, shapes: dict, runs: int) -> tuple[dict[str, float], int]:
    """Median seconds per op over `runs` profiled runs (after a warm-up), and the runtime's
    peak live bytes. The median, not the mean: other processes share the cores."""
    from graphopt.runtime import Session

    graph = graphopt.load(path)
    session = Session(graph, profile=True)
    feeds = make_feeds(graph, shapes, None)
    session.run(feeds)
    samples: dict[str, list[float]] = {}
    for _ in range(runs):
        session.profile.reset()
        session.run(feeds)
        for name, seconds in session.profile.by_op.items():
            samples.setdefault(name, []).append(seconds)
    return {k: float(np.median(v)) for k, v in samples.items()}, session.peak_bytes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--details", action="store_true", help="per-kind error table per model")
    args = parser.parse_args()
    machine = detect_machine()
    print(f"machine: {machine.cpu}, {machine.isa}, fp32 {machine.fp32_flops / 1e9:.1f} GFLOP/s "
          f"per core, {machine.bandwidth / 1e9:.1f} GB/s, op overhead "
          f"{machine.op_overhead * 1e6:.2f} us; BLAS threads {THREADS}; {args.runs} runs\n")
    rows, ablation = [], []
    for name, path, shapes in models():
        cost = analyze_model(graphopt.load(path), shapes)
        measured, peak = measure(path, shapes, args.runs)
        pairs = []
        for c in cost.ops:
            if c.kind == CONSTANT or c.name not in measured:
                continue
            r = roofline(c, machine, threads=THREADS)
            pairs.append((c, r.time, measured[c.name]))
        missing = [c.name for c in cost.ops if c.kind != CONSTANT and c.name not in measured]
        pred = [p for _, p, _ in pairs]
        meas = [m for _, _, m in pairs]
        rho = spearman(pred, meas)
        rho_flops = spearman([c.flops for c, _, _ in pairs], meas)
        rho_bytes = spearman([c.total_bytes for c, _, _ in pairs], meas)
        ablation.append([name] + [
            round(spearman([roofline(c, m, threads=THREADS).time for c, _, _ in pairs], meas), 3)
            for _, m in variants(machine)])
        rows.append([name, len(pairs), round(rho, 3), round(rho_flops, 3), round(rho_bytes, 3),
                     round(sum(pred) * 1e3, 1), round(sum(meas) * 1e3, 1),
                     round(cost.max_live_activation_bytes / 2**20, 1), round(peak / 2**20, 1)])
        if missing:
            print(f"{name}: {len(missing)} ops not in the profile (fused or folded), e.g. "
                  f"{missing[:3]}")
        if args.details:
            print(details(name, pairs))
    print(format_table(rows, ["model", "ops", "spearman", "flops only", "bytes only",
                              "pred ms", "meas ms", "static live MiB", "runtime peak MiB"]))
    print("\nablation: Spearman rho as the roofline's refinements are added")
    print(format_table(ablation, ["model"] + [label for label, _ in variants(machine)]))
    return 0


def details(name: str, pairs) -> str:
    """Per kernel class: op count, predicted and measured ms, median measured/predicted ratio."""
    by_kind: dict[str, list] = {}
    for c, p, m in pairs:
        by_kind.setdefault(c.kind, []).append((p, m))
    rows = []
    for kind, items in sorted(by_kind.items(), key=lambda kv: -sum(m for _, m in kv[1])):
        p = np.array([a for a, _ in items])
        m = np.array([b for _, b in items])
        rho = spearman(p, m) if len(items) > 2 else float("nan")
        rows.append([kind, len(items), round(p.sum() * 1e3, 2), round(m.sum() * 1e3, 2),
                     round(float(np.median(m / p)), 2), round(rho, 3)])
    worst = sorted(pairs, key=lambda t: -abs(np.log(t[2] / t[1])))[:8]
    wrows = [[c.name[-30:], c.op_type, c.kind,
              "x".join(str(v) for v in (c.gemm.M, c.gemm.N, c.gemm.K, c.gemm.groups))
              if c.gemm else "-", round(p * 1e3, 3), round(m * 1e3, 3)] for c, p, m in worst]
    return (f"\n{name}\n" + format_table(rows, ["kind", "ops", "pred ms", "meas ms",
                                                "median meas/pred", "spearman"])
            + "\nlargest misses\n"
            + format_table(wrows, ["op", "type", "kind", "MxNxKxg", "pred ms", "meas ms"]) + "\n")


if __name__ == "__main__":
    sys.exit(main())
