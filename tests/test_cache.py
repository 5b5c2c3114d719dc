"""The build cache: what each key covers, reuse, --force, damaged entries, concurrent builds,
and hits decided without TVM."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import builder
from builder import artifact, cache, library, make_artifact, packing, targets
from builder.assemble import export
from builder.cache import Cache
from builder.cli import main
from builder.preset import load_preset
from builder.safetensors_io import SafetensorsFile
from builder.targets.cpu import kernels
from builder.weights import load_weights

from .conftest import REPO, tiny_overrides

TINY = ["clip-vit-b-32", *tiny_overrides()]


def key_of(preset, root) -> str:
    c = Cache(root)
    return c.artifact_key(preset, preset.targets[0], c.weights_digest(preset))


def library_key_of(preset) -> str:
    entry = preset.targets[0]
    target, options = targets.pipeline(entry.kind).tvm_target(entry)
    mod, _ = export(preset.model, preset.blocks, preset.dtype)
    return library.make_library_key(library.graph_digest(mod), entry, target, options)


@pytest.mark.unit
def test_artifact_key_changes_with_every_part(tmp_path, monkeypatch, tiny_checkpoint):
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
    for attr, value in (
        ("tvm_versions", lambda: {"apache-tvm": "other"}),
        ("host_cpu", lambda: {"model name": "another CPU"}),
        ("__version__", "other"),
        ("source_digest", lambda: "edited"),
        ("weights_code", lambda: "edited"),
    ):
        with monkeypatch.context() as m:
            m.setattr(cache, attr, value)
            keys[attr] = key_of(base, tmp_path)

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
def test_library_key_covers_what_the_code_depends_on_and_not_the_weights(monkeypatch):
    base = load_preset(TINY[0], TINY[1:])
    first = library_key_of(base)
    # What changes the artifact but not the compiled code leaves the library key alone.
    for same in ("weights.seed=7", "description=x", "preprocess.resample=bilinear"):
        assert library_key_of(load_preset(TINY[0], [*TINY[1:], same])) == first, same

    keys = {"base": first}
    for change in (
        "model.num_hidden_layers=4",  # the graph
        "model.layer_norm_eps=1e-6",  # a constant in the graph
        "dtype=float16",
        "targets=[{name: llvm, mcpu: skylake}]",
        "targets=[{name: llvm, num_cores: 7}]",
        "targets=[{name: llvm, precision: bfloat16}]",
    ):
        keys[change] = library_key_of(load_preset(TINY[0], [*TINY[1:], change]))
    for i, (module, attr, value) in enumerate(
        [
            (targets.llvm, "PIPELINE_VERSION", "other"),
            (library, "pipeline_sources", lambda: "edited"),
            (library, "versions", lambda: {"tvm": "other", "tvm_ffi": "0"}),
            (library, "versions", lambda: {"tvm": "0", "tvm_ffi": "other"}),
            (kernels, "l2_bytes", lambda target: 3 << 20),  # sizes the GEMMs' weight blocks
        ]
    ):
        with monkeypatch.context() as m:
            m.setattr(module, attr, value)
            keys[f"{module.__name__}.{attr} ({i})"] = library_key_of(base)
    assert len(set(keys.values())) == len(keys), keys


@pytest.mark.unit
def test_params_key_covers_library_weights_and_dtype():
    weights = {"kind": "random", "seed": 0, "code": "x"}
    first = make_artifact.make_params_key("lib", weights, "float32", "build")
    assert make_artifact.make_params_key("lib", dict(weights), "float32", "build") == first
    others = [
        make_artifact.make_params_key("lib2", weights, "float32", "build"),
        make_artifact.make_params_key("lib", {**weights, "seed": 1}, "float32", "build"),
        make_artifact.make_params_key("lib", {**weights, "code": "y"}, "float32", "build"),
        make_artifact.make_params_key("lib", weights, "bfloat16", "build"),
        make_artifact.make_params_key("lib", weights, "float32", "load"),
    ]
    assert len({first, *others}) == 6


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
    library = (art / "lib.so").read_bytes()  # --force replaced the stored library

    # New weights: a new artifact, the same compiled library, byte for byte.
    assert main([*TINY, "weights.seed=3", *out]) == 0
    assert len(compiled) == 2
    assert "compiled library reused" in capsys.readouterr().err
    assert artifact.read_manifest(art)["weights"]["seed"] == 3
    assert (art / "lib.so").read_bytes() == library
    # A plan that cannot be read, or one whose library is gone, is made again.
    (plan,) = (build_cache / "plans").iterdir()
    plan.write_text("{")
    assert main([*TINY, "weights.seed=4", *out]) == 0
    assert len(compiled) == 2
    assert "compiled library reused" in capsys.readouterr().err
    assert (
        Cache(build_cache).plan(plan.stem)["library_key"]
        == artifact.read_manifest(art)["library_key"]
    )  # written again
    shutil.rmtree(build_cache / "libraries")
    assert main([*TINY, "weights.seed=5", *out]) == 0
    assert len(compiled) == 3
    assert artifact.read_manifest(art)["weights"]["seed"] == 5
    # A graph change compiles.
    assert main([*TINY, "model.layer_norm_eps=1e-3", *out]) == 0
    assert len(compiled) == 4

    # A damaged cached copy (a shorter file) is noticed and not served: the parameters
    # (the damaged file is a link to them) are made again; the intact library is reused.
    cached = build_cache / "artifacts" / first / "params.safetensors"
    os.truncate(cached, cached.stat().st_size - 1)
    capsys.readouterr()
    assert main([*TINY, *out]) == 0
    assert len(compiled) == 4
    err = capsys.readouterr().err
    assert "cached copy damaged" in err and "compiled library reused" in err
    assert builder.load(art, verify=True).manifest["cache_key"] == first


WITHOUT_TVM = textwrap.dedent(
    """
    import sys
    from builder.cli import main

    code = main(sys.argv[1:])
    assert code == 0, code
    print("imported:", sorted(m for m in ("tvm", "torch") if m in sys.modules))
    """
)


@pytest.mark.e2e
def test_hit_and_new_weights_are_built_without_tvm(tmp_path, build_cache):
    """A hit imports neither TVM nor torch; nor does a build whose weights alone changed,
    which packs them with TVM's runtime library (builder.packing), each parameter made as
    the packing reaches it, into the parameters that making all of that seed's weights and
    packing them at once here gives."""
    out = ["--out", str(tmp_path)]
    assert main([*TINY, *out]) == 0
    for extra, said in (([], "cache hit"), (["weights.seed=8"], "compiled library reused")):
        proc = subprocess.run(
            [sys.executable, "-c", WITHOUT_TVM, *TINY, *extra, *out],
            cwd=REPO,
            capture_output=True,
            text=True,
        )
        assert proc.returncode == 0, proc.stderr
        assert said in proc.stderr
        assert "imported: []" in proc.stdout, proc.stdout
    assert "packed weights" in proc.stderr
    assert "made as they are packed" in proc.stderr
    art = tmp_path / "clip-vit-b-32" / "llvm"
    manifest = builder.load(art).manifest
    assert manifest["weights"]["seed"] == 8
    preset = load_preset(TINY[0], [*TINY[1:], "weights.seed=8"])
    _, params = export(preset.model, preset.blocks)
    arrays, _ = load_weights(preset, dict(params))
    order, packed = packing.pack_params(art / "lib.so", [n for n, _ in params], arrays)
    assert manifest["params"]["order"] == order
    stored = SafetensorsFile(art / "params.safetensors")
    for name in order:
        np.testing.assert_array_equal(stored.read(name), packed[name])


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


def test_kernel_store_serves_a_parse_to_other_processes(build_cache, monkeypatch, tmp_path):
    """A parsed kernel is stored in the cache and loaded instead of parsed by the next
    process (the same function); a damaged entry is parsed again and replaced; a cache that
    cannot be written only costs the parse; `BUILDER_KERNEL_DIR` keeps the store elsewhere."""
    monkeypatch.delenv(cache.KERNELS_ENV)  # the session's store, set by conftest.py
    cfg = kernels.KernelConfig(vec=16, nv=4, mr=6)
    parsed = []
    real = kernels.tvmscript.parse
    monkeypatch.setattr(kernels.tvmscript, "parse", lambda s: parsed.append(s) or real(s))

    def new_process_parse():
        kernels._parse.cache_clear()
        return kernels.layer_norm_kernel(cfg, 40, 1e-5)

    first = new_process_parse()
    (stored,) = (build_cache / "kernels").glob("*.json")
    assert len(parsed) == 1
    kernels.tvm.ir.assert_structural_equal(new_process_parse(), first)
    assert len(parsed) == 1  # loaded, not parsed

    stored.write_text("{not json")
    kernels.tvm.ir.assert_structural_equal(new_process_parse(), first)
    assert len(parsed) == 2
    kernels.tvm.ir.assert_structural_equal(kernels.tvm.ir.load_json(stored.read_text()), first)

    blocked = tmp_path / "a-file"
    blocked.write_text("")
    monkeypatch.setenv("BUILDER_CACHE_DIR", str(blocked / "cache"))
    kernels.tvm.ir.assert_structural_equal(new_process_parse(), first)
    assert len(parsed) == 3

    monkeypatch.setenv(cache.KERNELS_ENV, str(tmp_path / "kernels-elsewhere"))
    kernels.tvm.ir.assert_structural_equal(new_process_parse(), first)
    assert len(parsed) == 4
    assert [p.name for p in (tmp_path / "kernels-elsewhere").iterdir()] == [stored.name]
    kernels.tvm.ir.assert_structural_equal(new_process_parse(), first)
    assert len(parsed) == 4


def test_kernel_objects_serve_later_compiles(build_cache, monkeypatch):
    """Each PrimFunc a compile builds is stored as an object; a later compile of a tower
    made of the same kernels (here one layer fewer) builds none of them again, and its
    library computes what the same tower compiled from nothing computes, bit for bit;
    `build --force` builds them all again; an object cut short is built again and
    replaced; a store folder that exists but cannot be written still compiles."""
    import numpy as np
    import tvm
    from tvm import relax

    from builder.weights.random_init import random_weights

    from .conftest import HOST, pixels

    monkeypatch.delenv(cache.KERNELS_ENV)  # the session's store, set by conftest.py
    built = []
    real = tvm.tirx.build

    def counting(mod, *args, **kwargs):
        built.extend(gvar.name_hint for gvar in mod.get_global_vars())
        return real(mod, *args, **kwargs)

    monkeypatch.setattr(tvm.tirx, "build", counting)
    kernels = {"gemm", "attention", "layer_norm", "pack_weight"}

    def compile_tower(layers):
        preset = load_preset(TINY[0], tiny_overrides(num_hidden_layers=layers))
        mod, params = export(preset.model, preset.blocks)
        built.clear()
        return targets.llvm.compile(mod, HOST, "float32"), dict(params)

    def forward(library, shapes):
        order, packed = packing.pack_params(library, list(shapes), random_weights(shapes, seed=3))
        vm = relax.VirtualMachine(library, tvm.cpu())
        image = tvm.runtime.tensor(pixels(2, 30))
        return vm["forward"](image, *(tvm.runtime.tensor(packed[n]) for n in order)).numpy()

    compile_tower(3)
    assert kernels <= set(built)
    stored = sorted((build_cache / "kernels").glob("*.o"))
    assert len(stored) == len(set(built))

    reused, shapes = compile_tower(2)
    # The VM's shape function lists its statements in no fixed order: it may be built again.
    assert [n for n in built if not n.startswith("shape_func")] == []

    with cache.rebuilding_objects():  # what `build --force` compiles under
        compile_tower(2)
    assert kernels <= set(built)

    whole = stored[0].read_bytes()
    stored[0].write_bytes(whole[: len(whole) // 2])  # its ELF header intact
    rebuilt = []
    Cache().kernel_object(stored[0].stem, lambda p: rebuilt.append(p) or p.write_bytes(whole))
    assert len(rebuilt) == 1 and stored[0].read_bytes() == whole
    assert Cache().kernel_object(stored[0].stem, rebuilt.append) == stored[0]
    assert len(rebuilt) == 1  # whole again: reused

    monkeypatch.setenv(cache.KERNELS_ENV, "/sys")  # a folder no one can write, root included
    fresh, _ = compile_tower(2)
    assert kernels <= set(built)
    np.testing.assert_array_equal(forward(reused, shapes), forward(fresh, shapes))
