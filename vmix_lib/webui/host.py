"""The running WebUI (AUTOMATIC1111 1.6-1.10, Forge, Forge Neo): model lookups, settings, folder, callbacks.

The only module of vmix_lib that imports the WebUI's ``modules`` (inside functions, so importing it
without a WebUI fails only when something is actually asked of it).
"""
from __future__ import annotations

import importlib.util
import os
import sys
from typing import Any, Callable, Optional

from ..layers import FamilyReport, detect_family, find_cross_attention_layers
from . import compat, library
from .lifecycle import VMixError
from .runner import ON_MISMATCH_SKIP, ON_MISMATCH_STOP, RunnerOptions, stop_before_sampling

SECTION = ("vmix", "VMix")
OPT_FOLDER = "vmix_model_dir"
OPT_STRENGTH = "vmix_default_strength"
OPT_UNCOND = "vmix_uncond_default"
OPT_MISMATCH = "vmix_on_mismatch"
MISMATCH_CHOICES = {
    "Run without VMix and say so in the infotext": ON_MISMATCH_SKIP,
    "Stop the job with an error": ON_MISMATCH_STOP,
}
DEFAULT_MISMATCH = next(iter(MISMATCH_CHOICES))
FOLDER_NAME = "VMix"


# ---------------------------------------------------------------- detection


def _find_spec(name: str) -> bool:
    try:  # a dotted find_spec imports the parents and raises when one is missing
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError, AttributeError):
        return False


def _forge_version() -> Optional[str]:
    """modules_forge/forge_version.py's ``version`` (a one-line module; None when absent)."""
    try:
        from modules_forge import forge_version
    except Exception:
        return None
    return getattr(forge_version, "version", None)


def webui_kind() -> str:
    """The WebUI flavour (vmix_lib.webui.compat): "a1111", "forge", "forge-neo", "forge-classic" or
    "forge-ldm_patched" (old Forge, reForge)."""
    return compat.detect_flavour(_find_spec, _forge_version)


def startup_notice() -> Optional[str]:
    return compat.startup_notice(webui_kind())


# ---------------------------------------------------------------- settings and folder


def opt(name: str, default: Any) -> Any:
    try:
        from modules import shared

        value = getattr(shared.opts, name, default)
        return default if value is None else value
    except Exception:
        return default


def runner_options() -> RunnerOptions:
    try:
        strength = min(max(float(opt(OPT_STRENGTH, 1.0)), 0.0), 3.0)
    except (TypeError, ValueError):
        strength = 1.0
    return RunnerOptions(
        default_strength=strength,
        uncond_default=bool(opt(OPT_UNCOND, True)),
        on_mismatch=MISMATCH_CHOICES.get(opt(OPT_MISMATCH, DEFAULT_MISMATCH), ON_MISMATCH_SKIP),
    )


def default_folder() -> Optional[str]:
    try:
        from modules.paths import models_path
    except ImportError:  # not inside a WebUI
        return None
    return os.path.join(models_path, FOLDER_NAME)


def _vmix_dir_option() -> Optional[str]:
    try:
        from modules import shared

        return getattr(shared.cmd_opts, "vmix_dir", None)
    except Exception:
        return None


def adapter_folder() -> Optional[str]:
    """--vmix-dir, else Settings > VMix > folder, else models/VMix (created when missing); None
    outside a WebUI."""
    cmd = _vmix_dir_option()
    if cmd:
        return os.path.abspath(os.path.expanduser(cmd))
    configured = str(opt(OPT_FOLDER, "") or "").strip()
    if configured:
        return os.path.abspath(os.path.expanduser(configured))
    folder = default_folder()
    if folder is not None and not os.path.isdir(folder):
        try:
            os.makedirs(folder, exist_ok=True)  # so users see where adapters go
        except OSError:
            pass
    return folder


def shown_folder(path: str) -> str:
    """The adapter folder as users and HTTP API clients see it: relative to the WebUI's data or
    program folder ("models/VMix"), else named by the option that set it; never the absolute path."""
    try:
        from modules import paths_internal

        roots = [paths_internal.data_path, paths_internal.script_path]
    except Exception:
        roots = []
    if _vmix_dir_option():
        outside = "the folder given by --vmix-dir"
    elif str(opt(OPT_FOLDER, "") or "").strip():
        outside = "the folder set in Settings > VMix"
    else:
        outside = f"the {FOLDER_NAME} folder of the models folder (--models-dir)"
    return library.shown_folder(path, roots, outside)


def sha256(path: str, title: str) -> Optional[str]:
    """The WebUI's cached file hash (cache.json; None with --no-hashing)."""
    from modules import hashes

    return hashes.sha256(path, title)


# ---------------------------------------------------------------- models


def _diffusion_model(sd_model) -> Any:
    if sd_model is None:
        return None
    forge_objects = getattr(sd_model, "forge_objects", None)
    if forge_objects is not None:
        return getattr(getattr(getattr(forge_objects, "unet", None), "model", None), "diffusion_model", None)
    return getattr(getattr(sd_model, "model", None), "diffusion_model", None)


def loaded_model():
    """The loaded checkpoint, without triggering a load (shared.sd_model would load one)."""
    try:
        from modules import sd_models

        return getattr(sd_models.model_data, "sd_model", None)
    except Exception:
        return None


def engine_title(sd_model) -> Optional[str]:
    """Forge/Neo: the name of a non-UNet model family (Flux, Qwen-Image, ...) from its engine class."""
    if sd_model is None or getattr(sd_model, "forge_objects", None) is None:
        return None
    return compat.model_title(type(sd_model).__name__)


def loaded_model_report() -> Optional[FamilyReport]:
    """What the loaded checkpoint is, for the info line; None when none is loaded."""
    model = loaded_model()
    unet = _diffusion_model(model)
    if unet is None:
        return None
    title = engine_title(model)
    if title is not None:
        return FamilyReport(None, compat.non_unet_description(title))
    try:  # a torch.compile wrapper names its layers "_orig_mod.…": report the model it holds
        return detect_family(find_cross_attention_layers(compat.uncompiled(unet)))
    except Exception:
        return None


def job_key_of(state) -> tuple:
    """Identifies the running WebUI job.  state.job_timestamp is set once by state.begin(); state.job
    is "" between jobs (state.end(), call_queue) and its text changes during one ("Batch 2 out of 4",
    X/Y/Z cells, batch img2img), so only whether it is empty counts."""
    return (bool(state.job), state.job_timestamp)


_api_error_class: list = []


def api_error_class(http_exception: Optional[type]) -> type:
    """VMixError that is also ``http_exception`` (fastapi's HTTPException in the WebUI).

    A1111 and Forge (modules/api/api.py handle_exception) print a traceback with every local
    variable for any exception that is not an HTTPException; a stopped job is a user's input
    error, so it must reach the API client as 422 + one sentence and leave the console alone.
    The class keeps the name VMixError (the API's "error" field).
    """
    if http_exception is None:
        return VMixError

    class APIVMixError(VMixError, http_exception):
        def __init__(self, message: str):
            VMixError.__init__(self, message)
            self.headers = None  # fastapi/starlette HTTPException attribute

    APIVMixError.__name__ = APIVMixError.__qualname__ = "VMixError"
    return APIVMixError


def _webui_api_error_class() -> type:
    if not _api_error_class:
        try:
            from fastapi import HTTPException
        except ImportError:  # no HTTP API here: the plain error still stops the job
            HTTPException = None
        _api_error_class.append(api_error_class(HTTPException))
    return _api_error_class[0]


class WebUIHost:
    """vmix_lib.webui.lifecycle.Host for the running WebUI."""

    _shared = None

    def job_key(self):
        # Called by every hooked layer's guard: keep it to two attribute reads.
        shared = WebUIHost._shared
        if shared is None:
            from modules import shared

            WebUIHost._shared = shared
        return job_key_of(shared.state)

    def unet_of(self, p):
        return _diffusion_model(p.sd_model)

    def model_title(self, p) -> Optional[str]:
        return engine_title(getattr(p, "sd_model", None))

    def patcher_of(self, p):
        forge_objects = getattr(p.sd_model, "forge_objects", None)
        return getattr(forge_objects, "unet", None) if forge_objects is not None else None

    def set_patcher(self, p, patcher) -> None:
        p.sd_model.forge_objects.unet = patcher

    def current_unet(self):
        return _diffusion_model(loaded_model())

    def current_patcher(self):
        forge_objects = getattr(loaded_model(), "forge_objects", None)
        return getattr(forge_objects, "unet", None) if forge_objects is not None else None

    def warn(self, message: str) -> None:
        print(f"[VMix] {message.removeprefix('VMix: ')}", file=sys.stderr, flush=True)

    def stop_error(self, message: str) -> VMixError:
        return _webui_api_error_class()(message)

    def stop_before_sampling(self, p, sentence: str) -> bool:
        from modules import shared

        return stop_before_sampling(p, shared.state, sentence)


# ---------------------------------------------------------------- callbacks and settings


def register_callbacks(on_cfg_denoiser: Callable, on_unloaded: Callable, on_ui_settings: Callable,
                       on_before_ui: Optional[Callable] = None, on_ui_tabs: Optional[Callable] = None,
                       on_app_started: Optional[Callable] = None) -> None:
    """Register each callback once: the WebUI clears its lists on "Reload UI" and the script file
    registers again, while vmix_lib stays imported, so remove an earlier registration first."""
    from modules import script_callbacks

    pairs = [(script_callbacks.on_cfg_denoiser, on_cfg_denoiser),
             (script_callbacks.on_script_unloaded, on_unloaded),
             (script_callbacks.on_ui_settings, on_ui_settings)]
    for register, fn in ((script_callbacks.on_before_ui, on_before_ui), (script_callbacks.on_ui_tabs, on_ui_tabs),
                         (script_callbacks.on_app_started, on_app_started)):
        if fn is not None:
            pairs.append((register, fn))
    for register, fn in pairs:
        script_callbacks.remove_callbacks_for_function(fn)
        register(fn)


def add_settings() -> None:
    import gradio as gr
    from modules import shared

    def add(key, info):
        info.section = SECTION
        shared.opts.add_option(key, info)

    add(OPT_FOLDER, shared.OptionInfo(
        "", "Folder with VMix adapters (empty: models/VMix; the --vmix-dir command-line option wins over this)",
    ))
    add(OPT_STRENGTH, shared.OptionInfo(
        1.0, "Default strength λ", gr.Slider, {"minimum": 0.0, "maximum": 3.0, "step": 0.05},
    ).needs_reload_ui())
    add(OPT_UNCOND, shared.OptionInfo(
        True, "Apply VMix to the unconditional (negative) pass by default",
    ).needs_reload_ui())
    add(OPT_MISMATCH, shared.OptionInfo(
        DEFAULT_MISMATCH, "When the adapter cannot be applied (wrong model family, missing or malformed file)",
        gr.Radio, {"choices": list(MISMATCH_CHOICES)},
    ))
