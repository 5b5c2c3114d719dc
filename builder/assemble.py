"""Config + registry -> `nn.Module`, and its export to a Relax IRModule."""

from __future__ import annotations

from .tvm_import import import_tvm

tvm = import_tvm()  # torch hidden from TVM-FFI's start-up, whoever imports this first

from tvm.relax.frontend import nn  # noqa: E402

from . import blocks as _blocks  # noqa: E402, F401  (registers the built-in blocks)
from . import families  # noqa: E402
from .config import BlocksConfig, TowerConfig  # noqa: E402
from .registry import create, prefix_tokens  # noqa: E402
from .vlm import projected_tokens  # noqa: E402

INPUT_NAME = "pixel_values"
ENTRY = "forward"


def assemble(config: TowerConfig, blocks: BlocksConfig) -> nn.Module:
    """The tower the preset describes, built from the block types it names."""
    return create(blocks.model, "model", config, blocks)


def parameter_shapes(config: TowerConfig, blocks: BlocksConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every parameter of the module (no memory is allocated)."""
    return {
        name: tuple(int(d) for d in p.shape)
        for name, p in assemble(config, blocks).named_parameters()
    }


def input_shape(config: TowerConfig) -> list[int | str]:
    return ["batch", config.num_channels, config.image_size, config.image_size]


def inputs(config: TowerConfig, blocks: BlocksConfig) -> list[dict]:
    """What `forward` takes before the parameters, for the manifest: a batch of images; or
    a native tower's one image as patches, and what the host computes from its grid."""
    if config.native:
        specs = families.input_specs(config, blocks)
        return [{"name": n, "shape": shape, "dtype": dtype} for n, shape, dtype in specs]
    return [{"name": INPUT_NAME, "shape": input_shape(config), "dtype": "float32"}]


def output_tokens(config: TowerConfig, blocks: BlocksConfig) -> int:
    """Tokens per crop in the features: the patches, plus the tokens before them (class
    token, registers) unless the "default" strategy drops them; as many or fewer after a
    projector that merges them (`builder/vlm.py`)."""
    kept = 0 if config.feature_select_strategy == "default" else prefix_tokens(config, blocks)
    return projected_tokens(config, blocks.projector, config.num_patches + kept)


def output_shape(config: TowerConfig, blocks: BlocksConfig) -> list[int | str]:
    if config.native:
        width = config.projector_hidden_size if blocks.projector else config.output_dim
        return ["tokens", width]
    if config.pools:
        return ["batch", config.output_dim]
    width = config.projector_hidden_size if blocks.projector else config.output_dim
    return ["batch", output_tokens(config, blocks), width]


def outputs(config: TowerConfig, blocks: BlocksConfig) -> list[dict]:
    """What `forward` returns, for the manifest: the features (or pooled vector), and
    LLaVA-NeXT's newline vector after them where the tower has one."""
    out: list[dict] = [
        {"name": config.output, "shape": output_shape(config, blocks), "dtype": "float32"}
    ]
    if config.image_newline:
        width = output_shape(config, blocks)[-1]
        out.append({"name": "image_newline", "shape": [width], "dtype": "float32"})
    return out


def export(
    config: TowerConfig, blocks: BlocksConfig, dtype: str = "float32"
) -> tuple[tvm.IRModule, list[tuple[str, tuple[int, ...]]]]:
    """Relax IRModule with `forward(pixel_values, *params)` (batch is symbolic) and the
    parameters' names and shapes in argument order. The parameters and the computation are
    in `dtype`; pixel values and features stay float32 (the graph casts them)."""
    module = assemble(config, blocks)
    module.to(dtype)
    spec = {
        ENTRY: {i["name"]: nn.spec.Tensor(i["shape"], i["dtype"]) for i in inputs(config, blocks)}
    }
    mod, params = module.export_tvm(spec=spec)
    return mod, [(name, tuple(int(d) for d in p.shape)) for name, p in params]
