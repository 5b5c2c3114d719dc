"""CLIP: OpenAI's vision tower (HF `CLIPVisionModel`), and MetaCLIP 2's, which is the same.

Its parameters are named as HF's modules (`vision_model.encoder.layers.0.mlp.fc1.weight`), so
the name map only strips the checkpoint's prefix, whatever model class wrote it (CLIPModel,
CLIPVisionModel, LLaVA, MetaCLIP 2; transformers 4 or 5).
"""

from __future__ import annotations

from ..config import CLIPVisionConfig
from . import Family, NameMap, register

ACTIVATIONS = {"gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh"}

FAMILY = register(
    Family(
        name="clip",
        description="CLIP and MetaCLIP 2 towers (HF CLIPVisionModel, MetaClip2VisionModel)",
        config=CLIPVisionConfig,
        blocks=lambda model: {},
        names=NameMap(
            anchor="embeddings.patch_embedding.weight", ignore=(r"^embeddings\.position_ids$",)
        ),
        hf_model_types=("clip_vision_model", "clip", "metaclip_2_vision_model", "metaclip_2"),
        reference="CLIPVisionModel",
        reference_config="CLIPVisionConfig",
        hf_values={"hidden_act": ACTIVATIONS},
        own_fields=("vocab_size", "pre_layernorm"),
        also_equals=(("MetaClip2VisionModel", "MetaClip2VisionConfig"),),
    )
)
