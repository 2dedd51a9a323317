"""graphopt runtime latency of each model before vs after O2: fp32, batch 1, one thread.

    python benchmarks/before_after_fp32.py                       # light zoo + PP-OCR, 20 runs
    python benchmarks/before_after_fp32.py --models light-resnet50,ppocr-det --runs 20 --profile

"Before" (O0) is the model as loaded; "after" (O2) is the same model optimized at O2 (folding,
tensor-manipulation elimination, fusion; fused epilogues run in place in the runtime); O1 is
timed as well, since the light models' weights are ConstantOfShape fills that O0 recomputes on
every run and O1 already folds: O1/O2 is what O2's own passes gained. All run in
`graphopt.runtime.Session`. After one warm-up each, their runs are interleaved (the order
reverses every round) so that load from other processes hits all alike; the table shows
medians of wall time, the ratios of those medians (target O0/O2 >= 1.3 on light-resnet50 and
ppocr-det at 640x640) and of the median CPU times of the process (one thread: on a shared
machine the CPU time leaves out the time other processes held the core, so it is the steadier
estimate), op counts, the number of fused epilogue groups in the O2 runtime plan, and the
relative L2 distance between the O0 and O2 outputs (same runtime, same input).

The PP-OCR detector takes 1x3x640x640; its input here is rendered text lines (so that its
probability map is not all zeros), the other models take their registry example inputs.
"""

from __future__ import annotations

import os

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
             "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ[_var] = "1"       # before numpy is imported: one BLAS thread

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

import graphopt  # noqa: E402
from graphopt import models  # noqa: E402
from graphopt.models import light  # noqa: E402
from graphopt.runtime import Session  # noqa: E402

PPOCR = ["ppocr-det", "ppocr-rec", "ppocr-cls"]
DET_SIZE = 640


def text_image(size: int) -> np.ndarray:
    """Rendered text lines on white, normalized as RapidOCR does, (1, 3, size, size) float32."""
    from graphopt.models import ppocr

    rows = []
    while sum(r.shape[0] for r in rows) < size:
        for text in ppocr.SAMPLE_LINES:
            rows.append(ppocr.render_text_line(text, 48, size))
    image = np.concatenate(rows, 0)[:size]
    x = (image[..., ::-1].astype(np.float32) / 255.0 - 0.5) / 0.5
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None])


def feeds_for(name: str, model) -> dict[str, np.ndarray]:
    if name == "ppocr-det":
        from graphopt.models.ppocr import load_input_name
        return {load_input_name(name): text_image(DET_SIZE)}
    if name.startswith(light.PREFIX):
        return light.light_input(model)
    return models.example_inputs(name, model, seed=0)


def rel_l2(after: np.ndarray, before: np.ndarray) -> float:
    before, after = before.astype(np.float64), after.astype(np.float64)
    return float(np.linalg.norm(after - before) / max(np.linalg.norm(before), 1e-30))


def timed(session: Session, feeds) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of one run."""
    wall, cpu = time.perf_counter(), time.process_time()
    session.run(feeds)
    return time.perf_counter() - wall, time.process_time() - cpu


#: Levels timed: "before" is O0 (the model as loaded); O1 (constant folding and cleanup) is
#: timed too, so that the share of O2's own passes (manipulation elimination, fusion) shows.
LEVELS = ("O0", "O1", "O2")


def measure(name: str, runs: int, profile: bool) -> dict:
    model = models.build(name)
    feeds = feeds_for(name, model)
    graphs, ops = {}, {}
    for level in LEVELS:
        graphs[level] = graphopt.load(model)
        ops[level] = graphopt.optimize(graphs[level], level).ops_after
    sessions = {level: Session(graphs[level], profile=profile) for level in LEVELS}
    outputs = {level: session.run(feeds) for level, session in sessions.items()}   # warm-up
    error = max(rel_l2(outputs["O2"][k], outputs["O0"][k]) for k in sessions["O0"].outputs)
    times: dict[str, list[tuple[float, float]]] = {level: [] for level in LEVELS}
    for i in range(runs):
        order = LEVELS if i % 2 == 0 else LEVELS[::-1]
        for level in order:
            times[level].append(timed(sessions[level], feeds))
    if profile:
        for level in ("O0", "O2"):
            print(f"\n== {name} at {level} ==\n{sessions[level].profile.table()}")
    ms = {level: statistics.median(w for w, _ in t) * 1e3 for level, t in times.items()}
    cpu = {level: statistics.median(c for _, c in t) * 1e3 for level, t in times.items()}
    return {"name": name, "ops": ops, "ms": ms, "cpu": cpu,
            "fused": len(sessions["O2"].fused), "rel_l2": error}


HEADER = (f"{'model':<20} {'ops O0->O1->O2':>16} {'O0 ms':>8} {'O1 ms':>8} {'O2 ms':>8} "
          f"{'O0/O2':>6} {'O1/O2':>6} {'cpu O0/O2':>9} {'cpu O1/O2':>9} {'fused':>5} "
          f"{'rel L2':>8}")


def format_row(row: dict) -> str:
    ops, ms, cpu = row["ops"], row["ms"], row["cpu"]
    counts = f"{ops['O0']}->{ops['O1']}->{ops['O2']}"
    return (f"{row['name']:<20} {counts:>16} {ms['O0']:8.1f} {ms['O1']:8.1f} {ms['O2']:8.1f} "
            f"{ms['O0'] / ms['O2']:5.2f}x {ms['O1'] / ms['O2']:5.2f}x "
            f"{cpu['O0'] / cpu['O2']:8.2f}x {cpu['O1'] / cpu['O2']:8.2f}x {row['fused']:5d} "
            f"{row['rel_l2']:8.1e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(light.light_names() + PPOCR),
                        help="comma-separated registry names (default: light zoo + PP-OCR)")
    parser.add_argument("--runs", type=int, default=20, help="timed runs per level (median)")
    parser.add_argument("--profile", action="store_true", help="per-op-type tables too")
    args = parser.parse_args()
    rows = []
    print(HEADER)
    for name in [n.strip() for n in args.models.split(",") if n.strip()]:
        try:
            row = measure(name, args.runs, args.profile)
        except models.MissingExtraError as exc:
            print(f"{name:<20} skipped: {exc}")
            continue
        except graphopt.GraphoptError as exc:   # e.g. the runtime cannot run the model
            print(f"{name:<20} failed: {exc}")
            continue
        rows.append(row)
        print(format_row(row), flush=True)
    if rows and args.profile:
        print("\n" + HEADER)
        for row in rows:
            print(format_row(row))
    print(f"({args.runs} interleaved runs per level, medians; one BLAS thread; O0/O2 = before / "
          f"after O2 (wall and process CPU time); target >= 1.3x on light-resnet50 and ppocr-det)")


if __name__ == "__main__":
    main()
