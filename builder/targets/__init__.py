"""One module per target kind, each with the same interface:

- `tvm_target(entry)`: the `tvm.target.Target` for a preset's target entry, and the resolved
  options to record in the manifest (`mcpu: host` becomes the detected CPU);
- `kernel_facts(target)`: what shapes the compiled code beyond the target's options (the CPU
  kernels' L2 size and vector width), for the build cache's library key;
- `compile(mod, target, precision)`: the compile pipeline, IRModule -> `tvm.runtime.Executable`,
  with the entry's `precision` applied as the kind sees fit (cuda: TVM's way,
  `builder.precision`; llvm: its own kernels);
- `missing(entry)`: what the build machine lacks to build the entry (a compiler, a linker),
  one line each; empty when it can;
- `export(executable, path, entry)`: write the library to `path`;
- `runs_on(entry, options, library)`: what running the artifact needs (device, CPU
  architecture, OS, the device code it holds), for the manifest and the runtime's checks;
- `LIBRARY`: the file name of the exported library (its one-line description for
  `build list` is `builder.config.KIND_DESCRIPTIONS`);
- `PIPELINE_VERSION`: an integer in the build cache key, bumped when `compile` changes;
- `params_packing(entry)`: "none", or where the `transform_params` that `compile` adds runs:
  "build" (the builder stores the parameters in the layout `forward` takes) or "load" (a
  cross-compiled library: the runtime packs them once when it loads the artifact).

The compile pipeline of a kind is one replaceable function.

TVM 0.27 also generates code for opencl, metal and webgpu, but neither their runtimes nor
their linkers are here to prove an artifact, so they are not offered.
"""

from __future__ import annotations

from types import ModuleType

from ..errors import BuilderError
from ..tvm_import import import_tvm

# The kinds import TVM: through `import_tvm`, whoever imports them first (torch hidden from
# TVM-FFI's start-up, seconds less where torch is installed and not imported yet).
import_tvm()

from . import cuda, llvm  # noqa: E402

KINDS: dict[str, ModuleType] = {"llvm": llvm, "cuda": cuda}


def pipeline(kind: str) -> ModuleType:
    try:
        return KINDS[kind]
    except KeyError:
        raise BuilderError(
            f"no pipeline for target kind {kind!r}; known: {sorted(KINDS)}"
        ) from None
