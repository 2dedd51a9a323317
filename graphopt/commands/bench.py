"""`graphopt bench BEFORE AFTER`: latency, accuracy, size and where the time went."""

from __future__ import annotations

import argparse

NAME = "bench"
HELP = "compare two models (e.g. before/after optimize): latency on both backends and accuracy"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("before", metavar="BEFORE", help="reference model (.onnx)")
    parser.add_argument("after", metavar="AFTER", help="model to compare (.onnx)")
    parser.add_argument("--backend", default="both", choices=["graphopt", "onnxruntime", "both"])
    parser.add_argument("--runs", type=int, default=20, help="timed runs per model (default 20)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs first (default 2)")
    parser.add_argument("--threads", type=int, default=1, help="threads for both backends (default 1)")
    parser.add_argument("--input", metavar="NAME=FILE.npy", action="append", default=[],
                        help="an input from a .npy file (repeatable), or one .npz with all inputs")
    parser.add_argument("--shape", metavar="NAME=D1,D2,..", action="append", default=[],
                        help="shape of a synthetic input with symbolic dims")
    parser.add_argument("--seed", type=int, default=0, help="seed of synthetic inputs")
    parser.add_argument("--profile", action="store_true",
                        help="per-op-type time before and after, side by side")
    parser.add_argument("--json", metavar="FILE", help="write all results as JSON")
    parser.add_argument("--plot", metavar="FILE.png", help="draw latency and breakdown bars")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def run(args: argparse.Namespace) -> int:
    import json

    import graphopt
    from graphopt.bench import compare, plot
    from graphopt.errors import UsageError
    from graphopt.feeds import (check_feed_names, feed_names, load_feed_files, name_list,
                                parse_shape_options, synthetic_feeds)
    from graphopt.fsutil import check_output_path, write_text_atomic

    if args.runs < 1 or args.threads < 1 or args.warmup < 0:
        raise UsageError("--runs and --threads must be at least 1, --warmup at least 0")
    for path in (args.json, args.plot):
        if path:
            check_output_path(path, inputs=(args.before, args.after))
    before = graphopt.load(args.before)
    after = graphopt.load(args.after)
    if sorted(feed_names(before)) != sorted(feed_names(after)):
        raise UsageError(f"the models have different inputs: {name_list(feed_names(before))} vs "
                         f"{name_list(feed_names(after))}")
    if len(before.outputs) != len(after.outputs):
        raise UsageError("the models have a different number of outputs")
    given = load_feed_files(args.input)
    check_feed_names(before, given)
    feeds = synthetic_feeds(before, parse_shape_options(args.shape), seed=args.seed)
    feeds.update(given)
    backends = ("graphopt", "onnxruntime") if args.backend == "both" else (args.backend,)
    result = compare(before, after, feeds, backends=backends, runs=args.runs, warmup=args.warmup,
                     threads=args.threads, profile=args.profile, progress=not args.no_progress)
    print(f"{args.before} vs {args.after}: {args.runs} interleaved runs, {args.threads} thread(s)")
    print(result.format())
    if args.json:
        write_text_atomic(args.json, json.dumps(result.to_dict(), indent=2) + "\n")
    if args.plot:
        plot(result, args.plot)
    return 0
