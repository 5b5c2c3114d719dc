"""A block plugin: registers the SiLU activation (x * sigmoid(x)), which the builder does not
ship, from a module outside the package. A preset selects it with `plugins: [silu_blocks]`
and `model.hidden_act: silu`; `tests/test_plugins.py` builds that preset and compares it with
HF transformers' CLIPVisionModel(hidden_act="silu")."""

from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor, op

from builder.registry import register


@register("silu", kind="activation")
class SiLU(nn.Module):
    """x * sigmoid(x) (swish), HF's "silu"."""

    def forward(self, x: Tensor) -> Tensor:
        return x * op.sigmoid(x)
