"""`graphopt optimize IN -o OUT`: load, run a pipeline, save, and report what changed."""

from __future__ import annotations

import argparse
import json
import math
from typing import Any

NAME = "optimize"
HELP = "optimize an ONNX model and write the result"

#: O3 flags -> the `options=` key of graphopt.optimize they set.
QUANT_FLAGS = {"calib": "calibration", "calib_method": "calibration_method",
               "error_budget": "quant_error_budget", "target": "target",
               "sensitivity": "quant_sensitivity"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="IN", help="input .onnx model")
    parser.add_argument("-o", "--output", metavar="OUT", required=True, help="output .onnx path")
    parser.add_argument("--level", default="O2", choices=["O0", "O1", "O2", "O3"],
                        help="optimization level (default O2)")
    parser.add_argument("--verify", nargs="?", const="numeric", default="off",
                        choices=["off", "structural", "numeric"],
                        help="check after each pass: IR invariants (structural) or outputs on "
                             "the same inputs (numeric, the default when the flag is given)")
    parser.add_argument("--report", metavar="FILE.json", help="write a JSON report of every pass")
    parser.add_argument("--disable", metavar="PASS", action="append", default=[],
                        help="skip a pass by name (repeatable)")
    parser.add_argument("--enable", metavar="PASS", action="append", default=[],
                        help="run an opt-in pass of the level (repeatable), e.g. head_split")
    parser.add_argument("--shape", metavar="NAME=D1,D2,..", action="append", default=[],
                        help="concrete shape of an input with symbolic dims (for verification)")
    parser.add_argument("--external-data", action="store_true",
                        help="write weights to OUT.data (automatic for models over 2 GB)")
    parser.add_argument("--force", action="store_true", help="allow OUT to overwrite IN")
    parser.add_argument("--quiet", action="store_true", help="print nothing on success")
    from graphopt.machine import TARGETS
    quant = parser.add_argument_group("quantization (O3 only)")
    quant.add_argument("--calib", metavar="PATH",
                       help="calibration data: an .npz of arrays named by input (samples on the "
                            "first axis), or a folder of .npz / NAME.npy files (default: the "
                            "model's example inputs or synthetic feeds)")
    quant.add_argument("--calib-method", choices=["l2", "minmax", "percentile", "kl"],
                       help="how activation ranges are chosen from the histograms (default l2)")
    quant.add_argument("--error-budget", metavar="FLOAT", type=float,
                       help="relative L2 error the outputs may show (default 2e-2); ops go back "
                            "to fp16/fp32, most sensitive first, until it holds")
    quant.add_argument("--target", choices=list(TARGETS),
                       help="CPU the int8 kernels are chosen for (default auto: this machine)")
    quant.add_argument("--sensitivity", choices=["auto", "always"],
                       help="measure per-op sensitivity only when the all-int8 model misses the "
                            "budget (auto, default) or always")


def run(args: argparse.Namespace) -> int:
    import graphopt
    from graphopt.feeds import parse_shape_options, synthetic_feeds
    from graphopt.fsutil import check_output_path, write_text_atomic
    from graphopt.onnx_io import weight_bytes
    from graphopt.pipeline import available_level

    options = _quantization_options(args)
    out = check_output_path(args.output, inputs=(args.model,), force=args.force)
    if args.report:
        check_output_path(args.report, inputs=(args.model, args.output), what="report")
    shapes = parse_shape_options(args.shape)
    if shapes and args.level == "O3":
        options["shapes"] = shapes      # synthetic calibration and op intensities use them
    graph = graphopt.load(args.model)
    if "calibration" in options:
        # Read and check the data now: a bad file fails before minutes of optimization.
        from graphopt.calibrate import load_calibration
        options["calibration"] = load_calibration(graph, options["calibration"])
    size_before = weight_bytes(graph)
    feeds = synthetic_feeds(graph, shapes) if args.verify == "numeric" else None
    report = graphopt.optimize(graph, args.level, disable=args.disable, enable=args.enable,
                               verify=args.verify, verify_feeds=feeds, options=options)
    graphopt.save(graph, out, external_data=True if args.external_data else None)
    size_after = weight_bytes(graph)
    ran = available_level(args.level)
    if args.report:
        data = {"input": str(args.model), "output": str(out), "level": args.level,
                "level_run": ran, "size_bytes": {"before": size_before, "after": size_after},
                **report.to_dict(), "decisions": _decisions(graph),
                "calibration": report.calibration or {"source": "none", "samples": 0},
                "quantization": _quantization_report(report.quantization, graph)}
        write_text_atomic(args.report, json.dumps(data, indent=2) + "\n")
    if not args.quiet:
        level = args.level if ran == args.level else f"{args.level} (runs {ran})"
        print(f"{args.model} -> {out}  level {level}")
        print(f"ops {report.ops_before} -> {report.ops_after}, weights {size_before / 1e6:.2f} MB -> "
              f"{size_after / 1e6:.2f} MB, {report.seconds * 1000:.0f} ms")
        for line in report.summary_lines():
            print("  " + line)
        if report.quantization is not None:
            print(quantization_line(report.quantization, report.calibration, graph))
        if report.verify != "off":
            status = {True: "passed", False: "skipped", None: "not run"}[report.verified]
            extra = f" on {report.verify_backend}" if report.verify_backend else ""
            note = f" ({report.verify_note})" if report.verify_note else ""
            print(f"verification ({report.verify}): {status}{extra}{note}")
    return 0


def _quantization_options(args: argparse.Namespace) -> dict[str, Any]:
    """The O3 flags given, as `options=` of graphopt.optimize; a usage error below O3."""
    from graphopt.errors import UsageError

    given = {flag: getattr(args, flag) for flag in QUANT_FLAGS if getattr(args, flag) is not None}
    if given and args.level != "O3":
        flags = ", ".join("--" + flag.replace("_", "-") for flag in given)
        raise UsageError(f"{flags} only apply to --level O3 (quantization), not {args.level}")
    budget = given.get("error_budget")
    if budget is not None and not (math.isfinite(budget) and budget > 0):
        raise UsageError(f"--error-budget must be a positive number (relative L2), not {budget}")
    return {QUANT_FLAGS[flag]: value for flag, value in given.items()}


def kernel_counts(graph) -> dict[str, int]:
    """How many quantized ops run with 16-bit and with 32-bit accumulation (op meta
    graphopt.kernel, outlier parts included)."""
    counts = {"acc16": 0, "acc32": 0}
    for g in graph.iter_graphs():
        for op in g.ops.values():
            kernel = op.meta.get("graphopt.kernel", "")
            if kernel.startswith("int8_acc"):
                key = kernel.removeprefix("int8_")
                counts[key] = counts.get(key, 0) + 1
    return counts


def _quantization_report(summary: dict | None, graph) -> dict | None:
    """The report's "quantization": the pass's summary plus the kernel counts (None below O3)."""
    if summary is None:
        return None
    if "skipped" in summary:
        return dict(summary)
    return {**summary, "kernels": kernel_counts(graph)}


def calibration_text(calibration: dict | None) -> str:
    """e.g. 'real (calib.npz), 64 samples' or 'synthetic (example inputs of shufflenet), 18
    samples'."""
    if not calibration or calibration.get("source", "none") == "none":
        return "none"
    origin = calibration.get("origin")
    where = f" ({origin})" if origin else ""
    return f"{calibration['source']}{where}, {calibration.get('samples', 0)} samples"


def quantization_line(summary: dict, calibration: dict | None, graph) -> str:
    """One line for the human summary of an O3 run."""
    if "skipped" in summary:
        return f"quantization: skipped ({summary['skipped']})"
    kernels = kernel_counts(graph)
    budget = summary.get("budget")
    return (f"quantization: ops int8 {summary.get('ops_int8', 0)}, fp16 "
            f"{summary.get('ops_fp16', 0)}, fp32 {summary.get('ops_fp32', 0)}; embeddings int8 "
            f"{summary.get('embeddings_int8', 0)}; error {summary.get('error_rel_l2', 0):.3g} "
            f"rel L2 (budget {budget:.3g}); kernels acc16 {kernels['acc16']}, acc32 "
            f"{kernels['acc32']}; calibration {calibration_text(calibration)}")


def _decisions(graph) -> list[dict]:
    """Per-op decisions recorded by passes in node meta (graphopt.* keys)."""
    rows = []
    for g in graph.iter_graphs():
        for op in g.ops.values():
            meta = {k: v for k, v in op.meta.items() if k.startswith("graphopt.")}
            if meta:
                rows.append({"name": op.name, "op_type": op.op_type, **meta})
    return rows
