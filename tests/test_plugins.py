"""Block plugins from outside the package: a preset's `plugins:`, `--plugin`, and the
`builder.blocks` entry-point group; the worked example of docs/plugins.md built and compared
with HF transformers."""

from __future__ import annotations

import sys

import pytest

from builder import plugins, registry
from builder.cli import main
from builder.errors import InputError
from builder.preset import load_preset

from .conftest import (
    REPO,
    assert_close,
    build_and_load,
    expected_features,
    pixels,
    save_vision_model,
    tiny_overrides,
)

EXAMPLE = REPO / "docs" / "examples" / "plugin"
EXAMPLE_PRESET = EXAMPLE / "clip-relu.yaml"
PLUGIN_MODULES = ("relu_blocks", "dup_blocks", "broken_blocks")


@pytest.fixture(autouse=True)
def isolated_registry(monkeypatch):
    """Plugin blocks registered by a test vanish after it, so the registry other tests see
    (the schema's choices, the documented blocks) is the built-in one."""
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    monkeypatch.setattr(plugins, "_entry_points_loaded", False)
    yield
    for name in PLUGIN_MODULES:
        sys.modules.pop(name, None)


@pytest.mark.parity
def test_worked_example_builds_and_matches_hf(tmp_path):
    """docs/plugins.md: the preset names its plugin; the artifact equals HF's CLIP tower with
    hidden_act "relu" and the same weights."""
    assert "relu" not in registry.names("activation")
    overrides = tiny_overrides(patch_size=16, image_size=48) + [f"weights.path={tmp_path / 'ckpt'}"]
    hf_model = save_vision_model(tmp_path / "ckpt", hidden_act="relu", patch_size=16, image_size=48)
    preset = load_preset(EXAMPLE_PRESET, overrides)
    assert preset.plugins == ["relu_blocks"] and preset.model.hidden_act == "relu"
    assert registry.get("relu", "activation").where.startswith("relu_blocks:")
    enc = build_and_load(EXAMPLE_PRESET, overrides, tmp_path / "out")
    assert enc.manifest["resolved_preset"]["plugins"] == ["relu_blocks"]
    x = pixels(2, preset.model.image_size)
    assert_close(enc(x), expected_features(hf_model, preset.model, x))


@pytest.mark.unit
def test_without_the_plugin_relu_is_not_a_choice(capsys):
    assert main(["check", "clip-vit-b-32", "model.hidden_act=relu"]) == 2
    err = capsys.readouterr().err
    choices = "['gelu', 'gelu_tanh', 'quick_gelu', 'silu']"
    assert f"model.hidden_act: 'relu' is not one of {choices}" in err


@pytest.mark.unit
def test_cli_plugin_option(monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(EXAMPLE))
    args = ["clip-vit-b-32", "model.hidden_act=relu", "--plugin", "relu_blocks"]
    assert main(["show", *args]) == 0
    out = capsys.readouterr().out
    assert "hidden_act: relu" in out and "plugins:\n- relu_blocks" in out
    assert main(["list", "--plugin", "relu_blocks"]) == 0
    assert "activation: relu" in capsys.readouterr().out


@pytest.mark.unit
def test_entry_point_group(tmp_path, monkeypatch):
    """An installed distribution that declares `builder.blocks` entry points is loaded with
    no mention in the preset or on the command line."""
    dist = tmp_path / "relu_example-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: relu-example\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[builder.blocks]\nrelu = relu_blocks\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.syspath_prepend(str(EXAMPLE))
    assert "relu = relu_blocks" in plugins.load_entry_points()
    assert load_preset("clip-vit-b-32", ["model.hidden_act=relu"]).model.hidden_act == "relu"


def _write_plugin(folder, name, body):
    (folder / f"{name}.py").write_text(
        "from tvm.relax.frontend import nn\nfrom builder.registry import register\n\n" + body
    )


@pytest.mark.unit
def test_duplicate_name_in_a_plugin_names_both_definitions(tmp_path):
    _write_plugin(
        tmp_path,
        "dup_blocks",
        '@register("gelu", kind="activation")\nclass G(nn.Module):\n    pass\n',
    )
    preset = tmp_path / "p.yaml"
    preset.write_text("description: x\nplugins:\n  - dup_blocks\n")
    with pytest.raises(InputError) as e:
        load_preset(preset)
    (line,) = e.value.lines
    assert line.startswith(f"{preset}:3: plugins[0]: plugin 'dup_blocks': ")
    assert "block type 'gelu' is registered twice: at builder.blocks.common:" in line
    assert "and at dup_blocks:4" in line


@pytest.mark.unit
def test_plugin_errors_are_all_reported(tmp_path, capsys):
    _write_plugin(tmp_path, "broken_blocks", "raise RuntimeError('boom')\n")
    preset = tmp_path / "p.yaml"
    preset.write_text("plugins: [broken_blocks, no_such_module]\n")
    assert main(["check", str(preset), "--plugin", "also_missing"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == [
        f"{preset}:1: plugins[0]: plugin 'broken_blocks' failed on import: RuntimeError: boom",
        f"{preset}:1: plugins[1]: cannot import 'no_such_module': No module named 'no_such_module'",
        "--plugin 'also_missing': cannot import 'also_missing': No module named 'also_missing'",
    ]


@pytest.mark.unit
def test_unknown_plugin_block_name_lists_close_matches(monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(EXAMPLE))
    assert main(["check", "clip-vit-b-32", "model.hidden_act=rlu", "--plugin", "relu_blocks"]) == 2
    err = capsys.readouterr().err
    assert (
        "'rlu' is not one of ['gelu', 'gelu_tanh', 'quick_gelu', 'relu', 'silu'], "
        "did you mean 'relu'?" in err
    )


@pytest.mark.ir
def test_silu_is_fused_into_its_gemm():
    """The CPU pipeline fuses x * sigmoid(x) (the built-in SiLU) into fc1's epilogue, as it
    does quick_gelu: no sigmoid is left for the fallback schedule."""
    from builder.assemble import export
    from builder.targets.cpu import kernels
    from builder.targets.cpu.rewrite import rewrite_to_kernels

    preset = load_preset("clip-vit-b-32", tiny_overrides() + ["model.hidden_act=silu"])
    mod, _ = export(preset.model, preset.blocks, preset.dtype)
    assert mod["forward"].script().count("R.sigmoid(") == preset.model.num_layers_computed
    rewritten = rewrite_to_kernels(mod, kernels.KernelConfig(vec=16, nv=4, mr=6))
    script = rewritten["forward"].script()
    assert "R.sigmoid(" not in script and "R.matmul(" not in script
