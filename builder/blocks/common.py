"""Blocks shared by every tower family: activations and norms; and the half-precision rule.

An activation block is built with no arguments; a norm block with `(dim, eps)`.

Half precision (`dtype: float16 | bfloat16`): parameters and activations are stored in that
dtype, but every reduction runs in float32, as torch's CPU kernels do: matmuls accumulate in
float32 (`Linear`), and LayerNorm, attention and the patch convolution compute in float32.
TVM's default legalization would otherwise accumulate in the compute dtype, which on a
ViT-B/32 layer gave errors of 4e-2 (float16) and 3e-1 (bfloat16).
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


@register("silu", kind="activation")
class SiLU(nn.Module):
    """x * sigmoid(x) (swish, HF's "silu"): the gate of SwiGLU MLPs."""

    def forward(self, x: Tensor) -> Tensor:
        return x * op.sigmoid(x)


@register("layer_norm", kind="norm")
class LayerNorm(nn.LayerNorm):
    """LayerNorm over the last axis, with weight and bias; computed in float32 whatever the
    model's dtype."""

    def __init__(self, dim: int, eps: float):
        super().__init__(dim, eps=eps)

    def forward(self, x: Tensor) -> Tensor:
        # In float32 also because TVM 0.27 cannot legalize a bfloat16 layer_norm.
        return in_float32(
            lambda x, w, b: op.layer_norm(x, [self.normalized_shape], w, b, self.eps),
            x,
            self.weight,
            self.bias,
        )


@register("rms_norm", kind="norm")
class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight over the last axis (HF's LlamaRMSNorm and its copies:
    AIMv2, InternViT, Pixtral, Qwen); computed in float32 whatever the model's dtype."""

    def __init__(self, dim: int, eps: float):
        self.eps = eps
        self.weight = nn.Parameter((dim,))

    def forward(self, x: Tensor) -> Tensor:
        def norm(x: Tensor, w: Tensor) -> Tensor:
            return op.rms_norm(x, w, axes=[-1], epsilon=self.eps)

        return in_float32(norm, x, self.weight)


def in_float32(fn, *tensors: Tensor) -> Tensor:
    """`fn(*tensors)` computed in float32 and returned in the first tensor's dtype."""
    dtype = tensors[0].dtype
    if dtype == "float32":
        return fn(*tensors)
    return fn(*(t.astype("float32") for t in tensors)).astype(dtype)


class Linear(nn.Linear):
    """nn.Linear (same parameter names) whose matmul accumulates in float32 in half precision."""

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype == "float32":
            return super().forward(x)
        out = op.matmul(x, op.permute_dims(self.weight), out_dtype="float32")
        if self.bias is not None:
            out = out + self.bias.astype("float32")
        return out.astype(x.dtype)
