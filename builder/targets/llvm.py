"""The host CPU (or another CPU) through LLVM, compiled with the scheduled CPU pipeline."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import tvm
from tvm.target import codegen

from ..config import TargetConfig
from ..runtime import available_cores
from . import toolchain
from .cpu import compile_cpu

LIBRARY = "lib.so"
# Part of the build cache key: bump it whenever compile() changes what it produces.
PIPELINE_VERSION = 13


def tvm_target(entry: TargetConfig) -> tuple[tvm.target.Target, dict[str, Any]]:
    options: dict[str, Any] = {"kind": "llvm"}
    options["mcpu"] = codegen.llvm_get_system_cpu() if entry.mcpu == "host" else entry.mcpu
    if entry.mtriple:
        options["mtriple"] = entry.mtriple
    if entry.mattr:
        options["mattr"] = list(entry.mattr)
    if entry.num_cores or not cross_linker(entry):
        # The build machine's cores mean nothing for code that runs on another machine.
        options["num-cores"] = entry.num_cores or available_cores()
    # A dict, not a string: TVM 0.27 rejected "-mcpu=..." in a target string.
    return tvm.target.Target(options), options


def kernel_facts(target: tvm.target.Target) -> dict[str, Any]:
    """What shapes the kernels beside the target's options: the register tile from the
    vector width, the cores the work is split for, the L2 size that sizes the weight blocks."""
    import dataclasses

    from .cpu.kernels import kernel_config

    return dataclasses.asdict(kernel_config(target))


def compile(
    mod: tvm.IRModule, target: tvm.target.Target, precision: str = "float32"
) -> tvm.runtime.Executable:
    """Scheduled kernels for the hot ops, a parallel fallback for the rest. The executable
    also holds `transform_params`, which packs the weights once at build time. A float16 or
    bfloat16 model computes in float32 from its rounded parameters; `precision: float16`
    runs float16 GEMMs on a CPU with AVX-512 FP16 (see `cpu.pipeline.compile_cpu`)."""
    return compile_cpu(mod, target, precision)


def cross_linker(entry: TargetConfig) -> str | None:
    """The C++ compiler that links a library for another CPU architecture (Debian's name,
    `aarch64-linux-gnu-g++`), or None for the build machine's own."""
    if not entry.mtriple or toolchain.triple_machine(entry.mtriple) == toolchain.host_machine():
        return None
    return f"{entry.mtriple}-g++"


def params_packing(entry: TargetConfig) -> str:
    """compile() adds `transform_params`. The builder runs it at build time when the library
    runs on the build machine; a cross-compiled library runs it when loaded."""
    return "load" if cross_linker(entry) else "build"


def missing(entry: TargetConfig) -> list[str]:
    linker = cross_linker(entry)
    if linker and toolchain.which(linker) is None:
        return [
            f"{linker} is not on PATH (it links the {entry.mtriple} library; "
            f"Debian/Ubuntu: apt-get install g++-{entry.mtriple})"
        ]
    host = os.environ.get("CXX", "g++")
    if not linker and toolchain.which(host) is None:
        return [f"{host} is not on PATH (it links the library)"]
    return []


def export(executable: tvm.runtime.Executable, path: Path, entry: TargetConfig) -> None:
    from tvm.support import cc

    linker = cross_linker(entry)
    # The triple of the object that carries the VM's code: the linker's own, where TVM
    # would ask the host's compiler (the kernels are objects already, `cpu/objects.py`).
    fcompile = (
        cc.cross_compiler(linker, get_target_triple=lambda: entry.mtriple) if linker else None
    )
    executable.export_library(str(path), fcompile=fcompile)


def runs_on(entry: TargetConfig, options: dict[str, Any], library: Path) -> dict[str, Any]:
    if entry.mtriple:
        machine, os_name = (
            toolchain.triple_machine(entry.mtriple),
            toolchain.triple_os(entry.mtriple),
        )
    else:
        machine, os_name = toolchain.host_machine(), sys.platform
    needs = [f"a {machine} CPU that has what mcpu {options['mcpu']!r} implies"]
    if os_name == "linux":
        needs.append("Linux with glibc (the library links libc and libm)")
    needs.append(f"a TVM 0.27 runtime for {machine} {os_name}")
    return {"device": "cpu", "machine": machine, "os": os_name, "needs": needs}
