"""The config dataclasses: the one home of every default.

A preset file holds only what differs from these defaults. The JSON Schema in
`schemas/preset.schema.json` describes the same fields; `tests/test_schema.py` fails when the
two drift apart.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class TowerConfig:
    """What every tower family's config has: which hidden states the artifact returns and in
    what form, and the interface the shared blocks read (properties a family overrides where
    its HF fields say otherwise). A family's config subclasses this and adds its HF config's
    fields under their HF names (`builder/families/`)."""

    # Index into the tuple of all hidden states (embeddings output first, so it has
    # num_hidden_layers + 1 entries), as HF's `hidden_states[i]`; a list concatenates the
    # selected states on the last axis (HF LLaVA's `vision_feature_layer`). -1 with the
    # family's final norm is HF's `last_hidden_state`.
    feature_layer: int | list[int] = -1
    # "full" keeps the tokens before the patches (CLS, registers), "default" drops them
    # (HF LLaVA's names).
    feature_select_strategy: str = "full"
    # What the artifact returns: "features" (the selected hidden states, as above),
    # "pooled" (one vector per image: the `blocks.head` block applied to the normed final
    # state, HF's `pooler_output`) or "embeds" (the pooled vector through the family's
    # embedding projection where it has one: CLIP's `image_embeds`, open_clip's
    # `encode_image`; SigLIP's is its pooled output).
    output: str = "features"
    # L2-normalize the embedding (open_clip's `encode_image(normalize=True)`); embeds only.
    normalize_embeds: bool = False
    # The family's final norm on the final state (CLIP's post_layernorm, DINOv2's layernorm,
    # AIMv2's rms_norm). None: as in HF's last_hidden_state (`normed_last_state`); False: the
    # raw hidden_states[-1], as VLMs take it. Only valid when the final state is selected.
    post_layernorm: bool | None = None
    # Width of the language model the projector feeds (HF LlavaConfig's
    # text_config.hidden_size); used only when `blocks.projector` is set.
    projector_hidden_size: int = 4096
    # Pixel shuffle of the projectors that merge f x f neighbouring patches into one token of
    # f^2 times the width (HF Idefics3's scale_factor; InternVL's downsample_ratio is 1 / f).
    scale_factor: int = 2
    # Tokens per image after Gemma 3's average pooling (HF Gemma3Config's mm_tokens_per_image;
    # a square number whose side divides the patch grid's).
    mm_tokens_per_image: int = 256
    # LLaVA-NeXT's learnt `image_newline` (one vector of the projector's output width): the
    # artifact returns it beside the features, and the host appends it to each row of an
    # anyres grid when it packs the crops of an image (`builder/crops.py`).
    image_newline: bool = False
    # Keys of an imported HF config that this builder does not use, kept for reference and
    # never read by a block. Presets cannot set it (the schema has no such field).
    kwargs: dict[str, Any] = field(default_factory=dict)

    # --- shape (every family has hidden_size, num_attention_heads, image_size, patch_size,
    # num_hidden_layers and num_channels fields) ---

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def grid_size(self) -> int:
        # A strided conv floors: 384 px at patch 14 gives 27 x 27 patches.
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    @property
    def feature_layers(self) -> list[int]:
        """The selected hidden-state indices, made non-negative."""
        layers = (
            self.feature_layer if isinstance(self.feature_layer, list) else [self.feature_layer]
        )
        total = self.num_hidden_layers + 1
        return [i % total for i in layers]

    @property
    def num_layers_computed(self) -> int:
        """Encoder layers that run: none after the deepest selected state."""
        return max(self.feature_layers)

    @property
    def selects_final_state(self) -> bool:
        return self.num_layers_computed == self.num_hidden_layers

    @property
    def native(self) -> bool:
        """The tower takes each image at its own size, one image per call, as flattened
        patches (`builder/blocks/native.py`); else images of `image_size` in batches."""
        return False

    @property
    def full_attention_layers(self) -> list[int]:
        """A native tower's layers that attend over the whole image; the others attend within
        windows (Qwen2.5-VL's)."""
        return list(range(self.num_hidden_layers))

    def merge_size(self, projector: str | None) -> int:
        """A native tower's merge of k x k patches into one token (with `projector`, the
        artifact's projector block): k, which its processor's sizes are multiples of."""
        return 1

    @property
    def pools(self) -> bool:
        """The output is one vector per image, made by the head."""
        return self.output in ("pooled", "embeds")

    @property
    def embed_projection(self) -> tuple[int, bool] | None:
        """The linear map from the pooled vector to the embedding (output width, bias), or
        None: the embedding is the pooled vector."""
        return None

    @property
    def output_dim(self) -> int:
        projection = self.embed_projection
        if self.output == "embeds" and projection is not None:
            return projection[0]
        if self.pools:
            return self.hidden_size
        return self.hidden_size * len(self.feature_layers)

    # --- the interface of the shared blocks ---

    @property
    def norm_eps(self) -> float:
        """Epsilon of every norm of the tower."""
        return self.layer_norm_eps

    @property
    def mlp_act(self) -> str:
        """The MLP's activation: a registered activation block."""
        return self.hidden_act

    @property
    def attention_biases(self) -> tuple[bool, bool]:
        """Whether q/k/v and the output projection have biases."""
        return True, True

    @property
    def mlp_has_bias(self) -> bool:
        return True

    @property
    def qk_norm(self) -> tuple[str, float] | None:
        """A norm over the full width on q and k before the head split (InternViT's): its
        norm block and eps, which need not be the tower's; None: no qk-norm."""
        return None

    @property
    def layer_scale(self) -> bool:
        """A learnt per-channel scale on each residual branch (DINOv2, InternViT)."""
        return False

    @property
    def register_tokens(self) -> int:
        """Learnt tokens between the class token and the patches (DINOv2 with registers)."""
        return 0

    @property
    def pre_norm(self) -> bool:
        """A norm on the embeddings before the first layer (CLIP's pre_layrnorm)."""
        return False

    @property
    def normed_last_state(self) -> bool:
        """Whether HF's last_hidden_state has the final norm (CLIP's has not)."""
        return True

    @property
    def final_norm_block(self) -> str | None:
        """The final norm's block where it is not the tower's `blocks.norm` (InternViT's is a
        LayerNorm whatever its norm_type); None: `blocks.norm`."""
        return None

    @property
    def final_norm(self) -> bool:
        """The final norm is applied to the final state (when that state is selected)."""
        return self.normed_last_state if self.post_layernorm is None else self.post_layernorm

    def full(self) -> TowerConfig:
        """The same tower with every layer, its final norm, its head and its embedding
        projection: the parameter names a checkpoint may hold. As many states stay selected,
        so the projector's input width is unchanged."""
        layers = [-1, *self.feature_layers[1:]]
        return dataclasses.replace(self, feature_layer=layers, output="embeds", post_layernorm=True)

    def errors(self) -> list[tuple[tuple[str | int, ...], str]]:
        """Checks of the family's own fields that the schema cannot express: (path, message)."""
        return []


@dataclass
class CLIPVisionConfig(TowerConfig):
    """Hyper-parameters of a CLIP-family vision tower.

    The first fields are MLC LLM's `CLIPVisionConfig`; the defaults are HF transformers'
    `CLIPVisionConfig` (ViT-B/32 at 224 px). `layer_norm_eps` defaults to HF's 1e-5, not
    MLC's 1e-6, which mismatches real CLIP checkpoints.
    """

    hidden_size: int = 768
    image_size: int = 224
    intermediate_size: int = 3072
    num_attention_heads: int = 12
    num_hidden_layers: int = 12
    patch_size: int = 32
    # Width of CLIP's visual projection (`visual_projection`): the embedding's width.
    projection_dim: int = 512
    # Read by nothing: accepted so that MLC LLM's CLIP configs load unchanged.
    vocab_size: int = 49408
    num_channels: int = 3
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"
    # LLaVA-1.5's layer: the shipped CLIP presets were written for it. A config imported
    # from a standalone tower selects -1 (HF's last_hidden_state).
    feature_layer: int | list[int] = -2
    # Apply pre_layrnorm to the embeddings before the encoder: CLIP does, SigLIP does not.
    pre_layernorm: bool = True
    # The visual projection has a bias: timm's CLIP ViTs hold it as `head`, a Linear with one
    # (HF's and open_clip's have none).
    projection_bias: bool = False

    @property
    def pre_norm(self) -> bool:
        return self.pre_layernorm

    @property
    def embed_projection(self) -> tuple[int, bool] | None:
        return self.projection_dim, self.projection_bias

    @property
    def normed_last_state(self) -> bool:
        # HF's CLIP normalizes the pooled CLS token only.
        return False


@dataclass
class BlocksConfig:
    """Which registered block type fills each slot of the tower (see `build list`)."""

    embeddings: str = "clip_embeddings"
    norm: str = "layer_norm"
    attention: str = "clip_attention"
    mlp: str = "clip_mlp"
    encoder_layer: str = "clip_encoder_layer"
    encoder: str = "clip_encoder"
    transformer: str = "clip_vision_transformer"
    model: str = "clip_vision_model"
    # Pools the final state into one vector; built only when `model.output` is "pooled".
    head: str = "cls_pooling"
    # LLaVA's multi-modal projector after the feature selection; None: features as selected.
    projector: str | None = None


# OpenAI CLIP's normalization (HF's OPENAI_CLIP_MEAN / OPENAI_CLIP_STD).
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


# The `preprocess.resize` rules of native-resolution towers, each HF's rule of that name.
NATIVE_RESIZES = ("smart_resize", "max_longest_edge", "max_num_patches")


@dataclass
class PreprocessConfig:
    """Image file -> pixel values, as HF's PIL-based `CLIPImageProcessorPil` does it (a native
    `resize`: as Qwen2-VL's, Pixtral's or SigLIP2's Pil processor).

    The defaults are CLIP's: RGB, shortest edge resized to the image size (bicubic), center
    crop, scale 1/255, CLIP's mean and std. SigLIP's: `resize: square`, `center_crop: false`,
    mean and std 0.5.
    """

    # A first resize of the longest edge to this many pixels, the other edge keeping the
    # aspect ratio and rounded up to even (HF Idefics3's `size: {longest_edge: N}`); None: none.
    longest_edge: int | None = None
    # "shortest_edge" keeps the aspect ratio (HF `size: {shortest_edge: N}`); "square" resizes
    # to size x size (HF `size: {height: N, width: N}`). The native-resolution rules keep the
    # image's aspect ratio and give whole patches, as many as the image needs
    # (`builder/native_preprocess.py`): "smart_resize" (Qwen2-VL's, between min_pixels and
    # max_pixels), "max_longest_edge" (Pixtral's: the longest edge at most `size`),
    # "max_num_patches" (SigLIP2 NaFlex's: at most max_num_patches patches).
    resize: str = "shortest_edge"
    # None: model.image_size.
    size: int | None = None
    # Qwen2-VL's pixel budget of smart_resize (HF's min_pixels and max_pixels).
    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    # SigLIP2 NaFlex's patch budget (HF's max_num_patches).
    max_num_patches: int = 256
    resample: str = "bicubic"
    center_crop: bool = True
    # None: model.image_size.
    crop_size: int | None = None
    rescale_factor: float = 1 / 255
    mean: list[float] = field(default_factory=lambda: list(CLIP_MEAN))
    std: list[float] = field(default_factory=lambda: list(CLIP_STD))
    # Convert to RGB first; transparency is composited onto white (transformers 5).
    convert_rgb: bool = True
    # LLaVA-NeXT's anyres crops (HF's `image_grid_pinpoints`, (height, width) pairs, each a
    # multiple of the tower's image size): the image resized into the best of these
    # resolutions, cut into tiles, after its resized whole; None: one crop per image.
    image_grid_pinpoints: list[list[int]] | None = None
    # LLaVA-OneVision's "anyres_max_N" (HF's vision_aspect_ratio): a packed grid larger than
    # N tiles' worth of patches (by more than 1.1 x in side) is resized down, bilinear;
    # None: never (LLaVA-NeXT).
    vision_aspect_ratio: str | None = None
    # InternVL's dynamic tiles (HF GotOcr2ImageProcessor's crop_to_patches): the image
    # resized to the grid of min_patches..max_patches tiles whose aspect ratio is closest to
    # its own, cut into tiles, and resized whole (a thumbnail) after them when they are more
    # than one.
    crop_to_patches: bool = False
    min_patches: int = 1
    max_patches: int = 12
    # Idefics3's image splitting (HF's do_image_splitting): after the longest-edge resize, the
    # image resized up to whole tiles, cut into them, and resized whole (the global image)
    # after them when they are more than one.
    do_image_splitting: bool = False

    def resolved(self, image_size: int) -> PreprocessConfig:
        """The same steps with `size` and `crop_size` filled in."""
        return dataclasses.replace(
            self, size=self.size or image_size, crop_size=self.crop_size or image_size
        )

    @property
    def native(self) -> bool:
        """The image keeps its aspect ratio and becomes as many patches as it needs."""
        return self.resize in NATIVE_RESIZES

    @property
    def output_size(self) -> int | None:
        """Side of the square image the steps produce (resolved config), or None when the
        result is not square (shortest-edge resize without a crop, a native resize)."""
        if self.native:
            return None
        if self.center_crop:
            return self.crop_size
        return self.size if self.resize == "square" else None


@dataclass
class WeightsConfig:
    """Where the parameters come from: a seeded random init, or an HF checkpoint at `path`."""

    seed: int = 0
    path: str | None = None

    @property
    def is_random(self) -> bool:
        return self.path is None


@dataclass
class TargetConfig:
    """One compile target: `name` is the artifact folder, the rest are TVM target options."""

    name: str = "llvm"
    kind: str = "llvm"
    # "host" is resolved at build time to the CPU LLVM detects, and recorded in the manifest.
    mcpu: str = "host"
    mtriple: str | None = None
    mattr: list[str] = field(default_factory=list)
    # Threads the compiled code is tuned for; the runtime thread count is set when loading.
    num_cores: int | None = None
    # cuda: the GPU architectures to compile for, a cubin each, plus PTX of the newest so that
    # later GPUs can run it too. No default on purpose: a wrong-arch default builds code that
    # a GPU refuses to load.
    arch: list[str] = field(default_factory=list)
    # "float16" / "bfloat16": matmuls and convolutions take inputs of that type; the
    # artifact's inputs and outputs stay float32. Each kind applies it
    # (`targets.*.compile`): llvm with AVX-512 FP16 / BF16 through its float16 / bfloat16
    # GEMM kernels, llvm elsewhere as float32 GEMMs of operands rounded to the type, cuda
    # (float16 only) through TVM's mixed precision.
    precision: str = "float32"


@dataclass
class Preset:
    """A resolved, validated preset: what one `build` turns into artifacts."""

    name: str
    description: str = ""
    # The tower family (`builder/families/`): the type of `model` and the default blocks.
    family: str = "clip"
    model: TowerConfig = field(default_factory=CLIPVisionConfig)
    blocks: BlocksConfig = field(default_factory=BlocksConfig)
    weights: WeightsConfig = field(default_factory=WeightsConfig)
    targets: list[TargetConfig] = field(default_factory=lambda: [TargetConfig()])
    # Block-plugin modules imported before the preset was checked (the preset's and --plugin).
    plugins: list[str] = field(default_factory=list)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    # Precision of the parameters and the computation. Inputs and outputs stay float32.
    dtype: str = "float32"

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["model"].pop("kwargs")
        # Only the options a target's kind reads, so that the result is a valid preset again.
        data["targets"] = [
            {k: v for k, v in t.items() if k in COMMON_TARGET_FIELDS + KIND_FIELDS[t["kind"]]}
            for t in data["targets"]
        ]
        return data


# Where `build` writes artifacts (`OUT/<preset>/<target>/`) unless `--out` says otherwise.
DEFAULT_OUT = Path("artifacts")

# A target written as a bare name in a preset (`targets: [llvm]`) expands to this entry.
KNOWN_TARGETS: dict[str, dict[str, Any]] = {
    "llvm": {"name": "llvm", "kind": "llvm", "mcpu": "host"},
    "cuda": {"name": "cuda", "kind": "cuda", "arch": ["sm_80", "sm_90"]},
    "aarch64": {
        "name": "aarch64",
        "kind": "llvm",
        "mtriple": "aarch64-linux-gnu",
        "mcpu": "generic",
    },
    # This CPU's artifact with bfloat16 GEMMs and attention (`build PRESET targets=[llvm-bf16]`).
    "llvm-bf16": {"name": "llvm-bf16", "kind": "llvm", "mcpu": "host", "precision": "bfloat16"},
}


# The target options each kind reads, beside `name`, `kind` and `precision`; a preset that
# sets another is told so rather than silently ignored.
# One line per target kind for `build list` (what an artifact is, what builds and runs it);
# `builder.targets.KINDS` holds their pipelines.
KIND_DESCRIPTIONS: dict[str, str] = {
    "llvm": (
        "CPUs: lib.so for the build machine's CPU (mcpu: host), or with mtriple for another "
        "(aarch64: linked by aarch64-linux-gnu-g++, runs on aarch64 Linux)"
    ),
    "cuda": (
        "NVIDIA GPUs: lib.so for the build machine's CPU holding a cubin per arch plus PTX of "
        "the newest; runs on tvm.cuda(0) with the NVIDIA driver, no compiler. Builds with nvcc, "
        "no GPU needed"
    ),
}

KIND_FIELDS: dict[str, tuple[str, ...]] = {
    "llvm": ("mcpu", "mtriple", "mattr", "num_cores"),
    "cuda": ("arch",),
}
COMMON_TARGET_FIELDS = ("name", "kind", "precision")


def preset_from_dict(data: dict[str, Any]) -> Preset:
    """Turn a schema-valid preset dict (defaults not yet filled) into a `Preset`."""
    from . import families

    targets = []
    for entry in data.get("targets", ["llvm"]):
        targets.append(TargetConfig(**(KNOWN_TARGETS[entry] if isinstance(entry, str) else entry)))
    family = families.get(data.get("family", families.DEFAULT))
    model = family.config(**data.get("model", {}))
    return Preset(
        name=data["name"],
        description=data.get("description", ""),
        family=family.name,
        model=model,
        blocks=BlocksConfig(**{**family.default_blocks(model), **data.get("blocks", {})}),
        weights=WeightsConfig(**data.get("weights", {})),
        targets=targets,
        plugins=list(data.get("plugins", [])),
        preprocess=PreprocessConfig(**data.get("preprocess", {})),
        **{k: data[k] for k in ("dtype",) if k in data},
    )
