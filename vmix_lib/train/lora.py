"""LoRA on the frozen UNet during VMix training (paper §3.4), saved as a standard LoRA file.

The paper adds LoRA "into some of the model's linear layers and convolutional layers" to steady
training and notes it is not needed at inference.  We train it alongside the adapter and write it in
the kohya layout that the WebUIs' built-in Lora loaders read:

    lora_unet_<original module path with "_">.lora_down.weight   [rank, in(, kh, kw)]
    lora_unet_<...>.lora_up.weight                               [out, rank(, 1, 1)]
    lora_unet_<...>.alpha                                        scalar; scale = alpha / rank

with the original (WebUI) module path, e.g. ``lora_unet_input_blocks_1_1_transformer_blocks_0_attn2_to_k``:
AUTOMATIC1111 maps "lora_unet" -> "diffusion_model" (extensions-builtin/Lora/networks.py), Forge lists
every ``diffusion_model.*.weight`` as ``lora_unet_*`` (model_lora_keys_unet).  The delta is added by
forward hooks, so module names and the VMix hook are untouched.
"""
from __future__ import annotations

import json
import math
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from .ldm_names import unet_to_ldm

TARGETS = ("attention", "transformer")
_ATTENTION_LEAVES = ("to_q", "to_k", "to_v", "to_out.0")
_CONV_PARENTS = (".resnets.", ".downsamplers.", ".upsamplers.")


class LoRALayer(nn.Module):
    """down (rank) -> up, zero-initialised up so training starts at the base model."""

    def __init__(self, base: nn.Module, rank: int, alpha: float):
        super().__init__()
        self.rank = int(rank)
        self.alpha = float(alpha)
        if isinstance(base, nn.Linear):
            self.down = nn.Linear(base.in_features, rank, bias=False)
            self.up = nn.Linear(rank, base.out_features, bias=False)
        elif isinstance(base, nn.Conv2d):
            self.down = nn.Conv2d(base.in_channels, rank, base.kernel_size, base.stride, base.padding, base.dilation, bias=False)
            self.up = nn.Conv2d(rank, base.out_channels, 1, bias=False)
        else:
            raise TypeError(f"LoRA supports Linear and Conv2d layers, not {type(base).__name__}")
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.up.weight)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x)) * self.scale  # under autocast the matmuls run in the autocast dtype


def select_layers(unet: nn.Module, targets: str = "attention", conv: bool = False) -> List[Tuple[str, nn.Module]]:
    """(diffusers module name, module) pairs to adapt.

    "attention": to_q/to_k/to_v/to_out.0 of every attn1 and attn2 in the UNet's transformer blocks.
    "transformer": every Linear (and 1x1 projection conv) inside the transformer blocks (the kohya
    default: also proj_in/proj_out and the feed-forward layers).  ``conv`` adds the convolutions of
    the ResNet blocks and the down/up-samplers.
    """
    if targets not in TARGETS:
        raise ValueError(f"unknown LoRA target {targets!r}; use one of {', '.join(TARGETS)}")
    chosen = []
    for name, module in unet.named_modules():
        if not isinstance(module, (nn.Linear, nn.Conv2d)):
            continue
        in_transformer = ".attentions." in name
        if in_transformer and targets == "attention":
            if ".attn1." in name or ".attn2." in name:
                if name.endswith(_ATTENTION_LEAVES):
                    chosen.append((name, module))
        elif in_transformer and targets == "transformer":
            chosen.append((name, module))
        elif conv and isinstance(module, nn.Conv2d) and any(p in name for p in _CONV_PARENTS):
            chosen.append((name, module))
    return chosen


def kohya_name(diffusers_name: str, unet_config) -> str:
    ldm = unet_to_ldm(diffusers_name, unet_config)
    if ldm is None:
        raise KeyError(f"no original name for UNet module {diffusers_name!r}")
    return "lora_unet_" + ldm.replace(".", "_")


class LoRANetwork(nn.Module):
    """The LoRA layers of one UNet, keyed by their kohya names; ``install`` hooks them in."""

    def __init__(
        self,
        unet: nn.Module,
        rank: int,
        alpha: Optional[float] = None,
        targets: str = "attention",
        conv_rank: int = 0,
        conv_alpha: Optional[float] = None,
    ):
        super().__init__()
        if rank < 1 and conv_rank < 1:
            raise ValueError("LoRA needs rank >= 1 (or conv_rank >= 1)")
        self.rank, self.conv_rank = int(rank), int(conv_rank)
        self.alpha = float(alpha if alpha else rank)
        self.conv_alpha = float(conv_alpha if conv_alpha else conv_rank)
        self.targets = targets
        self.layers = nn.ModuleDict()
        self._modules_by_key: Dict[str, nn.Module] = {}
        self._handles: list = []
        config = unet.config
        picked = select_layers(unet, targets, conv=False) if rank > 0 else []
        # conv=True also returns the transformer layers; keep only the ResNet / sampler convolutions
        conv_picked = [p for p in select_layers(unet, targets, conv=True) if ".attentions." not in p[0]] if conv_rank > 0 else []
        for (name, module), r, a in [(p, self.rank, self.alpha) for p in picked] + [(p, self.conv_rank, self.conv_alpha) for p in conv_picked]:
            key = kohya_name(name, config)
            self.layers[key] = LoRALayer(module, r, a)
            self._modules_by_key[key] = module

    def install(self) -> "LoRANetwork":
        self.remove()
        for key, module in self._modules_by_key.items():
            layer = self.layers[key]

            def hook(mod, args, output, layer=layer):
                return output + layer(args[0]).to(output.dtype)

            self._handles.append(module.register_forward_hook(hook))
        return self

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def file_state(self, dtype: torch.dtype = torch.float16) -> Dict[str, torch.Tensor]:
        """Tensors of the LoRA file in kohya naming."""
        out = {}
        for key, layer in self.layers.items():
            out[f"{key}.lora_down.weight"] = layer.down.weight.detach().to("cpu", dtype).contiguous()
            out[f"{key}.lora_up.weight"] = layer.up.weight.detach().to("cpu", dtype).contiguous()
            out[f"{key}.alpha"] = torch.tensor(layer.alpha, dtype=dtype)
        return out

    def save(self, path: str, family: str, name: str, extra: Optional[Dict[str, str]] = None, dtype: torch.dtype = torch.float16) -> str:
        """Write the LoRA .safetensors with the metadata the WebUI Lora tab reads (SD version, alias)."""
        import os

        from safetensors.torch import save_file

        meta = {
            "ss_network_module": "networks.lora",
            "ss_network_dim": str(self.rank or self.conv_rank),
            "ss_network_alpha": str(self.alpha if self.rank else self.conv_alpha),
            "ss_base_model_version": "sdxl_base_v1-0" if family == "sdxl" else "sd_v1",
            "ss_v2": "False",
            "ss_output_name": name,
            "ss_network_args": json.dumps(
                {"conv_dim": str(self.conv_rank), "conv_alpha": str(self.conv_alpha)} if self.conv_rank else {}
            ),
            "vmix_lora": json.dumps({"targets": self.targets, "rank": self.rank, "conv_rank": self.conv_rank}),
        }
        meta.update(extra or {})
        tmp = path + ".tmp"
        save_file(self.file_state(dtype), tmp, metadata=meta)
        os.replace(tmp, path)
        return path
