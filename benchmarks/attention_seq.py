"""Attention over a sequence length known only at run time, against the kernel that has it
built in and against torch.

    python benchmarks/attention_seq.py [--rounds 15] [--seconds 5] [--threads N]
                                       [--tokens 256,1024,4096] [--heads 16] [--dims 64,80]
                                       [--windows 64]

For each token count n and head dim: the kernels of one `R.nn.attention` over (1, n, H, hd)
float32 (the K^T and V packing, then the attention), as the CPU pipeline calls them:
`attention_seq_kernel` (n an argument: one build serves every n) and `attention_kernel`
(n built in), and torch's `scaled_dot_product_attention` in float32 on the same threads.
With `--windows W`, also the block-diagonal attention of `R.nn.attention_var_len` over
windows of W tokens (Qwen2.5-VL's window layers), and torch's SDPA run window by window
(the loop as HF's eager attention writes it) and over the whole sequence with a block mask.
The runners are timed in turn, round after round (`bench_cpu.interleaved_times`). Prints one
table: the median time of each, and the median within-round ratios of the others to the
symbolic kernel (`bench_cpu.paired_ratio`).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # run from a checkout without installing

from benchmarks.bench_cpu import interleaved_times, paired_ratio  # noqa: E402
from builder.runtime import available_cores, set_threads  # noqa: E402


def runners(n: int, heads: int, dim: int, window: int | None) -> dict:
    import numpy as np
    import torch
    import tvm

    from builder.config import TargetConfig
    from builder.targets import llvm
    from builder.targets.cpu import kernels
    from builder.targets.cpu.pipeline import compile_kernel

    target, _ = llvm.tvm_target(TargetConfig())
    cfg = kernels.kernel_config(target)
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, n, heads, dim)).astype("float32") for _ in range(3))
    tq, tk, tv = (tvm.runtime.tensor(a) for a in (q, k, v))
    (DK, SP), (SK, DP) = kernels.attn_packed(cfg, n, dim)
    out = tvm.runtime.empty((1, n, heads, dim), "float32")

    def build(func):
        return compile_kernel(func, target)

    def packed(S, width):
        kt = tvm.runtime.empty((1, heads, DK, width), "float32")
        vp = tvm.runtime.empty((1, heads, SK, DP), "float32")
        return (
            build(kernels.attn_pack_k_kernel(cfg, S, heads, dim)),
            kt,
            build(kernels.attn_pack_v_kernel(cfg, S, heads, dim)),
            vp,
        )

    scale = dim**-0.5
    pk, kt, pv, vp = packed(n, SP)
    static = build(kernels.attention_kernel(cfg, n, heads, dim, scale))
    spk, skt, spv, svp = packed(None, kernels.attn_seq_padding(cfg, n))
    seq = build(kernels.attention_seq_kernel(cfg, heads, dim, scale))

    def run_static():
        pk(tq, kt), pv(tv, vp), static(tq, kt, vp, out)

    def run_seq():
        spk(tk, skt), spv(tv, svp), seq(tq, skt, svp, n, out)

    qt, kt_, vt = (torch.from_numpy(a).transpose(1, 2) for a in (q, k, v))
    fns = {
        "symbolic": run_seq,
        "static": run_static,
        "torch": lambda: torch.nn.functional.scaled_dot_product_attention(qt, kt_, vt),
    }
    if window:
        starts = list(range(0, n, window)) + [n]
        seqstart = tvm.runtime.tensor(np.array(starts, "int32"))
        seg = tvm.runtime.empty((n, 2), "int32")
        segments = build(kernels.attn_segments_kernel())
        vk, vkt, vv, vvp = packed(None, kernels.attn_seq_padding(cfg, n, segments=True))
        var_len = build(kernels.attention_seq_kernel(cfg, heads, dim, scale, segments=True))
        ids = torch.arange(n) // window
        mask = ids[:, None] == ids[None, :]

        def run_var_len():
            segments(seqstart, seqstart, n, seg)
            vk(tk, vkt), vv(tv, vvp), var_len(tq, vkt, vvp, seg, n, out)

        def torch_windows():
            sdpa = torch.nn.functional.scaled_dot_product_attention
            for a, b in zip(starts, starts[1:], strict=False):
                sdpa(qt[:, :, a:b], kt_[:, :, a:b], vt[:, :, a:b])

        fns[f"var_len w{window}"] = run_var_len
        fns[f"torch w{window} loop"] = torch_windows
        fns[f"torch w{window} mask"] = lambda: torch.nn.functional.scaled_dot_product_attention(
            qt, kt_, vt, attn_mask=mask
        )
    return fns


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--threads", type=int, default=available_cores())
    parser.add_argument("--tokens", default="256,1024,4096")
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--dims", default="64,80")
    parser.add_argument("--windows", type=int, default=None)
    args = parser.parse_args()
    set_threads(args.threads)
    import torch

    torch.set_num_threads(args.threads)
    print(f"threads {args.threads}, heads {args.heads}; ms (median), ratio to symbolic")
    for dim in (int(d) for d in args.dims.split(",")):
        for n in (int(t) for t in args.tokens.split(",")):
            fns = runners(n, args.heads, dim, args.windows)
            times = interleaved_times(fns, args.rounds, args.seconds)
            cells = [
                f"{name} {statistics.median(t) * 1e3:.3f}"
                + ("" if name == "symbolic" else f" ({paired_ratio(t, times['symbolic']):.3f})")
                for name, t in times.items()
            ]
            print(f"n {n:5d} hd {dim:3d} | " + " | ".join(cells), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
