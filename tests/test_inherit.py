"""Preset inheritance (`extends`): deep merge, lines that point into the file that set a
value, cycles and missing parents, and `build show` of the merged preset."""

from __future__ import annotations

import dataclasses

import pytest

from builder.cli import main
from builder.errors import InputError
from builder.preset import load_preset

from .conftest import PRESETS

pytestmark = pytest.mark.unit


def write(folder, name, text):
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def errors(path, *overrides):
    with pytest.raises(InputError) as e:
        load_preset(path, overrides)
    return e.value.lines


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.stem)
def test_extending_a_preset_alone_changes_nothing_but_the_name(path, tmp_path):
    child = write(tmp_path, "child.yaml", f"extends: {path}\n")
    merged, parent = load_preset(child), load_preset(path)
    assert merged.name == "child"
    assert dataclasses.replace(merged, name=parent.name) == parent


def test_deep_merge_child_wins_lists_replaced(tmp_path):
    write(
        tmp_path,
        "base/parent.yaml",
        "name: parent-name\ndescription: parent\nmodel:\n  hidden_size: 64\n"
        "  num_attention_heads: 4\n  feature_layer: [-2, -3]\n"
        "targets:\n  - {name: a, mcpu: znver4}\n  - {name: b}\n",
    )
    child = write(
        tmp_path,
        "child.yaml",
        "extends: base/parent.yaml\nmodel:\n  hidden_size: 32\n  feature_layer: [-1]\n"
        "targets: [llvm]\n",
    )
    preset = load_preset(child, ["model.image_size=64"])
    m = preset.model
    assert preset.name == "child"  # a name is never inherited
    assert preset.description == "parent"
    assert (m.hidden_size, m.num_attention_heads, m.image_size) == (32, 4, 64)
    assert m.feature_layer == [-1]  # a list is replaced, not merged
    assert [t.name for t in preset.targets] == ["llvm"]


def test_three_levels_and_errors_point_into_the_file_that_set_the_value(tmp_path):
    write(tmp_path, "a.yaml", "description: a\nmodel:\n  hidden_size: 30\n  patch_size: 300\n")
    write(tmp_path, "b.yaml", "extends: a.yaml\nmodel:\n  num_attention_heads: 4\n")
    c = write(tmp_path, "c.yaml", "# c\nextends: b.yaml\nmodel:\n  hidden_act: qgelu\n")
    assert errors(c) == [
        f"{c}:4: model.hidden_act: 'qgelu' is not one of "
        "['gelu', 'gelu_tanh', 'quick_gelu', 'silu'], did you mean 'gelu'?",
    ]
    c.write_text("extends: b.yaml\n")
    assert errors(c) == [
        f"{tmp_path / 'a.yaml'}:3: model.hidden_size: 30 is not divisible by "
        "model.num_attention_heads (4)",
        f"{tmp_path / 'a.yaml'}:4: model.patch_size: 300 is larger than model.image_size (224)",
    ]


def test_cycle_names_the_chain(tmp_path):
    a = write(tmp_path, "a.yaml", "extends: b.yaml\n")
    write(tmp_path, "b.yaml", "model:\n  hidden_size: 64\nextends: ./a.yaml\n")
    a_, b_ = a.resolve(), (tmp_path / "b.yaml").resolve()
    assert errors(a) == [f"{b_}:3: extends: cycle: {a_} -> {b_} -> {a_}"]
    self_ = write(tmp_path, "self.yaml", "extends: self.yaml\n")
    assert errors(self_) == [f"{self_}:1: extends: cycle: {self_} -> {self_}"]


def test_missing_parent_names_the_chain(tmp_path):
    a = write(tmp_path, "a.yaml", "extends: b.yaml\n")
    write(tmp_path, "b.yaml", "\n\nextends: nowhere.yaml\n")
    chain = f"{a.resolve()} -> {(tmp_path / 'b.yaml').resolve()} -> {tmp_path / 'nowhere.yaml'}"
    assert errors(a) == [
        f"{tmp_path / 'b.yaml'}:3: extends: no such preset 'nowhere.yaml': {chain}"
    ]
    write(tmp_path, "n.yaml", "extends: [a.yaml]\n")
    assert errors(tmp_path / "n.yaml") == [
        f"{tmp_path / 'n.yaml'}:1: extends: expected a preset file path, got ['a.yaml']"
    ]


def test_relative_weights_path_is_relative_to_the_file_that_set_it(tmp_path):
    write(tmp_path, "base/parent.yaml", "weights:\n  path: ckpt\n")
    child = write(tmp_path, "child.yaml", "extends: base/parent.yaml\n")
    assert load_preset(child).weights.path == str(tmp_path / "base" / "ckpt")


def test_show_prints_the_merged_preset(tmp_path, capsys):
    child = write(tmp_path, "child.yaml", f"extends: {PRESETS[0]}\nmodel:\n  image_size: 336\n")
    assert main(["show", str(child), "model.num_hidden_layers=2"]) == 0
    out = capsys.readouterr().out
    assert "name: child\n" in out and "image_size: 336\n" in out
    assert "num_hidden_layers: 2\n" in out and "extends" not in out
