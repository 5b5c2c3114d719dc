"""Shared fixtures: tiny HF checkpoints made in the test (never downloaded), and builds."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from builder import families
from builder.build import build
from builder.cache import CACHE_ENV, KERNELS_ENV
from builder.config import TargetConfig
from builder.preset import load_preset
from builder.runtime import available_cores, load
from builder.targets import llvm
from builder.targets.cpu.kernels import _has, bf16_gemms, half_gemms

# Tests compare numbers; keep TVM and torch on the same thread count.
os.environ.setdefault("TVM_NUM_THREADS", str(available_cores()))

REPO = Path(__file__).resolve().parent.parent
HOST, _ = llvm.tvm_target(TargetConfig())  # the default llvm target: this machine's CPU
needs_half = pytest.mark.skipif(
    not half_gemms(HOST), reason="float16 GEMMs need a CPU with AVX-512 FP16"
)
needs_bf16 = pytest.mark.skipif(
    not bf16_gemms(HOST), reason="bfloat16 GEMMs need a CPU with AVX-512 BF16"
)
needs_avx512 = pytest.mark.skipif(
    not _has(HOST, "avx512f"), reason="runs AVX-512 code, or expects its kernel shapes"
)


def cpu_target(options: dict[str, str]) -> Any:
    """The llvm target of an entry with these options: this machine's CPU (`HOST`) for none."""
    return llvm.tvm_target(TargetConfig(**options))[0] if options else HOST


def rounding(precision: str) -> dict[str, str]:
    """Target options under which `precision` GEMMs (float16 or bfloat16) round their
    operands to 16 bits and multiply in float32, for a CPU this machine runs: its own where
    it lacks native GEMMs of that type, else x86-64-v4 (AVX-512 without BF16 or FP16)."""
    native = half_gemms(HOST) if precision == "float16" else bf16_gemms(HOST)
    return {"mcpu": "x86-64-v4"} if native else {}


PRESETS = sorted((REPO / "presets").glob("*.yaml"))

TINY = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_attention_heads": 4,
    "num_hidden_layers": 3,
    "image_size": 30,  # not a multiple of the patch: the conv floors to 3 x 3
    "patch_size": 8,
}


# A kernel store for the session to use instead of its own (`shared_cache`).
TEST_KERNELS_ENV = "BUILDER_TEST_KERNEL_DIR"

# The files that take longest, longest first (their times: docs/testing.md, "Time"). The
# workers take whole files in collection order (`--dist loadfile --no-loadscope-reorder` in
# pyproject.toml), so that no long file starts while the other worker is nearly done.
LONGEST_FIRST = [
    "test_parity_presets.py",
    "test_cpu_pipeline.py",
    "test_families.py",
    "test_encode.py",
    "test_cpu_seq.py",
    "test_cpu_patterns.py",
    "test_encode_ray.py",
    "test_fallback.py",
    "test_parity.py",
    "test_targets.py",
    "test_e2e.py",
    "test_cache.py",
    "test_openclip.py",
    "test_atomic.py",
    "test_cross_run.py",
    "test_tvmscript.py",
    "test_native.py",
    "test_vlm.py",
]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: files stay whole


@pytest.fixture(scope="session", autouse=True)
def shared_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One build cache for the whole session (never the user's), subprocesses and every
    xdist worker included: tests that build the same tower reuse its artifact, library and
    parameters, as a user's builds do, and two workers building one key wait on its lock.
    Its keys cover everything a build depends on (builder/cache.py). Its kernel store serves
    the per-test caches of `build_cache` too: the session's own, or `TEST_KERNELS_ENV`'s
    where set (CI keeps one between runs, as a user's cache keeps its kernels)."""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # the session's folder, above each worker's own
    folder = base / "shared-cache"
    folder.mkdir(exist_ok=True)
    kernels = os.environ.get(TEST_KERNELS_ENV) or str(folder / "kernels")
    settings = {CACHE_ENV: str(folder), KERNELS_ENV: kernels}
    before = {name: os.environ.get(name) for name in settings}
    os.environ.update(settings)
    yield folder
    for name, value in before.items():
        if value is None:
            del os.environ[name]
        else:
            os.environ[name] = value


@pytest.fixture
def build_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty build cache for this test alone: for tests of the cache itself, and for tests
    that change the pipeline under the cache's feet (a broken compile, a hidden tool). Its
    kernels are the session's (a kernel is its text's parse, whichever pipeline asks for it);
    a test of the kernel store itself unsets `BUILDER_KERNEL_DIR`."""
    folder = tmp_path_factory.mktemp("cache")
    monkeypatch.setenv(CACHE_ENV, str(folder))
    return folder


def tiny_overrides(**extra: Any) -> list[str]:
    fields = {**TINY, **extra}
    return [f"model.{k}={v}" for k, v in fields.items()]


def randomize(model: Any, seed: int = 0) -> Any:
    """Give every parameter random values, norms and biases included, so that a swapped
    weight and bias, or a missing norm, shows up in the numbers (HF's init leaves norms at
    1 and biases at 0)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen) * 0.1
            p.copy_(1.0 + noise if "norm" in name and name.endswith("weight") else noise)
    return model.eval()


def hf_vision_config(**fields: Any) -> Any:
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(**{**TINY, **fields})


def save_vision_model(folder: Path, seed: int = 0, **fields: Any) -> Any:
    """An HF CLIPVisionModel with random weights, saved with save_pretrained."""
    from transformers import CLIPVisionModel

    model = randomize(CLIPVisionModel(hf_vision_config(**fields)), seed)
    model.save_pretrained(folder)
    return model


def save_siglip_model(folder: Path, seed: int = 0, **fields: Any) -> Any:
    """An HF SiglipVisionModel (with its attention-pooling head unless vision_use_head is
    False) with random weights, saved with save_pretrained."""
    from transformers import SiglipVisionConfig, SiglipVisionModel

    model = randomize(SiglipVisionModel(SiglipVisionConfig(**{**TINY, **fields})), seed)
    model.save_pretrained(folder)
    return model


def hf_names(family: str, fields: dict[str, Any]) -> dict[str, Any]:
    """`fields`, named as the shared interface names them (num_hidden_layers,
    num_attention_heads), under the family config's names: its HF config's (Qwen2.5-VL's
    `depth`, `num_heads`, from the HF class's attribute_map)."""
    import transformers

    reference = getattr(transformers, families.get(family).reference_config)
    return {reference.attribute_map.get(k, k): v for k, v in fields.items()}


def save_hf_tower(folder: Path, preset: Any, seed: int = 0) -> Any:
    """The HF model a preset describes (its family's reference class), at the preset's
    widths, with every parameter random, saved to `folder` with save_pretrained."""
    from transformers.initialization import no_init_weights

    family = families.get(preset.family)
    classes = family.embeds_reference if preset.model.output == "embeds" else None
    with no_init_weights():  # HF's init is slow at real widths; randomize sets every value
        model = randomize(family.reference_model(preset.model, classes), seed)
    model.save_pretrained(folder)
    return model


def pixels(batch: int, size: int, seed: int = 1, channels: int = 3) -> np.ndarray:
    return (
        np.random.default_rng(seed)
        .standard_normal((batch, channels, size, size))
        .astype(np.float32)
    )


def assert_close(ours: np.ndarray, ref: np.ndarray, rel: float = 1e-4) -> float:
    """Max abs error under rel * max|ref|; returns the relative error."""
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    err = float(np.max(np.abs(ours - ref)))
    scale = float(np.max(np.abs(ref)))
    assert err <= rel * scale, f"max abs error {err:.3g} > {rel} * max|ref| {scale:.3g}"
    return err / scale


# Patch grids (rows, cols) of the images a native tower is checked on: odd, not square, one
# patch wide, and one larger than the rest.
NATIVE_GRIDS = [(3, 5), (6, 1), (7, 4), (2, 2)]


def assert_native_images_match(enc: Any, hf_model: Any, config: Any) -> None:
    """A native tower's artifact against its HF reference, image by image (the family's
    `NativeTower.sample` and `reference`)."""
    native = families.get(enc.manifest["resolved_preset"]["family"]).native
    for i, (rows, cols) in enumerate(NATIVE_GRIDS):
        patches, grid = native.sample(config, rows, cols, i)
        assert_close(enc.run_patches(patches, grid), native.reference(hf_model, patches, grid))


def gemm_panels(folder: Path, columns: int = 64) -> set[tuple[int, ...]]:
    """Shapes of the packed GEMM weights an artifact stores: [blocks, K rows (K/2 rows of
    16-bit pairs), `columns`] (the kernels' panel width: 64 for AVX-512, 16 for AVX2)."""
    import safetensors.numpy

    stored = safetensors.numpy.load_file(str(folder / "params.safetensors"))
    return {
        a.shape
        for n, a in stored.items()
        if n.startswith("packed") and a.ndim == 3 and a.shape[-1] == columns
    }


def build_and_load(preset: str | Path, overrides: list[str], out: Path) -> Any:
    resolved = load_preset(preset, overrides)
    (built,) = build(resolved, out, only=["llvm"])  # the one this machine runs
    return load(built.path)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    folder = tmp_path_factory.mktemp("hf-tiny")
    return folder, save_vision_model(folder)


def expected_features(hf_model: Any, config: Any, pixels_: np.ndarray) -> np.ndarray:
    """What the preset's feature selection means, computed from HF's own outputs:
    hidden_states[i] for each selected i (post_layernorm on the final one if asked),
    concatenated on the last axis, CLS dropped for the 'default' strategy. A model in half
    precision takes the pixels in its dtype; its states come back as float32."""
    import torch

    dtype = next(hf_model.parameters()).dtype
    with torch.inference_mode():
        out = hf_model(torch.from_numpy(pixels_).to(dtype), output_hidden_states=True)
    states = [h.float().numpy() for h in out.hidden_states]
    picked = []
    for i in config.feature_layers:
        state = states[i]
        if i == config.num_hidden_layers and config.final_norm:
            if config.normed_last_state:
                state = out.last_hidden_state.numpy()  # with the family's final norm
            else:
                # CLIP's post-LayerNorm on every token: HF applies it to the CLS token only.
                norm = getattr(hf_model, "vision_model", hf_model).post_layernorm
                with torch.inference_mode():
                    state = norm(torch.from_numpy(state)).numpy()
        picked.append(state)
    out = np.concatenate(picked, axis=-1)
    prefix = out.shape[1] - config.num_patches
    return out[:, prefix:] if config.feature_select_strategy == "default" else out


def expected_output(hf_model: Any, config: Any, pixels_: np.ndarray) -> np.ndarray:
    """The artifact's output for `config.output`: HF's image_embeds (or pooler_output where
    the family has no projection; normalized if asked), pooler_output, or the features."""
    import torch

    if config.pools:
        with torch.inference_mode():
            out = hf_model(torch.from_numpy(pixels_))
        projected = getattr(out, "image_embeds", None)  # CLIPVisionModelWithProjection's
        pooled = (out.pooler_output if projected is None else projected).numpy()
        if config.output == "embeds" and config.normalize_embeds:
            pooled /= np.linalg.norm(pooled, axis=-1, keepdims=True)
        return pooled
    return expected_features(hf_model, config, pixels_)
