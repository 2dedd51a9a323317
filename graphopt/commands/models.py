"""`graphopt models list|build`: the built-in model families and real-weight models."""

from __future__ import annotations

import argparse

NAME = "models"
HELP = "list or build the built-in models (DLRM, ResNeXt, ShuffleNet, Transformer, PP-OCR, ...)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="models_command", metavar="{list,build}", required=True)
    sub.add_parser("list", help="list model names")
    build = sub.add_parser("build", help="build a model and write it as .onnx")
    build.add_argument("name", help="model name (see `graphopt models list`)")
    build.add_argument("-o", "--output", required=True, metavar="FILE", help="output .onnx path")
    build.add_argument("--size", default="default", choices=["small", "default"])
    build.add_argument("--seed", type=int, default=0)
    build.add_argument("--large", action="store_true",
                       help="DLRM with over 2 GB of tables (written with external data)")
    build.add_argument("--force", action="store_true", help="overwrite an existing file")


def run(args: argparse.Namespace) -> int:
    from graphopt import models
    from graphopt.errors import UsageError
    from graphopt.fsutil import check_output_path

    if args.models_command == "list":
        entries = models.available()
        width = max(len(name) for name, _ in entries)
        for name, description in entries:
            print(f"{name:<{width}}  {description}")
        return 0
    out = check_output_path(args.output)
    if out.exists() and not args.force:
        raise UsageError(f"{out} exists; use --force to overwrite it")
    model = models.build(args.name, size=args.size, seed=args.seed, large=args.large)
    written = models.save(model, out)
    print(f"wrote {written}")
    return 0
