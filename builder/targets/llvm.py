"""The host CPU (or another CPU) through LLVM, compiled with the scheduled CPU pipeline."""

from __future__ import annotations

import os
from typing import Any

import tvm
from tvm.target import codegen

from ..config import TargetConfig
from .cpu import compile_cpu

LIBRARY = "lib.so"
# Part of the build cache key: bump it whenever compile() changes what it produces.
PIPELINE_VERSION = 1


def host_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def tvm_target(entry: TargetConfig) -> tuple[tvm.target.Target, dict[str, Any]]:
    options: dict[str, Any] = {"kind": "llvm"}
    options["mcpu"] = codegen.llvm_get_system_cpu() if entry.mcpu == "host" else entry.mcpu
    if entry.mtriple:
        options["mtriple"] = entry.mtriple
    if entry.mattr:
        options["mattr"] = list(entry.mattr)
    options["num-cores"] = entry.num_cores or host_cores()
    # A dict, not a string: TVM 0.27 rejected "-mcpu=..." in a target string.
    return tvm.target.Target(options), options


def compile(mod: tvm.IRModule, target: tvm.target.Target) -> tvm.runtime.Executable:
    """Scheduled kernels for the hot ops, a parallel fallback for the rest. The executable
    also holds `transform_params`, which packs the weights once at build time."""
    return compile_cpu(mod, target)
