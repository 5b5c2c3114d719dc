"""Relax-level rewrite: the hot ops (linear layers with their epilogues, attention, the
patchify conv, LayerNorm and RMSNorm) become calls of the kernels in `kernels.py`."""

from __future__ import annotations

import math

import tvm
import tvm_ffi
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from .kernels import (
    KernelConfig,
    attention_kernel,
    attn_pack_k_kernel,
    attn_pack_v_kernel,
    attn_padding,
    gemm_kernel,
    layer_norm_kernel,
    pack_weight_kernel,
    pairs_kernel,
    rms_norm_kernel,
    round_kernel,
)


def _static(shape) -> list[int] | None:
    try:
        return [int(v) for v in shape]
    except Exception:  # pylint: disable=broad-except
        return None


def _sinfo(e):
    ty = getattr(e, "ty", None)
    return ty if isinstance(ty, relax.TensorType) else None


def _op_name(e) -> str | None:
    if isinstance(e, tvm.ir.Call) and isinstance(e.op, tvm.ir.Op):
        return e.op.name
    return None


def _is_f32(e) -> bool:
    s = _sinfo(e)
    return (
        s is not None
        and s.dtype == "float32"
        and s.shape is not None
        and isinstance(s.shape, relax.ShapeExpr)
    )


def _scalar_const(e):
    # Relax constants are tvm.ir.GenericConst in 0.27 (relax.Constant is gone)
    if (
        isinstance(e, tvm.ir.GenericConst)
        and hasattr(e.value, "numpy")
        and e.value.numpy().size == 1
    ):
        return float(e.value.numpy().reshape(()))
    return None


class _Plan:
    """Analysis of one dataflow block: which bindings become kernel calls."""

    def __init__(self, block: relax.DataflowBlock, func_outputs, vec: int):
        self.vec = vec
        self.defs = {}
        self.uses = {}
        self.consumers = {}
        for b in block.bindings:
            if isinstance(b, relax.VarBinding):
                self.defs[b.var] = b.value
                for a in self._operands(b.value):
                    self.uses[a] = self.uses.get(a, 0) + 1
                    self.consumers.setdefault(a, []).append(b.var)
        for v in func_outputs:
            self.uses[v] = self.uses.get(v, 0) + 1
        self.rewrites = {}  # var -> spec dict
        self.gemm_x = {}  # a linear layer's matmul var -> its X
        for b in block.bindings:
            if isinstance(b, relax.VarBinding):
                self._match(b.var, b.value)

    @staticmethod
    def _operands(e):
        out = []
        if isinstance(e, tvm.ir.Call):
            for a in e.args:
                out += _Plan._operands(a) if isinstance(a, relax.Tuple) else [a]
        elif isinstance(e, relax.Tuple):
            for a in e.fields:
                out.append(a)
        elif isinstance(e, relax.TupleGetItem):
            out.append(e.tuple_value)
        return [a for a in out if isinstance(a, relax.Var)]

    def _single_consumer(self, var):
        if self.uses.get(var, 0) != 1 or len(self.consumers.get(var, [])) != 1:
            return None
        c = self.consumers[var][0]
        return c, self.defs[c]

    def _match(self, var, value):
        match = {
            "relax.matmul": self._match_linear,
            "relax.nn.attention": self._match_attention,
            "relax.nn.conv2d": self._match_conv,
            "relax.nn.layer_norm": self._match_norm,
            "relax.nn.rms_norm": self._match_norm,
        }.get(_op_name(value))
        if match is not None:
            match(var, value)

    def _match_norm(self, var, call):
        """LayerNorm with weight and bias, or RMSNorm, over the last axis of static width."""
        centered = _op_name(call) == "relax.nn.layer_norm"
        x, *params = call.args
        a = call.attrs
        if not all(_is_f32(e) for e in call.args) or (centered and not (a.center and a.scale)):
            return
        xs = _sinfo(x).shape.values
        C = _static([xs[-1]])
        if C is None or [int(v) for v in a.axes] not in ([-1], [len(xs) - 1]):
            return
        C = C[0]
        if any(_static(_sinfo(p).shape.values) != [C] for p in params):
            return
        eps = float(a.epsilon)
        self.rewrites[var] = dict(kind="norm", centered=centered, x=x, params=params, C=C, eps=eps)

    def _match_linear(self, var, mm):
        x, rhs = mm.args
        if not (_is_f32(x) and _is_f32(rhs)) or mm.attrs.out_dtype not in (None, "", "float32"):
            return
        xs, rs = _sinfo(x).shape.values, _static(_sinfo(rhs).shape.values)
        if rs is None or len(rs) != 2 or len(xs) < 2 or _static([xs[-1]]) is None:
            return
        K, N = rs
        if int(xs[-1]) != K:
            return
        w, nk = rhs, False
        pd = self.defs.get(rhs)
        if _op_name(pd) == "relax.permute_dims" and len(_sinfo(pd.args[0]).shape.values) == 2:
            axes = pd.attrs.axes
            if axes is None or [int(a) for a in axes] == [1, 0]:
                w, nk = pd.args[0], True
        spec = dict(kind="linear", x=x, w=w, nk=nk, K=K, N=N, bias=None, act=None, res=None)
        self.gemm_x[var] = x
        cur = var
        bias = self._fused_add(cur, lambda shape: _static(shape.values) == [N])
        if bias:
            spec["bias"], cur = bias
        # activation
        nxt = self._single_consumer(cur)
        if nxt and _op_name(nxt[1]) in ("relax.nn.gelu", "relax.nn.gelu_tanh"):
            spec["act"] = ("gelu",) if _op_name(nxt[1]) == "relax.nn.gelu" else ("gelu_tanh",)
            cur = nxt[0]
        elif self.uses.get(cur, 0) == 2 and len(self.consumers.get(cur, [])) == 2:
            act = self._match_silu(cur)
            if act:
                spec["act"], cur = act
        residual = self._fused_add(
            cur, lambda shape: tvm_ffi.structural_equal(shape, _sinfo(cur).shape)
        )
        if residual:
            spec["res"], cur = residual
        self.rewrites[cur] = spec

    def only_gemm_input(self, var) -> bool:
        """Whether every use of `var` is as the X of a linear layer (which a 16-bit GEMM then
        takes as float16 pairs)."""
        users = self.consumers.get(var, [])
        return (
            bool(users)
            and self.uses.get(var, 0) == len(users)
            and all(u in self.gemm_x and self.gemm_x[u].same_as(var) for u in users)
        )

    def _fused_add(self, cur, fits):
        """(other operand, result) when `cur`'s only consumer adds one float32 tensor whose
        shape `fits` (a bias row or a same-shape residual), else None."""
        nxt = self._single_consumer(cur)
        if nxt and _op_name(nxt[1]) == "relax.add":
            other = [a for a in nxt[1].args if not a.same_as(cur)]
            if len(other) == 1 and _is_f32(other[0]) and fits(_sinfo(other[0]).shape):
                return other[0], nxt[0]
        return None

    def _match_silu(self, cur):
        """cur * sigmoid(cur * c) (quick_gelu: c = 1.702), or cur * sigmoid(cur) (SiLU,
        c = 1): ("silu", c) and the product's variable."""
        c1, c2 = self.consumers[cur]
        for first, out_var in ((c1, c2), (c2, c1)):
            fv, ov = self.defs[first], self.defs[out_var]
            if _op_name(ov) != "relax.multiply":
                continue
            if _op_name(fv) == "relax.sigmoid":
                sig_var, c = first, 1.0
            elif _op_name(fv) == "relax.multiply" and any(a.same_as(cur) for a in fv.args):
                consts = [_scalar_const(a) for a in fv.args if not a.same_as(cur)]
                sig = self._single_consumer(first)
                if len(consts) != 1 or consts[0] is None or not sig:
                    continue
                if _op_name(sig[1]) != "relax.sigmoid":
                    continue
                sig_var, c = sig[0], consts[0]
            else:
                continue
            use = self._single_consumer(sig_var)
            if use is None or use[0] != out_var:
                continue
            if not (
                any(a.same_as(cur) for a in ov.args) and any(a.same_as(sig_var) for a in ov.args)
            ):
                continue
            return ("silu", c), out_var
        return None

    def _match_attention(self, var, call):
        if len(call.args) != 3 or not all(_is_f32(a) for a in call.args):
            return
        if call.attrs.causal_mask is not None:
            return
        if getattr(call.attrs, "window_size", None) is not None:
            return
        shapes = [_sinfo(a).shape.values for a in call.args]
        if any(len(s) != 4 for s in shapes):
            return
        tail = [_static(s[1:]) for s in shapes]
        if any(t is None for t in tail) or tail[1] != tail[2] or tail[0][1:] != tail[1][1:]:
            return  # the queries may be fewer than the keys (a cross-attention's probe)
        if not all(tvm_ffi.structural_equal(shapes[0][0], s[0]) for s in shapes):
            return
        SQ = tail[0][0]
        S, H, D = tail[1]
        scale = call.attrs.scale
        scale = float(scale) if scale is not None else 1.0 / math.sqrt(D)
        if not scale > 0:  # the kernel takes the maximum of unscaled scores
            return
        self.rewrites[var] = dict(
            kind="attention",
            q=call.args[0],
            k=call.args[1],
            v=call.args[2],
            S=S,
            SQ=SQ,
            H=H,
            D=D,
            scale=scale,
        )

    def _match_conv(self, var, call):
        x, w = call.args
        a = call.attrs
        if not (_is_f32(x) and _is_f32(w)):
            return
        ws = _static(_sinfo(w).shape.values)
        xs = _sinfo(x).shape.values
        if ws is None or len(xs) != 4 or _static(xs[1:]) is None:
            return
        O, C, kh, kw = ws
        Cx, Hh, Ww = _static(xs[1:])
        ok = (
            a.data_layout == "NCHW"
            and a.kernel_layout == "OIHW"
            and a.out_layout == "NCHW"
            and int(a.groups) == 1
            and [int(v) for v in a.strides] == [kh, kw]
            and all(int(p) == 0 for p in a.padding)
            and all(int(d) == 1 for d in a.dilation)
            and Cx == C
            and Hh >= kh
            and Ww >= kw
            and a.out_dtype in (None, "", "float32")
        )
        if ok:
            self.rewrites[var] = dict(kind="conv", x=x, w=w, O=O, C=C, kh=kh, kw=kw, H=Hh, W=Ww)


@mutator
class _KernelRewriter(PyExprMutator):
    def __init__(self, mod, cfg: KernelConfig, rounded: str | None):
        super().__init__(mod)
        self.mod_ = mod
        self.cfg = cfg
        self.rounded = rounded
        self.plan = None
        self.cache = {}
        # a GEMM input -> its float16 or bfloat16 pairs, or with `rounded` its rounded values
        # (Q, K and V share theirs)
        self.halves = {}

    # -- helpers
    def _gv(self, key, make, name):
        if key not in self.cache:
            self.cache[key] = self.builder_.add_func(make(), name)
        return self.cache[key]

    def _emit(self, e):
        return self.builder_.emit(e)

    def _v(self, e):
        return self.visit_expr(e)

    def _gemm(self, x2, w, nk, K, N, bias=None, act=None, res2=None, source=None, pairs_out=False):
        """x2: [M, K] var (a view of `source`, if given); returns [M, N] var, or with
        `pairs_out` [M, N/2] float16 or bfloat16 pairs."""
        cfg = self.cfg
        NP = -(-N // cfg.nb)
        KW = -(-K // 2) if cfg.pairs else K
        pk = self._gv(("pack", N, K, nk), lambda: pack_weight_kernel(cfg, N, K, nk), "pack_weight")
        if self.rounded:
            w = self._round_operand(w)  # depends on the weight only: rounded at build time
        wp = self._emit(relax.call_tir(pk, [w], relax.TensorType([NP, KW, cfg.nb], "float32")))
        if cfg.pairs:
            x2 = self._pairs_of(x2, K, source)
        elif self.rounded:
            x2 = self._once(source, lambda: self._round_operand(x2))
        gk = self._gv(
            ("gemm", K, N, bias is not None, act, res2 is not None, pairs_out),
            lambda: gemm_kernel(cfg, K, N, bias is not None, act, res2 is not None, pairs_out),
            "gemm",
        )
        args = (
            [x2, wp] + ([bias] if bias is not None else []) + ([res2] if res2 is not None else [])
        )
        M = _sinfo(x2).shape.values[0]
        out = relax.TensorType([M, N // 2 if pairs_out else N], "float32")
        return self._emit(relax.call_tir(gk, args, out))

    def _pairs_of(self, x2, K, source):
        """x2 [M, K] as the [M, K/2] 16-bit pairs a 16-bit GEMM takes, converted once per
        `source`."""
        hk = self._gv(("half", K), lambda: pairs_kernel(self.cfg, K), "to_pairs")
        M = _sinfo(x2).shape.values[0]
        out = relax.TensorType([M, -(-K // 2)], "float32")
        return self._once(source, lambda: self._emit(relax.call_tir(hk, [x2], out)))

    def _once(self, source, convert):
        """A GEMM input's half form, made once per `source` (None: not shared)."""
        if source is None:
            return convert()
        if source not in self.halves:
            self.halves[source] = convert()
        return self.halves[source]

    def _round_operand(self, x):
        """x's values (a matrix) rounded to `self.rounded` (float16 or bfloat16), as
        float32."""
        rows, C = _sinfo(x).shape.values
        key = ("round", int(C), self.rounded)
        rk = self._gv(key, lambda: round_kernel(self.cfg, int(C), self.rounded), "round16")
        return self._emit(relax.call_tir(rk, [x], relax.TensorType([rows, C], "float32")))

    def _norm(self, spec, args, M, pairs_out=False):
        """The LayerNorm or RMSNorm kernel's call on `args` (X [M, C] and the weights):
        [M, C], or with `pairs_out` [M, C/2] 16-bit pairs."""
        C, eps = spec["C"], spec["eps"]
        make, name = (
            (layer_norm_kernel, "layer_norm") if spec["centered"] else (rms_norm_kernel, "rms_norm")
        )
        nk = self._gv(
            (name, C, eps, pairs_out), lambda: make(self.cfg, C, eps, pairs_out=pairs_out), name
        )
        out = relax.TensorType([M, C // 2 if pairs_out else C], "float32")
        return self._emit(relax.call_tir(nk, args, out))

    @staticmethod
    def _rows(x):
        """The product of x's leading dims: x as a [rows, last] matrix."""
        lead = list(_sinfo(x).shape.values[:-1])
        M = lead[0]
        for d in lead[1:]:
            M = M * d
        return M

    def _to_pair_gemms(self, var) -> bool:
        """Whether `var`'s producer should write it as 16-bit pairs for the 16-bit GEMMs that
        are its only users (the float32 value then goes unused and is dropped)."""
        return bool(self.cfg.pairs) and self.plan.only_gemm_input(var)

    def _rewrite(self, spec, out_sinfo, var):
        kind = spec["kind"]
        if kind == "linear":
            x = self._v(spec["x"])
            M = self._rows(x)
            x2 = self._emit(relax.op.reshape(x, relax.ShapeExpr([M, spec["K"]])))
            res2 = None
            if spec["res"] is not None:
                res2 = self._emit(
                    relax.op.reshape(self._v(spec["res"]), relax.ShapeExpr([M, spec["N"]]))
                )
            bias = self._v(spec["bias"]) if spec["bias"] is not None else None
            w, K, N = self._v(spec["w"]), spec["K"], spec["N"]
            args = (x2, w, spec["nk"], K, N, bias, spec["act"], res2, x)
            if res2 is None and N % self.cfg.nb == 0 and self._to_pair_gemms(var):
                self.halves[var] = self._gemm(*args, pairs_out=True)
            return relax.op.reshape(self._gemm(*args), out_sinfo.shape)
        if kind == "attention":
            S, H, D = spec["S"], spec["H"], spec["D"]
            q, k, v = self._v(spec["q"]), self._v(spec["k"]), self._v(spec["v"])
            B = _sinfo(q).shape.values[0]
            SP, DP = attn_padding(self.cfg, S, D)
            kt = self._emit(
                relax.call_tir(
                    self._gv(
                        ("kpack", S, H, D),
                        lambda: attn_pack_k_kernel(self.cfg, S, H, D),
                        "attn_pack_k",
                    ),
                    [k],
                    relax.TensorType([B, H, D, SP], "float32"),
                )
            )
            vp = self._emit(
                relax.call_tir(
                    self._gv(
                        ("vpack", S, H, D),
                        lambda: attn_pack_v_kernel(self.cfg, S, H, D),
                        "attn_pack_v",
                    ),
                    [v],
                    relax.TensorType([B, H, S, DP], "float32"),
                )
            )
            SQ, scale = spec["SQ"], spec["scale"]
            ak = self._gv(
                ("attn", S, H, D, scale, SQ),
                lambda: attention_kernel(self.cfg, S, H, D, scale, queries=SQ),
                "attention",
            )
            return relax.call_tir(ak, [q, kt, vp], relax.TensorType([B, SQ, H, D], "float32"))
        if kind == "norm":
            x = self._v(spec["x"])
            M = self._rows(x)
            C = spec["C"]
            x2 = self._emit(relax.op.reshape(x, relax.ShapeExpr([M, C])))
            args = [x2] + [self._v(p) for p in spec["params"]]
            if C % (2 * self.cfg.vec) == 0 and self._to_pair_gemms(var):
                pairs = self._norm(spec, args, M, pairs_out=True)
                self.halves[var] = pairs
            return relax.op.reshape(self._norm(spec, args, M), out_sinfo.shape)
        if kind == "conv":
            x, w = self._v(spec["x"]), self._v(spec["w"])
            B = _sinfo(x).shape.values[0]
            O, C, kh, kw = spec["O"], spec["C"], spec["kh"], spec["kw"]
            Hp, Wp = spec["H"] // kh, spec["W"] // kw
            K = C * kh * kw
            if (Hp * kh, Wp * kw) != (spec["H"], spec["W"]):  # the conv drops the remainder
                x = self._emit(relax.op.strided_slice(x, [2, 3], [0, 0], [Hp * kh, Wp * kw]))
            xr = self._emit(relax.op.reshape(x, relax.ShapeExpr([B, C, Hp, kh, Wp, kw])))
            xp = self._emit(relax.op.permute_dims(xr, [0, 2, 4, 1, 3, 5]))
            x2 = self._emit(relax.op.reshape(xp, relax.ShapeExpr([B * Hp * Wp, K])))
            w2 = self._emit(relax.op.reshape(w, relax.ShapeExpr([O, K])))
            y2 = self._gemm(x2, w2, True, K, O)
            y4 = self._emit(relax.op.reshape(y2, relax.ShapeExpr([B, Hp, Wp, O])))
            return relax.op.permute_dims(y4, [0, 3, 1, 2])
        raise ValueError(kind)

    # -- visitor hooks
    def visit_dataflow_block_(self, block):
        saved = self.plan, self.halves
        self.plan, self.halves = _Plan(block, self._outputs, self.cfg.vec), {}
        out = super().visit_dataflow_block_(block)
        self.plan, self.halves = saved
        return out

    def visit_var_binding_(self, binding):
        if self.plan is not None and binding.var in self.plan.rewrites:
            new = self._rewrite(self.plan.rewrites[binding.var], binding.var.ty, binding.var)
            new = self.builder_.normalize(new)
            self.builder_.emit_normalized(relax.VarBinding(binding.var, new))
            return
        super().visit_var_binding_(binding)

    def run(self):
        for gv, func in self.mod_.functions_items():
            if isinstance(func, relax.Function):
                self._outputs = [v for v in self._free_vars_of_body(func)]
                new = self.visit_expr(func)
                new = relax.analysis.remove_all_unused(new)
                self.builder_.update_func(gv, new)
        return self.builder_.finalize()

    @staticmethod
    def _free_vars_of_body(func):
        # values escaping the dataflow block(s) count as extra uses
        body = func.body
        outs = []
        if isinstance(body, relax.SeqExpr):
            outs += [v for v in relax.analysis.free_vars(body.body)]
            for blk in body.blocks:
                if not isinstance(blk, relax.DataflowBlock):
                    for b in blk.bindings:
                        outs += _Plan._operands(b.value)
            for blk in body.blocks:
                if isinstance(blk, relax.DataflowBlock):
                    for b in blk.bindings:
                        if not isinstance(b.var, relax.DataflowVar):
                            outs.append(b.var)
        return outs


def rewrite_to_kernels(
    mod: tvm.IRModule, cfg: KernelConfig, rounded: str | None = None
) -> tvm.IRModule:
    """`rounded` (float16 or bfloat16): the float32 GEMMs take operands rounded to it
    (`precision` on a CPU without arithmetic in that type)."""
    # The float32 values that 16-bit pairs replaced go unused (`run` drops their bindings);
    # DeadCodeElimination drops the kernels that only they called.
    return relax.transform.DeadCodeElimination()(_KernelRewriter(mod, cfg, rounded).run())
