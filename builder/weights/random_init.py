"""The seeded random init: deterministic, for building and timing a tower without a
checkpoint. HF's CLIP init scheme in scale: matrices of standard deviation 0.02 (uniform in
[-0.02 sqrt(3), 0.02 sqrt(3)), which numpy draws several times faster than normals; the
values are not a trained model's either way), zero biases, unit norm scales. Each parameter
has its own stream, keyed by (seed, name), so changing the layer count leaves the other
parameters as they were.

Made for speed (a ViT-L has 0.3 G values): the streams fill their parameters on a thread
per core (numpy's generators release the GIL), each writing its values straight into the
parameter and scaling them in chunks small enough to stay in the core's cache, so memory is
written once. The parameters are views of one block of memory, aligned so that TVM takes
them without a copy (`artifact.empty_arrays`)."""

from __future__ import annotations

import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .. import artifact
from ..runtime import available_cores

STD = 0.02
# Half the width of the uniform distribution of standard deviation STD.
HALF_WIDTH = STD * 3**0.5
# Values generated and scaled at a time: 256 KiB of float32, within any L2.
CHUNK = 1 << 16
# Values below which a parameter made alone is not split between threads.
SPLIT_MIN = 1 << 18


def random_param(
    name: str,
    shape: tuple[int, ...],
    seed: int,
    out: np.ndarray | None = None,
    pool: ThreadPoolExecutor | None = None,
    parts: int = 1,
) -> np.ndarray:
    """Parameter `name`'s values, written into `out` (float32, C-contiguous, `shape`) when
    given. The same values either way, and the same as one `random(shape)` call mapped to
    [-HALF_WIDTH, HALF_WIDTH): a generator's stream does not depend on how its draws are
    split. With a `pool`, a large parameter's stream is cut into `parts` that the pool's
    threads and this one fill at once, each from a copy of the generator advanced to its
    start (a float32 draw takes 32 bits: two per step of the generator, so each part
    starts at an even index)."""
    if out is None:
        out = np.empty(shape, np.float32)
    if name.endswith(".bias"):
        out.fill(0.0)
    elif len(shape) == 1 and name.endswith(".weight"):
        out.fill(1.0)
    else:
        rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
        flat = out.reshape(-1)
        if pool is None or parts < 2 or flat.size < SPLIT_MIN:
            _uniform(rng, flat)
            return out
        starts = [flat.size * j // parts & ~1 for j in range(parts)] + [flat.size]
        rest = []
        for begin, end in zip(starts[1:-1], starts[2:], strict=True):
            generator = np.random.PCG64()
            generator.state = rng.bit_generator.state
            generator.advance(begin // 2)
            rest.append(pool.submit(_uniform, np.random.Generator(generator), flat[begin:end]))
        _uniform(rng, flat[: starts[1]])
        for done in rest:
            done.result()
    return out


def _uniform(rng: np.random.Generator, flat: np.ndarray) -> None:
    """`flat` filled from `rng`'s stream, in [-HALF_WIDTH, HALF_WIDTH)."""
    for start in range(0, flat.size, CHUNK):
        chunk = flat[start : start + CHUNK]
        rng.random(dtype=np.float32, out=chunk)
        chunk *= 2 * HALF_WIDTH
        chunk -= HALF_WIDTH


def random_weights(
    shapes: dict[str, tuple[int, ...]], seed: int, threads: int | None = None
) -> dict[str, np.ndarray]:
    """Every parameter of `shapes`, float32, filled by `threads` threads (default: one per
    core this process may use)."""
    names = list(shapes)
    buffers = artifact.empty_arrays([(shapes[n], np.dtype(np.float32)) for n in names])
    arrays = dict(zip(names, buffers, strict=True))
    # Largest first, so that no thread is left with a big one at the end.
    order = sorted(names, key=lambda n: -arrays[n].size)
    with ThreadPoolExecutor(max(1, threads or available_cores())) as pool:
        for done in [pool.submit(random_param, n, shapes[n], seed, arrays[n]) for n in order]:
            done.result()
    return arrays


class RandomParams:
    """The same init made on demand, for a build that packs each parameter as it writes
    it (`builder.packing`): `fill` writes one parameter's values into a buffer of the
    caller's, so the parameters are never all in memory."""

    def __init__(self, shapes: dict[str, tuple[int, ...]], seed: int):
        self.shapes, self.seed = dict(shapes), seed
        self._parts = available_cores()
        self._pool = ThreadPoolExecutor(max(1, self._parts - 1))

    def fill(self, name: str, out: np.ndarray) -> None:
        """One parameter at a time: its stream cut between every core (`random_param`)."""
        random_param(name, self.shapes[name], self.seed, out, self._pool, self._parts)
