"""The "light" model zoo shipped in the onnx wheel (onnx/backend/test/data/light).

Nine classic CNNs (ResNet-50, ShuffleNet v1, SqueezeNet, VGG-19, ...) at IR 3 / opset 9, whose
weights were replaced by ConstantOfShape fills to keep the wheel small; each ships the expected
output for one deterministic input. onnx's backend test generates that input as
`arange(n).reshape(shape) / n` in float32 (`generate_dummy_data(..., random=False)`), which
`light_input` reproduces, so a run can be checked against `light_expected_output`.

They are returned exactly as shipped (old IR and opset): real-world models a loader must take.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

PREFIX = "light-"
LIGHT_DIR = Path(onnx.__file__).resolve().parent / "backend" / "test" / "data" / "light"


def light_names() -> list[str]:
    """Registry names (`light-resnet50`, ...) of the light models present in this onnx wheel."""
    return sorted(PREFIX + path.stem.removeprefix("light_") for path in LIGHT_DIR.glob("light_*.onnx"))


def _stem(name: str) -> str:
    return "light_" + name.removeprefix(PREFIX)


def light_model_path(name: str) -> Path:
    """Path of the shipped .onnx file; `name` is `light-resnet50` (or just `resnet50`)."""
    path = LIGHT_DIR / f"{_stem(name)}.onnx"
    if not path.exists():
        raise FileNotFoundError(f"no light model {name!r} in {LIGHT_DIR}; have {light_names()}")
    return path


def light_expected_output(name: str) -> np.ndarray:
    """The output onnx ships for `light_input(name)`."""
    path = LIGHT_DIR / f"{_stem(name)}_output_0.pb"
    return numpy_helper.to_array(onnx.load_tensor(str(path)))


def load_light(name: str) -> onnx.ModelProto:
    return onnx.load(str(light_model_path(name)))


def light_input(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """The deterministic input the expected outputs were computed for (the models take batch 1)."""
    initializers = {t.name for t in model.graph.initializer}
    feeds = {}
    for value in model.graph.input:
        if value.name in initializers:  # IR 3 lists every weight as a graph input too
            continue
        dims = value.type.tensor_type.shape.dim
        shape = tuple(d.dim_value if d.HasField("dim_value") else 1 for d in dims)
        count = int(np.prod(shape))
        feeds[value.name] = (np.arange(count).reshape(shape) / count).astype(np.float32)
    return feeds


def description(name: str) -> str:
    model = name.removeprefix(PREFIX)
    return f"{model} from the onnx wheel's light zoo (opset 9, constant-filled weights)"
