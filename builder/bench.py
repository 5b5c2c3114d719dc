"""Latency and throughput of a loaded artifact (`build bench`)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .runtime import Encoder


@dataclass
class BenchResult:
    """`batch` images per run; an artifact with a crop scheme runs one image per run, its
    `crops` as one batch (as `encode_images` does)."""

    batch: int
    threads: int
    runs: list[float]
    gflop: float
    crops: int | None = None
    # A native tower's image: its patch grid (rows, cols).
    grid: tuple[int, int] | None = None

    @property
    def median(self) -> float:
        return statistics.median(self.runs)

    @property
    def per_crop(self) -> float:
        """The median run's seconds per crop (per image without a crop scheme)."""
        return self.median / (self.crops or self.batch)

    @property
    def images_per_s(self) -> float:
        return self.batch / self.median

    @property
    def gflops(self) -> float:
        return self.gflop / self.median


def time_call(fn: Callable[[], object], runs: int, warmup: int = 1) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def bench(
    encoder: Encoder,
    batch: int,
    runs: int,
    progress: Callable[[str], None] = lambda _: None,
    crops: int | None = None,
    grid: tuple[int, int] | None = None,
) -> BenchResult:
    """`crops`: an artifact with a crop scheme runs one image of this many crops per run
    (`batch` must be 1). A native tower's artifact runs one image of `grid` patches (rows,
    cols) per run, the host's part (rotary tables, windows) included."""
    if encoder.native:
        return _bench_native(encoder, runs, progress, grid or square_grid(encoder))
    if crops and batch != 1:
        raise ValueError(f"batch {batch} with crops {crops}: an image of crops runs alone")
    calls = crops or batch
    shape = [calls, *encoder.input_shape[1:]]
    x = np.random.default_rng(0).standard_normal(shape, dtype=np.float32)
    # the manifest's figure is per crop, the artifact's batch element
    work = encoder.manifest["gflop_per_image"] * calls
    what = f"one image of {crops} crops" if crops else f"batch {batch}"
    progress(f"warm-up, then {runs} runs of {what} on {encoder.threads} threads")
    times = time_call(lambda: encoder(x), runs)
    return BenchResult(batch, encoder.threads, times, work, crops)


def most_crops(encoder: Encoder) -> int | None:
    """The most crops the artifact's crop scheme cuts from one image (`crops.most_crops`);
    None without a crop scheme."""
    from . import crops, preprocess

    if not encoder.variable_length:
        return None
    steps = preprocess.steps_from_manifest(encoder.manifest)
    return crops.most_crops(steps, int(encoder.input_shape[-1]))


def _bench_native(
    encoder: Encoder, runs: int, progress: Callable[[str], None], grid: tuple[int, int]
) -> BenchResult:
    from . import families
    from .flops import native_gflop

    config = encoder.model_config
    native = families.get(encoder.manifest["resolved_preset"]["family"]).native
    patches, image_grid = native.sample(config, *grid, 0)
    work = native_gflop(encoder.manifest["gflop_per_patch"], len(patches))
    progress(f"warm-up, then {runs} runs of one image of {grid[0]} x {grid[1]} patches")
    times = time_call(lambda: encoder.run_patches(patches, image_grid), runs)
    return BenchResult(1, encoder.threads, times, work, grid=grid)


def square_grid(encoder: Encoder) -> tuple[int, int]:
    """The patch grid of the largest square image the artifact's processor rule gives."""
    from . import native_preprocess, preprocess

    config = encoder.model_config
    steps = preprocess.steps_from_manifest(encoder.manifest)
    merge = config.merge_size(encoder.projector)
    return native_preprocess.square_grid(steps, config.patch_size, merge)
