"""Buffer liveness and accounting for the runtime.

Two concerns, both about intermediate tensors (weights and graph inputs are never counted):

- Planning (`release_plan`, `inplace_candidates`): after which step each value dies, so that the
  session drops it from its environment right after its last consumer, and which input slots of
  a step hold a value dying there (a candidate buffer for in-place execution).
- Accounting (`LiveBuffers`): bytes of live intermediates while a run goes on, with the peak. A
  buffer shared by several views (a Reshape or Transpose of it, a Split part) is counted once:
  every array is charged to the array owning its memory (its `.base` chain), with a reference
  count of the environment entries pointing into it. The same count tells the session whether a
  dying buffer is still visible through another live tensor (then it must not be overwritten).

And one process-wide setting (`tune_allocator`): keep freed tensor memory in the heap.
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

#: Environment variable that turns `tune_allocator` off ("0", "no", "off", "false").
ALLOCATOR_ENV = "GRAPHOPT_MALLOC_TUNING"
_M_TRIM_THRESHOLD = -1      # glibc mallopt parameters (malloc.h)
_M_MMAP_THRESHOLD = -3
_allocator_tuned: bool | None = None


def tune_allocator() -> bool:
    """Stop glibc malloc from handing big tensors back to the kernel after each run (once per
    process; True when the setting is in effect).

    Why: glibc serves allocations above M_MMAP_THRESHOLD (dynamic, a few MB at most) with a
    fresh mmap and returns them with munmap on free, and trims the heap top above
    M_TRIM_THRESHOLD. A run allocates and frees the same large activations every time, so
    every run page-faults them in again: measured 4,600-5,600 minor faults and ~20 ms of system
    time per run of the PP-OCR detector at 640x640 (~10% of the run). With both thresholds
    raised, freed blocks stay in the heap and the next run reuses them: ~1 fault per run.

    The cost: the process keeps its peak heap instead of returning it to the system between
    runs (the peak itself does not change). The settings are process-wide, so this is a no-op
    off glibc (macOS, Windows, musl) and can be switched off with GRAPHOPT_MALLOC_TUNING=0.
    """
    global _allocator_tuned
    if _allocator_tuned is not None:
        return _allocator_tuned
    _allocator_tuned = False
    if os.environ.get(ALLOCATOR_ENV, "1").strip().lower() in ("0", "no", "off", "false"):
        return False
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    # Older glibc caps the mmap threshold (32 MB on 64-bit): try the large value, then the cap.
    # The trim threshold only alone would be worse (setting it also fixes the mmap threshold at
    # its small default: every large array mmapped anew), so it follows a successful mmap one.
    if not (mallopt(_M_MMAP_THRESHOLD, 1 << 30) or mallopt(_M_MMAP_THRESHOLD, 32 << 20)):
        return False
    _allocator_tuned = bool(mallopt(_M_TRIM_THRESHOLD, (1 << 31) - 1))
    return _allocator_tuned


def owner_of(array: np.ndarray) -> np.ndarray:
    """The array that owns the memory `array` looks at (itself when it owns its data)."""
    while isinstance(array.base, np.ndarray):
        array = array.base
    return array


def _arrays(value: Any) -> Iterable[np.ndarray]:
    """The numpy arrays held by a runtime value (a tensor, a sequence of tensors, or None)."""
    if isinstance(value, np.ndarray):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _arrays(item)


class LiveBuffers:
    """Live intermediate bytes during a run, counted once per owning buffer, and their peak."""

    def __init__(self) -> None:
        self._owners: dict[int, list[int]] = {}  # id(owner) -> [references, nbytes]
        self._external: set[int] = set()         # owners of weights and graph inputs
        self.current = 0
        self.peak = 0

    def reset(self, external: Iterable[Any] = ()) -> None:
        """Start a run; arrays in `external` (weights, feeds) and their views are never counted."""
        self._owners.clear()
        self._external = {id(owner_of(a)) for value in external for a in _arrays(value)}
        self.current = 0
        self.peak = 0

    def add_external(self, values: Iterable[Any]) -> None:
        self._external.update(id(owner_of(a)) for value in values for a in _arrays(value))

    def add_external_ids(self, owner_ids: Iterable[int]) -> None:
        """Owners (by id) known to be weights, precomputed once per plan."""
        self._external.update(owner_ids)

    def add(self, value: Any) -> None:
        """A new environment entry points at `value`."""
        if type(value) is np.ndarray:   # the common case, without the generator
            self._add_array(value)
        else:
            for array in _arrays(value):
                self._add_array(array)

    # add/remove run for every value of every step: kept to an owner lookup and dict work.
    def _add_array(self, array: np.ndarray) -> None:
        array = owner_of(array)
        key = id(array)
        entry = self._owners.get(key)
        if entry is not None:
            entry[0] += 1
        elif key not in self._external:
            nbytes = array.nbytes
            self._owners[key] = [1, nbytes]
            self.current += nbytes
            if self.current > self.peak:
                self.peak = self.current

    def remove(self, value: Any) -> None:
        """An environment entry pointing at `value` was dropped."""
        if not isinstance(value, np.ndarray):  # a sequence or optional (np.memmap is an array)
            for array in _arrays(value):
                self.remove(array)
            return
        key = id(owner_of(value))
        entry = self._owners.get(key)
        if entry is None:
            return
        entry[0] -= 1
        if entry[0] == 0:
            self.current -= entry[1]
            del self._owners[key]

    def references(self, array: np.ndarray) -> int:
        """How many environment entries point into the memory of `array` (external: a lot)."""
        key = id(owner_of(array))
        if key in self._external:
            return 1 << 30
        entry = self._owners.get(key)
        return 0 if entry is None else entry[0]


def last_uses(step_reads: Sequence[Iterable[str]]) -> dict[str, int]:
    """Index of the last step reading each name."""
    last: dict[str, int] = {}
    for index, names in enumerate(step_reads):
        for name in names:
            if name:
                last[name] = index
    return last


def release_plan(step_reads: Sequence[Iterable[str]], step_writes: Sequence[Iterable[str]],
                 keep: Iterable[str]) -> list[tuple[str, ...]]:
    """Per step, the values it produced or read that die right after it.

    A value dies after its last reader; a value nobody reads dies right after the step producing
    it (an unused optional output such as a Dropout mask). Names in `keep` (the requested
    outputs) never die. Only values written by some step are planned: weights and graph inputs
    stay with their owners.
    """
    keep = set(keep)
    produced = {name for names in step_writes for name in names if name}
    last = last_uses(step_reads)
    releases: list[list[str]] = [[] for _ in step_reads]
    for index, names in enumerate(step_writes):
        for name in names:
            if name and name not in keep and name not in last:
                releases[index].append(name)
    for name, index in last.items():
        if name in produced and name not in keep:
            releases[index].append(name)
    return [tuple(dict.fromkeys(r)) for r in releases]


def static_live_bytes(step_writes: Sequence[Iterable[str]], releases: Sequence[Iterable[str]],
                      nbytes: Callable[[str], int], reuses: Sequence[str | None] = ()
                      ) -> list[int]:
    """Per step, an estimate of the live intermediate bytes while it runs: everything alive
    before it plus its outputs (`nbytes` per name, 0 when unknown), before its releases.

    `reuses[i]`: the input whose buffer step i's output is expected to take (in place), or
    None. From static sizes, so views are counted as new buffers (an overestimate); planning
    uses it to compare alternatives, never as the real figure.
    """
    live = 0
    profile = []
    sizes: dict[str, int] = {}
    for index, (writes, release) in enumerate(zip(step_writes, releases)):
        reused = reuses[index] if index < len(reuses) else None
        for name in writes:
            if not name or name in sizes:
                continue
            if reused is not None and reused in sizes:
                sizes[name] = sizes.pop(reused)     # the same buffer under a new name
                reused = None
                continue
            sizes[name] = nbytes(name)
            live += sizes[name]
        profile.append(live)
        for name in release:
            live -= sizes.pop(name, 0)
    return profile


def inplace_candidates(reads: Sequence[str], dying: Iterable[str], owned: set[str],
                       slots: Sequence[int]) -> tuple[int, ...]:
    """Input slots (among those a kernel accepts as `out`) whose value dies at this step and is an
    intermediate this graph produced (never a weight, graph input or outer-scope value)."""
    dying = set(dying)
    return tuple(s for s in slots
                 if s < len(reads) and reads[s] and reads[s] in dying and reads[s] in owned)
