"""The JSON Schema, the config dataclasses and the registry describe the same fields."""

from __future__ import annotations

import dataclasses
import json

import pytest

from builder import families, registry, resources
from builder.assemble import output_shape
from builder.config import (
    BlocksConfig,
    PreprocessConfig,
    Preset,
    TargetConfig,
    WeightsConfig,
)
from builder.preset import load_preset, schema

from .conftest import PRESETS

pytestmark = pytest.mark.unit

SCHEMA = json.loads(resources.schema_path().read_text())
PROPS = SCHEMA["properties"]
TARGET_MAP = next(b for b in PROPS["targets"]["items"]["oneOf"] if b["type"] == "object")
# Fields of the dataclasses that a preset cannot set, with the reason.
NOT_IN_SCHEMA = {"kwargs"}  # extra keys of an imported HF config, never read by a block


def _defaults(cls) -> dict:
    out = {}
    for f in dataclasses.fields(cls):
        if f.name in NOT_IN_SCHEMA:
            continue
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


def _family_model(name: str) -> dict:
    """The `model` section of the preset schema for family `name`: shared and own fields."""
    return schema(name)["properties"]["model"]


@pytest.mark.parametrize(
    "cls, schema",
    [
        *((f.config, _family_model(f.name)) for f in families.all_families()),
        (BlocksConfig, PROPS["blocks"]),
        (WeightsConfig, PROPS["weights"]),
        (TargetConfig, TARGET_MAP),
        (PreprocessConfig, PROPS["preprocess"]),
    ],
    ids=lambda x: getattr(x, "__name__", ""),
)
def test_schema_matches_dataclass(cls, schema):
    fields = {f.name for f in dataclasses.fields(cls)} - NOT_IN_SCHEMA
    assert set(schema["properties"]) == fields
    defaults = {k: v["default"] for k, v in schema["properties"].items() if "default" in v}
    required = set(schema.get("required", []))
    assert defaults == {k: v for k, v in _defaults(cls).items() if k not in required}


def test_top_level_fields_match_preset():
    assert set(PROPS) == {f.name for f in dataclasses.fields(Preset)}


def schema_nodes(node=SCHEMA, path="$"):
    """Every dict in the schema, with its JSON path."""
    if isinstance(node, dict):
        yield path, node
        for k, v in node.items():
            yield from schema_nodes(v, f"{path}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from schema_nodes(v, f"{path}[{i}]")


FAMILY_SCHEMAS = [json.loads(resources.family_schema_path(n).read_text()) for n in families.names()]


def test_every_family_has_its_schema_and_nothing_else_does():
    files = sorted(p.stem for p in resources.family_schema_path("x").parent.glob("*.json"))
    assert files == families.names()


def test_additional_properties_false_everywhere():
    for path, node in schema_nodes():
        if node.get("type") == "object":
            assert node.get("additionalProperties") is False, path


def test_numbers_are_bounded_and_strings_enumerated_or_patterned():
    nodes = [n for s in [SCHEMA, *FAMILY_SCHEMAS] for n in schema_nodes(s)]
    for path, node in nodes:
        types = node.get("type")
        types = types if isinstance(types, list) else [types]
        if "integer" in types or "number" in types:
            assert "maximum" in node and ("minimum" in node or "exclusiveMinimum" in node), path
        if "string" in types:
            assert {"enum", "pattern", "maxLength"} & set(node), path


def test_schema_choices_are_the_builtin_registry():
    for family in families.names():
        model = _family_model(family)["properties"]
        assert model["hidden_act"]["enum"] == registry.names("activation"), family
    assert schema()["properties"]["family"]["enum"] == families.names()
    for slot, prop in schema()["properties"]["blocks"]["properties"].items():
        optional = [None] if prop["default"] is None else []  # the projector may be absent
        assert prop["enum"] == registry.names(slot) + optional, slot
        assert prop["default"] in registry.names(slot) + optional


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.stem)
def test_shipped_presets_validate(path):
    preset = load_preset(path)
    assert preset.name == path.stem
    assert preset.model.hidden_size % preset.model.num_attention_heads == 0


def test_llava_clip_is_llava_15_tower():
    m = load_preset("llava-clip").model
    assert (m.hidden_size, m.intermediate_size, m.num_attention_heads) == (1024, 4096, 16)
    assert (m.num_hidden_layers, m.patch_size, m.image_size) == (24, 14, 336)
    assert m.layer_norm_eps == 1e-5 and m.hidden_act == "quick_gelu"
    assert m.feature_layers == [23] and m.num_layers_computed == 23
    assert output_shape(m, BlocksConfig()) == ["batch", 576, 1024]


def test_siglip_so400m_is_the_hf_tower():
    preset = load_preset("siglip-so400m-14-384")
    m = preset.model
    assert (m.hidden_size, m.intermediate_size, m.num_attention_heads) == (1152, 4304, 16)
    assert (m.num_hidden_layers, m.patch_size, m.image_size) == (27, 14, 384)
    assert m.layer_norm_eps == 1e-6 and m.hidden_act == "gelu_tanh"
    assert preset.family == "siglip" and not m.pre_norm and m.final_norm
    assert m.num_layers_computed == 27
    assert output_shape(m, preset.blocks) == ["batch", 729, 1152]  # 27 x 27, no CLS


def test_presets_are_sparse():
    """A shipped preset holds no model field at its default value."""
    import yaml

    for path in PRESETS:
        data = yaml.safe_load(path.read_text())
        defaults = _defaults(families.get(data.get("family", families.DEFAULT)).config)
        model = data.get("model", {}) or {}
        # feature_layer is what a LLaVA tower is about: llava-clip states it on purpose.
        same = [k for k, v in model.items() if defaults.get(k) == v and k != "feature_layer"]
        assert not same, f"{path.name}: {same} repeat the defaults"
