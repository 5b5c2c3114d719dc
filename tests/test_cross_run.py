"""Every CPU target's artifact is run, not only built: the aarch64 one under qemu-user in an
aarch64 Python (`tests/aarch64_sysroot.py`), loaded with the builder's runtime as a user on an
aarch64 machine would, and an AVX2 one on this CPU; each against the host llvm artifact on
the same input. One build of a tiny tower writes all three; one qemu process runs."""

from __future__ import annotations

import os
import shutil
import subprocess
import textwrap
import time

import numpy as np
import pytest
import safetensors.numpy

import builder
from builder.build import build
from builder.cache import Cache
from builder.preset import load_preset
from builder.targets import toolchain
from builder.targets.cpu.kernels import _has, kernel_config

from . import aarch64_sysroot
from .conftest import HOST, REPO, TINY, assert_close, pixels, tiny_overrides

# The same float32 graph through each target's kernels: only the order of the sums differs.
TOLERANCE = 1e-5
AVX2 = "{name: avx2, kind: llvm, mcpu: haswell}"
CROSS_LINKER = "aarch64-linux-gnu-g++"
# Runs in the aarch64 Python: artifact folder, input .npy, output .npy.
RUN = textwrap.dedent(
    """
    import platform, sys
    import numpy as np
    import builder
    encoder = builder.load(sys.argv[1])
    np.save(sys.argv[3], encoder(np.load(sys.argv[2])))
    print(platform.machine(), encoder.manifest["params"]["packing"])
    """
)


def unavailable(reason: str) -> None:
    """Skip; but in CI, which installs what these tests need (`.ci/run`), fail."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI installs it: see .ci/run)")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> dict:
    """One build of a tiny tower for this CPU, aarch64 (where its linker is on the PATH)
    and AVX2, in a build cache of its own."""
    cross = shutil.which(CROSS_LINKER) is not None
    names = ["llvm", "avx2", *(["aarch64"] if cross else [])]
    out = tmp_path_factory.mktemp("cross")
    preset = load_preset("clip-vit-b-32", [*tiny_overrides(), f"targets=[llvm,aarch64,{AVX2}]"])
    built = build(preset, out / "artifacts", only=names, cache=Cache(out / "cache"))
    return {b.target: b.path for b in built}


@pytest.fixture(scope="module")
def reference(artifacts) -> tuple[np.ndarray, np.ndarray]:
    """A fixed input and the host llvm artifact's output for it."""
    x = pixels(2, 30, seed=7)
    return x, builder.load(artifacts["llvm"])(x)


def panel_widths(folder) -> set[int]:
    """The column counts (vector lanes times vectors per tile row) of the GEMM weight panels
    an artifact stores: [blocks, K, columns], K at least the tiny tower's width; the other
    3-d parameters are the embeddings, [1, 1 or 10 tokens, width]."""
    stored = safetensors.numpy.load_file(str(folder / "params.safetensors"))
    return {
        a.shape[-1]
        for n, a in stored.items()
        if n.startswith("packed") and a.ndim == 3 and a.shape[1] >= TINY["hidden_size"]
    }


@pytest.mark.e2e
def test_avx2_artifact_runs_on_this_cpu(artifacts, reference):
    if not _has(HOST, "avx2"):
        pytest.skip("this CPU cannot run AVX2 code")
    assert panel_widths(artifacts["avx2"]) == {16}  # 2 vectors of 8 float32 lanes
    assert panel_widths(artifacts["llvm"]) == {kernel_config(HOST).nb}
    x, ref = reference
    rel = assert_close(builder.load(artifacts["avx2"])(x), ref, rel=TOLERANCE)
    print(f"avx2 vs llvm: {rel:.2g} x max|ref|")


@pytest.mark.e2e
def test_aarch64_artifact_runs_under_qemu(artifacts, reference, tmp_path):
    if toolchain.host_machine() != "x86_64":
        pytest.skip("qemu-user runs the aarch64 artifact on an x86-64 host")
    if "aarch64" not in artifacts:
        unavailable(f"{CROSS_LINKER} is not on PATH: no aarch64 artifact to run")
    start = time.monotonic()
    try:
        root = aarch64_sysroot.sysroot()
    except aarch64_sysroot.Unavailable as e:
        unavailable(f"no aarch64 Python to run it: {e}")
    setup = time.monotonic() - start
    x, ref = reference
    np.save(tmp_path / "x.npy", x)
    start = time.monotonic()
    proc = subprocess.run(
        [*aarch64_sysroot.python_command(root), "-c", RUN, str(artifacts["aarch64"]),
         str(tmp_path / "x.npy"), str(tmp_path / "y.npy")],
        env=aarch64_sysroot.python_env([REPO]),
        capture_output=True,
        text=True,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    # It ran on (emulated) aarch64, and packed its weights there, as the manifest asks.
    assert proc.stdout.split() == ["aarch64", "load"]
    rel = assert_close(np.load(tmp_path / "y.npy"), ref, rel=TOLERANCE)
    print(f"aarch64 vs llvm: {rel:.2g} x max|ref|; sysroot {setup:.1f} s, qemu run "
          f"{time.monotonic() - start:.1f} s")  # fmt: skip


# --- the sysroot's setup -------------------------------------------------------------------

APT_DEPENDS = {
    ("python3.11-minimal", "libpython3.11-stdlib", "libstdc++6"): """\
python3.11-minimal
  PreDepends: libc6
  Depends: libpython3.11-minimal
  Depends: <python3.11-virtual>
libpython3.11-stdlib
 |Depends: media-types
  Depends: mime-support
  Depends: libc6
libstdc++6
  Depends: gcc-12-base
  Depends: libc6
""",
    ("libc6", "libpython3.11-minimal", "media-types", "gcc-12-base"): """\
libc6
  Depends: libgcc-s1
  Breaks: nothing-to-follow
libpython3.11-minimal
  Depends: libc6
media-types
gcc-12-base
""",
    ("libgcc-s1",): "libgcc-s1\n  Depends: gcc-12-base\n  PreDepends: dpkg\n",
}


@pytest.mark.unit
def test_packages_resolve_to_the_first_alternative_without_tools(monkeypatch):
    asked = []

    def apt_cache(step, cmd, cwd=None):
        names = tuple(cmd[cmd.index("--no-enhances") + 1 :])
        asked.append(names)
        return APT_DEPENDS[names]

    monkeypatch.setattr(aarch64_sysroot, "_run", apt_cache)
    assert aarch64_sysroot.resolve_packages([]) == [
        "gcc-12-base",
        "libc6",
        "libgcc-s1",
        "libpython3.11-minimal",
        "libpython3.11-stdlib",
        "libstdc++6",
        "media-types",
        "python3.11-minimal",
    ]
    assert len(asked) == 3  # one apt-cache call per level


@pytest.mark.unit
def test_setup_killed_or_failed_leaves_no_sysroot(tmp_path, monkeypatch):
    """A setup that fails leaves nothing; the folder of one killed midway (a `.tmp-` folder)
    is removed by the next, which publishes its sysroot by renaming it into place."""
    monkeypatch.setenv(aarch64_sysroot.CACHE_ENV, str(tmp_path))
    monkeypatch.setattr(aarch64_sysroot.shutil, "which", lambda tool: f"/usr/bin/{tool}")

    def failing(work, pins):
        (work / "sysroot" / "usr").mkdir(parents=True)
        raise aarch64_sysroot.Unavailable("apt-get download: failed")

    monkeypatch.setattr(aarch64_sysroot, "_make", failing)
    with pytest.raises(aarch64_sysroot.Unavailable, match="apt-get download"):
        aarch64_sysroot.sysroot()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock"]

    (tmp_path / ".tmp-killed" / "sysroot").mkdir(parents=True)

    def making(work, pins):
        (work / "sysroot" / "usr").mkdir(parents=True)
        return work / "sysroot"

    monkeypatch.setattr(aarch64_sysroot, "_make", making)
    root = aarch64_sysroot.sysroot()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock", root.name]
    assert (root / "usr").is_dir()
    monkeypatch.setattr(aarch64_sysroot, "_make", failing)
    assert aarch64_sysroot.sysroot() == root  # made once: found, not made again
