"""Operator fusion (pipeline O2): the family's passes in run order.

- fusion_patterns: decomposed HardSwish, GELU, LayerNorm and Softmax become the standard op
  where the model's opset has it;
- fusion_fold: BatchNormalization and per-channel Mul/Div/Add/Sub fold into the weights and bias
  of Conv/ConvTranspose/Gemm/MatMul (after them, and before them where the math allows);
  MatMul + Add(bias) becomes Gemm;
- fusion_upsample: a Conv of a nearest integer-factor upsampled map (also through a channel
  Concat) becomes a ConvTranspose of the low-resolution map;
- fusion_epilogue: activations and residual adds after Conv/Gemm/MatMul are marked to run as
  fused epilogues in the graphopt runtime (op meta `graphopt.fuse_into`).

Patterns run first so that HardSwish and friends exist as single ops when epilogues are marked;
folding runs before epilogue marking so that a Conv -> BatchNorm -> Relu chain is seen as
Conv -> Relu, and before the upsample rewrite so that the terms carry the folded weights.
"""

from __future__ import annotations

from graphopt.pass_manager import Pass
from graphopt.passes.fusion_epilogue import FuseEpilogues
from graphopt.passes.fusion_fold import FoldAffineAfter, FoldAffineBefore, MatMulAddToGemm
from graphopt.passes.fusion_patterns import FuseGelu, FuseHardSwish, FuseLayerNorm, FuseSoftmax
from graphopt.passes.fusion_upsample import FuseUpsampleConv

#: The family's passes, in the order the O2 pipeline runs them.
PASSES: list[type[Pass]] = [
    FuseHardSwish,
    FuseGelu,
    FuseLayerNorm,
    FuseSoftmax,
    FoldAffineAfter,
    MatMulAddToGemm,
    FoldAffineBefore,
    FuseUpsampleConv,
    FuseEpilogues,
]
