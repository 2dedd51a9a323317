"""Whole models on graphopt's runtime.

- onnx's light models (onnx/backend/test/data/light) reproduce the outputs shipped with them
  for onnx's deterministic input (arange(n) / n), with onnx's own tolerances;
- the PP-OCR det/rec/cls models shipped in rapidocr-onnxruntime match onnxruntime within 1e-4
  relative L2. det gets a page of rendered text lines: on noise its probability map is almost all
  ~1e-8, where onnxruntime's approximate Sigmoid (about 1e-7 absolute error) alone would
  exceed 1e-4 relative; on text the map is what the model is for.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from graphopt.models import light
from graphopt.runtime import Session

# onnx's BackendTest tolerances for these models (densenet121 has a looser rtol there).
LIGHT_RTOL = {"densenet121": 2e-3}
LIGHT_FAST = ["resnet50", "shufflenet", "squeezenet", "bvlc_alexnet", "zfnet512",
              "inception_v1", "inception_v2"]
LIGHT_SLOW = ["densenet121", "vgg19"]      # seconds per run and large weight folds


def _check_light(name: str) -> None:
    model = light.load_light(name)
    feeds = light.light_input(model)
    session = Session(model)
    (got,) = session.run(feeds).values()
    want = light.light_expected_output(name)
    np.testing.assert_allclose(got, want, rtol=LIGHT_RTOL.get(name, 1e-3), atol=1e-7)


@pytest.mark.parametrize("name", LIGHT_FAST)
def test_light_model_expected_output(name):
    _check_light(name)


@pytest.mark.slow
@pytest.mark.parametrize("name", LIGHT_SLOW)
def test_light_model_expected_output_slow(name):
    _check_light(name)


# ---------------------------------------------------------------------------------------------
# PP-OCR
# ---------------------------------------------------------------------------------------------
def _ppocr():
    pytest.importorskip("rapidocr_onnxruntime")
    pytest.importorskip("cv2")
    from graphopt.models import ppocr
    return ppocr


def _text_page(ppocr, height: int, width: int) -> np.ndarray:
    """Rendered text lines stacked into a page, normalised as RapidOCR's detector input."""
    rows = max(1, height // 40)
    row_h = height // rows
    image = np.full((height, width, 3), 255, np.uint8)
    for i in range(rows):
        image[i * row_h:(i + 1) * row_h] = ppocr.render_text_line(
            ppocr.SAMPLE_LINES[i % len(ppocr.SAMPLE_LINES)], row_h, width)
    x = image.astype(np.float32) / 255.0
    x = (x - np.array([0.485, 0.456, 0.406], np.float32)) / np.array([0.229, 0.224, 0.225], np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None])


def _text_line(ppocr, height: int, width: int) -> np.ndarray:
    """One rendered line, normalised as RapidOCR's rec/cls input: (pixel / 255 - 0.5) / 0.5."""
    image = ppocr.render_text_line("Invoice No. 4711", height, width).astype(np.float32)
    x = (image / 255.0 - 0.5) / 0.5
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None])


def _compare_with_onnxruntime(path, x: np.ndarray) -> None:
    session = Session(str(path))
    name = session.inputs[0].name
    got = session.run({name: x})
    oracle = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    want = oracle.run(None, {oracle.get_inputs()[0].name: x})
    assert len(got) == len(want)
    for g, w in zip(got.values(), want):
        assert g.shape == w.shape
        err = np.linalg.norm(g.astype(np.float64) - w) / np.linalg.norm(w.astype(np.float64))
        assert err < 1e-4, err


def test_ppocr_det_small():
    ppocr = _ppocr()
    _compare_with_onnxruntime(ppocr.ppocr_model_path("ppocr-det"), _text_page(ppocr, 160, 224))


@pytest.mark.slow
def test_ppocr_det_full_size():
    ppocr = _ppocr()
    _compare_with_onnxruntime(ppocr.ppocr_model_path("ppocr-det"), _text_page(ppocr, 640, 640))


def test_ppocr_rec():
    ppocr = _ppocr()
    _compare_with_onnxruntime(ppocr.ppocr_model_path("ppocr-rec"), _text_line(ppocr, 48, 320))


def test_ppocr_cls():
    ppocr = _ppocr()
    _compare_with_onnxruntime(ppocr.ppocr_model_path("ppocr-cls"), _text_line(ppocr, 48, 192))


def test_ppocr_rec_on_noise():
    """rec's softmax outputs are well-conditioned even for random input."""
    ppocr = _ppocr()
    x = np.random.default_rng(0).uniform(-1, 1, (1, 3, 48, 320)).astype(np.float32)
    _compare_with_onnxruntime(ppocr.ppocr_model_path("ppocr-rec"), x)
