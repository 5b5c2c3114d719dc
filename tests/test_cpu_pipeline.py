"""The scheduled CPU pipeline against TVM's stock llvm pipeline on shapes that stress its
kernels: widths that are not multiples of the vector panel, head dims that are not powers of
two, token counts that are not multiples of the row tile, several batch sizes."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm import relax

from builder.assemble import export
from builder.build import pack_params
from builder.config import BlocksConfig, CLIPVisionConfig, TargetConfig
from builder.targets import llvm
from builder.weights.random_init import random_weights

from .conftest import assert_close, pixels

pytestmark = pytest.mark.parity

CASES = {
    "quick_gelu": dict(hidden_size=64, intermediate_size=128, num_attention_heads=4),
    "gelu-mlp100": dict(
        hidden_size=64, intermediate_size=100, num_attention_heads=4, hidden_act="gelu"
    ),
    "gelu_tanh-head72": dict(
        hidden_size=144, intermediate_size=200, num_attention_heads=2, hidden_act="gelu_tanh"
    ),
    "hidden40-final-postln": dict(
        hidden_size=40,
        intermediate_size=96,
        num_attention_heads=5,
        feature_layer=-1,
        post_layernorm=True,
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_scheduled_equals_stock_pipeline(case):
    config = CLIPVisionConfig(
        num_hidden_layers=2, image_size=30, patch_size=6, **{"feature_layer": -1, **CASES[case]}
    )
    mod, params = export(config, BlocksConfig())
    arrays = random_weights(dict(params), seed=5)
    # Unit scales and zero biases would hide a swapped norm weight and bias: perturb them.
    rng = np.random.default_rng(0)
    arrays = {
        k: v + rng.standard_normal(v.shape).astype(np.float32) * 0.1 for k, v in arrays.items()
    }
    order = [name for name, _ in params]
    target, _ = llvm.tvm_target(TargetConfig())
    scheduled = llvm.compile(mod, target)
    packed_order, packed = pack_params(scheduled, order, arrays)
    assert packed is not arrays  # the pipeline packs weights at build time
    fast = relax.VirtualMachine(scheduled, tvm.cpu())["forward"]
    stock = relax.VirtualMachine(tvm.compile(mod, target), tvm.cpu())["forward"]
    fast_params = [tvm.runtime.tensor(packed[n]) for n in packed_order]
    stock_params = [tvm.runtime.tensor(arrays[n]) for n in order]
    for batch in (1, 3, 7):
        x = tvm.runtime.tensor(pixels(batch, 30, seed=batch))
        assert_close(fast(x, *fast_params).numpy(), stock(x, *stock_params).numpy(), rel=1e-5)
