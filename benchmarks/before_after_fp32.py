"""graphopt runtime latency of each model before vs after O2: fp32, batch 1, one thread.

    python benchmarks/before_after_fp32.py                       # light zoo + PP-OCR
    python benchmarks/before_after_fp32.py --models light-resnet50,ppocr-det --runs 9 --profile

"Before" is the model as loaded; "after" is the same model optimized at O2 (folding, tensor-
manipulation elimination, fusion; fused epilogues run in place in the runtime). Both run in
`graphopt.runtime.Session`. After one warm-up each, their runs are interleaved (the order
alternates per round) so that load from other processes hits both alike; the table shows
medians, the ratio before / after (target >= 1.3 on light-resnet50 and ppocr-det at 640x640),
op counts, the number of fused epilogue groups in the runtime's plan, and the relative L2
distance between the outputs before and after (same runtime, same input).

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


def timed(session: Session, feeds) -> float:
    start = time.perf_counter()
    session.run(feeds)
    return time.perf_counter() - start


def measure(name: str, runs: int, profile: bool) -> dict:
    model = models.build(name)
    feeds = feeds_for(name, model)
    before_graph = graphopt.load(model)
    after_graph = graphopt.load(model)
    report = graphopt.optimize(after_graph, "O2")
    before = Session(before_graph, profile=profile)
    after = Session(after_graph, profile=profile)
    out_before = before.run(feeds)
    out_after = after.run(feeds)
    error = max(rel_l2(out_after[k], out_before[k]) for k in before.outputs)
    times: dict[str, list[float]] = {"before": [], "after": []}
    for i in range(runs):
        pair = [("before", before), ("after", after)]
        for key, session in pair if i % 2 == 0 else pair[::-1]:
            times[key].append(timed(session, feeds))
    if profile:
        print(f"\n== {name}: before ==\n{before.profile.table()}")
        print(f"== {name}: after ==\n{after.profile.table()}")
    b, a = statistics.median(times["before"]), statistics.median(times["after"])
    return {"name": name, "ops_before": report.ops_before, "ops_after": report.ops_after,
            "before_ms": b * 1e3, "after_ms": a * 1e3, "ratio": b / a,
            "fused": len(after.fused), "rel_l2": error}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(light.light_names() + PPOCR),
                        help="comma-separated registry names (default: light zoo + PP-OCR)")
    parser.add_argument("--runs", type=int, default=5, help="timed runs per side (median)")
    parser.add_argument("--profile", action="store_true", help="per-op-type tables too")
    args = parser.parse_args()
    rows = []
    header = (f"{'model':<20} {'ops':>9} {'before ms':>10} {'after ms':>9} {'ratio':>6} "
              f"{'fused':>5} {'rel L2':>9}")
    print(header)
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
        ops = f"{row['ops_before']}->{row['ops_after']}"
        print(f"{name:<20} {ops:>9} {row['before_ms']:10.1f} {row['after_ms']:9.1f} "
              f"{row['ratio']:5.2f}x {row['fused']:5d} {row['rel_l2']:9.1e}", flush=True)
    if rows and args.profile:
        print("\n" + header)
        for row in rows:
            ops = f"{row['ops_before']}->{row['ops_after']}"
            print(f"{row['name']:<20} {ops:>9} {row['before_ms']:10.1f} {row['after_ms']:9.1f} "
                  f"{row['ratio']:5.2f}x {row['fused']:5d} {row['rel_l2']:9.1e}")


if __name__ == "__main__":
    main()
