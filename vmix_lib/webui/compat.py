"""What differs between the WebUIs VMix runs in, kept in one place (docs/compatibility.md has the
sources behind each line).  Pure: no WebUI import; vmix_lib.webui.host hands it the WebUI's facts.

- ``detect_flavour``: which WebUI this is.  The glue is one code path for all of them; the flavour
  only picks the start-up notice and is reported in messages and tests.
- ``compiled_for_sampling``: whether the diffusion model will run under ``torch.compile``.  Forge
  Neo's built-in "Torch Compile Integrated" either swaps ``forge_objects.unet.model.diffusion_model``
  for ``torch.compile(model)`` (up to early 2026) or wraps ``KModel.apply_model`` so that every call
  compiles the model (later versions: the plain model is in place between calls).  A compiled graph
  keeps running the code it traced: a forward hook added after compiling is silently ignored
  (torch._dynamo.config.skip_nnmodule_hook_guards is True by default), and Neo's "guard_filter_fn"
  preset also drops every guard on ``transformer_options``, where VMix reads its per-call facts.
  So VMix never hooks a model that samples compiled: the job runs without VMix and says why.
- ``model_title``: the name of a model family that is not an SD1.5/SDXL UNet (Flux, Qwen-Image,
  Z-Image, Wan, ...), for the one sentence that says VMix does not apply to it.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch.nn as nn

FLAVOUR_A1111 = "a1111"
FLAVOUR_FORGE = "forge"  # lllyasviel's Forge 2.x: backend/ (new backend), gradio 4
FLAVOUR_NEO = "forge-neo"  # Haoming02's Forge Neo: the same backend, continued; gradio 4
FLAVOUR_CLASSIC = "forge-classic"  # Haoming02's Forge Classic: ldm_patched backend, gradio 3
FLAVOUR_LDM_PATCHED = "forge-ldm_patched"  # old Forge (tag "previous"), reForge: ldm_patched backend

FLAVOUR_TITLES = {
    FLAVOUR_A1111: "AUTOMATIC1111",
    FLAVOUR_FORGE: "Forge",
    FLAVOUR_NEO: "Forge Neo",
    FLAVOUR_CLASSIC: "Forge Classic",
    FLAVOUR_LDM_PATCHED: "Forge with the ldm_patched backend (old Forge or reForge)",
}

# modules_forge/forge_version.py `version`: "neo" and "classic" in Haoming02's branches,
# "2.0.1v1.10.1" in Forge, "0.0.17v1.8.0rc" in old Forge, "1.0.0v2-v1.10.1RC" in reForge.
_VERSION_FLAVOURS = {"neo": FLAVOUR_NEO, "classic": FLAVOUR_CLASSIC}


def detect_flavour(has_module: Callable[[str], bool], forge_version: Callable[[], Optional[str]]) -> str:
    """The running WebUI from ``has_module(name)`` (importlib's find_spec, no import) and the
    version string in modules_forge/forge_version.py (None when unreadable)."""
    if not has_module("modules_forge"):
        return FLAVOUR_A1111
    try:
        version = str(forge_version() or "").strip().lower()
    except Exception:
        version = ""
    if version in _VERSION_FLAVOURS:
        return _VERSION_FLAVOURS[version]
    if has_module("backend.patcher.unet"):
        return FLAVOUR_FORGE
    return FLAVOUR_LDM_PATCHED


def startup_notice(flavour: str) -> Optional[str]:
    """One line for the console at start, or None (hosts VMix was run on say nothing)."""
    if flavour == FLAVOUR_LDM_PATCHED:
        return (f"this is {FLAVOUR_TITLES[flavour]}; VMix uses the same patch points there as in Forge Classic, "
                "but it is tested on AUTOMATIC1111, Forge, Forge Neo and Forge Classic.")
    return None


# ---------------------------------------------------------------- torch.compile

COMPILED_REASON = ("torch.compile is on for this model and a compiled UNet ignores hooks added after compiling, "
                   "so VMix is off for this job; to use VMix, set Torch Compile Integrated to Disable")


def is_compiled(module: Optional[nn.Module]) -> bool:
    """True for ``torch.compile(module)`` (an OptimizedModule holding ``_orig_mod``) and for a module
    compiled in place by ``module.compile()``."""
    if module is None:
        return False
    if isinstance(getattr(module, "_orig_mod", None), nn.Module):
        return True
    return getattr(module, "_compiled_call_impl", None) is not None


# Later Neo (compile.py _wrap_apply_model): the marker on the KModel.apply_model wrapper.
APPLY_MODEL_COMPILE_MARK = "_torch_compile_wrapper"


def compiles_on_call(model_wrapper) -> bool:
    """True when the KModel's ``apply_model`` is a wrapper that compiles the diffusion model per call."""
    apply_model = getattr(model_wrapper, "apply_model", None)
    return bool(getattr(apply_model, APPLY_MODEL_COMPILE_MARK, False))


def compiled_for_sampling(unet: Optional[nn.Module], model_wrapper=None) -> bool:
    """Whether sampling will run ``unet`` compiled: wrapped already, or by ``model_wrapper``
    (Forge/Neo: ``forge_objects.unet.model``, the KModel) at each call."""
    return is_compiled(unet) or compiles_on_call(model_wrapper)


def uncompiled(module: Optional[nn.Module]) -> Optional[nn.Module]:
    """The module a torch.compile wrapper holds (its submodules carry the real layer names)."""
    inner = getattr(module, "_orig_mod", None)
    return inner if isinstance(inner, nn.Module) else module


# ---------------------------------------------------------------- models that are not SD1.5/SDXL UNets

# Forge/Neo diffusion-engine class names (backend/diffusion_engine/*.py) -> what users call them.
NON_UNET_TITLES = {
    "Flux": "Flux",
    "Flux2": "Flux.2",
    "Chroma": "Chroma",
    "QwenImage": "Qwen-Image",
    "ZImage": "Z-Image",
    "Lumina2": "Lumina 2",
    "Wan": "Wan",
    "Anima": "Anima",
    "StableDiffusion3": "SD3",
}


def model_title(engine_class_name: Optional[str]) -> Optional[str]:
    """The family name of a non-UNet model from its engine class name; None when not one of them."""
    return NON_UNET_TITLES.get(engine_class_name or "")


def non_unet_description(title: str) -> str:
    return f"{title}, a diffusion transformer without UNet cross-attention layers (VMix works on SD1.5 and SDXL UNets)"
