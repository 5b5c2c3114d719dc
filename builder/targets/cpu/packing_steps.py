"""The packing of the parameters as one step per packed tensor, read off the lifted function
after the Relax passes: what lets the builder compute each packed tensor alone, into a
buffer it reuses, and write it before it computes the next (`builder.packing`), where the
whole `transform_params_into` call needs every packed tensor in memory at once.

A step is, for one result of `transform_params` in order:

* `{"param": i}`: parameter `i` as it is;
* `{"param": i, "shape": [...]}`: parameter `i` reshaped (a view);
* `{"calls": [...], "temps": [...], "shape": [...], "dtype": ...}`: the library's kernels to
  run, in order, each `{"kernel": name, "args": [...]}` with its arguments as references
  (`{"param": i}`, `{"temp": k}` for the k-th of `temps`, the `[shape, dtype]` of buffers
  the step makes for itself, or `{"result": True}`, the buffer of that shape and dtype that
  the step fills; each maybe with a `"shape"`, reshaped).

Where the function does anything a step cannot say (a kernel that writes two buffers, a
result made from another result, a buffer read before it is written, an op other than a
kernel call, a reshape or an allocation), there are no steps and the builder calls
`transform_params_into` whole."""

from __future__ import annotations

from typing import Any

import tvm
import tvm_ffi
from tvm import relax

from .walk import noting_pass

LIFTED = "forward_transform_params"
_RESHAPE = tvm.ir.Op.get("relax.reshape")
_ALLOC = tvm.ir.Op.get("relax.builtin.alloc_tensor")
_BUFFER_DATA = tvm.ir.Op.get("tirx.buffer_data")


def _ints(values: Any) -> list[int] | None:
    if not all(isinstance(v, tvm.tirx.IntImm) for v in values):
        return None
    return [int(v) for v in values]


def read_steps(mod: tvm.IRModule) -> list[dict[str, Any]] | None:
    """The steps of `mod`'s lifted function (after the Relax passes, before the VM's
    lowering), or None where it does anything a step cannot say."""
    lifted = [gv for gv in mod.get_global_vars() if gv.name_hint == LIFTED]
    if not lifted:
        return None
    func = mod[lifted[0]]
    if len(func.params) != 2 or not isinstance(func.body, relax.SeqExpr):
        return None
    params, outs = func.params
    # What each variable is: a parameter, a temporary buffer or one of the caller's, each
    # maybe reshaped ({"param": i}, {"temp": k}, {"out": j}, and "shape").
    known: dict[Any, dict[str, Any]] = {}
    temps: list[list[Any]] = []  # [shape, dtype] of each temporary
    calls: list[dict[str, Any]] = []  # each kernel call, its arguments' refs, in order
    writer: dict[tuple[str, int], list[int]] = {}  # buffer -> the calls that write it
    tuples: dict[Any, list[Any]] = {}
    for block in func.body.blocks:
        for b in block.bindings:
            if not isinstance(b, relax.VarBinding):
                return None
            v = b.value
            if isinstance(v, relax.TupleGetItem) and v.tuple_value.same_as(params):
                known[b.var] = {"param": int(v.index)}
            elif isinstance(v, relax.TupleGetItem) and v.tuple_value.same_as(outs):
                known[b.var] = {"out": int(v.index)}
            elif isinstance(v, relax.Var) and v in known:
                known[b.var] = known[v]
            elif isinstance(v, relax.Tuple):
                tuples[b.var] = list(v.fields)
            elif isinstance(v, relax.Call) and v.op.same_as(_RESHAPE):
                source, shape = known.get(v.args[0]), _ints(getattr(v.args[1], "values", [None]))
                if source is None or shape is None:
                    return None
                known[b.var] = {**source, "shape": shape}
            elif isinstance(v, relax.Call) and v.op.same_as(_ALLOC):
                shape = _ints(getattr(v.args[0], "values", [None]))
                if shape is None:
                    return None
                known[b.var] = {"temp": len(temps)}
                temps.append([shape, str(b.var.ty.dtype)])
            elif isinstance(v, relax.Call) and isinstance(v.op, tvm.ir.GlobalVar):
                kernel = mod[v.op]
                args = [known.get(a) for a in v.args]
                if not isinstance(kernel, tvm.tirx.PrimFunc) or not args or None in args:
                    return None
                written = _written(kernel)
                if len(written) != 1 or "param" in args[written[0]]:
                    return None  # no output, several, or a parameter written over
                read = [a for i, a in enumerate(args) if i != written[0] and "param" not in a]
                if any(_buffer(a) not in writer for a in read):
                    return None  # a buffer read before anything wrote it
                symbol = kernel.attrs.get("global_symbol") if kernel.attrs else None
                writer.setdefault(_buffer(args[written[0]]), []).append(len(calls))
                calls.append({"kernel": str(symbol or v.op.name_hint), "args": args})
            else:
                return None
    result = func.body.body
    fields = tuples.get(result, result.fields if isinstance(result, relax.Tuple) else None)
    if fields is None:
        return None
    steps = []
    for field in fields:
        ref, ty = known.get(field), field.ty
        shape = _ints(ty.shape.values) if isinstance(ty.shape, relax.ShapeExpr) else None
        if ref is None or shape is None:
            return None
        if "param" in ref:
            steps.append(ref)
            continue
        step = _step(_buffer(ref), calls, writer, temps, shape, str(ty.dtype))
        if step is None:
            return None
        steps.append(step)
    return steps


def _written(kernel: tvm.tirx.PrimFunc) -> list[int]:
    """The indices of the parameters whose buffers `kernel` stores to (a buffer's data is
    its parameter's, `tirx.buffer_data(param)`, or a variable of its own)."""
    stored: list[object] = []

    def store(node: tvm.tirx.BufferStore) -> None:
        data = node.buffer.data
        if isinstance(data, tvm.ir.Call) and data.op.same_as(_BUFFER_DATA):
            data = data.args[0]
        stored.append(data)

    tvm_ffi.structural_walk(kernel.body, [(tvm.tirx.BufferStore, store)], order="post")
    return [i for i, p in enumerate(kernel.params) if any(p.same_as(d) for d in stored)]


def _buffer(ref: dict[str, Any]) -> tuple[str, int]:
    kind = "temp" if "temp" in ref else "out"
    return kind, ref[kind]


def _step(
    result: tuple[str, int],
    calls: list[dict[str, Any]],
    writer: dict[tuple[str, int], list[int]],
    temps: list[list[Any]],
    shape: list[int],
    dtype: str,
) -> dict[str, Any] | None:
    """The calls that make buffer `result`, and those that make the buffers they read, in
    the function's order; the result buffer as "result", the temporaries renumbered. None
    where they read another result's buffer."""
    needed: set[int] = set()
    pending = [result]
    while pending:
        for i in writer.get(pending.pop(), []):
            if i not in needed:
                needed.add(i)
                pending += [_buffer(a) for a in calls[i]["args"] if "param" not in a]
    reads = [a for i in needed for a in calls[i]["args"] if "param" not in a]
    if any("out" in a and _buffer(a) != result for a in reads):
        return None  # made from another result: not a step of its own
    own: dict[int, int] = {}

    def local(ref: dict[str, Any]) -> dict[str, Any]:
        if "param" in ref:
            return ref
        shaped = {"shape": ref["shape"]} if "shape" in ref else {}
        if _buffer(ref) == result:
            return {"result": True, **shaped}
        return {"temp": own.setdefault(ref["temp"], len(own)), **shaped}

    steps = [
        {"kernel": calls[i]["kernel"], "args": [local(a) for a in calls[i]["args"]]}
        for i in sorted(needed)
    ]
    return {
        "calls": steps,
        "temps": [temps[k] for k in sorted(own, key=own.get)],
        "shape": shape,
        "dtype": dtype,
    }


def note(into: dict[str, Any]) -> tvm.transform.Pass:
    """A pass that changes nothing and keeps the module's steps in `into["steps"]`."""
    return noting_pass("NotePackingSteps", lambda mod: into.update(steps=read_steps(mod)))
