"""LoRA: kohya/WebUI key names and shapes for the real SD1.5 and SDXL layers, hooks, file format."""
import json

import pytest
import torch
from diffusers import UNet2DConditionModel
from safetensors import safe_open

from vmix_lib.train import ldm_names
from vmix_lib.train.checkpoint_loading import shipped_unet_config
from vmix_lib.train.lora import LoRANetwork, kohya_name, select_layers

from test_train_helpers import file_tensors, tiny_unet


def _meta_unet(family):
    with torch.device("meta"):
        return UNet2DConditionModel.from_config(shipped_unet_config(family))


def _webui_modules(unet):
    """What the WebUI's Lora loaders look a key up in: original module path -> weight shape.

    AUTOMATIC1111 turns ``lora_unet_<x>`` into ``diffusion_model_<x>`` and looks it up among the
    model's module names with "." replaced by "_"; Forge maps ``lora_unet_<x>`` from every
    ``diffusion_model.<path>.weight`` key the same way.
    """
    ldm = ldm_names.unet_state_to_ldm(unet.state_dict(), unet.config)
    prefix = ldm_names.UNET_PREFIX
    return {k[len(prefix):-len(".weight")].replace(".", "_"): tuple(v.shape) for k, v in ldm.items() if k.endswith(".weight")}


@pytest.mark.parametrize(
    "family, targets, conv, count, examples",
    [
        ("sd15", "attention", False, 16 * 2 * 4, [
            "lora_unet_input_blocks_1_1_transformer_blocks_0_attn2_to_k",
            "lora_unet_middle_block_1_transformer_blocks_0_attn1_to_out_0",
            "lora_unet_output_blocks_11_1_transformer_blocks_0_attn2_to_v",
        ]),
        ("sdxl", "attention", False, 70 * 2 * 4, [
            "lora_unet_input_blocks_4_1_transformer_blocks_1_attn2_to_q",
            "lora_unet_input_blocks_8_1_transformer_blocks_9_attn1_to_k",
            "lora_unet_output_blocks_5_1_transformer_blocks_1_attn2_to_out_0",
        ]),
        ("sd15", "transformer", True, None, [
            "lora_unet_input_blocks_1_1_proj_in",
            "lora_unet_input_blocks_1_1_transformer_blocks_0_ff_net_0_proj",
            "lora_unet_input_blocks_1_0_in_layers_2",
            "lora_unet_input_blocks_4_0_skip_connection",
            "lora_unet_input_blocks_3_0_op",
            "lora_unet_output_blocks_2_1_conv",
            "lora_unet_output_blocks_5_2_conv",
            "lora_unet_middle_block_2_out_layers_3",
        ]),
        ("sdxl", "transformer", True, None, [
            "lora_unet_input_blocks_7_1_transformer_blocks_9_ff_net_2",
            "lora_unet_output_blocks_2_2_conv",
            "lora_unet_output_blocks_8_0_skip_connection",
        ]),
    ],
)
def test_lora_keys_are_webui_module_names_with_matching_shapes(family, targets, conv, count, examples):
    unet = _meta_unet(family)
    network = LoRANetwork(unet, rank=4, targets=targets, conv_rank=2 if conv else 0)
    modules = _webui_modules(unet)
    keys = list(network.layers.keys())
    conv_keys = {kohya_name(n, unet.config) for n, _ in select_layers(unet, targets, conv=True) if ".attentions." not in n}
    assert conv_keys <= set(keys) if conv else not conv_keys & set(keys)
    conv_keys = conv_keys if conv else set()
    if count is not None:
        assert len(keys) == count
    for example in examples:
        assert example in keys
    for key, layer in network.layers.items():
        assert key.startswith("lora_unet_")
        out_in = modules[key[len("lora_unet_"):]]  # KeyError = a name the WebUI would not find
        down, up = layer.down.weight, layer.up.weight
        assert up.shape[0] == out_in[0] and down.shape[1] == out_in[1]
        assert down.shape[2:] == torch.Size(out_in[2:]) if len(out_in) == 4 else down.dim() == 2
        assert up.shape[1] == down.shape[0] == (2 if key in conv_keys else 4)


def test_attention_targets_are_q_k_v_out_of_both_attentions():
    unet = _meta_unet("sd15")
    names = [n for n, _ in select_layers(unet, "attention")]
    assert len(names) == 128
    assert {n.rsplit(".attn", 1)[1][2:] for n in names} == {"to_q", "to_k", "to_v", "to_out.0"}


def test_lora_file_is_kohya_format_and_starts_at_the_base_model(tmp_path):
    unet = tiny_unet()
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([10, 600])
    context = torch.randn(2, 77, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        base = unet(x, t, encoder_hidden_states=context).sample
        network = LoRANetwork(unet, rank=2, alpha=1.0, conv_rank=1).install()
        assert torch.equal(unet(x, t, encoder_hidden_states=context).sample, base)  # zero-initialised up
        for layer in network.layers.values():
            torch.nn.init.normal_(layer.up.weight, std=0.5)
        changed = unet(x, t, encoder_hidden_states=context).sample
        assert not torch.allclose(changed, base)
        network.remove()
        assert torch.equal(unet(x, t, encoder_hidden_states=context).sample, base)

    path = network.save(str(tmp_path / "my-lora.safetensors"), "sdxl", "my-vmix", dtype=torch.float32)
    tensors = file_tensors(path)
    key = "lora_unet_input_blocks_1_1_transformer_blocks_0_attn2_to_k"
    assert tensors[f"{key}.lora_down.weight"].shape == (2, 8)
    assert tensors[f"{key}.lora_up.weight"].shape == (8, 2)
    assert tensors[f"{key}.alpha"].item() == 1.0 and tensors[f"{key}.alpha"].dim() == 0
    conv = "lora_unet_input_blocks_1_0_in_layers_2"
    assert tensors[f"{conv}.lora_down.weight"].shape == (1, 8, 3, 3)
    assert tensors[f"{conv}.lora_up.weight"].shape == (8, 1, 1, 1)
    assert set(tensors) == {f"{k}.{p}" for k in network.layers for p in ("lora_down.weight", "lora_up.weight", "alpha")}
    with safe_open(path, framework="pt") as f:
        meta = f.metadata()
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"  # the WebUI's Lora tab reads the SD version here
    assert meta["ss_output_name"] == "my-vmix" and meta["ss_network_dim"] == "2" and meta["ss_network_alpha"] == "1.0"
    assert json.loads(meta["ss_network_args"]) == {"conv_dim": "1", "conv_alpha": "1.0"}


def test_lora_delta_equals_the_merged_weight_the_webui_computes():
    """WebUI: W' = W + up @ down * alpha / rank; our hook must compute exactly that layer."""
    unet = tiny_unet()
    network = LoRANetwork(unet, rank=2, alpha=3.0)
    key = "lora_unet_input_blocks_1_1_transformer_blocks_0_attn2_to_k"
    layer = network.layers[key]
    torch.nn.init.normal_(layer.up.weight)
    module = dict(unet.named_modules())["down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"]
    x = torch.randn(3, 8)
    merged = module.weight + layer.up.weight @ layer.down.weight * (3.0 / 2)
    network.install()
    with torch.no_grad():
        assert torch.allclose(module(x), x @ merged.t(), atol=1e-6)
    network.remove()
