"""CLI messages: one test per error class, asserting the exact line a user sees."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import yaml

from builder.cli import main

from .conftest import REPO

pytestmark = pytest.mark.unit


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def write(tmp_path, text, name="p.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def test_check_reports_every_error_with_file_line_and_path(tmp_path, capsys):
    path = write(
        tmp_path,
        """\
        model:
          hidden_act: qgelu
          hiden_size: 8
          image_size: -3
        blocks:
          mlp: clip_mpl
        targets: [rocm]
        """,
    )
    code, out, err = run(capsys, "check", str(path))
    assert code == 2
    assert err.splitlines() == [
        f"{path}:2: model.hidden_act: 'qgelu' is not one of "
        "['gelu', 'gelu_tanh', 'quick_gelu', 'silu'], did you mean 'gelu'?",
        f"{path}:3: model.hiden_size: unknown key, did you mean 'model.hidden_size'?",
        f"{path}:4: model.image_size: -3 is less than the minimum of 1",
        f"{path}:6: blocks.mlp: 'clip_mpl' is not one of ['clip_mlp', 'swiglu_mlp'], "
        "did you mean 'clip_mlp'?",
        f"{path}:7: targets[0]: 'rocm' is not one of ['llvm', 'cuda', 'aarch64', 'llvm-bf16']",
    ]
    assert "Traceback" not in err


def test_check_many_files_reports_all(tmp_path, capsys):
    a = write(tmp_path, "model: {hidden_size: 0}\n", "a.yaml")
    b = write(tmp_path, "model: {num_hidden_layers: 999}\n", "b.yaml")
    code, _, err = run(capsys, "check", str(a), str(b))
    assert code == 2
    assert f"{a}:1: model.hidden_size: 0 is less than the minimum of 1" in err
    assert f"{b}:1: model.num_hidden_layers: 999 is greater than the maximum of 256" in err


def test_semantic_checks_use_the_same_format(tmp_path, capsys):
    path = write(
        tmp_path,
        """\
        model:
          hidden_size: 100
          num_attention_heads: 16
          feature_layer: [1, -30]
        targets: [llvm, {name: llvm}]
        """,
    )
    code, _, err = run(capsys, "check", str(path))
    assert code == 2
    assert err.splitlines() == [
        f"{path}:2: model.hidden_size: 100 is not divisible by model.num_attention_heads (16)",
        f"{path}:4: model.feature_layer[1]: -30 is out of range: there are 13 hidden states "
        "(num_hidden_layers 12 + embeddings), so -13 <= feature_layer <= 12",
        f"{path}:5: targets[1]: target name 'llvm' repeats targets[0]",
    ]


def test_image_size_need_not_be_a_multiple_of_patch(tmp_path, capsys):
    path = write(tmp_path, "model: {image_size: 384, patch_size: 14}\n")
    assert run(capsys, "check", str(path))[0] == 0


def test_post_layernorm_needs_the_final_state(capsys):
    code, _, err = run(capsys, "check", "clip-vit-b-32", "model.post_layernorm=true")
    assert code == 2
    assert err.startswith("override 'model.post_layernorm=true': model.post_layernorm: ")
    assert (
        run(
            capsys, "check", "clip-vit-b-32", "model.post_layernorm=true", "model.feature_layer=-1"
        )[0]
        == 0
    )


@pytest.mark.parametrize(
    "preset, override, message",
    [
        (
            "internvit-300m-448px",
            "model.use_absolute_position_embeddings=false",
            "model.use_absolute_position_embeddings: false is not supported: the tower adds its "
            "learnt position table (HF's default, and every released InternViT's)",
        ),
        (
            "internvit-300m-448px",
            "model.post_layernorm=true",
            "model.post_layernorm: with model.use_mean_pooling the tower has no final norm "
            "(HF's layernorm is an Identity); set post_layernorm: null, or use_mean_pooling: false",
        ),
        (
            "aimv2-large-patch14-224",
            "model.is_native=true",
            "model.is_native: true is not supported: the native-resolution towers' 2-D sin-cos "
            "positions are not built; only the learnt position table (false)",
        ),
    ],
    ids=["internvit-no-positions", "internvit-mean-pooling-norm", "aimv2-native"],
)
def test_family_refuses_what_it_does_not_build(capsys, preset, override, message):
    code, out, err = run(capsys, "check", preset, override)
    assert code == 2 and out == ""
    assert err.splitlines() == [f"override {override!r}: {message}"]


def test_override_unknown_key_names_the_override(capsys):
    code, out, err = run(capsys, "show", "presets/llava-clip.yaml", "model.hiden_size=8")
    assert code == 2 and out == ""
    assert err.strip() == (
        "override 'model.hiden_size=8': unknown key, did you mean 'model.hidden_size'?"
    )


def test_override_bad_value_and_grammar(capsys):
    code, _, err = run(capsys, "show", "llava-clip", "model.hidden_act=qgelu", "model.image_size")
    assert code == 2
    assert "override 'model.image_size': expected KEY=VALUE, e.g. model.image_size=224" in err
    code, _, err = run(capsys, "show", "llava-clip", "model.hidden_act=qgelu")
    assert err.strip() == (
        "override 'model.hidden_act=qgelu': model.hidden_act: 'qgelu' is not one of "
        "['gelu', 'gelu_tanh', 'quick_gelu', 'silu'], did you mean 'gelu'?"
    )


def test_show_prints_the_merged_preset(capsys):
    code, out, _ = run(
        capsys, "show", "presets/llava-clip.yaml", "model.num_hidden_layers=12", "targets=[llvm]"
    )
    assert code == 0
    shown = yaml.safe_load(out)
    assert shown["model"]["num_hidden_layers"] == 12
    assert shown["model"]["image_size"] == 336
    assert shown["model"]["layer_norm_eps"] == 1e-5
    assert shown["targets"] == [
        {
            "name": "llvm",
            "kind": "llvm",
            "mcpu": "host",
            "mtriple": None,
            "mattr": [],
            "num_cores": None,
            "precision": "float32",
        }
    ]


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", ":1: empty preset"),
        (b"\xff\xfe\x00m", ": not UTF-8 text"),
        (
            b"model: !!python/object:os.system x\n",
            ":1: invalid YAML: could not determine a constructor",
        ),
        (b"model: [1, 2\n", ": invalid YAML:"),
        (b"- 1\n- 2\n", ":1: (top level): expected a mapping of fields, got list"),
        (b"model:\n  hidden_size: 64\n  hidden_size: 32\n", ":3: model.hidden_size: duplicate key"),
        (b"description:\n  ? ''  : null\n", ":2: description: a key must be a plain name"),
        (
            b"a: &a [x, x, x, x, x, x, x, x, x]\n"
            b"b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
            b"c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]\n"
            b"d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]\n"
            b"e: [*d, *d, *d, *d, *d, *d, *d, *d, *d]\n",
            "YAML nodes",
        ),
    ],
    ids=[
        "empty",
        "not-utf8",
        "python-tag",
        "syntax",
        "not-a-map",
        "duplicate",
        "mapping-key",
        "alias-bomb",
    ],
)
def test_unreadable_presets(tmp_path, capsys, content, message):
    path = tmp_path / "p.yaml"
    path.write_bytes(content)
    code, _, err = run(capsys, "check", str(path))
    assert code == 2
    assert err.startswith(str(path)) and message in err, err
    assert "Traceback" not in err


def test_missing_preset_lists_shipped(capsys):
    code, _, err = run(capsys, "build", "llava-clp")
    assert code == 2
    assert "llava-clp: no such file or shipped preset, did you mean 'llava-clip'?" in err


def test_bad_target_selection(capsys, tmp_path):
    code, _, err = run(capsys, "clip-vit-b-32", "--target", "cuda", "--out", str(tmp_path))
    assert code == 2
    assert "--target ['cuda']: not among the preset's targets ['llvm']" in err
    assert not any(tmp_path.iterdir())


def test_list_shows_families_presets_and_every_block(capsys):
    from builder import families, registry

    code, out, _ = run(capsys, "list")
    assert code == 0
    for family in families.all_families():
        assert f"  {family.name} " in out and family.description in out
    for name in ("llava-clip", "clip-vit-b-32", "clip-vit-b-16", "clip-vit-l-14"):
        assert f"  {name} " in out
    for block in registry.all_blocks():
        assert f"{block.kind}: {block.name}" in out


def test_python_m_builder_exits_2_without_traceback():
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "builder",
            "check",
            "presets/llava-clip.yaml",
            "model.hidden_size=7",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "override 'model.hidden_size=7': model.hidden_size: 7 is not divisible" in proc.stderr


NO_TVM = textwrap.dedent(
    """
    import contextlib, io, json, sys
    from builder.cli import main

    codes = []
    for argv in sys.argv[1:]:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            try:
                codes.append(main(argv.split("|")))
            except SystemExit as e:  # argparse's --help and usage errors
                codes.append(e.code)
    watched = ("tvm", "torch", "numpy", "jsonschema")
    print(json.dumps([codes, [m for m in watched if m in sys.modules]]))
    """
)


def imports_of(*commands: str) -> tuple[list[int], list[str]]:
    """Run `commands` (arguments joined by "|") through `main` in one new process: their exit
    codes, and which of TVM, torch, numpy and jsonschema they imported."""
    proc = subprocess.run(
        [sys.executable, "-c", NO_TVM, *commands], cwd=REPO, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    codes, imported = json.loads(proc.stdout)
    return codes, imported


def test_commands_that_compile_nothing_import_no_tvm(tmp_path):
    """`--help`, `list`, `check`, `show`, `import` and argument errors answer without TVM
    (and torch, which TVM imports), so they take a fraction of a second."""
    from transformers import CLIPVisionConfig

    config = tmp_path / "config.json"
    CLIPVisionConfig().to_json_file(config)
    commands = [
        "--help",
        "list",
        "check|presets/llava-clip.yaml|presets/siglip-base-16-224.yaml",
        "show|llava-clip|model.num_hidden_layers=12",
        f"import|{config}|--out|{tmp_path / 'p.yaml'}",
        "build|--no-such-flag",
        "check|llava-clip|model.hiden_size=8",
    ]
    codes, imported = imports_of(*commands)
    assert codes == [0, 0, 0, 0, 0, 2, 2]
    assert not {"tvm", "torch"} & set(imported), imported


def test_listing_checking_and_importing_need_no_numpy(tmp_path):
    """`build list` reads presets without validating them (no jsonschema, 0.1 s to import
    here) and no command that compiles nothing imports numpy (another 0.1 s): the families
    import it where they make arrays, the config importer reads fields without the weights
    code (docs/build-cache.md)."""
    from transformers import CLIPVisionConfig

    CLIPVisionConfig().to_json_file(tmp_path / "config.json")
    assert imports_of("list") == ([0], [])
    checked = "check|presets/llava-clip.yaml|presets/qwen2-5-vl-3b-instruct.yaml"
    assert imports_of(checked) == ([0], ["jsonschema"])
    config, out = tmp_path / "config.json", tmp_path / "p.yaml"
    assert imports_of(f"import|{config}|--out|{out}") == ([0], ["jsonschema"])
