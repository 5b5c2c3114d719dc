"""Hostile input through the CLI: every case exits 2 with one line naming the file (or the
override) and the problem, never a traceback, and builds nothing."""

from __future__ import annotations

import json
import struct

import pytest
from safetensors.torch import load_file, save_file

from builder import library
from builder.cli import main
from builder.weights import random_init

from .conftest import tiny_overrides

pytestmark = pytest.mark.unit


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def problems(err: str) -> list[str]:
    """The error lines: what `build` prints before it starts (the request) is not one."""
    return [
        line
        for line in err.splitlines()
        if not line.startswith(("build ", "weights: ", "[llvm] ", "assembled "))
    ]


@pytest.fixture
def no_work(monkeypatch):
    """Fail the test if the build assembles a module or makes weights."""

    def forbidden(*args, **kwargs):
        raise AssertionError("the build did expensive work before rejecting its input")

    monkeypatch.setattr(library, "export", forbidden)
    monkeypatch.setattr(random_init, "random_param", forbidden)


@pytest.mark.parametrize(
    "text, line",
    [
        ("model:\n  hidden_size: 1e12\n", 2),
        ("model:\n  hidden_size: 1000000000000\n", 2),
        ("model:\n  hidden_size: 1024.0\n", 2),
        ("model:\n  image_size: .inf\n", 2),
        ("model:\n  layer_norm_eps: .nan\n", 2),
        ("model:\n  feature_layer: [1.5]\n", 2),
    ],
    ids=["1e12", "huge-int", "integral-float", "inf", "nan", "float-layer"],
)
def test_huge_and_non_integer_numbers_rejected_before_any_work(
    tmp_path, capsys, no_work, text, line
):
    path = tmp_path / "p.yaml"
    path.write_text(text)
    code, out, err = run(capsys, str(path), "--out", str(tmp_path / "out"))
    assert code == 2 and out == ""
    (only,) = problems(err)
    assert only.startswith(f"{path}:{line}: model.")
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_huge_override_rejected_before_any_work(tmp_path, capsys, no_work):
    code, _, err = run(capsys, "llava-clip", "model.hidden_size=1e12", "--out", str(tmp_path))
    assert code == 2
    assert problems(err) == [
        "override 'model.hidden_size=1e12': model.hidden_size: 1000000000000.0 is not an "
        "integer (write it without '.' or 'e')"
    ]
    assert not any(tmp_path.iterdir())


ESCAPES = ["../x", "..", "/tmp/x", "a/../../x", ".hidden", "x\\..\\y", ""]


@pytest.mark.parametrize("name", ESCAPES)
def test_names_cannot_leave_the_output_folder(tmp_path, capsys, no_work, name):
    out = tmp_path / "a" / "out"
    preset = tmp_path / "p.yaml"
    preset.write_text(f"name: {json.dumps(name)}\n")
    by_name = f"name={json.dumps(name)}"
    by_target = f"targets=[{{name: {json.dumps(name)}}}]"
    attempts = [
        ([str(preset)], f"{preset}:1: name: "),
        (["llava-clip", by_name], f"override {by_name!r}: name: "),
        (["llava-clip", by_target], f"override {by_target!r}: targets[0].name: "),
    ]
    for argv, start in attempts:
        code, _, err = run(capsys, *argv, "--out", str(out))
        assert code == 2, argv
        (only,) = problems(err)
        assert only.startswith(start) and "does not match" in only, only
    code, _, err = run(capsys, "llava-clip", "--target", name, "--out", str(out))
    assert code == 2 and "not among the preset's targets" in err
    assert [p.name for p in tmp_path.iterdir()] == ["p.yaml"]


def tiny_build(capsys, tmp_path, weights):
    argv = ["clip-vit-b-32", *tiny_overrides(), f"weights.path={weights}"]
    return run(capsys, *argv, "--out", str(tmp_path / "out"))


def header(meta: dict) -> bytes:
    blob = json.dumps(meta).encode()
    return struct.pack("<Q", len(blob)) + blob


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda d: (d / "junk.txt").write_text("x"), "no .safetensors files"),
        (lambda d: (d / "model.safetensors").write_bytes(b"\x01\x02"), "shorter than 8 bytes"),
        (lambda d: (d / "model.safetensors").write_bytes(b"\xff" * 64), "header of"),
        (lambda d: (d / "model.safetensors").write_bytes(header({"a": 5})), "needs a dtype"),
        (
            lambda d: (d / "model.safetensors").write_bytes(
                header({"a": {"dtype": "F32", "shape": [2], "data_offsets": ["0", 8]}})
            ),
            "two integer data_offsets",
        ),
        (
            lambda d: (d / "model.safetensors.index.json").write_text(
                json.dumps({"weight_map": {"a": "../../etc/passwd"}})
            ),
            "shard names must be files beside it",
        ),
        (
            lambda d: (d / "model.safetensors.index.json").write_text("[1, 2]"),
            "not a safetensors index",
        ),
    ],
    ids=["junk", "tiny", "huge-header", "entry-not-map", "bad-offsets", "escaping-shard", "index"],
)
def test_junk_checkpoints_exit_2_with_one_line(tmp_path, capsys, make, message):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    make(ckpt)
    code, out, err = tiny_build(capsys, tmp_path, ckpt)
    assert code == 2 and out == ""
    (only,) = problems(err)
    assert only.startswith(str(ckpt)) and message in only, only
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_truncated_and_wrong_dtype_checkpoints(tmp_path, capsys, tiny_checkpoint):
    import torch

    folder, _ = tiny_checkpoint
    bad = tmp_path / "ckpt"
    bad.mkdir()
    blob = (folder / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(blob[: len(blob) - 100])
    code, _, err = tiny_build(capsys, tmp_path, bad)
    assert code == 2
    (only,) = problems(err)
    assert only.startswith(f"{bad / 'model.safetensors'}: tensor ") and "truncated" in only

    state = load_file(folder / "model.safetensors")
    state["pre_layrnorm.weight"] = state["pre_layrnorm.weight"].to(torch.int32)
    save_file(state, bad / "model.safetensors")
    code, _, err = tiny_build(capsys, tmp_path, bad)
    assert code == 2
    (only,) = problems(err)
    assert only == (
        f"{bad / 'model.safetensors'}: tensor 'pre_layrnorm.weight' has dtype I32; "
        "expected one of ['BF16', 'F16', 'F32', 'F64']"
    )
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_nul_byte_in_weights_path(tmp_path, capsys):
    preset = tmp_path / "p.yaml"
    preset.write_text('weights: {path: "a\\0b"}\n')
    code, _, err = run(capsys, str(preset), "--out", str(tmp_path / "out"))
    assert code == 2
    (only,) = problems(err)
    assert "a path cannot hold a NUL byte" in only and "Traceback" not in err
