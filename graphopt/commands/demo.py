"""`graphopt demo`: optimize a built-in model and show the before/after comparison.

Builds a ShuffleNet-style model (graphopt.models), optimizes it at the highest level graphopt has
and prints what each pass removed or fused, the per-node decisions, the before/after latency on
both backends and the accuracy of AFTER against BEFORE on each of them.

The exact passes (O1/O2) are verified numerically after every pass (outputs within rtol 1e-4 on
onnxruntime). Quantization (O3) changes the outputs by design, so it runs as a second step
checked against its error budget instead, and the demo shows the error each backend's int8
kernels actually give on an input that was not in the calibration data.
"""

from __future__ import annotations

import argparse

NAME = "demo"
HELP = "optimize a built-in ShuffleNet-style model and compare before/after on both backends"

#: Seed of the demo's comparison input: calibration uses the example inputs of seeds 0, 1, ...,
#: so the accuracy shown is measured on an image quantization never saw.
HELD_OUT_SEED = 1000
#: Example-input samples the demo calibrates on (`graphopt optimize` uses 16 by default): the
#: per-op sensitivity runs of O3 scale with them, and the demo should take seconds.
DEMO_CALIBRATION_SAMPLES = 8


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="shufflenet",
                        help="built-in model to use (see `graphopt models list`)")
    parser.add_argument("--size", default="default", choices=["small", "default"])
    parser.add_argument("--level", default="O3", choices=["O1", "O2", "O3"],
                        help="optimization level (default: the highest)")
    parser.add_argument("--runs", type=int, default=10, help="timed runs per model (default 10)")
    parser.add_argument("--threads", type=int, default=1,
                        help="BLAS/onnxruntime threads for optimizing and timing (default 1)")
    parser.add_argument("--calib-samples", type=int, default=DEMO_CALIBRATION_SAMPLES,
                        help=f"example inputs O3 calibrates on (default "
                             f"{DEMO_CALIBRATION_SAMPLES}; more is slower)")
    parser.add_argument("--keep", metavar="DIR", help="write before.onnx/after.onnx here")


def run(args: argparse.Namespace) -> int:
    import os
    import tempfile

    import graphopt
    from graphopt import models
    from graphopt.bench import blas_threads, compare
    from graphopt.errors import UsageError
    from graphopt.pipeline import available_level

    if args.runs < 1 or args.threads < 1 or args.calib_samples < 1:
        raise UsageError("--runs, --threads and --calib-samples must be at least 1")
    model = models.build(args.model, size=args.size, seed=0)
    feeds = models.example_inputs(args.model, model, seed=HELD_OUT_SEED)
    before = graphopt.load(model)
    graph = graphopt.load(model)
    ran = available_level(args.level)
    shapes = ", ".join(f"{k} {list(v.shape)}" for k, v in feeds.items())
    print(f"graphopt demo: {args.model} ({args.size}, input {shapes}), level {ran}")
    with blas_threads(args.threads):
        exact, quantized = _optimize(graph, ran, feeds, args.calib_samples)
    seconds = exact.seconds + (quantized.seconds if quantized else 0.0)
    status = "passed" if exact.verified else f"skipped ({exact.verify_note})"
    print(f"\noptimized in {seconds * 1000:.0f} ms: {exact.ops_before} -> "
          f"{(quantized or exact).ops_after} ops; numeric verification after every pass on "
          f"{exact.verify_backend or '-'}: {status}"
          + (" (quantization: checked against its error budget, below)" if quantized else ""))
    print("\nwhat the passes did:")
    for line in exact.summary_lines() + (quantized.summary_lines() if quantized else []):
        print("  " + line)
    _print_op_types(exact.op_types_before, (quantized or exact).op_types_after)
    _print_decisions(graph)
    if quantized is not None:
        _print_quantization(graph, quantized)
    print(f"\nbefore vs after, {args.runs} interleaved runs each, {args.threads} thread(s), "
          f"on an input outside the calibration data:")
    result = compare(before, graph, feeds, runs=args.runs, warmup=2, threads=args.threads,
                     progress=True)
    print(result.format())
    if quantized is not None:
        print("(int8 speed is onnxruntime's column: the graphopt runtime computes int8 exactly "
              "through float32 BLAS and models\n 16-bit accumulation's saturation bit for bit, "
              "so on it int8 runs slower than float32; it is the reference, not the fast path)")
    if quantized is not None and quantized.quantization and "budget" in quantized.quantization:
        budget = quantized.quantization["budget"]
        worst = {backend: max((acc["rel_l2"] for acc in table.values()), default=0.0)
                 for backend, table in result.accuracy_by_backend.items()}
        text = ", ".join(f"{backend} {error:.3g}" for backend, error in worst.items())
        over = [backend for backend, error in worst.items() if error > budget]
        verdict = (f"this input is over it on {', '.join(over)}" if over
                   else "this input is within it on every backend")
        print(f"\nquantization error on this input (rel L2, worst output): {text}; the budget "
              f"{budget:.3g} holds on the calibration samples, {verdict}")
    folder = args.keep or tempfile.mkdtemp(prefix="graphopt-demo-")
    os.makedirs(folder, exist_ok=True)
    models.save(model, os.path.join(folder, "before.onnx"))
    graphopt.save(graph, os.path.join(folder, "after.onnx"))
    print(f"\nmodels written to {folder} (try: graphopt bench {folder}/before.onnx "
          f"{folder}/after.onnx --profile)")
    return 0


def _optimize(graph, level: str, feeds, calib_samples: int):
    """The exact passes with numeric verification, then (O3) quantization checked by its
    budget. Returns (report of the exact passes, report of the O3 run or None)."""
    import graphopt
    from graphopt.calibrate import default_calibration

    exact_level = "O2" if level == "O3" else level
    exact = graphopt.optimize(graph, exact_level, verify="numeric", verify_feeds=feeds)
    if level != "O3":
        return exact, None
    # The O2 passes run again inside O3 and find nothing left to do.
    calibration = default_calibration(graph, samples=calib_samples)
    quantized = graphopt.optimize(graph, "O3", verify="structural",
                                  options={"calibration": calibration})
    return exact, quantized


def _print_op_types(before_counts, after_counts) -> None:
    print(f"\n{'op type':<24}{'before':>8}{'after':>8}")
    for op_type in sorted(set(before_counts) | set(after_counts)):
        b, a = before_counts.get(op_type, 0), after_counts.get(op_type, 0)
        marker = "" if a == b else ("  removed" if a == 0 else "  fewer" if a < b else "  more")
        print(f"{op_type:<24}{b:>8}{a:>8}{marker}")


#: Meta keys the quantization table shows, or that differ per op (numbers, sentences).
_QUANT_KEYS = {"graphopt.quant", "graphopt.kernel", "graphopt.reason", "graphopt.sensitivity",
               "graphopt.op_intensity", "graphopt.outlier_of"}


def _print_decisions(graph) -> None:
    """Fusion decisions (and any other per-node meta) counted by op type and value."""
    from collections import Counter

    decisions: Counter[str] = Counter()
    by_name = {op.name: op for op in graph.ops.values()}
    for op in graph.ops.values():
        head = by_name.get(op.meta.get("graphopt.fuse_into", ""))
        if head is not None:
            decisions[f"{op.op_type} runs fused into the preceding {head.op_type}"] += 1
        for key, value in op.meta.items():
            if key.startswith("graphopt.") and key != "graphopt.fuse_into" \
                    and key not in _QUANT_KEYS:
                decisions[f"{op.op_type}: {key.removeprefix('graphopt.')}={value}"] += 1
    if decisions:
        print("\nper-node decisions:")
        for text, n in sorted(decisions.items()):
            print(f"  {n:>4} x {text}")


def _print_quantization(graph, report) -> None:
    """The O3 summary: error vs budget, calibration, precision x kernel per op type, and why
    the ops kept in float were kept."""
    from collections import Counter

    from graphopt.commands.optimize import calibration_text
    from graphopt.report import format_table

    summary = report.quantization or {}
    print("\nquantization (O3):")
    if "skipped" in summary:
        print(f"  skipped: {summary['skipped']}")
        return
    print(f"  model error {summary['error_rel_l2']:.3g} rel L2 on {summary['eval_samples']} "
          f"calibration samples (all-int8: {summary['error_all_int8']:.3g}), budget "
          f"{summary['budget']:.3g}; {summary['evaluations']} evaluations, "
          f"{summary['seconds']:.1f} s")
    print(f"  calibration: {calibration_text(report.calibration)}, {summary['method']} ranges")
    rows: Counter[tuple[str, str, str]] = Counter()
    kept = []
    for op in graph.topological_ops():
        quant = op.meta.get("graphopt.quant")
        if not quant:
            continue
        kernel = op.meta.get("graphopt.kernel", "-")
        if op.meta.get("graphopt.outlier_of"):
            kernel += " (outlier part)"
        rows[(op.op_type, quant, kernel)] += 1
        if quant in ("fp16", "fp32"):
            kept.append((_number(op.meta.get("graphopt.sensitivity")), op.name,
                         op.meta.get("graphopt.reason", "")))
    table = [[op_type, quant, kernel, n] for (op_type, quant, kernel), n in sorted(rows.items())]
    print("  " + format_table(table, ["op type", "precision", "kernel", "ops"]).replace("\n", "\n  "))
    if kept:
        print(f"  kept in float ({len(kept)}), most sensitive first:")
        kept.sort(key=lambda item: -item[0])
        for _, name, reason in kept[:5]:
            print(f"    {name}: {reason.split(';')[0]}")
        if len(kept) > 5:
            print(f"    ... and {len(kept) - 5} more (see --report of `graphopt optimize`)")


def _number(text: str | None) -> float:
    try:
        return float(text or 0.0)
    except ValueError:
        return 0.0
