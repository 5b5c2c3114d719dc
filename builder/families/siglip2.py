"""SigLIP2 NaFlex (HF `Siglip2VisionModel`) at each image's own size.

SigLIP's layers (LayerNorm, gelu_tanh, q/k/v/out with biases, attention over every patch of
the image, no rotary positions) and its post-LayerNorm on the final state, with another
embeddings block (`siglip2_embeddings`): the patches, flattened (p, p, C) by the processor,
through a Linear with bias, plus the learnt G x G position table resized to the image's patch
grid (bilinear, antialiased, as HF's `resize_positional_embeddings`). The resize is a linear
map of the table that the host computes from the grid (`position_weights`).

HF pads a batch's images to max_num_patches and masks the padding out of attention: each
image's valid rows are what it gives alone, so the artifact takes one image per call and
returns those rows, HF's last_hidden_state. The attention-pooling head is not built.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..config import TowerConfig
from . import Family, NameMap, NativeTower, register
from .clip import ACTIVATIONS

if TYPE_CHECKING:  # numpy only where arrays are made: `build check` does not import it
    import numpy as np


@dataclass
class Siglip2VisionConfig(TowerConfig):
    """HF transformers' `Siglip2VisionConfig` fields and defaults (siglip2-base-patch16-naflex)."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    patch_size: int = 16
    hidden_act: str = "gelu_tanh"
    layer_norm_eps: float = 1e-6
    # Rows of the learnt position table, a square grid (HF's num_patches).
    num_patches: int = 256
    # HF's attention-pooling head: its weights are in the checkpoint, but the tower returns
    # features only and does not build it.
    vision_use_head: bool = True

    @property
    def image_size(self) -> int:
        """The side of the square image whose patch grid is the position table's; the tower
        takes any size."""
        return math.isqrt(self.num_patches) * self.patch_size

    @property
    def native(self) -> bool:
        return True

    @property
    def native_inputs(self) -> list[tuple[str, list[int | str], str]]:
        patch = self.num_channels * self.patch_size**2
        return [
            ("pixel_values", ["patches", patch], "float32"),
            ("position_weights", ["patches", self.num_patches], "float32"),
        ]

    def errors(self) -> list[tuple[tuple[str | int, ...], str]]:
        side = math.isqrt(self.num_patches)
        if side * side != self.num_patches:
            return [(("model", "num_patches"), f"{self.num_patches} is not a square number")]
        return []


def position_weights(table_side: int, grid: Any) -> np.ndarray:
    """The map from the G x G position table (rows G G, row-major) to the image's (h, w) grid,
    (h w, G G) float32: HF's bilinear antialiased resize, the product of one 1-D map per
    axis."""
    import numpy as np

    from ..weights.resample import axis_weights

    rows, cols = grid
    along_rows = axis_weights(table_side, rows, "bilinear", antialias=True)  # (h, G)
    along_cols = axis_weights(table_side, cols, "bilinear", antialias=True)  # (w, G)
    weights = along_rows[:, None, :, None] * along_cols[None, :, None, :]  # (h, w, G, G)
    return weights.reshape(rows * cols, table_side * table_side).astype(np.float32)


def native_inputs(
    config: Siglip2VisionConfig, patches: np.ndarray, grid: Any
) -> dict[str, np.ndarray]:
    """The arrays `forward` takes for one image: its patches (h w, p p C), row-major over its
    patch grid (h, w), and the position table's resize to that grid."""
    side = math.isqrt(config.num_patches)
    return {"pixel_values": patches, "position_weights": position_weights(side, grid)}


def sample(config: Siglip2VisionConfig, rows: int, cols: int, seed: int) -> tuple[Any, Any]:
    import numpy as np

    width = config.num_channels * config.patch_size**2
    patches = np.random.default_rng(seed).standard_normal((rows * cols, width))
    return patches.astype(np.float32), (rows, cols)


def reference(hf_model: Any, patches: np.ndarray, grid: Any) -> np.ndarray:
    """HF's Siglip2VisionModel on the image alone, every row valid: its last hidden state."""
    import torch

    pixels = torch.from_numpy(patches)[None]  # (1, n, p p C)
    mask = torch.ones(pixels.shape[:2], dtype=torch.int32)
    shapes = torch.tensor([list(grid)])
    with torch.inference_mode():
        out = hf_model(pixels, pixel_attention_mask=mask, spatial_shapes=shapes)
    return out.last_hidden_state[0].float().numpy()


def blocks(model: Siglip2VisionConfig) -> dict[str, str]:
    return {
        "embeddings": "siglip2_embeddings",
        "encoder": "native_encoder",
        "transformer": "native_vision_transformer",
        "model": "native_vision_model",
    }


FAMILY = register(
    Family(
        name="siglip2",
        description="SigLIP2 NaFlex towers (HF Siglip2VisionModel) at each image's own size: "
        "the last hidden state",
        config=Siglip2VisionConfig,
        blocks=blocks,
        names=NameMap(anchor="embeddings.patch_embedding.weight", ignore=(r"^head\.",)),
        hf_model_types=("siglip2_vision_model", "siglip2"),
        reference="Siglip2VisionModel",
        reference_config="Siglip2VisionConfig",
        hf_values={"hidden_act": ACTIVATIONS},
        # A smaller table than the images' grids: upsampled as well as antialiased down.
        variants=({"num_patches": 16},),
        native=NativeTower(
            inputs=native_inputs,
            resize="max_num_patches",
            reference=reference,
            sample=sample,
            steps=(("resample", "bilinear"), ("mean", (0.5,) * 3), ("std", (0.5,) * 3)),
        ),
    )
)
