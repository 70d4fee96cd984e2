"""Diffusers <-> original (LDM/SGM) names for the UNet, VAE and text encoders.

The WebUIs keep SD1.5 and SDXL in the original Stability layout (``model.diffusion_model.input_blocks...``)
and so do the single-file checkpoints in ``models/Stable-diffusion``.  The trainer loads them with
diffusers' own converters (see checkpoint_loading.py); this module goes the other way:

* ``unet_to_ldm(name, config)``: a diffusers UNet parameter or module path -> the original path.  LoRA
  files are named from it (``lora_unet_`` + original path with ``_``), which is the name both
  AUTOMATIC1111 (extensions-builtin/Lora: "lora_unet" -> "diffusion_model") and Forge
  (model_lora_keys_unet: every ``diffusion_model.*.weight`` key) resolve.
* ``single_file_state_dict(...)``: a whole single-file checkpoint from diffusers/transformers modules
  (used to build small test checkpoints in the real key layout, and by anyone who wants to hand a
  diffusers-built model to the trainer).
"""
from __future__ import annotations

import re
from typing import Dict, Mapping, Optional, Sequence

import torch

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
SD15_CLIP_PREFIX = "cond_stage_model.transformer."
SDXL_CLIP_L_PREFIX = "conditioner.embedders.0.transformer."
SDXL_CLIP_G_PREFIX = "conditioner.embedders.1.model."

_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_TOP = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "class_embedding.linear_1": "label_emb.0.0",
    "class_embedding.linear_2": "label_emb.0.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
_BLOCK_RE = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)(?:\.(.*))?$")
_MID_RE = re.compile(r"^mid_block\.(resnets|attentions)\.(\d+)(?:\.(.*))?$")


def _cfg(config, key, default=None):
    if isinstance(config, Mapping):
        return config.get(key, default)
    return getattr(config, key, default)


def _join(*parts: Optional[str]) -> str:
    return ".".join(p for p in parts if p)


def _resnet_rest(rest: Optional[str]) -> Optional[str]:
    if not rest:
        return rest
    head, _, tail = rest.partition(".")
    return _join(_RESNET.get(head, head), tail)


def unet_to_ldm(name: str, config) -> Optional[str]:
    """Original (WebUI) path of a diffusers UNet parameter or module, without ``model.diffusion_model.``.

    ``config`` is the diffusers UNet config (dict or FrozenDict).  Returns None for a name that has no
    counterpart.  Handles any SD-style layout (block counts and cross-attention placement are read from
    the config), which is what lets tiny test models use the real mapping.
    """
    per = int(_cfg(config, "layers_per_block")) + 1
    for old, new in _TOP.items():
        if name == old or name.startswith(old + "."):
            return new + name[len(old):]
    m = _BLOCK_RE.match(name)
    if m:
        kind, block, part, index, rest = m.group(1), int(m.group(2)), m.group(3), int(m.group(4)), m.group(5)
        if kind == "down_blocks":
            if part == "resnets":
                return _join(f"input_blocks.{block * per + index + 1}.0", _resnet_rest(rest))
            if part == "attentions":
                return _join(f"input_blocks.{block * per + index + 1}.1", rest)
            return _join(f"input_blocks.{(block + 1) * per}.0.op", _strip_conv(rest))
        if part == "resnets":
            return _join(f"output_blocks.{block * per + index}.0", _resnet_rest(rest))
        if part == "attentions":
            return _join(f"output_blocks.{block * per + index}.1", rest)
        has_attention = "CrossAttn" in _cfg(config, "up_block_types")[block]
        return _join(f"output_blocks.{block * per + per - 1}.{2 if has_attention else 1}.conv", _strip_conv(rest))
    m = _MID_RE.match(name)
    if m:
        part, index, rest = m.group(1), int(m.group(2)), m.group(3)
        if part == "resnets":
            return _join(f"middle_block.{2 * index}", _resnet_rest(rest))
        return _join("middle_block.1", rest)
    return None


def _strip_conv(rest: Optional[str]) -> Optional[str]:
    # downsamplers.0.conv.weight -> op.weight; upsamplers.0.conv.weight -> conv.weight
    if rest == "conv":
        return None
    if rest and rest.startswith("conv."):
        return rest[len("conv."):]
    return rest


def unet_state_to_ldm(state: Mapping[str, torch.Tensor], config) -> Dict[str, torch.Tensor]:
    out = {}
    for key, tensor in state.items():
        ldm = unet_to_ldm(key, config)
        if ldm is None:
            raise KeyError(f"no original name for UNet key {key!r}")
        out[UNET_PREFIX + ldm] = tensor
    return out


# -- VAE ---------------------------------------------------------------------------------------
def _vae_to_ldm(key: str, n_up: int) -> str:
    parts = key.split(".")
    side = parts[0]  # encoder / decoder / quant_conv / post_quant_conv
    if side not in ("encoder", "decoder"):
        return key
    rest = ".".join(parts[1:])
    if rest.startswith("conv_norm_out."):
        return f"{side}.norm_out.{rest[len('conv_norm_out.'):]}"
    m = re.match(r"^(down_blocks|up_blocks)\.(\d+)\.(resnets|downsamplers|upsamplers)\.(\d+)\.(.*)$", rest)
    if m:
        kind, block, part, index, tail = m.group(1), int(m.group(2)), m.group(3), int(m.group(4)), m.group(5)
        level = block if kind == "down_blocks" else n_up - 1 - block
        name = "down" if kind == "down_blocks" else "up"
        if part == "resnets":
            return f"{side}.{name}.{level}.block.{index}.{tail.replace('conv_shortcut', 'nin_shortcut')}"
        sampler = "downsample" if part == "downsamplers" else "upsample"
        return f"{side}.{name}.{level}.{sampler}.{tail}"
    m = re.match(r"^mid_block\.resnets\.(\d+)\.(.*)$", rest)
    if m:
        return f"{side}.mid.block_{int(m.group(1)) + 1}.{m.group(2).replace('conv_shortcut', 'nin_shortcut')}"
    m = re.match(r"^mid_block\.attentions\.0\.(.*)$", rest)
    if m:
        tail = m.group(1)
        for old, new in (("group_norm.", "norm."), ("to_q.", "q."), ("to_k.", "k."), ("to_v.", "v."), ("to_out.0.", "proj_out.")):
            if tail.startswith(old):
                tail = new + tail[len(old):]
                break
        return f"{side}.mid.attn_1.{tail}"
    return f"{side}.{rest}"


def vae_state_to_ldm(state: Mapping[str, torch.Tensor], config, prefix: str = VAE_PREFIX) -> Dict[str, torch.Tensor]:
    n_up = len(_cfg(config, "up_block_types"))
    out = {}
    for key, tensor in state.items():
        ldm = _vae_to_ldm(key, n_up)
        if ".mid.attn_1." in ldm and ldm.endswith("weight") and tensor.dim() == 2:
            tensor = tensor[:, :, None, None]  # the original attention uses 1x1 convolutions
        out[prefix + ldm] = tensor
    return out


# -- text encoders -----------------------------------------------------------------------------
def clip_state_to_ldm(state: Mapping[str, torch.Tensor], prefix: str) -> Dict[str, torch.Tensor]:
    """transformers CLIPTextModel keys -> ``<prefix>text_model....`` (the WebUI's FrozenCLIPEmbedder)."""
    out = {}
    for key, tensor in state.items():
        if key.endswith("position_ids"):
            continue
        name = key if key.startswith("text_model.") else "text_model." + key
        out[prefix + name] = tensor
    return out


def open_clip_state_to_ldm(state: Mapping[str, torch.Tensor], prefix: str = SDXL_CLIP_G_PREFIX) -> Dict[str, torch.Tensor]:
    """transformers CLIPTextModelWithProjection keys -> OpenCLIP keys (SDXL's second encoder)."""
    out: Dict[str, torch.Tensor] = {}
    qkv: Dict[str, Dict[str, torch.Tensor]] = {}
    simple = {
        "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
        "text_model.embeddings.position_embedding.weight": "positional_embedding",
        "text_model.final_layer_norm.weight": "ln_final.weight",
        "text_model.final_layer_norm.bias": "ln_final.bias",
    }
    for key, tensor in state.items():
        if key.endswith("position_ids"):
            continue
        if key in simple:
            out[prefix + simple[key]] = tensor
            continue
        if key == "text_projection.weight":
            out[prefix + "text_projection"] = tensor.t().contiguous()  # OpenCLIP computes x @ text_projection
            continue
        m = re.match(r"^text_model\.encoder\.layers\.(\d+)\.(.*)$", key)
        if not m:
            raise KeyError(f"no OpenCLIP name for text encoder key {key!r}")
        layer, tail = m.group(1), m.group(2)
        base = f"{prefix}transformer.resblocks.{layer}."
        qm = re.match(r"^self_attn\.([qkv])_proj\.(weight|bias)$", tail)
        if qm:
            qkv.setdefault(f"{base}attn.in_proj_{qm.group(2)}", {})[qm.group(1)] = tensor
            continue
        for old, new in (("self_attn.out_proj.", "attn.out_proj."), ("layer_norm1.", "ln_1."), ("layer_norm2.", "ln_2."),
                         ("mlp.fc1.", "mlp.c_fc."), ("mlp.fc2.", "mlp.c_proj.")):
            if tail.startswith(old):
                tail = new + tail[len(old):]
                break
        out[base + tail] = tensor
    for name, parts in qkv.items():
        out[name] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out


def single_file_state_dict(
    family: str,
    unet: torch.nn.Module,
    vae: torch.nn.Module,
    text_encoders: Sequence[torch.nn.Module],
    v_prediction: bool = False,
) -> Dict[str, torch.Tensor]:
    """A complete single-file checkpoint (original key layout) from diffusers/transformers modules.

    ``family`` "sd15" takes one CLIPTextModel; "sdxl" takes CLIPTextModel and CLIPTextModelWithProjection.
    ``v_prediction`` adds the ``v_pred`` marker key that v-prediction SDXL fine-tunes carry.
    """
    state = unet_state_to_ldm(unet.state_dict(), unet.config)
    state.update(vae_state_to_ldm(vae.state_dict(), vae.config))
    if family == "sd15":
        (te,) = text_encoders
        state.update(clip_state_to_ldm(te.state_dict(), SD15_CLIP_PREFIX))
    elif family == "sdxl":
        te1, te2 = text_encoders
        state.update(clip_state_to_ldm(te1.state_dict(), SDXL_CLIP_L_PREFIX))
        state.update(open_clip_state_to_ldm(te2.state_dict(), SDXL_CLIP_G_PREFIX))
    else:
        raise ValueError(f"unknown family {family!r}")
    if v_prediction:
        state["v_pred"] = torch.zeros(())
    return {k: v.detach().contiguous() for k, v in state.items()}
