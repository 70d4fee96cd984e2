"""Cross-attention layer inventory: names, widths, and which model family a UNet is.

Adapters address layers by their WebUI name (``input_blocks.1.1.transformer_blocks.0.attn2``),
the same in AUTOMATIC1111 (ldm/sgm) and Forge.  Diffusers trees are mapped to those names.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Tuple

import torch.nn as nn

TOKENS = 77  # CLIP context length; prompts are whole multiples of it.


@dataclass(frozen=True)
class LayerInfo:
    name: str  # WebUI name, e.g. "middle_block.1.transformer_blocks.0.attn2"
    context_dim: int  # to_v in_features
    inner_dim: int  # to_v out_features
    heads: Optional[int]
    module: Optional[nn.Module] = None  # the attn2 module itself (None for static layouts)

    @property
    def dim_head(self) -> Optional[int]:
        return self.inner_dim // self.heads if self.heads else None


def _webui_layout(
    context_dim: int,
    input_blocks: Iterable[Tuple[int, int, int, int]],
    middle: Tuple[int, int, int],
    output_blocks: Iterable[Tuple[int, int, int, int]],
) -> List[LayerInfo]:
    """Build a static layout from (block index, depth, channels, heads) rows."""
    layers = []

    def add(prefix, depth, channels, heads):
        for j in range(depth):
            layers.append(LayerInfo(f"{prefix}.1.transformer_blocks.{j}.attn2", context_dim, channels, heads))

    for idx, depth, ch, heads in input_blocks:
        add(f"input_blocks.{idx}", depth, ch, heads)
    add("middle_block", *middle)
    for idx, depth, ch, heads in output_blocks:
        add(f"output_blocks.{idx}", depth, ch, heads)
    return layers


# The two layouts an adapter can target (configs/v1-inference.yaml, sd_xl_base.yaml).
SD15_LAYOUT = _webui_layout(
    768,
    [(1, 1, 320, 8), (2, 1, 320, 8), (4, 1, 640, 8), (5, 1, 640, 8), (7, 1, 1280, 8), (8, 1, 1280, 8)],
    (1, 1280, 8),
    [(i, 1, 1280, 8) for i in (3, 4, 5)] + [(i, 1, 640, 8) for i in (6, 7, 8)] + [(i, 1, 320, 8) for i in (9, 10, 11)],
)
SDXL_LAYOUT = _webui_layout(
    2048,
    [(4, 2, 640, 10), (5, 2, 640, 10), (7, 10, 1280, 20), (8, 10, 1280, 20)],
    (10, 1280, 20),
    [(i, 10, 1280, 20) for i in (0, 1, 2)] + [(i, 2, 640, 10) for i in (3, 4, 5)],
)
LAYOUTS: Dict[str, List[LayerInfo]] = {"sd15": SD15_LAYOUT, "sdxl": SDXL_LAYOUT}
FAMILY_TITLES = {"sd15": "SD1.5", "sdxl": "SDXL"}

_DIFFUSERS_RE = re.compile(
    r"^(?:(?P<down>down_blocks)\.(?P<db>\d+)\.attentions\.(?P<da>\d+)"
    r"|(?P<mid>mid_block)\.attentions\.0"
    r"|(?P<up>up_blocks)\.(?P<ub>\d+)\.attentions\.(?P<ua>\d+))"
    r"\.transformer_blocks\.(?P<tb>\d+)\.attn2$"
)


def diffusers_to_webui(name: str, layers_per_block: int = 2) -> Optional[str]:
    """Map a diffusers attn2 name to the WebUI name; None if it is not a UNet attn2 name.

    Down block b, attention j sits in input block b*(L+1)+j+1; up block b, attention j in
    output block b*(L+1)+j (L = layers_per_block, 2 in SD1.5 and SDXL).
    """
    m = _DIFFUSERS_RE.match(name)
    if not m:
        return None
    per = layers_per_block + 1
    if m["down"]:
        block = f"input_blocks.{int(m['db']) * per + int(m['da']) + 1}"
    elif m["mid"]:
        block = "middle_block"
    else:
        block = f"output_blocks.{int(m['ub']) * per + int(m['ua'])}"
    return f"{block}.1.transformer_blocks.{m['tb']}.attn2"


_WEBUI_RE = re.compile(
    r"^(?:input_blocks\.\d+|middle_block|output_blocks\.\d+)\.1\.transformer_blocks\.\d+\.attn2$"
)


def is_webui_layer_name(name: str) -> bool:
    return bool(_WEBUI_RE.match(name))


def _heads_of(module: nn.Module) -> Optional[int]:
    heads = getattr(module, "heads", None)
    return int(heads) if isinstance(heads, int) else None


def _features(linear: nn.Module) -> Tuple[int, int]:
    """(in, out) features of a to_v layer without reading its weight data (fp8/GGUF safe)."""
    if hasattr(linear, "in_features") and hasattr(linear, "out_features"):
        return int(linear.in_features), int(linear.out_features)
    weight = getattr(linear, "weight", None)
    if weight is not None and weight.dim() == 2:
        return int(weight.shape[1]), int(weight.shape[0])
    raise ValueError(f"cannot read the shape of {type(linear).__name__}")


def find_cross_attention_layers(unet: nn.Module) -> List[LayerInfo]:
    """Every cross-attention (attn2) layer of a WebUI-style or diffusers UNet, by WebUI name.

    Order follows the module tree (input, middle, output for WebUI trees).
    """
    layers_per_block = 2
    config = getattr(unet, "config", None)
    if config is not None:
        lpb = config.get("layers_per_block", 2) if isinstance(config, dict) else getattr(config, "layers_per_block", 2)
        if isinstance(lpb, int):
            layers_per_block = lpb
    found = []
    for name, module in unet.named_modules():
        if not name.endswith("attn2") or not hasattr(module, "to_v"):
            continue
        webui = name if is_webui_layer_name(name) else diffusers_to_webui(name, layers_per_block)
        if webui is None:
            continue
        in_f, out_f = _features(module.to_v)
        found.append(LayerInfo(webui, in_f, out_f, _heads_of(module), module))
    order = {"input_blocks": 0, "middle_block": 1, "output_blocks": 2}

    def key(info: LayerInfo):
        parts = info.name.split(".")
        if parts[0] == "middle_block":
            return (1, 0, int(parts[3]))
        return (order[parts[0]], int(parts[1]), int(parts[4]))

    return sorted(found, key=key)


@dataclass(frozen=True)
class FamilyReport:
    family: Optional[str]  # "sd15" / "sdxl", or None when unsupported
    description: str  # what the model looks like, for messages

    @property
    def supported(self) -> bool:
        return self.family is not None


def detect_family(layers: List[LayerInfo]) -> FamilyReport:
    """Name the family of a UNet from its attn2 inventory, or say clearly what it is instead."""
    if not layers:
        return FamilyReport(None, "a model without UNet cross-attention layers (SD3, Flux or another non-UNet design)")
    widths = sorted({info.context_dim for info in layers})
    shape = {(info.name, info.context_dim, info.inner_dim) for info in layers}
    for family, layout in LAYOUTS.items():
        if shape == {(info.name, info.context_dim, info.inner_dim) for info in layout}:
            return FamilyReport(family, f"{FAMILY_TITLES[family]} ({len(layers)} cross-attention layers, width {widths[0]})")
    width = widths[0] if len(widths) == 1 else None
    n = len(layers)
    if width == 1024:
        what = "an SD2.x model"
    elif width == 1280:
        what = "the SDXL refiner"
    elif width == 2048:
        what = "a pruned or altered SDXL model (SSD-1B, Vega, KOALA or similar)"
    elif width == 768:
        what = "an altered SD1.x layout"
    else:
        what = "an unknown UNet"
    return FamilyReport(None, f"{what} ({n} cross-attention layers, context width {'/'.join(map(str, widths))})")
