"""Blocks shared by every tower family: activations and norms.

An activation block is built with no arguments; a norm block with `(dim, eps)`.
"""

from __future__ import annotations

from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor, op

from ..registry import register


@register("quick_gelu", kind="activation")
class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the activation of OpenAI's CLIP."""

    def forward(self, x: Tensor) -> Tensor:
        return x * op.sigmoid(x * 1.702)


@register("gelu", kind="activation")
class GELU(nn.Module):
    """Exact GELU (erf)."""

    def forward(self, x: Tensor) -> Tensor:
        return op.gelu(x)


@register("gelu_tanh", kind="activation")
class GELUTanh(nn.Module):
    """GELU with the tanh approximation (HF's gelu_pytorch_tanh, used by SigLIP)."""

    def forward(self, x: Tensor) -> Tensor:
        return op.gelu(x, approximate="tanh")


@register("layer_norm", kind="norm")
class LayerNorm(nn.LayerNorm):
    """LayerNorm over the last axis, with weight and bias."""

    def __init__(self, dim: int, eps: float):
        super().__init__(dim, eps=eps)
