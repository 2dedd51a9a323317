"""`graphopt demo`: optimize a built-in model and show what every pass did."""

from __future__ import annotations

import argparse

NAME = "demo"
HELP = "optimize a built-in ShuffleNet-style model and print what changed"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="shufflenet",
                        help="built-in model to use (see `graphopt models list`)")
    parser.add_argument("--size", default="small", choices=["small", "default"])
    parser.add_argument("--level", default="O3", choices=["O1", "O2", "O3"])
    parser.add_argument("--keep", metavar="DIR", help="also write before.onnx/after.onnx here")


def run(args: argparse.Namespace) -> int:
    import os
    import tempfile

    import graphopt
    from graphopt import models
    from graphopt.pipeline import available_level

    model = models.build(args.model, size=args.size, seed=0)
    feeds = models.example_inputs(args.model, model, seed=0)
    graph = graphopt.load(model)
    before_counts = graph.op_type_counts()
    ran = available_level(args.level)
    print(f"graphopt demo: {args.model} ({args.size}), level {ran}")
    report = graphopt.optimize(graph, args.level, verify="numeric", verify_feeds=feeds)
    print(f"ops {report.ops_before} -> {report.ops_after} in {report.seconds * 1000:.0f} ms")
    for line in report.summary_lines():
        print("  " + line)
    after_counts = graph.op_type_counts()
    print(f"{'op type':<24}{'before':>8}{'after':>8}")
    for op_type in sorted(set(before_counts) | set(after_counts)):
        b, a = before_counts.get(op_type, 0), after_counts.get(op_type, 0)
        print(f"{op_type:<24}{b:>8}{a:>8}")
    status = "passed" if report.verified else f"skipped ({report.verify_note})"
    print(f"numeric verification on {report.verify_backend or '-'}: {status}, "
          f"max abs diff {report.max_abs_diff if report.max_abs_diff is not None else '-'}")
    folder = args.keep or tempfile.mkdtemp(prefix="graphopt-demo-")
    os.makedirs(folder, exist_ok=True)
    models.save(model, os.path.join(folder, "before.onnx"))
    graphopt.save(graph, os.path.join(folder, "after.onnx"))
    print(f"models written to {folder}")
    return 0
