"""`graphopt run MODEL`: run a model in graphopt's runtime and print its outputs.

    graphopt run model.onnx --input x=x.npy            # outputs: name, shape, dtype, values
    graphopt run model.onnx --profile --runs 20        # plus time per op type, by share

Inputs not given with --input are synthetic (seeded; a note says so); an input with symbolic
dims then needs --shape NAME=D0,D1,... Bad inputs (no model, unreadable .npy, unknown input
name, wrong dtype or shape) are one-line errors with exit code 2.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from graphopt.errors import UsageError

NAME = "run"
HELP = "run a model in graphopt's runtime; print outputs and, with --profile, time per op type"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL", help="ONNX model file")
    parser.add_argument("--input", action="append", default=[], metavar="NAME=FILE.npy",
                        help="an input from a .npy file (repeatable), or one FILE.npz with all")
    parser.add_argument("--shape", action="append", default=[], metavar="NAME=D0,D1,...",
                        help="shape of a synthetic input (needed for symbolic dims)")
    parser.add_argument("--profile", action="store_true",
                        help="print the time per op type, sorted by share")
    parser.add_argument("--runs", type=int, default=1, metavar="N",
                        help="number of runs (default 1); timings are over all of them")
    parser.add_argument("--seed", type=int, default=0, help="seed of synthetic inputs (default 0)")
    parser.add_argument("--top", type=int, default=None, metavar="K",
                        help="with --profile: show only the K most expensive op types")
    parser.add_argument("--values", type=int, default=6, metavar="K",
                        help="values printed per output (default 6)")


def run(args: argparse.Namespace) -> int:
    from graphopt.feeds import load_feed_files, name_list, parse_shape_options, synthetic_feeds
    from graphopt.onnx_io import load
    from graphopt.runtime import Session

    if args.runs < 1:
        raise UsageError("--runs must be at least 1")
    graph = load(args.model)
    given = load_feed_files(args.input)
    shapes = parse_shape_options(args.shape)
    session = Session(graph, profile=args.profile)
    specs = {spec.name: spec for spec in session.inputs}
    for name in given:
        if name not in specs:
            required = name_list(n for n, spec in specs.items() if not spec.has_default)
            raise UsageError(f"--input {name}: the model has no input {name!r}; its inputs are: "
                             f"{required or 'none'}")
    feeds = dict(given)
    missing = [spec for spec in session.inputs if spec.name not in given and not spec.has_default]
    for spec in missing:
        symbolic = spec.shape is None or any(not isinstance(d, int) for d in spec.shape)
        if symbolic and spec.name not in shapes:
            dims = ",".join("1" if not isinstance(d, int) else str(d) for d in (spec.shape or ()))
            raise UsageError(f"input {spec.name!r} has symbolic dims {spec.describe()}; give "
                             f"--shape {spec.name}={dims} (or --input {spec.name}=FILE.npy)")
    if missing:
        synthetic = synthetic_feeds(graph, {k: v for k, v in shapes.items()
                                            if k in {s.name for s in missing}}, seed=args.seed)
        for spec in missing:
            value = synthetic[spec.name]
            feeds[spec.name] = value
            print(f"note: input {spec.name!r} not given: synthetic {value.dtype}"
                  f"{list(value.shape)} (seed {args.seed})")

    times = []
    outputs: dict = {}
    for _ in range(args.runs):
        start = time.perf_counter()
        outputs = session.run(feeds)
        times.append(time.perf_counter() - start)

    for name, value in outputs.items():
        print(_describe_output(name, value, args.values))
    summary = f"ran {args.runs} time(s): median {statistics.median(times) * 1e3:.2f} ms"
    if args.runs > 1:
        summary += f", min {min(times) * 1e3:.2f} ms"
    print(f"{summary}; peak intermediate memory {session.peak_bytes / 1e6:.2f} MB")
    if args.profile and session.profile is not None:
        print()
        print(session.profile.table(top=args.top))
    return 0


def _describe_output(name: str, value, count: int) -> str:
    if isinstance(value, list):
        return f"{name}: sequence of {len(value)} tensor(s)"
    if value is None:
        return f"{name}: empty optional"
    array = np.asarray(value)
    head = f"{name}: shape {tuple(array.shape)} {array.dtype}"
    if array.ndim == 0:
        return f"{head}  {array.item()!r}"
    flat = array.reshape(-1)[:count]
    with np.printoptions(precision=5, threshold=count, linewidth=200):
        shown = np.array2string(flat, separator=" ")
    if array.size > count:
        shown = shown[:-1] + " ...]"
    return f"{head}  {shown}"
