"""The device an artifact runs on, from its manifest, with an error a person can act on when
this machine cannot run it (another CPU architecture, no GPU, a GPU too old)."""

from __future__ import annotations

import platform
import re
import sys
from pathlib import Path
from typing import Any

# Names that mean the same CPU architecture (LLVM triples, uname -m, macOS).
_ALIASES = {"arm64": "aarch64", "amd64": "x86_64", "x64": "x86_64"}


def machine_name(name: str) -> str:
    name = name.lower()
    return _ALIASES.get(name, name)


def host_machine() -> str:
    return machine_name(platform.machine())


def _sm(compute_version: str) -> int:
    major, minor = compute_version.split(".")
    return int(major) * 10 + int(minor)


def open_device(folder: Path, manifest: dict[str, Any]) -> Any:
    """The CPU (`vm.cpu()`, TVM's runtime library alone) or `tvm.cuda(0)` (TVM imported,
    which loads its CUDA runtime), as the manifest says; ValueError when this machine cannot
    run the artifact."""
    kind = manifest["target"]["kind"]
    # Manifests written before `runs_on` existed are llvm artifacts for the build machine.
    runs_on = manifest.get("runs_on", {"device": "cpu", "machine": host_machine(), "needs": []})
    needs = "; ".join(runs_on.get("needs", []))
    machine = runs_on.get("machine", host_machine())
    if machine != host_machine():
        raise ValueError(
            f"{folder}: a {kind} artifact built for {machine} {runs_on.get('os', '')}; this "
            f"machine is {host_machine()} {sys.platform}. It needs: {needs}"
        )
    device = runs_on["device"]
    if device == "cpu":
        from .vm import cpu

        return cpu()
    if device == "cuda":
        from .tvm_import import import_tvm

        dev = import_tvm().cuda(0)
        if not dev.exist:
            raise ValueError(
                f"{folder}: a cuda artifact, but this machine has no CUDA device "
                f"(tvm.cuda(0) does not exist: no NVIDIA GPU or driver, or a TVM without "
                f"CUDA). It needs: {needs}"
            )
        have = _sm(dev.compute_version)
        oldest = int(re.match(r"sm_(\d+)", runs_on["min_arch"]).group(1))
        if have < oldest:
            raise ValueError(
                f"{folder}: compiled for {runs_on['min_arch']} and newer; tvm.cuda(0) "
                f"({dev.device_name}) is sm_{have}. Rebuild with its arch in the target entry"
            )
        return dev
    raise ValueError(
        f"{folder}: a {kind} artifact for device {device!r}, which this runtime "
        "does not run (it runs cpu and cuda)"
    )
