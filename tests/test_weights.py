"""Checkpoint reading: every key prefix real files carry, shards, dtypes, and the errors."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from builder.assemble import parameter_shapes
from builder.errors import InputError
from builder.preset import load_preset
from builder.safetensors_io import SafetensorsFile
from builder.weights import load_weights

from .conftest import (
    TINY,
    assert_close,
    build_and_load,
    expected_features,
    hf_vision_config,
    pixels,
    randomize,
    tiny_overrides,
)

pytestmark = pytest.mark.unit

# transformers 4 hub files (CLIPVisionModel/CLIPModel, LLaVA, LLaVA under `model.`) and
# transformers 5 save_pretrained (CLIPVisionModel, CLIPModel, LLaVA).
PREFIXES = [
    "vision_model.",
    "vision_tower.vision_model.",
    "model.vision_tower.vision_model.",
    "",
    "vision_tower.",
]
# A one-layer text tower / language model for the checkpoints that hold one beside the tower.
TEXT = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_attention_heads": 4,
    "num_hidden_layers": 1,
    "vocab_size": 100,
}


def tiny_preset(folder: Path, *extra: str):
    return load_preset("clip-vit-b-32", tiny_overrides() + [f"weights.path={folder}", *extra])


def needed(preset) -> dict:
    return parameter_shapes(preset.model, preset.blocks)


def reference_state(tiny_checkpoint) -> dict[str, np.ndarray]:
    _, model = tiny_checkpoint
    return {k: v.numpy() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("prefix", PREFIXES, ids=lambda p: p or "none")
def test_every_prefix_fills_every_parameter_once(prefix, tiny_checkpoint, tmp_path):
    folder, _ = tiny_checkpoint
    state = load_file(folder / "model.safetensors")
    extra = {}
    if prefix:  # the keys beside a tower: CLIPModel's text side, LLaVA's projector
        extra = {
            "text_model.embeddings.token_embedding.weight": torch.zeros(4, 4),
            "multi_modal_projector.linear_1.weight": torch.zeros(4, 4),
            "logit_scale": torch.zeros(()),
        }
    save_file({prefix + k: v for k, v in state.items()} | extra, tmp_path / "model.safetensors")
    preset = tiny_preset(tmp_path)
    arrays, info = load_weights(preset, needed(preset))
    ref = reference_state(tiny_checkpoint)
    assert set(arrays) == set(needed(preset))
    for name, value in arrays.items():
        np.testing.assert_array_equal(value, ref[name.removeprefix("vision_model.")])
    assert info["prefix"] == prefix
    # layer 2 (after feature layer -2) and post_layernorm are skipped, not loaded.
    assert info["skipped_keys"] == 16 + 2
    assert info["ignored_non_vision_keys"] == len(extra)


def test_sharded_checkpoint_and_single_file(tmp_path):
    from transformers import CLIPVisionModel

    model = randomize(CLIPVisionModel(hf_vision_config()))
    model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 1
    preset = tiny_preset(tmp_path / "sharded")
    arrays, info = load_weights(preset, needed(preset))
    assert len(info["files"]) > 1
    state = model.state_dict()
    for name, value in arrays.items():
        np.testing.assert_array_equal(value, state[name.removeprefix("vision_model.")].numpy())
    # One .safetensors file given directly (no config.json beside it is fine).
    single = tmp_path / "one" / "weights.safetensors"
    single.parent.mkdir()
    save_file(dict(state), single)
    arrays2, _ = load_weights(tiny_preset(single), needed(preset))
    assert all(np.array_equal(arrays[k], arrays2[k]) for k in arrays)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_checkpoints_are_widened(dtype, tiny_checkpoint, tmp_path):
    folder, _ = tiny_checkpoint
    state = load_file(folder / "model.safetensors")
    save_file({k: v.to(dtype) for k, v in state.items()}, tmp_path / "model.safetensors")
    preset = tiny_preset(tmp_path)
    arrays, _ = load_weights(preset, needed(preset))
    for name, value in arrays.items():
        want = state[name.removeprefix("vision_model.")].to(dtype).float().numpy()
        assert value.dtype == np.float32
        np.testing.assert_array_equal(value, want)


def _errors(preset) -> list[str]:
    with pytest.raises(InputError) as e:
        load_weights(preset, needed(preset))
    return e.value.lines


def test_missing_unexpected_and_misshapen_keys(tiny_checkpoint, tmp_path):
    folder, _ = tiny_checkpoint
    state = load_file(folder / "model.safetensors")
    del state["encoder.layers.0.mlp.fc1.bias"]
    state["encoder.layers.0.mlp.fc3.weight"] = torch.zeros(2, 2)
    state["pre_layrnorm.weight"] = torch.zeros(7)
    save_file(state, tmp_path / "model.safetensors")
    lines = _errors(tiny_preset(tmp_path))
    f = tmp_path / "model.safetensors"
    assert lines == [
        f"{f}: unexpected vision key 'encoder.layers.0.mlp.fc3.weight'",
        f"{f}: 'pre_layrnorm.weight' has shape [7], the preset needs [32]",
        f"{tmp_path}: missing key 'encoder.layers.0.mlp.fc1.bias'",
    ]


def test_config_json_must_agree_with_the_preset(tiny_checkpoint):
    folder, _ = tiny_checkpoint
    lines = _errors(tiny_preset(folder, "model.image_size=64", "model.layer_norm_eps=1e-6"))
    assert lines == [
        f"{folder / 'config.json'}: image_size is 30 but the preset has model.image_size 64; "
        "change the preset (or override model.image_size=30) to match the checkpoint",
        f"{folder / 'config.json'}: layer_norm_eps is 1e-05 but the preset has "
        "model.layer_norm_eps 1e-06; change the preset (or override "
        "model.layer_norm_eps=1e-05) to match the checkpoint",
    ]


def test_llava_config_fields_are_checked(tiny_checkpoint, tmp_path):
    folder, _ = tiny_checkpoint
    (tmp_path / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
    vision = json.loads((folder / "config.json").read_text())
    config = {"vision_config": vision, "vision_feature_layer": -1, "model_type": "llava"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    (line,) = _errors(tiny_preset(tmp_path))
    assert "vision_feature_layer is -1 but the preset has model.feature_layer -2" in line


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda d: (d / "junk.txt").write_text("x"), "no .safetensors files"),
        (lambda d: (d / "pytorch_model.bin").write_bytes(b"x"), "not a PyTorch state dict"),
        (lambda d: (d / "model.safetensors").write_bytes(b"\x01"), "shorter than 8 bytes"),
        (
            lambda d: (d / "model.safetensors").write_bytes(b"\x05" + b"\0" * 7 + b"notjs"),
            "its header is not JSON",
        ),
    ],
    ids=["empty-folder", "bin-only", "tiny-file", "bad-header"],
)
def test_junk_folders(tmp_path, make, message):
    make(tmp_path)
    (line,) = _errors(tiny_preset(tmp_path))
    assert message in line and str(tmp_path) in line


def test_truncated_and_wrong_dtype(tiny_checkpoint, tmp_path):
    folder, _ = tiny_checkpoint
    blob = (folder / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(blob[: len(blob) // 2])
    (line, *_) = _errors(tiny_preset(tmp_path))
    assert "the file is truncated" in line
    state = load_file(folder / "model.safetensors")
    state["pre_layrnorm.weight"] = state["pre_layrnorm.weight"].to(torch.int32)
    save_file(state, tmp_path / "model.safetensors")
    (line,) = _errors(tiny_preset(tmp_path))
    assert "'pre_layrnorm.weight' has dtype I32" in line


@pytest.mark.parametrize(
    "preset, other, bare_says",
    [
        # The same anchor key: the tower is found, most of its keys are not InternViT's.
        ("internvit-300m-448px", "dinov2", "are not parameters of the internvit family's"),
        # Another anchor key: no AIMv2 tower, but CLIP's anchor is there.
        ("aimv2-large-patch14-224", "clip", "it looks like a checkpoint of the clip family"),
        # Fewer than half of the keys are unknown (DINOv2 reads q_proj, fc1 ...), but most
        # of its parameters are missing.
        ("dinov2-base", "internvit", "are not parameters of the dinov2 family's"),
    ],
    ids=["internvit-given-dinov2", "aimv2-given-clip", "dinov2-given-internvit"],
)
def test_checkpoint_of_another_family_is_one_line(preset, other, bare_says, tmp_path):
    """A checkpoint of another family (HF's, saved by save_pretrained), with its config.json
    and as a bare .safetensors file: one line naming the file (exit 2 in the CLI), not a line
    per key."""
    from builder import families

    def tiny(family):
        return {k: v for k, v in TINY.items() if k in family.config.__dataclass_fields__}

    family = families.get(other)
    hf_model = family.reference_model(family.config(**tiny(family)))
    randomize(hf_model).save_pretrained(tmp_path / "hf")
    ours = [f"model.{k}={v}" for k, v in tiny(families.get(load_preset(preset).family)).items()]
    bare = tmp_path / "bare" / "model.safetensors"
    bare.parent.mkdir()
    bare.write_bytes((tmp_path / "hf" / "model.safetensors").read_bytes())
    config = tmp_path / "hf" / "config.json"
    says = f"a checkpoint of the {other} family (model_type"
    for path, named, message in [(tmp_path / "hf", config, says), (bare, bare, bare_says)]:
        (line,) = _errors(load_preset(preset, [*ours, f"weights.path={path}"]))
        assert line.startswith(f"{named}: ") and message in line, line


def test_no_vision_tower(tmp_path):
    save_file({"text_model.x": torch.zeros(2)}, tmp_path / "model.safetensors")
    (line,) = _errors(tiny_preset(tmp_path))
    assert "no vision tower" in line


@pytest.mark.parity
def test_clip_model_and_llava_saved_by_transformers(tmp_path):
    """CLIPModel and LlavaForConditionalGeneration written by save_pretrained: the vision
    tower is found beside the text tower / language model and matches HF."""
    from transformers import (
        CLIPConfig,
        CLIPModel,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )

    clip = randomize(CLIPModel(CLIPConfig(vision_config=TINY, text_config=TEXT)))
    clip.save_pretrained(tmp_path / "clip")
    llava = randomize(
        LlavaForConditionalGeneration(
            LlavaConfig(
                vision_config=hf_vision_config(),
                text_config=LlamaConfig(**TEXT, num_key_value_heads=4),
                image_token_index=99,
            )
        )
    )
    llava.save_pretrained(tmp_path / "llava")
    for name, tower, extra in (
        ("clip", clip.vision_model, []),
        # LLaVA's config says vision_feature_select_strategy "default": the preset must agree.
        ("llava", llava.model.vision_tower, ["model.feature_select_strategy=default"]),
    ):
        overrides = tiny_overrides() + [f"weights.path={tmp_path / name}", *extra]
        preset = load_preset("clip-vit-b-32", overrides)
        enc = build_and_load("clip-vit-b-32", overrides, tmp_path / f"out-{name}")
        assert enc.manifest["weights"]["ignored_non_vision_keys"] > 0
        x = pixels(2, preset.model.image_size)
        assert_close(enc(x), expected_features(tower, preset.model, x))


@pytest.mark.parity
def test_siglip_model_saved_by_transformers(tmp_path):
    """SiglipModel (text tower, logit_scale and logit_bias beside the vision tower) written
    by save_pretrained: the tower under `vision_model.` is found, every key of it used once
    (the head included), and the pooled output matches HF's image pooler_output."""
    import torch
    from transformers import SiglipConfig, SiglipModel

    vision = {**TINY, "hidden_act": "gelu_pytorch_tanh"}
    siglip = randomize(SiglipModel(SiglipConfig(vision_config=vision, text_config=TEXT)))
    siglip.save_pretrained(tmp_path / "siglip")
    overrides = tiny_overrides() + [f"weights.path={tmp_path / 'siglip'}"]
    overrides += ["model.output=pooled"]
    preset = load_preset("siglip-so400m-14-384", overrides)
    arrays, info = load_weights(preset, needed(preset))
    state = load_file(tmp_path / "siglip" / "model.safetensors")
    vision_keys = [k for k in state if k.startswith("vision_model.")]
    assert info["prefix"] == "vision_model." and info["skipped_keys"] == 0
    assert len(arrays) == len(vision_keys)
    assert info["ignored_non_vision_keys"] == len(state) - len(vision_keys)
    enc = build_and_load("siglip-so400m-14-384", overrides, tmp_path / "out")
    x = pixels(2, preset.model.image_size)
    with torch.inference_mode():
        ref = siglip.vision_model(torch.from_numpy(x)).pooler_output.numpy()
    assert_close(enc(x), ref)
    # The checkpoint's config.json is read: a SigLIP eps must not be left at CLIP's 1e-5.
    wrong_eps = load_preset("siglip-so400m-14-384", [*overrides, "model.layer_norm_eps=1e-5"])
    (line,) = _errors(wrong_eps)
    assert "vision_config.layer_norm_eps is 1e-06 but the preset has" in line


def test_read_into_takes_each_dtype_as_stored(tmp_path):
    import ml_dtypes
    import safetensors.numpy

    rng = np.random.default_rng(0)
    arrays = {
        "f32": rng.standard_normal((3, 4)).astype(np.float32),
        "f16": rng.standard_normal(5).astype(np.float16),
        "bf16": rng.standard_normal((2, 2)).astype(ml_dtypes.bfloat16),
    }
    path = tmp_path / "p.safetensors"
    safetensors.numpy.save_file(arrays, str(path))
    stored = SafetensorsFile(path)
    for name, array in arrays.items():
        assert stored.dtype(name) == array.dtype.name
        out = np.full_like(array, 7)
        stored.read_into(name, out)
        np.testing.assert_array_equal(out.view(np.uint8), array.view(np.uint8))
    wrong = r"tensor 'f32' is float32 \[3, 4\]; expected float32 \[4, 3\]"
    with pytest.raises(InputError, match=wrong):
        stored.read_into("f32", np.empty((4, 3), np.float32))
    with pytest.raises(InputError, match=r"tensor 'f16' is float16 \[5\]; expected float32 \[5\]"):
        stored.read_into("f16", np.empty(5, np.float32))


def test_random_init_is_one_stream_per_parameter():
    """Each matrix is its own stream keyed by (seed, name), the same values as one uniform
    `random` call mapped to standard deviation 0.02, however the fill is chunked or threaded;
    biases 0,
    norm scales 1; every array float32, C-contiguous, writable and 64-byte aligned (TVM
    takes it without a copy)."""
    import zlib

    from builder.weights.random_init import CHUNK, HALF_WIDTH, STD, random_weights

    shapes = {"a.weight": (3, CHUNK + 5), "b.bias": (7,), "c.weight": (7,), "d.weight": (4, 4)}
    got = random_weights(shapes, seed=3)
    assert list(got) == list(shapes)
    for name in ("a.weight", "d.weight"):
        rng = np.random.default_rng([3, zlib.crc32(name.encode())])
        ref = rng.random(shapes[name], dtype=np.float32)
        ref *= 2 * HALF_WIDTH
        ref -= HALF_WIDTH
        np.testing.assert_array_equal(got[name].view(np.uint32), ref.view(np.uint32))
    big = got["a.weight"]
    assert abs(big.std() - STD) < 0.05 * STD and abs(big.mean()) < 0.05 * STD
    assert big.min() >= -HALF_WIDTH and big.max() < HALF_WIDTH
    assert not got["b.bias"].any() and (got["c.weight"] == 1).all()
    for a in got.values():
        assert a.dtype == np.float32 and a.flags.c_contiguous and a.flags.writeable
        assert a.ctypes.data % 64 == 0
    for name, a in random_weights(shapes, seed=3, threads=1).items():
        np.testing.assert_array_equal(a, got[name])
    assert not np.array_equal(random_weights(shapes, seed=4)["d.weight"], got["d.weight"])


def test_random_init_keeps_parameters_when_the_layer_count_changes():
    from builder.weights.random_init import random_weights

    def weights(layers: int) -> dict[str, np.ndarray]:
        preset = load_preset("clip-vit-b-32", tiny_overrides(num_hidden_layers=layers))
        return random_weights(parameter_shapes(preset.model, preset.blocks), seed=0)

    two, three = weights(2), weights(3)
    assert set(two) < set(three)
    for name, a in two.items():
        np.testing.assert_array_equal(a, three[name])


@pytest.mark.parametrize("parts", [2, 3])
@pytest.mark.parametrize("size", [(1 << 18) + 1, 1_000_003, (3 << 16) * 2])
def test_a_parameter_made_in_parts_is_the_same(size, parts, monkeypatch):
    """A parameter's stream cut between threads (`RandomParams`, a parameter at a time) gives
    the values of one stream: odd sizes, parts that end mid-chunk."""
    from concurrent.futures import ThreadPoolExecutor

    from builder.weights.random_init import RandomParams, random_param

    name, shape = "vision_model.encoder.layers.0.mlp.fc1.weight", (size, 1)
    whole = random_param(name, shape, seed=4)
    assert len(np.unique(whole)) > size // 2  # random values, not a fill
    with ThreadPoolExecutor(parts - 1) as pool:
        cut = random_param(name, shape, 4, np.full(shape, np.nan, np.float32), pool, parts)
    np.testing.assert_array_equal(cut, whole)
    made = np.full(shape, np.nan, np.float32)
    RandomParams({name: shape}, seed=4).fill(name, made)
    np.testing.assert_array_equal(made, whole)


def without_direct_io(monkeypatch: pytest.MonkeyPatch) -> None:
    """A file system without direct I/O: opening a file with O_DIRECT fails with EINVAL."""
    import errno
    import os

    open_file = os.open

    def no_direct(name, flags, *args):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return open_file(name, flags, *args)

    monkeypatch.setattr(os, "open", no_direct)


@pytest.mark.parametrize("way", ["direct", "buffered", "no direct I/O", "direct refused"])
def test_writer_matches_safetensors_byte_for_byte(tmp_path, monkeypatch, way):
    """`safetensors_io.write` copies each tensor into the file: the same bytes as
    `safetensors.numpy.save_file` (header, order, padding), bfloat16 and a non-contiguous
    array included, read back equal by safetensors, and the sha256 it returns is the file's;
    written past the page cache in chunks of one block (tensors that span chunks, a last
    chunk cut short), with `write` calls (a small file), and with `write` calls again where
    the file system has no direct I/O, at the open or at the first write."""
    import errno
    import hashlib
    import os

    import ml_dtypes
    import safetensors.numpy

    from builder import safetensors_io

    rng = np.random.default_rng(0)
    tensors = {
        "packed.10": rng.standard_normal((3, 5)).astype(np.float32),
        "packed.2": rng.standard_normal(7).astype(ml_dtypes.bfloat16),
        "packed.1": rng.standard_normal((2, 3)).astype(np.float16),
        "f64": np.array([1.5, -2.0], np.float64),
        "scalar": np.array(0.5, np.float32),
        "empty": np.zeros((0, 4), np.float32),
        "strided": rng.standard_normal((4, 6)).astype(np.float32)[:, ::2],
        "wide": rng.standard_normal(2500).astype(np.float32),  # spans three chunks
    }
    ours, theirs = tmp_path / "ours.safetensors", tmp_path / "theirs.safetensors"
    direct_writes = []
    pwrite = os.pwrite

    def counted(fd, data, at):
        direct_writes.append(at)
        if way == "direct refused":
            raise OSError(errno.EINVAL, "Invalid argument")
        return pwrite(fd, data, at)

    monkeypatch.setattr(os, "pwrite", counted)
    if way != "buffered":
        monkeypatch.setattr(safetensors_io, "DIRECT_MIN", 0)
        monkeypatch.setattr(safetensors_io, "DIRECT_CHUNK", safetensors_io.DIRECT_ALIGN)
    if way == "no direct I/O":
        without_direct_io(monkeypatch)
    digest = safetensors_io.write(ours, tensors)
    contiguous = {name: a.copy(order="C") for name, a in tensors.items()}
    safetensors.numpy.save_file(contiguous, str(theirs))
    assert ours.read_bytes() == theirs.read_bytes()
    assert digest == hashlib.sha256(ours.read_bytes()).hexdigest()
    if way == "direct":  # a write per chunk, the last one padded to a whole block
        assert sorted(direct_writes) == list(range(0, ours.stat().st_size, 4096))
    assert bool(direct_writes) == (way in ("direct", "direct refused"))
    assert SafetensorsFile(ours).shape("scalar") == ()
    back = safetensors.numpy.load_file(str(ours))
    assert back.keys() == tensors.keys()
    for name, a in tensors.items():
        assert back[name].dtype == a.dtype and back[name].shape == a.shape
        np.testing.assert_array_equal(
            back[name].reshape(-1).view(np.uint8), contiguous[name].reshape(-1).view(np.uint8)
        )
    with pytest.raises(ValueError, match="int32 is not one of"):
        safetensors_io.write(tmp_path / "int.safetensors", {"i": np.zeros(2, np.int32)})


@pytest.mark.parametrize("direct", [True, False])
def test_writer_computes_tensors_into_two_buffers(tmp_path, monkeypatch, direct):
    """Computed tensors (`safetensors_io.Computed`) are filled when the writer reaches them,
    into two buffers they share: the file and its sha256 are those of the arrays, even where
    the hashing lags far behind (a buffer is given again only once it has been hashed)."""
    import hashlib

    import safetensors.numpy

    from builder import safetensors_io

    class Computed:
        def __init__(self, value: int):
            self.value, self.shape, self.dtype = value, (5000,), np.dtype(np.float32)

        def fill(self, out: np.ndarray) -> None:
            assert out.ctypes.data % 4096 == 0  # page-aligned, as kernels need
            out[...] = self.value

    sha256 = hashlib.sha256

    class Slow:  # hashing 10 ms behind each piece
        def __init__(self):
            self.digest = sha256()

        def update(self, data):
            time.sleep(0.01)
            self.digest.update(data)

        def hexdigest(self):
            return self.digest.hexdigest()

    monkeypatch.setattr(safetensors_io.hashlib, "sha256", Slow)
    if direct:
        monkeypatch.setattr(safetensors_io, "DIRECT_MIN", 0)
        monkeypatch.setattr(safetensors_io, "DIRECT_CHUNK", safetensors_io.DIRECT_ALIGN)
    tensors = {f"t{i}": Computed(i) for i in range(6)}
    tensors["plain"] = np.arange(7, dtype=np.float32)
    ours, theirs = tmp_path / "ours.safetensors", tmp_path / "theirs.safetensors"
    digest = safetensors_io.write(ours, tensors)
    arrays = {f"t{i}": np.full(5000, i, np.float32) for i in range(6)}
    safetensors.numpy.save_file({**arrays, "plain": tensors["plain"]}, str(theirs))
    assert ours.read_bytes() == theirs.read_bytes()
    assert digest == sha256(ours.read_bytes()).hexdigest()


@pytest.mark.parametrize("way", ["direct", "cached", "no direct I/O"])
def test_reading_a_file_past_the_page_cache(tmp_path, monkeypatch, way):
    """`read_all_into` reads a large file that is not in the page cache with direct I/O, in
    chunks of one block here (tensors that span chunks, an empty one where a spanning one
    starts, a file that ends mid-chunk), and a cached one, or one where the file system has
    no direct I/O, through the cache: the same values every way. A file written past the
    cache is not in it; read, it is."""

    from builder import safetensors_io

    monkeypatch.setattr(safetensors_io, "DIRECT_MIN", 0)
    monkeypatch.setattr(safetensors_io, "DIRECT_CHUNK", safetensors_io.DIRECT_ALIGN)
    rng = np.random.default_rng(3)
    tensors = {
        "a": rng.standard_normal((3, 700)).astype(np.float32),
        "b": rng.standard_normal(4100).astype(np.float16),  # where "empty" is, over a chunk
        "empty": np.zeros((0, 2), np.float32),
        "c": rng.standard_normal(2100).astype(np.float32),
    }
    path = tmp_path / "p.safetensors"
    safetensors_io.write(path, tensors)
    size = path.stat().st_size
    if way == "direct":
        assert not safetensors_io._cached(path, size)  # written past the cache
    else:
        path.read_bytes()
        assert safetensors_io._cached(path, size)
    if way == "no direct I/O":
        monkeypatch.setattr(safetensors_io, "_cached", lambda path, size: False)
        without_direct_io(monkeypatch)
    direct = []
    read = safetensors_io._read_direct
    monkeypatch.setattr(
        safetensors_io, "_read_direct", lambda *args: direct.append(read(*args)) or direct[-1]
    )
    stored = SafetensorsFile(path)
    outs = {name: np.full(a.shape, np.nan, a.dtype) for name, a in tensors.items()}
    stored.read_all_into([(name, outs[name]) for name in ("b", "empty", "c", "a")])
    for name, a in tensors.items():
        np.testing.assert_array_equal(outs[name], a)
    assert direct == {"direct": [True], "cached": [], "no direct I/O": [False]}[way]
    # A tensor asked for twice: each copy gets all of its values (through the cache).
    twice = [np.full(tensors["a"].shape, np.nan, np.float32) for _ in range(2)]
    stored.read_all_into([("a", twice[0]), ("a", twice[1])])
    for out in twice:
        np.testing.assert_array_equal(out, tensors["a"])


def test_writer_fails_on_a_full_disk_before_writing(tmp_path, monkeypatch):
    """No space for the file is an OSError from reserving it, before anything is written."""
    import errno
    import os

    from builder import safetensors_io

    def full(fd, offset, size):
        raise OSError(errno.ENOSPC, "No space left on device")

    def written(*args):
        raise AssertionError("a write was made")

    monkeypatch.setattr(safetensors_io, "DIRECT_MIN", 0)
    monkeypatch.setattr(os, "posix_fallocate", full)
    monkeypatch.setattr(os, "pwrite", written)
    with pytest.raises(OSError, match="No space left"):
        safetensors_io.write(tmp_path / "p.safetensors", {"w": np.ones(1000, np.float32)})


def test_writer_raises_what_a_write_raised(tmp_path, monkeypatch):
    """A direct write that fails fails the whole write with its own error, once the writes
    in flight have ended."""
    from builder import safetensors_io

    pwrite = safetensors_io._pwrite

    def failing(fd, stage, length, at):
        if at >= safetensors_io.DIRECT_ALIGN:
            raise OSError("the disk went away")
        pwrite(fd, stage, length, at)

    monkeypatch.setattr(safetensors_io, "_pwrite", failing)
    monkeypatch.setattr(safetensors_io, "DIRECT_MIN", 0)
    monkeypatch.setattr(safetensors_io, "DIRECT_CHUNK", safetensors_io.DIRECT_ALIGN)
    with pytest.raises(OSError, match="the disk went away"):
        safetensors_io.write(tmp_path / "p.safetensors", {"w": np.ones(5000, np.float32)})


def test_saved_params_digest_is_the_file_digest(tmp_path, monkeypatch):
    """`save_params` returns the sha256 it computed while writing, which `write_manifest`
    takes as known; a file changed after it was written is hashed anew."""
    import hashlib

    from builder import artifact

    arrays = {"w": np.arange(12, dtype=np.float32), "b": np.ones(3, np.float32)}
    hashed = []
    real = artifact.sha256
    monkeypatch.setattr(artifact, "sha256", lambda p: hashed.append(p) or real(p))
    for changed in (False, True):
        folder = tmp_path / str(changed)
        folder.mkdir()
        written = artifact.save_params(folder, ["w", "b"], arrays)
        params = folder / artifact.PARAMS
        if changed:  # the same size, other bytes
            params.write_bytes(params.read_bytes()[:-4] + b"\0\0\0\0")
        manifest: dict = {}
        artifact.write_manifest(folder, manifest, known=written)
        expect = hashlib.sha256(params.read_bytes()).hexdigest()
        assert manifest["files"][artifact.PARAMS]["sha256"] == expect
        assert hashed == ([params] if changed else [])  # read back only when changed


def test_a_clip_models_projection_width_is_its_own(tmp_path):
    """CLIPModel's visual_projection is CLIPConfig's projection_dim wide; its vision_config
    keeps the default 512. The checkpoint check and `build import` read the model's."""
    from transformers import CLIPConfig

    from builder import families
    from builder.hf_import import import_config
    from builder.weights.hf import check_config

    config = CLIPConfig(vision_config=TINY, text_config=TEXT, projection_dim=16)
    config.save_pretrained(tmp_path)
    assert (
        json.loads((tmp_path / "config.json").read_text())["vision_config"]["projection_dim"] == 512
    )  # what makes the two differ
    assert import_config(tmp_path / "config.json").preset["model"]["projection_dim"] == 16
    clip = families.get("clip")
    fields = {k: v for k, v in TINY.items() if k != "model_type"}
    check_config(tmp_path, clip, clip.config(**fields, projection_dim=16))
    with pytest.raises(InputError, match="projection_dim"):
        check_config(tmp_path, clip, clip.config(**fields, projection_dim=512))
