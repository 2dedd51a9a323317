"""Fusion on real models through the full O2 pipeline: the light CNNs shipped in the onnx wheel
(every BatchNormalization folded) and the PP-OCR models shipped in rapidocr-onnxruntime (no
decomposed HardSwish left), checked against onnxruntime on the original model."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import graphopt
from graphopt import models
from graphopt.models import light
from graphopt.passes.fusion_patterns import match_hardswish
from oracle import run_ort
from test_fusion import rel_l2


def optimized(name: str):
    model = models.build(name)
    graph = graphopt.load(model)
    graphopt.optimize(graph, "O2", verify="structural")
    return model, graph


@pytest.mark.parametrize("name", ["light-resnet50", "light-shufflenet"])
def test_light_models_lose_every_batchnorm(name):
    model, graph = optimized(name)
    assert graph.count_ops("BatchNormalization") == 0
    assert graph.count_ops("Conv") > 40
    assert any(op.meta.get("graphopt.fuse_into") for op in graph.ops.values())
    feeds = light.light_input(model)
    got = run_ort(graph, feeds)[0]
    np.testing.assert_allclose(got, light.light_expected_output(name), rtol=1e-4, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in light.light_names()
                                  if n not in ("light-resnet50", "light-shufflenet")])
def test_other_light_models_match_their_expected_output(name):
    model, graph = optimized(name)
    for op in graph.ops.values():
        if op.op_type == "BatchNormalization":  # left only where nothing can take it
            producer = graph.producer_op(op.inputs[0])
            assert producer is None or producer.op_type != "Conv" \
                or len(graph.consumers(op.inputs[0])) > 1
            readers = graph.consumer_ops(op.outputs[0])
            assert all(reader.op_type not in ("Mul", "Add") for reader in readers)
    got = run_ort(graph, light.light_input(model))[0]
    np.testing.assert_allclose(got, light.light_expected_output(name), rtol=1e-4, atol=1e-6)


def text_image_input(size: int = 320) -> np.ndarray:
    """Rendered text lines normalized as RapidOCR does ((pixel / 255 - 0.5) / 0.5): a detector
    input with text in it, so the output map is not all zeros."""
    from graphopt.models import ppocr

    lines = [ppocr.render_text_line(t, 48, size) for t in ppocr.SAMPLE_LINES]
    image = np.concatenate(lines, 0)[:size]
    image = np.concatenate([image, np.full((size - image.shape[0], size, 3), 255, np.uint8)], 0)
    x = (image[..., ::-1].astype(np.float32) / 255.0 - 0.5) / 0.5
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None])


@pytest.mark.parametrize("name", ["ppocr-det", "ppocr-rec", "ppocr-cls"])
def test_ppocr_models_have_no_decomposed_hardswish_left(name):
    pytest.importorskip("rapidocr_onnxruntime", reason="pip install rapidocr-onnxruntime")
    model, graph = optimized(name)
    onnx.checker.check_model(graphopt.to_model(graph))
    assert not any(match_hardswish(graph, op) for op in graph.ops.values())
    assert graph.count_ops("BatchNormalization") == 0
    assert graph.count_ops("Clip") == 0   # every Clip was a HardSwish
    if graph.opset() < 14:   # x * HardSigmoid(x): the shortest form the model's opset allows
        assert graph.count_ops("HardSigmoid") >= 18
    feeds = (({"x": text_image_input()}) if name == "ppocr-det"
             else models.example_inputs(name, model, seed=0))
    for before, after in zip(run_ort(model, feeds), run_ort(graph, feeds)):
        assert rel_l2(after, before) <= 1e-5
