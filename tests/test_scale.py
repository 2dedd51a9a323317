"""Scale: the pass manager's bookkeeping on a long chain, and a DLRM over 2 GB with external data
(slow) optimized, saved and run with its weights memory-mapped, not copied.

Timing targets live in benchmarks/scale.py (tests never assert on wall time).
"""

from __future__ import annotations

import multiprocessing
import shutil

import numpy as np
import onnx
import pytest

import graphopt
from fuzz.chains import chain_model
from fuzz.differential import compare, relative_l2, run_ort
from graphopt.pipeline import available_level

MIB = 1 << 20
GIB = 1 << 30


def test_pass_manager_bookkeeping_on_a_2000_node_chain():
    """Every pass record's op counts chain together (one record's after is the next one's
    before), add up to the total reduction, and the optimized chain still computes the same."""
    model = chain_model(2000)
    graph = graphopt.load(model)
    report = graphopt.optimize(graph, "O2", verify="structural")
    records = report.records
    assert report.ops_before == len(model.graph.node)
    assert records[0].ops_before == report.ops_before
    for previous, record in zip(records, records[1:]):
        assert record.ops_before == previous.ops_after, (previous.name, record.name)
    assert records[-1].ops_after == report.ops_after == graph.count_ops(recursive=True)
    assert sum(r.ops_before - r.ops_after for r in records) == report.ops_before - report.ops_after
    assert all(r.ops_after == r.ops_before for r in records if not r.changed)
    # the chain's rewrites all happened, block by block
    blocks = len(model.graph.node) // 17
    for op_type in ("BatchNormalization", "Identity", "Dropout", "Split", "Concat", "Exp"):
        assert graph.count_ops(op_type) == 0, op_type
    assert graph.count_ops("Conv") == blocks
    x = {"x": np.random.default_rng(0).standard_normal((1, 4, 4, 4)).astype(np.float32)}
    optimized = graphopt.to_model(graph)
    onnx.checker.check_model(optimized, full_check=True)
    names = [o.name for o in model.graph.output]
    assert not compare(run_ort(model, x), run_ort(optimized, x), names)


# ---------------------------------------------------------------------------------------------
# DLRM over 2 GB
# ---------------------------------------------------------------------------------------------
def _resident() -> dict[str, int]:
    """Anonymous (copies) and file-backed (mapped) resident bytes of this process."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("RssAnon", "RssFile"):
                out[key] = int(rest.split()[0]) * 1024
    return out


def _build_large_dlrm(path: str) -> None:
    from graphopt import models

    models.save(models.build("dlrm", large=True), path)


def _ort_reference(path, feeds) -> list[np.ndarray]:
    """onnxruntime on the original model, by path (its external data beside it)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 4
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


@pytest.fixture(scope="module")
def large_dlrm(tmp_path_factory):
    """The > 2 GB DLRM on disk, built and saved in a child process so that this process never
    holds its weights (its resident memory then shows what loading and running cost)."""
    folder = tmp_path_factory.mktemp("dlrm_large")
    free = shutil.disk_usage(folder).free
    if free < 8 * GIB:  # the model and its optimized copy take about 5 GB
        pytest.skip(f"needs 8 GiB of free disk for two 2.4 GB models, {free / GIB:.1f} GiB free")
    path = folder / "dlrm.onnx"
    child = multiprocessing.get_context("spawn").Process(target=_build_large_dlrm,
                                                          args=(str(path),))
    child.start()
    child.join()
    assert child.exitcode == 0
    assert (folder / "dlrm.onnx.data").stat().st_size > 2 * GIB
    return path


@pytest.mark.slow
def test_dlrm_over_2gb_optimizes_and_runs_with_weights_memory_mapped(large_dlrm, tmp_path):
    from graphopt import models
    from graphopt.runtime import Session

    before = _resident()
    graph = graphopt.load(large_dlrm)
    tables = {n: v for n, v in graph.values.items() if v.is_const and v.nbytes > 100 * MIB}
    assert sum(v.nbytes for v in tables.values()) > 2 * GIB
    assert all(isinstance(v.const, np.memmap) for v in tables.values())

    report = graphopt.optimize(graph, "O2", verify="structural")
    assert report.ops_after <= report.ops_before
    for name in tables:  # the tables are still the mapped file, not arrays copied from it
        assert isinstance(graph.values[name].const, np.memmap), name
    out = tmp_path / "dlrm.O2.onnx"
    graphopt.save(graph, out)
    assert (tmp_path / "dlrm.O2.onnx.data").stat().st_size > 2 * GIB

    header = onnx.load(str(large_dlrm), load_external_data=False)
    feeds = models.example_inputs("dlrm", header, seed=0, batch=16)
    session = Session(graph)
    result = session.run(feeds)
    after = _resident()
    copied = after["RssAnon"] - before["RssAnon"]
    print(f"\nDLRM > 2 GB: O2 {report.seconds:.1f} s, {report.ops_before}->{report.ops_after} ops; "
          f"runtime peak_bytes {session.peak_bytes / MIB:.2f} MiB; anonymous memory "
          f"+{copied / MIB:.0f} MiB, file-backed {after['RssFile'] / MIB:.0f} MiB")
    assert session.peak_bytes > 0
    assert copied < 1 * GIB, f"{copied / MIB:.0f} MiB of anonymous memory: weights were copied"

    del session
    reference = _ort_reference(large_dlrm, feeds)
    actual = [result[n] for n in graph.outputs]
    assert not compare(reference, actual, graph.outputs)

    # the saved O2 model runs in the runtime from its own (mapped) external data
    reloaded = graphopt.load(out)
    again = Session(reloaded).run(feeds)
    assert not compare(reference, [again[n] for n in reloaded.outputs], reloaded.outputs)



@pytest.mark.slow
@pytest.mark.skipif(available_level("O3") != "O3",
                    reason="O3 (row-wise int8 embeddings) does not exist yet")
def test_dlrm_over_2gb_at_o3_has_int8_embeddings_and_bounded_error(large_dlrm, tmp_path):
    from graphopt import models
    from graphopt.runtime import Session

    header = onnx.load(str(large_dlrm), load_external_data=False)
    feeds = models.example_inputs("dlrm", header, seed=0, batch=16)
    reference = _ort_reference(large_dlrm, feeds)
    graph3 = graphopt.load(large_dlrm)
    graphopt.optimize(graph3, "O3", verify="structural")
    int8_tables = [v for v in graph3.values.values()
                   if v.is_const and v.nbytes > 100 * MIB // 4 and v.const.dtype == np.int8]
    assert int8_tables, "O3 did not quantize the embedding tables to int8"
    out3 = tmp_path / "dlrm.O3.onnx"
    graphopt.save(graph3, out3)
    onnx.checker.check_model(str(out3), full_check=True)
    got = Session(graph3).run(feeds)
    assert relative_l2(reference, [got[n] for n in graph3.outputs]) < 0.1
