"""Position grids resampled at build time (builder/weights/resample.py): against
`torch.nn.functional.interpolate` for every mode, and against HF's own run-time resizing of a
randomly initialized tiny DINOv2, DINOv2 with registers, InternViT and SigLIP2."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from builder.errors import InputError
from builder.weights.resample import (
    axis_weights,
    resample_grid,
    resample_position_table,
)

from .conftest import randomize

pytestmark = pytest.mark.unit

# Max abs error allowed, relative to max|input|. PyTorch's AVX2 and AVX-512 kernels round an
# output's source position once (a fused multiply-add), as resample.py does; its baseline
# kernels (ATEN_CPU_CAPABILITY=default) round it twice and differ from the AVX ones by more
# than 1e-6 themselves, so another build gets a looser bound (docs/weights.md).
FUSED = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
TOL = 1e-6 if FUSED else 1e-5

METHODS = [("bicubic", False), ("bicubic", True), ("bilinear", True), ("bilinear", False)]
SIZES = [
    ((37, 37), (16, 16)),  # down
    ((16, 16), (37, 37)),  # up
    ((32, 32), (32, 32)),  # identity
    ((27, 27), (24, 36)),  # down one axis, up the other
    ((7, 5), (3, 9)),  # a non-square source
]

# How each HF tower resizes its position grid at another image size (its
# interpolate_pos_encoding): the mode and whether it antialiases, by `model_type`.
HF_RESAMPLING = {
    "dinov2": ("bicubic", False),
    "dinov2_with_registers": ("bicubic", True),
    "internvl_vision": ("bicubic", False),
    "siglip2_vision_model": ("bilinear", True),
}


def _ids(method: tuple[str, bool]) -> str:
    return f"{method[0]}{'-aa' if method[1] else ''}"


def _interpolate(grid: np.ndarray, size: tuple[int, int], mode: str, antialias: bool):
    """torch on the layout HF uses: (1, D, H0, W0), permuted from (H0, W0, D)."""
    x = torch.from_numpy(grid).permute(2, 0, 1)[None]
    out = F.interpolate(x, size=size, mode=mode, align_corners=False, antialias=antialias)
    return out[0].permute(1, 2, 0).numpy()


def _relative_error(ours: np.ndarray, ref: np.ndarray, scale: float) -> float:
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    assert ours.dtype == np.float32
    return float(np.max(np.abs(ours - ref))) / scale


@pytest.mark.parametrize("channels", [3, 64])
@pytest.mark.parametrize("src,dst", SIZES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("method", METHODS, ids=_ids)
def test_matches_torch_interpolate(method, src, dst, channels):
    mode, antialias = method
    grid = np.random.default_rng(0).standard_normal((*src, channels)).astype(np.float32)
    ours = resample_grid(grid, dst, mode, antialias)
    ref = _interpolate(grid, dst, mode, antialias)
    err = _relative_error(ours, ref, float(np.max(np.abs(grid))))
    assert err <= TOL, f"max abs error {err:.3g} x max|input| > {TOL}"


@pytest.mark.parametrize("method", METHODS, ids=_ids)
def test_same_size_is_exact(method):
    grid = np.random.default_rng(1).standard_normal((32, 32, 8)).astype(np.float32)
    assert np.array_equal(resample_grid(grid, (32, 32), *method), grid)
    np.testing.assert_array_equal(axis_weights(9, 9, *method), np.eye(9))


@pytest.mark.parametrize("method", METHODS, ids=_ids)
@pytest.mark.parametrize("n_in,n_out", [(37, 16), (16, 37), (5, 64), (64, 5), (2, 1), (1, 3)])
def test_weights_sum_to_one(method, n_in, n_out):
    """Every output is an affine combination of the source pixels (a constant grid stays
    constant), the borders included."""
    weights = axis_weights(n_in, n_out, *method)
    assert weights.shape == (n_out, n_in)
    np.testing.assert_allclose(weights.sum(axis=1), 1.0, rtol=0, atol=1e-12)


def test_antialias_changes_bicubic_upsampling_but_not_bilinear():
    """Antialiased bicubic uses Keys' a = -0.5 (Pillow's), plain bicubic a = -0.75
    (OpenCV's): they differ even when upsampling. Antialiased bilinear upsampling is plain
    bilinear."""
    grid = np.random.default_rng(2).standard_normal((8, 8, 4)).astype(np.float32)
    for ours in (resample_grid, _interpolate):
        plain = ours(grid, (16, 16), "bicubic", False)
        smooth = ours(grid, (16, 16), "bicubic", True)
        assert np.max(np.abs(plain - smooth)) > 1e-2
        linear = ours(grid, (16, 16), "bilinear", False)
        linear_aa = ours(grid, (16, 16), "bilinear", True)
        assert np.max(np.abs(linear - linear_aa)) <= 1e-6


def _hf_tower(family: str, seed: int = 0):
    """A tiny HF tower of `family` with every parameter random (its position table too),
    and its embeddings module."""
    import transformers as tf

    fields = dict(
        hidden_size=32,
        num_attention_heads=2,
        num_hidden_layers=1,
        intermediate_size=64,
        patch_size=4,
        image_size=28,  # a 7 x 7 grid of positions
    )
    config_class, model_class = {
        "dinov2": (tf.Dinov2Config, tf.Dinov2Model),
        "dinov2_with_registers": (tf.Dinov2WithRegistersConfig, tf.Dinov2WithRegistersModel),
        "internvl_vision": (tf.InternVLVisionConfig, tf.InternVLVisionModel),
    }[family]
    config = config_class(**fields)
    assert config.model_type == family
    model = randomize(model_class(config), seed)
    return model, model.embeddings


@pytest.mark.parity
@pytest.mark.parametrize("image", [(44, 44), (16, 16), (44, 32), (28, 28)], ids=str)
@pytest.mark.parametrize("family", ["dinov2", "dinov2_with_registers", "internvl_vision"])
def test_position_table_matches_hf(family, image):
    """The whole table as HF stores it, (1, 1 + 7*7, D), against the embeddings'
    `interpolate_pos_encoding(embeddings, height, width)` that HF's forward calls for an
    image of that size."""
    model, embeddings = _hf_tower(family)
    table = embeddings.position_embeddings.detach().numpy()
    assert table.shape == (1, 1 + 7 * 7, 32) and np.abs(table).max() > 0
    height, width = image
    grid = (height // 4, width // 4)
    tokens = torch.zeros(1, 1 + grid[0] * grid[1], 32)  # only its shape is read
    with torch.no_grad():
        ref = embeddings.interpolate_pos_encoding(tokens, height, width).numpy()

    mode, antialias = HF_RESAMPLING[model.config.model_type]
    name = "embeddings.position_embeddings"
    ours = resample_position_table(table, grid, prefix=1, mode=mode, antialias=antialias, name=name)
    assert ours.shape == ref.shape == (1, 1 + grid[0] * grid[1], 32)
    np.testing.assert_array_equal(ours[:, :1], table[:, :1])  # the class token's row
    if grid == (7, 7):  # HF returns the table itself
        np.testing.assert_array_equal(ours, table)
    err = _relative_error(ours, ref, float(np.abs(table).max()))
    assert err <= TOL, f"max abs error {err:.3g} x max|table| > {TOL}"


@pytest.mark.parity
@pytest.mark.parametrize("grid", [(11, 11), (4, 4), (11, 8)], ids=str)
def test_siglip2_grid_matches_hf(grid):
    """SigLIP2's table has no class row: (G0*G0, D), resized per image by
    `Siglip2VisionEmbeddings.resize_positional_embeddings`."""
    from transformers import Siglip2VisionConfig, Siglip2VisionModel

    config = Siglip2VisionConfig(
        hidden_size=32,
        num_attention_heads=2,
        num_hidden_layers=1,
        intermediate_size=64,
        patch_size=4,
        num_patches=49,  # a 7 x 7 grid of positions
    )
    model = randomize(Siglip2VisionModel(config))
    embeddings = model.embeddings
    table = embeddings.position_embedding.weight.detach()
    with torch.no_grad():
        ref = embeddings.resize_positional_embeddings(
            table.reshape(7, 7, 32), torch.tensor([grid]), max_length=grid[0] * grid[1]
        )[0].numpy()

    mode, antialias = HF_RESAMPLING[config.model_type]
    ours = resample_position_table(table.numpy(), grid, prefix=0, mode=mode, antialias=antialias)
    err = _relative_error(ours, ref, float(table.abs().max()))
    assert err <= TOL, f"max abs error {err:.3g} x max|table| > {TOL}"


@pytest.mark.parametrize("shape", [(1, 51, 8), (51, 8)])
def test_non_square_grid_is_an_input_error(shape):
    table = np.zeros(shape, np.float32)
    with pytest.raises(InputError) as info:
        resample_position_table(table, (4, 4), name="embeddings.position_embeddings")
    assert str(info.value) == (
        f"embeddings.position_embeddings: shape {list(shape)}: the 50 rows after the 1 "
        "leading row(s) are not a square grid of positions"
    )


def test_table_of_another_rank_is_an_input_error():
    with pytest.raises(InputError, match=r"^pos: shape \[2, 50, 8\] is not"):
        resample_position_table(np.zeros((2, 50, 8), np.float32), (4, 4), name="pos")


def test_two_dimensional_table_keeps_its_layout():
    table = np.random.default_rng(3).standard_normal((1 + 49, 8)).astype(np.float32)
    out = resample_position_table(table, (3, 5))
    assert out.shape == (1 + 15, 8)
    np.testing.assert_array_equal(out[0], table[0])
    grid = resample_grid(table[1:].reshape(7, 7, 8), (3, 5))
    np.testing.assert_array_equal(out[1:], grid.reshape(15, 8))
