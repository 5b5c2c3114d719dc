"""Build a Relax module's VM executable with each PrimFunc compiled alone into an object file
that the build cache keeps (the kernel store), so that a later build that holds the same
function, in this process or another, links the stored object instead of compiling it.

`tvm.compile` lowers every PrimFunc of a module through the TIR pipeline into one LLVM
module, which `export_library` then emits as one object: a tower that shares all its kernels
but one with a tower built before (another layer count, feature layer or head, the same
widths) compiles them all again. Here each function is its own LLVM module, built with
`tvm.tirx.build` under the same target and pass context as `tvm.compile` would, written as
an object and brought back as a static library (`tvm.runtime.load_static_library`), which
the VM executable imports and `export_library` links beside the others. The functions are
the same, so is the code of each; only their split across objects differs.

An object's key (`cache.kernel_object_key`) covers the function as TVM's JSON (its body, its
name, its attributes), the target, the pass context's options and the TVM versions: all a
function's code depends on. The functions a build lacks are compiled on a thread per core
(TVM's build and LLVM's code generation release the GIL; each thread enters the pass
context, which TVM keeps per thread). docs/build-cache.md has the figures.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import tvm
from tvm import relax
from tvm.relax import vm_build

from ... import cache
from ...runtime import available_cores


def build(mod: tvm.IRModule, target: tvm.target.Target, relax_pipeline) -> relax.VMExecutable:
    """What `tvm.compile(mod, target, relax_pipeline=relax_pipeline)` returns (TVM 0.27's
    `relax.build`, bytecode mode), its PrimFuncs linked from stored objects. Run it inside
    the pass context the TIR functions are to be built under. `relax.build`'s system-lib
    step is left out: no llvm target here asks for a system library."""
    with target:
        mod = relax_pipeline(mod)
    attrs = dict(mod.attrs) if mod.attrs else {}
    builder = relax.ExecBuilder()
    mod = vm_build._vmcodegen(builder, mod, "bytecode")  # pylint: disable=protected-access
    tir_mod = vm_build._filter_tir(mod)  # pylint: disable=protected-access
    objects = [] if tir_mod is None else _objects(tir_mod, target)
    return vm_build._vmlink(  # pylint: disable=protected-access
        builder,
        target,
        tir_mod=None,
        ext_libs=[*attrs.get("external_mods", []), *objects],
        params=dict(attrs.get("const_name_to_constant", {})),
    )


def _objects(tir_mod: tvm.IRModule, target: tvm.target.Target) -> list[tvm.runtime.Module]:
    context = tvm.transform.PassContext.current()
    setting = {
        # The way a function is built here: this file.
        "recipe": cache.files_digest([Path(__file__)]),
        "llvm": tvm.target.codegen.llvm_version_major(),
        "opt_level": context.opt_level,
        "config": {k: str(v) for k, v in context.config.items()},
        "disabled": sorted(str(p) for p in context.disabled_pass),
        "required": sorted(str(p) for p in context.required_pass),
        "module_attrs": {k: str(v) for k, v in (tir_mod.attrs or {}).items()},
    }
    store = cache.Cache()
    functions = list(tir_mod.functions.items())

    def stored(item: tuple[tvm.ir.GlobalVar, tvm.tirx.PrimFunc]) -> Path:
        gvar, func = item
        key = cache.kernel_object_key(tvm.ir.save_json(func), target.export(), setting)

        def write(path: Path) -> None:
            with context:  # this thread's own pass context stack
                one = tvm.IRModule({gvar: func}, attrs=tir_mod.attrs)
                tvm.tirx.build(one, target=target).write_to_file(str(path))

        return store.kernel_object(key, write)

    with ThreadPoolExecutor(max(1, min(len(functions), available_cores()))) as pool:
        paths = list(pool.map(stored, functions))  # in the module's order: the same link
    found = []
    for (gvar, func), path in zip(functions, paths, strict=True):
        symbol = (
            str(func.attrs["global_symbol"]) if "global_symbol" in func.attrs else gvar.name_hint
        )
        found.append(tvm.runtime.load_static_library(str(path), [symbol]))
    return found
