"""Vision networks: ResNeXt (grouped bottlenecks) and ShuffleNetV2 (split, shuffle, depthwise).

Both are written as torchvision's eval-mode modules export without BN folding: Conv without bias
followed by BatchNormalization with realistic statistics (random gamma/beta/mean, positive
variance), so a BN-folding pass has real arithmetic to fold. Parameter names follow torchvision's
state dicts (`layer1.0.conv2.weight`, `stage2.0.branch2.3.weight`, ...).

Input `input` float32 [batch, 3, R, R] (batch symbolic); output `logits` [batch, num_classes].
The channel shuffle uses constant Reshape targets with -1 for the batch dimension
(`x.view(-1, g, c // g, h, w).transpose(1, 2).contiguous().view(-1, c, h, w)`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto

from .graph_builder import GraphBuilder, gemm, model_metadata

BATCH = "batch"
BN_EPSILON = 1e-5
BN_MOMENTUM = 0.9  # PyTorch's momentum 0.1, as the exporter writes it


# --------------------------------------------------------------------- shared layers
def _conv(
    b: GraphBuilder,
    rng: np.random.Generator,
    name: str,
    x: str,
    in_channels: int,
    out_channels: int,
    kernel: int,
    stride: int = 1,
    groups: int = 1,
) -> str:
    """Bias-free Conv with He (fan-out) initialisation, padding keeps 'same' size at stride 1."""
    fan_out = out_channels * kernel * kernel // groups
    shape = (out_channels, in_channels // groups, kernel, kernel)
    w = rng.standard_normal(shape, dtype=np.float32) * np.float32(np.sqrt(2.0 / fan_out))
    pad = kernel // 2
    return b.op(
        "Conv",
        [x, b.weight(f"{name}.weight", w)],
        dilations=[1, 1],
        group=groups,
        kernel_shape=[kernel, kernel],
        pads=[pad, pad, pad, pad],
        strides=[stride, stride],
    )


def _batch_norm(
    b: GraphBuilder,
    rng: np.random.Generator,
    name: str,
    x: str,
    channels: int,
    gamma_range: tuple[float, float] = (0.5, 1.5),
) -> str:
    """Inference BatchNormalization with statistics that make folding change the weights."""
    gamma = rng.uniform(*gamma_range, channels).astype(np.float32)
    beta = (rng.standard_normal(channels) * 0.1).astype(np.float32)
    mean = (rng.standard_normal(channels) * 0.1).astype(np.float32)
    var = rng.uniform(0.5, 2.0, channels).astype(np.float32)
    params = [
        b.weight(f"{name}.weight", gamma),
        b.weight(f"{name}.bias", beta),
        b.weight(f"{name}.running_mean", mean),
        b.weight(f"{name}.running_var", var),
    ]
    return b.op("BatchNormalization", [x, *params], epsilon=BN_EPSILON, momentum=BN_MOMENTUM)


def _classifier(
    b: GraphBuilder, rng: np.random.Generator, x: str, channels: int, num_classes: int
) -> str:
    pooled = b.op("GlobalAveragePool", [x])
    flat = b.op("Flatten", [pooled], axis=1)
    bound = 1.0 / np.sqrt(channels)
    w = rng.uniform(-bound, bound, (num_classes, channels)).astype(np.float32)
    bias = rng.uniform(-bound, bound, num_classes).astype(np.float32)
    return gemm(b, flat, b.weight("fc.weight", w), b.weight("fc.bias", bias))


def _image_input(b: GraphBuilder, resolution: int) -> str:
    return b.input("input", TensorProto.FLOAT, [BATCH, 3, resolution, resolution])


def _vision_metadata(family: str, resolution: int) -> dict[str, str]:
    return {"graphopt.models.family": family, "graphopt.models.vision.resolution": str(resolution)}


# --------------------------------------------------------------------- ResNeXt
@dataclass(frozen=True)
class ResNeXtConfig:
    depth: tuple[int, ...] = (3, 4, 6, 3)  # bottleneck blocks per stage (ResNeXt-50)
    width: float = 1.0  # multiplies the stage base widths 64, 128, 256, 512
    resolution: int = 224
    groups: int = 32
    width_per_group: int = 4
    num_classes: int = 1000


RESNEXT_PRESETS = {
    "default": ResNeXtConfig(),  # ResNeXt-50 32x4d, ~25M parameters
    "small": ResNeXtConfig(depth=(1, 1, 1, 1), width=0.25, resolution=64, num_classes=100),
}
EXPANSION = 4  # bottleneck output = 4 x its base width
RESIDUAL_GAMMA = (0.1, 0.4)


def build_resnext(
    *,
    size: str = "default",
    seed: int = 0,
    depth: tuple[int, ...] | None = None,
    width: float | None = None,
    resolution: int | None = None,
    num_classes: int | None = None,
) -> onnx.ModelProto:
    """ResNeXt: stem conv + MaxPool, grouped-conv bottlenecks with residual Add, GAP, Flatten, Gemm."""
    config = _with_overrides(RESNEXT_PRESETS, size, depth=depth, width=width,
                             resolution=resolution, num_classes=num_classes)
    rng = np.random.default_rng(seed)
    b = GraphBuilder("resnext")
    x = _image_input(b, config.resolution)

    stem = max(16, int(round(64 * config.width / 16)) * 16)
    x = _conv(b, rng, "conv1", x, 3, stem, 7, stride=2)
    x = b.op("Relu", [_batch_norm(b, rng, "bn1", x, stem)])
    x = b.op("MaxPool", [x], ceil_mode=0, dilations=[1, 1], kernel_shape=[3, 3],
             pads=[1, 1, 1, 1], strides=[2, 2])

    channels = stem
    for stage, blocks in enumerate(config.depth):
        planes = max(16, int(round(64 * config.width * 2**stage / 16)) * 16)
        for block in range(blocks):
            stride = 2 if stage > 0 and block == 0 else 1
            name = f"layer{stage + 1}.{block}"
            with b.scope(name):
                x = _resnext_bottleneck(b, rng, name, x, channels, planes, stride, config)
            channels = planes * EXPANSION

    logits = _classifier(b, rng, x, channels, config.num_classes)
    b.output(logits, "logits", TensorProto.FLOAT, [BATCH, config.num_classes])
    return b.model("ResNeXt-style classifier (graphopt.models.vision)",
                   _vision_metadata("resnext", config.resolution))


def _resnext_bottleneck(
    b: GraphBuilder,
    rng: np.random.Generator,
    name: str,
    x: str,
    in_channels: int,
    planes: int,
    stride: int,
    config: ResNeXtConfig,
) -> str:
    inner = int(planes * config.width_per_group / 64) * config.groups
    out_channels = planes * EXPANSION
    y = _conv(b, rng, f"{name}.conv1", x, in_channels, inner, 1)
    y = b.op("Relu", [_batch_norm(b, rng, f"{name}.bn1", y, inner)])
    y = _conv(b, rng, f"{name}.conv2", y, inner, inner, 3, stride=stride, groups=config.groups)
    y = b.op("Relu", [_batch_norm(b, rng, f"{name}.bn2", y, inner)])
    y = _conv(b, rng, f"{name}.conv3", y, inner, out_channels, 1)
    # small gammas on the branch's last BN, as trained residual nets have: keeps depth stable
    y = _batch_norm(b, rng, f"{name}.bn3", y, out_channels, gamma_range=RESIDUAL_GAMMA)
    shortcut = x
    if stride != 1 or in_channels != out_channels:
        shortcut = _conv(b, rng, f"{name}.downsample.0", x, in_channels, out_channels, 1, stride)
        shortcut = _batch_norm(b, rng, f"{name}.downsample.1", shortcut, out_channels)
    return b.op("Relu", [b.op("Add", [y, shortcut])])


# --------------------------------------------------------------------- ShuffleNetV2
# torchvision's stage widths per multiplier: stem, three stages, conv5.
SHUFFLENET_WIDTHS = {
    0.5: (24, 48, 96, 192, 1024),
    1.0: (24, 116, 232, 464, 1024),
    1.5: (24, 176, 352, 704, 1024),
    2.0: (24, 244, 488, 976, 2048),
}
SHUFFLE_GROUPS = 2


@dataclass(frozen=True)
class ShuffleNetConfig:
    depth: tuple[int, ...] = (4, 8, 4)  # blocks per stage
    width: float = 1.0  # one of SHUFFLENET_WIDTHS, or any multiplier of the 1.0x widths
    resolution: int = 224
    num_classes: int = 1000


SHUFFLENET_PRESETS = {
    "default": ShuffleNetConfig(),  # ShuffleNetV2 1.0x, ~2.3M parameters
    "small": ShuffleNetConfig(depth=(1, 2, 1), width=0.5, resolution=64, num_classes=100),
}


def _shufflenet_widths(width: float) -> tuple[int, ...]:
    if width in SHUFFLENET_WIDTHS:
        return SHUFFLENET_WIDTHS[width]
    stem, *stages, last = SHUFFLENET_WIDTHS[1.0]
    # stage widths must be even: each block splits its channels into two halves
    return (stem, *(max(4, int(round(c * width / 4)) * 4) for c in stages), last)


def build_shufflenet(
    *,
    size: str = "default",
    seed: int = 0,
    depth: tuple[int, ...] | None = None,
    width: float | None = None,
    resolution: int | None = None,
    num_classes: int | None = None,
) -> onnx.ModelProto:
    """ShuffleNetV2: Split into two branches, depthwise 3x3 convs, Concat, channel shuffle."""
    config = _with_overrides(SHUFFLENET_PRESETS, size, depth=depth, width=width,
                             resolution=resolution, num_classes=num_classes)
    widths = _shufflenet_widths(config.width)
    if len(config.depth) != len(widths) - 2:
        raise ValueError(f"shufflenet depth needs {len(widths) - 2} stages, got {config.depth}")
    rng = np.random.default_rng(seed)
    b = GraphBuilder("shufflenet_v2")
    x = _image_input(b, config.resolution)
    size_hw = config.resolution

    stem = widths[0]
    x = _conv(b, rng, "conv1.0", x, 3, stem, 3, stride=2)
    x = b.op("Relu", [_batch_norm(b, rng, "conv1.1", x, stem)])
    x = b.op("MaxPool", [x], ceil_mode=0, dilations=[1, 1], kernel_shape=[3, 3],
             pads=[1, 1, 1, 1], strides=[2, 2])
    size_hw = _downsampled(_downsampled(size_hw))

    channels = stem
    for stage, (blocks, out_channels) in enumerate(zip(config.depth, widths[1:-1])):
        for block in range(blocks):
            name = f"stage{stage + 2}.{block}"
            with b.scope(name):
                if block == 0:
                    size_hw = _downsampled(size_hw)
                    x = _shuffle_block_downsample(b, rng, name, x, channels, out_channels)
                else:
                    x = _shuffle_block(b, rng, name, x, out_channels)
                x = _channel_shuffle(b, x, out_channels, size_hw)
            channels = out_channels

    last = widths[-1]
    x = _conv(b, rng, "conv5.0", x, channels, last, 1)
    x = b.op("Relu", [_batch_norm(b, rng, "conv5.1", x, last)])
    logits = _classifier(b, rng, x, last, config.num_classes)
    b.output(logits, "logits", TensorProto.FLOAT, [BATCH, config.num_classes])
    return b.model("ShuffleNetV2-style classifier (graphopt.models.vision)",
                   _vision_metadata("shufflenet", config.resolution))


def _downsampled(size: int) -> int:
    """Spatial size after a 3x3 stride-2 conv or pool with padding 1."""
    return (size - 1) // 2 + 1


def _pointwise_bn_relu(b: GraphBuilder, rng: np.random.Generator, name: str, slot: int,
                       x: str, cin: int, cout: int) -> str:
    x = _conv(b, rng, f"{name}.{slot}", x, cin, cout, 1)
    return b.op("Relu", [_batch_norm(b, rng, f"{name}.{slot + 1}", x, cout)])


def _depthwise_bn(b: GraphBuilder, rng: np.random.Generator, name: str, slot: int,
                  x: str, channels: int, stride: int) -> str:
    x = _conv(b, rng, f"{name}.{slot}", x, channels, channels, 3, stride=stride, groups=channels)
    return _batch_norm(b, rng, f"{name}.{slot + 1}", x, channels)


def _branch2(b: GraphBuilder, rng: np.random.Generator, name: str, x: str,
             cin: int, cout: int, stride: int) -> str:
    """1x1 conv-BN-ReLU, depthwise 3x3 conv-BN, 1x1 conv-BN-ReLU (torchvision slots 0..7)."""
    x = _pointwise_bn_relu(b, rng, f"{name}.branch2", 0, x, cin, cout)
    x = _depthwise_bn(b, rng, f"{name}.branch2", 3, x, cout, stride)
    return _pointwise_bn_relu(b, rng, f"{name}.branch2", 5, x, cout, cout)


def _shuffle_block(b: GraphBuilder, rng: np.random.Generator, name: str, x: str,
                   channels: int) -> str:
    """Stride 1: `x1, x2 = x.chunk(2, dim=1)`; concat(x1, branch2(x2))."""
    half = channels // 2
    split = b.const(np.array([half, half], dtype=np.int64))
    x1, x2 = b.op_multi("Split", [x, split], 2, axis=1)
    return b.op("Concat", [x1, _branch2(b, rng, name, x2, half, half, 1)], axis=1)


def _shuffle_block_downsample(b: GraphBuilder, rng: np.random.Generator, name: str, x: str,
                              cin: int, cout: int) -> str:
    """Stride 2: both branches see the whole input; branch1 is depthwise 3x3 then 1x1."""
    half = cout // 2
    left = _depthwise_bn(b, rng, f"{name}.branch1", 0, x, cin, 2)
    left = _pointwise_bn_relu(b, rng, f"{name}.branch1", 2, left, cin, half)
    right = _branch2(b, rng, name, x, cin, half, 2)
    return b.op("Concat", [left, right], axis=1)


def _channel_shuffle(b: GraphBuilder, x: str, channels: int, hw: int) -> str:
    groups = SHUFFLE_GROUPS
    grouped = np.array([-1, groups, channels // groups, hw, hw], dtype=np.int64)
    x = b.op("Reshape", [x, b.const(grouped)])
    x = b.op("Transpose", [x], perm=[0, 2, 1, 3, 4])
    return b.op("Reshape", [x, b.const(np.array([-1, channels, hw, hw], dtype=np.int64))])


# --------------------------------------------------------------------- helpers
def _with_overrides(presets: dict, size: str, **overrides: object):
    """The preset for `size` with every keyword that is not None replacing its field."""
    if size not in presets:
        raise ValueError(f"unknown size {size!r}; choose one of {sorted(presets)}")
    chosen = {k: v for k, v in overrides.items() if v is not None}
    if "depth" in chosen:
        chosen["depth"] = tuple(chosen["depth"])  # type: ignore[arg-type]
    return dataclasses.replace(presets[size], **chosen)


def example_inputs(
    model: onnx.ModelProto, rng: np.random.Generator, batch: int
) -> dict[str, np.ndarray]:
    """An ImageNet-normalised image batch: roughly zero mean, unit variance per channel."""
    resolution = int(model_metadata(model)["graphopt.models.vision.resolution"])
    image = rng.standard_normal((batch, 3, resolution, resolution), dtype=np.float32)
    return {"input": image}
