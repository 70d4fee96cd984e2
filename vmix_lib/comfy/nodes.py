"""The ComfyUI nodes: Load VMix Adapter and Apply VMix.

    Load VMix Adapter   adapter_name (a .safetensors file in models/vmix)        -> VMIX_ADAPTER
    Apply VMix          MODEL + VMIX_ADAPTER, strength λ, alpha_1..alpha_8 (α of the adapter's
                        dimensions in its order), start/end (fractions of the schedule), apply_to_uncond,
                        block_weights (the WebUI's syntax)                        -> MODEL

The adapter folder is registered with ComfyUI's ``folder_paths`` as "vmix" (models/vmix, plus any
"vmix:" entries of extra_model_paths.yaml), .safetensors files only.  ``folder_paths`` is ComfyUI's
module; it is imported inside functions, so this module imports without ComfyUI (tests inject a
stand-in through ``set_folder_paths``).
"""
from __future__ import annotations

import logging
import os
from typing import Any, Callable, Optional

from ..adapter_file import EXTENSION, load_adapter
from ..webui.blocks import SYNTAX_HINT
from ..webui.library import NO_OFFICIAL_WEIGHTS
from .patch import MAX_DIMENSION_SLOTS, STRENGTH_RANGE, ApplySettings, LoadedAdapter, apply_vmix

log = logging.getLogger("vmix")

FOLDER = "vmix"  # folder_paths name and models/ sub-folder
ADAPTER_TYPE = "VMIX_ADAPTER"
CATEGORY = "VMix"

_folder_paths: list = [None]  # an injected stand-in (tests); None: ComfyUI's own module


def folder_paths():
    if _folder_paths[0] is not None:
        return _folder_paths[0]
    import folder_paths as comfy_folder_paths  # ComfyUI's; only importable inside ComfyUI

    return comfy_folder_paths


def set_folder_paths(module) -> None:
    """Use ``module`` instead of ComfyUI's folder_paths (tests; None: ComfyUI's again)."""
    _folder_paths[0] = module


def register_folder() -> None:
    """Add "vmix" to folder_paths: models/vmix plus what extra_model_paths.yaml already gave it."""
    fp = folder_paths()
    default = os.path.join(fp.models_dir, FOLDER)
    paths = list(fp.folder_names_and_paths[FOLDER][0]) if FOLDER in fp.folder_names_and_paths else []
    if default not in paths:
        paths.append(default)
    fp.folder_names_and_paths[FOLDER] = (paths, {EXTENSION})


def adapter_names():
    try:
        return [name for name in folder_paths().get_filename_list(FOLDER) if name.lower().endswith(EXTENSION)]
    except KeyError:  # the folder was not registered (ComfyUI did not import the package's root)
        return []


def _stamp(path: str):
    st = os.stat(path)
    return st.st_mtime_ns, st.st_size


class VMixAdapterLoader:
    """Load VMix Adapter."""

    def __init__(self, loader: Callable[..., Any] = load_adapter):
        self._loader = loader
        self._loaded: Optional[tuple] = None  # (path, stamp, LoadedAdapter)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "adapter_name": (adapter_names(), {
                "tooltip": "A VMix adapter (.safetensors) from models/vmix: the same files the WebUI extension and "
                           "its trainer use. " + NO_OFFICIAL_WEIGHTS}),
        }}

    RETURN_TYPES = (ADAPTER_TYPE,)
    RETURN_NAMES = ("vmix_adapter",)
    OUTPUT_TOOLTIPS = ("The VMix adapter, for Apply VMix.",)
    FUNCTION = "load"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Loads a VMix aesthetics adapter (arXiv 2412.20800) from models/vmix. " + NO_OFFICIAL_WEIGHTS)

    @classmethod
    def IS_CHANGED(cls, adapter_name):
        path = folder_paths().get_full_path(FOLDER, adapter_name)
        try:
            return f"{adapter_name}:{_stamp(path)}" if path else adapter_name
        except OSError:
            return adapter_name

    def load(self, adapter_name):
        fp = folder_paths()
        path = fp.get_full_path(FOLDER, adapter_name) if adapter_name else None
        if path is None:
            folders = ", ".join(fp.get_folder_paths(FOLDER)) if FOLDER in fp.folder_names_and_paths else "models/vmix"
            raise FileNotFoundError(f"VMix adapter {adapter_name!r} is not in {folders}; put a VMix adapter "
                                    f"(.safetensors) there and refresh.")
        stamp = _stamp(path)
        if self._loaded is not None and self._loaded[:2] == (path, stamp):
            return (self._loaded[2],)
        loaded = LoadedAdapter(self._loader(path, device="cpu"), adapter_name, path)
        self._loaded = (path, stamp, loaded)
        log.info("VMix: loaded %s", loaded.describe())
        return (loaded,)


def _alpha_input(i: int):
    return ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.05,
                      "tooltip": f"α of the adapter's dimension {i} in its order (default set: 1 color, 2 lighting, "
                                 "3 composition, 4 focus, 5 texture, 6 emotion): 1 = its positive label, 0 = its "
                                 "negative; slots past the adapter's dimensions are unused."})


class VMixApply:
    """Apply VMix."""

    @classmethod
    def INPUT_TYPES(cls):
        low, high = STRENGTH_RANGE
        required = {
            "model": ("MODEL", {"tooltip": "The SD1.5 or SDXL model to apply VMix to (a clone is patched)."}),
            "vmix_adapter": (ADAPTER_TYPE, {"tooltip": "From Load VMix Adapter; its family must match the model."}),
            "strength": ("FLOAT", {"default": 1.0, "min": low, "max": high, "step": 0.05,
                                   "tooltip": "λ: how strongly the aesthetic values are added (0 = off, bit for bit; "
                                              "1 = as trained; the paper sweeps 0 to 2)."}),
        }
        for i in range(1, MAX_DIMENSION_SLOTS + 1):
            required[f"alpha_{i}"] = _alpha_input(i)
        required.update({
            "start": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.01,
                                "tooltip": "Start of the range, as a fraction of the sampling schedule (percent_to_sigma)."}),
            "end": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01,
                              "tooltip": "End of the range, as a fraction of the sampling schedule; above start."}),
            "apply_to_uncond": ("BOOLEAN", {"default": True,
                                            "tooltip": "Also add VMix on the negative prompt's pass (off: positive only)."}),
            "block_weights": ("STRING", {"default": "", "multiline": False,
                                         "tooltip": "λ per block, as in the WebUI: empty = 1 everywhere; e.g. "
                                                    "IN:1, MID:0.5, OUT:1 or OUT3:0 or layer numbers 0-5:0."}),
        })
        return {"required": required}

    RETURN_TYPES = ("MODEL",)
    OUTPUT_TOOLTIPS = ("The model with VMix (a patched clone; the input model is not changed).",)
    FUNCTION = "apply"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Adds VMix's aesthetic values λ·V_a to every cross-attention value projection of the model "
                   "(arXiv 2412.20800). Block weights: " + SYNTAX_HINT + ".")

    def apply(self, model, vmix_adapter, strength, start, end, apply_to_uncond, block_weights, **alphas):
        if not isinstance(vmix_adapter, LoadedAdapter):
            raise ValueError("VMix: the vmix_adapter input must come from a Load VMix Adapter node.")
        slots = tuple(float(alphas.get(f"alpha_{i}", 1.0)) for i in range(1, MAX_DIMENSION_SLOTS + 1))
        unknown = sorted(set(alphas) - {f"alpha_{i}" for i in range(1, MAX_DIMENSION_SLOTS + 1)})
        if unknown:
            raise ValueError(f"VMix: unknown input {unknown[0]!r}.")
        settings = ApplySettings(float(strength), slots, float(start), float(end), bool(apply_to_uncond),
                                 block_weights or "")
        return (apply_vmix(model, vmix_adapter, settings),)


NODE_CLASS_MAPPINGS = {
    "VMixAdapterLoader": VMixAdapterLoader,
    "VMixApply": VMixApply,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "VMixAdapterLoader": "Load VMix Adapter",
    "VMixApply": "Apply VMix",
}
