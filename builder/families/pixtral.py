"""Pixtral (HF `PixtralVisionModel`), Mistral 3's vision tower, at each image's own size.

A conv patch embedding without bias (run as a Linear over the flattened patches:
`patch_linear_embeddings`), `ln_pre` RMSNorm, pre-norm layers with RMSNorm (eps 1e-5), no
biases anywhere, the SwiGLU MLP, 2-D rotary positions (`rope_attention`: HF's axial layout,
rows on the even frequencies, columns on the odd ones) and no final norm. One image per call:
HF packs a batch's images into one sequence with a block-diagonal mask, which gives each image
what it gives alone.

With `blocks.projector: mistral3_projector`, the artifact is Mistral 3's
`get_image_features` for the image: RMSNorm, the 2 x 2 patch merger, the MLP.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..config import TowerConfig
from . import Family, NameMap, NativeTower, register
from .clip import ACTIVATIONS

if TYPE_CHECKING:  # numpy only where arrays are made: `build check` does not import it
    import numpy as np


@dataclass
class PixtralVisionConfig(TowerConfig):
    """HF transformers' `PixtralVisionConfig` fields that shape the tower, with its defaults
    (Pixtral-12B's), and the fields of Mistral 3's projector."""

    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    num_channels: int = 3
    # The largest side HF's processor makes (its `longest_edge`); the tower takes any size.
    image_size: int = 1024
    patch_size: int = 16
    hidden_act: str = "gelu"
    rope_theta: float = 10000.0
    # Mistral3Config's projector fields (the VLM's, not the tower's).
    spatial_merge_size: int = 2
    multimodal_projector_bias: bool = False
    projector_hidden_act: str = "gelu"
    # Mistral3Config's text_config.rms_norm_eps: the projector's RMSNorm.
    projector_norm_eps: float = 1e-5

    @property
    def norm_eps(self) -> float:
        return 1e-5  # HF builds every RMSNorm of the tower with 1e-5

    @property
    def attention_biases(self) -> tuple[bool, bool]:
        return False, False

    @property
    def mlp_has_bias(self) -> bool:
        return False

    @property
    def pre_norm(self) -> bool:
        return True

    @property
    def normed_last_state(self) -> bool:
        return False

    @property
    def patch_bias(self) -> bool:
        return False

    @property
    def native(self) -> bool:
        return True

    def merge_size(self, projector: str | None) -> int:
        """The side of the patch blocks the processor's sizes are multiples of: Mistral 3's
        merge with its projector, 1 for the tower alone (PixtralProcessor's default)."""
        return self.spatial_merge_size if projector else 1

    @property
    def native_inputs(self) -> list[tuple[str, list[int | str], str]]:
        patch = self.num_channels * self.patch_size**2
        return [
            ("pixel_values", ["patches", patch], "float32"),
            ("cos", ["patches", self.head_dim], "float32"),
            ("sin", ["patches", self.head_dim], "float32"),
        ]


def inv_freq(head_dim: int, theta: float) -> np.ndarray:
    """HF's rotary inverse frequencies, 1 / theta^(2i / head_dim), float32."""
    import numpy as np

    exponents = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
    return (1.0 / (np.float32(theta) ** exponents)).astype(np.float32)


def axial_rope(rows: int, cols: int, head_dim: int, theta: float) -> tuple[np.ndarray, ...]:
    """Pixtral's cos and sin tables, (rows * cols, head_dim) each, patches row-major: the
    angles [r f0, c f1, r f0, c f1] with f0 the even and f1 the odd inverse frequencies."""
    import numpy as np

    freq = inv_freq(head_dim, theta)
    r, c = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    angles_r = r.reshape(-1, 1).astype(np.float32) * freq[0::2]
    angles_c = c.reshape(-1, 1).astype(np.float32) * freq[1::2]
    half = np.concatenate([angles_r, angles_c], axis=1)
    angles = np.concatenate([half, half], axis=1)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def unfold_index(rows: int, cols: int, k: int) -> np.ndarray:
    """The patches of each k x k block, blocks row-major (the last row and column dropped
    where the side is not a multiple of k, as torch's unfold does), (row, column) in a block:
    int32 (blocks * k * k,)."""
    import numpy as np

    br, bc = rows // k, cols // k
    grid = np.arange(rows * cols, dtype=np.int32).reshape(rows, cols)[: br * k, : bc * k]
    return grid.reshape(br, k, bc, k).transpose(0, 2, 1, 3).reshape(-1)


def native_inputs(
    config: PixtralVisionConfig, patches: np.ndarray, grid: Any
) -> dict[str, np.ndarray]:
    """The arrays `forward` takes for one image, by name: its patches (rows * cols, C p p),
    row-major over its patch grid (rows, cols), the rotary tables, and the projector's
    gather."""
    rows, cols = grid
    cos, sin = axial_rope(rows, cols, config.head_dim, config.rope_theta)
    merge = unfold_index(rows, cols, config.spatial_merge_size)
    return {"pixel_values": patches, "cos": cos, "sin": sin, "merge_index": merge}


def patchify(image: np.ndarray, patch: int) -> np.ndarray:
    """(C, H, W), sides multiples of `patch` -> (H/p * W/p, C p p), patches row-major, each
    in (C, p, p) order: what the conv sees of it."""
    import numpy as np

    c, h, w = image.shape
    x = image.reshape(c, h // patch, patch, w // patch, patch)
    return np.ascontiguousarray(x.transpose(1, 3, 0, 2, 4).reshape(-1, c * patch * patch))


def unpatchify(patches: np.ndarray, grid: Any, channels: int, patch: int) -> np.ndarray:
    """`patchify`'s inverse: (rows * cols, C p p) -> (C, rows p, cols p)."""
    rows, cols = grid
    x = patches.reshape(rows, cols, channels, patch, patch).transpose(2, 0, 3, 1, 4)
    return x.reshape(channels, rows * patch, cols * patch)


def sample(config: PixtralVisionConfig, rows: int, cols: int, seed: int) -> tuple[Any, Any]:
    import numpy as np

    image = np.random.default_rng(seed).standard_normal(
        (config.num_channels, rows * config.patch_size, cols * config.patch_size)
    )
    return patchify(image.astype(np.float32), config.patch_size), (rows, cols)


def reference(hf_model: Any, patches: np.ndarray, grid: Any) -> np.ndarray:
    """HF's PixtralVisionModel on the image (its last hidden state), or Mistral 3's
    get_image_features (the image's features) for a Mistral3ForConditionalGeneration."""
    import torch

    tower = getattr(getattr(hf_model, "model", hf_model), "vision_tower", hf_model)
    c, p = tower.config.num_channels, tower.config.patch_size
    pixels = torch.from_numpy(unpatchify(patches, grid, c, p))[None]
    sizes = torch.tensor([[grid[0] * p, grid[1] * p]])
    with torch.inference_mode():
        if tower is hf_model:
            return hf_model(pixels, image_sizes=sizes).last_hidden_state[0].float().numpy()
        out = hf_model.model.get_image_features(pixels, image_sizes=sizes)
        return out.pooler_output[0].float().numpy()


def blocks(model: PixtralVisionConfig) -> dict[str, str]:
    return {
        "embeddings": "patch_linear_embeddings",
        "norm": "rms_norm",
        "attention": "rope_attention",
        "mlp": "swiglu_mlp",
        "encoder": "native_encoder",
        "transformer": "native_vision_transformer",
        "model": "native_vision_model",
    }


FAMILY = register(
    Family(
        name="pixtral",
        description="Pixtral towers (HF PixtralVisionModel) at each image's own size; with "
        "mistral3_projector, Mistral 3's image features",
        config=PixtralVisionConfig,
        blocks=blocks,
        names=NameMap(
            anchor="patch_conv.weight",
            renames=(
                (r"^patch_conv\.", "embeddings.patch_embedding."),
                (r"^ln_pre\.", "pre_layrnorm."),
                (r"^transformer\.layers\.", "encoder.layers."),
                (r"\.attention_norm\.", ".layer_norm1."),
                (r"\.ffn_norm\.", ".layer_norm2."),
                (r"\.attention\.o_proj\.", ".self_attn.out_proj."),
                (r"\.attention\.", ".self_attn."),
                (r"\.feed_forward\.", ".mlp."),
            ),
        ),
        hf_model_types=("pixtral",),
        reference="PixtralVisionModel",
        reference_config="PixtralVisionConfig",
        hf_values={"hidden_act": ACTIVATIONS},
        own_fields=(
            "spatial_merge_size",
            "multimodal_projector_bias",
            "projector_hidden_act",
            "projector_norm_eps",
        ),
        # Another rotary base: read from transformers 5's rope_parameters, and built.
        variants=({"rope_theta": 500.0, "hidden_act": "silu"},),
        native=NativeTower(
            inputs=native_inputs, resize="max_longest_edge", reference=reference, sample=sample
        ),
    )
)
