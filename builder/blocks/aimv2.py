"""AIMv2's embeddings (HF `Aimv2VisionEmbeddings`): the block AIMv2's tower does not share with
CLIP. Its layers are CLIP's blocks with RMSNorm, the family's biases and the SwiGLU MLP
(`builder/families/aimv2.py`).

Attribute names follow HF's modules, so these parameters' names are the checkpoint's keys.
"""

from __future__ import annotations

from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor

from ..config import BlocksConfig, TowerConfig
from ..registry import register
from .clip import add_positions, make_norm, patch_conv, patch_tokens


@register("aimv2_embeddings", kind="embeddings")
class Aimv2Embeddings(nn.Module):
    """Conv patch embedding with bias, the tower's norm on every patch (AIMv2's RMSNorm), then
    a learnt position embedding (num_patches rows); no CLS token."""

    class_tokens = 0

    def __init__(self, config: TowerConfig, blocks: BlocksConfig):
        self.patch_embed = patch_conv(config, bias=True)
        # HF's name; the norm is the tower's `blocks.norm` (RMSNorm in AIMv2).
        self.rms_norm = make_norm(config, blocks)
        self.position_embedding = nn.Embedding(config.num_patches, config.hidden_size)

    def forward(self, pixel_values: Tensor) -> Tensor:
        patches = patch_tokens(self.patch_embed, pixel_values)  # (B, P, D)
        return add_positions(self.rms_norm(patches), self.position_embedding)
