"""InternViT (HF `InternVLVisionModel`): the vision tower of InternVL 2.5 and 3.

DINOv2's embeddings (a conv with bias, a CLS token, a position table resampled bicubic to the
preset's grid) and CLIP's pre-norm layers with a learnt layer scale (HF's `lambda_1`,
`lambda_2`), no pre-norm. The layers' norms are LayerNorm or RMSNorm (`norm_type`); q/k/v
biases as `attention_bias` say, the output projection always has one; `use_qk_norm` adds an
RMSNorm over the full width on q and k (eps fixed at 1e-6, whatever `norm_type`). With
`use_mean_pooling` (every released InternViT) HF's last_hidden_state is the raw final state;
without it a final LayerNorm (a LayerNorm also when `norm_type` is rms_norm, as in HF).

The name map reads what `InternVLVisionModel.save_pretrained` writes (`encoder.layer.N.`,
`layernorm_before`, `attention.projection_layer`, `lambda_1`), also under the VLM's
`model.vision_tower.` prefix. HF's image_size and patch_size are [h, w] lists; the builder's
towers are square (`build import` reads equal pairs as one number).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import TowerConfig
from . import Family, NameMap, register
from .clip import ACTIVATIONS

# HF's InternVLVisionRMSNorm on q and k is built with its default eps.
QK_NORM_EPS = 1e-6


@dataclass
class InternVLVisionConfig(TowerConfig):
    """HF transformers' `InternVLVisionConfig` fields that shape the tower, with its defaults
    (InternViT-300M at 448 px, but for attention_bias, which HF defaults to false)."""

    hidden_size: int = 1024
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    attention_bias: bool = False
    use_qk_norm: bool = False
    intermediate_size: int = 4096
    hidden_act: str = "gelu"
    norm_type: str = "layer_norm"
    layer_norm_eps: float = 1e-6
    image_size: int = 448
    patch_size: int = 14
    num_channels: int = 3
    use_absolute_position_embeddings: bool = True
    use_mean_pooling: bool = True

    @property
    def attention_biases(self) -> tuple[bool, bool]:
        return self.attention_bias, True

    @property
    def qk_norm(self) -> tuple[str, float] | None:
        return ("rms_norm", QK_NORM_EPS) if self.use_qk_norm else None

    @property
    def layer_scale(self) -> bool:
        return True

    @property
    def normed_last_state(self) -> bool:
        # HF's `layernorm` is an Identity with mean pooling.
        return not self.use_mean_pooling

    @property
    def final_norm_block(self) -> str:
        return "layer_norm"

    def errors(self) -> list[tuple[tuple[str | int, ...], str]]:
        found: list[tuple[tuple[str | int, ...], str]] = []
        if not self.use_absolute_position_embeddings:
            found.append(
                (
                    ("model", "use_absolute_position_embeddings"),
                    "false is not supported: the tower adds its learnt position table "
                    "(HF's default, and every released InternViT's)",
                )
            )
        if self.use_mean_pooling and self.post_layernorm:
            found.append(
                (
                    ("model", "post_layernorm"),
                    "with model.use_mean_pooling the tower has no final norm (HF's layernorm "
                    "is an Identity); set post_layernorm: null, or use_mean_pooling: false",
                )
            )
        return found


def blocks(model: InternVLVisionConfig) -> dict[str, str]:
    return {"embeddings": "dinov2_embeddings", "norm": model.norm_type}


FAMILY = register(
    Family(
        name="internvit",
        description="InternViT towers (HF InternVLVisionModel): InternVL 2.5 and 3",
        config=InternVLVisionConfig,
        blocks=blocks,
        names=NameMap(
            anchor="embeddings.patch_embeddings.projection.weight",
            renames=(
                (r"^encoder\.layer\.", "encoder.layers."),
                (r"\.layernorm_before\.", ".layer_norm1."),
                (r"\.layernorm_after\.", ".layer_norm2."),
                (r"\.attention\.projection_layer\.", ".self_attn.out_proj."),
                (r"\.attention\.([qkv]_proj|[qk]_norm)\.", r".self_attn.\1."),
                (r"\.lambda_([12])$", r".layer_scale\1"),
                (r"^layernorm\.", "post_layernorm."),
            ),
            # Used in masked-image training only.
            ignore=(r"^embeddings\.mask_token$",),
            position_tables=(("embeddings.position_embeddings", 1),),
        ),
        hf_model_types=("internvl_vision",),
        reference="InternVLVisionModel",
        reference_config="InternVLVisionConfig",
        resample=("bicubic", False),
        hf_values={"hidden_act": ACTIVATIONS},
        variants=(
            {"norm_type": "rms_norm", "use_qk_norm": True, "attention_bias": False},
            {"norm_type": "rms_norm", "use_mean_pooling": False},
            {"attention_bias": True, "use_mean_pooling": False},
        ),
    )
)
