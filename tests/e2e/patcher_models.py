"""Random-weight models in the real layouts that the composition checks need and nothing can download:
a ControlNet, an IP-Adapter, the CLIP ViT-H image encoder IP-Adapter reads its picture with, and a VMix
adapter (vmix_e2e_random_<family>), written into the folders a WebUI looks in (AUTOMATIC1111 +
sd-webui-controlnet, Forge, Forge Neo).

    python tests/e2e/patcher_models.py WEBUI_DIR [--family sd15|sdxl|both] [--seed 0]

The layouts are those of the files users download: the ControlNet in diffusers' single-file layout
(``diffusion_pytorch_model.safetensors`` of lllyasviel/control_v11p_sd15_canny and
diffusers/controlnet-canny-sdxl-1.0, renamed), the IP-Adapter as h94/IP-Adapter's
``ip-adapter_sd15.safetensors`` / ``ip-adapter_sdxl_vit-h.safetensors`` (``image_proj.*`` and
``ip_adapter.N.to_k_ip/to_v_ip`` for every attention processor N that is a cross-attention), and
the image encoder as transformers' CLIPVisionModelWithProjection of CLIP-ViT-H-14 (1280 wide, 32
layers, projection 1024).  Only the weights are random: a ControlNet's zero convolutions are not zero
here, so the ControlNet visibly changes a picture.  Files that exist are left alone (--force rewrites).
"""
from __future__ import annotations

import argparse
import inspect
import os
import sys
from typing import Dict, List, Tuple

import torch

_TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [os.path.dirname(_TESTS), _TESTS]  # the repository (vmix_lib) and tests/ (test_webui_fakes)

from vmix_lib.train.checkpoint_loading import shipped_unet_config  # noqa: E402

# CLIP-ViT-H-14 (laion2B-s32B-b79K), the image encoder of ip-adapter_sd15 and ip-adapter_sdxl_vit-h
VIT_H = dict(hidden_size=1280, intermediate_size=5120, num_attention_heads=16, num_hidden_layers=32,
             patch_size=14, image_size=224, projection_dim=1024, hidden_act="gelu", layer_norm_eps=1e-5)
IMAGE_EMBED = VIT_H["projection_dim"]
IP_TOKENS = 4  # the plain IP-Adapter projects the image embedding to 4 context tokens


def _random_(module: torch.nn.Module, generator: torch.Generator) -> None:
    """Fill every weight with N(0, 1/fan_in) and every norm with (1, 0): activations keep their scale
    through the full depth (what a trained model does), unlike a default init with zeroed layers."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim >= 2:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=generator) / fan_in ** 0.5)
            elif name.endswith("weight") and "norm" in name.lower():
                p.fill_(1.0)
            elif name.endswith("class_embedding"):
                p.copy_(torch.randn(p.shape, generator=generator))
            else:
                p.zero_()


def _fp16(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    return {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in state.items()}


def controlnet_state(family: str, seed: int = 0) -> Dict[str, torch.Tensor]:
    """A ControlNet of the base model's shape (diffusers layout), fp16."""
    from diffusers import ControlNetModel

    unet = shipped_unet_config(family)
    accepted = inspect.signature(ControlNetModel.__init__).parameters
    config = {k: v for k, v in unet.items() if k in accepted}  # a ControlNet copies the UNet's encoder half
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float16)  # half the memory while building (SDXL's is 1.25 B parameters)
    try:
        model = ControlNetModel(**config)
    finally:
        torch.set_default_dtype(previous)
    _random_(model, torch.Generator().manual_seed(seed))
    return _fp16(model.state_dict())


def cross_attention_processors(family: str) -> List[Tuple[int, int, int]]:
    """(N, inner width, context width) of every cross-attention in diffusers' processor order, which is
    how IP-Adapter files number their ``ip_adapter.N`` layers (self-attentions take the even N)."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(shipped_unet_config(family))
    found = []
    for n, name in enumerate(unet.attn_processors):
        if name.endswith("attn2.processor"):
            attn = unet.get_submodule(name[: -len(".processor")])
            found.append((n, attn.to_v.out_features, attn.to_v.in_features))
    return found


def ip_adapter_state(family: str, seed: int = 0) -> Dict[str, torch.Tensor]:
    """ip-adapter_sd15 / ip-adapter_sdxl_vit-h: image projection to 4 tokens + to_k_ip/to_v_ip per attn2."""
    g = torch.Generator().manual_seed(seed)
    layers = cross_attention_processors(family)
    context = layers[0][2]
    state = {
        "image_proj.proj.weight": torch.randn(IP_TOKENS * context, IMAGE_EMBED, generator=g) / IMAGE_EMBED ** 0.5,
        "image_proj.proj.bias": torch.zeros(IP_TOKENS * context),
        "image_proj.norm.weight": torch.ones(context),
        "image_proj.norm.bias": torch.zeros(context),
    }
    for n, inner, width in layers:
        for kind in ("to_k_ip", "to_v_ip"):
            state[f"ip_adapter.{n}.{kind}.weight"] = torch.randn(inner, width, generator=g) / width ** 0.5
    return _fp16(state)


def clip_vision_state(seed: int = 0) -> Dict[str, torch.Tensor]:
    """CLIP-ViT-H-14's vision tower in transformers' CLIPVisionModelWithProjection layout, fp16."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float16)
    try:
        model = CLIPVisionModelWithProjection(CLIPVisionConfig(**VIT_H))
    finally:
        torch.set_default_dtype(previous)
    _random_(model, torch.Generator().manual_seed(seed))
    state = model.state_dict()
    # the published file carries the position ids too (older transformers saved the buffer)
    state["vision_model.embeddings.position_ids"] = torch.arange((VIT_H["image_size"] // VIT_H["patch_size"]) ** 2 + 1)[None]
    return _fp16(state)


def vmix_adapter(family: str, seed: int = 0):
    """A VMix adapter of the family's real layout with random weights and a non-zero projection (a fresh
    one adds nothing until trained): the checks need λ = 1 to change a picture, not a good picture."""
    from test_webui_fakes import make_adapter  # the unit tests' random adapter, on the real layout

    from vmix_lib.adapter_file import LAYOUTS

    return make_adapter(LAYOUTS[family], family, seed)


def host_kind(webui: str) -> str:
    if os.path.isdir(os.path.join(webui, "modules_forge")):
        return "forge"  # Forge and Forge Neo keep the same folders
    if os.path.isfile(os.path.join(webui, "modules", "sd_models.py")):
        return "a1111"
    raise SystemExit(f"{webui} is not a WebUI folder (no modules/sd_models.py): give the folder webui.py is in")


def destinations(webui: str, family: str) -> Dict[str, str]:
    """Where each model goes, by the names each WebUI looks for (docs/compatibility.md)."""
    kind = host_kind(webui)
    ip_name = "ip-adapter_sd15.safetensors" if family == "sd15" else "ip-adapter_sdxl_vit-h.safetensors"
    if kind == "forge":
        models = os.path.join(webui, "models", "ControlNet")
        clip = os.path.join(webui, "models", "ControlNetPreprocessor", "CLIP-ViT-H-14.safetensors")
    else:
        models = os.path.join(webui, "models", "ControlNet")  # sd-webui-controlnet reads this folder too
        clip = os.path.join(webui, "extensions", "sd-webui-controlnet", "annotator", "downloads", "clip_vision", "clip_h.pth")
    return {"vmix": os.path.join(webui, "models", "VMix", f"vmix_e2e_random_{family}.safetensors"),
            "controlnet": os.path.join(models, f"controlnet_random_{family}.safetensors"),
            "ip-adapter": os.path.join(models, ip_name), "clip-vision": clip}


def write(path: str, make, force: bool) -> None:
    from safetensors.torch import save_file

    from vmix_lib.adapter_file import save_adapter

    if os.path.exists(path) and not force:
        print(f"kept     {path} (exists; --force rewrites it)")
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    state = make()
    partial = path + ".partial"
    if not isinstance(state, dict):  # a VMix adapter: its own format
        os.replace(save_adapter(state, partial + ".safetensors"), path)
        print(f"wrote    {path}")
        return
    if path.endswith(".pth"):
        # the legacy format: AUTOMATIC1111's safe unpickler (modules/safe.py) refuses the zip format's
        # .format_version entry that torch >= 2.x writes, and sd-webui-controlnet loads clip_h.pth through it
        torch.save(state, partial, _use_new_zipfile_serialization=False)
    else:
        save_file(state, partial)
    os.replace(partial, path)  # never a half-written model under the real name
    print(f"wrote    {path} ({sum(v.numel() for v in state.values()) / 1e6:.0f} M values)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("webui", help="the WebUI's folder (where webui.py is)")
    parser.add_argument("--family", choices=("sd15", "sdxl", "both"), default="both")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="rewrite files that exist")
    args = parser.parse_args(argv)
    families = ("sd15", "sdxl") if args.family == "both" else (args.family,)
    for family in families:
        where = destinations(args.webui, family)
        write(where["controlnet"], lambda: controlnet_state(family, args.seed), args.force)
        write(where["ip-adapter"], lambda: ip_adapter_state(family, args.seed), args.force)
        write(where["vmix"], lambda: vmix_adapter(family, args.seed), args.force)
    write(destinations(args.webui, families[0])["clip-vision"], lambda: clip_vision_state(args.seed), args.force)
    return 0


if __name__ == "__main__":
    sys.exit(main())
