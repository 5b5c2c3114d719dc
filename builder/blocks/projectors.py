"""The projectors of VLMs other than LLaVA: the selected features -> the language model's width.

Each block's attributes are its HF module's, so that its parameter names are the
checkpoint's keys behind the module's own prefix: the top module holds the projector as
`multi_modal_projector` (HF's name in PaliGemma, Gemma 3 and InternVL; Idefics3's is
`connector`, which `checkpoint_module` says, for the loader). `anchor` is the key (behind that
module) by which the loader finds the projector in a checkpoint; `token_merge` how the block
changes the token count (`builder/vlm.py` counts them): `pixel_shuffle` merges f x f patches
(`model.scale_factor`), `avg_pool` pools to `model.mm_tokens_per_image`.
"""

from __future__ import annotations

from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor, op

from ..config import BlocksConfig, TowerConfig
from ..registry import create, register
from .common import Linear, in_float32


def pixel_shuffle(x: Tensor, factor: int) -> Tensor:
    """(B, S, D) tokens of a square grid -> (B, S / f^2, f^2 D): each token the f x f block of
    patches it covers, element order (row in the block, column in the block, channel), as
    HF's Idefics3 and InternVL pixel shuffles give it (their two view-permute steps compose
    to this one permutation)."""
    b, s, d = x.shape
    side = round(int(s) ** 0.5)
    n = side // factor
    x = op.reshape(x, (b, n, factor, n, factor, d))  # (B, row, a, col, b, D)
    x = op.permute_dims(x, (0, 1, 3, 2, 4, 5))  # (B, row, col, a, b, D)
    return op.reshape(x, (b, n * n, factor * factor * d))  # (B, S / f^2, f^2 D)


def _input_width(config: TowerConfig) -> int:
    """The selected states concatenated: hidden_size times the number of layers."""
    return config.hidden_size * len(config.feature_layers)


@register("paligemma_linear", kind="projector")
class PaliGemmaMultiModalProjector(nn.Module):
    """PaliGemma's projector: one Linear with bias to model.projector_hidden_size (HF's
    `multi_modal_projector.linear`, out width the VLM's projection_dim)."""

    anchor = "linear.weight"

    def __init__(self, config: TowerConfig, blocks: BlocksConfig):
        self.linear = Linear(_input_width(config), config.projector_hidden_size)

    def forward(self, features: Tensor) -> Tensor:
        return self.linear(features)  # (B, T, W)


class GemmaRMSNorm(nn.Module):
    """Gemma's RMSNorm: x / sqrt(mean(x^2) + eps) times (1 + weight), in float32."""

    def __init__(self, dim: int, eps: float):
        self.eps = eps
        self.weight = nn.Parameter((dim,))

    def forward(self, x: Tensor) -> Tensor:
        def norm(x: Tensor, w: Tensor) -> Tensor:
            return op.rms_norm(x, w + 1.0, axes=[-1], epsilon=self.eps)

        return in_float32(norm, x, self.weight)


@register("gemma3_projector", kind="projector")
class Gemma3MultiModalProjector(nn.Module):
    """Gemma 3's projector: average pooling of the patch grid to model.mm_tokens_per_image
    tokens, Gemma's RMSNorm (`mm_soft_emb_norm`, eps the tower's, times 1 + w), then a matmul
    by `mm_input_projection_weight`, stored (vision width, text width), no bias."""

    anchor = "mm_input_projection_weight"
    token_merge = "avg_pool"

    def __init__(self, config: TowerConfig, blocks: BlocksConfig):
        width = _input_width(config)
        self.grid = config.grid_size
        self.side = round(config.mm_tokens_per_image**0.5)
        self.mm_input_projection_weight = nn.Parameter((width, config.projector_hidden_size))
        self.mm_soft_emb_norm = GemmaRMSNorm(width, config.norm_eps)

    def forward(self, features: Tensor) -> Tensor:
        b, _, d = features.shape
        t, k = self.side, self.grid // self.side
        x = op.reshape(features, (b, t, k, t, k, d))  # (B, row, k, col, k, D)
        x = op.sum(x, axis=[2, 4]) / float(k * k)  # (B, t, t, D)
        x = op.reshape(x, (b, t * t, d))  # (B, T, D), row-major
        x = self.mm_soft_emb_norm(x)
        return op.matmul(x, self.mm_input_projection_weight, out_dtype="float32").astype(x.dtype)


class Idefics3SimpleMLP(nn.Module):
    def __init__(self, width: int, out: int):
        self.proj = Linear(width, out, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x)


@register("idefics3_connector", kind="projector")
class Idefics3Connector(nn.Module):
    """Idefics3's and SmolVLM's connector: pixel shuffle by model.scale_factor, then
    `modality_projection.proj`, a Linear without bias to model.projector_hidden_size."""

    checkpoint_module = "connector"
    anchor = "modality_projection.proj.weight"
    token_merge = "pixel_shuffle"

    def __init__(self, config: TowerConfig, blocks: BlocksConfig):
        self.factor = config.scale_factor
        width = _input_width(config) * self.factor**2
        self.modality_projection = Idefics3SimpleMLP(width, config.projector_hidden_size)

    def forward(self, features: Tensor) -> Tensor:
        return self.modality_projection(pixel_shuffle(features, self.factor))  # (B, T/f^2, W)


@register("internvl_projector", kind="projector")
class InternVLMultiModalProjector(nn.Module):
    """InternVL's projector: pixel shuffle by model.scale_factor (1 / HF's downsample_ratio),
    LayerNorm, Linear -> exact GELU -> Linear to model.projector_hidden_size."""

    anchor = "linear_1.weight"
    token_merge = "pixel_shuffle"
    # HF builds the LayerNorm with torch's default eps.
    layer_norm_eps = 1e-5

    def __init__(self, config: TowerConfig, blocks: BlocksConfig):
        self.factor = config.scale_factor
        width, out = _input_width(config) * self.factor**2, config.projector_hidden_size
        self.layer_norm = create("layer_norm", "norm", width, self.layer_norm_eps)
        self.linear_1 = Linear(width, out)
        # HF's projector_hidden_act, which `build` checks is gelu.
        self.act = create("gelu", "activation")
        self.linear_2 = Linear(out, out)

    def forward(self, features: Tensor) -> Tensor:
        x = self.layer_norm(pixel_shuffle(features, self.factor))  # (B, T/f^2, f^2 D)
        return self.linear_2(self.act(self.linear_1(x)))  # (B, T/f^2, W)
