"""NVIDIA GPUs through TVM's CUDA codegen, compiled ahead of time.

The library is a shared object for the host (x86_64 Linux, generic CPU code) that carries the
device code as a fatbin: a cubin for each architecture the entry names and PTX of the newest,
so that loading it needs the NVIDIA driver and no compiler (see `device_code`).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import tvm

from ..config import TargetConfig
from ..precision import apply as apply_precision
from . import device_code, toolchain
from .var_len import lower_attention_var_len

# Part of the build cache key: bump it whenever compile() changes what it produces.
PIPELINE_VERSION = 1
LIBRARY = "lib.so"


def _archs(entry: TargetConfig) -> list[str]:
    return sorted(entry.arch, key=device_code.arch_number)


def tvm_target(entry: TargetConfig) -> tuple[tvm.target.Target, dict[str, Any]]:
    archs = _archs(entry)
    # One CUDA source serves every arch: generate it for the oldest, so that it uses nothing
    # the oldest lacks; nvcc then compiles it for each.
    target = tvm.target.Target({"kind": "cuda", "arch": archs[0]}, host={"kind": "llvm"})
    options = {"kind": "cuda", "arch": archs[0], "host": {"kind": "llvm"}}
    return target, options


def kernel_facts(target: tvm.target.Target) -> dict[str, Any]:
    """TVM's GPU schedules take what they need from the target's options."""
    return {}


def compile(
    mod: tvm.IRModule, target: tvm.target.Target, precision: str = "float32"
) -> tvm.runtime.Executable:
    """TVM's default GPU pipeline: legalize, fuse, dlight schedules; `precision` through
    TVM's mixed precision (`builder.precision`)."""
    return tvm.compile(apply_precision(lower_attention_var_len(mod), precision), target)


def params_packing(entry: TargetConfig) -> str:
    """The default GPU pipeline keeps the parameters as they are."""
    return "none"


def missing(entry: TargetConfig) -> list[str]:
    nvcc = toolchain.which("nvcc")
    if nvcc is None:
        return ["nvcc is not on PATH (the CUDA toolkit compiles the device code ahead of time)"]
    codes = toolchain.nvcc_codes(nvcc)
    wanted = _archs(entry) + [device_code.ptx_arch(entry.arch)]
    unknown = [a for a in wanted if a not in codes]
    if unknown:
        version = toolchain.nvcc_version(nvcc)
        supported = [c for c in codes if c.startswith("sm_")]
        return [f"nvcc {version} ({nvcc}) cannot compile for {unknown}; it knows {supported}"]
    return []


def export(executable: tvm.runtime.Executable, path: Path, entry: TargetConfig) -> None:
    executable.export_library(
        str(path), fpack_imports=device_code.pack_imports_compiled(_archs(entry))
    )


def runs_on(entry: TargetConfig, options: dict[str, Any], library: Path) -> dict[str, Any]:
    blob = library.read_bytes()
    held = [
        entry
        for offset in device_code.find_fatbins(blob)
        for entry in device_code.fatbin_entries(blob, offset)
    ]
    archs = _archs(entry)
    return {
        "device": "cuda",
        # The host side is code for the build machine's CPU (generic, no -mcpu).
        "machine": toolchain.host_machine(),
        "os": sys.platform,
        "device_code": [f"{kind} {arch}" for kind, arch in held],
        "min_arch": archs[0],
        "needs": [
            f"an NVIDIA GPU of {archs[0]} or newer ({', '.join(archs)} run their own cubin; "
            f"newer GPUs compile the {device_code.ptx_arch(archs)} PTX in the driver)",
            "an NVIDIA driver for CUDA "
            f"{toolchain.nvcc_version(toolchain.which('nvcc') or 'nvcc')} or newer",
            "a TVM 0.27 runtime built with CUDA (the apache-tvm wheel's links libcudart.so.13)",
            "no CUDA compiler: the device code is compiled",
        ],
    }
