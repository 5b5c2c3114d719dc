"""Load an artifact folder and run it: float32 NCHW numpy in, features out.

Needs TVM's runtime library and numpy, not TVM's compiler (`builder.vm`), nor torch.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from . import artifact, devices, vm

THREADS_ENV = "TVM_NUM_THREADS"
# How long an idle pool thread spins (sched_yield calls) before it sleeps. TVM's default
# keeps a core busy long after every call, which slows whatever the process runs next (a
# language model, say); docs/artifacts.md has the figures.
SPIN_ENV, SPIN_DEFAULT = "TVM_THREAD_POOL_SPIN_COUNT", "10000"


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def set_threads(threads: int | None) -> int:
    """Size TVM's CPU thread pool. TVM reads TVM_NUM_THREADS when the pool starts; without
    it, TVM uses half the hardware threads (one on a 2-core machine). An explicit `threads`
    wins; else an existing TVM_NUM_THREADS; else every core this process may use. Also
    shortens the idle threads' spinning (`SPIN_ENV`) unless it is set already."""
    os.environ.setdefault(SPIN_ENV, SPIN_DEFAULT)
    if threads is not None:
        os.environ[THREADS_ENV] = str(threads)
    else:
        os.environ.setdefault(THREADS_ENV, str(available_cores()))
    return int(os.environ[THREADS_ENV])


class Encoder:
    """A loaded artifact. Call it with pixel values of shape (batch, C, H, W), float32.

    Loading checks the artifact against its manifest (`artifact.verify`: sizes and times,
    every byte with `verify=True`) and the TVM version it was built with, and raises
    `ArtifactError` naming the file on a mismatch."""

    def __init__(self, folder: str | Path, threads: int | None = None, verify: bool = False):
        self.folder = Path(folder)
        # Read one version: a build publishing meanwhile swaps the link, not these files.
        here = self.folder.resolve()
        self.threads = set_threads(threads)
        # After set_threads: the pool reads the variable when it starts. TVM's runtime
        # library alone, torch hidden (builder.vm); TVM itself for a cuda artifact.
        self.manifest: dict[str, Any] = artifact.check(here, full=verify)
        self.device = devices.open_device(self.folder, self.manifest)
        self.vm = vm.load_vm(here / self.manifest["library"], self.device)
        self._fn = self.vm[self.manifest["entry"]]
        on_cpu = vm.on_cpu(self.device)

        def empty(shape: tuple[int, ...], dtype: str) -> Any:
            # On the CPU, the file is read straight into the tensors the VM takes. numpy
            # cannot view a bfloat16 tensor: those (and a GPU's) come as numpy arrays.
            if on_cpu and dtype != "bfloat16":
                return vm.empty(shape, dtype, self.device)
            return None

        self._params = [
            p if not isinstance(p, np.ndarray) else vm.tensor(p, self.device)
            for p in artifact.load_params(here, self.manifest["params"]["order"], empty)
        ]
        if self.manifest["params"].get("packing") == "load":
            # A cross-compiled library: its pipeline's weight layouts are made here, once.
            self._params = list(self.vm["transform_params"](*self._params))
        self._inputs: list[dict[str, Any]] = self.manifest["inputs"]
        self._config: Any = None
        self.input_shape: list[int | str] = self._inputs[0]["shape"]
        self.output_shape: list[int | str] = self.manifest["outputs"][0]["shape"]

    @property
    def native(self) -> bool:
        """Whether the artifact is a native-resolution tower's: one image per call, as its
        patches and the arrays computed from its grid (`run_patches`)."""
        return bool(self.model_config.native)

    @property
    def projector(self) -> str | None:
        return self.manifest["resolved_preset"]["blocks"]["projector"]

    def run_patches(self, patches: np.ndarray, grid: Sequence[int]) -> np.ndarray:
        """A native tower's features for one image: its patches, (n, P) float32 in the order
        the family's processor gives them, and its patch grid (HF's image_grid_thw or
        spatial shape; the family's `NativeTower` says which). Returns (tokens, width)."""
        from . import families

        if not self.native:
            raise ValueError(
                f"{self.folder}: not a native-resolution artifact; call it with pixels"
            )
        family = families.get(self.manifest["resolved_preset"]["family"])
        config = self.model_config
        row_width = family.native.row_width
        width = row_width(config) if row_width else int(self.input_shape[-1])
        if not isinstance(patches, np.ndarray) or patches.ndim != 2 or patches.shape[1] != width:
            raise ValueError(f"patches must be a float32 array of shape (n, {width})")
        arrays = family.native.inputs(config, np.ascontiguousarray(patches, np.float32), grid)
        args = [vm.tensor(arrays[spec["name"]], self.device) for spec in self._inputs]
        out = vm.array(self._fn(*args, *self._params), copy=True)
        return family.native.finish(config, out, grid) if family.native.finish else out

    @property
    def model_config(self) -> Any:
        """The artifact's model config (its family's dataclass), from the manifest."""
        from . import families

        if self._config is None:
            resolved = self.manifest["resolved_preset"]
            self._config = families.get(resolved["family"]).config(**resolved["model"])
        return self._config

    def check_input(self, pixel_values: Any) -> np.ndarray:
        if not isinstance(pixel_values, np.ndarray):
            raise ValueError(
                f"pixel_values must be a numpy array, got {type(pixel_values).__name__}"
            )
        want = tuple(self.input_shape[1:])
        if pixel_values.ndim != 4 or pixel_values.shape[1:] != want or pixel_values.shape[0] < 1:
            raise ValueError(
                f"pixel_values must have shape (batch, {', '.join(map(str, want))}), "
                f"got {pixel_values.shape}"
            )
        if pixel_values.dtype != np.float32:
            raise ValueError(
                f"pixel_values must be float32, got {pixel_values.dtype}; "
                "use pixel_values.astype(np.float32)"
            )
        return np.ascontiguousarray(pixel_values)

    def __call__(self, pixel_values: np.ndarray) -> np.ndarray:
        """Features of a float32 batch of crops, (batch, tokens, dim)."""
        return self._run(pixel_values)[0]

    def _run(self, pixel_values: np.ndarray) -> list[np.ndarray]:
        """Every output of `forward`: the features, and LLaVA-NeXT's newline vector where
        the artifact has one (`manifest["outputs"]`)."""
        x = vm.tensor(self.check_input(pixel_values), self.device)
        out = self._fn(x, *self._params)
        # Copies: the caller keeps them (a view would hold the VM's pooled memory, and an
        # output may be a parameter itself, LLaVA-NeXT's newline).
        if len(self.manifest["outputs"]) == 1:
            return [vm.array(out, copy=True)]
        return [vm.array(o, copy=True) for o in out]

    @property
    def variable_length(self) -> bool:
        """Whether an image's token count depends on the image (a crop scheme: anyres,
        dynamic tiles, image splitting): then `encode_images` returns one array per image."""
        from . import crops, preprocess

        if "preprocess" not in self.manifest:
            return False
        if self.native:
            return True
        return crops.scheme(preprocess.steps_from_manifest(self.manifest)) is not None

    def encode_images(
        self,
        images: Sequence[str | Path | Any],
        batch_size: int = 8,
        progress: Callable[[int, int], None] | None = None,
        record: list[dict[str, Any]] | None = None,
    ) -> np.ndarray | list[np.ndarray]:
        """Image files or PIL images -> features (N, tokens, dim), in the order given; with
        a crop scheme (`variable_length`), a list of (tokens_i, dim) arrays instead, each what
        HF's `get_image_features` gives for the image (its crops run as one batch).

        Each image goes through the preprocessing the manifest records (the preset's
        `preprocess` section, as HF's CLIPImageProcessorPil). Every path is checked before any
        work starts: a missing or unreadable image is an `InputError` naming it (all of them at
        once), never a silently shorter result. `progress(done, total)` is called after each
        batch of at most `batch_size` images (of each image with anyres crops). `record`, a
        list, receives each image's crop count and tile grid (with a crop scheme only).
        """
        from . import preprocess

        if "preprocess" not in self.manifest:
            raise ValueError(f"{self.folder}: the manifest records no preprocessing; rebuild it")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        images = list(images)
        if not images:
            raise ValueError("no images given")
        preprocess.check_images(images)
        steps = preprocess.steps_from_manifest(self.manifest)
        if self.native:
            return self._encode_native(images, steps, progress, record)
        if self.variable_length:
            return self._encode_crops(images, steps, progress, record)
        out = []
        for start in range(0, len(images), batch_size):
            chunk = images[start : start + batch_size]
            out.append(self(preprocess.preprocess_batch(chunk, steps, first=start)))
            if progress is not None:
                progress(start + len(chunk), len(images))
        return np.concatenate(out)

    def _encode_native(
        self,
        images: list[Any],
        steps: Any,
        progress: Callable[[int, int], None] | None,
        record: list[dict[str, Any]] | None = None,
    ) -> list[np.ndarray]:
        """Each image at its own size through the family's processor, one call each."""
        from . import preprocess
        from .native_preprocess import native_patches

        config = self.model_config
        sizes = {"merge_size": config.merge_size(self.projector)}
        if hasattr(config, "temporal_patch_size"):
            sizes["temporal_patch_size"] = config.temporal_patch_size
        out = []
        for i, image in enumerate(images):
            name = preprocess.image_name(image, i)
            native = native_patches(image, steps, config.patch_size, name=name, **sizes)
            out.append(self.run_patches(native.patches, native.grid))
            if record is not None:
                record.append({"grid": list(native.grid), "size": list(native.size)})
            if progress is not None:
                progress(i + 1, len(images))
        return out

    def _encode_crops(
        self,
        images: list[Any],
        steps: Any,
        progress: Callable[[int, int], None] | None,
        record: list[dict[str, Any]] | None = None,
    ) -> list[np.ndarray]:
        from . import crops, preprocess

        side = int(self.input_shape[-1])
        grid_side = side // self.manifest["resolved_preset"]["model"]["patch_size"]
        out = []
        for i, image in enumerate(images):
            name = preprocess.image_name(image, i)
            rgb = preprocess.rgb_image(image, steps, name)
            cut = crops.cut(rgb, steps, side, name)
            features, *newline = self._run(cut.pixels)  # the crops of an image: one batch
            if steps.image_grid_pinpoints:
                limit = crops.max_tiles(steps.vision_aspect_ratio)
                out.append(crops.pack_anyres(features, cut, grid_side, newline[0], name, limit))
            else:  # the crops' tokens in order
                out.append(features.reshape(-1, features.shape[-1]))
            if record is not None:
                record.append({"crops": len(cut.pixels), "grid": list(cut.grid)})
            if progress is not None:
                progress(i + 1, len(images))
        return out

    def __repr__(self) -> str:
        return (
            f"Encoder({str(self.folder)!r}, input {self.input_shape}, "
            f"output {self.output_shape}, threads {self.threads})"
        )


def load(folder: str | Path, threads: int | None = None, verify: bool = False) -> Encoder:
    """Load an artifact folder written by `build` (e.g. `artifacts/llava-clip/llvm`).
    `verify=True` hashes every file instead of trusting unchanged sizes and times."""
    return Encoder(folder, threads, verify)
