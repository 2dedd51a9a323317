"""The machine model: feature detection, caches, the cached micro-benchmark, the int8 table,
modeled targets and the roofline."""

from __future__ import annotations

import json

import numpy as np
import pytest

import graphopt
from graphopt import machine as mm
from graphopt.cost import GemmShape, OpCost
from graphopt.machine import (INT8_THROUGHPUT, Machine, cache_sizes, cpu_info, isa_of,
                              modeled_machine, roofline, spearman, traffic_bytes)

CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8380 CPU @ 2.30GHz
flags\t\t: fpu sse sse2 ssse3 sse4_1 avx fma avx2 avx512f avx512bw avx512_vnni
processor\t: 1
model name\t: Intel(R) Xeon(R) Platinum 8380 CPU @ 2.30GHz
flags\t\t: fpu sse
"""


def _machine(**kw) -> Machine:
    base = dict(cpu="test", isa="avx2", features=["avx2", "fma"], cores=2,
                caches={"L2": 1 << 20, "L3": 8 << 20}, fp32_flops=100e9, bandwidth=10e9,
                cache_bandwidth=40e9, vector_rate=4e9, gather_bandwidth=20e9,
                gather_bandwidth_strided=5e9, op_overhead=0.0)
    base.update(kw)
    return Machine(**base)


def test_cpu_info_reads_first_model_and_flags():
    model, flags = cpu_info(CPUINFO)
    assert model.startswith("Intel(R) Xeon(R) Platinum 8380")
    assert {"avx2", "avx512bw", "avx512_vnni"} <= flags and "amx_int8" not in flags


@pytest.mark.parametrize("flags, isa", [
    ({"sse4_1"}, "generic"),
    ({"avx2"}, "generic"),                      # AVX2 without FMA: no fp32 FMA roof
    ({"avx2", "fma"}, "avx2"),
    ({"avx2", "fma", "avx512f", "avx512bw"}, "avx512"),
    ({"avx2", "fma", "avx512bw", "avx512_vnni"}, "avx512-vnni"),
    ({"avx512bw", "avx512_vnni", "amx_tile", "amx_int8"}, "amx"),
])
def test_isa_from_flags(flags, isa):
    assert isa_of(flags) == isa


def test_cache_sizes_from_sysfs(tmp_path):
    for i, (level, kind, size) in enumerate([("1", "Data", "48K"), ("1", "Instruction", "32K"),
                                             ("2", "Unified", "1280K"), ("3", "Unified", "54M")]):
        d = tmp_path / f"index{i}"
        d.mkdir()
        (d / "level").write_text(level + "\n")
        (d / "type").write_text(kind + "\n")
        (d / "size").write_text(size + "\n")
    assert cache_sizes(str(tmp_path)) == {"L1d": 48 << 10, "L1i": 32 << 10, "L2": 1280 << 10,
                                          "L3": 54 << 20}
    assert cache_sizes(str(tmp_path / "missing")) == {}


def test_int8_table_follows_instruction_counts():
    # pre-VNNI: acc32 = 3 instructions per 32 (64) MACs, acc16 = 2; fp32 = 8 (16) per FMA.
    for isa in ("avx2", "avx512"):
        assert INT8_THROUGHPUT[isa].int8_acc32 == pytest.approx(4 / 3)
        assert INT8_THROUGHPUT[isa].int8_acc16 == pytest.approx(2.0)
    vnni = INT8_THROUGHPUT["avx512-vnni"]
    assert vnni.int8_acc32 == pytest.approx(4.0) and vnni.int8_acc32 >= vnni.int8_acc16
    assert INT8_THROUGHPUT["amx"].int8_acc32 > INT8_THROUGHPUT["amx"].int8_acc16
    assert INT8_THROUGHPUT["avx512"].fp32_macs_per_cycle == 2 * INT8_THROUGHPUT["avx2"].fp32_macs_per_cycle
    for info in INT8_THROUGHPUT.values():
        assert len(info.reasoning) > 80


def test_compute_rate_per_kernel_and_threads():
    m = _machine()
    assert m.compute_rate("fp32") == 100e9
    assert m.compute_rate("int8_acc16") == 200e9
    assert m.compute_rate("int8_acc32") == pytest.approx(100e9 * 4 / 3)
    assert m.compute_rate("fp32", threads=8) == 200e9   # capped at the core count
    assert m.ridge_point() == pytest.approx(10.0)


def test_modeled_target_scales_compute_not_memory():
    host = _machine()
    vnni = modeled_machine("avx512-vnni", host)
    assert vnni.fp32_flops == 200e9 and vnni.bandwidth == host.bandwidth
    assert vnni.vector_rate == 8e9 and vnni.cache_bandwidth == host.cache_bandwidth
    assert vnni.compute_rate("int8_acc32") == 800e9 and not vnni.measured
    assert modeled_machine("auto", host).fp32_flops == host.fp32_flops
    assert modeled_machine("avx2", host).isa == "avx2"
    with pytest.raises(graphopt.UsageError, match="unknown --target 'sparc'"):
        modeled_machine("sparc", host)


def _cost(kind="gemm", flops=0, w=0, i=0, o=0, gemm=None, im2col=0):
    return OpCost(name="op", op_type="Conv", op_id=0, kind=kind, flops=flops, weight_bytes=w,
                  input_bytes=i, output_bytes=o, gemm=gemm, im2col_bytes=im2col)


def test_roofline_compute_bound_large_gemm():
    m = _machine()
    g = GemmShape(M=4096, N=4096, K=4096)
    big = 4096 * 4096 * 4                                 # 64 MiB: does not fit in cache
    c = _cost(flops=2 * g.macs, w=big, i=big, o=big, gemm=g)
    r = roofline(c, m)
    eff = (4096 / 4104) ** 2 * (4096 / 4112)
    assert r.bound == "compute"
    assert r.compute_time == pytest.approx(c.flops / (100e9 * eff))
    assert r.time == pytest.approx(r.compute_time)
    assert r.memory_time == pytest.approx(3 * big / 10e9)
    # int8 acc16 halves compute time and reads a quarter of the input bytes
    r16 = roofline(c, m, kernel="int8_acc16")
    assert r16.compute_time == pytest.approx(r.compute_time / 2)
    assert r16.memory_time == pytest.approx(big / 4 / 10e9 + (big / 4 + big) / 10e9)
    assert r16.traffic_bytes == big // 4 + big // 4 + big


def test_roofline_im2col_is_a_phase_before_the_gemm():
    m = _machine()
    g = GemmShape(M=3136, N=64, K=576)
    c = _cost(flops=2 * g.macs, w=64 * 576 * 4, i=64 * 58 * 58 * 4, o=3136 * 64 * 4, gemm=g,
              im2col=3136 * 576 * 4)
    r = roofline(c, m)
    assert r.gather_time == pytest.approx(3136 * 576 * 4 / 20e9)
    assert r.time == pytest.approx(r.gather_time + max(r.compute_time, r.memory_time))
    c.im2col_stride = 2
    assert roofline(c, m).gather_time == pytest.approx(3136 * 576 * 4 / 5e9)


def test_roofline_elementwise_memory_bound_in_and_out_of_cache():
    m = _machine(op_overhead=1e-6)
    small = roofline(_cost(kind="elementwise", flops=1000, i=8000, o=8000), m)
    assert small.bound == "memory"
    assert small.time == pytest.approx(1e-6 + 16000 / 40e9)     # cache-resident
    n = 8 << 20                                                  # 16 MiB moved: from memory
    large = roofline(_cost(kind="elementwise", flops=n // 4, i=n, o=n), m)
    assert large.memory_time == pytest.approx(2 * n / 10e9)
    assert roofline(_cost(kind="view", i=4000, o=4000), m).time == pytest.approx(1e-6)
    assert roofline(_cost(kind="constant", o=4000), m).time == pytest.approx(1e-6)


def test_roofline_depthwise_runs_at_vector_rate():
    m = _machine()
    dw = GemmShape(M=1600, N=1, K=25, groups=192)
    c = _cost(kind="depthwise", flops=2 * dw.macs, w=192 * 25 * 4, i=192 * 1600 * 4,
              o=192 * 1600 * 4, gemm=dw)
    r = roofline(c, m)
    assert r.compute_time == pytest.approx(2 * dw.macs / 4e9) and r.bound == "compute"


def test_roofline_gather_writes_at_strided_rate():
    m = _machine()
    r = roofline(_cost(kind="gather", i=4000, o=16000), m)
    assert r.gather_time == pytest.approx(16000 / 5e9)
    assert r.memory_time == pytest.approx(4000 / 40e9)


def test_traffic_counts_im2col():
    g = GemmShape(M=36, N=4, K=27)
    assert traffic_bytes(_cost(w=10, i=20, o=30, gemm=g, im2col=100)) == 10 + 20 + 30 + 200
    assert traffic_bytes(_cost(kind="view", i=20, o=30)) == 0


def test_cache_bytes_is_half_the_last_level():
    assert _machine().cache_bytes == 4 << 20
    assert _machine(caches={}).cache_bytes == 4 << 20
    assert _machine(caches={"L2": 2 << 20, "L3": 64 << 20}).cache_bytes == 32 << 20


def test_unmeasured_rates_default_from_measured_ones():
    m = Machine(cpu="x", isa="avx2", features=[], cores=1, caches={}, fp32_flops=64e9,
                bandwidth=10e9)
    assert m.cache_bandwidth == 25e9 and m.vector_rate == 2e9
    assert m.gather_bandwidth == 10e9 and m.gather_bandwidth_strided == pytest.approx(10e9 / 3)


def test_detect_machine_caches_the_benchmark(tmp_path, monkeypatch):
    calls = []

    def fake_peaks():
        calls.append(1)
        return {"fp32_flops": 50e9, "bandwidth": 8e9, "cache_bandwidth": 30e9,
                "vector_rate": 3e9, "gather_bandwidth": 9e9, "gather_bandwidth_strided": 4e9,
                "op_overhead": 1e-6}

    monkeypatch.setenv("GRAPHOPT_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(mm, "measure_peaks", fake_peaks)
    first = mm.detect_machine()
    second = mm.detect_machine()
    assert len(calls) == 1
    assert first.fp32_flops == second.fp32_flops == 50e9 and first.measured
    assert first.vector_rate == 3e9 and first.gather_bandwidth_strided == 4e9
    files = list(tmp_path.glob("machine-*.json"))
    assert len(files) == 1 and json.loads(files[0].read_text())["peaks"]["bandwidth"] == 8e9
    mm.detect_machine(refresh=True)                     # --remeasure: measure and rewrite
    assert len(calls) == 2 and len(list(tmp_path.glob("machine-*.json"))) == 1
    nominal = mm.detect_machine(measure=False)
    assert not nominal.measured and nominal.fp32_flops > 0


def test_cache_dir_prefers_xdg(monkeypatch, tmp_path):
    monkeypatch.delenv("GRAPHOPT_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert mm.cache_dir() == tmp_path / "graphopt"


def test_micro_benchmark_measures_positive_rates():
    peaks = mm._benchmark(gemm_n=64, copy_mib=1)
    assert set(peaks) == set(mm._PEAK_FIELDS)
    assert all(v > 0 for v in peaks.values())
    assert peaks["fp32_flops"] > 1e8 and peaks["bandwidth"] > 1e8


def test_spearman_against_definition():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # no ties: 1 - 6 * sum(d^2) / (n (n^2 - 1)); ranks of y: 2,1,4,3,5 -> d^2 sum = 4
    assert spearman([1, 2, 3, 4, 5], [2, 1, 4, 3, 5]) == pytest.approx(1 - 6 * 4 / (5 * 24))
    # ties take average ranks: x ranks 0.5,0.5,2 ; y ranks 0,1,2
    rx, ry = np.array([0.5, 0.5, 2.0]), np.array([0.0, 1.0, 2.0])
    rx, ry = rx - rx.mean(), ry - ry.mean()
    expected = (rx * ry).sum() / np.sqrt((rx * rx).sum() * (ry * ry).sum())
    assert spearman([1, 1, 2], [1, 2, 3]) == pytest.approx(expected)


def test_int8_roofline_does_not_shrink_weights_stored_int8_twice():
    m = _machine()
    g = GemmShape(M=64, N=64, K=64)
    fp32 = _cost(flops=2 * g.macs, w=4096 * 4, i=4096 * 4, o=4096 * 4, gemm=g)
    qdq = _cost(flops=2 * g.macs, w=4096, i=4096 * 4, o=4096 * 4, gemm=g)
    qdq.quantized = True
    assert roofline(fp32, m, kernel="int8_acc32").memory_time == pytest.approx(
        roofline(qdq, m, kernel="int8_acc32").memory_time)
    assert traffic_bytes(fp32, "int8_acc32") == traffic_bytes(qdq, "int8_acc32") == 4096 * 6
