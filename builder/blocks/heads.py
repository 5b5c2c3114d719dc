"""Pooling heads: the final (post-LayerNorm) state (B, T, D) -> one vector per image (B, D).

A head is built inside the transformer block (so its parameters are `vision_model.head.*`, as
in HF's SigLIP checkpoints) and only when `model.output` is "pooled" or "embeds".
"""

from __future__ import annotations

from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor, op

from ..config import BlocksConfig, TowerConfig
from ..registry import create, register
from .clip import make_norm


@register("cls_pooling", kind="head")
class CLSPooling(nn.Module):
    """The first (CLS) token: HF CLIPVisionModel's pooler_output. No parameters."""

    requires_class_token = True

    def __init__(self, config: TowerConfig, blocks: BlocksConfig):
        pass

    def forward(self, hidden_states: Tensor) -> Tensor:
        b, _, d = hidden_states.shape
        first = op.split(hidden_states, [1], axis=1)[0]  # (B, 1, D)
        return op.reshape(first, (b, d))  # (B, D)


class PackedMultiheadAttention(nn.Module):
    """Cross-attention with torch.nn.MultiheadAttention's parameter layout: q, k and v stacked
    in one `in_proj_weight` (3D, D) and `in_proj_bias` (3D), then `out_proj`."""

    def __init__(self, dim: int, num_heads: int):
        self.dim, self.num_heads = dim, num_heads
        self.in_proj_weight = nn.Parameter((3 * dim, dim))
        self.in_proj_bias = nn.Parameter((3 * dim,))
        self.out_proj = nn.Linear(dim, dim)

    def _project(self, x: Tensor, i: int) -> Tensor:
        b, s, d = x.shape
        w = op.split(self.in_proj_weight, 3, axis=0)[i]  # (D, D)
        bias = op.split(self.in_proj_bias, 3, axis=0)[i]  # (D,)
        y = op.matmul(x, op.permute_dims(w)) + bias  # (B, S, D)
        return op.reshape(y, (b, s, self.num_heads, d // self.num_heads))  # (B, S, H, hd)

    def forward(self, query: Tensor, key_value: Tensor) -> Tensor:
        b, s, d = query.shape
        q, k, v = (self._project(x, i) for i, x in enumerate((query, key_value, key_value)))
        out = op.scaled_dot_product_attention(q, k, v)  # (B, S, H, hd)
        return self.out_proj(op.reshape(out, (b, s, d)))  # (B, S, D)


@register("siglip_attention_pooling", kind="head")
class SiglipMultiheadAttentionPoolingHead(nn.Module):
    """SigLIP's head: a learnt probe attends over every token, then x + mlp(norm(x))."""

    def __init__(self, config: TowerConfig, blocks: BlocksConfig):
        self.probe = nn.Parameter((1, 1, config.hidden_size))
        self.attention = PackedMultiheadAttention(config.hidden_size, config.num_attention_heads)
        self.layernorm = make_norm(config, blocks)
        self.mlp = create(blocks.mlp, "mlp", config, blocks)

    def forward(self, hidden_states: Tensor) -> Tensor:
        b, _, d = hidden_states.shape
        probe = op.broadcast_to(self.probe, (b, 1, d))  # (B, 1, D)
        pooled = self.attention(probe, hidden_states)  # (B, 1, D)
        pooled = pooled + self.mlp(self.layernorm(pooled))
        return op.reshape(pooled, (b, d))  # (B, D)
