"""Per-op and per-op-type wall time of a Session, accumulated across runs.

The session times each kernel call with `time.perf_counter` and adds it here; `table()` prints
op types sorted by their share of the time, like a fleet-wide operator breakdown: it shows where
a model's time goes before anyone guesses.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Profile:
    #: Seconds per op, keyed by op name (ops without a name get "<OpType>#<id>").
    by_op: dict[str, float] = field(default_factory=dict)
    #: Op name -> op type.
    op_types: dict[str, str] = field(default_factory=dict)
    #: Number of runs accumulated.
    runs: int = 0

    def add(self, op_name: str, op_type: str, seconds: float) -> None:
        self.by_op[op_name] = self.by_op.get(op_name, 0.0) + seconds
        self.op_types[op_name] = op_type

    def reset(self) -> None:
        self.by_op.clear()
        self.op_types.clear()
        self.runs = 0

    def total(self) -> float:
        return sum(self.by_op.values())

    def by_op_type(self) -> dict[str, float]:
        """Seconds per op type, largest first."""
        totals: dict[str, float] = {}
        for name, seconds in self.by_op.items():
            kind = self.op_types[name]
            totals[kind] = totals.get(kind, 0.0) + seconds
        return dict(sorted(totals.items(), key=lambda item: -item[1]))

    def op_type_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for kind in self.op_types.values():
            counts[kind] = counts.get(kind, 0) + 1
        return counts

    def table(self, top: int | None = None) -> str:
        """Op types sorted by share of time: type, op count, total ms, ms per run, % share."""
        totals = self.by_op_type()
        counts = self.op_type_counts()
        grand = sum(totals.values()) or 1.0
        runs = max(self.runs, 1)
        rows = list(totals.items())
        hidden = rows[top:] if top is not None else []
        rows = rows[:top] if top is not None else rows
        width = max([len("op type")] + [len(kind) for kind, _ in rows])
        lines = [f"{'op type':<{width}}  {'count':>5}  {'total ms':>10}  {'ms/run':>9}  {'share':>6}"]
        for kind, seconds in rows:
            lines.append(f"{kind:<{width}}  {counts[kind]:>5}  {seconds * 1e3:>10.2f}  "
                         f"{seconds * 1e3 / runs:>9.3f}  {100 * seconds / grand:>5.1f}%")
        if hidden:
            rest = sum(s for _, s in hidden)
            n_ops = sum(counts[k] for k, _ in hidden)
            label = f"({len(hidden)} more)"
            lines.append(f"{label:<{width}}  {n_ops:>5}  {rest * 1e3:>10.2f}  "
                         f"{rest * 1e3 / runs:>9.3f}  {100 * rest / grand:>5.1f}%")
        lines.append(f"{'total':<{width}}  {len(self.by_op):>5}  {grand * 1e3:>10.2f}  "
                     f"{grand * 1e3 / runs:>9.3f}  100.0%  over {self.runs} run(s)")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "runs": self.runs,
            "total_s": self.total(),
            "by_op": dict(self.by_op),
            "op_types": dict(self.op_types),
            "by_op_type": self.by_op_type(),
        }
