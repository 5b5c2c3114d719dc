"""Native-resolution preprocessing: one image -> as many patches as its size needs, step for
step as HF transformers 5's Pil processors, picked by `preprocess.resize`:

- "smart_resize": `Qwen2VLImageProcessorPil` (Qwen2-VL, Qwen2.5-VL). The image resized to
  multiples of patch_size x merge_size whose area lies between min_pixels and max_pixels
  (HF's `smart_resize`), rescaled and normalized, then cut into HF's `pixel_values` rows: the
  patches of each merge_size x merge_size block together, blocks row-major, each row the
  frame repeated temporal_patch_size times, (C, t, p, p) flattened; the grid is (1, h, w).
- "max_longest_edge": `PixtralImageProcessorPil`. An image whose longest edge exceeds `size`
  is scaled down to it (sides floored), each side then rounded up to whole patches; the
  pixels are HF's `pixel_values` (3, H, W), the patches (C, p, p) rows, row-major over the
  (h, w) grid.
- "max_num_patches": `Siglip2ImageProcessorPil` (SigLIP2 NaFlex). The largest scale whose
  sides, each rounded up to whole patches, hold at most max_num_patches patches (HF's binary
  search, `get_image_size_for_max_num_patches`); the patches are the valid rows of HF's
  `pixel_values`, (p, p, C) flattened, row-major over `spatial_shapes` (h, w).

RGB conversion, the resize filter and the rescale and normalize arithmetic are
`builder/preprocess.py`'s, so the results equal HF's to the last bit. Imports numpy and
Pillow only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .config import NATIVE_RESIZES, PreprocessConfig
from .errors import InputError
from .preprocess import resample_filter, rescale_normalize, rgb_image

if TYPE_CHECKING:
    from PIL import Image

# HF's smart_resize refuses images more elongated than this.
MAX_ASPECT_RATIO = 200


@dataclass
class NativeImage:
    """One image's patches, float32 (N, P), in the row order and layout its HF processor
    gives the model; `grid` the patch grid ((t, h, w) for smart_resize, (h, w) otherwise);
    `size` the resized image's (height, width) in pixels; `pixels` the resized image, float32
    (3, H, W), where the tower takes the image itself (Pixtral's `pixel_values`), else None."""

    patches: np.ndarray
    grid: tuple[int, ...]
    size: tuple[int, int]
    pixels: np.ndarray | None = None


def smart_resize(
    height: int, width: int, factor: int, min_pixels: int, max_pixels: int
) -> tuple[int, int]:
    """(height, width), multiples of `factor`, the area between min_pixels and max_pixels
    where the aspect ratio allows (HF Qwen2-VL's `smart_resize`; its refusal of an aspect
    ratio over 200 is in `qwen2_vl_patches`, which names the image)."""
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def max_longest_edge_shape(height: int, width: int, longest: int, patch: int) -> tuple[int, int]:
    """(height, width): scaled down (floored) when an edge exceeds `longest`, then each side
    rounded up to a multiple of `patch` (HF Pixtral's `get_resize_output_image_size`). A side
    floored to 0 stays 0."""
    ratio = max(height / longest, width / longest)
    if ratio > 1:
        height = int(math.floor(height / ratio))
        width = int(math.floor(width / ratio))
    return ((height - 1) // patch + 1) * patch, ((width - 1) // patch + 1) * patch


def max_num_patches_shape(
    height: int, width: int, patch: int, max_num_patches: int, eps: float = 1e-5
) -> tuple[int, int]:
    """(height, width), multiples of `patch`, at least one patch each: the largest scale (a
    binary search to `eps`) whose rounded-up sides hold at most max_num_patches patches (HF
    SigLIP2's `get_image_size_for_max_num_patches`)."""

    def scaled(scale: float, size: int) -> int:
        return int(max(patch, math.ceil(size * scale / patch) * patch))

    low, high = eps / 10, 100.0
    while (high - low) >= eps:
        scale = (low + high) / 2
        patches = (scaled(scale, height) / patch) * (scaled(scale, width) / patch)
        if patches <= max_num_patches:
            low = scale
        else:
            high = scale
    return scaled(low, height), scaled(low, width)


def square_grid(steps: PreprocessConfig, patch_size: int, merge_size: int = 2) -> tuple[int, int]:
    """The patch grid (rows, cols) of a square image larger than the rule's budget (steps
    resolved): the largest square image the tower gets, `build bench`'s default."""
    side = 1 << 14
    if steps.resize == "smart_resize":
        factor = patch_size * merge_size
        shape = smart_resize(side, side, factor, steps.min_pixels, steps.max_pixels)
    elif steps.resize == "max_longest_edge":
        shape = max_longest_edge_shape(side, side, steps.size, patch_size * merge_size)
    else:
        shape = max_num_patches_shape(side, side, patch_size, steps.max_num_patches)
    return shape[0] // patch_size, shape[1] // patch_size


def _resized(image: Image.Image, shape: tuple[int, int], steps: PreprocessConfig) -> np.ndarray:
    """The image resized to `shape` (height, width), rescaled and normalized: float32 (3, H, W)."""
    resized = image.resize((shape[1], shape[0]), resample=resample_filter(steps.resample))
    return rescale_normalize(np.moveaxis(np.asarray(resized), -1, 0), steps)


def qwen2_vl_patches(
    image: Image.Image,
    steps: PreprocessConfig,
    patch_size: int,
    merge_size: int,
    temporal_patch_size: int,
    name: str = "image",
) -> NativeImage:
    """A non-empty RGB image -> Qwen2-VL's `pixel_values` rows and `image_grid_thw`."""
    ratio = max(image.height, image.width) / min(image.height, image.width)
    if ratio > MAX_ASPECT_RATIO:
        raise InputError(
            f"{name}: {image.width} x {image.height} pixels, an aspect ratio of {ratio:.0f}:1; "
            f"preprocess.resize smart_resize takes at most {MAX_ASPECT_RATIO}:1 (as HF's)"
        )
    factor = patch_size * merge_size
    shape = smart_resize(image.height, image.width, factor, steps.min_pixels, steps.max_pixels)
    pixels = _resized(image, shape, steps)
    channels, gh, gw, m, p = (
        3,
        shape[0] // patch_size,
        shape[1] // patch_size,
        merge_size,
        patch_size,
    )
    blocks = pixels.reshape(channels, gh // m, m, p, gw // m, m, p)
    blocks = blocks.transpose(1, 4, 2, 5, 0, 3, 6)  # (gh/m, gw/m, m, m, C, p, p)
    frames = np.broadcast_to(
        blocks[:, :, :, :, :, None], (*blocks.shape[:5], temporal_patch_size, p, p)
    )  # (gh/m, gw/m, m, m, C, t, p, p)
    patches = frames.reshape(gh * gw, channels * temporal_patch_size * p * p)
    return NativeImage(patches, (1, gh, gw), shape)


def pixtral_patches(
    image: Image.Image,
    steps: PreprocessConfig,
    patch_size: int,
    name: str = "image",
    merge_size: int = 1,
) -> NativeImage:
    """A non-empty RGB image -> Pixtral's `pixel_values` (3, H, W) and its (C, p, p) patches.
    `steps.size` (resolved) is the longest edge; the sides are multiples of patch_size *
    merge_size (PixtralProcessor passes its spatial_merge_size: 2 in Mistral 3)."""
    multiple = patch_size * merge_size
    shape = max_longest_edge_shape(image.height, image.width, steps.size, multiple)
    if 0 in shape:
        raise InputError(
            f"{name}: {image.width} x {image.height} pixels: its shorter side falls to 0 "
            f"pixels when its longest edge is brought to preprocess.size {steps.size}"
        )
    pixels = _resized(image, shape, steps)
    gh, gw = shape[0] // patch_size, shape[1] // patch_size
    patches = pixels.reshape(3, gh, patch_size, gw, patch_size).transpose(1, 3, 0, 2, 4)
    # (gh, gw, C, p, p) -> (N, C*p*p)
    return NativeImage(patches.reshape(gh * gw, -1), (gh, gw), shape, pixels)


def siglip2_patches(
    image: Image.Image, steps: PreprocessConfig, patch_size: int, name: str = "image"
) -> NativeImage:
    """A non-empty RGB image -> SigLIP2's valid `pixel_values` rows ((p, p, C) each) and its
    `spatial_shapes` (h, w)."""
    shape = max_num_patches_shape(image.height, image.width, patch_size, steps.max_num_patches)
    gh, gw = shape[0] // patch_size, shape[1] // patch_size
    if gh * gw > steps.max_num_patches:  # the search's smallest scale is still too large
        raise InputError(
            f"{name}: {image.width} x {image.height} pixels: at least {gh * gw} patches, more "
            f"than preprocess.max_num_patches {steps.max_num_patches}"
        )
    pixels = _resized(image, shape, steps)
    patches = pixels.reshape(3, gh, patch_size, gw, patch_size).transpose(1, 3, 2, 4, 0)
    # (gh, gw, p, p, C) -> (N, p*p*C)
    return NativeImage(patches.reshape(gh * gw, -1), (gh, gw), shape)


def native_patches(
    image: str | Path | Image.Image,
    steps: PreprocessConfig,
    patch_size: int,
    merge_size: int = 2,
    temporal_patch_size: int = 2,
    name: str | None = None,
) -> NativeImage:
    """One image file or PIL image -> its patches by the native rule `steps.resize` names
    (steps resolved). `merge_size` is read by smart_resize and max_longest_edge (sides
    multiples of patch_size * merge_size; 1 for a Pixtral tower without Mistral 3's merger),
    `temporal_patch_size` by smart_resize only. A missing, unreadable or empty image is an
    `InputError` naming it (`name`, else the path or "image")."""
    if name is None:
        name = str(image) if isinstance(image, (str, Path)) else "image"
    if steps.resize not in NATIVE_RESIZES:
        raise ValueError(f"resize {steps.resize!r} is not one of {list(NATIVE_RESIZES)}")
    img = rgb_image(image, steps, name)
    if img.width == 0 or img.height == 0:
        raise InputError(f"{name}: an empty image ({img.width} x {img.height} pixels)")
    if steps.resize == "smart_resize":
        return qwen2_vl_patches(img, steps, patch_size, merge_size, temporal_patch_size, name)
    if steps.resize == "max_longest_edge":
        return pixtral_patches(img, steps, patch_size, name, merge_size)
    return siglip2_patches(img, steps, patch_size, name)
