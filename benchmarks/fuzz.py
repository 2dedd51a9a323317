"""Differential fuzzing at scale: thousands of generated graphs through O1/O2/O3 and the runtime.

    python benchmarks/fuzz.py --cases 5000 --seed 0 --out fuzz-failures/

Each case is a seeded random graph (tests/fuzz/generator.py). onnxruntime runs the original and
each optimized model on the same inputs; the optimized model must pass the onnx checker and match
(rtol 1e-4, atol 1e-5; O3 within a relative L2 bound); the graphopt runtime must match
onnxruntime on the original and on the O2 result. Every failing graph is shrunk (ops and outputs
deleted greedily while the same failure persists) and written to OUT as

    <failure key>__seed<N>.onnx   the minimal reproducer
    <failure key>__seed<N>.npz    its feeds
    <failure key>__seed<N>.txt    the failure, the seed, and the reproducer as text

Prints: failures by key, the rewrites that fired (how many cases each pass changed, and its
summed stats), the ops the runtime lacked kernels for, and the time per case.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

# tests/ holds the fuzz package (generator, differential check, shrinker); put it first on the
# path, ahead of this script's own folder (this file is also called fuzz).
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import numpy as np  # noqa: E402
import onnx  # noqa: E402

from fuzz.differential import ALL_STAGES, Failure, check_case  # noqa: E402
from fuzz.generator import generate  # noqa: E402
from fuzz.shrink import shrink  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=2000, help="number of generated graphs")
    parser.add_argument("--seed", type=int, default=0, help="first seed (cases use seed..seed+N-1)")
    parser.add_argument("--out", type=Path, default=Path("fuzz-failures"),
                        help="folder for shrunk reproducers")
    parser.add_argument("--stages", default=",".join(ALL_STAGES),
                        help=f"comma-separated subset of {','.join(ALL_STAGES)}")
    parser.add_argument("--max-motifs", type=int, default=10, help="motifs per graph (size)")
    parser.add_argument("--shrink-per-key", type=int, default=3,
                        help="shrink and write at most this many failures per failure key")
    parser.add_argument("--quiet", action="store_true", help="no per-failure lines")
    args = parser.parse_args(argv)
    stages = tuple(s for s in args.stages.split(",") if s)
    unknown = set(stages) - set(ALL_STAGES)
    if unknown:
        parser.error(f"unknown stages: {', '.join(sorted(unknown))}")
    args.out.mkdir(parents=True, exist_ok=True)

    failures_by_key: dict[str, list[int]] = defaultdict(list)
    fired_cases: Counter[str] = Counter()
    fired_stats: dict[str, Counter[str]] = defaultdict(Counter)
    missing: Counter[str] = Counter()
    motifs: Counter[str] = Counter()
    runtime_skipped = 0
    written = 0
    start = time.perf_counter()
    for seed in range(args.seed, args.seed + args.cases):
        case = generate(seed, max_motifs=args.max_motifs)
        motifs.update(case.motifs)
        outcome = check_case(case.model, case.feeds, stages)
        if outcome.runtime_skipped:
            runtime_skipped += 1
            missing.update(outcome.missing_kernels)
        for level, passes in outcome.fired.items():
            for name, stats in passes.items():
                fired_cases[f"{level} {name}"] += 1
                fired_stats[f"{level} {name}"].update(stats)
        for failure in _distinct(outcome.failures):
            failures_by_key[failure.key].append(seed)
            if not args.quiet:
                print(f"seed {seed}: {failure}", flush=True)
            if len(failures_by_key[failure.key]) <= args.shrink_per_key:
                written += _write_reproducer(args.out, seed, failure, case.model, case.feeds)
        if (seed - args.seed + 1) % 500 == 0:
            done = seed - args.seed + 1
            print(f"... {done} cases, {sum(map(len, failures_by_key.values()))} failures, "
                  f"{(time.perf_counter() - start) / done * 1000:.0f} ms/case", flush=True)
    elapsed = time.perf_counter() - start

    print(f"\n{args.cases} cases (seeds {args.seed}..{args.seed + args.cases - 1}), stages "
          f"{','.join(stages)}: {elapsed:.0f} s, {elapsed / max(args.cases, 1) * 1000:.0f} ms/case")
    print(f"\nfailures ({sum(map(len, failures_by_key.values()))}; {written} reproducers in "
          f"{args.out}):")
    for key, seeds in sorted(failures_by_key.items()):
        shown = ", ".join(map(str, seeds[:8])) + (" ..." if len(seeds) > 8 else "")
        print(f"  {key:<36} {len(seeds):5d}  seeds {shown}")
    if not failures_by_key:
        print("  none")
    print("\nrewrites that fired (cases changed, summed stats):")
    for key in sorted(fired_cases):
        stats = ", ".join(f"{k}={v}" for k, v in sorted(fired_stats[key].items()))
        print(f"  {key:<32} {fired_cases[key]:5d}  {stats}")
    print(f"\nruntime stages skipped in {runtime_skipped} cases"
          + (f"; missing kernels: {dict(missing)}" if missing else ""))
    print("\nmotifs generated: " + ", ".join(f"{k}={v}" for k, v in sorted(motifs.items())))
    return 1 if failures_by_key else 0


def _distinct(failures: list[Failure]) -> list[Failure]:
    seen: set[str] = set()
    return [f for f in failures if not (f.key in seen or seen.add(f.key))]


def _write_reproducer(out: Path, seed: int, failure: Failure, model: onnx.ModelProto,
                      feeds: dict[str, np.ndarray]) -> int:
    """Shrink the case while the same failure key persists; write model, feeds and a note."""
    stage_set = (failure.stage,) if failure.stage != "runtime-O2" else ("runtime-O2",)

    def still_fails(m: onnx.ModelProto, f: dict[str, np.ndarray]) -> bool:
        return any(x.key == failure.key for x in check_case(m, f, stage_set).failures)

    small, small_feeds = shrink(model, feeds, still_fails, exact=failure.kind == "mismatch")
    again = [x for x in check_case(small, small_feeds, stage_set).failures if x.key == failure.key]
    stem = f"{failure.key.replace(':', '_')}__seed{seed}"
    onnx.save_model(small, out / f"{stem}.onnx")
    np.savez(out / f"{stem}.npz", **small_feeds)
    text = onnx.printer.to_text(small)
    (out / f"{stem}.txt").write_text(
        f"seed {seed}: {failure}\nshrunk ({len(model.graph.node)} -> {len(small.graph.node)} "
        f"nodes): {again[0] if again else 'failure no longer reproduces'}\n\n{text}\n")
    print(f"  shrunk seed {seed} [{failure.key}]: {len(model.graph.node)} -> "
          f"{len(small.graph.node)} nodes -> {out / stem}.onnx", flush=True)
    return 1


if __name__ == "__main__":
    raise SystemExit(main())
