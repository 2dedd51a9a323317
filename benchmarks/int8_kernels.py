"""int8 kernels side by side: fp32 BLAS, exact acc32, the acc16 model, the outlier split; the
roofline's predictions per ISA next to them; and why the split exists (acc16 saturation rates).

    python benchmarks/int8_kernels.py                    # ~30 s on one core
    python benchmarks/int8_kernels.py --quick --json int8.json

Part 1, time per GEMM shape (M x K activations, K x N weights) typical of the models: FC layers
(tall-skinny, M = batch 1..64), convolutions as GEMMs after im2col (M = output pixels, K =
C_in * kh * kw, N = C_out), and an embedding-like bag sum (one-hot counts times a table). Each
runs on the graphopt runtime's int8 cores (runtime/kernels/int8.py, one BLAS thread):

- fp32: np.matmul of float32 activations and weights (the float model's GEMM);
- acc32: IntMatMul, exact 32-bit accumulation of uint8 x int8 through float32 BLAS in K-chunks;
- acc16: IntMatMul(acc16=True): the exact product, then FBGEMM's 16-bit accumulation modeled
  exactly (saturation included) on every column whose weights cannot prove it safe;
- split: the contract's outlier split, W = W_small (|w| <= 64, acc16) + W_outlier (the
  --outliers share of weights, a sparse int32 product, runtime/kernels/sparse_int8.py).

MEASURED ratios (fp32 time / kernel time) are of graphopt's numpy emulation: int8 runs through
float32 BLAS there, and acc16 adds an emulation loop, so int8 is NOT faster on it (ratios < 1
are expected and say nothing about native kernels). PREDICTED ratios are graphopt.machine's
roofline for a native kernel on that ISA (INT8_THROUGHPUT: avx2 acc32 1.33x, acc16 2x fp32;
avx512-vnni acc32 4x), the numbers kernel selection (passes/kernel_select.py) decides with,
the split's sparse part costed as kernel_select.outlier_time does. Intensity = FLOPs per int8
weight byte (graphopt.op_intensity); small-M FCs and the embedding sit below the ridge point,
where int8 gains only its 4x smaller weight bytes and acc16 gains nothing over acc32.

Part 2, acc16 saturation: the fraction of int32 accumulators (after zero-point corrections)
that differ from the exact ones, on per-channel int8 weights quantized (L2 scales, as the
quantize pass does; full 8-bit range, and 7-bit as O3 emits for pre-VNNI targets) from
Student-t samples (heavy tails, as trained weights have) and uint8
activations: post-ReLU (zero point 0, half zeros) and centred (zero point 128, as an input
that is not a ReLU's output). Columns: dense acc16 (FBGEMM vpmaddubsw + vpaddsw model), split
(acc16 on W_small + exact outliers), and onnxruntime's AVX2 u8s8 kernel model (vpmaddubsw
pairs saturate, vpmaddwd sums them in 32 bits: int_gemm_acc16(saturate_sum=False)), which is
what onnxruntime computes on a CPU without VNNI.
"""

from __future__ import annotations

import os

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
             "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ[_var] = "1"       # before numpy is imported: one BLAS thread

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402

import numpy as np  # noqa: E402

from graphopt.cost import GEMM, GemmShape, OpCost  # noqa: E402
from graphopt.machine import Machine, detect_machine, modeled_machine, roofline  # noqa: E402
from graphopt.passes.kernel_select import OUTLIER_THRESHOLD, outlier_time  # noqa: E402
from graphopt.passes.qparams import NARROW_QMAX, quantize_weights, weight_scales  # noqa: E402
from graphopt.runtime.kernels.gemm import int_gemm_acc16  # noqa: E402
from graphopt.runtime.kernels.int8 import IntMatMul  # noqa: E402
from graphopt.runtime.kernels.sparse_int8 import SparseInt8  # noqa: E402

TARGETS = ("avx2", "avx512-vnni")
KERNELS = ("fp32", "acc32", "acc16", "split")


@dataclass(frozen=True)
class Shape:
    kind: str
    m: int
    k: int
    n: int
    label: str

    @property
    def flops(self) -> int:
        return 2 * self.m * self.k * self.n


SHAPES = (
    Shape("fc", 1, 512, 256, "FC batch 1"),
    Shape("fc", 1, 4096, 1024, "FC batch 1, wide"),
    Shape("fc", 16, 1024, 1024, "FC batch 16"),
    Shape("fc", 64, 512, 256, "FC batch 64 (DLRM MLP)"),
    Shape("fc", 64, 2048, 512, "FC batch 64"),
    Shape("conv", 3136, 576, 64, "3x3 conv 64ch 56x56"),
    Shape("conv", 784, 1152, 128, "3x3 conv 128ch 28x28"),
    Shape("conv", 3136, 64, 256, "1x1 conv 64->256 56x56"),
    Shape("conv", 196, 2304, 256, "3x3 conv 256ch 14x14"),
    Shape("embedding", 16, 32768, 64, "bag sum, 32k-row table"),
)
QUICK_SHAPES = (SHAPES[0], SHAPES[3], SHAPES[5], SHAPES[9])


# ---------------------------------------------------------------------------------------------
# operands
# ---------------------------------------------------------------------------------------------
def relu_activations(rng: np.random.Generator, m: int, k: int) -> np.ndarray:
    """uint8 of a quantized ReLU output (zero point 0): half zeros, a half-normal tail."""
    x = np.maximum(rng.standard_normal((m, k)), 0.0) * 64.0
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def centred_activations(rng: np.random.Generator, m: int, k: int) -> np.ndarray:
    """uint8 around a zero point of 128 (an input with both signs)."""
    return np.clip(np.rint(128 + 40 * rng.standard_normal((m, k))), 0, 255).astype(np.uint8)


def bag_counts(rng: np.random.Generator, m: int, k: int, bag: int = 32) -> np.ndarray:
    """One-hot counts of `bag` ids per row: the embedding bag sum as a GEMM."""
    a = np.zeros((m, k), np.uint8)
    for row in range(m):
        np.add.at(a[row], rng.integers(0, k, bag), 1)
    return a


def student_t_int8(rng: np.random.Generator, k: int, n: int, df: float
                   ) -> tuple[np.ndarray, np.ndarray]:
    """(K, N) int8 weights from the same Student-t samples, per-output-channel L2 scales (the
    pass's): full range [-127, 127], and 7-bit [-64, 64] (what O3 emits for pre-VNNI targets)."""
    w = rng.standard_t(df, (k, n)).astype(np.float32)
    full = quantize_weights(w, weight_scales(w, 1), 1)
    narrow = quantize_weights(w, weight_scales(w, 1, qmax=NARROW_QMAX), 1, qmax=NARROW_QMAX)
    return full, narrow


def timing_weights(rng: np.random.Generator, k: int, n: int, outliers: float
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(W, W_small, W_outlier): a Student-t bulk within |w| <= T and exactly `outliers` of the
    weights beyond T (so every shape times the split at the same outlier share)."""
    bulk = rng.standard_t(4, (k, n))
    small = np.clip(np.rint(bulk * 16), -OUTLIER_THRESHOLD, OUTLIER_THRESHOLD).astype(np.int8)
    big = rng.random((k, n)) < outliers
    magnitudes = rng.integers(OUTLIER_THRESHOLD + 1, 128, (k, n))
    signs = np.where(rng.random((k, n)) < 0.5, -1, 1)
    outlier = np.where(big, magnitudes * signs, 0).astype(np.int8)
    small[big] = 0
    return (small + outlier).astype(np.int8), small, outlier


# ---------------------------------------------------------------------------------------------
# part 1: timing and predictions
# ---------------------------------------------------------------------------------------------
def best_time(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def measured_times(shape: Shape, outliers: float, repeats: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    m, k, n = shape.m, shape.k, shape.n
    a = bag_counts(rng, m, k) if shape.kind == "embedding" else relu_activations(rng, m, k)
    w, w_small, w_out = timing_weights(rng, k, n, outliers)
    a_f = a.astype(np.float32)
    w_f = w.astype(np.float32) * np.float32(0.01)
    acc32 = IntMatMul(w, 0)
    acc16 = IntMatMul(w, 0, acc16=True)
    small = IntMatMul(w_small, 0, acc16=True)
    sparse = SparseInt8.from_dense(w_out, out_axis=1)

    def split() -> np.ndarray:
        acc = small(a, 0)
        sparse.add_matmul(acc, a, 0)
        return acc

    exact = acc32(a, 0)
    return {
        "fp32": best_time(lambda: np.matmul(a_f, w_f), repeats),
        "acc32": best_time(lambda: acc32(a, 0), repeats),
        "acc16": best_time(lambda: acc16(a, 0), max(1, repeats // 2)),
        "split": best_time(split, max(1, repeats // 2)),
        "outlier_fraction": float(np.count_nonzero(w_out) / w_out.size),
        "split_exact": bool(np.array_equal(split(), exact)),
        "acc16_exact": bool(np.array_equal(acc16(a, 0), exact)),
    }


def gemm_cost(shape: Shape, quantized: bool) -> OpCost:
    """The OpCost of the GEMM as graphopt.cost counts a MatMul with a constant weight: int8
    weight bytes when quantized (read through DequantizeLinear), float32 activations."""
    weight_bytes = shape.k * shape.n * (1 if quantized else 4)
    return OpCost("bench", "MatMul", 0, GEMM, flops=shape.flops, weight_bytes=weight_bytes,
                  input_bytes=shape.m * shape.k * 4, output_bytes=shape.m * shape.n * 4,
                  gemm=GemmShape(shape.m, shape.n, shape.k),
                  kernel="int8_acc32" if quantized else "fp32", quantized=quantized)


def predicted(shape: Shape, machine: Machine, outlier_fraction: float) -> dict:
    """Roofline seconds of each kernel on `machine` and the ratios fp32 / kernel."""
    int8 = gemm_cost(shape, quantized=True)
    seconds = {
        "fp32": roofline(gemm_cost(shape, quantized=False), machine, "fp32").time,
        "acc32": roofline(int8, machine, "int8_acc32").time,
        "acc16": roofline(int8, machine, "int8_acc16").time,
    }
    outliers = round(outlier_fraction * shape.k * shape.n)
    seconds["split"] = seconds["acc16"] + outlier_time(int8, outliers, machine)
    bound = roofline(int8, machine, "int8_acc32").bound
    return {"seconds": seconds, "ratio": {k: seconds["fp32"] / seconds[k] for k in KERNELS},
            "acc32_bound": bound, "ridge": machine.ridge_point("int8_acc32")}


def timing_rows(shapes, outliers: float, repeats: int) -> list[dict]:
    host = detect_machine()
    machines = {t: modeled_machine(t, host) for t in TARGETS}
    rows = []
    for i, shape in enumerate(shapes):
        measured = measured_times(shape, outliers, repeats, seed=i)
        row = {"label": shape.label, "kind": shape.kind, "M": shape.m, "K": shape.k,
               "N": shape.n, "intensity": shape.flops / (shape.k * shape.n),
               "measured_ms": {k: measured[k] * 1e3 for k in KERNELS},
               "measured_ratio": {k: measured["fp32"] / measured[k] for k in KERNELS},
               "outlier_fraction": measured["outlier_fraction"],
               "split_exact": measured["split_exact"], "acc16_exact": measured["acc16_exact"],
               "predicted": {t: predicted(shape, machines[t], measured["outlier_fraction"])
                             for t in TARGETS}}
        rows.append(row)
        print(format_timing(row), flush=True)
    return rows


TIMING_HEADER = (
    f"{'':<24} {'':>16} {'':>7} | {'MEASURED: graphopt numpy emulation':^52} | "
    f"{'PREDICTED native, fp32/x':^36}\n"
    f"{'':<24} {'':>16} {'':>7} | {'ms (one thread)':^31} {'fp32/x, int8 on BLAS':^20} | "
    f"{'avx2':^19} {'avx512-vnni':^17}\n"
    f"{'shape':<24} {'M x K x N':>16} {'FLOP/B':>7} | {'fp32':>7} {'acc32':>7} {'acc16':>7} "
    f"{'split':>7} {'acc32':>6} {'acc16':>6} {'split':>6} | "
    f"{'a32':>5} {'a16':>5} {'spl':>5} {'b':>1} "
    f"{'a32':>5} {'a16':>5} {'spl':>5}")


def format_timing(row: dict) -> str:
    ms, mr = row["measured_ms"], row["measured_ratio"]
    dims = f"{row['M']}x{row['K']}x{row['N']}"
    text = (f"{row['label']:<24} {dims:>16} {row['intensity']:7.0f} | "
            + " ".join(f"{ms[k]:7.2f}" for k in KERNELS) + " "
            + " ".join(f"{mr[k]:6.2f}" for k in KERNELS[1:]) + " |")
    for target in TARGETS:
        ratio = row["predicted"][target]["ratio"]
        text += " " + " ".join(f"{ratio[k]:5.2f}" for k in KERNELS[1:])
        if target == TARGETS[0]:
            text += " " + row["predicted"][target]["acc32_bound"][0]
    return text


# ---------------------------------------------------------------------------------------------
# part 2: saturation
# ---------------------------------------------------------------------------------------------
def ort_pair_saturated(a: np.ndarray, w: np.ndarray, a_zp: int) -> np.ndarray:
    """onnxruntime's AVX2 u8s8 accumulators (pairs saturate in int16, sums in int32), with the
    zero-point correction of symmetric weights: acc - a_zp * sum_k w."""
    raw = int_gemm_acc16(a, w, saturate_sum=False).astype(np.int64)
    return (raw - a_zp * w.astype(np.int64).sum(axis=0)).astype(np.int32)


def saturation_row(m: int, k: int, n: int, df: float, activations: str, seed: int) -> dict:
    from graphopt.passes.kernel_select import split_weights
    rng = np.random.default_rng(seed)
    if activations == "relu":
        a, zp = relu_activations(rng, m, k), 0
    else:
        a, zp = centred_activations(rng, m, k), 128
    w, w7 = student_t_int8(rng, k, n, df)
    w_small, w_out = split_weights(w)
    exact = IntMatMul(w, 0)(a, zp).astype(np.int64)
    dense = IntMatMul(w, 0, acc16=True)(a, zp)
    split = IntMatMul(w_small, 0, acc16=True)(a, zp)
    SparseInt8.from_dense(w_out, out_axis=1).add_matmul(split, a, zp)
    mlas = ort_pair_saturated(a, w, zp)
    exact7 = IntMatMul(w7, 0)(a, zp).astype(np.int64)
    dense7 = IntMatMul(w7, 0, acc16=True)(a, zp)
    norm = max(float(np.linalg.norm(exact.astype(np.float64))), 1.0)

    norm7 = max(float(np.linalg.norm(exact7.astype(np.float64))), 1.0)

    def stats(acc: np.ndarray, ref: np.ndarray = exact, scale: float = norm) -> dict:
        diff = acc.astype(np.int64) - ref
        return {"differ": float(np.mean(diff != 0)),
                "rel_l2": float(np.linalg.norm(diff.astype(np.float64)) / scale)}
    return {"M": m, "K": k, "N": n, "df": df, "activations": activations,
            "outlier_fraction": float(np.count_nonzero(w_out) / w_out.size),
            "acc16": stats(dense), "split": stats(split), "ort_avx2": stats(mlas),
            "acc16_7bit": stats(dense7, exact7, norm7),
            "ort_avx2_7bit": stats(ort_pair_saturated(a, w7, zp), exact7, norm7)}


SATURATION_HEADER = (
    f"{'K':>5} {'t df':>4} {'activations':<14} {'outliers':>8} | {'outputs != exact':^52} | "
    f"{'accumulator rel L2':^30}\n"
    f"{'':>5} {'':>4} {'':<14} {'>|64|':>8} | {'acc16':>9} {'split':>9} {'ORT avx2':>10} "
    f"{'acc16 7b':>9} {'ORT 7b':>9} | {'acc16':>9} {'split':>9} {'ORT avx2':>10}")


def format_saturation(row: dict) -> str:
    acts = "relu zp=0" if row["activations"] == "relu" else "centred zp=128"
    return (f"{row['K']:5d} {row['df']:4g} {acts:<14} {row['outlier_fraction']:8.2%} | "
            f"{row['acc16']['differ']:9.2%} {row['split']['differ']:9.2%} "
            f"{row['ort_avx2']['differ']:10.2%} {row['acc16_7bit']['differ']:9.2%} "
            f"{row['ort_avx2_7bit']['differ']:9.2%} | {row['acc16']['rel_l2']:9.1e} "
            f"{row['split']['rel_l2']:9.1e} {row['ort_avx2']['rel_l2']:10.1e}")


def saturation_rows(quick: bool) -> list[dict]:
    ks = (576, 4096) if quick else (576, 1152, 4096)
    dfs = (3,) if quick else (3, 5)
    rows = []
    for i, (k, df, acts) in enumerate((k, df, acts) for k in ks for df in dfs
                                      for acts in ("relu", "centred")):
        row = saturation_row(128, k, 256, df, acts, seed=100 + i)
        rows.append(row)
        print(format_saturation(row), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="4 shapes, fewer saturation cases")
    parser.add_argument("--outliers", type=float, default=0.02,
                        help="share of weights beyond |64| in the timed split (default 0.02)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per kernel (best)")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = parser.parse_args()
    shapes = QUICK_SHAPES if args.quick else SHAPES
    print(TIMING_HEADER)
    timing = timing_rows(shapes, args.outliers, 2 if args.quick else args.repeats)
    print("(measured = graphopt's numpy emulation: int8 on float32 BLAS plus, for acc16, an "
          "exact saturation model, so int8 is not faster there; predicted = graphopt.machine "
          "roofline of a native kernel on that ISA; b = the acc32 roofline's bound on avx2 "
          "(compute/memory); FLOP/B = FLOPs per int8 weight byte; split = acc16 on |w|<=64 + "
          f"sparse acc32 at {args.outliers:.0%} outliers)")
    ridge = {t: timing[0]["predicted"][t]["ridge"] for t in TARGETS} if timing else {}
    print("ridge point of acc32 (FLOP/B): " + ", ".join(f"{t} {r:.0f}" for t, r in ridge.items())
          + "; below it kernel selection keeps acc32 whatever the roofline's bound (the shape-"
          "efficiency term makes small-M GEMMs compute-bound in the model)")
    print()
    print("acc16 saturation, M=128 N=256, Student-t weights (per-channel L2 int8 scales):")
    print(SATURATION_HEADER)
    saturation = saturation_rows(args.quick)
    print("(8-bit weights unless marked: split = acc16 on W_small (|w|<=64) + exact sparse "
          "outliers; ORT avx2 = onnxruntime's u8s8 kernel without VNNI: int16 pair sums "
          "saturate; 7b = the same weights quantized to [-64, 64], as O3 emits for pre-VNNI "
          "targets: no pair sum can saturate, the running 16-bit sum of acc16 still can)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"timing": timing, "saturation": saturation,
                       "machine": detect_machine().to_dict()}, f, indent=2)


if __name__ == "__main__":
    main()
