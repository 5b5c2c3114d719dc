"""AIMv2 (HF `Aimv2VisionModel`): Apple's autoregressively pre-trained vision towers.

CLIP's pre-norm layers with RMSNorm everywhere: a conv patch embedding with bias followed by
an RMSNorm, a learnt position table without a class token (`aimv2_embeddings`), attention
whose q, k, v and output projections all have biases or none (`qkv_bias`), the SwiGLU MLP
(`swiglu_mlp`, biases per `mlp_bias`) and a final RMSNorm on every token (HF's
last_hidden_state).

Not built: the attention-pooling head (`use_head`, HF's pooler_output); its `head.*` keys are
ignored, so a checkpoint with a head loads. The native-resolution towers (`is_native`: 2-D
sin-cos positions) are refused. The position table is not resampled (HF does not resample it
either): the image size is the checkpoint's.

The name map reads what `Aimv2VisionModel.save_pretrained` writes (`rms_norm1`, `attention.`,
`ffn.`, a top-level `rms_norm`), and `Aimv2Model`'s `vision_model.` keys.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import TowerConfig
from . import Family, NameMap, register
from .clip import ACTIVATIONS


@dataclass
class Aimv2VisionConfig(TowerConfig):
    """HF transformers' `Aimv2VisionConfig` fields that shape the tower, with its defaults
    (AIMv2-large at 224 px)."""

    hidden_size: int = 1024
    intermediate_size: int = 2816
    num_hidden_layers: int = 24
    num_attention_heads: int = 8
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 14
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-5
    qkv_bias: bool = False
    mlp_bias: bool = False
    # The attention-pooling head: recorded from HF configs, never built.
    use_head: bool = True
    is_native: bool = False

    @property
    def norm_eps(self) -> float:
        return self.rms_norm_eps

    @property
    def attention_biases(self) -> tuple[bool, bool]:
        # HF's qkv_bias applies to the output projection too.
        return self.qkv_bias, self.qkv_bias

    @property
    def mlp_has_bias(self) -> bool:
        return self.mlp_bias

    def errors(self) -> list[tuple[tuple[str | int, ...], str]]:
        if self.is_native:
            return [
                (
                    ("model", "is_native"),
                    "true is not supported: the native-resolution towers' 2-D sin-cos "
                    "positions are not built; only the learnt position table (false)",
                )
            ]
        return []


def blocks(model: Aimv2VisionConfig) -> dict[str, str]:
    return {"embeddings": "aimv2_embeddings", "norm": "rms_norm", "mlp": "swiglu_mlp"}


FAMILY = register(
    Family(
        name="aimv2",
        description="AIMv2 towers (HF Aimv2VisionModel), without the attention-pooling head",
        config=Aimv2VisionConfig,
        blocks=blocks,
        names=NameMap(
            anchor="embeddings.patch_embed.weight",
            renames=(
                (r"\.rms_norm([12])\.", r".layer_norm\1."),
                (r"^(encoder\.layers\.\d+)\.attention\.", r"\1.self_attn."),
                (r"^(encoder\.layers\.\d+)\.ffn\.", r"\1.mlp."),
                # The final norm only: `embeddings.rms_norm` keeps its name.
                (r"^rms_norm\.", "post_layernorm."),
            ),
            # The attention-pooling head is not built; position_ids is a buffer that older
            # files hold.
            ignore=(r"^head\.", r"^embeddings\.position_ids$"),
        ),
        hf_model_types=("aimv2_vision_model", "aimv2"),
        reference="Aimv2VisionModel",
        reference_config="Aimv2VisionConfig",
        hf_values={"hidden_act": ACTIVATIONS},
        variants=({"qkv_bias": True, "mlp_bias": True},),
    )
)
