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
    batch: int
    threads: int
    runs: list[float]
    gflop: float

    @property
    def median(self) -> float:
        return statistics.median(self.runs)

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
    encoder: Encoder, batch: int, runs: int, progress: Callable[[str], None] = lambda _: None
) -> BenchResult:
    shape = [batch, *encoder.input_shape[1:]]
    x = np.random.default_rng(0).standard_normal(shape, dtype=np.float32)
    work = encoder.manifest["gflop_per_image"] * batch
    progress(f"warm-up, then {runs} runs at batch {batch} on {encoder.threads} threads")
    times = time_call(lambda: encoder(x), runs)
    return BenchResult(batch, encoder.threads, times, work)
