"""DLRM-style recommendation model: embedding bags, bottom MLP, pairwise interaction, top MLP.

Input representation (valid ONNX, no sparse tensors):

* `dense_features`  float32 [batch, num_dense]   continuous features (log-scaled counts).
* `indices_{t}`     int64   [batch, bag_size]    row ids into table t, one fixed-size bag per
                                                 sample; entries past the bag's length are padding
                                                 (any valid row id) and are ignored.
* `lengths_{t}`     int64   [batch]              how many of the bag_size ids are real (1..L).

Each table is looked up with Gather ([batch, L, D]), the padding positions are zeroed by a mask
built from `lengths_t` (Less(arange(L), lengths) -> Cast -> Mul), and the bag is sum-pooled with
ReduceSum over L. That is `nn.EmbeddingBag(mode="sum")` with per-sample lengths, written the way a
padded export of it looks.

Interaction follows the DLRM paper: the bottom-MLP output and the pooled embeddings are stacked to
[batch, F, D] (Unsqueeze + Concat), multiplied with their transpose in one batched MatMul, the
flattened [batch, F*F] matrix keeps its strict lower triangle through a Gather with constant
indices, and that is concatenated with the dense vector before the top MLP and a Sigmoid.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto

from .graph_builder import GraphBuilder, gemm, model_metadata
from .saving import save  # noqa: F401  (re-exported: large DLRMs need external data)

FAMILY = "dlrm"
BATCH = "batch"


@dataclass(frozen=True)
class DLRMConfig:
    table_rows: tuple[int, ...]
    embedding_dim: int
    bag_size: int
    num_dense: int
    bottom_mlp: tuple[int, ...]  # hidden widths; a last layer of width embedding_dim is added
    top_mlp: tuple[int, ...]  # hidden widths; a last layer of width 1 is added

    @property
    def num_features(self) -> int:
        """Vectors that interact: the dense vector plus one pooled embedding per table."""
        return len(self.table_rows) + 1


PRESETS: dict[str, DLRMConfig] = {
    # ~3 MB: quick enough for every test
    "small": DLRMConfig(
        table_rows=(20_000, 12_000, 8_000, 4_000),
        embedding_dim=16,
        bag_size=6,
        num_dense=13,
        bottom_mlp=(64, 32),
        top_mlp=(64, 32),
    ),
    # ~200 MB of float32 embeddings (780k rows x 64), Criteo-like dense and MLP shapes
    "default": DLRMConfig(
        table_rows=(250_000, 180_000, 120_000, 100_000, 60_000, 40_000, 20_000, 10_000),
        embedding_dim=64,
        bag_size=20,
        num_dense=13,
        bottom_mlp=(512, 256),
        top_mlp=(512, 256),
    ),
}

# `large=True` multiplies every table's rows: 9.36M rows x 64 floats = 2.4 GB, past protobuf's 2 GB.
LARGE_ROW_FACTOR = 12


def config_for(size: str = "default", large: bool = False, **overrides: object) -> DLRMConfig:
    if size not in PRESETS:
        raise ValueError(f"unknown dlrm size {size!r}; choose one of {sorted(PRESETS)}")
    config = PRESETS[size]
    if large:
        config = dataclasses.replace(
            config, table_rows=tuple(rows * LARGE_ROW_FACTOR for rows in config.table_rows)
        )
    return dataclasses.replace(config, **overrides) if overrides else config


def build_dlrm(
    *,
    size: str = "default",
    seed: int = 0,
    large: bool = False,
    table_rows: tuple[int, ...] | None = None,
    embedding_dim: int | None = None,
    bag_size: int | None = None,
    num_dense: int | None = None,
    bottom_mlp: tuple[int, ...] | None = None,
    top_mlp: tuple[int, ...] | None = None,
) -> onnx.ModelProto:
    """Build a DLRM. `large=True` gives > 2 GB of weights: save it with `save()` (external data)."""
    overrides = {
        key: value
        for key, value in dict(
            table_rows=table_rows,
            embedding_dim=embedding_dim,
            bag_size=bag_size,
            num_dense=num_dense,
            bottom_mlp=bottom_mlp,
            top_mlp=top_mlp,
        ).items()
        if value is not None
    }
    config = config_for(size, large, **overrides)
    rng = np.random.default_rng(seed)
    b = GraphBuilder("dlrm")

    dense = b.input("dense_features", TensorProto.FLOAT, [BATCH, config.num_dense])
    bags = [
        (
            b.input(f"indices_{t}", TensorProto.INT64, [BATCH, config.bag_size]),
            b.input(f"lengths_{t}", TensorProto.INT64, [BATCH]),
        )
        for t in range(len(config.table_rows))
    ]

    with b.scope("bot_l"):
        dense_vector = _mlp(b, rng, "bot_l", dense, config.num_dense,
                            (*config.bottom_mlp, config.embedding_dim), final_relu=True)

    pooled = [
        _embedding_bag(b, rng, t, rows, config, indices, lengths)
        for t, ((indices, lengths), rows) in enumerate(zip(bags, config.table_rows))
    ]

    with b.scope("interact"):
        interaction = _pairwise_interaction(b, [dense_vector, *pooled], config.num_features)
        top_input = b.op("Concat", [dense_vector, interaction], axis=1)

    pairs = config.num_features * (config.num_features - 1) // 2
    with b.scope("top_l"):
        logit = _mlp(b, rng, "top_l", top_input, config.embedding_dim + pairs,
                     (*config.top_mlp, 1), final_relu=False)
        probability = b.op("Sigmoid", [logit])
    b.output(probability, "click_probability", TensorProto.FLOAT, [BATCH, 1])

    metadata = {
        "graphopt.models.family": FAMILY,
        "graphopt.models.dlrm.table_rows": ",".join(str(r) for r in config.table_rows),
        "graphopt.models.dlrm.bag_size": str(config.bag_size),
        "graphopt.models.dlrm.num_dense": str(config.num_dense),
    }
    return b.model("DLRM-style click-through-rate model (graphopt.models.dlrm)", metadata)


def _mlp(
    b: GraphBuilder,
    rng: np.random.Generator,
    prefix: str,
    x: str,
    in_width: int,
    widths: tuple[int, ...],
    final_relu: bool,
) -> str:
    """Gemm(+Relu) layers with DLRM's initialisation (normal, std sqrt(2/(fan_in+fan_out)))."""
    for i, width in enumerate(widths):
        std = np.sqrt(2.0 / (in_width + width))
        w = rng.standard_normal((width, in_width), dtype=np.float32) * np.float32(std)
        bias = rng.standard_normal(width, dtype=np.float32) * np.float32(np.sqrt(1.0 / width))
        layer = 2 * i  # nn.Sequential index: Linear at even slots, ReLU at odd ones
        w_name = b.weight(f"{prefix}.{layer}.weight", w)
        x = gemm(b, x, w_name, b.weight(f"{prefix}.{layer}.bias", bias))
        if final_relu or i < len(widths) - 1:
            x = b.op("Relu", [x])
        in_width = width
    return x


def _embedding_bag(
    b: GraphBuilder,
    rng: np.random.Generator,
    t: int,
    rows: int,
    config: DLRMConfig,
    indices: str,
    lengths: str,
) -> str:
    """Gather one bag of rows per sample, zero the padding, sum-pool to [batch, D]."""
    dim = config.embedding_dim
    table = rng.standard_normal((rows, dim), dtype=np.float32)
    table *= np.float32(1.0 / np.sqrt(dim))  # each row has norm ~1, like a trained embedding
    with b.scope(f"emb_l.{t}"):
        rows_looked_up = b.op("Gather", [b.weight(f"emb_l.{t}.weight", table), indices], axis=0)
        positions = b.const(np.arange(config.bag_size, dtype=np.int64))
        lengths_column = b.op("Unsqueeze", [lengths, b.const(np.array([1], dtype=np.int64))])
        valid = b.op("Less", [positions, lengths_column])  # [batch, L] bool
        valid = b.op("Cast", [valid], to=TensorProto.FLOAT)
        valid = b.op("Unsqueeze", [valid, b.const(np.array([2], dtype=np.int64))])
        masked = b.op("Mul", [rows_looked_up, valid])
        return b.op("ReduceSum", [masked, b.const(np.array([1], dtype=np.int64))], keepdims=0)


def _pairwise_interaction(b: GraphBuilder, vectors: list[str], num_features: int) -> str:
    """Dot products of every pair of feature vectors, strict lower triangle, [batch, F(F-1)/2]."""
    axis1 = b.const(np.array([1], dtype=np.int64))
    stacked = b.op("Concat", [b.op("Unsqueeze", [v, axis1]) for v in vectors], axis=1)
    transposed = b.op("Transpose", [stacked], perm=[0, 2, 1])
    gram = b.op("MatMul", [stacked, transposed])  # [batch, F, F]
    flat = b.op("Reshape", [gram, b.const(np.array([-1, num_features * num_features], dtype=np.int64))])
    rows, cols = np.tril_indices(num_features, k=-1)
    lower = (rows * num_features + cols).astype(np.int64)
    return b.op("Gather", [flat, b.const(lower)], axis=1)


def example_inputs(
    model: onnx.ModelProto, rng: np.random.Generator, batch: int
) -> dict[str, np.ndarray]:
    """Dense features like log-scaled counts, ids within each table, bag lengths in 1..L."""
    meta = model_metadata(model)
    table_rows = [int(r) for r in meta["graphopt.models.dlrm.table_rows"].split(",")]
    bag_size = int(meta["graphopt.models.dlrm.bag_size"])
    num_dense = int(meta["graphopt.models.dlrm.num_dense"])
    feeds = {"dense_features": np.log1p(rng.exponential(5.0, (batch, num_dense))).astype(np.float32)}
    for t, rows in enumerate(table_rows):
        feeds[f"indices_{t}"] = rng.integers(0, rows, (batch, bag_size), dtype=np.int64)
        feeds[f"lengths_{t}"] = rng.integers(1, bag_size + 1, batch, dtype=np.int64)
    return feeds
