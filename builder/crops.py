"""Crop schemes, cut on the host around a fixed-size artifact: one image -> a batch of crops
of the tower's size, and the crops' features -> the one sequence HF's `get_image_features`
gives the language model.

LLaVA-NeXT's anyres (`preprocess.image_grid_pinpoints`), step for step as HF transformers 5's
`LlavaNextImageProcessorPil` and `LlavaNextModel.pack_image_features`:
- the best resolution among the pinpoints (`select_best_resolution`: the most effective
  pixels, then the least waste); the image resized into it keeping its aspect ratio (sides
  ceiled, bicubic), centred on black, cut into tiles of the tower's size, row-major; the
  whole image resized to the tower's square goes first; each crop then through the preset's
  steps (resize, crop, rescale, normalize);
- packing: the base crop's tokens, then the tiles' patch grids joined into one grid, its
  padding rows or columns removed (`unpad_image`), the newline vector appended to each row,
  row-major.

LLaVA-OneVision's `anyres_max_N` (`preprocess.vision_aspect_ratio`) adds, as its
`pack_image_features`, a bilinear downscale of a grid larger than N tiles before the
newlines go in.

InternVL's dynamic tiles (`preprocess.crop_to_patches`, as `GotOcr2ImageProcessorPil`) and
Idefics3's image splitting (`preprocess.do_image_splitting`, as `Idefics3ImageProcessorPil`)
give an image's crops, tiles first and the whole image last; the image's sequence is its
crops' tokens in that order, as their `get_image_features` give them.

Imports numpy and Pillow only.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from .config import PreprocessConfig
from .errors import InputError

if TYPE_CHECKING:
    from PIL import Image


@dataclass
class Crops:
    """One image's crops: float32 (n, 3, S, S), its size (height, width) after RGB, and the
    tile grid (rows, columns)."""

    pixels: np.ndarray
    size: tuple[int, int]
    grid: tuple[int, int]


def select_best_resolution(size: tuple[int, int], pinpoints: list[list[int]]) -> tuple[int, int]:
    """(height, width) of the pinpoint that keeps the most of the image's pixels, then wastes
    the fewest (HF's `select_best_resolution`)."""
    height, width = size
    best, most, least = (0, 0), 0, math.inf
    for h, w in pinpoints:
        scale = min(w / width, h / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        wasted = w * h - effective
        if effective > most or (effective == most and wasted < least):
            best, most, least = (h, w), effective, wasted
    return best


def _fit(size: tuple[int, int], target: tuple[int, int]) -> tuple[int, int]:
    """(height, width) of the image resized into `target`, aspect kept, sides ceiled (HF's
    `get_patch_output_size`)."""
    (height, width), (th, tw) = size, target
    if tw / width < th / height:
        return min(math.ceil(height * tw / width), th), tw
    return th, min(math.ceil(width * th / height), tw)


def anyres_crops(image: Image.Image, steps: PreprocessConfig, side: int, name: str) -> Crops:
    """An RGB PIL image -> its crops, each through `steps` (resolved)."""
    from PIL import Image

    from . import preprocess

    size = (image.height, image.width)
    best = select_best_resolution(size, steps.image_grid_pinpoints)
    if best == (0, 0):  # no pinpoint keeps a pixel of it (HF's processor fails)
        raise InputError(
            f"{name}: {image.width} x {image.height} pixels is too small for "
            "preprocess.image_grid_pinpoints: no pinpoint keeps any of its pixels"
        )
    h, w = _fit(size, best)
    resample = preprocess.resample_filter(steps.resample)
    canvas = np.zeros((best[0], best[1], 3), np.uint8)
    top, left = (best[0] - h) // 2, (best[1] - w) // 2
    canvas[top : top + h, left : left + w] = np.asarray(image.resize((w, h), resample=resample))
    rows, cols = best[0] // side, best[1] // side
    tiles = [
        Image.fromarray(canvas[r * side : (r + 1) * side, c * side : (c + 1) * side])
        for r in range(rows)
        for c in range(cols)
    ]
    base = image.resize((side, side), resample=resample)
    pixels = [preprocess.preprocess(crop, steps, name) for crop in [base, *tiles]]
    return Crops(np.stack(pixels), size, (rows, cols))


def optimal_canvas(size: tuple[int, int], side: int, least: int, most: int) -> tuple[int, int]:
    """(columns, rows) of InternVL's tile grid: the arrangement of least..most tiles whose
    aspect ratio is closest to the image's; on a tie the later (more tiles) wins while the
    image covers more than half of it (HF's `get_optimal_tiled_canvas`)."""
    height, width = size
    grids = sorted(
        ((w, h) for w in range(1, most + 1) for h in range(1, most + 1) if least <= w * h <= most),
        key=lambda g: g[0] * g[1],
    )
    aspect, area = width / height, width * height
    best, best_diff = (1, 1), math.inf
    for grid in grids:
        diff = abs(aspect - grid[0] / grid[1])
        if diff < best_diff:
            best, best_diff = grid, diff
        elif diff == best_diff and area > 0.5 * side * side * grid[0] * grid[1]:
            best = grid
    return best


def _tiles(image: Image.Image, rows: int, cols: int, side: int) -> list[Image.Image]:
    """The rows x cols tiles of an image of exactly that many tiles, row-major."""
    return [
        image.crop((c * side, r * side, (c + 1) * side, (r + 1) * side))
        for r in range(rows)
        for c in range(cols)
    ]


def dynamic_tiles(image: Image.Image, steps: PreprocessConfig, side: int, name: str) -> Crops:
    """InternVL's crops (HF GotOcr2ImageProcessorPil with crop_to_patches): the tiles of the
    closest grid, then the whole image as a thumbnail when there is more than one tile."""
    from . import preprocess

    size = (image.height, image.width)
    cols, rows = optimal_canvas(size, side, steps.min_patches, steps.max_patches)
    resample = preprocess.resample_filter(steps.resample)
    crops = _tiles(image.resize((cols * side, rows * side), resample=resample), rows, cols, side)
    if len(crops) > 1:
        crops.append(image.resize((side, side), resample=resample))
    pixels = [preprocess.preprocess(crop, steps, name) for crop in crops]
    return Crops(np.stack(pixels), size, (rows, cols))


def split_tiles(image: Image.Image, steps: PreprocessConfig, side: int, name: str) -> Crops:
    """Idefics3's crops (HF Idefics3ImageProcessorPil with do_image_splitting): after the
    longest-edge resize, the image resized up to whole tiles (`resize_for_vision_encoder`),
    its tiles, then the whole image at the tile's size when there is more than one."""
    from . import preprocess

    resample = preprocess.resample_filter(steps.resample)
    size = (image.height, image.width)
    if steps.longest_edge:
        h, w = preprocess.longest_edge_shape(image.width, image.height, steps.longest_edge)
        image = image.resize((w, h), resample=resample)
    height, width = image.height, image.width
    aspect = width / height
    if width >= height:
        width = math.ceil(width / side) * side
        height = math.ceil(int(width / aspect) / side) * side
    else:
        height = math.ceil(height / side) * side
        width = math.ceil(int(height * aspect) / side) * side
    image = image.resize((width, height), resample=resample)
    rows, cols = height // side, width // side
    crops = _tiles(image, rows, cols, side) if rows * cols > 1 else [image]
    if len(crops) > 1:
        crops.append(image.resize((side, side), resample=resample))
    # The crops are tiles already: only rescaled and normalized.
    tile = dataclasses.replace(steps, longest_edge=None)
    pixels = [preprocess.preprocess(crop, tile, name) for crop in crops]
    return Crops(np.stack(pixels), size, (rows, cols))


def cut(image: Image.Image, steps: PreprocessConfig, side: int, name: str) -> Crops:
    """An RGB image -> its crops under the preset's scheme (`scheme`)."""
    if steps.image_grid_pinpoints:
        return anyres_crops(image, steps, side, name)
    if steps.crop_to_patches:
        return dynamic_tiles(image, steps, side, name)
    return split_tiles(image, steps, side, name)


def scheme(steps: PreprocessConfig) -> str | None:
    """The preset's crop scheme, or None for one crop per image."""
    if steps.image_grid_pinpoints:
        return "anyres"
    if steps.crop_to_patches and steps.max_patches > 1:
        return "dynamic_tiles"
    if steps.do_image_splitting:
        return "image_splitting"
    return None


def most_crops(steps: PreprocessConfig, side: int) -> int | None:
    """The most crops the preset's scheme cuts from one image: the largest grid and the
    whole image beside it (anyres: the base crop and the largest pinpoint's tiles; dynamic
    tiles: max_patches and the thumbnail; image splitting: the longest edge's tiles squared
    and the whole image). None for one crop per image, or image splitting without a
    longest edge (no bound)."""
    kind = scheme(steps)
    if kind == "anyres":
        return 1 + max((h // side) * (w // side) for h, w in steps.image_grid_pinpoints)
    if kind == "dynamic_tiles":
        return steps.max_patches + 1
    if kind == "image_splitting" and steps.longest_edge:
        tiles = math.ceil(steps.longest_edge / side) ** 2
        return tiles + 1 if tiles > 1 else 1
    return None


def unpadded(rows: int, cols: int, size: tuple[int, int]) -> tuple[slice, slice]:
    """The rows and columns of a (rows, cols) grid that hold the image rather than the
    padding around it (HF's `unpad_image`, its rounding included)."""
    height, width = size
    if width / height > cols / rows:
        new = int(round(height * (cols / width), 7))
        pad = (rows - new) // 2
        return slice(pad, rows - pad), slice(0, cols)
    new = int(round(width * (rows / height), 7))
    pad = (cols - new) // 2
    return slice(0, rows), slice(pad, cols - pad)


def max_tiles(vision_aspect_ratio: str | None) -> int:
    """N of LLaVA-OneVision's "anyres_max_N"; 0 for None."""
    return int(vision_aspect_ratio.removeprefix("anyres_max_")) if vision_aspect_ratio else 0


def _downscaled(grid: np.ndarray, tiles: int, grid_side: int) -> np.ndarray:
    """OneVision's limit: a (H, W, D) grid of more than `tiles` tiles' patches (its sides
    over the limit's by more than 1.1) resized down bilinearly, as torch's `interpolate`
    (HF's `pack_image_features`, the sizes floored as it floors them)."""
    from .weights.resample import resample_grid

    height, width = grid.shape[:2]
    ratio = math.sqrt(height * width / (tiles * grid_side**2))
    if ratio <= 1.1:
        return grid
    size = (int(height // ratio), int(width // ratio))
    return resample_grid(grid, size, "bilinear", False)


def pack_anyres(
    features: np.ndarray,
    crops: Crops,
    grid_side: int,
    newline: np.ndarray,
    name: str,
    limit: int = 0,
) -> np.ndarray:
    """The crops' features (n, grid_side^2, W), base first -> (tokens, W): the base crop's
    tokens, then the unpadded grid of the tiles (downscaled past `limit` tiles, for
    OneVision) with the newline after each row."""
    base, tiles = features[0], features[1:]
    width = features.shape[-1]
    if not len(tiles):
        return np.concatenate([base, newline[None]])
    rows, cols = crops.grid
    grid = tiles.reshape(rows, cols, grid_side, grid_side, width)
    grid = grid.transpose(0, 2, 1, 3, 4).reshape(rows * grid_side, cols * grid_side, width)
    keep_rows, keep_cols = unpadded(rows * grid_side, cols * grid_side, crops.size)
    grid = grid[keep_rows, keep_cols]
    if not grid.shape[0] or not grid.shape[1]:
        raise InputError(
            f"{name}: {crops.size[1]} x {crops.size[0]} pixels is too small for "
            "preprocess.image_grid_pinpoints: its grid keeps no row or column of patches"
        )
    if limit:
        grid = _downscaled(grid, limit, grid_side)
    lines = np.broadcast_to(newline, (grid.shape[0], 1, width))
    grid = np.concatenate([grid, lines], axis=1).reshape(-1, width)  # rows, newline each
    return np.concatenate([base, grid])
