"""Transformer language models in the layout PyTorch's exporter gives Hugging Face code.

* `build_transformer`: a BERT-style encoder. Token ids -> Gather embeddings + position embeddings
  (positions sliced from a constant buffer up to the dynamic sequence length), then N layers of
  multi-head self-attention and GELU feed-forward, each closed by a decomposed LayerNorm.
* `build_seq2seq_step`: one decoding step of an encoder-decoder model: self-attention over a
  key/value cache (past_* inputs, present_* outputs), cross-attention over the encoder's output,
  feed-forward, logits over the vocabulary.

What a graph pass meets here, as in real exports: batch and sequence are symbolic dims, every
head split/merge Reshape takes its target shape from a Shape -> Gather -> Unsqueeze -> Concat
chain, LayerNorm is ReduceMean/Sub/Pow/ReduceMean/Add/Sqrt/Div/Mul/Add, GELU is
x * 0.5 * (1 + Erf(x / sqrt(2))), Linear on 3-D activations is MatMul + Add with a pre-transposed
weight, and scalars and shape pieces are Constant nodes.

`add_bert_encoder` builds the encoder from a weights dict named like Hugging Face's BertModel
state dict, so `minilm.py` reuses it with real weights.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto

from .graph_builder import GraphBuilder, linear, model_metadata

BATCH, SEQ = "batch", "seq"
MASK_FILL = float(np.finfo(np.float32).min)  # what recent transformers versions add for padding
SQRT_2 = 1.4142135381698608  # float32(sqrt(2)), the constant the exporter writes for GELU


# --------------------------------------------------------------------- configs
@dataclass(frozen=True)
class EncoderConfig:
    vocab_size: int
    hidden: int
    layers: int
    heads: int
    intermediate: int
    max_positions: int
    type_vocab_size: int = 0  # 0: no token_type_ids input
    layer_norm_eps: float = 1e-12
    example_seq: int = 128  # sequence length example_inputs uses

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


ENCODER_PRESETS = {
    # BERT-base shapes: ~110M parameters, ~440 MB
    "default": EncoderConfig(vocab_size=30522, hidden=768, layers=12, heads=12,
                             intermediate=3072, max_positions=512),
    # ~4 MB
    "small": EncoderConfig(vocab_size=5000, hidden=128, layers=2, heads=4, intermediate=512,
                           max_positions=128, example_seq=16),
}


@dataclass(frozen=True)
class DecoderConfig:
    vocab_size: int
    hidden: int
    layers: int
    heads: int
    intermediate: int
    max_positions: int
    layer_norm_eps: float = 1e-5
    example_past: int = 32  # cached positions example_inputs uses
    example_encoder_seq: int = 64

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


DECODER_PRESETS = {
    # Transformer-base / Marian shapes: ~58M parameters, ~230 MB
    "default": DecoderConfig(vocab_size=32000, hidden=512, layers=6, heads=8, intermediate=2048,
                             max_positions=512),
    # ~2 MB
    "small": DecoderConfig(vocab_size=2000, hidden=128, layers=2, heads=4, intermediate=512,
                           max_positions=128, example_past=5, example_encoder_seq=12),
}


def _preset(presets: dict, size: str, overrides: dict[str, object]):
    if size not in presets:
        raise ValueError(f"unknown size {size!r}; choose one of {sorted(presets)}")
    chosen = {k: v for k, v in overrides.items() if v is not None}
    config = dataclasses.replace(presets[size], **chosen)
    if config.hidden % config.heads:
        raise ValueError(f"hidden {config.hidden} is not divisible by heads {config.heads}")
    return config


# --------------------------------------------------------------------- shared blocks
def i64(*values: int) -> np.ndarray:
    return np.array(values, dtype=np.int64)


def _scalar(value: float) -> np.ndarray:
    return np.array(value, dtype=np.float32)


def layer_norm(b: GraphBuilder, x: str, gamma: str, beta: str, eps: float) -> str:
    """LayerNorm over the last axis, decomposed as exporters for opset < 17 models emit it."""
    with b.scope("LayerNorm"):
        mean = b.op("ReduceMean", [x], axes=[-1], keepdims=1)
        centered = b.op("Sub", [x, mean])
        variance = b.op("ReduceMean", [b.op("Pow", [centered, b.const(_scalar(2.0))])],
                        axes=[-1], keepdims=1)
        std = b.op("Sqrt", [b.op("Add", [variance, b.const(_scalar(eps))])])
        normed = b.op("Div", [centered, std])
        return b.op("Add", [b.op("Mul", [normed, gamma]), beta])


def gelu(b: GraphBuilder, x: str) -> str:
    """Exact GELU: x * 0.5 * (1 + erf(x / sqrt(2)))."""
    erf = b.op("Erf", [b.op("Div", [x, b.const(_scalar(SQRT_2))])])
    return b.op("Mul", [b.op("Mul", [x, b.op("Add", [erf, b.const(_scalar(1.0))])]),
                        b.const(_scalar(0.5))])


def _dim(b: GraphBuilder, x: str, axis: int) -> str:
    """`x.size(axis)` as the exporter writes it: Shape -> Gather(scalar index), a 0-d int64."""
    return b.op("Gather", [b.op("Shape", [x]), b.const(np.array(axis, dtype=np.int64))], axis=0)


def _as_1d(b: GraphBuilder, scalar: str) -> str:
    return b.op("Unsqueeze", [scalar, b.const(i64(0))])


def split_heads(
    b: GraphBuilder, x: str, heads: int, head_dim: int, perm: list[int], seq_from: str | None = None
) -> str:
    """[B, S, H*Dh] -> Reshape [B, S, H, Dh] (shape from a Shape chain) -> Transpose(perm).

    `seq_from` names a tensor whose dim 1 gives S; by default `x` itself.
    """
    batch = _as_1d(b, _dim(b, x, 0))
    seq = _as_1d(b, _dim(b, seq_from or x, 1))
    shape = b.op("Concat", [batch, seq, b.const(i64(heads)), b.const(i64(head_dim))], axis=0)
    return b.op("Transpose", [b.op("Reshape", [x, shape])], perm=perm)


def merge_heads(b: GraphBuilder, context: str, hidden: int) -> str:
    """[B, H, S, Dh] -> Transpose -> Reshape [B, S, H*Dh] with the shape read off the tensor."""
    context = b.op("Transpose", [context], perm=[0, 2, 1, 3])
    batch = _as_1d(b, _dim(b, context, 0))
    seq = _as_1d(b, _dim(b, context, 1))
    shape = b.op("Concat", [batch, seq, b.const(i64(hidden))], axis=0)
    return b.op("Reshape", [context, shape])


def extended_attention_mask(b: GraphBuilder, mask: str) -> str:
    """int64 [B, S] of 1 (keep) / 0 (pad) -> float [B, 1, 1, S] of 0 / float32 min."""
    with b.scope("mask"):
        expanded = b.op("Unsqueeze", [mask, b.const(i64(1, 2))])
        as_float = b.op("Cast", [expanded], to=TensorProto.FLOAT)
        inverted = b.op("Sub", [b.const(_scalar(1.0)), as_float])
        return b.op("Mul", [inverted, b.const(_scalar(MASK_FILL))])


def attention_probs_context(
    b: GraphBuilder, query: str, key_t: str, value: str, mask: str | None, scale: float | None
) -> str:
    """softmax(Q K^T [/ sqrt(Dh)] + mask) V over [B, H, S, Dh] tensors."""
    scores = b.op("MatMul", [query, key_t])
    if scale is not None:
        scores = b.op("Div", [scores, b.const(_scalar(scale))])
    if mask is not None:
        scores = b.op("Add", [scores, mask])
    probs = b.op("Softmax", [scores], axis=-1)
    return b.op("MatMul", [probs, value])


class _Weights:
    """Turns a state dict into initializers on first use; Linear weights are stored transposed."""

    def __init__(self, b: GraphBuilder, state: dict[str, np.ndarray]) -> None:
        self.b, self.state, self.names = b, state, {}

    def __call__(self, key: str) -> str:
        if key not in self.names:
            self.names[key] = self.b.weight(key, self.state[key])
        return self.names[key]

    def linear_t(self, prefix: str) -> str:
        key = f"{prefix}.weight"
        if key not in self.names:  # constant-folded weight.T, named the way the exporter does
            transposed = np.ascontiguousarray(self.state[key].T)
            self.names[key] = self.b.weight(f"onnx::MatMul_{prefix}", transposed)
        return self.names[key]

    def dense(self, x: str, prefix: str) -> str:
        return linear(self.b, x, self.linear_t(prefix), self(f"{prefix}.bias"))


# --------------------------------------------------------------------- encoder
def add_bert_encoder(
    b: GraphBuilder,
    state: dict[str, np.ndarray],
    config: EncoderConfig,
    input_ids: str,
    attention_mask: str,
    token_type_ids: str | None = None,
) -> str:
    """Add BertModel's embeddings and encoder; return the last hidden state [B, S, hidden]."""
    w = _Weights(b, state)
    with b.scope("embeddings"):
        if "embeddings.position_ids" in state:
            position_buffer = w("embeddings.position_ids")
        else:  # newer checkpoints drop the buffer; it is always arange(max_positions)
            arange = np.arange(config.max_positions, dtype=np.int64)[None, :]
            position_buffer = b.weight("embeddings.position_ids", arange)
        seq_len = _as_1d(b, _dim(b, input_ids, 1))
        position_ids = b.op("Slice", [position_buffer, b.const(i64(0)), seq_len,
                                      b.const(i64(1)), b.const(i64(1))])
        x = b.op("Gather", [w("embeddings.word_embeddings.weight"), input_ids], axis=0)
        if token_type_ids is not None:
            type_table = w("embeddings.token_type_embeddings.weight")
            types = b.op("Gather", [type_table, token_type_ids], axis=0)
            x = b.op("Add", [x, types])
        positions = b.op("Gather", [w("embeddings.position_embeddings.weight"), position_ids], axis=0)
        x = b.op("Add", [x, positions])
        x = layer_norm(b, x, w("embeddings.LayerNorm.weight"), w("embeddings.LayerNorm.bias"),
                       config.layer_norm_eps)
    mask = extended_attention_mask(b, attention_mask)

    for i in range(config.layers):
        p = f"encoder.layer.{i}"
        with b.scope(f"encoder/layer.{i}/attention/self"):
            q = split_heads(b, w.dense(x, f"{p}.attention.self.query"), config.heads,
                            config.head_dim, [0, 2, 1, 3])
            k_t = split_heads(b, w.dense(x, f"{p}.attention.self.key"), config.heads,
                              config.head_dim, [0, 2, 3, 1])
            v = split_heads(b, w.dense(x, f"{p}.attention.self.value"), config.heads,
                            config.head_dim, [0, 2, 1, 3])
            context = attention_probs_context(b, q, k_t, v, mask, float(np.sqrt(config.head_dim)))
            context = merge_heads(b, context, config.hidden)
        with b.scope(f"encoder/layer.{i}/attention/output"):
            attended = b.op("Add", [w.dense(context, f"{p}.attention.output.dense"), x])
            x = layer_norm(b, attended, w(f"{p}.attention.output.LayerNorm.weight"),
                           w(f"{p}.attention.output.LayerNorm.bias"), config.layer_norm_eps)
        with b.scope(f"encoder/layer.{i}/intermediate"):
            hidden = gelu(b, w.dense(x, f"{p}.intermediate.dense"))
        with b.scope(f"encoder/layer.{i}/output"):
            out = b.op("Add", [w.dense(hidden, f"{p}.output.dense"), x])
            x = layer_norm(b, out, w(f"{p}.output.LayerNorm.weight"), w(f"{p}.output.LayerNorm.bias"),
                           config.layer_norm_eps)
    return x


def random_bert_state(config: EncoderConfig, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """A BertModel state dict with BERT's initialisation (normal 0.02) and near-1 LN gammas."""

    def norm(prefix: str) -> None:
        _add_layer_norm(state, rng, prefix, config.hidden)

    def dense(prefix: str, out_features: int, in_features: int) -> None:
        _add_dense(state, rng, prefix, out_features, in_features)

    h = config.hidden
    state: dict[str, np.ndarray] = {
        "embeddings.position_ids": np.arange(config.max_positions, dtype=np.int64)[None, :],
        "embeddings.word_embeddings.weight": _normal(rng, (config.vocab_size, h)),
        "embeddings.position_embeddings.weight": _normal(rng, (config.max_positions, h)),
    }
    if config.type_vocab_size:
        state["embeddings.token_type_embeddings.weight"] = _normal(rng, (config.type_vocab_size, h))
    norm("embeddings.LayerNorm")
    for i in range(config.layers):
        p = f"encoder.layer.{i}"
        for proj in ("query", "key", "value"):
            dense(f"{p}.attention.self.{proj}", h, h)
        dense(f"{p}.attention.output.dense", h, h)
        norm(f"{p}.attention.output.LayerNorm")
        dense(f"{p}.intermediate.dense", config.intermediate, h)
        dense(f"{p}.output.dense", h, config.intermediate)
        norm(f"{p}.output.LayerNorm")
    return state


def build_transformer(
    *,
    size: str = "default",
    seed: int = 0,
    vocab_size: int | None = None,
    hidden: int | None = None,
    layers: int | None = None,
    heads: int | None = None,
    intermediate: int | None = None,
    max_positions: int | None = None,
) -> onnx.ModelProto:
    """BERT-style encoder with random weights: inputs input_ids, attention_mask [batch, seq]."""
    config = _preset(ENCODER_PRESETS, size, dict(vocab_size=vocab_size, hidden=hidden, layers=layers,
                                                 heads=heads, intermediate=intermediate,
                                                 max_positions=max_positions))
    rng = np.random.default_rng(seed)
    b = GraphBuilder("transformer_encoder")
    input_ids = b.input("input_ids", TensorProto.INT64, [BATCH, SEQ])
    attention_mask = b.input("attention_mask", TensorProto.INT64, [BATCH, SEQ])
    last_hidden = add_bert_encoder(b, random_bert_state(config, rng), config, input_ids, attention_mask)
    b.output(last_hidden, "last_hidden_state", TensorProto.FLOAT, [BATCH, SEQ, config.hidden])
    return b.model("BERT-style Transformer encoder (graphopt.models.transformer)",
                   _encoder_metadata("transformer", config))


def _encoder_metadata(family: str, config: EncoderConfig) -> dict[str, str]:
    return {
        "graphopt.models.family": family,
        "graphopt.models.transformer.vocab_size": str(config.vocab_size),
        "graphopt.models.transformer.max_positions": str(config.max_positions),
        "graphopt.models.transformer.example_seq": str(config.example_seq),
    }


# --------------------------------------------------------------------- decoder step
def build_seq2seq_step(
    *,
    size: str = "default",
    seed: int = 0,
    vocab_size: int | None = None,
    hidden: int | None = None,
    layers: int | None = None,
    heads: int | None = None,
    intermediate: int | None = None,
    max_positions: int | None = None,
) -> onnx.ModelProto:
    """One decoder step with a self-attention KV cache and cross-attention (BART/Marian layout).

    Inputs: input_ids [batch, 1]; encoder_hidden_states [batch, enc_seq, hidden];
    encoder_attention_mask [batch, enc_seq]; past_key_{l}, past_value_{l} [batch, heads,
    past_seq, head_dim] per layer. Outputs: logits [batch, 1, vocab] and present_key_{l},
    present_value_{l} [batch, heads, past_seq + 1, head_dim].
    """
    config = _preset(DECODER_PRESETS, size, dict(vocab_size=vocab_size, hidden=hidden, layers=layers,
                                                 heads=heads, intermediate=intermediate,
                                                 max_positions=max_positions))
    rng = np.random.default_rng(seed)
    h, heads_, dh = config.hidden, config.heads, config.head_dim
    b = GraphBuilder("seq2seq_decoder_step")
    state = _random_decoder_state(config, rng)
    w = _Weights(b, state)

    input_ids = b.input("input_ids", TensorProto.INT64, [BATCH, 1])
    encoder_states = b.input("encoder_hidden_states", TensorProto.FLOAT, [BATCH, "encoder_seq", h])
    encoder_mask = b.input("encoder_attention_mask", TensorProto.INT64, [BATCH, "encoder_seq"])
    cache_shape = [BATCH, heads_, "past_seq", dh]
    past = [
        (b.input(f"past_key_{i}", TensorProto.FLOAT, cache_shape),
         b.input(f"past_value_{i}", TensorProto.FLOAT, cache_shape))
        for i in range(config.layers)
    ]

    with b.scope("embed"):
        tokens = b.op("Gather", [w("embed_tokens.weight"), input_ids], axis=0)
        tokens = b.op("Mul", [tokens, b.const(_scalar(float(np.sqrt(h))))])  # scale_embedding
        past_len = _dim(b, past[0][0], 2)
        step_end = b.op("Add", [past_len, _dim(b, input_ids, 1)])
        positions = b.op("Range", [past_len, step_end, b.const(np.array(1, dtype=np.int64))])
        x = b.op("Add", [tokens, b.op("Gather", [w("embed_positions.weight"), positions], axis=0)])
        x = layer_norm(b, x, w("layernorm_embedding.weight"), w("layernorm_embedding.bias"),
                       config.layer_norm_eps)
    cross_mask = extended_attention_mask(b, encoder_mask)

    presents = []
    q_scale = _scalar(dh**-0.5)
    for i, (past_key, past_value) in enumerate(past):
        p = f"layers.{i}"
        with b.scope(f"{p}/self_attn"):
            q = b.op("Mul", [w.dense(x, f"{p}.self_attn.q_proj"), b.const(q_scale)])
            q = split_heads(b, q, heads_, dh, [0, 2, 1, 3])
            k = split_heads(b, w.dense(x, f"{p}.self_attn.k_proj"), heads_, dh, [0, 2, 1, 3])
            v = split_heads(b, w.dense(x, f"{p}.self_attn.v_proj"), heads_, dh, [0, 2, 1, 3])
            keys = b.op("Concat", [past_key, k], axis=2)
            values = b.op("Concat", [past_value, v], axis=2)
            presents.append((keys, values))
            keys_t = b.op("Transpose", [keys], perm=[0, 1, 3, 2])
            context = attention_probs_context(b, q, keys_t, values, None, None)
            out = w.dense(merge_heads(b, context, h), f"{p}.self_attn.out_proj")
            x = layer_norm(b, b.op("Add", [x, out]), w(f"{p}.self_attn_layer_norm.weight"),
                           w(f"{p}.self_attn_layer_norm.bias"), config.layer_norm_eps)
        with b.scope(f"{p}/encoder_attn"):
            q = b.op("Mul", [w.dense(x, f"{p}.encoder_attn.q_proj"), b.const(q_scale)])
            q = split_heads(b, q, heads_, dh, [0, 2, 1, 3])
            k_t = split_heads(b, w.dense(encoder_states, f"{p}.encoder_attn.k_proj"), heads_, dh,
                              [0, 2, 3, 1])
            v = split_heads(b, w.dense(encoder_states, f"{p}.encoder_attn.v_proj"), heads_, dh,
                            [0, 2, 1, 3])
            context = attention_probs_context(b, q, k_t, v, cross_mask, None)
            out = w.dense(merge_heads(b, context, h), f"{p}.encoder_attn.out_proj")
            x = layer_norm(b, b.op("Add", [x, out]), w(f"{p}.encoder_attn_layer_norm.weight"),
                           w(f"{p}.encoder_attn_layer_norm.bias"), config.layer_norm_eps)
        with b.scope(f"{p}/ffn"):
            y = w.dense(gelu(b, w.dense(x, f"{p}.fc1")), f"{p}.fc2")
            x = layer_norm(b, b.op("Add", [x, y]), w(f"{p}.final_layer_norm.weight"),
                           w(f"{p}.final_layer_norm.bias"), config.layer_norm_eps)

    with b.scope("lm_head"):
        logits = w.dense(x, "lm_head")
    b.output(logits, "logits", TensorProto.FLOAT, [BATCH, 1, config.vocab_size])
    present_shape = [BATCH, heads_, "total_seq", dh]
    for i, (keys, values) in enumerate(presents):
        b.output(keys, f"present_key_{i}", TensorProto.FLOAT, present_shape)
        b.output(values, f"present_value_{i}", TensorProto.FLOAT, present_shape)

    metadata = {
        "graphopt.models.family": "seq2seq-step",
        "graphopt.models.seq2seq.vocab_size": str(config.vocab_size),
        "graphopt.models.seq2seq.max_positions": str(config.max_positions),
        "graphopt.models.seq2seq.example_past": str(config.example_past),
        "graphopt.models.seq2seq.example_encoder_seq": str(config.example_encoder_seq),
    }
    return b.model("Encoder-decoder Transformer, one decoding step with KV cache "
                   "(graphopt.models.transformer)", metadata)


def _random_decoder_state(config: DecoderConfig, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """A BART-style decoder state dict (normal 0.02 weights, near-1 LayerNorm gammas)."""
    h = config.hidden
    state: dict[str, np.ndarray] = {
        "embed_tokens.weight": _normal(rng, (config.vocab_size, h)),
        "embed_positions.weight": _normal(rng, (config.max_positions, h)),
    }

    def norm(prefix: str) -> None:
        _add_layer_norm(state, rng, prefix, h)

    def dense(prefix: str, out_features: int, in_features: int) -> None:
        _add_dense(state, rng, prefix, out_features, in_features)

    norm("layernorm_embedding")
    for i in range(config.layers):
        p = f"layers.{i}"
        for attn in ("self_attn", "encoder_attn"):
            for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
                dense(f"{p}.{attn}.{proj}", h, h)
            norm(f"{p}.{attn}_layer_norm")
        dense(f"{p}.fc1", config.intermediate, h)
        dense(f"{p}.fc2", h, config.intermediate)
        norm(f"{p}.final_layer_norm")
    dense("lm_head", config.vocab_size, h)
    return state


def _normal(rng: np.random.Generator, shape: tuple[int, ...], std: float = 0.02) -> np.ndarray:
    values = rng.standard_normal(shape, dtype=np.float32)
    values *= np.float32(std)
    return values


def _add_dense(state: dict[str, np.ndarray], rng: np.random.Generator, prefix: str,
               out_features: int, in_features: int) -> None:
    """nn.Linear parameters: weight [out, in], bias [out]."""
    state[f"{prefix}.weight"] = _normal(rng, (out_features, in_features))
    state[f"{prefix}.bias"] = _normal(rng, (out_features,))


def _add_layer_norm(state: dict[str, np.ndarray], rng: np.random.Generator, prefix: str,
                    width: int) -> None:
    state[f"{prefix}.weight"] = 1.0 + _normal(rng, (width,), std=0.1)
    state[f"{prefix}.bias"] = _normal(rng, (width,), std=0.05)


# --------------------------------------------------------------------- example feeds
def padded_attention_mask(batch: int, seq: int) -> np.ndarray:
    """1 for real tokens, 0 for padding: row i keeps seq - i * seq // (2 * batch) tokens."""
    lengths = seq - np.arange(batch) * seq // (2 * batch)
    return (np.arange(seq)[None, :] < lengths[:, None]).astype(np.int64)


def encoder_example_inputs(
    model: onnx.ModelProto, rng: np.random.Generator, batch: int
) -> dict[str, np.ndarray]:
    meta = model_metadata(model)
    vocab = int(meta["graphopt.models.transformer.vocab_size"])
    seq = int(meta["graphopt.models.transformer.example_seq"])
    return {
        "input_ids": rng.integers(0, vocab, (batch, seq), dtype=np.int64),
        "attention_mask": padded_attention_mask(batch, seq),
    }


def seq2seq_example_inputs(
    model: onnx.ModelProto, rng: np.random.Generator, batch: int
) -> dict[str, np.ndarray]:
    meta = model_metadata(model)
    vocab = int(meta["graphopt.models.seq2seq.vocab_size"])
    past_len = int(meta["graphopt.models.seq2seq.example_past"])
    encoder_seq = int(meta["graphopt.models.seq2seq.example_encoder_seq"])
    feeds: dict[str, np.ndarray] = {
        "input_ids": rng.integers(0, vocab, (batch, 1), dtype=np.int64),
    }
    for value in model.graph.input:
        dims = [d.dim_value for d in value.type.tensor_type.shape.dim]
        if value.name == "encoder_hidden_states":
            feeds[value.name] = rng.standard_normal((batch, encoder_seq, dims[2]), dtype=np.float32)
        elif value.name.startswith("past_"):
            cache = (batch, dims[1], past_len, dims[3])
            feeds[value.name] = rng.standard_normal(cache, dtype=np.float32)
    feeds["encoder_attention_mask"] = padded_attention_mask(batch, encoder_seq)
    return feeds
