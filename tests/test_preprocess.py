"""Preprocessing against HF transformers 5's PIL-based CLIPImageProcessorPil on images made
with Pillow: several sizes and aspect ratios, grayscale, RGBA, palette; max abs error 1e-5."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from builder.config import PreprocessConfig
from builder.errors import InputError
from builder.preprocess import check_images, load_image, preprocess

pytestmark = pytest.mark.parity

TOL = 1e-5


def photo(width: int, height: int, mode: str, seed: int = 0) -> Image.Image:
    """A smooth gradient with noise and a disc (like a photo: edges and flat areas), and a
    varying alpha for RGBA, so resampling filters and compositing both matter."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    r = 255 * x / max(width - 1, 1)
    g = 255 * y / max(height - 1, 1)
    disc = ((x - width / 2) ** 2 + (y - height / 3) ** 2) < (min(width, height) / 4) ** 2
    b = np.where(disc, 230.0, 40.0)
    rgb = np.stack([r, g, b], -1) + rng.normal(0, 12, (height, width, 3))
    alpha = 255 * (x + y) / max(width + height - 2, 1)
    rgba = np.concatenate([rgb, alpha[..., None]], -1).clip(0, 255).astype(np.uint8)
    img = Image.fromarray(rgba, "RGBA")
    return img if mode == "RGBA" else img.convert(mode)


def hf_pixels(image: Image.Image, steps: PreprocessConfig) -> np.ndarray:
    from transformers import CLIPImageProcessorPil

    size = (
        {"shortest_edge": steps.size}
        if steps.resize == "shortest_edge"
        else {"height": steps.size, "width": steps.size}
    )
    proc = CLIPImageProcessorPil(
        size=size,
        crop_size={"height": steps.crop_size, "width": steps.crop_size},
        do_center_crop=steps.center_crop,
        resample=getattr(Image.Resampling, steps.resample.upper()),
        rescale_factor=steps.rescale_factor,
        image_mean=steps.mean,
        image_std=steps.std,
        do_convert_rgb=steps.convert_rgb,
    )
    return proc(image, return_tensors="np")["pixel_values"][0]


IMAGES = [
    (640, 480, "RGB"),  # landscape
    (333, 500, "RGB"),  # portrait, odd width
    (336, 336, "RGB"),  # already the size: no resize
    (97, 33, "RGBA"),  # wide and smaller than the crop: upscaled, transparency on white
    (300, 450, "L"),  # grayscale
    (1001, 777, "P"),  # palette
    (24, 20, "RGB"),  # tiny
]
STEPS = {
    "clip-336": PreprocessConfig(),
    "siglip-384": PreprocessConfig(
        resize="square", center_crop=False, mean=[0.5] * 3, std=[0.5] * 3
    ),
    "bilinear-square-crop": PreprocessConfig(resize="square", resample="bilinear", size=300),
    "crop-larger-than-image": PreprocessConfig(resize="square", size=200, crop_size=224),
}
SIZES = {"clip-336": 336, "siglip-384": 384}


@pytest.mark.parametrize("name", STEPS)
@pytest.mark.parametrize("w, h, mode", IMAGES, ids=lambda v: str(v))
def test_matches_hf_pil_processor(name, w, h, mode):
    steps = STEPS[name].resolved(SIZES.get(name, 224))
    image = photo(w, h, mode)
    ours = preprocess(image, steps)
    ref = hf_pixels(image, steps)
    assert ours.dtype == np.float32 and ours.shape == ref.shape
    assert np.max(np.abs(ours - ref)) <= TOL


def test_transparency_is_composited_onto_white():
    clear = Image.new("RGBA", (40, 40), (10, 200, 30, 0))
    steps = PreprocessConfig(mean=[0.0] * 3, std=[1.0] * 3).resolved(32)
    np.testing.assert_allclose(preprocess(clear, steps), 1.0, atol=1e-6)


def test_files_on_disk_match_pil_images(tmp_path):
    image = photo(200, 150, "RGB")
    image.save(tmp_path / "a.png")
    steps = PreprocessConfig().resolved(64)
    np.testing.assert_array_equal(preprocess(tmp_path / "a.png", steps), preprocess(image, steps))


def test_not_rgb_without_conversion_is_an_error():
    steps = PreprocessConfig(convert_rgb=False).resolved(32)
    with pytest.raises(InputError, match="x.png: mode L, not RGB"):
        preprocess(photo(40, 40, "L"), steps, name="x.png")


@pytest.mark.unit
def test_bad_files_are_all_named(tmp_path):
    photo(20, 20, "RGB").save(tmp_path / "ok.jpg")
    (tmp_path / "text.png").write_text("not an image")
    photo(64, 64, "RGB").save(tmp_path / "cut.png")
    blob = (tmp_path / "cut.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(InputError) as e:
        check_images([tmp_path / "ok.jpg", tmp_path / "missing.jpg", tmp_path / "text.png"])
    assert e.value.lines == [
        f"{tmp_path / 'missing.jpg'}: no such image file",
        f"{tmp_path / 'text.png'}: not an image Pillow can read",
    ]
    with pytest.raises(InputError, match="cut.png: cannot decode the image"):
        load_image(tmp_path / "cut.png")


@pytest.mark.unit
def test_preprocessing_must_produce_the_tower_image(tmp_path, capsys):
    from builder.cli import main

    path = tmp_path / "p.yaml"
    path.write_text("model: {image_size: 64, patch_size: 16}\npreprocess:\n  crop_size: 60\n")
    assert main(["check", str(path)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"{path}:3: preprocess.crop_size: 60 pixels, but model.image_size is 64: the "
        "preprocessing must produce the image the tower takes"
    )
    assert main(["check", "clip-vit-b-32", "preprocess.center_crop=false"]) == 2
    assert capsys.readouterr().err.strip() == (
        "override 'preprocess.center_crop=false': preprocess.center_crop: a shortest_edge "
        "resize without a center crop gives images of any aspect ratio; the tower takes a "
        "square: set center_crop: true or resize: square"
    )
    ok = ["preprocess.center_crop=false", "preprocess.resize=square", "preprocess.std=[0.5,1,2]"]
    assert main(["check", "clip-vit-b-32", *ok]) == 0
