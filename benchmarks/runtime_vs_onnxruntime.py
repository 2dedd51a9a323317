"""graphopt's runtime against onnxruntime: fp32, batch 1, one thread each.

    python benchmarks/runtime_vs_onnxruntime.py [--runs 20] [--models resnet50,det] [--o2] [--profile]

Both runtimes run the model as loaded (no graphopt passes; onnxruntime at ORT_ENABLE_ALL, its
normal setting, which folds BatchNormalization into Conv and fuses activations). With --o2 a
third runner joins: graphopt's runtime on the graph after graphopt's own O2 pipeline (the same
kinds of rewrites), still against onnxruntime on the original model. After a warm-up, the runs of the two are interleaved (graphopt, onnxruntime,
graphopt, ...) so that load from other processes hits both alike; the table shows medians, the
ratio graphopt / onnxruntime (target <= 1.5) and the relative L2 distance between the outputs.
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
import onnxruntime as ort  # noqa: E402

import graphopt  # noqa: E402
from graphopt.runtime import Session  # noqa: E402

LIGHT = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"


def _ppocr(name: str) -> Path | None:
    try:
        import rapidocr_onnxruntime
    except ImportError:
        return None
    return Path(rapidocr_onnxruntime.__file__).parent / "models" / name


MODELS = {
    "resnet50": (lambda: LIGHT / "light_resnet50.onnx", (1, 3, 224, 224)),
    "shufflenet": (lambda: LIGHT / "light_shufflenet.onnx", (1, 3, 224, 224)),
    "det": (lambda: _ppocr("ch_PP-OCRv4_det_infer.onnx"), (1, 3, 640, 640)),
    "rec": (lambda: _ppocr("ch_PP-OCRv4_rec_infer.onnx"), (1, 3, 48, 320)),
    "cls": (lambda: _ppocr("ch_ppocr_mobile_v2.0_cls_infer.onnx"), (1, 3, 48, 192)),
}
DEFAULT = "resnet50,shufflenet,det,rec"


def ort_session(path: Path) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1e3


def bench(name: str, runs: int, warmup: int, profile: bool, o2: bool) -> dict | None:
    locate, shape = MODELS[name]
    path = locate()
    if path is None or not path.exists():
        print(f"{name}: skipped (model not installed)")
        return None
    x = np.random.default_rng(0).random(shape, dtype=np.float32)
    runners = {"graphopt": Session(str(path))}
    if o2:
        from graphopt.pipeline import optimize
        graph = graphopt.load(str(path))
        optimize(graph, "O2")
        runners["graphopt_o2"] = Session(graph)
    theirs = ort_session(path)
    feed_name = runners["graphopt"].inputs[0].name
    ort_name = theirs.get_inputs()[0].name
    calls = {key: (lambda s=s: s.run({feed_name: x})) for key, s in runners.items()}
    calls["onnxruntime"] = lambda: theirs.run(None, {ort_name: x})
    for _ in range(warmup):
        for call in calls.values():
            call()
    y_ours = next(iter(runners["graphopt"].run({feed_name: x}).values()))
    y_theirs = theirs.run(None, {ort_name: x})[0]
    wall = {key: [] for key in calls}
    cpu = {key: [] for key in calls}
    for _ in range(runs):
        for key, call in calls.items():       # interleaved: load from other jobs hits all alike
            start, cpu_start = time.perf_counter(), time.thread_time()
            call()
            wall[key].append(time.perf_counter() - start)
            cpu[key].append(time.thread_time() - cpu_start)
    diff = float(np.linalg.norm(y_ours - y_theirs) / max(np.linalg.norm(y_theirs), 1e-30))
    row = {"model": name, "shape": "x".join(map(str, shape)), "rel_l2": diff,
           "graphopt_ms": _median_ms(wall["graphopt"]),
           "onnxruntime_ms": _median_ms(wall["onnxruntime"])}
    row["ratio"] = row["graphopt_ms"] / row["onnxruntime_ms"]
    row["cpu_ratio"] = statistics.median(cpu["graphopt"]) / statistics.median(cpu["onnxruntime"])
    if o2:
        row["o2_ms"] = _median_ms(wall["graphopt_o2"])
        row["o2_ratio"] = row["o2_ms"] / row["onnxruntime_ms"]
        row["o2_cpu_ratio"] = statistics.median(cpu["graphopt_o2"]) / statistics.median(cpu["onnxruntime"])
    if profile:
        prof = Session(str(path), profile=True)
        for _ in range(max(3, runs // 4)):
            prof.run({feed_name: x})
        print(f"\n{name} — graphopt time by op type\n{prof.profile.table(top=15)}\n")
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--models", default=DEFAULT, help=f"comma list of {', '.join(MODELS)}")
    parser.add_argument("--o2", action="store_true",
                        help="also time graphopt's runtime on the graph after graphopt's O2 passes")
    parser.add_argument("--profile", action="store_true", help="also print graphopt's op-type profile")
    args = parser.parse_args()
    rows = [r for r in (bench(m, max(args.runs, 1), args.warmup, args.profile, args.o2)
                        for m in args.models.split(",")) if r]
    extra = f"{'O2 ms':>9}{'O2 ratio':>10}{'O2 cpu':>8}" if args.o2 else ""
    print(f"{'model':<12}{'input':<14}{'graphopt ms':>13}{'onnxruntime ms':>16}{'ratio':>8}"
          f"{'cpu ratio':>11}{extra}{'rel L2':>10}")
    for r in rows:
        extra = (f"{r['o2_ms']:>9.1f}{r['o2_ratio']:>10.2f}{r['o2_cpu_ratio']:>8.2f}"
                 if args.o2 else "")
        print(f"{r['model']:<12}{r['shape']:<14}{r['graphopt_ms']:>13.1f}{r['onnxruntime_ms']:>16.1f}"
              f"{r['ratio']:>8.2f}{r['cpu_ratio']:>11.2f}{extra}{r['rel_l2']:>10.1e}")
    print(f"({args.runs} interleaved runs after {args.warmup} warm-up; one thread each; "
          f"onnxruntime {ort.__version__} at ORT_ENABLE_ALL)")


if __name__ == "__main__":
    main()
