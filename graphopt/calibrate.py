"""Calibration: the data quantization is tuned on, and the statistics it is tuned from.

    data = calibration_data(graph, "calib.npz")         # or a folder of .npz, feeds, None
    stats = collect_statistics(graph, data, ["conv1_out", "relu3"])
    stats["relu3"].histogram                            # merged over every batch

Where the data comes from (`calibration_data`):
- a path: an .npz file whose arrays are named by graph input, first axis = samples, or a folder
  of such files (concatenated in name order) and/or of NAME.npy files (one array per input, named
  by the file); samples are cut into batches;
- Python objects: a list of feed dicts (each one batch, used as given), a dict of arrays (first
  axis = samples), or a `CalibrationData`;
- nothing: the model's own example inputs when its metadata names a graphopt model family
  (real token ids, valid embedding indices and bag lengths, images in range), else seeded
  synthetic inputs (`graphopt.feeds.synthetic_feeds`: standard normal floats, zero ids), and
  the report says `"source": "synthetic"`.
Bad data (missing file, missing input, wrong trailing shape, unequal sample counts) is a
one-line UsageError (exit 2).

Statistics (`collect_statistics`) come from running the float graph in the graphopt runtime on
every batch and asking it for the intermediate tensors too (`Session.run(output_names=...)`):
per tensor the min, the max and a histogram with a fixed number of bins whose range grows as
batches arrive (old counts are re-binned into the wider range), so batches merge without
keeping any tensor. Histograms of very large tensors are taken on a strided subset of the
elements (min and max always see everything).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from graphopt.errors import UsageError
from graphopt.feeds import feed_names, name_list, read_array_file, synthetic_feeds
from graphopt.ir import Graph, onnx_to_np_dtype

#: Bins of every activation histogram.
HISTOGRAM_BINS = 2048
#: Histograms of tensors larger than this see a strided subset of this many elements per batch.
HISTOGRAM_MAX_ELEMENTS = 1 << 20
#: Samples of synthetic (or example-input) calibration data when none is given.
DEFAULT_SYNTHETIC_SAMPLES = 16
#: A calibration batch holds about this many input elements (at most MAX_BATCH samples): large
#: enough that a run is not all overhead, small enough that an image model's intermediates fit.
BATCH_ELEMENTS = 1 << 19
MAX_BATCH = 64

Feeds = dict[str, np.ndarray]


@dataclass
class CalibrationData:
    """Batches of feeds, where they came from, and how many samples they hold."""

    batches: list[Feeds]
    source: str                 # "real" (given by the user) or "synthetic"
    samples: int
    origin: str = ""            # e.g. the path, or "example inputs of dlrm"

    def summary(self) -> dict[str, Any]:
        """The report's `calibration` field."""
        return {"source": self.source, "samples": self.samples, "batches": len(self.batches),
                "origin": self.origin}


# ---------------------------------------------------------------------------------------------
# where the data comes from
# ---------------------------------------------------------------------------------------------
def calibration_data(graph: Graph, given: Any = None, *, batch_size: int | None = None,
                     samples: int = DEFAULT_SYNTHETIC_SAMPLES, seed: int = 0,
                     shapes: Mapping[str, Sequence[int]] | None = None) -> CalibrationData:
    """Resolve the `calibration` option (see the module docstring) into batches for `graph`;
    `shapes` (the `--shape` option) pins the inputs of synthetic calibration."""
    if isinstance(given, CalibrationData):
        return given
    if given is None:
        return default_calibration(graph, samples=samples, batch_size=batch_size, seed=seed,
                                   shapes=shapes)
    if isinstance(given, (str, os.PathLike)):
        return load_calibration(graph, given, batch_size=batch_size)
    if isinstance(given, Mapping):
        arrays = {k: np.asarray(v) for k, v in given.items()}
        return _batched(graph, arrays, batch_size, source="real", origin="arrays")
    if isinstance(given, Sequence) and all(isinstance(b, Mapping) for b in given):
        batches = [_checked_feeds(graph, dict(b), f"calibration batch {i}")
                   for i, b in enumerate(given)]
        if not batches:
            raise UsageError("calibration data holds no batches")
        count = sum(batch_samples(b) for b in batches)
        return CalibrationData(batches, "real", count, "feeds")
    raise UsageError(f"calibration data must be a path, a list of feed dicts or a dict of "
                     f"arrays, not {type(given).__name__}")


def load_calibration(graph: Graph, path: str | os.PathLike, *,
                     batch_size: int | None = None) -> CalibrationData:
    """Read an .npz (arrays named by input, first axis = samples) or a folder of .npz files and
    NAME.npy files (the array of input NAME)."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in (".npz", ".npy") and p.is_file())
        if not files:
            raise UsageError(f"--calib {path}: the folder holds no .npz or .npy files")
    elif path.is_file():
        files = [path]
    else:
        raise UsageError(f"--calib {path}: no such file or folder")
    parts: dict[str, list[np.ndarray]] = {}
    for file in files:
        for name, array in _read_arrays(file).items():
            parts.setdefault(name, []).append(array)
    arrays = {}
    for name, pieces in parts.items():
        try:
            arrays[name] = np.concatenate(pieces, axis=0) if len(pieces) > 1 else pieces[0]
        except ValueError:
            raise UsageError(f"--calib {path}: the files disagree on the shape of {name!r}") from None
    return _batched(graph, arrays, batch_size, source="real", origin=str(path), label="--calib")


def _read_arrays(file: Path) -> dict[str, np.ndarray]:
    """An .npz file's arrays by name, or an .npy file's array under the file's stem."""
    loaded = read_array_file(file, "--calib")
    if isinstance(loaded, dict):
        return loaded
    if file.suffix != ".npy":
        raise UsageError(f"--calib {file}: not an .npz archive of arrays by input name")
    return {file.stem: loaded}


def default_calibration(graph: Graph, *, samples: int = DEFAULT_SYNTHETIC_SAMPLES,
                        batch_size: int | None = None, seed: int = 0,
                        shapes: Mapping[str, Sequence[int]] | None = None) -> CalibrationData:
    """The model's example inputs when its metadata names a graphopt model family, else seeded
    synthetic feeds (of the `shapes` given, else of the declared shapes with a symbolic batch
    dim filled in). Both count as synthetic: nobody vouched that they look like real traffic.
    Symbolic dims other than the batch cannot be guessed (an image size, a sequence length):
    a UsageError asks for --shape or real data."""
    pinned = {name: tuple(int(d) for d in shape) for name, shape in (shapes or {}).items()}
    fixed = _fixed_batch(graph)
    per_batch = fixed or batch_size or _auto_batch(graph, samples)
    count = max(1, -(-samples // per_batch))
    example = _example_batches(graph, count, per_batch, seed)
    if example is not None:
        family, batches = example
        return CalibrationData(batches, "synthetic", count * per_batch,
                               f"example inputs of {family}")
    feed_shapes = dict(pinned)
    for name in feed_names(graph):
        shape = graph.values[name].shape
        if name in pinned or not shape:
            continue
        unknown = [d for d in shape[1:] if not (isinstance(d, int) and d >= 0)]
        if unknown:
            raise UsageError(f"input {name!r} has symbolic dims {_describe(shape)} that synthetic "
                             f"calibration cannot guess: give --shape {name}=D0,D1,... (option "
                             "'shapes') or real calibration data (--calib)")
        if fixed is None and not isinstance(shape[0], int):
            feed_shapes[name] = (per_batch,) + tuple(shape[1:])
    batches = [synthetic_feeds(graph, feed_shapes, seed=seed + i) for i in range(count)]
    return CalibrationData(batches, "synthetic", count * per_batch, "synthetic feeds")


def _example_batches(graph: Graph, count: int, batch: int, seed: int
                     ) -> tuple[str, list[Feeds]] | None:
    """Batches from graphopt.models.example_inputs for the family in the model's metadata."""
    info = graph.model
    template = info.template if info is not None else None
    if template is None:
        return None
    meta = {p.key: p.value for p in template.metadata_props}
    family = meta.get("graphopt.models.family")
    if not family:
        return None
    try:
        from graphopt import models
        from graphopt.onnx_io import input_signature
        signature = input_signature(graph)      # the template holds no graph
        batches = [models.example_inputs(family, signature, seed=seed + i, batch=batch)
                   for i in range(count)]
        return family, [_checked_feeds(graph, b, "example inputs") for b in batches]
    except Exception:  # a family whose inputs need more than metadata, or an optional extra
        return None


def _fixed_batch(graph: Graph) -> int | None:
    """The batch size when some fed input fixes its first dim (light models: 1), else None."""
    for name in feed_names(graph):
        shape = graph.values[name].shape
        if shape and isinstance(shape[0], int) and shape[0] > 0:
            return shape[0]
    return None


def _auto_batch(graph: Graph, samples: int) -> int:
    per_sample = 0
    for name in feed_names(graph):
        shape = graph.values[name].shape or ()
        per_sample += int(np.prod([d if isinstance(d, int) and d > 0 else 1 for d in shape[1:]]))
    batch = BATCH_ELEMENTS // max(per_sample, 1)
    return int(max(1, min(batch, MAX_BATCH, samples)))


def _batched(graph: Graph, arrays: dict[str, np.ndarray], batch_size: int | None, *,
             source: str, origin: str, label: str = "calibration data") -> CalibrationData:
    """Cut arrays with samples on the first axis into batches of feeds."""
    needed = feed_names(graph)
    missing = [n for n in needed if n not in arrays]
    if missing:
        raise UsageError(f"{label} {origin}: no array for input(s) {name_list(missing)} "
                         f"(arrays: {name_list(sorted(arrays)) or 'none'})")
    unknown = sorted(set(arrays) - set(graph.inputs))
    if unknown:
        raise UsageError(f"{label} {origin}: array(s) {name_list(unknown)} match no input of "
                         f"the model (inputs: {name_list(needed)})")
    counts = {name: (arrays[name].shape[0] if arrays[name].ndim else -1) for name in needed}
    empty = [name for name, c in counts.items() if c == 0]
    if empty:
        raise UsageError(f"{label} {origin}: no samples in {name_list(empty)} (first axis is 0)")
    if any(c < 1 for c in counts.values()) or len(set(counts.values())) != 1:
        described = ", ".join(f"{n}: {c if c >= 0 else 'a scalar'}" for n, c in counts.items())
        raise UsageError(f"{label} {origin}: every array needs the same number of samples on "
                         f"its first axis ({described})")
    total = next(iter(counts.values()))
    fixed = _fixed_batch(graph)
    size = fixed or batch_size or _auto_batch(graph, total)
    if fixed and total < fixed:
        raise UsageError(f"{label} {origin}: {total} samples, but the model takes batches of "
                         f"exactly {fixed}")
    batches = []
    for start in range(0, total - (total % size if fixed else 0), size):
        feeds = {name: arrays[name][start:start + size] for name in needed}
        batches.append(_checked_feeds(graph, feeds, f"{label} {origin}"))
    used = sum(batch_samples(b) for b in batches)
    return CalibrationData(batches, source, used, origin)


def _checked_feeds(graph: Graph, feeds: Feeds, label: str) -> Feeds:
    """Feeds converted to the inputs' dtypes, with names and static dims checked."""
    needed = feed_names(graph)
    missing = [n for n in needed if n not in feeds]
    if missing:
        raise UsageError(f"{label}: no array for input(s) {name_list(missing)}")
    checked: Feeds = {}
    for name, array in feeds.items():
        if name not in graph.values or not graph.is_input(name):
            raise UsageError(f"{label}: {name!r} is not an input of the model "
                             f"(inputs: {name_list(needed)})")
        value = graph.values[name]
        array = np.asarray(array)
        if value.dtype:
            want = onnx_to_np_dtype(value.dtype)
            if array.dtype != want:
                if array.dtype.kind not in "biuf" or (want.kind in "iub" and array.dtype.kind == "f"):
                    raise UsageError(f"{label}: {name!r} holds {array.dtype}, the model takes {want}")
                array = array.astype(want)
        shape = value.shape
        if shape is not None:
            if array.ndim != len(shape):
                raise UsageError(f"{label}: {name!r} has shape {tuple(array.shape)}, the model "
                                 f"takes rank {len(shape)} ({_describe(shape)})")
            for axis, (dim, want_dim) in enumerate(zip(array.shape, shape)):
                if axis and isinstance(want_dim, int) and want_dim >= 0 and dim != want_dim:
                    raise UsageError(f"{label}: {name!r} has shape {tuple(array.shape)}, the "
                                     f"model takes {_describe(shape)}")
        checked[name] = array
    return checked


def _describe(shape) -> str:
    return "[" + ",".join(str(d) if isinstance(d, int) else (d or "?") for d in shape) + "]"


def batch_samples(feeds: Feeds) -> int:
    """Samples in a batch of feeds: the first axis of its first non-scalar array (1 if none)."""
    for array in feeds.values():
        if np.ndim(array):
            return int(np.shape(array)[0])
    return 1


# ---------------------------------------------------------------------------------------------
# statistics
# ---------------------------------------------------------------------------------------------
@dataclass
class Histogram:
    """Counts over `bins` equal bins spanning [lo, hi]; the span grows as data arrives."""

    lo: float
    hi: float
    counts: np.ndarray

    @property
    def bins(self) -> int:
        return int(self.counts.size)

    @property
    def width(self) -> float:
        return (self.hi - self.lo) / self.bins

    @property
    def edges(self) -> np.ndarray:
        return np.linspace(self.lo, self.hi, self.bins + 1)

    @property
    def centers(self) -> np.ndarray:
        return self.lo + (np.arange(self.bins) + 0.5) * self.width

    @property
    def total(self) -> float:
        return float(self.counts.sum())

    def add(self, x: np.ndarray, x_min: float | None = None, x_max: float | None = None) -> None:
        """Count `x`; widen the span first (re-binning the old counts) if it falls outside."""
        x_min = float(x.min()) if x_min is None else x_min
        x_max = float(x.max()) if x_max is None else x_max
        if x_min < self.lo or x_max > self.hi:
            lo, hi = min(self.lo, x_min), max(self.hi, x_max)
            # Grow by at least a quarter, so a slowly drifting range re-bins a few times only.
            grow = 0.25 * (hi - lo)
            lo = lo - grow if x_min < self.lo else lo
            hi = hi + grow if x_max > self.hi else hi
            self.rebin(lo, hi)
        self._add_within(x)

    def merge(self, other: Histogram) -> None:
        """Add another histogram's counts (re-binned onto this span, widened as needed)."""
        if other.lo < self.lo or other.hi > self.hi:
            self.rebin(min(self.lo, other.lo), max(self.hi, other.hi))
        self.counts += _rebinned(other.counts, other.lo, other.hi, self.lo, self.hi, self.bins)

    def rebin(self, lo: float, hi: float) -> None:
        lo, hi = _span(lo, hi)
        self.counts = _rebinned(self.counts, self.lo, self.hi, lo, hi, self.bins)
        self.lo, self.hi = lo, hi

    def copy(self) -> Histogram:
        return Histogram(self.lo, self.hi, self.counts.copy())

    def _add_within(self, x: np.ndarray) -> None:
        scale = self.bins / (self.hi - self.lo)
        index = ((x.astype(np.float64, copy=False) - self.lo) * scale).astype(np.int64)
        np.clip(index, 0, self.bins - 1, out=index)
        self.counts += np.bincount(index.ravel(), minlength=self.bins)


def _span(lo: float, hi: float) -> tuple[float, float]:
    """A non-empty span (a constant tensor gets a tiny one around its value)."""
    if hi > lo:
        return lo, hi
    pad = max(abs(lo) * 1e-6, 1e-12)
    return lo - pad, hi + pad


def _rebinned(counts: np.ndarray, lo: float, hi: float, new_lo: float, new_hi: float,
              bins: int) -> np.ndarray:
    """Counts moved onto `bins` bins over [new_lo, new_hi] (each old bin by its center)."""
    width = (hi - lo) / counts.size
    centers = lo + (np.arange(counts.size) + 0.5) * width
    index = ((centers - new_lo) * (bins / (new_hi - new_lo))).astype(np.int64)
    np.clip(index, 0, bins - 1, out=index)
    return np.bincount(index, weights=counts, minlength=bins)


@dataclass
class TensorStats:
    """What calibration saw of one tensor."""

    name: str
    min: float
    max: float
    histogram: Histogram
    elements: int = 0
    #: The tensor of the first batch cut to its first sample (kernel selection checks 16-bit
    #: accumulation on it); kept only for the tensors asked for with `keep_sample`.
    sample: np.ndarray | None = None

    def merged_with(self, others: Iterable[TensorStats]) -> TensorStats:
        """The statistics of this tensor and `others` pooled (for tensors sharing qparams)."""
        hist = self.histogram.copy()
        lo, hi, elements = self.min, self.max, self.elements
        for other in others:
            hist.merge(other.histogram)
            lo, hi = min(lo, other.min), max(hi, other.max)
            elements += other.elements
        return TensorStats(self.name, lo, hi, hist, elements)


@dataclass
class CalibrationRun:
    """Statistics per tensor and the float outputs on every batch (in graph output order)."""

    stats: dict[str, TensorStats] = field(default_factory=dict)
    outputs: list[list[np.ndarray]] = field(default_factory=list)


def collect_statistics(graph: Graph, data: CalibrationData, tensors: Iterable[str], *,
                       keep_sample: Iterable[str] = (), session=None) -> CalibrationRun:
    """Run the float graph on every batch; min/max/histogram of each float tensor in `tensors`
    (tensors that are not float, or that the graph does not compute, are left out), the first
    sample of the `keep_sample` tensors, and the graph outputs of every batch."""
    from graphopt.runtime import Session

    session = session or Session(graph)
    wanted = [n for n in dict.fromkeys(tensors) if n in graph.values and not graph.values[n].is_const]
    sampled = set(keep_sample)
    outputs = list(graph.outputs)
    request = list(dict.fromkeys(outputs + wanted))
    run = CalibrationRun()
    for index, feeds in enumerate(data.batches):
        result = session.run(feeds, output_names=request)
        run.outputs.append([np.asarray(result[n]) for n in outputs])
        for name in wanted:
            array = result.get(name)
            if not isinstance(array, np.ndarray) or array.dtype.kind != "f" or not array.size:
                continue
            _observe(run.stats, name, array)
            if index == 0 and name in sampled:
                run.stats[name].sample = np.array(array[:1] if array.ndim >= 3 else array[:64])
        del result
    return run


def _observe(stats: dict[str, TensorStats], name: str, array: np.ndarray) -> None:
    finite = array if np.isfinite(array).all() else array[np.isfinite(array)]
    if not finite.size:
        return
    lo, hi = float(finite.min()), float(finite.max())
    flat = finite.reshape(-1)
    if flat.size > HISTOGRAM_MAX_ELEMENTS:
        flat = flat[:: -(-flat.size // HISTOGRAM_MAX_ELEMENTS)]
    entry = stats.get(name)
    if entry is None:
        hist = Histogram(*_span(lo, hi), np.zeros(HISTOGRAM_BINS))
        hist.add(flat, lo, hi)
        stats[name] = TensorStats(name, lo, hi, hist, int(array.size))
        return
    entry.min, entry.max = min(entry.min, lo), max(entry.max, hi)
    entry.histogram.add(flat, lo, hi)
    entry.elements += int(array.size)
