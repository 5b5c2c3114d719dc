"""Every CPU target's artifact is run, not only built: the aarch64 one under qemu-user in an
aarch64 Python (`tests/aarch64_sysroot.py`), loaded with the builder's runtime as a user on an
aarch64 machine would, and an AVX2 one on this CPU; each against the host llvm artifact on
the same input. One build of a tiny tower writes all three; one qemu process runs, started
before the build so that its imports (most of its time) overlap the build."""

from __future__ import annotations

import os
import shutil
import subprocess
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy

import builder
from builder.build import build
from builder.preset import load_preset
from builder.targets import toolchain
from builder.targets.cpu.kernels import _has, kernel_config

from . import aarch64_sysroot
from .conftest import HOST, REPO, TINY, assert_close, pixels, tiny_overrides

# The same float32 graph through each target's kernels: only the order of the sums differs.
TOLERANCE = 1e-5
PRESET = "clip-vit-b-32"
AVX2 = "{name: avx2, kind: llvm, mcpu: haswell}"
CROSS_LINKER = "aarch64-linux-gnu-g++"
# Runs in the aarch64 Python: artifact folder, input .npy, output .npy. It loads TVM's
# runtime library first (`builder.vm`), then waits for "run" on stdin: the artifact is being
# built meanwhile. It says whether TVM's Python package was imported (it is not needed).
RUN = textwrap.dedent(
    """
    import platform, sys
    import numpy as np
    import builder
    from builder import vm
    vm.cpu()
    if sys.stdin.readline().strip() != "run":
        sys.exit("not told to run")
    encoder = builder.load(sys.argv[1])
    np.save(sys.argv[3], encoder(np.load(sys.argv[2])))
    print(platform.machine(), encoder.manifest["params"]["packing"], "tvm" in sys.modules)
    """
)


def unavailable(reason: str) -> None:
    """Skip; but in CI, which installs what these tests need (`.ci/run`), fail."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI installs it: see .ci/run)")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("cross")
    np.save(folder / "x.npy", pixels(2, 30, seed=7))  # the input every artifact gets
    return folder


@pytest.fixture(scope="module")
def aarch64_python(scratch):
    """The aarch64 Python under qemu, started on the aarch64 artifact's future folder
    (`subprocess.Popen`, with the seconds its sysroot took to find or make); or the reason
    it cannot run (a string)."""
    if toolchain.host_machine() != "x86_64":
        yield "qemu-user runs the aarch64 artifact here only on an x86-64 host"
        return
    if shutil.which(CROSS_LINKER) is None:
        yield f"{CROSS_LINKER} is not on PATH: no aarch64 artifact to run"
        return
    start = time.monotonic()
    try:
        root = aarch64_sysroot.sysroot()
    except aarch64_sysroot.Unavailable as e:
        yield f"no aarch64 Python to run it: {e}"
        return
    setup = time.monotonic() - start
    folder = scratch / "artifacts" / PRESET / "aarch64"
    proc = subprocess.Popen(
        [*aarch64_sysroot.python_command(root), "-c", RUN, str(folder),
         str(scratch / "x.npy"), str(scratch / "y.npy")],
        env=aarch64_sysroot.python_env([REPO]),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    proc.started, proc.setup = time.monotonic(), setup
    yield proc
    if proc.poll() is None:  # the test did not run (deselected, or the build failed)
        proc.kill()
    proc.communicate()


@pytest.fixture(scope="module")
def artifacts(scratch, aarch64_python) -> dict[str, Path]:
    """One build of a tiny tower for this CPU, aarch64 (where its linker is on the PATH)
    and AVX2, through the session's build cache (conftest's `shared_cache`: the host one is
    the tiny tower other tests build)."""
    cross = shutil.which(CROSS_LINKER) is not None
    names = ["llvm", "avx2", *(["aarch64"] if cross else [])]
    preset = load_preset(PRESET, [*tiny_overrides(), f"targets=[llvm,aarch64,{AVX2}]"])
    built = build(preset, scratch / "artifacts", only=names)
    return {b.target: b.path for b in built}


@pytest.fixture(scope="module")
def reference(scratch, artifacts) -> np.ndarray:
    """The host llvm artifact's output for the input."""
    return builder.load(artifacts["llvm"])(np.load(scratch / "x.npy"))


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
def test_avx2_artifact_runs_on_this_cpu(scratch, artifacts, reference):
    if not _has(HOST, "avx2"):
        pytest.skip("this CPU cannot run AVX2 code")
    assert panel_widths(artifacts["avx2"]) == {16}  # 2 vectors of 8 float32 lanes
    assert panel_widths(artifacts["llvm"]) == {kernel_config(HOST).nb}
    out = builder.load(artifacts["avx2"])(np.load(scratch / "x.npy"))
    print(f"avx2 vs llvm: {assert_close(out, reference, rel=TOLERANCE):.2g} x max|ref|")


@pytest.mark.e2e
def test_aarch64_artifact_runs_under_qemu(scratch, aarch64_python, artifacts, reference):
    if toolchain.host_machine() != "x86_64":
        pytest.skip(aarch64_python)
    if isinstance(aarch64_python, str):
        unavailable(aarch64_python)
    proc = aarch64_python
    assert artifacts["aarch64"] == scratch / "artifacts" / PRESET / "aarch64"
    told = time.monotonic()
    out, err = proc.communicate("run\n", timeout=600)
    assert proc.returncode == 0, err[-3000:]
    # It ran on (emulated) aarch64, and packed its weights there, as the manifest asks, with
    # TVM's runtime library alone.
    assert out.split() == ["aarch64", "load", "False"]
    rel = assert_close(np.load(scratch / "y.npy"), reference, rel=TOLERANCE)
    done = time.monotonic()
    print(f"aarch64 vs llvm: {rel:.2g} x max|ref|; sysroot {proc.setup:.1f} s, qemu process "
          f"{done - proc.started:.1f} s, of which after the build {done - told:.1f} s")  # fmt: skip


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
