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
    base = dict(cpu="test", isa="avx2", features=["avx2", "fma"], cores=2, caches={},
                fp32_flops=100e9, bandwidth=10e9, op_overhead=0.0)
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
    c = _cost(flops=2 * g.macs, w=4096 * 4096 * 4, i=4096 * 4096 * 4, o=4096 * 4096 * 4, gemm=g)
    r = roofline(c, m)
    eff = (4096 / 4104) ** 2 * (4096 / 4112)
    assert r.bound == "compute"
    assert r.compute_time == pytest.approx(c.flops / (100e9 * eff))
    assert r.time == pytest.approx(r.compute_time)
    assert r.memory_time == pytest.approx(3 * 4096 * 4096 * 4 / 10e9)
    # int8 acc16 halves compute time and reads a quarter of the input bytes
    r16 = roofline(c, m, kernel="int8_acc16")
    assert r16.compute_time == pytest.approx(r.compute_time / 2)
    assert r16.traffic_bytes == 2 * 4096 * 4096 + 4096 * 4096 * 4


def test_roofline_memory_bound_elementwise_and_views():
    m = _machine(op_overhead=1e-6)
    r = roofline(_cost(kind="elementwise", flops=1000, i=4000, o=4000), m)
    assert r.bound == "memory"
    assert r.time == pytest.approx(1e-6 + 8000 / 10e9)
    assert roofline(_cost(kind="view", i=4000, o=4000), m).time == pytest.approx(1e-6)


def test_traffic_counts_im2col_and_depthwise_taps():
    g = GemmShape(M=36, N=4, K=27)
    assert traffic_bytes(_cost(w=10, i=20, o=30, gemm=g, im2col=100)) == 10 + 20 + 30 + 200
    dw = GemmShape(M=36, N=1, K=9, groups=16)
    assert traffic_bytes(_cost(kind="depthwise", w=10, i=20, o=30, gemm=dw)) == 10 + 20 + 3 * 9 * 30


def test_detect_machine_caches_the_benchmark(tmp_path, monkeypatch):
    calls = []

    def fake_peaks():
        calls.append(1)
        return {"fp32_flops": 50e9, "bandwidth": 8e9, "op_overhead": 1e-6}

    monkeypatch.setenv("GRAPHOPT_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(mm, "measure_peaks", fake_peaks)
    first = mm.detect_machine()
    second = mm.detect_machine()
    assert len(calls) == 1
    assert first.fp32_flops == second.fp32_flops == 50e9 and first.measured
    files = list(tmp_path.glob("machine-*.json"))
    assert len(files) == 1 and json.loads(files[0].read_text())["peaks"]["bandwidth"] == 8e9
    nominal = mm.detect_machine(measure=False)
    assert not nominal.measured and nominal.fp32_flops > 0


def test_cache_dir_prefers_xdg(monkeypatch, tmp_path):
    monkeypatch.delenv("GRAPHOPT_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert mm.cache_dir() == tmp_path / "graphopt"


def test_micro_benchmark_measures_positive_rates():
    peaks = mm._benchmark(gemm_n=64, copy_mib=1)
    assert peaks["fp32_flops"] > 1e8 and peaks["bandwidth"] > 1e8 and peaks["op_overhead"] > 0


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
