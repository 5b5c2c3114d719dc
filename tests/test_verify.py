"""Verified loads: a modified, truncated or missing file, or another TVM version, is an
`ArtifactError` naming the file; `build verify` reports it with exit 2."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import safetensors.numpy
import tvm

import builder
from builder import ArtifactError
from builder.artifact import load_params
from builder.build import build
from builder.cli import main
from builder.preset import load_preset

from .conftest import tiny_overrides

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("verify")
    # From the session's build cache (conftest's `shared_cache`); the tests damage copies.
    (b,) = build(load_preset("clip-vit-b-32", tiny_overrides()), root / "out")
    return b.path.resolve()


@pytest.fixture
def art(built, tmp_path):
    # copy2 keeps modification times: the copy passes the fast path like the original.
    return shutil.copytree(built, tmp_path / "llvm")


def test_intact_artifact_loads(art, capsys):
    assert builder.load(art, verify=True).manifest["files"]
    assert main(["verify", str(art)]) == 0
    assert capsys.readouterr().err == f"{art}: ok\n"


def test_truncated_file(art, capsys):
    params = art / "params.safetensors"
    size = params.stat().st_size
    os.truncate(params, size - 10)
    with pytest.raises(ArtifactError, match=f"{params}: {size - 10} bytes, the manifest says"):
        builder.load(art)
    assert main(["verify", str(art)]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"{params}: ") and "truncated" in line


def test_modified_file(art):
    lib = art / "lib.so"
    stat = lib.stat()
    blob = bytearray(lib.read_bytes())
    # The last byte: the linker puts the section headers last, which loading never reads.
    blob[-1] ^= 0xFF
    lib.write_bytes(bytes(blob))
    with pytest.raises(ArtifactError, match=f"{lib}: sha256 differs"):
        builder.load(art)  # a new modification time: hashed even without verify
    os.utime(lib, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    builder.load(art)  # same size and time: the fast path trusts it
    with pytest.raises(ArtifactError, match=f"{lib}: sha256 differs"):
        builder.load(art, verify=True)


def test_missing_file_and_other_tvm(art, capsys):
    manifest = json.loads((art / "manifest.json").read_text())
    manifest["versions"]["tvm"] = "0.26.0"
    (art / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match=r"manifest.json: built with TVM 0.26.0, this is TVM"):
        builder.load(art)
    assert main(["verify", str(art)]) == 2
    assert "built with TVM 0.26.0" in capsys.readouterr().err
    manifest["versions"]["tvm"] = tvm.__version__
    (art / "manifest.json").write_text(json.dumps(manifest))
    (art / "params.safetensors").unlink()
    with pytest.raises(ArtifactError, match=r"params.safetensors: missing"):
        builder.load(art)
    assert isinstance(ArtifactError("x"), ValueError)


def test_loaded_params_equal_the_file(art):
    stored = safetensors.numpy.load_file(str(art / "params.safetensors"))
    encoder = builder.load(art)  # read straight into TVM tensors
    order = encoder.manifest["params"]["order"]
    assert len(encoder._params) == len(order) > 0
    for name, tensor in zip(order, encoder._params, strict=True):
        np.testing.assert_array_equal(tensor.numpy(), stored[name])
    # The numpy path (another device, or bfloat16) reads the same values.
    for name, array in zip(order, load_params(art, order), strict=True):
        np.testing.assert_array_equal(array, stored[name])


def test_params_header_damaged_in_place(art):
    # Same size and modification time: the fast path trusts the file, the read does not.
    params = art / "params.safetensors"
    stat = params.stat()
    blob = bytearray(params.read_bytes())
    at = blob.index(b'"F32"')
    blob[at : at + 5] = b'"F16"'
    params.write_bytes(bytes(blob))
    os.utime(params, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    with pytest.raises(ArtifactError, match=f"{params}: tensor .*, float16 .*, takes .* bytes;"):
        builder.load(art)
    blob[at : at + 5] = b'"F32"'
    at = blob.index(b'"packed.0"')
    blob[at : at + 10] = b'"packed.X"'
    params.write_bytes(bytes(blob))
    os.utime(params, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    match = f"{params}: no tensor 'packed.0', which the manifest lists; rebuild the artifact"
    with pytest.raises(ArtifactError, match=match):
        builder.load(art)
