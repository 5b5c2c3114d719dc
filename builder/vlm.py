"""Vision-language models: the projector after the tower, as data.

A VLM is a tower family's tower, a feature selection and a projector block
(`builder/blocks/projectors.py`, `builder/blocks/llava.py`) that maps the selected features to
what the language model consumes, HF's `get_image_features(...).pooler_output`. One `VLM`
record per HF VLM config (`model_type`) says what `build import` writes for it and what
`build` compares with a checkpoint's config.json: the projector block, where the language
model's width is, the VLM fields the projector reads (HF's names), their HF defaults (a
config.json written by `save_pretrained` omits fields at their defaults), and the image
processor's steps for one crop.

Imports no TVM: the preset checks and `build import` read it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from . import registry
from .config import Preset, TowerConfig

# Mean and std 0.5 (HF's IMAGENET_STANDARD_MEAN / _STD), and ImageNet's (IMAGENET_DEFAULT_*).
HALF = [0.5, 0.5, 0.5]
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


@dataclass(frozen=True)
class VLM:
    """One HF VLM config class, as the builder reads it."""

    name: str
    model_types: tuple[str, ...]
    # The HF model whose `get_image_features(...).pooler_output` the artifact equals.
    reference: str
    # The tower's family, where the vision config's model_type does not say it (older
    # Idefics3 files give the VLM's own, "idefics3").
    family: str
    projector: str
    # Dotted path in config.json of the projector's output width (`projector_hidden_size`).
    width: str
    # HF config field -> (our model field, HF default); `scale` converts HF's value to ours.
    fields: dict[str, tuple[str, Any]] = field(default_factory=dict)
    # HF config fields the projector block fixes: the value it builds.
    fixed: dict[str, Any] = field(default_factory=dict)
    # Fields of HF's vision config class that differ from the family's defaults: a
    # config.json that omits them means HF's values.
    vision_defaults: dict[str, Any] = field(default_factory=dict)
    # The HF Pil image processor on one crop, as preset `preprocess` fields.
    preprocess: dict[str, Any] = field(default_factory=dict)
    # `preprocess.longest_edge` as a multiple of the tower's image size (Idefics3's first
    # resize: 4 x 364 in Idefics3, 4 x 512 in SmolVLM); 0: no such resize.
    longest_edge_tiles: int = 0
    # HF's default `image_grid_pinpoints` of an anyres VLM (LLaVA-NeXT); None: one crop.
    image_grid_pinpoints: list[list[int]] | None = None
    # HF's default `vision_aspect_ratio` (OneVision's "anyres_max_9"), read from config.json.
    vision_aspect_ratio: str | None = None


def _inverse(value: Any) -> Any:
    """InternVL's downsample_ratio (0.5) as our scale_factor (2)."""
    return round(1 / value) if isinstance(value, int | float) and value > 0 else value


# HF's value -> ours, per our field, where they differ (InternVL's downsample_ratio).
CONVERT = {"downsample_ratio": _inverse}

VLMS: tuple[VLM, ...] = (
    VLM(
        name="paligemma",
        model_types=("paligemma",),
        reference="PaliGemmaForConditionalGeneration",
        family="siglip",
        projector="paligemma_linear",
        width="projection_dim",
        fields={"projection_dim": ("projector_hidden_size", 2048)},
        vision_defaults={
            "hidden_size": 1152,
            "intermediate_size": 4096,
            "num_hidden_layers": 27,
            "num_attention_heads": 16,
            "patch_size": 14,
            "vision_use_head": False,
        },
        # SiglipImageProcessorPil: square bicubic resize, mean and std 0.5.
        preprocess={"resize": "square", "center_crop": False, "mean": HALF, "std": HALF},
    ),
    VLM(
        name="gemma3",
        model_types=("gemma3",),
        reference="Gemma3ForConditionalGeneration",
        family="siglip",
        projector="gemma3_projector",
        width="text_config.hidden_size",
        fields={"mm_tokens_per_image": ("mm_tokens_per_image", 256)},
        # Gemma3ImageProcessorPil without pan-and-scan: square bilinear resize, mean, std 0.5.
        preprocess={
            "resize": "square",
            "center_crop": False,
            "resample": "bilinear",
            "mean": HALF,
            "std": HALF,
        },
    ),
    VLM(
        name="idefics3",
        model_types=("idefics3", "smolvlm"),
        reference="Idefics3ForConditionalGeneration",
        family="siglip",
        projector="idefics3_connector",
        width="text_config.hidden_size",
        fields={"scale_factor": ("scale_factor", 2)},
        # Idefics3VisionConfig's defaults (SmolVLMVisionConfig's are the same).
        vision_defaults={
            "hidden_size": 1152,
            "intermediate_size": 3072,
            "num_attention_heads": 16,
            "patch_size": 32,
        },
        # Idefics3ImageProcessorPil: the longest edge to 4 tiles, then image splitting,
        # LANCZOS throughout; mean and std 0.5.
        preprocess={
            "resize": "square",
            "center_crop": False,
            "resample": "lanczos",
            "mean": HALF,
            "std": HALF,
            "do_image_splitting": True,
        },
        longest_edge_tiles=4,
    ),
    VLM(
        name="internvl",
        model_types=("internvl",),
        reference="InternVLForConditionalGeneration",
        family="internvit",
        projector="internvl_projector",
        width="text_config.hidden_size",
        fields={
            "downsample_ratio": ("scale_factor", 0.5),
            "vision_feature_layer": ("feature_layer", -1),
            "vision_feature_select_strategy": ("feature_select_strategy", "default"),
        },
        fixed={"projector_hidden_act": "gelu"},
        # GotOcr2ImageProcessorPil as InternVL configures it: dynamic tiles (1 to 12) of a
        # square bicubic resize, ImageNet mean and std.
        preprocess={
            "resize": "square",
            "center_crop": False,
            "mean": IMAGENET_MEAN,
            "std": IMAGENET_STD,
            "crop_to_patches": True,
        },
    ),
)


VLMS += (
    VLM(
        name="llava_next",
        model_types=("llava_next",),
        reference="LlavaNextForConditionalGeneration",
        family="clip",
        projector="mlp2x_gelu",
        width="text_config.hidden_size",
        fields={
            "vision_feature_layer": ("feature_layer", -2),
            "vision_feature_select_strategy": ("feature_select_strategy", "default"),
        },
        fixed={"projector_hidden_act": "gelu", "multimodal_projector_bias": True},
        # LlavaNextImageProcessorPil: each crop as CLIP's processor (the defaults).
        image_grid_pinpoints=[[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
    ),
    VLM(
        name="llava_onevision",
        model_types=("llava_onevision",),
        reference="LlavaOnevisionForConditionalGeneration",
        family="siglip",
        projector="mlp2x_gelu",
        width="text_config.hidden_size",
        fields={
            "vision_feature_layer": ("feature_layer", -1),
            "vision_feature_select_strategy": ("feature_select_strategy", "full"),
        },
        fixed={"projector_hidden_act": "gelu", "multimodal_projector_bias": True},
        # LlavaOnevisionImageProcessorPil on one image: each crop resized to the tower's
        # square, no crop; mean and std 0.5 (OneVision's preprocessor_config.json).
        preprocess={"resize": "square", "center_crop": False, "mean": HALF, "std": HALF},
        image_grid_pinpoints=[[384 * h, 384 * w] for h in range(1, 7) for w in range(1, 7)],
        vision_aspect_ratio="anyres_max_9",
    ),
)


VLMS += (
    VLM(
        name="mistral3",
        model_types=("mistral3",),
        reference="Mistral3ForConditionalGeneration",
        family="pixtral",
        projector="mistral3_projector",
        width="text_config.hidden_size",
        fields={
            "vision_feature_layer": ("feature_layer", -1),
            "spatial_merge_size": ("spatial_merge_size", 2),
            "multimodal_projector_bias": ("multimodal_projector_bias", False),
            "projector_hidden_act": ("projector_hidden_act", "gelu"),
            "text_config.rms_norm_eps": ("projector_norm_eps", 1e-5),
        },
        # Mistral3Config's vision_config defaults (Mistral Small 3.1's Pixtral).
        vision_defaults={"patch_size": 14, "image_size": 1540},
    ),
)


def for_model_type(model_type: Any) -> VLM | None:
    return next((v for v in VLMS if model_type in v.model_types), None)


def hf_value(cfg: dict[str, Any], dotted: str) -> Any:
    """A config.json value by dotted path, None where absent."""
    node: Any = cfg
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def read_fields(vlm: VLM, cfg: dict[str, Any]) -> list[tuple[str, Any, str]]:
    """(HF field, its value as ours, our model field) from a VLM's config.json, HF's
    defaults where it omits them."""
    out = []
    for theirs, (ours, default) in vlm.fields.items():
        value = hf_value(cfg, theirs)
        value = default if value is None else value
        out.append((theirs, CONVERT[theirs](value) if theirs in CONVERT else value, ours))
    return out


# --- tokens ----------------------------------------------------------------------------------


def projected_tokens(config: TowerConfig, projector: str | None, tokens: int) -> int:
    """Tokens per crop after the projector (the tower's selected tokens before it)."""
    if not projector:
        return tokens
    merge = registry.get(projector, "projector").attr("token_merge")
    if merge == "pixel_shuffle":
        return tokens // config.scale_factor**2
    if merge == "avg_pool":
        return config.mm_tokens_per_image
    return tokens


def native_projectors(native: bool) -> list[str]:
    """The projector blocks of native-resolution towers (their `native` constant), or the
    others."""
    names = registry.names("projector")
    return [n for n in names if bool(registry.get(n, "projector").attr("native")) == native]


def projector_errors(preset: Preset) -> list[tuple[tuple[str | int, ...], str]]:
    """The projector's grid arithmetic: a merge needs the patch grid alone (no CLS) and a
    factor that divides its side."""
    m, projector = preset.model, preset.blocks.projector
    if projector and m.native != bool(registry.get(projector, "projector").attr("native")):
        which = "native-resolution" if m.native else "fixed-size"
        return [
            (
                ("blocks", "projector"),
                f"{projector!r} is not a projector of {which} towers (the "
                f"{preset.family} family's); the projectors: {native_projectors(m.native)}",
            )
        ]
    if not projector or m.output != "features":
        return []
    default = m.feature_select_strategy == "default"
    tokens = m.num_patches + (0 if default else registry.prefix_tokens(m, preset.blocks))
    merge = registry.get(projector, "projector").attr("token_merge")
    if merge is None:
        return []
    grid = m.grid_size
    if tokens != m.num_patches:
        return [
            (
                ("model", "feature_select_strategy"),
                f"blocks.projector {projector!r} merges the {grid} x {grid} patch grid, but "
                f"the features keep {tokens - m.num_patches} token(s) before the patches; "
                "use 'default'",
            )
        ]
    if merge == "pixel_shuffle" and grid % m.scale_factor:
        return [
            (
                ("model", "scale_factor"),
                f"{m.scale_factor} does not divide the patch grid's side {grid} "
                f"(model.image_size {m.image_size} // model.patch_size {m.patch_size})",
            )
        ]
    if merge == "avg_pool":
        side = round(m.mm_tokens_per_image**0.5)
        if side * side != m.mm_tokens_per_image or grid % side:
            return [
                (
                    ("model", "mm_tokens_per_image"),
                    f"{m.mm_tokens_per_image} must be a square number whose side divides the "
                    f"patch grid's side {grid} (model.image_size {m.image_size} // "
                    f"model.patch_size {m.patch_size})",
                )
            ]
    return []


def crop_errors(preset: Preset) -> list[tuple[tuple[str | int, ...], str]]:
    """Anyres crops: pinpoints that the tower's tiles cut exactly, and the newline vector
    their packing needs (and only then)."""
    m, pinpoints = preset.model, preset.preprocess.image_grid_pinpoints
    found: list[tuple[tuple[str | int, ...], str]] = []
    for i, pair in enumerate(pinpoints or []):
        if any(side % m.image_size for side in pair):
            found.append(
                (
                    ("preprocess", "image_grid_pinpoints", i),
                    f"{pair} is not a multiple of model.image_size {m.image_size} on both "
                    "sides: the tiles are the tower's size",
                )
            )
    if pinpoints and not m.image_newline:
        found.append(
            (
                ("model", "image_newline"),
                "false, but preprocess.image_grid_pinpoints packs the grid with the newline "
                "vector: set image_newline: true",
            )
        )
    if m.image_newline and not pinpoints:
        found.append(
            (
                ("model", "image_newline"),
                "the newline vector is for anyres grids: set preprocess.image_grid_pinpoints",
            )
        )
    steps = preset.preprocess
    chosen = [
        f
        for f, on in (
            ("image_grid_pinpoints", bool(pinpoints)),
            ("crop_to_patches", steps.crop_to_patches),
            ("do_image_splitting", steps.do_image_splitting),
        )
        if on
    ]
    if len(chosen) > 1:
        found.append(
            (
                ("preprocess", chosen[1]),
                f"one crop scheme per preset, but preprocess.{chosen[0]} is set too",
            )
        )
    if steps.min_patches > steps.max_patches:
        found.append(
            (
                ("preprocess", "min_patches"),
                f"{steps.min_patches} is more than preprocess.max_patches {steps.max_patches}",
            )
        )
    if chosen and m.output != "features":
        found.append(
            (("model", "output"), f"{chosen[0]} cuts crops of features: set output: features")
        )
    if preset.preprocess.vision_aspect_ratio and not pinpoints:
        found.append(
            (
                ("preprocess", "vision_aspect_ratio"),
                "limits anyres grids: set preprocess.image_grid_pinpoints, or null",
            )
        )
    return found
