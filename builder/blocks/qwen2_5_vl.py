"""Qwen2.5-VL's own blocks (`builder/families/qwen2_5_vl.py`): the Conv3d patch embedding
run as a Linear over one frame, and the tower with its patch merger on the final state."""

from __future__ import annotations

from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor, op

from ..config import BlocksConfig, TowerConfig
from ..registry import create, register
from .common import Linear, in_float32
from .native import Context, NativeVisionTransformer


class Conv3DWeight(nn.Module):
    """HF's `patch_embed.proj`, a Conv3d without bias: its weight alone, (D, C, T, p, p)."""

    def __init__(self, out: int, channels: int, frames: int, patch: int):
        self.weight = nn.Parameter((out, channels, frames, patch, patch))


@register("qwen2_5_vl_patch_embed", kind="embeddings")
class Qwen25VLPatchEmbed(nn.Module):
    """Patches (n, C p p), one frame each -> tokens (1, n, D). HF's Conv3d with kernel and
    stride (T, p, p) sees each patch's frame T times over: its dot product with the weight
    summed over T. No bias, no position table."""

    def __init__(self, config: TowerConfig, blocks: BlocksConfig):
        self.hidden_size = config.hidden_size
        self.proj = Conv3DWeight(
            config.hidden_size, config.num_channels, config.temporal_patch_size, config.patch_size
        )

    def forward(self, pixel_values: Tensor, context: Context) -> Tensor:
        w = self.proj.weight
        d, c, t = (int(x) for x in w.shape[:3])

        def embed(x: Tensor, w: Tensor) -> Tensor:
            folded = op.sum(op.reshape(w, (d, c, t, -1)), axis=2)  # (D, C, p p)
            return op.matmul(x, op.permute_dims(op.reshape(folded, (d, -1))))

        tokens = in_float32(embed, pixel_values, w)  # (n, D)
        return op.reshape(tokens, (1, *tokens.shape))


@register("qwen2_5_vl_vision_transformer", kind="transformer")
class Qwen25VLVisionTransformer(NativeVisionTransformer):
    """`native_vision_transformer` with HF's `merger` on the final state: the tower's last
    stage, as HF builds it (`visual.merger`)."""

    def __init__(self, config: TowerConfig, blocks: BlocksConfig):
        super().__init__(config, blocks)
        self.merger = Qwen25VLPatchMerger(config, blocks) if config.selects_final_state else None

    def forward(self, pixel_values: Tensor, context: Context) -> list[Tensor]:
        states = super().forward(pixel_values, context)
        if self.merger is not None:
            states[-1] = self.merger(states[-1])
        return states


class Qwen25VLPatchMerger(nn.Module):
    """RMSNorm (`ln_q`), each merge block's k k patches (consecutive rows) side by side, then
    `linear_1` -> the merger's activation -> `linear_2` to `out_hidden_size` (HF's `mlp.0`
    and `mlp.2`), with biases."""

    def __init__(self, config: TowerConfig, blocks: BlocksConfig):
        width = config.hidden_size * config.spatial_merge_size**2
        self.width = width
        self.ln_q = create(blocks.norm, "norm", config.hidden_size, config.norm_eps)
        self.linear_1 = Linear(width, width)
        self.act = create(config.merger_act, "activation")
        self.linear_2 = Linear(width, config.out_hidden_size)

    def forward(self, hidden_states: Tensor) -> Tensor:
        x = op.reshape(self.ln_q(hidden_states), (1, -1, self.width))  # (1, n / k k, D k k)
        return self.linear_2(self.act(self.linear_1(x)))  # (1, m, out)
