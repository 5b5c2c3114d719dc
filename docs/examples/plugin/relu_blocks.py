"""A block plugin: registers the ReLU activation, which the builder does not ship, from a
module outside the package. A preset selects it with `plugins: [relu_blocks]` and
`model.hidden_act: relu`; `tests/test_plugins.py` builds that preset and compares it with
HF transformers' CLIPVisionModel(hidden_act="relu")."""

from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor, op

from builder.registry import register


@register("relu", kind="activation")
class ReLU(nn.Module):
    """max(x, 0), HF's "relu"."""

    def forward(self, x: Tensor) -> Tensor:
        return op.relu(x)
