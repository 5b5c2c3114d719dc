"""SigLIP (HF `SiglipVisionModel`): CLIP's layers with another embeddings block (conv with
bias, no class token), no pre-norm, the post-LayerNorm on the final state (HF's
last_hidden_state) and an attention-pooling head."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import TowerConfig
from . import Family, NameMap, register
from .clip import ACTIVATIONS


@dataclass
class SiglipVisionConfig(TowerConfig):
    """HF transformers' `SiglipVisionConfig` fields and defaults (ViT-B/16 at 224 px)."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 16
    hidden_act: str = "gelu_tanh"
    layer_norm_eps: float = 1e-6
    # The attention-pooling head (`pooler_output`); without it the tower has no pooled output.
    vision_use_head: bool = True


def blocks(model: SiglipVisionConfig) -> dict[str, str]:
    out = {"embeddings": "siglip_embeddings"}
    if model.vision_use_head:
        out["head"] = "siglip_attention_pooling"
    return out


FAMILY = register(
    Family(
        name="siglip",
        description="SigLIP towers (HF SiglipVisionModel)",
        config=SiglipVisionConfig,
        blocks=blocks,
        names=NameMap(
            anchor="embeddings.patch_embedding.weight", ignore=(r"^embeddings\.position_ids$",)
        ),
        # Idefics3's and SmolVLM's towers are SigLIP's: on a full square crop their position
        # ids are the raster order (docs/vlm.md).
        hf_model_types=("siglip_vision_model", "siglip", "idefics3_vision", "smolvlm_vision"),
        reference="SiglipVisionModel",
        reference_config="SiglipVisionConfig",
        hf_values={"hidden_act": ACTIVATIONS},
    )
)
