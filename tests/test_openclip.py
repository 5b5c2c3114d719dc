"""Image embeddings (`model.output: embeds`) against their references, from checkpoints in
the layouts people have them: open_clip hub repos (`open_clip_config.json` beside
`open_clip_model.safetensors` or `open_clip_pytorch_model.bin`, written by open_clip's own
`save_for_hf`), timm hub repos (timm's `save_for_hf`) and HF's
`CLIPVisionModelWithProjection`. Every parameter random, norms and biases included; odd
sizes (30 px at patch 8, MLP ratio 2.5, head width 8, embedding width 24)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from safetensors.numpy import load_file, save_file

from builder.assemble import parameter_shapes
from builder.errors import InputError
from builder.hf_import import import_config
from builder.preset import load_preset
from builder.weights import load_weights
from builder.weights.hf import open_checkpoint

from .conftest import REPO, assert_close, build_and_load, pixels, randomize, tiny_overrides
from .peers import open_clip_and_timm

VISION = {"image_size": 30, "layers": 3, "width": 32, "head_width": 8, "mlp_ratio": 2.5}
TEXT = {"context_length": 7, "vocab_size": 50, "width": 16, "heads": 2, "layers": 1}
PREPROCESS = {
    "mean": [0.5, 0.4, 0.3],
    "std": [0.2, 0.3, 0.25],
    "interpolation": "bilinear",
    "resize_mode": "squash",
}


class _NoTokenizer:
    """`save_for_hf` saves the text tokenizer too; the vision tower needs none."""

    def save_pretrained(self, folder: Any) -> None:
        pass


def save_open_clip(folder: Path, quick_gelu: bool, safetensors: bool = True) -> Any:
    """An open_clip CLIP model made by `open_clip.create_model` from a hub-style config, every
    parameter random, saved by open_clip's `save_for_hf` as a hub repo folder."""
    open_clip, _ = open_clip_and_timm()
    from open_clip.push_to_hf_hub import save_for_hf

    source = folder.with_name(folder.name + "-config")
    source.mkdir()
    model_cfg = {
        "embed_dim": 24,
        "quick_gelu": quick_gelu,
        "vision_cfg": {**VISION, "patch_size": 8},
        "text_cfg": TEXT,
    }
    config = {"model_cfg": model_cfg, "preprocess_cfg": PREPROCESS}
    (source / "open_clip_config.json").write_text(json.dumps(config))
    model = open_clip.create_model(f"local-dir:{source}", load_weights=False)
    randomize(model)
    save_for_hf(model, _NoTokenizer(), model_cfg, folder, safe_serialization=safetensors)
    return model


def encode_image(model: Any, x: np.ndarray, normalize: bool) -> np.ndarray:
    with torch.inference_mode():
        return model.encode_image(torch.from_numpy(x), normalize=normalize).numpy()


@pytest.fixture(scope="module")
def quick_gelu_repo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    folder = tmp_path_factory.mktemp("open-clip") / "hub"
    return folder, save_open_clip(folder, quick_gelu=True)


@pytest.mark.e2e
def test_open_clip_repo_through_the_cli(quick_gelu_repo, tmp_path):
    """`build import` of the repo's open_clip_config.json, `build` from the repo folder, the
    artifact in a fresh process: open_clip's encode_image."""
    folder, model = quick_gelu_repo
    preset = tmp_path / "mine.yaml"
    cli = [sys.executable, "-m", "builder"]
    run = dict(cwd=REPO, capture_output=True, text=True, check=True)
    subprocess.run(
        [*cli, "import", str(folder / "open_clip_config.json"), "--out", str(preset)], **run
    )
    written = yaml.safe_load(preset.read_text())
    assert written["model"]["output"] == "embeds" and "hidden_act" not in written["model"]
    assert written["preprocess"] == {
        "resize": "square",
        "resample": "bilinear",
        "center_crop": False,
        "mean": PREPROCESS["mean"],
        "std": PREPROCESS["std"],
    }
    out = tmp_path / "out"
    subprocess.run([*cli, str(preset), f"weights.path={folder}", "--out", str(out)], **run)
    x = pixels(2, 30)
    np.save(tmp_path / "x.npy", x)
    script = (
        "import builder, numpy as np, sys; "
        f"np.save(sys.argv[2], builder.load(sys.argv[1])(np.load({str(tmp_path / 'x.npy')!r})))"
    )
    subprocess.run(
        [sys.executable, "-c", script, str(out / "mine" / "llvm"), str(tmp_path / "y.npy")], **run
    )
    assert_close(np.load(tmp_path / "y.npy"), encode_image(model, x, normalize=False))


@pytest.mark.parity
def test_open_clip_pickle_gelu_normalized(tmp_path):
    """GELU, the repo's `open_clip_pytorch_model.bin` (torch.load(weights_only=True)),
    encode_image(normalize=True)."""
    folder = tmp_path / "hub"
    model = save_open_clip(folder, quick_gelu=False, safetensors=False)
    assert [p.name for p in open_checkpoint(folder).files] == ["open_clip_pytorch_model.bin"]
    imported = import_config(folder / "open_clip_config.json").preset
    assert imported["model"]["hidden_act"] == "gelu"
    overrides = [f"model.{k}={v}" for k, v in imported["model"].items()]
    overrides += [f"weights.path={folder}", "model.normalize_embeds=true"]
    encoder = build_and_load("clip-vit-b-32", overrides, tmp_path / "out")
    x = pixels(3, 30, seed=4)
    ours = encoder(x)
    assert_close(ours, encode_image(model, x, normalize=True))
    assert np.allclose(np.linalg.norm(ours, axis=-1), 1, atol=1e-6)


@pytest.mark.parity
def test_timm_clip_vit(tmp_path):
    """timm's CLIP ViT (its `head` Linear, with a bias, is the projection), saved by timm's
    `save_for_hf`; `build import` of its config.json."""
    _, timm = open_clip_and_timm()
    from timm.models._hub import save_for_hf

    args = {"embed_dim": 32, "depth": 3, "num_heads": 4, "mlp_ratio": 2.5, "patch_size": 8}
    args["img_size"] = 30
    model = timm.create_model("vit_base_patch16_clip_224", num_classes=24, **args)
    randomize(model)
    save_for_hf(model, tmp_path / "hub", model_args=args, safe_serialization=True)
    imported = import_config(tmp_path / "hub" / "config.json").preset
    assert imported["model"]["projection_bias"] is True
    overrides = [f"model.{k}={v}" for k, v in imported["model"].items()]
    encoder = build_and_load(
        "clip-vit-b-32", [*overrides, f"weights.path={tmp_path / 'hub'}"], tmp_path / "out"
    )
    x = pixels(2, 30)
    with torch.inference_mode():
        assert_close(encoder(x), model(torch.from_numpy(x)).numpy())


@pytest.mark.parity
def test_hf_image_embeds(tmp_path):
    """HF's CLIPVisionModelWithProjection: `visual_projection` beside the tower."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from .conftest import TINY

    model = randomize(CLIPVisionModelWithProjection(CLIPVisionConfig(**TINY, projection_dim=24)))
    model.save_pretrained(tmp_path / "hf")
    overrides = tiny_overrides(projection_dim=24, output="embeds", feature_layer=-1)
    overrides += ["model.post_layernorm=true", f"weights.path={tmp_path / 'hf'}"]
    encoder = build_and_load("clip-vit-b-32", overrides, tmp_path / "out")
    x = pixels(2, 30)
    with torch.inference_mode():
        assert_close(encoder(x), model(torch.from_numpy(x)).image_embeds.numpy())


@pytest.mark.unit
def test_siglip_embeds_are_its_pooled_output():
    """SigLIP has no projection: its embedding is the head's pooled vector, the same graph."""
    from builder.assemble import output_shape

    pooled, embeds = (
        load_preset("siglip-base-16-224", tiny_overrides(output=o)) for o in ("pooled", "embeds")
    )
    assert parameter_shapes(embeds.model, embeds.blocks) == parameter_shapes(
        pooled.model, pooled.blocks
    )
    assert output_shape(embeds.model, embeds.blocks) == ["batch", 32]


@pytest.mark.unit
def test_fused_qkv_of_the_wrong_shape(quick_gelu_repo, tmp_path):
    """One line naming the file, the key and the shapes, and exit 2."""
    from builder.cli import main

    folder, _ = quick_gelu_repo
    state = load_file(folder / "open_clip_model.safetensors")
    key = "visual.transformer.resblocks.1.attn.in_proj_weight"
    state[key] = np.zeros((97, 32), np.float32)
    bad = tmp_path / "open_clip_model.safetensors"
    save_file(state, bad)
    preset = tmp_path / "p.yaml"
    preset.write_text(yaml.safe_dump(import_config(folder / "open_clip_config.json").preset))
    resolved = load_preset(str(preset), [f"weights.path={bad}"])
    with pytest.raises(InputError) as e:
        load_weights(resolved, parameter_shapes(resolved.model, resolved.blocks))
    assert e.value.lines == [
        f"{bad}: {key!r} has shape [97, 32]: a fused tensor of 3 equal parts (q_proj, k_proj, "
        "v_proj) on axis 0; the preset needs [96, 32] (3 x [32, 32])"
    ]
    assert main([str(preset), f"weights.path={bad}", "--out", str(tmp_path / "o")]) == 2


@pytest.mark.unit
@pytest.mark.parametrize(
    "name, message",
    [
        ("RN50", "model_cfg.vision_cfg.layers: [3, 4, 6, 3] is a ModifiedResNet tower"),
        ("convnext_base", "model_cfg.vision_cfg.timm_model_name: 'convnext_base' is a timm tower"),
    ],
)
def test_non_vit_open_clip_configs(name, message, tmp_path, capsys):
    """open_clip's own model configs of other towers, as a hub repo holds them: exit 2, one
    line naming the file and the field."""
    from builder.cli import main

    open_clip, _ = open_clip_and_timm()
    shipped = Path(open_clip.__file__).parent / "model_configs" / f"{name}.json"
    config = tmp_path / "open_clip_config.json"
    config.write_text(json.dumps({"model_cfg": json.loads(shipped.read_text())}))
    assert main(["import", str(config), "--out", str(tmp_path / "p.yaml")]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"{config}: {message}") and "only" in line
    assert not (tmp_path / "p.yaml").exists()


@pytest.mark.unit
def test_pickles_need_torch(quick_gelu_repo, tmp_path, monkeypatch):
    folder, model = quick_gelu_repo
    torch.save(model.state_dict(), tmp_path / "open_clip_pytorch_model.bin")
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` fails
    with pytest.raises(InputError) as e:
        open_checkpoint(tmp_path)
    assert e.value.lines == [
        f"{tmp_path / 'open_clip_pytorch_model.bin'}: a PyTorch pickle; reading it needs torch "
        "(pip install 'clip-tvm-builder[torch]'), or convert it to safetensors"
    ]


# Each shipped open_clip preset: (open_clip model config, pretrained tag).
SHIPPED = {
    "open-clip-vit-h-14-laion2b": ("ViT-H-14", "laion2b_s32b_b79k"),
    "open-clip-vit-bigg-14-laion2b": ("ViT-bigG-14", "laion2b_s39b_b160k"),
    "open-clip-vit-l-14-openai": ("ViT-L-14", "openai"),
    "dfn5b-clip-vit-h-14-378": ("ViT-H-14-378", "dfn5b"),
}


@pytest.mark.unit
@pytest.mark.parametrize("preset", sorted(SHIPPED))
def test_presets_are_open_clips_configs(preset, tmp_path):
    """The preset equals `build import` of the open_clip_config.json that open_clip's own
    model config and pretrained entry make (its QuickGELU and preprocessing included)."""
    open_clip, _ = open_clip_and_timm()
    name, tag = SHIPPED[preset]
    model_cfg = open_clip.get_model_config(name)
    pretrained = open_clip.get_pretrained_cfg(name, tag)
    model_cfg["quick_gelu"] = pretrained.get("quick_gelu", model_cfg.get("quick_gelu", False))
    keys = ("mean", "std", "interpolation", "resize_mode")
    config = {"model_cfg": model_cfg, "preprocess_cfg": {k: pretrained[k] for k in keys}}
    (tmp_path / "open_clip_config.json").write_text(json.dumps(config))
    imported = import_config(tmp_path / "open_clip_config.json").preset
    (tmp_path / "imported.yaml").write_text(yaml.safe_dump(imported))
    ours = load_preset(preset)
    theirs = load_preset(str(tmp_path / "imported.yaml"), ["model.normalize_embeds=true"])
    assert (ours.model, ours.preprocess) == (theirs.model, theirs.preprocess)


@pytest.mark.e2e
def test_the_embeddings_doc_runs_as_written(quick_gelu_repo, tmp_path, monkeypatch, capsys):
    """docs/embeddings.md's commands and code, in order, with only `CKPT`, `checkpoint` (the
    tiny repo) changed, on generated JPEGs; its own asserts check the norms and open_clip."""
    from PIL import Image

    folder, _ = quick_gelu_repo
    text = (REPO / "docs" / "embeddings.md").read_text()
    (bash,) = re.findall(r"```bash\n(.*?)```", text, re.S)
    python = re.findall(r"```python\n(.*?)```", text, re.S)
    bash, swapped = re.subn(r"^CKPT=.*$", f"CKPT={folder}", bash, flags=re.M)
    assert swapped == 1 and len(python) == 2
    rng = np.random.default_rng(0)
    (tmp_path / "photos").mkdir()
    for i, size in enumerate([(40, 30), (30, 55), (64, 64), (33, 31)]):
        pixels_ = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
        Image.fromarray(pixels_).save(tmp_path / "photos" / f"{i}.jpg")
    shell = f'build() {{ {sys.executable} -m builder "$@"; }}\nset -e\n{bash}'
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run(["bash", "-c", shell], cwd=tmp_path, env=env, check=True, capture_output=True)
    open_clip_and_timm()  # the doc imports open_clip (torchvision's stand-in where missing)
    monkeypatch.chdir(tmp_path)
    code, swapped = re.subn(
        r"^checkpoint = .*$", f"checkpoint = {str(folder)!r}", "\n".join(python), flags=re.M
    )
    assert swapped == 1
    exec(compile(code, "docs/embeddings.md", "exec"), {})
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == 5 and printed[-1].startswith("max abs error / max |open_clip|: ")


@pytest.mark.unit
def test_open_clip_config_beside_the_weights_is_compared(quick_gelu_repo, tmp_path):
    """A QuickGELU repo built as GELU has the right shapes and wrong numbers: an error."""
    folder, _ = quick_gelu_repo
    preset = tmp_path / "p.yaml"
    preset.write_text(yaml.safe_dump(import_config(folder / "open_clip_config.json").preset))
    resolved = load_preset(str(preset), [f"weights.path={folder}", "model.hidden_act=gelu"])
    with pytest.raises(InputError) as e:
        load_weights(resolved, parameter_shapes(resolved.model, resolved.blocks))
    assert e.value.lines == [
        f"{folder / 'open_clip_config.json'}: hidden_act is 'quick_gelu' but the preset has "
        "model.hidden_act 'gelu'; change the preset (or override model.hidden_act=quick_gelu) "
        "to match the checkpoint"
    ]


@pytest.mark.unit
@pytest.mark.parametrize(
    "config, message",
    [
        (
            {"model_cfg": {"vision_cfg": {"width": "wide"}}},
            "model_cfg.vision_cfg.width: 'wide' is not a positive integer",
        ),
        (
            {"vision_cfg": {"image_size": [224, 160]}},
            "vision_cfg.image_size is [224, 160]; only square sizes are supported",
        ),
        (
            {"vision_cfg": {"pool_type": "avg"}},
            "vision_cfg.pool_type: 'avg' is not supported; supported: 'tok'",
        ),
        (
            {"model_cfg": {"vision_cfg": {}}, "preprocess_cfg": {"resize_mode": "longest"}},
            "preprocess_cfg.resize_mode: 'longest' is not supported; supported: "
            "['shortest', 'squash']",
        ),
        (
            {"architecture": "vit_base_patch16_clip_224", "num_classes": 0},
            "num_classes: 0: the model has no head, so no embedding",
        ),
    ],
    ids=["type", "not-square", "pooling", "resize-mode", "no-head"],
)
def test_bad_open_clip_and_timm_configs(config, message, tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    with pytest.raises(InputError) as e:
        import_config(path)
    (line,) = e.value.lines
    assert line.startswith(f"{path}: {message}")
