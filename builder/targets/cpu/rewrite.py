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
    Shuffle,
    attention_kernel,
    attention_seq_kernel,
    attn_pack_k_kernel,
    attn_pack_v_kernel,
    attn_packed,
    attn_segments_kernel,
    attn_seq_padding,
    avg_pool_kernel,
    gemm_kernel,
    layer_norm_kernel,
    pack_weight_kernel,
    pairs_kernel,
    rms_norm_kernel,
    round_kernel,
)
from .walk import op_name


def _static(shape) -> list[int] | None:
    try:
        return [int(v) for v in shape]
    except Exception:  # pylint: disable=broad-except
        return None


def _sinfo(e):
    ty = getattr(e, "ty", None)
    return ty if isinstance(ty, relax.TensorType) else None


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


def _glu_blocks(cfg: KernelConfig, N: int) -> int:
    """Weight blocks of a GLU's merged GEMM of N outputs: NB/2 outputs each."""
    return -(-N // (cfg.nb // 2))


def _halves_of_a_glu(gate: dict, up: dict) -> bool:
    """Whether two linear layers' specs are a GLU's halves that one GEMM can compute: the
    same input and weight shape ([N, K] weights, as `Linear` has), both with a bias or
    neither, and nothing after the up half's bias."""
    same = gate["x"].same_as(up["x"]) and all(gate[k] == up[k] for k in ("K", "N", "nk"))
    plain = all(up[k] is None for k in ("act", "scale", "gate", "res", "glu"))
    return (
        up["kind"] == "linear"
        and same
        and gate["nk"]
        and plain
        and (gate["bias"] is None) == (up["bias"] is None)
    )


class _Plan:
    """Analysis of one dataflow block: which bindings become kernel calls. `weights`: the
    function's parameters after its inputs."""

    def __init__(self, block: relax.DataflowBlock, func_outputs, vec: int, weights=frozenset()):
        self.vec = vec
        self.weights = weights
        self.defs = {}
        self.uses = {}
        self.consumers = {}
        self.claimed = set()  # bindings that a match has taken into its kernel call
        self._weight_only = {}
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
        self._merge_glus()

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
        """(consumer, its value) when `var` has one use, by a binding no match has taken."""
        if self.uses.get(var, 0) != 1 or len(self.consumers.get(var, [])) != 1:
            return None
        c = self.consumers[var][0]
        return None if c in self.claimed else (c, self.defs[c])

    def from_weights(self, e) -> bool:
        """Whether `e` depends on weights and constants only (LiftTransformParams then
        computes it at build time)."""
        if isinstance(e, tvm.ir.GenericConst) or e in self.weights:
            return True
        if e not in self._weight_only:
            value = self.defs.get(e)
            self._weight_only[e] = value is not None and all(
                self.from_weights(a) for a in self._operands(value)
            )
        return self._weight_only[e]

    def _match(self, var, value):
        match = {
            "relax.matmul": self._match_linear,
            "relax.nn.attention": self._match_attention,
            "relax.nn.attention_var_len": self._match_attention_var_len,
            "relax.nn.conv2d": self._match_conv,
            "relax.nn.layer_norm": self._match_norm,
            "relax.nn.rms_norm": self._match_norm,
            "relax.divide": self._match_pool,
        }.get(op_name(value))
        if match is not None and var not in self.claimed:
            match(var, value)

    def _match_pool(self, var, call):
        """The average pooling of k x k blocks of a [B, side^2, D] token grid, as Gemma 3's
        projector writes it: sum(reshape(x, (B, t, k, t, k, D)), axis=[2, 4]) / k^2."""
        total, divisor = call.args
        summed = self.defs.get(total)
        if op_name(summed) != "relax.sum" or summed.attrs.keepdims:
            return
        blocks = self.defs.get(summed.args[0])
        if op_name(blocks) != "relax.reshape" or summed.attrs.axis is None:
            return
        x = blocks.args[0]
        six = _static(_sinfo(summed.args[0]).shape.values[1:])
        if six is None or not (_is_f32(x) and _is_f32(var)) or len(six) != 5:
            return
        t, k, t2, k2, d = six
        axes = [int(a) for a in summed.attrs.axis]
        if (t, k) != (t2, k2) or axes != [2, 4] or _scalar_const(divisor) != k * k:
            return
        if _static(_sinfo(x).shape.values[1:]) != [(t * k) ** 2, d]:
            return
        self.rewrites[var] = dict(kind="pool", x=x, side=t * k, k=k, D=d)

    def _match_norm(self, var, call):
        """LayerNorm with weight and bias, or RMSNorm, over the last axis of static width."""
        centered = op_name(call) == "relax.nn.layer_norm"
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
        shuffle = self.shuffle_of(x, 2 * self.vec)  # its segments whole vectors, also as pairs
        self.rewrites[var] = dict(
            kind="norm", centered=centered, x=x, params=params, C=C, eps=eps, shuffle=shuffle
        )

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
        if op_name(pd) == "relax.permute_dims" and len(_sinfo(pd.args[0]).shape.values) == 2:
            axes = pd.attrs.axes
            if axes is None or [int(a) for a in axes] == [1, 0]:
                w, nk = pd.args[0], True
        spec = dict(kind="linear", x=x, w=w, nk=nk, K=K, N=N, shuffle=self.shuffle_of(x))
        spec.update(bias=None, act=None, scale=None, gate=None, res=None, glu=None)
        self.gemm_x[var] = x
        self.claimed.add(var)
        cur = var

        def row(e) -> bool:
            return _static(_sinfo(e).shape.values) == [N]

        def like_cur(e) -> bool:
            return tvm_ffi.structural_equal(_sinfo(e).shape, _sinfo(cur).shape)

        # The epilogue, in the order it computes: act(. + bias) * gate + residual, or
        # (. + bias) * scale + residual with the layer scale folded into W and bias.
        bias = self._fused(cur, "relax.add", row)
        if bias:
            spec["bias"], cur = bias
        act = self._activation(cur)
        if act:
            spec["act"], cur = act
        else:
            scale = self._fused(cur, "relax.multiply", lambda e: row(e) and self.from_weights(e))
            if scale:
                spec["scale"], cur = scale
        for key, op in (("gate", "relax.multiply"), ("res", "relax.add")):
            found = self._fused(cur, op, like_cur)
            if found:
                spec[key], cur = found
        self.rewrites[cur] = spec

    def _merge_glus(self):
        """A GLU whose halves are linear layers of one input, act(x W_g + b_g) * (x W_u +
        b_u) (SwiGLU), as matched: the gate half's GEMM takes the up half's output as its
        `gate`. Merged, one GEMM computes both halves (`gemm_kernel`'s `glu`) and the up
        half's GEMM goes. Where the halves differ in shape, input or bias, where the up
        half's output has other uses, or the multiply came to the up half first, the two
        GEMMs stay."""
        for spec in list(self.rewrites.values()):
            up = self.rewrites.get(spec.get("gate"))
            if up is None or self.uses.get(spec["gate"]) != 1 or not _halves_of_a_glu(spec, up):
                continue
            del self.rewrites[spec["gate"]]
            spec.update(gate=None, glu=(up["w"], up["bias"]))

    def _activation(self, cur):
        """(act, its result) for the activation that `cur` alone feeds, else None."""
        nxt = self._single_consumer(cur)
        if nxt and op_name(nxt[1]) in ("relax.nn.gelu", "relax.nn.gelu_tanh"):
            self.claimed.add(nxt[0])
            return ("gelu",) if op_name(nxt[1]) == "relax.nn.gelu" else ("gelu_tanh",), nxt[0]
        if self.uses.get(cur, 0) == 2 and len(self.consumers.get(cur, [])) == 2:
            return self._match_silu(cur)
        return None

    def shuffle_of(self, x, lanes: int = 1):
        """(tokens, `Shuffle`) where `x` is the pixel shuffle of a [B, skip + side^2, D]
        tensor of tokens (as `projectors.pixel_shuffle` writes it: reshape to (B, n, f, n,
        f, D), permute_dims (0, 1, 3, 2, 4, 5), reshape to (B, n^2, f^2 D)), the skipped
        tokens a split's first part (`split(h, [skip], axis=1)[1]`), so that a kernel can
        read x in place; `lanes`: the kernel's vectors must lie within a segment
        (`Shuffle.whole`). Else None."""
        merged = self.defs.get(x)
        if op_name(merged) != "relax.reshape" or not _is_f32(x):
            return None
        permuted = self.defs.get(merged.args[0])
        if op_name(permuted) != "relax.permute_dims" or permuted.attrs.axes is None:
            return None
        if [int(a) for a in permuted.attrs.axes] != [0, 1, 3, 2, 4, 5]:
            return None
        blocks = self.defs.get(permuted.args[0])
        if op_name(blocks) != "relax.reshape":
            return None
        six = _static(_sinfo(permuted.args[0]).shape.values[1:])
        tokens = blocks.args[0]
        if six is None or not _is_f32(tokens) or len(_sinfo(tokens).shape.values) != 3:
            return None
        n, f, n2, f2, d = six
        inner = _static(_sinfo(tokens).shape.values[1:])
        out = _static(_sinfo(x).shape.values[1:])
        if (n, f) != (n2, f2) or inner != [(n * f) ** 2, d] or out != [n * n, f * f * d]:
            return None
        tokens, skip = self._split_off(tokens)
        shuffle = Shuffle(factor=f, side=n * f, width=d, skip=skip)
        return (tokens, shuffle) if shuffle.whole(lanes) else None

    def _split_off(self, tokens):
        """(h, skip) where `tokens` is the second part of `split(h, [skip], axis=1)`, a
        float32 [B, skip + S, D] tensor; else (tokens, 0)."""
        item = self.defs.get(tokens)
        if not isinstance(item, relax.TupleGetItem) or int(item.index) != 1:
            return tokens, 0
        split = self.defs.get(item.tuple_value)
        if op_name(split) != "relax.split" or int(split.attrs.axis) != 1:
            return tokens, 0
        h, at = split.args[0], split.attrs.indices_or_sections
        at = None if isinstance(at, (int, tvm.tirx.IntImm)) else _static(at)  # not sections
        if not _is_f32(h) or at is None or len(at) != 1:
            return tokens, 0
        return h, at[0]

    def only_gemm_input(self, var) -> bool:
        """Whether every use of `var` is as the X of a linear layer (which a 16-bit GEMM then
        takes as float16 pairs)."""
        users = self.consumers.get(var, [])
        return (
            bool(users)
            and self.uses.get(var, 0) == len(users)
            and all(u in self.gemm_x and self.gemm_x[u].same_as(var) for u in users)
        )

    def _fused(self, cur, op: str, fits):
        """(other operand, result) when `cur`'s only consumer is the binary `op` (add or
        multiply) with one float32 tensor that `fits` (a bias row, a layer scale, a
        same-shape gate or residual), else None; the result is then claimed."""
        nxt = self._single_consumer(cur)
        if nxt and op_name(nxt[1]) == op:
            other = [a for a in nxt[1].args if not a.same_as(cur)]
            if len(other) == 1 and _is_f32(other[0]) and fits(other[0]):
                self.claimed.add(nxt[0])
                return other[0], nxt[0]
        return None

    def _match_silu(self, cur):
        """cur * sigmoid(cur * c) (quick_gelu: c = 1.702), or cur * sigmoid(cur) (SiLU,
        c = 1): ("silu", c) and the product's variable."""
        c1, c2 = self.consumers[cur]
        for first, out_var in ((c1, c2), (c2, c1)):
            fv, ov = self.defs[first], self.defs[out_var]
            if op_name(ov) != "relax.multiply":
                continue
            if op_name(fv) == "relax.sigmoid":
                sig_var, c = first, 1.0
            elif op_name(fv) == "relax.multiply" and any(a.same_as(cur) for a in fv.args):
                consts = [_scalar_const(a) for a in fv.args if not a.same_as(cur)]
                sig = self._single_consumer(first)
                if len(consts) != 1 or consts[0] is None or not sig:
                    continue
                if op_name(sig[1]) != "relax.sigmoid":
                    continue
                sig_var, c = sig[0], consts[0]
            else:
                continue
            use = self._single_consumer(sig_var)
            if use is None or use[0] != out_var or out_var in self.claimed:
                continue
            if not (
                any(a.same_as(cur) for a in ov.args) and any(a.same_as(sig_var) for a in ov.args)
            ):
                continue
            self.claimed.update((first, sig_var, out_var))
            return ("silu", c), out_var
        return None

    def _match_attention(self, var, call):
        """`nn.attention(q, k, v)` (no mask or bias, positive scale) of float32 [B, S, H, D]
        tensors, the queries fewer than the keys or as many. S may be symbolic (a token count
        known at run time): the sequence kernel then takes it as an argument."""
        if len(call.args) != 3:
            return
        spec = self._attention_spec(call)
        if spec is not None:
            self.rewrites[var] = spec

    def _match_attention_var_len(self, var, call):
        """`nn.attention_var_len(q, k, v, seqstart_q, seqstart_k, max_seqlen_q, max_seqlen_k)`
        without a causal mask or window: the block-diagonal attention of [1, n, H, D]
        queries, keys and values by their cu_seqlens (int32, [K + 1]); n symbolic or not."""
        spec = self._attention_spec(call)
        starts = call.args[3:5]
        if spec is None or not all(self._starts(e) for e in starts):
            return
        spec.update(kind="attention_seq", starts=starts)
        self.rewrites[var] = spec

    @staticmethod
    def _starts(e) -> bool:
        s = _sinfo(e)
        return s is not None and s.dtype == "int32" and s.ndim == 1

    @staticmethod
    def _attention_spec(call) -> dict | None:
        """The attention kernels' spec of an attention call's q, k and v (its first three
        arguments, float32 [B, S, H, D] of the same B, H and D, k and v of the same S, no
        causal mask or window, a positive scale); None where they cannot compute it. Kind
        "attention" where every size is static, else "attention_seq"."""
        qkv = call.args[:3]
        if not all(_is_f32(a) for a in qkv) or call.attrs.causal_mask is not None:
            return None
        if getattr(call.attrs, "window_size", None) is not None:
            return None
        shapes = [_sinfo(a).shape.values for a in qkv]
        if any(len(s) != 4 for s in shapes):
            return None
        heads = [_static(s[2:]) for s in shapes]
        if any(h is None for h in heads) or heads[1] != heads[2] or heads[0] != heads[1]:
            return None
        if not all(tvm_ffi.structural_equal(shapes[0][0], s[0]) for s in shapes):
            return None
        if not tvm_ffi.structural_equal(shapes[1][1], shapes[2][1]):
            return None
        H, D = heads[0]
        scale = call.attrs.scale
        scale = float(scale) if scale is not None else 1.0 / math.sqrt(D)
        if not scale > 0:  # the kernel takes the maximum of unscaled scores
            return None
        q, k, v = qkv
        spec = dict(kind="attention", q=q, k=k, v=v, H=H, D=D, scale=scale)
        S, SQ = _static([shapes[1][1]]), _static([shapes[0][1]])
        if S is None or SQ is None:
            spec.update(kind="attention_seq", S=shapes[1][1], SQ=shapes[0][1], starts=None)
        else:
            spec.update(S=S[0], SQ=SQ[0])
        return spec

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

    def _gemm(
        self,
        x2,
        w,
        nk,
        K,
        N,
        bias=None,
        act=None,
        res2=None,
        source=None,
        pairs_out=False,
        gate2=None,
        glu=False,
        shuffle=None,
    ):
        """x2: [M, K] var (a view of `source`, if given); returns [M, N] var, or with
        `pairs_out` [M, N/2] float16 or bfloat16 pairs. The epilogue: act(. + bias) * gate2
        + res2, each part where given. `glu`: w and bias are both halves of a GLU,
        interleaved (`_interleave`). `shuffle`: (M, a `Shuffle`), x2 is the tokens whose
        pixel shuffle is the input, which the GEMM (or the conversion of its operand) reads
        in place."""
        cfg = self.cfg
        M, shuffle = shuffle if shuffle else (_sinfo(x2).shape.values[0], None)
        WN = _glu_blocks(cfg, N) * cfg.nb if glu else N  # the packed weight's columns
        NP = -(-WN // cfg.nb)
        KW = -(-K // 2) if cfg.pairs else K
        pk = self._gv(
            ("pack", WN, K, nk), lambda: pack_weight_kernel(cfg, WN, K, nk), "pack_weight"
        )
        if self.rounded:
            w = self._round_operand(w)  # depends on the weight only: rounded at build time
        wp = self._emit(relax.call_tir(pk, [w], relax.TensorType([NP, KW, cfg.nb], "float32")))
        if cfg.pairs:
            x2, shuffle = self._pairs_of(x2, K, source, M, shuffle), None
        elif self.rounded:
            x2 = self._once(source, lambda: self._round_operand(x2, M, K, shuffle))
            shuffle = None
        flags = (bias is not None, act, res2 is not None, pairs_out, gate2 is not None, glu)
        flags += (shuffle,)
        gk = self._gv(("gemm", K, N, *flags), lambda: gemm_kernel(cfg, K, N, *flags), "gemm")
        args = [x2, wp] + [a for a in (bias, gate2, res2) if a is not None]
        out = relax.TensorType([M, N // 2 if pairs_out else N], "float32")
        return self._emit(relax.call_tir(gk, args, out))

    def _pairs_of(self, x2, K, source, M, shuffle=None):
        """x2 [M, K] (or the tokens of its `shuffle`) as the [M, K/2] 16-bit pairs a 16-bit
        GEMM takes, converted once per `source`."""
        hk = self._gv(("half", K, shuffle), lambda: pairs_kernel(self.cfg, K, shuffle), "to_pairs")
        out = relax.TensorType([M, -(-K // 2)], "float32")
        return self._once(source, lambda: self._emit(relax.call_tir(hk, [x2], out)))

    def _once(self, source, convert):
        """A GEMM input's half form, made once per `source` (None: not shared)."""
        if source is None:
            return convert()
        if source not in self.halves:
            self.halves[source] = convert()
        return self.halves[source]

    def _round_operand(self, x, rows=None, C=None, shuffle=None):
        """x's values (a matrix, or the [rows, C] pixel shuffle of its tokens) rounded to
        `self.rounded` (float16 or bfloat16), as float32."""
        if shuffle is None:
            rows, C = _sinfo(x).shape.values
        key = ("round", int(C), self.rounded, shuffle)
        rk = self._gv(key, lambda: round_kernel(self.cfg, int(C), self.rounded, shuffle), "round16")
        return self._emit(relax.call_tir(rk, [x], relax.TensorType([rows, C], "float32")))

    def _matrix(self, e, M, N):
        """`e` (a tensor of M * N values) as an [M, N] matrix; None for None."""
        if e is None:
            return None
        return self._emit(relax.op.reshape(self._v(e), relax.ShapeExpr([M, N])))

    def _fold_scale(self, w, nk, bias, scale, N):
        """A layer scale folded into the linear layer: W times the scale per output channel
        (W's rows for [N, K], its columns for [K, N]) and the bias times the scale. Both
        depend on weights only, so LiftTransformParams makes them at build time, before the
        packing; the GEMM then costs what it costs without the scale."""
        per_row = self._emit(relax.op.reshape(scale, relax.ShapeExpr([N, 1]))) if nk else scale
        w = self._emit(relax.op.multiply(w, per_row))
        if bias is not None:
            bias = self._emit(relax.op.multiply(bias, scale))
        return w, bias

    def _interleave(self, gate, up, N):
        """A GLU's two [N, ...] weights (or biases) as one [2 * N', ...], N' = N rounded up
        to whole half blocks: each block of NB rows holds NB/2 rows of `gate` and then the
        same rows of `up`, zero-padded (`gemm_kernel`'s `glu`). Weights only: made at
        build time, before the packing."""
        half = self.cfg.nb // 2
        blocks = _glu_blocks(self.cfg, N)
        rest = [int(d) for d in _sinfo(gate).shape.values[1:]]
        pad = [0, blocks * half - N] + [0, 0] * len(rest)

        def split(a):
            if blocks * half != N:
                a = self._emit(relax.op.nn.pad(a, pad))
            return self._emit(relax.op.reshape(a, relax.ShapeExpr([blocks, half, *rest])))

        both = self._emit(relax.op.concat([split(gate), split(up)], axis=1))
        return self._emit(relax.op.reshape(both, relax.ShapeExpr([blocks * 2 * half, *rest])))

    def _norm(self, spec, args, M, pairs_out=False):
        """The LayerNorm or RMSNorm kernel's call on `args` (X [M, C], or the tokens of its
        pixel shuffle, and the weights): [M, C], or with `pairs_out` [M, C/2] 16-bit
        pairs."""
        C, eps = spec["C"], spec["eps"]
        shuffle = spec["shuffle"][1] if spec["shuffle"] else None
        make, name = (
            (layer_norm_kernel, "layer_norm") if spec["centered"] else (rms_norm_kernel, "rms_norm")
        )
        nk = self._gv(
            (name, C, eps, pairs_out, shuffle),
            lambda: make(self.cfg, C, eps, pairs_out=pairs_out, shuffle=shuffle),
            name,
        )
        out = relax.TensorType([M, C // 2 if pairs_out else C], "float32")
        return self._emit(relax.call_tir(nk, args, out))

    def _input(self, spec, x, M, K):
        """A kernel's X: x as an [M, K] matrix, or where x is a pixel shuffle that the
        kernel reads in place (`_Plan.shuffle_of`), its tokens and (M, the `Shuffle`)."""
        if spec["shuffle"] is None:
            return self._emit(relax.op.reshape(x, relax.ShapeExpr([M, K]))), None
        tokens, shuffle = spec["shuffle"]
        return self._v(tokens), (M, shuffle)

    def _attention_seq(self, spec):
        """The sequence kernel's call (`kernels.attention_seq_kernel`): the key count S goes
        in as an argument, and with `starts` (cu_seqlens of an `attention_var_len`) each
        query's key range from `attn_segments_kernel`."""
        cfg, H, D, S = self.cfg, spec["H"], spec["D"], spec["S"]
        q, k, v = self._v(spec["q"]), self._v(spec["k"]), self._v(spec["v"])
        B, SQ = _sinfo(q).shape.values[:2]
        starts = spec["starts"]
        segments = starts is not None
        (DK, _), vp_shape = attn_packed(cfg, S, D)
        SP = attn_seq_padding(cfg, S, segments)
        n = relax.prim_value(S)
        pk = self._gv(
            ("kpack", None, H, D), lambda: attn_pack_k_kernel(cfg, None, H, D), "attn_pack_k"
        )
        pv = self._gv(
            ("vpack", None, H, D), lambda: attn_pack_v_kernel(cfg, None, H, D), "attn_pack_v"
        )
        kt = self._emit(relax.call_tir(pk, [k], relax.TensorType([B, H, DK, SP], "float32")))
        vp = self._emit(relax.call_tir(pv, [v], relax.TensorType([B, H, *vp_shape], "float32")))
        args = [q, kt, vp]
        if segments:
            sk = self._gv(("segments",), attn_segments_kernel, "attn_segments")
            ranges = relax.TensorType([SQ, 2], "int32")
            starts = [self._v(e) for e in starts]
            args.append(self._emit(relax.call_tir(sk, [*starts, n], ranges)))
        scale = spec["scale"]
        ak = self._gv(
            ("attn_seq", H, D, scale, segments),
            lambda: attention_seq_kernel(cfg, H, D, scale, segments),
            "attention_seq",
        )
        return relax.call_tir(ak, [*args, n], relax.TensorType([B, SQ, H, D], "float32"))

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
            w, K, N = self._v(spec["w"]), spec["K"], spec["N"]
            x2, shuffle = self._input(spec, x, M, K)
            res2, gate2 = (self._matrix(spec[key], M, N) for key in ("res", "gate"))
            bias = self._v(spec["bias"]) if spec["bias"] is not None else None
            if spec["scale"] is not None:
                w, bias = self._fold_scale(w, spec["nk"], bias, self._v(spec["scale"]), N)
            glu = spec["glu"] is not None
            if glu:
                w_up, bias_up = (self._v(e) if e is not None else None for e in spec["glu"])
                w = self._interleave(w, w_up, N)
                bias = self._interleave(bias, bias_up, N) if bias is not None else None
            args = (x2, w, spec["nk"], K, N, bias, spec["act"], res2, x)
            extra = dict(gate2=gate2, glu=glu, shuffle=shuffle)
            if res2 is None and N % self.cfg.nb == 0 and self._to_pair_gemms(var):
                self.halves[var] = self._gemm(*args, pairs_out=True, **extra)
            return relax.op.reshape(self._gemm(*args, **extra), out_sinfo.shape)
        if kind == "attention":
            S, H, D = spec["S"], spec["H"], spec["D"]
            q, k, v = self._v(spec["q"]), self._v(spec["k"]), self._v(spec["v"])
            B = _sinfo(q).shape.values[0]
            kt_shape, vp_shape = attn_packed(self.cfg, S, D)
            kt = self._emit(
                relax.call_tir(
                    self._gv(
                        ("kpack", S, H, D),
                        lambda: attn_pack_k_kernel(self.cfg, S, H, D),
                        "attn_pack_k",
                    ),
                    [k],
                    relax.TensorType([B, H, *kt_shape], "float32"),
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
                    relax.TensorType([B, H, *vp_shape], "float32"),
                )
            )
            SQ, scale = spec["SQ"], spec["scale"]
            ak = self._gv(
                ("attn", S, H, D, scale, SQ),
                lambda: attention_kernel(self.cfg, S, H, D, scale, queries=SQ),
                "attention",
            )
            return relax.call_tir(ak, [q, kt, vp], relax.TensorType([B, SQ, H, D], "float32"))
        if kind == "attention_seq":
            return self._attention_seq(spec)
        if kind == "norm":
            x = self._v(spec["x"])
            M = self._rows(x)
            C = spec["C"]
            x2, _ = self._input(spec, x, M, C)
            args = [x2] + [self._v(p) for p in spec["params"]]
            if C % (2 * self.cfg.vec) == 0 and self._to_pair_gemms(var):
                pairs = self._norm(spec, args, M, pairs_out=True)
                self.halves[var] = pairs
            return relax.op.reshape(self._norm(spec, args, M), out_sinfo.shape)
        if kind == "pool":
            x, side, k, D = self._v(spec["x"]), spec["side"], spec["k"], spec["D"]
            t = side // k
            M = _sinfo(x).shape.values[0] * t * t
            pk = self._gv(
                ("pool", side, k, D), lambda: avg_pool_kernel(self.cfg, side, k, D), "avg_pool"
            )
            pooled = self._emit(relax.call_tir(pk, [x], relax.TensorType([M, D], "float32")))
            return relax.op.reshape(pooled, out_sinfo.shape)
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
        self.plan, self.halves = _Plan(block, self._outputs, self.cfg.vec, self._weights), {}
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
                self._weights = self._weights_of(func)
                new = self.visit_expr(func)
                new = relax.analysis.remove_all_unused(new)
                self.builder_.update_func(gv, new)
        return self.builder_.finalize()

    @staticmethod
    def _weights_of(func) -> frozenset:
        """The parameters after the function's `num_input` inputs (none without it)."""
        inputs = func.attrs.get("num_input") if func.attrs is not None else None
        return frozenset(func.params[int(inputs) :]) if inputs is not None else frozenset()

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
