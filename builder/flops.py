"""Floating-point work of a tower, for GFLOP/s figures (a multiply-add counts as 2)."""

from __future__ import annotations

from .config import BlocksConfig, CLIPVisionConfig
from .registry import class_tokens


def tokens(model: CLIPVisionConfig, blocks: BlocksConfig) -> int:
    """Tokens through the encoder: the patches and the embeddings' class tokens."""
    return model.num_patches + class_tokens(blocks.embeddings)


def gflop(model: CLIPVisionConfig, blocks: BlocksConfig, batch: int = 1) -> float:
    """Matmuls, attention and the patch conv of the layers that run (norms and activations
    are left out: they are a fraction of a percent)."""
    tokens_, width = tokens(model, blocks), model.hidden_size
    linear = 2 * tokens_ * width * (4 * width + 2 * model.intermediate_size)
    attention = 2 * 2 * tokens_ * tokens_ * width
    patch = 2 * model.num_patches * width * model.num_channels * model.patch_size**2
    return batch * (model.num_layers_computed * (linear + attention) + patch) / 1e9
