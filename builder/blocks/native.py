"""Native-resolution towers (Pixtral, Qwen2.5-VL, SigLIP2 NaFlex): one image per call, its
own number of patches.

The artifact's `forward` takes the image's patches flattened, `pixel_values` (n, P) with n
symbolic, and the per-image tensors the family's host code computes from the patch grid
(`builder/families/__init__.py::NativeTower`): rotary cos / sin tables, a window layout, a
gather of the patch merger, the resize of a position table. They reach the blocks as one
`context` dict, name -> tensor. Activations are (1, n, D): the shared layers and encoder run
on them unchanged, with the context passed to the attention.
"""

from __future__ import annotations

import inspect
import types
from typing import Any

from tvm import relax
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor, op

from ..config import BlocksConfig, TowerConfig
from ..families import input_specs
from ..registry import create, register
from .clip import CLIPAttention, make_norm
from .common import Linear, in_float32

Context = dict[str, Tensor]


def rotate_half(x: Tensor) -> Tensor:
    """(x1, x2) -> (-x2, x1) over the last axis, as HF's `rotate_half`."""
    half = int(x.shape[-1]) // 2
    x1, x2 = op.split(x, [half], axis=-1)
    return op.concat([op.negative(x2), x1], dim=-1)


def apply_rope(x: Tensor, context: Context) -> Tensor:
    """x * cos + rotate_half(x) * sin, x (1, n, H, hd), in float32; cos and sin (n, hd)."""
    n, hd = context["cos"].shape
    cos = op.reshape(context["cos"], (1, n, 1, hd))
    sin = op.reshape(context["sin"], (1, n, 1, hd))

    def rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        return x * cos + rotate_half(x) * sin

    return in_float32(rope, x, cos, sin)


@register("patch_linear_embeddings", kind="embeddings")
class PatchLinearEmbeddings(nn.Module):
    """Flattened patches (n, C p p) -> tokens (1, n, D) by the patch conv's weight as a
    Linear: a conv with kernel and stride p over one patch is its dot product with the patch
    in (C, p, p) order. Bias per `model.patch_bias`; no class token, no position table."""

    def __init__(self, config: TowerConfig, blocks: BlocksConfig):
        p, c = config.patch_size, config.num_channels
        self.hidden_size = config.hidden_size
        self.patch_embedding = nn.Conv2D(c, config.hidden_size, p, stride=p, bias=config.patch_bias)

    def forward(self, pixel_values: Tensor, context: Context) -> Tensor:
        conv = self.patch_embedding
        weight = op.reshape(conv.weight, (self.hidden_size, -1))  # (D, C p p)

        def embed(x: Tensor, w: Tensor, *bias: Tensor) -> Tensor:
            out = op.matmul(x, op.permute_dims(w))
            return out + bias[0] if bias else out

        bias = [conv.bias] if conv.bias is not None else []
        tokens = in_float32(embed, pixel_values, weight, *bias)  # (n, D)
        return op.reshape(tokens, (1, *tokens.shape))


@register("siglip2_embeddings", kind="embeddings")
class Siglip2VisionEmbeddings(nn.Module):
    """SigLIP2 NaFlex's: patches flattened (n, p p C) through `patch_embedding`, a Linear
    with bias, plus the learnt G x G position table resized to the image's grid. The resize
    is linear in the table: the host gives its map, the context's `position_weights`
    (n, G G), and the table goes through it."""

    def __init__(self, config: TowerConfig, blocks: BlocksConfig):
        p, c, d = config.patch_size, config.num_channels, config.hidden_size
        self.patch_embedding = Linear(p * p * c, d)
        self.position_embedding = nn.Embedding(config.num_patches, d)

    def forward(self, pixel_values: Tensor, context: Context) -> Tensor:
        tokens = self.patch_embedding(pixel_values)  # (n, D)
        # In float32 whatever the build's dtype, as HF resizes the table.
        table = self.position_embedding.weight.astype("float32")  # (G G, D)
        positions = op.matmul(context["position_weights"], table)  # (n, D)
        tokens = tokens + positions.astype(tokens.dtype)
        return op.reshape(tokens, (1, *tokens.shape))  # (1, n, D)


@register("rope_attention", kind="attention")
class RopeAttention(CLIPAttention):
    """`clip_attention`'s projections (biases as the family config says), with 2-D rotary
    positions on q and k (the context's `cos` and `sin`, the family's frequency layout
    computed on the host), over every patch of the image, or within each window where the
    context has `windows` (cumulative lengths, as flash attention's cu_seqlens)."""

    def attend(self, q: Tensor, k: Tensor, v: Tensor, context: Context) -> Tensor:
        q, k = apply_rope(q, context), apply_rope(k, context)
        if "windows" in context:
            return in_float32(lambda q, k, v: windowed_attention(q, k, v, context), q, k, v)
        return super().attend(q, k, v)


def windowed_attention(q: Tensor, k: Tensor, v: Tensor, context: Context) -> Tensor:
    """Attention within each window of consecutive tokens: `windows` holds the windows'
    cumulative lengths (int32, first 0, last n), `max_window` the longest window's length."""
    expr = relax.op.nn.attention_var_len(
        q._expr, k._expr, v._expr, context["windows"]._expr, context["max_window"]._expr
    )
    return op.wrap_nested(expr, name="windowed_attention")


@register("native_encoder", kind="encoder")
class NativeEncoder(nn.Module):
    """The layer stack with the image's context: each layer's attention gets it, without
    `windows` in the layers that attend over the whole image (`model.full_attention_layers`,
    every layer where the family has no windows). Returns every hidden state, as
    `clip_encoder`."""

    def __init__(self, config: TowerConfig, blocks: BlocksConfig):
        self.full = set(config.full_attention_layers)
        self.layers = nn.ModuleList(
            [
                create(blocks.encoder_layer, "encoder_layer", config, blocks)
                for _ in range(config.num_layers_computed)
            ]
        )

    def forward(self, inputs_embeds: Tensor, context: Context) -> list[Tensor]:
        full = {k: v for k, v in context.items() if k not in ("windows", "max_window")}
        states = [inputs_embeds]
        for i, layer in enumerate(self.layers):
            states.append(layer(states[-1], full if i in self.full else context))
        return states


@register("native_vision_transformer", kind="transformer")
class NativeVisionTransformer(nn.Module):
    """Embeddings -> the family's pre-norm -> the encoder, with the image's context; the
    family's final norm on the final state when it is selected."""

    def __init__(self, config: TowerConfig, blocks: BlocksConfig):
        self.embeddings = create(blocks.embeddings, "embeddings", config, blocks)
        self.pre_layrnorm = make_norm(config, blocks) if config.pre_norm else None
        self.encoder = create(blocks.encoder, "encoder", config, blocks)
        final = config.final_norm and config.selects_final_state
        self.post_layernorm = make_norm(config, blocks) if final else None

    def forward(self, pixel_values: Tensor, context: Context) -> list[Tensor]:
        hidden_states = self.embeddings(pixel_values, context)  # (1, n, D)
        if self.pre_layrnorm is not None:
            hidden_states = self.pre_layrnorm(hidden_states)
        states = self.encoder(hidden_states, context)
        if self.post_layernorm is not None:
            states[-1] = self.post_layernorm(states[-1])
        return states


@register("native_vision_model", kind="model")
class NativeVisionModel(nn.Module):
    """The top module of a native-resolution tower: `forward(pixel_values, *inputs)`, the
    inputs named by the family (`model.native_inputs`); selects the feature layer(s), applies
    the projector (`blocks.projector`, which also gets the context) and returns the tokens of
    the one image, (tokens, width), float32."""

    def __init__(self, config: TowerConfig, blocks: BlocksConfig):
        self.feature_layers = config.feature_layers
        self.dtype = "float32"
        self.vision_model = create(blocks.transformer, "transformer", config, blocks)
        self.multi_modal_projector = (
            create(blocks.projector, "projector", config, blocks) if blocks.projector else None
        )
        names = [name for name, _, _ in input_specs(config, blocks)]
        self.forward = _entry(self, names[1:])

    def run(self, pixel_values: Tensor, context: Context) -> Tensor:
        states = self.vision_model(pixel_values.astype(self.dtype), context)
        picked = [states[i] for i in self.feature_layers]
        features = picked[0] if len(picked) == 1 else op.concat(picked, dim=-1)  # (1, n, D k)
        features = op.squeeze(features, axis=0)  # (n, D k)
        if self.multi_modal_projector is not None:
            features = self.multi_modal_projector(features, context)
        return features.astype("float32")


def _entry(model: NativeVisionModel, names: list[str]) -> Any:
    """`model.run` as a `forward(pixel_values, <names>...)` method: TVM's exporter reads the
    argument names from the signature, and a family's inputs differ from another's."""

    def forward(self: NativeVisionModel, pixel_values: Tensor, *inputs: Tensor) -> Tensor:
        return self.run(pixel_values, dict(zip(names, inputs, strict=True)))

    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    forward.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [inspect.Parameter(n, kind) for n in ("self", "pixel_values", *names)]
    )
    return types.MethodType(forward, model)


@register("mistral3_projector", kind="projector")
class Mistral3MultiModalProjector(nn.Module):
    """Mistral 3's projector (Pixtral's): RMSNorm (`norm`), the patch merger (each 2 x 2
    block of patches gathered by the context's `merge_index`, in unfold's (channel, row,
    column) order, through `patch_merger.merging_layer`, no bias), then `linear_1` -> GELU
    -> `linear_2`, biases per `model.multimodal_projector_bias`."""

    anchor = "patch_merger.merging_layer.weight"
    # Takes the image's context: a projector of native-resolution towers.
    native = True
    # What the host adds to `forward`'s inputs: the patches of each 2 x 2 block, in order (the
    # "kept" patches: all but an odd last row or column).
    inputs = (("merge_index", ("kept_patches",), "int32"),)

    def __init__(self, config: TowerConfig, blocks: BlocksConfig):
        d = config.hidden_size * len(config.feature_layers)
        k = config.spatial_merge_size
        out, bias = config.projector_hidden_size, config.multimodal_projector_bias
        self.merge = k * k
        self.norm = create("rms_norm", "norm", d, config.projector_norm_eps)
        self.patch_merger = Mistral3PatchMerger(d * k * k, d)
        self.linear_1 = Linear(d, out, bias=bias)
        self.act = create(config.projector_hidden_act, "activation")
        self.linear_2 = Linear(out, out, bias=bias)

    def forward(self, features: Tensor, context: Context) -> Tensor:
        x = self.norm(features)  # (n, D)
        d = int(x.shape[-1])
        x = op.take(x, context["merge_index"], axis=0)  # (4 m, D): each block's 4 patches
        x = op.reshape(x, (-1, self.merge, d))  # (m, 4, D), (row, column) in the block
        x = op.reshape(op.permute_dims(x, (0, 2, 1)), (-1, self.merge * d))  # (m, D * 4)
        x = self.patch_merger.merging_layer(x)
        return self.linear_2(self.act(self.linear_1(x)))  # (m, W)


class Mistral3PatchMerger(nn.Module):
    def __init__(self, width: int, out: int):
        self.merging_layer = Linear(width, out, bias=False)
