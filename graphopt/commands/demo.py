"""`graphopt demo`: optimize a built-in model and show the before/after comparison.

Builds a ShuffleNet-style model (graphopt.models), optimizes it at the highest level graphopt has
with numeric verification, and prints what each pass removed or fused, the per-node decisions,
the before/after latency on both backends and the accuracy delta.
"""

from __future__ import annotations

import argparse

NAME = "demo"
HELP = "optimize a built-in ShuffleNet-style model and compare before/after on both backends"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="shufflenet",
                        help="built-in model to use (see `graphopt models list`)")
    parser.add_argument("--size", default="default", choices=["small", "default"])
    parser.add_argument("--level", default="O3", choices=["O1", "O2", "O3"],
                        help="optimization level (default: the highest)")
    parser.add_argument("--runs", type=int, default=10, help="timed runs per model (default 10)")
    parser.add_argument("--keep", metavar="DIR", help="write before.onnx/after.onnx here")


def run(args: argparse.Namespace) -> int:
    import os
    import tempfile
    from collections import Counter

    import graphopt
    from graphopt import models
    from graphopt.bench import compare
    from graphopt.errors import UsageError
    from graphopt.pipeline import available_level

    if args.runs < 1:
        raise UsageError("--runs must be at least 1")
    model = models.build(args.model, size=args.size, seed=0)
    feeds = models.example_inputs(args.model, model, seed=0)
    before = graphopt.load(model)
    graph = graphopt.load(model)
    ran = available_level(args.level)
    shapes = ", ".join(f"{k} {list(v.shape)}" for k, v in feeds.items())
    print(f"graphopt demo: {args.model} ({args.size}, input {shapes}), level {ran}")
    report = graphopt.optimize(graph, args.level, verify="numeric", verify_feeds=feeds)
    status = "passed" if report.verified else f"skipped ({report.verify_note})"
    print(f"\noptimized in {report.seconds * 1000:.0f} ms: {report.ops_before} -> {report.ops_after} "
          f"ops; numeric verification after every pass on {report.verify_backend or '-'}: {status}")
    print("\nwhat the passes did:")
    for line in report.summary_lines():
        print("  " + line)
    before_counts, after_counts = report.op_types_before, report.op_types_after
    print(f"\n{'op type':<24}{'before':>8}{'after':>8}")
    for op_type in sorted(set(before_counts) | set(after_counts)):
        b, a = before_counts.get(op_type, 0), after_counts.get(op_type, 0)
        marker = "" if a == b else ("  removed" if a == 0 else "  fewer" if a < b else "  more")
        print(f"{op_type:<24}{b:>8}{a:>8}{marker}")
    decisions: Counter[str] = Counter()
    by_name = {op.name: op for op in graph.ops.values()}
    for op in graph.ops.values():
        head = by_name.get(op.meta.get("graphopt.fuse_into", ""))
        if head is not None:
            decisions[f"{op.op_type} runs fused into the preceding {head.op_type}"] += 1
        for key, value in op.meta.items():
            if key.startswith("graphopt.") and key != "graphopt.fuse_into":
                decisions[f"{op.op_type}: {key.removeprefix('graphopt.')}={value}"] += 1
    if decisions:
        print("\nper-node decisions:")
        for text, n in sorted(decisions.items()):
            print(f"  {n:>4} x {text}")
    print(f"\nbefore vs after, {args.runs} interleaved runs each, 1 thread:")
    result = compare(before, graph, feeds, runs=args.runs, warmup=2, threads=1, progress=True)
    print(result.format())
    folder = args.keep or tempfile.mkdtemp(prefix="graphopt-demo-")
    os.makedirs(folder, exist_ok=True)
    models.save(model, os.path.join(folder, "before.onnx"))
    graphopt.save(graph, os.path.join(folder, "after.onnx"))
    print(f"\nmodels written to {folder} (try: graphopt bench {folder}/before.onnx "
          f"{folder}/after.onnx --profile)")
    return 0
