"""CUDA device code compiled ahead of time, packed into the exported library.

TVM 0.27's CUDA codegen leaves the CUDA source in the module (format `cuda`); the CUDA
runtime compiles it when the library is loaded, through the `tvm_callback_cuda_compile`
Python callback (NVRTC or nvcc), so the machine that loads it needs a compiler. Here the
export compiles that source once with nvcc into a fatbin (a cubin per named architecture
plus PTX of the newest, which later GPUs compile in the driver) and rewrites the packed
module to hold it, labelled `cubin` (the label TVM has always given binaries from
`tvm_callback_cuda_compile`; `cuModuleLoadData` takes a fatbin as it takes a cubin).

The packed module tree (`__tvm_ffi__library_bin`, from `runtime.ModulePackImportsToTensor`):
u64 size, then u64 vectors `row_ptr` and `child_indices` (the import tree), then per module
a string `kind` and, unless the kind is `_lib` (the shared library itself), a string holding
its serialized bytes. A `cuda` module's bytes are: string `fmt`, the function map, string
`data` (the source when fmt is `cuda`), in that order. Strings are a u64 length and bytes.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Callable, Sequence
from pathlib import Path

import tvm
import tvm_ffi

FATBIN_MAGIC = 0xBA55ED50
_U64 = struct.Struct("<Q")


def arch_number(arch: str) -> int:
    """`sm_90` -> 90, `sm_90a` -> 90."""
    return int(re.match(r"sm_(\d+)", arch).group(1))


def ptx_arch(archs: list[str]) -> str:
    """The PTX the fatbin carries for GPUs newer than every cubin: the newest named."""
    return f"compute_{max(arch_number(a) for a in archs)}"


def gencode_flags(archs: list[str]) -> list[str]:
    flags = []
    for arch in archs:
        flags += ["-gencode", f"arch=compute_{arch[3:]},code={arch}"]
    ptx = ptx_arch(archs)
    return flags + ["-gencode", f"arch={ptx},code={ptx}"]


def compile_fatbin(source: str, archs: list[str]) -> bytes:
    """nvcc with TVM's own options (those of its load-time compile), one `-gencode` each."""
    from tvm.support import nvcc

    # compile_cuda reads the current target for its compute version.
    try:
        with tvm.target.Target({"kind": "cuda", "arch": min(archs, key=arch_number)}):
            data = nvcc.compile_cuda(
                source, target_format="fatbin", arch=gencode_flags(archs), compiler="nvcc"
            )
    except RuntimeError as e:
        # TVM's message starts with the whole CUDA source; nvcc's own output follows it.
        raise RuntimeError(f"nvcc: {str(e).rpartition('Compilation error:')[2].strip()}") from e
    return bytes(data)


def fatbin_entries(blob: bytes, offset: int = 0) -> list[tuple[str, str]]:
    """What a fatbin at `offset` holds: [("cubin", "sm_80"), ("ptx", "compute_90"), ...]."""
    magic, _, header, size = struct.unpack_from("<IHHQ", blob, offset)
    if magic != FATBIN_MAGIC:
        raise ValueError(f"no fatbin at offset {offset}")
    out = []
    pos, end = offset + header, offset + header + size
    while pos < end:
        kind, _, entry_header, payload = struct.unpack_from("<HHIQ", blob, pos)
        (arch,) = struct.unpack_from("<I", blob, pos + 28)
        out.append(("ptx", f"compute_{arch}") if kind == 1 else ("cubin", f"sm_{arch}"))
        pos += entry_header + payload
    return out


def find_fatbins(blob: bytes) -> list[int]:
    """Offsets of every fatbin in a file (for instance an exported library)."""
    magic = struct.pack("<I", FATBIN_MAGIC)
    return [m.start() for m in re.finditer(re.escape(magic), blob)]


# --- the packed module tree ---------------------------------------------------------------


class _Reader:
    def __init__(self, blob: bytes):
        self.blob, self.pos = blob, 0

    def u64(self) -> int:
        (value,) = _U64.unpack_from(self.blob, self.pos)
        self.pos += 8
        return value

    def bytes_(self) -> bytes:
        n = self.u64()
        self.pos += n
        return self.blob[self.pos - n : self.pos]


def _string(data: bytes) -> bytes:
    return _U64.pack(len(data)) + data


def rewrite_cuda_modules(
    packed: bytes, compile_source: Callable[[str], bytes], sources: Sequence[str] = ()
) -> bytes:
    """The packed module tree with every `cuda` module's device code replaced by
    `compile_source(source)`, labelled `cubin`. The source is the module's own data when it
    holds source (format `cuda`); else `sources[i]` for the i-th cuda module (a CUDA runtime
    that compiled it already for one arch keeps the source beside the binary)."""
    r = _Reader(packed)
    size = r.u64()
    if size != len(packed) - 8:
        raise ValueError(f"packed modules: size {size}, expected {len(packed) - 8}")
    head_start = r.pos
    for _ in range(2):  # row_ptr, child_indices
        count = r.u64()  # read before `r.pos +=`, which would use the old position
        r.pos += 8 * count
    out = [packed[head_start : r.pos]]
    seen = 0
    while r.pos < len(packed):
        kind = r.bytes_()
        out.append(_string(kind))
        if kind == b"_lib":
            continue
        payload = r.bytes_()
        if kind == b"cuda":
            source = sources[seen] if seen < len(sources) else None
            payload = _rewrite_cuda(payload, compile_source, source)
            seen += 1
        out.append(_string(payload))
    body = b"".join(out)
    return _U64.pack(len(body)) + body


def _rewrite_cuda(
    payload: bytes, compile_source: Callable[[str], bytes], source: str | None
) -> bytes:
    r = _Reader(payload)
    fmt = r.bytes_()
    fmap_start = r.pos
    # The function map's layout is TVM's; the data is the last string, so find it from the
    # end: its u64 length must lead to exactly the end of the payload.
    for start in range(fmap_start, len(payload) - 7):
        (n,) = _U64.unpack_from(payload, start)
        if start + 8 + n == len(payload):
            break
    else:
        raise ValueError("cuda module: cannot find its device code")
    if fmt == b"cuda":
        source = payload[start + 8 :].decode()
    elif not source:
        raise ValueError(f"cuda module holds {fmt.decode()!r} and no CUDA source to compile")
    return _string(b"cubin") + payload[fmap_start:start] + _string(compile_source(source))


def pack_imports_compiled(archs: list[str]) -> Callable[..., str]:
    """An `fpack_imports` for `export_library`: the imports as C source, with CUDA
    device code compiled for `archs`."""

    def pack(mod: tvm.runtime.Module, is_system_lib: bool, prefix: str, workspace: str) -> str:
        packed = tvm_ffi.get_global_func("runtime.ModulePackImportsToTensor")(mod)
        cuda = mod._collect_from_import_tree(lambda m: m.kind == "cuda")
        blob = rewrite_cuda_modules(
            packed.numpy().tobytes(),
            lambda source: compile_fatbin(source, archs),
            [m.inspect_source() for m in cuda] if len(cuda) == 1 else [],
        )
        # TVM's own C packing gives the symbol names and attributes; only the array changes.
        c_text = tvm_ffi.get_global_func("runtime.ModulePackImportsToC")(mod, is_system_lib, prefix)
        head, rest = c_text.split("] = {", 1)
        head = head[: head.rindex("[") + 1]
        tail = rest[rest.index("};") :]
        body = ",\n".join(
            ",".join(f"0x{b:02x}" for b in blob[i : i + 20]) for i in range(0, len(blob), 20)
        )
        path = Path(workspace) / f"{prefix}devc.c"
        path.write_text(f"{head}{len(blob)}] = {{\n{body}\n{tail}")
        return str(path)

    return pack
