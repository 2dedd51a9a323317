"""Subcommands of the `graphopt` CLI, one module each (discovered by graphopt.cli).

A module exposes `NAME`, `HELP`, `add_arguments(parser)` and `run(args) -> int`. Keep heavy
imports inside `run` so that `graphopt --help` stays fast.
"""
