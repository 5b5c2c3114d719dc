"""What the build machine has: compilers on PATH and its CPU architecture.

Every lookup goes through `which`, so that a test can take a tool away.
"""

from __future__ import annotations

import shutil
import subprocess
from functools import cache

from ..devices import host_machine, machine_name

__all__ = ["host_machine", "machine_name", "which"]


def which(tool: str) -> str | None:
    return shutil.which(tool)


def triple_machine(triple: str) -> str:
    """The CPU architecture of an LLVM triple: `aarch64-linux-gnu` -> `aarch64`."""
    return machine_name(triple.split("-", 1)[0])


def triple_os(triple: str) -> str:
    parts = triple.lower().split("-")
    for os_name in ("linux", "darwin", "windows", "android"):
        if any(p.startswith(os_name) for p in parts[1:]):
            return os_name
    return "unknown"


@cache
def _nvcc_list(flag: str, nvcc: str) -> tuple[str, ...]:
    out = subprocess.run([nvcc, flag], capture_output=True, text=True, check=True).stdout
    return tuple(out.split())


def nvcc_codes(nvcc: str) -> tuple[str, ...]:
    """What this nvcc can emit: `sm_80`, ... (cubins) and `compute_80`, ... (PTX)."""
    return _nvcc_list("--list-gpu-code", nvcc) + _nvcc_list("--list-gpu-arch", nvcc)


def nvcc_version(nvcc: str) -> str:
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    last = [line for line in out.splitlines() if "release" in line]
    return last[-1].split("release", 1)[1].split(",")[0].strip() if last else "unknown"
