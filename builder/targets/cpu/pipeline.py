"""Fast CPU (x86 llvm) compile pipeline for ViT/CLIP vision encoders on Apache TVM 0.27.

API
---
    compile_cpu(mod: tvm.IRModule, target: tvm.target.Target, precision="float32")
        -> tvm.runtime.Executable   (its `fallback_ops`: what runs on the fallback schedule)
    fallback_report(mod, target, precision="float32") -> list[dict]
        (the same list from the Relax passes alone, no code generated)
    compile_kernel(func: tvm.tirx.PrimFunc, target) -> callable   (one kernel alone)

Calling convention of the returned executable (load it with relax.VirtualMachine):

* ``transform_params(*params) -> tuple``  -- ALWAYS present.  Takes the original weights in
  the order of ``forward``'s trailing parameters and returns the tuple of transformed weights
  (Linear / conv weights re-packed as ``[ceil(N/NB), K, NB]`` panels, NB = 4 * SIMD lanes,
  zero padded).  Call it ONCE at build time.
* ``transform_params_into(*params, *outs) -> tuple`` -- the same, with the packed weights
  written into ``outs``: caller-made float32 buffers of the shapes that
  ``transform_params_into_shapes()`` returns (the builder packs into its own memory so).
* ``forward(pixel_values, *transformed)`` -- takes the pixel values followed by the elements
  of the tuple returned by ``transform_params`` (unpacked).  Output as in the original model.

    vm = relax.VirtualMachine(ex, tvm.cpu())
    packed = vm["transform_params"](*params)
    out = vm["forward"](pixel_values, *packed)

Run with ``TVM_NUM_THREADS=<cores>`` in the environment: TVM's pool defaults to half the
hardware threads.

How it works
------------
0. A float16 / bfloat16 model becomes the float32 graph of its rounded parameters
   (``widen.py``): the kernels below are float32 kernels.
1. Relax-level rewrite (before legalization) of the hot ops into calls of hand-written,
   pre-scheduled TensorIR kernels (``call_tir``):
     * ``matmul(x, permute_dims(W))`` (+ bias add, + quick_gelu/SiLU/gelu/gelu_tanh,
       + a GLU's gating multiply, + residual add) -> one register-blocked GEMM with a fused
       epilogue.  The weight goes through a pack kernel that depends only on the weight, so
       LiftTransformParams moves it into ``transform_params``; so does a layer scale,
       folded into the weight and bias, and the interleaving of a SwiGLU's gate and up
       weights, which then run as one GEMM.
     * ``nn.attention(q, k, v)`` (no mask, no bias) -> K^T / V repacking kernels and one fused
       kernel per (batch, head, 6-query tile): Q.K^T tile, softmax, P.V tile.  A symbolic
       sequence length (a tower that takes each image at its own size) goes to the sequence
       kernel, which takes it as an argument and runs the keys in chunks (online softmax);
       ``nn.attention_var_len`` (block-diagonal by cu_seqlens) to its segment form, which
       computes only the blocks on the diagonal.
     * ``nn.layer_norm``, ``nn.rms_norm`` over the last axis -> a row-parallel kernel.
     * patchify ``conv2d`` (stride == kernel, no padding) -> im2col (reshape/permute) + GEMM.
   Everything else stays a normal Relax op.
2. LiftTransformParams, then the stock cpu_generic passes (legalize, FuseOps, FuseTIR).
3. A fallback schedule for every remaining fused PrimFunc (adds, transposes, concats...):
   inline what can be inlined, parallelize the fused outer spatial loops, vectorize a
   contiguous inner loop.  Functions it cannot handle stay as they are (correct, serial).
   `report.py` notes which of them `forward` calls, and the Relax ops each came from.
4. The stock dataflow-lowering passes, then dead code elimination (the PrimFuncs of reshapes
   that became views), then the stock finalization passes; TIR is built with StorageRewrite
   disabled (it would merge the register accumulators into one >1 KiB buffer, which is then
   heap-allocated and never promoted to registers).
5. Each PrimFunc is built alone into an object file that the build cache's kernel store keeps
   (``objects.py``): a later compile that holds the same function, in any process, links the
   stored object instead of building it again.

The kernels are generated as TVMScript text: the micro-kernel layout is explicit (6 rows x
4 vectors accumulators, one per row buffer, so LLVM keeps all 24 in zmm registers), which is
easier to get right than steering a generic schedule there.
"""

from __future__ import annotations

import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from ..var_len import lower_attention_var_len
from . import objects, packing_steps, reshapes
from .kernels import KernelConfig, bf16_gemms, half_gemms, kernel_config
from .report import FallbackReport
from .rewrite import rewrite_to_kernels
from .schedule import fallback_schedule_pass
from .widen import widen_to_float32


def _lift_params(mod: tvm.IRModule) -> tvm.IRModule:
    """LiftTransformParams, then expose the lifted function (it takes ONE tuple argument) as
    `transform_params(*params) -> tuple` and `transform_params_into(*params, *outs)`
    (`_write_into`). `forward` already takes (pixel_values, *transformed) after lifting."""
    mod = relax.transform.LiftTransformParams()(mod)
    lifted = [gv for gv in mod.get_global_vars() if gv.name_hint == "forward_transform_params"]
    if not lifted:
        raise RuntimeError("LiftTransformParams did not produce forward_transform_params")
    return _write_into(mod, lifted[0])


@mutator
class _WriteInto(PyExprMutator):
    """The lifted function's kernel calls whose results it returns, as in-place calls that
    write into the caller's buffers: `outs[j]` for the binding of `targets[var] = j`."""

    def __init__(self, mod: tvm.IRModule, targets: dict, outs: relax.Var):
        super().__init__(mod)
        self.targets, self.outs = targets, outs

    def visit_var_binding_(self, binding):
        j = self.targets.get(binding.var)
        if j is None:
            super().visit_var_binding_(binding)
            return
        call = binding.value
        args = [self.visit_expr(a) for a in call.args[1].fields]
        out = self.builder_.emit(relax.TupleGetItem(self.outs, j))
        new = relax.call_tir_inplace(call.args[0], relax.Tuple([*args, out]), [len(args)], call.ty)
        self.builder_.emit_normalized(relax.VarBinding(binding.var, self.builder_.normalize(new)))


def _write_into(mod: tvm.IRModule, lifted: relax.GlobalVar) -> tvm.IRModule:
    """The lifted function, with each result that a kernel computes (the packed weights:
    float32, static shapes) written into a buffer its caller gives instead of memory the VM
    allocates, and three functions around it:

    * `transform_params_into(*params, *outs) -> tuple`: the builder's, into its own memory
      (`builder.packing.pack_params`);
    * `transform_params_into_shapes() -> tuple` of those buffers' shapes;
    * `transform_params(*params) -> tuple`, which allocates the buffers itself (the runtime
      calls it to pack a cross-compiled artifact's weights when it loads them).

    One function body holds the packing, so the layout has one definition and is compiled
    once."""
    func = mod[lifted]
    body = func.body
    values = {b.var: b.value for block in body.blocks for b in block.bindings}
    # A tuple of bindings; `R.tuple()` itself without weights, or the parameters' tuple
    # where nothing depends on weights alone (nothing to write, then).
    result = body.body if isinstance(body.body, relax.Tuple) else values.get(body.body)
    targets: dict = {}
    for field in result.fields if isinstance(result, relax.Tuple) else []:
        value = values.get(field)
        ty = getattr(field, "ty", None)
        if (
            field not in targets
            and isinstance(value, tvm.ir.Call)
            and value.op.same_as(tvm.ir.Op.get("relax.call_tir"))
            and len(value.args) == 2
            and isinstance(ty, relax.TensorType)
            and ty.dtype == "float32"
            and isinstance(ty.shape, relax.ShapeExpr)
            and all(isinstance(v, tvm.tirx.IntImm) for v in ty.shape.values)
        ):
            targets[field] = len(targets)
    shapes = [[int(v) for v in f.ty.shape.values] for f in targets]
    outs = relax.Var("outs", relax.TupleType([f.ty for f in targets]))
    new_body = _WriteInto(mod, targets, outs).visit_expr(body)
    into = relax.Function([*func.params, outs], new_body, func.ret_ty, attrs=func.attrs)
    # In place of the lifted function, under a new GlobalVar (the old one has its type).
    bb = relax.BlockBuilder(tvm.IRModule({g: f for g, f in mod.functions_items() if g != lifted}))
    lifted = bb.add_func(into, lifted.name_hint)
    params = [relax.Var(f"param_{i}", t) for i, t in enumerate(func.params[0].ty.fields)]
    buffers = [relax.Var(f"out_{j}", f.ty) for j, f in enumerate(targets)]
    with bb.function("transform_params_into", [*params, *buffers]):
        out = bb.emit(relax.Call(lifted, [relax.Tuple(params), relax.Tuple(buffers)]))
        bb.emit_func_output(out)
    with bb.function("transform_params_into_shapes", []):
        bb.emit_func_output(relax.Tuple([relax.ShapeExpr(s) for s in shapes]))
    params = [relax.Var(f"param_{i}", t) for i, t in enumerate(func.params[0].ty.fields)]
    with bb.function("transform_params", params):
        made = [
            bb.emit(relax.op.builtin.alloc_tensor(relax.ShapeExpr(s), "float32", 0)) for s in shapes
        ]
        out = bb.emit(relax.Call(lifted, [relax.Tuple(params), relax.Tuple(made)]))
        bb.emit_func_output(out)
    return bb.finalize()


def _relax_passes(
    target: tvm.target.Target, cfg: KernelConfig, report: FallbackReport, steps: dict | None = None
):
    """cpu_generic's passes up to the finalization, with reshapes left as ops through
    legalization (`reshapes.py`), the fallback schedule after fusion, the report's notes
    between them (`report.py`), and dead code elimination after them: PrimFuncs that
    nothing calls any more would otherwise still be compiled into the library."""
    from tvm.relax.backend.cpu_generic import pipeline as cpu  # pylint: disable=import-outside-toplevel

    legalize = [
        report.note_ops(),
        reshapes.legalize,
        report.note_legalized(),
        relax.transform.AnnotateTIROpPattern(),
        reshapes.fold_constants,
        relax.transform.FuseOps(),
        report.note_fused(),
        relax.transform.FuseTIR(),
    ]  # cpu_generic's legalize_passes, with the notes and the reshapes left as ops
    return (
        cpu.library_dispatch_passes(target)
        + legalize
        + [fallback_schedule_pass(cfg, report.note_fallback)]
        + cpu.dataflow_lower_passes(target)
        + [relax.transform.DeadCodeElimination(), report.note_called()]
        + ([] if steps is None else [packing_steps.note(steps)])
    )


def get_pipeline(
    target: tvm.target.Target, cfg: KernelConfig, report: FallbackReport, steps: dict | None = None
):
    from tvm.relax.backend.cpu_generic import pipeline as cpu  # pylint: disable=import-outside-toplevel

    @tvm.transform.module_pass(opt_level=0, name="FastCPUPipeline")
    def _pipeline(mod, _ctx):
        with target:
            passes = _relax_passes(target, cfg, report, steps) + cpu.finalize_passes(target)
            return tvm.transform.Sequential(passes)(mod)

    return _pipeline


# StorageRewrite would merge the kernels' register accumulators into one buffer of over
# 1 KiB, which is then heap-allocated and never promoted to registers.
PASS_CONFIG = {"tirx.disable_storage_rewrite": True}


def _with_kernels(
    mod: tvm.IRModule, target: tvm.target.Target, precision: str
) -> tuple[tvm.IRModule, KernelConfig]:
    """The module with its hot ops as kernel calls and its weight transforms lifted (steps 0
    and 1 of the module docstring), and the kernels' configuration."""
    if precision not in ("float32", "float16", "bfloat16"):
        raise ValueError(f"unknown precision {precision!r}")
    mod = widen_to_float32(mod)
    half = precision == "float16" and half_gemms(target)
    bf16 = precision == "bfloat16" and bf16_gemms(target)
    cfg = kernel_config(target, half, bf16)
    native = half or bf16 or precision == "float32"
    mod = rewrite_to_kernels(mod, cfg, rounded=None if native else precision)
    return _lift_params(lower_attention_var_len(mod)), cfg


def _as_target(target) -> tvm.target.Target:
    return tvm.target.Target(target) if isinstance(target, (str, dict)) else target


def compile_cpu(
    mod: tvm.IRModule, target: tvm.target.Target, precision: str = "float32"
) -> tvm.runtime.Executable:
    """Compile a ViT/CLIP vision IRModule (see module docstring for the calling convention).
    The executable's `fallback_ops` lists what `forward` runs on the fallback schedule
    (`report.FallbackReport.entries`; the builder writes it into the manifest).

    A model in float16 or bfloat16 computes in float32 from its rounded parameters
    (`widen.py`). `precision: float16` or `bfloat16`: the GEMMs take operands of that type
    and the rest stays float32; on a CPU with AVX-512 FP16 (`kernels.half_gemms`) they
    multiply in float16, with AVX-512 BF16 (`kernels.bf16_gemms`) in bfloat16 pairs into
    float32, on others the float32 GEMMs take operands rounded to the type."""
    target = _as_target(target)
    mod, cfg = _with_kernels(mod, target, precision)
    report, steps = FallbackReport(), {}
    with tvm.transform.PassContext(opt_level=3, config=PASS_CONFIG):
        executable = objects.build(mod, target, get_pipeline(target, cfg, report, steps))
    executable.fallback_ops = report.entries
    executable.pack_steps = steps.get("steps")
    return executable


def after_relax_passes(
    mod: tvm.IRModule, target: tvm.target.Target, precision: str = "float32"
) -> tuple[tvm.IRModule, FallbackReport]:
    """The module after `compile_cpu`'s Relax passes, the finalization aside (no code is
    generated: a fraction of the compile time), and those passes' report."""
    target = _as_target(target)
    mod, cfg = _with_kernels(mod, target, precision)
    report = FallbackReport()
    with target, tvm.transform.PassContext(opt_level=3, config=PASS_CONFIG):
        mod = tvm.transform.Sequential(_relax_passes(target, cfg, report))(mod)
    return mod, report


def fallback_report(
    mod: tvm.IRModule, target: tvm.target.Target, precision: str = "float32"
) -> list[dict]:
    """What `compile_cpu` would report in `fallback_ops` (`after_relax_passes`)."""
    return after_relax_passes(mod, target, precision)[1].entries


def compile_kernel(func: tvm.tirx.PrimFunc, target: tvm.target.Target):
    """One kernel (a PrimFunc from `kernels`) alone, built with the pipeline's TIR settings:
    the callable, for tests and benchmarks."""
    mod = tvm.IRModule({"kernel": func.with_attr("global_symbol", "kernel")})
    with tvm.transform.PassContext(opt_level=3, config=PASS_CONFIG):
        return tvm.compile(mod, target)["kernel"]
