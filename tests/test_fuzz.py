"""Property-based: mutated presets and overrides thrown at `build check` exit 0 or 2, print
no traceback, and every error line names the file or the override."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from builder.cli import main

from .conftest import PRESETS

pytestmark = pytest.mark.unit

BASES = [yaml.safe_load(p.read_text()) for p in PRESETS]
KEYS = [
    "name",
    "description",
    "model",
    "model.hidden_size",
    "model.image_size",
    "model.intermediate_size",
    "model.num_attention_heads",
    "model.num_hidden_layers",
    "model.patch_size",
    "model.layer_norm_eps",
    "model.hidden_act",
    "model.feature_layer",
    "model.feature_layer.0",
    "model.feature_select_strategy",
    "model.post_layernorm",
    "blocks",
    "blocks.mlp",
    "weights",
    "weights.seed",
    "weights.path",
    "targets",
    "targets.0",
    "targets.0.name",
    "targets.0.mcpu",
    "targets.0.num_cores",
    "model.hiden_size",
    "bogus",
]

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(["../x", "/abs", "..", "", "llvm", "gelu", "1e12", "\x00", "é", "a" * 600]),
    st.text(max_size=20),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=8,
)


def _set(data: dict, dotted: str, value) -> None:
    node = data
    parts = dotted.split(".")
    for part in parts[:-1]:
        key = int(part) if part.isdigit() else part
        if isinstance(node, list):
            if not isinstance(key, int) or key >= len(node):
                return
        elif not isinstance(node, dict):
            return
        elif not isinstance(node.get(key), (dict, list)):
            node[key] = {}
        node = node[key]
    last = parts[-1]
    if isinstance(node, dict):
        node[last] = value
    elif isinstance(node, list) and last.isdigit() and int(last) < len(node):
        node[int(last)] = value


@st.composite
def preset_texts(draw) -> bytes:
    data = copy.deepcopy(draw(st.sampled_from(BASES)))
    for _ in range(draw(st.integers(0, 3))):
        _set(data, draw(st.sampled_from(KEYS)), draw(values))
    try:
        text = yaml.safe_dump(data, allow_unicode=True).encode()
    except yaml.YAMLError:
        text = b"model: {}\n"
    if draw(st.booleans()):  # damage the bytes too
        for _ in range(draw(st.integers(1, 3))):
            at = draw(st.integers(0, max(len(text) - 1, 0)))
            text = text[:at] + draw(st.binary(max_size=4)) + text[at + 1 :]
    return text


def _override_value(value) -> str:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


overrides = st.lists(
    st.one_of(
        st.builds(lambda k, v: f"{k}={_override_value(v)}", st.sampled_from(KEYS), values),
        st.text(max_size=30).map(lambda t: t if "=" in t else f"{t}="),
    ),
    max_size=3,
)


@settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(text=preset_texts(), extra=overrides)
def test_mutated_presets_and_overrides(tmp_path: Path, capsys, text: bytes, extra: list[str]):
    path = tmp_path / "fuzz.yaml"
    path.write_bytes(text)
    # argv cannot hold a NUL byte; anything else goes.
    extra = [o.replace("\x00", "") for o in extra if not o.startswith("-")]
    code = main(["check", str(path), *extra])
    out, err = capsys.readouterr()
    assert code in (0, 2), err
    assert "Traceback" not in err
    for line in err.splitlines():
        # An override is shown as Python's repr: in double quotes when it holds a quote.
        assert line.startswith((str(path), "override '", 'override "')), line
    if code == 0:
        assert err.splitlines() == [f"{path}: ok"]
