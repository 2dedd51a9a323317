"""graphopt O3 against onnxruntime's own static quantizer, both run by onnxruntime.

    python benchmarks/quantizer_vs_onnxruntime.py [--models shufflenet,resnext] [--runs 20]

For each model the same calibration inputs go to both quantizers:

- onnxruntime: `quant_pre_process` (its recommended shape inference and graph cleanup), then
  `quantize_static` in its documented CNN recipe: QDQ format, per-channel int8 weights, uint8
  activations, MinMax calibration;
- graphopt: `optimize(graph, "O3")` with its defaults (L2-optimal ranges, per-channel weights,
  selective fp16/fp32 fallback within a 2e-2 error budget, machine-aware 7-bit weights or
  outlier splits on pre-VNNI CPUs).

A third int8 model, onnxruntime's quantizer applied to graphopt's O2 output, separates what the
quantizer decides from what O2's rewrites (which O3 includes) contribute. The int8 models and
the fp32 model (as shipped, onnxruntime at ORT_ENABLE_ALL, which fuses
BatchNorm and activations itself) then run on onnxruntime with one thread: latency (medians of
interleaved runs on the first evaluation batch), accuracy on evaluation inputs disjoint from the
calibration inputs (worst-output relative L2 against fp32, and the model's task metric from
benchmarks/quantization_accuracy.py), and the time each quantizer took.
"""

from __future__ import annotations

import os

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import onnx  # noqa: E402

import graphopt  # noqa: E402
from graphopt import models  # noqa: E402
from graphopt.execution import onnxruntime_session  # noqa: E402
from quantization_accuracy import SIZES, case_for, session_outputs, worst_rel_l2  # noqa: E402

DEFAULT_MODELS = "digits-mlp,ppocr-cls,resnext,shufflenet"
#: Model sizes: resnext at its default size (quantization_accuracy.py uses "small" to keep its
#: own run short; at that size the int8 convs are too small for their speed to show).
BENCH_SIZES = {**SIZES, "resnext": "default"}


def calibration_batches(name: str, model: onnx.ModelProto, calibration) -> list[dict]:
    """The case's calibration inputs as a list of feed dicts (what onnxruntime's reader yields)."""
    if calibration is None:
        calibration = models.example_inputs(name, model, seed=0, batch=16)
    if isinstance(calibration, dict):
        return [calibration]
    return list(calibration)


def ort_quantize(model: onnx.ModelProto, batches: list[dict], folder: Path) -> onnx.ModelProto:
    from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.pending = iter(batches)

        def get_next(self):
            return next(self.pending, None)

    source, prepared, out = folder / "fp32.onnx", folder / "prep.onnx", folder / "ort_int8.onnx"
    onnx.save(model, str(source))
    try:
        quant_pre_process(str(source), str(prepared))
    except Exception:   # noqa: BLE001 - its pre-processing is optional; quantize the original
        prepared = source
    quantize_static(str(prepared), str(out), Reader(), quant_format=QuantFormat.QDQ,
                    per_channel=True, activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8)
    return onnx.load(str(out))


def measure(name: str, runs: int) -> dict:
    size = BENCH_SIZES.get(name, "default")
    model = models.build(name, size=size)
    case = case_for(name)(model)
    batches = calibration_batches(name, model, case.calibration)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        theirs = ort_quantize(model, batches, Path(tmp))
        ort_seconds = time.perf_counter() - start
        o2 = graphopt.load(model)
        graphopt.optimize(o2, "O2")
        theirs_on_o2 = ort_quantize(graphopt.to_model(o2), batches, Path(tmp))
    graph = graphopt.load(model)
    start = time.perf_counter()
    graphopt.optimize(graph, "O3", options={"calibration": case.calibration})
    ours_seconds = time.perf_counter() - start
    protos = {"fp32": model, "onnxruntime int8": theirs, "O2 + ort int8": theirs_on_o2,
              "graphopt O3": graphopt.to_model(graph)}
    sessions = {key: onnxruntime_session(graphopt.load(proto)) for key, proto in protos.items()}
    results = {key: session_outputs(s, case.eval_batches) for key, s in sessions.items()}
    feeds = case.eval_batches[0]
    for s in sessions.values():
        s.run(None, feeds)
    times: dict[str, list[float]] = {key: [] for key in sessions}
    for round_ in range(runs):
        order = list(sessions.items()) if round_ % 2 == 0 else list(reversed(sessions.items()))
        for key, s in order:
            start = time.perf_counter()
            s.run(None, feeds)
            times[key].append(time.perf_counter() - start)
    fp32_ms = statistics.median(times["fp32"]) * 1e3
    row = {"model": name, "size": size, "seconds": {"onnxruntime int8": ort_seconds,
                                                    "graphopt O3": ours_seconds}}
    for key in sessions:
        ms = statistics.median(times[key]) * 1e3
        label, before, after = case.metric(results["fp32"], results[key], protos[key])
        row[key] = {"ms": ms, "speedup": fp32_ms / ms,
                    "rel_l2": worst_rel_l2(results[key], results["fp32"]),
                    "metric": label, "value": after if key != "fp32" else (before or after)}
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=DEFAULT_MODELS)
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()
    print(f"{'model':<12} {'quantizer':<17} {'ms':>8} {'vs fp32':>8} {'rel L2':>9}  "
          f"{'task metric':<26} {'quantize s':>10}")
    for name in [n.strip() for n in args.models.split(",") if n.strip()]:
        try:
            row = measure(name, max(args.runs, 1))
        except models.MissingExtraError as exc:
            print(f"{name:<12} skipped: {exc}")
            continue
        for key in ("fp32", "onnxruntime int8", "O2 + ort int8", "graphopt O3"):
            r = row[key]
            seconds = row["seconds"].get(key)
            metric = f"{r['metric']} {r['value']:.4f}" if r["value"] is not None else r["metric"]
            print(f"{name if key == 'fp32' else '':<12} {key:<17} {r['ms']:>8.2f} "
                  f"{r['speedup']:>7.2f}x {r['rel_l2']:>9.2e}  {metric:<26} "
                  f"{'' if seconds is None else f'{seconds:.1f}':>10}", flush=True)
    print(f"(onnxruntime {__import__('onnxruntime').__version__}, one thread, medians of "
          f"{args.runs} interleaved runs on the first evaluation batch; rel L2 = worst output "
          "against fp32 on the evaluation inputs, disjoint from the calibration inputs)")


if __name__ == "__main__":
    main()
