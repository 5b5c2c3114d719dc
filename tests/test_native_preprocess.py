"""Native-resolution preprocessing against HF transformers 5's Pil processors of Qwen2-VL,
Pixtral and SigLIP2 on image files made with Pillow: the same patches bit for bit (the same
Pillow resize and the same float64 rescale and float32 normalize, then only reshapes), the
same grids."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from PIL import Image

from builder.config import PreprocessConfig
from builder.errors import InputError
from builder.native_preprocess import native_patches
from builder.preprocess import preprocess

from .conftest import REPO
from .test_preprocess import photo

pytestmark = pytest.mark.parity

IMAGES = [
    (37, 53, "RGB"),  # below min_pixels: scaled up
    (300, 97, "RGB"),  # wide, odd sides
    (1000, 700, "RGB"),  # beyond every budget below: scaled down
    (61, 45, "RGBA"),  # transparency onto white
    (90, 31, "P"),  # palette
    (1, 1, "L"),  # one grayscale pixel
]

QWEN = PreprocessConfig(
    resize="smart_resize", center_crop=False, min_pixels=56 * 56, max_pixels=28 * 28 * 64
)
PIXTRAL = PreprocessConfig(resize="max_longest_edge", center_crop=False, size=256)
SIGLIP2 = PreprocessConfig(
    resize="max_num_patches",
    center_crop=False,
    max_num_patches=64,
    resample="bilinear",
    mean=[0.5] * 3,
    std=[0.5] * 3,
)


@pytest.fixture(params=IMAGES, ids=lambda s: f"{s[0]}x{s[1]}-{s[2]}")
def image_file(request, tmp_path):
    width, height, mode = request.param
    path = tmp_path / f"{width}x{height}.png"
    photo(width, height, mode).save(path)
    return path


def hf_kwargs(steps: PreprocessConfig) -> dict:
    return {
        "resample": getattr(Image.Resampling, steps.resample.upper()),
        "rescale_factor": steps.rescale_factor,
        "image_mean": steps.mean,
        "image_std": steps.std,
        # Siglip2ImageProcessorPil does not convert by default (a grayscale image fails there).
        "do_convert_rgb": steps.convert_rgb,
    }


@pytest.mark.parametrize("patch, merge, temporal", [(14, 2, 2), (16, 2, 1), (14, 1, 2)])
def test_smart_resize_equals_qwen2_vl(image_file, patch, merge, temporal):
    from transformers import Qwen2VLImageProcessorPil

    hf = Qwen2VLImageProcessorPil(
        min_pixels=QWEN.min_pixels,
        max_pixels=QWEN.max_pixels,
        patch_size=patch,
        merge_size=merge,
        temporal_patch_size=temporal,
        **hf_kwargs(QWEN),
    )
    ref = hf(Image.open(image_file), return_tensors="np")
    ours = native_patches(image_file, QWEN, patch, merge_size=merge, temporal_patch_size=temporal)
    assert ours.grid == tuple(ref["image_grid_thw"][0])
    assert ours.size == (ours.grid[1] * patch, ours.grid[2] * patch)
    assert ours.patches.dtype == np.float32
    assert (
        ours.patches.shape
        == ref["pixel_values"].shape
        == (
            ours.grid[1] * ours.grid[2],
            3 * temporal * patch * patch,
        )
    )
    assert np.array_equal(ours.patches, ref["pixel_values"])
    assert ours.pixels is None


def test_max_longest_edge_equals_pixtral(image_file):
    from transformers import PixtralImageProcessorPil

    patch = 16
    hf = PixtralImageProcessorPil(
        size={"longest_edge": PIXTRAL.size},
        patch_size={"height": patch, "width": patch},
        **hf_kwargs(PIXTRAL),
    )
    ref = hf(Image.open(image_file), return_tensors="np")
    ours = native_patches(image_file, PIXTRAL, patch, merge_size=1)
    assert ours.size == tuple(ref["image_sizes"][0])
    assert ours.grid == (ours.size[0] // patch, ours.size[1] // patch)
    assert max(ours.size) <= PIXTRAL.size
    assert np.array_equal(ours.pixels, ref["pixel_values"][0])
    # The patches are the pixels cut row-major into (C, p, p) blocks (Pixtral's patch conv).
    gh, gw = ours.grid
    i, j = gh - 1, gw // 2
    block = ref["pixel_values"][0][:, i * patch : (i + 1) * patch, j * patch : (j + 1) * patch]
    assert ours.patches.shape == (gh * gw, 3 * patch * patch)
    assert np.array_equal(ours.patches[i * gw + j], block.reshape(-1))


def test_max_num_patches_equals_siglip2(image_file):
    from transformers import Siglip2ImageProcessorPil

    patch = 16
    hf = Siglip2ImageProcessorPil(
        patch_size=patch, max_num_patches=SIGLIP2.max_num_patches, **hf_kwargs(SIGLIP2)
    )
    ref = hf(Image.open(image_file), return_tensors="np")
    ours = native_patches(image_file, SIGLIP2, patch)
    n = int(ref["pixel_attention_mask"][0].sum())
    assert ours.grid == tuple(ref["spatial_shapes"][0])
    assert ours.patches.shape == (n, patch * patch * 3) == (ours.grid[0] * ours.grid[1], 768)
    assert n <= SIGLIP2.max_num_patches
    assert np.array_equal(ours.patches, ref["pixel_values"][0][:n])


def test_a_pil_image_equals_its_file(tmp_path):
    img = photo(300, 97, "RGB")
    img.save(tmp_path / "a.png")
    for steps in (QWEN, PIXTRAL, SIGLIP2):
        assert np.array_equal(
            native_patches(img, steps, 14).patches,
            native_patches(tmp_path / "a.png", steps, 14).patches,
        )


@pytest.mark.unit
@pytest.mark.parametrize("steps", [QWEN, PIXTRAL, SIGLIP2], ids=lambda s: s.resize)
def test_empty_or_unreadable_images_are_input_errors(tmp_path, steps):
    with pytest.raises(InputError, match=r"^empty\.png: an empty image \(0 x 5 pixels\)$"):
        native_patches(Image.new("RGB", (0, 5)), steps, 14, name="empty.png")
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(InputError, match="bad.png: not an image Pillow can read"):
        native_patches(tmp_path / "bad.png", steps, 14)
    with pytest.raises(InputError, match="gone.png: no such image file"):
        native_patches(tmp_path / "gone.png", steps, 14)


@pytest.mark.unit
def test_too_elongated_for_smart_resize():
    from transformers import Qwen2VLImageProcessorPil

    img = photo(201, 1, "RGB")
    with pytest.raises(ValueError, match="aspect ratio must be smaller than 200"):
        Qwen2VLImageProcessorPil()(img, return_tensors="np")
    with pytest.raises(
        InputError,
        match=r"^line\.png: 201 x 1 pixels, an aspect ratio of 201:1; preprocess\.resize "
        r"smart_resize takes at most 200:1 \(as HF's\)$",
    ):
        native_patches(img, QWEN, 14, name="line.png")
    at_most = photo(200, 1, "RGB")
    hf = Qwen2VLImageProcessorPil(
        min_pixels=QWEN.min_pixels, max_pixels=QWEN.max_pixels, **hf_kwargs(QWEN)
    )
    ref = hf(at_most, return_tensors="np")
    assert native_patches(at_most, QWEN, 14).grid == tuple(ref["image_grid_thw"][0])


@pytest.mark.unit
def test_too_elongated_for_max_longest_edge():
    img = photo(1, 300, "RGB")  # the 1-pixel side floors to 0 at 256 / 300
    with pytest.raises(
        InputError,
        match=r"^line\.png: 1 x 300 pixels: its shorter side falls to 0 pixels when its "
        r"longest edge is brought to preprocess\.size 256$",
    ):
        native_patches(img, PIXTRAL, 16, merge_size=1, name="line.png")
    assert native_patches(photo(1, 256, "RGB"), PIXTRAL, 16, merge_size=1).grid == (16, 1)


@pytest.mark.unit
def test_fixed_size_and_native_entry_points_refuse_each_other():
    with pytest.raises(ValueError, match="use builder.native_preprocess.native_patches"):
        preprocess(photo(8, 8, "RGB"), dataclasses.replace(QWEN, size=8, crop_size=8))
    with pytest.raises(ValueError, match=r"resize 'square' is not one of \['smart_resize'"):
        native_patches(photo(8, 8, "RGB"), PreprocessConfig(resize="square"), 14)


def _fixed_size_tower_refuses(rule: str) -> str:
    """What `build check` says of a native resize rule on clip-vit-b-32."""
    from builder import families

    natives = ", ".join(f.name for f in families.all_families() if f.native)
    return (
        f"override 'preprocess.resize={rule}': preprocess.resize: '{rule}', but the clip tower "
        "takes images of model.image_size: the native rules (smart_resize, max_longest_edge, "
        f"max_num_patches) are for the native-resolution families ({natives})"
    )


@pytest.mark.unit
@pytest.mark.parametrize(
    "overrides, errors",
    [
        (
            ["preprocess.resize=smart_resize", "preprocess.center_crop=false"]
            + ["preprocess.min_pixels=5000", "preprocess.max_pixels=4000"],
            [
                "override 'preprocess.min_pixels=5000': preprocess.min_pixels: 5000 is more "
                "than preprocess.max_pixels 4000",
                _fixed_size_tower_refuses("smart_resize"),
            ],
        ),
        (
            ["preprocess.resize=max_num_patches"],
            [
                _fixed_size_tower_refuses("max_num_patches"),
                f"{REPO / 'presets' / 'clip-vit-b-32.yaml'}:2: preprocess.center_crop: a step "
                "for images of a fixed size, but resize 'max_num_patches' keeps the image's "
                "own size in patches: set center_crop: false",
            ],
        ),
        (
            ["preprocess.resize=smart_resize", "preprocess.center_crop=false"]
            + ["preprocess.size=448", "preprocess.longest_edge=896"],
            [
                "override 'preprocess.longest_edge=896': preprocess.longest_edge: a step for "
                "images of a fixed size, but resize 'smart_resize' keeps the image's own size "
                "in patches: set longest_edge: null",
                _fixed_size_tower_refuses("smart_resize"),
                "override 'preprocess.size=448': preprocess.size: not read by resize "
                "'smart_resize' (its budget is min_pixels and max_pixels): set size: null",
            ],
        ),
        (
            ["preprocess.max_num_patches=1024"],
            [
                "override 'preprocess.max_num_patches=1024': preprocess.max_num_patches: read "
                "by resize: max_num_patches only, but preprocess.resize is 'shortest_edge'"
            ],
        ),
        (
            ["preprocess.resize=max_lonest_edge"],
            [
                "override 'preprocess.resize=max_lonest_edge': preprocess.resize: "
                "'max_lonest_edge' is not one of ['shortest_edge', 'square', 'smart_resize', "
                "'max_longest_edge', 'max_num_patches'], did you mean 'max_longest_edge'?"
            ],
        ),
    ],
)
def test_preset_checks(capsys, overrides, errors):
    from builder.cli import main

    assert main(["check", "clip-vit-b-32", *overrides]) == 2
    assert capsys.readouterr().err.strip().splitlines() == errors


@pytest.mark.unit
@pytest.mark.parametrize(
    "overrides",
    [
        ["mistral-small-3-1-24b-instruct", "preprocess.size=1024"],
        ["siglip2-so400m-patch16-naflex", "preprocess.max_num_patches=1024"],
        ["qwen2-5-vl-3b-instruct", "preprocess.max_pixels=1003520"],
    ],
)
def test_native_presets_pass(overrides):
    from builder.cli import main

    assert main(["check", *overrides]) == 0
