"""Attention within windows (`relax.nn.attention_var_len`, Qwen2.5-VL's windowed layers)
against torch run window by window, with the token count symbolic: one compiled function
for every image."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm import relax
from tvm.relax.frontend import nn

from builder.blocks.native import windowed_attention
from builder.targets.cpu import compile_cpu

from .conftest import HOST

pytestmark = pytest.mark.ir

HEADS, HEAD_DIM = 2, 8


class Windows(nn.Module):
    def forward(self, q: nn.Tensor, k: nn.Tensor, v: nn.Tensor, windows, max_window):
        return windowed_attention(q, k, v, {"windows": windows, "max_window": max_window})


@pytest.fixture(scope="module")
def vm():
    spec = {
        "forward": {
            "q": nn.spec.Tensor([1, "n", HEADS, HEAD_DIM], "float32"),
            "k": nn.spec.Tensor([1, "n", HEADS, HEAD_DIM], "float32"),
            "v": nn.spec.Tensor([1, "n", HEADS, HEAD_DIM], "float32"),
            "windows": nn.spec.Tensor(["w"], "int32"),
            "max_window": nn.spec.Tensor([], "int32"),
        }
    }
    mod, _ = Windows().export_tvm(spec=spec)
    return relax.VirtualMachine(compile_cpu(mod, HOST), tvm.cpu())


def per_window(q, k, v, starts) -> np.ndarray:
    import torch

    out = []
    for a, b in zip(starts[:-1], starts[1:], strict=True):
        qs, ks, vs = (torch.from_numpy(x[0, a:b]).transpose(0, 1) for x in (q, k, v))
        o = torch.nn.functional.scaled_dot_product_attention(qs, ks, vs)
        out.append(o.transpose(0, 1).numpy())
    return np.concatenate(out)[None]


@pytest.mark.parametrize(
    "lengths",
    [[37], [64, 64, 13], [1, 5, 64, 2], [3] * 11],
    ids=["one", "ragged-edge", "uneven", "many-small"],
)
def test_windows_attend_only_within_themselves(vm, lengths):
    rng = np.random.default_rng(len(lengths))
    n = sum(lengths)
    q, k, v = (rng.standard_normal((1, n, HEADS, HEAD_DIM)).astype(np.float32) for _ in "qkv")
    starts = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    args = [tvm.runtime.tensor(x) for x in (q, k, v, starts, np.int32(max(lengths)))]
    ours = vm["forward"](*args).numpy()
    ref = per_window(q, k, v, starts)
    assert np.abs(ours - ref).max() <= 1e-5 * np.abs(ref).max()
