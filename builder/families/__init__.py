"""Tower families: the unit of extension.

A family is one record (`Family`) in a module of this package, beside the config dataclass
of its model fields (named as in its HF config). The record holds what the rest of the
builder needs to know about it, as data:

- `config`: the dataclass of the preset's `model` section (its JSON Schema is
  `schemas/families/<name>.json`);
- `blocks`: which registered block fills each slot, as a function of the config (a preset's
  `blocks:` section overrides it);
- `names`: how the keys of the family's checkpoints map onto the tower's parameters
  (`NameMap`: prefixes, renames, fused tensors to split, transposes, keys to ignore, position
  tables that may be resampled); `layouts`: other checkpoint layouts of the same tower
  (open_clip's, timm's), each a `NameMap`, the checkpoint's found by its anchor;
- `hf_model_types`: the `model_type`s of the HF configs `build import` reads as this family;
- `reference`: the HF transformers model and config classes the tower equals (tests and the
  benchmark build them);
- `native`: for towers that take each image at its own size (`NativeTower`), the host code
  that turns an image's patches and grid into the arrays the artifact takes.

The loader, the importer, the schema check, the FLOP count, the tests' fixtures and the
benchmark read these records and nothing family-specific. Built-in families are the modules
of this package; importing them needs no TVM. See docs/families.md.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..errors import BuilderError, InputError

DEFAULT = "clip"


@dataclass(frozen=True)
class Split:
    """One checkpoint tensor holding several of ours stacked on `axis` in equal parts (a
    fused [gate; up] or [q; k; v]): `pattern` is a regex of the checkpoint's local key (after
    the renames), `parts` the replacement of each part, in order."""

    pattern: str
    parts: tuple[str, ...]
    axis: int = 0


@dataclass(frozen=True)
class NameMap:
    """A family's checkpoint key -> parameter name map, as data.

    A key is read as PREFIX + LOCAL: the prefix is whatever precedes `anchor` in the one key
    that ends with it (it depends on the model class and the transformers version that wrote
    the file). LOCAL then goes through `renames` (regex, replacement; each applied in order
    with `re.sub`), then `splits`; the result, behind `ours`, is the parameter's name.
    """

    anchor: str
    # What the layout is called (the manifest records it): "hf", "open_clip", "timm".
    name: str = "hf"
    ours: str = "vision_model."
    renames: tuple[tuple[str, str], ...] = ()
    splits: tuple[Split, ...] = ()
    # Regexes of our local names whose checkpoint tensor is stored transposed (a 2-D
    # projection stored as (in, out) rather than a Linear's (out, in)).
    transposes: tuple[str, ...] = ()
    # Regexes of checkpoint local keys that are not parameters of the tower (buffers, a mask
    # token used in training): skipped, and counted in the manifest.
    ignore: tuple[str, ...] = ()
    # Our local names of learnt position tables -> leading rows that are not grid positions
    # (the class token's); a table of another grid size is resampled (`Family.resample`).
    position_tables: tuple[tuple[str, int], ...] = ()
    # Regexes of our local names whose checkpoint tensor has extra leading axes of size 1
    # (timm's `cls_token` (1, 1, D) for our (D,)): dropped.
    squeeze: tuple[str, ...] = ()
    # Starts of local keys that sit beside the tower rather than under its prefix, one level
    # up (HF's `visual_projection.` beside `vision_model.`).
    beside: tuple[str, ...] = ()


@dataclass(frozen=True)
class NativeTower:
    """A tower that takes each image at its own size, one image per call (see
    `builder/blocks/native.py`). `inputs(config, patches, grid)` gives, by name, every array
    its artifacts may take for one image (numpy, no torch, no TVM): the patches as `forward`
    takes them, then what the family computes from the grid (rotary tables, windows, a
    projector's gather). Which of them an artifact takes is `input_specs`'. `finish(config,
    features, grid)`, where set, turns `forward`'s output into the image's features (undoes
    a reordering of the tokens)."""

    inputs: Callable[[Any, Any, Any], dict[str, Any]]
    # The `preprocess.resize` rule of its HF processor (`builder/native_preprocess.py`),
    # which gives the patches in the layout `inputs` takes.
    resize: str
    finish: Callable[[Any, Any, Any], Any] | None = None
    # What the family's HF reference model returns for one image given as the artifact
    # takes it: `reference(hf_model, patches, grid)` -> the tower's last state, float32
    # numpy (tests and benchmarks; imports torch).
    reference: Callable[[Any, Any, Any], Any] | None = None
    # An image of `rows` x `cols` patches as `reference` and the artifact take it (random
    # pixel values of the family's patch layout): `patches(config, rows, cols, seed)`.
    sample: Callable[[Any, int, int, int], tuple[Any, Any]] | None = None
    # The processor's steps where they are not `PreprocessConfig`'s defaults (SigLIP2's
    # bilinear filter, mean and std 0.5): what `build import` writes beside the rule.
    steps: tuple[tuple[str, Any], ...] = ()
    # The width of the processor's rows where `inputs` takes other rows than `forward`'s
    # pixel_values (Qwen2.5-VL's hold each patch's T frames; the tower takes the first):
    # `row_width(config)`; None: pixel_values' width.
    row_width: Callable[[Any], int] | None = None


def input_specs(model: Any, blocks: Any) -> list[tuple[str, list[int | str], str]]:
    """(name, shape, dtype) of each input of a native tower's `forward`, in order: the
    family config's (`native_inputs`), then the projector block's (its `inputs` constant)."""
    from .. import registry

    specs = list(model.native_inputs)
    if blocks.projector:
        specs += [
            (name, list(shape), dtype)
            for name, shape, dtype in registry.get(blocks.projector, "projector").attr("inputs", ())
        ]
    return specs


@dataclass(frozen=True)
class Family:
    """One tower family (see the module docstring)."""

    name: str
    description: str
    config: type
    blocks: Callable[[Any], dict[str, str]]
    names: NameMap
    hf_model_types: tuple[str, ...]
    # transformers class names: the model whose outputs the tower equals, and its config.
    reference: str
    reference_config: str
    # How a learnt position table is resampled to another grid, as HF does at run time:
    # (mode, antialias) of `weights/resample.py`, or None (the image size must be the
    # checkpoint's).
    resample: tuple[str, bool] | None = None
    # HF config value -> ours, per field, where the names differ (HF's "gelu_pytorch_tanh"
    # is our "gelu_tanh" activation); the inverse gives HF's value for ours.
    hf_values: dict[str, dict[Any, Any]] = field(default_factory=dict)
    # Model fields that are ours alone (never read from or compared with an HF config).
    own_fields: tuple[str, ...] = ()
    # Field values the tests build besides the defaults, each against the reference (the
    # family's switches: SwiGLU, RMSNorm with qk-norm, ...).
    variants: tuple[dict[str, Any], ...] = ()
    # Other HF (model, config) classes the tower equals, checked like `reference`.
    also_equals: tuple[tuple[str, str], ...] = ()
    # The HF (model, config) classes whose `image_embeds` the embeds output equals, where the
    # family has an embedding projection (CLIP's CLIPVisionModelWithProjection); None: the
    # embedding is `reference`'s pooler_output.
    embeds_reference: tuple[str, str] | None = None
    # Other checkpoint layouts of the tower (open_clip's, timm's), tried after `names`: a
    # checkpoint is read with the first layout whose anchor one of its keys ends with.
    layouts: tuple[NameMap, ...] = ()
    native: NativeTower | None = None

    @property
    def name_maps(self) -> tuple[NameMap, ...]:
        """Every layout the family reads, HF's first."""
        return (self.names, *self.layouts)

    def default_blocks(self, model: Any) -> dict[str, str]:
        return self.blocks(model)

    def hf_fields(self, model: Any) -> dict[str, Any]:
        """The fields of the reference HF config that describe this tower: what a checkpoint's
        config.json is compared with, and what makes a matching HF model."""
        out = {}
        for name in self.hf_field_names():
            value = getattr(model, name)
            inverse: dict[Any, Any] = {}
            for theirs, ours in self.hf_values.get(name, {}).items():
                inverse.setdefault(ours, theirs)  # the first HF name listed is the one written
            out[name] = inverse.get(value, value) if inverse else value  # lists unhashable
        return out

    def hf_field_names(self) -> list[str]:
        from ..config import TowerConfig

        shared = {f.name for f in dataclasses_fields(TowerConfig)}
        return [
            f.name
            for f in dataclasses_fields(self.config)
            if f.name not in shared and f.name not in self.own_fields
        ]

    def reference_model(self, model: Any, classes: tuple[str, str] | None = None) -> Any:
        """The HF transformers model this tower equals (`reference`, or another of
        `also_equals`), at the preset's fields, with HF's random init; in eval mode. Imports
        torch and transformers."""
        import transformers

        model_class, config_class = classes or (self.reference, self.reference_config)
        config = getattr(transformers, config_class)(**self.hf_fields(model))
        return getattr(transformers, model_class)(config).eval()

    def from_hf(self, name: str, value: Any) -> Any:
        """An HF config value as ours."""
        if isinstance(value, list | dict):
            return value
        return self.hf_values.get(name, {}).get(value, value)


def dataclasses_fields(cls: type) -> tuple[Any, ...]:
    import dataclasses

    return dataclasses.fields(cls)


_FAMILIES: dict[str, Family] = {}
_loaded = False


def register(family: Family) -> Family:
    """Add a family (a built-in module's or a plugin's) to the registry."""
    old = _FAMILIES.get(family.name)
    if old is not None and old is not family:
        raise BuilderError(f"tower family {family.name!r} is registered twice")
    _FAMILIES[family.name] = family
    return family


def _load_builtins() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for info in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{info.name}")


def names() -> list[str]:
    _load_builtins()
    return sorted(_FAMILIES)


def get(name: str) -> Family:
    _load_builtins()
    family = _FAMILIES.get(name)
    if family is None:
        raise InputError(f"unknown tower family {name!r}; the families: {names()}")
    return family


def all_families() -> list[Family]:
    return [get(n) for n in names()]


def for_model_type(model_type: str) -> Family | None:
    """The family whose HF configs have this `model_type`, or None."""
    return next((f for f in all_families() if model_type in f.hf_model_types), None)
