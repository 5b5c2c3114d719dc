"""LLaVA's multi-modal projector: the selected vision features -> the language model's width.

Attribute names follow HF transformers' `LlavaMultiModalProjector` (`linear_1`, `linear_2`),
and the top module holds it as `multi_modal_projector`, so parameter names are LLaVA's
checkpoint keys.
"""

from __future__ import annotations

from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor

from ..config import BlocksConfig, TowerConfig
from ..registry import create, register
from .common import Linear


@register("mlp2x_gelu", kind="projector")
class LlavaMultiModalProjector(nn.Module):
    """LLaVA-1.5's projector: Linear -> exact GELU -> Linear to model.projector_hidden_size."""

    # The key, behind `multi_modal_projector.`, by which the loader finds it in a checkpoint.
    anchor = "linear_1.weight"

    def __init__(self, config: TowerConfig, blocks: BlocksConfig):
        width = config.projector_hidden_size
        # Input: the selected states concatenated, hidden_size times the number of layers.
        self.linear_1 = Linear(config.hidden_size * len(config.feature_layers), width)
        # The block's name is LLaVA's `mm_projector_type`, which fixes the activation.
        self.act = create("gelu", "activation")
        self.linear_2 = Linear(width, width)

    def forward(self, features: Tensor) -> Tensor:
        return self.linear_2(self.act(self.linear_1(features)))  # (B, T, W)
