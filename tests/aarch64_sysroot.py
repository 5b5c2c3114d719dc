"""An aarch64 Python to run aarch64 artifacts on an x86-64 machine under qemu-user.

The sysroot is Debian's arm64 python3.11 and the libraries it loads, extracted from their
packages (`apt-get download`, `dpkg -x`; apt works on private package lists, so the machine's
apt configuration is not changed and root is not needed), plus the aarch64 wheels of what
the builder's runtime imports (tvm, tvm_ffi, numpy, safetensors, ml_dtypes) at the versions
this Python has, in its `dist-packages`. Run it as
`qemu-aarch64 -L SYSROOT SYSROOT/usr/bin/python3.11` (`python_command`).

It is made once into a cache folder (`$BUILDER_CROSS_CACHE`, else
`~/.cache/clip-tvm-builder-cross`), named by a hash of what goes in it: built in a temporary
folder, checked by importing tvm under qemu, then renamed into place, so a setup killed at
any point leaves no folder that looks complete (its leftovers are removed by the next setup).

    python -m tests.aarch64_sysroot     # make it (or find it) and print its path

Needs Debian 12's apt sources (its python3.11; Ubuntu serves arm64 from another archive,
not tried), apt-get and dpkg, pip, qemu-aarch64, and the network: Debian's archive and PyPI.
`Unavailable` says which step failed.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CACHE_ENV = "BUILDER_CROSS_CACHE"
DEFAULT_CACHE = Path("~/.cache/clip-tvm-builder-cross")
QEMU = "qemu-aarch64"
PYTHON = "usr/bin/python3.11"
PYTHON_VERSION = "3.11"
# Debian's packages whose dependencies make the interpreter: the package list is resolved
# from these with `apt-cache depends`. libstdc++6: TVM's libraries are C++.
ROOTS = ("python3.11-minimal", "libpython3.11-stdlib", "libstdc++6")
# Dependencies that are programs for dpkg's maintainer scripts, not libraries Python loads
# (mime-support's mailcap pulls in perl); their own dependencies are not followed.
SKIP = frozenset({"dpkg", "perl-base", "perl", "tar", "install-info", "mailcap", "debconf"})
# The runtime's imports and theirs (apache-tvm's Requires-Dist without extras).
WHEELS = ("apache-tvm", "apache-tvm-ffi", "numpy", "safetensors", "ml_dtypes", "typing_extensions")
WHEEL_PLATFORMS = ("manylinux2014_aarch64", "manylinux_2_17_aarch64", "manylinux_2_28_aarch64")
SMOKE = "import numpy, safetensors.numpy, ml_dtypes, tvm; from tvm import relax; print('ok')"


class Unavailable(RuntimeError):
    """The sysroot cannot be made on this machine; the message says which step failed."""


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE).expanduser()


def wheel_pins() -> list[str]:
    """`name==version` of each wheel: the version installed here, so that both sides of a
    comparison run the same code."""
    pins = []
    for name in WHEELS:
        try:
            pins.append(f"{name}=={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError as e:
            raise Unavailable(f"{name} is not installed in this Python ({sys.executable})") from e
    return pins


def _key(pins: list[str]) -> str:
    recipe = json.dumps([ROOTS, sorted(SKIP), pins, WHEEL_PLATFORMS, PYTHON], sort_keys=True)
    return hashlib.sha256(recipe.encode()).hexdigest()[:16]


def _run(step: str, cmd: list[str], cwd: Path | None = None) -> str:
    try:
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    except FileNotFoundError as e:
        raise Unavailable(f"{step}: {cmd[0]} is not on PATH") from e
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise Unavailable(f"{step}: `{' '.join(cmd[:3])} ...` failed: " + " | ".join(tail))
    return proc.stdout


def _apt(work: Path) -> list[str]:
    """apt-get's options for arm64 packages, with package lists of its own under `work`."""
    lists, cache = work / "apt-lists", work / "apt-cache"
    (lists / "partial").mkdir(parents=True)
    (cache / "archives" / "partial").mkdir(parents=True)
    return [
        "-o", "APT::Architecture=arm64",
        "-o", "APT::Architectures::=arm64",
        "-o", f"Dir::State::Lists={lists}",
        "-o", f"Dir::Cache={cache}",
        "-o", "Dir::State::status=/dev/null",  # nothing counts as installed
        "-o", "APT::Sandbox::User=root",  # downloads into our folder, which _apt may not write
    ]  # fmt: skip


def resolve_packages(apt: list[str]) -> list[str]:
    """ROOTS and their dependencies, breadth first: the first of each set of alternatives,
    no virtual packages, nothing in SKIP."""
    seen, frontier = set(ROOTS), list(ROOTS)
    while frontier:
        out = _run(
            "apt-cache depends",
            ["apt-cache", *apt, "depends", "--no-recommends", "--no-suggests", "--no-conflicts",
             "--no-breaks", "--no-replaces", "--no-enhances", *frontier],
        )  # fmt: skip
        frontier = []
        alternative = False  # the line before was `|Depends:`: this one is its alternative
        for line in out.splitlines():
            field, _, name = line.strip().partition(": ")
            if not line.startswith(" ") or field.lstrip("|") not in ("Depends", "PreDepends"):
                alternative = False
                continue
            taken_already = alternative
            alternative = field.startswith("|")
            if taken_already or name.startswith("<") or name in SKIP or name in seen:
                continue
            seen.add(name)
            frontier.append(name)
    return sorted(seen)


def _make(work: Path, pins: list[str]) -> Path:
    root = work / "sysroot"
    apt = _apt(work)
    _run("apt-get update (arm64 package lists)", ["apt-get", *apt, "update"])
    packages = resolve_packages(apt)
    debs = work / "debs"
    debs.mkdir()
    _run("apt-get download", ["apt-get", *apt, "download", *packages], cwd=debs)
    for deb in sorted(debs.glob("*.deb")):
        _run("dpkg -x", ["dpkg", "-x", str(deb), str(root)])
    site = root / "usr/lib/python3/dist-packages"  # on the path of Debian's python3.11
    platforms = [a for p in WHEEL_PLATFORMS for a in ("--platform", p)]
    _run(
        "pip install (aarch64 wheels)",
        [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
         "--no-deps", "--no-compile", "--only-binary=:all:", *platforms,
         "--python-version", PYTHON_VERSION, "--implementation", "cp",
         "--target", str(site), *pins],
    )  # fmt: skip
    smoke = _run("import tvm under qemu", [*python_command(root), "-c", SMOKE])
    if smoke.strip() != "ok":
        raise Unavailable(f"import tvm under qemu printed {smoke!r}")
    return root


def sysroot() -> Path:
    """The sysroot's folder, made first if the cache does not hold it. Raises `Unavailable`
    (apt, pip or qemu missing or failing)."""
    if shutil.which(QEMU) is None:
        raise Unavailable(f"{QEMU} is not on PATH (Debian/Ubuntu: apt-get install qemu-user)")
    pins = wheel_pins()
    cache = cache_root()
    final = cache / f"aarch64-py{PYTHON_VERSION}-{_key(pins)}"
    if final.is_dir():
        return final
    cache.mkdir(parents=True, exist_ok=True)
    fd = os.open(cache / ".lock", os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # another process making it: wait, then use its result
        if final.is_dir():
            return final
        for leftover in cache.glob(".tmp-*"):  # of a killed setup (it held the lock)
            shutil.rmtree(leftover, ignore_errors=True)
        work = Path(tempfile.mkdtemp(prefix=".tmp-", dir=cache))
        try:
            _make(work, pins).rename(final)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return final
    finally:
        os.close(fd)


def python_command(root: Path) -> list[str]:
    """The command that runs the sysroot's Python under qemu-user."""
    return [QEMU, "-L", str(root), str(root / PYTHON)]


def python_env(path: list[Path]) -> dict[str, str]:
    """This process's environment without its Python settings (they name x86-64 folders),
    with PYTHONPATH set to `path`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["PYTHONPATH"] = os.pathsep.join(map(str, path))
    return env


def main() -> int:
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args()
    start = time.monotonic()
    try:
        root = sysroot()
    except Unavailable as e:
        print(f"aarch64 sysroot: {e}", file=sys.stderr)
        return 1
    print(f"{root} ({time.monotonic() - start:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
