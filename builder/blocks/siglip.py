"""SigLIP's vision tower: the blocks it does not share with CLIP.

SigLIP is CLIP's tower with a different embeddings block (conv with bias, no CLS token), no
pre-LayerNorm, post-LayerNorm on the final state, gelu_tanh, and optionally an
attention-pooling head (`blocks.head`, in `heads.py`); `builder/families/siglip.py` says so.
Everything else is CLIP's blocks: HF's `SiglipEncoderLayer` has the same parameter names and
math.
"""

from __future__ import annotations

from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor

from ..config import BlocksConfig, TowerConfig
from ..registry import register
from .clip import add_positions, patch_conv, patch_tokens


@register("siglip_embeddings", kind="embeddings")
class SiglipVisionEmbeddings(nn.Module):
    """Conv patch embedding with bias, no CLS token, learnt position embedding (num_patches
    rows)."""

    class_tokens = 0

    def __init__(self, config: TowerConfig, blocks: BlocksConfig):
        self.patch_embedding = patch_conv(config, bias=True)
        self.position_embedding = nn.Embedding(config.num_patches, config.hidden_size)

    def forward(self, pixel_values: Tensor) -> Tensor:
        patches = patch_tokens(self.patch_embedding, pixel_values)  # (B, P, D)
        return add_positions(patches, self.position_embedding)
