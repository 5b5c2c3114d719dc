"""DINOv2 (HF `Dinov2Model`) and DINOv2 with registers (`Dinov2WithRegistersModel`).

CLIP's layers with: a conv patch embedding with bias and a position table resampled to the
preset's grid (`dinov2_embeddings`), no pre-norm, a learnt layer scale on both residual
branches, the MLP fc1-GELU-fc2 or SwiGLU (`use_swiglu_ffn`, DINOv2-giant) and the final
LayerNorm on every token (HF's last_hidden_state).

The name map reads the Hub's layout (what `save_pretrained` writes: `attention.attention.query`,
`attention.output.dense`, `layer_scale1.lambda1`, `mlp.weights_in` = [gate; up]) and
transformers 5's module paths (`attention.q_proj`, `attention.o_proj`, `mlp.gate_proj`).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import TowerConfig
from . import Family, NameMap, Split, register


@dataclass
class Dinov2Config(TowerConfig):
    """HF transformers' `Dinov2Config` fields that shape the tower, with its defaults."""

    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    mlp_ratio: float = 4
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-6
    image_size: int = 224
    patch_size: int = 14
    num_channels: int = 3
    qkv_bias: bool = True
    use_swiglu_ffn: bool = False

    @property
    def intermediate_size(self) -> int:
        hidden = int(self.hidden_size * self.mlp_ratio)
        if self.use_swiglu_ffn:  # HF's Dinov2SwiGLUFFN: 2/3 of it, rounded up to 8
            return (int(hidden * 2 / 3) + 7) // 8 * 8
        return hidden

    @property
    def mlp_act(self) -> str:
        return "silu" if self.use_swiglu_ffn else self.hidden_act

    @property
    def attention_biases(self) -> tuple[bool, bool]:
        return self.qkv_bias, True

    @property
    def layer_scale(self) -> bool:
        return True


@dataclass
class Dinov2WithRegistersConfig(Dinov2Config):
    """HF transformers' `Dinov2WithRegistersConfig`: DINOv2's fields and the registers."""

    patch_size: int = 16
    num_register_tokens: int = 4

    @property
    def register_tokens(self) -> int:
        return self.num_register_tokens


def blocks(model: Dinov2Config) -> dict[str, str]:
    return {
        "embeddings": "dinov2_embeddings",
        "mlp": "swiglu_mlp" if model.use_swiglu_ffn else "clip_mlp",
    }


NAMES = NameMap(
    anchor="embeddings.patch_embeddings.projection.weight",
    renames=(
        (r"^encoder\.layer\.", "encoder.layers."),
        (r"\.norm([12])\.", r".layer_norm\1."),
        (r"\.attention\.attention\.query\.", ".self_attn.q_proj."),
        (r"\.attention\.attention\.key\.", ".self_attn.k_proj."),
        (r"\.attention\.attention\.value\.", ".self_attn.v_proj."),
        (r"\.attention\.(output\.dense|o_proj)\.", ".self_attn.out_proj."),
        (r"\.attention\.([qkv])_proj\.", r".self_attn.\1_proj."),
        (r"\.layer_scale([12])\.lambda1$", r".layer_scale\1"),
        (r"\.mlp\.weights_out\.", ".mlp.down_proj."),
        (r"^layernorm\.", "post_layernorm."),
    ),
    splits=(Split(r"\.mlp\.weights_in\.", (".mlp.gate_proj.", ".mlp.up_proj.")),),
    # Used in masked-image training only.
    ignore=(r"^embeddings\.mask_token$",),
    position_tables=(("embeddings.position_embeddings", 1),),
)

FAMILY = register(
    Family(
        name="dinov2",
        description="DINOv2 towers (HF Dinov2Model): small, base, large, giant (SwiGLU)",
        config=Dinov2Config,
        blocks=blocks,
        names=NAMES,
        hf_model_types=("dinov2",),
        reference="Dinov2Model",
        reference_config="Dinov2Config",
        resample=("bicubic", False),
        variants=({"use_swiglu_ffn": True, "qkv_bias": False},),
    )
)

WITH_REGISTERS = register(
    Family(
        name="dinov2_with_registers",
        description="DINOv2 with register tokens (HF Dinov2WithRegistersModel)",
        config=Dinov2WithRegistersConfig,
        blocks=blocks,
        names=NAMES,
        hf_model_types=("dinov2_with_registers",),
        reference="Dinov2WithRegistersModel",
        reference_config="Dinov2WithRegistersConfig",
        resample=("bicubic", True),
    )
)
