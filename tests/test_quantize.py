"""O3: int8 quantization (passes/quantize.py), the outlier split (passes/outliers.py) and
acc16/acc32 kernel choice (passes/kernel_select.py), against onnxruntime and exact references.

Small seeded models built with onnx.helper (a conv net and FCs with heavy-tailed weights: a few
large ones, the rest small, as trained layers often have), the DLRM and seq2seq-step builders at
size "small". Machines are modeled (`modeled_machine(target, detect_machine(measure=False))`):
no benchmark runs."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import graphopt
from graphopt import models
from graphopt.errors import UsageError
from graphopt.machine import detect_machine, modeled_machine
from graphopt.passes.kernel_select import ACC16_MAX_ERROR, OUTLIER_THRESHOLD, acc16_error, \
    int8_weight
from graphopt.passes.outliers import split_weights
from graphopt.passes.qparams import affine_qparams
from graphopt.pipeline import optimize
from graphopt.runtime import Session
from oracle import rel_l2, run_ort

BUDGET = 2e-2
HOST = detect_machine(measure=False)


def machine(target: str):
    return modeled_machine(target, HOST)


# ---------------------------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------------------------
def heavy_tailed(rng: np.random.Generator, shape, outliers: float = 0.02) -> np.ndarray:
    """Mostly small weights and about `outliers` of them ten times larger."""
    w = rng.standard_normal(shape).astype(np.float32) * np.float32(0.02)
    big = rng.random(shape) < outliers
    w[big] = rng.standard_normal(int(big.sum())).astype(np.float32) * np.float32(0.3)
    return w


def conv_net(seed: int = 0, channels: int = 32) -> onnx.ModelProto:
    """x -> conv1 -> Relu -> conv2 (bias) -> Relu -> GAP -> Flatten -> fc; heavy-tailed conv
    weights (so conv2's activations are mostly small next to their range, as after trained
    layers, and 16-bit accumulation holds on them for seed 0)."""
    rng = np.random.default_rng(seed)
    arrays = {
        "w1": heavy_tailed(rng, (channels, 3, 3, 3)),
        "w2": heavy_tailed(rng, (channels, channels, 3, 3)),
        "b2": (rng.standard_normal(channels) * 0.1).astype(np.float32),
        "wf": (rng.standard_normal((10, channels)) * 0.3).astype(np.float32),
        "bf": (rng.standard_normal(10) * 0.1).astype(np.float32),
    }
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1], name="conv2"),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("GlobalAveragePool", ["r2"], ["p"], name="pool"),
        helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "wf", "bf"], ["y"], transB=1, name="fc"),
    ]
    graph = helper.make_graph(
        nodes, "conv_net",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])],
        [numpy_helper.from_array(a, n) for n, a in arrays.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def images(seed: int, batch: int = 4) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).standard_normal((batch, 3, 16, 16)).astype(np.float32)}


CALIBRATION = [images(100), images(101)]


def quantized(model: onnx.ModelProto, target: str = "avx2", **options):
    graph = graphopt.load(model)
    report = optimize(graph, "O3", disable=options.pop("disable", ()),
                      options={"calibration": CALIBRATION, "machine": machine(target), **options})
    return graph, report


@pytest.fixture(scope="module")
def float_model() -> onnx.ModelProto:
    return conv_net()


@pytest.fixture(scope="module")
def avx2(float_model):
    return quantized(float_model, "avx2")


@pytest.fixture(scope="module")
def vnni(float_model):
    return quantized(float_model, "avx512-vnni")


def ops_by_name(graph) -> dict:
    return {op.name: op for op in graph.ops.values()}


def stats(report, pass_name: str) -> dict:
    return {k: v for r in report.records if r.name == pass_name for k, v in r.stats.items()}


# ---------------------------------------------------------------------------------------------
# quantization
# ---------------------------------------------------------------------------------------------
#: onnxruntime's fused u8s8 kernels without VNNI (MLAS: vpmaddubsw) saturate pair sums
#: a1*w1 + a2*w2 beyond int16 when weights reach 127: on conv1 (raw-image input, zero point near
#: 128) that moves about 2% of its outputs and the model output by ~8% here. The unfused run
#: (DequantizeLinear, float op, QuantizeLinear: the ONNX semantics) is exact.
ORT_FUSED_SLACK = 5


def test_o3_model_is_valid_onnx_and_close_to_float_in_onnxruntime(float_model, avx2, vnni):
    onnx.checker.check_model(graphopt.to_model(vnni[0]), full_check=True)
    graph, report = avx2
    model = graphopt.to_model(graph)
    # onnx's shape inference types a sparse initializer as sparse_tensor, which no standard op
    # takes, so full_check rejects every model with a sparse weight; the structure checks pass
    onnx.checker.check_model(model)
    assert report.quantization["ops_int8"] == 3 and report.quantization["error_rel_l2"] <= BUDGET
    for seed in (7, 8):
        feeds = images(seed)
        expected = run_ort(float_model, feeds)[0]
        unfused = run_ort(model, feeds, optimized=False)[0]
        assert unfused.shape == expected.shape
        assert rel_l2(unfused, expected) <= 1.5 * BUDGET
        assert rel_l2(run_ort(model, feeds)[0], expected) <= ORT_FUSED_SLACK * BUDGET


def test_ops_are_int8_with_per_channel_weight_scales(avx2):
    graph, _ = avx2
    model = graphopt.to_model(graph)
    types = [n.op_type for n in model.graph.node]
    # one Q/DQ pair per quantized activation (x, r1, r2, f; outputs r1, r2, y) and a DQ per
    # weight (w1, w2 small + outliers, wf) and bias (b2, bf)
    assert types.count("QuantizeLinear") == 5
    assert types.count("DequantizeLinear") == 5 + 4 + 2
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    producers = {out: n for n in model.graph.node for out in n.output}
    ops = ops_by_name(graph)
    for name, c_out in (("conv1", 32), ("conv2", 32), ("fc", 10)):
        op = ops[name]
        assert op.meta["graphopt.quant"] == "int8"
        assert op.meta["graphopt.kernel"] in ("int8_acc16", "int8_acc32")
        assert float(op.meta["graphopt.op_intensity"]) > 0 and op.meta["graphopt.reason"]
        x_dq, w_dq = producers[op.inputs[0]], producers[op.inputs[1]]
        assert x_dq.op_type == w_dq.op_type == "DequantizeLinear"
        assert inits[w_dq.input[0]].dtype == np.int8
        scale, zp = inits[w_dq.input[1]], inits[w_dq.input[2]]
        assert scale.shape == (c_out,) and zp.shape == (c_out,) and not zp.any()
        assert helper.get_attribute_value(w_dq.attribute[0]) == 0  # axis 0: output channels
        assert inits[x_dq.input[2]].dtype == np.uint8
        if len(op.inputs) > 2:
            b_dq = producers[op.inputs[2]]
            assert inits[b_dq.input[0]].dtype == np.int32
            np.testing.assert_allclose(inits[b_dq.input[1]],
                                       inits[x_dq.input[1]] * scale, rtol=1e-6)


def test_dlrm_embeddings_are_rowwise_int8():
    model = models.build("dlrm", size="small", seed=0)
    feeds = [models.example_inputs("dlrm", model, seed=seed, batch=16) for seed in (0, 2)]
    graph = graphopt.load(model)
    report = optimize(graph, "O3", options={"calibration": feeds, "machine": machine("avx2")})
    tables = [op for op in graph.ops.values() if op.meta.get("graphopt.quant") == "int8_rowwise"]
    assert len(tables) == report.quantization["embeddings_int8"] == 4
    for op in tables:
        table = graph.values[op.inputs[0]].const
        assert table.dtype == np.int8 and table.ndim == 2
        scales = [graph.values[o.inputs[0]].const for o in graph.ops.values()
                  if o.op_type == "Gather" and o.inputs[1] == op.inputs[1] and o is not op]
        assert len(scales) == 1 and scales[0].shape == (table.shape[0],)
    out = graphopt.to_model(graph)
    onnx.checker.check_model(out)
    other = models.example_inputs("dlrm", model, seed=1, batch=4)
    expected = run_ort(model, other)[0]
    assert rel_l2(run_ort(out, other, optimized=False)[0], expected) <= 2 * BUDGET
    assert rel_l2(run_ort(out, other)[0], expected) <= ORT_FUSED_SLACK * BUDGET


def test_tight_budget_keeps_the_most_sensitive_op_in_float(float_model):
    graph, report = quantized(float_model, quant_error_budget=1e-4)
    assert report.quantization["ops_fp16"] + report.quantization["ops_fp32"] >= 1
    ops = [op for op in graph.ops.values() if "graphopt.sensitivity" in op.meta]
    worst = max(ops, key=lambda op: float(op.meta["graphopt.sensitivity"]))
    assert worst.meta["graphopt.quant"] in ("fp16", "fp32")
    assert "the highest" in worst.meta["graphopt.reason"]
    assert "budget 1e-04" in worst.meta["graphopt.reason"]
    if worst.meta["graphopt.quant"] == "fp16":
        cast = graph.producer_op(worst.inputs[1])
        assert cast.op_type == "Cast" and graph.values[cast.inputs[0]].const.dtype == np.float16
    onnx.checker.check_model(graphopt.to_model(graph))


# ---------------------------------------------------------------------------------------------
# outlier split
# ---------------------------------------------------------------------------------------------
def test_split_weights_sum_to_the_original():
    w = np.random.default_rng(0).integers(-127, 128, (8, 4, 3, 3)).astype(np.int8)
    small, big = split_weights(w)
    assert small.dtype == big.dtype == np.int8
    assert np.array_equal(small.astype(np.int16) + big, w)
    assert np.abs(small).max() <= OUTLIER_THRESHOLD
    assert np.array_equal(big != 0, np.abs(w.astype(np.int16)) > OUTLIER_THRESHOLD)


def test_outlier_split_is_exact(float_model, avx2):
    split, report = avx2
    unsplit, _ = quantized(float_model, disable=["outlier_split"])
    split_stats = stats(report, "outlier_split")
    assert split_stats["ops_split"] == 1 and 0 < split_stats["outlier_weights"] \
        <= 0.05 * split_stats["weights_of_split_ops"]
    ops = ops_by_name(split)
    main = ops["conv2"]
    outlier = next(op for op in split.ops.values()
                   if op.meta.get("graphopt.outlier_of") == "conv2")
    assert outlier.meta["graphopt.kernel"] == "int8_acc32" and outlier.op_type == "Conv"
    assert len(outlier.inputs) == 2 and outlier.inputs[0] == main.inputs[0]  # no bias, same DQ(x)
    add = split.consumers(main.outputs[0])[0][0]
    assert add.op_type == "Add" and set(add.inputs) == {main.outputs[0], outlier.outputs[0]}
    # the Relu after the sum went: exact before the output Q, whose zero point is 0
    (q, _), = split.consumers(add.outputs[0])
    assert q.op_type == "QuantizeLinear" and split.values[q.inputs[2]].const == 0

    # W_small + W_outlier == W_q, with the same scales
    w_of = lambda g, op: g.values[g.producer_op(op.inputs[1]).inputs[0]]
    small, sparse = w_of(split, main), w_of(split, outlier)
    assert sparse.sparse_proto is not None
    whole = w_of(unsplit, ops_by_name(unsplit)["conv2"]).const
    assert np.array_equal(small.const.astype(np.int16) + sparse.const, whole)
    model = graphopt.to_model(split)
    # stored sparse, as a Constant's sparse_value (dense to its reader): strictly valid
    holders = [n for n in model.graph.node if n.op_type == "Constant"
               and n.attribute[0].name == "sparse_value"]
    assert len(holders) == 1 and not model.graph.sparse_initializer
    assert holders[0].attribute[0].sparse_tensor.values.dims[0] == np.count_nonzero(sparse.const)
    onnx.checker.check_model(model, full_check=True)
    assert graphopt.load(model).values[holders[0].output[0]].sparse_proto is not None

    # onnxruntime: the same math, up to float rounding (unfused: float convs on both sides)
    feeds = images(9)
    a = run_ort(model, feeds, optimized=False)[0]
    b = run_ort(graphopt.to_model(unsplit), feeds, optimized=False)[0]
    assert rel_l2(a, b) <= 1e-3
    assert rel_l2(run_ort(model, feeds)[0], b) <= ORT_FUSED_SLACK * BUDGET   # fused: runs

    # graphopt runtime: the split group with 32-bit accumulation is bit-exact
    reloaded = graphopt.load(model)
    ops_by_name(reloaded)["conv2"].meta["graphopt.kernel"] = "int8_acc32"
    session = Session(reloaded)
    step = next(s for s in session.int8_steps if s.op == "conv2")
    assert step.outlier in ("sparse", "dense")
    assert step.absorbed[:2] == (outlier.name, add.name)
    np.testing.assert_array_equal(session.run(feeds)["y"], Session(unsplit).run(feeds)["y"])


def fc_net(op_type: str, k: int = 256, n: int = 128) -> onnx.ModelProto:
    """x -> Relu -> Gemm (transB, bias) or MatMul (3-D input), heavy-tailed weights."""
    rng = np.random.default_rng(0)
    if op_type == "Gemm":
        node = helper.make_node("Gemm", ["r", "w", "b"], ["y"], transB=1, name="fc")
        inits = [numpy_helper.from_array(heavy_tailed(rng, (n, k)), "w"),
                 numpy_helper.from_array((rng.standard_normal(n) * 0.1).astype(np.float32), "b")]
        x_shape, y_shape = ["N", k], ["N", n]
    else:
        node = helper.make_node("MatMul", ["r", "w"], ["y"], name="fc")
        inits = [numpy_helper.from_array(heavy_tailed(rng, (k, n)), "w")]
        x_shape, y_shape = ["N", 16, k], ["N", 16, n]
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["r"], name="relu"), node], "fc",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def fc_feeds(op_type: str, seed: int, k: int = 256) -> dict[str, np.ndarray]:
    """Heavy-tailed activations (mostly small next to their range)."""
    rng = np.random.default_rng(seed)
    shape = (64, k) if op_type == "Gemm" else (4, 16, k)
    return {"x": (rng.standard_normal(shape) * np.exp(rng.standard_normal(shape)))
            .astype(np.float32)}


@pytest.mark.parametrize("op_type", ["Gemm", "MatMul"])
def test_fc_outlier_split_is_exact(op_type):
    model = fc_net(op_type)
    # a loose budget keeps the lone op int8 (these activations quantize poorly): the split is
    # what is tested here
    options = {"calibration": [fc_feeds(op_type, 10), fc_feeds(op_type, 11)],
               "machine": machine("avx2"), "quant_error_budget": 0.2}
    split, unsplit = graphopt.load(model), graphopt.load(model)
    report = optimize(split, "O3", options=dict(options))
    optimize(unsplit, "O3", disable=["outlier_split"], options=dict(options))
    assert stats(report, "outlier_split")["ops_split"] == 1
    assert ops_by_name(split)["fc"].meta["graphopt.kernel"] == "int8_acc16"
    whole = ops_by_name(unsplit)["fc"]
    assert whole.meta["graphopt.kernel"] == "int8_acc32"
    assert "were not split off (outlier_split did not run)" in whole.meta["graphopt.reason"]
    feeds = fc_feeds(op_type, 20)
    a = run_ort(graphopt.to_model(split), feeds, optimized=False)[0]
    b = run_ort(graphopt.to_model(unsplit), feeds, optimized=False)[0]
    assert rel_l2(a, b) <= 1e-3
    session = Session(split)
    (step,) = session.int8_steps
    assert step.accumulation == "int8_acc16" and step.outlier == "sparse"
    np.testing.assert_array_equal(session.run(feeds)["y"], Session(unsplit).run(feeds)["y"])


# ---------------------------------------------------------------------------------------------
# kernel choice
# ---------------------------------------------------------------------------------------------
def test_kernel_choice_depends_on_the_target(avx2, vnni):
    graph, report = avx2
    conv2 = ops_by_name(graph)["conv2"]
    assert conv2.meta["graphopt.kernel"] == "int8_acc16"
    assert "compute-bound on avx2: acc16 predicted" in conv2.meta["graphopt.reason"]
    assert float(conv2.meta["graphopt.op_intensity"]) > 1000
    assert stats(report, "kernel_select") == {"acc16": 1, "acc32": 2}
    step = next(s for s in Session(graph).int8_steps if s.op == "conv2")
    assert step.accumulation == "int8_acc16"

    graph, report = vnni
    kernels = {op.name: op.meta.get("graphopt.kernel") for op in graph.ops.values()
               if op.meta.get("graphopt.quant") == "int8"}
    assert kernels == {"conv1": "int8_acc32", "conv2": "int8_acc32", "fc": "int8_acc32"}
    assert "avx512-vnni" in ops_by_name(graph)["conv2"].meta["graphopt.reason"]
    assert not any("graphopt.outlier_of" in op.meta for op in graph.ops.values())
    assert not graphopt.to_model(graph).graph.sparse_initializer
    assert stats(report, "kernel_select") == {"acc32": 3}


def fc_model(k: int = 256, n: int = 256) -> onnx.ModelProto:
    w = (np.random.default_rng(3).standard_normal((k, n)) * 0.05).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="fc")], "fc",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", n])],
        [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_memory_bound_fc_keeps_acc32_and_names_the_ridge_point():
    model = fc_model()
    feeds = [{"x": np.random.default_rng(s).standard_normal((1, 256)).astype(np.float32)}
             for s in range(2)]
    graph = graphopt.load(model)
    optimize(graph, "O3", options={"calibration": feeds, "machine": machine("avx2"),
                                   "quant_error_budget": 0.1})
    fc = ops_by_name(graph)["fc"]
    assert fc.meta["graphopt.kernel"] == "int8_acc32"
    reason = fc.meta["graphopt.reason"]
    assert "memory-bound on avx2" in reason and "ridge" in reason
    assert float(fc.meta["graphopt.op_intensity"]) < machine("avx2").ridge_point("int8_acc32")


def test_acc16_error_measures_saturation():
    rng = np.random.default_rng(4)
    x = np.abs(rng.standard_normal((1, 64, 8, 8))).astype(np.float32)
    qp = affine_qparams(0.0, float(x.max()))
    conv = next(iter(graphopt.load(helper.make_model(helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.zeros((16, 64, 3, 3), np.float32), "w")]))).ops.values()))
    # dense same-sign weights of |w_q| <= 64: the running 16-bit sum leaves int16
    dense = rng.integers(40, 65, (16, 64, 3, 3)).astype(np.int8)
    assert acc16_error(conv, dense, x, qp) > ACC16_MAX_ERROR
    # small mixed-sign weights: no 16-bit sum can leave int16 (255 * 3 * 256 < 2**15)
    small = rng.integers(-3, 4, (16, 64, 3, 3)).astype(np.int8)
    assert acc16_error(conv, small, x, qp) == 0.0


def test_acc16_that_saturates_on_calibration_keeps_acc32():
    graph, report = quantized(conv_net(seed=5))
    conv2 = ops_by_name(graph)["conv2"]
    assert conv2.meta["graphopt.kernel"] == "int8_acc32"
    assert "saturates on the calibration sample" in conv2.meta["graphopt.reason"]
    # still split: a pre-VNNI acc32 kernel sums u8*s8 pairs in 16 bits too
    outliers = [op for op in graph.ops.values() if op.meta.get("graphopt.outlier_of") == "conv2"]
    assert len(outliers) == 1 and outliers[0].meta["graphopt.kernel"] == "int8_acc32"
    assert stats(report, "outlier_split")["ops_split"] == 1


def gaussian_conv_net() -> onnx.ModelProto:
    """conv_net with Gaussian weights: far more than 5% of their 8-bit values exceed 64."""
    model = conv_net()
    rng = np.random.default_rng(11)
    for init in model.graph.initializer:
        w = numpy_helper.to_array(init)
        if w.ndim >= 2:
            init.CopyFrom(numpy_helper.from_array(
                (rng.standard_normal(w.shape) * 0.1).astype(np.float32), init.name))
    return model


def test_pre_vnni_targets_get_7_bit_weights_that_onnxruntime_sums_exactly():
    model = gaussian_conv_net()
    feeds = images(7)
    expected = run_ort(model, feeds)[0]
    narrow, report = quantized(model, "avx2")
    wide, _ = quantized(model, "avx512-vnni")
    for name in ("conv1", "conv2", "fc"):
        w7 = int8_weight(narrow, ops_by_name(narrow)[name])
        w8 = int8_weight(wide, ops_by_name(wide)[name])
        assert ops_by_name(narrow)[name].meta["graphopt.weight_bits"] == "7"
        assert ops_by_name(wide)[name].meta["graphopt.weight_bits"] == "8"
        assert np.abs(w7.astype(int)).max() <= 64 < np.abs(w8.astype(int)).max()
    assert report.quantization["ops_int8_7bit"] == 3 and report.quantization["narrow_weights"]
    # 7-bit weights: onnxruntime's fused u8s8 kernels now agree with the unfused QDQ math
    fused = run_ort(graphopt.to_model(narrow), feeds)[0]
    unfused = run_ort(graphopt.to_model(narrow), feeds, optimized=False)[0]
    assert rel_l2(fused, unfused) < 2e-3
    assert rel_l2(fused, expected) <= 1.5 * BUDGET


def test_intensity_is_known_where_inference_cannot_see_a_shape():
    # a decoder step: its positions come from a Range over the past length, which onnx shape
    # inference leaves symbolic; kernel choice measures those shapes in one run instead
    model = models.build("seq2seq-step", size="small", seed=0)
    graph = graphopt.load(model)
    optimize(graph, "O3", options={"machine": machine("avx2"), "quant_sensitivity": "auto"})
    int8 = [op for op in graph.ops.values() if op.meta.get("graphopt.quant") == "int8"]
    assert int8 and all(float(op.meta["graphopt.op_intensity"]) > 0 for op in int8)
    assert not any("shapes unknown" in op.meta["graphopt.reason"] for op in int8)


# ---------------------------------------------------------------------------------------------
# runtime and bad input
# ---------------------------------------------------------------------------------------------
def test_graphopt_runtime_runs_the_o3_model_like_onnxruntime(avx2):
    graph, _ = avx2
    model = graphopt.to_model(graph)
    session = Session(graphopt.load(model))
    assert {s.op for s in session.int8_steps} == {"conv1", "conv2", "fc"}
    for seed in (11, 12):
        feeds = images(seed)
        ours = session.run(feeds)["y"]
        assert rel_l2(ours, run_ort(model, feeds, optimized=False)[0]) <= BUDGET / 4
        assert rel_l2(ours, run_ort(model, feeds)[0]) <= ORT_FUSED_SLACK * BUDGET


@pytest.mark.parametrize("bad, message", [
    ([{"image": np.zeros((2, 3, 16, 16), np.float32)}], "no array for input(s) x"),
    ([{"x": np.zeros((2, 3, 8), np.float32)}], "'x' has shape (2, 3, 8)"),
])
def test_bad_calibration_data_is_a_usage_error(float_model, bad, message):
    with pytest.raises(UsageError) as info:
        quantized(float_model, calibration=bad)
    text = str(info.value)
    assert message in text and "\n" not in text


def test_ir3_light_model_keeps_its_inputs_at_o3():
    """IR 3 lists initializers as inputs: the opset upgrade to 13 and the evaluation copies
    must not turn constants that O2 made into graph inputs (a regression: O3 failed with
    "missing input" on light_squeezenet and crashed on light_resnet50's shared biases)."""
    import os
    path = os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data", "light",
                        "light_squeezenet.onnx")
    model = onnx.load(path)
    graph = graphopt.load(model)
    inputs = list(graph.inputs)
    report = optimize(graph, "O3", options={"machine": machine("avx2")})
    assert report.quantization["ops_int8"] > 20
    assert set(graph.inputs) <= set(inputs) and "data_0" in graph.inputs
    out = graphopt.to_model(graph)
    onnx.checker.check_model(out)
    feeds = {"data_0": np.random.default_rng(3).random((1, 3, 224, 224), np.float32)}
    expected = run_ort(model, feeds)[0]
    assert rel_l2(run_ort(out, feeds)[0], expected) <= 3 * BUDGET


def symbolic_image_model() -> onnx.ModelProto:
    model = conv_net()
    dims = model.graph.input[0].type.tensor_type.shape.dim
    dims[2].dim_param, dims[3].dim_param = "H", "W"
    return model


def test_synthetic_calibration_needs_shapes_for_symbolic_dims():
    graph = graphopt.load(symbolic_image_model())
    with pytest.raises(UsageError, match="symbolic dims .* --shape x="):
        optimize(graph, "O3", options={"machine": machine("avx2")})
    graph = graphopt.load(symbolic_image_model())
    report = optimize(graph, "O3", options={"machine": machine("avx2"),
                                            "shapes": {"x": (2, 3, 16, 16)}})
    assert report.quantization["ops_int8"] == 3
    assert report.calibration["source"] == "synthetic"


# ---------------------------------------------------------------------------------------------
# residual Adds (contract item 9) and Relus made redundant by their Q (passes/qdq_cleanup.py)
# ---------------------------------------------------------------------------------------------
def residual_net(seed: int = 0, channels: int = 16) -> onnx.ModelProto:
    """x -> conv0 -> Relu -> two ResNet basic blocks -> conv: [conv -> Relu -> conv] + shortcut
    -> Relu. The second block's shortcut is the first block's output: a float Relu after an
    Add, which O3 quantizes only because the next conv reads it."""
    rng = np.random.default_rng(seed)
    w = lambda *shape: (rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))).astype(np.float32)
    arrays = {"w0": w(channels, 3, 3, 3), "w5": w(8, channels, 1, 1)}
    nodes = [helper.make_node("Conv", ["x", "w0"], ["c0"], pads=[1, 1, 1, 1], name="conv0"),
             helper.make_node("Relu", ["c0"], ["r0"], name="relu0")]
    block_in = "r0"
    for b in ("a", "b"):
        arrays[f"w{b}1"], arrays[f"w{b}2"] = w(channels, channels, 3, 3), w(channels, channels, 3, 3)
        nodes += [
            helper.make_node("Conv", [block_in, f"w{b}1"], [f"{b}1"], pads=[1, 1, 1, 1], name=f"conv{b}1"),
            helper.make_node("Relu", [f"{b}1"], [f"{b}1r"], name=f"relu{b}1"),
            helper.make_node("Conv", [f"{b}1r", f"w{b}2"], [f"{b}2"], pads=[1, 1, 1, 1], name=f"conv{b}2"),
            helper.make_node("Add", [f"{b}2", block_in], [f"{b}s"], name=f"residual_{b}"),
            helper.make_node("Relu", [f"{b}s"], [f"{b}out"], name=f"relu_{b}")]
        block_in = f"{b}out"
    nodes.append(helper.make_node("Conv", [block_in, "w5"], ["y"], name="conv5"))
    graph = helper.make_graph(
        nodes, "residual_net",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 12, 12])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8, 12, 12])],
        [numpy_helper.from_array(a, n) for n, a in arrays.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def ort_fused_op_types(model: onnx.ModelProto, path) -> list[str]:
    """The op types of onnxruntime's own optimized graph of `model` (what it will run)."""
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(path)
    ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return sorted(n.op_type for n in onnx.load(str(path)).graph.node)


def test_residual_add_reads_dequantized_inputs_and_runs_as_qlinearadd(tmp_path):
    model = residual_net()
    calibration = [{"x": images(s)["x"][:, :, :12, :12]} for s in (200, 201)]
    graph = graphopt.load(model)
    report = optimize(graph, "O3", options={"calibration": calibration, "machine": machine("avx2"),
                                            "quant_error_budget": 0.05})
    stats = report.stats_by_pass()
    # block b's shortcut (relu_a's float output) now reads its DQ; block a's already did
    assert stats["quantize"]["stats"]["residual_adds_quantized"] == 1
    assert stats["drop_relu_before_quantize"]["stats"]["relus_dropped"] >= 2   # relu_a, relu_b
    for add in (op for op in graph.ops.values() if op.op_type == "Add"):
        assert all(graph.producer_op(name).op_type == "DequantizeLinear" for name in add.inputs)
        (reader, _), = graph.consumers(add.outputs[0])
        assert reader.op_type == "QuantizeLinear"          # its Relu dropped: zero point 0
    out = graphopt.to_model(graph)
    onnx.checker.check_model(out, full_check=True)
    assert ort_fused_op_types(out, tmp_path / "ort.onnx").count("QLinearAdd") == 2

    feeds = {"x": images(7)["x"][:, :, :12, :12]}
    reference = run_ort(model, feeds)[0]
    assert rel_l2(run_ort(out, feeds, optimized=False)[0], reference) <= 0.05 * 3
    # the runtime runs the same QDQ math: its output matches onnxruntime's unfused run
    ours = Session(graph).run(feeds)["y"]
    assert rel_l2(ours, run_ort(out, feeds, optimized=False)[0]) <= 1e-5


def test_relu_before_quantize_dropped_only_when_exact():
    from graphopt.passes.qdq_cleanup import DropReluBeforeQuantize
    from graphopt.pass_manager import PassContext

    def net(zero_point, dtype, extra_reader: bool):
        nodes = [helper.make_node("Relu", ["x"], ["r"]),
                 helper.make_node("QuantizeLinear", ["r", "s", "zp"], ["q"]),
                 helper.make_node("DequantizeLinear", ["q", "s", "zp"], ["y"])]
        outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 50])]
        if extra_reader:
            nodes.append(helper.make_node("Neg", ["r"], ["z"]))
            outputs.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, [2, 50]))
        graph = helper.make_graph(
            nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 50])], outputs,
            [numpy_helper.from_array(np.array(0.05, np.float32), "s"),
             numpy_helper.from_array(np.array(zero_point, dtype), "zp")])
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)

    feeds = {"x": (np.random.default_rng(3).standard_normal((2, 50)) * 4).astype(np.float32)}
    for zero_point, dtype, extra, dropped in [(0, np.uint8, False, True),
                                              (-128, np.int8, False, True),
                                              (3, np.uint8, False, False),
                                              (0, np.int8, False, False),
                                              (0, np.uint8, True, False)]:
        model = net(zero_point, dtype, extra)
        graph = graphopt.load(model)
        result = DropReluBeforeQuantize().run(graph, PassContext())
        assert (graph.count_ops("Relu") == 0) == dropped, (zero_point, dtype, extra)
        assert result.stats.get("relus_dropped", 0) == int(dropped)
        after = run_ort(graphopt.to_model(graph), feeds, optimized=False)
        for a, b in zip(after, run_ort(model, feeds, optimized=False)):
            np.testing.assert_array_equal(a, b)                 # bit-exact, or untouched


def test_sensitivity_ranks_on_a_few_samples_and_the_budget_on_all(monkeypatch):
    from graphopt.passes import quantize as quantize_module
    seen = []
    real_on = quantize_module.Evaluator.on
    monkeypatch.setattr(quantize_module.Evaluator, "on", lambda self, batches, reference: (
        seen.append([len(b["x"]) for b in batches]) or real_on(self, batches, reference)))
    graph = graphopt.load(conv_net())
    report = optimize(graph, "O3", options={"calibration": [images(100, batch=8)],
                                            "machine": machine("avx2"),
                                            "quant_sensitivity": "always"})
    assert seen == [[quantize_module.RANKING_SAMPLES]]
    stats = report.stats_by_pass()["quantize"]["stats"]
    assert stats["evaluations"] > 3          # the ranking ran: one evaluation per candidate, plus
    assert report.quantization["eval_samples"] == 8      # decisions on every sample
