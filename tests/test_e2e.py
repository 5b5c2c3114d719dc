"""A preset built from the CLI, loaded in a fresh process, run, compared with HF."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import builder
from builder import targets
from builder.assemble import export
from builder.cli import main
from builder.preset import load_preset
from builder.targets.cpu.pipeline import fallback_report

from .conftest import REPO, expected_features, pixels, tiny_overrides

pytestmark = pytest.mark.e2e


def visible(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))


def cli(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "builder", *argv], capture_output=True, text=True, cwd=REPO
    )


def test_cli_build_then_fresh_process_matches_hf(tiny_checkpoint, tmp_path, build_cache):
    """A first build from the command line (an empty cache: it compiles), then the artifact
    in a fresh process, against HF."""
    folder, hf_model = tiny_checkpoint
    overrides = tiny_overrides() + [f"weights.path={folder}"]
    proc = cli("presets/clip-vit-b-32.yaml", *overrides, "--out", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr
    art = tmp_path / "out" / "clip-vit-b-32" / "llvm"
    assert proc.stdout.strip() == str(art)
    assert "[llvm] compiled" in proc.stderr
    x = pixels(3, 30)
    np.save(tmp_path / "x.npy", x)
    # As on a machine without torch: tvm_ffi imports torch when it can, so block it.
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["torch"] = None
        import numpy as np, builder
        assert "tvm" not in sys.modules, "import builder imported tvm (seconds; load does it)"
        enc = builder.load({str(art)!r})
        np.save({str(tmp_path / "y.npy")!r}, enc(np.load({str(tmp_path / "x.npy")!r})))
        """
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    preset = load_preset("clip-vit-b-32", overrides)
    ref = expected_features(hf_model, preset.model, x)
    ours = np.load(tmp_path / "y.npy")
    assert ours.shape == (3, 10, 32)
    assert np.max(np.abs(ours - ref)) <= 1e-4 * np.max(np.abs(ref))


def test_manifest_records_what_was_built(tmp_path):
    code = main(["clip-vit-b-32", *tiny_overrides(), "--out", str(tmp_path)])
    assert code == 0
    art = tmp_path / "clip-vit-b-32" / "llvm"
    manifest = json.loads((art / "manifest.json").read_text())
    assert manifest["preset"] == "clip-vit-b-32"
    assert manifest["resolved_preset"]["model"]["hidden_size"] == 32
    assert manifest["target"]["options"]["mcpu"] not in ("", "host", "generic")
    assert manifest["versions"]["tvm"] == "0.27.0.post1"
    assert manifest["versions"]["builder"] == builder.__version__
    assert manifest["inputs"] == [
        {"name": "pixel_values", "shape": ["batch", 3, 30, 30], "dtype": "float32"}
    ]
    assert manifest["outputs"][0]["shape"] == ["batch", 10, 32]
    assert manifest["weights"]["kind"] == "random" and manifest["weights"]["seed"] == 0
    assert manifest["dtype"] == manifest["params"]["dtype"] == "float32"
    steps = manifest["preprocess"]
    assert (steps["size"], steps["crop_size"], steps["resample"]) == (30, 30, "bicubic")
    # What forward runs on the fallback schedule: the IR-level report's functions, such as
    # the one that puts the CLS token in front of the patches.
    preset = load_preset("clip-vit-b-32", tiny_overrides())
    mod, _ = export(preset.model, preset.blocks)
    target = targets.llvm.tvm_target(preset.targets[0])[0]
    assert manifest["fallback_ops"] == fallback_report(mod, target)
    assert any("concat" in entry["ops"] for entry in manifest["fallback_ops"])
    assert set(manifest["files"]) == {"lib.so", "params.safetensors"}
    for name, entry in manifest["files"].items():
        blob = (art / name).read_bytes()
        assert entry == {
            "bytes": len(blob),
            "sha256": hashlib.sha256(blob).hexdigest(),
            "mtime_ns": (art / name).stat().st_mtime_ns,
        }
    assert visible(tmp_path / "clip-vit-b-32") == ["llvm"]


def test_random_init_is_deterministic_and_seeded(tmp_path):
    runs = {}
    # b: --force, not the cached result of a's key (c's seed is a key of its own)
    for name, seed, force in (("a", 0, []), ("b", 0, ["--force"]), ("c", 1, [])):
        argv = ["clip-vit-b-32", *tiny_overrides(), f"weights.seed={seed}", *force]
        assert main([*argv, "--out", str(tmp_path / name)]) == 0
        runs[name] = builder.load(tmp_path / name / "clip-vit-b-32" / "llvm")(pixels(1, 30))
    np.testing.assert_array_equal(runs["a"], runs["b"])
    assert not np.allclose(runs["a"], runs["c"])


def test_failed_build_leaves_nothing(tmp_path, monkeypatch, capsys, build_cache):
    def broken(mod, target, precision):
        raise RuntimeError("simulated codegen failure")

    monkeypatch.setattr(targets.llvm, "compile", broken)
    code = main(["clip-vit-b-32", *tiny_overrides(), "--out", str(tmp_path)])
    assert code == 1
    err = capsys.readouterr().err
    assert "build failed: 1 of 1 targets failed:" in err
    assert "  [llvm] compile failed: RuntimeError: simulated codegen failure" in err
    assert "Traceback" not in err
    assert not list(tmp_path.rglob("*.so")) and not list(tmp_path.rglob("manifest.json"))


def test_failed_write_keeps_the_old_artifact(tmp_path, monkeypatch, build_cache):
    assert main(["clip-vit-b-32", *tiny_overrides(), "--out", str(tmp_path)]) == 0
    art = tmp_path / "clip-vit-b-32" / "llvm"
    before = (art / "manifest.json").read_text()

    def broken(folder, order, arrays):
        (folder / "params.safetensors").write_bytes(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(builder.artifact, "save_params", broken)
    # New weights: a new version of the artifact, its library reused, its parameters written.
    again = ["clip-vit-b-32", *tiny_overrides(), "weights.seed=1", "--out", str(tmp_path)]
    assert main(again) == 1
    assert (art / "manifest.json").read_text() == before
    assert visible(art.parent) == ["llvm"]
    assert builder.load(art)(pixels(1, 30)).shape == (1, 10, 32)


def test_encoder_rejects_bad_input(tmp_path):
    assert main(["clip-vit-b-32", *tiny_overrides(), "--out", str(tmp_path)]) == 0
    enc = builder.load(tmp_path / "clip-vit-b-32" / "llvm")
    with pytest.raises(
        ValueError, match=r"must have shape \(batch, 3, 30, 30\), got \(2, 3, 32, 30\)"
    ):
        enc(np.zeros((2, 3, 32, 30), np.float32))
    with pytest.raises(ValueError, match="must be float32, got float64"):
        enc(np.zeros((1, 3, 30, 30)))
    with pytest.raises(ValueError, match="must be a numpy array, got list"):
        enc([[0.0]])
    for batch in (1, 2, 5):
        assert enc(pixels(batch, 30)).shape == (batch, 10, 32)


@pytest.mark.slow
def test_llava_clip_full_size_build(tmp_path):
    """README command 1 at full size: 24 layers of ViT-L/14-336, 23 compiled."""
    proc = cli("presets/llava-clip.yaml", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert "RANDOM init" in proc.stderr
    manifest = json.loads((tmp_path / "llava-clip" / "llvm" / "manifest.json").read_text())
    assert manifest["inputs"][0]["shape"] == ["batch", 3, 336, 336]
    assert manifest["outputs"][0]["shape"] == ["batch", 576, 1024]
    assert len(manifest["params"]["order"]) == 5 + 16 * 23
    assert manifest["files"]["params.safetensors"]["bytes"] > 290e6 * 4


def test_bench_command(tmp_path, capsys):
    assert main(["clip-vit-b-32", *tiny_overrides(), "--out", str(tmp_path)]) == 0
    capsys.readouterr()
    art = str(tmp_path / "clip-vit-b-32" / "llvm")
    assert main(["bench", art, "--batch", "2", "--runs", "3"]) == 0
    out = capsys.readouterr().out
    assert "(3 runs, batch 2)" in out and "images/s" in out and "GFLOP/s" in out
    assert main(["bench", art, "--batch", "0"]) == 2
    assert "--batch 0: must be at least 1" in capsys.readouterr().err
    assert main(["bench", str(tmp_path)]) == 2
    assert "not an artifact folder (no manifest.json)" in capsys.readouterr().err


def test_thread_settings_default_and_yield_to_the_user(monkeypatch):
    from builder import runtime

    monkeypatch.delenv(runtime.THREADS_ENV, raising=False)
    monkeypatch.delenv(runtime.SPIN_ENV, raising=False)
    assert runtime.set_threads(None) == runtime.available_cores()
    assert os.environ[runtime.SPIN_ENV] == runtime.SPIN_DEFAULT
    monkeypatch.setenv(runtime.SPIN_ENV, "300000")
    monkeypatch.setenv(runtime.THREADS_ENV, "1")
    assert runtime.set_threads(None) == 1
    assert runtime.set_threads(3) == 3
    assert os.environ[runtime.SPIN_ENV] == "300000"
