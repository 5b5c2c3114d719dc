"""A build killed at any moment leaves the old artifact or the new one, never a mix, and the
next build leaves no temporary folders behind."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import builder
from builder.build import build
from builder.cache import STORES, Cache
from builder.cli import main
from builder.preset import load_preset

from .conftest import REPO, tiny_overrides

pytestmark = pytest.mark.e2e

OLD = ["clip-vit-b-32", *tiny_overrides()]
NEW = [*OLD, "weights.seed=1"]

# Kill the build process (SIGKILL: no clean-up runs) right before or after the n-th call
# of a function of builder.artifact.
KILLER = textwrap.dedent(
    """
    import os, signal, sys
    from builder import artifact
    from builder.cli import main

    name, when, nth = sys.argv[1], sys.argv[2], int(sys.argv[3])
    real = getattr(artifact, name)
    calls = 0

    def hooked(*args, **kwargs):
        global calls
        calls += 1
        if calls == nth and when == "before":
            os.kill(os.getpid(), signal.SIGKILL)
        out = real(*args, **kwargs)
        if calls == nth and when == "after":
            os.kill(os.getpid(), signal.SIGKILL)
        return out

    setattr(artifact, name, hooked)
    sys.exit(main(sys.argv[4:]))
    """
)


@pytest.fixture(scope="module")
def old_build(tmp_path_factory) -> Path:
    """An output folder and a cache holding the seed-0 artifact, built once."""
    root = tmp_path_factory.mktemp("old")
    build(load_preset(OLD[0], OLD[1:]), root / "out", cache=Cache(root / "cache"))
    return root


@pytest.fixture
def state(old_build, tmp_path, build_cache) -> Path:
    shutil.copytree(old_build / "out", tmp_path / "out", symlinks=True)
    shutil.copytree(old_build / "cache", build_cache, dirs_exist_ok=True)
    return tmp_path / "out"


def seed_of(out: Path) -> int:
    """The artifact at out/..., checked byte for byte against its manifest."""
    enc = builder.load(out / "clip-vit-b-32" / "llvm", verify=True)
    return enc.manifest["weights"]["seed"]


def leftovers(out: Path, cache_root: Path) -> list[str]:
    published = out / "clip-vit-b-32"
    current = (published / "llvm").resolve().name
    found = [p.name for p in published.iterdir() if p.name not in ("llvm", current)]
    for store in STORES:
        if (cache_root / store).is_dir():
            found += [p.name for p in (cache_root / store).iterdir() if p.name.startswith(".")]
    return found


@pytest.mark.parametrize(
    "name, when, nth, expected",
    [
        ("save_params", "before", 1, 0),  # compiled, writing the cache entry
        ("write_manifest", "after", 1, 0),  # cache entry complete, not yet renamed
        # The library and the parameters are linked into the cache's artifact (calls 1, 2);
        # the third fills the published version folder.
        ("fill", "after", 3, 0),  # version folder filled, not yet renamed
        ("current_version", "before", 2, 0),  # new version and link made, not swapped
        ("_remove_version", "before", 1, 1),  # swapped, old version not yet removed
    ],
)
def test_sigkill_leaves_old_or_new(state, build_cache, name, when, nth, expected):
    cmd = [sys.executable, "-c", KILLER, name, when, str(nth), *NEW, "--out", str(state)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert seed_of(state) == expected
    # The next build finishes the job and sweeps what the killed one left.
    assert main([*NEW, "--out", str(state)]) == 0
    assert seed_of(state) == 1
    assert leftovers(state, build_cache) == []


def _default_sigint() -> None:
    # A job started in the background by a shell inherits SIGINT ignored, and Python then
    # leaves it ignored: give the child the default, as in a terminal.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.fixture
def python_sigint():
    """Python's own Ctrl-C handler in this process, whatever the runner inherited."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_sigint_while_compiling(state, build_cache):
    # --force: the cache holds the library that the new weights would otherwise reuse.
    cmd = [sys.executable, "-m", "builder", *NEW, "--out", str(state), "--force"]
    proc = subprocess.Popen(
        cmd, cwd=REPO, stderr=subprocess.PIPE, text=True, preexec_fn=_default_sigint
    )
    for line in proc.stderr:
        if line.startswith("[llvm] compiling"):
            proc.send_signal(signal.SIGINT)
            break
    err = proc.stderr.read()
    assert proc.wait() == 130, err
    assert "interrupted" in err and "Traceback" not in err
    assert seed_of(state) == 0
    assert leftovers(state, build_cache) == []  # clean-up ran on the way out


def test_sigint_swallowed_inside_compile_still_stops_the_build(
    state, build_cache, monkeypatch, capsys, python_sigint
):
    """A Ctrl-C that reaches Python inside a TVM pass comes back as an ordinary error, which
    a pass may tolerate: the build must stop all the same."""
    import os
    import time

    from builder import targets

    llvm = targets.pipeline("llvm")
    real = llvm.compile

    def compile_that_swallows(mod, target, precision):
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)  # the handler raises here
        except BaseException:  # noqa: BLE001 (what a tolerant pass does to a converted error)
            pass
        return real(mod, target, precision)

    monkeypatch.setattr(llvm, "compile", compile_that_swallows)
    assert main([*NEW, "--out", str(state), "--force"]) == 130
    assert "interrupted" in capsys.readouterr().err
    assert seed_of(state) == 0
    assert leftovers(state, build_cache) == []
