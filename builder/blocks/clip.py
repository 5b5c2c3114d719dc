"""CLIP's vision tower as registered blocks, after MLC LLM's `clip_vision.py`; the layers,
encoder, transformer and top module are shared by every family.

Attribute names follow HF transformers' `CLIPVisionModel`, so a CLIP parameter's name is its
checkpoint key without the checkpoint's prefix; other families map their keys onto these
names (`builder/families/`). Blocks take `(config, blocks)`, read the family config's
interface (`builder/config.py::TowerConfig`: `norm_eps`, `attention_biases`, `layer_scale`,
...) and build their children through the registry from the slot names in `blocks`, never
from a fixed class.
"""

from __future__ import annotations

from typing import Any

from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor, op

from ..config import BlocksConfig, TowerConfig
from ..registry import create, prefix_tokens, register
from .common import Linear, in_float32


def make_norm(config: TowerConfig, blocks: BlocksConfig, dim: int | None = None) -> nn.Module:
    return create(blocks.norm, "norm", dim or config.hidden_size, config.norm_eps)


def patch_conv(config: TowerConfig, bias: bool) -> nn.Conv2D:
    """The patch embedding: a conv with kernel and stride patch_size (floors at the edge)."""
    return nn.Conv2D(
        config.num_channels,
        config.hidden_size,
        kernel_size=config.patch_size,
        stride=config.patch_size,
        bias=bias,
    )


def patch_tokens(conv: nn.Conv2D, pixel_values: Tensor) -> Tensor:
    """Pixels -> one token per patch, (B, P, D), with P = grid * grid in row-major order. The
    conv runs in float32 whatever the build's dtype (its weights are cast)."""

    def run(x: Tensor, weight: Tensor, *bias: Tensor) -> Tensor:
        return op.conv2d(x, weight, *bias, stride=conv.stride, padding=conv.padding)

    bias = [conv.bias] if conv.bias is not None else []
    patches = in_float32(run, pixel_values, conv.weight, *bias)  # (B, D, grid, grid)
    b, d = patches.shape[0], patches.shape[1]
    patches = op.reshape(patches, (b, d, -1))  # (B, D, P)
    return op.permute_dims(patches, (0, 2, 1))  # (B, P, D)


def add_positions(tokens: Tensor, position_embedding: nn.Embedding) -> Tensor:
    """Add a learnt position embedding with one row per token."""
    rows, d = position_embedding.weight.shape
    return tokens + op.reshape(position_embedding.weight, (1, rows, d))


def l2_normalize(x: Tensor) -> Tensor:
    """x / max(|x|, 1e-12) over the last axis, as torch's F.normalize."""
    norm = op.sqrt(op.sum(op.square(x), axis=-1, keepdims=True))  # (B, 1)
    return x / op.maximum(norm, op.full(norm.shape, 1e-12, dtype=x.dtype))


@register("clip_embeddings", kind="embeddings")
class CLIPVisionEmbeddings(nn.Module):
    """Conv patch embedding (no bias), a learnt CLS token, learnt position embeddings."""

    # Tokens put in front of the patches; the feature selection and pooling read this.
    class_tokens = 1

    def __init__(self, config: TowerConfig, blocks: BlocksConfig):
        self.embed_dim = config.hidden_size
        self.class_embedding = nn.Parameter((config.hidden_size,))
        self.patch_embedding = patch_conv(config, bias=False)
        self.position_embedding = nn.Embedding(config.num_patches + 1, config.hidden_size)

    def forward(self, pixel_values: Tensor) -> Tensor:
        b, d = pixel_values.shape[0], self.embed_dim
        patches = patch_tokens(self.patch_embedding, pixel_values)  # (B, P, D)
        cls = op.broadcast_to(op.reshape(self.class_embedding, (1, 1, d)), (b, 1, d))
        tokens = op.concat([cls, patches], dim=1)  # (B, P + 1, D)
        return add_positions(tokens, self.position_embedding)


@register("clip_attention", kind="attention")
class CLIPAttention(nn.Module):
    """Full bidirectional multi-head attention with separate q/k/v/out projections; biases
    and a qk-norm (over the full width, before the head split; its own norm block and eps) as
    the family config says."""

    def __init__(self, config: TowerConfig, blocks: BlocksConfig):
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        d = config.hidden_size
        qkv_bias, out_bias = config.attention_biases
        self.q_proj = Linear(d, d, bias=qkv_bias)
        self.k_proj = Linear(d, d, bias=qkv_bias)
        self.v_proj = Linear(d, d, bias=qkv_bias)
        self.out_proj = Linear(d, d, bias=out_bias)
        qk_norm = config.qk_norm
        self.q_norm = create(qk_norm[0], "norm", d, qk_norm[1]) if qk_norm else None
        self.k_norm = create(qk_norm[0], "norm", d, qk_norm[1]) if qk_norm else None

    def forward(self, hidden_states: Tensor, *context: Any) -> Tensor:
        b, s, d = hidden_states.shape
        h, hd = self.num_heads, self.head_dim
        q, k = self.q_proj(hidden_states), self.k_proj(hidden_states)  # (B, S, D)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q = op.reshape(q, (b, s, h, hd))  # (B, S, H, hd)
        k = op.reshape(k, (b, s, h, hd))
        v = op.reshape(self.v_proj(hidden_states), (b, s, h, hd))
        return self.out_proj(op.reshape(self.attend(q, k, v, *context), (b, s, d)))  # (B, S, D)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, *context: Any) -> Tensor:
        """(B, S, H, hd) each -> the heads' outputs: attention over every token, scale
        1/sqrt(hd), softmax and sums in float32 in half precision. A native tower's layer
        passes the image's context (SigLIP2's), which this needs nothing from."""
        return in_float32(op.scaled_dot_product_attention, q, k, v)


@register("clip_mlp", kind="mlp")
class CLIPMLP(nn.Module):
    """fc1 -> the configured activation -> fc2."""

    def __init__(self, config: TowerConfig, blocks: BlocksConfig):
        bias = config.mlp_has_bias
        self.fc1 = Linear(config.hidden_size, config.intermediate_size, bias=bias)
        self.activation_fn = create(config.mlp_act, "activation")
        self.fc2 = Linear(config.intermediate_size, config.hidden_size, bias=bias)

    def forward(self, hidden_states: Tensor) -> Tensor:
        return self.fc2(self.activation_fn(self.fc1(hidden_states)))


@register("swiglu_mlp", kind="mlp")
class SwiGLUMLP(nn.Module):
    """down_proj(act(gate_proj(x)) * up_proj(x)), act the config's `mlp_act` (SiLU): the
    gated MLP of DINOv2-giant, AIMv2, Pixtral and Qwen; biases as the config says."""

    def __init__(self, config: TowerConfig, blocks: BlocksConfig):
        d, hidden, bias = config.hidden_size, config.intermediate_size, config.mlp_has_bias
        self.gate_proj = Linear(d, hidden, bias=bias)
        self.up_proj = Linear(d, hidden, bias=bias)
        self.act_fn = create(config.mlp_act, "activation")
        self.down_proj = Linear(hidden, d, bias=bias)

    def forward(self, hidden_states: Tensor) -> Tensor:
        gate = self.act_fn(self.gate_proj(hidden_states))
        return self.down_proj(gate * self.up_proj(hidden_states))


@register("clip_encoder_layer", kind="encoder_layer")
class CLIPEncoderLayer(nn.Module):
    """Pre-norm transformer layer: x + attn(norm1(x)), then x + mlp(norm2(x)); with the
    family's layer scale, each branch times a learnt per-channel scale (`layer_scale1`,
    `layer_scale2`)."""

    def __init__(self, config: TowerConfig, blocks: BlocksConfig):
        self.layer_norm1 = make_norm(config, blocks)
        self.self_attn = create(blocks.attention, "attention", config, blocks)
        self.layer_norm2 = make_norm(config, blocks)
        self.mlp = create(blocks.mlp, "mlp", config, blocks)
        scaled = config.layer_scale
        self.layer_scale1 = nn.Parameter((config.hidden_size,)) if scaled else None
        self.layer_scale2 = nn.Parameter((config.hidden_size,)) if scaled else None

    def forward(self, hidden_states: Tensor, *context: Any) -> Tensor:
        # A native tower's attention takes the image's context (builder/blocks/native.py).
        attn = self.self_attn(self.layer_norm1(hidden_states), *context)
        if self.layer_scale1 is not None:
            attn = attn * self.layer_scale1
        hidden_states = hidden_states + attn
        mlp = self.mlp(self.layer_norm2(hidden_states))
        if self.layer_scale2 is not None:
            mlp = mlp * self.layer_scale2
        return hidden_states + mlp


@register("clip_encoder", kind="encoder")
class CLIPEncoder(nn.Module):
    """The layer stack. Returns every hidden state, the input first, as HF's hidden_states.

    Only `config.num_layers_computed` layers are built: none after the deepest selected
    feature layer, so their weights are neither loaded nor run.
    """

    def __init__(self, config: TowerConfig, blocks: BlocksConfig):
        self.layers = nn.ModuleList(
            [
                create(blocks.encoder_layer, "encoder_layer", config, blocks)
                for _ in range(config.num_layers_computed)
            ]
        )

    def forward(self, inputs_embeds: Tensor) -> list[Tensor]:
        states = [inputs_embeds]
        for layer in self.layers:
            states.append(layer(states[-1]))
        return states


@register("clip_vision_transformer", kind="transformer")
class CLIPVisionTransformer(nn.Module):
    """Embeddings -> the family's pre-norm (CLIP's pre-LayerNorm) -> encoder; the family's
    final norm on the final state when it is selected; the `blocks.head` pooling block when
    `model.output` is pooled or embeds, and the embedding projection for embeds."""

    def __init__(self, config: TowerConfig, blocks: BlocksConfig):
        self.embeddings = create(blocks.embeddings, "embeddings", config, blocks)
        # HF's misspelling, kept on purpose: parameter names equal CLIP's checkpoint keys.
        # Without a pre-norm nothing is built, so nothing is loaded or exported.
        self.pre_layrnorm = make_norm(config, blocks) if config.pre_norm else None
        self.encoder = create(blocks.encoder, "encoder", config, blocks)
        # Built only when used (on the final state only), so an unused norm is neither
        # loaded nor exported.
        final = config.final_norm and config.selects_final_state
        norm = config.final_norm_block or blocks.norm
        self.post_layernorm = (
            create(norm, "norm", config.hidden_size, config.norm_eps) if final else None
        )
        # HF keeps SigLIP's head inside the tower (`vision_model.head.*`): so do we.
        self.head = create(blocks.head, "head", config, blocks) if config.pools else None
        # The embedding projection (CLIP's `visual_projection`, which HF keeps beside the
        # tower; the family's name map finds it there).
        projection = config.embed_projection if config.output == "embeds" else None
        self.visual_projection = (
            Linear(config.hidden_size, projection[0], bias=projection[1]) if projection else None
        )

    def forward(self, pixel_values: Tensor) -> list[Tensor]:
        hidden_states = self.embeddings(pixel_values)  # (B, T, D)
        if self.pre_layrnorm is not None:
            hidden_states = self.pre_layrnorm(hidden_states)
        states = self.encoder(hidden_states)
        if self.post_layernorm is not None:
            states[-1] = self.post_layernorm(states[-1])
        return states


@register("clip_vision_model", kind="model")
class CLIPVisionModel(nn.Module):
    """The top module: selects the feature layer(s) and the tokens a language model gets, then
    applies the projector if `blocks.projector` names one; or returns the pooled vector of the
    tower's head, through the embedding projection and normalized for `embeds`."""

    def __init__(self, config: TowerConfig, blocks: BlocksConfig):
        self.feature_layers = config.feature_layers
        self.pooled = config.pools
        self.normalize = config.output == "embeds" and config.normalize_embeds
        # The preset check refuses "default" when there are no tokens before the patches.
        default = config.feature_select_strategy == "default"
        self.drop_tokens = prefix_tokens(config, blocks) if default else 0
        # The compute dtype; `Module.to(dtype)` updates it with the parameters. Pixels come in
        # and features go out as float32 whatever it is.
        self.dtype = "float32"
        self.vision_model = create(blocks.transformer, "transformer", config, blocks)
        # LLaVA's name for it, so its parameters are the checkpoint's keys.
        self.multi_modal_projector = (
            create(blocks.projector, "projector", config, blocks) if blocks.projector else None
        )
        # LLaVA-NeXT's newline vector, returned beside the features for the host's packing
        # of an image's crops (HF's `image_newline`, a top-level checkpoint key).
        width = config.projector_hidden_size if blocks.projector else config.output_dim
        self.image_newline = nn.Parameter((width,)) if config.image_newline else None

    def forward(self, pixel_values: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        states = self.vision_model(pixel_values.astype(self.dtype))
        if self.pooled:
            pooled = self.vision_model.head(states[-1])  # (B, D)
            if self.vision_model.visual_projection is not None:
                pooled = self.vision_model.visual_projection(pooled)  # (B, E)
            pooled = pooled.astype("float32")
            return l2_normalize(pooled) if self.normalize else pooled
        picked = [states[i] for i in self.feature_layers]
        features = picked[0] if len(picked) == 1 else op.concat(picked, dim=-1)  # (B, T, D * n)
        if self.drop_tokens:
            features = op.split(features, [self.drop_tokens], axis=1)[1]  # (B, P, D * n)
        if self.multi_modal_projector is not None:
            features = self.multi_modal_projector(features)  # (B, P, W)
        if self.image_newline is not None:
            return features.astype("float32"), self.image_newline.astype("float32")  # (W,)
        return features.astype("float32")
