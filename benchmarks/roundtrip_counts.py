"""Count the load -> save round trip over the onnx wheel's models and node tests.

    python benchmarks/roundtrip_counts.py

Prints, per collection: models, how many pass the checker (original, saved), how many onnxruntime
runs, and how many of those give bit-identical outputs after the round trip; then names every
model that does not round-trip.
"""

from __future__ import annotations

import warnings

from graphopt.verify import roundtrip, wheel_file_models, wheel_node_models


def main() -> None:
    warnings.filterwarnings("ignore")
    groups = {"files": wheel_file_models(), "node tests": wheel_node_models()}
    failures = []
    print(f"{'corpus':<12}{'models':>8}{'checker':>9}{'saved ok':>10}{'ort runs':>10}{'identical':>11}")
    for label, entries in groups.items():
        counts = [0, 0, 0, 0]
        for entry in entries:
            outcome = roundtrip(entry.load(), entry.feeds_for)
            counts[0] += outcome.checker_original
            counts[1] += bool(outcome.checker_saved)
            counts[2] += outcome.ort_ran
            counts[3] += bool(outcome.ort_identical)
            if not outcome.ok:
                failures.append((entry.name, outcome.problem))
        print(f"{label:<12}{len(entries):>8}{counts[0]:>9}{counts[1]:>10}{counts[2]:>10}{counts[3]:>11}")
    print(f"models that do not round-trip: {len(failures)}")
    for name, problem in failures:
        print(f"  {name}: {problem}")


if __name__ == "__main__":
    main()
