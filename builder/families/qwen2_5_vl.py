"""Qwen2.5-VL's vision tower (HF `Qwen2_5_VisionTransformerPretrainedModel`) and its patch
merger, at each image's own size.

The Conv3d patch embedding (C, T, p, p) without bias sees each patch T times over (an image's
frame repeated by the processor): it is run as a Linear over the first frame's C p p values
with the weight summed over T (`qwen2_5_vl_patch_embed`). Then pre-norm layers with RMSNorm
(eps 1e-6), a fused qkv with bias (split into q/k/v on load), `proj` with bias, the SwiGLU MLP
with biases, 2-D rotary positions (`rope_attention`: Qwen's layout, rows then columns on the
same frequencies), no final norm. Layers attend within windows of `window_size` pixels,
except `fullatt_block_indexes`' layers, which attend over the whole image.

The host does what HF's forward does with the grid (numpy, float32): the rotary tables, the
window order (`get_window_index`: windows of whole merge blocks, ragged at the right and
bottom edges) by which it permutes the patches, in merge blocks, and the tables, and the
windows' cumulative lengths. The merger (`merger`: RMSNorm, each block's k x k patches side
by side, Linear -> GELU -> Linear to `out_hidden_size`) is part of the tower, as in HF, and
runs on the permuted order; `finish` puts the merged tokens back in block order. The output
is HF's `pooler_output` (Qwen2.5-VL's `get_image_features`) for the image.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..config import TowerConfig
from . import Family, NameMap, NativeTower, register
from .clip import ACTIVATIONS, FUSED_QKV

if TYPE_CHECKING:  # numpy only where arrays are made: `build check` does not import it
    import numpy as np


@dataclass
class Qwen2_5_VLVisionConfig(TowerConfig):
    """HF transformers' `Qwen2_5_VLVisionConfig` fields that shape the tower, with its
    defaults."""

    depth: int = 32
    hidden_size: int = 3584
    hidden_act: str = "silu"
    intermediate_size: int = 3420
    num_heads: int = 16
    in_channels: int = 3
    patch_size: int = 14
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    # Side of an attention window in pixels: window_size / spatial_merge_size / patch_size
    # merge blocks.
    window_size: int = 112
    out_hidden_size: int = 3584
    fullatt_block_indexes: list[int] = field(default_factory=lambda: [7, 15, 23, 31])
    rope_theta: float = 10000.0

    # --- the TowerConfig interface under HF's names ---

    @property
    def num_hidden_layers(self) -> int:
        return self.depth

    @property
    def num_attention_heads(self) -> int:
        return self.num_heads

    @property
    def num_channels(self) -> int:
        return self.in_channels

    @property
    def image_size(self) -> int:
        """The side of one attention window; the tower takes any size."""
        return self.window_size

    @property
    def norm_eps(self) -> float:
        return 1e-6  # HF builds every RMSNorm of the tower, the merger's too, with 1e-6

    @property
    def merger_act(self) -> str:
        return "gelu"  # HF's merger is nn.GELU(), whatever hidden_act

    @property
    def normed_last_state(self) -> bool:
        return False

    @property
    def native(self) -> bool:
        return True

    @property
    def full_attention_layers(self) -> list[int]:
        return list(self.fullatt_block_indexes)

    @property
    def output_dim(self) -> int:
        return self.out_hidden_size

    def merge_size(self, projector: str | None) -> int:
        """The merger's k: it is the tower's, with or without a projector."""
        return self.spatial_merge_size

    @property
    def native_inputs(self) -> list[tuple[str, list[int | str], str]]:
        patch = self.num_channels * self.patch_size**2
        return [
            ("pixel_values", ["patches", patch], "float32"),
            ("cos", ["patches", self.head_dim], "float32"),
            ("sin", ["patches", self.head_dim], "float32"),
            ("windows", ["windows"], "int32"),
            ("max_window", [], "int32"),
        ]

    def errors(self) -> list[tuple[tuple[str | int, ...], str]]:
        found = []
        if self.hidden_size % self.num_heads or (self.hidden_size // self.num_heads) % 4:
            found.append(
                (
                    ("model", "num_heads"),
                    f"hidden_size {self.hidden_size} / num_heads {self.num_heads} must be a "
                    "whole head width that is a multiple of 4 (the 2-D rotary layout)",
                )
            )
        if self.window_size < self.spatial_merge_size * self.patch_size:
            found.append(
                (
                    ("model", "window_size"),
                    f"{self.window_size} pixels is less than one merge block "
                    f"({self.spatial_merge_size} x {self.patch_size} pixels)",
                )
            )
        if not self.selects_final_state:
            found.append(
                (
                    ("model", "feature_layer"),
                    f"{self.feature_layer}: the tower returns its merger's tokens, made from "
                    "the final state (HF's pooler_output); only -1 is allowed",
                )
            )
        return found


def inv_freq(head_dim: int, theta: float) -> np.ndarray:
    """HF's inverse frequencies, 1 / theta^(2i / d) with d = head_dim / 2, float32."""
    import numpy as np

    dim = head_dim // 2
    exponents = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)
    return (1.0 / (np.float32(theta) ** exponents)).astype(np.float32)


def block_positions(rows: int, cols: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each patch's (row, column), patches in merge-block order (the k x k patches of a block
    together, blocks row-major), as HF's `get_vision_position_ids`."""
    import numpy as np

    r, c = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")

    def blocked(x: np.ndarray) -> np.ndarray:
        return x.reshape(rows // k, k, cols // k, k).transpose(0, 2, 1, 3).reshape(-1)

    return blocked(r), blocked(c)


def rope_tables(config: Qwen2_5_VLVisionConfig, rows: int, cols: int) -> tuple[np.ndarray, ...]:
    """cos and sin, (rows * cols, head_dim) each, in merge-block order: the angles
    [r f, c f, r f, c f] with f the inverse frequencies."""
    import numpy as np

    freq = inv_freq(config.head_dim, config.rope_theta)
    r, c = block_positions(rows, cols, config.spatial_merge_size)
    half = np.concatenate(
        [r[:, None].astype(np.float32) * freq, c[:, None].astype(np.float32) * freq], axis=1
    )
    angles = np.concatenate([half, half], axis=1)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def window_index(config: Qwen2_5_VLVisionConfig, rows: int, cols: int) -> tuple[np.ndarray, ...]:
    """HF's `get_window_index` for one image: the merge blocks in window order (windows
    row-major, blocks row-major within a window, the windows at the right and bottom edges
    cut short), and the windows' cumulative lengths in patches, repeats dropped, int32."""
    import numpy as np

    k = config.spatial_merge_size
    side = config.window_size // k // config.patch_size  # blocks per window side
    br, bc = rows // k, cols // k
    wr, wc = -(-br // side), -(-bc // side)
    padded = np.full((wr * side, wc * side), -1, dtype=np.int64)
    padded[:br, :bc] = np.arange(br * bc).reshape(br, bc)
    windows = padded.reshape(wr, side, wc, side).transpose(0, 2, 1, 3).reshape(wr * wc, -1)
    order = windows[windows >= 0]
    lengths = (windows >= 0).sum(axis=1) * k * k
    starts = np.unique(np.concatenate([[0], np.cumsum(lengths)]))
    return order, starts.astype(np.int32)


def native_inputs(
    config: Qwen2_5_VLVisionConfig, patches: np.ndarray, grid: Any
) -> dict[str, np.ndarray]:
    """The arrays `forward` takes for one image: HF's `pixel_values` rows (rows * cols,
    C T p p, merge-block order) and its `image_grid_thw` (1, rows, cols) -> the first frame of
    each patch and the rotary tables, both in window order, and the windows."""
    import numpy as np

    t, rows, cols = grid
    if t != 1:
        raise ValueError(f"grid {tuple(grid)}: one image (t = 1) per call")
    c, frames, p = config.num_channels, config.temporal_patch_size, config.patch_size
    first = patches.reshape(-1, c, frames, p * p)[:, :, 0].reshape(-1, c * p * p)
    order, starts = window_index(config, rows, cols)
    unit = config.spatial_merge_size**2
    permuted = (order[:, None] * unit + np.arange(unit)).reshape(-1)  # blocks -> patches
    cos, sin = rope_tables(config, rows, cols)
    return {
        "pixel_values": np.ascontiguousarray(first[permuted]),
        "cos": cos[permuted],
        "sin": sin[permuted],
        "windows": starts,
        "max_window": np.array(np.diff(starts).max(), dtype=np.int32),
    }


def finish(config: Qwen2_5_VLVisionConfig, merged: np.ndarray, grid: Any) -> np.ndarray:
    """The merged tokens, one per merge block in window order, put back in block order."""
    import numpy as np

    order, _ = window_index(config, grid[1], grid[2])
    return merged[np.argsort(order)]


def row_width(config: Qwen2_5_VLVisionConfig) -> int:
    """The width of HF's rows: each patch's T frames."""
    return config.num_channels * config.temporal_patch_size * config.patch_size**2


def sample(config: Qwen2_5_VLVisionConfig, rows: int, cols: int, seed: int) -> tuple[Any, Any]:
    """Random rows of an image of at least rows x cols patches (each side rounded up to whole
    merge blocks), each frame repeated T times as the processor does."""
    import numpy as np

    k = config.spatial_merge_size
    rows, cols = -(-rows // k) * k, -(-cols // k) * k
    c, frames, p = config.num_channels, config.temporal_patch_size, config.patch_size
    frame = np.random.default_rng(seed).standard_normal((rows * cols, c, 1, p * p))
    patches = np.repeat(frame.astype(np.float32), frames, axis=2)
    return patches.reshape(rows * cols, -1), (1, rows, cols)


def reference(hf_model: Any, patches: np.ndarray, grid: Any) -> np.ndarray:
    """HF's merged tokens for the image: the vision model's pooler_output, or
    Qwen2.5-VL's get_image_features for a Qwen2_5_VLForConditionalGeneration."""
    import torch

    pixels = torch.from_numpy(patches)
    thw = torch.tensor([list(grid)])
    with torch.inference_mode():
        if hasattr(hf_model, "get_image_features"):
            return hf_model.get_image_features(pixels, thw).pooler_output[0].float().numpy()
        return hf_model(pixels, grid_thw=thw).pooler_output.float().numpy()


def blocks(model: Qwen2_5_VLVisionConfig) -> dict[str, str]:
    return {
        "embeddings": "qwen2_5_vl_patch_embed",
        "norm": "rms_norm",
        "attention": "rope_attention",
        "mlp": "swiglu_mlp",
        "encoder": "native_encoder",
        "transformer": "qwen2_5_vl_vision_transformer",
        "model": "native_vision_model",
    }


FAMILY = register(
    Family(
        name="qwen2_5_vl",
        description="Qwen2.5-VL's vision tower and merger (HF "
        "Qwen2_5_VisionTransformerPretrainedModel) at each image's own size: its pooler_output",
        config=Qwen2_5_VLVisionConfig,
        blocks=blocks,
        names=NameMap(
            anchor="patch_embed.proj.weight",
            renames=(
                (r"^patch_embed\.", "embeddings."),
                (r"^blocks\.", "encoder.layers."),
                (r"\.norm1\.", ".layer_norm1."),
                (r"\.norm2\.", ".layer_norm2."),
                (r"\.attn\.proj\.", ".self_attn.out_proj."),
                (r"\.attn\.", ".self_attn."),
                (r"^merger\.mlp\.0\.", "merger.linear_1."),
                (r"^merger\.mlp\.2\.", "merger.linear_2."),
            ),
            splits=(FUSED_QKV,),
        ),
        hf_model_types=("qwen2_5_vl_vision", "qwen2_5_vl"),
        reference="Qwen2_5_VisionTransformerPretrainedModel",
        reference_config="Qwen2_5_VLVisionConfig",
        hf_values={"hidden_act": ACTIVATIONS},
        # Windows of 2 x 2 merge blocks at patch 8, ragged at the edges of the test images,
        # and a layer over the whole image.
        variants=({"window_size": 32, "fullatt_block_indexes": [1]},),
        native=NativeTower(
            inputs=native_inputs,
            resize="smart_resize",
            finish=finish,
            reference=reference,
            sample=sample,
            row_width=row_width,
            # Qwen2.5-VL's preprocessor_config.json: a larger pixel budget than the
            # processor's default (28 x 28 x 1280).
            steps=(("max_pixels", 12845056),),
        ),
    )
)
