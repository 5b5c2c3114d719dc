"""The build cache: what its key covers, reuse, --force, damaged entries, concurrent builds."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import tvm
import tvm_ffi

import builder
from builder import artifact, cache, targets
from builder.cache import Cache
from builder.cli import main
from builder.preset import load_preset

from .conftest import REPO, tiny_overrides

TINY = ["clip-vit-b-32", *tiny_overrides()]


def key_of(preset, root) -> str:
    c = Cache(root)
    entry = preset.targets[0]
    kind = targets.pipeline(entry.kind)
    _, options = kind.tvm_target(entry)
    return c.key(preset, entry, options, kind, c.weights_digest(preset))


@pytest.mark.unit
def test_key_changes_with_every_part(tmp_path, monkeypatch, tiny_checkpoint):
    base = load_preset(TINY[0], TINY[1:])
    first = key_of(base, tmp_path)
    assert key_of(load_preset(TINY[0], TINY[1:]), tmp_path) == first  # stable

    keys = {"base": first}
    for change in (
        "model.num_hidden_layers=4",
        "model.layer_norm_eps=1e-6",
        "weights.seed=1",
        "targets=[{name: llvm, mcpu: skylake}]",
        "targets=[{name: llvm, num_cores: 7}]",
        "targets=[{name: other}]",
        "description=x",
    ):
        keys[change] = key_of(load_preset(TINY[0], [*TINY[1:], change]), tmp_path)
    for module, attr in (
        (targets.llvm, "PIPELINE_VERSION"),
        (tvm, "__version__"),
        (tvm_ffi, "__version__"),
        (cache, "__version__"),
    ):
        with monkeypatch.context() as m:
            m.setattr(module, attr, "other")
            keys[f"{module.__name__}.{attr}"] = key_of(base, tmp_path)
    with monkeypatch.context() as m:
        m.setattr(cache, "source_digest", lambda: "edited")
        keys["sources"] = key_of(base, tmp_path)

    folder, _ = tiny_checkpoint
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    for f in folder.iterdir():
        (ckpt / f.name).write_bytes(f.read_bytes())
    with_ckpt = load_preset(TINY[0], [*TINY[1:], f"weights.path={ckpt}"])
    keys["checkpoint"] = key_of(with_ckpt, tmp_path)
    blob = bytearray((ckpt / "model.safetensors").read_bytes())
    blob[-1] ^= 1  # one bit of one weight
    (ckpt / "model.safetensors").write_bytes(bytes(blob))
    keys["checkpoint bit"] = key_of(with_ckpt, tmp_path)
    (ckpt / "config.json").write_text((ckpt / "config.json").read_text() + " ")
    keys["checkpoint config"] = key_of(with_ckpt, tmp_path)
    assert len(set(keys.values())) == len(keys), keys


@pytest.mark.unit
def test_key_needs_no_weights(tmp_path, monkeypatch):
    from builder.weights import random_init

    def forbidden(*args):
        raise AssertionError("weights made to compute a key")

    monkeypatch.setattr(random_init, "random_param", forbidden)
    key_of(load_preset("llava-clip"), tmp_path)


@pytest.mark.unit
def test_checkpoint_hashed_once_while_unchanged(tmp_path, monkeypatch):
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"x" * 1000)
    calls = []
    real = artifact.sha256
    monkeypatch.setattr(artifact, "sha256", lambda p: calls.append(p) or real(p))
    c = Cache(tmp_path / "cache")
    first = c.file_digest(f)
    assert Cache(tmp_path / "cache").file_digest(f) == first
    assert len(calls) == 1
    f.write_bytes(b"y" * 1000)  # same size, new time
    assert c.file_digest(f) != first
    assert len(calls) == 2


@pytest.mark.unit
def test_default_location(monkeypatch, tmp_path):
    monkeypatch.delenv("BUILDER_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cache.default_dir() == tmp_path / "clip-tvm-builder"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache.default_dir() == tmp_path / "home" / ".cache" / "clip-tvm-builder"
    monkeypatch.setenv("BUILDER_CACHE_DIR", str(tmp_path / "here"))
    assert cache.default_dir() == tmp_path / "here"


@pytest.mark.e2e
def test_hit_force_change_and_damage(tmp_path, monkeypatch, capsys, build_cache):
    compiled = []
    real = targets.llvm.compile
    monkeypatch.setattr(targets.llvm, "compile", lambda *a: compiled.append(1) or real(*a))
    out = ["--out", str(tmp_path)]
    art = tmp_path / "clip-vit-b-32" / "llvm"

    assert main([*TINY, *out]) == 0
    assert len(compiled) == 1
    first = artifact.read_manifest(art)["cache_key"]
    capsys.readouterr()

    assert main([*TINY, *out]) == 0  # unchanged: reused
    assert len(compiled) == 1
    assert f"[llvm] cache hit {first[:12]}" in capsys.readouterr().err
    assert main([*TINY, *out, "--verify"]) == 0
    assert len(compiled) == 1

    assert main([*TINY, *out, "--force"]) == 0
    assert len(compiled) == 2
    assert "building (--force" in capsys.readouterr().err

    assert main([*TINY, "weights.seed=3", *out]) == 0  # a change: rebuilt
    assert len(compiled) == 3
    assert artifact.read_manifest(art)["weights"]["seed"] == 3

    # A damaged cached copy (a shorter file) is noticed and rebuilt, not served.
    cached = build_cache / "artifacts" / first / "params.safetensors"
    os.truncate(cached, cached.stat().st_size - 1)
    capsys.readouterr()
    assert main([*TINY, *out]) == 0
    assert len(compiled) == 4
    assert "cached copy damaged" in capsys.readouterr().err
    assert builder.load(art, verify=True).manifest["cache_key"] == first


@pytest.mark.e2e
def test_two_builds_at_once(tmp_path, build_cache):
    cmd = [sys.executable, "-m", "builder", *TINY, "--out", str(tmp_path / "out")]
    procs = [
        subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    results = [(p.wait(), *p.communicate()) for p in procs]
    assert [code for code, _, _ in results] == [0, 0], results
    errs = [err for _, _, err in results]
    assert sum("[llvm] building" in e for e in errs) == 1, errs
    assert sum("[llvm] cache hit" in e for e in errs) == 1, errs
    art = tmp_path / "out" / "clip-vit-b-32" / "llvm"
    builder.load(art, verify=True)
    assert len(list((build_cache / "artifacts").iterdir())) == 1
    assert [p.name for p in art.parent.iterdir() if p.name != "llvm"][0].startswith(".llvm.v-")
    assert len(list(art.parent.iterdir())) == 2
