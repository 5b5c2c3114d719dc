"""DINOv2's embeddings (HF `Dinov2Embeddings`, also those of `Dinov2WithRegistersModel` and
InternViT's `InternVLVisionEmbeddings`): the blocks these towers do not share with CLIP.
Their layers are CLIP's blocks with the family's layer scale, biases and MLP
(`builder/families/dinov2.py`).

Attribute names follow HF's modules, so these parameters' names are the checkpoint's keys.
"""

from __future__ import annotations

from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor, op

from ..config import BlocksConfig, TowerConfig
from ..registry import register
from .clip import patch_conv, patch_tokens


class PatchEmbeddings(nn.Module):
    """HF's `...PatchEmbeddings`: the patch conv, with bias, as `projection`."""

    def __init__(self, config: TowerConfig):
        self.projection = patch_conv(config, bias=True)


@register("dinov2_embeddings", kind="embeddings")
class Dinov2Embeddings(nn.Module):
    """Conv patch embedding with bias, a learnt CLS token, a learnt position table (CLS and
    patches; a checkpoint's table of another grid is resampled at build time), then the
    family's register tokens between the CLS token and the patches."""

    class_tokens = 1

    def __init__(self, config: TowerConfig, blocks: BlocksConfig):
        d = config.hidden_size
        self.cls_token = nn.Parameter((1, 1, d))
        self.patch_embeddings = PatchEmbeddings(config)
        self.position_embeddings = nn.Parameter((1, config.num_patches + 1, d))
        registers = config.register_tokens
        self.register_tokens = nn.Parameter((1, registers, d)) if registers else None

    def forward(self, pixel_values: Tensor) -> Tensor:
        patches = patch_tokens(self.patch_embeddings.projection, pixel_values)  # (B, P, D)
        b, _, d = patches.shape
        cls = op.broadcast_to(self.cls_token, (b, 1, d))
        tokens = op.concat([cls, patches], dim=1) + self.position_embeddings  # (B, P + 1, D)
        if self.register_tokens is None:
            return tokens
        first, rest = op.split(tokens, [1], axis=1)
        registers = op.broadcast_to(self.register_tokens, (b, self.register_tokens.shape[1], d))
        return op.concat([first, registers, rest], dim=1)  # (B, 1 + R + P, D)
