"""Floating-point work of a tower, for GFLOP/s figures (a multiply-add counts as 2)."""

from __future__ import annotations

from .config import CLIPVisionConfig


def gflop(model: CLIPVisionConfig, batch: int = 1) -> float:
    """Matmuls, attention and the patch conv of the layers that run (norms and activations
    are left out: they are a fraction of a percent)."""
    tokens, width = model.num_positions, model.hidden_size
    linear = 2 * tokens * width * (4 * width + 2 * model.intermediate_size)
    attention = 2 * 2 * tokens * tokens * width
    patch = 2 * model.num_patches * width * model.num_channels * model.patch_size**2
    return batch * (model.num_layers_computed * (linear + attention) + patch) / 1e9
