"""Model inputs: synthetic feeds from input specs, and feeds read from .npy/.npz files.

Shared by numeric verification, `run`, `bench` and `analyze`, so every command makes the same
synthetic inputs for the same model and seed.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import numpy as np

from graphopt.errors import UsageError
from graphopt.ir import Graph, Shape, onnx_to_np_dtype


def feed_names(graph: Graph) -> list[str]:
    """Inputs a caller must feed: graph inputs without an initializer (one with an initializer
    has a default; before IR 4 every weight is listed that way)."""
    return [name for name in graph.inputs if not graph.values[name].is_const]


def name_list(names, limit: int = 8) -> str:
    """Names for a one-line message: the first `limit`, then how many more."""
    names = list(names)
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def parse_shape_options(items: Iterable[str] | None) -> dict[str, tuple[int, ...]]:
    """`NAME=1,3,224,224` options into {name: shape}."""
    shapes: dict[str, tuple[int, ...]] = {}
    for item in items or ():
        name, sep, dims = item.rpartition("=")
        try:
            shape = tuple(int(d) for d in dims.replace("x", ",").split(",") if d.strip())
        except ValueError:
            shape = ()
        if not sep or not name or not shape or any(d < 0 for d in shape):
            raise UsageError(f"--shape {item!r}: expected NAME=D0,D1,... with non-negative "
                             "integer dims, e.g. x=1,3,224,224")
        shapes[name] = shape
    return shapes


def concrete_input_shapes(graph: Graph, shapes: dict[str, tuple[int, ...]] | None = None,
                          default_dim: int = 1) -> dict[str, tuple[int, ...]]:
    """A concrete shape per graph input: from `shapes`, else the declared one with symbolic or
    unknown dims set to `default_dim`."""
    shapes = dict(shapes or {})
    unknown = set(shapes) - set(graph.inputs)
    if unknown:
        raise UsageError(f"--shape names unknown input(s) {name_list(sorted(unknown))}; "
                         f"inputs are: {name_list(feed_names(graph))}")
    result: dict[str, tuple[int, ...]] = {}
    for name in graph.inputs:
        value = graph.values[name]
        if name in shapes:
            declared: Shape | None = value.shape
            if declared is not None and len(declared) != len(shapes[name]):
                raise UsageError(f"--shape {name}: rank {len(shapes[name])} but the model declares "
                                 f"rank {len(declared)}")
            result[name] = shapes[name]
        elif value.shape is None:
            result[name] = ()
        else:
            result[name] = tuple(d if isinstance(d, int) and d >= 0 else default_dim for d in value.shape)
    return result


def synthetic_feeds(graph: Graph, shapes: dict[str, tuple[int, ...]] | None = None,
                    seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded inputs for every non-constant graph input: standard normal floats, zeros for
    integers (always a valid index), alternating booleans."""
    rng = np.random.default_rng(seed)
    feeds: dict[str, np.ndarray] = {}
    for name, shape in concrete_input_shapes(graph, shapes).items():
        value = graph.values[name]
        if value.is_const:
            continue  # an input with an initializer keeps its default
        try:
            dtype = onnx_to_np_dtype(value.dtype) if value.dtype else np.dtype(np.float32)
        except (KeyError, TypeError, ValueError):
            raise UsageError(f"input {name!r} has a type synthetic inputs cannot make; pass it "
                             "with --input") from None
        if dtype.kind == "f":
            feeds[name] = rng.standard_normal(shape).astype(dtype)
        elif dtype.kind in "iu":
            feeds[name] = np.zeros(shape, dtype=dtype)
        elif dtype.kind == "b":
            feeds[name] = (np.arange(int(np.prod(shape))) % 2 == 0).reshape(shape)
        else:
            raise UsageError(f"input {name!r} has dtype {dtype}; pass it with --input")
    return feeds


def read_array_file(path: str | os.PathLike, label: str) -> np.ndarray | dict[str, np.ndarray]:
    """An .npy file's array, or an .npz file's arrays by name (read in full); a UsageError
    starting with `label` when numpy cannot read it."""
    try:
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            return loaded
        with loaded:
            return {k: loaded[k] for k in loaded.files}
    except Exception as exc:  # numpy raises several types for bad files
        raise UsageError(f"{label}: cannot read {path} as .npy/.npz "
                         f"({type(exc).__name__})") from None


def load_feed_files(items: Iterable[str] | None) -> dict[str, np.ndarray]:
    """`--input NAME=FILE.npy` options, or a single `FILE.npz` holding all inputs by name."""
    feeds: dict[str, np.ndarray] = {}
    for item in items or ():
        name, sep, path = item.partition("=")
        if not sep and item.endswith(".npz"):
            path, name = item, ""
        elif not sep:
            raise UsageError(f"--input {item!r}: expected NAME=FILE.npy or FILE.npz")
        if not os.path.isfile(path):
            raise UsageError(f"--input {item!r}: no such file {path}")
        loaded = read_array_file(path, f"--input {item!r}")
        if isinstance(loaded, dict):
            if name:
                raise UsageError(f"--input {item!r}: give an .npz file without NAME=")
            feeds.update(loaded)
        else:
            feeds[name] = loaded
    return feeds


def check_feed_names(graph: Graph, feeds: dict[str, np.ndarray]) -> None:
    unknown = set(feeds) - set(graph.inputs)
    if unknown:
        raise UsageError(f"unknown input name(s) {name_list(sorted(unknown))}; the model's inputs "
                         f"are: {name_list(feed_names(graph))}")
