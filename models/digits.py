"""A small trained classifier: scikit-learn's MLPClassifier on the 8x8 digits data set.

Training takes about a second, so the model is trained at build time (seeded, deterministic) and
its learned coefficients become an ONNX graph: Div by 16 (pixel scaling) -> MatMul + Add -> Relu
-> ... -> MatMul + Add -> Softmax. Unlike the random-weight builders, this one has a real
accuracy: `digits_test_split` is the held-out quarter of the data, so an optimization that
changes numerics (quantization) can be scored on it.

Input `pixels` float32 [batch, 64] with values 0..16; output `probabilities` [batch, 10].
"""

from __future__ import annotations

import functools
import warnings

import numpy as np
import onnx
from onnx import TensorProto

from .errors import require
from .graph_builder import GraphBuilder

HIDDEN_LAYERS = (128, 64)
PIXEL_MAX = 16.0  # load_digits pixels are counts 0..16
TEST_FRACTION = 0.25
INSTALL = 'pip install "graphopt[models]"  (or: pip install scikit-learn)'


@functools.lru_cache(maxsize=4)
def _trained(seed: int):
    """(classifier, X_test, y_test) for a seed; cached so build and test split agree cheaply."""
    require("sklearn", INSTALL, "digits-mlp")
    from sklearn.datasets import load_digits
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.model_selection import train_test_split
    from sklearn.neural_network import MLPClassifier
    from threadpoolctl import threadpool_limits  # a scikit-learn dependency

    digits = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(
        digits.data.astype(np.float32),
        digits.target.astype(np.int64),
        test_size=TEST_FRACTION,
        random_state=seed,
        stratify=digits.target,
    )
    classifier = MLPClassifier(hidden_layer_sizes=HIDDEN_LAYERS, activation="relu",
                               max_iter=100, random_state=seed)
    # One BLAS thread: faster for matrices this small, and the learned weights then do not
    # depend on how many cores the machine has (same seed -> same bytes everywhere).
    with warnings.catch_warnings(), threadpool_limits(limits=1):
        warnings.simplefilter("ignore", ConvergenceWarning)
        classifier.fit(x_train / PIXEL_MAX, y_train)
    x_test.flags.writeable = False
    y_test.flags.writeable = False
    return classifier, x_test, y_test


def digits_test_split(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Held-out (X float32 [n, 64] raw pixels 0..16, y int64 [n]) for the model built with `seed`."""
    _, x_test, y_test = _trained(seed)
    return x_test.copy(), y_test.copy()


def sklearn_test_accuracy(seed: int = 0) -> float:
    """What scikit-learn's own predict scores on the held-out split (the ONNX graph must match)."""
    classifier, x_test, y_test = _trained(seed)
    return float(np.mean(classifier.predict(x_test / PIXEL_MAX) == y_test))


def build_digits_mlp(*, seed: int = 0) -> onnx.ModelProto:
    classifier, _, _ = _trained(seed)
    b = GraphBuilder("digits_mlp")
    pixels = b.input("pixels", TensorProto.FLOAT, ["batch", 64])
    x = b.op("Div", [pixels, b.const(np.array(PIXEL_MAX, dtype=np.float32))])
    layers = list(zip(classifier.coefs_, classifier.intercepts_))
    for i, (coef, intercept) in enumerate(layers):
        with b.scope(f"layer{i}"):
            w = b.weight(f"layer{i}.weight", coef.astype(np.float32))  # [in, out]: MatMul-ready
            bias = b.weight(f"layer{i}.bias", intercept.astype(np.float32))
            x = b.op("Add", [b.op("MatMul", [x, w]), bias])
            if i < len(layers) - 1:
                x = b.op("Relu", [x])
    probabilities = b.op("Softmax", [x], axis=-1)
    b.output(probabilities, "probabilities", TensorProto.FLOAT, ["batch", 10])
    return b.model("MLP digit classifier trained with scikit-learn (graphopt.models.digits)",
                   {"graphopt.models.family": "digits-mlp", "graphopt.models.digits.seed": str(seed)})


def example_inputs(seed: int, batch: int) -> dict[str, np.ndarray]:
    """The first `batch` held-out digits (real data, so outputs mean something)."""
    x_test, _ = digits_test_split(seed)
    rows = np.arange(batch) % len(x_test)
    return {"pixels": x_test[rows]}
