"""Every target a preset lists, in one build: llvm for this CPU, cuda compiled ahead of time,
aarch64 cross-linked; a target that cannot be built fails alone."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy

import builder
from builder.build import build
from builder.cli import main
from builder.preset import load_preset
from builder.targets import device_code, llvm, toolchain
from builder.targets.cpu.kernels import kernel_config

from .conftest import (
    REPO,
    assert_close,
    cpu_target,
    expected_features,
    gemm_panels,
    needs_bf16,
    needs_half,
    pixels,
    rounding,
    tiny_overrides,
)

ALL = "targets=[llvm,cuda,aarch64]"
EM_AARCH64 = 183
needs_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH")
needs_cross = pytest.mark.skipif(
    shutil.which("aarch64-linux-gnu-g++") is None, reason="aarch64-linux-gnu-g++ not on PATH"
)


def hide(monkeypatch, *tools: str) -> None:
    """Take tools off the PATH, as the builder sees it."""
    real = shutil.which
    monkeypatch.setattr(toolchain, "which", lambda t: None if t in tools else real(t))


@pytest.fixture(scope="module")
def three(tmp_path_factory):
    """One build of a tiny tower for llvm, cuda (sm_80, sm_90) and aarch64."""
    if not (shutil.which("nvcc") and shutil.which("aarch64-linux-gnu-g++")):
        pytest.skip("needs nvcc and aarch64-linux-gnu-g++")
    out = tmp_path_factory.mktemp("three")
    built = build(load_preset("clip-vit-b-32", [*tiny_overrides(), ALL]), out)
    return {b.target: b.path for b in built}


# --- presets -------------------------------------------------------------------------------


@pytest.mark.unit
def test_known_target_names_expand():
    targets = load_preset("clip-vit-b-32", [ALL]).targets
    assert [(t.name, t.kind) for t in targets] == [
        ("llvm", "llvm"),
        ("cuda", "cuda"),
        ("aarch64", "llvm"),
    ]
    assert targets[1].arch == ["sm_80", "sm_90"]
    assert (targets[2].mtriple, targets[2].mcpu) == ("aarch64-linux-gnu", "generic")


@pytest.mark.unit
def test_llvm_bf16_is_this_cpus_target_in_bfloat16(capsys):
    """`targets=[llvm-bf16]`: the short way to a bfloat16 artifact of any preset, written
    to its own folder; `build show` spells the entry out."""
    (target,) = load_preset("llava-clip", ["targets=[llvm-bf16]"]).targets
    assert (target.name, target.kind, target.mcpu, target.precision) == (
        "llvm-bf16",
        "llvm",
        "host",
        "bfloat16",
    )
    assert main(["show", "llava-clip", "targets=[llvm, llvm-bf16]"]) == 0
    shown = capsys.readouterr().out
    assert "name: llvm-bf16" in shown and "precision: bfloat16" in shown


@pytest.mark.unit
def test_options_of_another_kind_and_cuda_without_arch_are_errors(tmp_path, capsys):
    path = tmp_path / "p.yaml"
    path.write_text(
        textwrap.dedent(
            """\
            targets:
              - {name: gpu, kind: cuda, mcpu: znver4}
              - {name: cpu, arch: [sm_80]}
              - {name: gpu16, kind: cuda, arch: [sm_80], precision: bfloat16}
            """
        )
    )
    assert main(["check", str(path)]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"{path}:2: targets[0].mcpu: does not apply to a cuda target; its options: "
        "['arch', 'kind', 'name', 'precision']",
        f"{path}:2: targets[0]: a cuda target needs arch, e.g. [sm_80, sm_90] (no default: "
        "code for the wrong architecture does not load)",
        f"{path}:3: targets[1].arch: does not apply to a llvm target; its options: "
        "['kind', 'mattr', 'mcpu', 'mtriple', 'name', 'num_cores', 'precision']",
        f"{path}:4: targets[2].precision: bfloat16 is for llvm targets; a cuda target takes "
        "float32 or float16",
    ]
    code = main(["check", "clip-vit-b-32", "targets=[{name: old, kind: cuda, arch: [sm80]}]"])
    assert code == 2
    assert (
        capsys.readouterr()
        .err.strip()
        .endswith("targets[0].arch[0]: 'sm80' does not match '^sm_[0-9]{2,3}[a-z]?$'")
    )


@pytest.mark.unit
def test_show_output_is_a_valid_preset(tmp_path, capsys):
    assert main(["show", "clip-vit-b-32", ALL]) == 0
    path = tmp_path / "clip-vit-b-32.yaml"
    path.write_text(capsys.readouterr().out)
    assert load_preset(path) == load_preset("clip-vit-b-32", [ALL])


@pytest.mark.unit
def test_gencode_has_a_cubin_per_arch_and_ptx_of_the_newest():
    assert device_code.gencode_flags(["sm_80", "sm_90"]) == [
        "-gencode",
        "arch=compute_80,code=sm_80",
        "-gencode",
        "arch=compute_90,code=sm_90",
        "-gencode",
        "arch=compute_90,code=compute_90",
    ]


def _packed(fmt: bytes, data: bytes) -> bytes:
    """A packed module tree as TVM writes it: an executable, the library, a cuda module."""

    def string(b: bytes) -> bytes:
        return struct.pack("<Q", len(b)) + b

    fmap = struct.pack("<Q", 1) + string(b"k") + string(b"k") + struct.pack("<Q", 0) * 3
    tree = struct.pack("<8Q", 4, 0, 1, 2, 2, 2, 1, 2)  # row_ptr, child_indices
    body = tree + string(b"relax.VMExecutable") + string(b"exec") + string(b"_lib")
    body += string(b"cuda") + string(string(fmt) + fmap + string(data))
    return struct.pack("<Q", len(body)) + body


@pytest.mark.unit
def test_rewrite_replaces_source_or_a_single_arch_binary():
    def fake_nvcc(source: str) -> bytes:
        return b"FATBIN(" + source.encode() + b")"

    out = device_code.rewrite_cuda_modules(_packed(b"cuda", b"__global__ k"), fake_nvcc)
    assert out == _packed(b"cubin", b"FATBIN(__global__ k)")
    # A CUDA runtime that compiled for one arch already: the source comes from the module.
    out = device_code.rewrite_cuda_modules(_packed(b"cubin", b"\x7fELF"), fake_nvcc, ["src"])
    assert out == _packed(b"cubin", b"FATBIN(src)")
    with pytest.raises(ValueError, match="holds 'ptx' and no CUDA source"):
        device_code.rewrite_cuda_modules(_packed(b"ptx", b"//"), fake_nvcc)


# --- the three artifacts -------------------------------------------------------------------


@pytest.mark.e2e
def test_one_build_writes_every_target_with_its_manifest(three):
    assert sorted(three) == ["aarch64", "cuda", "llvm"]
    for name, folder in three.items():
        manifest = json.loads((folder / "manifest.json").read_text())
        assert manifest["target"]["name"] == name
        assert set(manifest["files"]) == {"lib.so", "params.safetensors"}
        assert manifest["runs_on"]["needs"]
    assert builder.load(three["llvm"])(pixels(2, 30)).shape == (2, 10, 32)


@pytest.mark.e2e
def test_cuda_library_holds_device_code_not_source(three):
    lib = (three["cuda"] / "lib.so").read_bytes()
    held = [e for o in device_code.find_fatbins(lib) for e in device_code.fatbin_entries(lib, o)]
    assert sorted(held) == [("cubin", "sm_80"), ("cubin", "sm_90"), ("ptx", "compute_90")]
    assert b"__global__" not in lib and b'extern "C"' not in lib
    manifest = json.loads((three["cuda"] / "manifest.json").read_text())
    assert sorted(manifest["runs_on"]["device_code"]) == [
        "cubin sm_80",
        "cubin sm_90",
        "ptx compute_90",
    ]
    assert manifest["runs_on"]["device"] == "cuda" and manifest["runs_on"]["min_arch"] == "sm_80"


@pytest.mark.e2e
def test_tvm_loader_hands_the_fatbin_to_the_cuda_module(three):
    """TVM's own loader reads the packed modules and gives the CUDA module loader a binary
    labelled cubin. The CUDA loader is stood in for (no GPU here), in a fresh process."""
    script = textwrap.dedent(
        f"""
        import struct, sys
        from builder.tvm_import import import_tvm
        tvm = import_tvm()  # without torch: seconds
        import tvm_ffi
        got = []

        @tvm_ffi.register_global_func("ffi.Module.load_from_bytes.cuda", override=True)
        def load(blob):
            got.append(bytes(blob))
            return tvm_ffi.get_global_func("runtime.SourceModuleCreate")("", "cuda")

        tvm.runtime.load_module({str(three["cuda"] / "lib.so")!r})
        (blob,) = got
        n = struct.unpack_from("<Q", blob)[0]
        fmt, rest = blob[8 : 8 + n], blob[8 + n :]
        sys.stdout.write(fmt.decode() + " " + str(rest.count(bytes.fromhex("50ed55ba"))))
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "cubin 1"


@pytest.mark.e2e
def test_aarch64_library_is_an_aarch64_elf(three):
    lib = (three["aarch64"] / "lib.so").read_bytes()
    assert lib[:4] == b"\x7fELF" and lib[4] == 2  # 64-bit
    (machine,) = struct.unpack_from("<H", lib, 18)
    assert machine == EM_AARCH64
    runs_on = json.loads((three["aarch64"] / "manifest.json").read_text())["runs_on"]
    assert (runs_on["device"], runs_on["machine"], runs_on["os"]) == ("cpu", "aarch64", "linux")
    options = json.loads((three["aarch64"] / "manifest.json").read_text())["target"]["options"]
    assert "num-cores" not in options  # the build machine's cores mean nothing there


@pytest.mark.e2e
def test_runtime_refuses_what_this_machine_cannot_run(three):
    if toolchain.host_machine() != "aarch64":
        with pytest.raises(ValueError, match=r"built for aarch64 linux; this machine is x86_64"):
            builder.load(three["aarch64"])
    import tvm

    if not tvm.cuda(0).exist:
        with pytest.raises(ValueError, match=r"a cuda artifact, but this machine has no CUDA"):
            builder.load(three["cuda"])


# --- failures stay with their target -------------------------------------------------------


@pytest.mark.e2e
@needs_cross
def test_missing_cross_linker_fails_that_target_only(tmp_path, monkeypatch, capsys, build_cache):
    hide(monkeypatch, "aarch64-linux-gnu-g++")
    args = ["clip-vit-b-32", *tiny_overrides(), "targets=[aarch64,llvm]", "--out", str(tmp_path)]
    assert main(args) == 1
    out, err = capsys.readouterr()
    assert out.splitlines() == [str(tmp_path / "clip-vit-b-32" / "llvm")]
    assert (
        "build failed: 1 of 2 targets failed:\n"
        "  [aarch64] cannot build on this machine: aarch64-linux-gnu-g++ is not on PATH (it "
        "links the aarch64-linux-gnu library; Debian/Ubuntu: apt-get install "
        "g++-aarch64-linux-gnu)"
    ) in err
    assert "Traceback" not in err
    # Published artifacts are links to hidden version folders (docs/build-cache.md).
    published = [p.name for p in (tmp_path / "clip-vit-b-32").iterdir() if p.name[0] != "."]
    assert published == ["llvm"]


@pytest.mark.e2e
def test_missing_nvcc_and_unknown_arch_name_the_target(tmp_path, monkeypatch, capsys, build_cache):
    hide(monkeypatch, "nvcc")
    args = ["clip-vit-b-32", *tiny_overrides(), "targets=[cuda,llvm]", "--out", str(tmp_path)]
    assert main(args) == 1
    out, err = capsys.readouterr()
    assert out.splitlines() == [str(tmp_path / "clip-vit-b-32" / "llvm")]
    assert "  [cuda] cannot build on this machine: nvcc is not on PATH" in err
    assert (tmp_path / "clip-vit-b-32" / "llvm" / "manifest.json").is_file()


@pytest.mark.unit
@needs_nvcc
def test_arch_nvcc_cannot_compile_is_named():
    preset = load_preset(
        "clip-vit-b-32", ["targets=[{name: old, kind: cuda, arch: [sm_50, sm_80]}]"]
    )
    from builder.targets import cuda

    (line,) = cuda.missing(preset.targets[0])
    assert "cannot compile for ['sm_50']; it knows ['sm_" in line


# --- precision -----------------------------------------------------------------------------


# A tiny tower's error against HF float32 with 16-bit GEMM operands: float16 has 11
# significant bits, bfloat16 8.
PAIR_TOLERANCE = {"float16": 1e-2, "bfloat16": 5e-2}


def float16_build(hf_checkpoint, tmp_path, precision="float16", **options) -> Path:
    """A tiny llvm artifact of `precision` float16 or bfloat16, checked against HF float32:
    its folder."""
    folder, hf_model = hf_checkpoint
    fields = ", ".join(f"{k}: {v}" for k, v in {"precision": precision, **options}.items())
    overrides = [
        *tiny_overrides(),
        f"weights.path={folder}",
        f"targets=[{{name: half, kind: llvm, {fields}}}]",
    ]
    preset = load_preset("clip-vit-b-32", overrides)
    (built,) = build(preset, tmp_path)
    x = pixels(2, 30)
    ours = builder.load(built.path)(x)
    assert ours.dtype == np.float32
    ref = expected_features(hf_model, preset.model, x)
    rel = assert_close(ours, ref, rel=PAIR_TOLERANCE[precision])
    assert rel > 1e-6  # the 16-bit type really was used
    return built.path


@pytest.mark.parity
@needs_half
def test_float16_multiplies_in_float16_where_the_cpu_can(tiny_checkpoint, tmp_path):
    """On a CPU with AVX-512 FP16 the GEMM weights are packed as float16 pairs: K/2 rows
    (tiny tower: K = 32 -> 16 rows; K = 64 -> 32)."""
    panels = gemm_panels(float16_build(tiny_checkpoint, tmp_path))
    assert (1, 16, 64) in panels and (1, 64, 64) not in panels, panels


@pytest.mark.parity
@needs_bf16
def test_bfloat16_multiplies_in_bfloat16_where_the_cpu_can(tiny_checkpoint, tmp_path):
    """On a CPU with AVX-512 BF16 the GEMM weights are packed as bfloat16 pairs (K/2 rows)
    whose halves are the weights rounded to bfloat16."""
    folder = float16_build(tiny_checkpoint, tmp_path, precision="bfloat16")
    panels = gemm_panels(folder)
    assert (1, 16, 64) in panels and (1, 64, 64) not in panels, panels
    stored = safetensors.numpy.load_file(str(folder / "params.safetensors"))
    halves = next(a for a in stored.values() if a.shape == (1, 16, 64)).view(np.uint32)
    lo, hi = (halves << 16).view(np.float32), (halves & 0xFFFF0000).view(np.float32)
    assert np.abs(lo).max() > 0 and np.abs(hi).max() > 0  # both k of each pair are weights


@pytest.mark.parity
@pytest.mark.parametrize("precision", ["float16", "bfloat16"])
def test_16_bit_precision_without_the_arithmetic_rounds_the_operands(
    tiny_checkpoint, tmp_path, precision
):
    """Elsewhere (this CPU where it lacks the type's GEMMs, else an AVX-512 CPU without
    them, whose code this CPU also runs) the float32 GEMMs take operands rounded to the type:
    float32 panels holding its values. (TVM's mixed precision missed the GEMM kernels:
    ViT-B/16 with 2 layers took 2.7 s, not 16 ms.)"""
    options = rounding(precision)
    folder = float16_build(tiny_checkpoint, tmp_path, precision, **options)
    target = cpu_target(options)
    panels = gemm_panels(folder, kernel_config(target).nb)
    rows = {k for _, k, _ in panels}
    assert {32, 64} <= rows and 16 not in rows, panels  # K of 32 and 64, not halved in pairs
    stored = safetensors.numpy.load_file(str(folder / "params.safetensors"))
    checked = 0
    for name, a in stored.items():
        if a.shape in panels:
            if precision == "float16":
                assert np.array_equal(a.astype(np.float16).astype(np.float32), a), name
            else:  # the low 16 bits of a bfloat16 value are zero
                assert not (a.view(np.uint32) & 0xFFFF).any(), name
            checked += 1
    assert checked


@pytest.mark.e2e
def test_weights_packed_at_load_equal_packed_at_build(tmp_path, monkeypatch, build_cache):
    """A cross-compiled library stores its weights unpacked and the runtime packs them when it
    loads the artifact; shown here on the host by forcing that path."""
    base = ["clip-vit-b-32", *tiny_overrides()]
    assert main([*base, "--out", str(tmp_path / "build")]) == 0
    monkeypatch.setattr(llvm, "params_packing", lambda entry: "load")
    assert main([*base, "--out", str(tmp_path / "load"), "--force"]) == 0
    at_build = builder.load(tmp_path / "build" / "clip-vit-b-32" / "llvm")
    at_load = builder.load(tmp_path / "load" / "clip-vit-b-32" / "llvm")
    assert at_build.manifest["params"]["packing"] == "build"
    assert at_load.manifest["params"]["packing"] == "load"
    assert at_load.manifest["params"]["order"][0] == "vision_model.embeddings.class_embedding"
    x = pixels(2, 30)
    np.testing.assert_array_equal(at_load(x), at_build(x))
