"""Checkpoint loading: the original (WebUI) key layout, the shipped configs, tokenizers, text conditioning."""
import gzip
import os

import pytest
import torch
from safetensors.torch import save_file

from vmix_lib.layers import detect_family, find_cross_attention_layers
from vmix_lib.train import ldm_names
from vmix_lib.train.checkpoint_loading import (
    TensorDict,
    clean_config,
    build_components,
    inspect_checkpoint,
    load_base_model,
    model_configs,
)
from vmix_lib.train.errors import TrainError
from vmix_lib.train.text import TextConditioner, load_tokenizers, write_vocab_from_bpe
from vmix_lib.train.tiny_models import build_tiny_models, write_tiny_model, write_tokenizer

# Parameter counts of the real models (the published SD1.5 / SDXL component sizes).
REAL_PARAMS = {
    "sd15": {"unet": 859_520_964, "vae": 83_653_863, "text": [123_060_480]},
    "sdxl": {"unet": 2_567_463_684, "vae": 83_653_863, "text": [123_060_480, 694_659_840]},
}


def _meta_models(family):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfgs = model_configs(family)
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(clean_config(cfgs["unet"]))
        vae = AutoencoderKL.from_config(clean_config(cfgs["vae"]))
        encoders = [CLIPTextModel(CLIPTextConfig(**clean_config(cfgs["text_encoder"])))]
        if family == "sdxl":
            encoders.append(CLIPTextModelWithProjection(CLIPTextConfig(**clean_config(cfgs["text_encoder_2"]))))
    return cfgs, unet, vae, encoders


def _count(module):
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_shipped_configs_build_the_real_models_from_the_real_key_layout(family):
    cfgs, unet, vae, encoders = _meta_models(family)
    assert _count(unet) == REAL_PARAMS[family]["unet"]
    assert _count(vae) == REAL_PARAMS[family]["vae"]
    assert [_count(e) for e in encoders] == REAL_PARAMS[family]["text"]
    assert detect_family(find_cross_attention_layers(unet)).family == family
    # A whole single-file checkpoint in the original layout (meta tensors: names and shapes only) ...
    state = ldm_names.single_file_state_dict(family, unet, vae, encoders)
    assert sum(t.numel() for t in state.values()) == REAL_PARAMS[family]["unet"] + REAL_PARAMS[family]["vae"] + sum(REAL_PARAMS[family]["text"])
    if family == "sd15":
        assert "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight" in state
        assert "cond_stage_model.transformer.text_model.final_layer_norm.weight" in state
    else:
        assert "conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight" in state
        assert tuple(state["conditioner.embedders.1.model.text_projection"].shape) == (1280, 1280)
        assert "model.diffusion_model.label_emb.0.0.weight" in state
    assert "first_stage_model.decoder.mid.attn_1.proj_out.weight" in state
    # ... goes through diffusers' converters into the shipped configs with every shape checked.
    unet2, vae2, encoders2 = build_components(family, cfgs, TensorDict(state), "real-layout", torch.float16)
    assert {k: tuple(v.shape) for k, v in unet2.state_dict().items()} == {k: tuple(v.shape) for k, v in unet.state_dict().items()}
    assert len(encoders2) == len(encoders)


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_unet_names_agree_with_diffusers_converter_key_for_key(family):
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    _, unet, _, _ = _meta_models(family)
    state = unet.state_dict()
    ldm = ldm_names.unet_state_to_ldm(state, unet.config)
    back = convert_ldm_unet_checkpoint(ldm, dict(unet.config))
    assert set(back) == set(state)
    assert all(back[k] is state[k] for k in state)  # the very same tensor: no key swapped with another


def test_module_names_match_the_webui_layout():
    _, unet, _, _ = _meta_models("sd15")
    cfg = unet.config
    assert ldm_names.unet_to_ldm("down_blocks.0.attentions.1.transformer_blocks.0.attn2.to_k", cfg) == "input_blocks.2.1.transformer_blocks.0.attn2.to_k"
    assert ldm_names.unet_to_ldm("down_blocks.1.resnets.0.conv_shortcut", cfg) == "input_blocks.4.0.skip_connection"
    assert ldm_names.unet_to_ldm("down_blocks.2.downsamplers.0.conv", cfg) == "input_blocks.9.0.op"
    assert ldm_names.unet_to_ldm("mid_block.resnets.1.conv2.weight", cfg) == "middle_block.2.out_layers.3.weight"
    assert ldm_names.unet_to_ldm("up_blocks.0.upsamplers.0.conv", cfg) == "output_blocks.2.1.conv"
    assert ldm_names.unet_to_ldm("up_blocks.1.upsamplers.0.conv", cfg) == "output_blocks.5.2.conv"
    assert ldm_names.unet_to_ldm("up_blocks.3.attentions.2.proj_out", cfg) == "output_blocks.11.1.proj_out"
    assert ldm_names.unet_to_ldm("time_embedding.linear_2.bias", cfg) == "time_embed.2.bias"
    assert ldm_names.unet_to_ldm("conv_out.weight", cfg) == "out.2.weight"


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_tiny_single_file_checkpoint_loads_back_exactly(tmp_path, family):
    checkpoint, config_dir, tokenizer_dir = write_tiny_model(str(tmp_path), family)
    base = load_base_model(checkpoint, config_dir=config_dir, tokenizer_dir=tokenizer_dir)
    unet, vae, encoders, _ = build_tiny_models(family)
    assert base.family == family and base.prediction == "epsilon" and base.custom_configs
    for ours, loaded in [(unet, base.unet), (vae, base.vae), *zip(encoders, base.text_encoders)]:
        a, b = ours.state_dict(), loaded.state_dict()
        assert set(a) == set(b)
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert len(base.tokenizers) == (2 if family == "sdxl" else 1)
    assert base.scaling_factor == 0.5
    assert torch.allclose(base.alphas_cumprod[[0, 999]], torch.tensor([0.99915, 0.0046600]), atol=1e-5)


def test_v_prediction_marker_and_family_checks(tmp_path):
    checkpoint, _, _ = write_tiny_model(str(tmp_path / "v"), "sd15", v_prediction=True)
    assert inspect_checkpoint(checkpoint).prediction == "v_prediction"
    with pytest.raises(TrainError, match=r"is an SD1.5 checkpoint, but the config says family = 'sdxl'"):
        inspect_checkpoint(checkpoint, "sdxl")


@pytest.mark.parametrize(
    "keys, message",
    [
        ({"lora_unet_x.lora_down.weight": 1}, r"holds no model.diffusion_model weights, so it is not a full SD1.5/SDXL checkpoint"),
        ({"model.diffusion_model.x": 1, "cond_stage_model.model.token_embedding.weight": 1}, r"is an SD2.x checkpoint"),
        ({"model.diffusion_model.x": 1, "conditioner.embedders.0.model.token_embedding.weight": 1}, r"is an SDXL refiner checkpoint"),
        ({"model.diffusion_model.x": 1}, r"has no text encoder weights the trainer recognises"),
    ],
)
def test_checkpoints_that_are_not_trainable_get_one_sentence(tmp_path, keys, message):
    path = str(tmp_path / "model.safetensors")
    save_file({k: torch.zeros(v) for k, v in keys.items()}, path)
    with pytest.raises(TrainError, match=message):
        inspect_checkpoint(path)


def test_pickle_and_missing_checkpoints(tmp_path):
    with pytest.raises(TrainError, match=r"is a pickle file.*\.safetensors checkpoints only"):
        inspect_checkpoint(str(tmp_path / "model.ckpt"))
    with pytest.raises(TrainError, match=r"model.safetensors does not exist$"):
        inspect_checkpoint(str(tmp_path / "model.safetensors"))
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(TrainError, match=r"bad.safetensors cannot be read as safetensors"):
        inspect_checkpoint(str(bad))


def test_incomplete_checkpoint_is_named(tmp_path):
    checkpoint, config_dir, tokenizer_dir = write_tiny_model(str(tmp_path), "sd15")
    from safetensors.torch import load_file

    state = load_file(checkpoint)
    del state["model.diffusion_model.out.2.weight"]
    save_file(state, checkpoint)
    with pytest.raises(TrainError, match=r"tiny-sd15.safetensors lacks 1 UNet weight\(s\) \(first: conv_out.weight\)"):
        load_base_model(checkpoint, config_dir=config_dir, tokenizer_dir=tokenizer_dir)


def test_vocab_from_clip_bpe_file_matches_clip_ids(tmp_path):
    from transformers import CLIPTokenizer

    bpe = tmp_path / "bpe.txt.gz"
    with gzip.open(bpe, "wt", encoding="utf-8") as f:
        f.write('"bpe_simple_vocab_16e6.txt#version: 0.2\ni n\nt h\nth e</w>\nc a\nca t</w>\n')
    folder = write_vocab_from_bpe(str(bpe), str(tmp_path / "tok"))
    tok = CLIPTokenizer.from_pretrained(folder, local_files_only=True)
    # 512 byte symbols, 5 merges, then <|startoftext|> / <|endoftext|> as in OpenAI's SimpleTokenizer.
    assert len(tok) == 519 and tok.bos_token_id == 517 and tok.eos_token_id == 518
    # "a</w>" is 320 in CLIP's vocabulary as well; merges follow the byte symbols in file order.
    assert tok("the cat a").input_ids == [517, 514, 516, 320, 518]


def test_tokenizer_dir_layouts_and_sdxl_padding(tmp_path):
    flat = write_tokenizer(str(tmp_path / "flat"))
    first, second = load_tokenizers("sdxl", flat)
    ids1 = first("cat", padding="max_length", max_length=6).input_ids
    ids2 = second("cat", padding="max_length", max_length=6).input_ids
    eos = first.eos_token_id
    assert ids1[-1] == eos and ids2[-3:] == [0, 0, 0]  # OpenCLIP pads with "!" (id 0)
    nested = tmp_path / "nested"
    write_tokenizer(str(nested / "tokenizer"))
    write_tokenizer(str(nested / "tokenizer_2"))
    assert len(load_tokenizers("sdxl", str(nested))) == 2
    with pytest.raises(TrainError, match=r"has no vocab.json and merges.txt"):
        load_tokenizers("sd15", str(tmp_path))
    with pytest.raises(TrainError, match=r"does not exist; point --tokenizer-dir"):
        load_tokenizers("sd15", str(tmp_path / "nope"))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "vocab.json").write_text("{}")
    (broken / "merges.txt").write_text("#version: 0.2\n")
    with pytest.raises(TrainError, match=r"broken do not hold a CLIP vocabulary"):
        load_tokenizers("sd15", str(broken))


def test_no_vocabulary_anywhere_is_one_sentence(monkeypatch):
    from vmix_lib.train import text

    monkeypatch.setattr(text, "_HF_CLIP_L", "vmix-test/not-cached-anywhere")  # nothing in the local cache
    monkeypatch.setattr(text, "find_bpe_file", lambda: None)
    with pytest.raises(TrainError, match=r"no CLIP tokenizer vocabulary was found offline; pass --tokenizer-dir"):
        load_tokenizers("sd15")


def test_pooled_label_vectors_are_the_clip_cls_tokens(tmp_path):
    tok_dir = write_tokenizer(str(tmp_path / "tok"))
    _, _, encoders, _ = build_tiny_models("sdxl")
    tokenizers = load_tokenizers("sdxl", tok_dir)
    cond = TextConditioner("sdxl", tokenizers, encoders)
    texts = ["vibrant color", "sks"]
    pooled = cond.pooled(texts)
    assert pooled.shape == (2, 64)
    ids1 = tokenizers[0](texts, padding="max_length", max_length=77, return_tensors="pt").input_ids
    assert torch.equal(pooled[:, :32], encoders[0](ids1).pooler_output)  # CLIP-L pooler_output
    ids2 = tokenizers[1](texts, padding="max_length", max_length=77, return_tensors="pt").input_ids
    out2 = encoders[1](ids2)
    # OpenCLIP-G: the same EOS state *before* the projection; the UNet's text_embeds are after it.
    assert torch.allclose(encoders[1].text_projection(pooled[:, 32:]), out2.text_embeds, atol=1e-6)
    context, text_embeds = cond.encode(texts)
    assert context.shape == (2, 77, 64) and torch.equal(text_embeds, out2.text_embeds)
    hidden = encoders[1](ids2, output_hidden_states=True).hidden_states[-2]
    assert torch.equal(context[..., 32:], hidden)  # penultimate layer, no final LayerNorm


def test_sd15_conditioning_is_the_last_hidden_state(tmp_path):
    tok_dir = write_tokenizer(str(tmp_path / "tok"))
    _, _, encoders, _ = build_tiny_models("sd15")
    (tokenizer,) = load_tokenizers("sd15", tok_dir)
    cond = TextConditioner("sd15", [tokenizer], encoders)
    ids = tokenizer(["a red dog"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    context, extra = cond.encode(["a red dog"])
    assert extra is None and torch.equal(context, encoders[0](ids).last_hidden_state)
    assert torch.equal(cond.pooled(["a red dog"]), encoders[0](ids).pooler_output)


def test_separate_vae_file_replaces_the_checkpoints(tmp_path):
    checkpoint, config_dir, tokenizer_dir = write_tiny_model(str(tmp_path / "a"), "sd15", seed=0)
    _, vae, _, _ = build_tiny_models("sd15", seed=5)
    vae_file = str(tmp_path / "vae.safetensors")
    save_file(ldm_names.vae_state_to_ldm(vae.state_dict(), vae.config, prefix=""), vae_file)
    base = load_base_model(checkpoint, config_dir=config_dir, vae_path=vae_file, tokenizer_dir=tokenizer_dir)
    assert all(torch.equal(v, vae.state_dict()[k]) for k, v in base.vae.state_dict().items())
    assert os.path.basename(base.checkpoint) == "tiny-sd15.safetensors"
