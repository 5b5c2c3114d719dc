"""CLIP: OpenAI's vision tower (HF `CLIPVisionModel`), and MetaCLIP 2's, which is the same.

Its parameters are named as HF's modules (`vision_model.encoder.layers.0.mlp.fc1.weight`), so
HF's layout only strips the checkpoint's prefix, whatever model class wrote it (CLIPModel,
CLIPVisionModel, LLaVA, MetaCLIP 2; transformers 4 or 5), and finds `visual_projection`
beside the tower. The same tower as open_clip and timm save it is read through their own
layouts below (open_clip's `VisionTransformer`, timm's `vit_*_clip_*` models).
"""

from __future__ import annotations

from ..config import CLIPVisionConfig
from . import Family, NameMap, Split, register

ACTIVATIONS = {"gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh"}

# q, k and v stacked in one tensor (torch's MultiheadAttention, timm's Attention): split.
FUSED_QKV = Split(
    r"\.self_attn\.qkv\.(weight|bias)$",
    (r".self_attn.q_proj.\1", r".self_attn.k_proj.\1", r".self_attn.v_proj.\1"),
)

# open_clip's `VisionTransformer` (`visual.` in a CLIP model's state dict).
OPEN_CLIP = NameMap(
    name="open_clip",
    anchor="class_embedding",
    renames=(
        (r"^conv1\.", "embeddings.patch_embedding."),
        (r"^class_embedding$", "embeddings.class_embedding"),
        (r"^positional_embedding$", "embeddings.position_embedding.weight"),
        (r"^ln_pre\.", "pre_layrnorm."),
        (r"^ln_post\.", "post_layernorm."),
        (r"^proj$", "visual_projection.weight"),
        (r"^transformer\.resblocks\.(\d+)\.", r"encoder.layers.\1."),
        (r"\.ln_1\.", ".layer_norm1."),
        (r"\.ln_2\.", ".layer_norm2."),
        (r"\.attn\.in_proj_(weight|bias)$", r".self_attn.qkv.\1"),
        (r"\.attn\.out_proj\.", ".self_attn.out_proj."),
        (r"\.mlp\.c_fc\.", ".mlp.fc1."),
        (r"\.mlp\.c_proj\.", ".mlp.fc2."),
    ),
    splits=(FUSED_QKV,),
    # `proj` is applied as x @ proj: (width, embed_dim), a Linear's weight transposed.
    transposes=(r"^visual_projection\.weight$",),
)

# timm's `VisionTransformer` as its CLIP models configure it (pre-norm, class token, no conv
# bias, a `head` Linear with a bias as the projection).
TIMM = NameMap(
    name="timm",
    anchor="patch_embed.proj.weight",
    renames=(
        (r"^patch_embed\.proj\.", "embeddings.patch_embedding."),
        (r"^cls_token$", "embeddings.class_embedding"),
        (r"^pos_embed$", "embeddings.position_embedding.weight"),
        (r"^norm_pre\.", "pre_layrnorm."),
        (r"^norm\.", "post_layernorm."),
        (r"^head\.", "visual_projection."),
        (r"^blocks\.(\d+)\.", r"encoder.layers.\1."),
        (r"\.norm1\.", ".layer_norm1."),
        (r"\.norm2\.", ".layer_norm2."),
        (r"\.attn\.qkv\.", ".self_attn.qkv."),
        (r"\.attn\.proj\.", ".self_attn.out_proj."),
    ),
    splits=(FUSED_QKV,),
    # (1, 1, D) and (1, T, D) in timm, (D,) and (T, D) in ours.
    squeeze=(r"^embeddings\.(class_embedding|position_embedding\.weight)$",),
)

FAMILY = register(
    Family(
        name="clip",
        description="CLIP and MetaCLIP 2 towers (HF CLIPVisionModel, MetaClip2VisionModel; "
        "open_clip and timm checkpoints)",
        config=CLIPVisionConfig,
        blocks=lambda model: {},
        names=NameMap(
            anchor="embeddings.patch_embedding.weight",
            ignore=(r"^embeddings\.position_ids$",),
            beside=("visual_projection.",),
        ),
        hf_model_types=("clip_vision_model", "clip", "metaclip_2_vision_model", "metaclip_2"),
        reference="CLIPVisionModel",
        reference_config="CLIPVisionConfig",
        hf_values={"hidden_act": ACTIVATIONS},
        own_fields=("vocab_size", "pre_layernorm", "projection_bias"),
        also_equals=(("MetaClip2VisionModel", "MetaClip2VisionConfig"),),
        embeds_reference=("CLIPVisionModelWithProjection", "CLIPVisionConfig"),
        layouts=(OPEN_CLIP, TIMM),
    )
)
