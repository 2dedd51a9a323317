"""`graphopt optimize IN -o OUT`: load, run a pipeline, save, and report what changed."""

from __future__ import annotations

import argparse
import json

NAME = "optimize"
HELP = "optimize an ONNX model and write the result"


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


def run(args: argparse.Namespace) -> int:
    import graphopt
    from graphopt.feeds import parse_shape_options, synthetic_feeds
    from graphopt.fsutil import check_output_path, write_text_atomic
    from graphopt.onnx_io import weight_bytes
    from graphopt.pipeline import available_level

    out = check_output_path(args.output, inputs=(args.model,), force=args.force)
    if args.report:
        check_output_path(args.report, inputs=(args.model, args.output), what="report")
    shapes = parse_shape_options(args.shape)
    graph = graphopt.load(args.model)
    size_before = weight_bytes(graph)
    feeds = synthetic_feeds(graph, shapes) if args.verify == "numeric" else None
    report = graphopt.optimize(graph, args.level, disable=args.disable, enable=args.enable,
                               verify=args.verify, verify_feeds=feeds)
    graphopt.save(graph, out, external_data=True if args.external_data else None)
    size_after = weight_bytes(graph)
    ran = available_level(args.level)
    if args.report:
        data = {"input": str(args.model), "output": str(out), "level": args.level,
                "level_run": ran, "size_bytes": {"before": size_before, "after": size_after},
                **report.to_dict(), "decisions": _decisions(graph),
                # Quantization (O3) will record whether calibration data was real or synthetic.
                "calibration": {"source": "none"}}
        write_text_atomic(args.report, json.dumps(data, indent=2) + "\n")
    if not args.quiet:
        level = args.level if ran == args.level else f"{args.level} (runs {ran})"
        print(f"{args.model} -> {out}  level {level}")
        print(f"ops {report.ops_before} -> {report.ops_after}, weights {size_before / 1e6:.2f} MB -> "
              f"{size_after / 1e6:.2f} MB, {report.seconds * 1000:.0f} ms")
        for line in report.summary_lines():
            print("  " + line)
        if report.verify != "off":
            status = {True: "passed", False: "skipped", None: "not run"}[report.verified]
            extra = f" on {report.verify_backend}" if report.verify_backend else ""
            note = f" ({report.verify_note})" if report.verify_note else ""
            print(f"verification ({report.verify}): {status}{extra}{note}")
    return 0


def _decisions(graph) -> list[dict]:
    """Per-op decisions recorded by passes in node meta (graphopt.* keys)."""
    rows = []
    for g in graph.iter_graphs():
        for op in g.ops.values():
            meta = {k: v for k, v in op.meta.items() if k.startswith("graphopt.")}
            if meta:
                rows.append({"name": op.name, "op_type": op.op_type, **meta})
    return rows
