"""What O3's int8 quantization costs in accuracy and saves in weight bytes, per model.

    nice python benchmarks/quantization_accuracy.py                  # default set, ~6 min
    python benchmarks/quantization_accuracy.py --models digits-mlp,dlrm --json quant.json

Each model is optimized twice from the same loaded graph: at O2 (the fp32 reference) and at O3
(calibration on the registry's example inputs, or on rendered text lines for PP-OCR, whose
shipped files name no input size). Both are then run by onnxruntime on evaluation inputs that
are NOT the calibration inputs (other seeds, other digits, other sentences, other text lines),
and the table shows:

- ops int8/fp16/fp32 and int8 embedding tables: what the quantize pass decided (its report);
- weights MB: initializer bytes of the O2 model -> the O3 model (int8 weights, int32 biases,
  fp16 fallbacks, row scales, sparse outlier parts);
- rel L2 O3: ||y_O3 - y_O2|| / ||y_O2|| on the evaluation inputs (onnxruntime both; the worst
  output), to compare with the quantize pass's own error budget (2e-2 by default, measured on
  the calibration batches);
- task metric, fp32 -> int8 where the model has a ground truth (digit accuracy on the held-out
  digits, text-direction accuracy on rendered lines, OCR character accuracy through RapidOCR's
  recogniser), else agreement with fp32: top-1 agreement (CNNs), per-time-step argmax agreement
  (OCR recogniser), cosine of sentence embeddings (MiniLM, the minimum over sentences), rel L2
  of the click probability (DLRM). Top-1 agreement of the random-weight CNNs is mostly a
  measure of ties: their logits are nearly flat (on resnext small, 84% of the evaluation images
  have their two best logits within 2% of the logit vector's norm; on shufflenet all), so a
  rel L2 inside the budget still flips many of them;
- unfused: the same distance with onnxruntime's graph optimizations off, so that its QDQ
  groups run as DequantizeLinear -> float op -> QuantizeLinear: the contract's math with no
  int8 kernel. Where "rel L2 O3" is far above it, onnxruntime's int8 kernels add error of their
  own: on a CPU without VNNI its u8s8 GEMM sums weight*activation pairs in int16 (vpmaddubsw)
  and saturates (benchmarks/int8_kernels.py measures how often);
- rt vs fp32 / rt vs ORT: the graphopt runtime running the same O3 model against the fp32
  output and against onnxruntime's O3 output (its int8 kernels);
- acc16/32: int8 ops by `graphopt.kernel` meta; emb i8/f32: embedding tables made row-wise
  int8 / kept float by the sensitivity search;
- O3 s: wall time of `graphopt.optimize(graph, "O3")` (O2 passes, calibration, sensitivity
  search, rewrite) on this machine.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx
import graphopt
from graphopt import models
from graphopt.execution import onnxruntime_session
from graphopt.onnx_io import weight_bytes
from graphopt.runtime import Session

Feeds = dict[str, np.ndarray]
DEFAULT_MODELS = ("digits-mlp", "minilm", "ppocr-cls", "ppocr-rec", "resnext", "shufflenet",
                  "dlrm", "light-resnet50")
#: Sizes used for the random-weight builders (default sizes keep the run within ~10 minutes).
SIZES = {"resnext": "small", "shufflenet": "default", "dlrm": "default"}

#: Sentences for MiniLM's evaluation: none of them is in minilm.SAMPLE_SENTENCES (calibration).
EVAL_SENTENCES = (
    "The orchestra rehearsed the symphony late into the night.",
    "A violinist tunes her instrument before the concert.",
    "Interest rates were raised by the central bank.",
    "The bank increased its lending rate on Monday.",
    "Two dogs are running through a snowy field.",
    "Compilers rewrite programs to make them run faster.",
    "It rained all weekend, so the picnic was cancelled.",
    "Quantization stores weights as eight-bit integers.",
)
#: Text lines for PP-OCR: calibration and evaluation use disjoint sets.
CALIB_LINES = ("Hello World 2024", "graphopt fuses ops", "The quick brown fox",
               "ONNX runtime 17", "Invoice No. 4711", "Total: 129.50 EUR",
               "batch size 32", "CPU inference")
EVAL_LINES = ("Order 88213 shipped", "Meeting at 10:30 AM", "Room 204, second floor",
              "Pay by 2025-01-31", "Model accuracy 97.5%", "Lorem ipsum dolor",
              "Call +49 30 123456", "Keep out of reach", "Version 3.14 beta",
              "Net weight 500 g", "Hamburg 20095", "quantized int8 model")


@dataclass
class Case:
    """How one model is calibrated and scored."""

    calibration: object                     # the O3 `calibration` option (None: registry's own)
    eval_batches: list[Feeds]
    #: (outputs of O2 per batch, outputs of O3 per batch, O3 model) -> (metric label, fp32
    #: value or None, int8 value); outputs are dicts name -> array (onnxruntime).
    metric: Callable[[list[Feeds], list[Feeds], onnx.ModelProto], tuple[str, float | None, float]]
    size: str = "default"
    notes: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# metrics
# ---------------------------------------------------------------------------------------------
def rel_l2(got: np.ndarray, ref: np.ndarray) -> float:
    ref64, got64 = np.asarray(ref, np.float64), np.asarray(got, np.float64)
    return float(np.linalg.norm(got64 - ref64) / max(np.linalg.norm(ref64), 1e-30))


def stacked(outputs: list[Feeds], name: str | None = None) -> np.ndarray:
    """One output (the first when unnamed) concatenated over the evaluation batches."""
    key = name or next(iter(outputs[0]))
    return np.concatenate([o[key] for o in outputs], axis=0)


def top1_agreement(fp32: list[Feeds], int8: list[Feeds], _model) -> tuple[str, None, float]:
    a, b = stacked(fp32), stacked(int8)
    return "top-1 agree", None, float(np.mean(a.reshape(len(a), -1).argmax(1)
                                              == b.reshape(len(b), -1).argmax(1)))


# ---------------------------------------------------------------------------------------------
# cases
# ---------------------------------------------------------------------------------------------
def digits_case(model: onnx.ModelProto) -> Case:
    """Calibrate on the first 32 held-out digits, score accuracy on the other ~420."""
    from graphopt.models.digits import digits_test_split
    x, y = digits_test_split(0)
    calib, held = slice(0, 32), slice(32, None)

    def accuracy(fp32, int8, _model):
        truth = y[held]
        return ("accuracy", float(np.mean(stacked(fp32).argmax(1) == truth)),
                float(np.mean(stacked(int8).argmax(1) == truth)))
    return Case({"pixels": x[calib]}, [{"pixels": x[held]}], accuracy)


def minilm_case(model: onnx.ModelProto) -> Case:
    from graphopt.models.minilm import tokenize

    def cosine(fp32, int8, _model):
        a = stacked(fp32, "sentence_embedding").astype(np.float64)
        b = stacked(int8, "sentence_embedding").astype(np.float64)
        cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
        return "cosine (min)", None, float(cos.min())
    return Case(None, [tokenize(EVAL_SENTENCES)], cosine)


def text_batch(lines, width: int, flip: list[bool] | None = None) -> np.ndarray:
    """Rendered lines normalised as RapidOCR feeds them, [n, 3, 48, width]; `flip` rotates
    chosen lines by 180 degrees (the direction classifier's other class)."""
    from graphopt.models.ppocr import render_text_line
    images = []
    for i, line in enumerate(lines):
        image = render_text_line(line, 48, width)
        if flip and flip[i]:
            image = image[::-1, ::-1]
        x = (image[..., ::-1].astype(np.float32) / 255.0 - 0.5) / 0.5
        images.append(x.transpose(2, 0, 1))
    return np.ascontiguousarray(np.stack(images))


def ppocr_cls_case(model: onnx.ModelProto) -> Case:
    from graphopt.models.ppocr import load_input_name
    name = load_input_name("ppocr-cls")
    calib_flip = [i % 2 == 1 for i in range(len(CALIB_LINES))]
    eval_flip = [i % 2 == 0 for i in range(len(EVAL_LINES))]
    truth = np.array(eval_flip, dtype=np.int64)    # class 0 = upright, 1 = rotated 180

    def accuracy(fp32, int8, _model):
        return ("direction acc", float(np.mean(stacked(fp32).argmax(1) == truth)),
                float(np.mean(stacked(int8).argmax(1) == truth)))
    return Case({name: text_batch(CALIB_LINES, 192, calib_flip)},
                [{name: text_batch(EVAL_LINES, 192, eval_flip)}], accuracy)


def ppocr_rec_case(model: onnx.ModelProto) -> Case:
    from graphopt.models.ppocr import load_input_name
    name = load_input_name("ppocr-rec")
    case = Case({name: text_batch(CALIB_LINES, 320)}, [{name: text_batch(EVAL_LINES, 320)}],
                lambda fp32, int8, model: _rec_metric(fp32, int8, model, case))
    return case


def _rec_metric(fp32, int8, o3_model, case: Case):
    """Character accuracy of RapidOCR's recogniser on the evaluation lines, shipped model vs the
    O3 file; the per-time-step argmax agreement goes into the notes."""
    import tempfile
    from pathlib import Path

    from graphopt.models.ppocr import ocr_text_accuracy
    steps = float(np.mean(stacked(fp32).argmax(-1) == stacked(int8).argmax(-1)))
    case.notes.append(f"ppocr-rec: per-time-step argmax agreement {steps:.4f}")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "rec.O3.onnx"
        onnx.save(o3_model, str(path))
        before = ocr_text_accuracy(EVAL_LINES, use_det=False)
        after = ocr_text_accuracy(EVAL_LINES, use_det=False, rec_model_path=path)
    return "OCR char acc", before.char_accuracy, after.char_accuracy


def vision_case(name: str, size: str) -> Callable[[onnx.ModelProto], Case]:
    def make(model: onnx.ModelProto) -> Case:
        calib = models.example_inputs(name, model, seed=0, batch=16)
        batches = [models.example_inputs(name, model, seed=s, batch=16) for s in (1, 2)]
        return Case(calib, batches, top1_agreement, size=size)
    return make


def dlrm_case(model: onnx.ModelProto) -> Case:
    def click(fp32, int8, _model):
        return "click prob rel L2", None, rel_l2(stacked(int8), stacked(fp32))
    calib = models.example_inputs("dlrm", model, seed=0, batch=64)
    return Case(calib, [models.example_inputs("dlrm", model, seed=1, batch=256)], click,
                size=SIZES["dlrm"])


def light_case(model: onnx.ModelProto) -> Case:
    """Batch-1 models: 8 calibration images and 16 evaluation images, all synthetic."""
    name = next(i.name for i in model.graph.input
                if i.name not in {t.name for t in model.graph.initializer})
    shape = next(iter(models.light.light_input(model).values())).shape

    def images(seeds):
        return [{name: np.random.default_rng(s).standard_normal(shape).astype(np.float32)}
                for s in seeds]
    return Case(images(range(8)), images(range(100, 116)), top1_agreement)


CASES: dict[str, Callable[[onnx.ModelProto], Case]] = {
    "digits-mlp": digits_case,
    "minilm": minilm_case,
    "ppocr-cls": ppocr_cls_case,
    "ppocr-rec": ppocr_rec_case,
    "resnext": vision_case("resnext", SIZES["resnext"]),
    "shufflenet": vision_case("shufflenet", SIZES["shufflenet"]),
    "dlrm": dlrm_case,
}


def case_for(name: str) -> Callable[[onnx.ModelProto], Case]:
    if name in CASES:
        return CASES[name]
    if name.startswith(models.light.PREFIX):
        return light_case
    raise SystemExit(f"no accuracy case for {name!r}; have {', '.join(CASES)} and light-*")


# ---------------------------------------------------------------------------------------------
# measurement
# ---------------------------------------------------------------------------------------------
def ort_outputs(graph: graphopt.Graph, batches: list[Feeds], *, fuse: bool = True
                ) -> list[Feeds]:
    """onnxruntime's outputs; fuse=False disables its graph optimizations, so QDQ groups run
    as DequantizeLinear + float op + QuantizeLinear (the contract's math, no int8 kernel)."""
    return session_outputs(onnxruntime_session(graph, level="all" if fuse else "disable"),
                           batches)


def session_outputs(session, batches: list[Feeds]) -> list[Feeds]:
    """An onnxruntime session's outputs by name, per batch."""
    names = [o.name for o in session.get_outputs()]
    return [dict(zip(names, session.run(None, feeds))) for feeds in batches]


def worst_rel_l2(got: list[Feeds], ref: list[Feeds]) -> float:
    return max(rel_l2(stacked(got, k), stacked(ref, k)) for k in ref[0])


def measure(name: str) -> dict:
    make_case = case_for(name)
    size = SIZES.get(name, "default")
    model = models.build(name, size=size)
    case = make_case(model)
    o2 = graphopt.load(model)
    graphopt.optimize(o2, "O2")
    o3 = graphopt.load(model)
    start = time.perf_counter()
    report = graphopt.optimize(o3, "O3", options={"calibration": case.calibration})
    seconds = time.perf_counter() - start
    o3_model = graphopt.to_model(o3)
    quant = dict(report.quantization or {})
    kernels = [op.meta.get("graphopt.kernel") for op in o3.ops.values()
               if op.meta.get("graphopt.quant") == "int8"
               and not op.meta.get("graphopt.outlier_of")]
    row_kernels = {"acc16": kernels.count("int8_acc16"), "acc32": kernels.count("int8_acc32"),
                   "outlier_splits": sum(1 for op in o3.ops.values()
                                         if op.meta.get("graphopt.outlier_of"))}
    row = {"model": name, "size": size, "o3_seconds": round(seconds, 2),
           "quantization": quant, "calibration": report.calibration, "kernels": row_kernels,
           "weights_mb_o2": weight_bytes(o2) / 1e6,
           "weights_mb_o3": weight_bytes(o3) / 1e6}
    fp32 = ort_outputs(o2, case.eval_batches)
    int8 = ort_outputs(o3, case.eval_batches)
    row["rel_l2_o3"] = worst_rel_l2(int8, fp32)
    qdq_math = ort_outputs(o3, case.eval_batches, fuse=False)
    row["rel_l2_o3_unfused"] = worst_rel_l2(qdq_math, fp32)
    row["rel_l2_per_output"] = {k: rel_l2(stacked(int8, k), stacked(fp32, k)) for k in fp32[0]}
    label, before, after = case.metric(fp32, int8, o3_model)
    row.update(metric=label, metric_fp32=before, metric_int8=after)
    session = Session(o3)
    ours = [{k: v for k, v in session.run(feeds).items()} for feeds in case.eval_batches]
    row["runtime_vs_ort"] = worst_rel_l2(ours, int8)
    row["runtime_vs_fp32"] = worst_rel_l2(ours, fp32)
    row["runtime_vs_unfused"] = worst_rel_l2(ours, qdq_math)
    row["int8_steps"] = len(getattr(session, "int8_steps", ()) or ())
    row["eval_samples"] = sum(len(next(iter(b.values()))) for b in case.eval_batches)
    row["notes"] = case.notes
    return row


HEADER = (f"{'model':<15} {'ops i8/f16/f32':>14} {'acc16/32':>8} {'emb i8/f32':>10} "
          f"{'weights MB O2->O3':>18} "
          f"{'rel L2 O3':>9} {'unfused':>8} {'task metric':<18} {'fp32':>7} {'int8':>8} "
          f"{'rt vs fp32':>10} {'rt vs ORT':>9} {'O3 s':>6}")


def format_row(row: dict) -> str:
    q = row["quantization"]
    if "skipped" in q:
        ops, emb, kernels = "skipped", "-", "-"
    else:
        ops = f"{q['ops_int8']}/{q['ops_fp16']}/{q['ops_fp32']}"
        emb = f"{q['embeddings_int8']}/{q['embeddings_fp32']}"
        kernels = f"{row['kernels']['acc16']}/{row['kernels']['acc32']}"
    weights = f"{row['weights_mb_o2']:.2f}->{row['weights_mb_o3']:.2f}"
    before = "-" if row["metric_fp32"] is None else f"{row['metric_fp32']:.4f}"
    after = row["metric_int8"]
    after_text = f"{after:.2e}" if "L2" in row["metric"] else f"{after:.4f}"
    name = row["model"] + ("" if row["size"] == "default" else f" ({row['size'][0]})")
    return (f"{name:<15} {ops:>14} {kernels:>8} {emb:>10} {weights:>18} {row['rel_l2_o3']:9.2e} "
            f"{row['rel_l2_o3_unfused']:8.2e} "
            f"{row['metric']:<18} {before:>7} {after_text:>8} {row['runtime_vs_fp32']:10.2e} "
            f"{row['runtime_vs_ort']:9.1e} "
            f"{row['o3_seconds']:6.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS),
                        help="comma-separated registry names (default: %(default)s)")
    parser.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    args = parser.parse_args()
    rows = []
    print(HEADER, flush=True)
    for name in [n.strip() for n in args.models.split(",") if n.strip()]:
        try:
            row = measure(name)
        except models.MissingExtraError as exc:
            print(f"{name:<15} skipped: {exc}", flush=True)
            continue
        except Exception as exc:   # noqa: BLE001 - one model's failure must not end the table
            print(f"{name:<15} failed: {type(exc).__name__}: {exc}", flush=True)
            continue
        rows.append(row)
        print(format_row(row), flush=True)
    print("(rel L2 O3 = onnxruntime O3 vs onnxruntime O2 on evaluation inputs disjoint from the "
          "calibration inputs, worst output; unfused = the same with onnxruntime's graph "
          "optimizations off, so the QDQ groups run as float math (no int8 kernels); rt = the "
          "graphopt runtime on the O3 model, vs ORT = vs onnxruntime's O3 output (its int8 "
          "kernels); acc16/32 = int8 ops per kernel meta; emb = embedding tables int8/kept fp32; "
          "(s) = size small; the O3 budget is 2e-2 on the calibration batches)")
    for row in rows:
        for note in row["notes"]:
            print(note)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2, default=float)


if __name__ == "__main__":
    main()
