"""The seeded random init: deterministic, for building and timing a tower without a
checkpoint. Follows HF's CLIP init scheme: normal(0, 0.02) matrices, zero biases, unit norm
scales. Each parameter has its own stream, keyed by (seed, name), so changing the layer
count leaves the other parameters as they were."""

from __future__ import annotations

import zlib

import numpy as np

STD = 0.02


def random_param(name: str, shape: tuple[int, ...], seed: int) -> np.ndarray:
    if name.endswith(".bias"):
        return np.zeros(shape, np.float32)
    if len(shape) == 1 and name.endswith(".weight"):
        return np.ones(shape, np.float32)
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    out = rng.standard_normal(shape, dtype=np.float32)
    out *= STD
    return out


def random_weights(shapes: dict[str, tuple[int, ...]], seed: int) -> dict[str, np.ndarray]:
    return {name: random_param(name, shape, seed) for name, shape in shapes.items()}
