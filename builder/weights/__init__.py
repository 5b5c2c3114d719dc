"""Parameters for an assembled tower: a seeded random init or an HF checkpoint."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..config import Preset
from .hf import check_config, read_tower
from .random_init import RandomParams, random_weights


def load_weights(
    preset: Preset, shapes: dict[str, tuple[int, ...]], on_demand: bool = False
) -> tuple[dict[str, np.ndarray] | RandomParams, dict[str, Any]]:
    """Arrays for every parameter in `shapes` (float32), and a record of their source for
    the manifest. With `on_demand`, a random init is a `RandomParams`, made parameter by
    parameter when asked for (a checkpoint is read all the same)."""
    source = preset.weights
    if source.is_random:
        info = {
            "kind": "random",
            "seed": source.seed,
            "note": "random weights, not a trained model",
        }
        if on_demand:
            return RandomParams(shapes, source.seed), info
        return random_weights(shapes, source.seed), info
    from .. import families
    from ..assemble import parameter_shapes  # imports TVM

    family = families.get(preset.family)
    check_config(source.path, family, preset.model, preset.blocks.projector)
    if any(names.name == "open_clip" for names in family.name_maps):
        from ..openclip_import import check_config as check_open_clip_config

        check_open_clip_config(source.path, preset.model)
    known = parameter_shapes(preset.model.full(), preset.blocks)
    return read_tower(source.path, family, shapes, known, preset.blocks.projector)
