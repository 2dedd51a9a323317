"""The CPU machine model: vector features, cores, caches, measured peaks, int8 throughput per ISA,
and the roofline that turns an op's cost into a predicted time.

`detect_machine()` reads the CPU's features (/proc/cpuinfo flags on Linux), core count and caches
(/sys/devices/system/cpu/cpu0/cache), and measures, in a child process pinned to one BLAS thread
(about a second): the fp32 GEMM rate (numpy matmul, 1024^3), the copy bandwidth out of cache
(64 MiB) and in cache (2 MiB), the rate of numpy elementwise passes over cache-sized blocks, the
write rate of an im2col gather (sliding-window copy, stride 1 and 2) and the cost of a tiny numpy
call. The measurement is cached per machine in the user's cache directory
($XDG_CACHE_HOME/graphopt, else ~/.cache/graphopt; $GRAPHOPT_CACHE_DIR overrides), keyed by a
hash of the CPU model and flags, so it runs once per machine.

`modeled_machine(target)` describes another CPU for `--target`: the host's measured numbers scaled
by the ratio of fp32 vector throughput per cycle (same clock, cores and memory system assumed), and
the target ISA's int8 table.

The int8 table (`INT8_THROUGHPUT`) gives multiply-accumulate throughput relative to fp32 FMA on the
same ISA, from the instruction count of each inner loop; it models native int8 kernels (the kind
onnxruntime and FBGEMM have). graphopt's own numpy runtime computes int8 exactly through fp32 BLAS,
so on it int8 runs at about fp32 speed; the table is what kernel choice for a deployment rests on.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from graphopt.errors import UsageError

#: Cache file format; bump when the benchmark changes so old measurements are not reused.
_CACHE_VERSION = 2
#: Machine fields the micro-benchmark measures.
_PEAK_FIELDS = ("fp32_flops", "bandwidth", "cache_bandwidth", "vector_rate", "gather_bandwidth",
                "gather_bandwidth_strided", "op_overhead")

TARGETS = ("auto", "generic", "avx2", "avx512", "avx512-vnni", "amx")


@dataclass(frozen=True)
class IsaInfo:
    """What one instruction-set target can do per core and cycle, and why."""

    name: str
    #: fp32 multiply-adds per cycle per core (vector lanes x FMA units).
    fp32_macs_per_cycle: int
    #: int8 MAC throughput relative to fp32 MACs, accumulating in 32 bits and in 16 bits.
    int8_acc32: float
    int8_acc16: float
    reasoning: str


#: Relative int8 throughput per ISA target (fp32 = 1.0). The ratios compare instructions per MAC in
#: the kernels' inner loops, assuming the integer and FMA instructions issue at the same rate (two
#: per cycle on the cores these targets describe). They are compute-bound ceilings: a memory-bound
#: op gains only from int8's 4x smaller bytes.
INT8_THROUGHPUT: dict[str, IsaInfo] = {
    "generic": IsaInfo(
        "generic", 8, 1.33, 2.0,
        "SSE4.1 without FMA (or an unknown CPU): fp32 needs mulps+addps for 4 MACs; int8 uses the "
        "same pmaddubsw sequences as AVX2 at 128 bits, so the AVX2 ratios are assumed."),
    "avx2": IsaInfo(
        "avx2", 16, 32 / 3 / 8, 2.0,
        "AVX2+FMA: vfmadd231ps does 8 fp32 MACs per instruction. int8 acc32 needs vpmaddubsw "
        "(u8*s8 pairs -> s16) + vpmaddwd (s16 pairs -> s32) + vpaddd: 3 instructions per 32 MACs "
        "= 10.7 MACs/instr, 1.33x fp32. acc16 needs vpmaddubsw + vpaddsw (saturating s16 add): 2 "
        "instructions per 32 MACs = 16 MACs/instr, 2x fp32, at the price of saturation."),
    "avx512": IsaInfo(
        "avx512", 32, 64 / 3 / 16, 2.0,
        "AVX512BW without VNNI: both sides double their width (16 fp32 MACs per vfmadd231ps, 64 "
        "int8 MACs per vpmaddubsw), so the AVX2 ratios hold: acc32 3 instructions per 64 MACs "
        "(1.33x), acc16 2 per 64 (2x)."),
    "avx512-vnni": IsaInfo(
        "avx512-vnni", 32, 4.0, 2.0,
        "AVX512-VNNI: vpdpbusd multiplies u8*s8 and accumulates into s32 in one instruction, 64 "
        "MACs per instruction = 4x fp32. No instruction accumulates u8*s8 in 16 bits, so acc16 "
        "still needs vpmaddubsw + vpaddsw (2x): acc32 is at least as fast as acc16, and exact."),
    "amx": IsaInfo(
        "amx", 32, 32.0, 2.0,
        "AMX-INT8 (with AVX512-VNNI): tdpbusd multiplies 16x64 by 64x16 int8 tiles into a 16x16 "
        "s32 tile, 16384 MACs in about 16 cycles = 1024 MACs/cycle against 32 fp32 MACs/cycle "
        "(ideal; large tiles only). Accumulation is s32 natively; acc16 falls back to the "
        "AVX512BW pair (2x)."),
}


@dataclass
class Machine:
    """A CPU as the cost model sees it. Rates are per core; `threads` multiplies compute only."""

    cpu: str
    isa: str
    features: list[str]
    cores: int
    caches: dict[str, int]
    #: Measured (or, for a modeled target, scaled) fp32 GEMM rate of one thread, FLOP/s.
    fp32_flops: float
    #: Measured memory bandwidth (copy: bytes read + written per second), one thread, for data
    #: that does not fit in the caches (a 64 MiB copy).
    bandwidth: float
    #: The same for data that fits in the last-level cache (a 2 MiB copy): an op reading what its
    #: producer just wrote.
    cache_bandwidth: float = 0.0
    #: Elementwise numpy passes per second over cache-resident data (element-ops/s): the compute
    #: rate of everything that is not a BLAS GEMM.
    vector_rate: float = 0.0
    #: Bytes per second written by an im2col gather (a sliding-window copy), stride 1 and 2.
    gather_bandwidth: float = 0.0
    gather_bandwidth_strided: float = 0.0
    #: Cost of dispatching one tiny numpy operation, seconds (the floor of any op's time).
    op_overhead: float = 2e-6
    measured: bool = True
    target: str = "auto"
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Unmeasured figures default to conservative fractions of the measured ones.
        self.cache_bandwidth = self.cache_bandwidth or 2.5 * self.bandwidth
        self.vector_rate = self.vector_rate or self.fp32_flops / 32
        self.gather_bandwidth = self.gather_bandwidth or self.bandwidth
        self.gather_bandwidth_strided = self.gather_bandwidth_strided or self.gather_bandwidth / 3

    @property
    def isa_info(self) -> IsaInfo:
        return INT8_THROUGHPUT[self.isa]

    @property
    def cache_bytes(self) -> int:
        """Working sets up to this size are treated as cache-resident: half the last-level cache
        (the other half holds weights and the rest of the model), 4 MiB when unknown."""
        last = max((v for k, v in self.caches.items() if k[:2] in ("L2", "L3")), default=0)
        return last // 2 if last else 4 << 20

    def activation_bandwidth(self, nbytes: int) -> float:
        """Bandwidth for streaming `nbytes` of activations: cache-resident or from memory."""
        return self.cache_bandwidth if nbytes <= self.cache_bytes else self.bandwidth

    def compute_rate(self, kernel: str = "fp32", threads: int = 1) -> float:
        """Peak FLOP/s of a kernel ("fp32", "int8_acc32", "int8_acc16") on `threads` cores."""
        scale = {"fp32": 1.0, "int8_acc32": self.isa_info.int8_acc32,
                 "int8_acc16": self.isa_info.int8_acc16}.get(kernel, 1.0)
        return self.fp32_flops * scale * max(1, min(threads, self.cores))

    def ridge_point(self, kernel: str = "fp32") -> float:
        """FLOPs per byte above which an op is compute-bound."""
        return self.compute_rate(kernel) / self.bandwidth

    def to_dict(self) -> dict:
        info = self.isa_info
        return {
            "cpu": self.cpu, "isa": self.isa, "target": self.target, "measured": self.measured,
            "features": self.features, "cores": self.cores, "caches": self.caches,
            "fp32_gflops": round(self.fp32_flops / 1e9, 2),
            "bandwidth_gbs": round(self.bandwidth / 1e9, 2),
            "cache_bandwidth_gbs": round(self.cache_bandwidth / 1e9, 2),
            "vector_gops": round(self.vector_rate / 1e9, 2),
            "gather_gbs": round(self.gather_bandwidth / 1e9, 2),
            "gather_strided_gbs": round(self.gather_bandwidth_strided / 1e9, 2),
            "op_overhead_us": round(self.op_overhead * 1e6, 2),
            "int8_relative": {"fp32": 1.0, "int8_acc32": round(info.int8_acc32, 3),
                              "int8_acc16": round(info.int8_acc16, 3)},
            "ridge_flops_per_byte": round(self.ridge_point(), 2),
        }


# ---------------------------------------------------------------------------------------------
# detection
# ---------------------------------------------------------------------------------------------
_FEATURE_FLAGS = ("sse4_1", "avx", "fma", "avx2", "avx512f", "avx512bw", "avx512_vnni",
                  "avx_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16", "f16c")


def cpu_info(cpuinfo_text: str | None = None) -> tuple[str, set[str]]:
    """(model name, flag set) from /proc/cpuinfo (or the text given); ("unknown", {}) elsewhere."""
    if cpuinfo_text is None:
        try:
            cpuinfo_text = Path("/proc/cpuinfo").read_text()
        except OSError:
            return platform.processor() or platform.machine() or "unknown", set()
    model, flags = "", set()
    for line in cpuinfo_text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and not model:
            model = value.strip()
        elif key in ("flags", "Features") and not flags:
            flags = set(value.split())
    return model or platform.machine() or "unknown", flags


def isa_of(flags: set[str]) -> str:
    """The best int8 target the flags allow."""
    if "amx_int8" in flags and "avx512_vnni" in flags:
        return "amx"
    if "avx512_vnni" in flags and "avx512bw" in flags:
        return "avx512-vnni"
    if "avx512bw" in flags:
        return "avx512"
    if "avx2" in flags and "fma" in flags:
        return "avx2"
    return "generic"


def cache_sizes(root: str = "/sys/devices/system/cpu/cpu0/cache") -> dict[str, int]:
    """Cache sizes in bytes by name (L1d, L1i, L2, L3) from sysfs; empty when unavailable."""
    sizes: dict[str, int] = {}
    base = Path(root)
    if not base.is_dir():
        return sizes
    for index in sorted(base.glob("index*")):
        try:
            level = (index / "level").read_text().strip()
            kind = (index / "type").read_text().strip()
            size = _parse_size((index / "size").read_text().strip())
        except (OSError, ValueError):
            continue
        suffix = {"Data": "d", "Instruction": "i"}.get(kind, "")
        sizes[f"L{level}{suffix}"] = size
    return sizes


def _parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    if text and text[-1].upper() in units:
        return int(text[:-1]) * units[text[-1].upper()]
    return int(text)


def core_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def cache_dir() -> Path:
    """Where per-machine measurements are kept (never inside a repository)."""
    override = os.environ.get("GRAPHOPT_CACHE_DIR")
    if override:
        return Path(override)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "graphopt"


def machine_key(cpu: str, flags: set[str]) -> str:
    digest = hashlib.sha256((cpu + "|" + " ".join(sorted(flags))).encode()).hexdigest()
    return digest[:16]


def detect_machine(*, measure: bool = True, use_cache: bool = True,
                   refresh: bool = False) -> Machine:
    """The host CPU. With `measure`, peaks come from the cached micro-benchmark (run on a cache
    miss or with `refresh`, about a second); without, from nominal figures (for tests and quick
    looks). A measurement taken while other work loads the cores is low: `refresh` retakes it."""
    cpu, flags = cpu_info()
    isa = isa_of(flags)
    features = sorted(f for f in _FEATURE_FLAGS if f in flags)
    machine = Machine(cpu=cpu, isa=isa, features=features, cores=core_count(),
                      caches=cache_sizes(), fp32_flops=_nominal_flops(isa), bandwidth=10e9,
                      measured=False)
    if not measure:
        return machine
    peaks = _cached_peaks(machine_key(cpu, flags), use_cache, refresh)
    return replace(machine, measured=True, **{k: float(v) for k, v in peaks.items()
                                              if k in _PEAK_FIELDS})


def _nominal_flops(isa: str) -> float:
    """A 2.5 GHz core at the ISA's FMA width, for when nothing was measured."""
    return 2.5e9 * 2 * INT8_THROUGHPUT[isa].fp32_macs_per_cycle


def _cached_peaks(key: str, use_cache: bool, refresh: bool = False) -> dict[str, float]:
    path = cache_dir() / f"machine-{key}.json"
    if use_cache and not refresh:
        try:
            data = json.loads(path.read_text())
            if data.get("version") == _CACHE_VERSION:
                return data["peaks"]
        except (OSError, ValueError, KeyError):
            pass
    peaks = measure_peaks()
    if use_cache:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(json.dumps({"version": _CACHE_VERSION, "peaks": peaks,
                                       "measured_at": time.time()}))
            tmp.replace(path)
        except OSError:
            pass  # an unwritable cache only costs a re-measurement next time
    return peaks


def measure_peaks(gemm_n: int = 1024, copy_mib: int = 64) -> dict[str, float]:
    """Run the micro-benchmark in a child process with one BLAS thread (BLAS reads its thread
    count when it loads, so this process's BLAS cannot be re-pinned)."""
    env = dict(os.environ)
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
                "BLIS_NUM_THREADS", "VECLIB_MAXIMUM_THREADS"):
        env[var] = "1"
    code = (f"import json, graphopt.machine as m; "
            f"print(json.dumps(m._benchmark({gemm_n}, {copy_mib})))")
    try:
        done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                              text=True, timeout=120, check=True)
        return json.loads(done.stdout.strip().splitlines()[-1])
    except (subprocess.SubprocessError, OSError, ValueError, IndexError):
        return _benchmark(gemm_n, copy_mib)  # same process: BLAS may use several threads


def _benchmark(gemm_n: int, copy_mib: int) -> dict[str, float]:
    """Best-of-runs rates (see the Machine fields): fp32 GEMM, copy bandwidth out of and in
    cache, numpy elementwise passes, im2col gathers, and the time of a tiny numpy op."""
    import numpy as np
    from numpy.lib.stride_tricks import sliding_window_view

    rng = np.random.default_rng(0)
    a = rng.standard_normal((gemm_n, gemm_n), dtype=np.float32)
    b = rng.standard_normal((gemm_n, gemm_n), dtype=np.float32)
    c = np.empty_like(a)
    flops = 2.0 * gemm_n ** 3 / _best(lambda: np.matmul(a, b, out=c))

    def copy_rate(nbytes: int) -> float:
        src = np.ones(max(nbytes // 4, 1), dtype=np.float32)
        dst = np.empty_like(src)
        return 2.0 * src.nbytes / _best(lambda: np.copyto(dst, src))

    bandwidth = copy_rate(copy_mib << 20)
    cache_bandwidth = max(copy_rate(min(2 << 20, (copy_mib << 20) // 4)), bandwidth)

    # Elementwise passes as kernels run them on cache-sized blocks: scale by a per-row weight
    # (broadcast) into a temporary, then accumulate.
    x = np.ones((32, 2048), dtype=np.float32)
    w = np.ones((32, 1), dtype=np.float32)
    tmp, acc = np.empty_like(x), np.zeros_like(x)

    def two_passes() -> None:
        np.multiply(x, w, out=tmp)
        np.add(acc, tmp, out=acc)
    vector_rate = 2.0 * x.size / _best(two_passes)

    # im2col of a 3x3 conv into (C*kh*kw, pixels) rows: a sliding-window gather.
    img = np.ones((1, 32, 58, 58), dtype=np.float32)
    windows = sliding_window_view(img, (3, 3), axis=(2, 3))
    gathers = []
    for stride in (1, 2):
        view = windows[:, :, ::stride, ::stride].transpose(0, 1, 4, 5, 2, 3)
        col = np.empty(view.shape, dtype=np.float32)
        gathers.append(col.nbytes / _best(lambda: np.copyto(col, view)))

    tiny = np.ones(16, dtype=np.float32)
    out = np.empty_like(tiny)
    reps = 2000
    start = time.perf_counter()
    for _ in range(reps):
        np.add(tiny, tiny, out=out)
    overhead = (time.perf_counter() - start) / reps
    return {"fp32_flops": flops, "bandwidth": bandwidth, "cache_bandwidth": cache_bandwidth,
            "vector_rate": vector_rate, "gather_bandwidth": gathers[0],
            "gather_bandwidth_strided": gathers[1], "op_overhead": overhead}


def _best(fn, runs: int = 5) -> float:
    fn()  # warm: first touch of the output, BLAS thread start
    return min(_timed(fn) for _ in range(runs))


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def modeled_machine(target: str, host: Machine | None = None) -> Machine:
    """A Machine for `target` ("auto" = the host). Peaks are the host's scaled by the fp32
    vector width ratio; bandwidth, cores and caches are the host's."""
    if target not in TARGETS:
        raise UsageError(f"unknown --target {target!r} (choose from {', '.join(TARGETS)})")
    host = host or detect_machine()
    if target in ("auto", host.isa):
        return replace(host, target=target)
    ratio = (INT8_THROUGHPUT[target].fp32_macs_per_cycle
             / INT8_THROUGHPUT[host.isa].fp32_macs_per_cycle)
    # numpy's elementwise loops are vectorized to the ISA's width too.
    return replace(host, isa=target, target=target, fp32_flops=host.fp32_flops * ratio,
                   vector_rate=host.vector_rate * ratio, measured=False, features=[],
                   extra={"scaled_from": host.isa})


# ---------------------------------------------------------------------------------------------
# roofline
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Roofline:
    """Predicted time of one op: the dispatch floor, the im2col gather (a phase of its own,
    before the GEMM), and max(compute, memory) of the main loop."""

    time: float
    compute_time: float
    memory_time: float
    gather_time: float
    bound: str              # "compute" or "memory"
    traffic_bytes: int

    @property
    def time_ms(self) -> float:
        return self.time * 1e3


def roofline(cost, machine: Machine, kernel: str | None = None, threads: int = 1) -> Roofline:
    """Predicted time of an op (`graphopt.cost.OpCost`) with a kernel (default: the op's own).

    time = overhead + gather + max(compute, memory), where
    - compute = FLOPs / (BLAS rate x shape efficiency) for GEMMs, FLOPs / vector rate (numpy
      elementwise passes) for everything else, depthwise conv included (it has no reduction to
      block for BLAS: each kernel tap is a multiply and an add over the output);
    - memory = weights at memory bandwidth (read once per inference: cold) + activations at the
      bandwidth of the level they fit in (an op reads what its producer just wrote);
    - gather = the im2col (or col2im) buffer written at the measured gather rate; it is a copy
      phase before the GEMM, so it adds rather than overlaps. Permuting and indexed copies
      (Transpose, Gather, Resize...) write their output at the strided gather rate.
    View ops (Reshape, Squeeze...) move nothing; constant-foldable ops cost nothing.
    """
    kernel = kernel or cost.kernel
    if cost.kind in ("view", "constant"):
        return Roofline(machine.op_overhead, 0.0, 0.0, 0.0, "memory", 0)
    int8 = kernel.startswith("int8") and cost.gemm is not None
    if cost.kind == "gemm":
        rate = machine.compute_rate(kernel, threads) * kernel_efficiency(cost)
    else:
        rate = machine.vector_rate * max(1, min(threads, machine.cores))
    compute = cost.flops / rate if cost.flops else 0.0
    # int8 kernels read int8 weights and activations (a quarter of fp32) and write fp32/int8;
    # weights stored quantized (QDQ) are counted in int8 bytes already.
    shrink = 4 if int8 else 1
    weights = cost.weight_bytes // (1 if getattr(cost, "quantized", False) else shrink)
    activations = cost.input_bytes // shrink + cost.output_bytes
    memory = weights / machine.bandwidth \
        + activations / machine.activation_bandwidth(activations)
    gather = 0.0
    if cost.kind == "gather":
        # A permuting or indexed copy writes its output at the gather rate, not the copy rate.
        gather, memory = cost.output_bytes / machine.gather_bandwidth_strided, \
            cost.input_bytes / machine.activation_bandwidth(cost.input_bytes)
    elif cost.im2col_bytes:
        rate_gather = machine.gather_bandwidth if cost.im2col_stride <= 1 \
            else machine.gather_bandwidth_strided
        gather = cost.im2col_bytes / shrink / rate_gather
    bound = "compute" if compute >= memory + gather else "memory"
    time_s = machine.op_overhead + gather + max(compute, memory)
    return Roofline(time_s, compute, memory, gather, bound, traffic_bytes(cost, kernel))


#: GEMM dimensions at which a BLAS kernel reaches half its peak. A GEMM micro-kernel keeps an
#: MR x NR register tile (about 6-8 x 16 fp32 on AVX2) busy and amortizes packing over K; dims
#: near the tile size leave lanes idle and pay packing per small block. Half-rate points of this
#: order are what OpenBLAS/MKL show for skinny shapes; they were set from that, not fitted to a
#: model.
_HALF_RATE_DIM = {"M": 8, "N": 8, "K": 16}


def kernel_efficiency(cost) -> float:
    """Fraction of BLAS peak a GEMM reaches on this shape: d / (d + d_half) for each of M, N,
    K (small dims waste the register tile); 1.0 for non-GEMM kernels (they use the vector rate)."""
    gemm = cost.gemm
    if cost.kind != "gemm" or gemm is None:
        return 1.0
    eff = 1.0
    for dim, value in (("M", gemm.M), ("N", gemm.N), ("K", gemm.K)):
        eff *= value / (value + _HALF_RATE_DIM[dim])
    return max(eff, 1e-3)


def traffic_bytes(cost, kernel: str = "fp32") -> int:
    """Bytes the kernel moves: weights + activations, plus writing and re-reading the im2col
    buffer; int8 kernels read int8 weights and inputs. Views and constant ops move nothing."""
    if cost.kind in ("view", "constant"):
        return 0
    if kernel.startswith("int8") and cost.gemm is not None:
        weights = cost.weight_bytes if cost.quantized else cost.weight_bytes // 4
        return weights + (cost.input_bytes + 2 * cost.im2col_bytes) // 4 + cost.output_bytes
    return cost.weight_bytes + cost.input_bytes + cost.output_bytes + 2 * cost.im2col_bytes


def spearman(x, y) -> float:
    """Spearman rank correlation (ties get their average rank); nan for fewer than 2 points."""
    import numpy as np

    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.size < 2:
        return float("nan")
    rx, ry = _average_ranks(x), _average_ranks(y)
    rx -= rx.mean()
    ry -= ry.mean()
    denom = float(np.sqrt((rx * rx).sum() * (ry * ry).sum()))
    return float((rx * ry).sum() / denom) if denom else float("nan")


def _average_ranks(values):
    import numpy as np

    order = np.argsort(values, kind="stable")
    ranks = np.empty(values.size, dtype=np.float64)
    ranks[order] = np.arange(values.size, dtype=np.float64)
    sorted_values = values[order]
    # Average the ranks of equal values.
    boundaries = np.flatnonzero(np.diff(sorted_values)) + 1
    starts = np.concatenate(([0], boundaries))
    ends = np.concatenate((boundaries, [values.size]))
    for start, end in zip(starts, ends):
        if end - start > 1:
            ranks[order[start:end]] = (start + end - 1) / 2.0
    return ranks
