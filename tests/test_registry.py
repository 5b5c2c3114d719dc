"""The block registry, and every registered block exported on its own (ir tier)."""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path

import pytest
from tvm.relax.frontend import nn

from builder import registry
from builder.assemble import export, output_shape, parameter_shapes
from builder.config import BlocksConfig, CLIPVisionConfig
from builder.errors import BuilderError
from builder.families import input_specs, pixtral, qwen2_5_vl, siglip2
from builder.families.pixtral import PixtralVisionConfig
from builder.families.qwen2_5_vl import Qwen2_5_VLVisionConfig
from builder.families.siglip2 import Siglip2VisionConfig

from .conftest import TINY

CONFIG = CLIPVisionConfig(**TINY)


@pytest.mark.unit
def test_duplicate_name_names_both_places():
    with pytest.raises(BuilderError) as e:

        @registry.register("clip_mlp", kind="mlp")
        class Other(nn.Module):
            pass

    msg = str(e.value)
    assert "block type 'clip_mlp' is registered twice" in msg
    assert "builder.blocks.clip:" in msg and "tests.test_registry:" in msg
    assert registry.get("clip_mlp", "mlp").where.startswith("builder.blocks.clip:")


@pytest.mark.unit
def test_unknown_name_lists_close_matches_and_all():
    with pytest.raises(BuilderError) as e:
        registry.get("clip_mpl", "mlp")
    assert str(e.value) == (
        "unknown mlp block 'clip_mpl', did you mean 'clip_mlp'?; "
        "registered: ['clip_mlp', 'swiglu_mlp']"
    )


@pytest.mark.unit
def test_wrong_slot_is_an_error():
    with pytest.raises(BuilderError, match="'clip_mlp' is a mlp block, not a attention block"):
        registry.get("clip_mlp", "attention")


@pytest.mark.unit
def test_every_slot_has_a_default_block():
    for f in dataclasses.fields(BlocksConfig):
        if f.default is None:  # an optional slot (the projector): empty unless a preset sets it
            assert registry.names(f.name), f.name
        else:
            assert registry.get(f.default, f.name).kind == f.name


# A projector that merges tokens takes the patch grid alone, of a side its 2 x 2 merge or
# pooling to 4 tokens divides.
GRID_CONFIG = dataclasses.replace(CONFIG, image_size=32, mm_tokens_per_image=4)


def _merges(block: registry.BlockType) -> bool:
    return block.kind == "projector" and block.attr("token_merge") is not None


def _instantiate(block: registry.BlockType) -> nn.Module:
    if block.kind == "activation":
        return block.factory()
    if block.kind == "norm":
        return block.factory(CONFIG.hidden_size, CONFIG.layer_norm_eps)
    return block.factory(GRID_CONFIG if _merges(block) else CONFIG, BlocksConfig())


def _input_spec(block: registry.BlockType) -> nn.spec.Tensor:
    if block.kind in ("embeddings", "model", "transformer"):
        return nn.spec.Tensor(["batch", 3, CONFIG.image_size, CONFIG.image_size], "float32")
    width = {"activation": CONFIG.intermediate_size, "projector": CONFIG.output_dim}.get(
        block.kind, CONFIG.hidden_size
    )
    if _merges(block):
        return nn.spec.Tensor(["batch", GRID_CONFIG.num_patches, width], "float32")
    return nn.spec.Tensor(["batch", CONFIG.num_patches + 1, width], "float32")


# A native tower's blocks take an image's context beside their tensors: each is exported in
# a tiny Pixtral tower (with Mistral 3's projector) that holds it in its slot.
def _native(block: registry.BlockType) -> bool:
    return block.module in ("builder.blocks.native", "builder.blocks.qwen2_5_vl")


def _native_tower(block: registry.BlockType) -> tuple | None:
    """(config, blocks) of the tiny native tower a native block is exported in, or None."""
    if block.name in siglip2.blocks(Siglip2VisionConfig()).values():
        # SigLIP2's embeddings take the resize of its position table: in its own tower.
        config = Siglip2VisionConfig(**{k: v for k, v in TINY.items() if k != "image_size"})
        return config, BlocksConfig(**siglip2.blocks(config))
    if block.module == "builder.blocks.qwen2_5_vl":
        # Qwen2.5-VL's take the frames of its patch embedding and its merger's width: in its
        # own tower, with a windowed and a full-attention layer.
        config = Qwen2_5_VLVisionConfig(
            hidden_size=32,
            num_heads=4,
            depth=2,
            intermediate_size=64,
            out_hidden_size=24,
            patch_size=8,
            window_size=32,
            fullatt_block_indexes=[1],
        )
        return config, BlocksConfig(**qwen2_5_vl.blocks(config))
    if _native(block):
        config = PixtralVisionConfig(**TINY, projector_hidden_size=48)
        pixtral_blocks = {**pixtral.blocks(config), "projector": "mistral3_projector"}
        return config, BlocksConfig(**{**pixtral_blocks, block.kind: block.name})
    return None


@pytest.mark.ir
@pytest.mark.parametrize("block", registry.all_blocks(), ids=lambda b: b.name)
def test_each_block_exports(block):
    """Every registered block builds and exports to Relax with a symbolic batch (a native
    tower's, in a tower with a symbolic number of patches)."""
    tower = _native_tower(block)
    if tower is not None:
        config, blocks = tower
        mod, params = export(config, blocks)
        inputs = [name for name, _, _ in input_specs(config, blocks)]
        assert [p.name for p in mod["forward"].params[: len(inputs)]] == inputs
        assert len(mod["forward"].params) == len(inputs) + len(params)
        return
    module = _instantiate(block)
    arg = next(iter(inspect.signature(module.forward).parameters))
    mod, params = module.export_tvm(spec={"forward": {arg: _input_spec(block)}})
    assert "forward" in [gv.name_hint for gv in mod.get_global_vars()]
    for name, p in params:
        assert all(int(d) > 0 for d in p.shape), name


@pytest.mark.ir
def test_exported_names_and_shapes_are_hf_keys():
    mod, params = export(CONFIG, BlocksConfig())
    names = dict(params)
    d, mlp, c, p = CONFIG.hidden_size, CONFIG.intermediate_size, 3, CONFIG.patch_size
    assert names["vision_model.embeddings.patch_embedding.weight"] == (d, c, p, p)
    assert names["vision_model.embeddings.class_embedding"] == (d,)
    assert names["vision_model.embeddings.position_embedding.weight"] == (10, d)
    assert names["vision_model.pre_layrnorm.weight"] == (d,)
    assert names["vision_model.encoder.layers.0.mlp.fc1.weight"] == (mlp, d)
    assert names["vision_model.encoder.layers.0.self_attn.out_proj.bias"] == (d,)
    # feature_layer -2 of 3 layers: layer index 2 and post_layernorm are not built.
    assert not [n for n in names if ".layers.2." in n or "post_layernorm" in n]
    assert len(names) == 5 + 16 * CONFIG.num_layers_computed
    assert not [n for n in names if ".head." in n]  # features, not pooled: no head
    fn = mod["forward"]
    assert fn.params[0].name == "pixel_values"
    assert len(fn.params) == 1 + len(params)


@pytest.mark.ir
def test_siglip_names_and_shapes_are_hf_keys():
    """SigLIP from registered blocks: conv bias, no CLS, no pre-LayerNorm, HF's head names."""
    config = dataclasses.replace(
        CONFIG, pre_layernorm=False, post_layernorm=True, feature_layer=-1, output="pooled"
    )
    blocks = BlocksConfig(embeddings="siglip_embeddings", head="siglip_attention_pooling")
    names = parameter_shapes(config, blocks)
    d, mlp = CONFIG.hidden_size, CONFIG.intermediate_size
    assert names["vision_model.embeddings.patch_embedding.bias"] == (d,)
    assert names["vision_model.embeddings.position_embedding.weight"] == (9, d)  # 3 x 3
    assert not [n for n in names if "class_embedding" in n or "pre_layrnorm" in n]
    assert names["vision_model.post_layernorm.weight"] == (d,)
    assert names["vision_model.head.probe"] == (1, 1, d)
    assert names["vision_model.head.attention.in_proj_weight"] == (3 * d, d)
    assert names["vision_model.head.attention.in_proj_bias"] == (3 * d,)
    assert names["vision_model.head.attention.out_proj.weight"] == (d, d)
    assert names["vision_model.head.mlp.fc1.weight"] == (mlp, d)
    assert names["vision_model.head.layernorm.bias"] == (d,)
    assert output_shape(config, blocks) == ["batch", d]
    features = dataclasses.replace(config, output="features")
    assert output_shape(features, blocks) == ["batch", 9, d]
    assert output_shape(CONFIG, BlocksConfig()) == ["batch", 10, d]


@pytest.mark.unit
@pytest.mark.parametrize(
    "block", [b for b in registry.names("embeddings") if not _native(registry.get(b, "embeddings"))]
)
def test_class_tokens_match_the_embeddings_output(block):
    """`class_tokens` (read by the feature selection) is what the block really prepends."""
    from tvm.relax.frontend import nn

    module = registry.create(block, "embeddings", CONFIG, BlocksConfig())
    shape = [1, CONFIG.num_channels, CONFIG.image_size, CONFIG.image_size]
    spec = {"forward": {"pixel_values": nn.spec.Tensor(shape, "float32")}}
    mod, _ = module.export_tvm(spec=spec)
    _, tokens, _ = (int(d) for d in mod["forward"].ret_ty.shape.values)
    assert tokens == CONFIG.num_patches + registry.class_tokens(block)


@pytest.mark.ir
def test_full_tower_names_cover_every_layer():
    full = parameter_shapes(CONFIG.full(), BlocksConfig())
    assert "vision_model.post_layernorm.weight" in full
    assert any(".layers.2." in n for n in full)


@pytest.mark.ir
def test_projector_names_are_llava_keys():
    """With blocks.projector, the top module holds HF's `multi_modal_projector`; its input is
    hidden_size times the number of selected layers."""
    config = dataclasses.replace(CONFIG, feature_layer=[-2, -3], projector_hidden_size=48)
    _, params = export(config, BlocksConfig(projector="mlp2x_gelu"))
    names = dict(params)
    assert names["multi_modal_projector.linear_1.weight"] == (48, 2 * CONFIG.hidden_size)
    assert names["multi_modal_projector.linear_1.bias"] == (48,)
    assert names["multi_modal_projector.linear_2.weight"] == (48, 48)
    assert names["multi_modal_projector.linear_2.bias"] == (48,)
    assert len(names) == 4 + 5 + 16 * 2


@pytest.mark.unit
def test_source_index_equals_the_live_registry():
    """The built-in blocks as indexed from their source (what preset checks see without
    TVM) are the blocks their decorators register: names, slots, places, docs, constants."""
    import builder.blocks as package

    indexed = {}
    for path in sorted(Path(package.__file__).parent.glob("*.py")):
        for block in registry.index_source(path, f"builder.blocks.{path.stem}"):
            indexed[block.name] = block
    live = {b.name: b for b in registry.all_blocks() if b.module.startswith("builder.blocks.")}
    assert sorted(indexed) == sorted(live)
    for name, block in indexed.items():
        real = live[name]
        assert (block.kind, block.where, block.summary) == (real.kind, real.where, real.summary)
        for attr, value in block.attrs.items():
            assert real.attr(attr) == value, (name, attr)
        assert block.attr("class_tokens", 0) == getattr(real.factory, "class_tokens", 0)
        assert block.attr("requires_class_token", False) == getattr(
            real.factory, "requires_class_token", False
        )
