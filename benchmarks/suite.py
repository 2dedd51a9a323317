"""One benchmark over every model graphopt knows: optimize, then compare before and after.

    python benchmarks/suite.py                       # every model, O2, 10 runs each
    python benchmarks/suite.py --models resnext,dlrm --runs 20 --levels O2
    python benchmarks/suite.py --size small          # quick pass over the builders

For each model: build or load it, optimize it at each level, and print one row per level with
node counts, weights, latency before/after on the graphopt runtime and on onnxruntime (one
thread, interleaved runs, medians: graphopt.bench.compare), and accuracy after vs before:
relative L2 of the outputs, top-1 agreement for classifiers, held-out accuracy for digits-mlp,
cosine similarity for MiniLM, and text accuracy through RapidOCR's own pipeline for PP-OCR.
Models whose optional package is missing are listed as skipped.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import platform  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402

import numpy as np  # noqa: E402

import graphopt  # noqa: E402
from graphopt import models  # noqa: E402
from graphopt.bench import compare  # noqa: E402
from graphopt.pipeline import available_level  # noqa: E402
from graphopt.report import format_table  # noqa: E402

DEFAULT_MODELS = ("dlrm", "resnext", "shufflenet", "transformer", "seq2seq-step", "minilm",
                  "digits-mlp", "ppocr-det", "ppocr-rec", "ppocr-cls", "light-resnet50",
                  "light-shufflenet", "light-squeezenet", "light-inception_v2",
                  "light-densenet121")
OCR_LINES = ("graphopt 2026", "Inference at scale", "int8 acc16 kernels", "Hello, world!")


def task_accuracy(name: str, before_path: str, after_path: str, after_graph) -> str:
    """The model's own measure of quality, before -> after."""
    if name == "digits-mlp":
        from graphopt.models.digits import digits_test_split
        from graphopt.runtime import Session

        x, y = digits_test_split()
        before = Session(before_path).run({"pixels": x})["probabilities"]
        after = Session(after_graph).run({"pixels": x})["probabilities"]
        return (f"test acc {np.mean(before.argmax(1) == y):.3f} -> "
                f"{np.mean(after.argmax(1) == y):.3f}")
    if name in ("ppocr-det", "ppocr-rec", "ppocr-cls"):
        from graphopt.models.ppocr import ocr_text_accuracy

        key = {"ppocr-det": "det_model_path", "ppocr-rec": "rec_model_path",
               "ppocr-cls": "cls_model_path"}[name]
        use_det = name == "ppocr-det"
        before = ocr_text_accuracy(OCR_LINES, use_det=use_det)
        after = ocr_text_accuracy(OCR_LINES, use_det=use_det, **{key: after_path})
        return f"text acc {before.char_accuracy:.3f} -> {after.char_accuracy:.3f}"
    return ""


def summarize_accuracy(result) -> str:
    parts = []
    worst_rel = max(a["rel_l2"] for a in result.accuracy.values())
    parts.append(f"relL2 {worst_rel:.1e}")
    top1 = [a["top1_agreement"] for a in result.accuracy.values() if a["top1_agreement"] is not None]
    if top1:
        parts.append(f"top1 {min(top1) * 100:.1f}%")
    cos = min(a["cosine"] for a in result.accuracy.values())
    parts.append(f"cos {cos:.6f}")
    return " ".join(parts)


def bench_model(name: str, size: str, levels: list[str], runs: int, folder: str) -> list[list[str]]:
    try:
        model = models.build(name, size=size, seed=0)
    except models.MissingExtraError as exc:
        return [[name, "-", "skipped", str(exc)[:60]] + [""] * 7]
    feeds = models.example_inputs(name, model, seed=0)
    before_path = os.path.join(folder, f"{name}.onnx")
    models.save(model, before_path)
    rows = []
    for level in levels:
        before = graphopt.load(before_path)
        after = graphopt.load(before_path)
        t0 = time.perf_counter()
        report = graphopt.optimize(after, level)
        opt_s = time.perf_counter() - t0
        after_path = os.path.join(folder, f"{name}.{level}.onnx")
        graphopt.save(after, after_path)
        result = compare(before, after, feeds, runs=runs, warmup=2, threads=1, progress=False)
        timing = result.to_dict()["backends"]
        task = task_accuracy(name, before_path, after_path, after)
        rows.append([
            name, available_level(level), f"{report.ops_before}->{report.ops_after}",
            f"{result.size_bytes['before'] / 1e6:.1f}->{result.size_bytes['after'] / 1e6:.1f}",
            f"{opt_s:.2f}",
            f"{timing['graphopt']['before']['median_ms']:.1f}->{timing['graphopt']['after']['median_ms']:.1f}",
            f"{timing['graphopt']['speedup']:.2f}x",
            f"{timing['onnxruntime']['before']['median_ms']:.1f}->{timing['onnxruntime']['after']['median_ms']:.1f}",
            f"{timing['onnxruntime']['speedup']:.2f}x",
            summarize_accuracy(result),
            task,
        ])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS))
    parser.add_argument("--size", default="default", choices=["small", "default"])
    parser.add_argument("--levels", default="O2", help="comma-separated, e.g. O1,O2")
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    headers = ["model", "level", "nodes", "weights MB", "opt s", "graphopt ms", "speedup",
               "onnxruntime ms", "speedup", "accuracy after vs before", "task accuracy"]
    rows = []
    with tempfile.TemporaryDirectory(prefix="graphopt-suite-") as folder:
        for name in args.models.split(","):
            rows += bench_model(name.strip(), args.size, args.levels.split(","), args.runs, folder)
            print(f"  done: {name}", flush=True)
    print(f"\ngraphopt suite, {time.strftime('%Y-%m-%d')}, {platform.machine()} "
          f"{os.cpu_count()} cores, size {args.size}, {args.runs} interleaved runs, 1 thread")
    print(format_table(rows, headers))


if __name__ == "__main__":
    main()
