"""Layer inventory on real-size layouts (meta device): names, shapes and heads exactly as the real
A1111 UNets have them, the diffusers -> WebUI name mapping, and family detection."""
import pytest
import torch

from vmix_lib.layers import (
    LAYOUTS,
    SD15_LAYOUT,
    SDXL_LAYOUT,
    detect_family,
    diffusers_to_webui,
    find_cross_attention_layers,
)
from vmix_lib.train.checkpoint_loading import shipped_unet_config

# diffusers UNet2DConditionModel configurations of the real checkpoints.
SD15 = shipped_unet_config("sd15")
SD2 = dict(SD15, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True)
SDXL = shipped_unet_config("sdxl")
SDXL_REFINER = dict(
    SDXL,
    block_out_channels=(384, 768, 1536, 1536),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=4,
    attention_head_dim=(6, 12, 24, 24),
    cross_attention_dim=1280,
    projection_class_embeddings_input_dim=2560,
)
# SSD-1B: SDXL with transformer depth pruned (4 blocks instead of 10 at the lowest level).
SSD_1B = dict(SDXL, transformer_layers_per_block=(1, 2, 4))


def meta_unet(config):
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel(**config)


@pytest.mark.parametrize("family,config", [("sd15", SD15), ("sdxl", SDXL)])
def test_inventory_matches_the_real_webui_layers(attn2_layouts, family, config):
    layers = find_cross_attention_layers(meta_unet(config))
    expected = attn2_layouts[family]["layers"]
    assert len(layers) == attn2_layouts[family]["count"] == len(expected)
    assert [info.name for info in layers] == [e["name"] for e in expected]
    assert [[info.inner_dim, info.context_dim] for info in layers] == [e["to_v_shape"] for e in expected]
    assert [info.heads for info in layers] == [e["heads"] for e in expected]
    assert [info.dim_head for info in layers] == [e["dim_head"] for e in expected]
    assert all(info.module is not None and info.module.to_v.in_features == info.context_dim for info in layers)
    # the static layouts adapters are checked against are the same
    assert [(i.name, i.inner_dim, i.context_dim, i.heads) for i in LAYOUTS[family]] == [
        (e["name"], *e["to_v_shape"], e["heads"]) for e in expected
    ]
    report = detect_family(layers)
    assert report.family == family and report.supported


def test_webui_named_tree_is_found_under_its_own_names(attn2_layouts, webui):
    """A WebUI-style tree (names as in A1111/Forge) yields the same inventory, in UNet order."""
    rows = [(l["name"], l["to_v_shape"][1], l["to_v_shape"][0], l["heads"]) for l in attn2_layouts["sd15"]["layers"]]
    with torch.device("meta"):
        tree = webui.Tree(list(reversed(rows)))  # built out of order on purpose
    layers = find_cross_attention_layers(tree)
    assert [(i.name, i.context_dim, i.inner_dim, i.heads) for i in layers] == rows
    assert detect_family(layers).family == "sd15"


def test_diffusers_names_map_to_webui_names():
    assert diffusers_to_webui("down_blocks.0.attentions.0.transformer_blocks.0.attn2") == "input_blocks.1.1.transformer_blocks.0.attn2"
    assert diffusers_to_webui("down_blocks.2.attentions.1.transformer_blocks.9.attn2") == "input_blocks.8.1.transformer_blocks.9.attn2"
    assert diffusers_to_webui("mid_block.attentions.0.transformer_blocks.3.attn2") == "middle_block.1.transformer_blocks.3.attn2"
    assert diffusers_to_webui("up_blocks.1.attentions.0.transformer_blocks.0.attn2") == "output_blocks.3.1.transformer_blocks.0.attn2"
    assert diffusers_to_webui("up_blocks.3.attentions.2.transformer_blocks.0.attn2") == "output_blocks.11.1.transformer_blocks.0.attn2"
    assert diffusers_to_webui("up_blocks.1.attentions.0.transformer_blocks.0.attn1") is None
    assert diffusers_to_webui("transformer_blocks.0.attn2") is None  # SD3.5 / DiT blocks are not UNet layers


@pytest.mark.parametrize(
    "config,words",
    [
        (SD2, ["SD2", "16 cross-attention layers", "1024"]),
        (SDXL_REFINER, ["SDXL refiner", "44 cross-attention layers", "1280"]),
        (SSD_1B, ["pruned", "SSD-1B", "34 cross-attention layers", "2048"]),
    ],
    ids=["sd2", "sdxl-refiner", "ssd-1b"],
)
def test_other_unets_are_named_clearly(config, words):
    report = detect_family(find_cross_attention_layers(meta_unet(config)))
    assert report.family is None and not report.supported
    for word in words:
        assert word in report.description


def test_model_without_cross_attention():
    from diffusers import UNet2DModel

    with torch.device("meta"):
        unet = UNet2DModel(sample_size=8, block_out_channels=(32, 64), norm_num_groups=8,
                           down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"))
    layers = find_cross_attention_layers(unet)
    report = detect_family(layers)
    assert layers == [] and report.family is None
    assert "without UNet cross-attention layers" in report.description


def test_sd3_style_transformer_is_not_mistaken_for_a_unet():
    """SD3.5's joint blocks have modules named attn2 with to_v, outside any UNet block."""
    from diffusers import SD3Transformer2DModel

    with torch.device("meta"):
        model = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                                      num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
                                      pooled_projection_dim=8, out_channels=4, dual_attention_layers=(0, 1))
    assert any(name.endswith("attn2") for name, _ in model.named_modules())
    assert find_cross_attention_layers(model) == []
    assert "without UNet cross-attention" in detect_family([]).description


def test_static_layouts_have_the_documented_sizes():
    assert len(SD15_LAYOUT) == 16 and {i.context_dim for i in SD15_LAYOUT} == {768}
    assert len(SDXL_LAYOUT) == 70 and {i.context_dim for i in SDXL_LAYOUT} == {2048}
    assert len({i.name for i in SDXL_LAYOUT}) == 70
