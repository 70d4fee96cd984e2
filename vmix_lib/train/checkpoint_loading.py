"""Load a single-file SD1.5 / SDXL checkpoint (.safetensors) fully offline.

Route: read the tensors with safetensors, convert each component with diffusers' own single-file
converters (``diffusers.loaders.single_file_utils``: the code behind ``from_single_file``), and build
the models from configuration files this project ships in ``vmix_lib/train/configs/<family>/``
(unet.json, vae.json, text_encoder.json[, text_encoder_2.json], scheduler.json).  Nothing is
fetched: no Hub lookup, no ``original_config`` download.  ``config_dir`` replaces the shipped
configurations (same file names, or a diffusers-style folder with unet/config.json ...), which is
how small models and tests use the same code path.

Models are built on the ``meta`` device and the checkpoint tensors are assigned into them, so a
checkpoint is held in memory once, in the requested dtype.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch

from .errors import TrainError

CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
FAMILIES = ("sd15", "sdxl")
_FAMILY_TITLE = {"sd15": "SD1.5", "sdxl": "SDXL"}

_SD15_CLIP_KEY = "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"
_SDXL_CLIP_L_KEY = "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight"
_SDXL_CLIP_G_KEY = "conditioner.embedders.1.model.token_embedding.weight"
_REFINER_KEY = "conditioner.embedders.0.model.token_embedding.weight"
_SD2_KEY = "cond_stage_model.model.token_embedding.weight"
_CONV_IN = "model.diffusion_model.input_blocks.0.0.weight"
_UNUSED_SUFFIXES = ("position_ids", "logit_scale")  # stored by some exporters, not model weights


@dataclass(frozen=True)
class CheckpointInfo:
    path: str
    family: str  # "sd15" / "sdxl"
    prediction: str  # "epsilon" / "v_prediction", from the checkpoint's own markers
    keys: frozenset = field(repr=False)


def _open(path: str):
    from safetensors import safe_open

    lower = path.lower()
    if lower.endswith((".ckpt", ".pt", ".pth", ".bin")):
        raise TrainError(
            f"checkpoint {path} is a pickle file, which can run code when loaded; the trainer reads .safetensors "
            "checkpoints only (convert it first, e.g. with the WebUI's Checkpoint Merger saving as safetensors)"
        )
    if not os.path.isfile(path):
        raise TrainError(f"checkpoint {path} does not exist")
    try:
        return safe_open(path, framework="pt", device="cpu")
    except Exception as e:
        raise TrainError(f"checkpoint {path} cannot be read as safetensors ({e})") from None


def inspect_checkpoint(path: str, family: str = "auto", custom_configs: bool = False) -> CheckpointInfo:
    """Family and prediction type from the tensor names (header only, no weights read)."""
    with _open(path) as f:
        keys = frozenset(f.keys())
        conv_in = tuple(f.get_slice(_CONV_IN).get_shape()) if _CONV_IN in keys else None
    name = os.path.basename(path)
    if not any(k.startswith("model.diffusion_model.") for k in keys):
        raise TrainError(
            f"{name} holds no model.diffusion_model weights, so it is not a full SD1.5/SDXL checkpoint "
            "(LoRA, VAE, embedding and diffusers-folder files cannot be trained on)"
        )
    if _SDXL_CLIP_L_KEY in keys and _SDXL_CLIP_G_KEY in keys:
        found = "sdxl"
    elif _REFINER_KEY in keys:
        raise TrainError(f"{name} is an SDXL refiner checkpoint; VMix adapters are trained on SDXL base or SD1.5 models")
    elif _SD2_KEY in keys:
        raise TrainError(f"{name} is an SD2.x checkpoint; VMix adapters exist for SD1.5 and SDXL only")
    elif _SD15_CLIP_KEY in keys:
        found = "sd15"
    else:
        raise TrainError(f"{name} has no text encoder weights the trainer recognises (SD1.5 or SDXL single-file layout)")
    if family not in ("auto", found):
        raise TrainError(f"{name} is an {_FAMILY_TITLE[found]} checkpoint, but the config says family = {family!r}")
    if conv_in is not None and conv_in[1] != 4 and not custom_configs:
        raise TrainError(
            f"{name} takes {conv_in[1]} input channels (an inpainting or instruct model); train on a normal text-to-image checkpoint"
        )
    prediction = "v_prediction" if "v_pred" in keys else "epsilon"
    return CheckpointInfo(path, found, prediction, keys)


def _read_json(path: str) -> Dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def model_configs(family: str, config_dir: Optional[str] = None) -> Dict[str, Dict]:
    """{component: config dict} from ``config_dir`` or the shipped configurations."""
    root = config_dir or os.path.join(CONFIG_DIR, family)
    names = ["unet", "vae", "text_encoder", "scheduler"] + (["text_encoder_2"] if family == "sdxl" else [])
    configs = {}
    for name in names:
        candidates = [os.path.join(root, f"{name}.json"), os.path.join(root, name, "config.json")]
        if name == "scheduler":
            candidates.append(os.path.join(root, "scheduler", "scheduler_config.json"))
        path = next((p for p in candidates if os.path.isfile(p)), None)
        if path is None:
            raise TrainError(f"model config folder {root} has no {name}.json (nor {name}/config.json)")
        try:
            configs[name] = _read_json(path)
        except (OSError, json.JSONDecodeError) as e:
            raise TrainError(f"model config {path} is not valid JSON ({e})") from None
    return configs


def clean_config(config: Dict) -> Dict:
    """A config file's dict without its metadata keys ("_class_name", ...), ready for a constructor."""
    return {k: v for k, v in config.items() if not k.startswith("_") and k != "architectures"}


def shipped_unet_config(family: str) -> Dict:
    """The diffusers UNet2DConditionModel arguments of the real SD1.5 / SDXL base model, from the
    configuration this repository ships (the one the trainer builds its UNet from)."""
    return clean_config(_read_json(os.path.join(CONFIG_DIR, family, "unet.json")))


def alphas_cumprod_from(scheduler_config: Dict) -> torch.Tensor:
    """ᾱ_t of the training noise schedule (DDPM 'scaled_linear' for SD1.5/SDXL)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(clean_config(scheduler_config)).alphas_cumprod.float()


def _materialize(factory, state: Dict[str, torch.Tensor], what: str, name: str) -> torch.nn.Module:
    """Build on meta, assign the checkpoint tensors, then rebuild non-persistent buffers."""
    with torch.device("meta"):
        model = factory()
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    if missing:
        raise TrainError(f"{name} lacks {len(missing)} {what} weight(s) (first: {missing[0]}); is it a complete checkpoint of this model family?")
    for key in expected:
        if tuple(state[key].shape) != tuple(expected[key].shape):
            raise TrainError(
                f"{name} has {what} weight {key} of shape {list(state[key].shape)}, expected {list(expected[key].shape)} "
                "(a different architecture than the model configuration)"
            )
    unexpected = [k for k in state if k not in expected and not k.endswith(_UNUSED_SUFFIXES)]
    if unexpected:
        raise TrainError(f"{name} has {len(unexpected)} {what} weight(s) the model does not use (first: {unexpected[0]})")
    model.load_state_dict({k: state[k] for k in expected}, strict=True, assign=True)
    for mod_name, module in model.named_modules():
        for buf_name, buf in list(module._buffers.items()):
            if buf is not None and buf.is_meta:
                if buf_name == "position_ids":
                    module.register_buffer(buf_name, torch.arange(buf.shape[-1]).expand(buf.shape).clone(), persistent=False)
                else:
                    raise TrainError(f"cannot initialise buffer {mod_name}.{buf_name} of the {what}")
    return model.eval().requires_grad_(False)


@dataclass
class BaseModel:
    """The frozen pieces of a checkpoint, as diffusers / transformers modules."""

    family: str
    prediction: str
    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoders: List[torch.nn.Module]
    tokenizers: List
    alphas_cumprod: torch.Tensor
    scaling_factor: float
    checkpoint: str
    custom_configs: bool = False


def _component(source, prefixes, dtype) -> Dict[str, torch.Tensor]:
    return {k: source.get_tensor(k).to(dtype) for k in source.keys() if k.startswith(prefixes)}


class TensorDict(dict):
    """A plain {name: tensor} mapping with safe_open's ``keys()`` / ``get_tensor()`` interface."""

    def get_tensor(self, key: str) -> torch.Tensor:
        return self[key]


def build_components(
    family: str,
    configs: Dict[str, Dict],
    source,
    name: str,
    dtype: torch.dtype = torch.float32,
    vae_source=None,
    vae_name: Optional[str] = None,
    vae_dtype: torch.dtype = torch.float32,
):
    """(unet, vae, [text encoders]) from original-layout tensors.

    ``source`` (and ``vae_source``, a separate VAE file) offer ``keys()`` and ``get_tensor(key)``:
    an open safetensors file, or a TensorDict (which may hold ``meta`` tensors: every name and shape
    is then checked without any weights in memory).
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
        convert_open_clip_checkpoint,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    unet_cfg, vae_cfg = clean_config(configs["unet"]), clean_config(configs["vae"])
    unet_sd = convert_ldm_unet_checkpoint(_component(source, ("model.diffusion_model.",), dtype), unet_cfg)
    unet = _materialize(lambda: UNet2DConditionModel.from_config(unet_cfg), unet_sd, "UNet", name)
    del unet_sd
    if vae_source is not None:
        vae_raw = {k: vae_source.get_tensor(k).to(vae_dtype) for k in vae_source.keys()}
    else:
        vae_raw = _component(source, ("first_stage_model.",), vae_dtype)
        if not vae_raw:
            raise TrainError(f"{name} has no VAE weights (first_stage_model.*); pass a VAE file with --vae")
    vae = _materialize(lambda: AutoencoderKL.from_config(vae_cfg), convert_ldm_vae_checkpoint(vae_raw, vae_cfg), "VAE", vae_name or name)
    del vae_raw

    te_cfg = CLIPTextConfig(**clean_config(configs["text_encoder"]))
    clip_prefix = "cond_stage_model.transformer." if family == "sd15" else "conditioner.embedders.0.transformer."
    clip_sd = convert_ldm_clip_checkpoint(_component(source, (clip_prefix,), dtype))
    # transformers >= 5.6 flattened CLIPTextModel (no "text_model." level); follow the installed version.
    with torch.device("meta"):
        flat = not hasattr(CLIPTextModel(te_cfg), "text_model")
    if flat:
        clip_sd = {k[len("text_model."):] if k.startswith("text_model.") else k: v for k, v in clip_sd.items()}
    encoders: List[torch.nn.Module] = [_materialize(lambda: CLIPTextModel(te_cfg), clip_sd, "text encoder", name)]
    if family == "sdxl":
        te2_cfg = CLIPTextConfig(**clean_config(configs["text_encoder_2"]))
        prefix = "conditioner.embedders.1.model."
        with torch.device("meta"):
            skeleton = CLIPTextModelWithProjection(te2_cfg)
        g_sd = convert_open_clip_checkpoint(skeleton, _component(source, (prefix,), dtype), prefix=prefix)
        encoders.append(_materialize(lambda: CLIPTextModelWithProjection(te2_cfg), g_sd, "second text encoder", name))
    return unet, vae, encoders


def load_base_model(
    path: str,
    family: str = "auto",
    config_dir: Optional[str] = None,
    vae_path: Optional[str] = None,
    tokenizer_dir: Optional[str] = None,
    dtype: torch.dtype = torch.float32,
    vae_dtype: torch.dtype = torch.float32,
    load_tokenizers: bool = True,
) -> BaseModel:
    """UNet, VAE, text encoder(s), tokenizer(s) and noise schedule of a single-file checkpoint (CPU)."""
    from . import text as text_mod

    info = inspect_checkpoint(path, family, custom_configs=bool(config_dir))
    family = info.family
    configs = model_configs(family, config_dir)
    name = os.path.basename(path)
    with _open(path) as f:
        if vae_path:
            with _open(vae_path) as vf:
                unet, vae, encoders = build_components(family, configs, f, name, dtype, vf, os.path.basename(vae_path), vae_dtype)
        else:
            unet, vae, encoders = build_components(family, configs, f, name, dtype, vae_dtype=vae_dtype)

    tokenizers = text_mod.load_tokenizers(family, tokenizer_dir) if load_tokenizers else []
    return BaseModel(
        family=family,
        prediction=info.prediction,
        unet=unet,
        vae=vae,
        text_encoders=encoders,
        tokenizers=tokenizers,
        alphas_cumprod=alphas_cumprod_from(configs["scheduler"]),
        scaling_factor=float(clean_config(configs["vae"]).get("scaling_factor", 0.18215)),
        checkpoint=path,
        custom_configs=bool(config_dir),
    )
