"""Resampling a learnt position grid to another grid size, once, at build time.

Towers with a learnt position table (DINOv2, DINOv2 with registers, InternViT, SigLIP2) were
trained at one image size. Run at another, HF transformers resizes the grid of patch
positions on every forward pass with `torch.nn.functional.interpolate`. The builder does the
same resize once, in numpy, and stores the result, so the compiled tower keeps fixed shapes
and needs no torch.

Every mode here is separable and linear: the output is `Wh @ grid @ Ww.T` per channel, with
one weight matrix per axis. The matrices follow PyTorch's CPU kernels
(`aten/src/ATen/native/cpu/UpSampleKernel.cpp`, `UpSample.h`). Where each output samples
the source is rounded to float32 as those kernels round it, since a shifted position shifts
every weight; the weights are then computed and applied in float64 and the result rounded to
float32 once. docs/weights.md gives the agreement measured against torch and HF.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np

from ..errors import InputError

Mode = Literal["bicubic", "bilinear"]
MODES = ("bicubic", "bilinear")


# The cubic convolution constant: OpenCV's -0.75 for plain bicubic, Keys' (and Pillow's)
# -0.5 for antialiased bicubic. PyTorch follows both, so antialias=True changes bicubic
# upsampling too, not only downsampling.
CUBIC_A = -0.75
CUBIC_A_ANTIALIAS = -0.5


def _cubic(x: np.ndarray, a: float) -> np.ndarray:
    """The cubic convolution kernel at offsets `x` (zero beyond 2)."""
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return np.where(x < 1, near, np.where(x < 2, far, 0.0))


def _triangle(x: np.ndarray) -> np.ndarray:
    return np.maximum(1.0 - np.abs(x), 0.0)


def _f32(x: np.ndarray | float) -> np.ndarray:
    """`x` rounded to float32, kept as float64."""
    return np.asarray(x, np.float64).astype(np.float32).astype(np.float64)


def _scale(n_in: int, n_out: int) -> float:
    # PyTorch divides the sizes in float32 for float32 input.
    return float(np.float32(n_in) / np.float32(n_out))


def _plain_weights(n_in: int, n_out: int, mode: Mode) -> np.ndarray:
    """`interpolate(mode, align_corners=False)` without antialias: a fixed number of taps
    (2 or 4) around each output's source position, taps past a border clamped onto it."""
    i = np.arange(n_out)
    # The source position scale * (i + 0.5) - 0.5, rounded to float32 once: PyTorch computes
    # it in float32, and its AVX2 / AVX-512 kernels fuse the multiply and the subtraction
    # (its baseline x86 kernels round twice).
    src = _f32(_scale(n_in, n_out) * (i + 0.5) - 0.5)
    weights = np.zeros((n_out, n_in))
    if mode == "bilinear":
        # Positions left of the first pixel's centre are clamped to it.
        src = np.maximum(src, 0.0)
        i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
        i1 = np.minimum(i0 + 1, n_in - 1)
        t = src - i0
        np.add.at(weights, (i, i0), 1.0 - t)
        np.add.at(weights, (i, i1), t)
        return weights
    base = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    t = np.clip(src - base, 0.0, 1.0)
    for k in range(-1, 3):
        index = np.clip(base + k, 0, n_in - 1)
        np.add.at(weights, (i, index), _cubic(k - t, CUBIC_A))
    return weights


def _antialias_weights(n_in: int, n_out: int, mode: Mode) -> np.ndarray:
    """`interpolate(mode, antialias=True)` (Pillow's scheme): when downsampling, the filter
    is stretched by the factor, so every source pixel contributes; the taps that fall
    outside the grid are dropped and each output's weights are renormalized to sum to 1."""
    if n_in == n_out:
        return np.eye(n_in)  # PyTorch skips an axis whose size does not change
    scale = _scale(n_in, n_out)
    half_width = 2.0 if mode == "bicubic" else 1.0
    stretch = max(scale, 1.0)
    support = _f32(half_width * stretch)
    # Each output's centre in source coordinates, rounded to float32 as PyTorch stores it.
    center = _f32(scale * (np.arange(n_out) + 0.5))
    # The taps: the source pixels within `support` of the centre, the bounds rounded as
    # PyTorch rounds them (a tap at the edge of the support can weigh a little over zero).
    lo = np.maximum(np.trunc(_f32(center - support) + 0.5), 0).astype(np.int64)
    hi = np.minimum(np.trunc(_f32(center + support) + 0.5), n_in).astype(np.int64)
    j = np.arange(n_in)
    x = (j[None, :] - center[:, None] + 0.5) / stretch
    weights = _cubic(x, CUBIC_A_ANTIALIAS) if mode == "bicubic" else _triangle(x)
    weights = np.where((j >= lo[:, None]) & (j < hi[:, None]), weights, 0.0)
    return weights / weights.sum(axis=1, keepdims=True)


def axis_weights(n_in: int, n_out: int, mode: Mode, antialias: bool = False) -> np.ndarray:
    """The (n_out, n_in) float64 matrix that resizes one axis as
    `torch.nn.functional.interpolate(mode=mode, align_corners=False, antialias=antialias)`
    does on CPU."""
    if mode not in MODES:
        raise ValueError(f"mode {mode!r} is not one of {list(MODES)}")
    if n_in < 1 or n_out < 1:
        raise ValueError(f"axis sizes must be positive, got {n_in} -> {n_out}")
    if antialias:
        return _antialias_weights(n_in, n_out, mode)
    return _plain_weights(n_in, n_out, mode)


def resample_grid(
    grid: np.ndarray, size: tuple[int, int], mode: Mode = "bicubic", antialias: bool = False
) -> np.ndarray:
    """Resize a (H0, W0, D) grid of vectors to (H, W, D) = `size` + (D,), as
    `interpolate(grid.permute(2, 0, 1)[None], size, mode=mode, align_corners=False,
    antialias=antialias)` does in float32 on CPU. Returns float32."""
    if grid.ndim != 3:
        raise ValueError(f"expected a (height, width, channels) grid, got shape {grid.shape}")
    h0, w0, _ = grid.shape
    h, w = size
    rows = axis_weights(h0, h, mode, antialias)  # (H, H0)
    cols = axis_weights(w0, w, mode, antialias)  # (W, W0)
    x = grid.astype(np.float64)
    x = np.einsum("hy,ywd->hwd", rows, x)  # (H, W0, D)
    x = np.einsum("wx,hxd->hwd", cols, x)  # (H, W, D)
    return x.astype(np.float32)


def resample_position_table(
    table: np.ndarray,
    size: tuple[int, int],
    *,
    prefix: int = 1,
    mode: Mode = "bicubic",
    antialias: bool = False,
    name: str = "position table",
) -> np.ndarray:
    """A position table as HF stores it, (1, prefix + G0*G0, D) or (prefix + G0*G0, D), with
    its grid rows resampled to `size` = (H, W): the `prefix` leading rows (the class token's)
    are kept as they are, the rest read as a row-major G0 x G0 grid. Returns the same layout,
    (.., prefix + H*W, D), float32. `name` is the tensor's name for the error message."""
    if table.ndim not in (2, 3) or (table.ndim == 3 and table.shape[0] != 1):
        raise InputError(
            f"{name}: shape {list(table.shape)} is not (positions, width) or (1, positions, width)"
        )
    rows = table.reshape(table.shape[-2:])
    positions = rows.shape[0] - prefix
    side = math.isqrt(max(positions, 0))
    if positions < 1 or side * side != positions:
        raise InputError(
            f"{name}: shape {list(table.shape)}: the {positions} rows after the {prefix} "
            "leading row(s) are not a square grid of positions"
        )
    grid = rows[prefix:].reshape(side, side, rows.shape[1])
    resized = resample_grid(grid, size, mode, antialias)
    out = np.concatenate([rows[:prefix].astype(np.float32), resized.reshape(-1, rows.shape[1])])
    return out.reshape(*table.shape[:-2], *out.shape)
