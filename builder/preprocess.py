"""Image files -> pixel values, step for step as HF transformers 5's PIL-based
`CLIPImageProcessorPil` (the `PilBackend`): RGB conversion, resize, center crop, rescale,
normalize.

Each step copies HF's arithmetic so the result is the same to the last float32 bit:
- RGB: an image with an alpha channel (or a palette transparency) is composited onto white,
  as transformers 5 does; transformers 4 dropped the alpha channel instead.
- resize: Pillow's `Image.resize` with the configured filter; the shortest-edge size is
  `int(size * long / short)`, truncated, as HF's `get_resize_output_image_size`.
- center crop: top/left offsets `(old - new) // 2`; zero padding where the image is smaller.
- rescale in float64, then float32; normalize `(x - mean) / std` in float32.
No EXIF orientation is applied (HF applies none either).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .config import PreprocessConfig
from .errors import InputError

if TYPE_CHECKING:
    from PIL import Image


def resample_filter(name: str) -> int:
    from PIL import Image

    return getattr(Image.Resampling, name.upper())


def open_image(path: str | Path) -> Image.Image:
    """Open an image file (header only; pixels are decoded by `load_image`). A missing or
    unreadable file is an `InputError` naming it."""
    from PIL import Image, UnidentifiedImageError

    try:
        return Image.open(path)
    except FileNotFoundError as e:
        raise InputError(f"{path}: no such image file") from e
    except UnidentifiedImageError as e:
        raise InputError(f"{path}: not an image Pillow can read") from e
    except OSError as e:
        raise InputError(f"{path}: cannot read: {e.strerror or e}") from e


def load_image(image: str | Path | Image.Image) -> Image.Image:
    """A decoded image: a path is opened and fully read (a truncated file fails here, with
    its name); a PIL image is used as it is."""
    from PIL import Image

    if isinstance(image, Image.Image):
        return image
    if not isinstance(image, (str, Path)):
        raise InputError(f"expected an image path or a PIL image, got {type(image).__name__}")
    img = open_image(image)
    try:
        img.load()
    except (OSError, ValueError, SyntaxError) as e:
        raise InputError(f"{image}: cannot decode the image: {e}") from e
    return img


def check_images(images: Sequence[Any]) -> None:
    """Every path exists and has an image header: all bad files reported at once, before any
    work starts."""
    from PIL import Image

    errors = []
    for image in images:
        if isinstance(image, Image.Image):
            continue
        try:
            if not isinstance(image, (str, Path)):
                raise InputError(
                    f"expected an image path or a PIL image, got {type(image).__name__}"
                )
            open_image(image).close()
        except InputError as e:
            errors.extend(e.lines)
    if errors:
        raise InputError(errors)


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB, with any transparency composited onto white (transformers 5's `convert_to_rgb`)."""
    from PIL import Image

    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def resize_shape(width: int, height: int, steps: PreprocessConfig) -> tuple[int, int]:
    """(height, width) after the resize."""
    size = steps.size
    if steps.resize == "square":
        return size, size
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(size * long / short)
    return (new_long, size) if width <= height else (size, new_long)


def longest_edge_shape(width: int, height: int, longest: int) -> tuple[int, int]:
    """(height, width) with the longest edge at `longest` and the other scaled, truncated and
    then rounded up to even (HF Idefics3's `_resize_output_size_rescale_to_max_len`)."""
    aspect = width / height
    if width >= height:
        width = longest
        height = int(width / aspect)
        height += height % 2
    else:
        height = longest
        width = int(height * aspect)
        width += width % 2
    return max(height, 1), max(width, 1)


def center_crop(pixels: np.ndarray, size: int) -> np.ndarray:
    """(C, H, W) -> (C, size, size) from the center, zero-padded where smaller (HF's rule)."""
    _, h, w = pixels.shape
    top, left = (h - size) // 2, (w - size) // 2
    if top >= 0 and left >= 0:
        return pixels[:, top : top + size, left : left + size]
    new_h, new_w = max(size, h), max(size, w)
    padded = np.zeros((pixels.shape[0], new_h, new_w), pixels.dtype)
    pad_top, pad_left = math.ceil((new_h - h) / 2), math.ceil((new_w - w) / 2)
    padded[:, pad_top : pad_top + h, pad_left : pad_left + w] = pixels
    top, left = top + pad_top, left + pad_left
    return padded[:, max(0, top) : min(new_h, top + size), max(0, left) : min(new_w, left + size)]


def rgb_image(image: str | Path | Image.Image, steps: PreprocessConfig, name: str) -> Image.Image:
    """The decoded image in RGB (`to_rgb`), or an `InputError` where it is not RGB and the
    steps do not convert it."""
    img = load_image(image)
    if steps.convert_rgb:
        return to_rgb(img)
    if img.mode != "RGB":
        raise InputError(f"{name}: mode {img.mode}, not RGB, and preprocess.convert_rgb is false")
    return img


def preprocess(
    image: str | Path | Image.Image, steps: PreprocessConfig, name: str = "image"
) -> np.ndarray:
    """One image -> float32 (3, H, W). `steps` must be resolved (sizes filled in)."""
    if steps.native:
        raise ValueError(
            f"resize {steps.resize!r} gives patches, not a fixed-size image: "
            "use builder.native_preprocess.native_patches"
        )
    img = rgb_image(image, steps, name)
    if steps.longest_edge:
        h, w = longest_edge_shape(img.width, img.height, steps.longest_edge)
        img = img.resize((w, h), resample=resample_filter(steps.resample))
    h, w = resize_shape(img.width, img.height, steps)
    img = img.resize((w, h), resample=resample_filter(steps.resample))
    pixels = np.moveaxis(np.asarray(img), -1, 0)  # (3, H, W) uint8
    if steps.center_crop:
        pixels = center_crop(pixels, steps.crop_size)
    return rescale_normalize(pixels, steps)


def rescale_normalize(pixels: np.ndarray, steps: PreprocessConfig) -> np.ndarray:
    """uint8 (3, H, W) -> float32: rescaled in float64, then `(x - mean) / std` in float32."""
    scaled = (pixels.astype(np.float64) * steps.rescale_factor).astype(np.float32)
    mean = np.asarray(steps.mean, np.float32)[:, None, None]
    std = np.asarray(steps.std, np.float32)[:, None, None]
    return (scaled - mean) / std


def preprocess_batch(
    images: Sequence[str | Path | Image.Image], steps: PreprocessConfig, first: int = 0
) -> np.ndarray:
    """Images -> float32 (N, 3, H, W). `first` is the index of the first image in the whole
    list, for naming PIL images in errors."""
    names = [image_name(img, first + i) for i, img in enumerate(images)]
    return np.stack([preprocess(img, steps, name) for img, name in zip(images, names, strict=True)])


def image_name(image: Any, index: int) -> str:
    """How an image is named in errors and in the record of a run."""
    return str(image) if isinstance(image, (str, Path)) else f"<image {index}>"


def steps_from_manifest(manifest: dict[str, Any]) -> PreprocessConfig:
    """The resolved preprocessing an artifact records."""
    return PreprocessConfig(**manifest["preprocess"])
