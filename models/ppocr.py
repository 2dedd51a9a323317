"""PP-OCR models shipped inside the `rapidocr_onnxruntime` wheel, and an OCR accuracy check.

The wheel carries three real, trained ONNX models in its `models/` folder: the PP-OCRv4 text
detector (DBNet), the PP-OCRv4 recogniser (CTC; its character table is stored in the model's
metadata_props under "character", so an optimized copy must keep metadata), and the mobile v2.0
direction classifier. `load_ppocr` returns them unchanged.

To measure what an optimization does to OCR quality, `ocr_text_accuracy` renders known text lines
with OpenCV and runs RapidOCR's own pipeline (pre-processing, detection boxes, crops, CTC
decoding) with any of the three models swapped for another file: RapidOCR accepts
`det_model_path`, `cls_model_path` and `rec_model_path` keyword arguments that override the paths
in its config.yaml. Run it once with the shipped models and once with optimized ones.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from .errors import MissingExtraError, require

PACKAGE = "rapidocr_onnxruntime"
INSTALL = 'pip install "graphopt[models]"  (or: pip install rapidocr-onnxruntime)'

MODEL_FILES = {
    "ppocr-det": "ch_PP-OCRv4_det_infer.onnx",
    "ppocr-rec": "ch_PP-OCRv4_rec_infer.onnx",
    "ppocr-cls": "ch_ppocr_mobile_v2.0_cls_infer.onnx",
}
DESCRIPTIONS = {
    "ppocr-det": "PP-OCRv4 text detector (DBNet), real weights from rapidocr-onnxruntime",
    "ppocr-rec": "PP-OCRv4 text recogniser (CTC), real weights from rapidocr-onnxruntime",
    "ppocr-cls": "PP-OCR mobile v2.0 text direction classifier, real weights",
}
# Input sizes RapidOCR feeds (config.yaml): rec 3x48x320, cls 3x48x192; det takes any multiple of 32.
EXAMPLE_SHAPES = {
    "ppocr-det": (3, 320, 320),
    "ppocr-rec": (3, 48, 320),
    "ppocr-cls": (3, 48, 192),
}

# Lines the default accuracy check renders: Hershey fonts draw ASCII only.
SAMPLE_LINES = (
    "Hello World 2024",
    "graphopt fuses ops",
    "The quick brown fox",
    "ONNX runtime 17",
    "Invoice No. 4711",
    "Total: 129.50 EUR",
    "batch size 32",
    "CPU inference",
)


def ppocr_model_path(name: str) -> Path:
    """Path of the shipped .onnx file for `ppocr-det`, `ppocr-rec` or `ppocr-cls`."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise MissingExtraError(
            f"{name} needs the package '{PACKAGE}', which is not installed: {INSTALL}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "models" / MODEL_FILES[name]
    if not path.exists():
        raise MissingExtraError(f"{name}: {path} is missing from the installed {PACKAGE}; reinstall it")
    return path


def load_ppocr(name: str) -> onnx.ModelProto:
    return onnx.load(str(ppocr_model_path(name)))


def example_inputs(name: str, rng: np.random.Generator, batch: int) -> dict[str, np.ndarray]:
    """Normalised image batches in the range RapidOCR produces ((pixel/255 - 0.5) / 0.5)."""
    model_input = load_input_name(name)
    shape = (batch, *EXAMPLE_SHAPES[name])
    return {model_input: rng.uniform(-1.0, 1.0, shape).astype(np.float32)}


def load_input_name(name: str) -> str:
    model = onnx.load(str(ppocr_model_path(name)), load_external_data=False)
    initializers = {t.name for t in model.graph.initializer}
    return next(i.name for i in model.graph.input if i.name not in initializers)


# --------------------------------------------------------------------- rendering
def render_text_line(text: str, height: int = 48, width: int = 320) -> np.ndarray:
    """Black text centred on white, uint8 BGR [height, width, 3], as a scanned line looks."""
    cv2 = require("cv2", INSTALL, "render_text_line")
    image = np.full((height, width, 3), 255, dtype=np.uint8)
    font, thickness = cv2.FONT_HERSHEY_SIMPLEX, 2
    (text_w, text_h), baseline = cv2.getTextSize(text, font, 1.0, thickness)
    scale = min(height * 0.55 / (text_h + baseline), width * 0.92 / text_w)
    (text_w, text_h), baseline = cv2.getTextSize(text, font, scale, thickness)
    origin = ((width - text_w) // 2, (height + text_h - baseline) // 2 + baseline // 2)
    cv2.putText(image, text, origin, font, scale, (0, 0, 0), thickness, cv2.LINE_AA)
    return image


# --------------------------------------------------------------------- accuracy
@dataclass(frozen=True)
class OcrAccuracy:
    """Character accuracy = 1 - edit distance / reference length, summed over lines.

    Whitespace is ignored on both sides: the detector decides where boxes split, and the
    recogniser's spaces depend on crops, neither of which is what an optimization changes.
    """

    char_accuracy: float
    line_accuracy: float  # fraction of lines read exactly (ignoring whitespace)
    predictions: tuple[str, ...]
    references: tuple[str, ...]


def make_ocr_engine(
    det_model_path: str | os.PathLike[str] | None = None,
    rec_model_path: str | os.PathLike[str] | None = None,
    cls_model_path: str | os.PathLike[str] | None = None,
    **options: object,
):
    """A RapidOCR pipeline whose det/rec/cls models are the given files (shipped ones if None)."""
    rapidocr = require(PACKAGE, INSTALL, "the OCR pipeline")
    paths = {
        "det_model_path": det_model_path,
        "rec_model_path": rec_model_path,
        "cls_model_path": cls_model_path,
    }
    overrides = {key: str(path) for key, path in paths.items() if path is not None}
    return rapidocr.RapidOCR(**overrides, **options)


def ocr_text_accuracy(
    lines: Sequence[str] = SAMPLE_LINES,
    *,
    det_model_path: str | os.PathLike[str] | None = None,
    rec_model_path: str | os.PathLike[str] | None = None,
    cls_model_path: str | os.PathLike[str] | None = None,
    use_det: bool = True,
    margin: int = 24,
) -> OcrAccuracy:
    """Render `lines`, read them back with RapidOCR, and score the text.

    With `use_det=False` each rendered line goes straight to the recogniser (fast, ~20 ms a
    line; checks rec only). With detection, each line gets a white `margin` so the detector
    sees a page-like image; expect ~1 s a line on two cores.
    """
    engine = make_ocr_engine(det_model_path, rec_model_path, cls_model_path)
    cv2 = require("cv2", INSTALL, "ocr_text_accuracy")
    predictions = []
    for line in lines:
        image = render_text_line(line)
        if use_det:
            image = cv2.copyMakeBorder(image, margin, margin, margin, margin,
                                       cv2.BORDER_CONSTANT, value=(255, 255, 255))
            result, _ = engine(image)
        else:
            result, _ = engine(image, use_det=False, use_cls=False)
        predictions.append(" ".join(str(item[-2]) for item in result) if result else "")
    return score_text(predictions, lines)


def score_text(predictions: Sequence[str], references: Sequence[str]) -> OcrAccuracy:
    predicted = ["".join(p.split()) for p in predictions]
    expected = ["".join(r.split()) for r in references]
    errors = sum(edit_distance(p, r) for p, r in zip(predicted, expected))
    total = max(1, sum(len(r) for r in expected))
    exact = sum(p == r for p, r in zip(predicted, expected))
    return OcrAccuracy(
        char_accuracy=max(0.0, 1.0 - errors / total),
        line_accuracy=exact / max(1, len(expected)),
        predictions=tuple(predictions),
        references=tuple(references),
    )


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance; one numpy row per character of `a` (strings are short)."""
    previous = np.arange(len(b) + 1)
    b_chars = np.array(list(b)) if b else np.array([], dtype="<U1")
    for i, char in enumerate(a, start=1):
        substitution = previous[:-1] + (b_chars != char)
        deletion = previous[1:] + 1
        best = np.minimum(substitution, deletion)
        # insertions chain along the row: current[j] = min(best[j-1], current[j-1] + 1)
        current = np.empty_like(previous)
        current[0] = i
        current[1:] = best
        current = np.minimum.accumulate(current - np.arange(len(b) + 1)) + np.arange(len(b) + 1)
        previous = current
    return int(previous[-1])
